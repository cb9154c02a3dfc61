"""The router hop: a node called directly vs the same node called through the router.

    .venv/bin/python -m bench.bench_router [--seconds 3] [--runs 3]

What runs (every server is its own `hybridroute` process, as `hybridroute up` starts
them; the load generator is this process):

- one on-prem node (`node serve`, mutual TLS, only the `router` identity allowed, the
  node's default batching) and one cloud stand-in (a node with server-side TLS and a
  bearer token, as `up` starts it);
- one router (`router serve`) on `policies/default.yaml` rendered so that its on-prem
  pool holds only that one node and its cloud pool only the stand-in, with the router
  config `up` writes (`stack.write_router_config`: client certificates at the front
  door, metrics on, the durable audit trail in the temporary directory beside
  router.yaml) and its log at INFO into a file.

What is measured, with `bench.loadgen` (closed loop, pre-serialised requests, the same
client code and one long-lived channel per target), at concurrency 1 and 16:

- iris, one row of 4 x FP64 per request: *direct* to the node (mTLS as `router`) and
  *via router* (mTLS as `demo-app`, `x-data-classification: confidential`, so the
  default policy's `classified-on-prem` rule sends it to that same node). This pair
  gives the hop's cost, and is what the targets apply to;
- ticket-triage, one clean public ticket text: *direct* to the cloud stand-in (bearer
  token) and *via router* (`x-data-classification: public`, so `public-clean-to-cloud`
  sends it there). Informational: its text also runs the detectors.

Before measuring, one request per routed path checks the router's reply metadata
(`x-hybridroute-zone`) so the numbers belong to the route they claim. The runs of all
configurations are interleaved (run 1 of each, then run 2 of each, ...) so a slow
patch on this shared 2-core machine does not land on one configuration only; each
configuration reports the run with its median throughput (`loadgen.median_result`),
and the last line says how much CPU other processes took meanwhile (from /proc).

Derived: added p50 = router p50 - direct p50, and throughput ratio = router req/s /
direct req/s, at each concurrency. The table shows them for the median-throughput
runs; the verdict uses the median over back-to-back pairs (direct run i, then router
run i), as bench_audit does, because this machine's speed drifts between runs by as
much as the hop costs (direct p50 at c=1 moved 2.4-2.9 ms between runs of one day).
A second table says where the added time goes at c=1, from the router's own timers
(its /metrics: request duration, upstream call, audit wait; means per run, read before
and after each router run): grpc's front-door leg (client latency minus the router's
request duration), the router's own work, the audit commit the reply waits for
(invariant 5), and the upstream leg (the router's upstream call minus the direct
client's latency). Means, not p50s, so that the parts add up to the added mean.
Targets (issue 3): added p50 <= 1 ms at c=1, ratio >= 0.40 at c=16. Reference points
(references.md, one hop in front of a bare server): minimal Python raw-bytes grpc.aio
hop +0.74 ms and 0.45; nginx grpc_pass +0.14 ms and 0.78.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
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
from bench.loadgen import Result, free_port, median_result, run_load, spread, table
from hybridroute.certs.credentials import channel_credentials
from hybridroute.protos import inference_pb2 as pb
from hybridroute.protos.tensors import encode_bytes_elements
from hybridroute.stack import write_router_config

CONCURRENCIES = (1, 16)
TARGET_ADDED_P50_MS = 1.0  # at concurrency 1
TARGET_RATIO = 0.40  # at concurrency 16
REFERENCES = (
    ("bare Python raw-bytes hop", 0.74, 0.45),
    ("nginx grpc_pass", 0.14, 0.78),
)
TICKETS = (
    "The export button on the reports page does nothing when I click it.",
    "My parcel has been in transit for nine days, can you check the delivery status?",
    "I was billed twice for the March subscription, please refund one payment.",
    "How do I change the language of the dashboard to German?",
    "The mobile app crashes on start after the latest update.",
    "Please close my account at the end of this billing period.",
)


@dataclass(frozen=True)
class Target:
    """One way to reach a model: where, with which credentials and request metadata."""

    address: str
    credentials: grpc.ChannelCredentials
    metadata: tuple[tuple[str, str], ...]
    server_name: str | None = None  # the certificate name when it is not the host


@dataclass(frozen=True)
class Workload:
    name: str
    payloads: list[bytes]
    direct: Target
    routed: Target
    zone: str  # where the router must send it


# --- requests -----------------------------------------------------------------------


def _ticket_payloads() -> list[bytes]:
    out = []
    for text in TICKETS:
        request = pb.ModelInferRequest(model_name="ticket-triage")
        request.inputs.add(name="text", datatype="BYTES", shape=[1])
        request.raw_input_contents.append(encode_bytes_elements([text]))
        out.append(request.SerializeToString())
    return out


# --- measuring ----------------------------------------------------------------------


def _busy_seconds(pids: Sequence[int]) -> tuple[float, float] | None:
    """(CPU seconds the whole machine was busy, CPU seconds of `pids` and this process)
    from /proc, to tell how much of the measurement other processes took; None off Linux."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
        ours = sum(cpu_seconds(pid) for pid in (*pids, os.getpid()))
    except (OSError, ValueError, IndexError):
        return None
    return (user + nice + system + irq + softirq + steal) / tick, ours


