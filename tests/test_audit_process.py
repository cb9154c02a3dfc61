"""The audit trail of real router processes: kill -9 under load loses no answered
request and leaves a trail that verifies; the next start seals and continues it; and
`hybridroute up` configures the trail and publishes it in stack.json."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from support import LoopThread, Process, Stack, free_port, mtls_channel
from test_router import _policy_text
from test_router_e2e import iris_row, send, ticket

from hybridroute.cli import main
from hybridroute.node.server import NodeOptions, NodeServer
from hybridroute.protos import inference_pb2_grpc as pb_grpc
from hybridroute.router.audit.db import connect_readonly


@pytest.fixture(scope="module")
def node(pki: Path, model_repo: Path) -> Iterator[int]:
    """One on-prem node in this process; the router under test is a real process."""
    loop = LoopThread()
    server = NodeServer(
        NodeOptions(
            models=model_repo,
            listen="127.0.0.1:0",
            cert=pki / "node.pem",
            key=pki / "node.key",
            client_ca=pki / "ca.pem",
            allow_clients=("router",),
        )
    )
    loop.run(server.start())
    assert server.port is not None
    yield server.port
    loop.run(server.stop(grace=1))
    loop.close()


def _router(root: Path, pki: Path, node_port: int) -> tuple[Path, str]:
    policy = root / "policy.yaml"
    policy.write_text(_policy_text([node_port], free_port()))
    address = f"127.0.0.1:{free_port()}"
    config = root / "router.yaml"
    config.write_text(f"""
listen: {address}
tls: {{cert: {pki}/router.pem, key: {pki}/router.key, client_ca: {pki}/ca.pem}}
policy: {policy}
upstream: {{ca: {pki}/ca.pem, cert: {pki}/router.pem, key: {pki}/router.key}}
audit: {{db: audit.db, signing_key: {pki}/audit-signing.key}}
""")
    return config, address


def _load(address: str, pki: Path, stop: threading.Event, ok: list[str]) -> None:
    """Back-to-back confidential requests; the request ids of the OK answers."""
    with mtls_channel(address, pki) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while not stop.is_set():
            try:
                _, call = stub.ModelInfer.with_call(
                    iris_row(), metadata=[("x-data-classification", "confidential")], timeout=5
                )
            except grpc.RpcError:
                continue  # the router is gone: nothing was promised
            ok.append(dict(call.trailing_metadata())["x-hybridroute-request-id"])


def test_kill_9_under_load_keeps_every_answered_request(
    tmp_path: Path,
    pki: Path,
    node: int,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HYBRIDROUTE_CLOUD_TOKEN", "unused-cloud-token")
    config, address = _router(tmp_path, pki, node)
    router = Process(
        ["router", "serve", "--config", str(config)],
        ready="router ready on",
        log=tmp_path / "r.log",
    )
    stop, ok = threading.Event(), []  # type: ignore[var-annotated]
    threads = [threading.Thread(target=_load, args=(address, pki, stop, ok)) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(ok) < 200:
            assert time.monotonic() < deadline, router.output
            time.sleep(0.02)
        router.signal(signal.SIGKILL)  # mid-load: requests in flight, commits in progress
        router.wait(10)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        router.stop()
    db, key = tmp_path / "audit.db", str(pki / "audit-signing.pub")
    with contextlib.closing(connect_readonly(db)) as conn:
        recorded = {
            json.loads(b)["request_id"]
            for (b,) in conn.execute("SELECT body FROM records WHERE kind = 'request'")
        }
    assert set(ok) <= recorded, f"{len(set(ok) - recorded)} answered requests are not in the trail"
    assert main(["audit", "verify", "--db", str(db), "--key", key]) == 0
    capsys.readouterr()
    # The next start checks the tail, seals what the killed router left, and continues.
    again = Process(
        ["router", "serve", "--config", str(config)],
        ready="router ready on",
        log=tmp_path / "r2.log",
    )
    try:
        assert send_direct(address, pki) == "OK"
        again.signal(signal.SIGTERM)
        assert again.wait(30) == 0
    finally:
        again.stop()
    assert main(["audit", "verify", "--db", str(db), "--key", key, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["unsealed"] == 0 and report["records"] > len(ok)
    code = main(["audit", "query", "--db", str(db), "--kind", "router.start", "--format", "json"])
    starts = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0 and len(starts) == 2
    assert starts[1]["audit"]["tail"] == "ok" and starts[1]["config_changed"] is False


def send_direct(address: str, pki: Path) -> str:
    with mtls_channel(address, pki) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            stub.ModelInfer(
                iris_row(), metadata=[("x-data-classification", "confidential")], timeout=10
            )
        except grpc.RpcError as exc:
            return str(exc.code().name)  # type: ignore[attr-defined]
    return "OK"


def test_up_configures_the_trail_and_stack_json_names_it(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    audit = stack.info["audit"]
    assert Path(audit["db"]).is_file() and Path(audit["verify_key"]).name == "audit-signing.pub"
    code, reply = send(stack, ticket("call me at jane.doe@example.com"), label="public")
    assert code == "OK"
    stack_file = str(stack.state_dir / "stack.json")
    assert main(["audit", "verify", "--stack", stack_file]) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "audit",
                "query",
                "--stack",
                stack_file,
                "--request-id",
                reply["x-hybridroute-request-id"],
                "--format",
                "json",
            ]
        )
        == 0
    )
    (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert record["findings"] == {"email": 1} and record["zone"] == "onprem"
