"""Safe loading of one model version, and running it on a batch.

Loading a model file is running its author's code unless the format prevents it. skops
files are therefore loaded only with an explicit, reviewed list of `trusted_types`
from `model.yaml`, checked before anything is constructed; pickle and joblib files are
loaded only when `model.yaml` opts in with `allow_unsafe_pickle: true`, and then with a
WARNING. Every failure becomes a `ModelLoadError` whose message says which version and
why, so a repository scan can mark the version UNAVAILABLE with a readable reason.

After loading, each declared output is run once on a tiny input (baseline rows, or a
neutral text) so that a model whose outputs cannot be produced or converted to the
declared datatype and shape fails at load time, not on every request.

Error messages never contain input values: inputs may be sensitive (see the security
invariants), so estimator errors are reported by exception type only.
"""

from __future__ import annotations

import logging
import pickle
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import numpy.typing as npt
import skops.io as sio

from hybridroute.config import ConfigError, load_model
from hybridroute.node.modelconfig import (
    CONFIG_FILE,
    Baseline,
    ModelConfig,
    OutputSpec,
    numpy_dtype,
    read_baseline,
)
from hybridroute.protos.tensors import quoted

__all__ = [
    "InputDecodeError",
    "InvalidRequestError",
    "LoadedModel",
    "ModelLoadError",
    "ModelRuntimeError",
    "allows_nan",
    "decode_texts",
    "load_estimator",
    "load_estimator_file",
    "load_version",
    "untrusted_types",
]

log = logging.getLogger(__name__)

# An estimator fitted on a DataFrame remembers its column names, and scikit-learn warns
# on every call given an array. The node always calls with an array, in the column
# order packaging checked against `feature_names_in_` (packaging refuses any other), so
# the warning says nothing new, once per request: filtered for the whole process.
warnings.filterwarnings(
    "ignore", message="X does not have valid feature names", category=UserWarning
)

_SMOKE_TEXTS = ("hybridroute load check", "")
_SMOKE_ROWS = 4


class ModelLoadError(Exception):
    """A model version cannot be loaded; the message names the version and the reason."""


class InvalidRequestError(ValueError):
    """The request does not fit the model (unknown output, wrong shape): the caller's fault."""


class InputDecodeError(InvalidRequestError):
    """A BYTES input element is not valid UTF-8."""


class ModelRuntimeError(RuntimeError):
    """The estimator failed or produced something that does not match `model.yaml`."""


Array = npt.NDArray[Any]


