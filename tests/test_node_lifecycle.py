"""Model versions loaded and unloaded while a real node serves over mutual TLS.

The node runs in-process (a real grpc.aio server on a background loop); clients are
real TLS clients with the router's and apps' certificates from the session PKI.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import skops.io as sio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from support import LoopThread, mtls_channel, router_channel, running_node

from hybridroute.cli import main
from hybridroute.node.lifecycle import scan_with_policy
from hybridroute.node.server import NodeOptions, NodeServer
from hybridroute.node.versions import VersionPolicy, parse_policy, to_keep
from hybridroute.protos import inference_pb2 as pb
from hybridroute.protos import inference_pb2_grpc as pb_grpc
from hybridroute.protos import node_admin_pb2 as admin_pb
from hybridroute.protos import node_admin_pb2_grpc as admin_grpc
from hybridroute.protos.tensors import InputTensor

IRIS_X, IRIS_Y = load_iris(return_X_y=True)
ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]])


# ------------------------------------------------------------------------ helpers


def add_version(repo: Path, version: int, *, source: Path, policy: str = "") -> Path:
    """Copy iris/1 of `source` as iris/<version> (optionally declaring a policy)."""
    target = repo / "iris" / str(version)
    shutil.copytree(source / "iris" / "1", target)
    text = (target / "model.yaml").read_text().replace("version: 1\n", f"version: {version}\n")
    (target / "model.yaml").write_text(text + (f"\nversion_policy: {policy}\n" if policy else ""))
    return target


def break_version(path: Path) -> None:
    (path / "model.skops").write_bytes(b"not a zip file")


@pytest.fixture
def repo(model_repo: Path, tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(model_repo / "iris", root / "iris")
    return root


def infer(stub: pb_grpc.GRPCInferenceServiceStub, version: str = "") -> pb.ModelInferResponse:
    request = pb.ModelInferRequest(model_name="iris", model_version=version)
    tensor = request.inputs.add(name="input", datatype="FP64", shape=list(ROWS.shape))
    tensor.contents.fp64_contents.extend(ROWS.ravel().tolist())
    return stub.ModelInfer(request, timeout=10)


def load(stub: pb_grpc.GRPCInferenceServiceStub, version: int | None = None) -> None:
    request = pb.RepositoryModelLoadRequest(model_name="iris")
    if version is not None:
        request.parameters["version"].string_param = str(version)
    stub.RepositoryModelLoad(request, timeout=30)


def unload(stub: pb_grpc.GRPCInferenceServiceStub, version: int, force: bool = False) -> None:
    request = pb.RepositoryModelUnloadRequest(model_name="iris")
    request.parameters["version"].int64_param = version
    if force:
        request.parameters["force"].bool_param = True
    stub.RepositoryModelUnload(request, timeout=30)


def index(stub: pb_grpc.GRPCInferenceServiceStub) -> dict[str, tuple[str, str]]:
    reply = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
    return {f"{m.name}/{m.version}": (m.state, m.reason) for m in reply.models}


# -------------------------------------------------------------------------- tests


def test_new_version_under_load_without_a_failed_request(
    repo: Path, model_repo: Path, pki: Path
) -> None:
    """latest:1, so v1 is unloaded the moment v2 is in: requests queued on v1 finish."""
    with running_node(repo, pki, version_policy=VersionPolicy(latest=1)) as node:
        channel = router_channel(node, pki)
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        results: list[tuple[float, float, str]] = []
        errors: list[str] = []
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    version = infer(stub).model_version
                except grpc.RpcError as exc:
                    errors.append(f"{exc.code().name}: {exc.details()}")
                    continue
                results.append((started, time.monotonic(), version))

        threads = [threading.Thread(target=client) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.4)
        add_version(repo, 2, source=model_repo)
        load(stub, 2)
        loaded_at = time.monotonic()
        time.sleep(0.4)
        stop.set()
        for t in threads:
            t.join(10)
        assert not errors, errors[:5]
        before = [v for started, _, v in results if started < loaded_at]
        after = [v for started, _, v in results if started > loaded_at]
        print(f"{len(before)} requests before the load, {len(after)} after, 0 errors")
        assert "1" in before and len(after) > 20
        assert set(after) == {"2"}, "a request that started after the load saw version 1"
        states = index(stub)
        assert states["iris/2"] == ("READY", "")
        assert states["iris/1"] == (
            "UNAVAILABLE",
            "not loaded: unloaded by version policy latest:1",
        )
        assert (
            node.metrics.registry.get_sample_value(
                "hybridroute_node_model_ready", {"model": "iris", "version": "1"}
            )
            == 0
        )
        channel.close()


def test_a_version_that_fails_to_load_leaves_serving_versions_and_says_why(
    repo: Path, model_repo: Path, pki: Path
) -> None:
    with running_node(repo, pki) as node, router_channel(node, pki) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        break_version(add_version(repo, 2, source=model_repo))
        with pytest.raises(grpc.RpcError) as info:
            load(stub, 2)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "iris/2 did not load" in info.value.details()
        assert "not a readable skops file" in info.value.details()
        state, reason = index(stub)["iris/2"]
        assert state == "UNAVAILABLE" and "not a readable skops file" in reason
        assert index(stub)["iris/1"] == ("READY", "")
        assert infer(stub).model_version == "1"
        # A failed reload of the serving version keeps the files loaded before.
        break_version(repo / "iris" / "1")
        with pytest.raises(grpc.RpcError) as info:
            load(stub, 1)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        state, reason = index(stub)["iris/1"]
        assert state == "READY" and reason.startswith("reload failed, still serving")
        assert infer(stub, "1").model_version == "1"


def test_a_broken_version_declaring_a_policy_unloads_nothing_and_allows_rollback(
    repo: Path, model_repo: Path, pki: Path
) -> None:
    """A new version that fails to load must not decide the policy: its `specific: [2]`
    would unload v1 and refuse a load of v1 (the rollback)."""
    with running_node(repo, pki) as node, router_channel(node, pki) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        break_version(add_version(repo, 2, source=model_repo, policy="{specific: [2]}"))
        with pytest.raises(grpc.RpcError) as info:
            load(stub)  # what the policy selects
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "iris/2 did not load" in info.value.details()
        assert "nothing unloaded; serving versions: 1" in info.value.details()
        assert index(stub)["iris/1"] == ("READY", "")
        assert infer(stub).model_version == "1"
        load(stub, 1)  # a rollback to the working version is not refused
        assert infer(stub, "1").model_version == "1"
        with pytest.raises(grpc.RpcError) as info:
            load(stub, 2)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert index(stub)["iris/1"] == ("READY", "")
        assert infer(stub).model_version == "1"
    # At startup, too, the broken v2 does not decide: v1 loads under the node default.
    entries, _ = scan_with_policy(repo, VersionPolicy(latest=2))
    assert {e.version: e.state for e in entries} == {1: "READY", 2: "UNAVAILABLE"}


def test_unloading_the_last_ready_version_is_refused_unless_forced(
    repo: Path, model_repo: Path, pki: Path
) -> None:
    with running_node(repo, pki) as node, router_channel(node, pki) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            unload(stub, 1)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no READY version" in info.value.details()
        assert infer(stub).model_version == "1"
        unload(stub, 1, force=True)
        with pytest.raises(grpc.RpcError) as info:
            infer(stub)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert index(stub)["iris/1"] == ("UNAVAILABLE", "not loaded: unloaded by router")
        load(stub)  # no version: what the policy selects
        assert infer(stub).model_version == "1"
        for version in (2, 3):
            add_version(repo, version, source=model_repo)
        load(stub)  # the node default, latest:2: the newest two, then v1 goes
        states = index(stub)
        assert [states[f"iris/{v}"][0] for v in (1, 2, 3)] == ["UNAVAILABLE", "READY", "READY"]
        assert states["iris/1"][1] == "not loaded: unloaded by version policy latest:2"
        assert infer(stub).model_version == "3"


def test_a_node_with_no_ready_model_is_not_serving_until_one_loads(repo: Path, pki: Path) -> None:
    """The router health-checks the node as a whole (""): a node that can answer no
    model must not be sent requests, and ServerReady says the same."""
    with running_node(repo, pki) as node, router_channel(node, pki) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        def node_health() -> int:
            return health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status

        serving = health_pb2.HealthCheckResponse.SERVING
        assert node_health() == serving and stub.ServerReady(pb.ServerReadyRequest()).ready
        unload(stub, 1, force=True)
        assert node_health() == health_pb2.HealthCheckResponse.NOT_SERVING
        assert not stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live  # alive, not ready
        load(stub)
        assert node_health() == serving and stub.ServerReady(pb.ServerReadyRequest()).ready


def test_admin_calls_need_an_admin_identity(repo: Path, pki: Path) -> None:
    with running_node(repo, pki, admin_clients=("admin",), allow_clients=("demo-app",)) as node:
        with mtls_channel(f"localhost:{node.port}", pki, "demo-app") as app:
            stub = pb_grpc.GRPCInferenceServiceStub(app)
            assert infer(stub).model_version == "1"
            assert "iris/1" in index(stub)  # read-only: open to inference callers
            for call in (lambda: load(stub, 1), lambda: unload(stub, 1, force=True)):
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.RpcError) as info:
                admin_grpc.NodeAdminStub(app).DriftReport(admin_pb.DriftRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with mtls_channel(f"localhost:{node.port}", pki, "admin") as admin:
            stub = pb_grpc.GRPCInferenceServiceStub(admin)
            load(stub, 1)
            with pytest.raises(grpc.RpcError) as info:
                infer(stub)  # an admin is not a way around the router's policy and audit
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_version_policies_at_startup(repo: Path, model_repo: Path) -> None:
    for version in (2, 3):
        add_version(repo, version, source=model_repo)
    entries, notes = scan_with_policy(repo, VersionPolicy(latest=2))
    assert [e.version for e in entries] == [2, 3]
    assert notes[("iris", 1)] == "not loaded: outside version policy latest:2"
    break_version(repo / "iris" / "3")  # a broken newest version does not push out v1
    entries, _ = scan_with_policy(repo, VersionPolicy(latest=2))
    assert {e.version: e.state for e in entries} == {1: "READY", 2: "READY", 3: "UNAVAILABLE"}
    shutil.rmtree(repo / "iris" / "3")
    add_version(repo, 3, source=model_repo, policy="{specific: [1, 3]}")
    entries, notes = scan_with_policy(repo, VersionPolicy(latest=1))
    assert [e.version for e in entries] == [1, 3]
    assert notes[("iris", 2)] == "not loaded: outside version policy specific:1,3"
    assert to_keep(VersionPolicy(latest=2), [1, 2, 3]) == {2, 3}
    assert to_keep(VersionPolicy(latest=2), [1, 2, 3], pinned=1) == {1, 3}
    assert parse_policy("specific:1,3") == VersionPolicy(specific=(1, 3))
    for bad in ("latest:0", "newest:2", "specific:", "all:3"):
        with pytest.raises(ValueError, match="version policy"):
            parse_policy(bad)


def test_a_version_outside_the_declared_policy_is_refused(
    repo: Path, model_repo: Path, pki: Path
) -> None:
    add_version(repo, 2, source=model_repo)
    add_version(repo, 3, source=model_repo, policy="{specific: [1, 3]}")
    with running_node(repo, pki) as node, router_channel(node, pki) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            load(stub, 2)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "specific:1,3" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            load(stub, 9)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


# ------------------------------------------------------------------------- CLI


def write_stack(path: Path, pki: Path, nodes: list[tuple[str, NodeServer]]) -> Path:
    stack = {
        "pki": str(pki),
        "nodes": [
            {"name": name, "zone": "onprem", "pool": "onprem", "address": f"localhost:{n.port}"}
            for name, n in nodes
        ]
        + [{"name": "cloud-1", "zone": "cloud", "pool": "cloud", "address": "localhost:1"}],
    }
    path.write_text(json.dumps(stack))
    return path


def test_cli_list_load_unload_with_a_stack_file(
    repo: Path, model_repo: Path, pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with running_node(repo, pki) as node:
        stack = write_stack(tmp_path / "stack.json", pki, [("node-1", node)])
        add_version(repo, 2, source=model_repo)
        assert main(["models", "list", "--stack", str(stack), "--json"]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert {(ln["node"], ln["version"], ln["state"]) for ln in lines} == {
            ("node-1", "1", "READY"),
            ("node-1", "2", "UNAVAILABLE"),
        }
        assert set(lines[0]) == {"node", "address", "model", "version", "state", "reason"}
        assert main(["models", "load", "iris", "--version", "2", "--stack", str(stack)]) == 0
        out = capsys.readouterr().out
        assert "node-1" in out and "2 READY, 1 READY" in out
        assert main(["models", "unload", "iris", "--version", "2", "--stack", str(stack)]) == 0
        assert main(["models", "unload", "iris", "--version", "1", "--stack", str(stack)]) == 1
        assert "no READY version" in capsys.readouterr().out
        args = ["models", "load", "iris", "--node", f"localhost:{node.port}", "--ca",
                str(pki / "ca.pem"), "--cert", str(pki / "app-demo-app.pem"), "--key",
                str(pki / "app-demo-app.key"), "--json"]  # fmt: skip
        assert main(args) == 1
        assert json.loads(capsys.readouterr().out)["code"] == "PERMISSION_DENIED"


def test_cli_list_says_why_the_cloud_stand_in_is_not_listed(
    repo: Path, pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The cloud stand-in takes only the router's bearer token, no admin call: `list`
    skips it, and says so, rather than leave it looking like a node without models."""
    with running_node(repo, pki) as node:
        stack = write_stack(tmp_path / "stack.json", pki, [("node-1", node)])
        assert main(["models", "list", "--stack", str(stack)]) == 0
        out, err = capsys.readouterr()
        table, note = out.splitlines()[:-1], out.splitlines()[-1]
        assert [line.split()[0] for line in table] == ["NODE", "node-1"] and err == ""
        assert note.startswith("not listed: cloud-1 (localhost:1, zone cloud), the cloud stand-in")
        assert "only the router's bearer token, no admin calls" in note
        assert main(["models", "list", "--stack", str(stack), "--json"]) == 0
        out, err = capsys.readouterr()
        assert [json.loads(line)["node"] for line in out.splitlines()] == ["node-1"]
        assert err.startswith("not listed: cloud-1 (localhost:1, zone cloud)")
        info = json.loads(stack.read_text())  # as `hybridroute up` writes it now
        info["nodes"][-1]["repository"] = "/state/cloud-models"
        stack.write_text(json.dumps(info))
        assert main(["models", "list", "--stack", str(stack)]) == 0
        assert "; it serves /state/cloud-models, which no deploy changes" in capsys.readouterr().out
        assert main(["models", "list", "--stack", str(stack), "--node", "node-1"]) == 0
        assert "not listed" not in capsys.readouterr().out  # asked for node-1 by name


