"""The audit database: its schema and the few statements everyone shares.

    meta(key, value)            format, chain id, created_at, key ids (informational;
                                everything that matters is inside signed or hashed data),
                                and `policy_floor`: the newest signed policy note a prune
                                removed (rollback protection outlives the records)
    records(seq, time_us, kind, body, hash, mac)
                                seq 1, 2, 3, ... in commit order; body is the canonical
                                JSON that was hashed (it repeats seq, time_us and kind,
                                and verify checks the columns agree); hash chains it;
                                mac authenticates (chain, seq, hash) under a key only the
                                router holds, so that at start it seals only records it
                                wrote (`audit.file`); verify neither needs nor checks it
    checkpoints(seq, hash, time_us, prev_seq, reason, key_id, signature)
                                Ed25519 over (chain, seq, hash, time, prev_seq, reason)
    prunes(through_seq, through_hash, records, before_us, pruned_at_us)
                                what `audit prune` removed, for the verify report

Queries filter on `json_extract(body, ...)`: the body is the only copy of a field, so
what a query shows is exactly what the hash chain protects. `time_us` and `kind` are
columns (verified against the body) for range scans and pruning.

The writer opens the file read-write in WAL mode with `synchronous=FULL` (a commit is on
disk when COMMIT returns); the tools open it read-only unless they change it (prune).

Checkpointing the WAL takes two hands (see `WalCheckpointer`): a background thread
copies the bulk of it into the database without blocking anyone, and the writer then
copies the few frames committed meanwhile on its own connection, so that its next
commit starts the WAL again from the beginning. Without that second step the WAL never
restarts under steady traffic (a PASSIVE checkpoint from another connection never
catches the moving end) and grows without bound, and every commit appends to a file
growing on disk: a slower fsync (about 0.2 ms vs 0.12-0.15 ms on the bench machine)
than rewriting pages in place.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sqlite3
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hybridroute.router.audit.codec import FORMAT, GENESIS

__all__ = [
    "POLICY_FLOOR",
    "Checkpoint",
    "Head",
    "WalCheckpointer",
    "WriterLock",
    "checkpoint_tail",
    "checkpoints",
    "connect_readonly",
    "connect_writer",
    "create_schema",
    "head",
    "meta",
    "newest_signed_policy_note",
]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    time_us INTEGER NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    hash TEXT NOT NULL,
    mac TEXT
);
CREATE INDEX IF NOT EXISTS records_time ON records(time_us);
-- Lifecycle notes only (a partial index: request records never touch it), so the
-- router finds its last start or policy load without scanning every request.
CREATE INDEX IF NOT EXISTS records_notes ON records(seq) WHERE kind != 'request';
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY,
    hash TEXT NOT NULL,
    time_us INTEGER NOT NULL,
    prev_seq INTEGER NOT NULL,
    reason TEXT NOT NULL,
    key_id TEXT NOT NULL,
    signature TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS prunes (
    through_seq INTEGER PRIMARY KEY,
    through_hash TEXT NOT NULL,
    records INTEGER NOT NULL,
    before_us INTEGER NOT NULL,
    pruned_at_us INTEGER NOT NULL
);
"""


# A restarted WAL is cut back to this size; below it, it is rewritten in place.
_WAL_LIMIT_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Head:
    """Where the chain ends: the last record's seq and hash (0 and GENESIS when empty;
    after a prune that removed everything, the anchoring checkpoint's)."""

    seq: int
    hash: str


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    hash: str
    time_us: int
    prev_seq: int
    reason: str
    key_id: str
    signature: str


