"""`policy diff OLD NEW --cases ...`: what a reviewer needs before approving a change.

Three views of one change, from the most to the least direct:

- rules added, removed, changed (which keys, old -> new) and moved: with first-match
  semantics a pure reordering changes behaviour, so it is reported like an edit;
- settings changed: pools, routes, callers, detectors, sessions, the two routes;
- outcomes: every case decided under both policies, listing those whose decision
  (action, route, zone, rule, sensitivity) differs, cases that would newly go to the
  cloud first, and whether the case's own expectation still holds under NEW.

Rules are matched by id; the settings are compared on the validated spec (the file as
written, defaults filled in), so a change of a default shows only if it is written.
"""

from __future__ import annotations

import argparse
import difflib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hybridroute.config import ConfigError, load_yaml, validate
from hybridroute.router.policy.engine import Decision
from hybridroute.router.policy.render import outcome
from hybridroute.router.policy.schema import Policy, PolicySpec, Rule
from hybridroute.router.policy.testing import CaseResult, load_case_files, run_cases

__all__ = ["OutcomeChange", "outcome_changes", "rule_changes", "run_diff", "setting_changes"]


# --- rules ----------------------------------------------------------------------------


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(", ", ": "), sort_keys=False)


def _rule_body(rule: Rule) -> dict[str, Any]:
    return rule.spec.model_dump(mode="json", exclude={"id"}, exclude_none=True)


def _summary(rule: Rule) -> str:
    body = _rule_body(rule)
    target = f"route {rule.route}" if rule.route else "deny"
    marks = ", marks sensitive" if rule.marks_sensitive else ""
    return f"{target}{marks}; match {_compact(body.get('match', {}))}"


def rule_changes(old: Policy, new: Policy) -> list[str]:
    """One line per added, removed, changed or moved rule (changed: one line per key)."""
    old_rules, new_rules = {r.id: r for r in old.rules}, {r.id: r for r in new.rules}
    lines = []
    for rule in new.rules:
        if rule.id not in old_rules:
            lines.append(f"  + added    {rule.id} ({new.source}:{rule.line}): {_summary(rule)}")
    for rule in old.rules:
        if rule.id not in new_rules:
            lines.append(f"  - removed  {rule.id} ({old.source}:{rule.line}): {_summary(rule)}")
    for rule in new.rules:
        if (before := old_rules.get(rule.id)) is not None:
            lines += _changed(before, rule, new.source)
    lines += _moved(old, new)
    return lines


def _changed(before: Rule, after: Rule, source: str) -> list[str]:
    a, b = _rule_body(before), _rule_body(after)
    keys = [k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]
    if not keys:
        return []
    lines = [f"  ~ changed  {after.id} ({source}:{after.line})"]
    lines += [f"      {k}: {_compact(a.get(k))} -> {_compact(b.get(k))}" for k in keys]
    return lines


def _moved(old: Policy, new: Policy) -> list[str]:
    """Kept rules whose order relative to the other kept rules changed."""
    kept = {r.id for r in old.rules} & {r.id for r in new.rules}
    before = [r.id for r in old.rules if r.id in kept]
    after = [r.id for r in new.rules if r.id in kept]
    matcher = difflib.SequenceMatcher(a=before, b=after, autojunk=False)
    stayed = {before[b.a + i] for b in matcher.get_matching_blocks() for i in range(b.size)}
    return [
        f"  ^ moved    {rid}: position {before.index(rid) + 1} -> {after.index(rid) + 1} "
        "among the kept rules (first match wins: order is behaviour)"
        for rid in after
        if rid not in stayed
    ]


# --- settings -------------------------------------------------------------------------


def _spec(path: Path) -> dict[str, Any]:
    spec = validate(load_yaml(path), PolicySpec)
    return spec.model_dump(mode="json", exclude={"rules"})


def setting_changes(old_path: Path, new_path: Path) -> list[str]:
    """Everything but the rules, compared key by key; lists of names as +/- items."""
    return list(_compare(_spec(old_path), _spec(new_path), ""))


