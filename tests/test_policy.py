"""Policy loading: schema and meaning errors with their lines, the guard, warnings, and
the shipped policy against its shipped cases."""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

import pytest

from hybridroute.config import ConfigError, load_yaml
from hybridroute.router.policy.cases import check_expectations, facts_from_case, load_cases
from hybridroute.router.policy.checks import find_environment_warnings
from hybridroute.router.policy.engine import decide
from hybridroute.router.policy.schema import Policy, compile_policy
from hybridroute.router.policy.sessions import SessionPins

POLICIES = Path(str(resources.files("hybridroute.policies")))

HEAD = """\
version: 1
pools:
  onprem: {zone: onprem, endpoints: ["127.0.0.1:8101"]}
  cloud: {zone: cloud, endpoints: ["127.0.0.1:8201"]}
routes:
  onprem: {pool: onprem}
  cloud: {pool: cloud, fallback: onprem}
callers: [demo-app, analytics]
sensitive_route: onprem
default_route: onprem
"""

CLOUD_RULE = """\
  - id: public-clean-to-cloud
    match: {label: [public], sensitive: false}
    route: cloud
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


def line_of(text: str, needle: str, after: str = "") -> int:
    """1-based line of the first `needle` at or after the first line containing `after`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if after in line)
    return next(i for i, line in enumerate(lines[start:], start) if needle in line) + 1


def errors_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        compile_policy(write(tmp_path, text))
    return str(info.value)


def compiled(tmp_path: Path, text: str) -> Policy:
    return compile_policy(write(tmp_path, text))


# --- the shipped policy ---------------------------------------------------------------


def test_default_policy_loads_without_warnings_and_keeps_sensitive_traffic_on_prem() -> None:
    path = POLICIES / "default.yaml"
    policy = compile_policy(path)
    assert policy.warnings == ()
    assert policy.version_hash == hashlib.sha256(path.read_bytes()).hexdigest()
    assert policy.zone_of("onprem") == "onprem" and policy.zone_of("cloud") == "cloud"
    assert policy.zone_of(policy.default_route) == policy.zone_of(policy.sensitive_route)
    assert set(policy.callers) == {"demo-app", "analytics", "batch-jobs"}
    assert "employee_id" in policy.detectors and policy.pools["cloud"].bearer_token_env


def test_shipped_cases_pass_and_cover_every_rule() -> None:
    policy = compile_policy(POLICIES / "default.yaml")
    cases = load_cases(POLICIES / "tests" / "default_cases.yaml").cases
    sessions = SessionPins(policy.sessions.pin_ttl, policy.sessions.max_sessions)
    failures, exercised = [], set()
    for i, case in enumerate(cases):
        facts = facts_from_case(case.request, text_budget=policy.max_text_bytes)
        decision = decide(policy, facts, sessions, now=float(i))
        exercised.add(decision.rule_id)
        failures += [f"{case.name}: {m}" for m in check_expectations(decision, case.expect)]
    assert failures == []
    assert {r.id for r in policy.rules} <= exercised


def test_a_failed_expectation_is_reported_without_request_values(tmp_path: Path) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text(
        "cases:\n  - name: wrong\n    request:\n      caller: demo-app\n      model: m\n"
        "      metadata: {x-data-classification: public}\n"
        "      inputs: {text: ['mail jane.doe@example.com']}\n"
        "    expect: {zone: cloud, sensitive: false}\n"
    )
    policy = compile_policy(POLICIES / "default.yaml")
    case = load_cases(cases).cases[0]
    facts = facts_from_case(case.request, text_budget=policy.max_text_bytes)
    problems = check_expectations(decide(policy, facts), case.expect)
    assert problems == ["expected zone 'cloud', got 'onprem'", "expected sensitive False, got True"]


def test_a_case_file_error_names_its_line(tmp_path: Path) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text("cases:\n  - name: x\n    request: {model: m, caler: a}\n    expect: {}\n")
    with pytest.raises(ConfigError) as info:
        load_cases(cases)
    assert f"{cases}:3: cases[0].request.caler: unknown key" in str(info.value)
    assert f"{cases}:4: cases[0].expect: expect at least one of" in str(info.value)


