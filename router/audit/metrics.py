"""Prometheus metrics of the audit trail, in the router's registry.

Operators watch these to see the trail's cost (commit time, batch size) and its
health (failing, backlog) before it turns into refused requests.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["AuditMetrics"]

_COMMIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class AuditMetrics:
    def __init__(
        self,
        registry: CollectorRegistry,
        failing: Callable[[], object],
        queue_depth: Callable[[], int] = lambda: 0,
    ) -> None:
        self.records = Counter(
            "hybridroute_audit_records",
            "Audit records committed",
            registry=registry,
        )
        self.commit = Histogram(
            "hybridroute_audit_commit_seconds",
            "Time to commit one audit transaction (group commit, fsync included)",
            buckets=_COMMIT_BUCKETS,
            registry=registry,
        )
        self.batch = Histogram(
            "hybridroute_audit_batch_records",
            "Records per audit transaction",
            buckets=_BATCH_BUCKETS,
            registry=registry,
        )
        failing_gauge = Gauge(
            "hybridroute_audit_failing",
            "1 while the audit trail cannot be written (requests are refused)",
            registry=registry,
        )
        failing_gauge.set_function(lambda: 1.0 if failing() else 0.0)
        depth_gauge = Gauge(
            "hybridroute_audit_queue_depth",
            "Entries waiting for the writer thread (a growing queue: commits fall behind)",
            registry=registry,
        )
        depth_gauge.set_function(lambda: float(queue_depth()))

    def observe(self, records: int, seconds: float) -> None:
        """Called by the writer thread after each commit."""
        if records:
            self.records.inc(records)
            self.batch.observe(records)
        self.commit.observe(seconds)
