"""The model repository format: `model.yaml` (`ModelConfig`) and the drift baseline.

A repository is `ROOT/<model>/<version>/`, where `<version>` is a positive integer
directory name (the newest is the highest, as in Triton). A version directory holds:

- `model.yaml`: this module's `ModelConfig`, parsed with `hybridroute.config.load_model`
  so that every mistake is reported as `file:line: key.path: problem`;
- the estimator file named by `file` (`model.skops` by default);
- optionally the baseline named by `baseline` (`baseline.npz`, written by
  `hybridroute models package`): a sample of training inputs for drift monitoring.

Cross-field rules are checked in field validators (not one model-level validator) so
that the error points at the offending key and its line rather than at the file.

Baseline format (`numpy.savez_compressed`, loadable with `allow_pickle=False`):

- `kind`: 0-d string, `"tabular"` or `"text-stats"`;
- `columns`: 1-d string array, feature names (tabular) or `TEXT_STATISTICS` names,
  followed by `OOV_STATISTIC` when the estimator has a fitted vocabulary;
- `values`: 2-d array `[n, len(columns)]`, the training rows (tabular, in the input's
  dtype) or per-text statistics (float64) for BYTES inputs;
- `predictions` (optional): the default output of the estimator on those rows
  (`[n]`, or `[n, k]` for a k-column output; strings for BYTES outputs), so
  prediction drift can be measured without any stored inputs. node/drift.py compares
  one value per row (or a binary `predict_proba`'s second column) as the feature
  `<prediction: OUTPUT>`; without predictions (or with other outputs) only the inputs
  are compared.

Text models store statistics instead of the raw training texts: training texts often
hold personal data (names, emails, phone numbers) and must not be copied into every
deployed artifact. Drift on texts is measured on these statistics and on predictions.
The out-of-vocabulary share needs no stored vocabulary either: it is measured against
the estimator's own fitted vocabulary (`text_vocabulary`), which ships with the model.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from hybridroute.config import Strict
from hybridroute.node.versions import VersionPolicy

__all__ = [
    "BASELINE_FILE",
    "CONFIG_FILE",
    "DATATYPES",
    "METHODS",
    "OOV_STATISTIC",
    "TEXT_STATISTICS",
    "Baseline",
    "Batching",
    "Datatype",
    "Format",
    "InputSpec",
    "Method",
    "ModelConfig",
    "OutputSpec",
    "Vocabulary",
    "numpy_dtype",
    "oov_fractions",
    "read_baseline",
    "text_statistics",
    "text_vectorizer",
    "text_vocabulary",
    "valid_model_name",
    "write_baseline",
]

CONFIG_FILE = "model.yaml"
BASELINE_FILE = "baseline.npz"

Datatype = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
]
Method = Literal["predict", "predict_proba", "decision_function", "transform"]
Format = Literal["skops", "pickle", "joblib"]

# OIP datatype -> numpy dtype. BF16 is absent: numpy has no such type.
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
METHODS: tuple[str, ...] = ("predict", "predict_proba", "decision_function", "transform")
_FLOAT_METHODS = {"predict_proba", "decision_function"}
Names = tuple[str, ...]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def valid_model_name(name: str) -> bool:
    """Whether `name` is a model name: one safe path component (no '/', no '..')."""
    return _NAME.fullmatch(name) is not None


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    """The numpy dtype a tensor of this OIP datatype is held in (object for BYTES)."""
    return DATATYPES[datatype]


def _problem(message: str) -> PydanticCustomError:
    # A custom error renders exactly `message`, without pydantic's "Value error, " prefix.
    return PydanticCustomError("model_config", "{why}", {"why": message})


def _plain_file_name(value: str) -> str:
    """File names in model.yaml may not leave the version directory."""
    if not value or "/" in value or "\\" in value or value in {".", ".."}:
        raise _problem(f"must be a file name inside the version directory, got {value!r}")
    return value


class _Tensor(Strict):
    name: str = Field(min_length=1)
    datatype: Datatype
    shape: tuple[int, ...] = Field(min_length=1)

    @field_validator("shape")
    @classmethod
    def _batch_first(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        if shape[0] != -1:
            raise _problem(f"the first dimension is the batch and must be -1, got {list(shape)}")
        if any(d < 1 for d in shape[1:]):
            raise _problem(f"dimensions after the first must be >= 1, got {list(shape)}")
        return shape


class InputSpec(_Tensor):
    """The one input tensor: `[-1, n_features]` numeric rows, or `[-1]` BYTES texts."""

    @field_validator("shape")
    @classmethod
    def _input_rank(cls, shape: tuple[int, ...], info: ValidationInfo) -> tuple[int, ...]:
        if info.data.get("datatype") == "BYTES":
            if shape != (-1,):
                raise _problem(f"a BYTES input holds one text per row: [-1], got {list(shape)}")
        elif len(shape) != 2:
            raise _problem(f"a numeric input is a table: shape [-1, n_features], got {list(shape)}")
        return shape


class OutputSpec(_Tensor):
    """One output tensor and the estimator method that produces it."""

    method: Method = "predict"
    default: bool = False

    @field_validator("method")
    @classmethod
    def _float_method(cls, method: str, info: ValidationInfo) -> str:
        datatype = info.data.get("datatype")
        if method in _FLOAT_METHODS and datatype not in {None, "FP16", "FP32", "FP64"}:
            raise _problem(f"{method} returns floats: datatype must be FP64, FP32 or FP16")
        return method


class Batching(Strict):
    """Dynamic batching: how many rows one estimator call may merge, and how long the
    first request may wait for company. `max_batch_size` also bounds the rows of one
    request, as in Triton: a bigger request is refused before it is decoded."""

    max_batch_size: int = Field(default=32, ge=1)
    max_queue_delay_ms: float = Field(default=0.0, ge=0, allow_inf_nan=False)  # .inf: forever


class ModelConfig(Strict):
    """`model.yaml`: everything the node needs to load and serve one model version.

    `version_policy` is about the model, not this version: a node follows the one of
    the newest version on disk (see node/versions.py).

    Field order matters: validators of later fields read earlier ones (`info.data`).
    """

    name: str
    version: int = Field(ge=1)
    platform: Literal["sklearn"] = "sklearn"
    description: str | None = None
    file: str = "model.skops"
    format: Format = "skops"
    trusted_types: tuple[str, ...] | None = Field(default=None, validate_default=True)
    allow_unsafe_pickle: bool = False
    inputs: tuple[InputSpec, ...]
    outputs: tuple[OutputSpec, ...]
    features: tuple[str, ...] | None = Field(default=None, validate_default=True)
    classes: tuple[str | int, ...] | None = None
    batching: Batching | None = None  # None: the node's defaults apply
    baseline: str | None = None
    version_policy: VersionPolicy | None = None  # None: the node's --version-policy applies

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not _NAME.match(name):
            raise _problem(
                "must start with a letter or digit and contain only letters, digits, '_', '.', '-'"
            )
        return name

    @field_validator("file", "baseline")
    @classmethod
    def _file(cls, value: str | None) -> str | None:
        return None if value is None else _plain_file_name(value)

    @field_validator("trusted_types")
    @classmethod
    def _trusted(cls, value: Names | None, info: ValidationInfo) -> Names | None:
        if value is None and info.data.get("format", "skops") == "skops":
            raise _problem(
                "required for format skops: list the types skops may load "
                "(review the output of skops.io.get_untrusted_types; [] if none)"
            )
        return value

    @field_validator("inputs")
    @classmethod
    def _one_input(cls, inputs: tuple[InputSpec, ...]) -> tuple[InputSpec, ...]:
        if len(inputs) != 1:
            raise _problem(f"a scikit-learn estimator takes exactly one input X, got {len(inputs)}")
        return inputs

    @field_validator("outputs")
    @classmethod
    def _outputs(cls, outputs: tuple[OutputSpec, ...]) -> tuple[OutputSpec, ...]:
        if not outputs:
            raise _problem("at least one output is required")
        names = [o.name for o in outputs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise _problem(f"duplicate output names: {', '.join(duplicates)}")
        if not any(o.default for o in outputs):
            raise _problem("mark at least one output `default: true` (sent when none is asked for)")
        return outputs

    @field_validator("features")
    @classmethod
    def _features(cls, value: Names | None, info: ValidationInfo) -> Names | None:
        inputs = info.data.get("inputs")
        if not inputs:
            return value  # the input itself is invalid; that error is reported already
        spec: InputSpec = inputs[0]
        if spec.datatype == "BYTES":
            if value is not None:
                raise _problem("features name a numeric input's columns; a BYTES input has none")
            return value
        if value is None:
            raise _problem(f"required for the numeric input {spec.name!r}: one name per column")
        if len(value) != spec.shape[1]:
            raise _problem(
                f"{len(value)} names for input {spec.name!r} of shape {list(spec.shape)} "
                f"({spec.shape[1]} columns)"
            )
        if len(set(value)) != len(value):
            raise _problem("feature names must be unique")
        return value

    @field_validator("classes")
    @classmethod
    def _classes(cls, value: tuple[str | int, ...] | None, info: ValidationInfo) -> Any:
        for out in info.data.get("outputs") or ():
            proba = out.method == "predict_proba" and len(out.shape) == 2
            if value and proba and out.shape[1] != len(value):
                raise _problem(
                    f"{len(value)} classes but output {out.name!r} has shape {list(out.shape)}"
                )
        return value

    @property
    def input(self) -> InputSpec:
        """The single input tensor."""
        return self.inputs[0]

    @property
    def default_outputs(self) -> tuple[str, ...]:
        """Names of the outputs returned when a request asks for none in particular."""
        return tuple(o.name for o in self.outputs if o.default)

    def output(self, name: str) -> OutputSpec | None:
        """The output called `name`, or None."""
        return next((o for o in self.outputs if o.name == name), None)


# ---------------------------------------------------------------------------- baseline

TEXT_STATISTICS: tuple[str, ...] = (
    "n_chars",
    "n_words",
    "digit_fraction",
    "upper_fraction",
    "punct_fraction",
    "non_ascii_fraction",
)


OOV_STATISTIC = "oov_fraction"


@dataclass(frozen=True)
class Vocabulary:
    """A fitted text vectorizer's terms and the analyzer that turns a text into terms."""

    analyze: Callable[[str], Sequence[str]]
    terms: Container[str]

    @classmethod
    def of(cls, vectorizer: Any) -> Vocabulary:
        return cls(analyze=vectorizer.build_analyzer(), terms=vectorizer.vocabulary_)


