"""Routing policy: YAML schema, compilation, and the load-time checks including the guard.

A policy is refused at load, with every problem listed as `file:line: key: problem`,
unless it is consistent and *cannot* send a sensitive request to the cloud: a rule
whose route (or any route on its fallback chain) is in a cloud pool must match only
`sensitive: false` requests and must not mark them sensitive itself, and no on-prem
route may fall back to a cloud one. The engine checks the zone of every decision again
at run time (defence in depth), so a policy object that bypassed this module still
cannot leak; this module lets a security team find out *before* rollout.

Rules are compiled once into the engine's condition objects (globs become one regex
each), so `engine.decide` parses nothing per request; the shadow analysis at the end
of this module evaluates those same conditions, so the checks and the engine cannot
disagree about what a rule means.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, StringConstraints, field_validator, model_validator
from pydantic_core import PydanticCustomError

from hybridroute.config import ConfigError, Located, Strict, load_yaml, validate
from hybridroute.router.detectors import BUILTIN, Scanner, check_pattern, regex_detector
from hybridroute.router.engine import (
    AUTH_KINDS,
    LABEL_KEYS,
    SENSITIVE_LABELS,
    AuthKind,
    Condition,
    DetectedCondition,
    GlobCondition,
    LabelKey,
    MetadataCondition,
    ParameterCondition,
    Subject,
    compile_match,
)

__all__ = [
    "Audit",
    "Health",
    "MatchSpec",
    "Policy",
    "PolicySpec",
    "PolicyWarning",
    "Pool",
    "Route",
    "Rule",
    "RuleSpec",
    "Sessions",
    "compile_policy",
]

Problem = tuple[int | None, str, str]  # (line, key path, message), as ConfigError takes

# --- schema --------------------------------------------------------------------------

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ENDPOINT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")


def _duration(value: object) -> float:
    """'500ms', '1s', '30m', '2h' -> seconds. A bare number is refused: which unit?"""
    match = _DURATION.match(value.strip()) if isinstance(value, str) else None
    if match is None or float(match[1]) <= 0:
        raise PydanticCustomError(
            "duration", "expected a positive duration with a unit: '500ms', '1s', '30m', '2h'"
        )
    return float(match[1]) * _UNIT_SECONDS[match[2]]


def _endpoint(value: object) -> object:
    match = _ENDPOINT.match(value) if isinstance(value, str) else None
    if match is None or not 0 < int(match[2]) < 65536:
        raise PydanticCustomError("endpoint", "expected host:port, e.g. '10.0.0.5:8101'")
    return value


def _name(value: object) -> object:
    """Names end up in metadata, logs and messages: keep them plain."""
    if isinstance(value, bool):
        raise PydanticCustomError(
            "name", "YAML reads on/off/yes/no/true/false as booleans; quote this name"
        )
    if isinstance(value, str) and not _NAME.match(value):
        raise PydanticCustomError(
            "name",
            "a name is 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit",
        )
    return value


def _listed(value: object) -> object:
    """A scalar where a list is expected means a list of one."""
    return [value] if isinstance(value, str | int | float | bool) else value


def _version_strings(value: object) -> object:
    value = _listed(value)
    return (
        [str(v) if isinstance(v, int | float) else v for v in value]
        if isinstance(value, list)
        else value
    )


def _audit_shorthand(value: object) -> object:
    return {"level": value} if isinstance(value, str) else value


Duration = Annotated[float, BeforeValidator(_duration)]
Name = Annotated[str, BeforeValidator(_name)]
Endpoint = Annotated[str, BeforeValidator(_endpoint)]
Globs = Annotated[tuple[str, ...], BeforeValidator(_listed), Field(min_length=1)]
DetectorNames = Annotated[tuple[str, ...], BeforeValidator(_listed), Field(min_length=1)]
AuthKinds = Annotated[tuple[AuthKind, ...], BeforeValidator(_listed), Field(min_length=1)]
Labels = Annotated[tuple[LabelKey, ...], BeforeValidator(_listed), Field(min_length=1)]
Versions = Annotated[tuple[str, ...], BeforeValidator(_version_strings), Field(min_length=1)]
HeaderName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.-]*$")]
ParamValues = Annotated[
    tuple[str | int | float | bool, ...], BeforeValidator(_listed), Field(min_length=1)
]
Zone = Literal["onprem", "cloud"]


class Health(Strict):
    """Active grpc.health.v1 checking of each endpoint of a pool."""

    interval: Duration = 1.0
    timeout: Duration = 0.5
    healthy_threshold: int = Field(default=1, ge=1)
    unhealthy_threshold: int = Field(default=2, ge=1)

    @model_validator(mode="after")
    def _timeout_within_interval(self) -> Health:
        if self.timeout > self.interval:
            raise PydanticCustomError("health", "timeout must not exceed interval")
        return self


class Pool(Strict):
    """Endpoints that serve the same models in one zone."""

    zone: Zone
    endpoints: tuple[Endpoint, ...] = Field(min_length=1)
    server_name: str | None = None  # expected TLS name; None: the endpoint's host
    ca: str | None = None  # None: the router's CA (on-prem) or system roots (cloud)
    bearer_token_env: str | None = None
    bearer_token_file: str | None = None
    health: Health = Health()

    @model_validator(mode="after")
    def _one_token_source(self) -> Pool:
        if self.bearer_token_env and self.bearer_token_file:
            raise PydanticCustomError(
                "token", "give bearer_token_env or bearer_token_file, not both"
            )
        return self


class Audit(Strict):
    """How much a route's decisions are audited.

    Every decision always gets its audit record (architecture invariant 5); `full`
    adds the rule trace and detector positions, and `sample` thins only that detail.
    """

    level: Literal["decisions", "full"] = "decisions"
    sample: float = Field(default=1.0, ge=0.0, le=1.0)


class Route(Strict):
    """A named destination: a pool, an optional fallback route and the audit level."""

    pool: Name
    fallback: Name | None = None
    audit: Annotated[Audit, BeforeValidator(_audit_shorthand)] = Audit()


class CustomDetector(Strict):
    name: Name
    pattern: str = Field(min_length=1)


class Detectors(Strict):
    builtin: tuple[str, ...] | None = None  # None: all built-in detectors
    custom: tuple[CustomDetector, ...] = ()
    max_text_bytes: int = Field(default=1 << 20, ge=1)


class Sessions(Strict):
    pin_ttl: Duration = 1800.0
    max_sessions: int = Field(default=100_000, ge=1)


class MatchSpec(Strict):
    """A rule's conditions: all given keys must hold; a list means any of its items."""

    caller: Globs | None = None
    caller_known: bool | None = None
    auth: AuthKinds | None = None
    model: Globs | None = None
    model_version: Versions | None = None
    label: Labels | None = None
    detected: DetectorNames | None = None  # detector names, or just `any` / `none`
    sensitive: bool | None = None  # the verdict before rules
    session_pinned: bool | None = None
    metadata: dict[HeaderName, Globs] | None = None
    parameters: dict[str, ParamValues] | None = None

    @field_validator("detected")
    @classmethod
    def _any_or_none_alone(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value and len(value) > 1 and ({"any", "none"} & set(value)):
            raise PydanticCustomError(
                "detected", "'any' and 'none' cannot be combined with other items"
            )
        return value


class RuleSpec(Strict):
    id: Name
    description: str | None = None
    match: MatchSpec = MatchSpec()
    route: Name | None = None
    action: Literal["deny"] | None = None
    sensitive: bool | None = None

    @field_validator("sensitive")
    @classmethod
    def _only_true(cls, value: bool | None) -> bool | None:
        if value is False:
            raise PydanticCustomError(
                "rule_sensitive",
                "a rule can only mark requests sensitive (true); to select non-sensitive "
                "requests, put 'sensitive: false' in its match",
            )
        return value

    @model_validator(mode="after")
    def _route_or_deny(self) -> RuleSpec:
        if (self.route is None) == (self.action is None):
            raise PydanticCustomError(
                "rule", "a rule needs exactly one of 'route: NAME' or 'action: deny'"
            )
        return self


class PolicySpec(Strict):
    """The policy file as written."""

    version: Literal[1]
    pools: dict[Name, Pool] = Field(min_length=1)
    routes: dict[Name, Route] = Field(min_length=1)
    callers: tuple[str, ...] = ()
    detectors: Detectors = Detectors()
    sessions: Sessions = Sessions()
    sensitive_route: Name
    default_route: Name
    rules: tuple[RuleSpec, ...] = ()


# --- the compiled policy ---------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """A rule ready for the engine: its conditions compiled, its line kept for messages."""

    id: str
    index: int
    line: int | None
    route: str | None  # None: deny
    marks_sensitive: bool
    conditions: tuple[Condition, ...]
    spec: RuleSpec


@dataclass(frozen=True)
class PolicyWarning:
    """Something odd but not dangerous; `policy check` prints these, the router logs them."""

    source: str
    line: int | None
    where: str
    message: str

    def __str__(self) -> str:
        loc = f"{self.source}:{self.line}" if self.line else self.source
        return f"{loc}: {self.where}: warning: {self.message}"


@dataclass(frozen=True)
class Policy:
    """A loaded, checked policy. Immutable: a reload builds a new one and swaps it in."""

    source: str
    version_hash: str  # sha256 of the file's bytes
    pools: Mapping[str, Pool]
    routes: Mapping[str, Route]
    rules: tuple[Rule, ...]
    callers: frozenset[str]
    sensitive_route: str
    default_route: str
    detectors: tuple[str, ...]  # enabled detector names
    max_text_bytes: int
    sessions: Sessions
    scanner: Scanner
    warnings: tuple[PolicyWarning, ...] = ()

    def zone_of(self, route: str) -> str | None:
        """The zone a route sends to, or None for an unknown route or pool."""
        found = self.routes.get(route)
        pool = self.pools.get(found.pool) if found is not None else None
        return pool.zone if pool is not None else None


def compile_policy(path: str | Path) -> Policy:
    """Load, validate and compile a policy file; `ConfigError` lists every problem."""
    source = str(path)
    raw, text = _read(path)
    located = load_yaml(path, text=text)
    spec = validate(located, PolicySpec)
    problems = _problems(spec, located)
    if problems:
        raise ConfigError(source, sorted(problems, key=lambda p: (p[0] or 0, p[1])))
    rules = tuple(
        Rule(
            r.id,
            i,
            located.line_of(("rules", i)),
            r.route,
            r.sensitive is True,
            compile_match(r.match),
            r,
        )
        for i, r in enumerate(spec.rules)
    )
    enabled = _enabled_detectors(spec)
    custom = {c.name: c.pattern for c in spec.detectors.custom}
    scanner = Scanner(
        [BUILTIN[n] if n in BUILTIN else regex_detector(n, custom[n]) for n in enabled],
        max_chars=spec.detectors.max_text_bytes,
    )
    policy = Policy(
        source=source,
        version_hash=hashlib.sha256(raw).hexdigest(),
        pools=MappingProxyType(
            {n: _resolve_paths(p, Path(path).parent) for n, p in spec.pools.items()}
        ),
        routes=MappingProxyType(dict(spec.routes)),
        rules=rules,
        callers=frozenset(spec.callers),
        sensitive_route=spec.sensitive_route,
        default_route=spec.default_route,
        detectors=enabled,
        max_text_bytes=spec.detectors.max_text_bytes,
        sessions=spec.sessions,
        scanner=scanner,
    )
    warnings = [*_usage_warnings(spec, located), *_rule_warnings(policy)]
    return _replace_warnings(policy, located, warnings)


def _read(path: str | Path) -> tuple[bytes, str]:
    """The file's bytes and text, read once: the hash and the parse see the same content."""
    try:
        raw = Path(path).read_bytes()
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), [(None, "", "file not found")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), [(None, "", f"not valid UTF-8 ({exc.reason})")]) from None
    except OSError as exc:
        raise ConfigError(str(path), [(None, "", f"cannot read: {exc.strerror}")]) from None
    return raw, text


