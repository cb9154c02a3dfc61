"""Data drift monitoring: live inputs and predictions of each loaded version against
its training baseline.

Cost on the request path is one non-blocking queue put per answered request: the
event loop hands over references to the validated input rows and to the outputs it
answered with (`observe`) and moves on. A single `drift` thread does the rest: it
turns texts into text statistics and predictions into numbers, appends rows to each
version's ring buffers (the newest `window` rows), and every
`interval` seconds re-tests the versions that received rows (`drift_stats.compare_columns`),
updates the gauges and logs when a version starts or stops drifting. When the thread
falls behind, rows are dropped and counted rather than queued without bound: drift
is a statistical verdict, and a sample of the traffic serves it as well. The backlog
is bounded by rows and by bytes, not by requests: 256 requests of a text model can
hold gigabytes of text. Only the last `window` rows of a request are kept, as the
window would keep no more of them.

Below `min_window` live rows a version reports "not enough data" and no verdict:
small windows give nonsense verdicts (references.md). Logs and metrics carry feature
names and test statistics, never values (invariant 4); text models are watched
through text statistics (length, word count, character class shares and, when the
estimator has a fitted vocabulary and the baseline the column, the share of terms
outside it, measured with the model's own vocabulary in this thread), and their
baselines hold no training texts nor any token list.

Prediction drift: when the baseline stores `predictions` (the default output on the
baseline rows), the same output of live requests is one more feature, named
`<prediction: OUTPUT>` (`drift_stats.prediction_feature`). Class labels, strings and
booleans are categories (string classes become numbers in this thread: their rank
among the baseline's classes, one shared number for classes the baseline never
predicted); numeric outputs (regression, decision scores) are numbers, and a
two-column `predict_proba` output is compared on its second column (the positive
class's probability, as Evidently does for binary classification: named
`<prediction: OUTPUT[1]>`). Any other output (several values per row), a baseline
without predictions, or predictions that do not convert have no prediction row;
that is never an error. Requests that asked for other outputs only carry no default
output: their inputs are recorded, their predictions cannot be, so the prediction
window can be shorter than the input window, and below `min_window` predictions the
prediction row has no verdict (statistic NaN) while the inputs have one. The
prediction counts in the Bonferroni family (see drift_stats.py for why). Predicted
values, like inputs, never reach logs or metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.base import is_classifier

from hybridroute.node.drift_backlog import (
    BACKLOG_BYTES,
    BACKLOG_ROWS,
    Backlog,
    detached,
    footprint,
)
from hybridroute.node.drift_stats import (
    ALPHA,
    Column,
    FeatureResult,
    compare_columns,
    prediction_feature,
)
from hybridroute.node.loading import LoadedModel
from hybridroute.node.metrics import NodeMetrics
from hybridroute.node.modelconfig import (
    OOV_STATISTIC,
    Baseline,
    Vocabulary,
    read_baseline,
    text_statistics,
    text_vocabulary,
)

__all__ = ["DriftMonitor", "DriftStatus", "ModelDriftReport", "RingBuffer"]

log = logging.getLogger(__name__)

Floats = npt.NDArray[np.float64]
_Observed = tuple[str, int, Any, Mapping[str, Any] | None]  # name, version, rows, outputs
DriftStatus = str  # "ok" | "drift" | "not enough data" | "no baseline"
_UNSEEN = -1.0  # the number of every string class the baseline never predicted


class RingBuffer:
    """The newest `capacity` rows of a fixed width; appends are O(rows)."""

    def __init__(self, capacity: int, width: int) -> None:
        self._data = np.zeros((max(1, capacity), width), dtype=np.float64)
        self._next = 0
        self.count = 0

    @property
    def capacity(self) -> int:
        return len(self._data)

    @property
    def width(self) -> int:
        return int(self._data.shape[1])

    def append(self, rows: Floats) -> None:
        rows = rows[-self.capacity :]
        n = len(rows)
        end = self._next + n
        if end <= self.capacity:
            self._data[self._next : end] = rows
        else:
            split = self.capacity - self._next
            self._data[self._next :] = rows[:split]
            self._data[: n - split] = rows[split:]
        self._next = end % self.capacity
        self.count = min(self.capacity, self.count + n)

    def rows(self) -> Floats:
        """A copy of the held rows (order does not matter to the tests)."""
        return self._data[: self.count].copy()


@dataclass(frozen=True)
class ModelDriftReport:
    """A version's drift verdict at `evaluated_at` (see DriftResponse in node_admin.proto)."""

    model: str
    version: int
    status: DriftStatus
    drift: bool
    window: int
    window_size: int
    min_window: int
    reference_rows: int
    baseline_kind: str
    evaluated_at: float
    features: tuple[FeatureResult, ...] = ()
    dropped: int = 0


