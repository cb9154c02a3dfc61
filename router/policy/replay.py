"""`policy replay NEW --db AUDIT`: how recorded traffic would be routed under NEW.

The audit trail keeps facts, never payloads: caller and how it authenticated, model
and version, the normalised label, detector names with counts, doubts (unreadable or
oversized text, detector errors) and whether the session was pinned. Replay rebuilds
each decided request from those facts and runs the router's own `engine.decide` under
NEW. The scan is not rerun (there is no text): a stand-in scanner reports exactly the
recorded findings and doubts, so everything after the scan is the real engine.

What follows from replaying facts, and is printed with every report:

- a detector NEW adds cannot fire on past requests; findings of detectors NEW does not
  enable are dropped (NEW would not have found them), and counted;
- rules matching `metadata` or `parameters` see neither (not recorded);
- a model name the trail stored as a keyed hash matches no `model:` glob;
- the session pin is as recorded (pins NEW would create or not are not re-simulated).

The source of records is a small interface (`DecisionSource`: an iterable of
`RecordedDecision`), so replay does not depend on how a trail is stored;
`AuditDbSource` reads the SQLite audit database (`audit.db`'s `records` table).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from hybridroute.router.policy.conditions import MetadataCondition, ParameterCondition
from hybridroute.router.policy.detectors import Finding, Scanner
from hybridroute.router.policy.engine import Decision, RequestFacts, TextField, decide
from hybridroute.router.policy.schema import Policy
from hybridroute.router.policy.sessions import SessionPins

__all__ = [
    "AuditDbSource",
    "DecisionSource",
    "Move",
    "RecordedDecision",
    "ReplayReport",
    "parse_time",
    "redecide",
    "replay",
    "report_dict",
    "report_lines",
    "run_replay",
]

_DOUBTS = ("unreadable", "text-too-large", "scan-error")
_HASHED = "hmac-sha256:"


@dataclass(frozen=True)
class RecordedDecision:
    """What the trail recorded about one decided request (no payload, no secrets)."""

    ref: str  # how to find the record again, e.g. "seq 1234"
    time: float  # unix seconds
    caller: str | None
    auth: str
    model: str
    model_version: str
    label: str  # normalised: public..restricted, none, invalid
    findings: Mapping[str, int]
    doubts: tuple[str, ...]  # of _DOUBTS
    session_pinned: bool
    outcome: str  # routed | denied | rejected
    route: str | None  # as decided (not a fallback that served it)
    zone: str | None  # as decided
    rule: str
    policy_hash: str
    reached_cloud: bool = False  # any attempt (a fallback, a retry) went to the cloud


class DecisionSource(Protocol):
    """Anything that yields recorded decisions in time order."""

    def decisions(
        self, since: float | None = None, until: float | None = None
    ) -> Iterator[RecordedDecision]: ...


# --- the SQLite audit database ------------------------------------------------------------


class AuditDbSource:
    """Decided requests from an audit database (read-only; undecided records, such as
    unauthenticated calls, are counted in `undecided` and skipped)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.undecided = 0

    def decisions(
        self, since: float | None = None, until: float | None = None
    ) -> Iterator[RecordedDecision]:
        from hybridroute.router.audit.db import connect_readonly

        conn = connect_readonly(self.path)
        try:
            query = "SELECT seq, body FROM records WHERE kind = 'request'"
            bounds: list[int] = []
            if since is not None:
                query, bounds = query + " AND time_us >= ?", [*bounds, int(since * 1e6)]
            if until is not None:
                query, bounds = query + " AND time_us < ?", [*bounds, int(until * 1e6)]
            for seq, body in conn.execute(query + " ORDER BY seq", bounds):
                found = _from_body(int(seq), json.loads(body))
                if found is None:
                    self.undecided += 1
                else:
                    yield found
        finally:
            conn.close()


