"""Active and passive health of upstream endpoints.

Why the router checks on its own: a pick must never land on an endpoint that cannot
answer, and a sensitive request has nowhere else to go but another on-prem node, so
the router has to know *before* the request which nodes are up. Each endpoint gets one
task that calls `grpc.health.v1.Health/Check` (service "") over the endpoint's own
channel, so the check exercises the same mutual TLS, name check and bearer token as
real traffic: a node whose certificate the router would refuse is never healthy.

The state machine (per endpoint, thresholds per pool):

- a new endpoint is unhealthy until its first check; one passing check admits it
  (there is no failure history to outlive, and startup should not wait for
  `healthy_threshold` intervals);
- a healthy endpoint turns unhealthy after `unhealthy_threshold` consecutive failures,
  or at once when the forwarder reports a connection failure or UNAVAILABLE
  (passive ejection);
- an unhealthy endpoint is readmitted after `healthy_threshold` consecutive passes.
  A check that was already in flight when a passive ejection happened does not count:
  it says nothing about the failure it raced with.

Only SERVING passes; NOT_SERVING, UNKNOWN, SERVICE_UNKNOWN, deadlines and any RPC error
fail. Transitions are logged once each (INFO up, WARNING down), never per interval.

A check cannot see every cause of its failure: a node refusing the router's expired
client certificate only fails the handshake. The monitor's `diagnose` hook names a
cause the router knows of on its own side; it runs after every check (so it can also
notice the moment such a cause appears) and goes in front of a failed check's reason.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import grpc
from grpc_health.v1 import health_pb2

__all__ = [
    "Diagnose",
    "HealthMonitor",
    "HealthSettings",
    "HealthState",
    "Monitored",
    "OnChange",
    "check_once",
]

log = logging.getLogger(__name__)

_CHECK_METHOD = "/grpc.health.v1.Health/Check"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_MAX_REASON = 300  # grpc error strings can be long; status output wants one line
_JITTER = 0.1  # +-10% of the interval, so many routers do not probe in lockstep


@dataclass(frozen=True)
class HealthSettings:
    """How one pool's endpoints are checked. Durations in seconds."""

    interval: float = 1.0
    timeout: float = 0.5
    healthy_threshold: int = 1
    unhealthy_threshold: int = 2

    def __post_init__(self) -> None:
        if self.interval <= 0 or self.timeout <= 0:
            raise ValueError("health interval and timeout must be positive")
        if self.healthy_threshold < 1 or self.unhealthy_threshold < 1:
            raise ValueError("health thresholds must be at least 1")


class HealthState:
    """What is known about one endpoint's health; mutated only by `HealthMonitor`."""

    def __init__(self) -> None:
        self.healthy = False  # fail closed: nothing is picked before it has passed a check
        self.last_error: str | None = None
        self.last_check: float | None = None  # time.monotonic() of the last active result
        self.checks_passed = 0
        self.checks_failed = 0
        self.epoch = 0  # bumped by every passive ejection
        self._fresh = True
        self._passes = 0  # consecutive
        self._failures = 0  # consecutive

    def record(self, error: str | None, settings: HealthSettings) -> bool | None:
        """Count one active check result; return the new health on a transition."""
        self.last_check = time.monotonic()
        fresh, self._fresh = self._fresh, False
        if error is None:
            self.checks_passed += 1
            self._passes, self._failures = self._passes + 1, 0
            self.last_error = None
            if not self.healthy and (fresh or self._passes >= settings.healthy_threshold):
                self.healthy = True
                return True
            return None
        self.checks_failed += 1
        self._passes, self._failures = 0, self._failures + 1
        self.last_error = error
        if self.healthy and self._failures >= settings.unhealthy_threshold:
            self.healthy = False
            return False
        return None

    def eject(self, reason: str) -> bool:
        """Mark unhealthy now (passive); True when this was a transition."""
        self.epoch += 1
        self._fresh = False
        self._passes = 0
        self.last_error = reason
        was, self.healthy = self.healthy, False
        return was


class Monitored(Protocol):
    """What the monitor needs from an endpoint (`pools.Endpoint` is one)."""

    @property
    def address(self) -> str: ...
    @property
    def pool(self) -> str: ...
    @property
    def zone(self) -> str: ...
    @property
    def channel(self) -> grpc.aio.Channel: ...
    @property
    def call_metadata(self) -> tuple[tuple[str, str], ...]: ...
    @property
    def health(self) -> HealthState: ...


