"""Run a node: gRPC server, mutual TLS, client allow list, health, metrics, shutdown.

`NodeServer` is used by `hybridroute node serve` and, in-process, by tests and the
benchmarks; `run_node` adds signal handling for the command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from hybridroute.certs.credentials import server_credentials
from hybridroute.node.access import DEFAULT_ADMINS, AccessControl
from hybridroute.node.admin_service import NodeAdminServicer
from hybridroute.node.dataplane import BatchingDefaults, DataPlane
from hybridroute.node.drift import DriftMonitor
from hybridroute.node.lifecycle import ModelLifecycle, scan_with_policy
from hybridroute.node.metrics import NodeMetrics
from hybridroute.node.repository import ModelRepository
from hybridroute.node.servicer import InferenceServicer
from hybridroute.node.versions import DEFAULT_POLICY, VersionPolicy
from hybridroute.protos import inference_pb2_grpc as pb_grpc
from hybridroute.protos import node_admin_pb2_grpc as admin_grpc

__all__ = ["NodeOptions", "NodeServer", "run_node"]

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class NodeOptions:
    models: Path
    listen: str = "127.0.0.1:8101"
    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None
    allow_clients: Sequence[str] = ()
    insecure: bool = False
    metrics_listen: str | None = None
    batching: BatchingDefaults = field(default_factory=BatchingDefaults)
    max_message_bytes: int = 64 * 1024 * 1024
    grace_seconds: float = 10.0
    name: str = "hybridroute-node"
    bearer_token: str | None = None  # when set, every call must carry it (cloud stand-in)
    admin_clients: Sequence[str] = DEFAULT_ADMINS  # may load/unload, read drift (access.py)
    version_policy: VersionPolicy = DEFAULT_POLICY  # when model.yaml declares none
    drift_window: int = 1000  # live rows kept per version; 0 turns drift monitoring off
    drift_min_window: int = 100  # fewer live rows: "not enough data", no verdict
    drift_interval: float = 30.0  # seconds between evaluations (reports are on demand too)


class _BearerToken(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Require `authorization: Bearer <token>`, as a cloud inference endpoint would."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        metadata = dict(details.invocation_metadata or ())
        given = str(metadata.get("authorization", "")).encode()
        if hmac.compare_digest(given, self._expected):
            return await continuation(details)

        async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        return grpc.unary_unary_rpc_method_handler(refuse)


class NodeServer:
    """A started node. `await start()`, then `await stop()`; `port` is the bound port."""

    def __init__(self, options: NodeOptions) -> None:
        self.options = options
        self.metrics = NodeMetrics()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="estimator")
        self._server: grpc.aio.Server | None = None
        self._health = HealthServicer()
        self.repository: ModelRepository | None = None
        self.lifecycle: ModelLifecycle | None = None
        self.drift: DriftMonitor | None = None
        self._servicer: InferenceServicer | None = None
        self._node_serving = True  # as last published (for the warning when it turns)
        self._dataplane: DataPlane | None = None
        self._published: set[tuple[str, int]] = set()
        self._health_names: set[str] = set()

    async def start(self) -> None:
        opts = self.options
        entries, notes = scan_with_policy(opts.models, opts.version_policy)
        self.repository = ModelRepository(entries, root=opts.models)
        if opts.drift_window > 0:
            self.drift = DriftMonitor(
                self.metrics,
                window=opts.drift_window,
                min_window=min(opts.drift_min_window, opts.drift_window),
                interval=opts.drift_interval,
            )
            for entry in entries:
                if entry.model is not None:
                    self.drift.track(entry.model)
        self._dataplane = DataPlane(
            self.repository,
            executor=self._executor,
            metrics=self.metrics,
            batching=opts.batching,
            observer=self.drift,
        )
        self.lifecycle = ModelLifecycle(
            self.repository,
            opts.models,
            self._dataplane,
            default_policy=opts.version_policy,
            tracker=self.drift,
            on_change=self._publish_health,
            notes=notes,
        )
        self._servicer = InferenceServicer(
            self._dataplane, self.metrics, name=opts.name, lifecycle=self.lifecycle
        )
        server = self._make_server()
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self._servicer, server)
        admin = NodeAdminServicer(self.lifecycle, self.drift, name=opts.name)
        admin_grpc.add_NodeAdminServicer_to_server(admin, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        self.port = self._bind(server)
        await server.start()
        self._server = server
        await self._publish_health()
        if self.drift is not None:
            self.drift.start()
        if opts.metrics_listen:
            host, _, port = opts.metrics_listen.rpartition(":")
            self.metrics_port = self.metrics.serve(host or "127.0.0.1", int(port))
        log.info("node serving %s on port %s", opts.models, self.port)

    def _make_server(self) -> grpc.aio.Server:
        opts = self.options
        # Always installed: admin calls need an admin identity even without an allow list.
        interceptors: list[grpc.aio.ServerInterceptor[Any, Any]] = [
            AccessControl(opts.allow_clients, opts.admin_clients)
        ]
        if opts.bearer_token:
            interceptors.append(_BearerToken(opts.bearer_token))
        return grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", opts.max_message_bytes),
                ("grpc.max_send_message_length", opts.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )

    def _bind(self, server: grpc.aio.Server) -> int:
        opts = self.options
        if opts.insecure:
            log.warning(
                "node %s serves PLAINTEXT (--insecure): no TLS, no client authentication. "
                "Never use this for sensitive data.",
                opts.listen,
            )
            port = server.add_insecure_port(opts.listen)
        else:
            if opts.cert is None or opts.key is None:
                raise ValueError("a node needs --cert and --key (or --insecure)")
            creds = server_credentials(opts.cert, opts.key, opts.client_ca)
            port = server.add_secure_port(opts.listen, creds)
        if port == 0:
            raise OSError(f"could not bind {opts.listen}: address in use or not available")
        return port

    async def _publish_health(self) -> None:
        """Ready gauges and per-model health from the repository as it is now (called at
        start and after every load or unload). The node as a whole ("", what the router
        checks) is SERVING while at least one model version is ready: a node with none
        can answer nothing, and must not be sent requests."""
        assert self.repository is not None
        present: set[tuple[str, int]] = set()
        for entry in self.repository.index():
            present.add((entry.name, entry.version))
            self.metrics.models_ready.labels(entry.name, str(entry.version)).set(int(entry.ready))
        for name, version in self._published - present:
            self.metrics.models_ready.labels(name, str(version)).set(0)
        self._published |= present
        self._health_names |= set(self.repository.names())
        for name in sorted(self._health_names):
            status = SERVING if self.repository.has_ready(name) else NOT_SERVING
            await self._health.set(name, status)
        # Read again, after the awaits above: a load finishing meanwhile publishes too,
        # and the last word on the node as a whole must be the repository's state now.
        any_ready = any(entry.ready for entry in self.repository.index())
        if not any_ready and self._node_serving:
            log.warning("no model version is ready: the node reports NOT_SERVING until one is")
        self._node_serving = any_ready
        await self._health.set("", SERVING if any_ready else NOT_SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """Go NOT_SERVING, let in-flight requests finish within `grace`, then close."""
        if self._server is None:
            return
        if self._servicer is not None:
            self._servicer.ready = False
        await self._health.enter_graceful_shutdown()
        grace = self.options.grace_seconds if grace is None else grace
        # In-flight requests still need their batchers, so those close only afterwards.
        await self._server.stop(grace)
        if self._dataplane is not None:
            await self._dataplane.close()
        if self.drift is not None:
            self.drift.stop()
        if self.lifecycle is not None:
            self.lifecycle.close()
        self._server = None
        self._executor.shutdown(wait=False, cancel_futures=True)
        log.info("node stopped")

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def run_node(options: NodeOptions) -> int:
    """Serve until SIGTERM or SIGINT, then shut down gracefully; returns the exit code.

    SIGHUP (a closed terminal, or a tool that sends it to every daemon after a change)
    does not end a node: it has nothing to reload on a signal, and says why.
    """
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, _hangup)  # before start: loading takes a while
    node = NodeServer(options)
    await node.start()
    print(f"node ready on {options.listen.rpartition(':')[0]}:{node.port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: finishing in-flight requests (grace %.0fs)", options.grace_seconds)
    with contextlib.suppress(asyncio.CancelledError):
        await node.stop()
    return 0


def _hangup() -> None:
    log.info(
        "SIGHUP: a node has nothing to reload on a signal and keeps serving; its TLS files "
        "are re-read when they change, and models are (un)loaded with `hybridroute models`"
    )