def _channel(target: Target) -> grpc.aio.Channel:
    options = []
    if target.server_name:
        options.append(("grpc.ssl_target_name_override", target.server_name))
    return grpc.aio.secure_channel(target.address, target.credentials, options=options)


async def _check_route(target: Target, payload: bytes, zone: str) -> None:
    """One request through the router: it must succeed and say it went to `zone`."""
    async with _channel(target) as channel:
        multicallable = channel.unary_unary(METHOD, None, None)
        call = multicallable(payload, metadata=target.metadata, timeout=10)
        await call
        trailing = dict(await call.trailing_metadata() or ())
    got = trailing.get("x-hybridroute-zone")
    if got != zone:
        raise RuntimeError(f"router sent the request to zone {got!r}, expected {zone!r}")


Runs = dict[tuple[str, str, int], list[Result]]  # (workload, path, concurrency) -> runs

# The router's own account of its time (sum, count), every route and pool together.
_TIMES = {
    "handler": "hybridroute_router_request_duration_seconds",
    "upstream": "hybridroute_router_upstream_duration_seconds",
    "audit": "hybridroute_router_audit_wait_seconds",
}


@dataclass(frozen=True)
class Split:
    """Mean milliseconds per request the router measured itself during one run."""

    handler: float  # from taking the request up to releasing the reply
    upstream: float  # the upstream call
    audit: float  # waiting for the audit record's commit


Splits = dict[str, list[Split]]  # workload -> one per router run at concurrency 1


def _router_times(url: str) -> dict[str, tuple[float, float]]:
    """(sum seconds, count) of each of `_TIMES`, summed over label sets."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out = {}
    for key, name in _TIMES.items():
        total = sum(float(v) for v in re.findall(rf"^{name}_sum(?:{{[^}}]*}})? (\S+)$", text, re.M))
        count = sum(
            float(v) for v in re.findall(rf"^{name}_count(?:{{[^}}]*}})? (\S+)$", text, re.M)
        )
        out[key] = (total, count)
    return out


def _split(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> Split:
    def mean_ms(key: str) -> float:
        seconds = after[key][0] - before[key][0]
        count = after[key][1] - before[key][1]
        return seconds / count * 1000 if count else float("nan")

    return Split(mean_ms("handler"), mean_ms("upstream"), mean_ms("audit"))


async def _measure(
    workloads: Sequence[Workload], seconds: float, runs: int, metrics_url: str
) -> tuple[Runs, Splits]:
    """`runs` runs per (workload, path, concurrency), interleaved; and for each router
    run at concurrency 1, the router's own split of its time (from its /metrics)."""
    for w in workloads:
        await _check_route(w.routed, w.payloads[0], w.zone)
    channels = {
        (w.name, path): _channel(target)
        for w in workloads
        for path, target in (("direct", w.direct), ("via router", w.routed))
    }
    targets = {(w.name, "direct"): w.direct for w in workloads}
    targets |= {(w.name, "via router"): w.routed for w in workloads}
    results: Runs = {}
    splits: Splits = {}
    try:
        for run in range(runs):
            for w in workloads:
                for concurrency in CONCURRENCIES:
                    for path in ("direct", "via router"):
                        split = path == "via router" and concurrency == 1
                        before = _router_times(metrics_url) if split else None
                        r = await run_load(
                            channels[w.name, path],
                            METHOD,
                            w.payloads,
                            concurrency=concurrency,
                            seconds=seconds,
                            metadata=targets[w.name, path].metadata,
                        )
                        results.setdefault((w.name, path, concurrency), []).append(r)
                        if before is not None:
                            after = _router_times(metrics_url)
                            splits.setdefault(w.name, []).append(_split(before, after))
                        print(
                            f"  run {run + 1}/{runs} {w.name} {path} c={concurrency}: "
                            f"{r.rps:.0f} req/s, p50 {r.p50_ms:.2f} ms, {r.errors} errors",
                            file=sys.stderr,
                            flush=True,
                        )
    finally:
        for channel in channels.values():
            await channel.close(None)
    return results, splits