def _from_body(seq: int, body: dict[str, Any]) -> RecordedDecision | None:
    """A record body as `audit.codec.event_body` writes it (empty values left out)."""
    if not body.get("rule") or not body.get("policy"):
        return None  # refused before the policy decided anything
    reasons = [str(r) for r in body.get("reasons", [])]
    decided: dict[str, Any] = body["decided"] if isinstance(body.get("decided"), dict) else {}
    earlier: list[Any] = body["earlier"] if isinstance(body.get("earlier"), list) else []
    zones = {body.get("zone"), decided.get("zone")}
    zones |= {e.get("zone") for e in earlier if isinstance(e, dict)}
    return RecordedDecision(
        ref=f"seq {seq}",
        time=int(body.get("time_us", 0)) / 1e6,
        caller=body.get("caller"),
        auth=str(body.get("auth", "none")),
        model=str(body.get("model", "")),
        model_version=str(body.get("model_version", "")),
        label=str(body.get("label", "none")),
        findings={str(k): int(v) for k, v in body.get("findings", {}).items()},
        doubts=tuple(d for d in _DOUBTS if d in reasons),
        session_pinned="session-pinned" in reasons,
        outcome=str(body.get("outcome", "")),
        route=decided.get("route", body.get("route")),
        zone=decided.get("zone", body.get("zone")),
        rule=str(body["rule"]),
        policy_hash=str(body["policy"]),
        reached_cloud="cloud" in zones,
    )


# --- re-deciding --------------------------------------------------------------------------


class _RecordedScan:
    """Stands in for the detectors: reports the recorded findings for the text "f" and
    fails on the text "e" (a recorded detector error); it never sees request text."""

    name = "recorded"

    def __init__(self, findings: Mapping[str, int]) -> None:
        self._findings = findings

    def find(self, text: str) -> Iterator[Finding]:
        if text == "e":
            raise RuntimeError("recorded detector error")
        if text == "f":
            for detector, count in self._findings.items():
                yield from (Finding(detector, i, i + 1) for i in range(count))


def _facts(policy: Policy, record: RecordedDecision) -> tuple[Policy, RequestFacts]:
    """The record as engine input, with a policy whose scanner replays the record."""
    findings = {d: n for d, n in record.findings.items() if d in policy.detectors and n > 0}
    texts = [TextField("audit:findings", "f")] if findings else []
    if "text-too-large" in record.doubts:
        texts.append(TextField("audit:oversized", "oo"))  # longer than max_chars below
    if "scan-error" in record.doubts:
        texts.append(TextField("audit:scan-error", "e"))
    if "unreadable" in record.doubts:
        texts.append(TextField("audit:unreadable", None))
    scanner = Scanner([_RecordedScan(findings)], max_chars=1)
    replaying = dataclasses.replace(policy, scanner=scanner, max_text_bytes=1 << 30)
    facts = RequestFacts(
        caller=record.caller,
        auth=record.auth,
        model=record.model,
        model_version=record.model_version,
        label=None if record.label == "none" else record.label,
        session_id="replayed-session" if record.session_pinned else None,
        texts=tuple(texts),
    )
    return replaying, facts


def redecide(policy: Policy, record: RecordedDecision) -> Decision:
    """The decision NEW makes for the recorded facts."""
    replaying, facts = _facts(policy, record)
    sessions = SessionPins(policy.sessions.pin_ttl, 1)
    if record.session_pinned:
        sessions.pin("replayed-session", 0.0)
    return decide(replaying, facts, sessions, now=0.0)


def place(outcome: str, route: str | None, zone: str | None) -> str:
    """Where a decision sent the request: `route/zone`, or `deny`."""
    if outcome in ("deny", "denied") or route is None:
        return "deny"
    return f"{route}/{zone or '?'}"


