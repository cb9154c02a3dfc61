"""What the durable audit trail costs: the same router with the trail on and off.

    .venv/bin/python -m bench.bench_audit [--seconds 3] [--runs 3] [--keep DIR]

What runs (each its own process; the load generator is this process):

- one on-prem node (`hybridroute node serve`, mutual TLS, default batching);
- two routers on the same config (the one `hybridroute up` writes, each in its own
  directory) and policy, started by this module's `--serve` mode (a `RouterServer`, as
  `router serve` runs it): *audit on* writes its trail as `router serve` does (SQLite
  WAL, synchronous=FULL, a record committed before every reply, group commit, signed
  checkpoints); *audit off* gets a sink that records nothing. The router itself has no
  switch to turn auditing off, on purpose: this bench builds the "off" router in code.

Load (`bench.loadgen`, closed loop): iris, one row of 4 x FP64, as `demo-app` with
`x-data-classification: confidential`, so every request is sensitive and its record
carries the full detail (the most expensive kind). Concurrency 16 (the target) and 1
(latency when alone). Runs interleave on/off, and each configuration reports the run
with its median throughput.

Derived, per pair of runs made back to back (run i with the trail off, then on) and
then the median over pairs, because this machine is shared and its load moves between
runs: throughput cost = 1 - on/off at c=16 (target <= 15%, the audit issue); added p50
and p99 = on - off. Also reported: the router's CPU time per request (from /proc), and
from the trail router's own metrics the records per transaction and the commit time.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import sys
import tempfile
import urllib.request
from collections.abc import Awaitable
from pathlib import Path

import grpc

from bench.harness import (
    APP,
    METHOD,
    TOKEN_ENV,
    Child,
    cpu_seconds,
    iris_payloads,
    node_args,
    prepare,
    render_policy,
)
from bench.loadgen import Result, free_port, median_result, run_load, table
from hybridroute.certs.credentials import channel_credentials
from hybridroute.router.audit.events import AuditEvent, AuditNote
from hybridroute.stack import write_router_config

CONCURRENCIES = (16, 1)
TARGET_COST = 0.15
MODES = ("off", "on")


class _NoAudit:
    """An `AuditSink` that keeps nothing: the 'off' router of this comparison only."""

    async def start(self) -> None:
        return None

    async def record(self, event: AuditEvent) -> None:
        return None

    def note(self, note: AuditNote) -> Awaitable[None]:
        return asyncio.sleep(0)

    @property
    def failure(self) -> str | None:
        return None

    async def close(self) -> None:
        return None


def _serve(config_path: Path, audit: str) -> None:
    """`--serve` mode: one router until SIGTERM, with or without its trail."""
    from hybridroute.router.config import load_config
    from hybridroute.router.server import RouterServer

    logging.basicConfig(level=logging.WARNING)

    async def run() -> None:
        router = RouterServer(
            load_config(config_path), audit=_NoAudit() if audit == "off" else None
        )
        await router.start()
        print(f"router ready on {router.port}", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await router.stop()

    asyncio.run(run())


# --- measuring ------------------------------------------------------------------------


async def _measure(
    routers: dict[str, tuple[str, int]], pki: Path, seconds: float, runs: int
) -> tuple[dict[tuple[str, int], list[Result]], dict[tuple[str, int], list[float]]]:
    """Results per (mode, concurrency) in run order (run i of `off` and of `on` ran back
    to back), and the router's CPU microseconds per request for each."""
    creds = channel_credentials(pki / "ca.pem", pki / f"app-{APP}.pem", pki / f"app-{APP}.key")
    metadata = (("x-data-classification", "confidential"),)
    channels = {mode: grpc.aio.secure_channel(a, creds) for mode, (a, _) in routers.items()}
    cpu: dict[tuple[str, int], list[float]] = {}
    payloads = iris_payloads()
    results: dict[tuple[str, int], list[Result]] = {}
    try:
        for run in range(runs):
            for concurrency in CONCURRENCIES:
                for mode in MODES:
                    before = cpu_seconds(routers[mode][1])
                    r = await run_load(
                        channels[mode],
                        METHOD,
                        payloads,
                        concurrency=concurrency,
                        seconds=seconds,
                        metadata=metadata,
                    )
                    results.setdefault((mode, concurrency), []).append(r)
                    served = r.rps * (seconds + 0.5)  # loadgen warms up for 0.5 s first
                    used = cpu_seconds(routers[mode][1]) - before
                    cpu.setdefault((mode, concurrency), []).append(used / served * 1e6)
                    print(
                        f"  run {run + 1}/{runs} audit {mode:<3} c={concurrency:<2}: "
                        f"{r.rps:.0f} req/s, p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms, "
                        f"{r.errors} errors",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        for channel in channels.values():
            await channel.close(None)
    return results, cpu


def _trail_metrics(url: str) -> tuple[float, float, float]:
    """(records, records per transaction, mean commit ms) from the router's metrics."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()

    def value(name: str) -> float:
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        return float(m[1]) if m else float("nan")

    commits = value("hybridroute_audit_commit_seconds_count")
    return (
        value("hybridroute_audit_records_total"),
        value("hybridroute_audit_batch_records_sum")
        / value("hybridroute_audit_batch_records_count"),
        value("hybridroute_audit_commit_seconds_sum") / commits * 1000,
    )


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _paired(off: list[Result], on: list[Result]) -> tuple[float, float, float]:
    """(added p50, added p99, throughput cost), each the median over pairs of runs made
    back to back: a load change on this shared machine then hits both sides of a pair,
    not one configuration's median."""
    pairs = list(zip(off, on, strict=True))
    return (
        _median([b.p50_ms - a.p50_ms for a, b in pairs]),
        _median([b.p99_ms - a.p99_ms for a, b in pairs]),
        _median([1 - b.rps / a.rps for a, b in pairs]),
    )


_HEADERS = ["concurrency", "audit", "req/s", "p50 ms", "p99 ms", "errors", "router CPU us/req"]
_HEADERS += ["added p50 ms", "added p99 ms", "throughput cost"]


def _report(
    results: dict[tuple[str, int], list[Result]],
    cpu: dict[tuple[str, int], list[float]],
    trail: tuple[float, float, float],
    seconds: float,
    runs: int,
) -> None:
    rows: list[list[object]] = []
    cost_at_16 = 0.0
    for concurrency in CONCURRENCIES:
        added_p50, added_p99, cost = _paired(
            results["off", concurrency], results["on", concurrency]
        )
        cost_at_16 = cost if concurrency == 16 else cost_at_16
        for mode in MODES:
            r = median_result(results[mode, concurrency])
            extra = ["", "", ""]
            if mode == "on":
                extra = [f"{added_p50:+.2f}", f"{added_p99:+.2f}", f"{cost:+.1%}"]
            us = _median(cpu[mode, concurrency])
            row = [concurrency, mode, f"{r.rps:.0f}", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}"]
            rows.append([*row, r.errors, f"{us:.0f}", *extra])
    print()
    print(
        f"audit trail on vs off, iris confidential (full-detail records), {runs} x {seconds:g} s "
        "per configuration; req/s..p99: the median-throughput run; added/cost: median over "
        "back-to-back on/off pairs"
    )
    print(table(_HEADERS, rows))
    records, per_commit, commit_ms = trail
    print(
        f"trail: {records:.0f} records, {per_commit:.1f} records per transaction, "
        f"{commit_ms:.2f} ms per commit (fsync included)"
    )
    verdict = "MET" if cost_at_16 <= TARGET_COST else "NOT MET"
    print(
        f"target: throughput cost at c=16 {cost_at_16:.1%} (target <= {TARGET_COST:.0%}): {verdict}"
    )


def _run(root: Path, seconds: float, runs: int) -> None:
    pki, models, logs = prepare(root)
    env = {**os.environ, TOKEN_ENV: "unused", "PYTHONUNBUFFERED": "1"}
    onprem = f"127.0.0.1:{free_port()}"
    node = Child("node", ["--log-level", "WARNING", *node_args(models, pki, onprem)], logs, env)
    children = [node]
    try:
        node.wait_ready("node ready on")
        # The cloud pool points at a port nobody listens on: this workload never goes there.
        policy = render_policy(root, onprem, f"127.0.0.1:{free_port()}")
        routers: dict[str, tuple[str, int]] = {}
        trail_metrics = ""
        for mode in MODES:
            # The config `hybridroute up` writes, in a directory per router: its trail
            # (audit.db) there, sealed with the PKI's audit signing key.
            state, listen = root / f"router-{mode}", f"127.0.0.1:{free_port()}"
            state.mkdir(exist_ok=True)
            metrics = f"127.0.0.1:{free_port()}"
            config = write_router_config(state, pki, policy, listen, metrics)
            args = ["--serve", str(config), "--audit", mode]
            children.append(Child(f"router-{mode}", args, logs, env, module="bench.bench_audit"))
            children[-1].wait_ready("router ready on")
            routers[mode] = (listen, children[-1].proc.pid)
            if mode == "on":
                trail_metrics = f"http://{metrics}/metrics"
        results, cpu = asyncio.run(_measure(routers, pki, seconds, runs))
        trail = _trail_metrics(trail_metrics)
    finally:
        for child in reversed(children):
            child.stop()
    _report(results, cpu, trail, seconds, runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one run")
    parser.add_argument("--runs", type=int, default=3, help="runs per configuration (median)")
    parser.add_argument("--keep", type=Path, help="use this directory and keep it (logs, trails)")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # internal: one router
    parser.add_argument("--audit", choices=MODES, default="on", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve(args.serve, args.audit)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        _run(root, args.seconds, args.runs)


if __name__ == "__main__":
    main()
