"""Helpers for tests that run real servers: free ports, background event loops, nodes
in-process, processes, and certificates minted from the session CA."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

if TYPE_CHECKING:
    from hybridroute.node.server import NodeServer

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


@contextmanager
def running_node(models: Path, pki: Path | None, **options: object) -> Iterator[NodeServer]:
    """A `NodeServer` serving `models` on a free port from a background loop, stopped on
    exit. With `pki`: mutual TLS as the session PKI's `node`, serving `router` and
    `demo-app`; `options` are further `NodeOptions` fields and override these."""
    from hybridroute.node.server import NodeOptions, NodeServer

    settings: dict[str, object] = {"models": models, "listen": "127.0.0.1:0"}
    if pki is not None:
        settings |= {
            "cert": pki / "node.pem",
            "key": pki / "node.key",
            "client_ca": pki / "ca.pem",
            "allow_clients": ("router", "demo-app"),
            "grace_seconds": 1.0,
        }
    loop = LoopThread()
    node = NodeServer(NodeOptions(**{**settings, **options}))  # type: ignore[arg-type]
    loop.run(node.start())
    try:
        yield node
    finally:
        loop.run(node.stop(grace=1))
        loop.close()


def router_channel(node: NodeServer, pki: Path, identity: str = "router") -> grpc.Channel:
    """A mutual-TLS channel to an in-process node as `identity` (default: the router)."""
    from hybridroute.certs.credentials import channel_credentials

    creds = channel_credentials(pki / "ca.pem", pki / f"{identity}.pem", pki / f"{identity}.key")
    return grpc.secure_channel(f"localhost:{node.port}", creds)


class Process:
    """A `hybridroute` subprocess that prints a ready line; killed at exit if still alive."""

    def __init__(
        self, args: Sequence[str], *, ready: str | None, log: Path, timeout: float = 60
    ) -> None:
        """Start it and wait for `ready` in its output (None: do not wait)."""
        self.log_path = log
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [*HYBRIDROUTE, *args], stdout=self._log, stderr=subprocess.STDOUT, env=env
        )
        if ready is not None:
            self.wait_for(ready, timeout)

    def wait_for(self, text: str, timeout: float = 60) -> None:
        """Until `text` is in the output; fails if the process ends or time runs out."""
        log, ready = self.log_path, text
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


def free_port_block(count: int) -> int:
    """A base port such that base .. base+count-1 are free right now."""
    import random

    for _ in range(200):
        base = random.randrange(20000, 40000)
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return base
    raise RuntimeError(f"no block of {count} free ports")


def mint_leaf(
    pki: Path,
    out: Path,
    stem: str,
    *,
    cn: str | None,
    organization: str | None = None,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    client: bool = False,
    server: bool = False,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> x509.Certificate:
    """A leaf certificate from the session CA with exactly this subject, these SANs
    (none without `dns` or `ips`), usages and validity (by default from five minutes ago
    to a day from now): what `certs issue` will not make, or what another tool might
    issue. Written as `out`/STEM.key, then `out`/STEM.pem."""
    from hybridroute.certs.pki import PkiLayout

    layout = PkiLayout(pki)
    ca_cert = x509.load_pem_x509_certificate(layout.ca.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(layout.ca.key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    attrs = []
    if organization is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    if cn is not None:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
    usages += [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5) if not_before is None else not_before)
        .not_valid_after(now + dt.timedelta(days=1) if not_after is None else not_after)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (out / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert


class Stack:
    """`hybridroute up` as a real process tree; `info` is its stack.json."""

    def __init__(
        self,
        state_dir: Path,
        *,
        policy: Path | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 120,
    ) -> None:
        import json

        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        args = ["up", "--state-dir", str(state_dir), "--base-port", str(free_port_block(8))]
        if policy is not None:
            args += ["--policy", str(policy)]
        if env:
            os.environ.update(env)
        self.process = Process(
            args, ready="hybridroute is up", log=state_dir / "up.log", timeout=timeout
        )
        self.info = json.loads((state_dir / "stack.json").read_text())

    @property
    def router_address(self) -> str:
        return str(self.info["router"]["address"])

    def node(self, name: str) -> dict[str, Any]:
        return next(n for n in self.info["nodes"] if n["name"] == name)

    def channel(self, app: str = "demo-app") -> grpc.Channel:
        from hybridroute.certs.credentials import channel_credentials

        files = self.info["apps"][app]
        creds = channel_credentials(
            Path(self.info["router"]["ca"]), Path(files["cert"]), Path(files["key"])
        )
        return grpc.secure_channel(self.router_address, creds)

    def stop(self) -> int:
        if self.process.proc.poll() is None:
            self.process.proc.send_signal(signal.SIGTERM)
            try:
                return self.process.proc.wait(60)
            finally:
                self.process.stop()
        self.process.stop()
        return int(self.process.proc.returncode)