def _replace_warnings(policy: Policy, located: Located, found: list[Problem]) -> Policy:
    found.sort(key=lambda p: (p[0] or 0, p[1]))
    return replace(policy, warnings=tuple(PolicyWarning(located.source, *w) for w in found))


def _resolve_paths(pool: Pool, base: Path) -> Pool:
    """`ca` and `bearer_token_file` are relative to the policy file, not the cwd."""
    update = {
        key: str(base / value)
        for key in ("ca", "bearer_token_file")
        if (value := getattr(pool, key)) and not Path(value).is_absolute()
    }
    return pool.model_copy(update=update) if update else pool


def _enabled_detectors(spec: PolicySpec) -> tuple[str, ...]:
    builtin = spec.detectors.builtin if spec.detectors.builtin is not None else tuple(BUILTIN)
    return tuple(dict.fromkeys([*builtin, *(c.name for c in spec.detectors.custom)]))


# --- errors ------------------------------------------------------------------------------


def _problem(located: Located, message: str, *path: str | int) -> Problem:
    """A problem at `path` (e.g. "rules", 3, "route"), with that key's line."""
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
    return (located.line_of(path), where, message)


def _zone(spec: PolicySpec, route: str) -> str | None:
    found = spec.routes.get(route)
    pool = spec.pools.get(found.pool) if found is not None else None
    return pool.zone if pool is not None else None