@dataclass
class LoadedModel:
    """A loaded estimator with its configuration.

    `run` keeps all its state in local variables and only calls the estimator's
    inference methods, which do not modify a fitted scikit-learn estimator, so it may be
    called from several threads at once.
    """

    config: ModelConfig
    estimator: Any
    path: Path
    label: str = field(default="")
    # Whether the estimator takes NaN (a missing value) in its input: trees and
    # histogram gradient boosting do, linear models do not. Requests with NaN for a
    # model that does not are refused before they are queued (dataplane.py). Set here
    # from the estimator's tags; `load_version` then asks the estimator itself when
    # the tags say no (`_probe_nan`).
    allows_nan: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        if not self.label:
            self.label = f"{self.config.name}/{self.config.version}"
        self.allows_nan = allows_nan(self.estimator)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def version(self) -> int:
        return self.config.version

    def run(self, x: Array, outputs: Sequence[str] = ()) -> dict[str, Array]:
        """Run the estimator on the batch `x`; return the requested outputs (the default
        ones if `outputs` is empty), each with len(x) rows in its declared datatype."""
        specs = self._requested(outputs)
        features = self._prepare(x)
        n = len(features)
        results: dict[str, Array] = {}
        by_method: dict[str, Array] = {}
        for spec in specs:
            if spec.method not in by_method:
                by_method[spec.method] = self._call(spec.method, features)
            results[spec.name] = self._convert(by_method[spec.method], spec, n)
        return results

    def _requested(self, outputs: Sequence[str]) -> list[OutputSpec]:
        names = list(outputs) or list(self.config.default_outputs)
        specs = []
        for name in names:
            spec = self.config.output(name)
            if spec is None:
                known = ", ".join(o.name for o in self.config.outputs)
                raise InvalidRequestError(
                    f"model {self.label} has no output {name!r} (outputs: {known})"
                )
            specs.append(spec)
        return specs

    def _prepare(self, x: Array) -> Any:
        spec = self.config.input
        x = np.asarray(x)
        if spec.datatype == "BYTES":
            if x.ndim != 1:
                raise InvalidRequestError(
                    f"input {spec.name!r} must have shape [-1], got {list(x.shape)}"
                )
            texts = decode_texts(x, spec.name)
            if not texts.size:
                raise InvalidRequestError(f"input {spec.name!r} has no rows")
            return texts
        if x.ndim != 2 or x.shape[1] != spec.shape[1]:
            raise InvalidRequestError(
                f"input {spec.name!r} must have shape {list(spec.shape)}, got {list(x.shape)}"
            )
        if not len(x):
            raise InvalidRequestError(f"input {spec.name!r} has no rows")
        return x

    def _call(self, method: str, features: Any) -> Any:
        try:
            return getattr(self.estimator, method)(features)
        except Exception as exc:
            # The exception text may quote input values; report the type only.
            raise ModelRuntimeError(
                f"model {self.label}: {method} failed ({type(exc).__name__}); "
                "the input does not suit the estimator"
            ) from exc

    def _convert(self, result: Any, spec: OutputSpec, n: int) -> Array:
        if hasattr(result, "toarray"):  # scipy sparse, e.g. from transform
            result = result.toarray()
        array = np.asarray(result)
        if (
            array.ndim != len(spec.shape)
            or array.shape[0] != n
            or any(
                want not in (-1, got)
                for want, got in zip(spec.shape[1:], array.shape[1:], strict=True)
            )
        ):
            raise ModelRuntimeError(
                f"model {self.label}: {spec.method} returned shape {list(array.shape)} for "
                f"{n} rows; output {spec.name!r} declares {list(spec.shape)}"
            )
        if spec.datatype == "BYTES":
            out = np.empty(array.size, dtype=object)
            out[:] = [_to_bytes(v) for v in array.ravel().tolist()]
            return out.reshape(array.shape)
        try:
            return array.astype(numpy_dtype(spec.datatype))
        except (TypeError, ValueError) as exc:
            raise ModelRuntimeError(
                f"model {self.label}: {spec.method} returned {array.dtype} values that do not "
                f"convert to output {spec.name!r} datatype {spec.datatype}"
            ) from exc


def _to_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8")


def allows_nan(estimator: Any) -> bool:
    """Whether `estimator` accepts NaN in X, from scikit-learn's estimator tags.

    A Pipeline's own tag always says no (scikit-learn does not derive it from the
    steps), which would refuse the missing values an imputer in it fills in. So its
    steps are read in order: NaN is accepted if every step up to and including the
    first imputer accepts it (the imputer removes it), or every step does.

    This is the fast path only, trusted when it says yes. Tags cannot see an imputer
    inside a ColumnTransformer, a FeatureUnion or a search or calibration wrapper, nor
    after a FunctionTransformer; for a loaded model the estimator is asked instead
    (`_probe_nan`, from `load_version`)."""
    from sklearn.pipeline import Pipeline

    if isinstance(estimator, Pipeline):
        for _, step in estimator.steps:
            if step is None or (isinstance(step, str) and step == "passthrough"):
                continue
            if not allows_nan(step):
                return False
            if type(step).__module__.startswith("sklearn.impute"):
                return True
        return True
    try:
        return _nan_tag(estimator)
    except Exception:
        return False  # not known to take NaN: refusing it beats failing in predict


def _nan_tag(estimator: Any) -> bool:
    if hasattr(estimator, "__sklearn_tags__"):  # scikit-learn >= 1.6
        return bool(estimator.__sklearn_tags__().input_tags.allow_nan)
    return bool(estimator._get_tags().get("allow_nan", False))  # scikit-learn 1.5


