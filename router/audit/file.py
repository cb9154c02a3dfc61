"""One audit database file and the chain in it: open, reopen, encode, commit.

`ChainFile` is the half of the audit writer that knows about the file: it keeps the
chain's head, numbers and hashes records (`audit.codec`), writes them with the
checkpoint that is due in one transaction, and notices when the file under it was
removed or replaced (its inode changes; SQLite would happily keep writing to an
unlinked file). `audit.writer.Writer` adds the queue, failing and recovering.

Every record also carries a MAC of (chain, seq, hash) under a key derived from the
signing key, which only the router holds. The hash chain alone proves nothing about
records after the last checkpoint: anyone who can write the file can append records
that link, or change one and re-hash the rest. A router that finds such a tail at
start would seal it with a genuine checkpoint, so it checks the tail's MACs first and
does not start on records it did not write (`TailNotOurs`).

Recovery has to trust what is on disk, not what it hoped: a reopened file must still
be this router's chain and end where the router left it, or end with the very batch
whose COMMIT reported an error (then those requests, refused meanwhile, get a
`request.withheld` record rather than a second copy). A file removed outright is
continued in a new file, anchored by a signed checkpoint of the old head.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import json
import logging
import os
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import astuple
from pathlib import Path
from random import random

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hybridroute.router.audit import db as auditdb
from hybridroute.router.audit.codec import (
    FORMAT,
    KeyedHasher,
    canonical,
    chain_hash,
    checkpoint_message,
    event_body,
    key_id,
    load_signing_key,
    load_verify_key,
    note_body,
)
from hybridroute.router.audit.db import Checkpoint, Head
from hybridroute.router.audit.events import AuditEvent, AuditNote, wants_full_detail
from hybridroute.router.audit.verify import check_tail
from hybridroute.router.config import AuditConfig

__all__ = [
    "PROBE_SECONDS",
    "ChainFile",
    "Entry",
    "FileMoved",
    "ForeignChain",
    "TailNotOurs",
    "describe_error",
]

log = logging.getLogger(__name__)

PROBE_SECONDS = 0.25
_IDENTITY_SECONDS = 0.05
_ONE_STATEMENT_ROWS = 512  # 3,072 bound values, well inside SQLite's limit of 32,766
_MAC_INFO = b"hybridroute-audit-record-mac/1"
_MOVE_IT_AWAY = (
    "Starting would seal it with a genuine checkpoint. Keep the file as evidence "
    "(`hybridroute audit verify` shows what the signatures still prove), move it away, "
    "and start again with a new trail."
)
Entry = AuditEvent | AuditNote
Row = tuple[int, int, str, str, str, str]  # seq, time_us, kind, body, hash, mac


class FileMoved(Exception):
    """The database file is not the one the writer opened (removed or replaced)."""


class ForeignChain(Exception):
    """The file's chain is not the one this router was writing: an operator must look."""


class TailNotOurs(Exception):
    """Records after the last checkpoint that this router's key did not write."""


def describe_error(exc: BaseException, path: os.PathLike[str], timeout: float) -> str:
    """A reason a person can act on, for logs, health and `hybridroute status`."""
    if isinstance(exc, FileMoved | ForeignChain):
        return str(exc)
    text = str(exc)
    if "locked" in text or "busy" in text:
        return f"{path} is locked by another process (waited {timeout:g}s)"
    if "full" in text:
        return f"cannot write {path}: disk full ({text})"
    if "readonly" in text or "read-only" in text:
        return f"cannot write {path}: read-only ({text})"
    return f"cannot write {path}: {text or type(exc).__name__}"


