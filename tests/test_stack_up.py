"""`hybridroute up` when the stack cannot start, and `router serve` without the cloud
token: one line saying what is wrong and what to do, and nothing left running.

`up` runs as a real process (it installs signal handlers and spawns a process tree);
the sample models are copied in so no test trains them again.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import HYBRIDROUTE, free_port, free_port_block

from hybridroute.cli import main
from hybridroute.stack import TOKEN_ENV, default_policy_path, write_router_config


@pytest.fixture
def state(tmp_path: Path, model_repo: Path) -> Iterator[Path]:
    """A state dir with the sample models in place; whatever `up` leaves running in it
    is killed afterwards (and the test says so)."""
    state = tmp_path / "state"
    shutil.copytree(model_repo, state / "models")
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
