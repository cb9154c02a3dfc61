"""Packaging a fitted estimator as a repository version (`hybridroute models package`).

`package_model` is the one way a version directory is written (the sample models use
it too). It always stores the estimator as skops, records exactly the types skops
reports as untrusted for that dump in `trusted_types` (the list a reviewer checks and
commits), writes `model.yaml` and the drift baseline, then loads the result with the
node's own loader before publishing it. The directory is written under a hidden
temporary name beside its destination and renamed into place, so a node scanning the
repository never sees half a version.
"""

from __future__ import annotations

import csv
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import skops.io as sio
import yaml
from pydantic import ValidationError
from sklearn.base import clone, is_classifier

from hybridroute.node.loading import ModelLoadError, load_version, untrusted_types
from hybridroute.node.modelconfig import (
    BASELINE_FILE,
    CONFIG_FILE,
    DATATYPES,
    OOV_STATISTIC,
    TEXT_STATISTICS,
    Baseline,
    Batching,
    ModelConfig,
    OutputSpec,
    Vocabulary,
    numpy_dtype,
    oov_fractions,
    text_statistics,
    text_vectorizer,
    write_baseline,
)

__all__ = [
    "BASELINE_ROWS",
    "ESTIMATOR_FILE",
    "PackagingError",
    "VersionExistsError",
    "infer_outputs",
    "make_baseline",
    "package_model",
    "publish_version",
    "read_sample",
    "render_config",
]

log = logging.getLogger(__name__)

ESTIMATOR_FILE = "model.skops"
BASELINE_ROWS = 1000
OOV_FOLDS = 10


class PackagingError(Exception):
    """The estimator or its description cannot be packaged; the message says why."""


class VersionExistsError(PackagingError):
    """The destination version exists and overwriting was not asked for."""


def _datatype_of(values: npt.NDArray[Any]) -> str:
    """The OIP datatype that holds `values` without loss (strings -> BYTES)."""
    kind = values.dtype.kind
    if kind == "b":
        return "BOOL"
    if kind in "iu":
        return "INT64"
    if kind == "f":
        return "FP64"
    return "BYTES"


def infer_outputs(estimator: Any, sample: Any) -> list[OutputSpec]:
    """Outputs from what the estimator offers: `predict` as `label` (a classifier) or
    `prediction` (a regressor), default; `predict_proba` as `probabilities` if available.
    Datatypes and widths come from running the estimator on a few sample rows."""
    if not callable(getattr(estimator, "predict", None)):
        raise PackagingError(f"{type(estimator).__name__} has no predict method")
    predicted = _apply(estimator, "predict", sample)
    outputs = [
        OutputSpec(
            name="label" if is_classifier(estimator) else "prediction",
            datatype=_datatype_of(predicted),  # type: ignore[arg-type]
            shape=(-1, *predicted.shape[1:]),
            method="predict",
            default=True,
        )
    ]
    if callable(getattr(estimator, "predict_proba", None)):
        proba = _apply(estimator, "predict_proba", sample)
        outputs.append(
            OutputSpec(
                name="probabilities",
                datatype="FP64",
                shape=(-1, *proba.shape[1:]),
                method="predict_proba",
            )
        )
    return outputs


