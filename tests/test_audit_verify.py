"""`audit verify` names each kind of tampering and the first seq it affects; `audit
prune` leaves a trail that still verifies; `audit query/stats/export/hash` and their
exit codes. Everything runs on real SQLite files written by the real store."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from support import LoopThread
from test_audit_store import config, event

from hybridroute.cli import main
from hybridroute.router.audit.codec import canonical, load_verify_key
from hybridroute.router.audit.db import connect_readonly
from hybridroute.router.audit.events import AuditNote
from hybridroute.router.audit.store import AuditStore
from hybridroute.router.audit.verify import Report, prune, verify

SESSION = "session-jane-0042"


@pytest.fixture(scope="module")
def trail(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """46 records (seq 1 is audit.created), checkpoints at 10, 20, 30, 40 and 46."""
    root = tmp_path_factory.mktemp("trail")
    cfg = config(root, checkpoint_every=10)

    async def run() -> None:
        store = AuditStore(cfg)
        await store.start()
        await store.note(AuditNote("router.start", {"version": "test"}))
        for i in range(44):  # one at a time: each its own transaction, order known
            varied = {
                0: dict(outcome="denied", rule_id="deny-unknown-callers", caller="other-app"),
                1: dict(sensitive=True, route="onprem", zone="onprem", session_id=SESSION),
                2: dict(code="UNAVAILABLE", route="onprem", zone="onprem"),
            }.get(i % 4, {})
            await store.record(event(i, latency_ms=float(i + 1), **varied))
        await store.close()

    asyncio.run(run())
    return root


def copy_trail(trail: Path, tmp_path: Path) -> Path:
    for name in ("audit.db", "audit-signing.key", "audit-signing.pub", "audit-hmac.key"):
        shutil.copy(trail / name, tmp_path / name)
    return tmp_path / "audit.db"


def check_trail(db: Path, key: Path | None = None) -> Report:
    key = key or db.with_name("audit-signing.pub")
    with contextlib.closing(connect_readonly(db)) as conn:
        return verify(conn, load_verify_key(key))


def _tamper(db: Path, *statements: str) -> None:
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        for statement in statements:
            conn.execute(statement)


def _rehash_from(db: Path, seq: int) -> None:
    """What a careful forger does: fix up every hash after an edit."""
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        (prev,) = conn.execute("SELECT hash FROM records WHERE seq = ?", (seq - 1,)).fetchone()
        for s, body in conn.execute(
            "SELECT seq, body FROM records WHERE seq >= ? ORDER BY seq", (seq,)
        ).fetchall():
            prev = hashlib.sha256(bytes.fromhex(prev) + body.encode()).hexdigest()
            conn.execute("UPDATE records SET hash = ? WHERE seq = ?", (prev, s))


def _insert_forged(db: Path, at: int) -> None:
    """Make room at `at` and insert a well-formed record chained from its predecessor."""
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        for (s,) in conn.execute(
            "SELECT seq FROM records WHERE seq >= ? ORDER BY seq DESC", (at,)
        ).fetchall():
            conn.execute("UPDATE records SET seq = seq + 1 WHERE seq = ?", (s,))
        (prev,) = conn.execute("SELECT hash FROM records WHERE seq = ?", (at - 1,)).fetchone()
        body = canonical(
            {"kind": "request", "seq": at, "time_us": 1, "outcome": "routed", "caller": "ghost"}
        )
        forged = hashlib.sha256(bytes.fromhex(prev) + body.encode()).hexdigest()
        conn.execute(
            "INSERT INTO records (seq, time_us, kind, body, hash) VALUES (?, 1, 'request', ?, ?)",
            (at, body, forged),
        )


SWAP = [
    "UPDATE records SET seq = -1 WHERE seq = 17",
    "UPDATE records SET seq = 17 WHERE seq = 18",
    "UPDATE records SET seq = 18 WHERE seq = -1",
]
CASES: dict[str, tuple[Callable[[Path], None], str, int]] = {
    "field changed": (
        lambda db: _tamper(
            db, "UPDATE records SET body = replace(body, 'ticket-triage', 'iris') WHERE seq = 17"
        ),
        "modified",
        17,
    ),
    "column changed": (
        lambda db: _tamper(db, "UPDATE records SET time_us = 0 WHERE seq = 17"),
        "modified",
        17,
    ),
    "changed and re-hashed": (
        lambda db: (
            _tamper(
                db, "UPDATE records SET body = replace(body, 'demo-app', 'demo-apq') WHERE seq = 17"
            ),
            _rehash_from(db, 17),
        ),
        "modified",
        11,  # somewhere after the last checkpoint that still matches (10)
    ),
    "deleted in the middle": (
        lambda db: _tamper(db, "DELETE FROM records WHERE seq = 17"),
        "deleted",
        17,
    ),
    "two swapped": (lambda db: _tamper(db, *SWAP), "reordered", 17),
    "one inserted": (lambda db: _insert_forged(db, 17), "inserted", 17),
    "tail cut past a checkpoint": (
        lambda db: _tamper(db, "DELETE FROM records WHERE seq >= 38"),
        "truncated",
        38,
    ),
    "head cut": (lambda db: _tamper(db, "DELETE FROM records WHERE seq <= 5"), "deleted", 1),
    "head cut to a checkpoint, posing as a prune without its row": (
        lambda db: _tamper(
            db, "DELETE FROM records WHERE seq <= 20", "DELETE FROM checkpoints WHERE seq < 20"
        ),
        "deleted",
        1,
    ),
    "everything deleted": (
        lambda db: _tamper(db, "DELETE FROM records", "DELETE FROM checkpoints"),
        "deleted",
        1,
    ),
    "checkpoint forged": (
        lambda db: _tamper(
            db,
            # flip the first hex digit: a real change whatever the hash was
            "UPDATE checkpoints SET hash = (CASE WHEN substr(hash, 1, 1) = '0' THEN '1' "
            "ELSE '0' END) || substr(hash, 2) WHERE seq = 20",
        ),
        "checkpoint",
        20,
    ),
    "checkpoint deleted": (
        lambda db: _tamper(db, "DELETE FROM checkpoints WHERE seq = 20"),
        "deleted",
        20,
    ),
}


def test_an_untouched_trail_verifies(trail: Path, tmp_path: Path) -> None:
    report = check_trail(copy_trail(trail, tmp_path))
    assert report.ok, report.problems
    assert (report.first_seq, report.last_seq, report.records) == (1, 46, 46)
    assert report.checkpoints == 5 and report.sealed_seq == 46 and report.unsealed == 0


@pytest.mark.parametrize("case", list(CASES))
def test_tampering_is_named_with_its_first_affected_seq(
    trail: Path, tmp_path: Path, case: str
) -> None:
    db = copy_trail(trail, tmp_path)
    tamper, kind, seq = CASES[case]
    tamper(db)
    report = check_trail(db)
    first = report.first()
    assert first is not None, f"{case}: not detected"
    assert (first.kind, first.seq) == (kind, seq), report.problems


def test_the_wrong_key_is_named(trail: Path, tmp_path: Path, pki: Path) -> None:
    report = check_trail(copy_trail(trail, tmp_path), pki / "audit-signing.pub")
    assert {p.kind for p in report.problems} == {"checkpoint"}
    message = report.problems[0].message
    assert "signed by key" in message and "not by a key given" in message
    assert "invalid signature" not in message  # a missing key is not tampering
    assert "--key OLD --key NEW" in message


# ------------------------------------------------------------------ the CLI


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_verify_exit_codes_and_output(
    trail: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = copy_trail(trail, tmp_path)
    key = str(tmp_path / "audit-signing.pub")
    code, out, _ = _cli(capsys, "audit", "verify", "--db", str(db), "--key", key)
    assert code == 0 and "OK: every record links" in out and "seq 1..46 (46 records)" in out
    CASES["deleted in the middle"][0](db)
    code, out, _ = _cli(capsys, "audit", "verify", "--db", str(db), "--key", key)
    assert code == 1 and "FAILED: deleted at seq 17" in out
    code, out, _ = _cli(capsys, "audit", "verify", "--db", str(db), "--key", key, "--json")
    assert code == 1 and json.loads(out)["problems"][0]["kind"] == "deleted"
    code, _, err = _cli(capsys, "audit", "verify", "--db", str(tmp_path / "nope.db"), "--key", key)
    assert code == 2 and "no such audit database" in err


def test_prune_keeps_what_remains_verifiable_and_refuses_a_damaged_trail(
    trail: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = copy_trail(trail, tmp_path)
    key = str(tmp_path / "audit-signing.pub")
    with contextlib.closing(connect_readonly(db)) as conn:
        (cut,) = conn.execute("SELECT time_us FROM checkpoints WHERE seq = 20").fetchone()
    code, out, _ = _cli(
        capsys, "audit", "prune", "--db", str(db), "--key", key, "--before", str(cut / 1e6)
    )
    assert code == 0 and "pruned 20 records (through seq 20" in out
    report = check_trail(db)
    assert report.ok and report.first_seq == 21 and "pruned through seq 20" in report.starts_after

    async def extend() -> None:  # the router keeps writing after a prune
        store = AuditStore(config(tmp_path))
        await store.start()
        await store.record(event(99))
        await store.close()

    asyncio.run(extend())
    assert check_trail(db).ok and check_trail(db).last_seq == 47
    code, out, _ = _cli(
        capsys, "audit", "prune", "--db", str(db), "--key", key, "--before", "now", "--yes"
    )
    assert code == 0 and check_trail(db).ok and check_trail(db).records == 0
    damaged = copy_trail(trail, tmp_path / "x" if (tmp_path / "x").mkdir() is None else tmp_path)
    CASES["field changed"][0](damaged)
    code, _, err = _cli(
        capsys, "audit", "prune", "--db", str(damaged), "--key", key, "--before", "now"
    )
    assert code == 1 and "modified" in err


def test_a_large_prune_goes_in_short_transactions_each_leaving_a_verifiable_trail(
    trail: Path, tmp_path: Path
) -> None:
    """A live router's commits wait for a prune's write lock (and refuse requests past
    the commit timeout): a prune deletes a batch per transaction, each a whole prune
    to a checkpoint, so the trail verifies between any two and one prune row says it all."""
    db = copy_trail(trail, tmp_path)
    key = load_verify_key(tmp_path / "audit-signing.pub")
    states: list[Report] = []
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:

        def before_each_commit(statement: str) -> None:
            if statement == "COMMIT":  # what a reader sees meanwhile: the last batch done
                states.append(check_trail(db))

        conn.set_trace_callback(before_each_commit)
        result = prune(conn, key, 1 << 62, batch=15)
        conn.set_trace_callback(None)
        rows = conn.execute("SELECT through_seq, records FROM prunes").fetchall()
    assert (result.through_seq, result.removed) == (46, 46)
    # checkpoints at 10, 20, 30, 40, 46: no batch over 15 records, so a cut at each
    assert [r.first_seq for r in states] == [1, 11, 21, 31, 41]
    assert all(r.ok for r in states), [r.problems for r in states]
    assert rows == [(46, 46)] and check_trail(db).ok and check_trail(db).records == 0


def test_verify_and_prune_work_on_a_trail_the_router_is_writing(tmp_path: Path) -> None:
    """A router commits records and their checkpoints while verify reads: verify must
    see one moment of the trail, not checkpoints from one and records from a later
    one (which looked like deleted checkpoints). The router's writes are made to land
    exactly between verify's first statements, every time."""
    cfg = config(tmp_path, checkpoint_every=10)
    loop = LoopThread()
    store = AuditStore(cfg)
    written = 0

    async def start() -> None:  # as a router does: its start record states the cadence
        await store.start()
        await store.note(AuditNote("router.start", {"audit": store.describe()}))

    loop.run(start())

    async def burst() -> None:
        nonlocal written
        for _ in range(25):  # two checkpoints' worth, one at a time
            await store.record(event(written))
            written += 1

    def router_writes_meanwhile(statement: str) -> None:
        if "AS bseq" in statement:  # verify's read of the records, after the checkpoints
            loop.run(burst())

    try:
        loop.run(burst())
        assert cfg.signing_key is not None
        key = load_verify_key(cfg.signing_key.with_suffix(".pub"))
        with contextlib.closing(connect_readonly(cfg.db)) as conn:
            conn.set_trace_callback(router_writes_meanwhile)
            report = verify(conn, key)
        assert report.ok, report.problems
        assert written > report.records  # the router did write while verify read
        with contextlib.closing(sqlite3.connect(cfg.db, isolation_level=None)) as conn:
            conn.set_trace_callback(router_writes_meanwhile)
            assert prune(conn, key, 1 << 62, remove_all=False).removed > 0
    finally:
        loop.run(store.close())
        loop.close()
    assert check_trail(cfg.db).ok


