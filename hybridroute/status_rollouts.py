"""The rollouts section of `hybridroute status`: canary splits and shadow copies.

Kept apart from `status` (which documents the `--json` keys, `rollouts` included)
because it is the one section whose numbers need explaining: a split shows each
version's share of the weights and the requests it got; a shadow shows the share of
compared copies that agreed with the serving reply, the candidate's mean latency
minus the serving one's, and the copies that were never compared (failed, dropped,
refused by the zone guard, no endpoint).
"""

from __future__ import annotations

from typing import Any

from hybridroute.protos import admin_pb2

__all__ = ["HEADERS", "rollout_dict", "rollout_rows"]


def _shadow_dict(shadow: admin_pb2.ShadowStatus) -> dict[str, Any]:
    compared = shadow.agreed + shadow.disagreed
    return {
        "version": shadow.version,
        "percent": shadow.percent,
        "pool": shadow.pool,
        "agreed": shadow.agreed,
        "disagreed": shadow.disagreed,
        "failed": shadow.failed,
        "dropped": shadow.dropped,
        "refused": shadow.refused,
        "no_endpoint": shadow.no_endpoint,
        "agreement_rate": shadow.agreement_rate if shadow.agreement_rate >= 0 else None,
        "latency_difference_ms": shadow.latency_difference_ms if compared else None,
    }


def rollout_dict(rollout: admin_pb2.RolloutStatus) -> dict[str, Any]:
    """One entry of `--json`'s `rollouts` (keys documented in `status`)."""
    return {
        "route": rollout.route,
        "model": rollout.model,
        "split": [
            {"version": v.version, "weight": v.weight, "requests": v.requests}
            for v in rollout.split
        ],
        "shadow": _shadow_dict(rollout.shadow) if rollout.HasField("shadow") else None,
    }


def _split_text(split: list[dict[str, Any]]) -> str:
    """`1: 80% (161)  2: 20% (39)`: each version's share of the weights, and requests."""
    total = sum(v["weight"] for v in split) or 1
    return "  ".join(
        f"{v['version']}: {100 * v['weight'] / total:.0f}% ({v['requests']})" for v in split
    )


def _shadow_texts(shadow: dict[str, Any] | None) -> list[str]:
    """SHADOW, AGREEMENT, LATENCY and NOT COMPARED cells of a rollout row."""
    if shadow is None:
        return ["-", "-", "-", "-"]
    compared = shadow["agreed"] + shadow["disagreed"]
    rate = shadow["agreement_rate"]
    delta = shadow["latency_difference_ms"]
    skipped = [k for k in ("failed", "dropped", "refused", "no_endpoint") if shadow[k]]
    return [
        f"v{shadow['version']} {shadow['percent']:g}% -> {shadow['pool']}",
        "-" if rate is None else f"{100 * rate:.1f}% ({shadow['agreed']}/{compared})",
        "-" if delta is None else f"{delta:+.2f} ms",
        ", ".join(f"{k.replace('_', ' ')} {shadow[k]}" for k in skipped) or "0",
    ]


HEADERS = [
    *("ROUTE", "MODEL", "SPLIT (REQUESTS)"),
    *("SHADOW", "AGREEMENT", "LATENCY +/-", "NOT COMPARED"),
]


def rollout_rows(rollouts: list[dict[str, Any]]) -> list[list[str]]:
    """One table row (cells under HEADERS) per rollout of `status`'s JSON document."""
    return [
        [r["route"], r["model"], _split_text(r["split"]) or "-", *_shadow_texts(r["shadow"])]
        for r in rollouts
    ]
