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

from hybridroute.certs.credentials import peer_identities, server_credentials
from hybridroute.node.dataplane import BatchingDefaults, DataPlane
from hybridroute.node.metrics import NodeMetrics
from hybridroute.node.repository import ModelRepository, scan_repository
from hybridroute.node.servicer import InferenceServicer
from hybridroute.protos import inference_pb2_grpc as pb_grpc

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


class _AllowList(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Serve only callers whose certificate identity (CN or DNS SAN) is on the list."""

    def __init__(self, allowed: Sequence[str]) -> None:
        self._allowed = frozenset(allowed)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner, allowed = handler.unary_unary, self._allowed

        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            who = peer_identities(context)
            if not who & allowed:
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"client identity {sorted(who) or ['<none>']} is not allowed on this node",
                )
            return await inner(request, context)  # type: ignore[arg-type]  # aio handler

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


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
        self._servicer: InferenceServicer | None = None
        self._dataplane: DataPlane | None = None

    async def start(self) -> None:
        opts = self.options
        self.repository = ModelRepository(scan_repository(opts.models))
        self._dataplane = DataPlane(
            self.repository,
            executor=self._executor,
            metrics=self.metrics,
            batching=opts.batching,
        )
        self._servicer = InferenceServicer(self._dataplane, self.metrics, name=opts.name)
        interceptors: list[grpc.aio.ServerInterceptor[Any, Any]] = []
        if opts.allow_clients:
            interceptors.append(_AllowList(opts.allow_clients))
        if opts.bearer_token:
            interceptors.append(_BearerToken(opts.bearer_token))
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", opts.max_message_bytes),
                ("grpc.max_send_message_length", opts.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self._servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        self.port = self._bind(server)
        await server.start()
        self._server = server
        await self._publish_health()
        if opts.metrics_listen:
            host, _, port = opts.metrics_listen.rpartition(":")
            self.metrics_port = self.metrics.serve(host or "127.0.0.1", int(port))
        log.info("node serving %s on port %s", opts.models, self.port)

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
        assert self.repository is not None
        for entry in self.repository.index():
            ready = entry.state == "READY"
            self.metrics.models_ready.labels(entry.name, str(entry.version)).set(int(ready))
        for name in self.repository.names():
            status = SERVING if self.repository.has_ready(name) else NOT_SERVING
            await self._health.set(name, status)
        await self._health.set("", SERVING)

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
        self._server = None
        self._executor.shutdown(wait=False, cancel_futures=True)
        log.info("node stopped")

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def run_node(options: NodeOptions) -> int:
    """Serve until SIGTERM or SIGINT, then shut down gracefully; returns the exit code."""
    node = NodeServer(options)
    await node.start()
    print(f"node ready on {options.listen.rpartition(':')[0]}:{node.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: finishing in-flight requests (grace %.0fs)", options.grace_seconds)
    with contextlib.suppress(asyncio.CancelledError):
        await node.stop()
    return 0