def decode_texts(x: Array, input_name: str) -> Array:
    """BYTES elements -> str (an object array), as text estimators expect."""
    texts: list[str] = []
    for i, item in enumerate(x.tolist()):
        if isinstance(item, str):
            texts.append(item)
            continue
        if not isinstance(item, bytes | bytearray | memoryview):
            raise InvalidRequestError(
                f"input {input_name!r} element {i} is {type(item).__name__}, not bytes"
            )
        try:
            texts.append(bytes(item).decode("utf-8"))
        except UnicodeDecodeError:
            raise InputDecodeError(
                f"input {quoted(input_name)} element {i} is not valid UTF-8 text"
            ) from None
    out = np.empty(len(texts), dtype=object)
    out[:] = texts
    return out


# ---------------------------------------------------------------------------- loading


def untrusted_types(path: Path) -> list[str]:
    """The types in a skops file that skops does not trust by default (sorted)."""
    return sorted(sio.get_untrusted_types(file=path))


def load_estimator(path: Path, config: ModelConfig, label: str) -> Any:
    """Load the estimator file of `config` under its safety rules (see module doc)."""
    return load_estimator_file(
        path,
        format=config.format,
        trusted_types=tuple(config.trusted_types or ()),
        allow_unsafe_pickle=config.allow_unsafe_pickle,
        label=label,
    )


def load_estimator_file(
    path: Path,
    *,
    format: str,
    trusted_types: Sequence[str] = (),
    allow_unsafe_pickle: bool = False,
    label: str = "",
) -> Any:
    """Load an estimator file: skops with `trusted_types` only; pickle and joblib only
    with `allow_unsafe_pickle` (logged at WARNING). Raises ModelLoadError."""
    label = label or path.name
    if not path.is_file():
        raise ModelLoadError(f"{label}: estimator file {path.name} not found")
    if format == "skops":
        return _load_skops(path, tuple(trusted_types), label)
    if format not in {"pickle", "joblib"}:
        raise ModelLoadError(f"{label}: unknown model file format {format!r}")
    if not allow_unsafe_pickle:
        raise ModelLoadError(
            f"{label}: {path.name} is a {format} file, and loading it can run arbitrary "
            "code; convert it with `hybridroute models package` (skops), or set "
            "`allow_unsafe_pickle: true` in model.yaml if you trust its origin"
        )
    log.warning(
        "model %s: loading %s file %s with allow_unsafe_pickle: this runs any code it contains",
        label,
        format,
        path.name,
    )
    try:
        if format == "joblib":
            return joblib.load(path)
        with path.open("rb") as fh:
            return pickle.load(fh)  # noqa: S301 -- explicit opt-in, warned above
    except Exception as exc:
        raise ModelLoadError(f"{label}: cannot load {path.name}: {_describe(exc)}") from exc


def _load_skops(path: Path, trusted: tuple[str, ...], label: str) -> Any:
    try:
        found = untrusted_types(path)
    except Exception as exc:
        raise ModelLoadError(
            f"{label}: {path.name} is not a readable skops file: {_describe(exc)}"
        ) from exc
    refused = [t for t in found if t not in trusted]
    if refused:
        raise ModelLoadError(
            f"{label}: {path.name} contains types not listed in trusted_types: "
            f"{', '.join(refused)} (review them, then add them to trusted_types in model.yaml)"
        )
    try:
        return sio.load(path, trusted=list(trusted))
    except Exception as exc:
        raise ModelLoadError(f"{label}: cannot load {path.name}: {_describe(exc)}") from exc


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def load_version(version_dir: Path, *, check_location: bool = True) -> LoadedModel:
    """Load `version_dir` (holding model.yaml) into a `LoadedModel`.

    With `check_location`, the directory must be `<name>/<version>` as declared in
    model.yaml, so a copied directory cannot serve under another model's name.
    Raises `ModelLoadError` for every problem.
    """
    version_dir = Path(version_dir)
    label = f"{version_dir.parent.name}/{version_dir.name}"
    try:
        config = load_model(version_dir / CONFIG_FILE, ModelConfig)
    except ConfigError as exc:
        raise ModelLoadError(f"{label}: invalid {CONFIG_FILE}: {exc}") from None
    if check_location:
        _check_location(config, version_dir, label)
    else:
        label = f"{config.name}/{config.version}"
    estimator = load_estimator(version_dir / config.file, config, label)
    _check_methods(estimator, config, label)
    model = LoadedModel(config=config, estimator=estimator, path=version_dir, label=label)
    _smoke_test(model)
    if not model.allows_nan:
        model.allows_nan = _probe_nan(model)
    return model


