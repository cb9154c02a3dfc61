"""The decision engine: request facts in, routing decision (with its trace) out.

Pure Python on purpose: the gRPC layer turns a request into `RequestFacts`, the
`policy` commands turn a test case into the same thing (`facts_from_case`), and both
get the very same `decide()`. Order of work, as in the architecture's data flow:

1. the sensitivity verdict, before any rule: label, detector findings, unreadable or
   oversized text, detector errors, unknown caller, pinned session. Each cause is a
   reason string; the verdict is "sensitive" when there is at least one;
2. the rules, in order, first match wins (a matching rule may add `rule:<id>`);
3. the runtime guard: a sensitive request whose chosen route is not on-prem goes to the
   policy's `sensitive_route` instead (or is denied if that is not on-prem either).
   The load-time guard in `policy.py` should make this unreachable; it is here so no
   policy object, however built, can send sensitive data to the cloud;
4. a sensitive request that was routed pins its session. Not a denied one (its data
   went nowhere) and not one from an unknown caller (all its requests are sensitive
   anyway): otherwise anyone could flood the bounded pin store and evict live pins.

No value taken from the request is ever copied into a `Decision`, its reasons, its
trace or a log line: only detector names, counts and positions, and values from
closed vocabularies (labels, auth kinds, booleans).
"""

from __future__ import annotations

import fnmatch
import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol, get_args

from pydantic import model_validator
from pydantic_core import PydanticCustomError

from hybridroute.config import Strict, load_model
from hybridroute.router.detectors import TextTooLarge

if TYPE_CHECKING:
    from hybridroute.router.policy import MatchSpec, Policy, Rule
    from hybridroute.router.sessions import SessionPins

