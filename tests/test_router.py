"""The router in-process, for what needs its config in hand: bearer tokens, policy
reloads (good, bad, guard-violating), deadlines and cancellation, the admin API."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from support import HYBRIDROUTE, LoopThread, free_port, mtls_channel
from test_router_e2e import CLEAN, ticket

from hybridroute.certs.credentials import channel_credentials
from hybridroute.node.server import NodeOptions, NodeServer
from hybridroute.protos import admin_pb2, admin_pb2_grpc
from hybridroute.protos import inference_pb2 as pb
from hybridroute.protos import inference_pb2_grpc as pb_grpc
from hybridroute.router.config import hash_token, load_config
from hybridroute.router.server import RouterServer
from hybridroute.stack import default_policy_path

TOKEN = "hrt_test-token-for-analytics-0123456789abcdef"


def _policy_text(onprem: list[int], cloud: int) -> str:
    text = default_policy_path().read_text()
    text = text.replace(
        '["127.0.0.1:8101", "127.0.0.1:8102"]',
        "[" + ", ".join(f'"127.0.0.1:{p}"' for p in onprem) + "]",
    )
    return text.replace('["127.0.0.1:8201"]', f'["127.0.0.1:{cloud}"]')


class Harness:
    """Two on-prem nodes and a cloud stand-in in-process, and a router in front of them
    on `router_config()` (`test_audit_router.Audited` gives it another)."""

    def __init__(self, root: Path, pki: Path, models: Path) -> None:
        os.environ["HYBRIDROUTE_CLOUD_TOKEN"] = "cloud-secret-token"
        self.loop = LoopThread()
        self.pki, self.root = pki, root
        self.nodes = [self._node(models, pki, "node", client_ca=True) for _ in range(2)]
        self.cloud = self._node(models, pki, "cloud", client_ca=False)
        self.policy = root / "policy.yaml"
        self.policy.write_text(self.policy_text())
        self.token_port = free_port()
        config = root / "router.yaml"
        config.write_text(self.router_config())
        self.router = RouterServer(load_config(config))
        self.loop.run(self.router.start())
        self.address = f"localhost:{self.router.port}"

    def router_config(self) -> str:
        """router.yaml: bearer tokens on `token_port`, `admin` as the admin identity."""
        pki = self.pki
        return f"""
listen: 127.0.0.1:0
token_listen: 127.0.0.1:{self.token_port}
tls: {{cert: {pki}/router.pem, key: {pki}/router.key, client_ca: {pki}/ca.pem}}
tokens:
  - {{caller: analytics, sha256: {hash_token(TOKEN)}}}
policy: {self.policy}
upstream: {{ca: {pki}/ca.pem, cert: {pki}/router.pem, key: {pki}/router.key,
           cloud_ca: {pki}/ca.pem}}
