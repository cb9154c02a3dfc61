"""The audit trail of a real router (in-process, real nodes, real mutual TLS): one
record per answered request, denials and rejections included; no sensitive value in
the trail, the logs or the metrics; lifecycle records; failing closed on an unwritable
store with health NOT_SERVING and the reason, then recovering by itself.

The tests in this module run in order against one router of their own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sqlite3
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import mtls_channel
from test_router import TOKEN, Harness, slow_ticket
from test_router_e2e import CLEAN, iris_row, ticket

from hybridroute.certs.credentials import channel_credentials
from hybridroute.certs.pki import issue_leaf
from hybridroute.cli import main
from hybridroute.protos import admin_pb2, admin_pb2_grpc
from hybridroute.protos import inference_pb2 as pb
from hybridroute.router.audit.db import connect_readonly

SSN, CARD, EMAIL = "321-54-9876", "4111 1111 1111 1111", "jane.doe@example.com"
METHOD = "/inference.GRPCInferenceService/"


class Audited(Harness):
    """`test_router.Harness`'s nodes, with a router of our own: its TLS files copied
    (so a test may rotate them), a short commit timeout, metrics on."""

    def __init__(self, root: Path, pki: Path, models: Path) -> None:
        for name in ("router.pem", "router.key"):
            shutil.copy(pki / name, root / name)
        self.db = root / "trail" / "audit.db"
        super().__init__(root, pki, models)

    def router_config(self) -> str:
        """The harness's, but the TLS files beside it, metrics on and the trail in `db`."""
        config = yaml.safe_load(super().router_config())
        config["tls"] |= {"cert": "router.pem", "key": "router.key"}
        config["metrics_listen"] = "127.0.0.1:0"
        config["audit"] = {
            "db": "trail/audit.db",
            "signing_key": f"{self.pki}/audit-signing.key",
            "commit_timeout": "300ms",
        }
        return yaml.safe_dump(config, sort_keys=False)

    def call(
        self,
        method: str,
        payload: bytes,
        metadata: list[tuple[str, str]] | None = None,
        *,
        app: str | None = "demo-app",
    ) -> tuple[str, str]:
        """(status code name, x-hybridroute-request-id) of one raw call."""
        if app is None:  # the token port, TLS without a client certificate
            channel = grpc.secure_channel(
                f"localhost:{self.token_port}", channel_credentials(self.pki / "ca.pem")
            )
        else:
            channel = mtls_channel(self.address, self.pki, app)
        with channel:
            call = channel.unary_unary(METHOD + method)
            try:
                _, info = call.with_call(payload, metadata=metadata or [], timeout=10)
            except grpc.RpcError as exc:
                trailing = dict(exc.trailing_metadata() or ())  # type: ignore[attr-defined]
                return exc.code().name, trailing.get("x-hybridroute-request-id", "")  # type: ignore[attr-defined]
        return "OK", dict(info.trailing_metadata()).get("x-hybridroute-request-id", "")

    def records(self, kind: str = "request") -> list[dict[str, object]]:
        with contextlib.closing(connect_readonly(self.db)) as conn:
            rows = conn.execute("SELECT body FROM records WHERE kind = ? ORDER BY seq", (kind,))
            return [json.loads(b) for (b,) in rows]

    def health(self) -> int:
        with mtls_channel(self.address, self.pki) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status)

    def status(self) -> admin_pb2.StatusResponse:
        with mtls_channel(self.address, self.pki, "admin") as channel:
            return admin_pb2_grpc.RouterAdminStub(channel).Status(
                admin_pb2.StatusRequest(), timeout=5
            )


@pytest.fixture(scope="module")
def audited(
    tmp_path_factory: pytest.TempPathFactory, pki: Path, model_repo: Path
) -> Iterator[Audited]:
    h = Audited(tmp_path_factory.mktemp("audited"), pki, model_repo)
    yield h
    h.close()


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _request(text: str, request_id: str = "") -> bytes:
    request = ticket(text)
    request.id = request_id
    return request.SerializeToString()


