"""Prometheus metrics of a router, in a registry of its own (as the node's are).

Label values are kept to bounded vocabularies, so a caller cannot grow the registry
(or smuggle a value into it, invariant 4): routes, zones and pools come from the
policy, decisions and codes are closed sets, and a model is named only when the
policy names it exactly or a node has answered it (see `ModelLabels`); any other
model name is counted as `_other`. deploy/ builds its dashboard and alerts on these
names, and tests/test_deploy_files.py checks that every name it uses exists.

The audit trail's own metrics (commit time, batch size, failing, queue depth) are in
`audit.metrics`, in this same registry.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:
    from hybridroute.router.audit.events import AuditEvent
    from hybridroute.router.policy.schema import Policy

__all__ = ["OTHER_MODEL", "ModelLabels", "RouterMetrics", "policy_models"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# The audit wait is a fraction of a millisecond when the disk is healthy.
_WAIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0, 5.0)
OTHER_MODEL = "_other"


def policy_models(policy: Policy) -> set[str]:
    """The model names `policy` spells out exactly: rollout models and rule `model:`
    entries without wildcards."""
    names = {model for _route, model in policy.rollouts}
    for rule in policy.rules:
        for pattern in rule.spec.match.model or ():
            if not any(ch in pattern for ch in "*?["):
                names.add(pattern)
    return names


class ModelLabels:
    """Which model names may appear as a label value.

    A name is known when the live policy names it exactly or a node has served a
    ModelInfer for it (nodes know their models; a made-up name gets NOT_FOUND and never
    becomes known, so no caller-chosen text reaches a label). At most `limit` names
    are learnt from replies.
    """

    def __init__(self, limit: int = 64) -> None:
        self._policy: frozenset[str] = frozenset()
        self._served: set[str] = set()
        self._limit = limit

    def set_policy(self, names: Iterable[str]) -> None:
        self._policy = frozenset(names)

    def label(self, model: str, answered: bool) -> str:
        """`model`, or `_other` if it is not known; `answered`: a node just served it."""
        if model in self._policy or model in self._served:
            return model
        if answered and model and len(self._served) < self._limit:
            self._served.add(model)
            return model
        return OTHER_MODEL


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.models = ModelLabels()
        self._counters: dict[tuple[str, ...], Counter] = {}  # labels() costs ~2 us; this 0.1
        self._histograms: dict[str, Histogram] = {}
        self._upstreams: dict[str, Histogram] = {}
        self._add_requests()
        self._add_rollouts()

    def _add_requests(self) -> None:
        self.requests = Counter(
            "hybridroute_router_requests",
            "Requests by route, zone, pool, model, decision (routed, denied, rejected) "
            "and gRPC status code",
            ["route", "zone", "pool", "model", "decision", "code"],
            registry=self.registry,
        )
        self.sensitive = Counter(
            "hybridroute_router_sensitive_requests",
            "Requests the engine judged sensitive (kept on-prem or denied), by route; "
            "divided by hybridroute_router_requests_total: the sensitive share",
            ["route"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "hybridroute_router_request_duration_seconds",
            "Time from the router taking up a request to releasing its reply (upstream "
            "calls and the audit commit included), by route",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.upstream = Histogram(
            "hybridroute_router_upstream_duration_seconds",
            "Time of each call to an upstream endpoint (each attempt of a retried request), "
            "by pool: the node's or cloud's share of hybridroute_router_request_duration",
            ["pool"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.audit_wait = Histogram(
            "hybridroute_router_audit_wait_seconds",
            "Time a reply waited for its audit record to be committed (queue, group "
            "commit, fsync): what recording every decision before replying costs a request",
            buckets=_WAIT_BUCKETS,
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
            "Policy load attempts (the first one included) by result (accepted, refused)",
            ["result"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "hybridroute_router_in_flight_requests",
            "Requests received and not yet answered",
            registry=self.registry,
        )

    def _add_rollouts(self) -> None:
        self.rollout_requests = Counter(
            "hybridroute_router_rollout_requests",
            "Requests a canary split sent to a model version, by route; version "
            '"missing": the drawn version was not on the node, so its default answered',
            ["route", "model", "version"],
            registry=self.registry,
        )
        self.shadow_requests = Counter(
            "hybridroute_router_shadow_requests",
            "Shadow copies to a candidate version by result: agreed, disagreed (with the "
            "serving reply), failed (error or timeout), dropped (too many in flight), "
            "refused (zone guard), no_endpoint",
            ["route", "model", "version", "result"],
            registry=self.registry,
        )
        self.shadow_latency = Histogram(
            "hybridroute_router_shadow_upstream_seconds",
            "Upstream time of compared shadow copies (role=candidate) and of the serving "
            "calls they copied (role=serving); the difference of the means is the "
            "candidate's latency cost",
            ["route", "model", "version", "role"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.shadow_in_flight = Gauge(
            "hybridroute_router_shadow_in_flight",
            "Shadow copies sent and not yet answered",
            registry=self.registry,
        )

    def observe(self, event: AuditEvent, seconds: float) -> None:
        """Count one answered request that took `seconds` to its reply's release.

        The counts come from its audit event, so metrics and the trail agree on what
        happened (route, zone, pool, model, outcome, code). They do not agree on how
        long it took: `seconds` runs until the reply is released, the audit commit
        included, while the record's `latency_ms` stops before that commit (a record
        cannot hold the time of its own commit). The difference is that wait,
        `hybridroute_router_audit_wait_seconds`."""
        # Only a ModelInfer a node answered (it has a served version) proves the model
        # exists: a node answers ModelReady for any name, OK with ready=false.
        served = event.code == "OK" and event.outcome == "routed" and bool(event.served_version)
        model = self.models.label(event.model, served)
        key = (event.route, event.zone, event.pool, model, event.outcome, event.code)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self.requests.labels(*key)
        counter.inc()
        histogram = self._histograms.get(event.route)
        if histogram is None:
            histogram = self._histograms[event.route] = self.latency.labels(event.route)
        histogram.observe(seconds)
        if event.sensitive:
            self.sensitive.labels(event.route).inc()

    def observe_upstream(self, pool: str, seconds: float) -> None:
        histogram = self._upstreams.get(pool)
        if histogram is None:
            histogram = self._upstreams[pool] = self.upstream.labels(pool)
        histogram.observe(seconds)

    def serve(self, host: str, port: int) -> int:
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_address[1])
