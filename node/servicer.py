"""The node's Open Inference Protocol servicer: protobuf in, data plane, protobuf out.

Kept thin on purpose. `_status_for` is the one place that maps the node's errors to
gRPC status codes. Estimator exceptions are reported by type only: their messages can
quote the input (e.g. "could not convert string to float: '<value>'"), and no request
value may reach a log or an error text.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import grpc

from hybridroute import __version__
from hybridroute.node.batching import BatchError, BatcherStopped
from hybridroute.node.dataplane import DataPlane, InferResult, InvalidRequest
from hybridroute.node.lifecycle import (
    IndexRow,
    InvalidModelName,
    LoadFailed,
    ModelLifecycle,
    Refused,
)
from hybridroute.node.loading import InvalidRequestError, LoadedModel, ModelRuntimeError
from hybridroute.node.metrics import NodeMetrics
from hybridroute.node.repository import ModelNotFound, ModelNotReady, parse_version
from hybridroute.protos import inference_pb2 as pb
from hybridroute.protos import inference_pb2_grpc as pb_grpc
from hybridroute.protos.tensors import (
    InputTensor,
    TensorError,
    decode_inputs,
    encode_output,
    travels_typed,
)

__all__ = ["InferenceServicer"]

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]]

# Metric labels for a model name or version that matches nothing: labels are only
# names and versions the repository holds, never caller-chosen text, so the number of
# series (and their memory) stays bounded.
_UNKNOWN_MODEL = "_unknown"
_UNKNOWN_VERSION = "_unknown"

# Converting tensors costs per element and per byte; below these sizes it takes less
# time than the hop to a worker thread (~70 us), above them it would hold up every other
# caller on the event loop. check_inputs bounds the elements by the model's row limit.
_INLINE_ELEMENTS = 4096
_INLINE_BYTES = 1024 * 1024

# gRPC cancels a handler when its deadline passes, a moment before time_remaining()
# reaches 0 as the handler sees it; a call cancelled this close to it timed out.
_DEADLINE_SLACK = 0.01


class BadParameter(ValueError):
    """A repository call's parameter has the wrong type or value."""


def _status_for(exc: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, InvalidModelName | BadParameter):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, LoadFailed | Refused):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, ModelNotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, ModelNotReady | BatcherStopped):
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
    def __init__(
        self,
        dataplane: DataPlane,
        metrics: NodeMetrics,
        *,
        name: str,
        lifecycle: ModelLifecycle | None = None,
    ) -> None:
        self._dp = dataplane
        self._metrics = metrics
        self._name = name
        self._lifecycle = lifecycle
        self.ready = True  # False while shutting down

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> Any:
        """Ready while not shutting down and at least one model version is ready."""
        ready = self.ready and any(e.ready for e in self._dp.repository.index())
        return pb.ServerReadyResponse(ready=ready)

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
        resolved = ""  # the version serving the request, once the lookup succeeded
        try:
            model = self._dp.repository.get(request.model_name, request.model_version or None)
            resolved = str(model.config.version)
            response = await self._infer(model, request)
        except asyncio.CancelledError:
            # The caller went away: its deadline passed or it cancelled. Count it (an
            # operator must see requests that time out on the node) and let the
            # cancellation through; there is nobody to answer.
            code = _cancelled_code(context)
            self._metrics.requests.labels(*self._labels(request, resolved), code.name).inc()
            raise
        except Exception as exc:
            code, message = _status_for(exc)
            name, version = self._labels(request, resolved)
            if code is grpc.StatusCode.INTERNAL:
                log.error("model %r version %r failed: %s", name, version, type(exc).__name__)
            self._metrics.requests.labels(name, version, code.name).inc()
            await context.abort(code, message)
        self._metrics.requests.labels(
            response.model_name, response.model_version, grpc.StatusCode.OK.name
        ).inc()
        return response

    async def _infer(
        self, model: LoadedModel, request: pb.ModelInferRequest
    ) -> pb.ModelInferResponse:
        # Refuse what the model would refuse anyway before decoding (e.g. too many rows).
        self._dp.check_inputs(model, request.inputs)
        if _large_request(request):
            inputs = await self._dp.offload(self._decode, model, request)
        else:
            inputs = self._decode(model, request)
        requested = [o.name for o in request.outputs]
        result = await self._dp.infer(request.model_name, request.model_version, inputs, requested)
        # A response is raw or typed as a whole, and FP16 travels only raw: a model with
        # an FP16 output answers raw, which every client must read (tritonclient reads
        # only raw), rather than not at all.
        raw = any(t.raw for t in inputs) or not all(
            travels_typed(datatype) for _, datatype, _ in result.outputs
        )
        if sum(array.size for _, _, array in result.outputs) > _INLINE_ELEMENTS:
            return await self._dp.offload(_response, request, result, raw)
        return _response(request, result, raw)

    def _decode(self, model: LoadedModel, request: pb.ModelInferRequest) -> list[InputTensor]:
        return self._dp.decode_texts(model, decode_inputs(request))

    def _labels(self, request: pb.ModelInferRequest, resolved: str) -> tuple[str, str]:
        """Model and version labels of a failed request: only a name and version the
        repository knows (see _UNKNOWN_MODEL); "" when no version was asked for and none
        was resolved."""
        repository = self._dp.repository
        if not repository.knows(request.model_name):
            return _UNKNOWN_MODEL, _UNKNOWN_VERSION if request.model_version else ""
        if resolved or not request.model_version:
            return request.model_name, resolved
        number = parse_version(request.model_version.strip())
        if number is not None and repository.entry_or_none(request.model_name, number):
            return request.model_name, str(number)
        return request.model_name, _UNKNOWN_VERSION

    @_maps_errors
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> Any:
        """Loaded and failed versions, and versions on disk that are not loaded (why)."""
        response = pb.RepositoryIndexResponse()
        rows = (
            self._lifecycle.index()
            if self._lifecycle is not None
            else [
                IndexRow(e.name, e.version, e.state, e.reason) for e in self._dp.repository.index()
            ]
        )
        for row in rows:
            if request.ready and row.state != "READY":
                continue
            response.models.add(
                name=row.name, version=str(row.version), state=row.state, reason=row.reason
            )
        return response

    @_maps_errors
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> Any:
        """Load a version (parameter `version`), or what the model's version policy selects."""
        lifecycle = self._require_lifecycle()
        version = _version_parameter(request.parameters)
        await lifecycle.load(request.model_name, version, by=_caller(context))
        return pb.RepositoryModelLoadResponse()

    @_maps_errors
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> Any:
        """Unload a version (parameter `version`) or every version; `force` allows taking
        away the last READY one."""
        lifecycle = self._require_lifecycle()
        version = _version_parameter(request.parameters)
        force = _bool_parameter(request.parameters, "force")
        await lifecycle.unload(request.model_name, version, force=force, by=_caller(context))
        return pb.RepositoryModelUnloadResponse()

    def _require_lifecycle(self) -> ModelLifecycle:
        if self._lifecycle is None:
            raise BadParameter("this node does not load or unload models at runtime")
        return self._lifecycle


