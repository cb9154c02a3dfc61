"""What the router reads from a request before deciding: every place a caller can put
text that is forwarded is scanned, and what cannot be read makes the request sensitive
(invariant 2). Each case hides a value in one place of a public request and must not
be decided for the cloud; decided as the front door decides, from the wire bytes."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybridroute.protos import inference_pb2 as pb
from hybridroute.protos.tensors import TensorError, decode_inputs, encode_bytes_elements
from hybridroute.router.facts import MAX_TEXT_FIELDS, Caller, request_facts
from hybridroute.router.policy.engine import Decision, decide
from hybridroute.router.policy.schema import compile_policy
from hybridroute.router.wire import hidden_data
from hybridroute.stack import default_policy_path

POLICY = compile_policy(default_policy_path())
SSN, CARD, EMAIL = "321-54-9876", 4111111111111111, "jane.doe@example.com"
PUBLIC = {"x-data-classification": "public"}


def ticket(text: str = "the export button does nothing") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="ticket-triage")
    request.inputs.add(name="text", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(encode_bytes_elements([text]))
    return request


def decided(raw: bytes, metadata: dict[str, str] = PUBLIC) -> Decision:
    """As the front door decides a ModelInfer: parsed, and its wire format checked."""
    request = pb.ModelInferRequest.FromString(raw)
    facts = request_facts(
        request,
        metadata,
        Caller("demo-app", "cert"),
        wire_problem=hidden_data(pb.ModelInferRequest, raw),
        text_budget=POLICY.max_text_bytes,
    )
    return decide(POLICY, facts)


def test_a_clean_public_ticket_goes_to_the_cloud() -> None:
    decision = decided(ticket().SerializeToString())
    assert (decision.zone, decision.sensitive) == ("cloud", False)


def _in_output_parameter(r: pb.ModelInferRequest) -> None:
    r.outputs.add(name="label").parameters["note"].string_param = f"ssn {SSN}"


def _in_request_id(r: pb.ModelInferRequest) -> None:
    r.id = f"order for {EMAIL}"


def _as_int64_parameter(r: pb.ModelInferRequest) -> None:
    r.parameters["card"].int64_param = CARD


def _as_input_name(r: pb.ModelInferRequest) -> None:
    r.inputs[0].name = f"ssn {SSN}"


def _as_output_name(r: pb.ModelInferRequest) -> None:
    r.outputs.add(name=EMAIL)


def _as_parameter_key(r: pb.ModelInferRequest) -> None:
    r.parameters[f"ssn {SSN}"].bool_param = True


def _in_model_name(r: pb.ModelInferRequest) -> None:
    r.model_name = f"triage-for-{EMAIL}"


HIDDEN: dict[str, tuple[Callable[[pb.ModelInferRequest], None], str]] = {
    "an output's parameter": (_in_output_parameter, "detector:us_ssn"),
    "the request id": (_in_request_id, "detector:email"),
    "an int64 parameter": (_as_int64_parameter, "detector:credit_card"),
    "an input's name": (_as_input_name, "detector:us_ssn"),
    "an output's name": (_as_output_name, "detector:email"),
    "a parameter's key": (_as_parameter_key, "detector:us_ssn"),
    "the model name": (_in_model_name, "detector:email"),
}


@pytest.mark.parametrize("where", HIDDEN)
def test_values_hidden_outside_the_tensors_are_found(where: str) -> None:
    hide, reason = HIDDEN[where]
    request = ticket()
    hide(request)
    decision = decided(request.SerializeToString())
    assert decision.zone == "onprem" and reason in decision.reasons, decision.reasons


def test_a_metadata_name_is_scanned_like_its_value() -> None:
    decision = decided(ticket().SerializeToString(), {**PUBLIC, f"x-ssn-{SSN}": "1"})
    assert decision.zone == "onprem" and "detector:us_ssn" in decision.reasons


def _bytes_in_a_number_tensor() -> bytes:
    request = pb.ModelInferRequest(model_name="iris")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1])
    tensor.contents.fp32_contents.append(1.0)
    tensor.contents.bytes_contents.append(f"ssn {SSN}".encode())
    return request.SerializeToString()


def _typed_beside_raw() -> bytes:
    request = ticket()
    request.inputs[0].contents.bytes_contents.append(f"ssn {SSN}".encode())
    return request.SerializeToString()


def _unknown_field() -> bytes:
    text = f"ssn {SSN}".encode()
    return ticket().SerializeToString() + bytes([15 << 3 | 2, len(text)]) + text


def _repeated_map_key() -> bytes:
    # Two entries for one key: parsing keeps the last, the forwarded bytes hold both.
    first, last = ticket(), pb.ModelInferRequest()
    first.parameters["note"].string_param = f"ssn {SSN}"
    last.parameters["note"].string_param = "fine"
    return first.SerializeToString() + last.SerializeToString()


def _padded_repeated_field() -> bytes:
    # The id twice (parsing keeps the last), with empty map entries that re-encode two
    # bytes larger each, so the parsed request re-encodes to exactly the wire size.
    hidden, last, padding = ticket(), pb.ModelInferRequest(), b""
    hidden.id, last.id = f"ssn {SSN}", "ok"
    raw = hidden.SerializeToString() + last.SerializeToString()
    for n in range(20):
        entry = bytes([0x0A, 2]) + f"k{n}".encode()[:2]  # key only, no value
        padding += bytes([4 << 3 | 2, len(entry)]) + entry  # parameters = field 4
        if len(pb.ModelInferRequest.FromString(raw + padding).SerializeToString()) == len(
            raw + padding
        ):
            break
    return raw + padding


UNREAD: dict[str, Callable[[], bytes]] = {
    "bytes_contents in a number tensor": _bytes_in_a_number_tensor,
    "typed contents beside raw contents": _typed_beside_raw,
    "an unknown field": _unknown_field,
    "a repeated map key": _repeated_map_key,
    "a repeated field padded to re-encode to its wire size": _padded_repeated_field,
}


@pytest.mark.parametrize("what", UNREAD)
def test_what_the_router_does_not_read_keeps_the_request_on_prem(what: str) -> None:
    decision = decided(UNREAD[what]())
    assert (decision.zone, decision.sensitive) == ("onprem", True)
    assert "unreadable" in decision.reasons


def test_a_clean_request_from_a_canonical_encoder_has_nothing_hidden() -> None:
    request = ticket()
    request.id, request.parameters["sequence_id"].int64_param = "req-1", 7
    request.outputs.add(name="label").parameters["class_count"].int64_param = 2
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    tensor.contents.fp32_contents.extend([1.0, 2.0])
    assert hidden_data(pb.ModelInferRequest, request.SerializeToString()) is None


def test_a_tritonclient_sequence_id_is_not_taken_for_a_card_number() -> None:
    request = ticket()
    request.parameters["sequence_id"].int64_param = CARD  # passes Luhn, as 1 in 10 ids do
    decision = decided(request.SerializeToString())
    assert (decision.zone, decision.sensitive) == ("cloud", False)


def test_a_metadata_call_with_an_unknown_field_is_doubt() -> None:
    text = f"ssn {SSN}".encode()
    raw = pb.ModelMetadataRequest(name="iris").SerializeToString()
    raw += bytes([9 << 3 | 2, len(text)]) + text
    assert hidden_data(pb.ModelMetadataRequest, raw) == ("unknown field 9 in ModelMetadataRequest")


def test_millions_of_tiny_texts_stop_at_the_budget() -> None:
    request = ticket()
    count = 4 * MAX_TEXT_FIELDS
    request.inputs[0].shape[0] = count
    request.raw_input_contents[0] = encode_bytes_elements([b""] * count)
    raw = request.SerializeToString()
    facts = request_facts(pb.ModelInferRequest.FromString(raw), PUBLIC, Caller("demo-app", "cert"))
    # Collecting stopped at the budget instead of decoding all 400k elements ...
    assert facts.too_large and len(facts.texts) <= MAX_TEXT_FIELDS
    # ... and a request too large to scan is doubt: on-prem.
    decision = decide(POLICY, facts)
    assert (decision.zone, decision.reasons) == ("onprem", ("text-too-large",))


# --- what a node reads, the router has read -------------------------------------------


def _node_reads_personal_data(request: pb.ModelInferRequest) -> bool:
    """Would the router's detectors fire on the texts a node decodes from `request`?"""
    try:
        tensors = decode_inputs(request)
    except (TensorError, ValueError):
        return False  # the node refuses the request (INVALID_ARGUMENT): nothing is read
    texts = [
        element.decode("utf-8", "replace")
        for tensor in tensors
        if tensor.datatype == "BYTES"
        for element in tensor.array.ravel()
    ]
    return any(POLICY.scanner.scan(text) for text in texts)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_no_mutation_of_the_wire_bytes_hides_from_the_router_what_a_node_reads(
    data: st.DataObject,
) -> None:
    """A parse differential is how data slips past a classifier: bytes the router reads
    one way and the node another. Whatever bytes arrive (a request with one personal
    value in one of three texts, changed at a few places), if the node would decode a
    text in which the router's own detectors find personal data, the router has kept
    the request away from the cloud."""
    value = data.draw(st.sampled_from([f"SSN {SSN}", f"mail {EMAIL}"]), label="value")
    texts = ["the export button does nothing", "ok", f"please update {value}, thanks"]
    where = data.draw(st.integers(0, 2), label="where")
    texts[where], texts[2] = texts[2], texts[where]  # one personal value, anywhere
    request = pb.ModelInferRequest(model_name="ticket-triage")
    text = request.inputs.add(name="text", datatype="BYTES", shape=[1])
    note = request.inputs.add(name="note", datatype="BYTES", shape=[2])
    if data.draw(st.booleans(), label="typed"):  # contents.bytes_contents
        text.contents.bytes_contents.append(texts[0].encode())
        note.contents.bytes_contents.extend(t.encode() for t in texts[1:])
    else:  # raw_input_contents, as tritonclient sends them
        request.raw_input_contents.append(encode_bytes_elements(texts[:1]))
        request.raw_input_contents.append(encode_bytes_elements(texts[1:]))
    raw = bytearray(request.SerializeToString())
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        at = data.draw(st.integers(0, len(raw) - 1), label="at")
        kind = data.draw(st.sampled_from(["replace", "insert", "delete"]), label="kind")
        byte = data.draw(st.integers(0, 255), label="byte")
        if kind == "replace":
            raw[at] = byte
        elif kind == "insert":
            raw.insert(at, byte)
        elif len(raw) > 1:
            del raw[at]
    try:
        mutated = pb.ModelInferRequest.FromString(bytes(raw))
    except DecodeError:
        return  # the router answers INVALID_ARGUMENT: nothing goes anywhere
    if _node_reads_personal_data(mutated):
        assert decided(bytes(raw)).zone != "cloud"
