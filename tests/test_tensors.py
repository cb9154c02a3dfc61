"""Open Inference Protocol tensor conversion: raw and typed, every datatype, every error."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from hybridroute.protos import inference_pb2 as pb
from hybridroute.protos.tensors import (
    TensorError,
    decode_bytes_elements,
    decode_inputs,
    encode_bytes_elements,
    encode_output,
)

NUMERIC = [
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP32",
    "FP64",
]


def _array(datatype: str) -> np.ndarray:
    from hybridroute.protos.tensors import DATATYPES

    values = np.array([[0, 1, 2], [3, 4, 5]])
    return (values % 2 == 1) if datatype == "BOOL" else values.astype(DATATYPES[datatype])


@pytest.mark.parametrize("datatype", NUMERIC)
@pytest.mark.parametrize("raw", [True, False])
def test_round_trip_through_a_response_and_back(datatype: str, raw: bool) -> None:
    array = _array(datatype)
    response = pb.ModelInferResponse()
    encode_output(response, "x", datatype, array, raw=raw)
    out = response.outputs[0]
    assert list(out.shape) == [2, 3] and out.datatype == datatype
    request = pb.ModelInferRequest()
    tensor = request.inputs.add(name="x", datatype=datatype, shape=[2, 3])
    if raw:
        request.raw_input_contents.append(response.raw_output_contents[0])
    else:
        tensor.contents.CopyFrom(out.contents)
    (decoded,) = decode_inputs(request)
    assert decoded.raw is raw
    np.testing.assert_array_equal(decoded.array, array)


def test_raw_bytes_elements_round_trip_with_empty_and_binary_items() -> None:
    items = [b"hello", b"", "naïve".encode(), b"\x00\xff"]
    buffer = encode_bytes_elements(items)
    assert buffer[:4] == struct.pack("<I", 5)
    assert decode_bytes_elements("t", buffer, 4) == items


def test_fp16_travels_raw_only() -> None:
    request = pb.ModelInferRequest()
    request.inputs.add(name="h", datatype="FP16", shape=[2])
    request.raw_input_contents.append(np.array([1.5, -2], dtype="<f2").tobytes())
    (decoded,) = decode_inputs(request)
    assert decoded.array.dtype == np.float16
    typed = pb.ModelInferRequest()
    typed.inputs.add(name="h", datatype="FP16", shape=[2])
    with pytest.raises(TensorError, match=r"'h'.*only as raw"):
        decode_inputs(typed)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda r: (
                r.inputs.add(name="x", datatype="FP64", shape=[1, 4]),
                r.raw_input_contents.append(b"\0" * 24),
            ),
            r"tensor 'x': raw data is 24 bytes, expected 32",
        ),
        (
            lambda r: (
                r.inputs.add(name="t", datatype="BYTES", shape=[2]),
                r.raw_input_contents.append(struct.pack("<I", 9) + b"abc"),
            ),
            r"tensor 't': malformed BYTES data: element 0 declares 9 bytes but only 3 remain",
        ),
        (
            lambda r: (
                r.inputs.add(name="t", datatype="BYTES", shape=[2]),
                r.raw_input_contents.append(encode_bytes_elements([b"a"]) + b"\1\0"),
            ),
            r"tensor 't': malformed BYTES data: element 1 has a truncated 4-byte length",
        ),
        (
            lambda r: (
                r.inputs.add(name="t", datatype="BYTES", shape=[3]),
                r.raw_input_contents.append(encode_bytes_elements([b"a", b"b"])),
            ),
            r"tensor 't': shape needs 3 BYTES elements, raw data holds 2",
        ),
        (
            lambda r: r.inputs.add(name="y", datatype="FLOAT", shape=[1]),
            r"tensor 'y': unknown datatype 'FLOAT'",
        ),
        (
            lambda r: r.inputs.add(
                name="z", datatype="FP64", shape=[2, 2]
            ).contents.fp64_contents.extend([1.0, 2.0, 3.0]),
            r"tensor 'z': fp64_contents holds 3 elements, expected 4 for shape \[2, 2\]",
        ),
        (
            lambda r: r.inputs.add(
                name="w", datatype="INT64", shape=[1]
            ).contents.fp64_contents.extend([1.0]),
            r"tensor 'w': int64_contents holds 0 elements, expected 1",
        ),
        (
            lambda r: (
                r.inputs.add(name="a", datatype="FP64", shape=[1]),
                r.inputs.add(name="b", datatype="FP64", shape=[1]),
                r.raw_input_contents.append(b"\0" * 8),
            ),
            r"1 raw buffers for 2 inputs",
        ),
        (
            lambda r: (
                r.inputs.add(name="m", datatype="FP64", shape=[1]).contents.fp64_contents.append(
                    1.0
                ),
                r.raw_input_contents.append(b"\0" * 8),
            ),
            r"tensor 'm': has typed contents although the request uses raw data",
        ),
        (
            lambda r: r.inputs.add(name="n", datatype="FP64", shape=[-1, 4]),
            r"tensor 'n': shape \[-1, 4\] has a negative dimension",
        ),
    ],
)
def test_malformed_tensors_name_the_tensor_and_expected_vs_got(build, message: str) -> None:
    request = pb.ModelInferRequest()
    build(request)
    with pytest.raises(TensorError, match=message):
        decode_inputs(request)


def test_typed_bytes_answer_uses_bytes_contents() -> None:
    response = pb.ModelInferResponse()
    labels = np.array([b"billing", "technical"], dtype=object)
    encode_output(response, "label", "BYTES", labels, raw=False)
    assert list(response.outputs[0].contents.bytes_contents) == [b"billing", b"technical"]
    assert not response.raw_output_contents


@pytest.mark.parametrize(
    ("datatype", "field", "values", "message"),
    [
        (
            "UINT8",
            "uint_contents",
            [1, 300],
            "uint_contents element 1 is outside the UINT8 range 0..255",
        ),
        (
            "INT8",
            "int_contents",
            [-1000, 0],
            "int_contents element 0 is outside the INT8 range -128..127",
        ),
        (
            "UINT16",
            "uint_contents",
            [0, 70000],
            "uint_contents element 1 is outside the UINT16 range 0..65535",
        ),
        (
            "INT16",
            "int_contents",
            [-40000, 1],
            "int_contents element 0 is outside the INT16 range -32768..32767",
        ),
    ],
)
def test_typed_integers_outside_their_datatype_name_the_element_not_the_value(
    datatype: str, field: str, values: list[int], message: str
) -> None:
    request = pb.ModelInferRequest()
    tensor = request.inputs.add(name="n", datatype=datatype, shape=[2])
    getattr(tensor.contents, field).extend(values)
    with pytest.raises(TensorError, match=f"tensor 'n': {message}$"):
        decode_inputs(request)


@pytest.mark.parametrize("datatype", ["UINT8", "INT8", "UINT16", "INT16"])
def test_typed_integers_at_the_edges_of_their_range_decode(datatype: str) -> None:
    from hybridroute.protos.tensors import DATATYPES

    info = np.iinfo(DATATYPES[datatype])
    request = pb.ModelInferRequest()
    tensor = request.inputs.add(name="n", datatype=datatype, shape=[2])
    field = "uint_contents" if datatype.startswith("U") else "int_contents"
    getattr(tensor.contents, field).extend([int(info.min), int(info.max)])
    (decoded,) = decode_inputs(request)
    assert decoded.array.dtype == DATATYPES[datatype]
    assert decoded.array.tolist() == [info.min, info.max]


@pytest.mark.parametrize("raw", [True, False])
@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ([1] * 33, r"shape \[1, 1, 1, 1, \.\.\. \(33 dimensions\)\] has 33 dimensions, at most 32"),
        ([2**62, 4, 0], r"shape \[4611686018427387904, 4, 0\] is too large"),
    ],
)
def test_shapes_numpy_cannot_hold_are_tensor_errors(
    shape: list[int], message: str, raw: bool
) -> None:
    request = pb.ModelInferRequest()
    request.inputs.add(name="s", datatype="FP64", shape=shape)
    if raw:
        request.raw_input_contents.append(b"")
    with pytest.raises(TensorError, match=f"tensor 's': {message}"):
        decode_inputs(request)


def test_a_raw_bytes_buffer_is_split_only_up_to_the_elements_its_shape_needs() -> None:
    # Two good elements, then a truncated one: the count is refused at the first extra
    # element, before the rest of the buffer is read.
    buffer = encode_bytes_elements([b"a", b"b"]) + b"\x09\0"
    with pytest.raises(
        TensorError, match=r"'t': shape needs 1 BYTES elements, raw data holds more"
    ):
        decode_bytes_elements("t", buffer, 1)
    assert decode_bytes_elements("t", buffer[:-2], 2) == [b"a", b"b"]


def test_only_fp16_and_bf16_travel_raw_only() -> None:
    from hybridroute.protos.tensors import travels_typed

    assert not travels_typed("FP16") and not travels_typed("BF16")
    assert all(travels_typed(d) for d in [*NUMERIC, "BYTES"])
