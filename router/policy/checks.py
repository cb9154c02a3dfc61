"""The load-time checks of a routing policy, THE GUARD among them.

`compile_policy` refuses a policy for any problem `find_problems` lists: pools whose
endpoints straddle zones (compared as addresses: `Cloud.example.com` is
`cloud.example.com`, `localhost` is 127.0.0.1), a pool's `ca` or `bearer_token_file`
missing beside the policy, unknown pools, routes and detectors, fallback cycles, unsafe
custom patterns, duplicate rule ids, and the guard's findings.
The guard: a rule whose route (or any route on its fallback chain) is in a cloud pool
must match only `sensitive: false` requests and must not mark them sensitive itself,
no on-prem route may fall back to a cloud one, and no on-prem route may mirror
(shadow) a model's requests to a cloud pool. (Canary versions are served by the
route's own pool, so they cannot leave its zone.)

`find_warnings` lists what is odd but safe: unused pools and routes, audit settings
that do nothing, no callers, pool files given by absolute paths that are not on this
machine (they may be on the router's), every built-in detector turned off while a
cloud route exists, custom patterns anchored to a whole text, rules naming a caller
not listed under `callers`, and rules that can never match or are shadowed by earlier
ones. The shadow analysis evaluates the compiled conditions (`conditions`)
that the engine runs, so the warnings and the engine cannot disagree about what a rule
means. `find_environment_warnings` is apart: a bearer token variable unset here says
something about this machine, not about the policy.

These checks are kept apart from `policy` (the schema and its compilation) so the
schema reads on its own and the guard can be reviewed on its own.
"""

from __future__ import annotations

import difflib
import fnmatch
import ipaddress
import itertools
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from hybridroute.config import Located, render_path
from hybridroute.router.policy.conditions import (
    DetectedCondition,
    GlobCondition,
    MetadataCondition,
    ParameterCondition,
)
from hybridroute.router.policy.detectors import BUILTIN
from hybridroute.router.policy.engine import AUTH_KINDS, LABEL_KEYS, SENSITIVE_LABELS, Subject
from hybridroute.router.policy.patterns import anchor_warning, check_pattern

if TYPE_CHECKING:
    from hybridroute.router.policy.schema import (
        Policy,
        PolicySpec,
        Pool,
        RolloutSpec,
        Route,
        Rule,
        RuleSpec,
    )

__all__ = ["Problem", "find_environment_warnings", "find_problems", "find_warnings"]

Problem = tuple[int | None, str, str]  # (line, key path, message), as ConfigError takes


# --- problems: any of these refuses the policy ----------------------------------------


def find_problems(spec: PolicySpec, located: Located) -> list[Problem]:
    """Every reason to refuse `spec`, each with the line and key path it is about."""
    return [
        *_pool_problems(spec, located),
        *_pool_file_problems(spec, located, absolute=False),
        *_route_problems(spec, located),
        *_detector_problems(spec, located),
        *_rule_problems(spec, located),
    ]


def find_warnings(spec: PolicySpec, located: Located, policy: Policy) -> list[Problem]:
    """Odd but safe: unused pools and routes, rules that never match or are shadowed."""
    return [
        *_usage_warnings(spec, located),
        *_pool_file_problems(spec, located, absolute=True),
        *_detector_warnings(spec, located),
        *_caller_warnings(spec, located),
        *_rule_warnings(policy),
    ]


def find_environment_warnings(pools: Mapping[str, Pool], located: Located) -> list[Problem]:
    """Each pool's `bearer_token_env` that is unset or empty here. Not among
    `find_warnings`: whether it is set says something about this process, not about
    the policy (a router compiling the same file must not get other warnings), and
    the router's environment may well differ from a reviewer's."""
    found = []
    for name, pool in pools.items():
        var = pool.bearer_token_env
        if var and not os.environ.get(var, "").strip():
            state = "is not set" if os.environ.get(var) is None else "is empty"
            message = f"environment variable {var} {state} here; a router refuses this "
            message += "policy unless it is set (and not empty) in the router's environment"
            found.append(_problem(located, message, "pools", name, "bearer_token_env"))
    return found


def _problem(located: Located, message: str, *path: str | int) -> Problem:
    """A problem at `path` (e.g. "rules", 3, "route"), with that key's line."""
    return (located.line_of(path), render_path(path), message)


def _chain(spec: PolicySpec, route: str) -> list[str]:
    """`route` and the routes its fallbacks lead to, stopping at unknowns and cycles."""
    chain = [route]
    while (found := spec.routes.get(chain[-1])) is not None and found.fallback is not None:
        if found.fallback in chain or found.fallback not in spec.routes:
            break
        chain.append(found.fallback)
    return chain