# --- report -------------------------------------------------------------------------


def _report(
    workloads: Sequence[Workload], results: Runs
) -> tuple[list[list[object]], dict[str, tuple[float, float]]]:
    """Table rows, and per workload (added p50 at c=1, throughput ratio at c=16)."""
    medians = {key: median_result(runs) for key, runs in results.items()}
    rows: list[list[object]] = []
    headline: dict[str, tuple[float, float]] = {}
    for w in workloads:
        for concurrency in CONCURRENCIES:
            direct = medians[w.name, "direct", concurrency]
            routed = medians[w.name, "via router", concurrency]
            added = routed.p50_ms - direct.p50_ms
            ratio = routed.rps / direct.rps if direct.rps else float("nan")
            for path, r in (("direct", direct), ("via router", routed)):
                is_router = path == "via router"
                rows.append(
                    [
                        w.name,
                        path,
                        concurrency,
                        f"{r.rps:.0f}",
                        f"{r.p50_ms:.2f}",
                        f"{r.p99_ms:.2f}",
                        r.errors,
                        f"{added:+.2f}" if is_router else "",
                        f"{ratio:.2f}" if is_router else "",
                        spread([x.rps for x in results[w.name, path, concurrency]]),
                    ]
                )
        pairs = {
            c: list(
                zip(results[w.name, "direct", c], results[w.name, "via router", c], strict=True)
            )
            for c in CONCURRENCIES
        }
        headline[w.name] = (
            statistics.median(r.p50_ms - d.p50_ms for d, r in pairs[1]),
            statistics.median(r.rps / d.rps for d, r in pairs[16] if d.rps),
        )
    return rows, headline


def _split_rows(workloads: Sequence[Workload], results: Runs, splits: Splits) -> list[list[str]]:
    """Where the added time goes at concurrency 1, from each direct/router pair of runs
    and the router's own timers during the router run (means, so the parts add up to
    the added mean; the median over pairs of each)."""
    parts: dict[str, list[list[float]]] = {}
    for w in workloads:
        pairs = zip(
            results[w.name, "direct", 1],
            results[w.name, "via router", 1],
            splits[w.name],
            strict=True,
        )
        for direct, routed, split in pairs:
            parts.setdefault(w.name, []).append(
                [
                    routed.mean_ms - split.handler,
                    split.handler - split.upstream - split.audit,
                    split.audit,
                    split.upstream - direct.mean_ms,
                    routed.mean_ms - direct.mean_ms,
                ]
            )
    labels = [
        "grpc: the front door's server side and the client's extra leg",
        "the router's own work: auth, facts, policy, metrics",
        "the audit record's commit, before the reply",
        "the upstream leg: router->node minus client->node",
        "added mean latency",
    ]
    rows = []
    for i, label in enumerate(labels):
        cells = [f"{statistics.median(run[i] for run in parts[w.name]):+.2f}" for w in workloads]
        rows.append([label, *cells])
    return rows


