"""`hybridroute audit ...`: review, verify, prune and export the audit trail.

Every subcommand reads the database named by `--db FILE`, or the one a running stack
describes (`--stack FILE`: `audit.db` and `audit.verify_key` of `stack.json`; default
`.hybridroute/stack.json` when it exists). Exit codes, so scripts can gate on them:

- 0: done (for `verify`: everything verified; for `query`, also when no record
  matches, which it says on stderr);
- 1: `verify` found a problem, or `prune` refused because the trail does not verify;
- 2: usage error: a missing or unreadable file, a file that is not an audit database
  or is locked, a bad time, a wrong key.

Output cut short by its reader (`... | head`) ends the command quietly, as it does
any other Unix tool (exit 141, the status of a process ended by SIGPIPE; for every
`hybridroute` command, in `hybridroute.cli.main`).

Only `prune` writes to the database; everything else opens it read-only, so reviewing
a live router's trail never takes a write lock from it.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from hybridroute.cli import UsageError, whole_number

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from hybridroute.router.audit.codec import KeyedHasher
    from hybridroute.router.audit.query import Filters
    from hybridroute.router.audit.verify import Report

__all__ = ["register"]

DEFAULT_STACK = Path(".hybridroute/stack.json")
_FILTERS = (
    *("route", "zone", "caller", "model", "model_version", "rule", "decision", "status"),
    "request_id",
)
# Filters over caller-chosen names the trail may store as keyed hashes (`KeyedHasher.name`)
_NAMES = ("model", "model_version")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = sub.add_parser("audit", help="review, verify, prune and export the audit trail")
    audit_sub = audit.add_subparsers(dest="audit_command", metavar="SUBCOMMAND")
    audit_sub.required = True
    verify = _command(audit_sub, "verify", "check the hash chain and signed checkpoints", _verify)
    verify.add_argument(
        "--key", type=Path, action="append", help="verification key (repeat after a rotation)"
    )
    verify.add_argument("--json", action="store_true", help="print one JSON object")
    query = _command(audit_sub, "query", "list records, filtered", _query)
    _time_filters(query)
    for name in _FILTERS:
        query.add_argument(f"--{name.replace('_', '-')}", dest=name, metavar="VALUE")
    query.add_argument("--kind", action="append", help="record kind (request, policy.reload, ...)")
    query.add_argument("--policy", metavar="HASH", help="decided by this policy (hash prefix)")
    query.add_argument("--sensitive", choices=["yes", "no"], help="only (non-)sensitive ones")
    query.add_argument("--session", metavar="VALUE", help="x-session-id value (hashed for you)")
    query.add_argument("--client-request-id", metavar="VALUE", help="the caller's request id")
    query.add_argument("--hmac-key", type=Path, help="HMAC key (default: audit-hmac.key by the db)")
    query.add_argument("--format", choices=["table", "json", "csv"], default="table")
    query.add_argument(
        "--limit", type=whole_number(0, "all"), help="only the last N (table default: 50; 0: all)"
    )
    stats = _command(audit_sub, "stats", "counts, sensitive share, denials, latency", _stats)
    _time_filters(stats)
    stats.add_argument("--format", choices=["table", "json"], default="table")
    export = _command(audit_sub, "export", "every record as JSON lines, for a SIEM", _export)
    _time_filters(export)
    export.add_argument("--format", choices=["jsonl"], default="jsonl")
    export.add_argument("--output", type=Path, help="write here instead of stdout")
    prune = _command(audit_sub, "prune", "remove old records, keep the rest verifiable", _prune)
    prune.add_argument(
        "--before",
        required=True,
        metavar="TIME",
        help="ISO 8601 (UTC), unix seconds or an age like 90d: the records sealed before it go",
    )
    prune.add_argument("--key", type=Path, action="append", help="verification key(s)")
    prune.add_argument(
        "--yes", action="store_true", help="also when that is every record (--before now)"
    )
    hash_ = audit_sub.add_parser(
        "hash",
        help="the keyed hash of a value, to search the trail for it",
        description="Print HMAC-SHA256(VALUE) under the trail's key: what the trail stores "
        "for a session id or a caller's request id.",
    )
    hash_.add_argument("value")
    hash_.add_argument("--key", type=Path, help="HMAC key file (default: by --db's file)")
    hash_.add_argument("--db", type=Path, help="the audit database (its key is beside it)")
    hash_.add_argument("--stack", type=Path, help="stack.json of `hybridroute up`")
    hash_.set_defaults(handler=_hash)


Handler = Callable[[argparse.Namespace], int]


def _command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str, handler: Handler
) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
    parser.add_argument("--db", type=Path, metavar="FILE", help="the audit database")
    parser.add_argument("--stack", type=Path, metavar="FILE", help="stack.json of `hybridroute up`")
    parser.set_defaults(handler=_guarded(handler))
    return parser


def _guarded(handler: Handler) -> Handler:
    """Run a subcommand so that a database problem is one line saying what to do (not a
    traceback from wherever SQLite noticed it). A closed stdout is `main`'s to handle."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except sqlite3.Error as exc:
            raise _db_problem(_db(args), exc) from None

    return run