def _chain(spec: PolicySpec, route: str) -> list[str]:
    """`route` and the routes its fallbacks lead to, stopping at unknowns and cycles."""
    chain = [route]
    while (found := spec.routes.get(chain[-1])) is not None and found.fallback is not None:
        if found.fallback in chain or found.fallback not in spec.routes:
            break
        chain.append(found.fallback)
    return chain


def _problems(spec: PolicySpec, located: Located) -> list[Problem]:
    return [
        *_pool_problems(spec, located),
        *_route_problems(spec, located),
        *_detector_problems(spec, located),
        *_rule_problems(spec, located),
    ]


def _pool_problems(spec: PolicySpec, located: Located) -> Iterator[Problem]:
    """An endpoint listed in pools of both zones would make its zone ambiguous."""
    seen: dict[str, tuple[str, str]] = {}
    for name, pool in spec.pools.items():
        for i, endpoint in enumerate(pool.endpoints):
            zone, first = seen.setdefault(endpoint, (pool.zone, name))
            if zone != pool.zone:
                message = f"endpoint '{endpoint}' is also in {zone} pool '{first}'; "
                message += "an endpoint belongs to exactly one zone"
                yield _problem(located, message, "pools", name, "endpoints", i)


def _route_problems(spec: PolicySpec, located: Located) -> Iterator[Problem]:
    for name, route in spec.routes.items():
        if route.pool not in spec.pools:
            message = f"route '{name}' names unknown pool '{route.pool}'"
            yield _problem(
                located, f"{message} (pools: {', '.join(spec.pools)})", "routes", name, "pool"
            )
        yield from _fallback_problems(spec, located, name, route)
    for key in ("default_route", "sensitive_route"):
        name = getattr(spec, key)
        if name not in spec.routes:
            yield _problem(located, f"unknown route '{name}'", key)
        elif (zone := _zone(spec, name)) not in ("onprem", None):
            message = f"{key} '{name}' is in a {zone} pool; it must be on-prem (fail closed)"
            yield _problem(located, message, key)


