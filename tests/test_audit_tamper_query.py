"""`audit query` with an HMAC key that is not the trail's, model names stored as keyed
hashes, and the time arguments of query and prune. Real SQLite files written by the
router's own store, as in test_audit_verify."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from pathlib import Path

import pytest
from test_audit_store import config, event

from hybridroute.cli import main
from hybridroute.router.audit.codec import KeyedHasher
from hybridroute.router.audit.db import connect_readonly
from hybridroute.router.audit.query import parse_time
from hybridroute.router.audit.store import AuditStore

MODEL, VERSION = "fraud model v2", "2024 Q1"  # not plainly names: stored hashed


@pytest.fixture(scope="module")
def trail(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trail")

    async def run() -> None:
        store = AuditStore(config(root, checkpoint_every=10))
        await store.start()
        await store.record(event(0, session_id="sess-1"))
        await store.record(event(1, model=MODEL, model_version=VERSION))
        await store.record(event(2, model="ticket-triage", model_version="3"))
        await store.close()

    asyncio.run(run())
    return root


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _other_key(tmp_path: Path) -> Path:
    path = tmp_path / "other-hmac.key"
    path.write_text("11" * 32 + "\n")
    return path


def test_a_session_searched_with_another_trails_key_is_refused(
    trail: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db, other = str(trail / "audit.db"), _other_key(tmp_path)
    code, out, _ = _cli(
        capsys, "audit", "query", "--db", db, "--session", "sess-1", "--format", "json"
    )
    assert code == 0 and len(out.splitlines()) == 1  # the trail's own key finds it
    for option in ("--session", "--client-request-id"):
        code, out, err = _cli(
            capsys, "audit", "query", "--db", db, option, "x", "--hmac-key", str(other)
        )
        theirs = KeyedHasher.from_file(trail / "audit-hmac.key").key_id
        ours = KeyedHasher.from_file(other).key_id
        assert code == 2 and out == "" and ours in err and theirs in err


def test_a_hashed_model_name_is_found_by_its_name(
    trail: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(trail / "audit.db")
    with contextlib.closing(connect_readonly(trail / "audit.db")) as conn:
        stored = [json.loads(b) for (b,) in conn.execute("SELECT body FROM records")]
    assert MODEL not in {r.get("model") for r in stored}  # the premise: kept as a hash
    code, out, _ = _cli(capsys, "audit", "query", "--db", db, "--model", MODEL, "--format", "json")
    found = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["request_id"] for r in found] == ["req-00001"]
    code, out, _ = _cli(
        capsys, "audit", "query", "--db", db, "--model-version", VERSION, "--format", "json"
    )
    assert [json.loads(line)["request_id"] for line in out.splitlines()] == ["req-00001"]
    code, out, _ = _cli(  # a plain name still matches as written
        capsys, "audit", "query", "--db", db, "--model", "ticket-triage", "--format", "json"
    )
    assert len(out.splitlines()) == 2


def test_a_model_name_is_matched_as_written_when_no_key_is_at_hand(
    trail: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(trail / "audit.db", tmp_path / "audit.db")  # no key beside it
    db = str(tmp_path / "audit.db")
    code, out, _ = _cli(
        capsys, "audit", "query", "--db", db, "--model", "ticket-triage", "--format", "json"
    )
    assert code == 0 and len(out.splitlines()) == 2


@pytest.mark.parametrize(
    ("text", "seconds"), [("0", 0), ("86400", 86400), ("86400.5", 86400.5), ("1700000000", 1.7e9)]
)
def test_unix_seconds_of_any_length_are_seconds(text: str, seconds: float) -> None:
    assert parse_time(text) == round(seconds * 1e6)


def test_an_age_older_than_1970_is_the_epoch_and_a_bare_date_is_ambiguous() -> None:
    assert parse_time("100000000d", now=1.7e9) == 0
    assert parse_time("9" * 400 + "d", now=1.7e9) == 0
    with pytest.raises(ValueError, match="ambiguous"):
        parse_time("20260510")


def test_prune_of_every_record_needs_yes(
    trail: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("audit.db", "audit-signing.pub"):
        shutil.copy(trail / name, tmp_path / name)
    db, key = str(tmp_path / "audit.db"), str(tmp_path / "audit-signing.pub")
    code, out, err = _cli(capsys, "audit", "prune", "--db", db, "--key", key, "--before", "now")
    assert code == 2 and "every record (4, through seq 4)" in err and "--yes" in err
    with contextlib.closing(connect_readonly(tmp_path / "audit.db")) as conn:
        assert conn.execute("SELECT COUNT(*) FROM records").fetchone()[0] == 4
    code, out, _ = _cli(
        capsys, "audit", "prune", "--db", db, "--key", key, "--before", "now", "--yes"
    )
    assert code == 0 and "pruned 4 records" in out
