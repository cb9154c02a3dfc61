"""`hybridroute demo`: a realistic mix of traffic through a running stack, and where it went.

The point is to *show* the routing invariant on a live system rather than assert it in
prose: several callers (demo-app, analytics, batch-jobs, and the stack's `admin`
identity, which the default policy does not list as a caller) send support tickets with
and without personal data, iris rows and a request for an HR model, under every label.
Each reply's `x-hybridroute-route`/`-zone` trailers (present on errors too) say where
the router sent it; the demo compares that with what the policy should have done.

Each kind declares whether the demo *knows* it to be sensitive. If any such request
comes back with zone `cloud`, the table flags it and the command exits 1; that is the
one outcome the system must never produce. Other surprises (say, a public request
served on-prem because the cloud pool is down and its route falls back) are marked in
the table but are not failures. Exit 2: the stack file is unusable or the router
cannot be reached.
"""

from __future__ import annotations

import argparse
import struct
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from hybridroute.cli import UsageError
from hybridroute.protos import inference_pb2 as pb
from hybridroute.protos import inference_pb2_grpc as pb_grpc
from hybridroute.protos.tensors import encode_bytes_elements
from hybridroute.status import DEFAULT_STACK, format_table, load_stack

__all__ = [
    "DENIED",
    "KINDS",
    "DemoKind",
    "Outcome",
    "build_request",
    "new_session",
    "node_request_counts",
    "render_table",
    "run_demo",
    "send_all",
    "summary",
    "witness",
]

DENIED = "denied"  # expected "zone" of a request the policy refuses outright
ROUNDS_BY_DEFAULT = 3
_IRIS_ROWS = ((5.1, 3.5, 1.4, 0.2), (6.7, 3.0, 5.2, 2.3))


@dataclass(frozen=True)
class DemoKind:
    """One kind of request: who sends what under which label, and what should happen."""

    name: str
    caller: str  # an app of stack.json; `admin` stands for a caller the policy doesn't know
    label: str | None  # x-data-classification, None: not sent
    model: str
    text: str | None  # a support ticket for ticket-triage; None: iris rows
    expected: str  # onprem | cloud | denied
    sensitive: bool  # the demo knows it must never reach the cloud
    expected_status: str = "OK"
    session: bool = False  # send the run's session id (x-session-id)


_TRIAGE, _CRASH = "ticket-triage", "The app crashes every time I open the reports page"

# A table: one kind per entry, kept aligned by hand.
# fmt: off
KINDS: tuple[DemoKind, ...] = (
    DemoKind("public ticket, no personal data", "demo-app", "public", _TRIAGE, _CRASH,
             "cloud", sensitive=False),
    DemoKind("public iris rows", "analytics", "public", "iris", None, "cloud", sensitive=False),
    DemoKind("public ticket with an email", "demo-app", "public", _TRIAGE,
             "Please send the invoice copy to jane.doe@example.com", "onprem", True,
             session=True),
    DemoKind("public ticket with an SSN", "analytics", "public", _TRIAGE,
             "Customer asked to update the SSN on file to 536-22-8714", "onprem", True),
    DemoKind("public ticket with a card number", "demo-app", "public", _TRIAGE,
             "My card 4111 1111 1111 1111 was charged twice for the Pro plan", "onprem", True),
    # Clean and public, but its session carried an email just before: pinned on-prem.
    DemoKind("public ticket, session that carried PII", "demo-app", "public", _TRIAGE,
             "Thanks, and can you also check my shipping status", "onprem", True,
             session=True),
    DemoKind("internal ticket", "analytics", "internal", _TRIAGE,
             "Weekly summary: 40 billing tickets, 12 shipping delays", "onprem", True),
    DemoKind("confidential iris rows", "analytics", "confidential", "iris", None, "onprem", True),
    DemoKind("restricted ticket with an employee id", "demo-app", "restricted", _TRIAGE,
             "Escalation from EMP-204518 about the payroll export", "onprem", True),
    DemoKind("unlabelled ticket", "demo-app", None, _TRIAGE,
             "The export to CSV produces an empty file", "onprem", True),
    DemoKind("batch job, public label", "batch-jobs", "public", _TRIAGE,
             "Nightly re-triage of ticket 88213: login works but dashboard errors", "onprem",
             True),
    # Not deployed on the nodes: the router still decides (rule restricted-models,
    # on-prem) and the node answers NOT_FOUND.
    DemoKind("HR model (not deployed on nodes)", "demo-app", "public", "hr-attrition",
             "Attrition risk for team reporting", "onprem", True, "NOT_FOUND"),
    DemoKind("unknown caller (admin cert)", "admin", "public", _TRIAGE, _CRASH, DENIED, True,
             "PERMISSION_DENIED"),
)
# fmt: on


@dataclass(frozen=True)
class Outcome:
    """What the router said about one request (from its reply trailers)."""

    kind: DemoKind
    route: str
    zone: str
    status: str

    @property
    def leaked(self) -> bool:
        return self.kind.sensitive and self.zone == "cloud"

    @property
    def as_expected(self) -> bool:
        zone_ok = self.zone == self.kind.expected or (
            self.kind.expected == DENIED and self.status == "PERMISSION_DENIED"
        )
        return zone_ok and self.status == self.kind.expected_status