def text_vectorizer(estimator: Any) -> Any | None:
    """The fitted vectorizer with a vocabulary that raw texts meet first: the estimator
    itself (`CountVectorizer`, `TfidfVectorizer`) or a Pipeline's first step, searched
    recursively; None when there is none (e.g. `HashingVectorizer`, a custom step)."""
    while True:
        terms = getattr(estimator, "vocabulary_", None)
        if isinstance(terms, dict) and callable(getattr(estimator, "build_analyzer", None)):
            return estimator
        steps = getattr(estimator, "steps", None)
        if not isinstance(steps, list) or not steps:
            return None
        estimator = steps[0][1]


def text_vocabulary(estimator: Any) -> Vocabulary | None:
    """The fitted vocabulary of `estimator` (see `text_vectorizer`), or None."""
    vectorizer = text_vectorizer(estimator)
    return None if vectorizer is None else Vocabulary.of(vectorizer)


def oov_fractions(texts: Sequence[str], vocabulary: Vocabulary) -> npt.NDArray[np.float64]:
    """Per text, the share of its terms (the vectorizer's own analysis: tokens or
    n-grams) outside `vocabulary`; 0 for a text without terms."""
    shares = []
    for text in texts:
        terms = vocabulary.analyze(text)
        unseen = sum(term not in vocabulary.terms for term in terms)
        shares.append(unseen / len(terms) if terms else 0.0)
    return np.asarray(shares, dtype=np.float64)


