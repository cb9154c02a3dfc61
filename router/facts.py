"""What the policy needs to know about a request, read from the wire.

Only what the policy needs is parsed: model, parameters, metadata and the text of BYTES
tensors. The request itself is forwarded as the bytes that arrived. Anything that
cannot be read becomes a *problem*, and a problem makes the request sensitive
(invariant 2: doubt is sensitive), so a payload crafted to confuse the parser can only
keep itself on-prem.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from hybridroute.protos import inference_pb2 as pb
from hybridroute.protos.tensors import TensorError, iter_bytes_elements
from hybridroute.router.policy.engine import RequestFacts, TextField, metadata_text_fields

__all__ = ["CLASSIFICATION_HEADER", "MAX_TEXT_FIELDS", "SESSION_HEADER", "Caller", "request_facts"]

# Headers grpc and HTTP/2 set, not the caller's content (their names are not scanned).
_TRANSPORT_METADATA = frozenset({"user-agent", "te", "content-type", "grpc-accept-encoding"})

CLASSIFICATION_HEADER = "x-data-classification"
SESSION_HEADER = "x-session-id"


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller: identity and how it was established."""

    identity: str | None
    auth: str  # "cert" | "token" | "none"


# Texts per request past which nothing is scanned (with the policy's max_text_bytes):
# a request of millions of tiny elements must cost the router no more than a big one.
MAX_TEXT_FIELDS = 100_000


class _Texts:
    """A request's texts, collected up to the scan budget. Past the budget the request
    is `over`: it will not be scanned (doubt "text-too-large"), so nothing more of it
    is read or decoded."""

    __slots__ = ("fields", "left", "over")

    def __init__(self, fields: list[TextField], budget: int) -> None:
        self.fields = fields
        self.left = budget - sum(len(t.text or "") for t in fields)
        self.over = self.left < 0

    def add(self, source: str, text: str | None) -> None:
        if self.over:
            return
        self.left -= 0 if text is None else len(text)
        if self.left < 0 or len(self.fields) >= MAX_TEXT_FIELDS:
            self.over = True
            return
        self.fields.append(TextField(source, text))

    def add_bytes(self, source: str, element: bytes) -> None:
        if len(element) > self.left:  # before decoding it
            self.over = True
            return
        try:
            self.add(source, element.decode("utf-8"))
        except UnicodeDecodeError:
            self.add(source, None)


def _parameter_value(param: pb.InferParameter) -> object:
    choice = param.WhichOneof("parameter_choice")
    return None if choice is None else getattr(param, choice)


# Numeric parameters the protocol itself defines (Triton's sequence batcher, priority,
# timeout, binary output sizes, classification): their numbers are not content.
# tritonclient draws random 63-bit sequence ids, and one in ten passes the card check.
_PROTOCOL_NUMBERS = frozenset(
    {"sequence_id", "priority", "timeout", "binary_data_size", "classification"}
)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _parameters(
    params: Mapping[str, pb.InferParameter], prefix: str, texts: _Texts, names: list[str]
) -> dict[str, object]:
    """The parameters' values; the text of each (numbers too: a card number fits in an
    int64, except the protocol's own numbers) goes to the scan, every key to the names."""
    values: dict[str, object] = {}
    for key, param in params.items():
        value = _parameter_value(param)
        values[key] = value
        names.append(key)
        if isinstance(value, str):
            texts.add(f"parameter:{prefix}{key}", value)
        elif _is_number(value) and key not in _PROTOCOL_NUMBERS:
            texts.add(f"parameter:{prefix}{key}", str(value))
    return values


def _input_texts(
    request: pb.ModelInferRequest, texts: _Texts, names: list[str], problems: list[str]
) -> None:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        problems.append("raw_input_contents does not pair with inputs")
    for index, tensor in enumerate(request.inputs):
        names.append(tensor.name)
        _parameters(tensor.parameters, f"{tensor.name}.", texts, names)
        typed = tensor.contents.ListFields()
        has_raw = bool(raw) and index < len(raw)
        if has_raw and typed:
            problems.append(f"input '{tensor.name}': both raw and typed contents")
        if tensor.datatype != "BYTES":
            if tensor.contents.bytes_contents:  # text where the datatype says numbers
                problems.append(
                    f"input '{tensor.name}': bytes_contents in a {tensor.datatype} tensor"
                )
            continue
        if has_raw:
            try:
                for i, element in enumerate(iter_bytes_elements(tensor.name, raw[index])):
                    texts.add_bytes(f"input:{tensor.name}[{i}]", element)
                    if texts.over:
                        break
            except TensorError:
                problems.append(f"input '{tensor.name}': malformed BYTES data")
        else:
            for i, element in enumerate(tensor.contents.bytes_contents):
                texts.add_bytes(f"input:{tensor.name}[{i}]", element)
                if texts.over:
                    break


def _output_texts(request: pb.ModelInferRequest, texts: _Texts, names: list[str]) -> None:
    for output in request.outputs:
        names.append(output.name)
        _parameters(output.parameters, f"output.{output.name}.", texts, names)


def request_facts(
    request: pb.ModelInferRequest | None,
    metadata: Mapping[str, str],
    caller: Caller,
    *,
    model: str = "",
    model_version: str = "",
    wire_problem: str | None = None,
    repeated_metadata: bool = False,
    text_budget: int = 1 << 20,
) -> RequestFacts:
    """Facts for one request. `request` is None for calls without a payload (metadata).

    Everything the caller wrote that is forwarded gets scanned or counts as a problem:
    the texts of BYTES tensors, every parameter value (requests', inputs' and outputs'),
    the request id, and the names (of the model and its version, metadata, parameters,
    inputs and outputs, scanned as one text). `wire_problem` is what the wire format
    held that parsing dropped (see `router.wire`): a problem too, as is
    `repeated_metadata`, a metadata key the caller sent with different values (of
    which `metadata` holds only one).
    `text_budget` is the policy's max_text_bytes: past it nothing more is collected.
    """
    fields = metadata_text_fields(metadata)
    texts = _Texts(fields, text_budget)
    names = [name for name in metadata if name not in _TRANSPORT_METADATA]
    problems: list[str] = []
    parameters: dict[str, object] = {}
    if wire_problem is not None:
        problems.append(wire_problem)
    if repeated_metadata:
        problems.append("a metadata key was sent more than once with different values")
    if request is not None:
        model, model_version = request.model_name, request.model_version
        if request.id:
            texts.add("id", request.id)
        parameters = _parameters(request.parameters, "", texts, names)
        _input_texts(request, texts, names, problems)
        _output_texts(request, texts, names)
    names += (model, model_version)  # forwarded too: a model name is caller's text
    texts.add("names", "\n".join(names))
    return RequestFacts(
        caller=caller.identity,
        auth=caller.auth,
        model=model,
        model_version=model_version,
        label=metadata.get(CLASSIFICATION_HEADER),
        session_id=metadata.get(SESSION_HEADER) or None,
        metadata=metadata,
        parameters=parameters,
        texts=texts.fields,
        problems=problems,
        too_large=texts.over,
    )