def build_request(kind: DemoKind) -> pb.ModelInferRequest:
    """A raw-tensor OIP request, as tritonclient would send it."""
    request = pb.ModelInferRequest(model_name=kind.model)
    if kind.text is None:
        flat = [v for row in _IRIS_ROWS for v in row]
        request.inputs.add(name="input", datatype="FP64", shape=[len(_IRIS_ROWS), 4])
        request.raw_input_contents.append(struct.pack(f"<{len(flat)}d", *flat))
    else:
        request.inputs.add(name="text", datatype="BYTES", shape=[1])
        request.raw_input_contents.append(encode_bytes_elements([kind.text]))
    return request


def _metadata(kind: DemoKind, session: str) -> list[tuple[str, str]]:
    md = [] if kind.label is None else [("x-data-classification", kind.label)]
    if kind.session:
        md.append(("x-session-id", session))
    return md


def _trailers(call: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in (call.trailing_metadata() or ())}


def _send(stub: pb_grpc.GRPCInferenceServiceStub, kind: DemoKind, session: str) -> Outcome:
    try:
        _, call = stub.ModelInfer.with_call(
            build_request(kind), metadata=_metadata(kind, session), timeout=10
        )
        status = "OK"
    except grpc.RpcError as exc:
        call, status = exc, exc.code().name
    meta = _trailers(call)
    zone = meta.get("x-hybridroute-zone", "") or (DENIED if status == "PERMISSION_DENIED" else "-")
    return Outcome(kind, meta.get("x-hybridroute-route", "") or "-", zone, status)


