"""`hybridroute up`: the whole system on one machine, on embedded defaults.

Makes what is missing in the state directory (dev PKI, sample models), starts one
on-prem node per on-prem endpoint of the policy, one cloud stand-in per cloud endpoint
(a node serving server-side TLS behind a bearer token, as a cloud endpoint would),
then the router; waits until the router reports SERVING, writes `DIR/stack.json` and
runs until Ctrl-C or SIGTERM, when it stops everything it started.

Every process is a real `hybridroute` process with its log in `DIR/logs/`, so the
stack is also what the end-to-end tests and the demo run against.

The on-prem nodes share the model repository `DIR/models`, where `models deploy --to
POOL` puts versions; the cloud stand-ins have their own, `DIR/cloud-models`, which no
deploy writes to, so a version deployed on-prem stays off the cloud across restarts.

Ports: the router on 8100 (or --base-port N), the policy's endpoints on their own
addresses (or N+1, N+2, ...), the router's metrics on the next port after them. Fixed,
so an unchanged stack restarts with an unchanged router config (the audit trail
records a changed one). Every port is checked before anything starts, and each process
is stopped again if a later one fails to start.

One `up` per state directory: `DIR/up.lock` is held (flock) for as long as `up` runs,
so a second `up` on the same DIR refuses before it writes anything there (it would
rewrite the running router's policy.yaml and router.yaml and truncate its logs). The
lock file also lists every process `up` starts; the kernel releases the lock however
`up` ends, so after a `kill -9` the next `up` finds no stale lock, only that list, and
stops the processes the killed one left running before it starts its own.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import IO, Any

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
    """A line of `up`'s progress. When its reader has gone (`up | head`) the stack keeps
    running, silently, until Ctrl-C or SIGTERM: a closed pipe must not end `up` halfway,
    leaving the processes it started unsupervised."""
    from hybridroute.cli import discard_stdout

    try:
        print(message, flush=True)
    except BrokenPipeError:
        discard_stdout()


def _prepare_pki(state: Path) -> Path:
    """A new dev PKI, or the existing one completed: a state dir from an older run, or
    a PKI made by `certs init` (one app), may lack the client certificates of some
    stack apps, which the existing CA then issues."""
    from hybridroute.certs.credentials import CredentialsError
    from hybridroute.certs.pki import PkiLayout, init_pki, issue_leaf

    pki = state / "pki"
    layout = PkiLayout(pki)
    if not layout.ca.cert.exists():
        init_pki(pki, apps=STACK_APPS)
        _say(f"  pki      {pki} (new dev CA; apps: {', '.join(STACK_APPS)})")
        return pki
    needed = [*layout.router.files(), *layout.node.files(), *layout.cloud.files()]
    missing = [path.name for path in [*needed, layout.audit_key] if not path.exists()]
    if missing:
        raise RuntimeError(
            f"{pki} is not a complete dev PKI (no {', '.join(missing)}): move it aside "
            f"(`mv {pki} {pki}.old`) and run `hybridroute up` again to make a new one"
        )
    issued = []
    for app in STACK_APPS:
        if all(path.exists() for path in layout.app(app).files()):
            continue
        try:
            issue_leaf(pki, app, client=True, sans=(app,), stem=f"app-{app}", force=True)
        except (CredentialsError, OSError, ValueError) as exc:
            raise RuntimeError(
                f"{pki} has no certificate for app {app!r} and its CA cannot issue one "
                f"({exc}): move {pki} aside and run `hybridroute up` again to make a new one"
            ) from None
        issued.append(app)
    added = f"; issued certificates for apps {', '.join(issued)}" if issued else ""
    _say(f"  pki      {pki} (existing{added})")
    return pki


SAMPLE_MODELS = ("iris", "ticket-triage")


@dataclass(frozen=True)
class _Repositories:
    """The model repositories of the stack's nodes: `DIR/models`, shared by the on-prem
    nodes (what `models deploy --to POOL` writes to), and `DIR/cloud-models`, the cloud
    stand-ins' own, which no deploy writes to: a version deployed on-prem is never
    loaded by the cloud stand-in, not even when the stack starts again. (A state dir
    from before had only `DIR/models`; its cloud stand-in gets fresh sample models.)"""

    onprem: Path
    cloud: Path

    def of(self, zone: str) -> Path:
        return self.onprem if zone == "onprem" else self.cloud


def _prepare_models(state: Path) -> _Repositories:
    """The sample models each repository lacks, trained once aside and copied in: a
    model already there (maybe with versions deployed since) is left as it is."""
    from hybridroute.node.samples import write_samples

    repos = _Repositories(state / "models", state / "cloud-models")
    wanted = [(repos.onprem, "the on-prem nodes"), (repos.cloud, "the cloud stand-in")]
    missing = {
        repo: [name for name in SAMPLE_MODELS if not (repo / name).exists()] for repo, _ in wanted
    }
    if any(missing.values()):
        packaging = logging.getLogger("hybridroute.node.packaging")
        level = packaging.level
        packaging.setLevel(logging.WARNING)  # its lines would name the scratch directory
        try:
            with tempfile.TemporaryDirectory(prefix="samples-", dir=state) as scratch:
                trained = Path(scratch) / "trained"
                write_samples(trained)
                for i, (repo, names) in enumerate(missing.items()):
                    repo.mkdir(parents=True, exist_ok=True)
                    for name in names:  # copied aside, then moved in whole
                        staged = Path(scratch) / f"{name}.{i}"
                        shutil.copytree(trained / name, staged)
                        os.replace(staged, repo / name)
        finally:
            packaging.setLevel(level)
    for repo, who in wanted:
        made = missing[repo]
        what = f"sample models {', '.join(made)}" if made else "existing"
        _say(f"  models   {repo} ({what}) for {who}")
    return repos


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
        f"{port} is in use ({who}): another stack running? choose another --base-port "
        "(a second stack also needs its own --state-dir), or stop what listens there"
    )


def _check_ports(addresses: list[tuple[str, str]]) -> None:
    """Refuse before starting anything when a port the stack needs is taken: a clear
    line now instead of a node's traceback after the others have started."""
    for who, address in addresses:
        if _in_use(address):
            raise RuntimeError(_port_in_use(f"port {_port_of(address)}", f"{who}, {address}"))


