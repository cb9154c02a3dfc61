"""Upstream pools and health checks against real nodes over real mutual TLS.

Each test runs one event loop (`asyncio.run`) holding both the nodes and the `Pools`
under test; health intervals are 100 ms so transitions show up within a second.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import subprocess
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from support import HYBRIDROUTE, free_port

from hybridroute.certs.credentials import server_credentials
from hybridroute.certs.pki import PkiLayout, init_pki
from hybridroute.node.server import NodeOptions, NodeServer
from hybridroute.router.health import HealthMonitor, HealthSettings, _Watch
from hybridroute.router.policy.schema import Policy, compile_policy
from hybridroute.router.policy.store import PolicyStore
from hybridroute.router.pools import PoolError, Pools, UpstreamTLS

FAST = {"interval": "100ms", "timeout": "100ms", "healthy_threshold": 1, "unhealthy_threshold": 2}
DEAD = "127.0.0.1:1"  # nothing listens there: an on-prem pool that is simply down


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 15))


def make_policy(tmp_path: Path, pools: dict[str, dict[str, Any]], name: str = "p") -> Policy:
    """A valid policy around `pools` (one route per pool, first on-prem pool as default)."""
    pools = {n: {"health": FAST, **spec} for n, spec in pools.items()}
    onprem = next(n for n, spec in pools.items() if spec["zone"] == "onprem")
    doc = {
        "version": 1,
        "pools": pools,
        "routes": {n: {"pool": n} for n in pools},
        "callers": ["demo-app"],
        "sensitive_route": onprem,
        "default_route": onprem,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return compile_policy(path)


def tls(pki: Path, **extra: Any) -> UpstreamTLS:
    return UpstreamTLS(ca=pki / "ca.pem", cert=pki / "router.pem", key=pki / "router.key", **extra)


async def start_node(
    model_repo: Path, pki: Path, port: int = 0, certs: Path | None = None, insecure: bool = False
) -> NodeServer:
    """A real node; `certs` picks its server certificate's PKI (default: the router's)."""
    certs = certs or pki
    node = NodeServer(
        NodeOptions(
            models=model_repo,
            listen=f"127.0.0.1:{port}",
            cert=None if insecure else certs / "node.pem",
            key=None if insecure else certs / "node.key",
            client_ca=None if insecure else pki / "ca.pem",
            allow_clients=() if insecure else ("router",),
            insecure=insecure,
        )
    )
    await node.start()
    return node


def addr(node: NodeServer) -> str:
    return f"127.0.0.1:{node.port}"


async def until(condition: Callable[[], bool], within: float = 3.0) -> float:
    """Seconds until `condition()` holds; fails the test after `within`."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < within, "condition not reached in time"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


async def checked(pools: Pools) -> None:
    async with asyncio.timeout(3):
        await pools.wait_checked()


async def stop_all(pools: Pools, nodes: Iterable[NodeServer]) -> None:
    await pools.close()
    for node in nodes:
        await node.stop(grace=0)


# --------------------------------------------------------------------------- pick


def test_pick_prefers_least_outstanding_skips_unhealthy_and_never_panics(
    tmp_path: Path, pki: Path, model_repo: Path
) -> None:
    async def scenario() -> None:
        a, b = await start_node(model_repo, pki), await start_node(model_repo, pki)
        pools = Pools(tls(pki))
        await pools.apply(
            make_policy(tmp_path, {"on": {"zone": "onprem", "endpoints": [addr(a), addr(b)]}})
        )
        await checked(pools)
        pool = pools.get("on")
        ea, eb = pool.endpoints
        assert ea.healthy and eb.healthy and ea.zone == eb.zone == "onprem"

        assert {pool.pick() for _ in range(60)} == {ea, eb}  # ties broken at random
        with ea.track(), ea.track():
            assert ea.outstanding == 2
            assert {pool.pick() for _ in range(30)} == {eb}
            with eb.track():
                assert {pool.pick() for _ in range(30)} == {eb}  # 1 < 2
            assert pool.pick(exclude=[eb]) is ea  # the retry path
        with pytest.raises(RuntimeError), ea.track():
            raise RuntimeError("upstream call failed")
        assert ea.outstanding == 0

        pools.report_failure(eb, "UNAVAILABLE: connection reset")
        assert not eb.healthy
        assert {pool.pick() for _ in range(30)} == {ea}
        assert pool.pick(exclude=[ea]) is None  # no panic mode: never the unhealthy one
        pools.report_failure(ea, "UNAVAILABLE: connection reset")
        assert pool.pick() is None
        await stop_all(pools, [a, b])

    run(scenario())


