"""Top-level commands that span areas: `up`, `status`, `demo`."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    up = sub.add_parser(
        "up",
        help="start PKI, sample models, on-prem nodes, a cloud stand-in and the router",
        description="Run the whole system locally on embedded defaults until Ctrl-C.",
    )
    up.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".hybridroute"),
        metavar="DIR",
        help="where up keeps its state: keys (pki/), the on-prem models (models/) and the "
        "cloud stand-ins' (cloud-models/), logs/, the audit trail, stack.json, and up.lock, "
        "held while up runs so that a second up on DIR refuses (default ./.hybridroute)",
    )
    up.add_argument(
        "--policy",
        type=Path,
        metavar="FILE",
        help="policy to enforce (default: the shipped policies/default.yaml)",
    )
    up.add_argument(
        "--base-port",
        type=int,
        metavar="N",
        help="router on N, policy endpoints moved to N+1, N+2, ..., the router's metrics "
        "on the port after them (default: the router on 8100 and the policy's own "
        "addresses)",
    )
    up.set_defaults(handler=_up)
    _register_status(sub)
    _register_demo(sub)


def _up(args: argparse.Namespace) -> int:
    from hybridroute.stack import StackOptions, run_stack

    return run_stack(
        StackOptions(state_dir=args.state_dir, policy=args.policy, base_port=args.base_port)
    )


def _register_status(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = sub.add_parser(
        "status",
        help="a running router's health, endpoints and active policy",
        description="Ask a router's admin API for its state. Exit 0 SERVING, 1 NOT_SERVING, "
        "2 no status (unreachable, refused, bad credentials).",
    )
    status.add_argument(
        "--stack",
        type=Path,
        metavar="FILE",
        help="stack.json from `hybridroute up` (default .hybridroute/stack.json)",
    )
    status.add_argument("--router", metavar="ADDR", help="router address host:port")
    status.add_argument("--ca", type=Path, metavar="F", help="CA that signed the router's cert")
    status.add_argument("--cert", type=Path, metavar="F", help="admin client certificate")
    status.add_argument("--key", type=Path, metavar="F", help="its private key")
    status.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    status.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds to wait for the router (default 5)",
    )
    status.set_defaults(handler=_status)


def _status(args: argparse.Namespace) -> int:
    from hybridroute.status import run_status

    return run_status(args)


def _register_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser(
        "demo",
        help="send a mix of requests through a running stack and show where each went",
        description="Several callers, labels and payloads (with and without personal data) "
        "through the router; exit 1 if anything sensitive reached the cloud.",
    )
    demo.add_argument(
        "--stack",
        type=Path,
        metavar="FILE",
        help="stack.json from `hybridroute up` (default .hybridroute/stack.json)",
    )
    demo.add_argument(
        "--count",
        type=int,
        metavar="N",
        help="requests to send in total, cycling through the kinds (default: each kind 3 times)",
    )
    demo.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    from hybridroute.demo import run_demo

    return run_demo(args)