class ChainFile:
    """The database file and the chain's state; used by the writer thread only (and
    by `open`, before that thread starts)."""

    def __init__(self, config: AuditConfig) -> None:
        assert config.hmac_key is not None and config.signing_key is not None
        self.config, self.path = config, config.db
        self.hasher = KeyedHasher.from_file(config.hmac_key, create=True)
        self.signer = load_signing_key(config.signing_key, create=True)
        self.signing_key_id = key_id(self.signer.public_key())
        self.mac_key = _mac_key(self.signer)
        self.previous_keys = _previous_keys(config)
        self.conn: sqlite3.Connection | None = None
        self.chain = ""
        self.head = Head(0, "")
        self.sealed_seq = 0  # the last checkpoint's seq
        self.seal_due: float | None = None  # monotonic time the next checkpoint is due
        self.identity: tuple[tuple[int, int], tuple[int, int] | None] | None = None
        self.identity_checked = 0.0  # monotonic time of the last check
        self.backlog: deque[Entry] = deque()  # refused records, oldest first
        # The last failed transaction, by seq: its hash and the entry now in the backlog,
        # and which of those the file would hold in a different (not withheld) version.
        self.attempted: dict[int, tuple[str, Entry]] = {}
        self.amend: set[int] = set()
        self.pending: list[AuditNote] = []  # written first by the next successful probe
        self.anchor: Checkpoint | None = None  # a new file's continuation checkpoint
        self.tail_problem: str | None = None
        self.last_start: dict[str, object] | None = None
        self.observe: Callable[[int, float], None] = lambda n, s: None  # metrics
        self.detach_wal: Callable[[], None] = lambda: None  # the background checkpointer's

    # ------------------------------------------------------------------ opening

    def open(self) -> None:
        """First open, at router start: errors propagate (the router does not start)."""
        conn = auditdb.connect_writer(self.path, self.config.commit_timeout)
        try:
            self.chain = auditdb.create_schema(conn)
            conn.execute(
                "INSERT OR IGNORE INTO meta(key, value) VALUES ('created_at_us', ?)",
                (str(time.time_ns() // 1000),),
            )
            self._adopt(conn)
            self._check_tail(conn)
            row = conn.execute(
                "SELECT body FROM records WHERE kind = 'router.start' ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            self.last_start = None if row is None else _loads(row[0])
            if self.head.seq == 0:
                self.write(conn, [self._created()], None)
        except BaseException:
            conn.close()
            raise
        self.conn = conn

    def _adopt(self, conn: sqlite3.Connection) -> None:
        self.head = auditdb.head(conn)
        row = conn.execute("SELECT MAX(seq) FROM checkpoints").fetchone()
        self.sealed_seq = int(row[0] or 0)
        self.identity = (_stat(self.path), None)
        if self.head.seq > self.sealed_seq:
            self.seal_due = time.monotonic()  # unsealed records from an earlier run

    def _check_tail(self, conn: sqlite3.Connection) -> None:
        """Refuse to go on from a tail this router would wrongly seal: records after the
        last checkpoint it did not write (see the module docstring), a tail that does not
        link, a last checkpoint it cannot check (its own key's or one listed in
        `previous_keys`, after a rotation), or one past the last record."""
        newest = auditdb.checkpoints(conn, self.sealed_seq)
        key = self.signer.public_key()
        if newest and newest[-1].key_id != self.signing_key_id:
            key = self._previous_key(newest[-1].seq, newest[-1].key_id)
        problem = check_tail(conn, key, self.chain)
        if problem:
            raise TailNotOurs(f"{problem}: {_MOVE_IT_AWAY}")
        if self.sealed_seq > self.head.seq:
            raise TailNotOurs(
                f"the last checkpoint (seq {self.sealed_seq}) is past the last record (seq "
                f"{self.head.seq}): {_MOVE_IT_AWAY}"
            )
        self._check_tail_macs(conn)

    def _previous_key(self, seq: int, wanted: str) -> ed25519.Ed25519PublicKey:
        """The earlier signing key (`previous_keys`) that signed the last checkpoint."""
        key = self.previous_keys.get(wanted)
        if key is not None:
            return key
        raise TailNotOurs(
            f"the last checkpoint (seq {seq}) is signed by key {wanted}, not this router's "
            f"{self.signing_key_id}. If the signing key was rotated, list the old public key "
            "(its .pub) under audit.previous_keys in the router config; the router goes on "
            f"from a checkpoint it can check. If not: {_MOVE_IT_AWAY}"
        )

    def _check_tail_macs(self, conn: sqlite3.Connection) -> None:
        sealed = self.sealed_seq
        rows = conn.execute(
            "SELECT seq, hash, mac FROM records WHERE seq > ? ORDER BY seq", (sealed,)
        )
        for seq, hash_hex, mac in rows:
            expected = self._mac(int(seq), str(hash_hex))
            if not isinstance(mac, str) or not hmac.compare_digest(mac, expected):
                why = "has no MAC" if mac is None else "has a MAC this router's key did not make"
                raise TailNotOurs(
                    f"record seq {seq}, after the last checkpoint (seq {sealed}), {why}: "
                    f"records may have been added or changed since the router wrote them. "
                    f"{_MOVE_IT_AWAY} (A trail written by another signing key, or by a "
                    "hybridroute older than record MACs, and not stopped cleanly, reads the "
                    "same.)"
                )

    def _mac(self, seq: int, hash_hex: str) -> str:
        message = f"{self.chain}\n{seq}\n{hash_hex}".encode()
        return hmac.new(self.mac_key, message, hashlib.sha256).hexdigest()

    def _created(self) -> AuditNote:
        return AuditNote(
            "audit.created",
            {
                "chain": self.chain,
                "format": FORMAT,
                "hmac_key_id": self.hasher.key_id,
                "signing_key_id": self.signing_key_id,
            },
        )

    def reopen(self) -> None:
        """Open the file again after a failure, and check it is still our chain."""
        self.close()
        if not self.path.exists() and self.head.seq > 0:
            return self._continue_in_new_file()
        conn = auditdb.connect_writer(self.path, PROBE_SECONDS)
        try:
            chain = auditdb.meta(conn).get("chain")
            if chain != self.chain:
                raise ForeignChain(
                    f"{self.path} now holds another audit chain ({chain or 'none'}); "
                    "move it away to let the router continue its own"
                )
            found = auditdb.head(conn)
            if self.anchor is not None and found.seq == 0:
                pass  # our continuation file, its anchor not written yet
            else:
                if self.anchor is not None and found.seq >= self.head.seq:
                    self.anchor = None  # the anchor did land
                self._reconcile(conn, found)
        except BaseException:
            conn.close()
            raise
        self.conn, self.identity = conn, (_stat(self.path), None)

    def _reconcile(self, conn: sqlite3.Connection, found: Head) -> None:
        """The file's head must be ours, or ours plus a batch whose COMMIT reported an
        error but did reach the disk; then its requests, refused meanwhile, get a
        `request.withheld` record instead of a second copy."""
        if found == self.head:
            return
        rows = conn.execute(
            "SELECT seq, hash FROM records WHERE seq > ? ORDER BY seq", (self.head.seq,)
        ).fetchall()
        ours = [self.attempted.get(int(seq)) for seq, _ in rows]
        if (
            found.seq < self.head.seq
            or not rows
            or any(o is None or o[0] != h for o, (_, h) in zip(ours, rows, strict=True))
        ):
            raise ForeignChain(
                f"{self.path} does not end where this router left it (router: seq "
                f"{self.head.seq}, file: seq {found.seq}); verify it, then restart the router"
            )
        for (seq, _), kept in zip(rows, ours, strict=True):
            assert kept is not None
            if kept[1] in self.backlog:
                self.backlog.remove(kept[1])
            if isinstance(kept[1], AuditEvent) and int(seq) in self.amend:
                fields = {"request_id": kept[1].request_id, "seq": int(seq), "code": "UNAVAILABLE"}
                self.pending.append(AuditNote("request.withheld", fields))
        self.head = found

    def let_go(self) -> None:
        """The file was removed or moved away while open. Before closing, copy its WAL
        into it through our handle, which still reaches it: SQLite keeps the WAL by
        path, so a moved file would otherwise lose its last records to the file left
        behind, and a new file at the path would adopt them (and be malformed)."""
        self.detach_wal()
        if self.conn is not None:
            try:
                self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            except sqlite3.Error as exc:
                log.error("audit: could not fold the WAL into the moved file: %s", exc)

    def _continue_in_new_file(self) -> None:
        self._set_aside_stale_wal()
        conn = auditdb.connect_writer(self.path, PROBE_SECONDS)
        try:
            auditdb.create_schema(conn, self.chain)
        except BaseException:
            conn.close()
            raise
        self.conn, self.identity = conn, (_stat(self.path), None)
        self.anchor = self.checkpoint(self.head, "continuation")
        self.sealed_seq = self.head.seq
        fields = {
            "chain": self.chain,
            "continues_after": {"seq": self.head.seq, "hash": self.head.hash},
            "why": "the database file was removed while the router was writing it",
        }
        self.pending.insert(0, AuditNote("audit.continued", fields))
        log.error("audit: %s was removed; continuing the chain in a new file", self.path)

    def _set_aside_stale_wal(self) -> None:
        """A WAL still at the path of a removed database is not the new file's: when
        `let_go` could not empty it, keep it (renamed) rather than let SQLite replay it."""
        wal = _wal(self.path)
        try:
            if wal.stat().st_size == 0:
                return
        except FileNotFoundError:
            return
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        for stale in (wal, self.path.with_name(self.path.name + "-shm")):
            with contextlib.suppress(FileNotFoundError):
                stale.rename(stale.with_name(f"{stale.name}.orphaned-{stamp}"))
        log.error("audit: the removed database's WAL was kept as %s.orphaned-%s", wal, stamp)

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self.conn.close()
            self.conn = None

    # ------------------------------------------------------------------ writing

    def _body(self, entry: Entry) -> dict[str, object]:
        if isinstance(entry, AuditNote):
            return note_body(entry)
        return event_body(entry, self.hasher, wants_full_detail(entry, random()))

    def _encode(self, entries: Sequence[Entry]) -> list[Row]:
        rows: list[Row] = []
        seq, prev = self.head.seq, self.head.hash
        for entry in entries:
            body = self._body(entry)
            seq += 1
            body["seq"] = seq
            text = canonical(body)
            prev = chain_hash(prev, text)
            time_us = body["time_us"]
            assert isinstance(time_us, int)
            rows.append((seq, time_us, str(body["kind"]), text, prev, self._mac(seq, prev)))
        return rows

    def checkpoint(self, at: Head, reason: str, prev_seq: int | None = None) -> Checkpoint:
        """Sign (chain, seq, hash, now, previous checkpoint, reason)."""
        now = time.time_ns() // 1000
        prev = self.sealed_seq if prev_seq is None else prev_seq
        message = checkpoint_message(self.chain, at.seq, at.hash, now, prev, reason)
        signature = self.signer.sign(message).hex()
        return Checkpoint(at.seq, at.hash, now, prev, reason, self.signing_key_id, signature)

    def _seals(self, rows: Sequence[Row], reason: str | None) -> list[Checkpoint]:
        """A checkpoint at every `checkpoint_every`-th record of `rows`, and one at the end
        for `reason` (interval, shutdown): a signature is cheap, an exact cadence is not."""
        seals: list[Checkpoint] = []
        every, sealed = self.config.checkpoint_every, self.sealed_seq
        for seq, _, _, _, hash_hex, _ in rows:
            if seq - sealed >= every:
                seals.append(self.checkpoint(Head(seq, hash_hex), "count", sealed))
                sealed = seq
        end = Head(rows[-1][0], rows[-1][4]) if rows else self.head
        if reason and end.seq > sealed:
            seals.append(self.checkpoint(end, reason, sealed))
        return seals

    def write(self, conn: sqlite3.Connection, entries: Sequence[Entry], reason: str | None) -> None:
        """One transaction: the anchor (new file), the records, the checkpoints due.

        Usually there is no checkpoint to add, and then the records go in as one
        multi-row INSERT in autocommit mode: one statement is one transaction, so the
        thread gives up the GIL once per batch (around the step that commits and
        fsyncs) instead of once per statement. Under a busy event loop every give-up
        costs up to a GIL switch interval; that, not the disk, was the commit time.
        """
        rows = self._encode(entries)
        end = Head(rows[-1][0], rows[-1][4]) if rows else self.head
        seals = self._seals(rows, reason)
        self._check_identity()
        started = time.perf_counter()
        try:
            if seals or self.anchor is not None or len(rows) > _ONE_STATEMENT_ROWS:
                self._transaction(conn, rows, seals)
            else:
                conn.execute(_insert(len(rows)), [value for row in rows for value in row])
        except BaseException:
            self.attempted = {r[0]: (r[4], e) for r, e in zip(rows, entries, strict=True)}
            self.amend = set()
            _rollback(conn)
            raise
        self.observe(len(rows), time.perf_counter() - started)
        self.anchor, self.head = None, end
        if self.identity is not None and self.identity[1] is None:
            with contextlib.suppress(OSError):
                self.identity = (self.identity[0], _stat(_wal(self.path)))
        if seals:
            self.sealed_seq = seals[-1].seq
            self.seal_due = None if self.sealed_seq == end.seq else self.seal_due
        if self.head.seq > self.sealed_seq and self.seal_due is None:
            self.seal_due = time.monotonic() + self.config.checkpoint_seconds

    def _transaction(
        self, conn: sqlite3.Connection, rows: list[Row], seals: list[Checkpoint]
    ) -> None:
        conn.execute("BEGIN IMMEDIATE")
        anchor = [self.anchor] if self.anchor is not None else []
        conn.executemany(
            "INSERT INTO checkpoints VALUES (?, ?, ?, ?, ?, ?, ?)", map(astuple, anchor + seals)
        )
        conn.executemany(_insert(1), rows)
        conn.execute("COMMIT")

    def _check_identity(self) -> None:
        """Is the file still the one we opened? Checked at most every `_IDENTITY_SECONDS`
        (each stat is a GIL hand-off; see `write`), so a removal is noticed within that."""
        now = time.monotonic()
        if self.identity is None or now < self.identity_checked + _IDENTITY_SECONDS:
            return
        self.identity_checked = now
        main, wal = self.identity
        for path, expected in ((self.path, main), (_wal(self.path), wal)):
            if expected is None:
                continue
            try:
                found = _stat(path)
            except FileNotFoundError:
                raise FileMoved(f"{path} was removed while the router was writing it") from None
            if found != expected:
                raise FileMoved(f"{path} was replaced by another file")

    # ------------------------------------------------------------------ the loop


@functools.lru_cache(maxsize=_ONE_STATEMENT_ROWS)
def _insert(rows: int) -> str:
    """`INSERT INTO records (...) VALUES (?, ...), (?, ...)` for `rows` rows."""
    values = ", ".join(["(?, ?, ?, ?, ?, ?)"] * rows)
    return f"INSERT INTO records (seq, time_us, kind, body, hash, mac) VALUES {values}"  # noqa: S608


def _previous_keys(config: AuditConfig) -> dict[str, ed25519.Ed25519PublicKey]:
    """`audit.previous_keys` by key id, every one read at start: a typo in the list
    is a config error now, not a surprise at the next rotation."""
    keys: dict[str, ed25519.Ed25519PublicKey] = {}
    for path in config.previous_keys:
        try:
            key = load_verify_key(path)
        except ValueError as exc:
            raise ValueError(f"audit.previous_keys: {exc}") from None
        keys[key_id(key)] = key
    return keys


def _mac_key(signer: ed25519.Ed25519PrivateKey) -> bytes:
    """The records' MAC key: derived from the signing key, so it is as private as that
    key and needs no file of its own (and rotates with it)."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_MAC_INFO)
    return hkdf.derive(signer.private_bytes_raw())


def _wal(path: Path) -> Path:
    return path.with_name(path.name + "-wal")


def _stat(path: os.PathLike[str]) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


def _rollback(conn: sqlite3.Connection) -> None:
    with contextlib.suppress(sqlite3.Error):
        conn.execute("ROLLBACK")


def _loads(text: str) -> dict[str, object] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
