"""The audit store on real SQLite files: what a record holds (and never holds), group
commit, detail levels, and failing closed on real faults, then recovering by itself
with no record lost: a lock held past the timeout, an immutable WAL (chattr +i), a
full disk (a small tmpfs), the database file removed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from hybridroute.router.audit.codec import (
    KeyedHasher,
    canonical,
    chain_hash,
    key_id,
    load_verify_key,
)
from hybridroute.router.audit.db import connect_readonly
from hybridroute.router.audit.events import AuditEvent, AuditNote, AuditUnavailable
from hybridroute.router.audit.notes import CertWatch
from hybridroute.router.audit.store import AuditStore
from hybridroute.router.audit.verify import verify
from hybridroute.router.config import AuditConfig
from hybridroute.router.policy.engine import DetectorHit, RuleTrace

SSN, CARD, EMAIL = "321-54-9876", "4111 1111 1111 1111", "jane.doe@example.com"


def config(root: Path, **overrides: object) -> AuditConfig:
    values: dict[str, object] = {"db": root / "audit.db", "commit_timeout": "300ms"}
    return AuditConfig.model_validate({**values, **overrides}).resolved(root)


def event(i: int = 0, **fields: object) -> AuditEvent:
    values: dict[str, object] = {
        "request_id": f"req-{i:05d}",
        "outcome": "routed",
        "caller": "demo-app",
        "auth": "cert",
        "method": "ModelInfer",
        "model": "ticket-triage",
        "sensitive": False,
        "route": "cloud",
        "zone": "cloud",
        "latency_ms": 1.25,
    }
    return AuditEvent(**{**values, **fields})  # type: ignore[arg-type]


def records(db: Path, kind: str = "request") -> list[dict[str, object]]:
    with contextlib.closing(connect_readonly(db)) as conn:
        rows = conn.execute("SELECT body FROM records WHERE kind = ? ORDER BY seq", (kind,))
        return [json.loads(body) for (body,) in rows]


def verified(cfg: AuditConfig) -> None:
    assert cfg.signing_key is not None
    with contextlib.closing(connect_readonly(cfg.db)) as conn:
        report = verify(conn, load_verify_key(cfg.signing_key.with_suffix(".pub")))
    assert report.ok, report.problems


async def record_all(store: AuditStore, events: list[AuditEvent]) -> list[str]:
    """Record concurrently; return 'ok' or 'refused' per event."""

    async def one(e: AuditEvent) -> str:
        try:
            await store.record(e)
        except AuditUnavailable:
            return "refused"
        return "ok"

    return list(await asyncio.gather(*(one(e) for e in events)))


async def wait_for(predicate: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


# ------------------------------------------------------------------ what is recorded


def test_records_hold_facts_and_keyed_hashes_never_values(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    sensitive = event(
        1,
        sensitive=True,
        reasons=("detector:us_ssn", "detector:email"),
        findings={"us_ssn": 1, "email": 1},
        route="onprem",
        zone="onprem",
        session_id=f"session-of-{EMAIL}",
        client_request_id=f"order {CARD}",
        model=f"hr-{SSN}",  # a caller can put anything in a model name
        hits=(DetectorHit("us_ssn", "input:text[0]", 10, 21),),
        trace=(RuleTrace("classified-on-prem", True, None),),
    )

    async def run() -> None:
        store = AuditStore(cfg)
        await store.start()
        await store.record(sensitive)
        await store.close()

    asyncio.run(run())
    (body,) = records(cfg.db)
    hasher = KeyedHasher.from_file(cfg.hmac_key)  # type: ignore[arg-type]
    assert body["session"] == hasher.digest(f"session-of-{EMAIL}")
    assert body["client_request_id"] == hasher.digest(f"order {CARD}")
    assert body["model"] == hasher.digest(f"hr-{SSN}")
    assert body["findings"] == {"us_ssn": 1, "email": 1}
    assert body["hits"] == [["us_ssn", "input:text[0]", 10, 21]]
    assert body["latency_us"] == 1250 and isinstance(body["time_us"], int)
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("audit.db"))
    for value in (SSN, CARD, EMAIL, SSN.replace("-", "")):
        assert value.encode() not in raw
    assert oct(cfg.hmac_key.stat().st_mode & 0o777) == "0o600"  # type: ignore[union-attr]
    verified(cfg)


def test_a_shadow_copy_is_an_optional_key_that_verifies_beside_older_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mirrored request's record names the copy's pool, zone and version under
    `shadow`; any other record has no such key (so records written before it existed
    keep their encoding), and a trail holding both verifies, by API and by CLI."""
    from hybridroute.cli import main

    cfg = config(tmp_path)
    plain = event(1, route="onprem", zone="onprem", pool="onprem")
    mirrored = event(
        2,
        route="onprem",
        zone="onprem",
        pool="onprem",
        shadow_pool="onprem-gpu",
        shadow_zone="onprem",
        shadow_version="2",
    )

    async def run() -> None:
        store = AuditStore(cfg)
        await store.start()
        await store.record(plain)
        await store.record(mirrored)
        await store.close()

    asyncio.run(run())
    first, second = records(cfg.db)
    assert not any(k.startswith("shadow") for k in first)
    assert second["shadow"] == {"pool": "onprem-gpu", "zone": "onprem", "version": "2"}
    verified(cfg)
    assert cfg.signing_key is not None
    key = str(cfg.signing_key.with_suffix(".pub"))
    assert main(["audit", "verify", "--db", str(cfg.db), "--key", key]) == 0
    capsys.readouterr()
    assert main(["audit", "query", "--db", str(cfg.db), "--format", "json"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    shadows = {r.get("request_id"): r.get("shadow") for r in out if r["kind"] == "request"}
    assert shadows == {"req-00001": None, "req-00002": second["shadow"]}
    assert main(["audit", "query", "--db", str(cfg.db)]) == 0
    table = capsys.readouterr().out
    assert "shadow" in table.splitlines()[0] and "onprem-gpu/onprem v2" in table
    assert main(["audit", "query", "--db", str(cfg.db), "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith(",shadow_pool,shadow_zone,shadow_version")
    assert lines[-1].endswith(",onprem-gpu,onprem,2") and lines[-2].endswith(",,,")


def test_detail_follows_the_route_level_but_sensitive_denied_failed_are_always_full(
    tmp_path: Path,
) -> None:
    cfg = config(tmp_path)
    trace = (RuleTrace("public-clean-to-cloud", True, None),)
    quiet = dict(route_detail="decisions", trace=trace)
    events = [
        event(0, **quiet),  # clean, OK, decisions level: no trace
        event(1, route_detail="full", route_sample=0.0, trace=trace),  # sampled out
        event(2, route_detail="full", route_sample=1.0, trace=trace),
        event(3, sensitive=True, **quiet),
        event(4, outcome="denied", **quiet),
        event(5, code="UNAVAILABLE", **quiet),
    ]

    async def run() -> None:
        store = AuditStore(cfg)
        await store.start()
        assert await record_all(store, events) == ["ok"] * 6
        await store.close()

    asyncio.run(run())
    detail = [(r["request_id"], r["detail"], "trace" in r) for r in records(cfg.db)]
    assert sorted(detail) == [
        ("req-00000", "decisions", False),
        ("req-00001", "decisions", False),
        ("req-00002", "full", True),
        ("req-00003", "full", True),
        ("req-00004", "full", True),
        ("req-00005", "full", True),
    ]


def test_concurrent_records_share_transactions_and_checkpoints_seal_them(tmp_path: Path) -> None:
    cfg = config(tmp_path, checkpoint_every=100)
    registry = CollectorRegistry()

    async def run() -> None:
        store = AuditStore(cfg, registry=registry)
        await store.start()
        assert await record_all(store, [event(i) for i in range(500)]) == ["ok"] * 500
        await store.close()

    asyncio.run(run())
    commits = registry.get_sample_value("hybridroute_audit_commit_seconds_count")
    assert registry.get_sample_value("hybridroute_audit_records_total") == 500
    assert commits is not None and commits < 100  # group commit, not one fsync each
    with contextlib.closing(connect_readonly(cfg.db)) as conn:
        seals = conn.execute("SELECT seq, reason FROM checkpoints ORDER BY seq").fetchall()
        last = conn.execute("SELECT MAX(seq) FROM records").fetchone()[0]
    assert len(seals) >= 4 and seals[-1][0] == last  # every 100 or so, and at shutdown
    verified(cfg)


def test_a_restart_continues_the_chain_and_a_quiet_store_seals_on_time(tmp_path: Path) -> None:
    cfg = config(tmp_path, checkpoint_seconds="200ms")

    async def run() -> None:
        for i in range(2):
            store = AuditStore(cfg)
            await store.start()
            await store.note(AuditNote("router.start", {"run": i}))
            await store.record(event(i))
            if i == 1:
                with contextlib.closing(connect_readonly(cfg.db)) as conn:

                    def sealed(conn: sqlite3.Connection = conn) -> bool:
                        return conn.execute("SELECT MAX(seq) FROM checkpoints").fetchone()[0] == 5

                    await wait_for(sealed)  # sealed within 200 ms, not at stop
            await store.close()

    asyncio.run(run())
    kinds = [r["kind"] for r in records(cfg.db, "router.start")]
    assert len(kinds) == 2
    with contextlib.closing(connect_readonly(cfg.db)) as conn:
        seqs = [s for (s,) in conn.execute("SELECT seq FROM records ORDER BY seq")]
    assert seqs == [1, 2, 3, 4, 5]  # audit.created once, then both runs
    verified(cfg)


def _wal_restarts(db: Path) -> int:
    """The WAL header's checkpoint sequence number: SQLite adds one each time the WAL
    starts again from its beginning (https://sqlite.org/fileformat.html#wal_file_format)."""
    with open(f"{db}-wal", "rb") as wal:
        return int.from_bytes(wal.read(16)[12:16], "big")


def test_steady_traffic_restarts_the_wal_instead_of_growing_it(tmp_path: Path) -> None:
    """Under traffic that never pauses the WAL must still start over after each
    background checkpoint (about every second); otherwise it grows for as long as the
    router runs, and every commit appends to it instead of rewriting it in place."""
    cfg = config(tmp_path)

    async def run() -> int:
        store = AuditStore(cfg)
        await store.start()
        first = _wal_restarts(cfg.db)
        started, i = time.monotonic(), 0
        while time.monotonic() - started < 3.5:
            await record_all(store, [event(i + j) for j in range(4)])
            i += 4
        restarts = _wal_restarts(cfg.db) - first
        await store.close()
        return restarts

    assert asyncio.run(run()) >= 2
    verified(cfg)


def test_cert_watch_names_the_file_and_both_fingerprints(tmp_path: Path, pki: Path) -> None:
    from hybridroute.router.config import RouterConfig

    for name in ("router.pem", "router.key", "ca.pem"):
        shutil.copy(pki / name, tmp_path / name)
    router_config = RouterConfig(
        tls={"cert": tmp_path / "router.pem", "key": tmp_path / "router.key"},
        policy=tmp_path / "policy.yaml",
        upstream={"ca": tmp_path / "ca.pem", "cert": pki / "router.pem", "key": pki / "router.key"},
    )
    watch = CertWatch(router_config)
    assert watch.changes() == []
    shutil.copy(pki / "node.pem", tmp_path / "router.pem")
    (note,) = watch.changes()
    assert note.kind == "cert.change" and note.fields["role"] == "tls.cert"
    before, after = note.fields["before"], note.fields["after"]
    assert before["subject_cn"] == "router" and after["subject_cn"] == "node"  # type: ignore[index]
    assert before["sha256"] != after["sha256"]  # type: ignore[index]


# ------------------------------------------------------------------ failing closed


async def _fault_then_recover(
    cfg: AuditConfig, break_it: object, repair: object, expect: str
) -> None:
    """Records before, during and after a fault: the ones during are refused fast, kept,
    and written on recovery; the failure clears by itself."""
    store = AuditStore(cfg)
    await store.start()
    assert await record_all(store, [event(i) for i in range(5)]) == ["ok"] * 5
    break_it()  # type: ignore[operator]
    started = time.monotonic()
    during = await record_all(store, [event(i) for i in range(5, 10)])
    assert during == ["refused"] * 5
    assert store.failure is not None and expect in store.failure, store.failure
    late = await record_all(store, [event(10)])  # refused at once while failing
    assert late == ["refused"] and time.monotonic() - started < 3
    repair()  # type: ignore[operator]
    await wait_for(lambda: store.failure is None)
    assert await record_all(store, [event(i) for i in range(11, 13)]) == ["ok"] * 2
    await store.close()
    found = {str(r["request_id"]): r for r in records(cfg.db)}
    assert sorted(found) == [f"req-{i:05d}" for i in range(13)]  # nothing lost
    for i in range(5, 11):
        assert found[f"req-{i:05d}"]["code"] == "UNAVAILABLE"
        assert found[f"req-{i:05d}"]["withheld"] == "OK"  # the answer it would have had
    (recovered,) = records(cfg.db, "audit.recovered")
    assert recovered["refused"] == 6 and expect in str(recovered["reason"])
    verified(cfg)


def test_a_lock_held_past_the_timeout_refuses_then_recovers(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    blocker: list[sqlite3.Connection] = []

    def lock() -> None:
        conn = sqlite3.connect(cfg.db, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        blocker.append(conn)

    asyncio.run(_fault_then_recover(cfg, lock, lambda: blocker[0].close(), "locked"))


def test_a_long_outage_backlog_is_written_whole(tmp_path: Path) -> None:
    """Thousands of refused requests: all written on recovery (more rows than one SQL
    statement may bind), and those past the backlog bound are counted, not forgotten."""
    cfg = config(tmp_path, backlog=3000)
    blocker = sqlite3.connect(cfg.db, isolation_level=None)

    async def run() -> None:
        store = AuditStore(cfg)
        await store.start()
        blocker.execute("BEGIN IMMEDIATE")
        refused = await record_all(store, [event(i) for i in range(3500)])
        assert set(refused) == {"refused"}
        blocker.close()
        await wait_for(lambda: store.failure is None)
        await store.close()

    asyncio.run(run())
    assert len(records(cfg.db)) == 3000
    (recovered,) = records(cfg.db, "audit.recovered")
    assert (recovered["refused"], recovered["dropped"]) == (3500, 500)
    verified(cfg)


def _chattr(flag: str, path: Path) -> None:
    subprocess.run(["chattr", flag, str(path)], check=True, capture_output=True)


def test_an_unwritable_wal_refuses_then_recovers(tmp_path: Path) -> None:
    """chattr +i: even root cannot write an immutable file, open or not."""
    probe = tmp_path / "probe"
    probe.write_text("x")
    try:
        _chattr("+i", probe)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("chattr +i is not available here (needs root on ext4/xfs/btrfs)")
    _chattr("-i", probe)
    cfg = config(tmp_path)
    wal = Path(f"{cfg.db}-wal")
    try:
        asyncio.run(
            _fault_then_recover(
                cfg, lambda: _chattr("+i", wal), lambda: _chattr("-i", wal), "cannot write"
            )
        )
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            _chattr("-i", wal)


def _stopped_trail(cfg: AuditConfig, n: int) -> None:
    async def run() -> None:
        store = AuditStore(cfg)
        await store.start()
        for i in range(n):
            await store.record(event(i))
        await store.close()

    asyncio.run(run())


def test_readers_open_the_file_named_even_with_uri_characters_in_its_path(
    tmp_path: Path,
) -> None:
    """`%41` is not `A`, and `#` or `?` do not end the path (SQLite opens URIs)."""
    named = config(tmp_path / "trail %41 #1 ?x", db=tmp_path / "trail %41 #1 ?x" / "audit.db")
    other = config(tmp_path / "trail A #1 ", db=tmp_path / "trail A #1 " / "audit.db")
    _stopped_trail(named, 3)
    _stopped_trail(other, 1)
    assert len(records(named.db)) == 3 and len(records(other.db)) == 1
    verified(named)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trail %41 #1 ?x", "trail A #1 "]


def test_a_stopped_trail_in_a_read_only_folder_can_still_be_read(tmp_path: Path) -> None:
    """An auditor's copy on read-only media: no -shm can be made there. With no WAL to
    read it opens as immutable; with one, the error says to copy both files."""
    folder = tmp_path / "copy"
    cfg = config(folder)
    _stopped_trail(cfg, 2)
    try:
        _chattr("+i", folder)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("chattr +i is not available here (needs root on ext4/xfs/btrfs)")
    try:
        assert len(records(cfg.db)) == 2
        verified(cfg)
        _chattr("-i", folder)
        Path(f"{cfg.db}-wal").write_bytes(b"\x37\x7f\x06\x82" + bytes(28))
        _chattr("+i", folder)
        with pytest.raises(sqlite3.OperationalError, match="copy both files"):
            connect_readonly(cfg.db)
    finally:
        _chattr("-i", folder)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs CAP_SYS_ADMIN)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_refuses_then_recovers_when_space_is_freed(small_disk: Path) -> None:
    cfg = config(small_disk)
    filler = small_disk / "filler"

    def fill() -> None:
        with open(filler, "wb") as out, contextlib.suppress(OSError):
            while True:
                out.write(b"\0" * 65536)
                out.flush()
                os.fsync(out.fileno())

    asyncio.run(_fault_then_recover(cfg, fill, filler.unlink, "disk full"))


def test_a_removed_database_is_continued_in_a_new_file_from_a_signed_anchor(
    tmp_path: Path,
) -> None:
    cfg = config(tmp_path)

    async def run() -> None:
        store = AuditStore(cfg)
        await store.start()
        await record_all(store, [event(i) for i in range(3)])
        for suffix in ("", "-wal", "-shm"):
            Path(f"{cfg.db}{suffix}").unlink(missing_ok=True)  # noqa: ASYNC240
        await asyncio.sleep(0.1)  # the writer looks at the file at most every 50 ms
        assert await record_all(store, [event(3)]) == ["refused"]
        assert "removed" in (store.failure or "")
        await wait_for(lambda: store.failure is None)
        assert await record_all(store, [event(4)]) == ["ok"]
        await store.close()

    asyncio.run(run())
    continued = records(cfg.db, "audit.continued")
    assert continued and continued[0]["continues_after"]["seq"] == 4  # type: ignore[index]
    assert [r["request_id"] for r in records(cfg.db)] == ["req-00003", "req-00004"]
    assert cfg.signing_key is not None
    with contextlib.closing(connect_readonly(cfg.db)) as conn:
        report = verify(conn, load_verify_key(cfg.signing_key.with_suffix(".pub")))
    assert report.ok and report.first_seq == 5 and "elsewhere" in report.starts_after


@pytest.mark.parametrize("how", ["removed", "moved away"])
def test_a_database_file_taken_away_alone_leaves_both_files_whole(tmp_path: Path, how: str) -> None:
    """`rm audit.db` or `mv audit.db elsewhere` while the router writes, leaving its
    -wal and -shm behind: the new file must not adopt the old file's WAL (that made it
    'malformed'), and a moved file must keep every record it had."""
    cfg = config(tmp_path, checkpoint_every=5)
    moved = tmp_path / "kept" / "audit.db"
    moved.parent.mkdir()

    async def run() -> None:
        store = AuditStore(cfg)
        await store.start()
        await record_all(store, [event(i) for i in range(12)])
        await asyncio.sleep(1.2)  # the background WAL checkpointer has a connection open
        await record_all(store, [event(i) for i in range(12, 20)])
        if how == "removed":
            cfg.db.unlink()
        else:
            cfg.db.rename(moved)
        await asyncio.sleep(0.1)
        await record_all(store, [event(20)])  # refused or written: either way recorded
        await wait_for(lambda: store.failure is None)
        for i in range(21, 60):  # long enough for background checkpoints of the new file
            assert await record_all(store, [event(i)]) == ["ok"]
            await asyncio.sleep(0.05)
        await store.close()

    asyncio.run(run())
    assert records(cfg.db, "audit.continued")
    ids = {r["request_id"] for r in records(cfg.db)}
    assert {f"req-{i:05d}" for i in range(21, 60)} <= ids
    assert cfg.signing_key is not None
    key = load_verify_key(cfg.signing_key.with_suffix(".pub"))
    with contextlib.closing(connect_readonly(cfg.db)) as conn:
        report = verify(conn, key)
    assert report.ok, report.problems
    if how == "moved away":  # the old file holds the first 20 records, intact
        with contextlib.closing(connect_readonly(moved)) as conn:
            assert verify(conn, key).ok
        kept = {r["request_id"] for r in records(moved)}
        assert {f"req-{i:05d}" for i in range(20)} <= kept


def test_a_second_writer_of_the_same_trail_does_not_start(tmp_path: Path) -> None:
    """Two routers on one audit db would fork its chain: the second is refused at start,
    told who holds it; once the first has closed, it starts."""
    cfg = config(tmp_path)

    async def run() -> None:
        first, second = AuditStore(cfg), AuditStore(cfg)
        await first.start()
        with pytest.raises(
            OSError, match=rf"another router is writing this trail \(pid {os.getpid()} on "
        ):
            await second.start()
        assert await record_all(first, [event(1)]) == ["ok"]  # the first is unaffected
        await first.close()
        await second.start()
        assert await record_all(second, [event(2)]) == ["ok"]
        await second.close()

    asyncio.run(run())
    assert [r["request_id"] for r in records(cfg.db)] == ["req-00001", "req-00002"]
    verified(cfg)


def test_a_store_that_cannot_open_stops_the_router_with_a_reason(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("a file where the folder should be")
    cfg = config(tmp_path, db=tmp_path / "not-a-dir" / "audit.db")

    async def run() -> None:
        with pytest.raises(OSError, match="not-a-dir"):
            await AuditStore(cfg).start()

    asyncio.run(run())


def test_a_missing_signing_key_is_not_silently_replaced(tmp_path: Path) -> None:
    """A new key whose public half differs from the `.pub` auditors hold would make
    every later checkpoint unverifiable: refuse instead."""
    cfg = config(tmp_path)
    assert cfg.signing_key is not None

    async def start_stop() -> None:
        store = AuditStore(cfg)
        await store.start()
        await store.close()

    asyncio.run(start_stop())
    cfg.signing_key.unlink()
    with pytest.raises(OSError, match="public half"):
        asyncio.run(start_stop())


def _forge(db: Path, sql: str, rehash_from: int | None = None) -> None:
    """What anyone who can write the file can do without a key: change rows, then
    re-link the chain from `rehash_from` so that it verifies as far as hashes go."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.executescript(sql)
        if rehash_from is not None:
            (prev,) = conn.execute(
                "SELECT hash FROM records WHERE seq = ?", (rehash_from - 1,)
            ).fetchone()
            rows = conn.execute(
                "SELECT seq, body FROM records WHERE seq >= ? ORDER BY seq", (rehash_from,)
            ).fetchall()
            for seq, body in rows:
                prev = chain_hash(prev, body)
                conn.execute("UPDATE records SET hash = ? WHERE seq = ?", (prev, seq))
        conn.commit()


def _appended(seq: int) -> str:
    body = canonical({"kind": "request", "seq": seq, "time_us": 1, "caller": "mallory"})
    columns = "seq, time_us, kind, body, hash"
    return f"INSERT INTO records ({columns}) VALUES ({seq}, 1, 'request', '{body}', '');"


def _fake_checkpoint(seq: int, key_id: str) -> str:
    return (
        f"INSERT INTO checkpoints VALUES ({seq}, (SELECT hash FROM records WHERE seq = 7), "
        f"1, 7, 'count', '{key_id}', '{'00' * 64}');"
    )


@pytest.mark.parametrize(
    ("how", "sql", "rehash_from", "named"),
    [
        # A record that links, appended after the shutdown checkpoint.
        ("appended", _appended(8), 8, "record seq 8, after the last checkpoint"),
        # The same, with a forged checkpoint in the router's name over it.
        (
            "appended and sealed",
            _appended(8) + _fake_checkpoint(8, "{key_id}"),
            8,
            r"checkpoint \(seq 8\) has an invalid signature",
        ),
        # The same, over a checkpoint in a stranger's name (posing as a key rotation).
        (
            "appended and sealed by another key",
            _appended(8) + _fake_checkpoint(8, "0123456789abcdef"),
            8,
            r"checkpoint \(seq 8\) is signed by key 0123456789abcdef, not this router's",
        ),
        # Cut back past the last checkpoint: it would never seal again.
        (
            "cut past a checkpoint",
            "DELETE FROM records WHERE seq > 5;",
            None,
            r"checkpoint \(seq 7\) is past the last record \(seq 5\)",
        ),
        # A record the router wrote, deleted from the unsealed tail.
        (
            "cut",
            "DELETE FROM checkpoints WHERE seq > 4; DELETE FROM records WHERE seq = 5;",
            None,
            "does not link at seq 6",
        ),
        # The newest checkpoints deleted, a sealed record turned from on-prem to
        # cloud, the chain re-linked: hashes alone say nothing is wrong.
        (
            "rewritten",
            "DELETE FROM checkpoints WHERE seq > 4; "
            'UPDATE records SET body = replace(body, \'"zone":"onprem"\', '
            '\'"zone":"cloud"\') WHERE seq = 6;',
            6,
            "record seq 6, after the last checkpoint",
        ),
    ],
)
def test_a_router_does_not_seal_records_it_did_not_write(
    tmp_path: Path, how: str, sql: str, rehash_from: int | None, named: str
) -> None:
    """At start, records after the last checkpoint are sealed by the router's next
    checkpoint; forged ones would come out genuinely signed. The router checks their
    MACs (a key only it holds) and does not start on a tail it did not write."""
    cfg = config(tmp_path, checkpoint_every=4)

    async def run(events: list[AuditEvent]) -> None:
        store = AuditStore(cfg)
        await store.start()
        for e in events:
            await store.record(e)
        await store.close()

    asyncio.run(run([event(i, zone="onprem", route="onprem") for i in range(6)]))
    with contextlib.closing(connect_readonly(cfg.db)) as conn:
        assert [s for (s,) in conn.execute("SELECT seq FROM checkpoints")] == [4, 7]
    assert cfg.signing_key is not None
    ours = key_id(load_verify_key(cfg.signing_key.with_suffix(".pub")))
    _forge(cfg.db, sql.replace("{key_id}", ours), rehash_from)
    with contextlib.closing(connect_readonly(cfg.db)) as conn:
        before = conn.execute("SELECT COUNT(*), MAX(seq) FROM checkpoints").fetchone()
    with pytest.raises(OSError, match=named) as raised:
        asyncio.run(run([event(99)]))
    assert "move it away" in str(raised.value)
    with contextlib.closing(connect_readonly(cfg.db)) as conn:  # nothing was sealed
        assert conn.execute("SELECT COUNT(*), MAX(seq) FROM checkpoints").fetchone() == before


def _copy_trail(source: Path, target: Path) -> None:
    """The database with its WAL and shared memory as they are now (or their absence)."""
    for suffix in ("", "-wal", "-shm"):
        there = Path(f"{target}{suffix}")
        if Path(f"{source}{suffix}").exists():
            shutil.copy(f"{source}{suffix}", there)
        elif there.exists():
            there.unlink()


def test_a_tail_the_router_wrote_is_sealed_at_the_next_start(tmp_path: Path) -> None:
    """The genuine case the MACs must not get in the way of: records a killed router
    left unsealed are its own, and the next start seals them."""
    cfg = config(tmp_path)

    async def crash() -> None:
        store = AuditStore(cfg)
        await store.start()
        for i in range(3):
            await store.record(event(i))
        _copy_trail(cfg.db, tmp_path / "left.db")  # what kill -9 leaves: no shutdown seal
        await store.close()

    asyncio.run(crash())
    _copy_trail(tmp_path / "left.db", cfg.db)
    with contextlib.closing(connect_readonly(cfg.db)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM checkpoints").fetchone()[0] == 0

    async def restart() -> None:
        store = AuditStore(cfg)
        await store.start()
        await store.close()

    asyncio.run(restart())
    with contextlib.closing(connect_readonly(cfg.db)) as conn:
        assert conn.execute("SELECT MAX(seq) FROM checkpoints").fetchone()[0] == 4
    verified(cfg)


def test_a_rotated_signing_key_verifies_with_both_keys(tmp_path: Path) -> None:
    """After a rotation the trail ends with the old key's checkpoint: the router goes
    on from it only when it can check it (the old .pub in `previous_keys`); a
    checkpoint by a key it cannot check could be anyone's, over anything."""
    old = config(tmp_path, signing_key=tmp_path / "keys-1" / "audit-signing.key")
    unlisted = config(tmp_path, signing_key=tmp_path / "keys-2" / "audit-signing.key")
    new = config(
        tmp_path,
        signing_key=tmp_path / "keys-2" / "audit-signing.key",
        previous_keys=[tmp_path / "keys-1" / "audit-signing.pub"],
    )

    async def run(cfg: AuditConfig, i: int) -> None:
        store = AuditStore(cfg)
        await store.start()
        await store.record(event(i))
        await store.close()

    asyncio.run(run(old, 1))
    with pytest.raises(OSError, match=r"list the old public key .* under audit.previous_keys"):
        asyncio.run(run(unlisted, 2))
    typo = config(
        tmp_path,
        signing_key=tmp_path / "keys-2" / "audit-signing.key",
        previous_keys=[tmp_path / "keys-0" / "audit-signing.pub", *new.previous_keys],
    )
    with pytest.raises(
        OSError, match=r"audit.previous_keys: .*keys-0/audit-signing.pub: .*not found"
    ):
        asyncio.run(run(typo, 2))  # a typo in the list is named at start, whatever its place
    asyncio.run(run(new, 2))
    keys = [load_verify_key(c.signing_key.with_suffix(".pub")) for c in (old, new)]  # type: ignore[union-attr]
    with contextlib.closing(connect_readonly(new.db)) as conn:
        assert verify(conn, keys).ok
        only_new = verify(conn, keys[1])
    assert {p.kind for p in only_new.problems} == {"checkpoint"}