def _fallback_problems(
    spec: PolicySpec, located: Located, name: str, route: Route
) -> Iterator[Problem]:
    fallback = route.fallback
    path = ("routes", name, "fallback")
    if fallback is None:
        return
    if fallback not in spec.routes:
        yield _problem(located, f"fallback names unknown route '{fallback}'", *path)
        return
    chain = _chain(spec, name)
    if spec.routes[chain[-1]].fallback == name:  # reported once per route on the cycle
        yield _problem(located, f"fallback cycle: {' -> '.join([*chain, name])}", *path)
    if _zone(spec, name) == "onprem" and _zone(spec, fallback) == "cloud":
        message = f"on-prem route '{name}' falls back to cloud route '{fallback}': sensitive "
        message += "requests ride on-prem routes, so their fallbacks must stay on-prem"
        yield _problem(located, message, *path)


def _detector_problems(spec: PolicySpec, located: Located) -> Iterator[Problem]:
    for i, name in enumerate(spec.detectors.builtin or ()):
        if name not in BUILTIN:
            message = f"unknown built-in detector '{name}' (known: {', '.join(BUILTIN)})"
            yield _problem(located, message, "detectors", "builtin", i)
    names: set[str] = set()
    for i, custom in enumerate(spec.detectors.custom):
        if custom.name in BUILTIN or custom.name in ("any", "none") or custom.name in names:
            message = f"detector name '{custom.name}' is already taken"
            yield _problem(located, message, "detectors", "custom", i, "name")
        names.add(custom.name)
        if (trouble := check_pattern(custom.pattern)) is not None:
            message = f"detector '{custom.name}': {trouble}"
            yield _problem(located, message, "detectors", "custom", i, "pattern")