def _mixed_calls(h: Audited) -> list[tuple[str, str, str]]:
    """(what, code, request id) for every kind of answer the front door gives."""
    public = [("x-data-classification", "public")]
    calls = [
        ("clean public", "ModelInfer", _request(CLEAN), public, "demo-app"),
        ("ssn", "ModelInfer", _request(f"my ssn is {SSN}", f"order {SSN}"), public, "demo-app"),
        ("card", "ModelInfer", _request(f"refund to card {CARD}"), public, "demo-app"),
        (
            "email",
            "ModelInfer",
            _request(f"mail {EMAIL}"),
            [*public, ("x-session-id", f"s-{EMAIL}")],
            "demo-app",
        ),
        (
            "iris",
            "ModelInfer",
            iris_row().SerializeToString(),
            [("x-data-classification", "confidential")],
            "demo-app",
        ),
        ("unknown caller", "ModelInfer", _request(f"ssn {SSN}"), public, "other-app"),
        ("bad token", "ModelInfer", _request(CLEAN), [("authorization", f"Bearer {TOKEN}x")], None),
        ("no credentials", "ServerLive", pb.ServerLiveRequest().SerializeToString(), [], None),
        ("not a protobuf", "ModelInfer", b"\xff\xff\xff", public, "demo-app"),
        (
            "repository call",
            "RepositoryIndex",
            pb.RepositoryIndexRequest().SerializeToString(),
            [],
            "demo-app",
        ),
        (
            "no such model",
            "ModelInfer",
            ticket(CLEAN, model="hr-salaries").SerializeToString(),
            public,
            "demo-app",
        ),
    ]
    return [(what, *h.call(method, raw, md, app=app)) for what, method, raw, md, app in calls]


