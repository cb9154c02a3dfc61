"""The decision engine: the sensitivity verdict, first-match rules, the runtime guard,
session pins, and the property that an accepted policy never sends detected data to
the cloud."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import threading
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybridroute.config import ConfigError
from hybridroute.protos import inference_pb2 as pb
from hybridroute.protos.tensors import encode_bytes_elements
from hybridroute.router.facts import Caller, request_facts
from hybridroute.router.policy.cases import CaseRequest, facts_from_case
from hybridroute.router.policy.engine import (
    Decision,
    RequestFacts,
    TextField,
    decide,
    metadata_text_fields,
)
from hybridroute.router.policy.schema import Policy, Rule, compile_policy
from hybridroute.router.policy.sessions import SessionPins

POLICY = """\
version: 1
pools:
  onprem: {zone: onprem, endpoints: ["127.0.0.1:8101"]}
  onprem2: {zone: onprem, endpoints: ["127.0.0.1:8102"]}
  cloud: {zone: cloud, endpoints: ["127.0.0.1:8201"]}
routes:
  onprem: {pool: onprem, fallback: onprem2}
  onprem2: {pool: onprem2}
  cloud: {pool: cloud, fallback: onprem}
callers: [demo-app, analytics]
detectors:
  builtin: [email, us_ssn]
  custom: [{name: employee_id, pattern: 'EMP-[0-9]{6}'}]
  max_text_bytes: 128
sessions: {pin_ttl: 10s, max_sessions: 100}
sensitive_route: onprem
default_route: onprem2
rules:
  - id: deny-admin-by-token
    match: {auth: token, model: "admin-*"}
    action: deny
  - id: employee-ids
    match: {detected: [employee_id]}
    route: onprem2
  - id: fast-lane
    match: {parameters: {priority: [high, 1]}, metadata: {x-team: "ml-*"}, sensitive: false}
    route: cloud
  - id: v2-public
    match: {model: [ticket-*], model_version: [2], label: public, sensitive: false}
    route: cloud
  - id: sensitive-on-prem
    match: {sensitive: true, session_pinned: false}
    route: onprem