def _rule_problems(spec: PolicySpec, located: Located) -> Iterator[Problem]:
    enabled = set(_enabled_detectors(spec))
    first_line: dict[str, int | None] = {}
    for i, rule in enumerate(spec.rules):
        if rule.id in first_line:
            message = f"duplicate rule id '{rule.id}' (first at line {first_line[rule.id]})"
            yield _problem(located, message, "rules", i, "id")
        first_line.setdefault(rule.id, located.line_of(("rules", i)))
        for j, name in enumerate(rule.match.detected or ()):
            if name not in ("any", "none") and name not in enabled:
                message = f"detector '{name}' is not enabled in this policy"
                yield _problem(located, message, "rules", i, "match", "detected", j)
        if rule.route is not None and rule.route not in spec.routes:
            yield _problem(located, f"unknown route '{rule.route}'", "rules", i, "route")
        elif rule.route is not None:
            yield from _guard_problems(spec, located, i, rule)


def _guard_problems(
    spec: PolicySpec, located: Located, i: int, rule: RuleSpec
) -> Iterator[Problem]:
    """THE GUARD: no rule may be able to carry a sensitive request to a cloud pool."""
    chain = _chain(spec, rule.route or "")
    cloud = next((r for r in chain if _zone(spec, r) == "cloud"), None)
    if cloud is None:
        return
    pool = spec.routes[cloud].pool
    via = "" if cloud == rule.route else f" (through fallback route '{cloud}')"
    if rule.sensitive:
        message = f"rule '{rule.id}' marks requests sensitive and routes them to cloud pool "
        yield _problem(located, f"{message}'{pool}'{via}", "rules", i, "sensitive")
    if rule.match.sensitive is not False:
        message = f"rule '{rule.id}' can send sensitive requests to cloud pool '{pool}'{via}; "
        yield _problem(
            located, f"{message}add 'sensitive: false' to its match", "rules", i, "route"
        )


# --- warnings ----------------------------------------------------------------------------


def _usage_warnings(spec: PolicySpec, located: Located) -> Iterator[Problem]:
    used_pools = {r.pool for r in spec.routes.values()}
    for name in spec.pools:
        if name not in used_pools:
            yield _problem(located, f"pool '{name}' is not used by any route", "pools", name)
    used_routes = {spec.default_route, spec.sensitive_route}
    used_routes |= {r.fallback for r in spec.routes.values() if r.fallback}
    used_routes |= {r.route for r in spec.rules if r.route}
    for name, route in spec.routes.items():
        if name not in used_routes:
            yield _problem(located, f"route '{name}' is not used", "routes", name)
        if route.audit.level == "decisions" and route.audit.sample < 1:
            message = "'sample' only thins the detail of level 'full'; every decision is recorded"
            yield _problem(located, message, "routes", name, "audit")
    if not spec.callers:
        message = "no callers listed: every request is from an unknown caller"
        yield _problem(located, message, "callers")


