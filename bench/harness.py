"""What the node and router benchmarks set up alike: a bench directory (dev PKI, sample
models), `hybridroute` child processes and their `node serve` arguments, the default
policy pointed at the bench's endpoints, iris requests, and CPU time from /proc.

The router config is the one `hybridroute up` writes: `hybridroute.stack.write_router_config`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

from hybridroute.certs.pki import init_pki
from hybridroute.node.samples import write_samples
from hybridroute.protos import inference_pb2 as pb
from hybridroute.stack import TOKEN_ENV, default_policy_path

__all__ = [
    "APP",
    "METHOD",
    "TOKEN_ENV",
    "Child",
    "cpu_seconds",
    "iris_payloads",
    "node_args",
    "prepare",
    "render_policy",
]

METHOD = "/inference.GRPCInferenceService/ModelInfer"
APP = "demo-app"  # the caller the benches call the router as


def prepare(root: Path) -> tuple[Path, Path, Path]:
    """`root/pki` (a fresh dev PKI with the app `APP`), `root/models` (the sample models)
    and an empty `root/logs`, replacing what a kept directory held from an earlier run."""
    pki, models, logs = root / "pki", root / "models", root / "logs"
    logs.mkdir(exist_ok=True)
    init_pki(pki, apps=(APP,), force=True)
    write_samples(models, force=True)
    return pki, models, logs


# --- processes ----------------------------------------------------------------------


class Child:
    """A `python -m MODULE ARGS` process (MODULE: `hybridroute` unless said otherwise)
    whose output goes to `logs/NAME.log`; ready when `marker` shows there."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        logs: Path,
        env: dict[str, str] | None = None,
        *,
        module: str = "hybridroute",
    ) -> None:
        self.name = name
        self.log = logs / f"{name}.log"
        with open(self.log, "wb") as handle:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def wait_ready(self, marker: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while marker not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self._tail()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s:\n{self._tail()}")
            time.sleep(0.05)

    def _tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def node_args(
    models: Path,
    pki: Path,
    listen: str,
    *,
    onprem: bool = True,
    allow: Sequence[str] = ("router",),
) -> list[str]:
    """`node serve` arguments as `hybridroute up` gives them: on-prem, mutual TLS as
    `node` serving only the identities `allow` (none: any client the CA signed); else a
    cloud stand-in, server-side TLS as `cloud` behind the bearer token in TOKEN_ENV."""
    identity = "node" if onprem else "cloud"
    args = [
        "node",
        "serve",
        "--models",
        str(models),
        "--listen",
        listen,
        "--cert",
        str(pki / f"{identity}.pem"),
        "--key",
        str(pki / f"{identity}.key"),
    ]
    if not onprem:
        return [*args, "--bearer-token-env", TOKEN_ENV]
    args += ["--client-ca", str(pki / "ca.pem")]
    for client in allow:
        args += ["--allow-client", client]
    return args


def render_policy(root: Path, onprem: str, cloud: str) -> Path:
    """policies/default.yaml with one endpoint per pool, written to `root/policy.yaml`:
    `onprem` for the on-prem pools, `cloud` for the cloud ones."""
    policy = yaml.safe_load(default_policy_path().read_text())
    zones = {"onprem": onprem, "cloud": cloud}
    for name, pool in policy["pools"].items():
        if pool["zone"] not in zones:
            raise RuntimeError(f"pool {name}: unexpected zone {pool['zone']!r}")
        pool["endpoints"] = [zones[pool["zone"]]]
    target = root / "policy.yaml"
    target.write_text(yaml.safe_dump(policy, sort_keys=False))
    return target


# --- requests and measuring ---------------------------------------------------------


def iris_payloads() -> list[bytes]:
    """256 serialised iris requests, one seeded row of 4 x FP64 each."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(256):
        request = pb.ModelInferRequest(model_name="iris")
        request.inputs.add(name="input", datatype="FP64", shape=[1, 4])
        request.raw_input_contents.append(rng.uniform(0.1, 7.0, size=(1, 4)).tobytes())
        out.append(request.SerializeToString())
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc; raises OSError,
    ValueError or IndexError elsewhere)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
