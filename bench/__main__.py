"""`make bench`: every benchmark in turn, each printing its own table."""

from __future__ import annotations

import runpy
import sys

BENCHMARKS = [
    "bench.bench_detectors",
    "bench.bench_node",
    "bench.bench_router",
    "bench.bench_audit",
]

if __name__ == "__main__":
    for name in BENCHMARKS:
        print(f"\n=== {name}", flush=True)
        sys.argv = [name]
        runpy.run_module(name, run_name="__main__")