OnChange = Callable[[Monitored, bool], None]
Diagnose = Callable[[Monitored], str | None]


def _reason(exc: grpc.aio.AioRpcError) -> str:
    text = f"{exc.code().name}: {exc.details() or ''}".strip().rstrip(":")
    return " ".join(text.split())[:_MAX_REASON]


async def check_once(
    channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...], deadline: float
) -> str | None:
    """One Health/Check of service "" within `deadline` seconds; None when SERVING, else
    why it failed."""
    call = channel.unary_unary(
        _CHECK_METHOD,
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    try:
        reply = await call(
            health_pb2.HealthCheckRequest(service=""), timeout=deadline, metadata=metadata
        )
    except grpc.aio.AioRpcError as exc:
        return _reason(exc)
    except Exception as exc:  # a dying check task would freeze the endpoint's state
        return f"health check error: {type(exc).__name__}"
    if reply.status != _SERVING:
        return f"health status {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


class _Watch:
    """One endpoint's checking task and its current (reloadable) settings."""

    def __init__(self, settings: HealthSettings) -> None:
        self.settings = settings
        self.task: asyncio.Task[None] | None = None


class HealthMonitor:
    """Runs one check task per endpoint and applies passive ejections."""

    def __init__(self, on_change: OnChange | None = None, diagnose: Diagnose | None = None) -> None:
        self._on_change = on_change
        self._diagnose = diagnose
        self._watches: dict[Monitored, _Watch] = {}
        self._result = asyncio.Event()  # set (and replaced) after every active result

    def watch(self, target: Monitored, settings: HealthSettings) -> None:
        """Start checking `target` now (its first check runs without delay)."""
        if target in self._watches:
            self.update(target, settings)
            return
        entry = _Watch(settings)
        entry.task = asyncio.create_task(
            self._run(target, entry), name=f"health {target.pool} {target.address}"
        )
        self._watches[target] = entry

    def update(self, target: Monitored, settings: HealthSettings) -> None:
        """New settings take effect from the next check; state and counters stay."""
        self._watches[target].settings = settings

    def stop_watching(self, target: Monitored) -> asyncio.Task[None] | None:
        """Stop checking `target` without waiting: its task, cancelled (None if it had
        none). Nothing it does from now on reports a change."""
        entry = self._watches.pop(target, None)
        if entry is None or entry.task is None:
            return None
        entry.task.cancel()
        return entry.task

    async def unwatch(self, target: Monitored) -> None:
        """Stop checking `target`, once its task has ended. A cancellation of the caller
        meanwhile (the router stopping during a reload) still reaches the caller."""
        task = self.stop_watching(target)
        if task is not None:
            await asyncio.wait({task})

    async def close(self) -> None:
        for target in list(self._watches):
            await self.unwatch(target)

    async def next_result(self) -> None:
        """Wait for the next active check result of any endpoint."""
        await self._result.wait()

    def eject(self, target: Monitored, reason: str) -> None:
        """Passive ejection: unhealthy at once; only active checks readmit it."""
        if target.health.eject(reason):
            self._changed(target, False, reason)

    async def _run(self, target: Monitored, entry: _Watch) -> None:
        while True:
            settings = entry.settings
            started = time.monotonic()
            epoch = target.health.epoch
            error = await check_once(target.channel, target.call_metadata, settings.timeout)
            cause = self._cause(target)
            if error is not None and cause is not None:
                error = f"{cause}; {error}"[:_MAX_REASON]
            if target.health.epoch == epoch:
                change = target.health.record(error, settings)
                if change is not None:
                    self._changed(target, change, error)
                self._result.set()
                self._result = asyncio.Event()
            jitter = 1 + random.uniform(-_JITTER, _JITTER)
            await asyncio.sleep(max(0.0, started + settings.interval * jitter - time.monotonic()))

    def _cause(self, target: Monitored) -> str | None:
        if self._diagnose is None:
            return None
        try:
            return self._diagnose(target)
        except Exception:  # like on_change: never the end of an endpoint's checks
            log.exception("health diagnose hook failed")
            return None

    def _changed(self, target: Monitored, healthy: bool, reason: str | None) -> None:
        if healthy:
            log.info("endpoint %s (pool %s) is healthy", target.address, target.pool)
        else:
            log.warning(
                "endpoint %s (pool %s) is UNHEALTHY: %s", target.address, target.pool, reason
            )
        if self._on_change is None:
            return
        try:
            self._on_change(target, healthy)
        except Exception:  # a metrics hook must not stop health checking
            log.exception("health on_change callback failed")
