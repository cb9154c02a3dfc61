"""Prometheus metrics of a router, in a registry of its own (as the node's are)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["RouterMetrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "hybridroute_router_requests",
            "Requests by route, zone, decision and gRPC status code",
            ["route", "zone", "decision", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "hybridroute_router_request_duration_seconds",
            "Time from a request's arrival at the router to its reply, by route",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.upstream_retries = Counter(
            "hybridroute_router_upstream_retries",
            "Requests retried on another endpoint after UNAVAILABLE",
            ["pool"],
            registry=self.registry,
        )
        self.endpoint_healthy = Gauge(
            "hybridroute_router_endpoint_healthy",
            "1 when the endpoint passes its health checks",
            ["pool", "zone", "endpoint"],
            registry=self.registry,
        )
        self.policy_reloads = Counter(
            "hybridroute_router_policy_reloads",
            "Policy reload attempts by result (accepted or refused)",
            ["result"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "hybridroute_router_in_flight_requests",
            "Requests received and not yet answered",
            registry=self.registry,
        )

    def serve(self, host: str, port: int) -> int:
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_address[1])