def _check_location(config: ModelConfig, version_dir: Path, label: str) -> None:
    if config.name != version_dir.parent.name or str(config.version) != version_dir.name:
        raise ModelLoadError(
            f"{label}: {CONFIG_FILE} declares {config.name}/{config.version}, "
            f"but the directory is {label}"
        )


def _check_methods(estimator: Any, config: ModelConfig, label: str) -> None:
    for spec in config.outputs:
        if not callable(getattr(estimator, spec.method, None)):
            raise ModelLoadError(
                f"{label}: output {spec.name!r} needs method {spec.method}, which "
                f"{type(estimator).__name__} does not provide"
            )


def _smoke_test(model: LoadedModel) -> None:
    """Produce every output once on a tiny input; turn any failure into ModelLoadError."""
    x = _smoke_input(model)
    try:
        model.run(x, [o.name for o in model.config.outputs])
    except (ModelRuntimeError, InvalidRequestError) as exc:
        raise ModelLoadError(f"{model.label}: load check failed: {exc}") from exc


def _probe_nan(model: LoadedModel) -> bool:
    """Whether the model computes every declared output for one row of NaN in its
    declared shape and datatype (float inputs only: no other datatype holds NaN).

    Asked once at load when the tags say no (see `allows_nan`): what the estimator
    does is the answer. Any exception means no, and never fails the load: NaN is then
    refused before it is queued, as before. Only the exception's type is logged; the
    row is synthetic, and no request value is involved."""
    spec = model.config.input
    if spec.datatype == "BYTES" or numpy_dtype(spec.datatype).kind != "f":
        return False
    row = np.full((1, spec.shape[1]), np.nan, dtype=numpy_dtype(spec.datatype))
    try:
        with np.errstate(all="ignore"):
            model.run(row, [o.name for o in model.config.outputs])
    except Exception as exc:
        cause = exc.__cause__ if isinstance(exc, ModelRuntimeError) and exc.__cause__ else exc
        log.debug("model %s: refuses NaN (a row of NaN: %s)", model.label, type(cause).__name__)
        return False
    log.info(
        "model %s: takes NaN (its estimator computed a row of NaN, though its tags say not)",
        model.label,
    )
    return True


def _smoke_input(model: LoadedModel) -> Array:
    """Baseline rows if there are any, else a neutral input of the declared shape."""
    config = model.config
    spec = config.input
    if spec.datatype == "BYTES":
        texts = np.empty(len(_SMOKE_TEXTS), dtype=object)
        texts[:] = [t.encode() for t in _SMOKE_TEXTS]
        if config.baseline is not None:
            _read_baseline(model)  # not used here, but a declared baseline must be readable
        return texts
    dtype = numpy_dtype(spec.datatype)
    if config.baseline is not None:
        values = _read_baseline(model).values
        if len(values) and values.shape[1] == spec.shape[1]:
            return values[:_SMOKE_ROWS].astype(dtype)
    return np.zeros((2, spec.shape[1]), dtype=dtype)


def _read_baseline(model: LoadedModel) -> Baseline:
    name = model.config.baseline or ""
    try:
        return read_baseline(model.path / name)
    except FileNotFoundError:
        raise ModelLoadError(f"{model.label}: baseline file {name} not found") from None
    except Exception as exc:
        raise ModelLoadError(
            f"{model.label}: baseline {name} is unreadable: {_describe(exc)}"
        ) from exc
