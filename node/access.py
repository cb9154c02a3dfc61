"""Who may call what on a node: inference callers, admins, and everyone else refused.

Two lists of certificate identities (CN or DNS SAN), because they grant different
things:

* `allow_clients` (`--allow-client`): may infer. On an on-prem node that is only the
  router, so every inference is decided and audited there (invariants 3 and 5).
* `admin_clients` (`--admin-client`, default `router`): may load and unload model
  versions and read drift reports (RepositoryModelLoad/Unload, the NodeAdmin
  service). An admin may not infer unless it is also allowed to: an operator's
  certificate must not become a way around the router's policy and audit trail.

Read-only calls (health, server and model metadata, RepositoryIndex) are open to
both lists. A node without an allow list serves inference to any client its CA
signed, as before; admin calls always need an admin identity, so a plaintext
(`--insecure`) node, whose callers have no identity, refuses every admin call.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from hybridroute.certs.credentials import peer_identities

__all__ = ["ADMIN_METHODS", "DEFAULT_ADMINS", "AccessControl", "is_admin_method"]

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]

DEFAULT_ADMINS: tuple[str, ...] = ("router",)
_INFERENCE = "/inference.GRPCInferenceService/"
_INFER = f"{_INFERENCE}ModelInfer"
_NODE_ADMIN = "/hybridroute.node.v1.NodeAdmin/"
ADMIN_METHODS = frozenset(
    {f"{_INFERENCE}RepositoryModelLoad", f"{_INFERENCE}RepositoryModelUnload"}
)


def is_admin_method(method: str) -> bool:
    """Whether `method` (a full gRPC method path) needs an admin identity."""
    return method in ADMIN_METHODS or method.startswith(_NODE_ADMIN)


class AccessControl(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Checks the caller's certificate identities against the method's list."""

    def __init__(self, allow_clients: Sequence[str], admin_clients: Sequence[str]) -> None:
        self._allowed = frozenset(allow_clients)
        self._admins = frozenset(admin_clients)

    def _required(self, method: str) -> tuple[frozenset[str], str] | None:
        """Identities that may call `method` and what they are called; None: anyone."""
        if is_admin_method(method):
            return self._admins, "an admin of this node (node serve --admin-client)"
        if not self._allowed:
            return None
        if method == _INFER:
            return self._allowed, "allowed on this node"
        return self._allowed | self._admins, "allowed on this node"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(details)
        rule = self._required(details.method)
        if handler is None or handler.unary_unary is None or rule is None:
            return handler
        inner, (allowed, what) = handler.unary_unary, rule
        rpc = details.method.rpartition("/")[2]

        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            who = peer_identities(context)
            if not who & allowed:
                names = sorted(who) or ["<none>"]
                log.warning("refused %s from client identity %s: not %s", rpc, names, what)
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"client identity {names} is not {what}",
                )
            return await inner(request, context)  # type: ignore[arg-type]  # aio handler

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
