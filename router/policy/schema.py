"""Routing policy: the YAML schema, its compilation, and the compiled `Policy`.

A policy is refused at load, with every problem listed as `file:line: key: problem`,
unless it is consistent and *cannot* send a sensitive request to the cloud: a rule
whose route (or any route on its fallback chain) is in a cloud pool must match only
`sensitive: false` requests and must not mark them sensitive itself, and no on-prem
route may fall back to a cloud one. The engine checks the zone of every decision again
at run time (defence in depth), so a policy object that bypassed this module still
cannot leak; this module lets a security team find out *before* rollout.

A route may also roll out new model versions (`rollouts:`, per model: a weighted
`split` between versions, a `shadow` copy to a candidate). Its schema is here
(`RolloutSpec`, `Shadow`), the compiled form and the per-request part in `rollout`,
and the guard extends to it: an on-prem route's shadow copies stay on-prem.

Rules are compiled once into the engine's condition objects (`conditions`; globs become
one regex each), so `engine.decide` parses nothing per request. This module holds the
schema models, `compile_policy` and `Policy`; the semantic checks it runs before
compiling (the guard, fallbacks, detectors) and the warnings it attaches after
(shadowed and never-matching rules, unused entries) are in `policy.checks`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from hybridroute.config import ConfigError, Located, Strict, load_yaml, validate
from hybridroute.router.policy.checks import Problem, find_problems, find_warnings
from hybridroute.router.policy.conditions import Condition, compile_match
from hybridroute.router.policy.detectors import BUILTIN, Scanner, regex_detector
from hybridroute.router.policy.engine import AuthKind, LabelKey
from hybridroute.router.rollout import Rollout, compile_rollouts

__all__ = [
    "Audit",
    "Health",
    "MatchSpec",
    "Policy",
    "PolicySpec",
    "PolicyWarning",
    "Pool",
    "RolloutSpec",
    "Route",
    "Rule",
    "RuleSpec",
    "Sessions",
    "Shadow",
    "compile_policy",
]

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
    """A whole number is a version name (`2`); a float or a boolean is not what was
    written (YAML reads 1.10 as 1.1 and yes as true), so it must be quoted."""
    value = _listed(value)
    if not isinstance(value, list):
        return value
    for v in value:
        if isinstance(v, bool):
            raise PydanticCustomError(
                "version",
                "YAML reads on/off/yes/no/true/false as booleans (this one as {value}): "
                "quote the version",
                {"value": str(v).lower()},
            )
        if isinstance(v, float):
            raise PydanticCustomError(
                "version",
                "YAML reads this version as the number {value}, not as written (1.10 "
                "becomes 1.1): quote the version, e.g. '1.10'",
                {"value": v},
            )
    return [str(v) if isinstance(v, int) else v for v in value]


def _caller(value: object) -> object:
    """A caller is an exact identity (a certificate CN or DNS name, a token name),
    compared as written: no patterns, no padding, nothing YAML turned into another type."""
    if isinstance(value, bool):
        raise PydanticCustomError(
            "caller",
            "YAML reads on/off/yes/no/true/false as booleans (this one as {value}); "
            "quote this caller",
            {"value": str(value).lower()},
        )
    if not isinstance(value, str):
        return value  # (the str type says what is wrong)
    if not value.strip():
        raise PydanticCustomError("caller", "a caller cannot be empty")
    if value != value.strip():
        raise PydanticCustomError(
            "caller",
            "'{value}' has spaces around it; identities are compared exactly",
            {"value": value},
        )
    if any(c in value for c in "*?["):
        raise PydanticCustomError(
            "caller",
            "'{value}' is a pattern, but callers are exact identities (a certificate CN or "
            "DNS name, a token name), compared as written: list each one",
            {"value": value},
        )
    if not value.isprintable() or len(value) > 255:
        raise PydanticCustomError("caller", "a caller is at most 255 printable characters")
    return value


def _lowercase_header(value: object) -> object:
    """gRPC metadata names are lowercase on the wire: a rule on X-Tenant never matches."""
    if isinstance(value, str) and value != value.lower():
        raise PydanticCustomError(
            "header_case",
            "metadata name '{name}' must be lowercase ('{lower}'): gRPC metadata names "
            "are lowercase, so this key would never match",
            {"name": value, "lower": value.lower()},
        )
    return value


def _version_name(value: object) -> object:
    """YAML reads `2` as a number; a model version is a name (`2`, `2024-06`)."""
    return _name(str(value) if isinstance(value, int) and not isinstance(value, bool) else value)


def _text_header(value: str) -> str:
    """A metadata name a rule can match: not a binary one, whose values are bytes that
    the router neither reads nor scans (they are never forwarded to the cloud)."""
    if value.endswith("-bin"):
        raise PydanticCustomError(
            "binary_header",
            "'{name}' is binary metadata (-bin): its values are bytes, not text, and "
            "cannot be matched",
            {"name": value},
        )
    return value


def _audit_shorthand(value: object) -> object:
    return {"level": value} if isinstance(value, str) else value


Duration = Annotated[float, BeforeValidator(_duration)]
Name = Annotated[str, BeforeValidator(_name)]
Endpoint = Annotated[str, BeforeValidator(_endpoint)]
Globs = Annotated[tuple[str, ...], BeforeValidator(_listed), Field(min_length=1)]
DetectorNames = Annotated[tuple[str, ...], BeforeValidator(_listed), Field(min_length=1)]
AuthKinds = Annotated[tuple[AuthKind, ...], BeforeValidator(_listed), Field(min_length=1)]
Labels = Annotated[tuple[LabelKey, ...], BeforeValidator(_listed), Field(min_length=1)]
VersionName = Annotated[str, BeforeValidator(_version_name)]
Versions = Annotated[tuple[str, ...], BeforeValidator(_version_strings), Field(min_length=1)]
HeaderName = Annotated[
    str,
    BeforeValidator(_lowercase_header),
    StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.-]*$"),
    AfterValidator(_text_header),
]
CallerName = Annotated[str, BeforeValidator(_caller)]
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


class Shadow(Strict):
    """Mirror `percent` of a model's requests on a route to a candidate `version`.

    The copy goes to `pool` (default: the route's pool) after the caller's reply is
    on its way; its reply is compared with the serving one (`compare`: the outputs
    that must be equal; default all) and then discarded, so the candidate is judged
    on live traffic without answering anyone. A copy has its own `timeout`, at most
    `max_in_flight` copies run at once, and more are dropped (and counted) rather
    than queued: a slow candidate never slows the serving path. A shadow of an
    on-prem route must stay on-prem (checked at load and again per copy).
    """

    version: VersionName
    percent: float = Field(gt=0, le=100)
    pool: Name | None = None
    timeout: Duration = 1.0
    compare: Annotated[tuple[str, ...], BeforeValidator(_listed), Field(min_length=1)] | None = None
    max_in_flight: int = Field(default=8, ge=1, le=1024)


class RolloutSpec(Strict):
    """How a route serves one model while a new version rolls out (canary, shadow).

    `split` maps versions to integer weights, e.g. `{1: 90, 2: 10}`: requests that name
    no version are sent to a version drawn by weight (a caller that names a version
    gets it). A weight of 0 drains a version without deleting the line.
    """

    split: dict[VersionName, Annotated[int, Field(ge=0)]] | None = None
    shadow: Shadow | None = None

    @model_validator(mode="after")
    def _something_to_do(self) -> RolloutSpec:
        if self.split is None and self.shadow is None:
            raise PydanticCustomError("rollout", "a rollout needs 'split', 'shadow' or both")
        if self.split is not None and sum(self.split.values()) <= 0:
            raise PydanticCustomError(
                "split", "a split needs at least one version with a positive weight"
            )
        return self


class Route(Strict):
    """A named destination: a pool, an optional fallback route, the audit level, and
    per-model rollouts (`rollouts: {MODEL: {split: ..., shadow: ...}}`)."""

    pool: Name
    fallback: Name | None = None
    audit: Annotated[Audit, BeforeValidator(_audit_shorthand)] = Audit()
    rollouts: dict[Name, RolloutSpec] = Field(default_factory=dict)


class CustomDetector(Strict):
    name: Name
    pattern: str = Field(min_length=1)


class Detectors(Strict):
    builtin: tuple[str, ...] | None = None  # None: all built-in detectors
    custom: tuple[CustomDetector, ...] = ()
    max_text_bytes: int = Field(default=1 << 20, ge=1)

    def enabled(self) -> tuple[str, ...]:
        """The enabled detector names: the chosen (or all) built-ins, then the custom ones."""
        builtin = self.builtin if self.builtin is not None else tuple(BUILTIN)
        return tuple(dict.fromkeys([*builtin, *(c.name for c in self.custom)]))


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
    callers: tuple[CallerName, ...] = ()
    detectors: Detectors = Detectors()
    sessions: Sessions = Sessions()
    sensitive_route: Name
    default_route: Name
    rules: tuple[RuleSpec, ...] = ()

    def zone_of(self, route: str) -> str | None:
        """The zone a route sends to, or None for an unknown route or pool."""
        return _zone_of(self.routes, self.pools, route)


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
    # (route, model) -> its canary split and shadow; empty for most policies, and the
    # front door does nothing more when it is
    rollouts: Mapping[tuple[str, str], Rollout] = field(
        default_factory=lambda: MappingProxyType({})
    )

    def zone_of(self, route: str) -> str | None:
        """The zone a route sends to, or None for an unknown route or pool."""
        return _zone_of(self.routes, self.pools, route)


def _zone_of(routes: Mapping[str, Route], pools: Mapping[str, Pool], route: str) -> str | None:
    found = routes.get(route)
    pool = pools.get(found.pool) if found is not None else None
    return pool.zone if pool is not None else None


def compile_policy(path: str | Path) -> Policy:
    """Load, validate and compile a policy file; `ConfigError` lists every problem."""
    source = str(path)
    raw, text = _read(path)
    located = load_yaml(path, text=text)
    spec = validate(located, PolicySpec)
    problems = find_problems(spec, located)
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
    enabled = spec.detectors.enabled()
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
        rollouts=compile_rollouts(spec.routes, spec.pools),
    )
    warnings = find_warnings(spec, located, policy)
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
