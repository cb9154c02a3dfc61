"""`hybridroute status`: what a running router is doing, in one screen or one JSON object.

It asks the router's admin API (`RouterAdmin.Status`, protos/admin.proto) rather than
scraping logs or metrics, because the router is the only one who knows which policy it
actually enforces, which reload it refused and which endpoints it currently considers
healthy. With `--stack FILE` (what `hybridroute up` writes) it also looks at the local
node processes, so a dead node shows up next to the endpoint the router marks unhealthy.

Exit codes, so scripts can gate on it:

- 0: the router answered and is SERVING;
- 1: the router answered and is NOT_SERVING (the reason is printed);
- 2: no status: the router cannot be reached, refused us (not an admin), or the
  credentials/stack file given are unusable. The message says what to check.

`--json` prints one object with these keys (stable; times are unix seconds, ages and
durations seconds; `null` when not applicable):

- `router`: `address`, `version`, `serving` (bool), `not_serving_reason` (str|null),
  `started_at`, `uptime_seconds`, `in_flight`, `audit` {`ok` (bool), `failure`
  (str|null)};
- `policy`: `path`, `version_hash` (full sha256 of the policy file), `loaded_at`,
  `loaded_seconds_ago`, `warnings` (count), `signed_by` (str|null: the signer and the
  fingerprint of its key, e.g. "secteam (key 1a2b3c4d5e6f7a8b)", set only when the
  policy's signature verified against the router's trusted key), `signed_at` (null when
  not signed), `last_refused` (null, or {`error`, `at`, `seconds_ago`});
- `endpoints`: list of {`pool`, `zone`, `address`, `node` (stack name|null), `healthy`,
  `outstanding`, `seconds_since_check` (null: never checked), `last_error` (str|null)};
- `rollouts`: list of {`route`, `model`, `split` (list of {`version`, `weight`,
  `requests`}: the policy's weights and the requests sent to each version since the
  router started), `shadow` (null, or {`version`, `percent`, `pool`, `agreed`,
  `disagreed`, `failed`, `dropped`, `refused`, `no_endpoint`, `agreement_rate`
  (0..1, null before any copy was compared), `latency_difference_ms` (mean candidate
  minus mean serving upstream time, null likewise)})}, one per rollout of the live
  policy;
- `processes`: null without `--stack`; else a list of {`name`, `zone`, `address`, `pid`,
  `alive`, `metrics`} for the router and every node in stack.json.

Nothing secret is printed: no key material, no token, not even key file paths.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from hybridroute.cli import UsageError
from hybridroute.protos import admin_pb2, admin_pb2_grpc
from hybridroute.status_rollouts import HEADERS as ROLLOUT_HEADERS
from hybridroute.status_rollouts import rollout_dict, rollout_rows

__all__ = [
    "DEFAULT_STACK",
    "StatusTarget",
    "fetch_status",
    "format_age",
    "format_table",
    "load_stack",
    "pid_alive",
    "render_status",
    "resolve_target",
    "run_status",
    "status_to_dict",
]

DEFAULT_STACK = Path(".hybridroute/stack.json")
EXIT_SERVING, EXIT_NOT_SERVING, EXIT_NO_STATUS = 0, 1, 2


@dataclass(frozen=True)
class StatusTarget:
    """Where the router is and which admin identity to present to it."""

    address: str
    ca: Path
    cert: Path
    key: Path
    stack: dict[str, Any] | None = None  # stack.json, when the target came from one


def load_stack(
    path: Path, otherwise: str = "--stack FILE (or --router ADDR --ca F --cert F --key F)"
) -> dict[str, Any]:
    """Read a stack.json, turning every way it can be wrong into a UsageError.
    `otherwise`: what else the calling command accepts, for the missing-file message."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(
            f"no stack file at {path}: start one with `hybridroute up` (in another "
            f"terminal: it runs until Ctrl-C) or pass {otherwise}"
        ) from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read stack file {path}: {exc}") from None
    if not isinstance(data, dict) or "router" not in data:
        raise UsageError(f"{path} is not a stack.json written by `hybridroute up`")
    return data


def _from_stack(path: Path) -> StatusTarget:
    stack = load_stack(path)
    try:
        admin = stack["admin"]
        return StatusTarget(
            address=str(stack["router"]["address"]),
            ca=Path(stack["router"]["ca"]),
            cert=Path(admin["cert"]),
            key=Path(admin["key"]),
            stack=stack,
        )
    except (KeyError, TypeError) as exc:
        raise UsageError(f"{path} lacks {exc} (router address/ca or admin cert/key)") from None


