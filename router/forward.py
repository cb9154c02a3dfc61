"""Forwarding a decided request upstream: pick, send the original bytes, retry once.

The request travels as the bytes that arrived (a generic call with no serializer), so
the router never re-encodes what it forwards. A request that fails with UNAVAILABLE
before any response is retried once on another healthy endpoint the decision allows
(the same pool first, then the decision's fallback routes, which the engine already
limited to zones the request may use), within the caller's deadline.

The last line of defence for invariant 1 is here too: an endpoint outside the
on-prem zone is never called for a sensitive request, whatever the decision says.
Shadow copies (`mirror`) pass the same check, so a policy object that slipped past
the load-time checks still cannot mirror a sensitive request out of the on-prem zone.

A canary split hands `forward` the request with its version set (`versioned`); only
endpoints of the decided route get it, since a fallback route's pool need not have
that version: a fallback gets the request as the caller sent it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from hybridroute.router.metrics import RouterMetrics
from hybridroute.router.policy.engine import Decision
from hybridroute.router.policy.schema import Policy
from hybridroute.router.pools import Endpoint, Pools

__all__ = ["Forwarded", "Forwarder", "RouterError", "ZoneGuardRefusal", "zone_guard"]

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 2  # the first try and one retry


class RouterError(Exception):
    """An error the router answers with: a status code and a message without values."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ZoneGuardRefusal(RouterError):
    """A sensitive request was about to leave the on-prem zone; nothing was sent."""

    def __init__(self) -> None:
        super().__init__(grpc.StatusCode.INTERNAL, "routing refused by the zone guard")


def zone_guard(onprem_only: bool, endpoint: Endpoint, route: str, what: str = "request") -> None:
    """Raise ZoneGuardRefusal unless `endpoint` may receive this request (invariants 1
    and 2: `onprem_only` is a sensitive request's, or one no rule matched)."""
    if onprem_only and endpoint.zone != "onprem":
        log.error(
            "refusing to send a sensitive or unmatched %s to %s endpoint %s (route %s)",
            what,
            endpoint.zone,
            endpoint.address,
            route,
        )
        raise ZoneGuardRefusal()


@dataclass(frozen=True, slots=True)
class Forwarded:
    """The reply, and the endpoint and route that gave it (every endpoint tried is in
    the caller's `tried` list)."""

    reply: bytes
    endpoint: Endpoint
    route: str


class Forwarder:
    def __init__(self, pools: Pools, metrics: RouterMetrics) -> None:
        self._pools = pools
        self._metrics = metrics

    def _pick(
        self, policy: Policy, routes: Sequence[str], exclude: Sequence[Endpoint]
    ) -> tuple[str, Endpoint] | None:
        for route in routes:
            try:
                pool = self._pools.get(policy.routes[route].pool)
            except KeyError:  # a reload removed the pool this request was decided for
                continue
            endpoint = pool.pick(exclude)
            if endpoint is not None:
                return route, endpoint
        return None

    async def forward(
        self,
        method: str,
        raw: bytes,
        policy: Policy,
        decision: Decision,
        *,
        deadline: float | None,
        metadata: Sequence[tuple[str, str]],
        versioned: bytes | None = None,
        tried: list[Endpoint] | None = None,
    ) -> Forwarded:
        """`deadline` is on `time.monotonic()`'s clock (None: the caller set none);
        `versioned`: `raw` with a canary version set, for the decided route only.
        `tried` (the caller's list) gets every endpoint the request is sent to, in
        order, so that however this ends (reply, error, cancellation) the caller
        can record where the request's data went."""
        assert decision.route is not None
        routes = (decision.route, *decision.fallbacks)
        tried = [] if tried is None else tried
        while True:
            picked = self._pick(policy, routes, tried)
            if picked is None:
                pools = ", ".join(f"'{policy.routes[r].pool}'" for r in routes)
                raise RouterError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"no healthy endpoint for route '{decision.route}' (pools {pools})",
                )
            route, endpoint = picked
            zone_guard(decision.onprem_only, endpoint, route)
            tried.append(endpoint)
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                raise RouterError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
            body = versioned if versioned is not None and route == decision.route else raw
            started = time.perf_counter()
            try:
                reply = await self._call(endpoint, method, body, timeout, metadata)
            except grpc.aio.AioRpcError as exc:
                self._metrics.observe_upstream(endpoint.pool, time.perf_counter() - started)
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                self._pools.report_failure(endpoint, "UNAVAILABLE")
                if len(tried) >= MAX_ATTEMPTS:
                    raise
                self._metrics.upstream_retries.labels(endpoint.pool).inc()
                continue
            self._metrics.observe_upstream(endpoint.pool, time.perf_counter() - started)
            return Forwarded(reply, endpoint, route)

    async def mirror(
        self,
        method: str,
        raw: bytes,
        *,
        pool: str,
        route: str,
        onprem_only: bool,
        timeout: float,  # noqa: ASYNC109 - passed on to the upstream call
        metadata: Sequence[tuple[str, str]],
    ) -> bytes:
        """Send a shadow copy to one healthy endpoint of `pool`: no retry, and the zone
        guard first. Raises RouterError (ZoneGuardRefusal, no endpoint) or the call's
        grpc.aio.AioRpcError."""
        try:
            endpoint = self._pools.get(pool).pick()
        except KeyError:
            endpoint = None
        if endpoint is None:
            raise RouterError(grpc.StatusCode.UNAVAILABLE, f"no healthy endpoint in pool '{pool}'")
        zone_guard(onprem_only, endpoint, route, "shadow copy")
        return await self._call(endpoint, method, raw, timeout, metadata)

    @staticmethod
    async def _call(
        endpoint: Endpoint,
        method: str,
        raw: bytes,
        timeout: float | None,  # noqa: ASYNC109 - passed on to the upstream call
        metadata: Sequence[tuple[str, str]],
    ) -> bytes:
        call = endpoint.calls.get(method)
        if call is None:  # one multicallable per endpoint and method, bytes in, bytes out
            call = endpoint.calls[method] = endpoint.channel.unary_unary(method, None, None)
        with endpoint.track():
            reply: bytes = await call(
                raw, timeout=timeout, metadata=(*metadata, *endpoint.call_metadata)
            )
        return reply