class _Interrupted(Exception):
    """Ctrl-C or SIGTERM before the stack was up."""


class _StateLock:
    """`DIR/up.lock`: held by the one `up` running on DIR (see the module docstring).
    Line one names the holder (`up PID`), then one `NAME PID` line per process it
    started; emptied when `up` has stopped them all."""

    def __init__(self, state: Path) -> None:
        self.path = state / "up.lock"
        self.handle: IO[str] = open(self.path, "a+")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.handle.seek(0)
            holder = self.handle.readline().split()
            self.handle.close()
            pid = holder[1] if len(holder) == 2 and holder[0] == "up" else "?"
            raise RuntimeError(
                f"another `hybridroute up` (pid {pid}) is running on {state}: stop it first "
                f"(Ctrl-C where it runs, or `kill -INT {pid}`), or give this one its own "
                "--state-dir and --base-port"
            ) from None
        self.handle.seek(0)
        self.previous = self.handle.read()
        self.handle.truncate(0)
        self._write(f"up {os.getpid()}\n")

    def _write(self, text: str) -> None:
        self.handle.write(text)
        self.handle.flush()

    def record(self, name: str, pid: int) -> None:
        self._write(f"{name} {pid}\n")

    def leftovers(self) -> list[tuple[str, int]]:
        """(name, pid) of what an earlier `up` on this DIR started and left running."""
        found = []
        for line in self.previous.splitlines()[1:]:
            name, _, pid = line.partition(" ")
            if pid.isdigit() and _runs_in(int(pid), self.path.parent):
                found.append((name, int(pid)))
        return found

    def release(self) -> None:
        """After every process has stopped: nothing left to list."""
        self.handle.truncate(0)
        self.handle.close()


def _runs_in(pid: int, state: Path) -> bool:
    """Is `pid` a running process whose command line names `state`? (So a pid reused
    since by something else, or a zombie, is not taken for ours.)"""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return False  # no such process
        done = subprocess.run(
            ["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, check=False
        )
        cmdline = done.stdout
    except OSError:
        return False
    return "hybridroute" in cmdline and str(state) in cmdline


def _stop_leftovers(lock: _StateLock) -> None:
    """Stop what a killed `up` on this DIR left running: they hold its ports and its
    audit trail, and nothing supervises them any more."""
    leftovers = lock.leftovers()
    if not leftovers:
        return
    names = ", ".join(f"{name} (pid {pid})" for name, pid in leftovers)
    _say(f"  stopping what an earlier `hybridroute up` on this state dir left running: {names}")
    for _, pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while (alive := [p for _, p in leftovers if _runs_in(p, lock.path.parent)]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


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


def _wait_ready(
    child: _Child, marker: str, timeout: float = 90, stopping: Callable[[], bool] = lambda: False
) -> None:
    deadline = time.monotonic() + timeout
    while marker not in (text := child.log.read_text(errors="replace")):
        if stopping():
            raise _Interrupted
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
    repos: _Repositories,
    logs: Path,
    env: dict[str, str],
    host: str,
    adopt: Callable[[_Child], None],
    stopping: Callable[[], bool],
) -> list[_Child]:
    """Start a node per plan and wait until each is ready. Each is passed to `adopt` as
    soon as it is spawned, so whoever stops the adopted ones stops it too when a later
    one fails or Ctrl-C comes first."""
    started = []
    for plan in plans:
        metrics = f"{host}:{_free_port(host)}"
        identity = "node" if plan.zone == "onprem" else "cloud"
        args = [
            "node",
            "serve",
            "--models",
            str(repos.of(plan.zone)),
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
        child.extra["repository"] = str(repos.of(plan.zone))
        adopt(child)
        started.append(child)
    for child in started:
        _wait_ready(child, "node ready on", stopping=stopping)
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
                "repository": n.extra["repository"],
                "log": str(n.log),
            }
            for n in nodes
        ],
        "policy": str(policy),
        "pki": str(pki),
        "state_dir": str(state),
        "audit": {"db": str(state / "audit.db"), "verify_key": str(pki / "audit-signing.pub")},
    }


