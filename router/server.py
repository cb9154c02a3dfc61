"""Run a router: front door, admin API, its own health, policy reloads, shutdown.

`RouterServer` is used by `hybridroute router serve` and, in-process, by tests and
benchmarks; `run_router` adds signals: SIGHUP reloads the policy, SIGTERM/SIGINT stop.

The router's `grpc.health.v1` status is SERVING only once a valid policy is loaded,
every endpoint has had a health check, and the audit trail can be written.

The audit trail (`AuditStore`, built from the config's `audit:` section) is opened
before anything listens, and a router whose trail cannot be opened does not start.
Besides every decision (the front door's job) the router records its own life into
it, in the order things take effect: its start (configuration hash, certificate
fingerprints), every policy load and reload attempt (via the policy store's
`on_result` hook, so the record precedes any request the new policy decides), TLS
files changing on disk, and its stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from hybridroute.certs.credentials import server_credentials
from hybridroute.router.admin import AdminServicer
from hybridroute.router.audit.events import AuditNote, AuditSink, AuditUnavailable
from hybridroute.router.audit.notes import (
    CertWatch,
    newest_signed_policy,
    policy_note,
    start_note,
    stop_note,
)
from hybridroute.router.audit.store import AuditStore
from hybridroute.router.config import RouterConfig
from hybridroute.router.forward import Forwarder
from hybridroute.router.frontdoor import FrontDoor
from hybridroute.router.metrics import RouterMetrics, policy_models
from hybridroute.router.policy.schema import Policy
from hybridroute.router.policy.sessions import SessionPins
from hybridroute.router.policy.store import PolicyStore, ReloadResult
from hybridroute.router.pools import Endpoint, Pools, UpstreamTLS
from hybridroute.router.shadow import Shadows

__all__ = ["RouterServer", "run_router"]

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class RouterServer:
    """A router. `await start()` then `await stop()`; `port` is the bound port."""

    def __init__(
        self,
        config: RouterConfig,
        *,
        audit: AuditSink | None = None,
        insecure_upstream: bool = False,
    ) -> None:
        self.config = config
        self.metrics = RouterMetrics()
        self.audit: AuditSink = audit or AuditStore(config.audit, registry=self.metrics.registry)
        self._audit_open = False
        self._early_notes: list[AuditNote] = []  # policy results before the trail is open
        up = config.upstream
        self.pools = Pools(
            UpstreamTLS(up.ca, up.cert, up.key, up.cloud_ca, insecure=insecure_upstream),
            on_change=self._endpoint_changed,
            on_retire=self._endpoint_retired,
        )
        self.policies = PolicyStore.for_config(
            config,
            self._apply_policy,
            newest_signed=newest_signed_policy(config.audit.db),
            on_result=self._policy_result,
        )
        self.sessions = SessionPins(
            self.policies.current.sessions.pin_ttl, self.policies.current.sessions.max_sessions
        )
        self.started_at = time.time()
        self.port: int | None = None
        self.token_port: int | None = None
        self.metrics_port: int | None = None
        self._health = HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Future[None]] = set()
        self._serving = False
        self.shadows: Shadows | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self, *, wait_checked: float = 10.0) -> None:
        await self.audit.start()
        if isinstance(self.audit, AuditStore):
            self.audit.on_change = self._audit_changed
        try:
            await self._start_serving(wait_checked)
        except BaseException:
            await self.audit.close()  # seal what was written (a port in use, say)
            raise

    async def _start_serving(self, wait_checked: float) -> None:
        certs = CertWatch(self.config)
        await self.policies.start()
        forwarder = Forwarder(self.pools, self.metrics)
        self.shadows = Shadows(forwarder, self.metrics)
        front = FrontDoor(
            self.config,
            self.policies,
            forwarder,
            self.sessions,
            self.audit,
            self.metrics,
            shadows=self.shadows,
            is_serving=lambda: self._serving,
        )
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", self.config.max_message_bytes),
                ("grpc.max_send_message_length", self.config.max_message_bytes),
            ]
        )
        server.add_generic_rpc_handlers((front,))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        AdminServicer(self).register(server)
        self._bind(server)
        await self._note_start(certs)
        await server.start()
        self._server = server
        await self._health.set("", NOT_SERVING)
        if self.config.metrics_listen:
            host, _, port = self.config.metrics_listen.rpartition(":")
            self.metrics_port = self.metrics.serve(host or "127.0.0.1", int(port))
        self._tasks.append(asyncio.create_task(self._track_serving(), name="router-health"))
        if self.config.watch_policy:
            self._tasks.append(asyncio.create_task(self.policies.watch(), name="policy-watch"))
        self._tasks.append(asyncio.create_task(self._watch_certs(certs), name="cert-watch"))
        if wait_checked:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_checked):
                    await self.pools.wait_checked()
            await self._update_serving()
        log.info(
            "router listening on port %s (policy %s)",
            self.port,
            self.policies.current.version_hash[:12],
        )

    def _bind(self, server: grpc.aio.Server) -> None:
        config = self.config
        if config.tls is None:
            log.warning(
                "router front door on %s is PLAINTEXT (insecure: true): callers are "
                "not authenticated by TLS. Never use this for sensitive data.",
                config.listen,
            )
            self.port = server.add_insecure_port(config.listen)
        else:
            creds = server_credentials(config.tls.cert, config.tls.key, config.tls.client_ca)
            self.port = server.add_secure_port(config.listen, creds)
            if config.token_listen:
                token_creds = server_credentials(config.tls.cert, config.tls.key, None)
                self.token_port = server.add_secure_port(config.token_listen, token_creds)
                if not self.token_port:
                    raise OSError(f"could not bind token_listen {config.token_listen}")
        if not self.port:
            raise OSError(f"could not bind {config.listen}: address in use or not available")

    async def stop(self, grace: float | None = None) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._server is not None:
            await self._health.enter_graceful_shutdown()
            await self._server.stop(self.config.grace_seconds if grace is None else grace)
            self._server = None
        if self.shadows is not None:
            await self.shadows.close()  # copies are never worth waiting for
        await self.pools.close()
        self._note(stop_note(time.time() - self.started_at, "stop"))
        await self.audit.close()
        log.info("router stopped")

    # ---------------------------------------------------------------- state

    @property
    def serving(self) -> bool:
        return self._serving

    def not_serving_reason(self) -> str:
        if self.audit.failure is not None:
            return f"audit trail cannot be written: {self.audit.failure}"
        if not self.pools.all_checked:
            return "waiting for the first health check of every endpoint"
        return ""

    async def _update_serving(self) -> None:
        serving = self.not_serving_reason() == ""
        if serving != self._serving:
            self._serving = serving
            await self._health.set("", SERVING if serving else NOT_SERVING)
            log.info(
                "router %s", "SERVING" if serving else f"NOT_SERVING: {self.not_serving_reason()}"
            )

    async def _track_serving(self) -> None:
        while True:
            await self._update_serving()
            await asyncio.sleep(0.2)

    async def _apply_policy(self, policy: Policy) -> None:
        await self.pools.apply(policy)
        self.metrics.models.set_policy(policy_models(policy))
        if hasattr(self, "sessions"):
            self.sessions.reconfigure(policy.sessions.pin_ttl, policy.sessions.max_sessions)

    # ---------------------------------------------------------------- audit

    async def _note_start(self, certs: CertWatch) -> None:
        """The start record and the policy loads so far, durable before we listen."""
        previous = self.audit.last_start if isinstance(self.audit, AuditStore) else None
        described = self.audit.describe() if isinstance(self.audit, AuditStore) else {}
        note = start_note(self.config, self.port, certs.current, described, previous)
        self._audit_open = True
        waits = [self.audit.note(note)] + [self.audit.note(n) for n in self._early_notes]
        self._early_notes.clear()
        try:
            for wait in waits:
                await wait
        except AuditUnavailable as exc:
            raise OSError(f"the audit trail cannot be written: {exc}") from None

    def _audit_changed(self) -> None:
        """The trail started or stopped failing: update health now, not at the next poll."""
        task = asyncio.ensure_future(self._update_serving())
        self._background.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._background.discard)

    def _note(self, note: AuditNote) -> None:
        """Record a lifecycle fact now (its place in the chain is taken at once); a
        failure is logged, and the writer keeps the note in its backlog."""
        if not self._audit_open:
            self._early_notes.append(note)
            return
        future = asyncio.ensure_future(self.audit.note(note))
        self._background.add(future)
        future.add_done_callback(self._background.discard)
        future.add_done_callback(_log_note_failure)

    def _policy_result(self, result: ReloadResult) -> None:
        self.metrics.policy_reloads.labels("accepted" if result.accepted else "refused").inc()
        self._note(policy_note(result))

    async def _watch_certs(self, certs: CertWatch, interval: float = 2.0) -> None:
        while True:
            await asyncio.sleep(interval)
            for note in await asyncio.to_thread(certs.changes):
                log.info("audit: %s %s changed", note.kind, note.fields.get("role"))
                self._note(note)

    def _endpoint_changed(self, endpoint: Endpoint, healthy: bool) -> None:
        self.metrics.endpoint_healthy.labels(endpoint.pool, endpoint.zone, endpoint.address).set(
            int(healthy)
        )

    def _endpoint_retired(self, endpoint: Endpoint) -> None:
        """A removed endpoint's last value would otherwise read on: one removed while
        healthy would keep "no healthy on-prem endpoint" from alerting."""
        with contextlib.suppress(KeyError):  # never reported (removed before a check)
            self.metrics.endpoint_healthy.remove(endpoint.pool, endpoint.zone, endpoint.address)


def _log_note_failure(future: asyncio.Future[None]) -> None:
    if future.cancelled():
        return
    exc = future.exception()
    if isinstance(exc, AuditUnavailable):
        log.warning("audit note kept for later, the trail cannot be written: %s", exc)
    elif exc is not None:
        log.error("audit note failed: %r", exc)


async def run_router(config: RouterConfig) -> int:
    """Serve until SIGTERM/SIGINT; SIGHUP reloads the policy. Returns the exit code.

    A SIGHUP that arrives while the router is starting (its default action would end
    the process: a config tool that signals right after an edit) is remembered, and
    the policy is reloaded once the router has started.
    """
    loop = asyncio.get_running_loop()
    early = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, early.set)
    router = RouterServer(config)
    await router.start()
    print(f"router ready on {config.listen.rpartition(':')[0]}:{router.port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Future[ReloadResult]] = set()  # the loop keeps weak references only

    def reload() -> None:
        task = asyncio.ensure_future(router.policies.reload("SIGHUP"))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    if early.is_set():
        log.info("SIGHUP received while starting: reloading the policy now")
        reload()
    await stop.wait()
    log.info("router shutting down (grace %.0fs)", config.grace_seconds)
    await router.stop()
    return 0
