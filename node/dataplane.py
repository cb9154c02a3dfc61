"""The node's data plane: validate a request against its model, batch it, run it.

Knows numpy arrays and model declarations, not protobuf; `node/servicer.py` converts
at the edge. Every validation error says which tensor, what was expected and what came.

A request is checked twice. `check_inputs` needs only what the request declares (names,
datatypes, shapes), so the servicer runs it before decoding anything: a request the
model would refuse anyway, such as one with more rows than its `max_batch_size`, costs
nothing to decode. `validate` runs it again on the decoded tensors, because the model
may have been reloaded (with other limits) while the request was decoded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, ParamSpec, Protocol, TypeVar

import numpy as np

from hybridroute.node.batching import Batcher
from hybridroute.node.loading import LoadedModel, decode_texts
from hybridroute.node.metrics import NodeMetrics
from hybridroute.node.repository import ModelRepository
from hybridroute.protos.tensors import DATATYPES, InputTensor, quoted, shape_text

__all__ = [
    "BatchingDefaults",
    "DataPlane",
    "InferResult",
    "InputObserver",
    "InvalidRequest",
    "TensorHeader",
]

Array = np.ndarray[Any, Any]
P = ParamSpec("P")
T = TypeVar("T")


class InvalidRequest(ValueError):
    """The request does not fit the model's declared inputs or outputs."""


@dataclass(frozen=True, slots=True)
class BatchingDefaults:
    """Node-wide batching settings; a model's `batching:` in model.yaml overrides them."""

    max_batch_size: int = 32
    max_queue_delay_ms: float = 0.0
    adaptive_wait_ms: float = 2.0
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class InferResult:
    model_name: str
    model_version: str
    outputs: list[tuple[str, str, Array]]  # (name, datatype, array)


class TensorHeader(Protocol):
    """What a request says about an input besides its data: a protobuf input tensor
    before decoding, an `InputTensor` after."""

    @property
    def name(self) -> str: ...

    @property
    def datatype(self) -> str: ...

    @property
    def shape(self) -> Sequence[int]: ...


def _datatype_text(datatype: str) -> str:
    """A request's datatype for a message: as is if it is one, else quoted and cut short."""
    return datatype if datatype in DATATYPES or datatype == "BF16" else quoted(datatype)


def _check_shape(name: str, declared: Sequence[int], got: Sequence[int]) -> None:
    if any(g < 0 for g in got):
        raise InvalidRequest(
            f"tensor {quoted(name)}: shape {shape_text(got)} has a negative dimension"
        )
    ok = len(declared) == len(got) and all(d in (-1, g) for d, g in zip(declared, got, strict=True))
    if not ok:
        raise InvalidRequest(
            f"tensor {quoted(name)}: shape {shape_text(got)} does not match the model's "
            f"{list(declared)} (-1 = any size)"
        )


def _check_rows(name: str, shape: Sequence[int], limit: int, model: str) -> None:
    """1 to `limit` rows. A zero-row request is refused here, before it is queued: in
    the batcher it would fail alone but pass (with empty outputs) inside a batch."""
    rows = shape[0]
    if rows == 0:
        raise InvalidRequest(
            f"tensor {quoted(name)}: shape {shape_text(shape)} has no rows; send 1 to {limit}"
        )
    if rows > limit:
        raise InvalidRequest(
            f"tensor {quoted(name)}: shape {shape_text(shape)} has {rows} rows; model '{model}' "
            f"takes at most {limit} per request (its max_batch_size): split the request"
        )


def _check_values(name: str, rows: Array, model: LoadedModel) -> None:
    """Infinite values are refused as the caller's mistake, and so is NaN (a missing
    value) for a model whose estimator does not take it (trees and histogram gradient
    boosting do; linear models do not). scikit-learn would raise a ValueError inside
    predict, answered INTERNAL, and in a batch it would fail every other caller's rows
    with it until the batch is re-run request by request."""
    if rows.dtype.kind != "f":
        return
    infinite = _first(np.isinf(rows))
    if infinite is not None:
        raise InvalidRequest(
            f"tensor {quoted(name)}: values must be finite; element {infinite} is infinite"
        )
    missing = None if model.allows_nan else _first(np.isnan(rows))
    if missing is not None:
        raise InvalidRequest(
            f"tensor {quoted(name)}: element {missing} is NaN; model "
            f"'{model.config.name}' does not take missing values (its estimator refuses NaN)"
        )