"""
SECRET_EMAIL = "jane.doe@example.com"
SECRET_SSN = "321-54-9876"


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    path = tmp_path_factory.mktemp("policy") / "policy.yaml"
    path.write_text(POLICY)
    return compile_policy(path)


def facts(**overrides: Any) -> RequestFacts:
    base: dict[str, Any] = {
        "caller": "demo-app",
        "auth": "cert",
        "model": "ticket-triage",
        "model_version": "2",
        "label": "public",
        "texts": (TextField("input:text[0]", "what are the opening hours"),),
    }
    return RequestFacts(**(base | overrides))


def texts(*items: str | None) -> tuple[TextField, ...]:
    return tuple(TextField(f"input:text[{i}]", t) for i, t in enumerate(items))


# --- the verdict before rules -----------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "reasons"),
    [
        ("public", ()),
        (None, ("unmatched",)),  # the test policy has no rule for unlabelled requests
        (" Public ", ()),
        ("internal", ("label:internal",)),
        ("confidential", ("label:confidential",)),
        ("restricted", ("label:restricted",)),
        ("secret", ("label:invalid",)),
        ("", ("label:invalid",)),
    ],
)
def test_labels(policy: Policy, label: str | None, reasons: tuple[str, ...]) -> None:
    decision = decide(policy, facts(label=label))
    assert decision.reasons == reasons and decision.sensitive is bool(reasons)
    assert decision.zone == ("onprem" if reasons else "cloud")
    assert "secret" not in repr(decision)


def test_detectors_count_and_locate_findings_but_never_keep_values(policy: Policy) -> None:
    text = f"write to {SECRET_EMAIL} about {SECRET_SSN}, cc {SECRET_EMAIL}"
    decision = decide(policy, facts(texts=texts("clean", text)))
    assert decision.sensitive and decision.zone == "onprem"
    assert decision.reasons == ("detector:email", "detector:us_ssn")
    assert dict(decision.findings) == {"email": 2, "us_ssn": 1}
    first = decision.detector_hits[0]
    assert (first.detector, first.source) == ("email", "input:text[1]")
    assert text[first.start : first.end] == SECRET_EMAIL
    assert SECRET_EMAIL not in repr(decision) and SECRET_SSN not in repr(decision)


def test_a_custom_detector_can_pick_the_rule(policy: Policy) -> None:
    decision = decide(policy, facts(texts=texts("badge EMP-123456")))
    assert (decision.rule_id, decision.route, decision.reasons) == (
        "employee-ids",
        "onprem2",
        ("detector:employee_id",),
    )


@pytest.mark.parametrize("caller", [None, "stranger"])
def test_an_unknown_caller_is_sensitive(policy: Policy, caller: str | None) -> None:
    decision = decide(policy, facts(caller=caller))
    assert decision.reasons == ("unknown-caller",) and decision.zone == "onprem"


def test_unreadable_text_and_parse_problems_are_sensitive(policy: Policy) -> None:
    assert decide(policy, facts(texts=texts("ok", None))).reasons == ("unreadable",)
    problem = facts(problems=("input 'text': not valid UTF-8",))
    assert decide(policy, problem).reasons == ("unreadable",)


def test_too_much_text_is_sensitive_and_not_scanned(policy: Policy) -> None:
    big = decide(policy, facts(texts=texts("x" * 100, f"{SECRET_EMAIL} and more")))
    assert big.reasons == ("text-too-large",) and big.zone == "onprem" and not big.findings
    # the limit counts UTF-8 bytes: 64 'é' are 128 bytes (fits), 65 are 130 (does not)
    assert decide(policy, facts(texts=texts("é" * 64))).reasons == ()
    assert decide(policy, facts(texts=texts("é" * 65))).reasons == ("text-too-large",)


def test_a_detector_error_is_sensitive_and_logs_no_text(
    policy: Policy, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        def scan(self, text: str) -> list[Any]:
            raise RuntimeError(f"choked on {text}")

    broken = dataclasses.replace(policy, scanner=Broken())  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING):
        decision = decide(broken, facts(texts=texts(SECRET_SSN)))
    assert decision.reasons == ("scan-error",) and decision.zone == "onprem"
    assert "RuntimeError" in caplog.text and SECRET_SSN not in caplog.text


# --- rules --------------------------------------------------------------------------------


def test_first_match_wins_and_the_trace_says_why_not(policy: Policy) -> None:
    both = facts(parameters={"priority": "high"}, metadata={"x-team": "ml-search"})
    decision = decide(policy, both)
    assert (decision.rule_id, decision.route, decision.zone) == ("fast-lane", "cloud", "cloud")
    trace = {t.rule_id: t for t in decision.trace}
    assert [t.rule_id for t in decision.trace] == [r.id for r in policy.rules]
    assert trace["deny-admin-by-token"].why_not == "auth 'cert' not in [token]"
    assert trace["employee-ids"].why_not == "none of [employee_id] fired"
    assert trace["fast-lane"].matched and trace["fast-lane"].why_not is None
    assert not trace["v2-public"].evaluated
    assert trace["v2-public"].why_not == "not evaluated: rule 'fast-lane' matched first"


def test_conditions_explain_themselves_without_request_values(policy: Policy) -> None:
    request = facts(model_version="1", parameters={"priority": True}, metadata={"x-team": "ml-a"})
    decision = decide(policy, request)
    why = {t.rule_id: t.why_not for t in decision.trace}
    assert why["fast-lane"] == "parameter 'priority' is not one of [high, 1]"
    assert why["v2-public"] == "model_version does not match [2]"
    assert decision.rule_id == "default" and decision.route == "onprem2"
    no_team = decide(policy, facts(parameters={"priority": 1}, metadata={"x-team": "secret-team"}))
    assert {t.rule_id: t.why_not for t in no_team.trace}["fast-lane"] == (
        "metadata 'x-team' does not match [ml-*]"
    )
    assert "secret-team" not in repr(no_team)
    absent = decide(policy, facts(parameters={"priority": 1}))
    assert {t.rule_id: t.why_not for t in absent.trace}["fast-lane"] == (
        "metadata 'x-team' is absent"
    )


def test_a_parameter_matches_by_type_aware_equality(policy: Policy) -> None:
    team = {"x-team": "ml-search"}
    assert decide(policy, facts(parameters={"priority": 1.0}, metadata=team)).rule_id == "fast-lane"
    assert (
        decide(policy, facts(parameters={"priority": True}, metadata=team)).rule_id != "fast-lane"
    )


def test_deny_names_the_rule(policy: Policy) -> None:
    decision = decide(policy, facts(auth="token", model="admin-console"))
    assert (decision.action, decision.route, decision.zone, decision.pool) == (
        "deny",
        None,
        None,
        None,
    )
    assert decision.rule_id == "deny-admin-by-token" and decision.fallbacks == ()


def test_unmatched_requests_take_the_default_route(policy: Policy) -> None:
    decision = decide(policy, facts(label=None))
    assert (decision.rule_id, decision.route, decision.zone) == ("default", "onprem2", "onprem")
    assert decision.policy_hash == policy.version_hash


def test_onprem_only_holds_for_sensitive_and_unmatched_requests(policy: Policy) -> None:
    """What the forwarder's and the shadows' zone guards go by (invariants 1 and 2):
    doubt is sensitive, so a request no rule matched is both, and says why."""
    unmatched = decide(policy, facts(label=None))
    assert (unmatched.rule_id, unmatched.sensitive, unmatched.onprem_only) == (
        "default",
        True,
        True,
    )
    assert unmatched.reasons == ("unmatched",) and unmatched.zone == "onprem"
    assert decide(policy, facts(label="internal")).onprem_only
    clean = decide(policy, facts())
    assert clean.zone == "cloud" and not clean.onprem_only


def test_fallbacks_follow_the_chain_within_allowed_zones(policy: Policy) -> None:
    clean = decide(policy, facts())
    assert clean.fallbacks == ("onprem", "onprem2") and clean.fallback == "onprem"
    sensitive = decide(policy, facts(label="internal"))
    assert sensitive.route == "onprem" and sensitive.fallbacks == ("onprem2",)


# --- the runtime guard ------------------------------------------------------------------


def _bypassed(policy: Policy, **changes: Any) -> Policy:
    """A policy the load-time guard would refuse: every request is sent to the cloud."""
    reckless = Rule("reckless", 0, None, "cloud", False, (), policy.rules[0].spec)
    return dataclasses.replace(policy, rules=(reckless,), **changes)


def test_the_runtime_guard_holds_when_the_load_time_guard_was_bypassed(
    policy: Policy, caplog: pytest.LogCaptureFixture
) -> None:
    reckless = _bypassed(policy)
    assert decide(reckless, facts()).zone == "cloud"  # clean: allowed
    with caplog.at_level(logging.WARNING):
        decision = decide(reckless, facts(texts=texts(f"ssn {SECRET_SSN}")))
    assert (decision.zone, decision.route, decision.rule_id) == ("onprem", "onprem", "guard")
    assert decision.reasons == ("detector:us_ssn", "guard:reckless")
    assert "guard: rule 'reckless'" in caplog.text and SECRET_SSN not in caplog.text


def test_the_runtime_guard_denies_when_even_sensitive_route_is_cloud(policy: Policy) -> None:
    reckless = _bypassed(policy, sensitive_route="cloud")
    decision = decide(reckless, facts(label="restricted"))
    assert (decision.action, decision.zone, decision.rule_id) == ("deny", None, "guard")


def test_the_runtime_guard_cuts_a_fallback_chain_at_the_cloud(policy: Policy) -> None:
    routes = dict(policy.routes)
    routes["onprem2"] = routes["onprem2"].model_copy(update={"fallback": "cloud"})
    leaky = dataclasses.replace(policy, routes=routes)
    assert decide(leaky, facts(label="internal")).fallbacks == ("onprem2",)


def test_an_unmatched_request_stays_on_prem_when_default_route_was_bypassed(
    policy: Policy,
) -> None:
    """Doubt is sensitive (invariant 2): no policy object, however built, sends a
    request that matched no rule to the cloud, nor lets it fall back there."""
    leaky = dataclasses.replace(policy, rules=(), default_route="cloud")
    decision = decide(leaky, facts())
    assert (decision.zone, decision.route, decision.rule_id) == ("onprem", "onprem", "guard")
    assert decision.reasons == ("unmatched", "guard:default")
    routes = dict(policy.routes)
    routes["onprem2"] = routes["onprem2"].model_copy(update={"fallback": "cloud"})
    chained = decide(dataclasses.replace(policy, rules=(), routes=routes), facts())
    assert (chained.route, chained.fallbacks) == ("onprem2", ())


# --- sessions ---------------------------------------------------------------------------


def test_a_sensitive_decision_pins_its_session_until_the_ttl_passes(policy: Policy) -> None:
    pins = SessionPins(policy.sessions.pin_ttl, policy.sessions.max_sessions)
    chat = {"session_id": "chat-1"}
    assert decide(policy, facts(**chat), pins, now=0.0).zone == "cloud"
    assert decide(policy, facts(**chat, texts=texts(SECRET_EMAIL)), pins, now=1.0).sensitive
    later = decide(policy, facts(**chat), pins, now=5.0)
    assert later.reasons == ("session-pinned", "unmatched") and later.zone == "onprem"
    assert later.rule_id == "default"  # `session_pinned: false` kept the last rule out
    # the pinned request was itself sensitive, so the pin slid to 5 + 10
    assert decide(policy, facts(**chat), pins, now=14.0).sensitive
    assert decide(policy, facts(**chat), pins, now=24.5).zone == "cloud"
    assert decide(policy, facts(session_id="chat-2"), pins, now=6.0).zone == "cloud"


def test_an_unmatched_request_pins_its_session_like_any_sensitive_one(policy: Policy) -> None:
    """Doubt is sensitive: what a session sent that no rule could place keeps its
    later, clean requests on-prem too, for pin_ttl."""
    pins = SessionPins(policy.sessions.pin_ttl, policy.sessions.max_sessions)
    doubtful = decide(policy, facts(session_id="chat-3", label=None), pins, now=0.0)
    assert doubtful.reasons == ("unmatched",) and doubtful.zone == "onprem"
    later = decide(policy, facts(session_id="chat-3"), pins, now=1.0)
    assert later.zone == "onprem" and "session-pinned" in later.reasons


def test_denied_or_unknown_callers_requests_do_not_pin_sessions(policy: Policy) -> None:
    pins = SessionPins(60, 100)
    decide(policy, facts(caller="stranger", session_id="s", label="restricted"), pins, now=0)
    decide(policy, facts(auth="token", model="admin-x", session_id="s", label="internal"), pins)
    assert len(pins) == 0


def test_session_pins_are_bounded_expire_and_survive_threads() -> None:
    pins = SessionPins(ttl=10, max_sessions=2)
    pins.pin("a", 0)
    pins.pin("b", 1)
    pins.pin("c", 2)
    assert not pins.is_pinned("a", 3) and pins.is_pinned("b", 3) and pins.evicted_live == 1
    assert not pins.is_pinned("b", 11) and len(pins) == 1
    pins.reconfigure(ttl=5, max_sessions=1)
    assert (pins.ttl, pins.max_sessions) == (5, 1)
    with pytest.raises(ValueError, match="ttl"):
        SessionPins(0, 1)

    many = SessionPins(ttl=100, max_sessions=50)

    def hammer(n: int) -> None:
        for i in range(500):
            many.pin(f"{n}-{i}", i)
            many.is_pinned(f"{n}-{i - 1}", i)

    workers = [threading.Thread(target=hammer, args=(n,)) for n in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(many) == 50


def test_a_flood_of_long_session_ids_keeps_the_pin_store_small() -> None:
    """The bound is on memory, not only on the count: a session id can be as long as
    gRPC metadata allows (8 KiB by default), and a known caller may send many."""
    pins = SessionPins(ttl=10_000, max_sessions=2000)
    long_id = "s" * 8000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(2000):
            pins.pin(f"{i:06d}{long_id}", float(i))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(pins) == 2000 and pins.is_pinned(f"{1999:06d}{long_id}", 2000.0)
    assert not pins.is_pinned(f"{1999:06d}{long_id}x", 2000.0)
    assert held < 2000 * 512, f"{held} bytes for 2000 pins"  # not 2000 copies of 8 KB


# --- facts from cases -------------------------------------------------------------------


def test_facts_from_case_collects_the_same_texts_the_router_scans() -> None:
    request = CaseRequest(
        caller="demo-app",
        model="m",
        metadata={"x-data-classification": "public", "x-session-id": "s", "authorization": "t"},
        inputs={"text": ["a", b"\xff", b"ok"]},
        parameters={"note": "n", "top_k": 3},
    )
    built = facts_from_case(request, text_budget=1 << 20)
    assert (built.auth, built.label, built.session_id) == ("cert", "public", "s")
    # The same request as a client puts it on the wire, read by the router.
    wire = pb.ModelInferRequest(model_name="m")
    wire.inputs.add(name="text", datatype="BYTES", shape=[3])
    wire.raw_input_contents.append(encode_bytes_elements([b"a", b"\xff", b"ok"]))
    wire.parameters["note"].string_param = "n"
    wire.parameters["top_k"].int64_param = 3
    routed = request_facts(wire, dict(request.metadata), Caller("demo-app", "cert"))
    assert [(t.source, t.text) for t in built.texts] == [(t.source, t.text) for t in routed.texts]
    sources = {t.source for t in built.texts}
    assert {"input:text[1]", "parameter:top_k", "names"} <= sources  # numbers and names too
    assert facts_from_case({"model": "m"}, text_budget=1 << 20).auth == "none"


def test_transport_and_control_metadata_is_not_scanned() -> None:
    fields = metadata_text_fields(
        {"authorization": "Bearer x", "grpc-timeout": "1S", "trace-bin": "..", "x-note": "hi"}
    )
    assert [f.source for f in fields] == ["metadata:x-note"]


# --- the property: accepted policies never send detected data to the cloud -------------

HEADER = """\
version: 1
pools:
  local: {zone: onprem, endpoints: ["127.0.0.1:8101"]}
  cl: {zone: cloud, endpoints: ["127.0.0.1:8201"]}
  cl2: {zone: cloud, endpoints: ["127.0.0.1:8202"]}
