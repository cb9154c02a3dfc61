"""Helpers for tests that run real servers: free ports, background event loops, processes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc

T = TypeVar("T")

HYBRIDROUTE = [sys.executable, "-m", "hybridroute"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LoopThread:
    """An asyncio loop in a daemon thread, for running servers beside sync test code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


class Process:
    """A `hybridroute` subprocess that prints a ready line; killed at exit if still alive."""

    def __init__(self, args: Sequence[str], *, ready: str, log: Path, timeout: float = 60) -> None:
        self.log_path = log
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [*HYBRIDROUTE, *args], stdout=self._log, stderr=subprocess.STDOUT, env=env
        )
        deadline = time.monotonic() + timeout
        while ready not in log.read_text():
            if self.proc.poll() is not None:
                raise RuntimeError(f"process exited {self.proc.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"no {ready!r} within {timeout}s:\n{log.read_text()}")
            time.sleep(0.05)

    @property
    def output(self) -> str:
        return self.log_path.read_text()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()


def mtls_channel(address: str, pki: Path, app: str = "demo-app") -> grpc.Channel:
    from hybridroute.certs.credentials import channel_credentials

    creds = channel_credentials(pki / "ca.pem", pki / f"app-{app}.pem", pki / f"app-{app}.key")
    return grpc.secure_channel(address, creds)
