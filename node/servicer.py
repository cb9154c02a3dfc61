"""The node's Open Inference Protocol servicer: protobuf in, data plane, protobuf out.

Kept thin on purpose. `_status_for` is the one place that maps the node's errors to
gRPC status codes. Estimator exceptions are reported by type only: their messages can
quote the input (e.g. "could not convert string to float: '<value>'"), and no request
value may reach a log or an error text.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from hybridroute import __version__
from hybridroute.node.batching import BatchError
from hybridroute.node.dataplane import DataPlane, InvalidRequest
from hybridroute.node.loading import InvalidRequestError, ModelRuntimeError
from hybridroute.node.metrics import NodeMetrics
from hybridroute.node.repository import ModelNotFound, ModelNotReady
from hybridroute.protos import inference_pb2 as pb
from hybridroute.protos import inference_pb2_grpc as pb_grpc
from hybridroute.protos.tensors import TensorError, decode_inputs, encode_output

__all__ = ["InferenceServicer"]

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]]

_UNKNOWN_MODEL = "_unknown"  # metrics label for names that match no model (bounded cardinality)


def _status_for(exc: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, ModelNotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, ModelNotReady):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, InvalidRequest | TensorError | InvalidRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, BatchError | ModelRuntimeError):
        return grpc.StatusCode.INTERNAL, str(exc)  # messages name the model, never values
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})"


def _maps_errors(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Turn the node's exceptions into the right gRPC status instead of UNKNOWN."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext[Any, Any]) -> Resp:
        try:
            return await method(self, request, context)
        except Exception as exc:
            code, message = _status_for(exc)
            await context.abort(code, message)
            raise  # unreachable: abort raises

    return wrapper


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane, metrics: NodeMetrics, *, name: str) -> None:
        self._dp = dataplane
        self._metrics = metrics
        self._name = name
        self.ready = True  # False while shutting down

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self.ready)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> Any:
        return pb.ServerMetadataResponse(
            name=self._name, version=__version__, extensions=["model_repository"]
        )

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> Any:
        try:
            self._dp.repository.get(request.name, request.version or None)
        except (ModelNotFound, ModelNotReady):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.ready)

    @_maps_errors
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> Any:
        model = self._dp.repository.get(request.name, request.version or None)
        config = model.config
        meta = pb.ModelMetadataResponse(
            name=config.name,
            versions=[str(v) for v in self._dp.repository.versions(config.name)],
            platform=config.platform,
        )
        for spec in config.inputs:
            meta.inputs.add(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
        for out in config.outputs:
            meta.outputs.add(name=out.name, datatype=out.datatype, shape=list(out.shape))
        return meta

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> Any:
        with self._metrics.in_flight.track_inprogress():
            return await self._model_infer(request, context)

    async def _model_infer(self, request: pb.ModelInferRequest, context: Any) -> Any:
        try:
            response = await self._infer(request)
        except Exception as exc:
            code, message = _status_for(exc)
            if code is grpc.StatusCode.INTERNAL:
                log.error(
                    "model %r version %r failed: %s",
                    request.model_name,
                    request.model_version or "newest",
                    type(exc).__name__,
                )
            self._count(request, code)
            await context.abort(code, message)
        self._count(request, grpc.StatusCode.OK, response.model_version)
        return response

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        inputs = decode_inputs(request)
        requested = [o.name for o in request.outputs]
        result = await self._dp.infer(request.model_name, request.model_version, inputs, requested)
        raw = any(t.raw for t in inputs)
        response = pb.ModelInferResponse(
            model_name=result.model_name, model_version=result.model_version, id=request.id
        )
        for name, datatype, array in result.outputs:
            encode_output(response, name, datatype, array, raw=raw)
        return response

    def _count(
        self, request: pb.ModelInferRequest, code: grpc.StatusCode, version: str = ""
    ) -> None:
        model = request.model_name if self._dp.repository.knows(request.model_name) else None
        self._metrics.requests.labels(
            model or _UNKNOWN_MODEL, version or request.model_version or "", code.name
        ).inc()

    @_maps_errors
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> Any:
        response = pb.RepositoryIndexResponse()
        for entry in self._dp.repository.index():
            if request.ready and entry.state != "READY":
                continue
            response.models.add(
                name=entry.name,
                version=str(entry.version),
                state=entry.state,
                reason=entry.reason or "",
            )
        return response