# --- schema ----------------------------------------------------------------------------


def test_a_rule_on_binary_metadata_is_refused_where_it_is_written(tmp_path: Path) -> None:
    """-bin values are bytes: a rule matching one as text would fail every request that
    carries it, so the policy does not load."""
    text = HEAD + (
        "rules:\n"
        "  - id: tenant\n"
        "    match:\n"
        "      metadata: {x-tenant-bin: [acme]}\n"
        "    route: onprem\n"
    )
    errors = errors_of(tmp_path, text)
    line = line_of(text, "x-tenant-bin")
    assert f"policy.yaml:{line}: rules[0].match.metadata.x-tenant-bin: invalid key: " in errors
    assert "'x-tenant-bin' is binary metadata (-bin)" in errors


def test_schema_errors_name_file_line_and_key_all_at_once(tmp_path: Path) -> None:
    text = HEAD.replace("{pool: onprem}", "{pool: onprem, audit: everything}") + (
        "sessions: {pin_ttl: 30, max_sessions: 0}\n"
        "rules:\n"
        "  - id: a\n"
        "    match: {labell: [public]}\n"
        "    route: onprem\n"
        "  - id: b\n"
        "    route: onprem\n"
        "    action: deny\n"
        "  - id: c\n"
        "    match: {label: [secret], detected: [any, email]}\n"
        "    sensitive: false\n"
        "    action: deny\n"
    )
    message = errors_of(tmp_path, text)
    path = tmp_path / "policy.yaml"
    expected = [
        f"{path}:6: routes.onprem.audit.level: Input should be 'decisions' or 'full'",
        f"{path}:11: sessions.pin_ttl: expected a positive duration with a unit",
        f"{path}:11: sessions.max_sessions: Input should be greater than or equal to 1",
        f"{path}:14: rules[0].match.labell: unknown key (allowed: caller, caller_known, auth",
        f"{path}:16: rules[1]: a rule needs exactly one of 'route: NAME' or 'action: deny'",
        f"{path}:20: rules[2].match.label[0]: Input should be 'public', 'internal'",
        f"{path}:20: rules[2].match.detected: 'any' and 'none' cannot be combined",
        f"{path}:21: rules[2].sensitive: a rule can only mark requests sensitive (true)",
    ]
    for fragment in expected:
        assert fragment in message, fragment


@pytest.mark.parametrize(
    ("pool", "problem"),
    [
        ('{zone: edge, endpoints: ["h:1"]}', ".zone: Input should be 'onprem' or 'cloud'"),
        ('{zone: onprem, endpoints: ["nohost"]}', ".endpoints[0]: expected host:port"),
        ('{zone: onprem, endpoints: ["h:70000"]}', ".endpoints[0]: expected host:port"),
        ("{zone: onprem, endpoints: []}", ".endpoints: Tuple should have at least 1 item"),
        (
            '{zone: onprem, endpoints: ["h:1"], bearer_token_env: A, bearer_token_file: b}',
            ": give bearer_token_env or bearer_token_file, not both",
        ),
        (
            '{zone: onprem, endpoints: ["h:1"], health: {interval: 1s, timeout: 2s}}',
            ".health: timeout must not exceed interval",
        ),
        (
            '{zone: onprem, endpoints: ["h:1"], health: {interval: 0s}}',
            ".health.interval: expected a positive duration with a unit",
        ),
    ],
)
def test_pool_values_are_checked(tmp_path: Path, pool: str, problem: str) -> None:
    text = HEAD.replace('{zone: onprem, endpoints: ["127.0.0.1:8101"]}', pool)
    assert f"policy.yaml:3: pools.onprem{problem}" in errors_of(tmp_path, text)


def test_durations_and_relative_paths_are_normalised(tmp_path: Path) -> None:
    text = (
        HEAD.replace(
            '{zone: cloud, endpoints: ["127.0.0.1:8201"]}',
            '{zone: cloud, endpoints: ["[::1]:8201"], ca: certs/ca.pem, bearer_token_file: /t,'
            " health: {interval: 1.5s, timeout: 500ms}}",
        )
        + "sessions: {pin_ttl: 2h}\nrules:\n"
        + CLOUD_RULE
    )
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "ca.pem").write_text("a CA\n")  # must exist, see below
    policy = compiled(tmp_path, text)
    cloud = policy.pools["cloud"]
    assert (cloud.health.interval, cloud.health.timeout) == (1.5, 0.5)
    assert policy.sessions.pin_ttl == 7200.0
    assert cloud.ca == str(tmp_path / "certs" / "ca.pem") and cloud.bearer_token_file == "/t"