@dataclass(frozen=True)
class _Prediction:
    """How a version's predictions are compared: which output (and column of it),
    whether its values are categories, and its reference values as numbers."""

    output: str
    width: int  # values per row of the output: 1, or 2 for binary probabilities
    column: int
    categorical: bool
    codes: Mapping[str, float] | None  # string classes -> their numbers
    reference: Floats

    @property
    def feature(self) -> str:
        return prediction_feature(self.output, self.column if self.width > 1 else None)

    def numbers(self, values: Any) -> Floats | None:
        """`values` (the output's rows) as the numbers the tests compare; None when
        they do not have this output's shape or do not convert."""
        array = np.asarray(values)
        if array.ndim == 0 or not len(array):
            return None
        array = array.reshape(len(array), -1)
        if array.shape[1] != self.width:
            return None
        chosen = array[:, self.column]
        if self.codes is not None:
            codes = self.codes
            return np.array([codes.get(_text(v), _UNSEEN) for v in chosen.tolist()])
        try:
            return chosen.astype(np.float64)
        except (TypeError, ValueError):
            return None


def _prediction(model: LoadedModel, baseline: Baseline | None) -> _Prediction | None:
    """How to compare `model`'s default output with the baseline's predictions, or
    None when it cannot be (see the module docstring)."""
    config = model.config
    spec = config.output(config.default_outputs[0])
    if baseline is None or spec is None or not baseline.predictions.size:
        return None
    predictions = np.asarray(baseline.predictions)
    if predictions.ndim not in (1, 2) or len(predictions) == 0:
        return None
    width = 1 if predictions.ndim == 1 else predictions.shape[1]
    if width == 1:
        column = 0
    elif width == 2 and spec.method == "predict_proba":
        column = 1
    else:
        return None
    reference = predictions.reshape(len(predictions), width)[:, column]
    strings = spec.datatype == "BYTES" or reference.dtype.kind in "USO"
    classes = spec.method == "predict" and (
        config.classes is not None or _is_classifier(model.estimator)
    )
    codes = None
    if strings:
        names = sorted({_text(v) for v in reference.tolist()})
        codes = {name: float(i) for i, name in enumerate(names)}
    prediction = _Prediction(
        output=spec.name,
        width=width,
        column=column,
        categorical=strings or classes or reference.dtype.kind == "b",
        codes=codes,
        reference=np.zeros(0),
    )
    numbers = prediction.numbers(predictions)
    if numbers is None:
        return None
    return dataclasses.replace(prediction, reference=numbers)


def _is_classifier(estimator: Any) -> bool:
    try:
        return bool(is_classifier(estimator))
    except Exception:  # an estimator without scikit-learn's tags: not known to be one
        return False


@dataclass
class _Tracked:
    """A monitored version: its reference rows, live window and last verdict."""

    name: str
    version: int
    text: bool
    baseline: Baseline | None
    window: RingBuffer
    vocabulary: Vocabulary | None = None  # for the OOV column, when the baseline has it
    prediction: _Prediction | None = None  # None: no prediction row
    predicted: RingBuffer = field(default_factory=lambda: RingBuffer(1, 1))
    fresh: bool = False  # rows arrived since the last evaluation
    drifting: bool = False
    dropped: int = 0
    labels: set[tuple[str, str]] = field(default_factory=set)  # (feature, test) in gauges


