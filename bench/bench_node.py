"""Node throughput and latency: batching off vs on, concurrency 1 and 16, mutual TLS.

    .venv/bin/python -m bench.bench_node [--seconds 3] [--runs 3]

Starts `hybridroute node serve` as its own process (the client gets the other core),
sends one iris row (4 x FP64) per request, and prints the median of --runs runs.
Reference points on this kind of 2-core machine (references.md): MLServer 1.7 with
adaptive batching ~924 req/s, p99 ~40 ms at concurrency 16; unbatched ~286 req/s.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import grpc

from bench.harness import METHOD, Child, iris_payloads, node_args, prepare
from bench.loadgen import Result, free_port, median_result, run_load, table
from hybridroute.certs.credentials import channel_credentials


def _start_node(models: Path, pki: Path, logs: Path, port: int, batching: bool) -> Child:
    """`node serve` with mutual TLS, any client the dev CA signed (no --allow-client)."""
    args = ["--log-level", "WARNING", *node_args(models, pki, f"127.0.0.1:{port}", allow=())]
    if not batching:
        args.append("--no-batching")
    node = Child("node", args, logs)
    node.wait_ready("node ready")
    return node


async def _measure(address: str, pki: Path, concurrency: int, seconds: float, runs: int) -> Result:
    creds = channel_credentials(pki / "ca.pem", pki / "router.pem", pki / "router.key")
    payloads = iris_payloads()
    results = []
    async with grpc.aio.secure_channel(address, creds) as channel:
        for _ in range(runs):
            results.append(
                await run_load(channel, METHOD, payloads, concurrency=concurrency, seconds=seconds)
            )
    return median_result(results)


def _set_batching(repo: Path, max_queue_delay_ms: float) -> None:
    """Sample models set their own batching; the bench compares the node's defaults."""
    config = repo / "iris" / "1" / "model.yaml"
    text = config.read_text().splitlines()
    text = [line for line in text if not line.startswith("batching:")]
    text.append(f"batching: {{max_batch_size: 32, max_queue_delay_ms: {max_queue_delay_ms}}}")
    config.write_text("\n".join(text) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--delays", default="0,2", help="max_queue_delay_ms values to compare")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pki, models, logs = prepare(Path(tmp))
        configs: list[tuple[str, bool, float]] = [("off", False, 0.0)]
        configs += [(f"on, delay {d} ms", True, float(d)) for d in args.delays.split(",")]
        rows = []
        baseline: dict[int, float] = {}
        for label, batching, delay in configs:
            _set_batching(models, delay)
            port = free_port()
            node = _start_node(models, pki, logs, port, batching)
            try:
                for concurrency in (1, 16):
                    r = asyncio.run(
                        _measure(f"localhost:{port}", pki, concurrency, args.seconds, args.runs)
                    )
                    if not batching:
                        baseline[concurrency] = r.rps
                    rows.append(
                        [
                            label,
                            concurrency,
                            f"{r.rps:.0f}",
                            f"{r.p50_ms:.2f}",
                            f"{r.p99_ms:.2f}",
                            r.errors,
                            f"{r.rps / baseline[concurrency]:.2f}",
                        ]
                    )
                    print(
                        f"  measured batching {label} c={concurrency}: {r.rps:.0f} req/s",
                        file=sys.stderr,
                        flush=True,
                    )
            finally:
                node.stop()
                time.sleep(0.2)
    print()
    print(
        f"node, iris RandomForest(50), 1 row/request, mTLS, median of {args.runs} x "
        f"{args.seconds:.0f} s"
    )
    print(table(["batching", "concurrency", "req/s", "p50 ms", "p99 ms", "errors", "vs off"], rows))


if __name__ == "__main__":
    main()
