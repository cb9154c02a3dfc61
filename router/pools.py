"""Upstream pools: one long-lived channel per endpoint, health, and the pick.

Why it is built this way:

- Zone is fixed per endpoint and copied from its pool spec; a `Pool` only ever holds
  endpoints of its own zone, so picking inside a pool cannot cross zones.
- On-prem endpoints are always reached over mutual TLS with the router's client
  certificate, verified against the private CA (or the pool's `ca`) and the expected
  name. Plaintext only with `UpstreamTLS.insecure`, which logs a warning.
- Everything that can be wrong with a pool's configuration (CA, client key, a missing
  token variable or file) is found in `apply`, before any state changes, so a bad
  reload leaves the running pools untouched and a good one never fails at request time.
- The router's client certificate is read into each on-prem channel when the channel is
  made, and grpc never looks at its dates: a node just refuses the handshake. So the
  router does not start on one that has expired (or is not valid yet), and while it runs
  the health checks look at the dates of the one each channel presents: ERROR in the
  log once when it expires, and the cause in front of every failed check's reason (what
  `hybridroute status` shows), with the command that issues a new one.
- `pick` returns only healthy endpoints and None when there are none: no panic mode.
  A sensitive request with no healthy on-prem node must fail, not go elsewhere.
- A reload keeps each unchanged endpoint object (channel, health, in-flight count), so
  it neither drops connections nor forgets which nodes are down. New endpoints (a
  changed address, name, CA or pool name) get their first check before the new pools
  replace the old ones, waiting at most one check timeout: a reload that rebuilds a
  pool's channels must not leave a moment in which it has no healthy endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from hybridroute.certs.credentials import (
    CredentialsError,
    channel_credentials,
    client_credentials,
    reissue_command,
    validity_problem,
)
from hybridroute.router.health import HealthMonitor, HealthSettings, HealthState, Monitored

if TYPE_CHECKING:
    from hybridroute.router.policy.schema import Policy
    from hybridroute.router.policy.schema import Pool as PoolSpec

__all__ = ["MAX_MESSAGE_BYTES", "Endpoint", "Pool", "PoolError", "Pools", "UpstreamTLS"]

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DRAIN_GRACE = 10.0  # seconds a removed endpoint's in-flight calls get to finish
_FIRST_CHECK_SLACK = 0.2  # beyond the check timeout, for a new endpoint's first result

# Sized for a proxy: large tensors pass, the router does its own single retry, dead
# connections are noticed, and a restarted node is reconnected to within a second.
_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 0),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    ("grpc.use_local_subchannel_pool", 1),  # one endpoint, one connection of its own
    ("grpc.primary_user_agent", "hybridroute-router"),
)

Metadata = tuple[tuple[str, str], ...]


class PoolError(ValueError):
    """A pool cannot be built from the policy; the message names the pool and the cause.

    A ValueError, like the other ways a policy's content can be unusable: the policy
    store refuses such a reload and keeps the last good policy, instead of letting the
    error escape the SIGHUP handler or kill the file watcher.
    """


@dataclass(frozen=True)
class UpstreamTLS:
    """The router's side of upstream TLS.

    `ca`, `cert` and `key`: the private CA and the router's client identity for on-prem
    nodes (always mutual TLS). `cloud_ca`: CA for cloud pools that set none (None:
    system roots). `insecure`: plaintext to every upstream, for tests and dev only.
    """

    ca: Path
    cert: Path
    key: Path
    cloud_ca: Path | None = None
    insecure: bool = False


class Endpoint:
    """One upstream address in one pool, with its channel, health and in-flight count.

    Compared and hashed by identity: a reload that keeps the endpoint keeps the object.
    `call_metadata` (a bearer token, maybe) is deliberately absent from `repr`.
    `client_cert`: the router's certificate its channel presents (mutual TLS only).
    """

    def __init__(
        self,
        address: str,
        pool: str,
        zone: str,
        channel: grpc.aio.Channel,
        metadata: Metadata,
        client_cert: x509.Certificate | None = None,
    ) -> None:
        self.address = address
        self.pool = pool
        self.zone = zone
        self.channel = channel
        self.call_metadata = metadata
        self.client_cert = client_cert
        self.outstanding = 0
        self.health = HealthState()
        # Multicallables by method, built on first use (the forwarder's cache).
        self.calls: dict[str, grpc.aio.UnaryUnaryMultiCallable[Any, Any]] = {}

    def __repr__(self) -> str:
        state = "healthy" if self.healthy else "unhealthy"
        return f"<Endpoint {self.pool}/{self.address} {self.zone} {state}>"

    @contextlib.contextmanager
    def track(self) -> Iterator[Endpoint]:
        """Count a request as in flight for as long as the block runs."""
        self.outstanding += 1
        try:
            yield self
        finally:
            self.outstanding -= 1

    @property
    def healthy(self) -> bool:
        return self.health.healthy

    @property
    def last_error(self) -> str | None:
        return self.health.last_error

    @property
    def last_check(self) -> float | None:
        return self.health.last_check

    @property
    def checks_passed(self) -> int:
        return self.health.checks_passed

    @property
    def checks_failed(self) -> int:
        return self.health.checks_failed


class Pool:
    """The endpoints of one pool as of the last `Pools.apply`."""

    def __init__(self, name: str, zone: str, endpoints: Sequence[Endpoint]) -> None:
        self.name = name
        self.zone = zone
        self.endpoints = list(endpoints)

    def __repr__(self) -> str:
        return f"<Pool {self.name} {self.zone} {len(self.endpoints)} endpoints>"

    def pick(self, exclude: Collection[Endpoint] = ()) -> Endpoint | None:
        """A healthy endpoint with the fewest requests in flight (ties at random).

        None when no healthy endpoint is left: there is no panic mode, an unhealthy
        endpoint is never returned.
        """
        best: list[Endpoint] = []
        low = 0
        for endpoint in self.endpoints:
            if not endpoint.healthy or endpoint in exclude:
                continue
            if not best or endpoint.outstanding < low:
                best, low = [endpoint], endpoint.outstanding
            elif endpoint.outstanding == low:
                best.append(endpoint)
        return random.choice(best) if best else None

    @property
    def healthy_count(self) -> int:
        return sum(1 for e in self.endpoints if e.healthy)


# What makes an endpoint "the same" across reloads: anything its channel was built
# from. (The bearer token is not: it is per-call metadata and is swapped in place.)
_Key = tuple[str, str, str, str | None, str | None]


@dataclass(frozen=True)
class _PoolPlan:
    """A pool spec turned into everything needed to build it, checked up front."""

    name: str
    zone: str
    addresses: tuple[str, ...]
    server_name: str | None
    ca: Path | None
    credentials: grpc.ChannelCredentials | None
    client_cert: x509.Certificate | None  # what `credentials` present (on-prem only)
    metadata: Metadata
    health: HealthSettings

    def key(self, address: str) -> _Key:
        ca = None if self.ca is None else str(self.ca)
        return (self.name, address, self.zone, self.server_name, ca)


class Pools:
    """All upstream pools of the active policy; `apply` a policy at start and on reload."""

    def __init__(
        self,
        tls: UpstreamTLS,
        *,
        default_health: HealthSettings | None = None,
        on_change: Callable[[Endpoint, bool], None] | None = None,
        on_retire: Callable[[Endpoint], None] | None = None,
    ) -> None:
        """`on_change(endpoint, healthy)` when an endpoint's health changes;
        `on_retire(endpoint)` when a reload removed the last endpoint of that pool, zone
        and address, so whatever was reported about it can be forgotten."""
        self._tls = tls
        self._default_health = default_health or HealthSettings()
        self._on_change = on_change
        self._on_retire = on_retire
        self._monitor = HealthMonitor(self._changed, self._diagnose)
        self._started = False  # after the first apply, which refuses an unusable client cert
        self._cert_logged: set[bytes] = set()  # client certs whose problem is logged
        self._pools: dict[str, Pool] = {}
        self._endpoints: dict[_Key, Endpoint] = {}
        self._lock = asyncio.Lock()
        self._draining: set[asyncio.Task[None]] = set()
        if tls.insecure:
            log.warning(
                "upstream connections are PLAINTEXT (--insecure): no TLS to nodes or cloud "
                "endpoints. Never use this for sensitive data."
            )

    async def apply(self, policy: Policy) -> None:
        """Build or update the pools from `policy`; raises `PoolError` and changes nothing
        when any pool cannot be built."""
        async with self._lock:
            plans = [self._plan(name, spec) for name, spec in policy.pools.items()]
            if not self._started:
                self._refuse_unusable_client_cert(plans)
            pools: dict[str, Pool] = {}
            endpoints: dict[_Key, Endpoint] = {}
            kept: list[tuple[Endpoint, _PoolPlan]] = []
            for plan in plans:
                members = [self._endpoint(plan, a, endpoints, kept) for a in plan.addresses]
                pools[plan.name] = Pool(plan.name, plan.zone, members)
            new = [e for k, e in endpoints.items() if k not in self._endpoints]
            try:
                await self._first_checks(
                    new, max((p.health.timeout for p in plans), default=0.0) + _FIRST_CHECK_SLACK
                )
            except BaseException:  # cancelled (the router stopping): the old pools stay
                for endpoint in new:
                    await self._monitor.unwatch(endpoint)
                    await endpoint.channel.close(None)
                raise
            for endpoint, plan in kept:  # a token or health settings changed in place
                endpoint.call_metadata = plan.metadata
                self._monitor.watch(endpoint, plan.health)
            # From the swap on, nothing awaits: a reload cancelled now (the router
            # stopping, an admin caller's deadline) has either changed nothing or
            # everything, as the policy store that called it will believe.
            removed = [e for k, e in self._endpoints.items() if k not in endpoints]
            self._pools, self._endpoints = pools, endpoints
            self._started = True
            live = {_place(e) for e in endpoints.values()}
            for endpoint in removed:
                self._retire(endpoint)
                if self._on_retire is not None and _place(endpoint) not in live:
                    self._on_retire(endpoint)

    async def _first_checks(self, new: Sequence[Endpoint], within: float) -> None:
        """Wait until each of `new` has a check result, or `within` seconds have passed
        (each check is bounded by its timeout; a result may be a failure)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while any(e.last_check is None for e in new):
                    await self._monitor.next_result()

    def get(self, name: str) -> Pool:
        try:
            return self._pools[name]
        except KeyError:
            raise KeyError(f"unknown pool '{name}'") from None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._pools)

    def report_failure(self, endpoint: Endpoint, reason: str) -> None:
        """Passive ejection (connection failure, UNAVAILABLE): unhealthy until checks pass."""
        self._monitor.eject(endpoint, reason)

    @property
    def all_checked(self) -> bool:
        """Every endpoint has an active check result (the router is SERVING only then)."""
        return bool(self._endpoints) and all(
            e.last_check is not None for e in self._endpoints.values()
        )

    async def wait_checked(self) -> None:
        """Return once `all_checked` holds; bound it with `asyncio.timeout` (startup, tests)."""
        while not self.all_checked:
            await self._monitor.next_result()

    def snapshot(self) -> list[dict[str, Any]]:
        """One row per endpoint for `hybridroute status`; never contains call metadata."""
        now = time.monotonic()
        return [
            {
                "pool": pool.name,
                "zone": e.zone,
                "address": e.address,
                "healthy": e.healthy,
                "outstanding": e.outstanding,
                "last_error": e.last_error,
                "last_check_age": None if e.last_check is None else round(now - e.last_check, 3),
                "checks_passed": e.checks_passed,
                "checks_failed": e.checks_failed,
            }
            for pool in self._pools.values()
            for e in pool.endpoints
        ]

    async def close(self) -> None:
        """Stop every check and close every channel (in-flight calls are cancelled)."""
        async with self._lock:
            await self._monitor.close()
            endpoints, self._endpoints, self._pools = list(self._endpoints.values()), {}, {}
            for endpoint in endpoints:
                endpoint.health.eject("router shutting down")
                await endpoint.channel.close(None)
            for task in list(self._draining):
                task.cancel()
            await asyncio.gather(*self._draining, return_exceptions=True)

    def _changed(self, target: Monitored, healthy: bool) -> None:
        if self._on_change is not None and isinstance(target, Endpoint):
            self._on_change(target, healthy)

    # --- the router's client certificate ---------------------------------------------

    def _refuse_unusable_client_cert(self, plans: Sequence[_PoolPlan]) -> None:
        """At start: every on-prem node would refuse the handshake, so do not start."""
        for plan in plans:
            if plan.client_cert is None:
                continue
            problem = validity_problem(plan.client_cert)
            if problem is not None:
                raise PoolError(
                    f"{self._tls.cert} (upstream.cert, the router's client certificate for "
                    f"on-prem nodes): {problem}, so every on-prem node would refuse it; issue "
                    f"a new one from the CA the nodes trust ({self._reissue(plan.client_cert)})"
                    " and start the router again"
                )

    def _diagnose(self, target: Monitored) -> str | None:
        """After each check: is the client certificate this endpoint's channel presents
        out of its dates? Logged once per certificate; the cause for the check's reason."""
        cert = target.client_cert if isinstance(target, Endpoint) else None
        problem = None if cert is None else validity_problem(cert)
        if cert is None or problem is None:
            return None
        seen = cert.fingerprint(hashes.SHA256())
        if seen not in self._cert_logged:
            self._cert_logged.add(seen)
            log.error(
                "the router's client certificate %s (upstream.cert): %s; on-prem nodes "
                "refuse every new connection from this router. Issue a new one (%s) and "
                "restart the router (its channels keep the certificate they were made with)",
                self._tls.cert,
                problem,
                self._reissue(cert),
            )
        return f"router client certificate {self._tls.cert}: {problem}"

    def _reissue(self, cert: x509.Certificate) -> str:
        command = reissue_command(cert, self._tls.cert, self._tls.ca.parent)
        if self._tls.key != self._tls.cert.with_suffix(".key"):
            command += f", then move {self._tls.cert.stem}.key to {self._tls.key}"
        return command

    # --- building ------------------------------------------------------------------

    def _plan(self, name: str, spec: PoolSpec) -> _PoolPlan:
        ca = self._ca_for(spec)
        credentials, client_cert = (
            (None, None) if self._tls.insecure else self._credentials(name, spec.zone, ca)
        )
        return _PoolPlan(
            name=name,
            zone=spec.zone,
            addresses=tuple(dict.fromkeys(spec.endpoints)),
            server_name=spec.server_name,
            ca=ca,
            credentials=credentials,
            client_cert=client_cert,
            metadata=_bearer_metadata(name, spec),
            health=self._health_for(spec),
        )

    def _ca_for(self, spec: PoolSpec) -> Path | None:
        if spec.ca is not None:
            return Path(spec.ca)
        return self._tls.ca if spec.zone == "onprem" else self._tls.cloud_ca

    def _credentials(
        self, name: str, zone: str, ca: Path | None
    ) -> tuple[grpc.ChannelCredentials, x509.Certificate | None]:
        """mTLS with the router's identity on-prem (and that identity's certificate);
        server-only TLS for cloud endpoints."""
        try:
            if zone == "onprem":
                assert ca is not None  # on-prem always has the router's CA at least
                return client_credentials(ca, self._tls.cert, self._tls.key)
            if ca is None:
                return grpc.ssl_channel_credentials(), None
            return channel_credentials(ca), None
        except CredentialsError as exc:
            raise PoolError(f"pool '{name}': {exc}") from exc

    def _health_for(self, spec: PoolSpec) -> HealthSettings:
        given = getattr(spec, "health", None)
        if given is None:
            return self._default_health
        return HealthSettings(
            interval=given.interval,
            timeout=given.timeout,
            healthy_threshold=given.healthy_threshold,
            unhealthy_threshold=given.unhealthy_threshold,
        )

    def _endpoint(
        self,
        plan: _PoolPlan,
        address: str,
        into: dict[_Key, Endpoint],
        kept: list[tuple[Endpoint, _PoolPlan]],
    ) -> Endpoint:
        """Reuse the endpoint with the same key (added to `kept`, for `apply` to update
        once the reload goes ahead), or make one and start checking it."""
        key = plan.key(address)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            channel = self._channel(address, plan)
            endpoint = Endpoint(
                address, plan.name, plan.zone, channel, plan.metadata, plan.client_cert
            )
            self._monitor.watch(endpoint, plan.health)
            log.info("endpoint %s added to %s pool %s", address, plan.zone, plan.name)
        else:
            kept.append((endpoint, plan))
        into[key] = endpoint
        return endpoint

    def _channel(self, address: str, plan: _PoolPlan) -> grpc.aio.Channel:
        options = list(_CHANNEL_OPTIONS)
        if plan.credentials is None:
            return grpc.aio.insecure_channel(address, options=options)
        if plan.server_name:
            options.append(("grpc.ssl_target_name_override", plan.server_name))
        return grpc.aio.secure_channel(address, plan.credentials, options=options)

    def _retire(self, endpoint: Endpoint) -> None:
        """Stop checking a removed endpoint; its in-flight calls get DRAIN_GRACE to
        finish, in the background (the check winds down first)."""
        check = self._monitor.stop_watching(endpoint)
        endpoint.health.eject("removed from the policy")  # stale Pool objects skip it
        log.info("endpoint %s removed from pool %s", endpoint.address, endpoint.pool)
        task = asyncio.create_task(_close_after(check, endpoint.channel))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)


