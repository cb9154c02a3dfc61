"""The router's Open Inference Protocol front door.

One generic handler serves every `inference.GRPCInferenceService` method without
deserialising it into the servicer's types: requests stay bytes, so they can be
forwarded unchanged, and only what the policy needs is parsed (`router/facts.py`).

For each call: authenticate, decide (the live policy), audit, forward, reply. Every
reply carries `x-hybridroute-request-id`, `-route` and `-zone`, errors included, and
a ModelInfer reply `x-hybridroute-model-version`: the version that served it, read
from the reply's field 2 without parsing its outputs (also in the audit record). The
audit record is committed before the reply is released; when the audit sink cannot
record, requests are refused with UNAVAILABLE (invariant 5).

A route with a rollout for the request's model (`policy.rollouts`, see `rollout`)
may set the version of a request that names none (canary split) and mirror it to a
candidate version (`shadow`): the copy is decided once the reply is in hand, written
into the request's audit record (pool, zone, candidate version), and sent only after
that record is committed, so the trail says where a request's data went before it
goes there. A policy without rollouts costs one check of an empty mapping per request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError, Message

from hybridroute import __version__
from hybridroute.protos import inference_pb2 as pb
from hybridroute.router.audit.events import AUDIT_REFUSAL, AuditEvent, AuditSink, AuditUnavailable
from hybridroute.router.auth import Unauthenticated, authenticate
from hybridroute.router.config import RouterConfig
from hybridroute.router.facts import Caller, request_facts
from hybridroute.router.forward import Forwarded, Forwarder, RouterError
from hybridroute.router.metrics import RouterMetrics
from hybridroute.router.policy.engine import Decision, RequestFacts, decide, label_key
from hybridroute.router.policy.schema import Policy
from hybridroute.router.policy.sessions import SessionPins
from hybridroute.router.policy.store import PolicyStore
from hybridroute.router.pools import Endpoint
from hybridroute.router.rollout import Rollout
from hybridroute.router.shadow import Reservation, Shadows
from hybridroute.router.wire import hidden_data, read_varint

__all__ = ["SERVICE", "FrontDoor", "forwarded_metadata"]

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
_PREFIX = f"/{SERVICE}/"

_INTERNAL = "internal error in the router; the request was not completed"

# Requests larger than this are classified in a worker thread: scanning up to the
# policy's max_text_bytes (1 MiB by default) of text can take a good part of a second
# for adversarial text, and on the event loop that would hold up every other request.
# (The GIL is shared, but the loop gets its turn every switch interval.) Text made of
# what the detectors must check one by one costs 0.2-0.6 ms per KiB (SSN-, card- or
# IP-shaped lists; prose costs 0.003): at 8 KiB the worst stall on the loop is a few
# ms, and the hand-off (about 0.1 ms) is small beside sending such a request.
_OFF_LOOP_BYTES = 8 * 1024

# Caller metadata that must not travel upstream: the caller's own credentials, and
# transport headers grpc sets itself.
_NOT_FORWARDED = frozenset({"authorization", "user-agent", "te", "content-type"})

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]
    Behaviour = Callable[[bytes, Context, str], Awaitable[bytes]]


class FrontDoor(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    def __init__(
        self,
        config: RouterConfig,
        policies: PolicyStore,
        forwarder: Forwarder,
        sessions: SessionPins,
        audit: AuditSink,
        metrics: RouterMetrics,
        *,
        shadows: Shadows,
        is_serving: Callable[[], bool],
    ) -> None:
        self._config = config
        self._policies = policies
        self._forwarder = forwarder
        self._sessions = sessions
        self._audit = audit
        self._metrics = metrics
        self._shadows = shadows
        self._is_serving = is_serving
        self._background: set[asyncio.Future[RouterError | None]] = set()
        self._missing_versions: set[tuple[str, str, str]] = set()  # logged once each
        routed: Behaviour = self._routed
        self._handlers: dict[str, Behaviour] = {
            "ServerLive": self._server_live,
            "ServerReady": self._server_ready,
            "ServerMetadata": self._server_metadata,
            "ModelInfer": routed,
            "ModelMetadata": routed,
            "ModelReady": routed,
        }
        self._method_handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        method: str = details.method
        if not method.startswith(_PREFIX):
            return None
        handler = self._method_handlers.get(method)
        if handler is None:  # built once per method, not per call
            handler = self._method_handlers[method] = self._handler_for(method[len(_PREFIX) :])
        return handler

    def _handler_for(self, rpc: str) -> grpc.RpcMethodHandler[Any, Any]:
        behaviour = self._handlers.get(rpc, self._not_routed)

        async def handle(raw: bytes, context: Context) -> bytes:
            return await behaviour(raw, context, rpc)

        return grpc.unary_unary_rpc_method_handler(handle)

    # -------------------------------------------------------------- local answers

    async def _authenticated(self, context: Context, method: str) -> Caller:
        """The caller of a call the router answers itself; an unauthenticated one is
        refused, and that refusal is audited like any other."""
        metadata, repeated = _call_metadata(context)
        try:
            _single_credential(repeated)
            return authenticate(context, metadata, self._config)
        except Unauthenticated as exc:
            await self._refuse(context, method, None, grpc.StatusCode.UNAUTHENTICATED, str(exc))
            raise  # unreachable

    async def _refuse(
        self,
        context: Context,
        method: str,
        caller: Caller | None,
        code: grpc.StatusCode,
        message: str,
    ) -> None:
        """Audit a refusal of a call that is not routed, then answer it (or UNAVAILABLE
        when even that record cannot be written)."""
        event = AuditEvent(
            request_id=os.urandom(16).hex(),
            outcome="rejected",
            caller=caller.identity if caller else None,
            auth=caller.auth if caller else "none",
            method=method,
            code=code.name,
            error=message,
        )
        error = await self._record(event, RouterError(code, message))
        assert error is not None
        await context.abort(error.code, error.message, trailing_metadata=_reply_metadata(event))

    async def _server_live(self, raw: bytes, context: Context, rpc: str) -> bytes:
        await self._authenticated(context, rpc)
        return pb.ServerLiveResponse(live=True).SerializeToString()

    async def _server_ready(self, raw: bytes, context: Context, rpc: str) -> bytes:
        await self._authenticated(context, rpc)
        return pb.ServerReadyResponse(ready=self._is_serving()).SerializeToString()

    async def _server_metadata(self, raw: bytes, context: Context, rpc: str) -> bytes:
        await self._authenticated(context, rpc)
        return pb.ServerMetadataResponse(
            name="hybridroute-router", version=__version__, extensions=[]
        ).SerializeToString()

    async def _not_routed(self, raw: bytes, context: Context, rpc: str) -> bytes:
        caller = await self._authenticated(context, rpc)
        await self._refuse(
            context,
            rpc,
            caller,
            grpc.StatusCode.PERMISSION_DENIED,
            "model repository operations are not routed; call a node's admin API directly",
        )
        raise AssertionError("unreachable")

    # ------------------------------------------------------------ routed methods

    async def _routed(self, raw: bytes, context: Context, method: str) -> bytes:
        started = time.perf_counter()
        event = AuditEvent(
            request_id=os.urandom(16).hex(),
            outcome="rejected",
            caller=None,
            auth="none",
            method=method,
            bytes_in=len(raw),
        )
        self._metrics.in_flight.inc()
        copy: _Shadow | None = None
        reply: bytes | None = None
        try:
            answer = await self._decide_and_forward(raw, context, method, event)
        except RouterError as exc:
            event.code = exc.code.name
            event.error = event.error or exc.message
            error: RouterError | None = exc
        except Exception as exc:  # a bug: still answered, recorded, and the loop lives on
            # Type only: the text of an unexpected error may quote the request.
            log.error("unexpected %s routing request %s", type(exc).__name__, event.request_id)
            error = RouterError(grpc.StatusCode.INTERNAL, _INTERNAL)
            event.code, event.error = error.code.name, error.message
        except asyncio.CancelledError:
            # The caller cancelled or its deadline passed: grpc cancels this task (and
            # with it the upstream call). What was decided, and perhaps already sent
            # upstream, still gets its record; nobody is left to answer.
            self._record_cancelled(event, context, started)
            raise
        else:
            error = None
            if isinstance(answer, bytes):
                reply = answer
            else:  # a rollout mirrors this request: the copy goes once the record is in
                copy, reply = answer, answer.forwarded.reply
        finally:
            self._metrics.in_flight.dec()
        event.latency_ms = (time.perf_counter() - started) * 1000
        if reply is not None:
            event.bytes_out = len(reply)
            if method == "ModelInfer":
                event.served_version = _served_version(reply)
        if copy is None:
            error = await self._record(event, error)
        else:
            error = await self._record_then_mirror(event, copy)
        self._count(event, started)
        trailing = _reply_metadata(event)
        if error is not None:
            await context.abort(error.code, error.message, trailing_metadata=trailing)
        context.set_trailing_metadata(trailing)
        assert reply is not None
        return reply

    def _record_cancelled(self, event: AuditEvent, context: Context, started: float) -> None:
        """Record a call grpc cancelled, in a task of its own: this one is being
        cancelled, and the record must not be (a shielded write completes)."""
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        event.code = "DEADLINE_EXCEEDED" if expired else "CANCELLED"
        event.error = event.error or (
            "the caller's deadline passed before the reply"
            if expired
            else "the caller cancelled before the reply"
        )
        event.latency_ms = (time.perf_counter() - started) * 1000
        task = asyncio.ensure_future(self._record(event, None))
        self._background.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._background.discard)
        task.add_done_callback(lambda _: self._count(event, started))

    async def _record_then_mirror(self, event: AuditEvent, copy: _Shadow) -> RouterError | None:
        """Commit the record that names the shadow copy, then send the copy; a copy
        whose record is not committed (refused, withheld, cancelled) is never sent."""
        sent = False
        try:
            error = await self._record(event, None)
            if error is None:
                copy.send(self._shadows)
                sent = True
        finally:
            if not sent:
                self._shadows.release(copy.reservation)
        return error

    async def _record(self, event: AuditEvent, error: RouterError | None) -> RouterError | None:
        """Commit the audit record; if that fails, the reply is withheld (invariant 5)."""
        waiting = time.perf_counter()
        try:
            await self._audit.record(event)
        except AuditUnavailable as exc:
            log.error("audit record not written (%s); refusing the reply", exc)
            event.code = grpc.StatusCode.UNAVAILABLE.name
            return RouterError(grpc.StatusCode.UNAVAILABLE, AUDIT_REFUSAL)
        finally:
            self._metrics.audit_wait.observe(time.perf_counter() - waiting)
        return error

    async def _decide_and_forward(
        self,
        raw: bytes,
        context: Context,
        method: str,
        event: AuditEvent,
    ) -> bytes | _Shadow:
        """The reply; or, when a rollout mirrors the request, a `_Shadow` holding the
        reply and the reserved copy, which the caller sends once the record is in."""
        metadata, repeated = _call_metadata(context)
        try:
            _single_credential(repeated)
            caller = authenticate(context, metadata, self._config)
        except Unauthenticated as exc:
            raise RouterError(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None
        event.caller, event.auth = caller.identity, caller.auth
        if self._audit.failure is not None:  # refuse before deciding: nothing goes upstream
            event.error = AUDIT_REFUSAL
            raise RouterError(grpc.StatusCode.UNAVAILABLE, AUDIT_REFUSAL)
        policy = self._policies.current  # one snapshot decides this request to the end
        classify = (method, raw, metadata, bool(repeated), caller, policy)
        if len(raw) > _OFF_LOOP_BYTES:  # its scan may take a while: not on the event loop
            request, facts, decision = await asyncio.to_thread(self._classify, *classify)
        else:
            request, facts, decision = self._classify(*classify)
        event.model, event.model_version = facts.model, facts.model_version
        event.label = label_key(facts.label)
        event.session_id = facts.session_id
        event.client_request_id = request.id if request is not None and request.id else None
        _describe(event, decision, policy)
        if decision.action == "deny":
            event.outcome = "denied"
            raise RouterError(
                grpc.StatusCode.PERMISSION_DENIED, f"denied by policy rule '{decision.rule_id}'"
            )
        forwarded_md = forwarded_metadata(metadata, event.request_id, zone=decision.zone)
        deadline = _deadline(context)
        rollout = (
            policy.rollouts.get((decision.route or "", facts.model))
            if policy.rollouts and request is not None
            else None
        )
        copy: _Shadow | None = None
        tried: list[Endpoint] = []
        try:
            if rollout is None:
                result = await self._forwarder.forward(
                    f"{_PREFIX}{method}",
                    raw,
                    policy,
                    decision,
                    deadline=deadline,
                    metadata=forwarded_md,
                    tried=tried,
                )
            else:
                result, copy = await self._roll_out(
                    rollout,
                    raw,
                    facts.model_version,
                    policy,
                    decision,
                    deadline,
                    forwarded_md,
                    event,
                    tried,
                )
        except grpc.aio.AioRpcError as exc:
            # The node's own message may quote the request: it goes back to the caller,
            # never into the trail.
            event.error = f"upstream answered {exc.code().name}"
            raise RouterError(exc.code(), exc.details() or exc.code().name) from None
        finally:  # reply, error or cancellation: the record says where the data went
            _attempted(event, tried)
        event.route = result.route
        return result.reply if copy is None else copy

    def _classify(
        self,
        method: str,
        raw: bytes,
        metadata: dict[str, str],
        repeated: bool,
        caller: Caller,
        policy: Policy,
    ) -> tuple[pb.ModelInferRequest | None, RequestFacts, Decision]:
        """Parse what the policy needs, gather the facts and decide. Pure but for the
        session pins (thread-safe), so a large request runs it in a worker thread."""
        request, model, version = _parse(method, raw)
        facts = request_facts(
            request,
            metadata,
            caller,
            model=model,
            model_version=version,
            wire_problem=hidden_data(_MESSAGES[method], raw),
            repeated_metadata=repeated,
            text_budget=policy.max_text_bytes,
        )
        return request, facts, decide(policy, facts, self._sessions)

    async def _roll_out(
        self,
        rollout: Rollout,
        raw: bytes,
        version: str,
        policy: Policy,
        decision: Decision,
        deadline: float | None,
        metadata: list[tuple[str, str]],
        event: AuditEvent,
        tried: list[Endpoint],
    ) -> tuple[Forwarded, _Shadow | None]:
        """Forward a ModelInfer under a rollout: a request that names no version gets
        the split's draw; then, for the shadow's share, a copy to the candidate is
        reserved and written into `event` (pool, zone, version), for the caller to
        send once the record is committed."""
        versioned, drawn = None, ""
        if rollout.versions and not version:
            i = rollout.pick(random.random())
            versioned, drawn = raw + rollout.fields[i], rollout.versions[i]
        shadow = rollout.shadow is not None and random.random() < rollout.shadow.share
        started = time.perf_counter()

        async def forward(body: bytes | None) -> Forwarded:
            return await self._forwarder.forward(
                f"{_PREFIX}ModelInfer",
                raw,
                policy,
                decision,
                deadline=deadline,
                metadata=metadata,
                versioned=body,
                tried=tried,
            )

        try:
            result = await forward(versioned)
        except grpc.aio.AioRpcError as exc:
            if versioned is None or exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            # The drawn version is not on the node (unloaded, or not deployed yet).
            # The caller named no version: the node's own choice answers, and the
            # operator hears of it (once per version) instead of a share of failures.
            self._version_missing(rollout, drawn)
            result = await forward(None)
        else:
            if versioned is not None:
                labels = (rollout.route, rollout.model, drawn)
                self._metrics.rollout_requests.labels(*labels).inc()
        if shadow:
            reservation = self._shadows.reserve(rollout, onprem_only=decision.onprem_only)
            if reservation is not None:
                plan = reservation.plan
                event.shadow_pool, event.shadow_zone = plan.pool, plan.zone
                event.shadow_version = plan.version
                seconds = time.perf_counter() - started
                copy = _Shadow(result, reservation, raw, seconds, decision.onprem_only, metadata)
                return result, copy
        return result, None

    def _version_missing(self, rollout: Rollout, version: str) -> None:
        key = (rollout.route, rollout.model, version)
        if key not in self._missing_versions:
            self._missing_versions.add(key)
            log.warning(
                "route %s splits %s to version %s, which the node does not have: those "
                "requests are answered by the node's default version until the version "
                "is loaded or the policy's split changes",
                *key,
            )
        self._metrics.rollout_requests.labels(rollout.route, rollout.model, "missing").inc()

    def _count(self, event: AuditEvent, started: float) -> None:
        self._metrics.observe(event, time.perf_counter() - started)


@dataclass(frozen=True, slots=True)
class _Shadow:
    """A forwarded request with a shadow copy reserved, not yet sent."""

    forwarded: Forwarded
    reservation: Reservation
    raw: bytes
    serving_seconds: float
    onprem_only: bool
    metadata: list[tuple[str, str]]

    def send(self, shadows: Shadows) -> None:
        shadows.send(
            self.reservation,
            self.raw,
            serving=self.forwarded.reply,
            serving_seconds=self.serving_seconds,
            onprem_only=self.onprem_only,
            metadata=self.metadata,
        )


def _call_metadata(context: Context) -> tuple[dict[str, str], set[str]]:
    """The call's metadata as a mapping (each key's first value), and the keys sent
    more than once with different values: which of those a rule, the label or the
    session should read is in doubt, so the caller of `request_facts` says so."""
    metadata: dict[str, Any] = {}  # str values, bytes for `-bin` keys
    repeated: set[str] = set()
    for key, value in context.invocation_metadata() or ():
        if metadata.setdefault(key, value) != value:
            repeated.add(key)
    return metadata, repeated


def _single_credential(repeated: set[str]) -> None:
    if "authorization" in repeated:
        raise Unauthenticated("more than one authorization header; send exactly one")


def forwarded_metadata(
    metadata: Mapping[str, str], request_id: str, *, zone: str | None
) -> list[tuple[str, str]]:
    """The caller's metadata that travels upstream, plus the router's request id.

    Never the caller's credentials or transport headers. Binary (`-bin`) values are
    not scanned by the detectors, so they may carry anything: they travel only to the
    on-prem zone (an on-prem route never falls back to the cloud), never to the cloud.
    """
    forwarded = [
        (k, v)
        for k, v in metadata.items()
        if k not in _NOT_FORWARDED
        and not k.startswith(("grpc-", ":"))
        and (zone == "onprem" or not k.endswith("-bin"))
    ]
    forwarded.append(("x-hybridroute-request-id", request_id))
    return forwarded


# The request message of each routed method: parsed by `_parse`, wire-checked by
# `router.wire.hidden_data`.
_MESSAGES: dict[str, type[Message]] = {
    "ModelInfer": pb.ModelInferRequest,
    "ModelMetadata": pb.ModelMetadataRequest,
    "ModelReady": pb.ModelReadyRequest,
}


def _parse(method: str, raw: bytes) -> tuple[pb.ModelInferRequest | None, str, str]:
    """The inference request (ModelInfer), or the model a metadata call names."""
    try:
        if method == "ModelInfer":
            request = pb.ModelInferRequest.FromString(raw)
            return request, request.model_name, request.model_version
        probe = _MESSAGES[method].FromString(raw)
        assert isinstance(probe, pb.ModelMetadataRequest | pb.ModelReadyRequest)
    except DecodeError:
        raise RouterError(
            grpc.StatusCode.INVALID_ARGUMENT, f"{method} request is not a valid protobuf message"
        ) from None
    return None, probe.name, probe.version


def _describe(event: AuditEvent, decision: Decision, policy: Policy) -> None:
    event.policy_hash, event.rule_id = decision.policy_hash, decision.rule_id
    event.sensitive, event.reasons = decision.sensitive, decision.reasons
    event.findings = dict(decision.findings)
    event.route, event.zone, event.pool = (
        decision.route or "",
        decision.zone or "",
        (decision.pool or ""),
    )
    event.decided_route, event.decided_zone = event.route, event.zone
    event.trace, event.hits = decision.trace, decision.detector_hits
    route = policy.routes.get(decision.route) if decision.route else None
    if route is not None:
        event.route_detail, event.route_sample = route.audit.level, route.audit.sample


def _attempted(event: AuditEvent, tried: list[Endpoint]) -> None:
    """Where the request's data went: the last endpoint, and any tried before it."""
    if not tried:
        return
    last = tried[-1]
    event.outcome = "routed"
    event.zone, event.pool, event.endpoint = last.zone, last.pool, last.address
    event.attempts = len(tried)
    event.earlier = tuple((e.zone, e.pool, e.address) for e in tried[:-1])


def _served_version(reply: bytes) -> str:
    """`model_version` (field 2) of a ModelInferResponse, read from the wire without
    parsing the outputs: what came back, for the trail, at almost no cost."""
    i = 0
    try:
        while i < len(reply):
            tag, i = read_varint(reply, i)
            if tag & 7 != 2 or tag >> 3 > 2:
                return ""
            size, i = read_varint(reply, i)
            if tag >> 3 == 2:
                return reply[i : i + size].decode("utf-8", "replace")[:128]
            i += size
    except (IndexError, ValueError):
        return ""
    return ""


def _deadline(context: Context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _reply_metadata(event: AuditEvent) -> tuple[tuple[str, str], ...]:
    metadata = (
        ("x-hybridroute-request-id", event.request_id),
        ("x-hybridroute-route", event.route),
        ("x-hybridroute-zone", event.zone),
    )
    served = event.served_version
    if served and served.isascii() and served.isprintable():  # as header values must be
        return (*metadata, ("x-hybridroute-model-version", served))
    return metadata
