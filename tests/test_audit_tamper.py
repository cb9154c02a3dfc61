"""`audit verify` against the tampering a careful forger tries: a fake prune row, a
non-canonical body, deleted checkpoints or a trigger that deletes them, altered column
types, junk rows and moved rows. Each single tampering is one problem naming its kind
and seq; bad input is exit 2, never a traceback. Real SQLite files written by the
router's own store, as in test_audit_verify."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from test_audit_store import config, event
from test_audit_verify import check_trail, copy_trail

from hybridroute.cli import main
from hybridroute.router.audit.events import AuditNote
from hybridroute.router.audit.store import AuditStore

EVERY = 10


@pytest.fixture(scope="module")
def trail(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 records (1 audit.created, 2 router.start stating checkpoint_every 10, then 30
    requests); checkpoints at 10, 20, 30 (count) and 32 (shutdown)."""
    root = tmp_path_factory.mktemp("trail")
    cfg = config(root, checkpoint_every=EVERY)

    async def run() -> None:
        store = AuditStore(cfg)
        await store.start()
        await store.note(AuditNote("router.start", {"version": "test", "audit": store.describe()}))
        for i in range(30):
            await store.record(event(i, caller="demo-app" if i % 2 else "batch-job"))
        await store.close()

    asyncio.run(run())
    return root


def _sql(*statements: str) -> Callable[[Path], None]:
    def run(db: Path) -> None:
        with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
            for statement in statements:
                conn.execute(statement)

    return run


def _rehash(first: int, last: int | None = None) -> Callable[[Path], None]:
    """What a forger does after an edit: fix up the hashes from `first` (to `last`)."""

    def run(db: Path) -> None:
        with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
            (prev,) = conn.execute(
                "SELECT hash FROM records WHERE seq = ?", (first - 1,)
            ).fetchone()
            rows = conn.execute(
                "SELECT seq, body FROM records WHERE seq BETWEEN ? AND ? ORDER BY seq",
                (first, last or 1 << 62),
            ).fetchall()
            for s, body in rows:
                prev = hashlib.sha256(bytes.fromhex(prev) + body.encode()).hexdigest()
                conn.execute("UPDATE records SET hash = ? WHERE seq = ?", (prev, s))

    return run


def _both(*steps: Callable[[Path], None]) -> Callable[[Path], None]:
    def run(db: Path) -> None:
        for step in steps:
            step(db)

    return run


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _verify_cli(capsys: pytest.CaptureFixture[str], db: Path) -> tuple[int, str, str]:
    key = str(db.with_name("audit-signing.pub"))
    return _cli(capsys, "audit", "verify", "--db", str(db), "--key", key)


def _prune_all(db: Path) -> None:
    key = str(db.with_name("audit-signing.pub"))
    assert main(["audit", "prune", "--db", str(db), "--key", key, "--before", "now", "--yes"]) == 0


# Each: the tampering, then the one problem verify must report (kind, seq).
SINGLE: dict[str, tuple[Callable[[Path], None], str, int]] = {
    # 1. prunes
    "everything deleted behind a fake prune row": (
        _sql(
            "DELETE FROM records",
            "DELETE FROM checkpoints",
            "INSERT INTO prunes VALUES (32, 'x', 32, 0, 0)",
        ),
        "deleted",
        1,
    ),
    "head deleted behind a prune row naming its checkpoint, older checkpoints left": (
        _sql(
            "DELETE FROM records WHERE seq <= 20",
            "INSERT INTO prunes SELECT seq, hash, 20, 0, 0 FROM checkpoints WHERE seq = 20",
        ),
        "deleted",
        1,
    ),
    "prune row on a trail that still holds those records": (
        _sql("INSERT INTO prunes SELECT seq, hash, 10, 0, 0 FROM checkpoints WHERE seq = 10"),
        "inserted",
        10,
    ),
    "a genuine prune whose row was edited to name another hash": (
        _both(_prune_all, _sql("UPDATE prunes SET through_hash = 'x'")),
        "deleted",
        1,
    ),
    # 2. bodies that are not canonical, chain fixed up
    "duplicate key, re-hashed": (
        _both(
            _sql(
                'UPDATE records SET body = replace(body, \'"caller":"batch-job"\', '
                '\'"caller":"batch-job","caller":"mallory"\') WHERE seq = 13'
            ),
            _rehash(13),
        ),
        "modified",
        13,
    ),
    "whitespace in a body, re-hashed": (
        _both(
            _sql("UPDATE records SET body = replace(body, ',', ', ') WHERE seq = 13"), _rehash(13)
        ),
        "modified",
        13,
    ),
    # 3. checkpoints deleted
    "every checkpoint deleted": (_sql("DELETE FROM checkpoints"), "deleted", EVERY),
    "the newest two checkpoints deleted": (
        _sql("DELETE FROM checkpoints WHERE seq >= 30"),
        "deleted",
        30,
    ),
    "a trigger that deletes checkpoints as they are written": (
        _sql(
            "CREATE TRIGGER keep_unsealed AFTER INSERT ON checkpoints "
            "BEGIN DELETE FROM checkpoints WHERE seq = NEW.seq; END"
        ),
        "schema",
        0,
    ),
    "a view": (_sql("CREATE VIEW v AS SELECT * FROM records"), "schema", 0),
    # 4. column types a reader would choke on
    "checkpoint time_us as text": (
        _sql("UPDATE checkpoints SET time_us = 'abc' WHERE seq = 20"),
        "checkpoint",
        20,
    ),
    "checkpoint prev_seq overflowing": (
        _sql("UPDATE checkpoints SET prev_seq = '1e400' WHERE seq = 20"),
        "checkpoint",
        20,
    ),
    "checkpoint time_us as a fraction": (
        _sql("UPDATE checkpoints SET time_us = time_us + 0.5 WHERE seq = 20"),
        "checkpoint",
        20,
    ),
    "invalid UTF-8 in a hash": (
        _sql("UPDATE records SET hash = CAST(X'ff' AS TEXT) WHERE seq = 5"),
        "modified",
        5,
    ),
    "invalid UTF-8 in a body": (
        _sql("UPDATE records SET body = CAST(X'7b22ff223a317d' AS TEXT) WHERE seq = 5"),
        "modified",
        5,
    ),
    "invalid UTF-8 in a checkpoint hash": (
        _sql("UPDATE checkpoints SET hash = CAST(X'ff' AS TEXT) WHERE seq = 20"),
        "checkpoint",
        20,
    ),
    # 5. the right kind and seq, once
    "a junk row claiming seq 0": (
        _sql(
            "INSERT INTO records(seq, time_us, kind, body, hash) SELECT 100, time_us, kind, "
            "replace(body, '\"seq\":5,', '\"seq\":0,'), hash FROM records WHERE seq = 5"
        ),
        "inserted",
        100,
    ),
    "a junk row claiming seq -3, stored at the end": (
        _sql(
            "INSERT INTO records(seq, time_us, kind, body, hash) SELECT 33, time_us, kind, "
            "replace(body, '\"seq\":5,', '\"seq\":-3,'), hash FROM records WHERE seq = 5"
        ),
        "inserted",
        33,
    ),
    "a body that is not JSON": (
        _sql("UPDATE records SET body = '{not json' WHERE seq = 5"),
        "modified",
        5,
    ),
    "one row moved to the end": (
        _sql("UPDATE records SET seq = 33 WHERE seq = 12"),
        "reordered",
        12,
    ),
    "one row moved far away": (
        _sql("UPDATE records SET seq = 1012 WHERE seq = 12"),
        "reordered",
        12,
    ),
    "a sealed record edited and only it re-hashed": (
        _both(
            _sql("UPDATE records SET body = replace(body, 'demo-app', 'demo-apq') WHERE seq = 10"),
            _rehash(10, 10),
        ),
        "modified",
        10,
    ),
}


