"""What the policy needs to know about a request, read from the wire.

Only what the policy needs is parsed: model, parameters, metadata and the text of BYTES
tensors. The request itself is forwarded as the bytes that arrived. Anything that
cannot be read becomes a *problem*, and a problem makes the request sensitive
(invariant 2: doubt is sensitive), so a payload crafted to confuse the parser can only
keep itself on-prem.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from hybridroute.protos import inference_pb2 as pb
from hybridroute.protos.tensors import TensorError, decode_bytes_elements
from hybridroute.router.policy.engine import RequestFacts, TextField, metadata_text_fields

__all__ = ["CLASSIFICATION_HEADER", "SESSION_HEADER", "Caller", "request_facts"]

CLASSIFICATION_HEADER = "x-data-classification"
SESSION_HEADER = "x-session-id"


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller: identity and how it was established."""

    identity: str | None
    auth: str  # "cert" | "token" | "none"


def _parameter_value(param: pb.InferParameter) -> object:
    choice = param.WhichOneof("parameter_choice")
    return None if choice is None else getattr(param, choice)


def _parameters(
    params: Mapping[str, pb.InferParameter], prefix: str, texts: list[TextField]
) -> dict[str, object]:
    values: dict[str, object] = {}
    for key, param in params.items():
        value = _parameter_value(param)
        values[key] = value
        if isinstance(value, str):
            texts.append(TextField(f"parameter:{prefix}{key}", value))
    return values


def _tensor_texts(name: str, elements: Iterable[bytes], texts: list[TextField]) -> None:
    for i, element in enumerate(elements):
        try:
            texts.append(TextField(f"input:{name}[{i}]", element.decode("utf-8")))
        except UnicodeDecodeError:
            texts.append(TextField(f"input:{name}[{i}]", None))


def _input_texts(
    request: pb.ModelInferRequest, texts: list[TextField], problems: list[str]
) -> None:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        problems.append("raw_input_contents does not pair with inputs")
    for index, tensor in enumerate(request.inputs):
        _parameters(tensor.parameters, f"{tensor.name}.", texts)
        if tensor.datatype != "BYTES":
            continue
        if raw and index < len(raw):
            try:
                elements = decode_bytes_elements(tensor.name, raw[index], -1, check_count=False)
            except TensorError:
                problems.append(f"input '{tensor.name}': malformed BYTES data")
                continue
        else:
            elements = list(tensor.contents.bytes_contents)
        _tensor_texts(tensor.name, elements, texts)


def request_facts(
    request: pb.ModelInferRequest | None,
    metadata: Mapping[str, str],
    caller: Caller,
    *,
    model: str = "",
    model_version: str = "",
) -> RequestFacts:
    """Facts for one request. `request` is None for calls without a payload (metadata)."""
    texts = metadata_text_fields(metadata)
    problems: list[str] = []
    parameters: dict[str, object] = {}
    if request is not None:
        model, model_version = request.model_name, request.model_version
        parameters = _parameters(request.parameters, "", texts)
        _input_texts(request, texts, problems)
    return RequestFacts(
        caller=caller.identity,
        auth=caller.auth,
        model=model,
        model_version=model_version,
        label=metadata.get(CLASSIFICATION_HEADER),
        session_id=metadata.get(SESSION_HEADER) or None,
        metadata=metadata,
        parameters=parameters,
        texts=texts,
        problems=problems,
    )