def text_statistics(
    texts: Sequence[str], vocabulary: Vocabulary | None = None
) -> npt.NDArray[np.float64]:
    """Per-text statistics `[n, len(TEXT_STATISTICS)]`, plus an `OOV_STATISTIC` column
    when a vocabulary is given: what a text baseline stores, and what drift monitoring
    computes on live texts to compare with it."""
    rows = []
    for text in texts:
        n = len(text)
        counts = (
            sum(c.isdigit() for c in text),
            sum(c.isupper() for c in text),
            sum(c in string.punctuation for c in text),
            sum(ord(c) > 127 for c in text),
        )
        rows.append((float(n), float(len(text.split())), *(k / n if n else 0.0 for k in counts)))
    values = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(TEXT_STATISTICS))
    if vocabulary is None:
        return values
    return np.column_stack([values, oov_fractions(texts, vocabulary)])


@dataclass(frozen=True)
class Baseline:
    """A version's drift baseline (see the module docstring for the file format)."""

    kind: Literal["tabular", "text-stats"]
    columns: tuple[str, ...]
    values: npt.NDArray[Any]
    predictions: npt.NDArray[Any]  # empty: the file has none (no prediction drift)


def write_baseline(path: Path, baseline: Baseline) -> None:
    """Write `baseline` as a compressed npz that loads without pickle."""
    with path.open("wb") as fh:
        np.savez_compressed(
            fh,
            kind=np.array(baseline.kind),
            columns=np.array(baseline.columns, dtype=str),
            values=baseline.values,
            predictions=baseline.predictions,
        )


def read_baseline(path: Path) -> Baseline:
    """Read a baseline; pickled (object) arrays are refused, like any other pickle."""
    with np.load(path, allow_pickle=False) as data:
        missing = {"kind", "columns", "values"} - set(data.files)
        if missing:
            raise ValueError(f"{path.name} lacks arrays: {', '.join(sorted(missing))}")
        kind = str(data["kind"])
        if kind not in {"tabular", "text-stats"}:
            raise ValueError(f"{path.name}: unknown baseline kind {kind!r}")
        values = data["values"]
        columns = tuple(str(c) for c in data["columns"])
        if values.ndim != 2 or values.shape[1] != len(columns):
            raise ValueError(f"{path.name}: values shape {values.shape} does not match columns")
        return Baseline(
            kind="tabular" if kind == "tabular" else "text-stats",
            columns=columns,
            values=values,
            predictions=data["predictions"] if "predictions" in data.files else np.array([]),
        )