def _verdict(name: str, added: float, ratio: float) -> list[str]:
    ok_p50 = added <= TARGET_ADDED_P50_MS
    ok_ratio = ratio >= TARGET_RATIO
    return [
        f"targets ({name}; median over back-to-back direct/router pairs):",
        f"  added p50 at c=1   {added:+.3f} ms  (target <= {TARGET_ADDED_P50_MS:.2f} ms): "
        f"{'MET' if ok_p50 else 'NOT MET'}",
        f"  ratio at c=16      {ratio:.3f}      (target >= {TARGET_RATIO:.2f}):    "
        f"{'MET' if ok_ratio else 'NOT MET'}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one run")
    parser.add_argument("--runs", type=int, default=3, help="runs per configuration (median)")
    parser.add_argument(
        "--keep", type=Path, metavar="DIR", help="work in DIR and keep it (logs, configs)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        _run(root, args.seconds, args.runs)


def _run(root: Path, seconds: float, runs: int) -> None:
    pki, models, logs = prepare(root)
    token = secrets.token_urlsafe(24)
    env = {**os.environ, TOKEN_ENV: token, "PYTHONUNBUFFERED": "1"}
    onprem, cloud, router = (f"127.0.0.1:{free_port()}" for _ in range(3))
    policy = render_policy(root, onprem, cloud)
    metrics = f"127.0.0.1:{free_port()}"
    config = write_router_config(root, pki, policy, router, metrics)
    children = [
        Child("node-1", node_args(models, pki, onprem), logs, env),
        Child("cloud-1", node_args(models, pki, cloud, onprem=False), logs, env),
    ]
    try:
        for child in children:
            child.wait_ready("node ready on")
        routerp = Child("router", ["router", "serve", "--config", str(config)], logs, env)
        children.append(routerp)
        routerp.wait_ready("router ready on")
        as_router = channel_credentials(pki / "ca.pem", pki / "router.pem", pki / "router.key")
        as_app = channel_credentials(pki / "ca.pem", pki / f"app-{APP}.pem", pki / f"app-{APP}.key")
        server_tls = channel_credentials(pki / "ca.pem")
        workloads = [
            Workload(
                "iris confidential",
                iris_payloads(),
                direct=Target(onprem, as_router, (), server_name="node"),
                routed=Target(router, as_app, (("x-data-classification", "confidential"),)),
                zone="onprem",
            ),
            Workload(
                "ticket public",
                _ticket_payloads(),
                direct=Target(
                    cloud, server_tls, (("authorization", f"Bearer {token}"),), server_name="cloud"
                ),
                routed=Target(router, as_app, (("x-data-classification", "public"),)),
                zone="cloud",
            ),
        ]
        pids = [child.proc.pid for child in children]
        before, started = _busy_seconds(pids), time.monotonic()
        metrics_url = f"http://{metrics}/metrics"
        results, splits = asyncio.run(_measure(workloads, seconds, runs, metrics_url))
        after, elapsed = _busy_seconds(pids), time.monotonic() - started
    finally:
        for child in reversed(children):
            child.stop()
    rows, headline = _report(workloads, results)
    print()
    print(
        f"router hop, one node process per pool, mTLS everywhere, default policy, "
        f"node batching at its defaults; median of {runs} x {seconds:g} s after 0.5 s warm-up"
    )
    print(
        table(
            [
                "workload",
                "path",
                "concurrency",
                "req/s",
                "p50 ms",
                "p99 ms",
                "errors",
                "added p50 ms",
                "ratio",
                "req/s of runs",
            ],
            rows,
        )
    )
    print()
    print("where the added time goes at concurrency 1, ms (means; median over pairs of runs):")
    print(table(["part", *(w.name for w in workloads)], _split_rows(workloads, results, splits)))
    print()
    added, ratio = headline["iris confidential"]
    for line in _verdict("iris confidential, on-prem", added, ratio):
        print(line)
    print("reference points (one hop in front of a bare grpc.aio server, references.md):")
    for name, ref_added, ref_ratio in REFERENCES:
        print(f"  {name:<26} added p50 {ref_added:+.2f} ms, ratio at c=16 {ref_ratio:.2f}")
    if before is not None and after is not None:
        others = max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / elapsed
        note = "  (results are noisy: rerun on a quiet machine)" if others > 0.15 else ""
        print(f"other processes used {others:.2f} of {os.cpu_count()} cores meanwhile{note}")


if __name__ == "__main__":
    main()
