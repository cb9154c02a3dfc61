"""The router's admin API (protos/admin.proto): status and policy reload.

Status includes each rollout of the live policy (canary split, shadow) with what the
router counted for it (`shadow.rollout_stats`, read from its metrics).

Only identities listed under `admins` in the router config may call it; the same
mutual TLS as the front door authenticates them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc

from hybridroute import __version__
from hybridroute.certs.credentials import peer_identities
from hybridroute.protos import admin_pb2 as pb
from hybridroute.protos import admin_pb2_grpc as pb_grpc
from hybridroute.router.shadow import RolloutStats, rollout_stats

if TYPE_CHECKING:
    from hybridroute.router.policy.store import ReloadResult
    from hybridroute.router.server import RouterServer

__all__ = ["AdminServicer"]


def _signer(active: ReloadResult) -> str:
    """`secteam (key 1a2b3c4d5e6f7a8b)`: the name alone could be claimed by any key the
    router trusted at some point; the fingerprint says which key it was."""
    if active.signed_by is None:
        return ""
    return f"{active.signed_by} (key {(active.signing_key or '')[:16]})"


def _rollout(stats: RolloutStats) -> pb.RolloutStatus:
    out = pb.RolloutStatus(route=stats.route, model=stats.model)
    for version, weight, requests in stats.split:
        out.split.add(version=version, weight=weight, requests=requests)
    shadow = stats.shadow
    if shadow is not None:
        out.shadow.CopyFrom(
            pb.ShadowStatus(
                version=shadow.version,
                percent=shadow.percent,
                pool=shadow.pool,
                **shadow.counts,
                agreement_rate=-1.0 if shadow.agreement_rate is None else shadow.agreement_rate,
                latency_difference_ms=shadow.latency_difference_ms or 0.0,
            )
        )
    return out


class AdminServicer(pb_grpc.RouterAdminServicer):
    def __init__(self, router: RouterServer) -> None:
        self._router = router

    def register(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_RouterAdminServicer_to_server(self, server)

    async def _authorise(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        admins = set(self._router.config.admins)
        who = peer_identities(context)
        if self._router.config.tls is None and not who:
            return  # plaintext development router: nobody can be told apart
        if not who & admins:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"identity {sorted(who) or ['<none>']} is not an admin of this router "
                "(router config: admins)",
            )

    async def Status(self, request: pb.StatusRequest, context: Any) -> pb.StatusResponse:
        await self._authorise(context)
        router = self._router
        store = router.policies
        refused = store.last_refused
        policy = pb.PolicyStatus(
            path=str(store.path),
            version_hash=store.current.version_hash,
            loaded_at=store.loaded_at,
            last_refused_error=refused.error or "" if refused else "",
            last_refused_at=refused.at if refused else 0.0,
            warnings=len(store.current.warnings),
            signed_by=_signer(store.active),
            signed_at=store.active.signed_at or 0.0,
        )
        response = pb.StatusResponse(
            version=__version__,
            serving=router.serving,
            not_serving_reason=router.not_serving_reason(),
            started_at=router.started_at,
            in_flight=int(
                router.metrics.registry.get_sample_value("hybridroute_router_in_flight_requests")
                or 0
            ),
            policy=policy,
            audit_failure=router.audit.failure or "",
        )
        for row in router.pools.snapshot():
            age = row.get("last_check_age")
            response.endpoints.add(
                pool=row["pool"],
                zone=row["zone"],
                address=row["address"],
                healthy=row["healthy"],
                outstanding=row["outstanding"],
                last_error=row.get("last_error") or "",
                seconds_since_check=-1.0 if age is None else float(age),
            )
        response.rollouts.extend(_rollout(r) for r in rollout_stats(store.current, router.metrics))
        return response

    async def ReloadPolicy(
        self, request: pb.ReloadPolicyRequest, context: Any
    ) -> pb.ReloadPolicyResponse:
        await self._authorise(context)
        result = await self._router.policies.reload("admin API")
        return pb.ReloadPolicyResponse(
            accepted=result.accepted,
            version_hash=result.version_hash or "",
            error=result.error or "",
        )
