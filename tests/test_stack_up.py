"""`hybridroute up` when the stack cannot start, and `router serve` without the cloud
token: one line saying what is wrong and what to do, and nothing left running. Also one
`up` per state dir (a second one refuses; one after a `kill -9` stops the leftovers),
Ctrl-C while starting, and a state dir from an older run.

`up` runs as a real process (it installs signal handlers and spawns a process tree);
the sample models are copied in so no test trains them again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import HYBRIDROUTE, Process, free_port, free_port_block

from hybridroute.cli import main
from hybridroute.stack import TOKEN_ENV, default_policy_path, write_router_config


@pytest.fixture
def state(tmp_path: Path, model_repo: Path) -> Iterator[Path]:
    """A state dir with the sample models in place; whatever `up` leaves running in it
    is killed afterwards (and the test says so)."""
    state = tmp_path / "state"
    shutil.copytree(model_repo, state / "models")
    shutil.copytree(model_repo, state / "cloud-models")
    yield state
    for pid in _running_in(state):
        os.kill(pid, signal.SIGKILL)


def _running_in(state: Path) -> list[int]:
    """Processes whose command line names the state dir: what `up` started there."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if str(state) in cmdline:
                found.append(int(entry.name))
    return found


def _up(state: Path, base: int) -> subprocess.CompletedProcess[str]:
    argv = [*HYBRIDROUTE, "up", "--state-dir", str(state), "--base-port", str(base)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_up_names_a_port_in_use_and_starts_nothing(state: Path) -> None:
    base = free_port_block(8)
    with socket.socket() as other:  # another program on node-2's port
        other.bind(("127.0.0.1", base + 2))
        other.listen()
        done = _up(state, base)
    assert done.returncode == 1
    assert (
        f"hybridroute up failed: port {base + 2} is in use (node-2, 127.0.0.1:{base + 2}): "
        "another stack running? choose another --base-port"
    ) in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
    assert not list((state / "logs").glob("node-*.log"))  # nothing was started
    assert _running_in(state) == []


def test_a_failed_up_stops_the_nodes_it_already_started(state: Path, pki: Path) -> None:
    shutil.copytree(pki, state / "pki")
    (state / "pki" / "cloud.key").write_text("not a key\n")  # cloud-1 cannot start
    base = free_port_block(8)
    done = _up(state, base)
    assert done.returncode == 1
    assert "hybridroute up failed: cloud-1 exited" in done.stdout
    assert "stopping: cloud-1, node-2, node-1" in done.stdout
    assert _running_in(state) == []  # node-1 and node-2 were started, and stopped
    assert _bindable(base + 1) and _bindable(base + 2)  # so `up` can be run again


def test_router_serve_without_the_cloud_token_says_which_variable_to_set(
    tmp_path: Path, pki: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    listen, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    config = write_router_config(tmp_path, pki, default_policy_path(), listen, metrics)
    code = main(["router", "serve", "--config", str(config)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"router not started: pool 'cloud': environment variable {TOKEN_ENV}" in err
    assert f"set {TOKEN_ENV} to the bearer token" in err
    assert "Traceback" not in err


def test_a_node_that_loses_a_port_race_is_reported_as_a_port_in_use(tmp_path: Path) -> None:
    """A port taken between the check and the node's bind: the node's traceback is
    read for the port, not repeated."""
    from hybridroute import stack

    log = tmp_path / "node-2.log"
    log.write_text(
        "E1127 add_port.cc:83] ... (Error in bind for address '[::ffff:127.0.0.1]:18302': "
        "Address already in use)\nTraceback (most recent call last):\n  ...\nRuntimeError: "
        "Failed to bind to address 127.0.0.1:18302; set GRPC_VERBOSITY=debug ...\n"
    )
    exited = subprocess.Popen([*HYBRIDROUTE[:1], "-c", "raise SystemExit(1)"])
    exited.wait()
    child = stack._Child("node-2", "onprem", "127.0.0.1:18302", exited, log)
    with pytest.raises(RuntimeError) as failed:
        stack._wait_ready(child, "node ready on")
    message = str(failed.value)
    assert message.startswith("node-2 could not listen: port 18302 is in use")
    assert "choose another --base-port" in message and "Traceback" not in message


# ------------------------------------------------------------ one `up` per state dir


def _start_up(state: Path, base: int, log: Path) -> Process:
    args = ["up", "--state-dir", str(state), "--base-port", str(base)]
    return Process(args, ready="hybridroute is up", log=log, timeout=120)


def _stack_pids(state: Path) -> dict[str, int]:
    info = json.loads((state / "stack.json").read_text())
    return {"router": info["router"]["pid"], **{n["name"]: n["pid"] for n in info["nodes"]}}


def _interrupt(up: Process) -> int:
    up.signal(signal.SIGINT)
    code = up.wait(60)
    up.stop()
    return code


def test_a_second_up_on_the_same_state_dir_refuses_and_leaves_the_first_alone(
    state: Path, tmp_path: Path
) -> None:
    """Even on other ports (what the port-in-use message used to suggest), a second `up`
    on the same DIR would rewrite the running router's policy.yaml (which it reloads),
    router.yaml and logs."""
    first = _start_up(state, free_port_block(8), tmp_path / "first.log")
    files = {name: (state / name).read_bytes() for name in ("policy.yaml", "router.yaml")}
    router_log = (state / "logs" / "router.log").stat().st_size
    done = _up(state, free_port_block(8))
    assert done.returncode == 1
    assert (
        f"hybridroute up failed: another `hybridroute up` (pid {first.proc.pid}) is running "
        f"on {state.resolve()}: stop it first"
    ) in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
    assert {name: (state / name).read_bytes() for name in files} == files
    assert (state / "logs" / "router.log").stat().st_size >= router_log
    assert first.proc.poll() is None
    assert main(["status", "--stack", str(state / "stack.json")]) == 0
    assert _interrupt(first) == 0
    assert _running_in(state) == []


def test_up_after_a_killed_up_stops_what_it_left_running_and_starts(
    state: Path, tmp_path: Path
) -> None:
    base = free_port_block(8)
    first = _start_up(state, base, tmp_path / "first.log")
    orphans = _stack_pids(state)
    first.proc.kill()  # kill -9: no chance to stop its children
    first.wait()
    assert set(orphans.values()) <= set(_running_in(state))  # still serving, unsupervised
    second = _start_up(state, base, tmp_path / "second.log")  # same ports
    assert "stopping what an earlier `hybridroute up` on this state dir left running" in (
        second.output
    )
    for name, pid in orphans.items():
        assert f"{name} (pid {pid})" in second.output
    assert set(orphans.values()).isdisjoint(_running_in(state))
    assert set(_stack_pids(state).values()) <= set(_running_in(state))
    assert _interrupt(second) == 0
    assert _running_in(state) == []


def test_ctrl_c_while_starting_stops_at_once(state: Path) -> None:
    argv = [*HYBRIDROUTE, "up", "--state-dir", str(state), "--base-port", str(free_port_block(8))]
    up = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not (state / "logs" / "node-1.log").exists():  # nodes spawned, not ready yet
        assert time.monotonic() < deadline and up.poll() is None
        time.sleep(0.02)
    up.send_signal(signal.SIGINT)
    out, _ = up.communicate(timeout=60)
    assert up.returncode == 130, out
    assert "hybridroute up: interrupted before the stack was up" in out
    assert "hybridroute is up" not in out and "Traceback" not in out
    assert "stopping: cloud-1, node-2, node-1" in out
    assert _running_in(state) == []


def test_up_on_a_state_dir_from_an_older_run_completes_what_is_missing(
    state: Path, pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A PKI with fewer apps than the stack's (an older run, or `certs init`), one of
    the sample models missing, a stale stack.json: `up` fills in what is missing and
    keeps the rest (the CA, a model version deployed since)."""
    shutil.copytree(pki, state / "pki")  # apps demo-app, other-app, admin
    ca = (state / "pki" / "ca.pem").read_bytes()
    shutil.rmtree(state / "models" / "ticket-triage")
    _iris_version(state / "models", 2)
    shutil.rmtree(state / "cloud-models")  # older runs had one repository for all nodes
    (state / "stack.json").write_text('{"router": {"address": "127.0.0.1:1", "pid": 1}}')
    up = _start_up(state, free_port_block(8), tmp_path / "up.log")
    assert "(existing; issued certificates for apps analytics, batch-jobs)" in up.output
    assert "(sample models ticket-triage) for the on-prem nodes" in up.output
    assert "(sample models iris, ticket-triage) for the cloud stand-in" in up.output
    assert (state / "pki" / "ca.pem").read_bytes() == ca
    assert (state / "models" / "iris" / "2").is_dir()
    # iris 2, deployed on-prem since, is not what the cloud stand-in loads
    assert not (state / "cloud-models" / "iris" / "2").exists()
    assert "model iris/2 READY" in (state / "logs" / "node-1.log").read_text()
    assert "model iris/2" not in (state / "logs" / "cloud-1.log").read_text()
    assert main(["demo", "--stack", str(state / "stack.json")]) == 0  # every app's cert
    assert "0 of" in capsys.readouterr().out
    assert _interrupt(up) == 0


def _iris_version(repo: Path, version: int) -> Path:
    """iris/1 of `repo` copied as iris/<version>, as `models deploy` would place it."""
    target = repo / "iris" / str(version)
    shutil.copytree(repo / "iris" / "1", target)
    text = (target / "model.yaml").read_text()
    (target / "model.yaml").write_text(text.replace("version: 1\n", f"version: {version}\n"))
    return target


def test_a_version_deployed_on_prem_stays_off_the_cloud_stand_in_across_restarts(
    state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`models deploy --to onprem` writes to the on-prem nodes' repository only: the
    cloud stand-in has its own, so the next `up` does not load the version there."""
    build = tmp_path / "build"
    shutil.copytree(state / "models" / "iris" / "1", build / "iris" / "1")
    version = _iris_version(build, 2)
    base = free_port_block(8)
    first = _start_up(state, base, tmp_path / "first.log")
    argv = ["models", "deploy", str(version), "--to", "onprem", "--stack"]
    assert main([*argv, str(state / "stack.json"), "--json"]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["node"], r["ok"]) for r in results] == [("node-1", True), ("node-2", True)]
    assert _interrupt(first) == 0
    second = _start_up(state, base, tmp_path / "second.log")
    logs = state / "logs"
    for node in ("node-1", "node-2"):
        assert "model iris/2 READY" in (logs / f"{node}.log").read_text(), node
    cloud = (logs / "cloud-1.log").read_text()
    assert f"model iris/1 READY ({state.resolve() / 'cloud-models' / 'iris' / '1'})" in cloud
    assert "iris/2" not in cloud and not (state / "cloud-models" / "iris" / "2").exists()
    info = json.loads((state / "stack.json").read_text())
    assert {n["name"]: n.get("repository") for n in info["nodes"]} == {
        "node-1": str(state.resolve() / "models"),
        "node-2": str(state.resolve() / "models"),
        "cloud-1": str(state.resolve() / "cloud-models"),
    }
    assert _interrupt(second) == 0


def test_the_banner_names_the_commands_as_they_can_be_typed_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`make run` starts .venv/bin/hybridroute without activating the venv: `hybridroute`
    alone is then not a command, so the banner says `.venv/bin/hybridroute`."""
    from hybridroute import stack

    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    for name in ("hybridroute", "python"):
        (venv_bin / name).write_text("")
        (venv_bin / name).chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setattr("sys.argv", [".venv/bin/hybridroute", "up"])
    monkeypatch.setattr("sys.executable", str(venv_bin / "python"))
    info = {
        "router": {"address": "127.0.0.1:8100", "ca": "/s/pki/ca.pem"},
        "apps": {"demo-app": {"cert": "/s/pki/app-demo-app.pem", "key": "/s/k"}},
    }
    banner = stack._usage(info, tmp_path / ".hybridroute" / "stack.json")
    assert "(installed in .venv/bin/python)" in banner
    lines = [ln.strip() for ln in banner.splitlines()]
    for command in ("demo", "status", "audit query", "audit verify"):  # default stack.json
        typed = re.compile(rf"\.venv/bin/hybridroute {command} +# ")
        assert any(typed.match(ln) for ln in lines), banner
    monkeypatch.setenv("PATH", f"{venv_bin}:/usr/bin:/bin")  # an activated venv
    banner = stack._usage(info, tmp_path / "elsewhere" / "stack.json")
    assert re.search(r"^    hybridroute demo --stack elsewhere/stack\.json +# ", banner, re.M)