def _db_problem(db: Path, exc: sqlite3.Error) -> UsageError:
    """What an SQLite error means for someone who named a file with --db."""
    text = str(exc)
    if "locked" in text or "busy" in text:
        return UsageError(
            f"{db} is locked by another process (a prune, a backup, or a tool holding a "
            "write lock); retry when it has finished"
        )
    if any(s in text for s in ("no such table", "no such column", "not a database")):
        return UsageError(
            f"{db} is not an audit database ({text}); give the audit.db a router writes "
            "(`audit: {db: ...}` in its config) or --stack FILE of `hybridroute up`"
        )
    return UsageError(f"{db}: cannot read the audit database ({text})")


def _time_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", metavar="TIME", help="ISO 8601 (UTC), unix seconds or 2h/7d")
    parser.add_argument("--until", metavar="TIME", help="same forms; exclusive")


# --- locating files -------------------------------------------------------------------


def _stack_audit(args: argparse.Namespace) -> dict[str, str]:
    path: Path | None = getattr(args, "stack", None)
    if path is None and getattr(args, "db", None) is None and DEFAULT_STACK.is_file():
        path = DEFAULT_STACK
    if path is None:
        return {}
    try:
        section = json.loads(path.read_text()).get("audit") or {}
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read stack file {path}: {exc}") from None
    if not isinstance(section, dict) or "db" not in section:
        raise UsageError(f"{path} has no audit section (written by an older `hybridroute up`?)")
    return {str(k): str(v) for k, v in section.items()}


def _db(args: argparse.Namespace) -> Path:
    db: Path | None = args.db or (Path(p) if (p := _stack_audit(args).get("db")) else None)
    if db is None:
        raise UsageError("give --db FILE (or --stack FILE of `hybridroute up`)")
    return db


def _verify_keys(args: argparse.Namespace) -> list[Ed25519PublicKey]:
    from hybridroute.router.audit.codec import load_verify_key

    paths: list[Path] = list(args.key or ())
    if not paths and (found := _stack_audit(args).get("verify_key")):
        paths = [Path(found)]
    if not paths:
        raise UsageError(
            "give --key FILE (the public key the checkpoints are signed with) or --stack "
            "FILE of `hybridroute up` (its audit.verify_key)"
        )
    try:
        return [load_verify_key(path) for path in paths]
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _open(args: argparse.Namespace, *, write: bool = False) -> sqlite3.Connection:
    from hybridroute.router.audit.db import connect_readonly

    db = _db(args)
    try:
        if not write:
            conn = connect_readonly(db)
        elif not db.is_file():
            raise FileNotFoundError(f"{db}: no such audit database")
        else:
            conn = sqlite3.connect(db, timeout=10, isolation_level=None)
    except OSError as exc:
        raise UsageError(str(exc)) from None
    except sqlite3.Error as exc:
        raise _db_problem(db, exc) from None
    try:  # is it an audit trail at all? Said now, before any output is written
        conn.execute("SELECT seq, time_us, kind, body, hash FROM records LIMIT 0").fetchall()
    except sqlite3.Error as exc:
        conn.close()
        raise _db_problem(db, exc) from None
    return conn


