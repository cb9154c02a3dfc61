"""The decision engine: request facts in, routing decision (with its trace) out.

Pure Python on purpose: the gRPC layer turns a request into `RequestFacts`, the
`policy` commands turn a test case into the same thing (`cases.facts_from_case`), and
both get the very same `decide()`. Order of work, as in the architecture's data flow:

1. the sensitivity verdict, before any rule: label, detector findings, unreadable or
   oversized text, detector errors, unknown caller, pinned session. Each cause is a
   reason string; the verdict is "sensitive" when there is at least one;
2. the rules, in order, first match wins (a matching rule may add `rule:<id>`); a
   request no rule matches is doubt, and doubt is sensitive (invariant 2): reason
   `unmatched`, and it goes to the policy's `default_route`;
3. the runtime guard: a sensitive request whose chosen route is not on-prem goes to the
   policy's `sensitive_route` instead (or is denied if that is not on-prem either), and
   its fallbacks stay on-prem. The load-time checks in `policy/checks.py` should make
   this unreachable; it is here so no policy object, however built, can send
   sensitive data or an unmatched request to the cloud;
4. a sensitive request that was routed pins its session. Not a denied one (its data
   went nowhere) and not one from an unknown caller (all its requests are sensitive
   anyway): otherwise anyone could flood the bounded pin store and evict live pins.

No value taken from the request is ever copied into a `Decision`, its reasons, its
trace or a log line: only detector names, counts and positions, and values from
closed vocabularies (labels, auth kinds, booleans).

This module holds the vocabularies, the facts, the decision and `decide` itself: the
per-request path. The compiled `match:` conditions are in `conditions` (built once per
policy load) and the test-case files that drive `decide` offline are in `cases`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal, NamedTuple, get_args

from hybridroute.router.policy.detectors import TextTooLarge

if TYPE_CHECKING:
    from hybridroute.router.policy.schema import Policy, Rule
    from hybridroute.router.policy.sessions import SessionPins

__all__ = [
    "AUTH_KINDS",
    "LABELS",
    "LABEL_KEYS",
    "SENSITIVE_LABELS",
    "AuthKind",
    "Decision",
    "DetectorHit",
    "LabelKey",
    "RequestFacts",
    "RuleTrace",
    "Subject",
    "TextField",
    "decide",
    "label_key",
    "metadata_text_fields",
]

log = logging.getLogger(__name__)

LABELS = ("public", "internal", "confidential", "restricted")
SENSITIVE_LABELS = frozenset({"internal", "confidential", "restricted"})
# What a rule's `label:` can name: the four labels, "none" (no header) and "invalid".
LabelKey = Literal["public", "internal", "confidential", "restricted", "none", "invalid"]
LABEL_KEYS: tuple[str, ...] = get_args(LabelKey)
AuthKind = Literal["cert", "token", "none"]
AUTH_KINDS: tuple[str, ...] = get_args(AuthKind)

# Metadata that is transport or routing control rather than content: not scanned.
_UNSCANNED_METADATA = frozenset(
    {"authorization", "x-data-classification", "content-type", "te", "user-agent"}
)


# --- facts and decisions ---------------------------------------------------------------


@dataclass(frozen=True)
class TextField:
    """One piece of request text to scan. `text=None`: present but unreadable."""

    source: str  # e.g. "input:text[3]", "parameter:note", "metadata:x-note"
    text: str | None


@dataclass(frozen=True)
class RequestFacts:
    """What the engine knows about one request; built by the router or from a case."""

    caller: str | None
    auth: str  # "cert" | "token" | "none"
    model: str
    model_version: str = ""
    label: str | None = None  # raw x-data-classification value, None when absent
    session_id: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    parameters: Mapping[str, object] = field(default_factory=dict)
    texts: Sequence[TextField] = ()
    problems: Sequence[str] = ()  # parse problems; any makes the request sensitive
    too_large: bool = False  # more text than the scan budget: not scanned, sensitive


def metadata_text_fields(metadata: Mapping[str, str]) -> list[TextField]:
    """The metadata values that are content (and so scanned), as text fields.

    Transport headers, binary (`-bin`) headers, the classification label and the
    caller's credentials are not content; everything else, x-session-id included, may
    be forwarded upstream, so it is scanned like any input text.
    """
    return [
        TextField(f"metadata:{name}", value)
        for name, value in metadata.items()
        if name not in _UNSCANNED_METADATA
        and not name.startswith((":", "grpc-"))
        and not name.endswith("-bin")
    ]


class RuleTrace(NamedTuple):
    """One rule's outcome for one request: matched, or the first condition that failed.

    (A named tuple rather than a dataclass: one is built per rule per request.)
    """

    rule_id: str
    matched: bool
    why_not: str | None  # None when matched
    evaluated: bool = True  # False for rules after the one that decided


class DetectorHit(NamedTuple):
    """Where a detector fired; positions only, never the text."""

    detector: str
    source: str
    start: int
    end: int


@dataclass(frozen=True)
class Decision:
    """The routing decision for one request, with everything the audit and explain need."""

    action: Literal["route", "deny"]
    route: str | None
    zone: str | None
    pool: str | None
    rule_id: str  # the deciding rule, "default" or "guard"
    sensitive: bool
    # why it is sensitive ("label:internal", "detector:email", "unreadable",
    # "text-too-large", "scan-error", "unknown-caller", "session-pinned", "rule:<id>",
    # "unmatched"), plus "guard:<rule id>" when the runtime guard overrode that rule's
    # route
    reasons: tuple[str, ...]
    findings: Mapping[str, int]  # detector name -> count
    fallbacks: tuple[str, ...]  # routes to try in order when `route` has no healthy endpoint
    policy_hash: str
    trace: tuple[RuleTrace, ...]
    detector_hits: tuple[DetectorHit, ...]

    @property
    def onprem_only(self) -> bool:
        """May reach on-prem endpoints only: what the forwarder's and the shadows' zone
        guards hold a request to. Every sensitive request, an unmatched one included."""
        return self.sensitive

    @property
    def fallback(self) -> str | None:
        """The first fallback route, if any (the chain is already zone-filtered)."""
        return self.fallbacks[0] if self.fallbacks else None


# --- what rules see (the conditions that test it are in `conditions`) ------------------


@dataclass(slots=True)
class Subject:
    """A request as the rules see it: derived facts, computed once per request."""

    caller: str | None
    caller_known: bool
    auth: str
    model: str
    model_version: str
    label: str  # one of LABEL_KEYS
    detected: frozenset[str]
    sensitive: bool  # the verdict before rules
    session_pinned: bool
    metadata: Mapping[str, str]
    parameters: Mapping[str, object]


def label_key(raw: str | None) -> str:
    """Normalise an x-data-classification value to one of LABEL_KEYS."""
    if raw is None:
        return "none"
    value = raw.strip().lower()
    return value if value in LABELS else "invalid"


# --- deciding ----------------------------------------------------------------------


@dataclass(slots=True)
class _Scan:
    counts: dict[str, int] = field(default_factory=dict)
    hits: list[DetectorHit] = field(default_factory=list)
    doubts: list[str] = field(default_factory=list)


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _scan(policy: Policy, texts: Sequence[TextField], too_large: bool = False) -> _Scan:
    """Run the detectors once over each text. Anything unscannable becomes a doubt."""
    out = _Scan()
    if too_large:
        out.doubts.append("text-too-large")  # not scanned at all: bounded cost
        return out
    readable = [(t.source, t.text) for t in texts if t.text]
    if any(t.text is None for t in texts):
        out.doubts.append("unreadable")
    if sum(_utf8_len(text) for _, text in readable) > policy.max_text_bytes:
        out.doubts.append("text-too-large")  # not scanned at all: bounded cost
        return out
    for source, text in readable:
        try:
            findings = policy.scanner.scan(text)
        except TextTooLarge:
            out.doubts.append("text-too-large")
            continue
        except Exception as exc:  # a detector error is doubt, never "clean"
            log.warning("detector error on %s: %s", source, type(exc).__name__)
            out.doubts.append("scan-error")
            continue
        for f in findings:
            out.counts[f.detector] = out.counts.get(f.detector, 0) + 1
            out.hits.append(DetectorHit(f.detector, source, f.start, f.end))
    return out


def _verdict(
    policy: Policy, facts: RequestFacts, scan: _Scan, pinned: bool
) -> tuple[list[str], str, bool]:
    """Reasons the request is sensitive before any rule (empty list: not sensitive)."""
    reasons: list[str] = []
    caller_known = facts.caller is not None and facts.caller in policy.callers
    if not caller_known:
        reasons.append("unknown-caller")
    label = label_key(facts.label)
    if label in SENSITIVE_LABELS or label == "invalid":
        reasons.append(f"label:{label}")
    if facts.problems and "unreadable" not in scan.doubts:
        reasons.append("unreadable")
    reasons.extend(dict.fromkeys(scan.doubts))
    reasons.extend(f"detector:{name}" for name in sorted(scan.counts))
    if pinned:
        reasons.append("session-pinned")
    return reasons, label, caller_known


def _first_match(rules: Sequence[Rule], subject: Subject) -> tuple[Rule | None, list[RuleTrace]]:
    trace: list[RuleTrace] = []
    for position, rule in enumerate(rules):
        why = None
        for condition in rule.conditions:
            if (why := condition.why_not(subject)) is not None:
                break
        if why is None:
            trace.append(RuleTrace(rule.id, True, None))
            skipped = f"not evaluated: rule '{rule.id}' matched first"
            trace.extend(RuleTrace(r.id, False, skipped, False) for r in rules[position + 1 :])
            return rule, trace
        trace.append(RuleTrace(rule.id, False, why))
    return None, trace


def _guard(
    policy: Policy, route: str, zone: str | None, rule_id: str, reasons: list[str]
) -> str | None:
    """The runtime guard: `route` is not on-prem; where the request goes instead."""
    log.warning(
        "guard: rule %r sent a sensitive or unmatched request to route %r (zone %r); "
        "using %r instead",
        rule_id,
        route,
        zone,
        policy.sensitive_route,
    )
    reasons.append(f"guard:{rule_id}")
    if policy.zone_of(policy.sensitive_route) == "onprem":
        return policy.sensitive_route
    log.error("guard: sensitive_route %r is not on-prem; denying", policy.sensitive_route)
    return None


def _fallbacks(policy: Policy, route: str, onprem_only: bool) -> tuple[str, ...]:
    """The fallback chain of `route`, cut at the first hop the request may not take."""
    chain: list[str] = []
    current = policy.routes[route].fallback if route in policy.routes else None
    while current is not None and current not in chain and current != route:
        zone = policy.zone_of(current)
        if zone is None or (onprem_only and zone != "onprem"):
            break
        chain.append(current)
        current = policy.routes[current].fallback
    return tuple(chain)


def decide(
    policy: Policy,
    facts: RequestFacts,
    sessions: SessionPins | None = None,
    *,
    now: float | None = None,
) -> Decision:
    """Decide where one request goes. Pure, apart from pinning a sensitive session.

    `now` is on the same clock as `sessions` (default: `time.monotonic()`).
    """
    now = time.monotonic() if now is None else now
    scan = _scan(policy, facts.texts, facts.too_large)
    session = facts.session_id
    pinned = bool(sessions is not None and session and sessions.is_pinned(session, now))
    reasons, label, caller_known = _verdict(policy, facts, scan, pinned)
    subject = Subject(
        caller=facts.caller,
        caller_known=caller_known,
        auth=facts.auth,
        model=facts.model,
        model_version=facts.model_version,
        label=label,
        detected=frozenset(scan.counts),
        sensitive=bool(reasons),
        session_pinned=pinned,
        metadata=facts.metadata,
        parameters=facts.parameters,
    )
    rule, trace = _first_match(policy.rules, subject)
    rule_id = "default" if rule is None else rule.id
    route: str | None = policy.default_route if rule is None else rule.route
    if rule is None:
        reasons.append("unmatched")  # doubt is sensitive (invariant 2)
    elif rule.marks_sensitive:
        reasons.append(f"rule:{rule.id}")
    sensitive = bool(reasons)
    zone = policy.zone_of(route) if route is not None else None
    if route is not None and zone != "onprem" and (sensitive or zone is None):
        route, rule_id = _guard(policy, route, zone, rule_id, reasons), "guard"
        zone = "onprem" if route is not None else None
    if sensitive and session and sessions is not None and route is not None and caller_known:
        sessions.pin(session, now)  # see point 4 of the module docstring
    return Decision(
        action="route" if route is not None else "deny",
        route=route,
        zone=zone,
        pool=policy.routes[route].pool if route is not None else None,
        rule_id=rule_id,
        sensitive=sensitive,
        reasons=tuple(reasons),
        findings=MappingProxyType(scan.counts),
        fallbacks=_fallbacks(policy, route, sensitive) if route is not None else (),
        policy_hash=policy.version_hash,
        trace=tuple(trace),
        detector_hits=tuple(scan.hits),
    )
