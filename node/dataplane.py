"""The node's data plane: validate a request against its model, batch it, run it.

Knows numpy arrays and model declarations, not protobuf; `node/servicer.py` converts
at the edge. Every validation error says which tensor, what was expected and what came.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from hybridroute.node.batching import Batcher
from hybridroute.node.loading import LoadedModel
from hybridroute.node.metrics import NodeMetrics
from hybridroute.node.repository import ModelRepository
from hybridroute.protos.tensors import InputTensor

__all__ = ["BatchingDefaults", "DataPlane", "InferResult", "InputObserver", "InvalidRequest"]

Array = np.ndarray[Any, Any]


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


def _check_shape(name: str, declared: Sequence[int], got: Sequence[int]) -> None:
    ok = len(declared) == len(got) and all(d in (-1, g) for d, g in zip(declared, got, strict=True))
    if not ok:
        raise InvalidRequest(
            f"tensor '{name}': shape {list(got)} does not match the model's {list(declared)}"
            " (-1 = any size)"
        )


class InputObserver(Protocol):
    """Sees the validated input rows of each answered request (drift monitoring).
    Called on the event loop, so it must only hand the rows over, never compute."""

    def observe(self, name: str, version: int, rows: Array) -> None: ...


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

    def _batcher(self, model: LoadedModel) -> Batcher:
        key = (model.config.name, model.config.version)
        current = self._batchers.get(key)
        if current is not None and current[0] is model:
            return current[1]
        if current is not None:  # a reload swapped the model without retire(): drain the old
            self._drain_later(current[1])
        batcher = self._new_batcher(model)
        self._batchers[key] = (model, batcher)
        return batcher

    def _new_batcher(self, model: LoadedModel) -> Batcher:
        settings = model.config.batching
        size = settings.max_batch_size if settings else self._batching.max_batch_size
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

    def _drain_later(self, batcher: Batcher) -> None:
        task = asyncio.get_running_loop().create_task(batcher.close())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def retire(self, name: str, version: int) -> None:
        """Detach the batcher of `name`/`version` and wait until its queued requests are
        answered (call after the repository stopped handing out that model)."""
        current = self._batchers.pop((name, version), None)
        if current is not None:
            await current[1].close()
            with contextlib.suppress(KeyError):
                self._metrics.queue_depth.remove(name, str(version))

    def validate(
        self, model: LoadedModel, inputs: Sequence[InputTensor], requested: Sequence[str]
    ) -> tuple[Array, list[str]]:
        """The estimator's X for this request, and the outputs to answer with."""
        declared = model.config.inputs[0]
        if len(inputs) != 1 or inputs[0].name != declared.name:
            got = ", ".join(f"'{t.name}'" for t in inputs) or "none"
            raise InvalidRequest(
                f"model '{model.config.name}' takes one input '{declared.name}' "
                f"({declared.datatype} {list(declared.shape)}), got {got}"
            )
        tensor = inputs[0]
        if tensor.datatype != declared.datatype:
            raise InvalidRequest(
                f"tensor '{tensor.name}': datatype {tensor.datatype}, expected {declared.datatype}"
            )
        _check_shape(tensor.name, declared.shape, tensor.shape)
        known = {o.name: o for o in model.config.outputs}
        if requested:
            unknown = [name for name in requested if name not in known]
            if unknown:
                raise InvalidRequest(
                    f"model '{model.config.name}' has no output "
                    + ", ".join(f"'{n}'" for n in unknown)
                    + f"; it has {', '.join(repr(n) for n in known)}"
                )
            outputs = list(dict.fromkeys(requested))
        else:
            outputs = [o.name for o in model.config.outputs if o.default]
        rows = tensor.array if tensor.array.ndim else tensor.array.reshape(1)
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
            self._observer.observe(model.config.name, model.config.version, rows)
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
