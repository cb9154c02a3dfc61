"""Dynamic batching: merged estimator calls, and every caller gets exactly its rows."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from hybridroute.node.batching import Batcher, BatchError, BatcherStopped


class RecordingModel:
    """A real (tiny) model: label = row sum * 10, and it records every batch size."""

    def __init__(
        self,
        *,
        fail_on: float | None = None,
        delay: float = 0.002,
        gate: threading.Event | None = None,
    ) -> None:
        self.batches: list[int] = []
        self.fail_on = fail_on
        self.delay = delay
        self.gate = gate  # when given, every estimator call waits until it is set
        self.started = threading.Event()  # set when the first estimator call begins
        self.lock = threading.Lock()

    def run(self, x: np.ndarray, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        self.started.set()
        if self.gate is not None:
            self.gate.wait(30)
        threading.Event().wait(self.delay)  # an estimator call takes time off the loop
        with self.lock:
            self.batches.append(len(x))
        if self.fail_on is not None and (x == self.fail_on).any():
            raise ValueError("bad row")
        result = {"label": x.sum(axis=1) * 10}
        if "double" in outputs:
            result["double"] = x * 2
        return result


@pytest.fixture
def executor():
    with ThreadPoolExecutor(2) as pool:
        yield pool


def test_64_concurrent_callers_each_get_their_own_rows(executor) -> None:
    model = RecordingModel()

    async def main() -> list[dict[str, np.ndarray]]:
        batcher = Batcher(model.run, executor=executor, max_batch_size=32)
        rows = [np.array([[i, i + 0.5]] * (1 + i % 3)) for i in range(64)]
        results = await asyncio.gather(*(batcher.submit(r, ["label"]) for r in rows))
        await batcher.close()
        for r, got in zip(rows, results, strict=True):
            np.testing.assert_array_equal(got["label"], r.sum(axis=1) * 10)
        return results

    asyncio.run(main())
    assert sum(model.batches) == sum(1 + i % 3 for i in range(64))
    assert max(model.batches) <= 32
    assert len(model.batches) < 64 / 2, f"requests were not merged: {model.batches}"


def test_each_caller_gets_only_the_outputs_it_asked_for(executor) -> None:
    model = RecordingModel()

    async def main() -> None:
        batcher = Batcher(model.run, executor=executor)
        a, b = await asyncio.gather(
            batcher.submit(np.ones((1, 2)), ["label"]),
            batcher.submit(np.ones((2, 2)), ["label", "double"]),
        )
        assert set(a) == {"label"} and set(b) == {"label", "double"}
        assert b["double"].shape == (2, 2)
        await batcher.close()

    asyncio.run(main())


def test_a_failing_row_fails_only_its_own_caller(executor) -> None:
    model = RecordingModel(fail_on=-1.0)

    async def main() -> list[object]:
        batcher = Batcher(model.run, executor=executor)
        rows = [np.full((1, 2), -1.0 if i == 3 else float(i)) for i in range(8)]
        out = await asyncio.gather(
            *(batcher.submit(r, ["label"]) for r in rows), return_exceptions=True
        )
        await batcher.close()
        return out

    results = asyncio.run(main())
    assert isinstance(results[3], ValueError)
    assert all(isinstance(r, dict) for i, r in enumerate(results) if i != 3)


def test_a_result_of_the_wrong_length_is_an_error_not_a_mixup(executor) -> None:
    def broken(x: np.ndarray, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        return {"label": np.zeros(len(x) + 1)}

    async def main() -> None:
        batcher = Batcher(broken, executor=executor)
        with pytest.raises(BatchError, match="refusing to guess"):
            await batcher.submit(np.ones((2, 2)), ["label"])
        await batcher.close()

    asyncio.run(main())


def test_max_queue_delay_waits_for_a_fuller_batch(executor) -> None:
    model = RecordingModel(delay=0)

    async def main() -> None:
        batcher = Batcher(model.run, executor=executor, max_batch_size=8, max_queue_delay=0.05)
        tasks = []
        for i in range(8):
            tasks.append(asyncio.create_task(batcher.submit(np.full((1, 2), i), ["label"])))
            await asyncio.sleep(0.002)
        await asyncio.gather(*tasks)
        await batcher.close()

    asyncio.run(main())
    assert model.batches == [8]


def test_a_lone_request_never_waits_with_the_default_delay(executor) -> None:
    model = RecordingModel(delay=0)

    async def main() -> float:
        batcher = Batcher(model.run, executor=executor)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await batcher.submit(np.ones((1, 2)), ["label"])
        elapsed = loop.time() - started
        await batcher.close()
        return elapsed

    assert asyncio.run(main()) < 0.5  # generous: proves no timer-based wait, not speed


def test_close_finishes_queued_work_and_refuses_new(executor) -> None:
    model = RecordingModel()

    async def main() -> None:
        batcher = Batcher(model.run, executor=executor, max_batch_size=2)
        tasks = [asyncio.create_task(batcher.submit(np.ones((1, 2)), ["label"])) for _ in range(5)]
        await asyncio.sleep(0)
        await batcher.close()
        assert all(t.done() and not t.exception() for t in tasks)
        with pytest.raises(BatcherStopped, match="shutting down"):
            await batcher.submit(np.ones((1, 2)), ["label"])

    asyncio.run(main())


def test_a_cancelled_close_still_answers_every_queued_caller(executor) -> None:
    """An unload whose admin caller gives up cancels its wait for the drain, never the
    drain: requests already queued are still computed and answered."""
    gate = threading.Event()
    model = RecordingModel(gate=gate)

    async def main() -> list[object]:
        batcher = Batcher(model.run, executor=executor, max_batch_size=2)
        tasks = [asyncio.create_task(batcher.submit(np.ones((1, 2)), ["label"])) for _ in range(5)]
        await asyncio.to_thread(model.started.wait, 10)  # the first batch is computing
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(batcher.close(), 0.05)  # the caller's deadline
        gate.set()
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)

    results = asyncio.run(main())
    assert all(isinstance(r, dict) for r in results), results
    assert sum(model.batches) == 5


def test_a_stopped_batcher_task_fails_its_callers_instead_of_stranding_them(executor) -> None:
    gate = threading.Event()
    model = RecordingModel(gate=gate)

    async def main() -> list[object]:
        batcher = Batcher(model.run, executor=executor, max_batch_size=1)
        tasks = [asyncio.create_task(batcher.submit(np.ones((1, 2)), ["label"])) for _ in range(3)]
        await asyncio.to_thread(model.started.wait, 10)
        assert batcher._task is not None
        batcher._task.cancel()  # as when the event loop shuts down under it
        try:
            return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
        finally:
            gate.set()

    results = asyncio.run(main())
    assert all(isinstance(r, BatcherStopped) for r in results), results
    assert "stopped before computing the request" in str(results[0])


@pytest.mark.parametrize("when", ["never-started", "all-queued", "one-running"])
def test_a_stopped_batcher_counts_its_failed_callers_out_once(executor, when: str) -> None:
    # Each failed caller's `finally` used to withdraw its request a second time after
    # the loop had already reset the counters: the queue depth gauge went to -3.
    gate = threading.Event()
    model = RecordingModel(gate=gate)
    running = when == "one-running"

    async def main() -> tuple[int, int, int]:
        size, delay = (1, 0.0) if running else (8, 60.0)  # one computes, or all wait
        batcher = Batcher(model.run, executor=executor, max_batch_size=size, max_queue_delay=delay)
        tasks = [asyncio.create_task(batcher.submit(np.ones((1, 2)), ["label"])) for _ in range(3)]
        if when == "never-started":  # the submits ran, the batching task not yet
            await asyncio.sleep(0)
        elif running:
            await asyncio.to_thread(model.started.wait, 10)
        else:
            await asyncio.sleep(0.05)  # the loop waits for a fuller batch
        assert batcher.queue_depth == (2 if running else 3)
        assert batcher._task is not None
        batcher._task.cancel()
        try:
            results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
        finally:
            gate.set()
        assert all(isinstance(r, BatcherStopped) for r in results), results
        return batcher.queue_depth, batcher._queued_rows, batcher._outstanding_rows

    assert asyncio.run(main()) == (0, 0, 0)


def test_callers_that_gave_up_leave_the_queue_and_are_not_computed(executor) -> None:
    model = RecordingModel(delay=0)

    async def main() -> None:
        batcher = Batcher(model.run, executor=executor, max_batch_size=8, max_queue_delay=30)
        tasks = [asyncio.create_task(batcher.submit(np.ones((1, 2)), ["label"])) for _ in range(3)]
        await asyncio.sleep(0)
        assert batcher.queue_depth == 3
        for task in tasks[:2]:  # their deadlines passed
            task.cancel()
        await asyncio.gather(*tasks[:2], return_exceptions=True)
        assert batcher.queue_depth == 1
        await batcher.close()
        assert tasks[2].done() and not tasks[2].exception()

    asyncio.run(main())
    assert model.batches == [1]
