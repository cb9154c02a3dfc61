"""`hybridroute models package`: an ML engineer's estimator file as a repository version.

Also used by `models deploy`, which packages on the fly when given an estimator
instead of a version directory (`add_package_arguments(deploy=True)`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from hybridroute.cli import UsageError

if TYPE_CHECKING:
    from hybridroute.node.modelconfig import Batching

__all__ = ["add_package_arguments", "package_from_args", "register_package"]


def register_package(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `hybridroute models package`."""
    parser = sub.add_parser(
        "package",
        help="package a fitted estimator file as a repository version",
        description="Convert a fitted scikit-learn estimator to skops and write "
        "REPO/NAME/VERSION/ with model.yaml (reviewed trusted_types) and a drift baseline.",
    )
    add_package_arguments(parser, deploy=False)
    parser.add_argument("--force", action="store_true", help="replace an existing version")
    parser.set_defaults(handler=_models_package)


def add_package_arguments(parser: argparse._ActionsContainer, *, deploy: bool) -> None:
    """The packaging flags; for `models deploy` they are optional (it may be given a
    packaged version directory instead) and there is no --out (a temporary one is used)."""
    need = not deploy
    add = parser.add_argument
    add("--estimator", required=need, type=Path, metavar="FILE", help=".skops, .joblib or .pkl")
    add("--format", choices=["skops", "joblib", "pickle"], help="default: from the file suffix")
    add(
        "--allow-unsafe-pickle",
        action="store_true",
        help="load a pickle/joblib FILE (runs any code in it: only for files you trust)",
    )
    add("--trust", action="append", default=[], metavar="TYPE", help="a type the .skops may load")
    add("--name", required=need, help="model name (the repository directory)")
    add("--version", required=need, type=int, help="version number (a positive integer)")
    if not deploy:
        add("--out", required=True, type=Path, metavar="REPO", help="repository root")
    add("--input-name", default="input", help="input tensor name (default: input)")
    add("--datatype", default="FP64", help="input OIP datatype, e.g. FP64, FP32, INT64, BYTES")
    add("--features", help="comma-separated column names (default: CSV header or the estimator's)")
    add(
        "--sample-data",
        required=need,
        type=Path,
        metavar="FILE",
        help="training inputs for the drift baseline: .npy, .csv, or .txt (texts, one a line)",
    )
    add(
        "--max-batch-size",
        type=int,
        help="rows per estimator call and per request (default: the node's)",
    )
    add("--max-queue-delay-ms", type=float, help="batching delay (default: the node's)")
    add("--description", help="one line for model metadata")


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
    path = package_from_args(args, args.out, force=args.force)
    print(f"wrote {args.name} version {args.version} to {path}")
    print(f"review {path / 'model.yaml'} (trusted_types) before deploying it")
    return 0


def package_from_args(args: argparse.Namespace, out: Path, *, force: bool) -> Path:
    """Package the estimator the flags describe into `out`; returns the version dir."""
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
            repo=out,
            input_name=args.input_name,
            input_datatype=datatype,
            features=features,
            baseline_sample=sample,
            batching=_batching(args),
            description=args.description,
            force=force,
        )
    except (PackagingError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    return path