admins: [admin]
"""

    def policy_text(self) -> str:
        return _policy_text([n.port for n in self.nodes], self.cloud.port)

    def _node(self, models: Path, pki: Path, identity: str, *, client_ca: bool) -> NodeServer:
        node = NodeServer(
            NodeOptions(
                models=models,
                listen="127.0.0.1:0",
                cert=pki / f"{identity}.pem",
                key=pki / f"{identity}.key",
                client_ca=pki / "ca.pem" if client_ca else None,
                allow_clients=("router",) if client_ca else (),
                bearer_token=None if client_ca else "cloud-secret-token",
            )
        )
        self.loop.run(node.start())
        return node

    def stub(self, app: str = "demo-app") -> pb_grpc.GRPCInferenceServiceStub:
        return pb_grpc.GRPCInferenceServiceStub(mtls_channel(self.address, self.pki, app))

    def close(self) -> None:
        if self.router._server is not None:  # not stopped by a test already
            self.loop.run(self.router.stop(grace=1))
        for node in [*self.nodes, self.cloud]:
            self.loop.run(node.stop(grace=1))
        self.loop.close()


@pytest.fixture(scope="module")
def harness(
    tmp_path_factory: pytest.TempPathFactory, pki: Path, model_repo: Path
) -> Iterator[Harness]:
    h = Harness(tmp_path_factory.mktemp("router"), pki, model_repo)
    yield h
    h.close()


def _zone(
    stub: pb_grpc.GRPCInferenceServiceStub,
    request: pb.ModelInferRequest,
    metadata: list[tuple[str, str]],
) -> str:
    _, call = stub.ModelInfer.with_call(request, metadata=metadata, timeout=10)
    return dict(call.trailing_metadata())["x-hybridroute-zone"]


# ------------------------------------------------------------------ bearer tokens


def test_a_bearer_token_identifies_its_caller(harness: Harness, pki: Path) -> None:
    creds = channel_credentials(pki / "ca.pem")  # server-side TLS only
    with grpc.secure_channel(f"localhost:{harness.token_port}", creds) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        zone = _zone(
            stub,
            ticket(CLEAN),
            [("authorization", f"Bearer {TOKEN}"), ("x-data-classification", "public")],
        )
        assert zone == "cloud"  # analytics is a known caller: clean public data may go out
        for header in (f"Bearer {TOKEN}x", "Basic abc", ""):
            metadata = [("authorization", header)] if header else []
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(ticket(CLEAN), metadata=metadata, timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert TOKEN not in (info.value.details() or "")


def test_metadata_sent_twice_with_different_values_is_doubt(harness: Harness, pki: Path) -> None:
    """Only one value of a repeated key can be read; which one is a guess, and a guess
    is never what sends data to the cloud (invariant 2)."""
    stub = harness.stub()
    both = [("x-data-classification", "confidential"), ("x-data-classification", "public")]
    assert _zone(stub, ticket(CLEAN), both) == "onprem"
    assert _zone(stub, ticket(CLEAN), list(reversed(both))) == "onprem"
    twice = [("x-data-classification", "public")] * 2  # the same value twice says one thing
    assert _zone(stub, ticket(CLEAN), twice) == "cloud"
    sessions = [("x-data-classification", "public"), ("x-session-id", "a"), ("x-session-id", "b")]
    assert _zone(stub, ticket(CLEAN), sessions) == "onprem"
    # Two different credentials: which caller this is cannot be told.
    creds = channel_credentials(pki / "ca.pem")
    with grpc.secure_channel(f"localhost:{harness.token_port}", creds) as channel:
        token_stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for pair in (("Bearer wrong", f"Bearer {TOKEN}"), (f"Bearer {TOKEN}", "Bearer wrong")):
            metadata = [("authorization", v) for v in pair] + [("x-data-classification", "public")]
            with pytest.raises(grpc.RpcError) as info:
                token_stub.ModelInfer(ticket(CLEAN), metadata=metadata, timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "more than one authorization header" in (info.value.details() or "")


# ------------------------------------------------------------------ policy reload


def _admin(harness: Harness) -> admin_pb2_grpc.RouterAdminStub:
    return admin_pb2_grpc.RouterAdminStub(mtls_channel(harness.address, harness.pki, "admin"))


def test_reload_good_then_bad_keeps_the_last_good_policy(harness: Harness) -> None:
    admin = _admin(harness)
    stub = harness.stub()
    public = [("x-data-classification", "public")]
    assert _zone(stub, ticket(CLEAN), public) == "cloud"
    original = harness.policy.read_text()
    try:
        # Good: public data now stays on-prem as well (the cloud rule is gone).
        harness.policy.write_text(original.replace("route: cloud\n", "route: onprem\n"))
        result = admin.ReloadPolicy(admin_pb2.ReloadPolicyRequest(), timeout=30)
        assert result.accepted, result.error
        assert _zone(stub, ticket(CLEAN), public) == "onprem"
        good_hash = result.version_hash
        # Bad: a typo. Refused with file and line; the good policy keeps serving.
        harness.policy.write_text(original.replace("default_route:", "default_rout:"))
        result = admin.ReloadPolicy(admin_pb2.ReloadPolicyRequest(), timeout=30)
        assert not result.accepted
        assert f"{harness.policy}:" in result.error and "default_rout" in result.error
        assert _zone(stub, ticket(CLEAN), public) == "onprem"
        status = admin.Status(admin_pb2.StatusRequest(), timeout=5)
        assert status.policy.version_hash == good_hash
        assert "default_rout" in status.policy.last_refused_error
    finally:
        harness.policy.write_text(original)
        assert admin.ReloadPolicy(admin_pb2.ReloadPolicyRequest(), timeout=30).accepted


def test_an_endpoint_a_reload_removed_leaves_the_health_gauge(harness: Harness) -> None:
    """Its last value would read on: an endpoint removed while healthy would keep the
    "no healthy on-prem endpoint" alert (a sum of this gauge) from firing."""
    admin = _admin(harness)
    registry = harness.router.metrics.registry
    kept, removed = (f"127.0.0.1:{n.port}" for n in harness.nodes)

    def healthy(address: str) -> float | None:
        labels = {"pool": "onprem", "zone": "onprem", "endpoint": address}
        return registry.get_sample_value("hybridroute_router_endpoint_healthy", labels)

    assert healthy(kept) == 1 and healthy(removed) == 1
    original = harness.policy.read_text()
    try:
        harness.policy.write_text(original.replace(f'"{removed}"', "").replace('", ]', '"]'))
        assert admin.ReloadPolicy(admin_pb2.ReloadPolicyRequest(), timeout=30).accepted
        assert healthy(removed) is None and healthy(kept) == 1
    finally:
        harness.policy.write_text(original)
        assert admin.ReloadPolicy(admin_pb2.ReloadPolicyRequest(), timeout=30).accepted
    deadline = time.monotonic() + 10
    while healthy(removed) != 1 and time.monotonic() < deadline:  # back, once checked
        time.sleep(0.05)
    assert healthy(removed) == 1


def test_a_policy_sending_sensitive_data_to_the_cloud_is_refused_at_reload(
    harness: Harness,
) -> None:
    admin = _admin(harness)
    original = harness.policy.read_text()
    leaky = original.replace(
        "match: {label: [public], sensitive: false}", "match: {label: [public]}"
    )
    assert leaky != original
    try:
        harness.policy.write_text(leaky)
        result = admin.ReloadPolicy(admin_pb2.ReloadPolicyRequest(), timeout=30)
        assert not result.accepted
        assert "can send sensitive requests to cloud pool 'cloud'" in result.error
        zone = _zone(
            harness.stub(), ticket("ssn 321-54-9876"), [("x-data-classification", "public")]
        )
        assert zone == "onprem"
    finally:
        harness.policy.write_text(original)
        admin.ReloadPolicy(admin_pb2.ReloadPolicyRequest(), timeout=30)


def test_the_router_reloads_when_the_policy_file_changes(harness: Harness) -> None:
    admin = _admin(harness)
    before = admin.Status(admin_pb2.StatusRequest(), timeout=5).policy.version_hash
    original = harness.policy.read_text()
    try:
        harness.policy.write_text(original + "\n# touched by a test\n")
        deadline = time.monotonic() + 10
        while admin.Status(admin_pb2.StatusRequest(), timeout=5).policy.version_hash == before:
            assert time.monotonic() < deadline, "the file change was not picked up"
            time.sleep(0.2)
    finally:
        harness.policy.write_text(original)


def test_only_admins_may_call_the_admin_api(harness: Harness) -> None:
    stub = admin_pb2_grpc.RouterAdminStub(mtls_channel(harness.address, harness.pki))
    with pytest.raises(grpc.RpcError) as info:
        stub.Status(admin_pb2.StatusRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    status = _admin(harness).Status(admin_pb2.StatusRequest(), timeout=5)
    assert status.serving and len(status.endpoints) == 3
    assert all(e.healthy for e in status.endpoints)


# ------------------------------------------------------------- deadlines, cancel


def slow_ticket() -> pb.ModelInferRequest:
    """Seconds of work for a node: 64 rows (ticket-triage's batch limit) of 800 KB of
    text each, 51 MB in all (under the 64 MiB message limit)."""
    from hybridroute.protos.tensors import encode_bytes_elements

    text = ("my printer is broken and the screen flickers " * 20_000)[:800_000]
    request = pb.ModelInferRequest(model_name="ticket-triage")
    request.inputs.add(name="text", datatype="BYTES", shape=[64])
    request.raw_input_contents.append(encode_bytes_elements([text] * 64))
    return request


def test_the_callers_deadline_reaches_the_node(harness: Harness) -> None:
    big = slow_ticket()
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        harness.stub().ModelInfer(
            big, metadata=[("x-data-classification", "internal")], timeout=0.8
        )
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2


def test_a_router_with_an_invalid_policy_does_not_start_and_says_where(
    tmp_path: Path, pki: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        _policy_text([free_port()], free_port()).replace(
            "match: {label: [public], sensitive: false}", "match: {label: [public]}"
        )
    )
    config = tmp_path / "router.yaml"
    config.write_text(f"""
listen: 127.0.0.1:{free_port()}
tls: {{cert: {pki}/router.pem, key: {pki}/router.key, client_ca: {pki}/ca.pem}}
policy: {policy}
upstream: {{ca: {pki}/ca.pem, cert: {pki}/router.pem, key: {pki}/router.key}}
""")
    done = subprocess.run(
        [*HYBRIDROUTE, "router", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert f"{policy}:" in done.stderr
    assert "can send sensitive requests to cloud pool 'cloud'" in done.stderr


def _serve_config(tmp_path: Path, pki: Path, policy: Path) -> Path:
    """router.yaml for `router serve` on `policy`, reloaded by SIGHUP only."""
    config = tmp_path / "router.yaml"
    config.write_text(f"""
listen: 127.0.0.1:{free_port()}
tls: {{cert: {pki}/router.pem, key: {pki}/router.key, client_ca: {pki}/ca.pem}}
policy: {policy}
upstream: {{ca: {pki}/ca.pem, cert: {pki}/router.pem, key: {pki}/router.key}}
watch_policy: false
""")
    return config


def test_sighup_reloads_the_policy(
    tmp_path: Path, pki: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from support import Process

    monkeypatch.setenv("HYBRIDROUTE_CLOUD_TOKEN", "cloud-secret-token")  # the cloud pool's

    policy = tmp_path / "policy.yaml"
    text = _policy_text([free_port()], free_port())
    policy.write_text(text)
    config = _serve_config(tmp_path, pki, policy)
    router = Process(
        ["router", "serve", "--config", str(config)],
        ready="router ready on",
        log=tmp_path / "router.log",
    )
    try:
        policy.write_text(text.replace("default_route:", "default_rout:"))
        router.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "policy reload (SIGHUP) refused" not in router.output:
            assert time.monotonic() < deadline, router.output
            time.sleep(0.1)
        policy.write_text(text + "\n# edited\n")
        router.signal(signal.SIGHUP)
        while "policy reloaded (SIGHUP)" not in router.output:
            assert time.monotonic() < deadline, router.output
            time.sleep(0.1)
        router.signal(signal.SIGTERM)
        assert router.wait(30) == 0
    finally:
        router.stop()


def test_a_sighup_while_the_router_starts_reloads_once_it_has_started(
    tmp_path: Path, pki: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGHUP's default action ends a process; one sent while the router waits for its
    first health checks (a config tool signalling right after an edit) must not."""
    from support import Process

    monkeypatch.setenv("HYBRIDROUTE_CLOUD_TOKEN", "cloud-secret-token")
    silent = socket.socket()  # accepts, never answers: each health check takes its timeout
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    policy = tmp_path / "policy.yaml"
    text = _policy_text([silent.getsockname()[1]], free_port())
    text = text.replace("{interval: 1s, timeout: 500ms,", "{interval: 5s, timeout: 4s,", 1)
    policy.write_text(text)
    config = _serve_config(tmp_path, pki, policy)
    router = Process(
        ["router", "serve", "--config", str(config)], ready=None, log=tmp_path / "r.log"
    )
    try:
        router.wait_for("added to onprem pool onprem")  # now waiting for its first check
        policy.write_text(text + "\n# edited while the router started\n")
        router.signal(signal.SIGHUP)
        router.wait_for("router ready on", timeout=30)
        router.wait_for("policy reloaded (SIGHUP)", timeout=10)
        assert "SIGHUP received while starting" in router.output
        router.signal(signal.SIGTERM)
        assert router.wait(30) == 0
    finally:
        router.stop()
        silent.close()


def test_numbers_only_requests_are_answered(harness: Harness) -> None:
    request = pb.ModelInferRequest(model_name="iris")
    request.inputs.add(name="input", datatype="FP64", shape=[2, 4])
    request.raw_input_contents.append(
        np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]).tobytes()
    )
    reply = harness.stub().ModelInfer(
        request, metadata=[("x-data-classification", "public")], timeout=10
    )
    assert np.frombuffer(reply.raw_output_contents[0], dtype="<i8").tolist() == [0, 2]


