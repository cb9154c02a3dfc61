"""Prometheus metrics of a node, in a registry of its own.

A private registry (not prometheus_client's global one) keeps two nodes in one process,
as in tests, from colliding, and makes `/metrics` show only what this node owns.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["NodeMetrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "hybridroute_node_requests",
            "ModelInfer requests by model, version and gRPC status code",
            ["model", "version", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "hybridroute_node_request_duration_seconds",
            "Time from a ModelInfer request's arrival to its answer",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "hybridroute_node_batch_size",
            "Rows per estimator call",
            ["model", "version"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "hybridroute_node_queue_depth",
            "Requests waiting for a batch",
            ["model", "version"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "hybridroute_node_in_flight_requests",
            "ModelInfer requests received and not yet answered",
            registry=self.registry,
        )
        self.models_ready = Gauge(
            "hybridroute_node_model_ready",
            "1 when a model version is loaded and serving, else 0",
            ["model", "version"],
            registry=self.registry,
        )

        self._add_drift()

    def _add_drift(self) -> None:
        """Drift gauges (node/drift.py): present once a version has a verdict."""
        self.drift_statistic = Gauge(
            "hybridroute_node_drift_statistic",
            "Drift score of a feature (or of the predictions: feature '<prediction: OUTPUT>'): "
            "p-value (ks, chisquare, z) or distance (wasserstein, jensenshannon)",
            ["model", "version", "feature", "test"],
            registry=self.registry,
        )
        self.drift_detected = Gauge(
            "hybridroute_node_drift_detected",
            "1 when the feature's (or the predictions') live window drifted from the "
            "training baseline",
            ["model", "version", "feature", "test"],
            registry=self.registry,
        )
        self.drift_model = Gauge(
            "hybridroute_node_drift_model_detected",
            "1 when any feature or the predictions of the model version drifted "
            "(Bonferroni across them)",
            ["model", "version"],
            registry=self.registry,
        )
        self.drift_window = Gauge(
            "hybridroute_node_drift_window_rows",
            "Live rows in the drift window of a model version",
            ["model", "version"],
            registry=self.registry,
        )

    def serve(self, host: str, port: int) -> int:
        """Serve `/metrics` over HTTP in a background thread; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_address[1])