callers: [demo-app, analytics]
detectors: {builtin: [email, us_ssn, credit_card]}
"""
ROUTES = ("r-on", "r-cl", "r-cl2")
ROUTE_POOL = {"r-on": "local", "r-cl": "cl", "r-cl2": "cl2"}
PII = (f"mail {SECRET_EMAIL}", f"ssn {SECRET_SSN}", "card 4111 1111 1111 1111")

match_keys = st.fixed_dictionaries(
    {},
    optional={
        "label": st.lists(
            st.sampled_from(["public", "internal", "confidential", "restricted", "none"]),
            min_size=1,
            max_size=3,
            unique=True,
        ),
        "sensitive": st.booleans(),
        "caller_known": st.booleans(),
        "session_pinned": st.booleans(),
        "detected": st.sampled_from([["any"], ["none"], ["email"], ["us_ssn", "credit_card"]]),
        "caller": st.sampled_from([["demo-app"], ["*"], ["ana*"]]),
        "model": st.sampled_from([["m*"], ["*"], ["other"]]),
    },
)
rules = st.lists(
    st.fixed_dictionaries(
        {
            "match": match_keys,
            "to": st.sampled_from([*ROUTES, "deny"]),
            "marks": st.booleans(),
            # mostly say what the guard asks for, so that most policies are accepted
            "careful": st.sampled_from([True, True, True, False]),
        }
    ),
    max_size=6,
)


def _policy_text(rule_list: list[dict[str, Any]], fallbacks: Any, defaults: Any) -> str:
    lines = [HEADER, "routes:"]
    for name, fallback in zip(ROUTES, fallbacks, strict=True):
        extra = f", fallback: {fallback}" if fallback else ""
        lines.append(f"  {name}: {{pool: {ROUTE_POOL[name]}{extra}}}")
    lines += [f"sensitive_route: {defaults[0]}", f"default_route: {defaults[1]}", "rules:"]
    for i, rule in enumerate(rule_list):
        if rule["careful"] and rule["to"] in ("r-cl", "r-cl2"):
            rule = rule | {"match": rule["match"] | {"sensitive": False}, "marks": False}
        match = ", ".join(f"{k}: {v!r}".replace("'", '"') for k, v in rule["match"].items())
        lines += [f"  - id: rule-{i}", f"    match: {{{match.lower()}}}"]
        lines += ["    action: deny"] if rule["to"] == "deny" else [f"    route: {rule['to']}"]
        lines += ["    sensitive: true"] if rule["marks"] else []
    return "\n".join(lines) + "\n"


def test_no_accepted_policy_sends_a_request_with_detected_data_to_the_cloud() -> None:
    accepted = []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "generated.yaml"

        @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
        @given(
            rule_list=rules,
            fallbacks=st.tuples(
                st.sampled_from([None, None, None, "r-cl"]),
                st.sampled_from([None, "r-on", "r-on", "r-cl2"]),
                st.sampled_from([None, "r-on", "r-on", "r-cl"]),
            ),
            defaults=st.tuples(
                st.sampled_from(["r-on", "r-on", "r-on", "r-cl"]),
                st.sampled_from(["r-on", "r-on", "r-on", "r-cl2"]),
            ),
            caller=st.sampled_from(["demo-app", "analytics", "stranger", None]),
            label=st.sampled_from([None, "public", "internal", "secret"]),
            model=st.sampled_from(["m1", "other"]),
            pii=st.sampled_from(PII),
            session=st.sampled_from([None, "s1"]),
        )
        def check(rule_list: Any, fallbacks: Any, defaults: Any, **request: Any) -> None:
            path.write_text(_policy_text(rule_list, fallbacks, defaults))
            try:
                policy = compile_policy(path)
            except ConfigError:
                return
            accepted.append(len(rule_list))
            pins = SessionPins(60, 10)
            pii = request.pop("pii")
            sid = request.pop("session")
            common = {"auth": "cert", "session_id": sid, **request}
            fired = RequestFacts(texts=texts("hello", pii), **common)
            decision = decide(policy, fired, pins, now=0.0)
            _assert_stays_on_prem(policy, decision)
            # and the session it pinned keeps a clean follow-up on-prem too
            clean = RequestFacts(texts=texts("hello"), **common)
            if sid is not None and decision.action == "route":
                _assert_stays_on_prem(policy, decide(policy, clean, pins, now=1.0))

        check()
    # the generator must actually produce accepted policies with rules, or this is vacuous
    assert len(accepted) >= 30 and sum(1 for n in accepted if n >= 3) >= 5, accepted


def _assert_stays_on_prem(policy: Policy, decision: Decision) -> None:
    assert decision.sensitive
    assert decision.zone in ("onprem", None)
    assert all(policy.zone_of(route) == "onprem" for route in decision.fallbacks)
    # the load-time checks alone were enough: the runtime guard never had to step in
    assert decision.rule_id != "guard"