# ---------------------------------------------------------------- active checks


def test_stopped_node_is_ejected_and_readmitted_after_restart_on_same_port(
    tmp_path: Path, pki: Path, model_repo: Path
) -> None:
    async def scenario() -> None:
        port = free_port()
        node = await start_node(model_repo, pki, port)
        pools = Pools(tls(pki))
        assert not pools.all_checked  # nothing applied yet: the router must not serve
        await pools.apply(
            make_policy(tmp_path, {"on": {"zone": "onprem", "endpoints": [addr(node)]}})
        )
        await checked(pools)
        (endpoint,) = pools.get("on").endpoints
        assert endpoint.healthy and endpoint.checks_passed >= 1 and endpoint.last_error is None

        await node.stop(grace=0)
        took = await until(lambda: not endpoint.healthy)
        assert took < 1.0  # unhealthy_threshold 2 x interval 100 ms, plus slack
        assert pools.get("on").pick() is None
        assert endpoint.last_error and "UNAVAILABLE" in endpoint.last_error

        node = await start_node(model_repo, pki, port)
        assert await until(lambda: endpoint.healthy) < 3.0  # reconnect backoff is capped at 1 s
        assert pools.get("on").endpoints == [endpoint] and pools.get("on").pick() is endpoint
        await stop_all(pools, [node])

    run(scenario())


def test_not_serving_node_is_ejected_then_readmitted(
    tmp_path: Path, pki: Path, model_repo: Path
) -> None:
    async def scenario() -> None:
        node = await start_node(model_repo, pki)
        pools = Pools(tls(pki))
        await pools.apply(
            make_policy(tmp_path, {"on": {"zone": "onprem", "endpoints": [addr(node)]}})
        )
        await checked(pools)
        (endpoint,) = pools.get("on").endpoints
        assert endpoint.healthy
        # The node's own health servicer: what its graceful shutdown flips.
        await node._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await until(lambda: not endpoint.healthy, 1.0)
        assert endpoint.last_error == "health status NOT_SERVING"
        await node._health.set("", health_pb2.HealthCheckResponse.SERVING)
        await until(lambda: endpoint.healthy, 1.0)
        await stop_all(pools, [node])

    run(scenario())