def test_the_untouched_trail_verifies_and_states_its_cadence(trail: Path, tmp_path: Path) -> None:
    report = check_trail(copy_trail(trail, tmp_path))
    assert report.ok, report.problems
    assert (report.records, report.sealed_seq, report.checkpoint_every) == (32, 32, EVERY)


@pytest.mark.parametrize("case", list(SINGLE))
def test_one_tampering_is_one_problem_with_its_kind_and_seq(
    trail: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    db = copy_trail(trail, tmp_path)
    tamper, kind, seq = SINGLE[case]
    tamper(db)
    report = check_trail(db)
    assert [(p.kind, p.seq) for p in report.problems] == [(kind, seq)], report.problems
    code, out, err = _verify_cli(capsys, db)
    assert code == 1 and "FAILED: " + kind in out and "Traceback" not in err


def test_verify_reports_prunes(
    trail: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = copy_trail(trail, tmp_path)
    _prune_all(db)
    code, out, _ = _verify_cli(capsys, db)
    assert code == 0 and "OK:" in out
    assert "pruned       at " in out and "32 records through seq 32, sealed before " in out


def test_a_short_unsealed_tail_is_said_plainly_and_passes(
    trail: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = copy_trail(trail, tmp_path)
    _sql("DELETE FROM checkpoints WHERE seq = 32")(db)  # what a running router shows
    code, out, _ = _verify_cli(capsys, db)
    assert code == 0 and "OK:" in out
    assert "2 records (seq 31..32) are not yet covered by a signature" in out


def test_a_checkpoint_whose_record_is_gone_is_named(trail: Path, tmp_path: Path) -> None:
    db = copy_trail(trail, tmp_path)
    _sql("DELETE FROM records WHERE seq = 20")(db)
    assert [(p.kind, p.seq) for p in check_trail(db).problems] == [("deleted", 20)]


def test_key_files_that_cannot_be_read_are_usage_errors(
    trail: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(copy_trail(trail, tmp_path))
    (tmp_path / "adir").mkdir()
    code, _, err = _cli(capsys, "audit", "verify", "--db", db, "--key", str(tmp_path / "adir"))
    assert code == 2 and "adir" in err and "Traceback" not in err
    code, _, err = _cli(
        capsys, "audit", "query", "--db", db, "--session", "s", "--hmac-key", str(tmp_path / "adir")
    )
    assert code == 2 and "adir" in err
    code, _, err = _cli(capsys, "audit", "hash", "x", "--key", str(tmp_path / "adir"))
    assert code == 2 and "adir" in err
    if os.geteuid() != 0:  # root reads a 000 file anyway
        unreadable = tmp_path / "noread.pub"
        shutil.copy(tmp_path / "audit-signing.pub", unreadable)
        unreadable.chmod(0)
        code, _, err = _cli(capsys, "audit", "verify", "--db", db, "--key", str(unreadable))
        assert code == 2 and "noread.pub" in err