def _compare(a: Any, b: Any, path: str) -> Iterator[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in dict.fromkeys([*a, *b]):
            where = f"{path}.{key}" if path else str(key)
            if key not in a:
                yield f"  + {where}: {_compact(b[key])}"
            elif key not in b:
                yield f"  - {where}: {_compact(a[key])}"
            else:
                yield from _compare(a[key], b[key], where)
    elif isinstance(a, list) and isinstance(b, list) and _names(a) and _names(b):
        if a != b:
            added = [x for x in b if x not in a]
            removed = [x for x in a if x not in b]
            parts = [f"+ {x}" for x in added] + [f"- {x}" for x in removed]
            yield f"  ~ {path}: {', '.join(parts) or 'reordered'}"
    elif a != b:
        yield f"  ~ {path}: {_compact(a)} -> {_compact(b)}"


def _names(items: list[Any]) -> bool:
    return all(isinstance(x, str) for x in items)


# --- outcomes -------------------------------------------------------------------------


@dataclass(frozen=True)
class OutcomeChange:
    old: CaseResult
    new: CaseResult

    @property
    def newly_cloud(self) -> bool:
        return self.new.decision.zone == "cloud" and self.old.decision.zone != "cloud"

    @property
    def left_cloud(self) -> bool:
        return self.old.decision.zone == "cloud" and self.new.decision.zone != "cloud"


def _key(d: Decision) -> tuple[object, ...]:
    return (d.action, d.route, d.zone, d.rule_id, d.sensitive)


def outcome_changes(old: Sequence[CaseResult], new: Sequence[CaseResult]) -> list[OutcomeChange]:
    """Cases decided differently, cases newly going to the cloud first."""
    changes = [
        OutcomeChange(a, b)
        for a, b in zip(old, new, strict=True)
        if _key(a.decision) != _key(b.decision)
    ]
    return sorted(changes, key=lambda c: (not c.newly_cloud, not c.left_cloud))


def _change_lines(change: OutcomeChange) -> list[str]:
    tag = " NOW TO THE CLOUD" if change.newly_cloud else (
        " no longer to the cloud" if change.left_cloud else "")  # fmt: skip
    mark = "!" if change.newly_cloud else "~"
    lines = [f"  {mark} {change.new.loaded.case.name} ({change.new.loaded.where}){tag}"]
    lines.append(f"      old: {outcome(change.old.decision)}")
    lines.append(f"      new: {outcome(change.new.decision)}")
    if change.old.decision.sensitive != change.new.decision.sensitive:
        now = "sensitive" if change.new.decision.sensitive else "not sensitive"
        lines.append(f"      now {now}")
    if change.old.passed and not change.new.passed:
        lines.append(f"      expectation now FAILS: {'; '.join(change.new.problems)}")
    elif change.new.passed and not change.old.passed:
        lines.append("      expectation now passes")
    return lines


# --- the command ------------------------------------------------------------------------


def run_diff(args: argparse.Namespace) -> int:
    """Handler of `hybridroute policy diff` (parser in `policy.cli`)."""
    from hybridroute.router.policy.cli import (
        EXIT_FAILED,
        EXIT_OK,
        load_policy_or_report,
        require_files,
    )

    require_files("policy file", args.old, args.new)
    require_files("cases file", *args.cases)
    old, new = load_policy_or_report(args.old), load_policy_or_report(args.new)
    if old is None or new is None:
        return EXIT_FAILED
    try:
        cases = load_case_files(args.cases)
    except ConfigError as exc:
        print(f"invalid cases file:\n{exc}")
        return EXIT_FAILED
    print(f"policy diff: {old.source} (sha256 {old.version_hash[:12]}) -> "
          f"{new.source} (sha256 {new.version_hash[:12]})")  # fmt: skip
    if old.version_hash == new.version_hash:
        print("the two files are identical")
        return EXIT_OK
    rules = rule_changes(old, new)
    print(f"\nrules: {_changes(sum(not line.startswith('      ') for line in rules))}")
    print("\n".join(rules) if rules else "  (none)")
    settings = setting_changes(args.old, args.new)
    print(f"\nsettings: {_changes(len(settings))}")
    print("\n".join(settings) if settings else "  (none)")
    changes = _print_outcomes(old, new, cases) if cases else []
    return EXIT_FAILED if args.exit_code and changes else EXIT_OK


def _changes(n: int) -> str:
    return f"{n} change{'' if n == 1 else 's'}"


def _print_outcomes(old: Policy, new: Policy, cases: Sequence[Any]) -> list[OutcomeChange]:
    changes = outcome_changes(run_cases(old, cases), run_cases(new, cases))
    cloud = sum(c.newly_cloud for c in changes)
    print(
        f"\noutcomes: {len(cases)} cases, {len(changes)} decided differently"
        + (f", {cloud} NEWLY TO THE CLOUD" if cloud else "")
    )
    for change in changes:
        print("\n".join(_change_lines(change)))
    if not changes:
        print("  (no case changes outcome)")
    return changes