def test_cli_deploy_copies_once_per_repository_and_loads_on_every_node(
    repo: Path, model_repo: Path, pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other-repo"
    shutil.copytree(repo, other)
    source = tmp_path / "build"
    add_version(source, 2, source=model_repo)
    with (
        running_node(repo, pki) as a,
        running_node(other, pki) as b,
        running_node(repo, pki) as c,
    ):
        stack = write_stack(tmp_path / "stack.json", pki, [("a", a), ("b", b), ("c", c)])
        args = ["models", "deploy", str(source / "iris" / "2"), "--to", "onprem",
                "--stack", str(stack), "--json"]  # fmt: skip
        assert main(args) == 0
        results = {r["node"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
        assert [results[n]["copy"] for n in "abc"] == ["copied", "copied", "shared with a"]
        assert all(r["ok"] and r["versions"] == "2 READY, 1 READY" for r in results.values())
        assert (other / "iris" / "2" / "model.yaml").is_file()
        assert main(args) == 0  # again: identical files are left alone, the load is a reload
        again = [json.loads(line)["copy"] for line in capsys.readouterr().out.splitlines()]
        assert again == ["already there", "already there", "shared with a"]
        assert main([*args[:-1], "--to", "nowhere"]) == 2
        assert "pools: onprem" in capsys.readouterr().err
        # Packaging on the fly, to nodes named by address.
        sio.dump(LogisticRegression(max_iter=500).fit(IRIS_X, IRIS_Y), tmp_path / "lr.skops")
        np.save(tmp_path / "x.npy", IRIS_X)
        args = ["models", "deploy", "--estimator", str(tmp_path / "lr.skops"), "--name", "iris",
                "--version", "3", "--sample-data", str(tmp_path / "x.npy"), "--features",
                "sl,sw,pl,pw", "--node", f"localhost:{b.port}", "--ca", str(pki / "ca.pem"),
                "--cert", str(pki / "router.pem"), "--key", str(pki / "router.key")]  # fmt: skip
        assert main(args) == 0
        assert "3 READY, 2 READY, 1 UNAVAILABLE" in capsys.readouterr().out


def test_metrics_and_health_follow_loads(repo: Path, model_repo: Path, pki: Path) -> None:
    with running_node(repo, pki, metrics_listen="127.0.0.1:0") as node:
        with router_channel(node, pki) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            add_version(repo, 2, source=model_repo)
            load(stub, 2)
            infer(stub)
        url = f"http://127.0.0.1:{node.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        assert 'hybridroute_node_model_ready{model="iris",version="2"} 1.0' in text
        assert 'hybridroute_node_requests_total{code="OK",model="iris",version="2"} 1.0' in text


def test_an_over_long_version_parameter_is_invalid_argument(repo: Path, pki: Path) -> None:
    with running_node(repo, pki) as node, router_channel(node, pki) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for version in ("9" * 5000, str(2**63)):  # beyond int(), beyond int64
            for call in (pb.RepositoryModelLoadRequest, pb.RepositoryModelUnloadRequest):
                request = call(model_name="iris")
                request.parameters["version"].string_param = version
                method = getattr(stub, call.__name__.removesuffix("Request"))
                with pytest.raises(grpc.RpcError) as info:
                    method(request, timeout=10)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "parameter 'version' must be a positive 64-bit integer" in (
                    info.value.details()
                )
        reply = admin_grpc.NodeAdminStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            reply.DriftReport(admin_pb.DriftRequest(model="iris", version="9" * 5000), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert infer(stub).model_version == "1"


def test_over_long_model_names_in_admin_calls_get_a_short_message(repo: Path, pki: Path) -> None:
    name = "m/" + "x" * 20_000  # not a model name, and longer than gRPC's 16 KiB metadata
    with running_node(repo, pki) as node, router_channel(node, pki) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        admin = admin_grpc.NodeAdminStub(channel)
        calls = [
            (
                stub.RepositoryModelLoad,
                pb.RepositoryModelLoadRequest(model_name=name),
                "INVALID_ARGUMENT",
            ),
            (
                stub.RepositoryModelUnload,
                pb.RepositoryModelUnloadRequest(model_name=name),
                "NOT_FOUND",
            ),
            (admin.DriftReport, admin_pb.DriftRequest(model=name), "NOT_FOUND"),
        ]
        for method, request, code in calls:
            with pytest.raises(grpc.RpcError) as info:
                method(request, timeout=10)
            assert info.value.code().name == code, info.value.details()[:200]
            assert "... (20002 characters)" in info.value.details()
            assert len(info.value.details()) < 300


def test_a_reload_keeps_the_queue_depth_gauge_of_the_new_batcher(repo: Path) -> None:
    """A reload under traffic: the old batcher drains while the new model's first request
    already has a batcher under the same labels; retiring the old one must not remove
    the gauge the new one reports through."""
    loop = LoopThread()
    node = NodeServer(NodeOptions(models=repo, listen="127.0.0.1:0", insecure=True, drift_window=0))
    loop.run(node.start())
    try:
        assert node.repository is not None
        dataplane = node._dataplane
        assert dataplane is not None
        rows = InputTensor("input", "FP64", ROWS.shape, ROWS, raw=True)

        async def reload_while_draining() -> None:
            await dataplane.infer("iris", "", [rows], [])
            entry = node.repository.entry("iris", 1)
            node.repository.put(replace(entry, model=replace(entry.model)))  # reloaded
            retiring = asyncio.create_task(dataplane.retire("iris", 1))
            await asyncio.sleep(0)  # the old batcher is detached and draining
            await dataplane.infer("iris", "", [rows], [])  # the new model's batcher
            await retiring

        loop.run(reload_while_draining())
        labels = [s.labels for m in node.metrics.queue_depth.collect() for s in m.samples]
        assert {"model": "iris", "version": "1"} in labels
    finally:
        loop.run(node.stop(grace=1))
        loop.close()


def _gauge(node: NodeServer, name: str, **labels: str) -> float | None:
    return node.metrics.registry.get_sample_value(name, labels)


def _until(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("operation", ["unload", "reload"])
def test_an_admin_caller_that_gives_up_still_drains_the_queue_and_updates_health(
    repo: Path, pki: Path, operation: str
) -> None:
    """The admin call is cancelled while the old batcher drains (its deadline passed):
    the requests queued on the old model are still answered, and health and gauges
    follow the repository, not the abandoned call."""
    gate = threading.Event()
    with running_node(repo, pki, drift_window=0) as node, router_channel(node, pki) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert node.repository is not None
        repository = node.repository
        before = repository.entry("iris", 1).model
        busy = [node._executor.submit(gate.wait, 30) for _ in range(4)]  # every estimator thread
        try:
            with ThreadPoolExecutor(4) as clients:
                queued = [clients.submit(infer, stub) for _ in range(4)]
                _until(lambda: _gauge(node, "hybridroute_node_in_flight_requests") == 4, "queue")
                if operation == "unload":
                    request = pb.RepositoryModelUnloadRequest(model_name="iris")
                    request.parameters["force"].bool_param = True
                    call = stub.RepositoryModelUnload.future(request, timeout=30)
                    _until(lambda: not repository.has_ready("iris"), "the unload to start")
                else:
                    request = pb.RepositoryModelLoadRequest(model_name="iris")
                    request.parameters["version"].int64_param = 1
                    call = stub.RepositoryModelLoad.future(request, timeout=30)
                    _until(
                        lambda: repository.entry("iris", 1).model is not before,
                        "the reloaded model to be swapped in",
                    )
                call.cancel()  # the admin caller gives up while the old batcher drains
                gate.set()
                answers = [f.result(timeout=20) for f in queued]
        finally:
            gate.set()
            for task in busy:
                task.result(timeout=5)
        assert [a.model_version for a in answers] == ["1"] * 4
        _until(
            lambda: (
                _gauge(node, "hybridroute_node_queue_depth", model="iris", version="1")
                in ((None,) if operation == "unload" else (None, 0.0))
            ),
            "the queue depth gauge to follow",
        )
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service="iris"), timeout=5).status
        if operation == "unload":
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert _gauge(node, "hybridroute_node_model_ready", model="iris", version="1") == 0
            with pytest.raises(grpc.RpcError) as info:
                infer(stub)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
        else:
            assert status == health_pb2.HealthCheckResponse.SERVING
            assert infer(stub).model_version == "1"