@dataclass(frozen=True)
class Move:
    record: RecordedDecision
    new: Decision

    @property
    def old_place(self) -> str:
        return place(self.record.outcome, self.record.route, self.record.zone)

    @property
    def new_place(self) -> str:
        return place(self.new.action, self.new.route, self.new.zone)

    @property
    def newly_cloud(self) -> bool:
        """The new policy sends it to the cloud, and nothing of it went there before."""
        return (
            self.new.zone == "cloud"
            and self.record.zone != "cloud"
            and not self.record.reached_cloud
        )


@dataclass
class ReplayReport:
    policy: Policy
    replayed: int = 0
    moves: Counter[tuple[str, str]] = field(default_factory=Counter)
    newly_cloud: list[Move] = field(default_factory=list)
    changed: list[Move] = field(default_factory=list)  # other changes of place
    dropped: Counter[str] = field(default_factory=Counter)  # detector -> records
    hashed_models: int = 0
    policies: Counter[str] = field(default_factory=Counter)  # old policy hash -> records

    def add(self, record: RecordedDecision, new: Decision) -> None:
        move = Move(record, new)
        self.replayed += 1
        self.moves[(move.old_place, move.new_place)] += 1
        self.policies[record.policy_hash] += 1
        if move.newly_cloud:
            self.newly_cloud.append(move)
        elif move.old_place != move.new_place:
            self.changed.append(move)
        self.dropped.update(d for d in record.findings if d not in self.policy.detectors)
        self.hashed_models += record.model.startswith(_HASHED)


def replay(policy: Policy, records: Iterable[RecordedDecision]) -> ReplayReport:
    """Re-decide every record under `policy` and tally where each would go."""
    report = ReplayReport(policy)
    engine_log = logging.getLogger("hybridroute.router.policy.engine")
    with _quiet(engine_log):  # recorded detector errors and guard overrides are expected
        for record in records:
            report.add(record, redecide(policy, record))
    return report


@contextlib.contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    level = logger.level
    logger.setLevel(logging.ERROR + 10)
    try:
        yield
    finally:
        logger.setLevel(level)


def unrecorded_conditions(policy: Policy) -> list[str]:
    """Rules of `policy` that test request facts the trail does not keep."""
    return [
        r.id
        for r in policy.rules
        if any(isinstance(c, MetadataCondition | ParameterCondition) for c in r.conditions)
    ]


# --- the report -------------------------------------------------------------------------