def resolve_target(args: argparse.Namespace) -> StatusTarget:
    """--router with explicit credentials, --stack, or the default stack file, in that
    order; both --router and --stack at once is ambiguous and refused."""
    if args.router and args.stack:
        raise UsageError("give either --router ADDR (with --ca/--cert/--key) or --stack FILE")
    if args.router:
        missing = [f"--{n}" for n in ("ca", "cert", "key") if getattr(args, n) is None]
        if missing:
            raise UsageError(
                f"--router needs {', '.join(missing)}: the admin API takes mutual TLS "
                "with a certificate listed under `admins` in the router config"
            )
        return StatusTarget(args.router, args.ca, args.cert, args.key)
    return _from_stack(args.stack or DEFAULT_STACK)


def fetch_status(target: StatusTarget, timeout: float) -> admin_pb2.StatusResponse:
    """One Status call over a fresh mutual-TLS channel. Raises grpc.RpcError."""
    from hybridroute.certs.credentials import CredentialsError, channel_credentials

    try:
        creds = channel_credentials(target.ca, target.cert, target.key)
    except (CredentialsError, OSError) as exc:
        raise UsageError(f"cannot load admin credentials: {exc}") from None
    with grpc.secure_channel(target.address, creds) as channel:
        stub = admin_pb2_grpc.RouterAdminStub(channel)
        response: admin_pb2.StatusResponse = stub.Status(
            admin_pb2.StatusRequest(), timeout=timeout, wait_for_ready=False
        )
        return response


def pid_alive(pid: int) -> bool:
    """Signal 0 checks existence without touching the process; EPERM still means alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _processes(stack: dict[str, Any]) -> list[dict[str, Any]]:
    router = stack.get("router") or {}
    rows = [{"name": "router", "zone": "", **router}, *(stack.get("nodes") or [])]
    out = []
    for row in rows:
        pid = int(row.get("pid") or 0)
        out.append(
            {
                "name": str(row.get("name", "?")),
                "zone": str(row.get("zone", "")),
                "address": str(row.get("address", "")),
                "pid": pid,
                "alive": pid > 0 and pid_alive(pid),
                "metrics": row.get("metrics"),
            }
        )
    return out


def _policy_dict(policy: admin_pb2.PolicyStatus, now: float) -> dict[str, Any]:
    refused = None
    if policy.last_refused_error:
        refused = {
            "error": policy.last_refused_error,
            "at": policy.last_refused_at,
            "seconds_ago": max(0.0, now - policy.last_refused_at),
        }
    return {
        "path": policy.path,
        "version_hash": policy.version_hash,
        "loaded_at": policy.loaded_at,
        "loaded_seconds_ago": max(0.0, now - policy.loaded_at),
        "warnings": policy.warnings,
        "signed_by": policy.signed_by or None,
        "signed_at": policy.signed_at if policy.signed_by else None,
        "last_refused": refused,
    }


def _endpoint_dict(ep: admin_pb2.EndpointStatus, names: dict[str, str]) -> dict[str, Any]:
    return {
        "pool": ep.pool,
        "zone": ep.zone,
        "address": ep.address,
        "node": names.get(ep.address),
        "healthy": ep.healthy,
        "outstanding": ep.outstanding,
        "seconds_since_check": None if ep.seconds_since_check < 0 else ep.seconds_since_check,
        "last_error": ep.last_error or None,
    }


def status_to_dict(
    response: admin_pb2.StatusResponse,
    address: str,
    stack: dict[str, Any] | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The `--json` document (keys in the module docstring); the table renders from it
    too, so both views always show the same facts."""
    now = time.time() if now is None else now
    names = {str(n.get("address")): str(n.get("name")) for n in (stack or {}).get("nodes", [])}
    return {
        "router": {
            "address": address,
            "version": response.version,
            "serving": response.serving,
            "not_serving_reason": response.not_serving_reason or None,
            "started_at": response.started_at,
            "uptime_seconds": max(0.0, now - response.started_at),
            "in_flight": response.in_flight,
            "audit": {
                "ok": not response.audit_failure,
                "failure": response.audit_failure or None,
            },
        },
        "policy": _policy_dict(response.policy, now),
        "endpoints": [_endpoint_dict(ep, names) for ep in response.endpoints],
        "rollouts": [rollout_dict(r) for r in response.rollouts],
        "processes": _processes(stack) if stack is not None else None,
    }


def format_age(seconds: float) -> str:
    """Seconds for the recent past (what an operator compares with a health interval),
    coarser units beyond two minutes."""
    if seconds < 120:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{minutes}m {secs:02d}s"