def test_a_pool_file_that_is_not_there_is_an_error_or_a_warning(tmp_path: Path) -> None:
    """A router reads a pool's `ca` and `bearer_token_file` at load and refuses the
    policy without them. A relative path travels with the policy: missing, an error.
    An absolute one is on the router's host, maybe not this machine: a warning."""
    text = HEAD.replace(
        '  cloud: {zone: cloud, endpoints: ["127.0.0.1:8201"]}\n',
        '  cloud:\n    zone: cloud\n    endpoints: ["127.0.0.1:8201"]\n'
        "    ca: certs\n    bearer_token_file: token\n",
    )
    text += "rules:\n" + CLOUD_RULE
    (tmp_path / "certs").mkdir()
    message = errors_of(tmp_path, text)
    path = tmp_path / "policy.yaml"
    assert message.splitlines() == [
        f"{path}:7: pools.cloud.ca: ca certs: {tmp_path / 'certs'} is not a file (paths are "
        "relative to the policy file); a router would refuse this policy: create the file "
        "or fix the path",
        f"{path}:8: pools.cloud.bearer_token_file: bearer_token_file token: "
        f"{tmp_path / 'token'} does not exist (paths are relative to the policy file); a "
        "router would refuse this policy: create the file or fix the path",
    ]
    (tmp_path / "certs" / "ca.pem").write_text("a CA\n")
    (tmp_path / "token").write_text("secret\n")
    text = text.replace("ca: certs", "ca: certs/ca.pem")
    assert [str(w) for w in compiled(tmp_path, text).warnings] == []
    absolute = text.replace("token_file: token", f"token_file: {tmp_path / 'gone'}")
    assert [str(w) for w in compiled(tmp_path, absolute).warnings] == [
        f"{path}:8: pools.cloud.bearer_token_file: warning: bearer_token_file "
        f"{tmp_path / 'gone'} does not exist on this machine; a router refuses this policy "
        "unless it is a file on the router's host"
    ]


def test_an_unset_token_variable_is_a_warning_of_this_environment_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whether a variable is set says something about the machine, not the policy: the
    policy's own warnings do not depend on it, `find_environment_warnings` reports it."""
    path = POLICIES / "default.yaml"
    located = load_yaml(path)
    line = line_of(path.read_text(), "bearer_token_env:")
    monkeypatch.delenv("HYBRIDROUTE_CLOUD_TOKEN", raising=False)
    policy = compile_policy(path)
    assert policy.warnings == ()
    assert find_environment_warnings(policy.pools, located) == [
        (
            line,
            "pools.cloud.bearer_token_env",
            "environment variable HYBRIDROUTE_CLOUD_TOKEN is not set here; a router refuses "
            "this policy unless it is set (and not empty) in the router's environment",
        )
    ]
    monkeypatch.setenv("HYBRIDROUTE_CLOUD_TOKEN", " ")
    assert "is empty here" in find_environment_warnings(policy.pools, located)[0][2]
    monkeypatch.setenv("HYBRIDROUTE_CLOUD_TOKEN", "t0ken")
    assert find_environment_warnings(policy.pools, located) == []


def test_unreadable_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        compile_policy(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"version: 1\n\xff\n")
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        compile_policy(bad)


# --- meaning ---------------------------------------------------------------------------


