"""deploy/: the Grafana dashboard and the Prometheus alert rules load, are well formed,
and use only metric names a real router and a real node export.

The names are checked against the registries of a running router (with a rollout, so
the canary and shadow metrics exist) and its nodes after some traffic: a metric
renamed in code without updating deploy/ fails here, not in production at 3 a.m.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from test_rollout import RolloutHarness, two_versions  # noqa: F401 - a fixture

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "hybridroute-dashboard.json"
RULES = DEPLOY / "prometheus" / "hybridroute-alerts.yaml"
METRIC = re.compile(r"\bhybridroute_[a-z0-9_]+\b")
# The suffixes a scrape shows for each metric type (prometheus_client's exposition).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
}


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", ())]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    return exprs


def _rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def _exported(registry: CollectorRegistry) -> set[str]:
    """Every series name `registry` can expose (labelled metrics with no child yet too)."""
    return {
        family.name + suffix
        for family in registry.collect()
        for suffix in SUFFIXES.get(family.type, ("",))
    }


@pytest.fixture(scope="module")
def exported(
    tmp_path_factory: pytest.TempPathFactory,
    pki: Path,
    two_versions: Path,  # noqa: F811 - the imported fixture
) -> Iterator[set[str]]:
    harness = RolloutHarness(tmp_path_factory.mktemp("deploy"), pki, two_versions)
    try:
        for row in range(10):
            harness.infer(row)
            harness.infer(row, label="public")
        harness.shadows_idle()
        names = _exported(harness.router.metrics.registry)
        for node in [*harness.nodes, harness.cloud]:
            names |= _exported(node.metrics.registry)
        yield names
    finally:
        harness.close()


def test_the_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            refs = [t["refId"] for t in panel["targets"]]
            assert len(refs) == len(set(refs)), panel["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    used = set(re.findall(r"\$(\w+)", " ".join(_dashboard_exprs())))
    assert used - {"__rate_interval", "__range"} <= variables


def test_the_alert_rules_are_well_formed() -> None:
    rules = _rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert rule["labels"]["severity"] in ("page", "ticket"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]
    exprs = " ".join(r["expr"] for r in rules)
    for required in (
        "hybridroute_router_endpoint_healthy",  # no healthy on-prem endpoint
        "hybridroute_audit_failing",  # audit failing
        "hybridroute_node_drift_model_detected",  # drift detected
        "hybridroute_router_requests_total",  # error rate
    ):
        assert required in exprs


def test_every_metric_deploy_uses_is_exported(exported: set[str]) -> None:
    used = {
        "dashboard": {m for e in _dashboard_exprs() for m in METRIC.findall(e)},
        "alert rules": {m for r in _rules() for m in METRIC.findall(r["expr"])},
    }
    for where, names in used.items():
        assert names, where
        missing = sorted(names - exported)
        assert not missing, f"{where} uses metrics no router or node exports: {missing}"
    # and what deploy/ is for is on the dashboard
    for family in ("router_requests", "router_shadow_requests", "audit_commit_seconds",
                   "node_requests", "node_drift_statistic"):  # fmt: skip
        assert any(family in m for m in used["dashboard"]), family