def _first(mask: Array) -> list[int] | None:
    """The index of the first true element of `mask`, or None when there is none."""
    if not mask.any():
        return None
    return [int(i) for i in np.unravel_index(int(np.argmax(mask)), mask.shape)]


class InputObserver(Protocol):
    """Sees the validated input rows and the outputs of each answered request (drift
    monitoring). Called on the event loop, so it must only hand them over, never compute."""

    def observe(
        self, name: str, version: int, rows: Array, outputs: Mapping[str, Array]
    ) -> None: ...


class DataPlane:
    """Shared by the gRPC servicer (and later REST): one batcher per loaded model version.

    A batcher belongs to one `LoadedModel` object. When a version is reloaded or
    unloaded, `retire` detaches its batcher and drains it: requests already queued on
    the old model finish on it, and the next request finds the new model (or none)
    in the repository and gets a new batcher. Looking the model up and queueing the
    request happen without an `await` in between, so no request can pick the old
    model after it was swapped out and then queue on a batcher nobody drains.
    """

    def __init__(
        self,
        repository: ModelRepository,
        *,
        executor: Executor,
        metrics: NodeMetrics,
        batching: BatchingDefaults = BatchingDefaults(),
        observer: InputObserver | None = None,
    ) -> None:
        self.repository = repository
        self._executor = executor
        self._metrics = metrics
        self._batching = batching
        self._observer = observer
        self._batchers: dict[tuple[str, int], tuple[LoadedModel, Batcher]] = {}
        self._retiring: set[asyncio.Task[None]] = set()

    async def offload(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `fn` on the estimator threads, for work too big for the event loop
        (decoding a large request, encoding a large answer)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def _batcher(self, model: LoadedModel) -> Batcher:
        key = (model.config.name, model.config.version)
        current = self._batchers.get(key)
        if current is not None and current[0] is model:
            return current[1]
        if current is not None:  # a reload swapped the model without retire(): drain the old
            self._drain_later(current[1], None)
        batcher = self._new_batcher(model)
        self._batchers[key] = (model, batcher)
        return batcher

    def row_limit(self, model: LoadedModel) -> int:
        """Rows one request may carry: the model's max_batch_size (model.yaml, else the
        node's default), as in Triton. It holds with batching switched off too: it
        bounds what one request costs to decode and compute, not how requests merge."""
        settings = model.config.batching
        return settings.max_batch_size if settings else self._batching.max_batch_size

    def _new_batcher(self, model: LoadedModel) -> Batcher:
        settings = model.config.batching
        size = self.row_limit(model)
        delay = settings.max_queue_delay_ms if settings else self._batching.max_queue_delay_ms
        if not self._batching.enabled:
            size, delay = 1, 0.0
        labels = (model.config.name, str(model.config.version))
        batcher = Batcher(
            model.run,
            executor=self._executor,
            max_batch_size=size,
            max_queue_delay=delay / 1000.0,
            adaptive_wait=self._batching.adaptive_wait_ms / 1000.0 if size > 1 else 0.0,
            on_batch=self._metrics.batch_size.labels(*labels).observe,
            name=f"{labels[0]}/{labels[1]}",
        )
        self._metrics.queue_depth.labels(*labels).set_function(lambda: batcher.queue_depth)
        return batcher

    def _drain_later(self, batcher: Batcher, key: tuple[str, int] | None) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self._drain(batcher, key))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return task

    async def _drain(self, batcher: Batcher, key: tuple[str, int] | None) -> None:
        await batcher.close()
        # After a reload, requests for the new model get a new batcher under the same
        # key while the old one drains; its queue-depth gauge carries the same labels,
        # so they are removed only if no batcher serves `key` any more.
        if key is not None and key not in self._batchers:
            with contextlib.suppress(KeyError):
                self._metrics.queue_depth.remove(key[0], str(key[1]))

    async def retire(self, name: str, version: int) -> None:
        """Detach the batcher of `name`/`version` and wait until its queued requests are
        answered (call after the repository stopped handing out that model).

        The drain runs in a task of its own: a caller cancelled while waiting (an admin
        call past its deadline) stops waiting, and the queued requests are still
        answered and the gauges still cleaned up."""
        current = self._batchers.pop((name, version), None)
        if current is not None:
            await asyncio.shield(self._drain_later(current[1], (name, version)))

    def check_inputs(self, model: LoadedModel, tensors: Sequence[TensorHeader]) -> None:
        """Check the inputs' names, datatypes, shapes and row counts against `model`,
        from the declarations alone (see the module docstring)."""
        declared = model.config.inputs[0]
        if len(tensors) != 1 or tensors[0].name != declared.name:
            got = ", ".join(quoted(t.name) for t in tensors[:8]) or "none"
            if len(tensors) > 8:
                got += f", ... ({len(tensors)} inputs)"
            raise InvalidRequest(
                f"model '{model.config.name}' takes one input '{declared.name}' "
                f"({declared.datatype} {list(declared.shape)}), got {got}"
            )
        tensor = tensors[0]
        if tensor.datatype != declared.datatype:
            raise InvalidRequest(
                f"tensor {quoted(tensor.name)}: datatype {_datatype_text(tensor.datatype)}, "
                f"expected {declared.datatype}"
            )
        _check_shape(tensor.name, declared.shape, tensor.shape)
        _check_rows(tensor.name, tensor.shape, self.row_limit(model), model.config.name)

    def decode_texts(self, model: LoadedModel, inputs: Sequence[InputTensor]) -> list[InputTensor]:
        """`inputs` with the BYTES elements of a text model decoded to str, refused as
        INVALID_ARGUMENT (naming the tensor and element) if one is not UTF-8. Done as
        the request is decoded, before it is queued: in a batch, one caller's bad text
        would fail the estimator call of every caller in it. (The servicer runs this
        off the event loop for large requests, as it does the tensor decoding.)"""
        if model.config.inputs[0].datatype != "BYTES":
            return list(inputs)
        decoded: list[InputTensor] = []
        for tensor in inputs:
            if tensor.datatype == "BYTES" and tensor.array.dtype == object:
                flat = decode_texts(tensor.array.reshape(-1), tensor.name)
                tensor = dataclasses.replace(tensor, array=flat.reshape(tensor.array.shape))
            decoded.append(tensor)
        return decoded

    def validate(
        self, model: LoadedModel, inputs: Sequence[InputTensor], requested: Sequence[str]
    ) -> tuple[Array, list[str]]:
        """The estimator's X for this request, and the outputs to answer with."""
        self.check_inputs(model, inputs)
        tensor = inputs[0]
        known = {o.name: o for o in model.config.outputs}
        if requested:
            unknown = list(dict.fromkeys(name for name in requested if name not in known))
            if unknown:
                listed = ", ".join(quoted(n) for n in unknown[:8])
                if len(unknown) > 8:
                    listed += f", ... ({len(unknown)} unknown outputs)"
                raise InvalidRequest(
                    f"model '{model.config.name}' has no output {listed}; "
                    f"it has {', '.join(repr(n) for n in known)}"
                )
            outputs = list(dict.fromkeys(requested))
        else:
            outputs = [o.name for o in model.config.outputs if o.default]
        rows = tensor.array if tensor.array.ndim else tensor.array.reshape(1)
        _check_values(tensor.name, rows, model)
        return rows, outputs

    async def infer(
        self,
        model_name: str,
        version: str,
        inputs: Sequence[InputTensor],
        requested: Sequence[str],
    ) -> InferResult:
        started = time.perf_counter()
        model = self.repository.get(model_name, version or None)
        rows, outputs = self.validate(model, inputs, requested)
        result = await self._batcher(model).submit(rows, outputs)
        if self._observer is not None:
            self._observer.observe(model.config.name, model.config.version, rows, result)
        specs = {o.name: o for o in model.config.outputs}
        answer: list[tuple[str, str, Array]] = [
            (name, specs[name].datatype, result[name]) for name in outputs
        ]
        self._metrics.latency.labels(model.config.name).observe(time.perf_counter() - started)
        return InferResult(model.config.name, str(model.config.version), answer)

    async def close(self) -> None:
        """Drain every batcher: queued requests finish before the node exits."""
        await asyncio.gather(
            *(b.close() for _, b in self._batchers.values()), *list(self._retiring)
        )
