"""`hybridroute` subcommands of the node area.

- `hybridroute models sample --out DIR [--force]`: write the two sample models;
- `hybridroute models package ...`: package an ML engineer's estimator file as a
  repository version (skops, reviewed trusted types, model.yaml, drift baseline),
  in `node/package_cli.py`;
- `hybridroute models list|load|unload ...`: versions on running nodes, changed
  while they serve (`node/models_cli.py`);
- `hybridroute models deploy ...`: copy and load a version on a pool (`node/deploy.py`);
- `hybridroute drift report ...`: live data against training baselines
  (`node/drift_cli.py`);
- `hybridroute node serve ...`: serve a repository over mutual TLS.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from hybridroute.cli import UsageError, whole_number
from hybridroute.node.deploy import register_deploy
from hybridroute.node.drift_cli import register_drift
from hybridroute.node.models_cli import register_lifecycle_commands
from hybridroute.node.package_cli import register_package

if TYPE_CHECKING:
    from hybridroute.node.versions import VersionPolicy

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this area's subcommands to the top-level parser."""
    _register_models(sub)
    _register_node(sub)
    register_drift(sub)


# ------------------------------------------------------------------------ node serve


def _register_node(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    node = sub.add_parser("node", help="run an on-prem model node")
    node_sub = node.add_subparsers(dest="node_command", metavar="SUBCOMMAND")
    node_sub.required = True
    p = node_sub.add_parser(
        "serve",
        help="serve a model repository over the Open Inference Protocol (mutual TLS)",
        description="Serve the model versions under --models that each model's version "
        "policy selects (default: the newest two), over gRPC. Mutual TLS by "
        "default: clients must present a certificate signed by --client-ca.",
    )
    p.add_argument("--models", required=True, type=Path, metavar="DIR", help="model repository")
    p.add_argument("--listen", default="127.0.0.1:8101", metavar="HOST:PORT")
    p.add_argument("--cert", type=Path, metavar="FILE", help="server certificate (PEM)")
    p.add_argument("--key", type=Path, metavar="FILE", help="server private key (PEM)")
    p.add_argument("--client-ca", type=Path, metavar="FILE", help="CA that signs client certs")
    p.add_argument(
        "--allow-client",
        action="append",
        default=[],
        metavar="ID",
        help="serve only this client identity (certificate CN or DNS SAN); repeatable "
        "(default: only 'router', so apps cannot bypass the router's policy and audit)",
    )
    p.add_argument(
        "--allow-any-client",
        action="store_true",
        help="serve every client whose certificate --client-ca signed (no identity check)",
    )
    p.add_argument(
        "--admin-client",
        action="append",
        default=None,
        metavar="ID",
        help="identity that may load/unload versions and read drift reports (not infer); "
        "repeatable; default: router",
    )
    p.add_argument(
        "--no-admin-clients",
        action="store_true",
        help="refuse every admin call (versions change only by restarting the node)",
    )
    p.add_argument(
        "--version-policy",
        default="latest:2",
        metavar="POLICY",
        help="versions to keep loaded when model.yaml declares no version_policy: latest:N, "
        "specific:V1,V2 or all (default latest:2)",
    )
    p.add_argument("--metrics-listen", metavar="HOST:PORT", help="serve Prometheus /metrics")
    _add_drift_arguments(p)
    p.add_argument(
        "--bearer-token-env",
        metavar="VAR",
        help="require 'authorization: Bearer $VAR' on every call (how a cloud endpoint "
        "authenticates; combine with --cert/--key and no --client-ca)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext gRPC without TLS or client authentication (never for sensitive data)",
    )
    p.add_argument(
        "--max-batch-size",
        type=whole_number(1),
        default=32,
        metavar="N",
        help="default rows per estimator call, and per request, when model.yaml sets none "
        "(default 32)",
    )
    p.add_argument(
        "--max-queue-delay-ms",
        type=_finite(0.0),
        default=0.0,
        metavar="MS",
        help="default wait for a fuller batch when model.yaml sets none (default 0)",
    )
    p.add_argument("--no-batching", action="store_true", help="one estimator call per request")
    p.add_argument(
        "--max-message-bytes",
        type=_message_bytes,
        default=64 * 1024 * 1024,
        metavar="N",
        help="largest request accepted (default 64 MiB); larger: RESOURCE_EXHAUSTED",
    )
    p.add_argument(
        "--grace",
        type=_finite(0.0),
        default=10.0,
        metavar="SECONDS",
        help="time in-flight requests get to finish on SIGTERM (default 10)",
    )
    p.set_defaults(handler=_node_serve)


def _add_drift_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--drift-window",
        type=int,
        default=1000,
        metavar="ROWS",
        help="live input rows kept per model version for drift tests (default 1000; 0: off)",
    )
    p.add_argument(
        "--drift-min-window",
        type=int,
        default=100,
        metavar="ROWS",
        help="fewer live rows report 'not enough data' instead of a verdict (default 100)",
    )
    p.add_argument(
        "--drift-interval",
        type=_finite(0.001),
        default=30.0,
        metavar="SECONDS",
        help="how often drift is re-tested for metrics and logs (default 30)",
    )


# gRPC takes message limits as a signed 32-bit channel argument.
_MAX_MESSAGE_BYTES = 2**31 - 1