def test_a_caller_cancelling_cancels_the_upstream_call(harness: Harness) -> None:
    big = slow_ticket()

    def in_flight() -> float:
        return sum(
            node.metrics.registry.get_sample_value("hybridroute_node_in_flight_requests") or 0
            for node in harness.nodes
        )

    future = harness.stub().ModelInfer.future(
        big, metadata=[("x-data-classification", "internal")], timeout=30
    )
    deadline = time.monotonic() + 10
    while in_flight() < 1:
        assert time.monotonic() < deadline, "the request never reached a node"
        time.sleep(0.01)
    future.cancel()
    cancelled_at = time.monotonic()
    while in_flight() > 0:
        # 51 MB of text take the estimator seconds; the node call must end long before.
        assert time.monotonic() - cancelled_at < 1.0, "the upstream call was not cancelled"
        time.sleep(0.01)


def test_unscanned_binary_metadata_never_travels_to_the_cloud() -> None:
    from hybridroute.router.frontdoor import forwarded_metadata

    metadata = {
        "authorization": "Bearer secret",
        "x-data-classification": "public",
        "x-note": "hello",
        "x-note-bin": b"321-54-9876",
        "grpc-timeout": "5S",
    }
    to_cloud = dict(forwarded_metadata(metadata, "r1", zone="cloud"))
    assert to_cloud == {
        "x-data-classification": "public",
        "x-note": "hello",
        "x-hybridroute-request-id": "r1",
    }
    to_onprem = dict(forwarded_metadata(metadata, "r1", zone="onprem"))
    assert to_onprem["x-note-bin"] == b"321-54-9876"
    assert "authorization" not in to_onprem and "grpc-timeout" not in to_onprem


