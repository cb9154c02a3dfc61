"""`hybridroute` subcommands of the node area.

- `hybridroute models sample --out DIR [--force]`: write the two sample models;
- `hybridroute models package ...`: package an ML engineer's estimator file as a
  repository version (skops, reviewed trusted types, model.yaml, drift baseline);
- `hybridroute node serve ...`: serve a repository over mutual TLS.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from hybridroute.cli import UsageError

if TYPE_CHECKING:
    from hybridroute.node.modelconfig import Batching

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this area's subcommands to the top-level parser."""
    _register_models(sub)
    _register_node(sub)


# ------------------------------------------------------------------------ node serve


def _register_node(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    node = sub.add_parser("node", help="run an on-prem model node")
    node_sub = node.add_subparsers(dest="node_command", metavar="SUBCOMMAND")
    node_sub.required = True
    p = node_sub.add_parser(
        "serve",
        help="serve a model repository over the Open Inference Protocol (mutual TLS)",
        description="Serve every model version under --models over gRPC. Mutual TLS by "
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
        help="serve only this client identity (certificate CN or DNS SAN); repeatable",
    )
    p.add_argument("--metrics-listen", metavar="HOST:PORT", help="serve Prometheus /metrics")
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
        type=int,
        default=32,
        metavar="N",
        help="default rows per estimator call when model.yaml sets none (default 32)",
    )
    p.add_argument(
        "--max-queue-delay-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="default wait for a fuller batch when model.yaml sets none (default 0)",
    )
    p.add_argument("--no-batching", action="store_true", help="one estimator call per request")
    p.add_argument(
        "--max-message-bytes",
        type=int,
        default=64 * 1024 * 1024,
        metavar="N",
        help="largest request accepted (default 64 MiB); larger: RESOURCE_EXHAUSTED",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="time in-flight requests get to finish on SIGTERM (default 10)",
    )
    p.set_defaults(handler=_node_serve)


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
    options = NodeOptions(
        models=args.models,
        listen=args.listen,
        cert=args.cert,
        key=args.key,
        client_ca=args.client_ca,
        allow_clients=tuple(args.allow_client),
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
    )
    try:
        return asyncio.run(run_node(options))
    except OSError as exc:
        raise UsageError(str(exc)) from None


# ------------------------------------------------------------------------ models ...


def _register_models(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    models = sub.add_parser("models", help="create and package models for a node's repository")
    models_sub = models.add_subparsers(dest="models_command", metavar="SUBCOMMAND")
    models_sub.required = True
    _register_sample(models_sub)
    _register_package(models_sub)


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


def _register_package(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "package",
        help="package a fitted estimator file as a repository version",
        description="Convert a fitted scikit-learn estimator to skops and write "
        "REPO/NAME/VERSION/ with model.yaml (reviewed trusted_types) and a drift baseline.",
    )
    add = parser.add_argument
    add("--estimator", required=True, type=Path, metavar="FILE", help=".skops, .joblib or .pkl")
    add("--format", choices=["skops", "joblib", "pickle"], help="default: from the file suffix")
    add(
        "--allow-unsafe-pickle",
        action="store_true",
        help="load a pickle/joblib FILE (runs any code in it: only for files you trust)",
    )
    add("--trust", action="append", default=[], metavar="TYPE", help="a type the .skops may load")
    add("--name", required=True, help="model name (the repository directory)")
    add("--version", required=True, type=int, help="version number (a positive integer)")
    add("--out", required=True, type=Path, metavar="REPO", help="repository root")
    add("--input-name", default="input", help="input tensor name (default: input)")
    add("--datatype", default="FP64", help="input OIP datatype, e.g. FP64, FP32, INT64, BYTES")
    add("--features", help="comma-separated column names (default: CSV header or the estimator's)")
    add(
        "--sample-data",
        required=True,
        type=Path,
        metavar="FILE",
        help="training inputs for the drift baseline: .npy, .csv, or .txt (texts, one a line)",
    )
    add("--max-batch-size", type=int, help="dynamic batching limit (default: the node's)")
    add("--max-queue-delay-ms", type=float, help="batching delay (default: the node's)")
    add("--description", help="one line for model metadata")
    add("--force", action="store_true", help="replace an existing version")
    parser.set_defaults(handler=_models_package)


_SUFFIX_FORMATS = {".skops": "skops", ".joblib": "joblib", ".pkl": "pickle", ".pickle": "pickle"}


def _estimator_format(args: argparse.Namespace) -> str:
    fmt = args.format or _SUFFIX_FORMATS.get(args.estimator.suffix.lower())
    if fmt is None:
        raise UsageError(f"cannot tell the format of {args.estimator.name}: pass --format")
    if fmt != "skops" and not args.allow_unsafe_pickle:
        raise UsageError(
            f"{args.estimator.name} is a {fmt} file: loading it runs any code it contains; "
            "pass --allow-unsafe-pickle if you trust where it came from"
        )
    return str(fmt)


def _load_input_estimator(args: argparse.Namespace) -> object:
    from hybridroute.node.loading import ModelLoadError, load_estimator_file, untrusted_types

    fmt = _estimator_format(args)
    if fmt == "skops" and args.estimator.is_file():
        try:
            refused = [t for t in untrusted_types(args.estimator) if t not in args.trust]
        except Exception as exc:
            raise UsageError(f"{args.estimator} is not a readable skops file: {exc}") from None
        if refused:
            flags = " ".join(f"--trust {t}" for t in refused)
            raise UsageError(
                f"{args.estimator.name} contains types skops does not trust: "
                f"{', '.join(refused)}; review them, then pass {flags}"
            )
    try:
        return load_estimator_file(
            args.estimator,
            format=fmt,
            trusted_types=args.trust,
            allow_unsafe_pickle=args.allow_unsafe_pickle,
            label=str(args.estimator),
        )
    except ModelLoadError as exc:
        raise UsageError(str(exc)) from None


def _batching(args: argparse.Namespace) -> Batching | None:
    """Batching settings if any flag sets them; None lets the node's defaults apply."""
    from hybridroute.node.modelconfig import Batching

    if args.max_batch_size is None and args.max_queue_delay_ms is None:
        return None
    settings = {
        "max_batch_size": args.max_batch_size,
        "max_queue_delay_ms": args.max_queue_delay_ms,
    }
    return Batching.model_validate({k: v for k, v in settings.items() if v is not None})


def _models_package(args: argparse.Namespace) -> int:
    from hybridroute.node.modelconfig import DATATYPES
    from hybridroute.node.packaging import PackagingError, package_model, read_sample

    datatype = args.datatype.upper()
    if datatype not in DATATYPES:
        raise UsageError(f"--datatype {args.datatype}: expected one of {', '.join(DATATYPES)}")
    estimator = _load_input_estimator(args)
    try:
        sample, header = read_sample(args.sample_data, datatype)
        features = [f.strip() for f in args.features.split(",")] if args.features else header
        path = package_model(
            estimator,
            name=args.name,
            version=args.version,
            repo=args.out,
            input_name=args.input_name,
            input_datatype=datatype,
            features=features,
            baseline_sample=sample,
            batching=_batching(args),
            description=args.description,
            force=args.force,
        )
    except (PackagingError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    print(f"wrote {args.name} version {args.version} to {path}")
    print(f"review {path / 'model.yaml'} (trusted_types) before deploying it")
    return 0
