"""Faults with real processes: nodes killed under load, all on-prem capacity gone,
a node coming back, the cloud going away. The router is never restarted.

The tests in this module run in order against one stack of their own.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import Process, Stack
from test_router_e2e import CLEAN, iris_row, node_requests, send, ticket

from hybridroute.router.audit.db import connect_readonly


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory):
    running = Stack(tmp_path_factory.mktemp("faults"))
    yield running
    running.stop()


class Load:
    """Sensitive requests sent back to back from 4 threads until stopped."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.results: list[tuple[str, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(4)]

    def _run(self) -> None:
        while not self._stop.is_set():
            code, reply = send(self.stack, iris_row(), label="confidential")
            self.results.append((code, reply.get("x-hybridroute-zone", "")))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


def _kill(stack: Stack, name: str) -> None:
    os.kill(stack.node(name)["pid"], signal.SIGKILL)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_killing_one_node_under_load_fails_no_request(faulty: Stack) -> None:
    with Load(faulty) as load:
        _wait_for(lambda: len(load.results) > 50, 30, "load to start")
        _kill(faulty, "node-1")
        killed_at = len(load.results)
        _wait_for(lambda: len(load.results) > killed_at + 100, 30, "load after the kill")
    assert len(load.results) > 150
    assert {code for code, _ in load.results} == {"OK"}, "a request failed during the kill"
    assert {zone for _, zone in load.results} == {"onprem"}
    after = node_requests(faulty, "node-2")
    send(faulty, iris_row(), label="confidential")
    assert node_requests(faulty, "node-2") == after + 1  # traffic moved to the survivor
    # The trail names both endpoints of a retried request: the data went to each.
    dead, alive = faulty.node("node-1")["address"], faulty.node("node-2")["address"]
    with contextlib.closing(connect_readonly(Path(faulty.info["audit"]["db"]))) as conn:
        retried = [
            json.loads(body)
            for (body,) in conn.execute(
                "SELECT body FROM records WHERE kind = 'request' AND body LIKE '%\"earlier\"%'"
            )
        ]
    assert retried, "no retried request in the audit trail"
    for record in retried:
        assert record["attempts"] == 2 and record["endpoint"] == alive, record
        assert record["earlier"] == [{"zone": "onprem", "pool": "onprem", "endpoint": dead}]


def test_with_every_on_prem_node_down_sensitive_requests_fail_fast_never_cloud(
    faulty: Stack,
) -> None:
    _kill(faulty, "node-2")
    cloud_before = node_requests(faulty, "cloud-1")
    time.sleep(2.5)  # let the health checks notice (interval 1 s, 2 failures)
    for request, label in (
        (ticket("ssn 321-54-9876"), "public"),
        (iris_row(), "restricted"),
        (ticket(CLEAN), None),
    ):
        started = time.monotonic()
        code, reply = send(faulty, request, label=label)
        assert code == "UNAVAILABLE"
        assert time.monotonic() - started < 1.0
        assert reply["x-hybridroute-zone"] == "onprem"
    assert node_requests(faulty, "cloud-1") == cloud_before
    code, reply = send(faulty, ticket(CLEAN), label="public")  # clean traffic still flows
    assert (code, reply["x-hybridroute-zone"]) == ("OK", "cloud")


@contextlib.contextmanager
def _revived(stack: Stack, name: str, log: Path) -> Iterator[Process]:
    """Start the killed on-prem node `name` again, on its old address; stop it after."""
    pki, node = Path(stack.info["pki"]), stack.node(name)
    revived = Process(
        ["node", "serve", "--models", str(stack.state_dir / "models"),
         "--listen", node["address"], "--cert", str(pki / "node.pem"),
         "--key", str(pki / "node.key"), "--client-ca", str(pki / "ca.pem"),
         "--allow-client", "router"],
        ready="node ready on",
        log=log,
    )  # fmt: skip
    try:
        _wait_for(
            lambda: send(stack, iris_row(), label="confidential")[0] == "OK",
            10,
            "the router to readmit the node",
        )
        yield revived
    finally:
        revived.signal(signal.SIGTERM)
        revived.wait(30)
        revived.stop()


def test_a_restarted_node_serves_again_without_restarting_the_router(
    faulty: Stack, tmp_path: Path
) -> None:
    with _revived(faulty, "node-1", tmp_path / "node-1-again.log"):
        code, reply = send(faulty, ticket("card 4111 1111 1111 1111"), label="public")
        assert (code, reply["x-hybridroute-zone"]) == ("OK", "onprem")
        assert faulty.process.proc.poll() is None  # same `up`, same router


def test_clean_requests_fall_back_on_prem_when_the_cloud_is_down(
    faulty: Stack, tmp_path: Path
) -> None:
    # node-1 from the previous test is gone again; bring it back for this test.
    with _revived(faulty, "node-1", tmp_path / "node-1-back.log"):
        _kill(faulty, "cloud-1")
        time.sleep(2.5)
        code, reply = send(faulty, ticket(CLEAN), label="public")
        assert code == "OK"
        assert reply["x-hybridroute-zone"] == "onprem"  # route cloud, fallback onprem
