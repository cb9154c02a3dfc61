"""Canary and shadow rollouts: the wire trick, the schema and its guard, and a real
router in front of real nodes serving iris v1 and v2 (`test_router.Harness`).

The node side (loading both versions: the default version policy is latest:2) is
tested in test_node_lifecycle.py; here the router splits, mirrors, compares, counts,
and never mirrors a sensitive request out of the on-prem zone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType

import grpc
import numpy as np
import pytest
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from support import mtls_channel
from test_router import Harness

from hybridroute.cli import main
from hybridroute.config import ConfigError
from hybridroute.node.modelconfig import Batching
from hybridroute.node.packaging import package_model
from hybridroute.protos import admin_pb2, admin_pb2_grpc
from hybridroute.protos import inference_pb2 as pb
from hybridroute.protos.tensors import encode_output
from hybridroute.router.audit.db import connect_readonly
from hybridroute.router.policy.schema import compile_policy
from hybridroute.router.rollout import (
    Rollout,
    ShadowPlan,
    outputs_agree,
    version_field,
    with_version,
)
from hybridroute.stack import default_policy_path

IRIS_X, IRIS_Y = load_iris(return_X_y=True)
FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")
ROLLOUT = """\
  onprem:
    pool: onprem
    audit: full
    rollouts:
      iris:
        split: {1: 80, 2: 20}
        shadow: {version: 2, percent: 100, compare: [label], timeout: 2s, max_in_flight: 64}