def _when(ts: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


def _move_line(move: Move) -> str:
    r = move.record
    findings = ", ".join(f"{d} x{n}" for d, n in sorted(r.findings.items())) or "none"
    extra = "".join(f", {d}" for d in r.doubts) + (", session pinned" if r.session_pinned else "")
    return (
        f"    {_when(r.time)}Z  {r.ref}  caller {r.caller or '(none)'} ({r.auth})  "
        f"model {r.model or '-'}  label {r.label}  findings {findings}{extra}\n"
        f"      {move.old_place} by {r.rule} -> {move.new_place} by {move.new.rule_id}"
    )


def report_lines(report: ReplayReport, limit: int) -> list[str]:
    """The text report: newly-cloud requests first, then the move table, then caveats."""
    lines = [
        f"replayed {report.replayed} decisions under {report.policy.source} "
        f"(sha256 {report.policy.version_hash[:12]})",
        "decided originally under: "
        + (", ".join(f"{h[:12]} ({n})" for h, n in report.policies.most_common()) or "-"),
        "",
        f"NEWLY TO THE CLOUD: {len(report.newly_cloud)}",
        *(_move_line(m) for m in report.newly_cloud[:limit]),
    ]
    if len(report.newly_cloud) > limit:
        lines.append(f"    ... and {len(report.newly_cloud) - limit} more")
    lines += ["", "old route/zone -> new route/zone: requests"]
    width = max([len(f"{a} -> {b}") for a, b in report.moves] or [0])
    for (old, new), count in sorted(
        report.moves.items(), key=lambda kv: (kv[0][0] == kv[0][1], -kv[1])
    ):
        tag = "  NEWLY CLOUD" if new.endswith("/cloud") and not old.endswith("/cloud") else ""
        tag = tag or ("  (unchanged)" if old == new else "")
        lines.append(f"  {f'{old} -> {new}'.ljust(width)}  {count:>7}{tag}")
    if report.changed:
        lines += ["", f"other changes of route: {len(report.changed)}"]
        lines += [_move_line(m) for m in report.changed[:limit]]
        if len(report.changed) > limit:
            lines.append(f"    ... and {len(report.changed) - limit} more")
    return [*lines, "", *caveat_lines(report)]


def caveat_lines(report: ReplayReport) -> list[str]:
    lines = ["replayed from recorded facts (no payloads are kept), so:"]
    lines.append("  - detectors are not rerun: a detector NEW adds cannot fire on past requests")
    for detector, n in sorted(report.dropped.items()):
        lines.append(f"  - {n} record(s) had {detector} findings; NEW does not enable {detector}")
    if rules := unrecorded_conditions(report.policy):
        lines.append(f"  - rules {', '.join(rules)} test metadata/parameters: not recorded")
    if report.hashed_models:
        lines.append(f"  - {report.hashed_models} records keep the model name as a keyed hash")
    lines.append("  - session pins are as recorded")
    return lines


def report_dict(report: ReplayReport, limit: int) -> dict[str, Any]:
    def move(m: Move) -> dict[str, Any]:
        r = m.record
        return {
            "ref": r.ref, "time": r.time, "caller": r.caller, "auth": r.auth, "model": r.model,
            "label": r.label, "findings": dict(r.findings), "doubts": list(r.doubts),
            "session_pinned": r.session_pinned, "old": m.old_place, "old_rule": r.rule,
            "new": m.new_place, "new_rule": m.new.rule_id,
        }  # fmt: skip

    return {
        "policy": {"path": report.policy.source, "version_hash": report.policy.version_hash},
        "replayed": report.replayed,
        "moves": [{"old": a, "new": b, "count": n} for (a, b), n in report.moves.items()],
        "newly_cloud": [move(m) for m in report.newly_cloud[:limit]],
        "newly_cloud_total": len(report.newly_cloud),
        "changed": [move(m) for m in report.changed[:limit]],
        "changed_total": len(report.changed),
        "dropped_findings": dict(report.dropped),
    }


_AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_AGE_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, now: float, option: str) -> float:
    """An age (`90m`, `24h`, `7d`: that long before `now`) or an ISO 8601 time; a time
    without a zone is UTC, like the times in the report."""
    from hybridroute.cli import UsageError

    if found := _AGE.match(text.strip()):
        return now - float(found[1]) * _AGE_SECONDS[found[2]]
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(
            f"{option} {text!r}: give an age (90m, 24h, 7d) or an ISO 8601 time "
            "(2025-01-31, 2025-01-31T08:00:00Z)"
        ) from None
    return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()


def run_replay(args: Any) -> int:
    """Handler of `hybridroute policy replay` (parser in `policy.cli`)."""
    import sqlite3
    import time

    from hybridroute.cli import UsageError
    from hybridroute.router.policy.cli import EXIT_FAILED, EXIT_OK, load_policy_or_report

    policy = load_policy_or_report(args.policy)
    if policy is None:
        return EXIT_FAILED
    now = time.time()
    since = parse_time(args.since, now, "--since") if args.since else None
    until = parse_time(args.until, now, "--until") if args.until else None
    source = AuditDbSource(args.db)
    try:
        report = replay(policy, source.decisions(since, until))
    except (OSError, sqlite3.Error, ValueError) as exc:
        raise UsageError(f"cannot read the audit database {args.db}: {exc}") from None
    if args.json:
        print(json.dumps({**report_dict(report, args.limit), "undecided": source.undecided}))
    else:
        print("\n".join(report_lines(report, args.limit)))
        if source.undecided:
            print(f"({source.undecided} records refused before any decision were skipped)")
    return EXIT_FAILED if args.fail_on_cloud and report.newly_cloud else EXIT_OK
