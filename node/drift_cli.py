"""`hybridroute drift report`: each node's live inputs and predictions against its
training baselines.

Output forms:

* a table, one line per node, model version and feature;
* `--json`: one object per line with the keys `node`, `model`, `version`, `feature`
  (the name from model.yaml, a text statistic, or `<prediction: OUTPUT>` for the
  predictions of the default output, see node/drift.py), `test`, `statistic`,
  `threshold`, `window`, `drift` (a boolean), plus `address`, `status` ("ok",
  "drift", "not enough data"), `score_kind`, `min_window` and `model_drift` (the
  version's flag: any feature, prediction included, drifted). Below the minimum
  window `status` is "not enough data", `statistic` is null and `drift` false: no
  verdict was made; so is a feature with no verdict of its own (e.g. a prediction
  row while fewer than `min_window` answered requests carried the default output).
  A version without a baseline gives one line with `feature` null and status "no
  baseline";
* `--html FILE`: a self-contained page with one chart per feature (`drift_html.py`).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hybridroute.cli import UsageError
from hybridroute.node.admin_client import (
    Credentials,
    NodeTarget,
    add_target_arguments,
    call,
    node_channel,
    print_table,
    resolve_targets,
)

__all__ = ["NodeDrift", "fetch_drift", "json_lines", "register_drift"]


@dataclass(frozen=True)
class NodeDrift:
    """One node's answer: its reports, or the error that prevented them."""

    target: NodeTarget
    models: tuple[Any, ...]  # node_admin_pb2.ModelDrift
    code: str = "OK"
    message: str = ""


def register_drift(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `hybridroute drift report`."""
    drift = sub.add_parser("drift", help="data drift of live inputs on nodes")
    drift_sub = drift.add_subparsers(dest="drift_command", metavar="SUBCOMMAND")
    drift_sub.required = True
    p = drift_sub.add_parser(
        "report",
        help="compare live inputs and predictions with each version's training baseline",
        description="Ask each node for a drift report now: per model version and feature "
        "(the default output's predictions included, as '<prediction: OUTPUT>'), the test "
        "(Evidently's defaults), its statistic and threshold (Bonferroni-corrected for "
        "p-values) and the verdict.",
    )
    p.add_argument("--model", default="", metavar="NAME", help="only this model")
    p.add_argument("--version", type=int, metavar="N", help="only this version")
    p.add_argument("--html", type=Path, metavar="FILE", help="also write a page with charts")
    add_target_arguments(p)
    p.set_defaults(handler=_drift_report)


def fetch_drift(
    target: NodeTarget, creds: Credentials, model: str, version: int | None, timeout: float
) -> NodeDrift:
    """DriftReport of one node; RPC errors become a NodeDrift with the code."""
    from hybridroute.protos import node_admin_pb2 as pb
    from hybridroute.protos import node_admin_pb2_grpc as pb_grpc

    request = pb.DriftRequest(model=model, version="" if version is None else str(version))

    def ask() -> Any:
        with node_channel(target, creds) as channel:
            return pb_grpc.NodeAdminStub(channel).DriftReport(request, timeout=timeout)

    reply, code, message = call(ask)
    return NodeDrift(target, tuple(reply.models) if reply is not None else (), code, message)


def _number(value: float) -> float | None:
    return None if math.isnan(value) else value


def json_lines(answers: list[NodeDrift]) -> list[dict[str, Any]]:
    """The `--json` records (see the module docstring)."""
    records = []
    for answer in answers:
        node: dict[str, Any] = {"node": answer.target.name, "address": answer.target.address}
        if answer.code != "OK":
            records.append({**node, "error": answer.code, "message": answer.message})
            continue
        for m in answer.models:
            base: dict[str, Any] = {**node, "model": m.model, "version": m.version}
            common: dict[str, Any] = {
                "window": m.window,
                "min_window": m.min_window,
                "model_drift": bool(m.drift),
            }
            if not m.features:
                records.append(
                    {
                        **base,
                        "feature": None,
                        "test": None,
                        "statistic": None,
                        "threshold": None,
                        **common,
                        "status": m.status,
                        "drift": False,
                    }
                )
            for f in m.features:
                records.append(
                    {
                        **base,
                        "feature": f.feature,
                        "test": f.test,
                        "score_kind": f.score_kind,
                        "statistic": _number(f.statistic),
                        "threshold": f.threshold,
                        **common,
                        "status": _feature_status(m, f),
                        "drift": bool(f.drift),
                    }
                )
    return records


def _feature_status(model: Any, feature: Any) -> str:
    if model.status == "not enough data" or _no_verdict(feature):
        return "not enough data"
    return "drift" if feature.drift else "ok"


def _no_verdict(feature: Any) -> bool:
    return math.isnan(feature.statistic) and not feature.drift


def _verdict(model: Any, feature: Any) -> str:
    if model.status == "not enough data":
        return f"n/a ({model.window}/{model.min_window} rows)"
    if _no_verdict(feature):
        return "n/a"
    return "DRIFT" if feature.drift else "no"


def _print_table(answers: list[NodeDrift]) -> None:
    rows: list[tuple[object, ...]] = []
    for answer in answers:
        if answer.code != "OK":
            error = f"{answer.code}: {answer.message}" if answer.message else answer.code
            rows.append((answer.target.name, "-", "-", "-", "-", "-", "-", "-", error))
            continue
        for m in answer.models:
            if not m.features:
                rows.append(
                    (answer.target.name, m.model, m.version, "-", "-", "-", "-", m.window, m.status)
                )
            for f in m.features:
                stat = "-" if math.isnan(f.statistic) else f"{f.statistic:.4g}"
                rows.append(
                    (
                        answer.target.name,
                        m.model,
                        m.version,
                        f.feature,
                        f.test,
                        stat,
                        f"{f.threshold:.4g}",
                        m.window,
                        _verdict(m, f),
                    )
                )
    headers = (
        "NODE",
        "MODEL",
        "VERSION",
        "FEATURE",
        "TEST",
        "STATISTIC",
        "THRESHOLD",
        "WINDOW",
        "DRIFT",
    )
    print_table(headers, rows)
    for answer in answers:
        for m in answer.models:
            if m.status == "not enough data":
                print(
                    f"{answer.target.name} {m.model}/{m.version}: window too small "
                    f"({m.window} of at least {m.min_window} live rows): no verdict, "
                    "and no live histograms (they would reveal single requests)"
                )
            if m.status in {"ok", "drift"}:
                shifted = [f.feature for f in m.features if f.drift]
                verdict = "drift in " + ", ".join(shifted) if shifted else "no drift"
                print(
                    f"{answer.target.name} {m.model}/{m.version}: {verdict} "
                    f"({m.window} live rows vs {m.reference_rows} reference rows)"
                )


def _drift_report(args: argparse.Namespace) -> int:
    targets, creds = resolve_targets(args)
    answers = [fetch_drift(t, creds, args.model, args.version, args.timeout) for t in targets]
    if args.json:
        for record in json_lines(answers):
            print(json.dumps(record))
    else:
        _print_table(answers)
    if args.html is not None:
        from hybridroute.node.drift_html import render_page

        try:
            args.html.write_text(render_page(answers), encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"--html {args.html}: {exc}") from None
        if not args.json:
            print(f"wrote {args.html}")
    return 0 if all(a.code == "OK" for a in answers) else 1
