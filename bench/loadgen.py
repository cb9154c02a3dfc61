"""A closed-loop gRPC load generator: N concurrent callers, each sends its next request
as soon as the previous answer arrives (how references.md measured its numbers).

Requests are pre-serialised and sent through a generic unary call, so the client
spends as little CPU as possible on a 2-core machine it shares with the server.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

__all__ = ["Result", "free_port", "median_result", "run_load", "spread", "table"]


@dataclass(frozen=True)
class Result:
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    mean_ms: float = float("nan")

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


async def _caller(
    call: grpc.aio.UnaryUnaryMultiCallable,
    payloads: Sequence[bytes],
    offset: int,
    stop_at: float,
    latencies: list[float],
    errors: list[int],
    metadata: Sequence[tuple[str, str]] | None,
) -> None:
    i = offset
    while time.perf_counter() < stop_at:
        started = time.perf_counter()
        try:
            await call(payloads[i % len(payloads)], metadata=metadata, timeout=10)
        except grpc.aio.AioRpcError:
            errors.append(1)
            continue
        latencies.append(time.perf_counter() - started)
        i += 1


async def run_load(
    channel: grpc.aio.Channel,
    method: str,
    payloads: Sequence[bytes],
    *,
    concurrency: int,
    seconds: float,
    warmup: float = 0.5,
    metadata: Sequence[tuple[str, str]] | None = None,
) -> Result:
    """Drive `method` with `concurrency` callers for `seconds` after a warm-up."""
    call = channel.unary_unary(method)
    for phase_seconds, keep in ((warmup, False), (seconds, True)):
        latencies: list[float] = []
        errors: list[int] = []
        started = time.perf_counter()
        stop_at = started + phase_seconds
        await asyncio.gather(
            *(
                _caller(call, payloads, n, stop_at, latencies, errors, metadata)
                for n in range(concurrency)
            )
        )
        elapsed = time.perf_counter() - started
        if keep:
            latencies.sort()
            p50 = latencies[len(latencies) // 2] * 1000 if latencies else float("nan")
            p99 = latencies[int(len(latencies) * 0.99)] * 1000 if latencies else float("nan")
            mean = statistics.fmean(latencies) * 1000 if latencies else float("nan")
            return Result(len(latencies), len(errors), elapsed, p50, p99, mean)
    raise AssertionError("unreachable")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def median_result(results: Sequence[Result]) -> Result:
    """The run with the median throughput (so its latencies belong together)."""
    ordered = sorted(results, key=lambda r: r.rps)
    return ordered[len(ordered) // 2]


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def spread(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"
