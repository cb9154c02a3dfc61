"""`hybridroute policy check | test | explain | diff | replay`: messages and exit codes.

Called in-process (`hybridroute.cli.main`) with capsys: each command is a function of
its files, no server is involved. Secret-looking values sent in requests must never
appear in any output.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import time
from importlib import resources
from pathlib import Path

import pytest

from hybridroute.cli import main
from hybridroute.router.audit.events import AuditEvent
from hybridroute.router.audit.store import AuditStore
from hybridroute.router.config import AuditConfig
from hybridroute.router.policy.cases import facts_from_case
from hybridroute.router.policy.engine import decide, label_key
from hybridroute.router.policy.lint import check_policy_file
from hybridroute.router.policy.replay import RecordedDecision, redecide, replay
from hybridroute.router.policy.schema import compile_policy
from hybridroute.router.policy.sessions import SessionPins
from hybridroute.router.policy.testing import load_case_files

POLICIES = Path(str(resources.files("hybridroute.policies")))
DEFAULT = POLICIES / "default.yaml"
CASES = POLICIES / "tests" / "default_cases.yaml"
SSN, EMAIL = "321-54-9876", "jane.doe@example.com"


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def edited(tmp_path: Path, name: str, *pairs: tuple[str, str]) -> Path:
    """A copy of the default policy with each (old, new) replacement made (must apply)."""
    text = DEFAULT.read_text()
    for old, new in pairs:
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / name
    path.write_text(text)
    return path


BAD = """\
version: 1
pools:
  onprem: {zone: onprem, endpoints: ["10.0.0.1:1"]}
  cloud: {zone: cloud, endpoints: ["10.0.0.2:1"]}
routes:
  onprem: {pool: onprem}
  cloud: {pool: cloud, fallback: onprem}
  lost: {pool: nowhere}
callers: [demo-app]
detectors:
  builtin: [email, passport]
  custom:
    - {name: ticket, pattern: '(?=TCK)TCK-[0-9]+'}
    - {name: broken, pattern: '(unclosed'}
sensitive_route: onprem
default_route: onprem
rules:
  - id: everything-onprem
    route: onprem
  - id: public-to-cloud
    match: {label: [public]}
    route: cloud
  - id: typo
    match: {detected: [emial]}
    route: onprem