def test_every_meaning_error_is_reported_with_its_line(tmp_path: Path) -> None:
    text = (
        "version: 1\n"
        "pools:\n"
        '  onprem: {zone: onprem, endpoints: ["10.0.0.1:1"]}\n'
        '  cloud: {zone: cloud, endpoints: ["10.0.0.1:1"]}\n'
        "routes:\n"
        "  onprem: {pool: onprem}\n"
        "  cloud: {pool: cloud}\n"
        "  lost: {pool: nowhere}\n"
        "  loop-a: {pool: onprem, fallback: loop-b}\n"
        "  loop-b: {pool: onprem, fallback: loop-a}\n"
        "  dangling: {pool: onprem, fallback: ghost}\n"
        "callers: [demo-app]\n"
        "detectors:\n"
        "  builtin: [email, passport]\n"
        "  custom:\n"
        "    - {name: email, pattern: 'x'}\n"
        "    - {name: ticket, pattern: '(?<!x)a'}\n"
        "sensitive_route: ghost\n"
        "default_route: cloud\n"
        "rules:\n"
        "  - id: r1\n"
        "    match: {detected: [phone]}\n"
        "    route: nope\n"
        "  - id: r1\n"
        "    action: deny\n"
    )
    message = errors_of(tmp_path, text)
    path = tmp_path / "policy.yaml"
    expected = [
        f"{path}:4: pools.cloud.endpoints[0]: endpoint '10.0.0.1:1' is also in onprem pool",
        f"{path}:8: routes.lost.pool: route 'lost' names unknown pool 'nowhere'",
        f"{path}:9: routes.loop-a.fallback: fallback cycle: loop-a -> loop-b -> loop-a",
        f"{path}:10: routes.loop-b.fallback: fallback cycle: loop-b -> loop-a -> loop-b",
        f"{path}:11: routes.dangling.fallback: fallback names unknown route 'ghost'",
        f"{path}:14: detectors.builtin[1]: unknown built-in detector 'passport'",
        f"{path}:16: detectors.custom[0].name: detector name 'email' is already taken",
        f"{path}:17: detectors.custom[1].pattern: detector 'ticket': ",  # check_pattern's words
        f"{path}:18: sensitive_route: unknown route 'ghost'",
        f"{path}:19: default_route: default_route 'cloud' is in a cloud pool; it must be on-prem",
        f"{path}:22: rules[0].match.detected[0]: detector 'phone' is not enabled",
        f"{path}:23: rules[0].route: unknown route 'nope'",
        f"{path}:24: rules[1].id: duplicate rule id 'r1' (first at line 21)",
    ]
    for fragment in expected:
        assert fragment in message, f"{fragment}\n--- not in ---\n{message}"
    assert message.count("\n") + 1 == len(expected)


def test_an_endpoint_in_both_zones_is_found_however_it_is_spelled(tmp_path: Path) -> None:
    """An on-prem pool naming the cloud endpoint in other words would send sensitive
    requests to the cloud: compare addresses, not text."""
    for onprem, cloud, why in [
        ("Cloud.Example.com:443", "cloud.example.com.:443", "host names are compared without case"),
        ("localhost:8201", "127.0.0.1:8201", "localhost, 127.0.0.1 and [::1] are all this"),
        ("127.0.0.1:8201", "[::1]:8201", "localhost, 127.0.0.1 and [::1] are all this"),
        ("[::ffff:127.0.0.1]:8201", "LOCALHOST:08201", "localhost, 127.0.0.1 and [::1] are"),
        ("[2001:DB8::1]:443", "[2001:db8:0:0::1]:443", "the same address"),
    ]:
        text = HEAD.replace('"127.0.0.1:8201"', f'"{cloud}"')
        text = text.replace('"127.0.0.1:8101"', f'"{onprem}"')
        message = errors_of(tmp_path, text)
        assert message.startswith(
            f"{tmp_path / 'policy.yaml'}:4: pools.cloud.endpoints[0]: endpoint '{cloud}' is "
            f"also in onprem pool 'onprem' (as '{onprem}': {why}"
        ), message
        assert message.endswith("; an endpoint belongs to exactly one zone")
    # Different machines or ports stay apart.
    text = HEAD.replace('"127.0.0.1:8101"', '"127.0.0.2:8201", "localhost:8101"')
    assert compiled(tmp_path, text).pools["onprem"].endpoints


def test_the_guard_rejects_a_cloud_rule_without_sensitive_false(tmp_path: Path) -> None:
    text = HEAD + "rules:\n  - id: to-cloud\n    match: {label: [public]}\n    route: cloud\n"
    line = line_of(text, "route: cloud", after="to-cloud")
    assert errors_of(tmp_path, text) == (
        f"{tmp_path / 'policy.yaml'}:{line}: rules[0].route: rule 'to-cloud' can send "
        "sensitive requests to cloud pool 'cloud'; add 'sensitive: false' to its match"
    )