def _hasher(args: argparse.Namespace, key: Path | None, option: str = "--key") -> KeyedHasher:
    from hybridroute.router.audit.codec import KeyedHasher

    if key is None:
        db = args.db or (Path(p) if (p := _stack_audit(args).get("db")) else None)
        if db is None:
            raise UsageError(
                f"give {option} FILE (the trail's HMAC key), --db FILE (the key beside it) or "
                "--stack FILE of `hybridroute up`"
            )
        key = db.parent / "audit-hmac.key"
    try:
        return KeyedHasher.from_file(key)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _time(text: str | None, what: str) -> int | None:
    from hybridroute.router.audit.query import parse_time

    if text is None:
        return None
    try:
        return parse_time(text)
    except ValueError as exc:
        raise UsageError(f"{what}: {exc}") from None


# --- subcommands ----------------------------------------------------------------------


def _verify(args: argparse.Namespace) -> int:
    from hybridroute.router.audit.verify import verify

    key = _verify_keys(args)
    conn = _open(args)
    try:
        report = verify(conn, key)
    finally:
        conn.close()
    if args.json:
        print(json.dumps(_report_dict(report), sort_keys=True))
    else:
        print("\n".join(_report_lines(report, _db(args))))
    return 0 if report.ok else 1


def _query(args: argparse.Namespace) -> int:
    from hybridroute.router.audit.query import Filters, count, csv_lines, rows, table

    filters, hasher = _filters(args)
    limit = args.limit if args.limit is not None else (50 if args.format == "table" else 0)
    conn = _open(args)
    try:
        if hasher is not None:
            _trail_key(conn, args, hasher, filters)
        found = 0

        def counted() -> Iterator[dict[str, object]]:
            nonlocal found
            for record in rows(conn, filters, last=limit or None):
                found += 1
                yield record

        if args.format == "json":
            for record in counted():
                print(json.dumps(record, sort_keys=True))
        elif args.format == "csv":
            sys.stdout.writelines(csv_lines(counted()))
        elif matches := list(counted()):
            print(table(matches))
            total = count(conn, filters)
            if limit and total > limit:
                print(f"(the last {limit} of {total} matching records; --limit 0 for all)")
        if not found:  # said on stderr: stdout stays what a script parses (empty, or CSV's header)
            stored = count(conn, Filters())
            print(
                f"no records match the filters ({_db(args)} holds {stored})"
                if stored
                else f"no records: the audit trail {_db(args)} is empty",
                file=sys.stderr,
            )
    finally:
        conn.close()
    return 0


def _filters(args: argparse.Namespace) -> tuple[Filters, KeyedHasher | None]:
    """The filters, and the HMAC key they use (None: no key needed, or none found for
    names only)."""
    from hybridroute.router.audit.query import Filters

    equals = {name: getattr(args, name) for name in _FILTERS if getattr(args, name)}
    hasher: KeyedHasher | None = None
    if args.session or args.client_request_id:
        hasher = _hasher(args, args.hmac_key, "--hmac-key")
        if args.session:
            equals["session"] = hasher.digest(args.session)
        if args.client_request_id:
            equals["client_request_id"] = hasher.digest(args.client_request_id)
    elif any(name in equals for name in _NAMES) and (
        args.hmac_key is not None or _beside_db(args).is_file()
    ):
        hasher = _hasher(args, args.hmac_key, "--hmac-key")
    hashed = {}
    if hasher is not None:  # a name with unusual characters is stored as its keyed hash
        hashed = {name: hasher.digest(equals[name]) for name in _NAMES if name in equals}
    sensitive = None if args.sensitive is None else args.sensitive == "yes"
    filters = Filters(
        since_us=_time(args.since, "--since"),
        until_us=_time(args.until, "--until"),
        kinds=tuple(args.kind or ()),
        sensitive=sensitive,
        equals=equals,
        hashed=hashed,
        policy=args.policy,
    )
    return filters, hasher


