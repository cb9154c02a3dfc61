"""The node's own admin service (`protos/node_admin.proto`): node info and drift reports.

Only admin identities reach it (`node/access.py`). Drift reports are computed in a
worker thread: testing a few windows takes milliseconds, which the event loop, busy
answering requests, should not spend.
"""

from __future__ import annotations

import asyncio
import socket
from concurrent.futures import Executor
from typing import Any

import grpc

from hybridroute import __version__
from hybridroute.node.drift import DriftMonitor, ModelDriftReport
from hybridroute.node.lifecycle import ModelLifecycle
from hybridroute.node.repository import parse_version
from hybridroute.protos import node_admin_pb2 as pb
from hybridroute.protos import node_admin_pb2_grpc as pb_grpc
from hybridroute.protos.tensors import quoted

__all__ = ["NodeAdminServicer", "report_message"]


class NodeAdminServicer(pb_grpc.NodeAdminServicer):
    def __init__(
        self,
        lifecycle: ModelLifecycle,
        monitor: DriftMonitor | None,
        *,
        name: str,
        executor: Executor | None = None,
    ) -> None:
        self._lifecycle = lifecycle
        self._monitor = monitor
        self._name = name
        self._executor = executor

    async def Info(self, request: pb.InfoRequest, context: Any) -> Any:
        return pb.InfoResponse(
            name=self._name,
            version=__version__,
            repository=str(self._lifecycle.root.resolve()),
            hostname=socket.gethostname(),
            version_policy=self._lifecycle.default_policy.describe(),
        )

    async def DriftReport(self, request: pb.DriftRequest, context: Any) -> Any:
        if self._monitor is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "drift monitoring is off on this node (node serve --drift-window 0)",
            )
        version = request.version.strip()
        number = parse_version(version) if version else None
        if version and number is None:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "version must be a positive 64-bit integer"
            )
        if request.model and not self._lifecycle.repository.knows(request.model):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {quoted(request.model)}")
        assert self._monitor is not None
        loop = asyncio.get_running_loop()
        reports = await loop.run_in_executor(
            self._executor, self._monitor.report, request.model, number
        )
        if number is not None and not reports:  # not an empty "everything is fine" answer
            which = f"model {request.model!r}" if request.model else "any model"
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"no loaded version {number} of {which} on this node"
            )
        return pb.DriftResponse(models=[report_message(r) for r in reports])


def report_message(report: ModelDriftReport) -> pb.ModelDrift:
    """A drift report as its protobuf message."""
    message = pb.ModelDrift(
        model=report.model,
        version=str(report.version),
        status=report.status,
        drift=report.drift,
        window=report.window,
        window_size=report.window_size,
        min_window=report.min_window,
        reference_rows=report.reference_rows,
        baseline_kind=report.baseline_kind,
        evaluated_at=report.evaluated_at,
        dropped=report.dropped,
    )
    for f in report.features:
        message.features.add(
            feature=f.feature,
            test=f.test,
            score_kind=f.score_kind,
            statistic=f.statistic,
            threshold=f.threshold,
            drift=f.drift,
            bin_edges=f.bin_edges,
            reference_shares=f.reference_shares,
            current_shares=f.current_shares,
            categorical=f.categorical,
        )
    return message
