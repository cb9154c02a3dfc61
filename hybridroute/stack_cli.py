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
        help="where keys, models, logs and stack.json go (default ./.hybridroute)",
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
        help="router on N, policy endpoints moved to N+1, N+2, ... "
        "(default: the router on 8100 and the policy's own addresses)",
    )
    up.set_defaults(handler=_up)


def _up(args: argparse.Namespace) -> int:
    from hybridroute.stack import StackOptions, run_stack

    return run_stack(
        StackOptions(state_dir=args.state_dir, policy=args.policy, base_port=args.base_port)
    )
