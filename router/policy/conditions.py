"""Compiled `match:` conditions: what a policy rule's conditions become at load.

`compile_match` turns a validated `match:` block into condition objects, cheapest
first; `decide` evaluates them on every request, and the shadow analysis in
`policy.checks` evaluates the very same objects, so the load-time warnings and the
engine cannot disagree about what a rule means. Each condition builds its failure
message once, when compiled, and never shows a value taken from the request.

They live apart from `engine` because they are built once per policy load (from the
policy schema) while the engine runs per request; the engine only calls `why_not`.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Literal, Protocol

from hybridroute.router.policy.engine import AUTH_KINDS, LABEL_KEYS

if TYPE_CHECKING:
    from hybridroute.router.policy.engine import Subject
    from hybridroute.router.policy.schema import MatchSpec

__all__ = [
    "ChoiceCondition",
    "Condition",
    "DetectedCondition",
    "FlagCondition",
    "GlobCondition",
    "MetadataCondition",
    "ParameterCondition",
    "compile_match",
    "param_key",
]


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