def test_query_filters_and_formats(trail: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(trail / "audit.db")
    code, out, _ = _cli(
        capsys, "audit", "query", "--db", db, "--route", "onprem", "--format", "json"
    )
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(lines) == 22 and {r["route"] for r in lines} == {"onprem"}
    code, out, _ = _cli(
        capsys, "audit", "query", "--db", db, "--session", SESSION, "--format", "json"
    )
    found = [json.loads(line) for line in out.splitlines()]
    assert len(found) == 11 and all(r["sensitive"] for r in found)
    assert SESSION not in (trail / "audit.db").read_bytes().decode("latin-1")
    code, out, _ = _cli(capsys, "audit", "hash", SESSION, "--db", db)
    assert out.strip() == found[0]["session"]
    code, out, _ = _cli(
        capsys, "audit", "query", "--db", db, "--decision", "denied", "--format", "csv"
    )
    header, *rows = out.splitlines()
    assert header.startswith("seq,time,kind,request_id,caller") and len(rows) == 11
    code, out, _ = _cli(capsys, "audit", "query", "--db", db, "--limit", "3")
    assert "time (UTC)" in out and "(the last 3 of 46 matching records" in out
    code, out, _ = _cli(capsys, "audit", "query", "--db", db, "--kind", "router.start")
    assert "router.start:" in out
    code, _, err = _cli(capsys, "audit", "query", "--db", db, "--since", "yesterday-ish")
    assert code == 2 and "cannot read time" in err


def test_stats_and_export(trail: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(trail / "audit.db")
    code, out, _ = _cli(capsys, "audit", "stats", "--db", db, "--format", "json")
    stats = json.loads(out)
    assert stats["requests"] == 44 and stats["sensitive"] == 11
    assert stats["by_decision"] == {"routed": 33, "denied": 11}
    assert stats["denials_by_rule"] == {"deny-unknown-callers": 11}
    assert set(stats["latency_ms"]) == {"cloud", "onprem"}
    assert stats["latency_ms"]["onprem"]["count"] == 11  # UNAVAILABLE ones are left out
    code, out, _ = _cli(capsys, "audit", "stats", "--db", db)
    assert "sensitive  11 (25.0%)" in out and "p99" in out
    target = tmp_path / "export.jsonl"
    code, _, _ = _cli(
        capsys, "audit", "export", "--db", db, "--format", "jsonl", "--output", str(target)
    )
    exported = [json.loads(line) for line in target.read_text().splitlines()]
    assert code == 0 and [r["seq"] for r in exported] == list(range(1, 47))
    prev = "0" * 64  # a SIEM can re-check the chain from the export alone
    for record in exported:
        claimed = record.pop("record_hash")
        prev = hashlib.sha256(bytes.fromhex(prev) + canonical(record).encode()).hexdigest()
        assert prev == claimed
