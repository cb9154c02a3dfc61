"""`policy check`: every error *and* every warning of a policy file, in one pass.

`compile_policy` stops at the first stage that fails (YAML, schema, meaning), which is
right for a router but not for a reviewer: a policy with one meaning error should still
show its shadowed rules. So when the schema holds but the meaning checks fail, the
warnings are computed on a stand-in `Policy` built from the validated spec (rules
compiled, no detectors instantiated, since a custom pattern may be the very error).
The checks themselves are the router's own (`policy.checks`): `check` and a router
cannot disagree about a file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from hybridroute.config import ConfigError, Located, load_yaml, validate
from hybridroute.router.policy.checks import (
    find_environment_warnings,
    find_problems,
    find_warnings,
)
from hybridroute.router.policy.conditions import compile_match
from hybridroute.router.policy.detectors import Scanner
from hybridroute.router.policy.schema import Policy, PolicySpec, Rule, compile_policy

__all__ = ["CheckMessage", "CheckReport", "check_policy_file"]


@dataclass(frozen=True)
class CheckMessage:
    """One finding of `policy check`, located like a compiler message."""

    severity: Literal["error", "warning"]
    source: str
    line: int | None
    where: str
    message: str

    def __str__(self) -> str:
        loc = f"{self.source}:{self.line}" if self.line else self.source
        where = f" {self.where}:" if self.where else ""
        return f"{loc}:{where} {self.severity}: {self.message}"

    def as_dict(self) -> dict[str, object]:
        return {
            "severity": self.severity,
            "file": self.source,
            "line": self.line,
            "key": self.where,
            "message": self.message,
        }


@dataclass(frozen=True)
class CheckReport:
    """Everything `check` found; `policy` is set only when the file is loadable."""

    source: str
    messages: tuple[CheckMessage, ...]
    policy: Policy | None

    @property
    def errors(self) -> list[CheckMessage]:
        return [m for m in self.messages if m.severity == "error"]

    @property
    def warnings(self) -> list[CheckMessage]:
        return [m for m in self.messages if m.severity == "warning"]


def check_policy_file(path: str | Path) -> CheckReport:
    """Errors and warnings of one policy file, sorted by line."""
    source = str(path)
    try:
        policy = compile_policy(path)
    except ConfigError as exc:
        errors = [CheckMessage("error", exc.source, *p) for p in exc.problems]
        return _report(source, [*errors, *_warnings_despite_errors(path)], None)
    warnings = [
        CheckMessage("warning", w.source, w.line, w.where, w.message) for w in policy.warnings
    ]
    # What this machine's environment lacks (an unset bearer token variable): a warning,
    # since the router's environment may differ.
    located = load_yaml(path)
    warnings += [
        CheckMessage("warning", located.source, line, where, message)
        for line, where, message in find_environment_warnings(policy.pools, located)
    ]
    return _report(source, warnings, policy)


def _report(source: str, messages: list[CheckMessage], policy: Policy | None) -> CheckReport:
    ordered = sorted(messages, key=lambda m: (m.line or 0, m.severity != "error", m.where))
    return CheckReport(source, tuple(ordered), policy)


def _warnings_despite_errors(path: str | Path) -> list[CheckMessage]:
    """Warnings for a policy whose schema is valid but whose meaning is not."""
    try:
        located = load_yaml(path)
        spec = validate(located, PolicySpec)
    except ConfigError:
        return []  # YAML or schema errors: nothing further can be said reliably
    if not find_problems(spec, located):
        return []  # compile failed for another reason; the errors say which
    stand_in = _stand_in(spec, located)
    return [
        CheckMessage("warning", located.source, line, where, message)
        for line, where, message in find_warnings(spec, located, stand_in)
    ]


def _stand_in(spec: PolicySpec, located: Located) -> Policy:
    """A `Policy` good enough for the warning analysis (rules, callers, detector names)
    but never for deciding: it has no detectors to scan with."""
    rules = tuple(
        Rule(r.id, i, located.line_of(("rules", i)), r.route, r.sensitive is True,
             compile_match(r.match), r)
        for i, r in enumerate(spec.rules)
    )  # fmt: skip
    return Policy(
        source=located.source,
        version_hash=hashlib.sha256(b"").hexdigest(),
        pools=MappingProxyType(dict(spec.pools)),
        routes=MappingProxyType(dict(spec.routes)),
        rules=rules,
        callers=frozenset(spec.callers),
        sensitive_route=spec.sensitive_route,
        default_route=spec.default_route,
        detectors=spec.detectors.enabled(),
        max_text_bytes=spec.detectors.max_text_bytes,
        sessions=spec.sessions,
        scanner=Scanner([], max_chars=spec.detectors.max_text_bytes),
    )
