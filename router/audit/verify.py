"""Checking an audit trail: the hash chain, the signed checkpoints, and what broke.

`verify` walks the records in the order of the seq *inside* each hashed body (the
`seq` column is only where a row is stored), so it can tell the kinds of tampering
apart and name the first sequence number each one affects, once per tampering:

- modified:  a record does not hash to its stored value from its predecessor, its
  body is not the one canonical encoding of a record (`codec.canonical`: a duplicate
  key, whitespace, non-ASCII bytes, not JSON at all), its columns disagree with its
  body, or the chain was re-hashed and no longer matches a checkpoint;
- deleted:   a seq is missing from the chain, a checkpoint is missing (one a later
  one names, or one the router must have written: see below), or records before the
  first one are gone and neither a genuine prune nor a continuation explains it;
- inserted:  a row that is not part of the chain: a second record claiming a seq, a
  seq before the chain starts (0, negative, pruned), or a `prunes` row claiming
  records that are still there;
- reordered: the chain is intact but a record is not stored in chain order;
- truncated: records a signed checkpoint covers are missing from the end;
- checkpoint: a checkpoint's signature does not verify with the given key, or a
  column of it is not the type the router writes;
- schema:    a trigger or a view (the router never creates one; a trigger can delete
  checkpoints as the router writes them).

A trail may start after seq 1 only from a signed checkpoint: `audit prune` leaves one
(the newest prune must name a validly signed checkpoint, by seq and hash, and the
remaining records must chain from it), and so does a router that had to continue its
chain in a new file (`audit.continued`).

Records after the last checkpoint are not yet covered by a signature: nothing proves
them complete. The router seals them within `checkpoint_ms` and at shutdown, and at
every `checkpoint_every`-th record in the same transaction, so an unsealed tail longer
than the `checkpoint_every` its newest `router.start` record states means checkpoints
were deleted (a stopped router's trail has no unsealed tail at all).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import sqlite3
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ed25519

from hybridroute.router.audit import db as auditdb
from hybridroute.router.audit.codec import (
    GENESIS,
    canonical,
    checkpoint_message,
    key_id,
    signature_ok,
)
from hybridroute.router.audit.db import Checkpoint

__all__ = [
    "Problem",
    "PruneInfo",
    "PruneResult",
    "Report",
    "WouldRemoveAll",
    "check_tail",
    "prune",
    "verify",
]


@dataclass(frozen=True)
class Problem:
    seq: int  # the first sequence number affected (0: the database as a whole)
    kind: str
    message: str


@dataclass(frozen=True)
class PruneInfo:
    """One `audit prune`, as its row in `prunes` says (None: a column that is not an
    integer)."""

    through_seq: int
    records: int | None
    before_us: int | None
    pruned_at_us: int | None


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
    prunes: list[PruneInfo] = field(default_factory=list)  # oldest first
    checkpoint_every: int = 0  # as the newest router.start states it (0: not stated)
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


# --- reading: every column is checked for its type, never trusted --------------------


@dataclass(frozen=True)
class _Row:
    pos: int  # the seq column: where the row is stored
    seq: int  # the seq inside the body (the position, when the body has none)
    time_ok: bool  # the time_us and kind columns agree with the body
    body: bytes
    hash: str  # "" when the column is not ASCII text
    fault: str  # why the body is not a canonical record ("" when it is)
    kind: str
    every: int  # checkpoint_every a router.start body states (0: none)


def _chain(prev: str, body: bytes) -> str:
    try:
        return hashlib.sha256(bytes.fromhex(prev) + body).hexdigest()
    except ValueError:
        return ""


def _link(prev: str, row: _Row) -> bool:
    try:
        return hashlib.sha256(bytes.fromhex(prev) + row.body).hexdigest() == row.hash
    except ValueError:
        return False


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    value: dict[str, object] = {}
    for k, v in pairs:
        if k in value:
            raise _DuplicateKey(k)
        value[k] = v
    return value


def _parse(body: bytes) -> tuple[dict[str, object] | None, str]:
    """The record a body encodes, and why it is not canonical ("" when it is). A
    duplicate key never survives `canonical`, so the plain (fast) parse finds it; the
    slow one only says which key it was."""
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        return None, "is not ASCII text (a record body is canonical JSON, ASCII only)"
    try:
        value = json.loads(text)
    except ValueError:
        return None, "is not valid JSON"
    if not isinstance(value, dict):
        return None, "is not a JSON object"
    try:
        if canonical(value) == text:
            return value, ""
    except ValueError:
        pass
    try:
        json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        return None, f"has the key {str(exc)[:40]!r} twice (readers would disagree on it)"
    return value, "is not in canonical form (sorted keys, no whitespace, ASCII)"


def _text(raw: object) -> str | None:
    """A TEXT column read as bytes (CAST AS BLOB): the text if it is ASCII."""
    if not isinstance(raw, bytes):
        return None
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        return None


def _every(value: dict[str, object]) -> int:
    """The checkpoint_every a router.start body states (`audit.describe()`), or 0."""
    audit = value.get("audit")
    stated = audit.get("checkpoint_every") if isinstance(audit, dict) else None
    if isinstance(stated, int) and not isinstance(stated, bool) and stated > 0:
        return stated
    return 0


def _row(
    pos: int, seq: int | None, time_col: object, kind_col: object, body: object, h: object
) -> _Row:
    """`seq`: the one SQLite reads in the body (what the rows are ordered by); None when
    it reads none, and then the row stands at its stored position."""
    raw = body if isinstance(body, bytes) else b""
    value, fault = _parse(raw) if isinstance(body, bytes) else (None, "is not text")
    value = value or {}
    if seq is None:
        seq = pos
        fault = fault or "has no sequence number"
    kind = value.get("kind")
    time_ok = isinstance(time_col, int) and (time_col, _text(kind_col)) == (
        value.get("time_us"),
        kind,
    )
    return _Row(
        pos=pos,
        seq=seq,
        time_ok=time_ok,
        body=raw,
        hash=_text(h) or "",
        fault=fault,
        kind=kind if isinstance(kind, str) else "",
        every=_every(value) if kind == "router.start" else 0,
    )


_COLUMNS = (
    "seq, CASE WHEN typeof(time_us) = 'integer' THEN time_us END, "
    "CAST(kind AS BLOB), CASE WHEN typeof(body) = 'text' THEN CAST(body AS BLOB) END, "
    "CAST(hash AS BLOB)"
)
# The seq inside a body, where SQLite can read one (an integer in valid JSON text).
_BODY_SEQ = (
    "CASE WHEN typeof(body) = 'text' AND json_valid(body) "
    "AND json_type(body, '$.seq') = 'integer' THEN json_extract(body, '$.seq') END"
)


def _rows(conn: sqlite3.Connection) -> Iterator[_Row]:
    """Every row, in the order of the seq in its body; a row without one (not JSON, not
    text) takes the place its stored position gives it. Explicit columns only: the
    table may grow more (a writer-side MAC) that verify has no business with."""
    readable = conn.execute(
        f"SELECT {_BODY_SEQ} AS bseq, {_COLUMNS} FROM records "  # noqa: S608 - fixed text
        "WHERE bseq IS NOT NULL ORDER BY bseq, seq"
    )
    unreadable = conn.execute(
        f"SELECT {_COLUMNS} FROM records WHERE ({_BODY_SEQ}) IS NULL ORDER BY seq"  # noqa: S608
    )
    keyed = ((int(r[0]), int(r[1]), r[0], r[1:]) for r in readable)
    placed = ((int(r[0]), int(r[0]), None, r) for r in unreadable)
    merged = heapq.merge(keyed, placed, key=lambda x: (x[0], x[1]))
    for _, _, seq, (pos, t, kind, body, h) in merged:
        yield _row(int(pos), seq, t, kind, body, h)


def _groups(rows: Iterator[_Row]) -> Iterator[list[_Row]]:
    group: list[_Row] = []
    for row in rows:
        if group and group[0].seq != row.seq:
            yield group
            group = []
        group.append(row)
    if group:
        yield group


_CHECKPOINT_COLUMNS = (
    ("hash", "text"),
    ("time_us", "integer"),
    ("prev_seq", "integer"),
    ("reason", "text"),
    ("key_id", "text"),
    ("signature", "text"),
)


def _read_checkpoints(conn: sqlite3.Connection, report: Report) -> list[Checkpoint]:
    """The checkpoint rows; one whose columns are not what the router writes (text
    where an integer belongs, bytes that are not ASCII) is reported and left out."""

    def read(name: str, want: str) -> str:
        if want == "text":
            return f"typeof({name}), CAST({name} AS BLOB)"
        return f"typeof({name}), CASE WHEN typeof({name}) = 'integer' THEN {name} END"

    select = ", ".join(read(name, want) for name, want in _CHECKPOINT_COLUMNS)
    out: list[Checkpoint] = []
    for row in conn.execute(f"SELECT seq, {select} FROM checkpoints ORDER BY seq"):  # noqa: S608
        seq = int(row[0])
        texts: list[str] = []
        ints: list[int] = []
        wrong = ""
        for i, (name, want) in enumerate(_CHECKPOINT_COLUMNS):
            stored, raw = row[1 + 2 * i], row[2 + 2 * i]
            text = _text(raw) if want == "text" else None
            if want == "text" and stored == want and text is not None:
                texts.append(text)
            elif want == "integer" and stored == want and isinstance(raw, int):
                ints.append(raw)
            else:
                what = "ASCII text" if want == "text" else "an integer"
                wrong = wrong or f"{name} is not {what} (it is {stored})"
        if wrong:
            report.add(
                seq,
                "checkpoint",
                f"checkpoint at seq {seq} was altered: its {wrong}, which the router never "
                "writes; it proves nothing",
            )
            continue
        (h, reason, kid, sig), (t, p) = texts, ints
        out.append(Checkpoint(seq, h, t, p, reason, kid, sig))
    return out


def _read_prunes(conn: sqlite3.Connection) -> list[tuple[PruneInfo, str | None]]:
    def num(name: str) -> str:
        return f"CASE WHEN typeof({name}) = 'integer' THEN {name} END"

    sql = (
        f"SELECT through_seq, CAST(through_hash AS BLOB), {num('records')}, "  # noqa: S608
        f"{num('before_us')}, {num('pruned_at_us')} FROM prunes ORDER BY through_seq"
    )
    return [
        (PruneInfo(int(s), n, b, at), _text(h)) for s, h, n, b, at in conn.execute(sql).fetchall()
    ]


# --- the walk -------------------------------------------------------------------------


class _Walk:
    """State of the walk along the chain."""

    def __init__(self, report: Report, seals: dict[int, Checkpoint], valid: set[int]) -> None:
        self.report, self.seals, self.valid = report, seals, valid
        self.prev: dict[str, _Row | None] = {}
        self.expected = 0
        self.last_seq = 0
        self.at_seal: dict[int, str] = {}  # chain hash at each checkpoint's seq
        self.explained: set[int] = set()  # checkpoints whose mismatch is reported already
        self.shifted = False  # an insertion or deletion explains rows stored off-seq
        self.seqs = array("q")  # the chain, in order: each seq and where it is stored
        self.positions = array("q")
        self.every = 0  # checkpoint_every of the newest router.start
        self.before = 0  # seqs up to this one were pruned
        self.base = len(report.problems)  # problems found before the walk

    def start(self, first: _Row, prune: tuple[PruneInfo, str | None] | None) -> None:
        r, s = self.report, first.seq
        self.expected = s
        if s == 1:
            self.prev = {GENESIS: None}
            return
        anchor = self.seals.get(s - 1)
        if anchor is None:
            r.add(1, "deleted", f"{_span(1, s - 1)} missing (no checkpoint anchors seq {s})")
            self.prev = {}
            return
        self.prev = {anchor.hash: None}
        if prune is not None and prune[0].through_seq == s - 1:
            return  # `_check_prune` says whether it is genuine
        if first.kind == "audit.continued" and not first.fault:  # a continuation file
            r.starts_after = f"continues a chain whose records through seq {s - 1} are elsewhere"
            return
        since = prune[0].through_seq + 1 if prune is not None else 1
        r.add(
            since,
            "deleted",
            f"{_span(since, s - 1)} missing: the trail starts after a checkpoint that neither "
            "a prune nor an audit.continued record explains",
        )

    def group(self, rows: list[_Row]) -> None:
        s, r = rows[0].seq, self.report
        if s > self.expected:
            r.add(self.expected, "deleted", f"{_span(self.expected, s - 1)} missing from the chain")
            self.shifted, self.prev = True, {}
        linked = [row for row in rows if not self.prev or any(_link(p, row) for p in self.prev)]
        if len(self.prev) > 1 and linked:
            used = {id(o) for p, o in self.prev.items() if any(_link(p, row) for row in linked)}
            for other in {id(o): o for o in self.prev.values() if o is not None}.values():
                if id(other) not in used:
                    self._inserted(other)
        prev = self.prev
        if not linked:
            linked = [self._unlinked(rows)]
        elif linked[0].fault:
            r.add(s, "modified", f"record seq {s}: its body {linked[0].fault}")
        for row in rows:
            if row not in linked or (row is not linked[0] and row.hash == linked[0].hash):
                self._inserted(row)
        keep = [row for row in linked if row.hash != linked[0].hash or row is linked[0]]
        self._placed(keep[0])
        self.prev = {row.hash: row for row in keep}
        if not any(_link(p, keep[0]) for p in prev):
            # a changed record: the next one may chain from its stored hash (only its
            # body was changed) or from the hash its body has (only its hash was)
            for p in prev:
                self.prev.setdefault(_chain(p, keep[0].body), keep[0])
        self.expected, self.last_seq = s + 1, s

    def _unlinked(self, rows: list[_Row]) -> _Row:
        """No row links from its predecessor: say which record was changed."""
        s, r = rows[0].seq, self.report
        genuine = next((row for row in rows if row.pos == s), rows[0])
        seal = self.seals.get(s - 1) if (s - 1) in self.valid else None
        if seal is not None and seal.hash not in self.prev and _link(seal.hash, genuine):
            # it still chains from what was signed: the record before it was re-hashed
            self.explained.add(s - 1)
            r.add(
                s - 1,
                "modified",
                f"record seq {s - 1} was changed and re-hashed (or records before it, "
                f"re-hashed up to it): its hash is not the one the checkpoint at seq {s - 1} "
                f"signed, which record seq {s} still chains from",
            )
        elif genuine.fault:
            r.add(s, "modified", f"record seq {s}: its body {genuine.fault}")
        else:
            r.add(s, "modified", f"record seq {s} does not hash to its stored value")
        return genuine

    def _inserted(self, row: _Row) -> None:
        self.shifted = True
        self.report.add(
            row.pos,
            "inserted",
            f"record stored at seq {row.pos} claims seq {row.seq} but is not part of the chain",
        )

    def outside(self, row: _Row) -> None:
        """A row claiming a seq before the chain (0, negative, or pruned)."""
        self.shifted = True
        why = "no seq is below 1" if row.seq < 1 else f"seq {self.before} and below were pruned"
        self.report.add(
            row.pos,
            "inserted",
            f"record stored at seq {row.pos} claims seq {row.seq}: not part of the chain ({why})",
        )

    def _placed(self, row: _Row) -> None:
        if not row.time_ok and not row.fault:
            self.report.add(
                row.seq,
                "modified",
                f"record seq {row.seq}: time_us/kind columns differ from its body",
            )
        self.seqs.append(row.seq)
        self.positions.append(row.pos)
        if row.every:
            self.every = row.every
        if row.seq in self.seals:
            self.at_seal[row.seq] = row.hash

    def finish(self) -> None:
        """Settle what only the whole walk can tell: the last seq's rival records, rows
        stored out of chain order, and rows stored off their seq that no insertion,
        deletion or move explains."""
        r = self.report
        if len(self.prev) > 1:
            sealed = self.seals.get(self.last_seq)
            for p, row in self.prev.items():
                if row is not None and (sealed is None or sealed.hash != p):
                    self._inserted(row)
                    if sealed is None:
                        break
        moved = _out_of_order(self.positions)
        for i in sorted(moved):
            seq, pos = self.seqs[i], self.positions[i]
            r.add(seq, "reordered", f"record seq {seq} is stored out of chain order (at {pos})")
        if moved or self.shifted or len(r.problems) > self.base:
            return
        for seq, pos in zip(self.seqs, self.positions, strict=True):
            if seq != pos:
                r.add(seq, "modified", f"record seq {seq} is stored at position {pos}")
                return


def _out_of_order(positions: Sequence[int]) -> set[int]:
    """Indexes outside one longest increasing run of `positions` (patience sorting):
    the fewest records whose moving explains the order. Of a swapped pair, the
    earlier one is named."""
    tails: list[int] = []  # index of the smallest tail of each length
    back = [-1] * len(positions)
    for i, p in enumerate(positions):
        lo, hi = 0, len(tails)
        while lo < hi:
            mid = (lo + hi) // 2
            if positions[tails[mid]] < p:
                lo = mid + 1
            else:
                hi = mid
        back[i] = tails[lo - 1] if lo else -1
        if lo == len(tails):
            tails.append(i)
        else:
            tails[lo] = i
    keep: set[int] = set()
    i = tails[-1] if tails else -1
    while i >= 0:
        keep.add(i)
        i = back[i]
    return set(range(len(positions))) - keep


def _span(a: int, b: int) -> str:
    return f"record seq {a}" if a == b else f"records seq {a}..{b}"


# --- checkpoints, prunes, schema ------------------------------------------------------


def _signatures(
    report: Report, keys: Sequence[ed25519.Ed25519PublicKey], seals: list[Checkpoint]
) -> set[int]:
    """The seqs of the checkpoints whose signature verifies; the others reported. A
    checkpoint that does not verify proves nothing, so its seq and hash are not held
    against the records."""
    by_id = {key_id(k): k for k in keys}
    valid: set[int] = set()
    for cp in seals:
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
        message = checkpoint_message(
            report.chain, cp.seq, cp.hash, cp.time_us, cp.prev_seq, cp.reason
        )
        if not signature_ok(key, message, cp.signature):
            report.add(cp.seq, "checkpoint", f"checkpoint at seq {cp.seq} has an invalid signature")
            continue
        valid.add(cp.seq)
    return valid


_WALK = frozenset({"deleted", "inserted", "modified", "reordered"})


def _check_seals(
    report: Report, seals: list[Checkpoint], present: set[int], valid: set[int], walk: _Walk
) -> None:
    """The chain of checkpoints, and what each valid one covers. `present`: the seq of
    every checkpoint row, including those left out as altered (reported already)."""
    previous: Checkpoint | None = None
    good = report.first_seq - 1
    mismatched = False  # the previous valid checkpoint no longer matched the chain
    for cp in seals:
        if cp.seq not in valid:
            continue
        if previous is not None and cp.prev_seq != previous.seq and cp.prev_seq not in present:
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
            explained = (  # by the re-hash before, or by what the walk found
                mismatched
                or cp.seq in walk.explained
                or any(good < p.seq <= cp.seq and p.kind in _WALK for p in report.problems)
            )
            if not explained:
                report.add(
                    good + 1,
                    "modified",
                    f"records in seq {good + 1}..{cp.seq} were changed and the chain "
                    f"re-hashed: it no longer matches the checkpoint at seq {cp.seq}",
                )
            mismatched = True
        elif found is not None:
            good, mismatched = cp.seq, False
        previous = cp
        report.sealed_seq = max(report.sealed_seq, cp.seq)


def _check_prune(
    report: Report,
    prune: tuple[PruneInfo, str | None] | None,
    seals: dict[int, Checkpoint],
    valid: set[int],
    first_body_seq: int,
) -> None:
    """The newest prune must be what `audit prune` leaves: its checkpoint (seq and
    hash), validly signed, with the remaining records chaining from it."""
    if prune is None:
        return
    info, through_hash = prune
    n = info.through_seq
    anchor = seals.get(n)
    if first_body_seq and first_body_seq <= n:
        report.add(
            n,
            "inserted",
            f"the prunes table claims records through seq {n} were pruned, but the chain "
            f"holds them from seq {first_body_seq}: the prune row was added by hand",
        )
        return
    if anchor is None or anchor.hash != through_hash:
        report.add(
            1,
            "deleted",
            f"{_span(1, n)} are gone and no genuine prune explains it: the prune through seq "
            f"{n} has no checkpoint at seq {n} with its hash (`audit prune` keeps that one)",
        )
        return
    older = [s for s in seals if s < n]
    if older:
        report.add(
            1,
            "deleted",
            f"{_span(1, n)} are gone, but the checkpoint at seq {older[0]} is still there: "
            f"`audit prune` removes the checkpoints before the one it keeps (seq {n}), so the "
            "records were deleted by hand and the prune row added",
        )
        return
    if n in valid:
        when = f"pruned through seq {n}"
        report.starts_after = when if info.records is None else f"{when} ({info.records} records)"


def _check_schema(conn: sqlite3.Connection, report: Report) -> None:
    for kind, name, sql in conn.execute(
        "SELECT type, CAST(name AS BLOB), CAST(sql AS BLOB) FROM sqlite_master "
        "WHERE type IN ('trigger', 'view') ORDER BY name"
    ):
        shown = (_text(name) or "?")[:40]
        body = " ".join((_text(sql) or "").split())[:160]
        report.add(
            0,
            "schema",
            f"the database has a {kind} {shown!r} ({body}); the router never creates one, "
            "and it can change what the router writes",
        )


def _check_unsealed(report: Report, every: int) -> None:
    report.checkpoint_every = every
    sealed = max(report.sealed_seq, report.first_seq - 1)
    if every and report.unsealed > every:
        missing = sealed + every
        report.add(
            missing,
            "deleted",
            f"{_span(sealed + 1, report.last_seq)} are not sealed, but the router seals "
            f"every {every} records (checkpoint_every of its newest router.start) in the "
            f"same transaction: the checkpoint at seq {missing} was deleted",
        )


def verify(
    conn: sqlite3.Connection,
    key: ed25519.Ed25519PublicKey | Sequence[ed25519.Ed25519PublicKey],
) -> Report:
    """Check the whole trail in `conn`; several keys when the signing key was rotated.

    All of it in one read transaction: a router (or a prune) writing meanwhile would
    otherwise show its newest records without the checkpoints read a moment before
    (reported as deleted checkpoints) or a prune half seen.
    """
    began = not conn.in_transaction
    if began:
        conn.execute("BEGIN")
    try:
        return _verify(conn, key)
    finally:
        if began:
            conn.execute("ROLLBACK")  # nothing was written: just let the snapshot go


def _verify(
    conn: sqlite3.Connection,
    key: ed25519.Ed25519PublicKey | Sequence[ed25519.Ed25519PublicKey],
) -> Report:
    keys = [key] if isinstance(key, ed25519.Ed25519PublicKey) else list(key)
    chain = auditdb.meta(conn).get("chain", "")
    report = Report(chain=chain, key_id=", ".join(key_id(k) for k in keys))
    _check_schema(conn, report)
    seal_list = _read_checkpoints(conn, report)
    seals = {cp.seq: cp for cp in seal_list}
    report.checkpoints = len(seal_list)
    valid = _signatures(report, keys, seal_list)
    prunes = _read_prunes(conn)
    report.prunes = [info for info, _ in prunes]
    newest = prunes[-1] if prunes else None
    walk = _Walk(report, seals, valid)
    first_body_seq = 0
    low = walk.before = 0 if newest is None else newest[0].through_seq
    for rows in _groups(_rows(conn)):
        report.records += len(rows)
        s = rows[0].seq
        if walk.expected == 0 and (s < 1 or 1 < s <= low):  # junk before the chain
            for row in rows:
                walk.outside(row)
            continue
        if walk.expected == 0:  # seq 1 below a prune: the prune row is the lie
            first_body_seq = report.first_seq = s
            walk.start(rows[0], newest if s > low else None)
        walk.group(rows)
    walk.finish()
    if report.first_seq == 0:  # no records: all pruned, or a new trail
        report.first_seq, walk.last_seq = low + 1, low
        if newest is None:  # a trail's first record (audit.created) is written when it is made
            report.add(1, "deleted", "the trail holds no records and no prune explains it")
    report.last_seq = walk.last_seq
    _check_prune(report, newest, seals, valid, first_body_seq)
    times = conn.execute(
        "SELECT MIN(time_us), MAX(time_us) FROM records WHERE typeof(time_us) = 'integer'"
    ).fetchone()
    report.first_time_us, report.last_time_us = int(times[0] or 0), int(times[1] or 0)
    present = {int(s) for (s,) in conn.execute("SELECT seq FROM checkpoints")}
    _check_seals(report, seal_list, present, valid, walk)
    _check_unsealed(report, walk.every)
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
        try:
            linked = hashlib.sha256(bytes.fromhex(prev) + str(body).encode()).hexdigest() == h
        except (ValueError, UnicodeEncodeError):
            linked = False
        if seq != expected or not linked:
            return f"the chain does not link at seq {seq}"
        prev, expected = str(h), expected + 1
    return None


class WouldRemoveAll(Exception):
    """A prune that would leave no record, refused unless asked for (`remove_all`)."""

    def __init__(self, removed: int, through_seq: int) -> None:
        super().__init__(f"it would remove every record ({removed}, through seq {through_seq})")
        self.removed, self.through_seq = removed, through_seq


# Records a prune removes per transaction: each holds the router's commits back for as
# long as it takes to delete them (on the bench machine 20,000 took under 20 ms; a
# 300,000-record prune in one transaction held the write lock 240 ms).
PRUNE_BATCH = 20_000


@dataclass(frozen=True)
class PruneResult:
    through_seq: int  # records up to this seq are gone (0: nothing pruned)
    removed: int
    kept_from: int


def prune(
    conn: sqlite3.Connection,
    key: ed25519.Ed25519PublicKey | Sequence[ed25519.Ed25519PublicKey],
    before_us: int,
    *,
    remove_all: bool = True,
    batch: int = PRUNE_BATCH,
) -> PruneResult:
    """Remove records before a time, up to the last checkpoint sealed before it.

    The trail must verify first (pruning a damaged trail would destroy the evidence),
    and the cut is always at a signed checkpoint, which stays as the anchor the
    remaining records chain from: what is left verifies on its own. The newest signed
    policy the router accepted is kept in meta (`policy_floor`), so pruning never
    lowers the router's rollback protection. Without `remove_all`, a cut that would
    leave no record raises `WouldRemoveAll` before anything is removed.

    A live router's commits wait while a prune holds the write lock, and refuse
    requests past its commit timeout; so the records go about `batch` at a time, each
    transaction a complete prune to a checkpoint (the trail verifies between any two),
    and the one `prunes` row this call writes is moved on with each.
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
    seq = int(row[0])
    removed, written = 0, None
    for cut, cut_hash in _cuts(conn, report.first_seq, seq, batch):
        conn.execute("BEGIN IMMEDIATE")
        try:
            if written is None and not remove_all:  # counted inside the transaction: the
                # router may have written meanwhile
                (left,) = conn.execute(
                    "SELECT COUNT(*) FROM records WHERE seq > ?", (seq,)
                ).fetchone()
                if not left:
                    (every,) = conn.execute(
                        "SELECT COUNT(*) FROM records WHERE seq <= ?", (seq,)
                    ).fetchone()
                    raise WouldRemoveAll(int(every), seq)
            # The router's rollback floor is its newest signed policy record: keep it.
            floor = auditdb.newest_signed_policy_note(conn, cut)
            if floor is not None:
                conn.execute(
                    "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                    (auditdb.POLICY_FLOOR, json.dumps(floor, sort_keys=True)),
                )
            removed += conn.execute("DELETE FROM records WHERE seq <= ?", (cut,)).rowcount
            conn.execute("DELETE FROM checkpoints WHERE seq < ?", (cut,))
            if written is not None:
                conn.execute("DELETE FROM prunes WHERE through_seq = ?", (written,))
            conn.execute(
                "INSERT OR REPLACE INTO prunes VALUES (?, ?, ?, ?, ?)",
                (cut, cut_hash, removed, before_us, time.time_ns() // 1000),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        written = cut
    return PruneResult(seq, removed, seq + 1)


def _cuts(conn: sqlite3.Connection, first: int, last: int, batch: int) -> list[tuple[int, str]]:
    """Checkpoints from `first` on to cut at, about `batch` records apart, ending at `last`."""
    sealed = conn.execute(
        "SELECT seq, hash FROM checkpoints WHERE seq >= ? AND seq <= ? ORDER BY seq",
        (first, last),
    ).fetchall()
    cuts: list[tuple[int, str]] = []
    start = first
    for i, (seq, hash_hex) in enumerate(sealed):
        following = sealed[i + 1][0] if i + 1 < len(sealed) else None
        if following is None or following - start >= batch:
            cuts.append((int(seq), str(hash_hex)))
            start = int(seq) + 1
    return cuts