def _beside_db(args: argparse.Namespace) -> Path:
    db = args.db or (Path(p) if (p := _stack_audit(args).get("db")) else None)
    return (db.parent if db is not None else Path()) / "audit-hmac.key"


def _trail_key(
    conn: sqlite3.Connection, args: argparse.Namespace, hasher: KeyedHasher, filters: Filters
) -> None:
    """A key that is not the trail's makes every keyed hash match nothing, silently:
    refuse it for ids (exit 2); for names, match their plain form only and say so."""
    stated = _trail_hmac_key_ids(conn)
    if not stated or hasher.key_id in stated:
        return
    where = args.hmac_key or _beside_db(args)
    what = f"key id {', '.join(stated)}" if len(stated) > 1 else f"key id {stated[0]}"
    problem = (
        f"the HMAC key {where} (key id {hasher.key_id}) is not this trail's ({what}, in its "
        "audit.created and router.start records)"
    )
    if args.session or args.client_request_id:
        raise UsageError(
            f"{problem}: --session/--client-request-id would match nothing; give the "
            "trail's key with --hmac-key FILE"
        )
    filters.hashed = {}
    print(f"{problem}: matching model names as written only", file=sys.stderr)


def _trail_hmac_key_ids(conn: sqlite3.Connection) -> list[str]:
    """The HMAC key ids the trail states (audit.created, each router.start), newest
    first; empty when its records that say so were pruned."""
    found: list[str] = []
    rows = conn.execute(
        "SELECT coalesce(json_extract(body, '$.hmac_key_id'), "
        "json_extract(body, '$.audit.hmac_key_id')) FROM records "
        "WHERE kind != 'request' AND kind IN ('audit.created', 'router.start') "
        "AND json_valid(body) ORDER BY seq DESC"
    )
    for (value,) in rows:
        if isinstance(value, str) and value not in found:
            found.append(value)
    return found


def _stats(args: argparse.Namespace) -> int:
    from hybridroute.router.audit.query import Filters, stats, stats_table

    filters = Filters(since_us=_time(args.since, "--since"), until_us=_time(args.until, "--until"))
    conn = _open(args)
    try:
        data = stats(conn, filters)
    finally:
        conn.close()
    if args.format == "json":
        print(json.dumps(data.to_dict(), sort_keys=True))
    else:
        print(stats_table(data))
    return 0


def _export(args: argparse.Namespace) -> int:
    from hybridroute.router.audit.query import Filters, rows

    filters = Filters(since_us=_time(args.since, "--since"), until_us=_time(args.until, "--until"))
    conn = _open(args)
    try:
        lines = (json.dumps(r, sort_keys=True) + "\n" for r in rows(conn, filters))
        if args.output is None:
            sys.stdout.writelines(lines)
            return 0
        try:
            with open(args.output, "w") as out:
                out.writelines(lines)
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise UsageError(f"cannot write {args.output}: {why}") from None
    finally:
        conn.close()
    return 0


