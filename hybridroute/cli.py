"""The `hybridroute` command line.

Each area owns its subcommands: `certs/cli.py`, `node/cli.py`, `router/cli.py` expose
`register(subparsers)`, which adds parsers whose `handler` takes the parsed arguments
and returns an exit code. This module only wires them together and turns a
`UsageError` into a one-line message instead of a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from hybridroute import __version__

__all__ = ["UsageError", "main", "whole_number"]


class UsageError(Exception):
    """A problem the user can fix: printed as `hybridroute: error: ...`, exit code 2."""


def whole_number(minimum: int, meaning: str = "") -> Callable[[str], int]:
    """An argparse `type` for a whole number of at least `minimum` (`meaning` says what
    the smallest value means, e.g. "0 (all)"), with the bad value in the message."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            floor = f"{minimum} ({meaning})" if meaning else str(minimum)
            raise argparse.ArgumentTypeError(f"must be {floor} or more, not {value}")
        return value

    return parse


def _registrars() -> list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]]:
    from hybridroute import stack_cli
    from hybridroute.certs import cli as certs_cli
    from hybridroute.node import cli as node_cli
    from hybridroute.router import cli as router_cli
    from hybridroute.router.audit import cli as audit_cli
    from hybridroute.router.policy import cli as policy_cli

    return [
        stack_cli.register,
        certs_cli.register,
        node_cli.register,
        router_cli.register,
        policy_cli.register,
        audit_cli.register,
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybridroute",
        description="Policy-driven inference router: sensitive requests stay on-prem.",
    )
    parser.add_argument("--version", action="version", version=f"hybridroute {__version__}")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log verbosity (default INFO)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for register in _registrars():
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        code: int = args.handler(args)
    except UsageError as exc:
        print(f"hybridroute: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code
