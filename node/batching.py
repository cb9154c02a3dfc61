"""Dynamic batching: concurrent requests for one model version share one estimator call.

A scikit-learn `predict` costs about the same for 1 row as for 32 (references.md), so
merging concurrent requests is where a node's throughput comes from. The rules:

* Each caller gets exactly its own rows back. Rows are concatenated in queue order and
  split by the same offsets; a result whose length does not match is an error for
  every caller in the batch, never a silent mix-up.
* The estimator runs in a worker thread, so the event loop keeps answering health,
  metadata and new requests while a batch computes. One batch per model version runs
  at a time; requests that arrive meanwhile form the next batch.
* `max_queue_delay` is how long a batch may wait for more requests once it has its
  first one, as in Triton. The default 0 never waits for requests nobody has sent:
  a lone request runs immediately.
* Adaptive gathering (`adaptive_wait`, default 2 ms) covers the case a fixed delay
  handles badly. Requests reach the event loop one by one, and the callers a batch
  has just answered send their next request a moment later; a batcher that fires at
  once sees tiny batches (references.md measured a mean of ~4 at concurrency 16).
  So the batcher remembers how many rows were outstanding during the last cycle and,
  while fewer are queued, waits for them, at most `adaptive_wait`. When a request is
  alone the remembered concurrency is 1 and nothing waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["BatchError", "Batcher", "BatcherStopped", "RunFn"]

log = logging.getLogger(__name__)

Array = np.ndarray[Any, Any]
RunFn = Callable[[Array, Sequence[str]], dict[str, Array]]


class BatchError(RuntimeError):
    """The estimator's result could not be split back into the callers' rows."""


class BatcherStopped(RuntimeError):
    """The batcher stopped (its model was unloaded or the node is stopping) before it
    ran this request: the request was not computed and may be sent again."""


@dataclass(slots=True)
class _Pending:
    rows: Array
    outputs: tuple[str, ...]
    future: asyncio.Future[dict[str, Array]] = field(repr=False)
    queued: bool = True  # False once taken into a batch or withdrawn by its caller


class Batcher:
    """Queues requests for one model version and runs them in merged estimator calls."""

    def __init__(
        self,
        run: RunFn,
        *,
        executor: Executor,
        max_batch_size: int = 32,
        max_queue_delay: float = 0.0,
        adaptive_wait: float = 0.002,
        on_batch: Callable[[int], None] | None = None,
        name: str = "model",
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self._run = run
        self._executor = executor
        self._max_rows = max_batch_size
        self._delay = max(0.0, max_queue_delay)
        self._adaptive_wait = max(0.0, adaptive_wait)
        self._outstanding_rows = 0  # submitted and not yet answered
        self._cycle_peak = 0  # most rows outstanding since the current batch started
        self._expected_rows = 1  # that peak at the last batch: what the next one waits for
        self._on_batch = on_batch
        self._name = name
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0  # rows of the requests still queued (not withdrawn)
        self._withdrawn = 0  # entries in _queue whose caller went away
        self._running: list[_Pending] = []  # the batch being computed
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch (not counting the batch that is computing, nor
        requests whose caller went away)."""
        return len(self._queue) - self._withdrawn

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._loop(), name=f"batcher:{self._name}"
            )
            # A task cancelled before it first ran never enters `_loop`'s finally:
            # its callers would wait for their deadline. The callback runs either way.
            self._task.add_done_callback(self._stopped)

    def _stopped(self, _task: asyncio.Task[None]) -> None:
        self._closing = True
        self._fail_pending()

    async def submit(self, rows: Array, outputs: Sequence[str]) -> dict[str, Array]:
        """Queue `rows` (first dimension = rows) and wait for this caller's outputs."""
        if self._closing:
            raise BatcherStopped(f"model {self._name} is shutting down")
        self.start()
        future: asyncio.Future[dict[str, Array]] = asyncio.get_running_loop().create_future()
        pending = _Pending(rows, tuple(outputs), future)
        self._queue.append(pending)
        self._queued_rows += len(rows)
        self._outstanding_rows += len(rows)
        self._cycle_peak = max(self._cycle_peak, self._outstanding_rows)
        self._wakeup.set()
        try:
            return await future
        finally:
            self._outstanding_rows -= len(rows)
            if pending.queued:  # the caller was cancelled (deadline) while queued
                self._withdraw(pending)

    def _withdraw(self, pending: _Pending) -> None:
        """Stop counting a queued request whose caller went away. It stays in the deque
        (removing it would cost O(queue) per cancellation) and `_take` skips it."""
        pending.queued = False
        self._queued_rows -= len(pending.rows)
        self._withdrawn += 1

    async def close(self) -> None:
        """Finish everything queued, then stop the batching task.

        The drain is shielded: a caller of close() that is cancelled (an admin call whose
        deadline passed) stops waiting, but the queued requests are still answered."""
        self._closing = True
        self._wakeup.set()
        task = self._task
        if task is not None:
            await asyncio.shield(task)
            self._task = None

    async def _loop(self) -> None:
        try:
            while True:
                if not self._queue:
                    if self._closing:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                if not self._closing:
                    await self._gather()
                batch = self._take()
                if batch:
                    self._running = batch
                    await self._execute(batch)
                    self._running = []
        finally:
            # Cancelled (the loop is shutting down) or crashed: nobody will run what is
            # left, so its callers get an answer now instead of waiting for their deadline.
            self._closing = True
            self._fail_pending()

    def _fail_pending(self) -> None:
        message = f"model {self._name} stopped before computing the request; send it again"
        for pending in [*self._running, *self._queue]:
            # No longer queued: the caller's `finally` must not withdraw it again (that
            # would count it out twice and drive the queue depth negative).
            pending.queued = False
            if not pending.future.done():
                pending.future.set_exception(BatcherStopped(message))
        self._running = []
        self._queue.clear()
        self._queued_rows = self._withdrawn = 0

    async def _gather(self) -> None:
        """Wait (bounded) for the rows this batch can expect; never when a request is alone."""
        # Rows outstanding since the last batch started = the callers that are active.
        # The batch that just finished still counts: its callers have not resumed yet.
        self._expected_rows = max(1, self._cycle_peak)
        self._cycle_peak = self._outstanding_rows
        expected = min(self._max_rows, self._expected_rows)
        if self._delay and self._queued_rows < self._max_rows:
            await self._wait_for(self._max_rows, self._delay)
        elif self._adaptive_wait and self._queued_rows < expected:
            await self._wait_for(expected, self._adaptive_wait)

    async def _wait_for(self, rows: int, timeout: float) -> None:  # noqa: ASYNC109
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._queued_rows < rows and not self._closing:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)

    def _take(self) -> list[_Pending]:
        """Pop requests in order up to max_batch_size rows (a bigger request runs alone)."""
        batch: list[_Pending] = []
        rows = 0
        while self._queue:
            head = self._queue[0]
            if not head.queued:  # withdrawn by its caller
                self._queue.popleft()
                self._withdrawn -= 1
                continue
            if batch and rows + len(head.rows) > self._max_rows:
                break
            self._queue.popleft()
            head.queued = False
            self._queued_rows -= len(head.rows)
            batch.append(head)
            rows += len(head.rows)
        return batch

    async def _execute(self, batch: list[_Pending]) -> None:
        outputs = tuple(dict.fromkeys(name for p in batch for name in p.outputs))
        rows = batch[0].rows if len(batch) == 1 else np.concatenate([p.rows for p in batch])
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._executor, self._run, rows, outputs)
            parts = _split(result, [len(p.rows) for p in batch], len(rows))
        except Exception as exc:
            if len(batch) == 1:
                if not batch[0].future.done():
                    batch[0].future.set_exception(exc)
                return
            # One caller's bad rows must not fail the others: isolate by running alone.
            log.warning(
                "%s: batch of %d failed (%s); retrying each alone",
                self._name,
                len(batch),
                type(exc).__name__,
            )
            for pending in batch:
                await self._execute([pending])
            return
        if self._on_batch is not None:
            self._on_batch(len(rows))
        for pending, part in zip(batch, parts, strict=True):
            if not pending.future.done():
                pending.future.set_result({name: part[name] for name in pending.outputs})


def _split(result: dict[str, Array], counts: list[int], total: int) -> list[dict[str, Array]]:
    for name, array in result.items():
        if len(array) != total:
            raise BatchError(
                f"output '{name}' has {len(array)} rows for a batch of {total}; "
                "refusing to guess which rows belong to which caller"
            )
    parts: list[dict[str, Array]] = []
    start = 0
    for count in counts:
        parts.append({name: array[start : start + count] for name, array in result.items()})
        start += count
    return parts