def _pool_problems(spec: PolicySpec, located: Located) -> Iterator[Problem]:
    """An endpoint listed in pools of both zones would make its zone ambiguous: an
    on-prem pool naming a cloud endpoint sends sensitive requests to the cloud. The
    endpoints are compared as addresses, not as text (see `_same_endpoint`)."""
    seen: dict[str, tuple[str, str, str]] = {}
    for name, pool in spec.pools.items():
        for i, endpoint in enumerate(pool.endpoints):
            zone, first, written = seen.setdefault(
                _same_endpoint(endpoint), (pool.zone, name, endpoint)
            )
            if zone != pool.zone:
                message = f"endpoint '{endpoint}' is also in {zone} pool '{first}'"
                if written != endpoint:
                    message += f" (as '{written}': {_why_same(endpoint, written)})"
                message += "; an endpoint belongs to exactly one zone"
                yield _problem(located, message, "pools", name, "endpoints", i)


_LOOPBACK = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))


def _same_endpoint(endpoint: str) -> str:
    """`endpoint` (host:port, as the schema checked it) in one spelling per address:
    host names in lower case without a trailing dot, IP addresses in their canonical
    form, the port without leading zeros, and `localhost`, 127.0.0.1 and [::1] all as
    `localhost`: each of them is this machine, and gRPC resolves `localhost` to both."""
    host, _, port = endpoint.rpartition(":")
    host = host.removeprefix("[").removesuffix("]").rstrip(".").lower()
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
        ip = mapped or ip
        host = "localhost" if ip in _LOOPBACK else f"[{ip}]" if ip.version == 6 else str(ip)
    return f"{host}:{int(port)}"


def _why_same(a: str, b: str) -> str:
    """Why two different spellings are one endpoint, for the message."""
    if _same_endpoint(a).startswith("localhost:"):
        return "localhost, 127.0.0.1 and [::1] are all this machine"
    if a.lower().replace(".:", ":") == b.lower().replace(".:", ":"):
        return "host names are compared without case or a trailing dot"
    return "the same address"


def _pool_file_problems(spec: PolicySpec, located: Located, *, absolute: bool) -> Iterator[Problem]:
    """A pool's `ca` or `bearer_token_file` that is not there: a router reads both when
    it loads the policy and refuses the policy without them. A relative path is
    resolved against the policy file's folder, as the router does; such a file travels
    with the policy, so its absence is an error. An absolute path names a file on the
    router's host, which need not be this machine: its absence is only a warning (the
    caller asks for one kind or the other)."""
    folder = Path(located.source).parent
    for name, pool in spec.pools.items():
        for key in ("ca", "bearer_token_file"):
            value: str | None = getattr(pool, key)
            if not value or Path(value).is_absolute() is not absolute:
                continue
            path = Path(value) if absolute else folder / value
            if path.is_file():
                continue
            state = "is not a file" if path.exists() else "does not exist"
            if absolute:
                message = f"{key} {path} {state} on this machine; a router refuses this "
                message += "policy unless it is a file on the router's host"
            else:
                message = f"{key} {value}: {path} {state} (paths are relative to the "
                message += "policy file); a router would refuse this policy: create the "
                message += "file or fix the path"
            yield _problem(located, message, "pools", name, key)


def _route_problems(spec: PolicySpec, located: Located) -> Iterator[Problem]:
    for name, route in spec.routes.items():
        if route.pool not in spec.pools:
            message = f"route '{name}' names unknown pool '{route.pool}'"
            yield _problem(
                located, f"{message} (pools: {', '.join(spec.pools)})", "routes", name, "pool"
            )
        yield from _fallback_problems(spec, located, name, route)
        for model, rollout in route.rollouts.items():
            yield from _rollout_problems(spec, located, name, route, model, rollout)
    for key in ("default_route", "sensitive_route"):
        name = getattr(spec, key)
        if name not in spec.routes:
            yield _problem(located, f"unknown route '{name}'", key)
        elif (zone := spec.zone_of(name)) not in ("onprem", None):
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
    if spec.zone_of(name) == "onprem" and spec.zone_of(fallback) == "cloud":
        message = f"on-prem route '{name}' falls back to cloud route '{fallback}': sensitive "
        message += "requests ride on-prem routes, so their fallbacks must stay on-prem"
        yield _problem(located, message, *path)


