"""Shadow copies: mirror a share of a model's requests to a candidate version, compare.

A copy is decided once the serving reply is in hand (`reserve`), recorded in that
request's audit record (pool, zone, candidate version), and sent (`send`) only after
the record is committed, from a task of its own: so the trail says where every copy
went before it goes, and a copy can neither delay nor fail the caller's reply. A copy
whose record cannot be committed is never sent (`release`). It has its own deadline
(the policy's `timeout`), at most `max_in_flight` copies of one rollout run at once,
and a copy that would exceed that is dropped and counted instead of queued (and not
recorded as mirrored).

The zone guard (invariant 1) is applied twice: `reserve` refuses to mirror a
sensitive request to a pool outside the on-prem zone, and the forwarder's `mirror`
checks the endpoint it picks, so a sensitive request is never mirrored outside the
on-prem zone even under a policy that skipped the load checks. The copy goes to an
endpoint of the recorded pool only while that pool is still in the recorded zone (a
reload that moved it refuses the copy), so the record stays true. The candidate's
reply is compared with the serving one (`outputs_agree`) and discarded.

Everything a copy does is counted in the router's metrics (by route, model, candidate
version and result), and `rollout_stats` reads those same counters back for
`hybridroute status`, so the status and the dashboard cannot disagree.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from hybridroute.router.forward import Forwarder, RouterError, ZoneGuardRefusal
from hybridroute.router.metrics import RouterMetrics
from hybridroute.router.rollout import Rollout, ShadowPlan, outputs_agree

if TYPE_CHECKING:
    from hybridroute.router.policy.schema import Policy

__all__ = ["RESULTS", "Reservation", "RolloutStats", "ShadowStats", "Shadows", "rollout_stats"]

log = logging.getLogger(__name__)

_METHOD = "/inference.GRPCInferenceService/ModelInfer"
RESULTS = ("agreed", "disagreed", "failed", "dropped", "refused", "no_endpoint")
_Key = tuple[str, str]  # (route, model)
_ONPREM = "onprem"
# Replies up to this size (both together) are compared on the event loop, larger ones
# in a worker thread: a million elements take the comparison hundreds of milliseconds.
_INLINE_COMPARE_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class Reservation:
    """A copy decided and counted in flight, not yet sent: its request's audit record
    names `plan.pool`, `plan.zone` and `plan.version`; `send` or `release` it."""

    plan: ShadowPlan
    key: _Key
    labels: tuple[str, str, str]  # route, model, candidate version


class Shadows:
    """The router's shadow copies in flight; `close()` cancels them at shutdown."""

    def __init__(self, forwarder: Forwarder, metrics: RouterMetrics) -> None:
        self._forwarder = forwarder
        # The forwarder's pools: `send` checks the recorded pool is still in the
        # recorded zone right before the forwarder picks an endpoint of it.
        self._pools = forwarder._pools
        self._metrics = metrics
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight: dict[_Key, int] = {}

    def reserve(self, rollout: Rollout, *, onprem_only: bool) -> Reservation | None:
        """Decide one copy to the rollout's candidate: a slot in flight, or None (the
        copy is counted as refused or dropped, and the request is not mirrored)."""
        plan = rollout.shadow
        assert plan is not None
        labels = (rollout.route, rollout.model, plan.version)
        if onprem_only and plan.zone != _ONPREM:  # invariants 1-2, before anything is recorded
            log.error(
                "refusing to mirror a sensitive or unmatched request to %s pool %s (route %s)",
                plan.zone,
                plan.pool,
                rollout.route,
            )
            self._metrics.shadow_requests.labels(*labels, "refused").inc()
            return None
        key = (rollout.route, rollout.model)
        running = self._in_flight.get(key, 0)
        if running >= plan.max_in_flight:
            self._metrics.shadow_requests.labels(*labels, "dropped").inc()
            return None
        self._in_flight[key] = running + 1
        self._metrics.shadow_in_flight.inc()
        return Reservation(plan, key, labels)

    def send(
        self,
        reservation: Reservation,
        raw: bytes,
        *,
        serving: bytes,
        serving_seconds: float,
        onprem_only: bool,
        metadata: Sequence[tuple[str, str]],
    ) -> None:
        """Start the reserved copy of `raw` (after its record is committed); returns at
        once."""
        plan = reservation.plan
        copy = _Copy(
            plan, reservation.labels, raw + plan.field, serving, serving_seconds, onprem_only
        )
        task = asyncio.create_task(self._run(copy, (*metadata, ("x-hybridroute-shadow", "1"))))
        self._tasks.add(task)
        task.add_done_callback(self._finished(reservation.key))

    def release(self, reservation: Reservation) -> None:
        """Give up a reserved copy unsent (its record could not be committed)."""
        self._release(reservation.key)
        self._metrics.shadow_requests.labels(*reservation.labels, "dropped").inc()

    def _release(self, key: _Key) -> None:
        self._in_flight[key] -= 1
        self._metrics.shadow_in_flight.dec()

    def _finished(self, key: _Key) -> Callable[[asyncio.Task[None]], None]:
        def done(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            self._release(key)
            if not task.cancelled() and (exc := task.exception()) is not None:
                log.error("shadow copy failed unexpectedly (%s)", type(exc).__name__)

        return done

    def _moved(self, plan: ShadowPlan) -> bool:
        """Whether the recorded pool is now in another zone than the record says (a
        reload changed it since the decision). A pool that is gone is the forwarder's
        to report (no endpoint)."""
        try:
            zone = self._pools.get(plan.pool).zone
        except KeyError:
            return False
        return zone != plan.zone

    async def _run(self, copy: _Copy, metadata: Sequence[tuple[str, str]]) -> None:
        plan, route = copy.plan, copy.labels[0]
        started = time.perf_counter()
        try:
            if self._moved(plan):  # no await from here to the forwarder's pick
                log.error(
                    "not mirroring to pool %s: it is no longer in zone %s (route %s)",
                    plan.pool,
                    plan.zone,
                    route,
                )
                raise ZoneGuardRefusal()
            reply = await self._forwarder.mirror(
                _METHOD,
                copy.request,
                pool=plan.pool,
                route=route,
                onprem_only=copy.onprem_only,
                timeout=plan.timeout,
                metadata=metadata,
            )
        except ZoneGuardRefusal:
            result = "refused"
        except RouterError:
            result = "no_endpoint"
        except grpc.aio.AioRpcError:
            result = "failed"
        else:
            elapsed = time.perf_counter() - started
            if len(reply) + len(copy.serving) > _INLINE_COMPARE_BYTES:
                # Off the event loop: other requests' replies must not wait for it.
                agreed = await asyncio.to_thread(outputs_agree, copy.serving, reply, plan.compare)
            else:
                agreed = outputs_agree(copy.serving, reply, plan.compare)
            result = "agreed" if agreed else "disagreed"
            self._metrics.shadow_latency.labels(*copy.labels, "candidate").observe(elapsed)
            self._metrics.shadow_latency.labels(*copy.labels, "serving").observe(
                copy.serving_seconds
            )
        self._metrics.shadow_requests.labels(*copy.labels, result).inc()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@dataclass(frozen=True, slots=True)
class _Copy:
    plan: ShadowPlan
    labels: tuple[str, str, str]  # route, model, candidate version
    request: bytes  # the caller's bytes with the candidate's version appended
    serving: bytes  # the reply the caller got
    serving_seconds: float
    onprem_only: bool


# --- what `hybridroute status` shows ---------------------------------------------------


@dataclass(frozen=True)
class ShadowStats:
    version: str
    percent: float
    pool: str
    counts: dict[str, int]  # RESULTS -> copies
    agreement_rate: float | None  # agreed / (agreed + disagreed); None before any
    latency_difference_ms: float | None  # mean candidate - mean serving upstream time


@dataclass(frozen=True)
class RolloutStats:
    route: str
    model: str
    split: list[tuple[str, int, int]]  # (version, weight, requests sent since start)
    shadow: ShadowStats | None


def rollout_stats(policy: Policy, metrics: RouterMetrics) -> list[RolloutStats]:
    """The live policy's rollouts with what the router counted for them since it
    started (counts survive reloads: they are keyed by route, model and version)."""
    value = metrics.registry.get_sample_value
    out = []
    for (route, model), rollout in sorted(policy.rollouts.items()):
        split = [
            (
                v,
                w,
                int(
                    value(
                        "hybridroute_router_rollout_requests_total",
                        {"route": route, "model": model, "version": v},
                    )
                    or 0
                ),
            )
            for v, w in zip(rollout.versions, rollout.weights, strict=True)
        ]
        plan = rollout.shadow
        shadow = None if plan is None else _shadow_stats(metrics, route, model, plan)
        out.append(RolloutStats(route, model, split, shadow))
    return out


def _shadow_stats(metrics: RouterMetrics, route: str, model: str, plan: ShadowPlan) -> ShadowStats:
    value = metrics.registry.get_sample_value
    labels = {"route": route, "model": model, "version": plan.version}
    counts = {
        r: int(value("hybridroute_router_shadow_requests_total", {**labels, "result": r}) or 0)
        for r in RESULTS
    }
    compared = counts["agreed"] + counts["disagreed"]
    sums = {
        role: value("hybridroute_router_shadow_upstream_seconds_sum", {**labels, "role": role})
        or 0.0
        for role in ("candidate", "serving")
    }
    return ShadowStats(
        version=plan.version,
        percent=plan.share * 100,
        pool=plan.pool,
        counts=counts,
        agreement_rate=counts["agreed"] / compared if compared else None,
        latency_difference_ms=(
            (sums["candidate"] - sums["serving"]) / compared * 1000 if compared else None
        ),
    )
