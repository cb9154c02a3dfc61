"""Policy test cases: requests written in YAML, with what their decision must be.

A cases file lists requests as a client would send them and the decision each must
get (`expect:` zone, route, decision, rule or sensitive). `load_cases` reads one with
the same file:line:key errors as a policy, `facts_from_case` turns a case's request
into the `RequestFacts` the router would collect for it (the same text sources), and
`check_expectations` compares the decision with the expectation.

The tests use these now, and the `hybridroute policy test/explain/diff` commands will;
none of it is on the request path, so it lives apart from `engine`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Literal

from pydantic import field_validator, model_validator
from pydantic_core import PydanticCustomError

from hybridroute.config import Strict, load_model
from hybridroute.protos import inference_pb2 as pb
from hybridroute.protos.tensors import encode_bytes_elements
from hybridroute.router.facts import Caller, request_facts
from hybridroute.router.policy.engine import Decision, RequestFacts

__all__ = [
    "Case",
    "CaseExpect",
    "CaseFile",
    "CaseRequest",
    "check_expectations",
    "facts_from_case",
    "load_cases",
]


class CaseRequest(Strict):
    """A request as written in a test case or an explain file."""

    caller: str | None = None
    auth: Literal["cert", "token", "none"] | None = None  # default: cert if caller given
    model: str
    model_version: str = ""
    metadata: dict[str, str] = {}
    inputs: dict[str, list[str | bytes | None]] = {}  # None/non-UTF-8 bytes: unreadable
    parameters: dict[str, str | int | float | bool] = {}
    session: str | None = None  # default: metadata x-session-id
    problems: list[str] = []

    @field_validator("metadata")
    @classmethod
    def _lowercase_names(cls, value: dict[str, str]) -> dict[str, str]:
        """gRPC lowercases metadata names on the wire (and the router reads them so):
        a case with X-Data-Classification would test a request no client can send."""
        for name in value:
            if name != name.lower():
                raise PydanticCustomError(
                    "header_case",
                    "metadata name '{name}': gRPC metadata names are lowercase; write '{lower}'",
                    {"name": name, "lower": name.lower()},
                )
        return value


class CaseExpect(Strict):
    """What a case expects of the decision; only the given keys are checked."""

    zone: Literal["onprem", "cloud"] | None = None
    route: str | None = None
    decision: Literal["route", "deny"] | None = None
    rule: str | None = None
    sensitive: bool | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> CaseExpect:
        if not self.model_fields_set:
            raise PydanticCustomError(
                "expect", "expect at least one of zone, route, decision, rule, sensitive"
            )
        return self


class Case(Strict):
    name: str
    request: CaseRequest
    expect: CaseExpect


class CaseFile(Strict):
    cases: list[Case]


def load_cases(path: str | Path) -> CaseFile:
    """A cases file, validated; errors name file, line and key like the policy's."""
    return load_model(path, CaseFile)


_INT64_MAX = (1 << 63) - 1
_UNREADABLE = b"\xff\xfe"  # not UTF-8: the router reads such an element as unreadable


def facts_from_case(
    request: CaseRequest | Mapping[str, object], *, text_budget: int
) -> RequestFacts:
    """The facts the router collects for this request: the case is written out as the
    ModelInferRequest a client would send and read by the router's own
    `request_facts`, so a case sees every text source the router scans (parameters of
    every type, names, the model name) and nothing else.

    Takes a case's `request:` (validated, or as a plain mapping), as written in a
    cases file or a `policy explain --request` file. `text_budget` is the policy's
    `max_text_bytes`, as the router passes it: past it the request is too large (and
    sensitive) offline exactly as it is live.
    """
    if not isinstance(request, CaseRequest):
        request = CaseRequest.model_validate(request)
    wire = pb.ModelInferRequest(model_name=request.model, model_version=request.model_version)
    for name, items in request.inputs.items():
        wire.inputs.add(name=name, datatype="BYTES", shape=[len(items)])
        wire.raw_input_contents.append(
            encode_bytes_elements([_UNREADABLE if item is None else item for item in items])
        )
    for key, value in request.parameters.items():
        _set_parameter(wire.parameters[key], value)
    metadata = dict(request.metadata)
    if request.session is not None:
        metadata["x-session-id"] = request.session
    auth = request.auth or ("cert" if request.caller is not None else "none")
    facts = request_facts(wire, metadata, Caller(request.caller, auth), text_budget=text_budget)
    return replace(facts, problems=(*facts.problems, *request.problems))


def _set_parameter(param: pb.InferParameter, value: str | int | float | bool) -> None:
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        if value > _INT64_MAX:
            param.uint64_param = value
        else:
            param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    else:
        param.string_param = value


def check_expectations(decision: Decision, expect: CaseExpect) -> list[str]:
    """How `decision` differs from `expect`, one line per mismatch (empty: passed)."""
    actual = {
        "zone": decision.zone,
        "route": decision.route,
        "decision": decision.action,
        "rule": decision.rule_id,
        "sensitive": decision.sensitive,
    }
    return [
        f"expected {key} {getattr(expect, key)!r}, got {actual[key]!r}"
        for key in ("decision", "zone", "route", "rule", "sensitive")
        if key in expect.model_fields_set and getattr(expect, key) != actual[key]
    ]