def _cancelled_code(context: Any) -> grpc.StatusCode:
    """DEADLINE_EXCEEDED when the call was cancelled because its deadline passed, else
    CANCELLED (the client cancelled or disconnected)."""
    try:
        remaining = context.time_remaining()
    except Exception:
        remaining = None
    if remaining is not None and remaining <= _DEADLINE_SLACK:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


def _large_request(request: pb.ModelInferRequest) -> bool:
    """Whether decoding `request` is worth a worker thread (see _INLINE_ELEMENTS)."""
    elements = sum(math.prod(tensor.shape) for tensor in request.inputs)
    payload = sum(len(buffer) for buffer in request.raw_input_contents)
    return elements > _INLINE_ELEMENTS or payload > _INLINE_BYTES


def _response(
    request: pb.ModelInferRequest, result: InferResult, raw: bool
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(
        model_name=result.model_name, model_version=result.model_version, id=request.id
    )
    for name, datatype, array in result.outputs:
        encode_output(response, name, datatype, array, raw=raw)
    return response


Parameters = Mapping[str, pb.ModelRepositoryParameter]


def _version_parameter(parameters: Parameters) -> int | None:
    if "version" not in parameters:
        return None
    param = parameters["version"]
    kind = param.WhichOneof("parameter_choice")
    value: object = getattr(param, kind) if kind else None
    text = str(value).strip() if kind in {"string_param", "int64_param"} else ""
    version = parse_version(text)
    if version is None:
        raise BadParameter(
            "parameter 'version' must be a positive 64-bit integer (int64 or string)"
        )
    return version


def _bool_parameter(parameters: Parameters, key: str) -> bool:
    if key not in parameters:
        return False
    param = parameters[key]
    kind = param.WhichOneof("parameter_choice")
    if kind == "bool_param":
        return bool(param.bool_param)
    if kind == "string_param" and param.string_param.lower() in {"true", "false"}:
        return param.string_param.lower() == "true"
    raise BadParameter(f"parameter {key!r} must be a bool")


def _caller(context: Any) -> str:
    """The caller's certificate common name, for the log line saying who did what."""
    try:
        names = context.auth_context().get("x509_common_name") or []
    except Exception:
        return ""
    return ", ".join(n.decode("utf-8", "replace") for n in names)