"""


# --- check --------------------------------------------------------------------------


def test_check_accepts_the_shipped_policy(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HYBRIDROUTE_CLOUD_TOKEN", "t0ken")
    code, out, _ = run(capsys, "policy", "check", DEFAULT)
    assert code == 0
    assert re.search(r"default\.yaml: OK: 0 errors, 0 warnings \(sha256 [0-9a-f]{12}; 8 rules", out)
    # Where the cloud's token variable is unset, check says so (the router would refuse).
    monkeypatch.delenv("HYBRIDROUTE_CLOUD_TOKEN")
    code, out, _ = run(capsys, "policy", "check", DEFAULT)
    assert code == 0 and "OK: 0 errors, 1 warning" in out
    assert (
        "pools.cloud.bearer_token_env: warning: environment variable HYBRIDROUTE_CLOUD_TOKEN" in out
    )


def test_check_lists_every_error_and_warning_with_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    code, out, _ = run(capsys, "policy", "check", path)
    assert code == 1
    expected = [
        f"{path}:8: routes.lost.pool: error: route 'lost' names unknown pool 'nowhere'",
        f"{path}:11: detectors.builtin[1]: error: unknown built-in detector 'passport'",
        f"{path}:13: detectors.custom[0].pattern: error: detector 'ticket': uses lookarounds "
        "(invalid perl operator: (?=): custom patterns run on RE2 (linear time, nothing "
        "backtracks), which does not support them",
        f"{path}:14: detectors.custom[1].pattern: error: detector 'broken': does not compile",
        f"{path}:20: rules[1]: warning: rule 'public-to-cloud' is shadowed: earlier rule "
        "'everything-onprem' (line 18)",
        f"{path}:22: rules[1].route: error: rule 'public-to-cloud' can send sensitive requests "
        "to cloud pool 'cloud'",
        f"{path}:24: rules[2].match.detected[0]: error: detector 'emial' does not exist "
        "(not built in, not a custom detector); did you mean 'email'?",
        f"{path}: INVALID: 6 errors, 3 warnings",
    ]
    for fragment in expected:
        assert fragment in out, f"{fragment}\n--- not in ---\n{out}"
    lines = [int(m) for m in re.findall(rf"^{re.escape(str(path))}:(\d+):", out, re.M)]
    assert lines == sorted(lines)  # one report, in file order


def test_check_names_a_builtin_that_is_only_switched_off(tmp_path: Path) -> None:
    path = edited(
        tmp_path,
        "p.yaml",
        ("match: {detected: any}", "match: {detected: [iban]}"),
        ("credit_card, iban,", "credit_card,"),
    )
    errors = [str(m) for m in check_policy_file(path).errors]
    assert any("detector 'iban' is not enabled in this policy (add it to detectors.builtin)" in e
               for e in errors), errors  # fmt: skip


def test_check_schema_syntax_and_missing_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    schema = edited(
        tmp_path, "s.yaml", ("default_route:", "default_rout:"), ("zone: cloud", "zone: cluod")
    )
    syntax = tmp_path / "y.yaml"
    syntax.write_text("version: 1\npools: {onprem: {zone: onprem\nroutes: [\n")
    code, out, _ = run(capsys, "policy", "check", schema, syntax, DEFAULT)
    assert code == 1
    assert f"{schema}:" in out and "default_rout: error: unknown key (allowed: version," in out
    assert "pools.cloud.zone: error: Input should be 'onprem' or 'cloud'" in out
    assert f"{syntax}:3: error: invalid YAML" in out
    assert "default.yaml: OK" in out  # every file is reported, not just up to the first bad one
    # A file that is not there (or is a folder) is a usage error, as for test and explain.
    for missing, said in (
        (tmp_path / "missing.yaml", f"policy file not found: {tmp_path / 'missing.yaml'}"),
        (tmp_path, f"policy file {tmp_path} is a directory, not a file"),
    ):
        code, out, err = run(capsys, "policy", "check", DEFAULT, missing)
        assert (code, out) == (2, "") and said in err


def test_self_containing_or_too_deep_yaml_is_an_error_with_its_line_in_every_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recursive, deep = tmp_path / "rec.yaml", tmp_path / "deep.yaml"
    recursive.write_text("version: 1\ncallers: &x [*x]\n")
    deep.write_text("version: 1\ncases: " + "[" * 10_000 + "]" * 10_000 + "\n")
    code, out, _ = run(capsys, "policy", "check", recursive, deep)
    assert code == 1 and f"{recursive}:2: callers[0]: error: recursive alias" in out
    assert f"{deep}:2: error: nested more than 100 levels deep" in out
    code, _, err = run(capsys, "policy", "test", DEFAULT, deep)
    assert code == 1 and f"{deep}:2: nested more than 100 levels deep" in err
    code, _, err = run(capsys, "policy", "explain", DEFAULT, "--request", recursive)
    assert code == 1 and f"{recursive}:2: callers[0]: recursive alias" in err


def test_check_reports_a_pool_file_the_router_would_not_find(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = ("bearer_token_env: HYBRIDROUTE_CLOUD_TOKEN", "bearer_token_file: cloud.token")
    path = edited(tmp_path, "p.yaml", token)
    line = path.read_text().splitlines().index("    bearer_token_file: cloud.token") + 1
    code, out, _ = run(capsys, "policy", "check", path)
    assert code == 1 and "INVALID: 1 error, 0 warnings" in out
    assert (
        f"{path}:{line}: pools.cloud.bearer_token_file: error: bearer_token_file "
        f"cloud.token: {tmp_path / 'cloud.token'} does not exist (paths are relative to the "
        "policy file)" in out
    )
    (tmp_path / "cloud.token").write_text("t0ken\n")
    code, out, _ = run(capsys, "policy", "check", path)
    assert code == 0 and "OK: 0 errors, 0 warnings" in out


def test_check_strict_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HYBRIDROUTE_CLOUD_TOKEN", "t0ken")
    catch_all = "  - id: all\n    match: {sensitive: false}\n    route: onprem\n\n"
    last = "  - id: public-clean-to-cloud\n"
    shadowed = edited(tmp_path, "w.yaml", (last, catch_all + last))
    assert run(capsys, "policy", "check", shadowed)[0] == 0  # warnings alone pass
    code, out, _ = run(capsys, "policy", "check", "--strict", "--json", shadowed)
    assert code == 1
    data = json.loads(out)
    assert data["valid"] is True and data["errors"] == []
    assert data["warnings"][0]["key"] == "rules[8]" and "shadowed" in data["warnings"][0]["message"]
    assert data["version_hash"] == compile_policy(shadowed).version_hash


# --- test ---------------------------------------------------------------------------


def test_the_shipped_cases_pass_with_full_coverage(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "policy", "test", DEFAULT, CASES, "--fail-under", "100")
    assert code == 0, out
    assert out.count("PASS  ") == 20 and "FAIL" not in out
    assert "rule coverage: 8/8 rules (100.0%)" in out
    assert out.rstrip().splitlines()[-1] == "20 passed, 0 failed"


CASE_FILE = f"""\
cases:
  - name: clean public goes out
    request:
      caller: demo-app
      model: ticket-triage
      metadata: {{x-data-classification: public}}
      inputs: {{text: ["what is the weather like"]}}
    expect: {{zone: cloud}}
  - name: wrongly expects an SSN to go to the cloud
    request:
      caller: demo-app
      model: ticket-triage
      metadata: {{x-data-classification: public}}
      inputs: {{text: ["my ssn {SSN}", "mail {EMAIL}"]}}
    expect: {{zone: cloud, sensitive: false}}