@pytest.mark.parametrize(
    "rule",
    [
        "  - id: everything\n    route: cloud\n",
        "  - id: pinned\n    match: {session_pinned: false, detected: none}\n    route: cloud\n",
        "  - id: only\n    match: {sensitive: true}\n    route: cloud\n",
    ],
)
def test_the_guard_rejects_every_way_of_not_saying_sensitive_false(
    tmp_path: Path, rule: str
) -> None:
    assert "can send sensitive requests to cloud pool 'cloud'" in errors_of(
        tmp_path, HEAD + "rules:\n" + rule
    )


def test_the_guard_rejects_a_cloud_rule_that_marks_requests_sensitive(tmp_path: Path) -> None:
    text = HEAD + "rules:\n  - id: odd\n    match: {sensitive: false}\n    sensitive: true\n"
    text += "    route: cloud\n"
    message = errors_of(tmp_path, text)
    line = line_of(text, "sensitive: true", after="odd")
    assert f"policy.yaml:{line}: rules[0].sensitive: rule 'odd' marks requests sensitive" in message


def test_an_on_prem_route_falling_back_to_cloud_is_rejected(tmp_path: Path) -> None:
    text = HEAD.replace(
        "  onprem: {pool: onprem}\n",
        "  onprem: {pool: onprem}\n  spill: {pool: onprem, fallback: cloud}\n",
    )
    text += "rules:\n  - id: spill-over\n    match: {model: [big-*]}\n    route: spill\n"
    text += CLOUD_RULE
    message = errors_of(tmp_path, text)
    where = f"{tmp_path / 'policy.yaml'}:{line_of(text, 'spill:')}: routes.spill.fallback"
    assert (
        f"{where}: on-prem route 'spill' falls back to cloud route "
        "'cloud': sensitive requests ride on-prem routes, so their fallbacks must stay on-prem"
    ) in message
    # and the rule that uses it is a guard violation through the fallback chain
    assert (
        "rule 'spill-over' can send sensitive requests to cloud pool 'cloud' (through " in message
    )


def test_cloud_fallback_chains_are_guarded_too(tmp_path: Path) -> None:
    text = HEAD.replace(
        '  cloud: {zone: cloud, endpoints: ["127.0.0.1:8201"]}\n',
        '  cloud: {zone: cloud, endpoints: ["127.0.0.1:8201"]}\n'
        '  cloud2: {zone: cloud, endpoints: ["127.0.0.1:8202"]}\n',
    ).replace(
        "  cloud: {pool: cloud, fallback: onprem}\n",
        "  cloud: {pool: cloud, fallback: cloud2}\n  cloud2: {pool: cloud2, fallback: onprem}\n",
    )
    policy = compiled(tmp_path, text + "rules:\n" + CLOUD_RULE)
    assert policy.routes["cloud"].fallback == "cloud2"


def test_sensitive_route_must_be_on_prem(tmp_path: Path) -> None:
    text = HEAD.replace("sensitive_route: onprem", "sensitive_route: cloud")
    assert "sensitive_route: sensitive_route 'cloud' is in a cloud pool" in errors_of(
        tmp_path, text
    )


def test_a_safe_custom_detector_is_usable_in_rules(tmp_path: Path) -> None:
    text = HEAD + (
        "detectors:\n  builtin: [email]\n  custom: [{name: ticket, pattern: 'TCK-[0-9]{4}'}]\n"
        "rules:\n  - id: tickets\n    match: {detected: [ticket]}\n    route: onprem\n" + CLOUD_RULE
    )
    policy = compiled(tmp_path, text)
    assert policy.detectors == ("email", "ticket")
    assert [f.detector for f in policy.scanner.scan("see TCK-1234")] == ["ticket"]


# --- warnings -------------------------------------------------------------------------


def warnings_of(tmp_path: Path, rules: str, head: str = HEAD) -> list[str]:
    return [str(w) for w in compiled(tmp_path, head + "rules:\n" + rules).warnings]


