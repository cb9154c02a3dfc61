"""`policy replay` reads what the policy decided, not where a fallback or retry took the
request: replaying the very policy that made a trail moves nothing to the cloud, and a
request that already reached the cloud is not 'newly' sent there."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

from test_audit_store import config, event

from hybridroute.router.audit.db import connect_readonly
from hybridroute.router.audit.store import AuditStore
from hybridroute.router.policy.replay import AuditDbSource, replay
from hybridroute.router.policy.schema import compile_policy
from hybridroute.stack import default_policy_path

POLICY = compile_policy(default_policy_path())
CLEAN_PUBLIC = dict(
    sensitive=False,
    label="public",
    rule_id="public-clean-to-cloud",
    policy_hash=POLICY.version_hash,
    decided_route="cloud",
    decided_zone="cloud",
)


def test_a_fallback_or_a_retry_is_replayed_as_what_was_decided(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    fell_back = event(  # decided for the cloud; the cloud was down, on-prem served it
        1, **CLEAN_PUBLIC, route="onprem", zone="onprem", pool="onprem", endpoint="n1:1"
    )
    retried = event(  # decided for the cloud; first tried there, then on-prem answered
        2,
        **CLEAN_PUBLIC,
        route="onprem",
        zone="onprem",
        attempts=2,
        earlier=(("cloud", "cloud", "c1:1"),),
    )

    async def trail() -> None:
        store = AuditStore(cfg)
        await store.start()
        for e in (fell_back, retried):
            await store.record(e)
        await store.close()

    asyncio.run(trail())
    with contextlib.closing(connect_readonly(cfg.db)) as conn:
        bodies = [
            json.loads(b)
            for (b,) in conn.execute("SELECT body FROM records WHERE kind = 'request'")
        ]
    assert bodies[0]["decided"] == {"route": "cloud", "zone": "cloud"}  # served on-prem
    assert bodies[1]["earlier"][0]["zone"] == "cloud"

    report = replay(POLICY, AuditDbSource(cfg.db).decisions())
    assert report.replayed == 2
    assert report.newly_cloud == []  # the same policy moves nothing to the cloud