def _message_bytes(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= _MAX_MESSAGE_BYTES:
        raise argparse.ArgumentTypeError(
            f"must be 1 to {_MAX_MESSAGE_BYTES} (gRPC's limit), not {value}"
        )
    return value


def _finite(minimum: float) -> Callable[[str], float]:
    """An argparse `type` for a finite number of at least `minimum`: a negative, infinite
    or NaN delay or period is accepted by float() and then breaks every request."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value < minimum:
            raise argparse.ArgumentTypeError(
                f"must be a finite number, {minimum:g} or more, not {text!r}"
            )
        return value

    return parse


def _admins(args: argparse.Namespace) -> tuple[str, ...]:
    from hybridroute.node.access import DEFAULT_ADMINS

    if args.no_admin_clients:
        if args.admin_client:
            raise UsageError("--no-admin-clients and --admin-client contradict each other")
        return ()
    return tuple(args.admin_client) if args.admin_client else DEFAULT_ADMINS


def _serving_policy(args: argparse.Namespace) -> tuple[VersionPolicy, int, int]:
    """Version policy and drift window sizes, checked."""
    from hybridroute.node.versions import parse_policy

    try:
        policy = parse_policy(args.version_policy)
    except ValueError as exc:
        raise UsageError(f"--version-policy: {exc}") from None
    if args.drift_window < 0 or args.drift_min_window < 1:
        raise UsageError("--drift-window must be >= 0 and --drift-min-window >= 1")
    if args.drift_window and args.drift_min_window > args.drift_window:
        raise UsageError("--drift-min-window cannot exceed --drift-window")
    return policy, args.drift_window, args.drift_min_window


def _allowed_clients(args: argparse.Namespace) -> tuple[str, ...]:
    """Identities the node serves: the router's alone unless told otherwise
    (architecture.md, invariant 3); () means any client the CA signed."""
    if args.allow_any_client and args.allow_client:
        raise UsageError("--allow-any-client and --allow-client exclude each other")
    if args.allow_any_client or args.insecure or args.client_ca is None:
        return tuple(args.allow_client)  # without client certificates nobody has an identity
    return tuple(args.allow_client) or ("router",)


def _node_serve(args: argparse.Namespace) -> int:
    import asyncio

    from hybridroute.node.dataplane import BatchingDefaults
    from hybridroute.node.server import NodeOptions, run_node

    token = None
    if args.bearer_token_env:
        token = os.environ.get(args.bearer_token_env, "").strip()
        if not token:
            raise UsageError(
                f"--bearer-token-env: environment variable {args.bearer_token_env} is not set"
            )
    if not args.insecure:
        needed = [("--cert", args.cert), ("--key", args.key)]
        if token is None:
            needed.append(("--client-ca", args.client_ca))
        missing = [flag for flag, value in needed if value is None]
        if missing:
            raise UsageError(
                f"node serve needs {', '.join(missing)} for mutual TLS "
                "(make a dev PKI with 'hybridroute certs init --out DIR'), or --insecure"
            )
    if not args.models.is_dir():
        raise UsageError(
            f"--models {args.models}: not a directory "
            "(make one with 'hybridroute models sample --out DIR')"
        )
    policy, window, min_window = _serving_policy(args)
    options = NodeOptions(
        models=args.models,
        listen=args.listen,
        cert=args.cert,
        key=args.key,
        client_ca=args.client_ca,
        allow_clients=_allowed_clients(args),
        insecure=args.insecure,
        metrics_listen=args.metrics_listen,
        batching=BatchingDefaults(
            max_batch_size=args.max_batch_size,
            max_queue_delay_ms=args.max_queue_delay_ms,
            enabled=not args.no_batching,
        ),
        max_message_bytes=args.max_message_bytes,
        grace_seconds=args.grace,
        bearer_token=token,
        admin_clients=_admins(args),
        version_policy=policy,
        drift_window=window,
        drift_min_window=min_window,
        drift_interval=args.drift_interval,
    )
    try:
        return asyncio.run(run_node(options))
    except OSError as exc:
        raise UsageError(str(exc)) from None


# ------------------------------------------------------------------------ models ...


def _register_models(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    models = sub.add_parser(
        "models", help="package models, and list, load, unload or deploy them on nodes"
    )
    models_sub = models.add_subparsers(dest="models_command", metavar="SUBCOMMAND")
    models_sub.required = True
    _register_sample(models_sub)
    register_package(models_sub)
    register_lifecycle_commands(models_sub)
    register_deploy(models_sub)


def _register_sample(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "sample",
        help="train and write the sample models (iris, ticket-triage) into a repository",
        description="Train the sample models (seeded, no downloads) and package them as "
        "version 1 under DIR/<model>/1/.",
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="repository root")
    parser.add_argument("--force", action="store_true", help="replace existing sample versions")
    parser.set_defaults(handler=_models_sample)


def _models_sample(args: argparse.Namespace) -> int:
    from hybridroute.node.packaging import PackagingError
    from hybridroute.node.samples import write_samples

    try:
        written = write_samples(args.out, force=args.force)
    except PackagingError as exc:
        raise UsageError(str(exc)) from None
    for model in written:
        print(
            f"wrote {model.name} version {model.version} to {model.path} "
            f"(held-out accuracy {model.accuracy:.3f})"
        )
    return 0