def _shown(path: Path | str) -> str:
    """`path` relative to the current directory when it is below it, else absolute."""
    absolute = Path(os.path.abspath(path))
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)


def _program(path: str) -> str:
    """How to type the program at `path` here: its bare name when PATH finds this very
    file (an activated venv), else its path (`make run` runs .venv/bin/hybridroute
    without activating the venv, so `hybridroute` alone is not found)."""
    found = shutil.which(Path(path).name)
    if found and os.path.abspath(found) == os.path.abspath(path):
        return Path(path).name
    return _shown(path)


def _usage(stack: dict[str, Any], path: Path) -> str:
    app = stack["apps"]["demo-app"]
    python = _program(sys.executable)
    launcher = sys.argv[0]
    cli = _program(launcher) if Path(launcher).name == "hybridroute" else f"{python} -m hybridroute"
    from hybridroute.status import DEFAULT_STACK  # what status, demo, audit read by default

    shown = _shown(path)
    stack_arg = "" if shown == str(DEFAULT_STACK) else f" --stack {shown}"
    commands = [
        (f"{cli} demo{stack_arg}", "a mix of requests, and where each went"),
        (f"{cli} status{stack_arg}", "health, endpoints, the active policy"),
        (f"{cli} audit query{stack_arg}", "the audit record of every decision"),
        (f"{cli} audit verify{stack_arg}", "check the trail is intact"),
    ]
    width = max(len(command) for command, _ in commands)
    listed = "\n".join(f"    {command:<{width}}   # {what}" for command, what in commands)
    return f"""
hybridroute is up. Stack description: {path}

Call the router with tritonclient (installed in {python}):

    import numpy as np, tritonclient.grpc as grpcclient
    client = grpcclient.InferenceServerClient(
        "{stack["router"]["address"]}", ssl=True,
        root_certificates="{stack["router"]["ca"]}",
        private_key="{app["key"]}",
        certificate_chain="{app["cert"]}")
    x = grpcclient.InferInput("text", [1], "BYTES")
    x.set_data_from_numpy(np.array([b"my card 4111 1111 1111 1111 was charged twice"],
                                   dtype=object))
    print(client.infer("ticket-triage", [x]).as_numpy("label"))   # stays on-prem

In another terminal, in {Path.cwd()}:

{listed}

Ctrl-C here stops everything.
"""


def run_stack(opts: StackOptions) -> int:
    state = opts.state_dir.resolve()
    logs = state / "logs"
    children: list[_Child] = []
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    def check_stopping() -> bool:
        if stopping:
            raise _Interrupted
        return False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    lock: _StateLock | None = None
    try:
        logs.mkdir(parents=True, exist_ok=True)
        _say(f"hybridroute up: state in {state}")
        lock = _StateLock(state)
        recorder = lock

        def adopt(child: _Child) -> None:
            children.append(child)
            recorder.record(child.name, child.proc.pid)

        _stop_leftovers(lock)
        check_stopping()
        pki = _prepare_pki(state)
        repos = _prepare_models(state)
        check_stopping()
        policy, endpoints = _render_policy(opts, state)
        env = {
            **os.environ,
            TOKEN_ENV: os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(24),
            "PYTHONUNBUFFERED": "1",
        }
        plans = _plan_nodes(endpoints)
        port, metrics_port = _router_ports(opts, endpoints)
        listen, metrics = f"{opts.host}:{port}", f"{opts.host}:{metrics_port}"
        _check_ports(
            [("router", listen), ("router metrics", metrics)]
            + [(plan.name, plan.address) for plan in plans]
        )
        nodes = _start_nodes(plans, pki, repos, logs, env, opts.host, adopt, check_stopping)
        check_stopping()
        config = write_router_config(state, pki, policy, listen, metrics)
        proc, log = _spawn("router", ["router", "serve", "--config", str(config)], logs, env)
        router = _Child("router", "", listen, proc, log, f"http://{metrics}/metrics")
        adopt(router)
        _wait_ready(router, "router ready on", stopping=check_stopping)
        _say(f"  router   {listen} (pid {proc.pid}, policy {policy})")
        stack = _stack_json(state, router, config, nodes, pki, policy)
        path = state / "stack.json"
        path.write_text(json.dumps(stack, indent=2) + "\n")
        _say(_usage(stack, path))
        _supervise(children, lambda: stopping)
    except _Interrupted:
        _say("hybridroute up: interrupted before the stack was up")
        return 130
    except (RuntimeError, OSError) as exc:
        _say(f"hybridroute up failed: {exc}")
        return 1
    finally:
        _stop_all(children)
        if lock is not None:
            lock.release()
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