# Shadow analysis. The keys with a finite domain (label, auth, caller_known,
# session_pinned, detected, plus "some text was unreadable") span a few hundred cells;
# each rule's finite conditions are evaluated on every cell, giving a bitmask. Keys
# with an open domain (caller, model, model_version, metadata, parameters) are compared
# by containment. Rule B is shadowed when earlier rules whose open conditions contain
# B's together cover every cell B covers. Sound (no false warnings) by construction;
# incomplete where globs overlap in ways simple containment cannot see.

_FINITE = frozenset({"label", "auth", "caller_known", "session_pinned", "detected", "sensitive"})
_OPEN = (GlobCondition, MetadataCondition, ParameterCondition)


def _cells(policy: Policy) -> list[Subject]:
    named = {
        n
        for r in policy.rules
        for c in r.conditions
        if isinstance(c, DetectedCondition)
        for n in c.names
    }
    fired: list[str | None] = [None, *sorted(named)]
    if set(policy.detectors) - named:
        fired.append("\0other")  # stands for every detector no rule names
    cells = []
    for label, auth, known, pinned, det, doubt in itertools.product(
        LABEL_KEYS, AUTH_KINDS, (True, False), (True, False), fired, (True, False)
    ):
        detected = frozenset() if det is None else frozenset({det})
        sensitive = (
            doubt
            or not known
            or pinned
            or bool(detected)
            or label in SENSITIVE_LABELS
            or label == "invalid"
        )
        cells.append(Subject(None, known, auth, "", "", label, detected, sensitive, pinned, {}, {}))
    return cells


def _mask(rule: Rule, cells: list[Subject], callers: frozenset[str]) -> int:
    finite = [c for c in rule.conditions if c.key in _FINITE]
    known = _known_by_caller(rule, callers)
    bits = 0
    for i, cell in enumerate(cells):
        if (known is None or cell.caller_known is known) and all(
            c.why_not(cell) is None for c in finite
        ):
            bits |= 1 << i
    return bits


def _known_by_caller(rule: Rule, callers: frozenset[str]) -> bool | None:
    """A `caller:` list of plain names decides `caller_known` by itself."""
    for c in rule.conditions:
        if (
            isinstance(c, GlobCondition)
            and c.key == "caller"
            and not any(_wild(p) for p in c.patterns)
        ):
            known = {p in callers for p in c.patterns}
            return known.pop() if len(known) == 1 else None
    return None


def _wild(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def _open_covers(a: Rule, b: Rule) -> bool:
    """Every value B's open conditions accept, A's accept too."""
    b_conditions = {c.key: c for c in b.conditions if isinstance(c, _OPEN)}
    for cond in a.conditions:
        if not isinstance(cond, _OPEN):
            continue
        other = b_conditions.get(cond.key)
        if other is None:
            return False
        if isinstance(cond, ParameterCondition):
            if not (isinstance(other, ParameterCondition) and other.keys <= cond.keys):
                return False
        elif isinstance(other, ParameterCondition) or not all(
            p in cond.patterns or "*" in cond.patterns or (not _wild(p) and cond.regex.match(p))
            for p in other.patterns
        ):
            return False
    return True


def _rule_warnings(policy: Policy) -> Iterator[Problem]:
    cells = _cells(policy)
    masks = [_mask(r, cells, policy.callers) for r in policy.rules]
    for j, rule in enumerate(policy.rules):
        where = (rule.line, f"rules[{j}]")
        if masks[j] == 0:
            yield (
                *where,
                f"rule '{rule.id}' can never match: no request satisfies all its "
                "conditions (a detector hit, a sensitive or invalid label, an unknown caller "
                "or a pinned session make a request sensitive)",
            )
            continue
        earlier = [
            i for i in range(j) if masks[i] & masks[j] and _open_covers(policy.rules[i], rule)
        ]
        union = 0
        for i in earlier:
            union |= masks[i]
        if masks[j] & ~union:
            continue
        alone = next((i for i in earlier if not masks[j] & ~masks[i]), None)
        by = [alone] if alone is not None else earlier
        names = ", ".join(f"'{policy.rules[i].id}' (line {policy.rules[i].line})" for i in by)
        yield (
            *where,
            f"rule '{rule.id}' is shadowed: earlier rule{'s' if len(by) > 1 else ''} "
            f"{names} match every request it matches",
        )
