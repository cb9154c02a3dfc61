"""`hybridroute status` and `hybridroute demo` against the shared running stack.

The CLI is called in-process (`hybridroute.cli.main`) so each check costs one RPC, not
an interpreter start; failure modes the shared stack cannot show (NOT_SERVING, a
refused reload, a dead process, a leak) are fed through the same rendering code with
a synthetic admin response or outcome.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support import free_port

from hybridroute import demo, status
from hybridroute.cli import main
from hybridroute.protos import admin_pb2


def _stack_file(stack: Any) -> str:
    return str(stack.state_dir / "stack.json")


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _policy_sha256(stack: Any) -> str:
    return hashlib.sha256(Path(stack.info["policy"]).read_bytes()).hexdigest()


def _admin_args(stack: Any, app: str = "admin", ca: Path | None = None) -> list[str]:
    files = stack.info["apps"][app]
    return [
        "--ca",
        str(ca or stack.info["router"]["ca"]),
        "--cert",
        files["cert"],
        "--key",
        files["key"],
    ]


# ------------------------------------------------------------------------------ status


def test_status_table_shows_a_serving_router_its_endpoints_and_policy(stack, capsys) -> None:
    code, out, _ = _run(capsys, "status", "--stack", _stack_file(stack))
    assert code == 0
    assert "state     SERVING" in out
    assert "audit writing" in out
    assert f"version       {_policy_sha256(stack)[:12]}" in out
    assert "last refused  none" in out
    lines = out.splitlines()
    for node in stack.info["nodes"]:
        row = next(ln for ln in lines if node["address"] in ln and "healthy" in ln)
        assert node["zone"] in row and node["name"] in row
        proc = next(ln for ln in lines if node["address"] in ln and str(node["pid"]) in ln)
        assert "alive" in proc and node["metrics"] in proc
    assert sum("onprem  onprem" in ln and "healthy" in ln for ln in lines) == 2
    assert any("cloud   cloud" in ln and "healthy" in ln for ln in lines)
    assert ".key" not in out  # no key material, not even key paths


def test_status_json_has_the_documented_keys(stack, capsys) -> None:
    code, out, _ = _run(capsys, "status", "--stack", _stack_file(stack), "--json")
    assert code == 0
    data = json.loads(out)
    assert set(data) == {"router", "policy", "endpoints", "rollouts", "processes"}
    assert data["rollouts"] == []  # the default policy rolls nothing out
    assert set(data["router"]) == {
        "address", "version", "serving", "not_serving_reason", "started_at",
        "uptime_seconds", "in_flight", "audit",
    }  # fmt: skip
    assert data["router"]["serving"] is True
    assert data["router"]["address"] == stack.router_address
    assert data["router"]["audit"] == {"ok": True, "failure": None}
    assert set(data["policy"]) == {
        "path", "version_hash", "loaded_at", "loaded_seconds_ago", "warnings", "signed_by",
        "signed_at", "last_refused",
    }  # fmt: skip
    assert data["policy"]["version_hash"] == _policy_sha256(stack)
    assert data["policy"]["last_refused"] is None
    endpoint_keys = {
        "pool", "zone", "address", "node", "healthy", "outstanding", "seconds_since_check",
        "last_error",
    }  # fmt: skip
    assert all(set(e) == endpoint_keys and e["healthy"] for e in data["endpoints"])
    assert sorted(e["zone"] for e in data["endpoints"]) == ["cloud", "onprem", "onprem"]
    assert {p["name"] for p in data["processes"]} == {"router", "node-1", "node-2", "cloud-1"}
    assert all(p["alive"] for p in data["processes"])


def test_status_with_explicit_router_and_credentials(stack, capsys) -> None:
    code, out, _ = _run(capsys, "status", "--router", stack.router_address, *_admin_args(stack))
    assert code == 0
    assert "SERVING" in out
    assert "local processes" not in out  # no stack.json, no process table


def test_status_of_an_unreachable_router_exits_2_and_says_what_to_check(stack, capsys) -> None:
    address = f"127.0.0.1:{free_port()}"
    code, out, err = _run(capsys, "status", "--router", address, *_admin_args(stack))
    assert code == 2
    assert out == ""
    assert f"cannot get status from the router at {address}" in err
    assert "UNAVAILABLE" in err
    assert "is the router running" in err


def test_status_with_a_non_admin_certificate_is_refused_clearly(stack, capsys) -> None:
    args = _admin_args(stack, app="demo-app")
    code, out, err = _run(capsys, "status", "--router", stack.router_address, *args)
    assert code == 2
    assert out == ""
    assert "PERMISSION_DENIED" in err
    assert "admins" in err


def test_status_against_the_wrong_ca_exits_2(stack, pki, capsys) -> None:
    args = _admin_args(stack, ca=pki / "ca.pem")  # another dev CA than the router's
    code, _, err = _run(capsys, "status", "--router", stack.router_address, *args)
    assert code == 2
    assert "UNAVAILABLE" in err and "CA" in err


def test_status_without_a_stack_file_says_how_to_point_at_a_router(
    tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(capsys, "status")
    assert code == 2
    assert "hybridroute up" in err and "--stack FILE" in err and "--router ADDR" in err


def _not_serving_response() -> admin_pb2.StatusResponse:
    response = admin_pb2.StatusResponse(
        version="0.1.0",
        serving=False,
        not_serving_reason="audit trail cannot be written: disk full",
        started_at=1000.0,
        audit_failure="disk full",
        policy=admin_pb2.PolicyStatus(
            path="/p.yaml",
            version_hash="ab" * 32,
            loaded_at=1000.0,
            last_refused_error="policy.yaml:12: rule 'x' sends sensitive data to cloud",
            last_refused_at=1100.0,
            warnings=2,
        ),
    )
    response.endpoints.add(pool="onprem", zone="onprem", address="h:1", healthy=False,
                           last_error="connection refused", seconds_since_check=-1.0)  # fmt: skip
    return response


def test_not_serving_exits_1_and_shows_why(monkeypatch, capsys) -> None:
    monkeypatch.setattr(status, "fetch_status", lambda target, timeout: _not_serving_response())
    argv = ["status", "--router", "h:0", "--ca", "c", "--cert", "c", "--key", "k"]
    code, out, _ = _run(capsys, *argv)
    assert code == 1
    assert "NOT_SERVING: audit trail cannot be written: disk full" in out
    assert "audit FAILING: disk full" in out
    assert "rule 'x' sends sensitive data to cloud" in out
    assert "warnings      2" in out
    row = next(ln for ln in out.splitlines() if "h:1" in ln)
    assert "UNHEALTHY" in row and "never" in row and "connection refused" in row


def test_an_exited_node_process_is_shown(tmp_path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stack = {"router": {"address": "h:0", "pid": dead.pid}, "nodes": [
        {"name": "node-1", "zone": "onprem", "address": "h:1", "pid": dead.pid,
         "metrics": "http://h:2/metrics"}]}  # fmt: skip
    data = status.status_to_dict(_not_serving_response(), "h:0", stack, now=1200.0)
    assert [p["alive"] for p in data["processes"]] == [False, False]
    assert data["endpoints"][0]["node"] == "node-1"
    assert data["policy"]["last_refused"]["seconds_ago"] == 100.0
    assert "EXITED" in status.render_status(data)


# -------------------------------------------------------------------------------- demo


def test_demo_sends_every_sensitive_kind_on_prem(stack) -> None:
    outcomes = demo.send_all(stack.info, demo.KINDS, len(demo.KINDS))
    assert [o.kind for o in outcomes] == list(demo.KINDS)
    for o in outcomes:
        assert o.as_expected, o
        assert not o.leaked, o
        if o.kind.sensitive:
            assert o.zone in ("onprem", demo.DENIED), o
    assert {o.zone for o in outcomes} == {"onprem", "cloud", demo.DENIED}


def test_demo_command_prints_where_each_kind_went(stack, capsys) -> None:
    code, out, _ = _run(capsys, "demo", "--stack", _stack_file(stack))
    assert code == 0
    for kind in demo.KINDS:
        row = next(ln for ln in out.splitlines() if ln.startswith(kind.name))
        assert row.endswith(" ok"), row
    assert f"0 of {3 * sum(k.sensitive for k in demo.KINDS)} sensitive requests" in out
    assert "reached the cloud" in out
    assert "node counters" in out and "warning" not in out


def test_demo_names_its_session_so_the_audit_trail_can_be_searched_for_it(stack, capsys) -> None:
    """The README's `audit query --session SESSION-ID`: the demo says which id it sent."""
    code, out, _ = _run(capsys, "demo", "--stack", _stack_file(stack))
    assert code == 0
    line = next(ln for ln in out.splitlines() if ln.startswith("session id demo-"))
    session = line.split()[2].rstrip(":")
    assert f"audit query --stack {_stack_file(stack)} --session {session}`" in line
    argv = ["audit", "query", "--stack", _stack_file(stack), "--session", session]
    code, out, _ = _run(capsys, *argv, "--format", "json")
    assert code == 0
    records = [json.loads(ln) for ln in out.splitlines() if ln.strip()]
    sessions = sum(k.session for k in demo.KINDS)
    assert len(records) == 3 * sessions  # each session kind, 3 rounds, and nothing else