async def _close_after(check: asyncio.Task[None] | None, channel: grpc.aio.Channel) -> None:
    if check is not None:
        await asyncio.wait({check})
    await channel.close(DRAIN_GRACE)


def _place(endpoint: Endpoint) -> tuple[str, str, str]:
    """What reports name an endpoint by (the metrics' labels)."""
    return endpoint.pool, endpoint.zone, endpoint.address


def _bearer_metadata(pool: str, spec: PoolSpec) -> Metadata:
    """The pool's `authorization` metadata, read now so a missing token fails the load."""
    token = _read_token(pool, spec)
    if token is None:
        return ()
    if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        raise PoolError(
            f"pool '{pool}': the bearer token contains characters not allowed in a header"
        )
    return (("authorization", f"Bearer {token}"),)


def _read_token(pool: str, spec: PoolSpec) -> str | None:
    if spec.bearer_token_env:
        var = spec.bearer_token_env
        value = os.environ.get(var)
        if value is None or not value.strip():
            state = "is not set" if value is None else "is empty"
            raise PoolError(f"pool '{pool}': environment variable {var} (bearer_token_env) {state}")
        return value.strip()
    if spec.bearer_token_file:
        path = Path(spec.bearer_token_file)
        try:
            value = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PoolError(f"pool '{pool}': bearer_token_file {path} not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
            raise PoolError(f"pool '{pool}': cannot read bearer_token_file {path}: {why}") from None
        if not value.strip():
            raise PoolError(f"pool '{pool}': bearer_token_file {path} is empty")
        return value.strip()
    return None
