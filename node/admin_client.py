"""Reaching nodes from the admin commands: which nodes, with which credentials.

Every node admin command (`models load|unload|list|deploy`, `drift report`) takes
its targets the same way: `--stack FILE` (the stack.json `hybridroute up` writes:
its on-prem nodes, the dev PKI, and the router's certificate, which is the identity
nodes admit as admin by default), or `--node ADDR` (repeatable) with `--cert`,
`--key` and `--ca`. With both, `--node` picks nodes of the stack by name or address.

Cloud stand-ins in a stack are skipped: they authenticate callers by bearer token,
have no admin identities and hold no model a deploy could change.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from hybridroute.cli import UsageError

__all__ = [
    "Credentials",
    "NodeTarget",
    "add_target_arguments",
    "call",
    "node_channel",
    "print_table",
    "resolve_targets",
]

T = TypeVar("T")


@dataclass(frozen=True)
class NodeTarget:
    """One node to talk to: `name` labels it in output (the address when unnamed)."""

    name: str
    address: str
    pool: str = ""
    zone: str = ""


@dataclass(frozen=True)
class Credentials:
    """The client side of mutual TLS (or plaintext for `--insecure` dev nodes)."""

    ca: Path | None
    cert: Path | None
    key: Path | None
    insecure: bool = False


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """`--stack`, `--node`, `--cert/--key/--ca`, `--insecure`, `--timeout`, `--json`."""
    add = parser.add_argument
    add("--stack", type=Path, metavar="FILE", help="stack.json written by 'hybridroute up'")
    add(
        "--node",
        action="append",
        default=[],
        metavar="ADDR",
        help="node address HOST:PORT (repeatable); with --stack, a node's name or address",
    )
    add(
        "--cert",
        type=Path,
        metavar="FILE",
        help="client certificate (default with --stack: the router's, which nodes admit as admin)",
    )
    add("--key", type=Path, metavar="FILE", help="client private key")
    add("--ca", type=Path, metavar="FILE", help="CA that signed the nodes' certificates")
    add("--insecure", action="store_true", help="plaintext, for nodes run with --insecure")
    add("--timeout", type=float, default=30.0, metavar="SECONDS", help="per call (default 30)")
    add("--json", action="store_true", help="one JSON object per line instead of a table")


def _stack(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"--stack {path}: cannot read it ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
        raise UsageError(f"--stack {path}: not a stack.json (no nodes list)")
    return data


def _stack_targets(stack: dict[str, Any], wanted: Sequence[str]) -> list[NodeTarget]:
    nodes = [
        NodeTarget(str(n["name"]), str(n["address"]), str(n.get("pool", "")), str(n["zone"]))
        for n in stack["nodes"]
        if n.get("zone") == "onprem"
    ]
    if not wanted:
        return nodes
    chosen = [n for n in nodes if n.name in wanted or n.address in wanted]
    unknown = set(wanted) - {n.name for n in chosen} - {n.address for n in chosen}
    if unknown:
        known = ", ".join(f"{n.name} ({n.address})" for n in nodes)
        raise UsageError(
            f"--node {', '.join(sorted(unknown))}: not an on-prem node of the stack ({known})"
        )
    return chosen


def resolve_targets(args: argparse.Namespace) -> tuple[list[NodeTarget], Credentials]:
    """The nodes and credentials the arguments name (see the module docstring)."""
    if args.stack is None and not args.node:
        raise UsageError("say which nodes: --stack FILE (from 'hybridroute up') or --node ADDR")
    if args.stack is not None:
        stack = _stack(args.stack)
        targets = _stack_targets(stack, args.node)
        pki = Path(str(stack.get("pki", "")))
        creds = Credentials(
            ca=args.ca or pki / "ca.pem",
            cert=args.cert or pki / "router.pem",
            key=args.key or pki / "router.key",
            insecure=args.insecure,
        )
    else:
        targets = [NodeTarget(address, address) for address in args.node]
        creds = Credentials(args.ca, args.cert, args.key, args.insecure)
    if not creds.insecure and (creds.ca is None or creds.cert is None or creds.key is None):
        raise UsageError("mutual TLS needs --ca, --cert and --key (or --stack FILE)")
    return targets, creds


@contextmanager
def node_channel(target: NodeTarget, creds: Credentials) -> Iterator[grpc.Channel]:
    """A channel to `target`, closed on exit."""
    from hybridroute.certs.credentials import CredentialsError, channel_credentials

    if creds.insecure:
        channel = grpc.insecure_channel(target.address)
    else:
        assert creds.ca is not None
        try:
            tls = channel_credentials(creds.ca, creds.cert, creds.key)
        except CredentialsError as exc:
            raise UsageError(str(exc)) from None
        channel = grpc.secure_channel(target.address, tls)
    try:
        yield channel
    finally:
        channel.close()


def call(fn: Callable[[], T]) -> tuple[T | None, str, str]:
    """Run one RPC: (result, "OK", "") or (None, status code name, message)."""
    try:
        return fn(), "OK", ""
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        return None, code.name if code is not None else "UNKNOWN", str(details or "")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Left-aligned columns; the last column is not padded (it holds long reasons)."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for row in cells:
        padded = [c.ljust(w) for c, w in zip(row[:-1], widths[:-1], strict=True)]
        print("  ".join([*padded, row[-1]]).rstrip())