def _prune(args: argparse.Namespace) -> int:
    from hybridroute.router.audit.query import format_time
    from hybridroute.router.audit.verify import WouldRemoveAll, prune

    before = _time(args.before, "--before")
    assert before is not None
    if before > time.time_ns() // 1000:
        raise UsageError(
            f"--before {args.before} is {format_time(before)}, in the future: prune removes "
            "every record sealed before that time, so a time to come would remove all of "
            "them; give a past time (an ISO date, unix seconds, or an age like 90d)"
        )
    key = _verify_keys(args)
    conn = _open(args, write=True)
    try:
        result = prune(conn, key, before, remove_all=args.yes)
    except WouldRemoveAll as exc:
        raise UsageError(
            f"--before {args.before} ({format_time(before)}) would remove every record "
            f"({exc.removed}, through seq {exc.through_seq}), leaving only the last "
            "checkpoint; add --yes if that is what you want"
        ) from None
    except ValueError as exc:
        print(f"prune refused: {exc}; run `hybridroute audit verify`", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:
        problem = _db_problem(_db(args), exc)
        raise UsageError(f"cannot prune: {problem}") from None
    finally:
        conn.close()
    if not result.through_seq:
        print(f"nothing to prune: no checkpoint sealed before {format_time(before)}")
    else:
        print(
            f"pruned {result.removed} records (through seq {result.through_seq}, the last "
            f"checkpoint before {format_time(before)}); the trail now starts at seq "
            f"{result.kept_from} and still verifies from that checkpoint"
        )
    return 0


def _hash(args: argparse.Namespace) -> int:
    print(_hasher(args, args.key).digest(args.value))
    return 0


# --- the verify report ----------------------------------------------------------------


def _report_dict(report: Report) -> dict[str, object]:
    return {
        "ok": report.ok,
        "chain": report.chain,
        "records": report.records,
        "first_seq": report.first_seq,
        "last_seq": report.last_seq,
        "checkpoints": report.checkpoints,
        "sealed_through": report.sealed_seq,
        "unsealed": report.unsealed,
        "checkpoint_every": report.checkpoint_every or None,
        "key_id": report.key_id,
        "starts_after": report.starts_after or None,
        "prunes": [
            {
                "through_seq": p.through_seq,
                "records": p.records,
                "before_us": p.before_us,
                "pruned_at_us": p.pruned_at_us,
            }
            for p in report.prunes
        ],
        "problems": [{"seq": p.seq, "kind": p.kind, "message": p.message} for p in report.problems],
    }


def _report_lines(report: Report, db: Path) -> Iterator[str]:
    from hybridroute.router.audit.query import format_time

    def when(time_us: int | None) -> str:
        return "?" if time_us is None else format_time(time_us)

    yield f"audit trail {db} (chain {report.chain or '?'})"
    span = "no records"
    if report.records:
        span = (
            f"seq {report.first_seq}..{report.last_seq} ({report.records} records), "
            f"{format_time(report.first_time_us)} .. {format_time(report.last_time_us)}"
        )
    yield f"  records      {span}"
    yield (
        f"  checkpoints  {report.checkpoints}, sealed through seq {report.sealed_seq}, "
        f"verified with key {report.key_id}"
    )
    for p in report.prunes:
        count = "?" if p.records is None else p.records
        yield (
            f"  pruned       at {when(p.pruned_at_us)}: {count} records through seq "
            f"{p.through_seq}, sealed before {when(p.before_us)}"
        )
    if report.starts_after:
        yield f"  starts after {report.starts_after}"
    if report.unsealed:
        bound = (
            f" (its router seals every {report.checkpoint_every})"
            if report.checkpoint_every
            else ""
        )
        yield (
            f"  unsealed     {report.unsealed} records (seq "
            f"{report.last_seq - report.unsealed + 1}..{report.last_seq}) are not yet covered "
            f"by a signature{bound}: they link, but nothing proves the tail complete; a "
            "running router seals them within its checkpoint_ms, a stopped router's trail "
            "has none"
        )
    if report.ok:
        yield "OK: every record links and every checkpoint verifies"
        return
    first = report.first()
    assert first is not None
    where = f" at seq {first.seq}" if first.seq else ""
    yield f"FAILED: {first.kind}{where} ({len(report.problems)} problems)"
    for problem in report.problems[:50]:
        at = f"seq {problem.seq}" if problem.seq else "database"
        yield f"  {at:<12} {problem.kind:<10} {problem.message}"
    if len(report.problems) > 50:
        yield f"  ... and {len(report.problems) - 50} more (--json lists all)"
