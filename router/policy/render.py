"""How the policy commands show a decision: its trace, its detector hits, its outcome.

Shared by `policy test` (the trace of a failed case), `policy explain` and `policy
diff`, so a reviewer reads every decision the same way. Like the engine, nothing here
ever shows a value taken from a request: detector hits are a name, a source ("which
input") and character offsets; the rules' "why not" texts are built from the policy
at load time; labels (normalised, as rules see them) and auth kinds come from closed
vocabularies.
"""

from __future__ import annotations

from typing import Any

from hybridroute.router.policy.engine import Decision, RequestFacts, label_key
from hybridroute.router.policy.schema import Policy

__all__ = [
    "decision_dict",
    "detector_lines",
    "explain_dict",
    "explain_lines",
    "outcome",
    "pre_rule_reasons",
    "request_lines",
    "trace_lines",
]


def pre_rule_reasons(decision: Decision) -> list[str]:
    """The verdict before any rule: the reasons not added by a rule, the guard, or
    the engine after the rules (`unmatched`: no rule matched, which is doubt)."""
    return [
        r for r in decision.reasons if r != "unmatched" and not r.startswith(("rule:", "guard:"))
    ]


def outcome(decision: Decision) -> str:
    """One line: `route onprem (zone onprem) by rule classified-on-prem`, `deny by ...`."""
    by = {"default": "no rule matched: default_route", "guard": "the runtime guard"}.get(
        decision.rule_id, f"rule {decision.rule_id}"
    )
    if decision.action == "deny":
        return f"deny by {by}"
    return f"route {decision.route} (zone {decision.zone}) by {by}"


def _verdict(reasons: list[str]) -> str:
    return f"SENSITIVE ({', '.join(reasons)})" if reasons else "not sensitive"


def detector_lines(decision: Decision, indent: str = "  ") -> list[str]:
    """Each hit as `name  source  chars A-B`; never the matched text."""
    if not decision.detector_hits:
        return [f"{indent}(no detector fired)"]
    width = max(len(h.detector) for h in decision.detector_hits)
    swidth = max(len(h.source) for h in decision.detector_hits)
    return [
        f"{indent}{h.detector.ljust(width)}  {h.source.ljust(swidth)}  chars {h.start}-{h.end}"
        for h in decision.detector_hits
    ]


def trace_lines(policy: Policy, decision: Decision, indent: str = "  ") -> list[str]:
    """The verdict, the hits, every rule in order (matched, why not, not evaluated) and
    the decision: what a reviewer needs to see why a request went where it went."""
    lines = [f"{indent}verdict before rules: {_verdict(pre_rule_reasons(decision))}"]
    lines += [f"{indent}detectors:", *detector_lines(decision, indent + "  ")]
    lines.append(f"{indent}rules (first match wins):")
    rules = {r.id: r for r in policy.rules}
    width = max([len(t.rule_id) for t in decision.trace] or [0])
    for n, t in enumerate(decision.trace, 1):
        rule = rules.get(t.rule_id)
        where = f"line {rule.line}" if rule is not None and rule.line else ""
        state = "MATCH" if t.matched else ("no   " if t.evaluated else "-    ")
        detail = "" if t.matched else (t.why_not or "")
        lines.append(f"{indent}  {n:>2}  {t.rule_id.ljust(width)}  {where:<9} {state} {detail}")
    if not decision.trace:
        lines.append(f"{indent}  (the policy has no rules)")
    lines += _decision_lines(policy, decision, indent)
    return [line.rstrip() for line in lines]


def _decision_lines(policy: Policy, decision: Decision, indent: str) -> list[str]:
    lines = []
    if decision.rule_id == "guard":
        overridden = next((r[6:] for r in decision.reasons if r.startswith("guard:")), "?")
        lines.append(
            f"{indent}guard: rule '{overridden}' chose a route outside the on-prem zone for a "
            f"sensitive request; sent to sensitive_route '{policy.sensitive_route}' instead"
        )
    final = [r for r in decision.reasons if r.startswith("rule:")]
    if final:
        lines.append(f"{indent}marked sensitive by: {', '.join(final)}")
    sensitive = "yes" if decision.sensitive else "no"
    if "unmatched" in decision.reasons:
        sensitive += ": no rule matched (doubt)"
    lines.append(f"{indent}sensitive: {sensitive}")
    lines.append(f"{indent}decision: {outcome(decision)}")
    if decision.action == "route":
        fallbacks = " -> ".join(decision.fallbacks) or "none"
        lines.append(f"{indent}pool: {decision.pool}; fallbacks: {fallbacks}")
    return lines


# The label as the engine reads it (`label_key`), never the header's raw value: a
# value that is not a known label may be anything a caller put there, personal data
# included.
_LABEL_SHOWN = {"none": "none (no header)", "invalid": "invalid (not a known label)"}


def request_lines(facts: RequestFacts, pinned: bool) -> list[str]:
    """What the engine was told, by name and kind: caller, model, the label as the
    engine reads it, the sources of the scanned texts (never their content)."""
    sources = [t.source for t in facts.texts]
    unreadable = [t.source for t in facts.texts if t.text is None]
    label = _LABEL_SHOWN.get(key := label_key(facts.label), key)
    lines = [
        f"  caller: {facts.caller or '(none)'} ({facts.auth}); model: {facts.model}"
        + (f" version {facts.model_version}" if facts.model_version else ""),
        f"  x-data-classification: {label}; session: "
        + ("pinned" if pinned else "given" if facts.session_id else "none"),
        f"  texts scanned: {', '.join(sources) if sources else '(none)'}",
    ]
    if unreadable:
        lines.append(f"  unreadable: {', '.join(unreadable)}")
    return lines


def explain_lines(
    policy: Policy, facts: RequestFacts, decision: Decision, pinned: bool
) -> list[str]:
    """The full `policy explain` text."""
    return [
        f"policy: {policy.source} (sha256 {policy.version_hash[:12]}, {len(policy.rules)} rules)",
        "request:",
        *request_lines(facts, pinned),
        *trace_lines(policy, decision, indent=""),
    ]


def decision_dict(decision: Decision) -> dict[str, Any]:
    return {
        "action": decision.action,
        "route": decision.route,
        "zone": decision.zone,
        "pool": decision.pool,
        "rule": decision.rule_id,
        "sensitive": decision.sensitive,
        "reasons": list(decision.reasons),
        "fallbacks": list(decision.fallbacks),
    }


def explain_dict(policy: Policy, decision: Decision) -> dict[str, Any]:
    """`policy explain --json`: the same facts as the text, for tools."""
    lines = {r.id: r.line for r in policy.rules}
    return {
        "policy": {"path": policy.source, "version_hash": policy.version_hash},
        "verdict": {
            "sensitive": bool(pre_rule_reasons(decision)),
            "reasons": pre_rule_reasons(decision),
        },
        "detectors": [h._asdict() for h in decision.detector_hits],
        "findings": dict(decision.findings),
        "rules": [
            {
                "id": t.rule_id,
                "line": lines.get(t.rule_id),
                "evaluated": t.evaluated,
                "matched": t.matched,
                "why_not": t.why_not,
            }
            for t in decision.trace
        ],
        "decision": decision_dict(decision),
    }
