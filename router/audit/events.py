"""What the router tells the audit trail about each decision, and the sink contract.

Every decision (routed, denied, rejected before a decision could be made) produces one
`AuditEvent`, handed to the sink *before* the reply is released (invariant 5). An
event holds facts about the request, never its content: detector names and counts,
positions rather than matches; the caller's request id and session id are never
stored in the clear (the durable store keys them with HMAC).

Router lifecycle facts (start, stop, policy loads and refusals, certificate changes)
are `AuditNote`s and go through the same sink, so they take their place in the same
hash chain as the requests they explain.

The sink is `hybridroute.router.audit.store.AuditStore`; `hybridroute audit export`
gives a SIEM the records as JSON lines.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from hybridroute.router.policy.engine import DetectorHit, RuleTrace

__all__ = [
    "AUDIT_REFUSAL",
    "AuditEvent",
    "AuditNote",
    "AuditSink",
    "AuditUnavailable",
    "Detail",
    "wants_full_detail",
]

Outcome = Literal["routed", "denied", "rejected"]
Detail = Literal["decisions", "full"]

# The message of a request refused because the trail cannot be written: the store
# recognises these records (they already say UNAVAILABLE) when it keeps them for later.
AUDIT_REFUSAL = "the audit trail cannot be written; request refused"


class AuditUnavailable(Exception):
    """The sink cannot record right now; the router must refuse the request."""


@dataclass
class AuditEvent:
    """One decision. The sink owns it from `record()` until `record()` returns: the
    front door does not touch it meanwhile, so the writer thread can read it unlocked."""

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
    route: str = ""  # the route that served (a fallback's, if one did)
    zone: str = ""  # the zone of the last endpoint the request reached
    pool: str = ""
    endpoint: str = ""
    # What the policy decided, when it differs from what served (a fallback route, an
    # endpoint of another zone): `policy replay` compares decisions with decisions.
    decided_route: str = ""
    decided_zone: str = ""
    attempts: int = 0
    # Attempts before the last, as (zone, pool, endpoint): a retry's first endpoint got
    # the request's data too, and the trail says so.
    earlier: tuple[tuple[str, str, str], ...] = ()
    code: str = "OK"
    error: str = ""  # the router's own message for a non-OK answer (never upstream text)
    latency_ms: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    served_version: str = ""  # the model version the node says answered
    # The decision to mirror this request to a rollout's candidate version (shadow): the
    # pool, its zone and the candidate version. Empty: no copy was sent. When set, the
    # copy is sent only after this record is committed (a record kept as `withheld`:
    # it was not sent), to an endpoint of exactly this pool, and only while the pool is
    # still in this zone. The endpoint is picked then, after the record, so it is not
    # here; the copy may still be refused or fail there (see the shadow metrics), but
    # it never goes anywhere else.
    shadow_pool: str = ""
    shadow_zone: str = ""
    shadow_version: str = ""
    time: float = field(default_factory=time.time)
    # How much the policy wants recorded for the chosen route (routes.<name>.audit), and
    # the detail that level adds: the rules' trace and where the detectors fired.
    route_detail: Detail = "full"
    route_sample: float = 1.0
    trace: tuple[RuleTrace, ...] = ()
    hits: tuple[DetectorHit, ...] = ()
    # Set by the store when it could not commit the record in time: the code the reply
    # would have had (the caller got UNAVAILABLE instead).
    withheld: str = ""
    # Values that may themselves be sensitive; stored only as keyed hashes.
    session_id: str | None = field(default=None, repr=False)
    client_request_id: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class AuditNote:
    """A router lifecycle fact: `kind` is e.g. `router.start`, `policy.reload`,
    `cert.change`; `fields` are JSON values (no floats: the trail's encoding is exact)."""

    kind: str
    fields: Mapping[str, object]
    time: float = field(default_factory=time.time)


def wants_full_detail(event: AuditEvent, draw: float) -> bool:
    """Whether this event's record carries the full detail (trace, detector positions).

    Sensitive, undecided, denied, rejected and failed requests always do: those are the
    ones an auditor reconstructs. Clean successful ones follow the route's policy level;
    `draw` (uniform in [0, 1)) samples the `full` level. Every event gets a record
    either way; only its detail varies.
    """
    if event.sensitive is not False or event.outcome != "routed" or event.code != "OK":
        return True
    if event.route_detail != "full":
        return False
    return draw < event.route_sample


class AuditSink(Protocol):
    async def start(self) -> None:
        """Get ready to record (open files, check keys); raise if that is impossible."""

    async def record(self, event: AuditEvent) -> None:
        """Return only when the event is durable; raise AuditUnavailable otherwise."""

    def note(self, note: AuditNote) -> Awaitable[None]:
        """Like `record`, for a lifecycle fact; but the note takes its place in the trail
        when `note` is *called* (await the result for durability), so a hook that
        cannot await (a policy swap) still records before anything that follows it."""

    @property
    def failure(self) -> str | None:
        """Why the sink cannot record now, or None when it can."""

    async def close(self) -> None: ...