def test_passive_ejection_is_immediate_logged_once_and_readmitted_by_checks(
    tmp_path: Path, pki: Path, model_repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    changes: list[tuple[str, bool]] = []

    async def scenario() -> None:
        node = await start_node(model_repo, pki)
        pools = Pools(tls(pki), on_change=lambda e, healthy: changes.append((e.address, healthy)))
        health = {**FAST, "healthy_threshold": 3}
        spec = {"zone": "onprem", "endpoints": [addr(node)], "health": health}
        await pools.apply(make_policy(tmp_path, {"on": spec}))
        await checked(pools)
        (endpoint,) = pools.get("on").endpoints
        assert endpoint.healthy  # the very first pass admits, whatever healthy_threshold
        caplog.clear()
        changes.clear()

        pools.report_failure(endpoint, "UNAVAILABLE: stream reset")
        pools.report_failure(endpoint, "UNAVAILABLE: stream reset")
        assert not endpoint.healthy and pools.get("on").pick() is None
        assert pools.snapshot()[0]["last_error"] == "UNAVAILABLE: stream reset"
        passed = endpoint.checks_passed
        await until(lambda: endpoint.healthy, 2.0)
        assert endpoint.checks_passed - passed >= 3  # healthy_threshold consecutive passes
        await stop_all(pools, [node])

    with caplog.at_level(logging.INFO, logger="hybridroute.router"):
        run(scenario())
    transitions = [r for r in caplog.records if "is UNHEALTHY" in r.getMessage()]
    assert len(transitions) == 1 and transitions[0].levelno == logging.WARNING
    assert changes[:2] == [(changes[0][0], False), (changes[0][0], True)]


# ------------------------------------------------------------------------ mTLS


def test_onprem_endpoints_need_the_private_ca_the_right_name_and_tls(
    tmp_path: Path, pki: Path, model_repo: Path
) -> None:
    other = tmp_path / "other-pki"
    init_pki(other)

    async def scenario() -> None:
        good = await start_node(model_repo, pki)
        foreign = await start_node(model_repo, pki, certs=other)  # trusts us; we must not
        plain = await start_node(model_repo, pki, insecure=True)
        pools = Pools(tls(pki))
        policy = make_policy(
            tmp_path,
            {
                "right_name": {
                    "zone": "onprem",
                    "endpoints": [addr(good)],
                    "server_name": "localhost",
                },
                "foreign_ca": {"zone": "onprem", "endpoints": [addr(foreign)]},
                "wrong_name": {
                    "zone": "onprem",
                    "endpoints": [addr(good)],
                    "server_name": "node.example.com",
                },
                "plaintext": {"zone": "onprem", "endpoints": [addr(plain)]},
            },
        )
        await pools.apply(policy)
        await checked(pools)
        await asyncio.sleep(0.5)  # several more rounds: "stays" unhealthy
        rows = {row["pool"]: row for row in pools.snapshot()}
        assert rows["right_name"]["healthy"] is True
        for name in ("foreign_ca", "wrong_name", "plaintext"):
            assert rows[name]["healthy"] is False, name
            assert rows[name]["checks_passed"] == 0 and rows[name]["checks_failed"] >= 3, name
            assert pools.get(name).pick() is None
        await stop_all(pools, [good, foreign, plain])

    run(scenario())


# ------------------------------------------------------------------------ cloud


async def start_cloud(
    pki: Path, seen: list[tuple[tuple[str, str | bytes], ...]]
) -> grpc.aio.Server:
    """A stand-in cloud endpoint: server-side TLS only, records each call's metadata."""

    class Record(grpc.aio.ServerInterceptor):  # type: ignore[misc]
        async def intercept_service(
            self, continuation: Callable[[Any], Awaitable[Any]], details: Any
        ) -> Any:
            seen.append(tuple(details.invocation_metadata))
            return await continuation(details)

    server = grpc.aio.server(interceptors=[Record()])
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_secure_port(
        "127.0.0.1:0", server_credentials(pki / "cloud.pem", pki / "cloud.key", None)
    )
    await server.start()
    server.port = port  # type: ignore[attr-defined]
    return server


def test_cloud_pool_sends_bearer_token_and_never_shows_it(
    tmp_path: Path, pki: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    token = "s3cret-token-value"
    monkeypatch.setenv("HR_TEST_TOKEN", f"  {token}\n")
    token_file = tmp_path / "token"
    token_file.write_text(f"{token}-from-file\n")
    seen: list[tuple[tuple[str, str | bytes], ...]] = []

    async def scenario() -> None:
        server = await start_cloud(pki, seen)
        address = f"127.0.0.1:{server.port}"  # type: ignore[attr-defined]
        pools = Pools(tls(pki, cloud_ca=pki / "ca.pem"))
        cloud = {"zone": "cloud", "endpoints": [address]}
        await pools.apply(
            make_policy(
                tmp_path,
                {
                    "on": {"zone": "onprem", "endpoints": [DEAD]},
                    "env": {
                        **cloud,
                        "ca": str(pki / "ca.pem"),
                        "bearer_token_env": "HR_TEST_TOKEN",
                    },
                    "file": {**cloud, "bearer_token_file": str(token_file)},  # uses cloud_ca
                },
            )
        )
        await checked(pools)
        await asyncio.sleep(0.3)
        env, file = pools.get("env").endpoints[0], pools.get("file").endpoints[0]
        assert env.call_metadata == (("authorization", f"Bearer {token}"),)
        assert file.call_metadata == (("authorization", f"Bearer {token}-from-file"),)
        assert env.healthy and file.healthy and env.zone == "cloud"
        assert not pools.get("on").endpoints[0].healthy
        pools2 = Pools(tls(pki))  # no cloud_ca: system roots do not trust our dev CA
        await pools2.apply(
            make_policy(
                tmp_path, {"on": {"zone": "onprem", "endpoints": [DEAD]}, "sys": cloud}, "p2"
            )
        )
        await checked(pools2)
        assert not pools2.get("sys").endpoints[0].healthy
        snapshot = repr(pools.snapshot()) + repr(env) + repr(pools.get("env"))
        assert token not in snapshot
        await pools.close()
        await pools2.close()
        await server.stop(0)

    with caplog.at_level(logging.DEBUG):
        run(scenario())
    sent = [dict(md).get("authorization") for md in seen]
    assert f"Bearer {token}" in sent and f"Bearer {token}-from-file" in sent  # checks carry it
    assert token not in caplog.text


def test_missing_token_fails_apply_naming_pool_and_source_and_changes_nothing(
    tmp_path: Path, pki: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HR_TEST_MISSING", raising=False)

    async def scenario() -> None:
        pools = Pools(tls(pki))
        onprem = {"zone": "onprem", "endpoints": [DEAD]}
        await pools.apply(make_policy(tmp_path, {"on": onprem}))
        before = pools.get("on")
        bad_env = {
            "zone": "cloud",
            "endpoints": ["127.0.0.1:2"],
            "bearer_token_env": "HR_TEST_MISSING",
        }
        with pytest.raises(PoolError, match=r"pool 'cloudy': environment variable HR_TEST_MISSING"):
            await pools.apply(make_policy(tmp_path, {"on": onprem, "cloudy": bad_env}, "bad"))
        missing = str(tmp_path / "no-such-token")
        bad_file = {**bad_env, "bearer_token_env": None, "bearer_token_file": missing}
        with pytest.raises(
            PoolError, match=r"pool 'cloudy': bearer_token_file .*no-such-token not found"
        ):
            await pools.apply(make_policy(tmp_path, {"on": onprem, "cloudy": bad_file}, "bad2"))
        assert pools.get("on") is before and pools.names == ("on",)
        await pools.close()

    run(scenario())


# ------------------------------------------------------------------------ reload


def test_apply_keeps_unchanged_endpoints_and_their_health_and_drops_removed(
    tmp_path: Path, pki: Path, model_repo: Path
) -> None:
    async def scenario() -> None:
        a, b = await start_node(model_repo, pki), await start_node(model_repo, pki)
        pools = Pools(tls(pki))
        both = {"zone": "onprem", "endpoints": [addr(a), addr(b)]}
        await pools.apply(make_policy(tmp_path, {"on": both}, "v1"))
        await checked(pools)
        ea, eb = pools.get("on").endpoints
        assert ea.healthy and eb.healthy
        passed = ea.checks_passed

        slower = {**FAST, "interval": "200ms", "timeout": "150ms"}
        v2 = {
            "on": {"zone": "onprem", "endpoints": [addr(a)], "health": slower},
            "named": {**both, "server_name": "localhost"},  # a channel setting: new objects
        }
        await pools.apply(make_policy(tmp_path, v2, "v2"))
        assert pools.get("on").endpoints == [ea]  # same object, no re-check needed
        assert ea.healthy and ea.checks_passed >= passed and pools.get("on").pick() is ea
        assert not eb.healthy  # retired: a stale Pool can no longer pick it
        named = pools.get("named").endpoints
        assert all(e is not ea and e is not eb for e in named)
        assert {(r["pool"], r["address"]) for r in pools.snapshot()} == {
            ("on", addr(a)),
            ("named", addr(a)),
            ("named", addr(b)),
        }
        await checked(pools)
        assert all(e.healthy for e in named)
        await stop_all(pools, [a, b])

    run(scenario())


async def _slow_to_stop() -> None:
    """A check task that takes a while to wind down once cancelled."""
    try:
        await asyncio.sleep(10)
    except asyncio.CancelledError:
        await asyncio.sleep(0.2)
        raise


def test_unwatch_passes_its_callers_cancellation_on() -> None:
    """The router stopping while a reload retires an endpoint cancels the reload; a
    cancellation swallowed there left the stop waiting on a reload that went on."""

    async def scenario() -> None:
        monitor, target = HealthMonitor(), object()
        entry = _Watch(HealthSettings())
        entry.task = asyncio.create_task(_slow_to_stop())
        monitor._watches[target] = entry  # type: ignore[index]
        caller = asyncio.create_task(monitor.unwatch(target))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        caller.cancel()
        await asyncio.wait({caller})
        assert caller.cancelled()
        await asyncio.wait({entry.task})  # and the check itself still ended
        assert entry.task.cancelled()

    run(scenario())


def test_a_reload_is_never_cancelled_after_its_pools_took_effect(
    tmp_path: Path, pki: Path, model_repo: Path
) -> None:
    """The policy store keeps the old policy when a reload is cancelled: so the pools
    must not be half-way either. Cancelled while a removed endpoint's check winds
    down, the reload used to end cancelled with the new pools already in place."""

    async def scenario() -> None:
        a, b = await start_node(model_repo, pki), await start_node(model_repo, pki)
        pools = Pools(tls(pki))
        await pools.apply(
            make_policy(tmp_path, {"on": {"zone": "onprem", "endpoints": [addr(a), addr(b)]}}, "v1")
        )
        await checked(pools)
        eb = pools.get("on").endpoints[1]
        watch = pools._monitor._watches[eb]
        assert watch.task is not None
        watch.task.cancel()
        watch.task = asyncio.create_task(_slow_to_stop())
        reload = asyncio.create_task(
            pools.apply(
                make_policy(tmp_path, {"on": {"zone": "onprem", "endpoints": [addr(a)]}}, "v2")
            )
        )
        await asyncio.sleep(0.05)
        reload.cancel()
        await asyncio.wait({reload})
        swapped = [e.address for e in pools.get("on").endpoints] == [addr(a)]
        assert swapped and not reload.cancelled()  # it took effect, and says so
        await stop_all(pools, [a, b])

    run(scenario())


def test_the_forwarder_never_sends_an_unmatched_request_to_the_cloud(
    tmp_path: Path, pki: Path
) -> None:
    """The last line of invariants 1 and 2: a decision that names a cloud route for a
    request no rule matched (a policy object built past every check) sends nothing."""
    from hybridroute.router.forward import Forwarder, ZoneGuardRefusal
    from hybridroute.router.metrics import RouterMetrics
    from hybridroute.router.policy.engine import Decision

    seen: list[tuple[tuple[str, str | bytes], ...]] = []

    async def scenario() -> None:
        server = await start_cloud(pki, seen)
        address = f"127.0.0.1:{server.port}"  # type: ignore[attr-defined]
        pools = Pools(tls(pki, cloud_ca=pki / "ca.pem"))
        policy = make_policy(
            tmp_path,
            {
                "on": {"zone": "onprem", "endpoints": [DEAD]},
                "out": {"zone": "cloud", "endpoints": [address]},
            },
        )
        try:
            await _send_unmatched_to(pools, policy)
        finally:
            await pools.close()
            await server.stop(0)

    async def _send_unmatched_to(pools: Pools, policy: Any) -> None:
        await pools.apply(policy)
        await until(lambda: pools.get("out").endpoints[0].healthy)
        leaky = Decision(
            action="route", route="out", zone="cloud", pool="out", rule_id="default",
            sensitive=True, reasons=("unmatched",), findings={}, fallbacks=(),
            policy_hash=policy.version_hash, trace=(), detector_hits=(),
        )  # fmt: skip
        with pytest.raises(ZoneGuardRefusal):
            await Forwarder(pools, RouterMetrics()).forward(
                "/inference.GRPCInferenceService/ModelInfer",
                b"",
                policy,
                leaky,
                deadline=None,
                metadata=(("x-marker", "unmatched"),),
            )
        assert not any(("x-marker", "unmatched") in call for call in seen)

    run(scenario())


def test_health_settings_are_validated() -> None:
    with pytest.raises(ValueError):
        HealthSettings(interval=0)
    with pytest.raises(ValueError):
        HealthSettings(unhealthy_threshold=0)
    assert HealthSettings() == HealthSettings(1.0, 0.5, 1, 2)


def test_a_reload_whose_pool_cannot_be_built_is_refused_and_the_old_policy_serves(
    tmp_path: Path, pki: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the policy store, as SIGHUP and the file watcher reload: a pool the new
    policy cannot build (its token variable unset) is a refused reload, not an error
    that escapes (it would kill the file watcher and leave no trace in `status`)."""
    monkeypatch.delenv("HR_TEST_RELOAD_TOKEN", raising=False)
    onprem = {"zone": "onprem", "endpoints": [DEAD]}
    path = tmp_path / "live.yaml"

    def write(pools: dict[str, dict[str, Any]]) -> None:
        make_policy(tmp_path, pools, "next")
        path.write_text((tmp_path / "next.yaml").read_text())

    async def scenario() -> None:
        pools = Pools(tls(pki))
        write({"on": onprem})
        store = PolicyStore(path, pools.apply)
        await store.start()
        good = store.current.version_hash
        cloud = {"zone": "cloud", "endpoints": ["127.0.0.1:2"]}
        write({"on": onprem, "cloudy": {**cloud, "bearer_token_env": "HR_TEST_RELOAD_TOKEN"}})
        result = await store.reload("SIGHUP")
        assert not result.accepted and store.current.version_hash == good
        assert result.error and "pool 'cloudy'" in result.error
        assert "HR_TEST_RELOAD_TOKEN" in result.error
        assert store.last_refused is result and pools.names == ("on",)
        monkeypatch.setenv("HR_TEST_RELOAD_TOKEN", "t0ken")
        assert (await store.reload("SIGHUP")).accepted  # fixed: the next reload takes it
        assert set(pools.names) == {"on", "cloudy"}
        await pools.close()

    run(scenario())


def test_a_reload_that_rebuilds_a_pools_channels_leaves_no_gap_without_healthy_endpoints(
    tmp_path: Path, pki: Path, model_repo: Path
) -> None:
    """A changed channel setting (here the expected name) makes new endpoints, unhealthy
    until checked: the pool must not be swapped in before they were, or every request
    in between finds no healthy endpoint and fails while all nodes are up."""

    async def scenario() -> None:
        a, b = await start_node(model_repo, pki), await start_node(model_repo, pki)
        pools = Pools(tls(pki))
        both = {"zone": "onprem", "endpoints": [addr(a), addr(b)]}
        await pools.apply(make_policy(tmp_path, {"on": both}, "v1"))
        await checked(pools)
        old = pools.get("on").endpoints
        picks: list[bool] = []

        async def traffic() -> None:
            while True:
                picks.append(pools.get("on").pick() is not None)
                await asyncio.sleep(0)

        sender = asyncio.create_task(traffic())
        await asyncio.sleep(0.05)
        await pools.apply(make_policy(tmp_path, {"on": {**both, "server_name": "localhost"}}))
        new = pools.get("on").endpoints
        assert not set(new) & set(old)
        assert [e.healthy for e in new] == [True, True]
        await asyncio.sleep(0.05)
        sender.cancel()
        assert len(picks) > 10
        assert picks.count(False) == 0, "picks found no healthy endpoint during the reload"
        await stop_all(pools, [a, b])

    run(scenario())


def test_a_reload_waits_for_new_endpoints_at_most_their_check_timeout(
    tmp_path: Path, pki: Path
) -> None:
    """A new endpoint that never answers (a black hole) delays the reload by about one
    check timeout, not more: the reload then goes ahead with it unhealthy."""

    async def scenario() -> None:
        hole = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)  # never speaks
        port = hole.sockets[0].getsockname()[1]
        pools = Pools(tls(pki))
        onprem = {"zone": "onprem", "endpoints": [DEAD]}
        await pools.apply(make_policy(tmp_path, {"on": onprem}, "v1"))
        slow = {**FAST, "interval": "1s", "timeout": "300ms"}
        spec = {"zone": "onprem", "endpoints": [f"127.0.0.1:{port}"], "health": slow}
        started = time.monotonic()
        await pools.apply(make_policy(tmp_path, {"on": onprem, "hole": spec}, "v2"))
        assert 0.25 < time.monotonic() - started < 1.0
        assert not pools.get("hole").endpoints[0].healthy
        await pools.close()
        hole.close()

    run(scenario())


# ------------------------------------------------ the router's client certificate


def mint_router_cert(
    pki: Path, out: Path, *, not_before: dt.datetime, not_after: dt.datetime
) -> x509.Certificate:
    """The router's client certificate from the session CA with exactly this validity
    (which `certs issue` will not make), as `out`/router.pem and router.key."""
    layout = PkiLayout(pki)
    ca_cert = x509.load_pem_x509_certificate(layout.ca.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(layout.ca.key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "router")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("router")]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "router.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (out / "router.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert


def client_tls(pki: Path, own: Path) -> UpstreamTLS:
    """The session CA, and the router's client certificate from `own`."""
    return UpstreamTLS(ca=pki / "ca.pem", cert=own / "router.pem", key=own / "router.key")


def test_the_router_does_not_start_on_a_client_certificate_nodes_would_refuse(
    tmp_path: Path, pki: Path
) -> None:
    now = dt.datetime.now(dt.UTC)
    day = dt.timedelta(days=1)
    onprem = {"on": {"zone": "onprem", "endpoints": [DEAD]}}
    stale, early, mismatched = tmp_path / "stale", tmp_path / "early", tmp_path / "mismatched"
    old = mint_router_cert(pki, stale, not_before=now - 9 * day, not_after=now - day)
    mint_router_cert(pki, early, not_before=now + day, not_after=now + 9 * day)
    mint_router_cert(pki, mismatched, not_before=now - day, not_after=now + day)
    (mismatched / "router.key").write_bytes((early / "router.key").read_bytes())

    async def refused(own: Path) -> str:
        pools = Pools(client_tls(pki, own))
        with pytest.raises(PoolError) as caught:
            await pools.apply(make_policy(tmp_path, onprem))
        assert pools.names == () and not pools.all_checked
        await pools.close()
        return str(caught.value)

    async def scenario() -> None:
        why = await refused(stale)
        assert why.startswith(f"{stale / 'router.pem'} (upstream.cert, the router's client")
        assert f"expires={old.not_valid_after_utc:%Y-%m-%d} has expired" in why
        assert "every on-prem node would refuse it" in why
        command = (
            f"hybridroute certs issue router --client --san router --ca-dir {pki} "
            f"--out {stale} --stem router --force"
        )
        assert command in why and why.endswith("start the router again")
        why = await refused(early)
        assert f"is not valid before {now + day:%Y-%m-%d}" in why and "clock" in why
        why = await refused(mismatched)
        assert "private key does not match certificate" in why and str(mismatched) in why

    run(scenario())


def test_router_serve_names_the_expired_client_certificate_without_a_traceback(
    tmp_path: Path, pki: Path
) -> None:
    now = dt.datetime.now(dt.UTC)
    stale = tmp_path / "stale"
    mint_router_cert(pki, stale, not_before=now - dt.timedelta(days=9), not_after=now)
    make_policy(tmp_path, {"on": {"zone": "onprem", "endpoints": [DEAD]}})
    config = tmp_path / "router.yaml"
    config.write_text(f"""
listen: 127.0.0.1:0
tls: {{cert: {pki}/router.pem, key: {pki}/router.key, client_ca: {pki}/ca.pem}}
policy: {tmp_path / "p.yaml"}
upstream: {{ca: {pki}/ca.pem, cert: {stale}/router.pem, key: {stale}/router.key}}
""")
    done = subprocess.run(
        [*HYBRIDROUTE, "router", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    err = done.stderr
    assert "router not started:" in err and f"{stale}/router.pem" in err
    assert "has expired" in err and "hybridroute certs issue router" in err
    assert "Traceback" not in err


def test_a_client_certificate_expiring_while_running_is_logged_once_and_named_in_health(
    tmp_path: Path, pki: Path, model_repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    end = now + dt.timedelta(seconds=2)
    own = tmp_path / "short"
    mint_router_cert(pki, own, not_before=now - dt.timedelta(minutes=5), not_after=end)

    async def scenario() -> None:
        port = free_port()
        node = await start_node(model_repo, pki, port)
        pools = Pools(client_tls(pki, own))
        await pools.apply(
            make_policy(tmp_path, {"on": {"zone": "onprem", "endpoints": [addr(node)]}})
        )
        await checked(pools)
        (endpoint,) = pools.get("on").endpoints
        assert endpoint.healthy and not caplog.records
        await asyncio.sleep(max(0.0, (end - dt.datetime.now(dt.UTC)).total_seconds()) + 0.3)
        assert len(caplog.records) == 1  # at expiry, while the open connection still works
        # A new handshake (the node restarted) is refused: the reason says why.
        await node.stop(grace=0)
        node = await start_node(model_repo, pki, port)
        await asyncio.sleep(0.5)
        assert not endpoint.healthy
        (row,) = pools.snapshot()
        assert row["last_error"].startswith(f"router client certificate {own / 'router.pem'}: ")
        assert f"expires={end:%Y-%m-%d} has expired; " in row["last_error"]
        await stop_all(pools, [node])

    with caplog.at_level(logging.ERROR, logger="hybridroute.router"):
        run(scenario())
    (error,) = caplog.records
    message = error.getMessage()
    assert error.levelno == logging.ERROR and f"{own / 'router.pem'} (upstream.cert): " in message
    assert "has expired" in message and "on-prem nodes refuse every new connection" in message
    assert f"hybridroute certs issue router --client --san router --ca-dir {pki}" in message


def test_a_reload_cancelled_while_new_endpoints_are_checked_leaves_nothing_behind(
    tmp_path: Path, pki: Path
) -> None:
    """The router stopping (or the watcher being cancelled) mid-reload: the endpoints
    that reload made are neither checked on forever nor left with an open channel."""

    async def scenario() -> None:
        hole = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)  # never speaks
        port = hole.sockets[0].getsockname()[1]
        pools = Pools(tls(pki))
        onprem = {"zone": "onprem", "endpoints": [DEAD]}
        await pools.apply(make_policy(tmp_path, {"on": onprem}, "v1"))
        watched = set(pools._monitor._watches)
        slow = {**FAST, "interval": "1s", "timeout": "500ms"}
        spec = {"zone": "onprem", "endpoints": [f"127.0.0.1:{port}"], "health": slow}
        reload = asyncio.create_task(
            pools.apply(make_policy(tmp_path, {"on": onprem, "hole": spec}, "v2"))
        )
        await asyncio.sleep(0.1)
        reload.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reload
        assert pools.names == ("on",)
        orphans = set(pools._monitor._watches) - watched
        assert not orphans, f"still checked: {orphans}"
        await pools.close()
        hole.close()

    run(scenario())