"""


def test_a_failing_case_shows_its_trace_but_no_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text(CASE_FILE)
    code, out, _ = run(capsys, "policy", "test", DEFAULT, cases)
    assert code == 1
    assert f"PASS  clean public goes out  ({cases}:2)" in out
    assert f"FAIL  wrongly expects an SSN to go to the cloud  ({cases}:9)" in out
    assert "expected zone 'cloud', got 'onprem'" in out
    assert "expected sensitive False, got True" in out
    trace = out.split("FAIL", 1)[1]
    assert "verdict before rules: SENSITIVE (detector:email, detector:us_ssn)" in trace
    assert re.search(r"us_ssn\s+input:text\[0\]\s+chars 7-18", trace)
    assert re.search(r"deny-unknown-callers\s+line \d+\s+no\s+caller_known is true", trace)
    assert re.search(r"personal-data-on-prem\s+line \d+\s+MATCH", trace)
    assert "decision: route onprem (zone onprem) by rule personal-data-on-prem" in trace
    assert SSN not in out and EMAIL not in out
    assert "rule coverage: 2/8 rules (25.0%)" in out
    assert re.search(r"not exercised: restricted-models \(.*default\.yaml:\d+\)", out)
    assert out.rstrip().splitlines()[-1] == "1 passed, 1 failed"


def test_fail_under_and_run_filter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "policy", "test", DEFAULT, CASES, "--run", "stays on-prem$")
    assert code == 0 and "FAIL" not in out and "20 passed" not in out
    code, out, _ = run(
        capsys, "policy", "test", DEFAULT, CASES, "--run", "cloud", "--fail-under", "50%"
    )
    assert code == 1
    assert "coverage 12.5% is under --fail-under 50%" in out
    code, out, _ = run(capsys, "policy", "test", DEFAULT, CASES, "--run", "nothing-like-this")
    assert code == 1 and "no cases ran" in out
    with pytest.raises(SystemExit) as info:  # argparse: usage error
        run(capsys, "policy", "test", DEFAULT, CASES, "--fail-under", "120")
    assert info.value.code == 2 and "a percentage is between 0 and 100" in capsys.readouterr().err


def test_invalid_policy_or_cases_fail_with_their_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text("cases:\n  - name: x\n    request: {model: m, caler: a}\n    expect: {}\n")
    code, _, err = run(capsys, "policy", "test", DEFAULT, cases)
    assert code == 1 and f"{cases}:3: cases[0].request.caler: unknown key" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    code, _, err = run(capsys, "policy", "test", bad, CASES)
    assert code == 1 and "the policy is invalid" in err and f"{bad}:22: rules[1].route" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["diff", DEFAULT, "{missing}"],
        ["diff", "{missing}", DEFAULT],
        ["replay", "{missing}", "--db", "{missing}.db"],
        ["test", "{missing}", CASES],
        ["explain", "{missing}", "--request", CASES],
    ],
)
def test_a_policy_file_that_is_not_there_is_named_not_called_invalid(
    argv: list[str | Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "new.yaml"  # a typo in a README command
    code, out, err = run(capsys, "policy", *(str(a).format(missing=missing) for a in argv))
    assert code == 2 and out == ""  # could not run; 1 would read as `diff --exit-code` changes
    assert err == f"hybridroute: error: policy file not found: {missing}\n"


def test_a_cases_or_request_file_that_is_not_there_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "cases.yaml"
    for argv in (["test", DEFAULT, missing], ["diff", DEFAULT, DEFAULT, "--cases", missing]):
        code, out, err = run(capsys, "policy", *argv)
        assert code == 2 and out == "" and f"cases file not found: {missing}" in err, argv
    code, _, err = run(capsys, "policy", "explain", DEFAULT, "--request", tmp_path)
    assert code == 2 and f"request file {tmp_path} is a directory" in err


# --- explain ------------------------------------------------------------------------

REQUEST = f"""\
caller: demo-app
model: ticket-triage
metadata: {{x-data-classification: public, x-requested-by: EMP-123456}}
inputs: {{text: ["please update my SSN {SSN}", "thanks"]}}
parameters: {{note: "mail {EMAIL}"}}
"""


def test_explain_shows_rules_hits_verdict_and_decision_never_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    request = tmp_path / "req.yaml"
    request.write_text(REQUEST)
    code, out, _ = run(capsys, "policy", "explain", DEFAULT, "--request", request)
    assert code == 0
    assert (
        "texts scanned: metadata:x-requested-by, parameter:note, input:text[0], "
        "input:text[1], names" in out
    )
    assert "SENSITIVE (detector:email, detector:employee_id, detector:us_ssn)" in out
    assert re.search(r"us_ssn\s+input:text\[0\]\s+chars 21-32", out)
    assert re.search(r"email\s+parameter:note\s+chars 5-25", out)
    assert re.search(r"employee_id\s+metadata:x-requested-by\s+chars 0-10", out)
    rules = [r.id for r in compile_policy(DEFAULT).rules]
    for n, rule_id in enumerate(rules, 1):
        assert re.search(rf"^\s+{n}\s+{rule_id}\s+line \d+", out, re.M), rule_id
    assert re.search(r"classified-on-prem .* no\s+label 'public' not in \[internal", out)
    assert re.search(r"unlabelled-on-prem .* -\s+not evaluated", out)
    assert "decision: route onprem (zone onprem) by rule personal-data-on-prem" in out
    for secret in (SSN, EMAIL, "EMP-123456"):
        assert secret not in out


def test_explain_shows_the_label_as_the_engine_reads_it_never_the_header(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    request = tmp_path / "req.yaml"
    for header, shown in [
        (f'"SSN {SSN}"', "invalid (not a known label)"),
        ('" Public "', "public"),
        (None, "none (no header)"),
    ]:
        metadata = f"metadata: {{x-data-classification: {header}}}\n" if header else ""
        request.write_text(f"caller: demo-app\nmodel: m\n{metadata}")
        code, out, _ = run(capsys, "policy", "explain", DEFAULT, "--request", request)
        assert code == 0 and f"  x-data-classification: {shown}; session: none" in out
        assert SSN not in out and "Public" not in out


def test_explain_json_session_pin_and_expectations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    request = tmp_path / "case.yaml"
    request.write_text(
        "name: clean\nrequest:\n  caller: analytics\n  model: m\n"
        "  metadata: {x-data-classification: public}\nexpect: {zone: cloud}\n"
    )
    code, out, _ = run(capsys, "policy", "explain", DEFAULT, "--request", request, "--json")
    data = json.loads(out)
    assert code == 0 and data["expectation"] == {"passed": True, "problems": []}
    assert data["decision"]["zone"] == "cloud" and data["verdict"]["sensitive"] is False
    assert [r["matched"] for r in data["rules"]].count(True) == 1
    code, out, _ = run(
        capsys, "policy", "explain", DEFAULT, "--request", request, "--session-pinned"
    )
    assert code == 1  # pinned: stays on-prem, so the case's expectation is not met
    assert "verdict before rules: SENSITIVE (session-pinned)" in out
    assert "expectation: NOT met: expected zone 'cloud', got 'onprem'" in out
    request.write_text("caller: demo-app\nmodle: m\n")
    code, _, err = run(capsys, "policy", "explain", DEFAULT, "--request", request)
    assert code == 1 and f"{request}:2: modle: unknown key" in err


# --- diff ---------------------------------------------------------------------------


UNLABELLED_TO_CLOUD = (
    "match: {label: [none]}\n    route: onprem",
    "match: {label: [none], sensitive: false}\n    route: cloud",
)


def _changed_policy(tmp_path: Path) -> Path:
    return edited(
        tmp_path,
        "new.yaml",
        UNLABELLED_TO_CLOUD,
        ("label: [internal, confidential, restricted]}", "label: [confidential, restricted]}"),
        ("  - batch-jobs  # nightly", "  - partner-app\n  - batch-jobs  # nightly"),
        ("  - id: restricted-models", "  - id: partner-deny\n    match: {caller: [partner-app]}\n"
         "    action: deny\n\n  - id: restricted-models"),
    )  # fmt: skip


def test_diff_lists_rule_setting_and_outcome_changes_cloud_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    new = _changed_policy(tmp_path)
    code, out, _ = run(capsys, "policy", "diff", DEFAULT, new, "--cases", CASES)
    assert code == 0
    assert re.search(r"\+ added    partner-deny \(.*new\.yaml:\d+\): deny; match", out)
    assert "~ changed  classified-on-prem" in out
    was, now = '["internal", "confidential", "restricted"]', '["confidential", "restricted"]'
    assert f'match: {{"label": {was}}} -> {{"label": {now}}}' in out
    assert "~ changed  unlabelled-on-prem" in out and 'route: "onprem" -> "cloud"' in out
    assert "~ callers: + partner-app" in out
    outcomes = out.split("outcomes:", 1)[1]
    assert outcomes.startswith(" 20 cases, 2 decided differently, 1 NEWLY TO THE CLOUD")
    first = outcomes.splitlines()[1]
    assert "a clean request without a label stays on-prem" in first and "NOW TO THE CLOUD" in first
    assert "new: route cloud (zone cloud) by rule unlabelled-on-prem" in outcomes
    assert "expectation now FAILS: expected zone 'onprem', got 'cloud'" in outcomes
    assert run(capsys, "policy", "diff", DEFAULT, new, "--cases", CASES, "--exit-code")[0] == 1


def test_diff_reports_a_reordering_and_identical_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = DEFAULT.read_text()
    start, end = text.index("  - id: batch-jobs-on-prem"), text.index("  - id: classified-on-prem")
    block = text[start:end]
    text = text[:start] + text[end:]
    at = text.index("  - id: public-clean-to-cloud")
    moved = tmp_path / "moved.yaml"
    moved.write_text(text[:at] + block + text[at:])
    code, out, _ = run(capsys, "policy", "diff", DEFAULT, moved, "--cases", CASES, "--exit-code")
    assert code == 0  # batch jobs are sensitive: no case changes outcome...
    assert "^ moved    batch-jobs-on-prem: position 3 -> 7" in out  # ...but order is behaviour
    assert "(no case changes outcome)" in out and "settings: 0 changes" in out
    code, out, _ = run(capsys, "policy", "diff", DEFAULT, DEFAULT)
    assert code == 0 and "the two files are identical" in out


# --- replay -------------------------------------------------------------------------


def _audit_db(path: Path, policy_path: Path = DEFAULT, age: float = 3600.0) -> int:
    """An audit database written by the router's own `AuditStore`, holding the decisions
    the router makes for the shipped cases, plus one unauthenticated rejection."""
    policy = compile_policy(policy_path)
    sessions, start = SessionPins(1800, 100), time.time() - age
    events = [AuditEvent("x", "rejected", None, "none", "ModelInfer", code="UNAUTHENTICATED")]
    for seq, loaded in enumerate(load_case_files([CASES]), 1):
        facts = facts_from_case(loaded.case.request, text_budget=policy.max_text_bytes)
        d = decide(policy, facts, sessions, now=float(seq))
        events.append(AuditEvent(
            request_id=f"r{seq}", outcome="routed" if d.action == "route" else "denied",
            caller=facts.caller, auth=facts.auth, method="ModelInfer", model=facts.model,
            label=label_key(facts.label), policy_hash=d.policy_hash, rule_id=d.rule_id,
            sensitive=d.sensitive, reasons=d.reasons, findings=d.findings, route=d.route or "",
            zone=d.zone or "", pool=d.pool or "", time=start + seq, session_id=facts.session_id,
            trace=d.trace, hits=d.detector_hits,
        ))  # fmt: skip

    async def write() -> None:
        store = AuditStore(AuditConfig(db=path).resolved(path.parent))
        await store.start()
        for event in events:
            await store.record(event)
        await store.close()

    asyncio.run(write())
    return len(events) - 1


def test_replay_under_the_same_policy_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "audit.db"
    total = _audit_db(db)
    code, out, _ = run(capsys, "policy", "replay", DEFAULT, "--db", db)
    assert code == 0
    assert f"replayed {total} decisions under" in out and "NEWLY TO THE CLOUD: 0" in out
    assert "(1 records refused before any decision were skipped)" in out
    table = out.split("old route/zone -> new route/zone: requests", 1)[1].split("\n\n")[0]
    assert all("(unchanged)" in line for line in table.strip().splitlines())


def test_replay_lists_requests_newly_going_to_the_cloud_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "audit.db"
    _audit_db(db)
    relaxed = edited(
        tmp_path,
        "relaxed.yaml",
        UNLABELLED_TO_CLOUD,
        ("  custom:\n    - {name: employee_id, pattern: '\\bEMP-[0-9]{6}\\b'}\n", ""),
    )  # fmt: skip
    code, out, _ = run(capsys, "policy", "replay", relaxed, "--db", db, "--since", "2h")
    assert code == 0
    newly = out.split("NEWLY TO THE CLOUD: 2\n", 1)[1].split("\n\n")[0]
    assert "label none  findings none" in newly
    assert "onprem/onprem by unlabelled-on-prem -> cloud/cloud by unlabelled-on-prem" in newly
    assert "findings employee_id x1" in newly  # NEW no longer runs that detector
    assert re.search(r"onprem/onprem -> cloud/cloud\s+2  NEWLY CLOUD", out)
    assert "1 record(s) had employee_id findings; NEW does not enable employee_id" in out
    assert run(capsys, "policy", "replay", relaxed, "--db", db, "--fail-on-cloud")[0] == 1
    code, out, _ = run(capsys, "policy", "replay", relaxed, "--db", db, "--json", "--limit", "1")
    data = json.loads(out)
    assert data["newly_cloud_total"] == 2 and len(data["newly_cloud"]) == 1
    assert data["undecided"] == 1 and data["dropped_findings"] == {"employee_id": 1}


def test_replay_time_window_and_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "audit.db"
    _audit_db(db, age=7200)
    assert (
        "replayed 0 decisions"
        in run(capsys, "policy", "replay", DEFAULT, "--db", db, "--since", "1h")[1]
    )
    until = dt.datetime.fromtimestamp(time.time() - 7200 + 5.5, dt.UTC).isoformat()
    code, out, _ = run(capsys, "policy", "replay", DEFAULT, "--db", db, "--until", until)
    assert code == 0 and "replayed 5 decisions" in out
    code, _, err = run(capsys, "policy", "replay", DEFAULT, "--db", db, "--since", "yesterday")
    assert code == 2 and "--since 'yesterday': give an age" in err
    code, _, err = run(capsys, "policy", "replay", DEFAULT, "--db", tmp_path / "none.db")
    assert code == 2 and "no such audit database" in err


def _recorded(**changes: object) -> RecordedDecision:
    base: dict[str, object] = dict(
        ref="seq 1", time=0.0, caller="demo-app", auth="cert", model="ticket-triage",
        model_version="", label="public", findings={}, doubts=(), session_pinned=False,
        outcome="routed", route="cloud", zone="cloud", rule="public-clean-to-cloud",
        policy_hash="x",
    )  # fmt: skip
    return RecordedDecision(**{**base, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"doubts": ("unreadable",)}, "unreadable"),
        ({"doubts": ("text-too-large",)}, "text-too-large"),
        ({"doubts": ("scan-error",)}, "scan-error"),
        ({"session_pinned": True}, "session-pinned"),
        ({"findings": {"email": 2}}, "detector:email"),
        ({"label": "invalid"}, "label:invalid"),
        ({"caller": "stranger"}, "unknown-caller"),
    ],
)
def test_replay_reproduces_every_recorded_cause_of_sensitivity(
    changes: dict[str, object], reason: str
) -> None:
    policy = compile_policy(DEFAULT)
    assert redecide(policy, _recorded()).zone == "cloud"
    decision = redecide(policy, _recorded(**changes))
    assert decision.sensitive and reason in decision.reasons and decision.zone != "cloud"
    report = replay(policy, [_recorded(), _recorded(**changes)])
    assert report.replayed == 2 and not report.newly_cloud
    if "findings" in changes:
        assert decision.findings == {"email": 2}
