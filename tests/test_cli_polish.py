"""What a newcomer walking the README runs into at the edges of the commands: output
cut short by its reader (`... | head -1`) ends any `hybridroute` command quietly, as it
does any other Unix tool (exit 141, no traceback). Run as real processes, because a
closed pipe is noticed only by a real file descriptor, and partly only at exit."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
from test_audit_verify import trail  # noqa: F401 - a fixture

from hybridroute import stack as stack_module

POLICIES = Path(str(resources.files("hybridroute.policies")))
DEFAULT = str(POLICIES / "default.yaml")
CASES = str(POLICIES / "tests" / "default_cases.yaml")
SCRIPT = Path(sys.executable).with_name("hybridroute")  # the console script a user types
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "hybridroute"]


def _piped(argv: list[str], *, read_first_line: bool) -> tuple[int, bytes, str]:
    """Run `hybridroute ARGV | reader`, where the reader takes the first line and closes
    the pipe (as `head -1`), or has closed it before anything was written (as a reader
    that exited at once). Returns (exit code, what the reader got, stderr)."""
    r, w = os.pipe()
    if not read_first_line:
        os.close(r)  # no reader at all: the first write meets a closed pipe
    proc = subprocess.Popen(
        [*COMMAND, *argv], stdout=w, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    os.close(w)
    first = b""
    if read_first_line:
        with os.fdopen(r, "rb") as reader:
            first = reader.readline()
    _, err = proc.communicate(timeout=120)
    return proc.returncode, first, err.decode(errors="replace")


def _assert_quiet_sigpipe(code: int, err: str) -> None:
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert "Exception ignored" not in err, err
    assert code == 141, (code, err)


def test_head_1_of_a_long_output_ends_the_command_quietly() -> None:
    # six copies of the cases, traces and all: far more than a pipe holds, so the
    # command is still writing when `head -1` has its line and goes
    argv = ["policy", "test", DEFAULT, *[CASES] * 6, "-v"]
    code, first, err = _piped(argv, read_first_line=True)
    assert first.startswith(b"PASS  ")
    _assert_quiet_sigpipe(code, err)


@pytest.mark.parametrize(
    "argv",
    [
        ["policy", "check", "--json", DEFAULT],
        ["policy", "explain", DEFAULT, "--request", "{request}", "--json"],
        ["drift", "report", "--node", "127.0.0.1:1", "--insecure", "--json", "--timeout", "5"],
        ["models", "list", "--node", "127.0.0.1:1", "--insecure", "--json", "--timeout", "5"],
    ],
    ids=["policy-check", "policy-explain", "drift-report", "models-list"],
)
def test_a_reader_that_went_away_ends_any_command_quietly(argv: list[str], tmp_path: Path) -> None:
    request = tmp_path / "req.yaml"
    request.write_text("caller: demo-app\nmodel: iris\ninputs: {text: [hello]}\n")
    argv = [a.format(request=request) for a in argv]
    code, _, err = _piped(argv, read_first_line=False)
    _assert_quiet_sigpipe(code, err)


def test_an_audit_export_into_a_closed_pipe_ends_quietly(trail: Path) -> None:  # noqa: F811
    code, _, err = _piped(
        ["audit", "export", "--db", str(trail / "audit.db")], read_first_line=False
    )
    _assert_quiet_sigpipe(code, err)


class _ClosedPipe(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_up_keeps_its_stack_when_its_reader_goes_away(monkeypatch: pytest.MonkeyPatch) -> None:
    """`hybridroute up | head -3`: losing the reader must not end `up` halfway (its
    processes left unsupervised); its progress lines then go nowhere."""
    monkeypatch.setattr("sys.stdout", _ClosedPipe())
    stack_module._say("  pki      .hybridroute/pki (existing)")  # no BrokenPipeError
    stack_module._say("stopping: router, cloud-1, node-2, node-1")