def _rollout_problems(
    spec: PolicySpec, located: Located, name: str, route: Route, model: str, rollout: RolloutSpec
) -> Iterator[Problem]:
    """THE GUARD for shadow copies: on-prem routes carry the sensitive requests, so what
    they mirror must stay on-prem too. (Model names are plain names, no patterns: the
    schema's `Name` refuses wildcards.)"""
    path = ("routes", name, "rollouts", model)
    shadow = rollout.shadow
    if shadow is None or shadow.pool is None:
        return
    pool = spec.pools.get(shadow.pool)
    if pool is None:
        message = f"shadow names unknown pool '{shadow.pool}' (pools: {', '.join(spec.pools)})"
        yield _problem(located, message, *path, "shadow", "pool")
    elif pool.zone == "cloud" and spec.zone_of(name) != "cloud":
        message = f"route '{name}' mirrors model '{model}' to cloud pool '{shadow.pool}': "
        message += "sensitive requests ride on-prem routes, so their shadow copies must "
        message += "stay on-prem"
        yield _problem(located, message, *path, "shadow", "pool")


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
    enabled = set(spec.detectors.enabled())
    first_line: dict[str, int | None] = {}
    for i, rule in enumerate(spec.rules):
        if rule.id in first_line:
            message = f"duplicate rule id '{rule.id}' (first at line {first_line[rule.id]})"
            yield _problem(located, message, "rules", i, "id")
        first_line.setdefault(rule.id, located.line_of(("rules", i)))
        for j, name in enumerate(rule.match.detected or ()):
            if name not in ("any", "none") and name not in enabled:
                message = _detector_unknown(name, enabled)
                yield _problem(located, message, "rules", i, "match", "detected", j)
        if rule.route is not None and rule.route not in spec.routes:
            yield _problem(located, f"unknown route '{rule.route}'", "rules", i, "route")
        elif rule.route is not None:
            yield from _guard_problems(spec, located, i, rule)


def _detector_unknown(name: str, enabled: set[str]) -> str:
    """A built-in that is switched off and a name that exists nowhere are different
    mistakes; the second is usually a typo, so suggest the closest enabled name."""
    if name in BUILTIN:
        return f"detector '{name}' is not enabled in this policy (add it to detectors.builtin)"
    close = difflib.get_close_matches(name, sorted(enabled), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"detector '{name}' does not exist (not built in, not a custom detector){hint}"


def _guard_problems(
    spec: PolicySpec, located: Located, i: int, rule: RuleSpec
) -> Iterator[Problem]:
    """THE GUARD: no rule may be able to carry a sensitive request to a cloud pool."""
    chain = _chain(spec, rule.route or "")
    cloud = next((r for r in chain if spec.zone_of(r) == "cloud"), None)
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


# --- warnings: reported, the policy still loads ---------------------------------------


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


def _detector_warnings(spec: PolicySpec, located: Located) -> Iterator[Problem]:
    cloud = next((n for n in spec.routes if spec.zone_of(n) == "cloud"), None)
    if spec.detectors.builtin == () and cloud is not None:
        message = "an empty list turns off every built-in detector (email, card numbers, "
        message += "SSNs, IBANs, phones, IP addresses): requests holding them count as not "
        message += f"sensitive and may go to cloud route '{cloud}'; omit 'builtin' to run all"
        yield _problem(located, message, "detectors", "builtin")
    for i, custom in enumerate(spec.detectors.custom):
        if (note := anchor_warning(custom.pattern)) is not None:
            message = f"detector '{custom.name}': {note}"
            yield _problem(located, message, "detectors", "custom", i, "pattern")


def _caller_warnings(spec: PolicySpec, located: Located) -> Iterator[Problem]:
    """A rule's `caller:` that names no listed caller: a typo, or a caller missing from
    `callers`, whose requests are then from an unknown caller (always sensitive)."""
    listed = set(spec.callers)
    for i, rule in enumerate(spec.rules):
        for j, pattern in enumerate(rule.match.caller or ()):
            if pattern in listed or (_wild(pattern) and fnmatch.filter(listed, pattern)):
                continue
            what = "matches no caller" if _wild(pattern) else "is a caller not"
            message = f"rule '{rule.id}': '{pattern}' {what} listed under callers, so its "
            message += "requests count as from an unknown caller (always sensitive); add it "
            message += "to callers or fix the name"
            yield _problem(located, message, "rules", i, "match", "caller", j)


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
        where = (rule.line, render_path(("rules", j)))
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
        rules_match = "rules" if len(by) > 1 else "rule"
        verb = "match" if len(by) > 1 else "matches"
        yield (
            *where,
            f"rule '{rule.id}' is shadowed: earlier {rules_match} {names} {verb} every "
            "request it matches",
        )