def test_demo_without_a_stack_file_says_what_it_takes(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(capsys, "demo")
    assert code == 2
    assert "start one with `hybridroute up`" in err and "--stack FILE" in err
    assert "--router" not in err  # status takes --router; demo does not


def test_demo_flags_a_sensitive_request_served_by_the_cloud(stack, monkeypatch, capsys) -> None:
    email = next(k for k in demo.KINDS if "email" in k.name)
    leak = [demo.Outcome(email, "cloud", "cloud", "OK")]
    monkeypatch.setattr(demo, "send_all", lambda *a, **kw: leak)
    code, out, _ = _run(capsys, "demo", "--stack", _stack_file(stack), "--count", "1")
    assert code == 1
    assert "LEAK!" in out
    assert "1 of 1 sensitive requests reached the cloud" in out
    assert f"FAIL: sensitive requests were served by the cloud: {email.name}" in out


def test_demo_against_a_stopped_router_exits_2(stack, tmp_path, capsys) -> None:
    info = json.loads(json.dumps(stack.info))
    info["router"]["address"] = f"127.0.0.1:{free_port()}"
    path = tmp_path / "stack.json"
    path.write_text(json.dumps(info))
    code, _, err = _run(capsys, "demo", "--stack", str(path))
    assert code == 2
    assert "cannot reach the router" in err and info["router"]["address"] in err


# ------------------------------------------------------------------------------- ports


def test_the_router_metrics_port_is_fixed_by_the_base_port(stack) -> None:
    """Router on N, endpoints on N+1.., its metrics on the port after them: the same at
    every start, so a restarted stack's router config (hashed into the audit trail's
    router.start record) is unchanged, not "CONFIG CHANGED" by a random port."""
    router_port = int(stack.router_address.rpartition(":")[2])
    metrics = f"http://127.0.0.1:{router_port + len(stack.info['nodes']) + 1}/metrics"
    assert stack.info["router"]["metrics"] == metrics
    config = Path(stack.info["router"]["config"]).read_text()
    assert f"metrics_listen: 127.0.0.1:{router_port + len(stack.info['nodes']) + 1}" in config
