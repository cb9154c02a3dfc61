"""Policy and case files that YAML or a hurried author get subtly wrong: each is refused
or warned about with its file, line and what to write instead, and the offline
commands decide as the router does."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from hybridroute.cli import main
from hybridroute.config import ConfigError
from hybridroute.router.policy.cases import load_cases
from hybridroute.router.policy.lint import check_policy_file
from hybridroute.router.policy.schema import compile_policy

POLICIES = Path(str(resources.files("hybridroute.policies")))
DEFAULT = POLICIES / "default.yaml"

HEAD = """\
version: 1
pools:
  onprem: {{zone: onprem, endpoints: ["127.0.0.1:8101"]}}
  cloud: {{zone: cloud, endpoints: ["127.0.0.1:8201"]}}
routes:
  onprem: {{pool: onprem}}
  cloud: {{pool: cloud, fallback: onprem}}
callers: {callers}
detectors: {detectors}
sensitive_route: onprem
default_route: onprem
rules:
{rules}"""
CLOUD_RULE = (
    "  - {id: public-clean-to-cloud, match: {label: [public], sensitive: false}, route: cloud}"
)


def policy_file(
    tmp_path: Path, *, callers: str = "[demo-app]", detectors: str = "{}", rules: str = CLOUD_RULE
) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(HEAD.format(callers=callers, detectors=detectors, rules=rules + "\n"))
    return path


def errors_of(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        compile_policy(path)
    return str(info.value)


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- versions, callers and metadata names as YAML reads them ----------------------------


@pytest.mark.parametrize(
    ("written", "said"),
    [
        ("[1.10]", "YAML reads this version as the number 1.1, not as written (1.10 becomes "
         "1.1): quote the version, e.g. '1.10'"),
        ("2.0", "YAML reads this version as the number 2.0"),
        ("[yes]", "YAML reads on/off/yes/no/true/false as booleans (this one as true): quote "
         "the version"),
    ],
)  # fmt: skip
def test_a_model_version_yaml_turned_into_a_float_or_bool_is_refused(
    tmp_path: Path, written: str, said: str
) -> None:
    rules = f"  - {{id: v, match: {{model_version: {written}}}, route: onprem}}\n" + CLOUD_RULE
    path = policy_file(tmp_path, rules=rules)
    assert f"{path}:13: rules[0].match.model_version: {said}" in errors_of(path)


def test_whole_number_and_quoted_versions_still_load(tmp_path: Path) -> None:
    rules = "  - {id: v, match: {model_version: [2, '1.10']}, route: onprem}\n" + CLOUD_RULE
    rule = compile_policy(policy_file(tmp_path, rules=rules)).rules[0]
    assert rule.spec.match.model_version == ("2", "1.10")


@pytest.mark.parametrize(
    ("callers", "said"),
    [
        ('[demo-app, "demo-*"]', "callers[1]: 'demo-*' is a pattern, but callers are exact "
         "identities (a certificate CN or DNS name, a token name), compared as written"),
        ("[demo-app, 'app?']", "callers[1]: 'app?' is a pattern"),
        ("[demo-app, on]", "callers[1]: YAML reads on/off/yes/no/true/false as booleans (this "
         "one as true); quote this caller"),
        ('[demo-app, ""]', "callers[1]: a caller cannot be empty"),
        ('[" demo-app"]', "callers[0]: ' demo-app' has spaces around it; identities are "
         "compared exactly"),
    ],
)  # fmt: skip
def test_callers_are_exact_identities(tmp_path: Path, callers: str, said: str) -> None:
    path = policy_file(tmp_path, callers=callers)
    assert f"{path}:8: {said}" in errors_of(path)


def test_a_rule_naming_an_unlisted_caller_is_warned(tmp_path: Path) -> None:
    rules = (
        "  - {id: jobs, match: {caller: [batch-job]}, route: onprem}\n"
        "  - {id: demos, match: {caller: ['demo-*', 'ci-*']}, route: onprem}\n" + CLOUD_RULE
    )
    path = policy_file(tmp_path, rules=rules)
    warnings = [str(w) for w in compile_policy(path).warnings]
    assert warnings == [
        f"{path}:13: rules[0].match.caller[0]: warning: rule 'jobs': 'batch-job' is a caller "
        "not listed under callers, so its requests count as from an unknown caller (always "
        "sensitive); add it to callers or fix the name",
        f"{path}:14: rules[1].match.caller[1]: warning: rule 'demos': 'ci-*' matches no caller "
        "listed under callers, so its requests count as from an unknown caller (always "
        "sensitive); add it to callers or fix the name",
    ]


def test_an_uppercase_metadata_name_in_a_rule_must_be_lowercase(tmp_path: Path) -> None:
    rules = "  - {id: t, match: {metadata: {X-Tenant: [acme]}}, route: onprem}\n" + CLOUD_RULE
    path = policy_file(tmp_path, rules=rules)
    assert (
        f"{path}:13: rules[0].match.metadata.X-Tenant: invalid key: metadata name 'X-Tenant' "
        "must be lowercase ('x-tenant'): gRPC metadata names are lowercase"
    ) in errors_of(path)


def test_a_case_with_an_uppercase_metadata_name_is_refused(tmp_path: Path) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text(
        "cases:\n  - name: wrong case\n    request:\n      model: m\n"
        "      metadata: {X-Data-Classification: public}\n    expect: {zone: cloud}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_cases(cases)
    assert (
        f"{cases}:5: cases[0].request.metadata: metadata name 'X-Data-Classification': gRPC "
        "metadata names are lowercase; write 'x-data-classification'"
    ) in str(info.value)


# --- detectors that do nothing, or less than they seem to -------------------------------


def test_an_empty_builtin_list_with_a_cloud_route_is_warned(tmp_path: Path) -> None:
    path = policy_file(tmp_path, detectors="{builtin: []}")
    policy = compile_policy(path)
    assert policy.detectors == ()
    assert [str(w) for w in policy.warnings] == [
        f"{path}:9: detectors.builtin: warning: an empty list turns off every built-in "
        "detector (email, card numbers, SSNs, IBANs, phones, IP addresses): requests holding "
        "them count as not sensitive and may go to cloud route 'cloud'; omit 'builtin' to run "
        "all"
    ]


def test_custom_patterns_that_cannot_fire_are_refused_or_warned(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    text = HEAD.format(
        callers="[demo-app]",
        detectors="\n  custom:\n"
        "    - {name: anchored, pattern: '^EMP-[0-9]{6}$'}\n"
        '    - {name: double_quoted, pattern: "\\bEMP-[0-9]{6}\\b"}\n'
        "    - {name: lookahead, pattern: '(?=EMP-[0-9]{6})'}\n"
        "    - {name: lines, pattern: '(?m)^EMP-[0-9]{6}$'}",
        rules=CLOUD_RULE + "\n",
    )
    path.write_text(text)
    report = check_policy_file(path)
    assert [str(m) for m in report.messages] == [
        f"{path}:11: detectors.custom[0].pattern: warning: detector 'anchored': outside "
        "(?m), '^' matches only at the start of each scanned text (a whole input element, "
        "parameter or metadata value) and '$' only at its end or before a newline that ends "
        "it, not at each line: add (?m) at the start to match at lines, or drop them to "
        "match anywhere",
        f"{path}:12: detectors.custom[1].pattern: error: detector 'double_quoted': holds the "
        "control character U+0008 at position 0: in a double-quoted YAML string \\b is a "
        "backspace and \\t a tab; write the pattern in single quotes ('\\bEMP-[0-9]{6}\\b') so "
        "the regex sees them",
        f"{path}:13: detectors.custom[2].pattern: error: detector 'lookahead': uses lookarounds "
        "(invalid perl operator: (?=): custom patterns run on RE2 (linear time, nothing "
        "backtracks), which does not support them",
    ]


# --- the offline commands decide as the router does -------------------------------------


def test_policy_test_uses_the_policys_max_text_bytes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The router collects up to the policy's max_text_bytes (4 MiB here): a 1.3 MB
    clean public document may use the cloud offline too, not only live."""
    text = DEFAULT.read_text()
    assert "max_text_bytes: 1048576" in text
    policy = tmp_path / "policy.yaml"
    policy.write_text(text.replace("max_text_bytes: 1048576", "max_text_bytes: 4194304"))
    cases = tmp_path / "cases.yaml"
    document = "the export button does nothing. " * 40_000
    cases.write_text(
        "cases:\n  - name: big clean document\n    request:\n      caller: demo-app\n"
        "      model: ticket-triage\n      metadata: {x-data-classification: public}\n"
        f"      inputs: {{text: ['{document}']}}\n    expect: {{zone: cloud, sensitive: false}}\n"
    )
    code, out, _ = run(capsys, "policy", "test", policy, cases)
    assert (code, out.splitlines()[-1]) == (0, "1 passed, 0 failed")
    request = tmp_path / "request.yaml"
    request.write_text(cases.read_text().split("request:\n", 1)[1].split("    expect:")[0])
    code, out, _ = run(capsys, "policy", "explain", policy, "--request", request)
    assert "decision: route cloud (zone cloud)" in out and "text-too-large" not in out


def test_explain_shows_unmatched_with_the_decision_not_before_the_rules(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = policy_file(tmp_path)
    request = tmp_path / "request.yaml"
    request.write_text("caller: demo-app\nmodel: m\n")  # no label: no rule matches
    code, out, _ = run(capsys, "policy", "explain", path, "--request", request)
    assert code == 0
    assert "verdict before rules: not sensitive" in out
    assert "sensitive: yes: no rule matched (doubt)" in out
    assert "decision: route onprem (zone onprem) by no rule matched: default_route" in out
    code, out, _ = run(capsys, "policy", "explain", path, "--request", request, "--json")
    data = json.loads(out)
    assert data["verdict"] == {"sensitive": False, "reasons": []}
    assert data["decision"]["reasons"] == ["unmatched"] and data["decision"]["sensitive"]