def _apply(estimator: Any, method: str, sample: Any) -> npt.NDArray[Any]:
    """`estimator.method(sample)` as an array; a failure is a PackagingError."""
    try:
        return np.asarray(getattr(estimator, method)(sample))
    except Exception as exc:
        raise PackagingError(
            f"{type(estimator).__name__}.{method} fails on the sample data: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def _subsample(sample: Any, rows: int, seed: int = 0) -> Any:
    """At most `rows` rows, chosen deterministically, in their original order."""
    n = len(sample)
    if n <= rows:
        return sample
    keep = np.sort(np.random.default_rng(seed).choice(n, size=rows, replace=False))
    if isinstance(sample, np.ndarray):
        return sample[keep]
    return [sample[i] for i in keep]


def make_baseline(
    estimator: Any, config: ModelConfig, sample: Any, *, rows: int = BASELINE_ROWS
) -> Baseline:
    """The drift baseline of `config` from training inputs (see modelconfig for why text
    models store statistics rather than texts, and an out-of-vocabulary share only when
    the estimator has a fitted vocabulary: see `_oov_reference`)."""
    oov = _oov_reference(estimator, sample) if config.input.datatype == "BYTES" else None
    sample = _subsample(sample, rows)
    default = config.output(config.default_outputs[0])
    assert default is not None
    predictions = _apply(estimator, default.method, sample)
    if predictions.dtype.kind in "OSU":
        predictions = predictions.astype(str)
    if config.input.datatype == "BYTES":
        values = text_statistics(list(sample))
        columns = TEXT_STATISTICS
        if oov is not None:
            values = np.column_stack([values, _subsample(oov, rows)])
            columns = (*TEXT_STATISTICS, OOV_STATISTIC)
        return Baseline(kind="text-stats", columns=columns, values=values, predictions=predictions)
    return Baseline(
        kind="tabular",
        columns=tuple(config.features or ()),
        values=np.asarray(sample, dtype=numpy_dtype(config.input.datatype)),
        predictions=predictions,
    )


def _oov_reference(estimator: Any, texts: Sequence[str]) -> npt.NDArray[np.float64] | None:
    """The out-of-vocabulary share of each sample text as a text the model never saw
    would show it, or None when the estimator has no fitted vocabulary.

    The sample is (usually) what the vocabulary was fitted on, so measured against the
    model's own vocabulary its texts look unusually familiar: their rare terms are in the
    vocabulary because these very texts put them there. Live texts from the same source
    would then be flagged on every window. So each text is measured against a copy of
    the vectorizer refitted on the other folds of the sample (cross-fitting); only the
    resulting shares are kept, no texts and no terms. Live texts are measured against
    the model's own vocabulary (`drift.DriftMonitor`)."""
    vectorizer = text_vectorizer(estimator)
    if vectorizer is None:
        return None
    folds = np.arange(len(texts)) % OOV_FOLDS
    shares = np.zeros(len(texts), dtype=np.float64)
    try:
        for fold in range(min(OOV_FOLDS, len(texts))):
            held = folds == fold
            fitted = clone(vectorizer).fit([texts[i] for i in np.flatnonzero(~held).tolist()])
            mine = [texts[i] for i in np.flatnonzero(held).tolist()]
            shares[held] = oov_fractions(mine, Vocabulary.of(fitted))
    except Exception as exc:  # e.g. too few texts for min_df/max_df: no OOV statistic
        log.warning(
            "no %s in the baseline: refitting %s on the sample fails (%s: %s)",
            OOV_STATISTIC,
            type(vectorizer).__name__,
            type(exc).__name__,
            exc,
        )
        return None
    return shares


def _check_sample(sample: Any, input_datatype: str, features: Sequence[str] | None) -> Any:
    """Validate the baseline sample against the input; return it in estimator form."""
    if input_datatype == "BYTES":
        texts = [t.decode("utf-8") if isinstance(t, bytes) else t for t in list(sample)]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise PackagingError("the sample of a BYTES input must be a non-empty list of texts")
        return texts
    array = np.asarray(sample)
    if array.ndim != 2 or not len(array):
        raise PackagingError(f"the sample must be a non-empty 2-d table, got shape {array.shape}")
    if features is None or len(features) != array.shape[1]:
        raise PackagingError(
            f"the sample has {array.shape[1]} columns; name each of them with features"
        )
    try:
        with np.errstate(invalid="ignore", over="ignore"):
            converted = array.astype(numpy_dtype(input_datatype))
    except (TypeError, ValueError) as exc:
        raise PackagingError(f"the sample does not convert to {input_datatype}: {exc}") from None
    _check_lossless(array, converted, input_datatype, features)
    return converted


def _check_lossless(
    original: npt.NDArray[Any], converted: npt.NDArray[Any], datatype: str, features: Sequence[str]
) -> None:
    """Refuse a datatype that changes the training values: an integer type that wraps
    (INT16 and an income of 87000) or truncates (1.5 -> 1), BOOL from other numbers, or
    a float type that overflows to infinity. The node would serve (and watch drift on)
    inputs the estimator never saw, silently. A float type may round to its precision
    (FP64 training data served as FP32 is the usual, intended narrowing)."""
    if original.dtype.kind not in "biuf":
        return  # e.g. numeric text: astype parsed it, nothing to compare with
    with np.errstate(invalid="ignore", over="ignore"):
        if converted.dtype.kind == "f":
            a, b = original.astype(np.float64), converted.astype(np.float64)
            eps = float(np.finfo(converted.dtype).eps)
            same = np.isclose(b, a, rtol=eps, atol=0.0, equal_nan=True) | (a == b)
        else:
            same = converted.astype(original.dtype) == original
    if bool(same.all()):
        return
    row, column = (int(i) for i in np.argwhere(~same)[0])
    raise PackagingError(
        f"the sample does not fit {datatype}: column {features[column]!r} holds "
        f"{original[row, column].item()!r} (row {row}), which {datatype} stores as "
        f"{converted[row, column].item()!r}; choose a datatype that holds the training values"
    )


def _features(estimator: Any, features: Sequence[str] | None, datatype: str) -> Any:
    if datatype == "BYTES":
        if features:
            raise PackagingError("features name numeric columns; a BYTES input has none")
        return None
    names = getattr(estimator, "feature_names_in_", None)
    trained = None if names is None else tuple(str(n) for n in names)
    if features:
        given = tuple(features)
        # The node feeds each row's columns to the estimator in the order model.yaml
        # declares, so names that differ from the ones the estimator was fitted on
        # (even only in order) would silently swap columns. Refuse rather than reorder:
        # a mismatch means the sample (or --features) and the estimator disagree about
        # what the columns are, and guessing which one is right is the engineer's call.
        if trained is not None and given != trained:
            raise PackagingError(
                f"feature names {', '.join(given)} differ from those the estimator was "
                f"fitted on: expected {', '.join(trained)} (in this order); put the "
                "sample's columns in the estimator's order or drop --features"
            )
        return given
    if trained is None:
        raise PackagingError("features are required for a numeric input (one name per column)")
    return trained


def _classes(estimator: Any) -> tuple[str | int, ...] | None:
    classes = getattr(estimator, "classes_", None)
    if classes is None or np.asarray(classes).ndim != 1:
        return None
    return tuple(c if isinstance(c, int) else str(c) for c in np.asarray(classes).tolist())


def package_model(
    estimator: Any,
    *,
    name: str,
    version: int,
    repo: Path,
    input_name: str,
    input_datatype: str,
    features: Sequence[str] | None = None,
    outputs: Sequence[OutputSpec] | None = None,
    baseline_sample: Any,
    batching: Batching | None = None,
    description: str | None = None,
    force: bool = False,
) -> Path:
    """Write `repo/name/version/` for a fitted estimator and return its path.

    Refuses (VersionExistsError) to replace an existing version unless `force`.
    The written version is loaded with `load_version` before it is published.
    """
    if input_datatype not in DATATYPES:
        raise PackagingError(f"unknown input datatype {input_datatype!r}")
    feature_names = _features(estimator, features, input_datatype)
    sample = _check_sample(baseline_sample, input_datatype, feature_names)
    config = _config(
        name=name,
        version=version,
        description=description,
        inputs=[{"name": input_name, "datatype": input_datatype, "shape": _shape(feature_names)}],
        outputs=list(outputs) if outputs else infer_outputs(estimator, sample[:8]),
        features=feature_names,
        classes=_classes(estimator),
        batching=batching,
    )
    repo = Path(repo)
    final = repo / config.name / str(config.version)  # validated: no path tricks
    if final.exists() and not force:
        raise VersionExistsError(f"{final} exists (use --force to replace it)")
    (repo / name).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=repo / name))
    try:
        _write_version(staging, estimator, config, sample)
        publish_version(staging, final, force=force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("packaged %s/%s at %s", name, version, final)
    return final


def _shape(features: Sequence[str] | None) -> list[int]:
    return [-1] if features is None else [-1, len(features)]


def _config(**fields: Any) -> ModelConfig:
    """A ModelConfig from fields; validation problems become PackagingError."""
    try:
        return ModelConfig.model_validate(
            {
                **fields,
                "file": ESTIMATOR_FILE,
                "format": "skops",
                "trusted_types": [],
                "baseline": BASELINE_FILE,
            }
        )
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}" for error in exc.errors()
        )
        raise PackagingError(f"invalid model description: {problems}") from None