def connect_writer(path: Path, busy_seconds: float) -> sqlite3.Connection:
    """The router's connection: autocommit (we BEGIN IMMEDIATE ourselves), WAL, FULL."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o640))
    conn = sqlite3.connect(
        path, timeout=busy_seconds, isolation_level=None, check_same_thread=False
    )
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"cannot switch {path} to WAL mode (got {mode})")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA wal_autocheckpoint=0")  # WalCheckpointer does it, off the path
        conn.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT_BYTES}")  # after a burst
        conn.execute("PRAGMA foreign_keys=OFF")
    except BaseException:
        conn.close()
        raise
    return conn


class WriterLock:
    """One router writes a trail. Two writing one file would each extend the chain from
    the head they read, the second's commit would collide on `seq`, and it would refuse
    every request from then on; so the second one does not start, and says why.

    An exclusive `flock` on `DB.lock`, held while the store is open and released by the
    kernel however the process ends (kill -9 included); the file names the holder.
    Readers (`hybridroute audit ...`, prune) do not take it: SQLite's own locks serve
    them.
    """

    def __init__(self, db: Path) -> None:
        self.path = db.with_name(db.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise OSError(
                f"another router is writing this trail ({holder}); give each router "
                "its own audit db (`audit: {db: ...}` in its config)"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the lock; the file stays (removing it would race)
            self._fd = None


POLICY_FLOOR = "policy_floor"


def newest_signed_policy_note(
    conn: sqlite3.Connection, through_seq: int | None = None
) -> dict[str, object] | None:
    """The body of the accepted, signed `policy.load`/`policy.reload` record (up to
    `through_seq`) with the newest signature, or the one a prune kept in meta if that is
    newer. The newest by signing time, not the last written: a router also accepts an
    older signature of its live policy (the same bytes), which must not lower the floor."""
    rows = conn.execute(
        "SELECT body FROM records WHERE kind != 'request' "
        "AND kind IN ('policy.load', 'policy.reload') AND seq <= ? ORDER BY seq",
        (through_seq if through_seq is not None else 1 << 62,),
    )
    # Oldest first (what a prune kept, then the records), so that among signatures of
    # the same second the one accepted last wins, as in the router's own store.
    candidates = [_signed_policy(meta(conn).get(POLICY_FLOOR))]
    candidates += [_signed_policy(body) for (body,) in rows]
    signed = [note for note in candidates if note is not None]
    return max(reversed(signed), key=_signed_at) if signed else None


def _signed_policy(body: str | None) -> dict[str, object] | None:
    try:
        note = json.loads(body) if body else None
    except ValueError:
        return None
    if not isinstance(note, dict) or note.get("accepted") is not True:
        return None
    return note if isinstance(note.get("signed_at_us"), int) else None


def _signed_at(note: dict[str, object]) -> int:
    value = note["signed_at_us"]
    assert isinstance(value, int)
    return value


def checkpoint_tail(conn: sqlite3.Connection) -> None:
    """The writer's half of a checkpoint (module docstring): copy what the background
    checkpoint left, on the writer's connection, never waiting for a lock."""
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def connect_readonly(path: Path) -> sqlite3.Connection:
    """A reader's connection; refuses to create a missing file (a typo is an error).

    A trail copied somewhere read-only (an auditor's copy, read-only media) cannot be
    opened the usual way: reading a WAL-mode file needs its `-shm` beside it, and
    SQLite cannot make one there. With no WAL left to read (a stopped router's trail),
    it is opened as immutable instead; with a WAL, it must be copied somewhere writable.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such audit database")
    conn = sqlite3.connect(_uri(path, "ro"), uri=True, timeout=5)
    try:
        conn.execute("PRAGMA query_only=ON")
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
    except sqlite3.OperationalError:
        conn.close()
        if os.access(path.parent, os.W_OK):
            raise
        wal = path.with_name(path.name + "-wal")
        if wal.exists() and wal.stat().st_size > 0:
            raise sqlite3.OperationalError(
                f"{path} is in a read-only folder and has a write-ahead log ({wal.name}) "
                "that SQLite cannot read there: copy both files to a writable folder"
            ) from None
        conn = sqlite3.connect(_uri(path, "ro", immutable=True), uri=True, timeout=5)
        conn.execute("PRAGMA query_only=ON")
    return conn


def _uri(path: Path, mode: str, *, immutable: bool = False) -> str:
    """A SQLite URI for `path`: any `%`, `?` or `#` in it escaped, not read as URI syntax."""
    return f"{path.absolute().as_uri()}?mode={mode}" + ("&immutable=1" if immutable else "")


def create_schema(conn: sqlite3.Connection, chain: str | None = None) -> str:
    """Create the tables if needed and return the chain id (new, `chain`, or stored).
    A file made before records carried a MAC gets the column (empty for old records)."""
    conn.executescript(_SCHEMA)
    columns = {str(row[1]) for row in conn.execute("PRAGMA table_info(records)")}
    if "mac" not in columns:
        conn.execute("ALTER TABLE records ADD COLUMN mac TEXT")
    stored = meta(conn).get("chain")
    if stored is not None:
        return stored
    chain = chain or uuid.uuid4().hex
    conn.executemany(
        "INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)",
        [("format", FORMAT), ("chain", chain)],
    )
    return chain


def meta(conn: sqlite3.Connection) -> dict[str, str]:
    try:
        rows = conn.execute("SELECT key, value FROM meta").fetchall()
    except sqlite3.OperationalError:
        return {}
    return {str(k): str(v) for k, v in rows}


def head(conn: sqlite3.Connection) -> Head:
    row = conn.execute("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
    if row is not None:
        return Head(int(row[0]), str(row[1]))
    anchor = conn.execute("SELECT seq, hash FROM checkpoints ORDER BY seq DESC LIMIT 1").fetchone()
    return Head(int(anchor[0]), str(anchor[1])) if anchor else Head(0, GENESIS)


def checkpoints(conn: sqlite3.Connection, since_seq: int = 0) -> list[Checkpoint]:
    rows = conn.execute(
        "SELECT seq, hash, time_us, prev_seq, reason, key_id, signature FROM checkpoints "
        "WHERE seq >= ? ORDER BY seq",
        (since_seq,),
    ).fetchall()
    return [
        Checkpoint(int(r[0]), str(r[1]), int(r[2]), int(r[3]), str(r[4]), str(r[5]), str(r[6]))
        for r in rows
    ]


class WalCheckpointer:
    """Copies the WAL back into the database file every `interval`, in its own thread.

    SQLite would otherwise do it inside whichever commit crosses 1000 WAL pages, and
    every request waiting on that commit would wait for megabytes to be copied and
    fsynced (the p99 spikes the benchmark showed). A PASSIVE checkpoint never blocks
    the writer. The file is opened `mode=rw`, never created: after the database was
    removed this must not leave an empty one where the writer expects none.

    After each checkpoint `done` is called (from this thread): the writer then
    checkpoints the rest on its own connection (`checkpoint_tail`), which lets the WAL
    restart (module docstring).

    `detach()` (the writer's, when the file was removed or moved away) closes this
    thread's connection and waits for a checkpoint in progress: SQLite finds the WAL by
    the *path*, so a connection still holding the old file would otherwise checkpoint
    the next file's WAL into it (both files corrupted). The thread connects again, to
    whatever file is at the path, at its next turn.
    """

    def __init__(
        self, path: Path, interval: float = 1.0, done: Callable[[], None] = lambda: None
    ) -> None:
        self._path, self._interval, self._done = path, interval, done
        self._stop = threading.Event()
        self._lock = threading.Lock()  # held while this thread uses its connection
        self._conn: sqlite3.Connection | None = None
        self._thread = threading.Thread(target=self._run, name="audit-wal", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def detach(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                try:
                    if self._conn is None:
                        self._conn = sqlite3.connect(
                            _uri(self._path, "rw"),
                            uri=True,
                            timeout=0.1,
                            isolation_level=None,
                            check_same_thread=False,
                        )
                    self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:  # the writer reports real trouble; retry later
                    log.debug("audit WAL checkpoint skipped: %s", exc)
                    self._close()
                    continue
            self._done()
        with self._lock:
            self._close()
