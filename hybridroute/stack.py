"""`hybridroute up`: the whole system on one machine, on embedded defaults.

Makes what is missing in the state directory (dev PKI, sample models), starts one
on-prem node per on-prem endpoint of the policy, one cloud stand-in per cloud endpoint
(a node serving server-side TLS behind a bearer token, as a cloud endpoint would),
then the router; waits until the router reports SERVING, writes `DIR/stack.json` and
runs until Ctrl-C or SIGTERM, when it stops everything it started.

Every process is a real `hybridroute` process with its log in `DIR/logs/`, so the
stack is also what the end-to-end tests and the demo run against.

Ports: the router on 8100 (or --base-port N), the policy's endpoints on their own
addresses (or N+1, N+2, ...), the router's metrics on the next port after them. Fixed,
so an unchanged stack restarts with an unchanged router config (the audit trail
records a changed one). Every port is checked before anything starts, and each process
is stopped again if a later one fails to start.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

__all__ = ["STACK_APPS", "StackOptions", "run_stack", "write_router_config"]

STACK_APPS = ("demo-app", "analytics", "batch-jobs", "admin")
TOKEN_ENV = "HYBRIDROUTE_CLOUD_TOKEN"  # noqa: S105 - the variable name, not a token


@dataclass(frozen=True)
class StackOptions:
    state_dir: Path = Path(".hybridroute")
    policy: Path | None = None  # default: the packaged policies/default.yaml
    base_port: int | None = None  # move every address to base_port, base_port+1, ...
    host: str = "127.0.0.1"


@dataclass
class _Child:
    name: str
    zone: str
    address: str
    proc: subprocess.Popen[bytes]
    log: Path
    metrics: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def default_policy_path() -> Path:
    return Path(str(resources.files("hybridroute.policies") / "default.yaml"))


def _say(message: str) -> None:
    print(message, flush=True)


def _prepare_pki(state: Path) -> Path:
    from hybridroute.certs.pki import init_pki

    pki = state / "pki"
    if (pki / "ca.pem").exists():
        _say(f"  pki      {pki} (existing)")
        return pki
    init_pki(pki, apps=STACK_APPS)
    _say(f"  pki      {pki} (new dev CA; apps: {', '.join(STACK_APPS)})")
    return pki


def _prepare_models(state: Path) -> Path:
    from hybridroute.node.samples import write_samples

    models = state / "models"
    if (models / "iris").exists() and (models / "ticket-triage").exists():
        _say(f"  models   {models} (existing)")
        return models
    write_samples(models)
    _say(f"  models   {models} (sample models iris, ticket-triage)")
    return models


def _pools(policy_text: str) -> dict[str, dict[str, Any]]:
    data = yaml.safe_load(policy_text) or {}
    pools = data.get("pools") or {}
    return {str(name): spec for name, spec in pools.items() if isinstance(spec, dict)}


def _render_policy(opts: StackOptions, state: Path) -> tuple[Path, list[tuple[str, str, str]]]:
    """Write DIR/policy.yaml (addresses moved to --base-port); return its endpoints as
    (pool, zone, address), in order."""
    source = opts.policy or default_policy_path()
    text = source.read_text()
    endpoints = [
        (name, str(spec.get("zone")), str(address))
        for name, spec in _pools(text).items()
        for address in spec.get("endpoints") or []
    ]
    if opts.base_port is not None:
        moved = []
        for i, (pool, zone, address) in enumerate(endpoints, start=1):
            new = f"{opts.host}:{opts.base_port + i}"
            text = re.sub(rf"(?<![\d.]){re.escape(address)}(?!\d)", new, text)
            moved.append((pool, zone, new))
        endpoints = moved
    target = state / "policy.yaml"
    target.write_text(text)
    return target, endpoints


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class _NodePlan:
    name: str
    pool: str
    zone: str
    address: str


def _plan_nodes(endpoints: list[tuple[str, str, str]]) -> list[_NodePlan]:
    """One node per endpoint, named node-1, node-2, ... (on-prem) and cloud-1, ..."""
    plans = []
    counts: dict[str, int] = {}
    for pool, zone, address in endpoints:
        counts[zone] = counts.get(zone, 0) + 1
        name = f"{'node' if zone == 'onprem' else 'cloud'}-{counts[zone]}"
        plans.append(_NodePlan(name, pool, zone, address))
    return plans


def _port_of(address: str) -> int | None:
    port = address.rpartition(":")[2]
    return int(port) if port.isdigit() else None


def _router_ports(opts: StackOptions, endpoints: list[tuple[str, str, str]]) -> tuple[int, int]:
    """The router's port and its metrics port: the first port after the endpoints' that
    none of them uses (a random one would change the router config at every start)."""
    port = opts.base_port if opts.base_port is not None else 8100
    taken = {port, *(p for _, _, a in endpoints if (p := _port_of(a)) is not None)}
    metrics = port + len(endpoints) + 1
    while metrics in taken:
        metrics += 1
    return port, metrics


def _in_use(address: str) -> bool:
    """Is something listening on `address`? Bound as the servers bind (SO_REUSEADDR, so
    a port a stopped stack left in TIME_WAIT counts as free); other failures (a host
    that is not this machine's) are left to the process to report."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, int(port)))
        except (OSError, ValueError, OverflowError) as exc:
            return getattr(exc, "errno", None) == errno.EADDRINUSE
    return False


def _port_in_use(port: str, who: str) -> str:
    """`port` is "port N", or words for one not known."""
    return (
        f"{port} is in use ({who}): another stack running? choose another --base-port, "
        "or stop what listens there"
    )


def _check_ports(addresses: list[tuple[str, str]]) -> None:
    """Refuse before starting anything when a port the stack needs is taken: a clear
    line now instead of a node's traceback after the others have started."""
    for who, address in addresses:
        if _in_use(address):
            raise RuntimeError(_port_in_use(f"port {_port_of(address)}", f"{who}, {address}"))


def _spawn(
    name: str, args: list[str], logs: Path, env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], Path]:
    log = logs / f"{name}.log"
    handle = open(log, "wb")  # noqa: SIM115 - owned by the child for its lifetime
    proc = subprocess.Popen(
        [sys.executable, "-m", "hybridroute", *args],
        stdout=handle,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    handle.close()
    return proc, log


_BIND_FAILED = re.compile(r"(?:Failed to bind to address|could not bind) (\S+):(\d+)")


def _wait_ready(child: _Child, marker: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while marker not in (text := child.log.read_text(errors="replace")):
        if child.proc.poll() is not None:
            if "already in use" in text or "address in use" in text:
                found = _BIND_FAILED.search(text)
                port = f"port {found[2]}" if found else "one of its ports"
                raise RuntimeError(
                    f"{child.name} could not listen: " + _port_in_use(port, f"log: {child.log}")
                )
            raise RuntimeError(
                f"{child.name} exited with {child.proc.returncode}; its log "
                f"({child.log}) ends:\n{_tail(child.log)}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(f"{child.name} not ready after {timeout:.0f}s; see {child.log}")
        time.sleep(0.05)


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _start_nodes(
    plans: list[_NodePlan],
    pki: Path,
    models: Path,
    logs: Path,
    env: dict[str, str],
    host: str,
    children: list[_Child],
) -> list[_Child]:
    """Start a node per plan and wait until each is ready. Each is appended to
    `children` as soon as it is spawned, so whoever stops `children` stops it too when
    a later one fails."""
    started = []
    for plan in plans:
        metrics = f"{host}:{_free_port(host)}"
        identity = "node" if plan.zone == "onprem" else "cloud"
        args = [
            "node",
            "serve",
            "--models",
            str(models),
            "--listen",
            plan.address,
            "--cert",
            str(pki / f"{identity}.pem"),
            "--key",
            str(pki / f"{identity}.key"),
            "--metrics-listen",
            metrics,
        ]
        if plan.zone == "onprem":
            args += ["--client-ca", str(pki / "ca.pem"), "--allow-client", "router"]
        else:
            args += ["--bearer-token-env", TOKEN_ENV]
        proc, log = _spawn(plan.name, args, logs, env)
        metrics_url = f"http://{metrics}/metrics"
        child = _Child(plan.name, plan.zone, plan.address, proc, log, metrics_url)
        child.extra["pool"] = plan.pool
        children.append(child)
        started.append(child)
    for child in started:
        _wait_ready(child, "node ready on")
        _say(
            f"  {child.name:<8} {child.address} ({child.zone}, pool {child.extra['pool']}, "
            f"pid {child.proc.pid})"
        )
    return started


def write_router_config(state: Path, pki: Path, policy: Path, listen: str, metrics: str) -> Path:
    """Write `state/router.yaml`, the router config `hybridroute up` runs: front door on
    `listen` with client certificates, mutual TLS to nodes as `router`, `policy`, metrics
    on `metrics`, `admin` as the admin identity, and the audit trail in `state` sealed
    with the PKI's audit signing key. Returns its path. (The benchmarks use it too.)"""
    config = {
        "listen": listen,
        "tls": {
            "cert": str(pki / "router.pem"),
            "key": str(pki / "router.key"),
            "client_ca": str(pki / "ca.pem"),
        },
        "policy": str(policy),
        "upstream": {
            "ca": str(pki / "ca.pem"),
            "cert": str(pki / "router.pem"),
            "key": str(pki / "router.key"),
            "cloud_ca": str(pki / "ca.pem"),
        },
        "metrics_listen": metrics,
        "admins": ["admin"],
        "audit": {  # the trail in the state dir, sealed with the key `certs init` made
            "db": str(state / "audit.db"),
            "hmac_key": str(state / "audit-hmac.key"),
            "signing_key": str(pki / "audit-signing.key"),
        },
    }
    path = state / "router.yaml"
    path.write_text("# Written by `hybridroute up`.\n" + yaml.safe_dump(config, sort_keys=False))
    return path


def _stack_json(
    state: Path, router: _Child, config: Path, nodes: list[_Child], pki: Path, policy: Path
) -> dict[str, Any]:
    return {
        "router": {
            "address": router.address,
            "ca": str(pki / "ca.pem"),
            "pid": router.proc.pid,
            "metrics": router.metrics,
            "config": str(config),
            "log": str(router.log),
        },
        "apps": {
            app: {"cert": str(pki / f"app-{app}.pem"), "key": str(pki / f"app-{app}.key")}
            for app in STACK_APPS
        },
        "admin": {"cert": str(pki / "app-admin.pem"), "key": str(pki / "app-admin.key")},
        "nodes": [
            {
                "name": n.name,
                "zone": n.zone,
                "address": n.address,
                "pid": n.proc.pid,
                "metrics": n.metrics,
                "pool": n.extra["pool"],
                "log": str(n.log),
            }
            for n in nodes
        ],
        "policy": str(policy),
        "pki": str(pki),
        "state_dir": str(state),
        "audit": {"db": str(state / "audit.db"), "verify_key": str(pki / "audit-signing.pub")},
    }


def _usage(stack: dict[str, Any], path: Path) -> str:
    app = stack["apps"]["demo-app"]
    return f"""
hybridroute is up. Stack description: {path}

Call the router with tritonclient:

    import numpy as np, tritonclient.grpc as grpcclient
    client = grpcclient.InferenceServerClient(
        "{stack["router"]["address"]}", ssl=True,
        root_certificates="{stack["router"]["ca"]}",
        private_key="{app["key"]}", certificate_chain="{app["cert"]}")
    x = grpcclient.InferInput("text", [1], "BYTES")
    x.set_data_from_numpy(np.array([b"my card 4111 1111 1111 1111 was charged twice"],
                                   dtype=object))
    print(client.infer("ticket-triage", [x]).as_numpy("label"))   # stays on-prem

Try `hybridroute demo --stack {path}` for a mix of requests and where each went,
and `hybridroute status --stack {path}`. The audit trail of every decision:
`hybridroute audit query --stack {path}`, checked with `hybridroute audit verify
--stack {path}`. Ctrl-C stops everything.
"""


def run_stack(opts: StackOptions) -> int:
    state = opts.state_dir.resolve()
    logs = state / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    _say(f"hybridroute up: state in {state}")
    pki = _prepare_pki(state)
    models = _prepare_models(state)
    policy, endpoints = _render_policy(opts, state)
    env = {
        **os.environ,
        TOKEN_ENV: os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(24),
        "PYTHONUNBUFFERED": "1",
    }
    children: list[_Child] = []
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        plans = _plan_nodes(endpoints)
        port, metrics_port = _router_ports(opts, endpoints)
        listen, metrics = f"{opts.host}:{port}", f"{opts.host}:{metrics_port}"
        _check_ports(
            [("router", listen), ("router metrics", metrics)]
            + [(plan.name, plan.address) for plan in plans]
        )
        nodes = _start_nodes(plans, pki, models, logs, env, opts.host, children)
        config = write_router_config(state, pki, policy, listen, metrics)
        proc, log = _spawn("router", ["router", "serve", "--config", str(config)], logs, env)
        router = _Child("router", "", listen, proc, log, f"http://{metrics}/metrics")
        children.append(router)
        _wait_ready(router, "router ready on")
        _say(f"  router   {listen} (pid {proc.pid}, policy {policy})")
        stack = _stack_json(state, router, config, nodes, pki, policy)
        path = state / "stack.json"
        path.write_text(json.dumps(stack, indent=2) + "\n")
        _say(_usage(stack, path))
        _supervise(children, lambda: stopping)
    except RuntimeError as exc:
        _say(f"hybridroute up failed: {exc}")
        return 1
    finally:
        _stop_all(children)
    return 0


def _supervise(children: list[_Child], stopping: Any) -> None:
    reported: set[str] = set()
    while not stopping():
        for child in children:
            if child.proc.poll() is not None and child.name not in reported:
                reported.add(child.name)
                _say(
                    f"warning: {child.name} exited with {child.proc.returncode} (log: {child.log})"
                )
        time.sleep(0.2)


def _stop_all(children: list[_Child]) -> None:
    if not children:
        return
    _say("stopping: " + ", ".join(c.name for c in reversed(children)))
    for child in reversed(children):  # router first, so it stops sending to nodes
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    for child in children:
        remaining = max(0.1, deadline - time.monotonic())
        try:
            child.proc.wait(remaining)
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.proc.wait(5)
    _say("stopped")