def test_every_answered_request_has_exactly_one_record(
    audited: Audited, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    before = len(audited.records())
    audited.call("ServerLive", pb.ServerLiveRequest().SerializeToString())  # answered, no decision
    answers = _mixed_calls(audited)
    codes = {what: code for what, code, _ in answers}
    assert codes == {
        "clean public": "OK",
        "ssn": "OK",
        "card": "OK",
        "email": "OK",
        "iris": "OK",
        "unknown caller": "PERMISSION_DENIED",
        "bad token": "UNAUTHENTICATED",
        "no credentials": "UNAUTHENTICATED",
        "not a protobuf": "INVALID_ARGUMENT",
        "repository call": "PERMISSION_DENIED",
        "no such model": "NOT_FOUND",
    }
    found = audited.records()[before:]
    assert len(found) == len(answers)
    by_id = {r["request_id"]: r for r in found}
    for what, code, request_id in answers:
        assert request_id in by_id, what
        assert by_id[request_id]["code"] == code, what
    ssn = by_id[answers[1][2]]
    assert ssn["sensitive"] is True and ssn["zone"] == "onprem" and ssn["detail"] == "full"
    # Found twice: in the text and in the caller's request id (hashed in the trail).
    assert ssn["findings"] == {"us_ssn": 2} and ssn["hits"] and ssn["client_request_id"]
    assert ssn["served_version"] and ssn["endpoint"] and ssn["attempts"] == 1
    clean = by_id[answers[0][2]]
    assert (clean["zone"], clean["detail"], clean["rule"]) == (
        "cloud",
        "decisions",
        "public-clean-to-cloud",
    )
    denied = by_id[answers[5][2]]
    assert (denied["outcome"], denied["rule"]) == ("denied", "deny-unknown-callers")
    assert by_id[answers[6][2]]["auth"] == "none" and "caller" not in by_id[answers[6][2]]
    assert by_id[answers[10][2]]["error"] == "upstream answered NOT_FOUND"
    # -- invariant 4: no value sent above is in the trail, the logs or the metrics
    metrics = urllib.request.urlopen(
        f"http://127.0.0.1:{audited.router.metrics_port}/metrics", timeout=5
    ).read()
    files = b"".join(
        p.read_bytes() for p in audited.db.parent.iterdir() if p.name.startswith("audit.db")
    )
    for value in (SSN, CARD, EMAIL, SSN.replace("-", ""), CARD.replace(" ", "")):
        assert value.encode() not in files, value
        assert value not in caplog.text, value
        assert value.encode() not in metrics, value
    assert b"hybridroute_audit_records_total" in metrics


def test_a_bug_on_the_request_path_is_answered_internal_and_recorded(
    audited: Audited, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Fault injection: the fact collector raises with the request's text in its message.
    The caller gets INTERNAL with the router's metadata, the trail a record, the log the
    error's type and the request id (never its text), and the router serves on."""
    from hybridroute.router import frontdoor

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"cannot read {SSN}")

    caplog.set_level(logging.DEBUG)
    before = len(audited.records())
    with monkeypatch.context() as patch:
        patch.setattr(frontdoor, "request_facts", broken)
        code, request_id = audited.call("ModelInfer", _request(f"ssn {SSN}"))
    assert (code, len(request_id)) == ("INTERNAL", 32)
    [record] = audited.records()[before:]
    assert (record["request_id"], record["code"]) == (request_id, "INTERNAL")
    assert f"unexpected RuntimeError routing request {request_id}" in caplog.text
    assert SSN not in caplog.text
    code, _ = audited.call("ModelInfer", _request(CLEAN), [("x-data-classification", "public")])
    assert code == "OK"


def test_requests_the_caller_gave_up_on_are_recorded_with_where_they_went(
    audited: Audited,
) -> None:
    """A deadline that passes, or a cancel, while a node works: the request's data has
    reached that node, so the trail records it (the code, and the endpoint), though
    nobody is left to answer."""
    stub, internal = audited.stub(), [("x-data-classification", "internal")]
    before = len(audited.records())
    # The node works ~4 s on this request; the router needs a moment to read and
    # classify its 51 MB first (longer on a busy machine), so give up after 2 s.
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(slow_ticket(), metadata=internal, timeout=2.0)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    future = stub.ModelInfer.future(slow_ticket(), metadata=internal, timeout=30)
    time.sleep(2.0)  # sent on, and at a node
    future.cancel()
    _wait(lambda: len(audited.records()) >= before + 2, 10, "both records")
    expired, cancelled = audited.records()[before:]
    nodes = {f"127.0.0.1:{n.port}" for n in audited.nodes}
    for record, code in ((expired, "DEADLINE_EXCEEDED"), (cancelled, "CANCELLED")):
        assert (record["code"], record["outcome"], record["zone"]) == (code, "routed", "onprem")
        assert record["endpoint"] in nodes and record["attempts"] == 1


def test_policy_reloads_are_recorded_before_what_they_decide(
    audited: Audited, capsys: pytest.CaptureFixture[str]
) -> None:
    admin = admin_pb2_grpc.RouterAdminStub(mtls_channel(audited.address, audited.pki, "admin"))
    original = audited.policy.read_text()
    try:
        audited.policy.write_text(original.replace("default_route:", "default_rout:"))
        assert not admin.ReloadPolicy(admin_pb2.ReloadPolicyRequest(), timeout=30).accepted
        audited.policy.write_text(original + "\n# reviewed\n")
        accepted = admin.ReloadPolicy(admin_pb2.ReloadPolicyRequest(), timeout=30)
        assert accepted.accepted
        _, request_id = audited.call(
            "ModelInfer", _request(CLEAN), [("x-data-classification", "public")]
        )
    finally:
        audited.policy.write_text(original)
        admin.ReloadPolicy(admin_pb2.ReloadPolicyRequest(), timeout=30)
    with contextlib.closing(connect_readonly(audited.db)) as conn:
        rows = conn.execute(
            "SELECT seq, body FROM records WHERE kind IN ('policy.reload', 'request')"
        ).fetchall()
    bodies = [(seq, json.loads(b)) for seq, b in rows]
    refused = [b for _, b in bodies if b["kind"] == "policy.reload" and not b["accepted"]]
    assert (
        refused
        and "default_rout" in str(refused[-1]["error"])
        and refused[-1]["why"] == "admin API"
    )
    reload_seq = next(s for s, b in bodies if b.get("policy") == accepted.version_hash)
    request_seq, request = next((s, b) for s, b in bodies if b.get("request_id") == request_id)
    assert request["policy"] == accepted.version_hash and request_seq > reload_seq
    assert (
        main(
            [
                "audit",
                "query",
                "--db",
                str(audited.db),
                "--format",
                "json",
                "--policy",
                accepted.version_hash[:12],
            ]
        )
        == 0
    )
    decided = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["seq"] for r in decided] == [reload_seq, request_seq]  # the reload, then its request
    (start,) = audited.records("router.start")
    assert start["certs"]["tls.cert"]["subject_cn"] == "router"  # type: ignore[index]
    assert audited.records("policy.load")[0]["accepted"] is True


