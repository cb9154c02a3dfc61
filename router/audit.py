"""What the router tells the audit trail about each decision, and the sink contract.

Every decision (routed, denied, rejected before a decision could be made) produces one
`AuditEvent`, handed to the sink *before* the reply is released (invariant 5). An
event holds facts about the request, never its content: detector names and counts,
not matches; the caller's request id and session id are never stored in the clear
(the durable store of the audit issue keys them with HMAC; `LogAuditSink` drops them).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol

__all__ = ["AuditEvent", "AuditSink", "AuditUnavailable", "LogAuditSink"]

Outcome = Literal["routed", "denied", "rejected"]


class AuditUnavailable(Exception):
    """The sink cannot record right now; the router must refuse the request."""


@dataclass
class AuditEvent:
    request_id: str
    outcome: Outcome  # routed: a policy route was chosen; denied: a rule said no;
    # rejected: refused before or after deciding (unauthenticated, malformed, no endpoint)
    caller: str | None
    auth: str
    method: str
    model: str = ""
    model_version: str = ""
    label: str = ""  # normalised x-data-classification: public..restricted, none, invalid
    policy_hash: str = ""
    rule_id: str = ""
    sensitive: bool | None = None
    reasons: tuple[str, ...] = ()
    findings: Mapping[str, int] = field(default_factory=dict)
    route: str = ""
    zone: str = ""
    pool: str = ""
    endpoint: str = ""
    attempts: int = 0
    code: str = "OK"
    latency_ms: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    served_version: str = ""
    time: float = field(default_factory=time.time)
    # Values that may themselves be sensitive; stored only as keyed hashes.
    session_id: str | None = field(default=None, repr=False)
    client_request_id: str | None = field(default=None, repr=False)

    def public_dict(self) -> dict[str, object]:
        """Every field except the ones that may be sensitive."""
        data = asdict(self)
        data.pop("session_id")
        data.pop("client_request_id")
        data["findings"] = dict(self.findings)
        data["reasons"] = list(self.reasons)
        return data


class AuditSink(Protocol):
    async def record(self, event: AuditEvent) -> None:
        """Return only when the event is durable; raise AuditUnavailable otherwise."""

    @property
    def failure(self) -> str | None:
        """Why the sink cannot record now, or None when it can."""

    async def close(self) -> None: ...


class LogAuditSink:
    """A structured log line per decision (logger `hybridroute.audit`): the minimum
    until the durable store exists, and useful beside it for log shipping."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger or logging.getLogger("hybridroute.audit")

    async def record(self, event: AuditEvent) -> None:
        self._log.info("%s", json.dumps(event.public_dict(), separators=(",", ":")))

    @property
    def failure(self) -> str | None:
        return None

    async def close(self) -> None:
        return None
