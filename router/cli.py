"""`hybridroute router ...` subcommands: serve a router, make caller tokens."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from hybridroute.cli import UsageError

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    router = sub.add_parser("router", help="run the policy-driven router")
    router_sub = router.add_subparsers(dest="router_command", metavar="SUBCOMMAND")
    router_sub.required = True
    serve = router_sub.add_parser(
        "serve",
        help="serve the Open Inference Protocol and route each request by policy",
        description="Start a router from its config file (see router/config.py for keys).",
    )
    serve.add_argument("--config", required=True, type=Path, metavar="FILE", help="router.yaml")
    serve.set_defaults(handler=_serve)
    token = router_sub.add_parser(
        "token",
        help="make a bearer token for a caller and print the config line that accepts it",
    )
    token.add_argument("caller", help="the caller identity the token stands for")
    token.set_defaults(handler=_token)


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    # Until run_router handles it: SIGHUP's default action would end the process, and
    # nothing has read the policy yet, so there is nothing to reload.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    from hybridroute.config import ConfigError
    from hybridroute.router.config import load_config
    from hybridroute.router.pools import PoolError
    from hybridroute.router.server import run_router

    try:
        config = load_config(args.config)
        return asyncio.run(run_router(config))
    except ConfigError as exc:
        raise UsageError(f"router not started, configuration is invalid:\n{exc}") from None
    except OSError as exc:
        raise UsageError(f"router not started: {exc}") from None
    except PoolError as exc:  # a pool of the policy cannot be reached as written
        raise UsageError(f"router not started: {exc}{_pool_hint(exc)}") from None


def _pool_hint(exc: Exception) -> str:
    """What to do about the usual cause: a bearer token the environment does not give."""
    found = re.search(r"environment variable (\S+) \(bearer_token_env\)", str(exc))
    if found is None:
        return ""
    return (
        f"; set {found[1]} to the bearer token of that pool's endpoints "
        f"(export {found[1]}=...) and start the router again"
    )


def _token(args: argparse.Namespace) -> int:
    from hybridroute.router.config import hash_token, new_token

    token = new_token()
    print(f"token for {args.caller} (give it to the caller; it is not stored anywhere):")
    print(f"  {token}")
    print("add to the router config under tokens:")
    print(f"  - {{caller: {args.caller}, sha256: {hash_token(token)}}}")
    return 0