def test_a_rotated_front_door_certificate_is_recorded(audited: Audited, tmp_path: Path) -> None:
    issue_leaf(
        audited.pki,
        "router",
        server=True,
        client=True,
        out=tmp_path,
        sans=["router", "localhost", "127.0.0.1"],
    )
    shutil.copy(tmp_path / "router.key", audited.root / "router.key")
    shutil.copy(tmp_path / "router.pem", audited.root / "router.pem")
    _wait(lambda: len(audited.records("cert.change")) >= 2, 10, "cert.change records")
    roles = {r["role"] for r in audited.records("cert.change")}
    assert roles == {"tls.cert", "tls.key"}
    assert (
        audited.call("ModelInfer", _request(CLEAN), [("x-data-classification", "public")])[0]
        == "OK"
    )


@contextlib.contextmanager
def _unwritable(db: Path) -> Iterator[str]:
    """Make the trail unwritable for real: the WAL immutable (chattr +i, which binds
    root too) where possible, else a write lock held by another connection."""
    wal = Path(f"{db}-wal")
    if (
        shutil.which("chattr")
        and subprocess.run(["chattr", "+i", str(wal)], capture_output=True).returncode == 0
    ):
        try:
            yield "cannot write"
        finally:
            subprocess.run(["chattr", "-i", str(wal)], check=True)
        return
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield "locked"
    finally:
        conn.close()


def test_an_unwritable_trail_refuses_requests_and_recovers_by_itself(audited: Audited) -> None:
    public = [("x-data-classification", "public")]
    assert audited.call("ModelInfer", _request(CLEAN), public)[0] == "OK"
    answers: list[tuple[str, str]] = []
    with _unwritable(audited.db) as reason:
        answers.append(audited.call("ModelInfer", _request(CLEAN), public))
        assert answers[0][0] == "UNAVAILABLE"
        _wait(
            lambda: audited.health() == health_pb2.HealthCheckResponse.NOT_SERVING, 5, "NOT_SERVING"
        )
        status = audited.status()
        assert "audit trail cannot be written" in status.not_serving_reason
        assert reason in status.audit_failure and not status.serving
        started = time.monotonic()
        answers += [audited.call("ModelInfer", _request(f"ssn {SSN}"), public) for _ in range(3)]
        assert {code for code, _ in answers} == {"UNAVAILABLE"} and time.monotonic() - started < 3
    _wait(lambda: audited.health() == health_pb2.HealthCheckResponse.SERVING, 10, "recovery")
    assert audited.status().audit_failure == ""
    answers.append(audited.call("ModelInfer", _request(CLEAN), public))
    assert answers[-1][0] == "OK"
    by_id = {r["request_id"]: r for r in audited.records()}
    for code, request_id in answers:
        assert by_id[request_id]["code"] == code  # every answer, the refused ones too
    assert by_id[answers[0][1]]["withheld"] == "OK"  # decided and forwarded, reply withheld
    assert by_id[answers[1][1]]["outcome"] == "rejected"  # refused before deciding
    (recovered,) = audited.records("audit.recovered")
    assert recovered["refused"] == 4


def test_a_stopped_router_leaves_a_sealed_trail_that_verifies(
    audited: Audited, pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    audited.loop.run(audited.router.stop(grace=1))
    (stop,) = audited.records("router.stop")
    assert stop["uptime_ms"] > 0
    code = main(
        ["audit", "verify", "--db", str(audited.db), "--key", str(pki / "audit-signing.pub")]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "unsealed" not in out  # sealed at shutdown