def _write_version(staging: Path, estimator: Any, config: ModelConfig, sample: Any) -> None:
    try:
        sio.dump(estimator, staging / ESTIMATOR_FILE)
    except Exception as exc:
        raise PackagingError(f"skops cannot store {type(estimator).__name__}: {exc}") from exc
    trusted = untrusted_types(staging / ESTIMATOR_FILE)
    config = config.model_copy(update={"trusted_types": tuple(trusted)})
    write_baseline(staging / BASELINE_FILE, make_baseline(estimator, config, sample))
    (staging / CONFIG_FILE).write_text(render_config(config), encoding="utf-8")
    try:
        load_version(staging, check_location=False)
    except ModelLoadError as exc:
        raise PackagingError(f"the packaged model does not load: {exc}") from exc


def render_config(config: ModelConfig) -> str:
    """model.yaml text for `config`, with a header saying what to review."""
    data = config.model_dump(mode="json", exclude_none=True)
    header = (
        "# Written by `hybridroute models package`. Review trusted_types before committing:\n"
        "# skops loads these types from model.skops only because they are listed here.\n"
    )
    return header + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)


def publish_version(staging: Path, final: Path, *, force: bool) -> None:
    """Rename `staging` to `final`; with `force`, move an existing `final` aside first.
    Both must be in the same directory, so each rename is atomic and a node scanning
    the repository never sees half a version."""
    if not final.exists():
        staging.rename(final)
        return
    if not force:
        raise VersionExistsError(f"{final} exists (use --force to replace it)")
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
    old.rmdir()
    final.rename(old)
    try:
        staging.rename(final)
    except OSError:
        old.rename(final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def read_sample(path: Path, input_datatype: str) -> tuple[Any, tuple[str, ...] | None]:
    """Training inputs for the baseline from a file, and column names if it has them.

    `.npy`: a 2-d numeric array, or a 1-d string array for BYTES (no pickles).
    `.csv`: numeric columns with an optional header row; for BYTES one text column
    under a header row. `.txt` (BYTES only): one text per line.
    """
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False), None
        if suffix == ".txt" and input_datatype == "BYTES":
            lines = path.read_text(encoding="utf-8").splitlines()
            return [line for line in lines if line.strip()], None
        if suffix == ".csv":
            return _read_csv(path, input_datatype)
    except (OSError, ValueError) as exc:
        raise PackagingError(f"cannot read sample data {path}: {exc}") from None
    kinds = ".npy, .csv or .txt" if input_datatype == "BYTES" else ".npy or .csv"
    raise PackagingError(f"sample data {path.name}: expected a {kinds} file")


def _read_csv(path: Path, input_datatype: str) -> tuple[Any, tuple[str, ...] | None]:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = [row for row in csv.reader(fh) if row]
    if not rows:
        raise ValueError("no rows")
    if input_datatype == "BYTES":
        if any(len(row) != 1 for row in rows):
            raise ValueError("a text sample CSV has exactly one column (under a header row)")
        return [row[0] for row in rows[1:]], None
    header: tuple[str, ...] | None = None
    if not _numeric(rows[0]):
        header, rows = tuple(c.strip() for c in rows[0]), rows[1:]
    return np.array([[float(c) for c in row] for row in rows], dtype=np.float64), header


def _numeric(row: Sequence[str]) -> bool:
    try:
        [float(c) for c in row]
    except ValueError:
        return False
    return True
