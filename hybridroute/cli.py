"""The `hybridroute` command line.

Each area owns its subcommands: `certs/cli.py`, `node/cli.py`, `router/cli.py` expose
`register(subparsers)`, which adds parsers whose `handler` takes the parsed arguments
and returns an exit code. This module only wires them together, turns a
`UsageError` into a one-line message instead of a traceback, and ends any command
whose output is cut short by its reader (`... | head -1`) quietly, as any other Unix
tool: exit 141, the status of a process ended by SIGPIPE.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import sys
from collections.abc import Callable, Sequence

from hybridroute import __version__

__all__ = ["SIGPIPE_EXIT", "UsageError", "discard_stdout", "main", "whole_number"]

SIGPIPE_EXIT = 141  # 128 + SIGPIPE: what a shell shows for a reader that went away


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


def stdout_closed() -> bool:
    """Has the reader of stdout gone away? A pipe with no reader polls as an error.
    When stdout is no real file (captured), a broken pipe can only be its own: yes."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return True
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))


def discard_stdout() -> None:
    """The reader of stdout is gone: point stdout at /dev/null, so that later output and
    the flush at exit do not report the same broken pipe again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (captured in tests)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit code (141 when its reader closed stdout early)."""
    try:
        try:
            return _run(argv)
        finally:  # write what is buffered now, where a closed pipe is caught, not at exit
            sys.stdout.flush()
    except BrokenPipeError:
        if not stdout_closed():
            raise  # a socket's, say: a real error, not a reader that went away
        discard_stdout()
        return SIGPIPE_EXIT


def _run(argv: Sequence[str] | None) -> int:
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
