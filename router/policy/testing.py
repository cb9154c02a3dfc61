"""Policy test cases, run offline: `policy test`, `policy explain` and `policy diff` use it.

Cases are decided by the router's own `engine.decide` on the facts the router would
collect for the same request (`cases.facts_from_case`), so a passing case means the
router decides that request the same way; nothing is mocked.

Cases run in file order and share one session store per cases file (time advancing one
second per case), so a case may rely on a session pinned by an earlier one, as the
shipped cases do. Coverage counts a rule as exercised when it *matched* some case, even
if the runtime guard then overrode its route (the trace still shows it matched).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hybridroute.config import Strict, load_yaml, validate
from hybridroute.router.policy.cases import (
    Case,
    CaseExpect,
    CaseFile,
    CaseRequest,
    check_expectations,
    facts_from_case,
)
from hybridroute.router.policy.engine import Decision, decide
from hybridroute.router.policy.schema import Policy, Rule
from hybridroute.router.policy.sessions import SessionPins

__all__ = [
    "CaseResult",
    "Coverage",
    "ExplainRequest",
    "LoadedCase",
    "coverage",
    "deciding_rule",
    "explain_request",
    "load_case_files",
    "load_request",
    "run_cases",
    "select",
]


@dataclass(frozen=True)
class LoadedCase:
    """A case and where it was written, for messages that point at it."""

    case: Case
    source: str
    line: int | None

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}" if self.line else self.source


@dataclass(frozen=True)
class CaseResult:
    loaded: LoadedCase
    decision: Decision
    problems: tuple[str, ...]  # how the decision differs from `expect`; empty: passed

    @property
    def passed(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class Coverage:
    """Which rules some case matched; `default_reached`: some case matched no rule."""

    rules: tuple[Rule, ...]
    exercised: frozenset[str]
    default_reached: bool

    @property
    def missing(self) -> list[Rule]:
        return [r for r in self.rules if r.id not in self.exercised]

    @property
    def percent(self) -> float:
        if not self.rules:
            return 100.0
        return 100.0 * (len(self.rules) - len(self.missing)) / len(self.rules)


def load_case_files(paths: Iterable[str | Path]) -> list[LoadedCase]:
    """Every case of every file, in order; `ConfigError` names file, line and key."""
    loaded: list[LoadedCase] = []
    for path in paths:
        located = load_yaml(path)
        cases = validate(located, CaseFile).cases
        loaded += [
            LoadedCase(case, located.source, located.line_of(("cases", i)))
            for i, case in enumerate(cases)
        ]
    return loaded


def select(cases: Sequence[LoadedCase], pattern: str | None) -> list[LoadedCase]:
    """The cases whose name matches `pattern` (a regex, searched), all when None."""
    if pattern is None:
        return list(cases)
    regex = re.compile(pattern)
    return [c for c in cases if regex.search(c.case.name)]


def run_cases(policy: Policy, cases: Sequence[LoadedCase]) -> list[CaseResult]:
    """Decide every case under `policy` and compare with its expectation."""
    stores: dict[str, SessionPins] = {}
    results = []
    for i, loaded in enumerate(cases):
        sessions = stores.setdefault(
            loaded.source, SessionPins(policy.sessions.pin_ttl, policy.sessions.max_sessions)
        )
        facts = facts_from_case(loaded.case.request, text_budget=policy.max_text_bytes)
        decision = decide(policy, facts, sessions, now=float(i))
        problems = check_expectations(decision, loaded.case.expect)
        results.append(CaseResult(loaded, decision, tuple(problems)))
    return results


def deciding_rule(decision: Decision) -> str | None:
    """The rule that matched (even if the guard overrode it), None for the default."""
    return next((t.rule_id for t in decision.trace if t.matched), None)


def coverage(policy: Policy, results: Sequence[CaseResult]) -> Coverage:
    matched = [deciding_rule(r.decision) for r in results]
    exercised = frozenset(m for m in matched if m is not None)
    return Coverage(policy.rules, exercised, any(m is None for m in matched))


# --- explain ------------------------------------------------------------------------


class ExplainRequest(Strict):
    """An explain file: a bare request, or a case (request plus optional expect)."""

    name: str | None = None
    request: CaseRequest
    expect: CaseExpect | None = None


def load_request(path: str | Path) -> ExplainRequest:
    """A request as written in a case (`caller`, `model`, ...), or a whole case."""
    located = load_yaml(path)
    if isinstance(located.data, dict) and "request" in located.data:
        return validate(located, ExplainRequest)
    return ExplainRequest(request=validate(located, CaseRequest))


def explain_request(
    policy: Policy, request: ExplainRequest, *, session_pinned: bool = False
) -> tuple[Decision, list[str]]:
    """The decision for one request and, if it was a case, how it differs from `expect`.

    `session_pinned` decides as if an earlier request of the same session had carried
    sensitive data (the request gets a session id if it has none).
    """
    facts = facts_from_case(request.request, text_budget=policy.max_text_bytes)
    sessions = SessionPins(policy.sessions.pin_ttl, policy.sessions.max_sessions)
    if session_pinned:
        facts = dataclasses.replace(facts, session_id=facts.session_id or "explain-session")
        sessions.pin(facts.session_id or "", 0.0)
    decision = decide(policy, facts, sessions, now=0.0)
    problems = check_expectations(decision, request.expect) if request.expect else []
    return decision, problems