def test_a_reload_its_admin_caller_gave_up_on_is_still_picked_up_from_the_file(
    harness: Harness,
) -> None:
    """The caller's deadline cancels the reload while a new endpoint gets its first
    check; nothing changed, and the file watcher must still load the file."""
    import hashlib
    import socket

    admin = _admin(harness)
    original = harness.policy.read_text()
    with socket.socket() as silent:  # accepts connections, never answers the handshake
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        kept = f"127.0.0.1:{harness.nodes[1].port}"
        new = original.replace(f'"{kept}"]', f'"{kept}", "127.0.0.1:{silent.getsockname()[1]}"]')
        new = new.replace(
            "server_name: node\n    health: {interval: 1s, timeout: 500ms",
            "server_name: node\n    health: {interval: 3s, timeout: 3s",
        )
        assert new.count("127.0.0.1:") == original.count("127.0.0.1:") + 1 and "3s" in new
        try:
            harness.policy.write_text(new)
            with pytest.raises(grpc.RpcError) as info:
                admin.ReloadPolicy(admin_pb2.ReloadPolicyRequest(), timeout=0.3)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            wanted = hashlib.sha256(new.encode()).hexdigest()
            deadline = time.monotonic() + 15
            while admin.Status(admin_pb2.StatusRequest(), timeout=5).policy.version_hash != wanted:
                assert time.monotonic() < deadline, "the watcher never loaded the file"
                time.sleep(0.1)
        finally:
            harness.policy.write_text(original)
            assert admin.ReloadPolicy(admin_pb2.ReloadPolicyRequest(), timeout=30).accepted


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("10.1.2.3 " * 100_000, id="900 KB of IP addresses"),
        # Small enough to have passed as harmless; a few tens of ms of checks each.
        pytest.param("123-45-6789 " * 5_000, id="60 KB of SSN-shaped values"),
    ],
)
def test_classifying_a_large_request_does_not_hold_up_other_callers(
    harness: Harness, text: str
) -> None:
    """Up to max_text_bytes (1 MiB) of text may be scanned per request, and a text of
    IP addresses (every one a finding) takes a good part of a second. On the event loop
    that time would be every other caller's too; the router classifies any request
    over a few KiB in a worker thread, so a small call meanwhile is answered at once."""
    from concurrent.futures import ThreadPoolExecutor

    from hybridroute.router.policy.schema import compile_policy

    scanner = compile_policy(harness.policy).scanner
    scan_seconds = min(_seconds(lambda: scanner.scan(text)) for _ in range(3))
    stub = harness.stub()
    public = [("x-data-classification", "public")]
    with ThreadPoolExecutor(1) as pool:
        big = pool.submit(stub.ModelInfer.with_call, ticket(text), metadata=public, timeout=60)
        time.sleep(min(0.1, scan_seconds / 10))  # received and being classified by now
        began = time.perf_counter()
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=30).live
        waited = time.perf_counter() - began
        _, call = big.result()
    assert dict(call.trailing_metadata())["x-hybridroute-zone"] == "onprem"  # findings
    # on the event loop, the small call would wait out most of the scan
    assert waited < scan_seconds / 2, (waited, scan_seconds)


def _seconds(work: Callable[[], object]) -> float:
    began = time.perf_counter()
    work()
    return time.perf_counter() - began