__all__ = [
    "AUTH_KINDS",
    "LABELS",
    "LABEL_KEYS",
    "SENSITIVE_LABELS",
    "AuthKind",
    "Case",
    "CaseFile",
    "CaseRequest",
    "Condition",
    "Decision",
    "DetectorHit",
    "LabelKey",
    "RequestFacts",
    "RuleTrace",
    "Subject",
    "TextField",
    "check_expectations",
    "compile_match",
    "decide",
    "facts_from_case",
    "label_key",
    "load_cases",
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
    # "text-too-large", "scan-error", "unknown-caller", "session-pinned", "rule:<id>"),
    # plus "guard:<rule id>" when the runtime guard overrode that rule's route
    reasons: tuple[str, ...]
    findings: Mapping[str, int]  # detector name -> count
    fallbacks: tuple[str, ...]  # routes to try in order when `route` has no healthy endpoint
    policy_hash: str
    trace: tuple[RuleTrace, ...]
    detector_hits: tuple[DetectorHit, ...]

    @property
    def fallback(self) -> str | None:
        """The first fallback route, if any (the chain is already zone-filtered)."""
        return self.fallbacks[0] if self.fallbacks else None


# --- what rules see, and compiled match conditions -------------------------------------


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


class Condition(Protocol):
    """One `match:` key, compiled. `why_not` is None when it holds."""

    @property
    def key(self) -> str: ...

    def why_not(self, subject: Subject) -> str | None: ...


def _show(items: Iterable[object]) -> str:
    return "[" + ", ".join(str(i) for i in items) + "]"


def _glob_regex(patterns: Sequence[str]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


# Conditions are slotted classes whose failure messages are built once, at compile
# time: `decide` evaluates them on every request and formats nothing.


class GlobCondition:
    """`caller`, `model`, `model_version`: the value matches one of the globs."""

    __slots__ = ("_why", "key", "patterns", "regex")

    def __init__(self, key: Literal["caller", "model", "model_version"], patterns: Sequence[str]):
        self.key, self.patterns, self.regex = key, tuple(patterns), _glob_regex(patterns)
        self._why = f"{key} does not match {_show(patterns)}"

    def why_not(self, subject: Subject) -> str | None:
        value: str | None = getattr(subject, self.key)
        return None if value is not None and self.regex.match(value) else self._why


class ChoiceCondition:
    """`label`, `auth`: a value from a closed vocabulary, so the message may show it."""

    __slots__ = ("_why", "allowed", "key")

    def __init__(self, key: Literal["label", "auth"], allowed: Sequence[str]):
        self.key, self.allowed = key, frozenset(allowed)
        vocabulary = LABEL_KEYS if key == "label" else AUTH_KINDS
        self._why = {v: f"{key} '{v}' not in {_show(allowed)}" for v in vocabulary}

    def why_not(self, subject: Subject) -> str | None:
        value: str = getattr(subject, self.key)
        if value in self.allowed:
            return None
        return self._why.get(value, f"{self.key} is not one of the allowed values")


class FlagCondition:
    """`caller_known`, `sensitive`, `session_pinned`."""

    __slots__ = ("_why", "expected", "key")

    def __init__(self, key: Literal["caller_known", "sensitive", "session_pinned"], expected: bool):
        self.key, self.expected = key, expected
        self._why = f"{key} is {str(not expected).lower()}"

    def why_not(self, subject: Subject) -> str | None:
        return None if getattr(subject, self.key) is self.expected else self._why


class DetectedCondition:
    """`detected`: `any`, `none`, or one of the named detectors fired."""

    __slots__ = ("_why", "mode", "names")
    key = "detected"

    def __init__(self, items: Sequence[str]):
        self.mode = items[0] if items[0] in ("any", "none") else "names"
        self.names = frozenset(items) if self.mode == "names" else frozenset()
        self._why = "no detector fired" if self.mode == "any" else f"none of {_show(items)} fired"

    def why_not(self, subject: Subject) -> str | None:
        fired = subject.detected
        if self.mode == "none":
            return f"detectors fired: {_show(sorted(fired))}" if fired else None
        if self.mode == "any":
            return None if fired else self._why
        return None if fired & self.names else self._why


class MetadataCondition:
    """`metadata: {name: glob}`: the header is present and matches (value never shown)."""

    __slots__ = ("_absent", "_why", "key", "name", "patterns", "regex")

    def __init__(self, name: str, patterns: Sequence[str]):
        self.name, self.key = name, f"metadata.{name}"
        self.patterns, self.regex = tuple(patterns), _glob_regex(patterns)
        self._absent = f"metadata '{name}' is absent"
        self._why = f"metadata '{name}' does not match {_show(patterns)}"

    def why_not(self, subject: Subject) -> str | None:
        value = subject.metadata.get(self.name)
        if value is None:
            return self._absent
        return None if self.regex.match(value) else self._why


def param_key(value: object) -> tuple[str, object] | None:
    """Comparison key for parameter equality: bools never equal numbers, 1 == 1.0."""
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, int | float):
        return ("n", value)
    if isinstance(value, str):
        return ("s", value)
    return None


class ParameterCondition:
    """`parameters: {name: value}`: the parameter equals one of the values."""

    __slots__ = ("_absent", "_why", "key", "keys", "name")

    def __init__(self, name: str, values: Sequence[object]):
        self.name, self.key = name, f"parameters.{name}"
        self.keys = frozenset(param_key(v) for v in values)
        self._absent = f"parameter '{name}' is absent"
        self._why = f"parameter '{name}' is not one of {_show(values)}"

    def why_not(self, subject: Subject) -> str | None:
        if self.name not in subject.parameters:
            return self._absent
        return None if param_key(subject.parameters[self.name]) in self.keys else self._why


def compile_match(spec: MatchSpec) -> tuple[Condition, ...]:
    """Turn a validated `match:` block into conditions, cheapest first."""
    out: list[Condition] = []
    for flag in ("sensitive", "caller_known", "session_pinned"):
        if (expected := getattr(spec, flag)) is not None:
            out.append(FlagCondition(flag, expected))
    if spec.label is not None:
        out.append(ChoiceCondition("label", spec.label))
    if spec.auth is not None:
        out.append(ChoiceCondition("auth", spec.auth))
    if spec.detected is not None:
        out.append(DetectedCondition(spec.detected))
    for glob_key in ("caller", "model", "model_version"):
        if (patterns := getattr(spec, glob_key)) is not None:
            out.append(GlobCondition(glob_key, patterns))
    for name, patterns in (spec.metadata or {}).items():
        out.append(MetadataCondition(name, patterns))
    for name, values in (spec.parameters or {}).items():
        out.append(ParameterCondition(name, values))
    return tuple(out)


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


def _scan(policy: Policy, texts: Sequence[TextField]) -> _Scan:
    """Run the detectors once over each text. Anything unscannable becomes a doubt."""
    out = _Scan()
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
        "guard: rule %r sent a sensitive request to route %r (zone %r); using %r instead",
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


def _fallbacks(policy: Policy, route: str, sensitive: bool) -> tuple[str, ...]:
    """The fallback chain of `route`, cut at the first hop the request may not take."""
    chain: list[str] = []
    current = policy.routes[route].fallback if route in policy.routes else None
    while current is not None and current not in chain and current != route:
        zone = policy.zone_of(current)
        if zone is None or (sensitive and zone != "onprem"):
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
    scan = _scan(policy, facts.texts)
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
    if rule is not None and rule.marks_sensitive:
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


# --- test cases and explain requests -------------------------------------------------


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


class CaseRequest(Strict):
    """A request as written in a test case or an explain file."""

    caller: str | None = None
    auth: Literal["cert", "token", "none"] | None = None  # default: cert if caller given
    model: str
    model_version: str = ""
    metadata: dict[str, str] = {}
    inputs: dict[str, list[str | bytes | None]] = {}  # None/non-UTF-8 bytes: unreadable
    parameters: dict[str, str | int | float | bool] = {}
    session: str | None = None  # default: metadata x-session-id
    problems: list[str] = []


class CaseExpect(Strict):
    """What a case expects of the decision; only the given keys are checked."""

    zone: Literal["onprem", "cloud"] | None = None
    route: str | None = None
    decision: Literal["route", "deny"] | None = None
    rule: str | None = None
    sensitive: bool | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> CaseExpect:
        if not self.model_fields_set:
            raise PydanticCustomError(
                "expect", "expect at least one of zone, route, decision, rule, sensitive"
            )
        return self


class Case(Strict):
    name: str
    request: CaseRequest
    expect: CaseExpect


class CaseFile(Strict):
    cases: list[Case]


def load_cases(path: str | Path) -> CaseFile:
    """A cases file, validated; errors name file, line and key like the policy's."""
    return load_model(path, CaseFile)


def _decode(item: str | bytes | None) -> str | None:
    if isinstance(item, bytes):
        try:
            return item.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return item


def facts_from_case(request: CaseRequest | Mapping[str, object]) -> RequestFacts:
    """The facts the router would collect for this request (same text sources).

    Takes a case's `request:` (validated, or as a plain mapping), as written in a
    cases file or a `policy explain --request` file.
    """
    if not isinstance(request, CaseRequest):
        request = CaseRequest.model_validate(request)
    texts = [
        TextField(f"input:{name}[{i}]", _decode(item))
        for name, items in request.inputs.items()
        for i, item in enumerate(items)
    ]
    texts += [
        TextField(f"parameter:{k}", v) for k, v in request.parameters.items() if isinstance(v, str)
    ]
    texts += metadata_text_fields(request.metadata)
    return RequestFacts(
        caller=request.caller,
        auth=request.auth or ("cert" if request.caller is not None else "none"),
        model=request.model,
        model_version=request.model_version,
        label=request.metadata.get("x-data-classification"),
        session_id=request.session or request.metadata.get("x-session-id"),
        metadata=dict(request.metadata),
        parameters=dict(request.parameters),
        texts=tuple(texts),
        problems=tuple(request.problems),
    )


def check_expectations(decision: Decision, expect: CaseExpect) -> list[str]:
    """How `decision` differs from `expect`, one line per mismatch (empty: passed)."""
    actual = {
        "zone": decision.zone,
        "route": decision.route,
        "decision": decision.action,
        "rule": decision.rule_id,
        "sensitive": decision.sensitive,
    }
    return [
        f"expected {key} {getattr(expect, key)!r}, got {actual[key]!r}"
        for key in ("decision", "zone", "route", "rule", "sensitive")
        if key in expect.model_fields_set and getattr(expect, key) != actual[key]
    ]
