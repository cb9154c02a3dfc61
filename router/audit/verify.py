"""Checking an audit trail: the hash chain, the signed checkpoints, and what broke.

`verify` walks the records in the order of the seq *inside* each hashed body (the
`seq` column is only where a row is stored), so it can tell the kinds of tampering
apart and name the first sequence number each one affects:

- modified:  a record does not hash to its stored value from its predecessor (or its
  columns disagree with its body, or the chain was re-hashed and no longer matches a
  checkpoint);
- deleted:   a seq is missing from the chain (or a checkpoint a later one names);
- inserted:  a second record claims a seq, and the chain continues from the other one;
- reordered: the chain is intact but its records are not stored in chain order;
- truncated: records a signed checkpoint covers are missing from the end;
- checkpoint: a checkpoint's signature does not verify with the given key.

A trail may start after seq 1 only from a signed checkpoint: `audit prune` leaves one,
and so does a router that had to continue its chain in a new file. Records after the
last checkpoint are reported as not yet sealed: nothing proves they are complete (the
router seals them within `checkpoint_seconds`, at shutdown, and at its next start).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ed25519

from hybridroute.router.audit import db as auditdb
from hybridroute.router.audit.codec import GENESIS, checkpoint_message, key_id, signature_ok
from hybridroute.router.audit.db import Checkpoint

__all__ = ["Problem", "PruneResult", "Report", "check_tail", "prune", "verify"]


@dataclass(frozen=True)
class Problem:
    seq: int  # the first sequence number affected
    kind: str
    message: str


@dataclass
class Report:
    chain: str = ""
    records: int = 0
    first_seq: int = 0
    last_seq: int = 0
    first_time_us: int = 0
    last_time_us: int = 0
    checkpoints: int = 0
    sealed_seq: int = 0
    key_id: str = ""
    starts_after: str = ""  # why the chain starts after seq 1, when it does
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def unsealed(self) -> int:
        return max(0, self.last_seq - max(self.sealed_seq, self.first_seq - 1))

    def add(self, seq: int, kind: str, message: str) -> None:
        self.problems.append(Problem(seq, kind, message))

    def first(self) -> Problem | None:
        return min(self.problems, key=lambda p: p.seq) if self.problems else None


@dataclass(frozen=True)
class _Row:
    pos: int  # the seq column: where the row is stored
    seq: int  # the seq inside the body
    time_ok: bool
    body: str
    hash: str


def _link(prev: str, row: _Row) -> bool:
    try:
        return hashlib.sha256(bytes.fromhex(prev) + row.body.encode()).hexdigest() == row.hash
    except (ValueError, UnicodeEncodeError):
        return False


def _groups(conn: sqlite3.Connection, report: Report) -> Iterator[list[_Row]]:
    """Rows grouped by the seq in their body, in that order; unreadable ones reported."""
    cursor = conn.execute(
        "SELECT seq, time_us, kind, body, hash, json_extract(body, '$.seq'), "
        "json_extract(body, '$.time_us'), json_extract(body, '$.kind') FROM records "
        "WHERE json_valid(body) ORDER BY json_extract(body, '$.seq'), seq"
    )
    group: list[_Row] = []
    for pos, t, kind, body, h, bseq, bt, bkind in cursor:
        if not isinstance(bseq, int):
            report.add(int(pos), "modified", f"record at seq {pos} has no sequence number")
            continue
        row = _Row(int(pos), bseq, (t, kind) == (bt, bkind), str(body), str(h))
        if group and group[0].seq != row.seq:
            yield group
            group = []
        group.append(row)
    if group:
        yield group
    for (pos,) in conn.execute("SELECT seq FROM records WHERE NOT json_valid(body)"):
        report.add(int(pos), "modified", f"record at seq {pos} is not valid JSON")


def _kind(body: str) -> object:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value.get("kind") if isinstance(value, dict) else None


class _Walk:
    """State of the walk along the chain."""

    def __init__(self, report: Report, seals: dict[int, Checkpoint]) -> None:
        self.report, self.seals = report, seals
        self.prev: dict[str, _Row | None] = {}
        self.expected = 0
        self.last_pos = 0
        self.last_seq = 0
        self.at_seal: dict[int, str] = {}  # chain hash at each checkpoint's seq
        self.shifted = False  # an insertion or deletion explains rows stored off-seq
        self.misplaced: _Row | None = None  # the first chain row not stored at its seq

    def start(self, first: _Row, conn: sqlite3.Connection) -> None:
        r = self.report
        if first.seq == 1:
            self.prev = {GENESIS: None}
        elif (anchor := self.seals.get(first.seq - 1)) is not None:
            self.prev = {anchor.hash: None}
            pruned = conn.execute(
                "SELECT records, pruned_at_us FROM prunes WHERE through_seq = ?", (first.seq - 1,)
            ).fetchone()
            if pruned:
                r.starts_after = f"pruned through seq {first.seq - 1} ({pruned[0]} records)"
            elif _kind(first.body) == "audit.continued":  # a router's continuation file
                r.starts_after = (
                    f"continues a chain whose records through seq {first.seq - 1} are elsewhere"
                )
            else:
                r.add(
                    1,
                    "deleted",
                    f"records seq 1..{first.seq - 1} are missing: the trail starts after a "
                    "checkpoint that neither a prune nor an audit.continued record explains",
                )
        else:
            r.add(
                1,
                "deleted",
                f"records seq 1..{first.seq - 1} are missing "
                f"(no checkpoint anchors seq {first.seq})",
            )
            self.prev = {}
        self.expected = first.seq

    def group(self, rows: list[_Row]) -> None:
        s, r = rows[0].seq, self.report
        if s > self.expected:
            r.add(self.expected, "deleted", f"{_span(self.expected, s - 1)} missing from the chain")
            self.shifted, self.prev = True, {}
        linked = [row for row in rows if not self.prev or any(_link(p, row) for p in self.prev)]
        if len(self.prev) > 1 and linked:
            used = {p for p in self.prev for row in linked if _link(p, row)}
            for p, other in self.prev.items():
                if p not in used and other is not None:
                    self._inserted(other)
        if not linked:
            genuine = next((row for row in rows if row.pos == s), rows[0])
            r.add(s, "modified", f"record seq {s} does not hash to its stored value")
            linked = [genuine]
        for row in rows:
            if row not in linked or (row is not linked[0] and row.hash == linked[0].hash):
                self._inserted(row)
        keep = [row for row in linked if row.hash != linked[0].hash or row is linked[0]]
        self._placed(keep[0])
        self.prev = {row.hash: row for row in keep}
        self.expected, self.last_seq = s + 1, s

    def _inserted(self, row: _Row) -> None:
        self.shifted = True
        self.report.add(
            row.pos,
            "inserted",
            f"record stored at seq {row.pos} claims seq {row.seq} but is not part of the chain",
        )

    def _placed(self, row: _Row) -> None:
        r = self.report
        if not row.time_ok:
            r.add(
                row.seq,
                "modified",
                f"record seq {row.seq}: time_us/kind columns differ from its body",
            )
        if row.pos < self.last_pos:
            r.add(
                self.last_seq,
                "reordered",
                f"records seq {self.last_seq} and {row.seq} are stored out of order "
                f"(seq {row.seq} at position {row.pos})",
            )
        elif row.pos != row.seq and self.misplaced is None:
            self.misplaced = row
        self.last_pos = max(self.last_pos, row.pos)
        if row.seq in self.seals:
            self.at_seal[row.seq] = row.hash

    def finish(self) -> None:
        """Settle what only the whole walk can tell: the last seq's rival records, and
        rows stored off their seq that no insertion, deletion or swap explains."""
        row = self.misplaced
        if row is not None and not self.shifted and not self.report.problems:
            message = f"record seq {row.seq} is stored at position {row.pos}"
            self.report.add(row.seq, "modified", message)
        if len(self.prev) > 1:
            sealed = self.seals.get(self.last_seq)
            for p, row in self.prev.items():
                if row is not None and (sealed is None or sealed.hash != p):
                    self._inserted(row)
                    if sealed is None:
                        break


def _span(a: int, b: int) -> str:
    return f"record seq {a}" if a == b else f"records seq {a}..{b}"


def _check_seals(
    report: Report, keys: Sequence[ed25519.Ed25519PublicKey], seals: list[Checkpoint], walk: _Walk
) -> None:
    """Signatures (each with the key its id names), the chain of checkpoints, and what
    each valid one covers. A checkpoint that does not verify proves nothing, so its
    seq and hash are not held against the records."""
    by_id = {key_id(k): k for k in keys}
    previous: Checkpoint | None = None
    good = report.first_seq - 1
    for cp in seals:
        message = checkpoint_message(
            report.chain, cp.seq, cp.hash, cp.time_us, cp.prev_seq, cp.reason
        )
        key = by_id.get(cp.key_id)
        if key is None:  # not tampering as far as we can tell: a key we were not given
            known = ", ".join(k[:16] for k in sorted(by_id))
            report.add(
                cp.seq,
                "checkpoint",
                f"checkpoint at seq {cp.seq} is signed by key {cp.key_id[:16]}, not by a key "
                f"given ({known}); if the signing key was rotated, pass the old .pub too "
                "(--key OLD --key NEW)",
            )
            continue
        if not signature_ok(key, message, cp.signature):
            report.add(cp.seq, "checkpoint", f"checkpoint at seq {cp.seq} has an invalid signature")
            continue
        if previous is not None and cp.prev_seq != previous.seq:
            report.add(
                cp.prev_seq,
                "deleted",
                f"checkpoint at seq {cp.prev_seq}, named by the one at seq {cp.seq}, is missing",
            )
        if cp.seq > report.last_seq and report.last_seq >= report.first_seq - 1:
            report.sealed_seq = cp.seq  # a signature vouches for records that are gone
            report.add(
                report.last_seq + 1,
                "truncated",
                f"{_span(report.last_seq + 1, cp.seq)} missing: the checkpoint at seq "
                f"{cp.seq} sealed them",
            )
            break
        found = walk.at_seal.get(cp.seq)
        if found is not None and found != cp.hash:
            report.add(
                good + 1,
                "modified",
                f"records in seq {good + 1}..{cp.seq} were changed and the chain re-hashed: "
                f"it no longer matches the checkpoint at seq {cp.seq}",
            )
        elif found is not None:
            good = cp.seq
        previous = cp
        report.sealed_seq = max(report.sealed_seq, cp.seq)


def verify(
    conn: sqlite3.Connection,
    key: ed25519.Ed25519PublicKey | Sequence[ed25519.Ed25519PublicKey],
) -> Report:
    """Check the whole trail in `conn`; several keys when the signing key was rotated."""
    keys = [key] if isinstance(key, ed25519.Ed25519PublicKey) else list(key)
    chain = auditdb.meta(conn).get("chain", "")
    report = Report(chain=chain, key_id=", ".join(key_id(k) for k in keys))
    seal_list = auditdb.checkpoints(conn)
    seals = {cp.seq: cp for cp in seal_list}
    report.checkpoints = len(seal_list)
    walk = _Walk(report, seals)
    for rows in _groups(conn, report):
        if walk.expected == 0:
            walk.start(rows[0], conn)
            report.first_seq = rows[0].seq
        walk.group(rows)
        report.records += len(rows)
    walk.finish()
    if report.first_seq == 0:  # no records: all pruned, or a new trail
        floor = conn.execute("SELECT MAX(through_seq) FROM prunes").fetchone()[0] or 0
        report.first_seq, walk.last_seq = int(floor) + 1, int(floor)
        if floor:
            report.starts_after = f"pruned through seq {floor}"
        else:  # a trail's first record (audit.created) is written when it is made
            report.add(1, "deleted", "the trail holds no records and no prune explains it")
    report.last_seq = walk.last_seq
    times = conn.execute("SELECT MIN(time_us), MAX(time_us) FROM records").fetchone()
    report.first_time_us, report.last_time_us = int(times[0] or 0), int(times[1] or 0)
    _check_seals(report, keys, seal_list, walk)
    report.problems.sort(key=lambda p: p.seq)
    return report


def check_tail(conn: sqlite3.Connection, key: ed25519.Ed25519PublicKey, chain: str) -> str | None:
    """At router start: does the chain since the last checkpoint still link? (A full
    `verify` is the auditor's job; this catches a damaged tail before extending it.)"""
    last = conn.execute("SELECT MAX(seq) FROM checkpoints").fetchone()[0]
    seals = auditdb.checkpoints(conn, int(last or 0))
    prev = None
    if seals:
        cp = seals[-1]
        message = checkpoint_message(chain, cp.seq, cp.hash, cp.time_us, cp.prev_seq, cp.reason)
        if cp.key_id != key_id(key):
            return (
                f"the last checkpoint (seq {cp.seq}) is signed by key {cp.key_id}, not this "
                f"router's {key_id(key)}: verify with both keys if the key was rotated"
            )
        if not signature_ok(key, message, cp.signature):
            return f"the last checkpoint (seq {cp.seq}) has an invalid signature"
        prev = cp.hash
    start = seals[-1].seq if seals else 0
    rows = conn.execute("SELECT seq, body, hash FROM records WHERE seq > ? ORDER BY seq", (start,))
    expected = start + 1
    prev = prev or GENESIS
    for seq, body, h in rows:
        row = _Row(int(seq), int(seq), True, str(body), str(h))
        if seq != expected or not _link(prev, row):
            return f"the chain does not link at seq {seq}"
        prev, expected = row.hash, expected + 1
    return None


@dataclass(frozen=True)
class PruneResult:
    through_seq: int  # records up to this seq are gone (0: nothing pruned)
    removed: int
    kept_from: int


def prune(
    conn: sqlite3.Connection,
    key: ed25519.Ed25519PublicKey | Sequence[ed25519.Ed25519PublicKey],
    before_us: int,
) -> PruneResult:
    """Remove records before a time, up to the last checkpoint sealed before it.

    The trail must verify first (pruning a damaged trail would destroy the evidence),
    and the cut is always at a signed checkpoint, which stays as the anchor the
    remaining records chain from: what is left verifies on its own. The newest signed
    policy the router accepted is kept in meta (`policy_floor`), so pruning never
    lowers the router's rollback protection.
    """
    report = verify(conn, key)
    if not report.ok:
        first = report.first()
        assert first is not None
        raise ValueError(f"the trail does not verify (seq {first.seq}: {first.kind}); not pruning")
    row = conn.execute(
        "SELECT seq, hash FROM checkpoints WHERE time_us <= ? ORDER BY seq DESC LIMIT 1",
        (before_us,),
    ).fetchone()
    if row is None or int(row[0]) < report.first_seq:
        return PruneResult(0, 0, report.first_seq)
    seq, hash_hex = int(row[0]), str(row[1])
    conn.execute("BEGIN IMMEDIATE")
    try:
        # The router's rollback floor is its newest signed policy record: keep it.
        floor = auditdb.newest_signed_policy_note(conn, seq)
        if floor is not None:
            conn.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                (auditdb.POLICY_FLOOR, json.dumps(floor, sort_keys=True)),
            )
        removed = conn.execute("DELETE FROM records WHERE seq <= ?", (seq,)).rowcount
        conn.execute("DELETE FROM checkpoints WHERE seq < ?", (seq,))
        conn.execute(
            "INSERT OR REPLACE INTO prunes VALUES (?, ?, ?, ?, ?)",
            (seq, hash_hex, removed, before_us, time.time_ns() // 1000),
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return PruneResult(seq, removed, seq + 1)