def test_a_rule_after_a_match_everything_rule_is_shadowed(tmp_path: Path) -> None:
    rules = "  - id: all\n    route: onprem\n" + CLOUD_RULE
    line = line_of(HEAD + "rules:\n" + rules, "- id: public-clean")
    assert warnings_of(tmp_path, rules) == [
        f"{tmp_path / 'policy.yaml'}:{line}: rules[1]: warning: rule 'public-clean-to-cloud' is "
        "shadowed: earlier rule 'all' (line 12) matches every request it matches"
    ]


def test_a_superset_label_list_shadows_a_narrower_one(tmp_path: Path) -> None:
    rules = (
        "  - id: wide\n    match: {label: [public, none], model: ['*']}\n    route: onprem\n"
        "  - id: narrow\n    match: {label: [public], model: [ticket-*], caller: [demo-app]}\n"
        "    route: onprem\n"
    )
    assert any(
        "'narrow' is shadowed: earlier rule 'wide'" in w for w in warnings_of(tmp_path, rules)
    )


def test_rules_that_together_cover_a_later_one_shadow_it(tmp_path: Path) -> None:
    rules = (
        "  - id: s\n    match: {sensitive: true}\n    route: onprem\n"
        + CLOUD_RULE
        + "  - id: public-any\n    match: {label: [public]}\n    route: onprem\n"
    )
    found = warnings_of(tmp_path, rules)
    assert any(
        "'public-any' is shadowed: earlier rules 's' (line 12), 'public-clean-to-cloud'" in w
        for w in found
    ), found


def test_a_rule_whose_conditions_contradict_can_never_match(tmp_path: Path) -> None:
    rules = (
        "  - id: contradiction\n    match: {detected: any, sensitive: false}\n    route: onprem\n"
        "  - id: also\n    match: {label: [confidential], sensitive: false}\n    route: onprem\n"
        "  - id: known-stranger\n    match: {caller: [demo-app], caller_known: false}\n"
        "    action: deny\n" + CLOUD_RULE
    )
    found = warnings_of(tmp_path, rules)
    for rule_id in ("contradiction", "also", "known-stranger"):
        assert any(f"rule '{rule_id}' can never match" in w for w in found), found


def test_narrower_or_unrelated_earlier_rules_do_not_shadow(tmp_path: Path) -> None:
    rules = (
        "  - id: narrow\n    match: {model: [hr-*], label: [public]}\n    route: onprem\n"
        "  - id: meta\n    match: {metadata: {x-team: ml}}\n    route: onprem\n"
        "  - id: param\n    match: {parameters: {fast: true}}\n    route: onprem\n"
        "  - id: wide\n    match: {model: ['*'], metadata: {x-team: 'ml*'}}\n    route: onprem\n"
        + CLOUD_RULE
    )
    assert warnings_of(tmp_path, rules) == []


def test_unused_pools_routes_and_no_callers_are_warned(tmp_path: Path) -> None:
    head = (
        HEAD.replace("callers: [demo-app, analytics]", "callers: []")
        .replace(
            "routes:\n",
            "routes:\n  spare: {pool: onprem, audit: {level: decisions, sample: 0.1}}\n",
        )
        .replace("pools:\n", 'pools:\n  unused: {zone: onprem, endpoints: ["127.0.0.1:9"]}\n')
    )
    found = "\n".join(warnings_of(tmp_path, CLOUD_RULE, head))
    assert "policy.yaml:3: pools.unused: warning: pool 'unused' is not used by any route" in found
    assert "routes.spare: warning: route 'spare' is not used" in found
    assert "routes.spare.audit: warning: 'sample' only thins the detail" in found
    assert "callers: warning: no callers listed" in found


def test_names_must_be_plain_and_yaml_booleans_are_caught(tmp_path: Path) -> None:
    text = HEAD.replace("routes:\n", "routes:\n  'bad name': {pool: onprem}\n  other: {pool: on}\n")
    message = errors_of(tmp_path, text)
    assert "routes['bad name']: invalid key: a name is 1-64 letters, digits" in message
    assert "policy.yaml:7: routes.other.pool: YAML reads on/off/yes/no/true/false as booleans" in (
        message
    )