class _Progress:
    """A live counter on stderr for long runs; silent for short ones."""

    def __init__(self, total: int, threshold: int = 40) -> None:
        self.total, self.enabled = total, total >= threshold
        self.tty = sys.stderr.isatty()
        self.step = max(1, total // 10)

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        if self.tty:
            print(f"\r  sent {done}/{self.total}", end="", file=sys.stderr, flush=True)
        elif done % self.step == 0 or done == self.total:
            print(f"  sent {done}/{self.total}", file=sys.stderr, flush=True)

    def finish(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr)


def _channel(stack: dict[str, Any], app: str) -> grpc.Channel:
    from hybridroute.certs.credentials import CredentialsError, channel_credentials

    try:
        files = stack["apps"][app]
        creds = channel_credentials(
            Path(stack["router"]["ca"]), Path(files["cert"]), Path(files["key"])
        )
    except (KeyError, TypeError) as exc:
        raise UsageError(f"stack.json has no credentials for app {exc}") from None
    except (CredentialsError, OSError) as exc:
        raise UsageError(f"cannot load credentials of app {app!r}: {exc}") from None
    return grpc.secure_channel(str(stack["router"]["address"]), creds)


def send_all(
    stack: dict[str, Any],
    kinds: tuple[DemoKind, ...],
    count: int,
    progress: Callable[[int], None] = lambda _: None,
    session: str | None = None,
) -> list[Outcome]:
    """Send `count` requests cycling through `kinds` in order (so a session's PII request
    precedes its pinned follow-up), one channel per caller, sequentially. The kinds that
    send a session id send `session` (default: a new one)."""
    session = session or new_session()
    with ExitStack() as stack_:
        stubs = {
            app: pb_grpc.GRPCInferenceServiceStub(stack_.enter_context(_channel(stack, app)))
            for app in sorted({k.caller for k in kinds})
        }
        outcomes = []
        for i in range(count):
            kind = kinds[i % len(kinds)]
            outcomes.append(_send(stubs[kind.caller], kind, session))
            progress(i + 1)
        return outcomes


def new_session() -> str:
    """A session id of its own for each run, so its audit records can be found."""
    return f"demo-{uuid.uuid4().hex[:12]}"


def _check_reachable(stack: dict[str, Any], timeout: float = 5.0) -> str | None:
    """None if the router answers ServerLive; else the gRPC error. Fails fast (no
    wait_for_ready), so a stale stack.json is reported at once, not after N timeouts."""
    with _channel(stack, "demo-app") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            stub.ServerLive(pb.ServerLiveRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
    return None


def _rows(outcomes: list[Outcome]) -> Iterator[list[str]]:
    groups: dict[DemoKind, Counter[tuple[str, str, str]]] = {}
    for o in outcomes:
        groups.setdefault(o.kind, Counter())[(o.route, o.zone, o.status)] += 1
    for kind, counts in groups.items():
        for (route, zone, status), n in counts.items():
            outcome = Outcome(kind, route, zone, status)
            verdict = "LEAK!" if outcome.leaked else ("ok" if outcome.as_expected else "differs")
            yield [
                kind.name,
                kind.caller,
                kind.label or "(none)",
                kind.expected,
                "yes" if kind.sensitive else "no",
                route,
                zone,
                status,
                str(n),
                verdict,
            ]


def render_table(outcomes: list[Outcome]) -> str:
    """One row per kind and outcome: identical outcomes of a kind collapse into a count."""
    headers = ["KIND", "CALLER", "LABEL", "EXPECTED", "SENSITIVE", "ROUTE", "ZONE", "STATUS"]
    return "\n".join(format_table([*headers, "N", "CHECK"], list(_rows(outcomes)), indent=""))


def summary(outcomes: list[Outcome], seconds: float) -> str:
    """The last line: counts per zone and the one number that must be 0 (leaks)."""
    zones = Counter(o.zone for o in outcomes)
    leaks = sum(o.leaked for o in outcomes)
    sensitive = sum(o.kind.sensitive for o in outcomes)
    per_zone = ", ".join(f"{n} {zone}" for zone, n in sorted(zones.items()))
    differs = sum(not o.as_expected for o in outcomes)
    line = (
        f"{len(outcomes)} requests in {seconds:.1f} s: {per_zone}. "
        f"{leaks} of {sensitive} sensitive requests reached the cloud."
    )
    if differs:
        line += f" {differs} differed from the expected route or status (see CHECK)."
    return line


def _scrape_requests(url: str) -> float | None:
    """Sum of a node's hybridroute_node_requests_total, or None if unreadable."""
    from prometheus_client.parser import text_string_to_metric_families

    if not url.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:  # noqa: S310 - scheme checked
            text = reply.read().decode()
        families = list(text_string_to_metric_families(text))
    except (OSError, ValueError):
        return None
    return sum(
        sample.value
        for family in families
        if family.name == "hybridroute_node_requests"
        for sample in family.samples
        if sample.name.endswith("_total")
    )


def node_request_counts(stack: dict[str, Any]) -> dict[str, float | None]:
    """Each node's own request counter: a witness independent of the router's trailers."""
    return {
        str(n.get("name")): _scrape_requests(str(n.get("metrics") or ""))
        for n in stack.get("nodes") or []
    }


def witness(
    stack: dict[str, Any],
    before: dict[str, float | None],
    after: dict[str, float | None],
    outcomes: list[Outcome],
) -> list[str]:
    """Lines comparing the nodes' own counters with what the router reported. More
    requests on a cloud node than the router sent there is worth a look, not proof of a
    leak: anyone else may be using the stack."""
    deltas: dict[str, float] = {}
    for name, start in before.items():
        end = after.get(name)
        if start is not None and end is not None:
            deltas[name] = end - start
    if not deltas:
        return ["node counters: unreadable (no node /metrics reachable)"]
    parts = ", ".join(f"{name} +{delta:.0f}" for name, delta in deltas.items())
    lines = [f"node counters (each node's own /metrics): {parts}"]
    cloud = [str(n.get("name")) for n in stack.get("nodes") or [] if n.get("zone") == "cloud"]
    seen = sum(deltas.get(name, 0.0) for name in cloud)
    routed = sum(o.zone == "cloud" for o in outcomes)
    if seen > routed:
        lines.append(
            f"warning: cloud nodes counted {seen:.0f} requests, the router reported {routed} "
            "sent to the cloud (other traffic on this stack? check the audit trail)"
        )
    return lines


def _count(args: argparse.Namespace) -> int:
    count = args.count if args.count is not None else ROUNDS_BY_DEFAULT * len(KINDS)
    if count < 1:
        raise UsageError("--count must be at least 1")
    return int(count)


def run_demo(args: argparse.Namespace) -> int:
    """Handler of `hybridroute demo`: 0 nothing sensitive reached the cloud, 1 something
    did, 2 the stack cannot be used."""
    path = args.stack or DEFAULT_STACK
    stack = load_stack(path, otherwise="--stack FILE")
    problem = _check_reachable(stack)
    if problem:
        print(
            f"hybridroute demo: cannot reach the router at {stack['router']['address']} "
            f"({problem}); is `hybridroute up` still running? "
            f"`hybridroute status --stack {path}` says more.",
            file=sys.stderr,
        )
        return 2
    count = _count(args)
    print(f"sending {count} requests through the router at {stack['router']['address']} ...")
    progress = _Progress(count)
    started, before = time.monotonic(), node_request_counts(stack)
    session = new_session()
    outcomes = send_all(stack, KINDS, count, progress.update, session=session)
    elapsed = time.monotonic() - started
    progress.finish()
    print(render_table(outcomes))
    print("\n".join(witness(stack, before, node_request_counts(stack), outcomes)))
    print(summary(outcomes, elapsed))
    if any(o.kind.session for o in outcomes):
        print(
            f"session id {session}: `hybridroute audit query --stack {path} --session "
            f"{session}` lists its requests"
        )
    leaks = [o for o in outcomes if o.leaked]
    if leaks:
        kinds = sorted({o.kind.name for o in leaks})
        print(f"FAIL: sensitive requests were served by the cloud: {'; '.join(kinds)}")
        return 1
    return 0