"""


# ------------------------------------------------------------------ the wire trick


def _request(version: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="iris", model_version=version, id="req-7")
    request.inputs.add(name="input", datatype="FP64", shape=[1, 4])
    request.raw_input_contents.append(np.array([[5.1, 3.5, 1.4, 0.2]]).tobytes())
    request.parameters["note"].string_param = "kept"
    return request


@pytest.mark.parametrize("sent", ["", "1", "a-much-longer-version-name" * 6])
def test_an_appended_model_version_is_the_one_the_parser_keeps(sent: str) -> None:
    original = _request(sent)
    for version in ("2", "v" * 200):  # 200: a two-byte length varint
        parsed = pb.ModelInferRequest.FromString(
            with_version(original.SerializeToString(), version)
        )
        assert parsed.model_version == version
        expected = pb.ModelInferRequest()
        expected.CopyFrom(original)
        expected.model_version = version
        assert parsed == expected  # nothing else changed
    assert version_field("2") == b"\x12\x012"


def _reply(labels: list[int], proba: list[float] | None = None, raw: bool = True) -> bytes:
    response = pb.ModelInferResponse(model_name="iris", model_version="1")
    encode_output(response, "label", "INT64", np.array(labels), raw=raw)
    if proba is not None:
        encode_output(response, "probabilities", "FP64", np.array(proba), raw=raw)
    return response.SerializeToString()


def test_outputs_agree_on_equal_values_within_float_tolerance_only() -> None:
    one = _reply([0, 2], [0.9, 0.1])
    assert outputs_agree(one, _reply([0, 2], [0.9 * (1 + 1e-9), 0.1]), None)
    assert outputs_agree(_reply([0, 2], raw=False), _reply([0, 2], raw=False), None)
    assert not outputs_agree(one, _reply([0, 1], [0.9, 0.1]), None)
    assert not outputs_agree(one, _reply([0, 2], [0.8, 0.2]), None)
    assert outputs_agree(one, _reply([0, 2], [0.8, 0.2]), frozenset({"label"}))
    assert not outputs_agree(one, _reply([0, 2]), frozenset({"probabilities"}))  # missing
    assert not outputs_agree(one, _reply([0, 2, 2], [0.9, 0.1]), None)  # shape
    assert not outputs_agree(one, b"\xff\xff not protobuf", None)


def test_a_split_draws_versions_by_weight() -> None:
    rollout = Rollout("r", "m", ("1", "2", "3"), (80, 0, 20), (80, 80, 100), (), None)
    assert [rollout.pick(d) for d in (0.0, 0.5, 0.7999, 0.8, 0.99)] == [0, 0, 0, 2, 2]


class _Pool:
    def __init__(self, zone: str) -> None:
        self.zone = zone


class _Forwarder:
    """What `Shadows` uses of the forwarder: its pools, and `mirror` (counted)."""

    def __init__(self, zones: dict[str, str]) -> None:
        self.zones = zones
        self.mirrored: list[str] = []
        self._pools = self

    def get(self, name: str) -> _Pool:
        return _Pool(self.zones[name])

    async def mirror(self, method: str, raw: bytes, *, pool: str, **_: object) -> bytes:
        self.mirrored.append(pool)
        return _reply([0])


def test_a_copy_goes_only_to_the_recorded_pool_and_zone_and_only_when_sent() -> None:
    """`reserve` is what the record names; `send` goes to that pool only while it is
    still in that zone (a reload may move it); `release` (the record was not
    committed) sends nothing; a sensitive request is never reserved for the cloud."""
    import asyncio

    from hybridroute.router.metrics import RouterMetrics
    from hybridroute.router.shadow import Shadows

    plan = ShadowPlan("2", 1.0, "gpu", "onprem", 1.0, None, 2, version_field("2"))
    rollout = Rollout("onprem", "iris", (), (), (), (), plan)
    cloud = Rollout("onprem", "iris", (), (), (), (), dataclasses.replace(plan, zone="cloud"))

    async def run() -> None:
        forwarder = _Forwarder({"gpu": "onprem"})
        metrics = RouterMetrics()
        shadows = Shadows(forwarder, metrics)  # type: ignore[arg-type]
        count = metrics.registry.get_sample_value

        def result(r: str, version: str = "2") -> float:
            labels = {"route": "onprem", "model": "iris", "version": version, "result": r}
            return count("hybridroute_router_shadow_requests_total", labels) or 0.0

        async def send(reservation: object, onprem_only: bool) -> None:
            shadows.send(
                reservation,  # type: ignore[arg-type]
                b"",
                serving=_reply([0]),
                serving_seconds=0.0,
                onprem_only=onprem_only,
                metadata=(),
            )
            await asyncio.gather(*shadows._tasks)

        assert shadows.reserve(cloud, onprem_only=True) is None  # invariant 1: not recorded
        assert result("refused") == 1
        one = shadows.reserve(rollout, onprem_only=True)
        two = shadows.reserve(rollout, onprem_only=False)
        assert one is not None and two is not None
        assert shadows.reserve(rollout, onprem_only=False) is None  # max_in_flight: 2
        assert result("dropped") == 1
        shadows.release(two)  # its record was not committed: never sent
        assert result("dropped") == 2 and forwarder.mirrored == []
        await send(one, True)
        assert forwarder.mirrored == ["gpu"] and result("agreed") == 1
        three = shadows.reserve(rollout, onprem_only=False)
        assert three is not None
        forwarder.zones["gpu"] = "cloud"  # a reload moved the pool after the record
        await send(three, False)
        assert forwarder.mirrored == ["gpu"] and result("refused") == 2
        await asyncio.sleep(0)  # the done callbacks
        assert count("hybridroute_router_shadow_in_flight") == 0

    asyncio.run(run())


# ------------------------------------------------------------------ schema and guard


def _policy(tmp_path: Path, routes: str) -> Path:
    text = default_policy_path().read_text()
    old = "  onprem: {pool: onprem, audit: full}\n"
    assert old in text
    path = tmp_path / "policy.yaml"
    path.write_text(text.replace(old, routes))
    return path


def test_the_documented_rollout_schema_compiles(tmp_path: Path) -> None:
    policy = compile_policy(_policy(tmp_path, ROLLOUT))
    rollout = policy.rollouts[("onprem", "iris")]
    assert (rollout.versions, rollout.weights) == (("1", "2"), (80, 20))
    assert rollout.shadow is not None
    assert (rollout.shadow.version, rollout.shadow.share, rollout.shadow.pool) == (
        "2",
        1.0,
        "onprem",
    )
    assert rollout.shadow.compare == frozenset({"label"})
    assert not policy.warnings
    assert not compile_policy(default_policy_path()).rollouts  # the default rolls out nothing


@pytest.mark.parametrize(
    ("rollouts", "where", "message"),
    [
        (
            "iris: {shadow: {version: 2, percent: 5, pool: cloud}}",
            "routes.onprem.rollouts.iris.shadow.pool",
            "route 'onprem' mirrors model 'iris' to cloud pool 'cloud': sensitive requests",
        ),
        (
            "iris: {shadow: {version: 2, percent: 5, pool: gpu}}",
            "routes.onprem.rollouts.iris.shadow.pool",
            "shadow names unknown pool 'gpu'",
        ),
        ("iris: {split: {1: 0, 2: 0}}", "routes.onprem.rollouts.iris", "positive weight"),
        ("iris: {}", "routes.onprem.rollouts.iris", "'split', 'shadow' or both"),
        ("iris: {shadow: {version: 2, percent: 120}}", "percent", "less than or equal to 100"),
        ("'ir*': {split: {1: 1}}", "routes.onprem.rollouts['ir*']", "a name is 1-64 letters"),
    ],
)
def test_a_bad_rollout_is_refused_with_its_line(
    tmp_path: Path, rollouts: str, where: str, message: str
) -> None:
    path = _policy(tmp_path, f"  onprem:\n    pool: onprem\n    rollouts:\n      {rollouts}\n")
    with pytest.raises(ConfigError) as info:
        compile_policy(path)
    text = str(info.value)
    assert message in text
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if "rollouts:" in t)
    assert f"{path}:{line + 1}: " in text and where in text, text


def test_a_cloud_route_may_shadow_to_the_cloud(tmp_path: Path) -> None:
    path = _policy(tmp_path, "  onprem: {pool: onprem, audit: full}\n")
    text = path.read_text().replace(
        "  cloud: {pool: cloud, fallback: onprem, audit: decisions}\n",
        "  cloud:\n    pool: cloud\n    fallback: onprem\n"
        "    rollouts: {ticket-triage: {shadow: {version: 2, percent: 10}}}\n",
    )
    path.write_text(text)
    assert compile_policy(path).rollouts[("cloud", "ticket-triage")].shadow is not None


# ------------------------------------------------------------------ a real router


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory: pytest.TempPathFactory, model_repo: Path) -> Path:
    """The sample repository's iris v1 and a v2 packaged beside it (another estimator,
    so the two versions disagree now and then, as real versions do)."""
    root = tmp_path_factory.mktemp("iris-two-versions")
    shutil.copytree(model_repo / "iris", root / "iris")
    package_model(
        LogisticRegression(max_iter=200).fit(IRIS_X[::3], IRIS_Y[::3]),
        name="iris",
        version=2,
        repo=root,
        input_name="input",
        input_datatype="FP64",
        features=FEATURES,
        baseline_sample=IRIS_X,
        batching=Batching(max_batch_size=32),
    )
    return root


class RolloutHarness(Harness):
    """`Harness` with an 80/20 split of iris on the on-prem route and every iris
    request there mirrored to v2."""

    def __init__(self, root: Path, pki: Path, models: Path) -> None:
        self.trail = root / "audit.db"  # the router config has no audit section
        super().__init__(root, pki, models)

    def policy_text(self) -> str:
        text = super().policy_text()
        old = "  onprem: {pool: onprem, audit: full}\n"
        assert old in text
        return text.replace(old, ROLLOUT)

    def infer(self, row: int, label: str | None = None) -> tuple[pb.ModelInferResponse, dict]:
        request = pb.ModelInferRequest(model_name="iris")
        request.inputs.add(name="input", datatype="FP64", shape=[1, 4])
        request.raw_input_contents.append(IRIS_X[row : row + 1].tobytes())
        metadata = [("x-data-classification", label)] if label else []
        with mtls_channel(self.address, self.pki) as channel:
            call = channel.unary_unary(
                "/inference.GRPCInferenceService/ModelInfer",
                pb.ModelInferRequest.SerializeToString,
                pb.ModelInferResponse.FromString,
            )
            reply, info = call.with_call(request, metadata=metadata, timeout=10)
        return reply, dict(info.trailing_metadata())

    def sample(self, name: str, **labels: str) -> float:
        return self.router.metrics.registry.get_sample_value(name, labels) or 0.0

    def shadows_idle(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while self.sample("hybridroute_router_shadow_in_flight") > 0:
            assert time.monotonic() < deadline, "shadow copies still in flight"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def rollout(
    tmp_path_factory: pytest.TempPathFactory, pki: Path, two_versions: Path
) -> Iterator[RolloutHarness]:
    h = RolloutHarness(tmp_path_factory.mktemp("rollout"), pki, two_versions)
    yield h
    h.close()


def _node_requests(node: object) -> float:
    registry = node.metrics.registry  # type: ignore[attr-defined]
    return sum(
        s.value
        for family in registry.collect()
        if family.name == "hybridroute_node_requests"
        for s in family.samples
        if s.name.endswith("_total")
    )


N = 300


def test_a_canary_split_sends_its_share_and_says_which_version_served(
    rollout: RolloutHarness,
) -> None:
    served: dict[str, str] = {}
    for i in range(N):
        reply, metadata = rollout.infer(i % len(IRIS_X))
        assert metadata["x-hybridroute-zone"] == "onprem"
        assert metadata["x-hybridroute-model-version"] == reply.model_version
        served[metadata["x-hybridroute-request-id"]] = reply.model_version
    counts = Counter(served.values())
    assert set(counts) == {"1", "2"}
    sigma = math.sqrt(N * 0.2 * 0.8)  # binomial: a false alarm at 4.5 sigma is ~1e-5
    assert abs(counts["2"] - N * 0.2) < 4.5 * sigma, counts
    for version in ("1", "2"):
        sent = rollout.sample(
            "hybridroute_router_rollout_requests_total",
            route="onprem",
            model="iris",
            version=version,
        )
        assert sent >= counts[version]  # the module's later tests send more
    # -- the audit trail names the version that served each request
    with contextlib.closing(connect_readonly(rollout.trail)) as conn:
        bodies = [json.loads(b) for (b,) in conn.execute("SELECT body FROM records")]
    trail = {b["request_id"]: b.get("served_version") for b in bodies if b["kind"] == "request"}
    assert all(trail[rid] == version for rid, version in served.items())


def test_shadow_copies_are_compared_and_counted(rollout: RolloutHarness) -> None:
    rollout.shadows_idle()  # the copies of the previous test's requests
    before = {
        r: rollout.sample(
            "hybridroute_router_shadow_requests_total",
            route="onprem",
            model="iris",
            version="2",
            result=r,
        )
        for r in ("agreed", "disagreed", "failed", "dropped")
    }
    for i in range(60):
        rollout.infer((i * 7) % len(IRIS_X))
    rollout.shadows_idle()
    after = {
        r: rollout.sample(
            "hybridroute_router_shadow_requests_total",
            route="onprem",
            model="iris",
            version="2",
            result=r,
        )
        for r in before
    }
    assert sum(after.values()) - sum(before.values()) == 60  # percent: 100
    assert after["failed"] == after["dropped"] == 0
    assert after["agreed"] > 0
    for role in ("candidate", "serving"):
        count = rollout.sample(
            "hybridroute_router_shadow_upstream_seconds_count",
            route="onprem",
            model="iris",
            version="2",
            role=role,
        )
        assert count == after["agreed"] + after["disagreed"]


def _trail(rollout: RolloutHarness) -> dict[str, dict]:
    with contextlib.closing(connect_readonly(rollout.trail)) as conn:
        bodies = [json.loads(b) for (b,) in conn.execute("SELECT body FROM records")]
    return {b["request_id"]: b for b in bodies if b["kind"] == "request"}


def test_a_mirrored_requests_record_says_where_the_copy_went(
    rollout: RolloutHarness, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every iris request on the on-prem route is mirrored (percent: 100): its record
    names the copy's pool, zone and candidate version. A request on a route without a
    rollout is not mirrored and its record has no `shadow`. The trail still verifies."""
    rollout.shadows_idle()
    mirrored, plain = [], []
    for i in range(10):
        _, metadata = rollout.infer(i)
        assert metadata["x-hybridroute-route"] == "onprem"
        mirrored.append(metadata["x-hybridroute-request-id"])
        _, metadata = rollout.infer(i, label="public")
        assert metadata["x-hybridroute-route"] == "cloud"
        plain.append(metadata["x-hybridroute-request-id"])
    rollout.shadows_idle()
    trail = _trail(rollout)
    for rid in mirrored:
        assert trail[rid]["shadow"] == {"pool": "onprem", "zone": "onprem", "version": "2"}
    for rid in plain:
        assert "shadow" not in trail[rid]
    key = rollout.root / "audit-signing.pub"
    db = str(rollout.trail)
    assert main(["audit", "verify", "--db", db, "--key", str(key)]) == 0
    capsys.readouterr()
    assert (
        main(["audit", "query", "--db", db, "--request-id", mirrored[0], "--format", "json"]) == 0
    )
    (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert record["shadow"]["pool"] == "onprem" and record["zone"] == "onprem"


def test_status_shows_the_rollout(
    rollout: RolloutHarness, capsys: pytest.CaptureFixture[str]
) -> None:
    rollout.shadows_idle()
    admin = admin_pb2_grpc.RouterAdminStub(mtls_channel(rollout.address, rollout.pki, "admin"))
    status = admin.Status(admin_pb2.StatusRequest(), timeout=5)
    (entry,) = status.rollouts
    assert (entry.route, entry.model) == ("onprem", "iris")
    assert [(v.version, v.weight) for v in entry.split] == [("1", 80), ("2", 20)]
    assert sum(v.requests for v in entry.split) >= N
    assert entry.shadow.version == "2" and entry.shadow.pool == "onprem"
    assert 0 < entry.shadow.agreement_rate <= 1
    pki = rollout.pki
    credentials = ["--ca", f"{pki}/ca.pem", "--cert", f"{pki}/app-admin.pem"]
    credentials += ["--key", f"{pki}/app-admin.key"]
    assert main(["status", "--router", rollout.address, *credentials]) == 0
    table = capsys.readouterr().out
    assert "rollouts" in table and "v2 100% -> onprem" in table
    assert main(["status", "--router", rollout.address, *credentials, "--json"]) == 0
    (data,) = json.loads(capsys.readouterr().out)["rollouts"]
    assert data["shadow"]["agreement_rate"] == pytest.approx(entry.shadow.agreement_rate)
    assert data["split"][0] == {"version": "1", "weight": 80, "requests": entry.split[0].requests}


def test_a_sensitive_request_is_never_mirrored_out_of_the_on_prem_zone(
    rollout: RolloutHarness,
) -> None:
    """A policy that slipped past the load check (built here by hand) mirrors the
    on-prem route to the cloud pool: every copy of a sensitive request is refused by
    the forwarder, the caller's reply is unaffected, and the cloud node sees nothing."""
    store = rollout.router.policies
    good = store.current
    leak = ShadowPlan("1", 1.0, "cloud", "cloud", 1.0, None, 8, version_field("1"))
    bad = dataclasses.replace(
        good,
        rollouts=MappingProxyType(
            {("onprem", "iris"): Rollout("onprem", "iris", (), (), (), (), leak)}
        ),
    )
    labels = {"route": "onprem", "model": "iris", "version": "1", "result": "refused"}
    refused = rollout.sample("hybridroute_router_shadow_requests_total", **labels)
    cloud_before = _node_requests(rollout.cloud)
    store.current = bad
    sent = []
    try:
        for i in range(20):
            reply, metadata = rollout.infer(i, label="confidential")
            assert metadata["x-hybridroute-zone"] == "onprem" and reply.outputs
            sent.append(metadata["x-hybridroute-request-id"])
        rollout.shadows_idle()
    finally:
        store.current = good
    assert rollout.sample("hybridroute_router_shadow_requests_total", **labels) == refused + 20
    assert _node_requests(rollout.cloud) == cloud_before
    trail = _trail(rollout)  # refused before anything was sent: no copy on the record
    assert all(trail[rid]["sensitive"] is True and "shadow" not in trail[rid] for rid in sent)


def test_router_metrics_carry_the_right_labels(rollout: RolloutHarness) -> None:
    rollout.infer(0, label="confidential")
    unknown = pb.ModelInferRequest(model_name="no-such-model-4711")
    # an unknown model: counted as _other
    with pytest.raises(grpc.RpcError), mtls_channel(rollout.address, rollout.pki) as channel:
        channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(
            unknown.SerializeToString(), timeout=5
        )
    with mtls_channel(rollout.address, rollout.pki) as channel:  # OK, ready=false
        ready = pb.ModelReadyRequest(name="jane.doe@example.com")
        channel.unary_unary("/inference.GRPCInferenceService/ModelReady")(
            ready.SerializeToString(), timeout=5
        )
    sample = rollout.sample
    routed = dict(route="onprem", zone="onprem", pool="onprem", model="iris", decision="routed")
    assert sample("hybridroute_router_requests_total", **routed, code="OK") >= N
    other = {**routed, "model": "_other", "code": "NOT_FOUND"}
    assert sample("hybridroute_router_requests_total", **other) >= 1
    assert sample("hybridroute_router_requests_total", **{**other, "code": "OK"}) >= 1  # ready
    assert sample("hybridroute_router_request_duration_seconds_count", route="onprem") >= N
    assert sample("hybridroute_router_sensitive_requests_total", route="onprem") >= 20
    assert sample("hybridroute_router_policy_reloads_total", result="accepted") >= 1
    for node in rollout.nodes:
        endpoint = dict(pool="onprem", zone="onprem", endpoint=f"127.0.0.1:{node.port}")
        assert sample("hybridroute_router_endpoint_healthy", **endpoint) == 1
    assert sample("hybridroute_audit_commit_seconds_count") > 0
    registry = rollout.router.metrics.registry
    assert registry.get_sample_value("hybridroute_audit_queue_depth") is not None
    names = {s.labels.get("model") for family in registry.collect() for s in family.samples}
    assert not {"no-such-model-4711", "jane.doe@example.com"} & names  # invariant 4


def _typed_or_raw(datatype: str, values: list[object], *, raw: bool) -> bytes:
    response = pb.ModelInferResponse(model_name="m", model_version="1")
    array = np.empty(len(values), dtype=object) if datatype == "BYTES" else np.array(values)
    if datatype == "BYTES":
        array[:] = values
    encode_output(response, "out", datatype, array, raw=raw)
    return response.SerializeToString()


@pytest.mark.parametrize(
    ("datatype", "values"),
    [("INT64", [0, 2, 1]), ("FP32", [0.5, 0.25]), ("BYTES", [b"spam", b"", b"eggs"])],
)
def test_outputs_agree_whether_an_endpoint_answers_raw_or_typed(
    datatype: str, values: list[object]
) -> None:
    """The protocol lets a server answer raw or typed (Triton raw, others typed): the
    same values agree either way. Mixed, an INT64 or BYTES output raised in the
    shadow task (the copy counted nowhere), or disagreed when it had one element."""
    for serving_raw, candidate_raw in ((True, False), (False, True), (True, True), (False, False)):
        serving = _typed_or_raw(datatype, values, raw=serving_raw)
        candidate = _typed_or_raw(datatype, values, raw=candidate_raw)
        assert outputs_agree(serving, candidate, None), (serving_raw, candidate_raw)
    single = _typed_or_raw(datatype, values[:1], raw=True)
    assert outputs_agree(single, _typed_or_raw(datatype, values[:1], raw=False), None)


def test_bytes_outputs_differing_in_trailing_nul_bytes_disagree() -> None:
    """Typed BYTES went through numpy's fixed-width strings, which drop trailing NULs."""
    for raw in (False, True):
        plain = _typed_or_raw("BYTES", [b"label"], raw=raw)
        padded = _typed_or_raw("BYTES", [b"label\x00"], raw=raw)
        assert not outputs_agree(plain, padded, None), raw


def test_comparing_a_large_copy_does_not_hold_up_the_event_loop() -> None:
    """The comparison runs after the caller has its reply, but on the router's one
    event loop: comparing a reply of a million elements there took a few hundred
    milliseconds during which no other request moved. Large ones go to a thread."""
    import asyncio

    from hybridroute.router.metrics import RouterMetrics
    from hybridroute.router.shadow import Shadows

    big = np.empty(1_500_000, dtype=object)
    big[:] = [b"label-%d" % (i % 3) for i in range(len(big))]
    response = pb.ModelInferResponse(model_name="iris", model_version="1")
    encode_output(response, "label", "BYTES", big, raw=True)
    reply = response.SerializeToString()

    class Big(_Forwarder):
        async def mirror(self, method: str, raw: bytes, *, pool: str, **_: object) -> bytes:
            await asyncio.sleep(0.05)
            return reply

    plan = ShadowPlan("2", 1.0, "gpu", "onprem", 5.0, None, 2, version_field("2"))
    rollout = Rollout("onprem", "iris", (), (), (), (), plan)

    async def run() -> float:
        metrics = RouterMetrics()
        shadows = Shadows(Big({"gpu": "onprem"}), metrics)  # type: ignore[arg-type]
        reservation = shadows.reserve(rollout, onprem_only=False)
        assert reservation is not None
        shadows.send(
            reservation, b"", serving=reply, serving_seconds=0.0, onprem_only=False, metadata=()
        )
        copy = next(iter(shadows._tasks))
        longest, last = 0.0, time.perf_counter()
        while not copy.done():  # another request's work, ticking on the same loop
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            longest, last = max(longest, now - last), now
        labels = {"route": "onprem", "model": "iris", "version": "2", "result": "agreed"}
        assert metrics.registry.get_sample_value("hybridroute_router_shadow_requests_total", labels)
        return longest

    assert asyncio.run(run()) < 0.15


def test_a_split_to_a_version_the_node_lacks_is_answered_by_its_default(
    tmp_path: Path, pki: Path, two_versions: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Unloading the canary before taking it out of the policy must not fail the
    split's share of requests that named no version: the node's default answers, the
    operator is told once, and the metric counts them as "missing"."""
    h = RolloutHarness(tmp_path, pki, two_versions)
    try:
        for node in h.nodes:
            assert node.lifecycle is not None
            h.loop.run(node.lifecycle.unload("iris", 2))
        with caplog.at_level(logging.WARNING, logger="hybridroute.router.frontdoor"):
            served = Counter(h.infer(i % len(IRIS_X))[0].model_version for i in range(60))
        assert served == Counter({"1": 60})
        missing = h.sample(
            "hybridroute_router_rollout_requests_total",
            route="onprem",
            model="iris",
            version="missing",
        )
        assert 0 < missing < 60  # the split's 20 % share, drawn at random
        warned = [r for r in caplog.records if "does not have" in r.getMessage()]
        assert len(warned) == 1
        # A caller naming the missing version still hears that it is not there.
        request = pb.ModelInferRequest(model_name="iris", model_version="2")
        request.inputs.add(name="input", datatype="FP64", shape=[1, 4])
        request.raw_input_contents.append(IRIS_X[:1].tobytes())
        with (
            pytest.raises(grpc.RpcError) as info,
            mtls_channel(h.address, h.pki) as channel,
        ):
            channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(
                request.SerializeToString(), timeout=10
            )
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        h.close()
