"""The node as a real process: the command line, SIGTERM and graceful shutdown."""

from __future__ import annotations

import shutil
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import HYBRIDROUTE, Process, free_port, mtls_channel

from hybridroute.protos import inference_pb2 as pb
from hybridroute.protos import inference_pb2_grpc as pb_grpc
from hybridroute.protos.tensors import encode_bytes_elements


def _serve(model_repo: Path, pki: Path, tmp_path: Path, *extra: str) -> tuple[Process, str]:
    port = free_port()
    proc = Process(
        [
            "node",
            "serve",
            "--models",
            str(model_repo),
            "--listen",
            f"127.0.0.1:{port}",
            "--cert",
            str(pki / "node.pem"),
            "--key",
            str(pki / "node.key"),
            "--client-ca",
            str(pki / "ca.pem"),
            "--allow-client",
            "demo-app",
            *extra,
        ],
        ready="node ready on",
        log=tmp_path / "node.log",
    )
    return proc, f"localhost:{port}"


def _slow_request(texts: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="ticket-triage")
    request.inputs.add(name="text", datatype="BYTES", shape=[texts])
    words = [
        f"my invoice number {i} was charged twice please refund".encode() for i in range(texts)
    ]
    request.raw_input_contents.append(encode_bytes_elements(words))
    return request


def _repo_with_big_batches(model_repo: Path, tmp_path: Path) -> Path:
    """The sample models, with ticket-triage taking requests of up to 50,000 texts
    (the sample allows 64 per request): slow requests without thousands of callers."""
    root = Path(shutil.copytree(model_repo, tmp_path / "models"))
    config = root / "ticket-triage" / "1" / "model.yaml"
    text = config.read_text()
    assert "max_batch_size: 64," in text
    config.write_text(text.replace("max_batch_size: 64,", "max_batch_size: 50000,"))
    return root


def test_sigterm_goes_not_serving_finishes_in_flight_requests_and_exits_0(
    model_repo: Path, pki: Path, tmp_path: Path
) -> None:
    metrics_port = free_port()
    repo = _repo_with_big_batches(model_repo, tmp_path)
    proc, address = _serve(
        repo, pki, tmp_path, "--grace", "20", "--metrics-listen", f"127.0.0.1:{metrics_port}"
    )
    try:
        with mtls_channel(address, pki) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=30
            )
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            with ThreadPoolExecutor(4) as pool:
                # Large requests keep the estimator busy while SIGTERM arrives.
                futures = [
                    pool.submit(stub.ModelInfer, _slow_request(50_000), timeout=60)
                    for _ in range(4)
                ]
                _wait_until_in_flight(metrics_port, 4)
                proc.signal(signal.SIGTERM)
                assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
                answers = [f.result() for f in futures]
        assert all(len(a.raw_output_contents) == 1 for a in answers)
        assert proc.wait(30) == 0
        assert "shutting down" in proc.output
    finally:
        proc.stop()


def test_sighup_does_not_end_a_node(model_repo: Path, pki: Path, tmp_path: Path) -> None:
    """A closed terminal or a tool that HUPs every daemon after a change: the node
    keeps serving and says why it has nothing to reload."""
    proc, address = _serve(model_repo, pki, tmp_path)
    try:
        proc.signal(signal.SIGHUP)
        with mtls_channel(address, pki) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 10
            while "SIGHUP" not in proc.output:
                assert time.monotonic() < deadline, proc.output
                time.sleep(0.05)
            reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert "nothing to reload" in proc.output
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.stop()


def _wait_until_in_flight(metrics_port: int, count: int) -> None:
    """Block until the node has received `count` requests it has not answered yet."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
        for line in text.splitlines():
            if line.startswith("hybridroute_node_in_flight_requests ") and (
                float(line.split()[-1]) >= count
            ):
                return
        time.sleep(0.005)
    raise TimeoutError(f"the node never had {count} requests in flight")


def test_by_default_a_node_serves_only_the_router(
    model_repo: Path, pki: Path, tmp_path: Path
) -> None:
    port = free_port()
    proc = Process(
        ["node", "serve", "--models", str(model_repo), "--listen", f"127.0.0.1:{port}",
         "--cert", str(pki / "node.pem"), "--key", str(pki / "node.key"),
         "--client-ca", str(pki / "ca.pem")],
        ready="node ready on",
        log=tmp_path / "node.log",
    )  # fmt: skip
    try:
        request = pb.ServerLiveRequest()
        with mtls_channel(f"localhost:{port}", pki) as channel:  # demo-app: an app
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        from hybridroute.certs.credentials import channel_credentials

        creds = channel_credentials(pki / "ca.pem", pki / "router.pem", pki / "router.key")
        with grpc.secure_channel(f"localhost:{port}", creds) as channel:
            live = pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(request, timeout=10)
            assert live.live
    finally:
        proc.stop()


def test_plaintext_needs_insecure_and_warns(model_repo: Path, tmp_path: Path) -> None:
    port = free_port()
    proc = Process(
        [
            "node",
            "serve",
            "--models",
            str(model_repo),
            "--listen",
            f"127.0.0.1:{port}",
            "--insecure",
        ],
        ready="node ready on",
        log=tmp_path / "node.log",
    )
    try:
        assert "PLAINTEXT" in proc.output
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            request = pb.ModelInferRequest(model_name="iris")
            request.inputs.add(name="input", datatype="FP64", shape=[1, 4])
            request.raw_input_contents.append(np.ones((1, 4)).tobytes())
            assert stub.ModelInfer(request, timeout=10).model_version == "1"
    finally:
        proc.stop()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--models", "{repo}"], "node serve needs --cert, --key, --client-ca for mutual TLS"),
        (["--models", "/nonexistent", "--insecure"], "--models /nonexistent: not a directory"),
    ],
)
def test_serve_refuses_incomplete_configuration(model_repo: Path, args, message: str) -> None:
    import subprocess

    args = [a.replace("{repo}", str(model_repo)) for a in args]
    done = subprocess.run(
        [*HYBRIDROUTE, "node", "serve", *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert message in done.stderr