class DriftMonitor:
    """Keeps live windows per model version and tests them (see the module docstring)."""

    def __init__(
        self,
        metrics: NodeMetrics | None = None,
        *,
        window: int = 1000,
        min_window: int = 100,
        interval: float = 30.0,
        alpha: float = ALPHA,
        backlog_rows: int = BACKLOG_ROWS,
        backlog_bytes: int = BACKLOG_BYTES,
    ) -> None:
        if min_window < 1 or window < min_window:
            raise ValueError(f"need 1 <= min_window <= window, got {min_window} and {window}")
        self.window_size = window
        self.min_window = min_window
        self.interval = interval
        self.alpha = alpha
        self._metrics = metrics
        self._tracked: dict[tuple[str, int], _Tracked] = {}
        self._lock = threading.RLock()
        self._backlog: Backlog[_Observed] = Backlog(backlog_rows, backlog_bytes)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ registration

    def track(self, model: LoadedModel) -> None:
        """Start (or restart, on a reload) a version's window against its baseline."""
        config = model.config
        baseline = None
        if config.baseline is not None:
            try:
                baseline = read_baseline(model.path / config.baseline)
            except Exception as exc:  # loading checked it; a vanished file must not crash us
                log.warning(
                    "model %s: drift baseline unreadable (%s)", model.label, type(exc).__name__
                )
        width = len(baseline.columns) if baseline is not None else 1
        text = config.input.datatype == "BYTES"
        vocabulary = None
        if text and baseline is not None and OOV_STATISTIC in baseline.columns:
            vocabulary = text_vocabulary(model.estimator)
        tracked = _Tracked(
            config.name,
            config.version,
            text=text,
            baseline=baseline,
            window=RingBuffer(self.window_size, width),
            vocabulary=vocabulary,
            prediction=_prediction(model, baseline),
            predicted=RingBuffer(self.window_size, 1),
        )
        with self._lock:
            old = self._tracked.pop((config.name, config.version), None)
            if old is not None:
                self._clear_metrics(old)
            self._tracked[(config.name, config.version)] = tracked
        self._publish_window(tracked)

    def forget(self, name: str, version: int) -> None:
        """Stop watching a version (unloaded) and drop its gauges."""
        with self._lock:
            tracked = self._tracked.pop((name, version), None)
            if tracked is not None:
                self._clear_metrics(tracked)

    # --------------------------------------------------------------- recording

    def observe(
        self, name: str, version: int, rows: Any, outputs: Mapping[str, Any] | None = None
    ) -> None:
        """Hand over one request's validated input rows and the outputs it was answered
        with (name -> rows); never blocks, never computes more than the request's size."""
        count = len(rows)
        if count > self.window_size:  # the window would keep no more of them
            rows = rows[-self.window_size :]
            if outputs is not None:
                outputs = {k: v[-self.window_size :] for k, v in outputs.items()}
        # A slice is a view that keeps the whole array alive while `footprint` counts
        # only the slice: the rows cut above, and each caller's outputs (a slice of its
        # batch's). Such views are copied, so what is counted is what is held.
        rows = detached(rows)
        if outputs is not None:
            outputs = {k: detached(v) for k, v in outputs.items()}
        item = (name, version, rows, outputs)
        if not self._backlog.put(item, len(rows), footprint(rows, outputs)):
            with self._lock:
                tracked = self._tracked.get((name, version))
                if tracked is not None:
                    tracked.dropped += count

    @property
    def backlog(self) -> tuple[int, int, int]:
        """Requests, rows and (about) bytes waiting for the recorder."""
        return len(self._backlog), self._backlog.rows, self._backlog.bytes

    def flush(self) -> None:
        """Record everything queued so far (the thread does this continuously)."""
        while (item := self._backlog.get()) is not None:
            self._record(*item)

    def _record(
        self, name: str, version: int, rows: Any, outputs: Mapping[str, Any] | None = None
    ) -> None:
        with self._lock:
            tracked = self._tracked.get((name, version))
        if tracked is None or tracked.baseline is None:
            return
        prediction = tracked.prediction
        if prediction is not None and outputs is not None and prediction.output in outputs:
            predicted = prediction.numbers(outputs[prediction.output])
            if predicted is not None and len(predicted) == len(rows):
                with self._lock:
                    tracked.predicted.append(predicted.reshape(-1, 1))
                    tracked.fresh = True
        if tracked.text:
            texts = [_text(item) for item in np.asarray(rows, dtype=object).ravel()]
            values = text_statistics(texts, tracked.vocabulary)
        else:
            values = np.asarray(rows, dtype=np.float64).reshape(len(rows), -1)
        if values.shape[1] != tracked.window.width:
            return  # the baseline does not describe this input; nothing to compare
        with self._lock:
            tracked.window.append(values)
            tracked.fresh = True

    # --------------------------------------------------------------- verdicts

    def report(self, model: str = "", version: int | None = None) -> list[ModelDriftReport]:
        """Test the matching versions now (after recording what is queued)."""
        self.flush()
        with self._lock:
            chosen = [
                t
                for key, t in sorted(self._tracked.items())
                if (not model or key[0] == model) and (version is None or key[1] == version)
            ]
        return [self._evaluate(t) for t in chosen]

    def _evaluate(self, tracked: _Tracked) -> ModelDriftReport:
        with self._lock:
            current = tracked.window.rows()
            predicted = tracked.predicted.rows()[:, 0]
            tracked.fresh = False
        report = self._verdict(tracked, current, predicted)
        with self._lock:
            if self._tracked.get((tracked.name, tracked.version)) is tracked:
                self._publish(tracked, report)
                self._log_transition(tracked, report)
        return report

    def _verdict(self, tracked: _Tracked, current: Floats, predicted: Floats) -> ModelDriftReport:
        baseline = tracked.baseline
        common: dict[str, Any] = {
            "model": tracked.name,
            "version": tracked.version,
            "window": len(current),
            "window_size": self.window_size,
            "min_window": self.min_window,
            "evaluated_at": time.time(),
            "dropped": tracked.dropped,
        }
        if baseline is None:
            return ModelDriftReport(
                status="no baseline", drift=False, reference_rows=0, baseline_kind="", **common
            )
        reference = np.asarray(baseline.values, dtype=np.float64)
        common |= {"reference_rows": len(reference), "baseline_kind": baseline.kind}
        enough = len(current) >= self.min_window
        columns = [
            Column(name, reference[:, i], current[:, i] if enough else None)
            for i, name in enumerate(baseline.columns)
        ]
        prediction = tracked.prediction
        if prediction is not None:
            scored = enough and len(predicted) >= self.min_window
            columns.append(
                Column(
                    prediction.feature,
                    prediction.reference,
                    predicted if scored else None,
                    categorical=prediction.categorical,
                )
            )
        features = compare_columns(columns, alpha=self.alpha)
        if not enough:
            return ModelDriftReport(
                status="not enough data", drift=False, features=tuple(features), **common
            )
        drift = any(f.drift for f in features)
        return ModelDriftReport(
            status="drift" if drift else "ok", drift=drift, features=tuple(features), **common
        )

    def _log_transition(self, tracked: _Tracked, report: ModelDriftReport) -> None:
        if report.drift and not tracked.drifting:
            shifted = ", ".join(_describe(f) for f in report.features if f.drift)
            log.warning(
                "drift detected in %s/%s over %d live rows: %s",
                tracked.name,
                tracked.version,
                report.window,
                shifted,
            )
        elif tracked.drifting and not report.drift and report.status == "ok":
            log.info(
                "drift cleared in %s/%s over %d live rows",
                tracked.name,
                tracked.version,
                report.window,
            )
        if report.status in {"ok", "drift"}:
            tracked.drifting = report.drift

    # ---------------------------------------------------------------- metrics

    def _publish_window(self, tracked: _Tracked) -> None:
        if self._metrics is not None:
            labels = (tracked.name, str(tracked.version))
            self._metrics.drift_window.labels(*labels).set(tracked.window.count)
            self._metrics.drift_model.labels(*labels).set(0)

    def _publish(self, tracked: _Tracked, report: ModelDriftReport) -> None:
        metrics = self._metrics
        if metrics is None:
            return
        name, version = tracked.name, str(tracked.version)
        metrics.drift_window.labels(name, version).set(report.window)
        metrics.drift_model.labels(name, version).set(int(report.drift))
        scored = {(f.feature, f.test): f for f in report.features if not math.isnan(f.statistic)}
        for feature, test in tracked.labels - set(scored):
            _remove(metrics, name, version, feature, test)
        for (feature, test), result in scored.items():
            metrics.drift_statistic.labels(name, version, feature, test).set(result.statistic)
            metrics.drift_detected.labels(name, version, feature, test).set(int(result.drift))
        tracked.labels = set(scored)

    def _clear_metrics(self, tracked: _Tracked) -> None:
        metrics = self._metrics
        if metrics is None:
            return
        name, version = tracked.name, str(tracked.version)
        for feature, test in tracked.labels:
            _remove(metrics, name, version, feature, test)
        for gauge in (metrics.drift_window, metrics.drift_model):
            with contextlib.suppress(KeyError):
                gauge.remove(name, version)

    # ----------------------------------------------------------------- thread

    def start(self) -> None:
        """Record and evaluate in a background thread until `stop`."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="drift", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _run(self) -> None:
        due = time.monotonic() + self.interval
        while not self._stop.is_set():
            item = self._backlog.get(timeout=max(0.01, min(0.5, due - time.monotonic())))
            if item is not None:
                self._record(*item)
            if time.monotonic() >= due:
                self._evaluate_fresh()
                due = time.monotonic() + self.interval

    def _evaluate_fresh(self) -> None:
        with self._lock:
            fresh = [t for t in self._tracked.values() if t.fresh]
        for tracked in fresh:
            try:
                self._evaluate(tracked)
            except Exception as exc:  # one odd window must not stop monitoring the rest
                # Type only: the message of a failure over live inputs may quote them.
                log.error(
                    "drift evaluation of %s/%s failed (%s)",
                    tracked.name,
                    tracked.version,
                    type(exc).__name__,
                )


def _remove(metrics: NodeMetrics, name: str, version: str, feature: str, test: str) -> None:
    for gauge in (metrics.drift_statistic, metrics.drift_detected):
        with contextlib.suppress(KeyError):
            gauge.remove(name, version, feature, test)


def _describe(result: FeatureResult) -> str:
    sign = "<" if result.score_kind == "p_value" else ">="
    what = "p" if result.score_kind == "p_value" else "distance"
    score, threshold = f"{result.statistic:.3g}", f"{result.threshold:.3g}"
    return f"{result.feature} ({result.test} {what}={score} {sign} {threshold})"


def _text(item: Any) -> str:
    if isinstance(item, bytes | bytearray | memoryview):
        return bytes(item).decode("utf-8", errors="replace")
    return str(item)