def _local(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def format_table(headers: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    """Left-aligned columns as wide as their widest cell (shared with `demo`)."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return [indent + line for line in lines]


def _header_lines(router: dict[str, Any]) -> list[str]:
    state = "SERVING" if router["serving"] else f"NOT_SERVING: {router['not_serving_reason']}"
    audit = router["audit"]
    audit_text = "writing" if audit["ok"] else f"FAILING: {audit['failure']}"
    return [
        f"router    {router['address']}  (hybridroute {router['version']})",
        f"state     {state}",
        f"uptime    {format_age(router['uptime_seconds'])}"
        f"   in-flight {router['in_flight']}   audit {audit_text}",
    ]


def _signed_text(policy: dict[str, Any]) -> str:
    """Who signed the live policy and when; "not signed" when the router verified no
    signature (no trusted key configured, or an unsigned policy that was allowed)."""
    if not policy["signed_by"]:
        return "not signed"
    return f"{policy['signed_by']} at {_local(policy['signed_at'])}"


def _policy_lines(policy: dict[str, Any]) -> list[str]:
    refused = policy["last_refused"]
    refused_text = (
        f"{_local(refused['at'])} ({format_age(refused['seconds_ago'])} ago): {refused['error']}"
        if refused
        else "none"
    )
    return [
        "policy",
        f"  path          {policy['path']}",
        f"  version       {policy['version_hash'][:12]}",
        f"  loaded at     {_local(policy['loaded_at'])} "
        f"({format_age(policy['loaded_seconds_ago'])} ago)",
        f"  warnings      {policy['warnings']}",
        f"  signed by     {_signed_text(policy)}",
        f"  last refused  {refused_text}",
    ]


def _endpoint_lines(endpoints: list[dict[str, Any]]) -> list[str]:
    if not endpoints:
        return ["endpoints", "  (none: the policy declares no pools)"]
    rows = [
        [
            e["pool"],
            e["zone"],
            e["address"],
            e["node"] or "-",
            "healthy" if e["healthy"] else "UNHEALTHY",
            str(e["outstanding"]),
            "never"
            if e["seconds_since_check"] is None
            else format_age(e["seconds_since_check"]) + " ago",
            e["last_error"] or "-",
        ]
        for e in endpoints
    ]
    headers = ["POOL", "ZONE", "ADDRESS", "NODE", "HEALTH", "OUTSTANDING", "CHECKED", "LAST ERROR"]
    return ["endpoints", *format_table(headers, rows)]


def _rollout_lines(rollouts: list[dict[str, Any]]) -> list[str]:
    if not rollouts:
        return ["rollouts", "  (none in the live policy)"]
    return ["rollouts", *format_table(ROLLOUT_HEADERS, rollout_rows(rollouts))]


def _process_lines(processes: list[dict[str, Any]]) -> list[str]:
    rows = [
        [
            p["name"],
            p["zone"] or "-",
            p["address"],
            str(p["pid"]),
            "alive" if p["alive"] else "EXITED",
            p["metrics"] or "-",
        ]
        for p in processes
    ]
    headers = ["NAME", "ZONE", "ADDRESS", "PID", "PROCESS", "METRICS"]
    return ["local processes (stack.json)", *format_table(headers, rows)]


def render_status(data: dict[str, Any]) -> str:
    """The human view of `status_to_dict`'s document."""
    sections = [
        _header_lines(data["router"]),
        _policy_lines(data["policy"]),
        _endpoint_lines(data["endpoints"]),
        _rollout_lines(data["rollouts"]),
    ]
    if data["processes"] is not None:
        sections.append(_process_lines(data["processes"]))
    return "\n\n".join("\n".join(s) for s in sections)


def _unreachable(target: StatusTarget, exc: grpc.RpcError) -> str:
    code = exc.code()
    name = code.name if code is not None else "UNKNOWN"
    lines = [f"hybridroute status: cannot get status from the router at {target.address}"]
    lines.append(f"  gRPC error: {name}: {exc.details()}")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        lines.append(
            f"  check: the certificate {target.cert} must be an identity listed under "
            "`admins` in the router config (with --stack, stack.json's `admin` cert)"
        )
        return "\n".join(lines)
    lines.append(
        "  check: is the router running (`hybridroute up`, `hybridroute router serve`)? "
        "is the address right? was its certificate signed by the CA given "
        f"({target.ca})?"
    )
    if target.stack is not None:
        pid = int(target.stack.get("router", {}).get("pid") or 0)
        if pid and not pid_alive(pid):
            lines.append(f"  note: stack.json's router process (pid {pid}) has exited")
    return "\n".join(lines)


def run_status(args: argparse.Namespace) -> int:
    """Handler of `hybridroute status`; see the module docstring for exit codes."""
    target = resolve_target(args)
    try:
        response = fetch_status(target, timeout=args.timeout)
    except grpc.RpcError as exc:
        print(_unreachable(target, exc), file=sys.stderr)
        return EXIT_NO_STATUS
    data = status_to_dict(response, target.address, target.stack)
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=False))
    else:
        print(render_status(data))
    return EXIT_SERVING if response.serving else EXIT_NOT_SERVING
