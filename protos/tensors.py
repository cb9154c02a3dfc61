"""Conversion between Open Inference Protocol tensors and numpy arrays.

The rules (protocol.md): raw data is flattened, row-major, little-endian; a raw BYTES
tensor is a run of elements, each a 4-byte little-endian length and that many bytes;
if any input is raw, none may also carry typed `contents`; FP16 and BF16 travel only
raw. Every error names the tensor and says what was expected and what came instead.

Decoding trusts nothing about a request: a shape numpy cannot hold, a typed integer
outside its datatype's range or a raw BYTES buffer with more elements than the shape
says is a `TensorError` (the caller's mistake), never a numpy exception that would be
answered as the server's. Error texts quote shapes (abbreviated when long), never values.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hybridroute.protos import inference_pb2 as pb

__all__ = [
    "DATATYPES",
    "InputTensor",
    "TensorError",
    "decode_bytes_elements",
    "decode_inputs",
    "encode_bytes_elements",
    "encode_output",
    "iter_bytes_elements",
    "numpy_datatype",
    "quoted",
    "shape_text",
    "travels_typed",
]

# OIP datatype -> little-endian numpy dtype. BYTES is an object array of `bytes`.
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}

# Which InferTensorContents field carries each datatype when sent typed.
_CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

_LENGTH = struct.Struct("<I")

# numpy 1.x holds at most 32 dimensions (numpy 2: 64); no model takes more than two.
MAX_DIMS = 32
_MAX_ELEMENTS = 2**63 - 1  # numpy sizes are signed 64-bit, even for a zero-size array

# Typed integers travel in 32- or 64-bit fields, so the narrower datatypes can receive
# values they cannot hold: check them, or numpy raises OverflowError.
_NARROW_INTEGERS = {
    name: np.iinfo(DATATYPES[name]) for name in ("UINT8", "UINT16", "INT8", "INT16")
}


def quoted(text: str, limit: int = 40) -> str:
    """`text` quoted for a message, cut short: names, datatypes and versions in requests
    are caller-chosen and can be megabytes long, and a status message longer than gRPC's
    metadata limit (16 KiB) reaches the client as RESOURCE_EXHAUSTED instead of the
    error it describes."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


class TensorError(ValueError):
    """A tensor on the wire does not follow the protocol or the model's declaration."""

    def __init__(self, tensor: str, message: str) -> None:
        super().__init__(f"tensor {quoted(tensor)}: {message}")
        self.tensor = tensor


@dataclass(frozen=True, slots=True)
class InputTensor:
    """One decoded input. `raw` says how it travelled, so the answer can match."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    array: np.ndarray[Any, Any]
    raw: bool


def numpy_datatype(array: np.ndarray[Any, Any]) -> str:
    """The OIP datatype name for a numpy array's dtype."""
    if array.dtype == object or array.dtype.kind in "SU":
        return "BYTES"
    for name, dtype in DATATYPES.items():
        if name != "BYTES" and dtype == array.dtype.newbyteorder("<"):
            return name
    raise TypeError(f"no Open Inference Protocol datatype for numpy dtype {array.dtype}")


def travels_typed(datatype: str) -> bool:
    """Whether a tensor of `datatype` can travel in typed `contents` (FP16, BF16: raw only)."""
    return datatype in _CONTENTS_FIELD


def shape_text(shape: Sequence[int]) -> str:
    """A shape for an error message; a caller-chosen shape can have thousands of
    dimensions, and a status message must stay short."""
    if len(shape) <= 8:
        return str(list(shape))
    head = ", ".join(str(d) for d in shape[:4])
    return f"[{head}, ... ({len(shape)} dimensions)]"


def _element_count(name: str, shape: Sequence[int]) -> int:
    """Elements a tensor of `shape` holds, after checking that numpy can hold the shape."""
    if len(shape) > MAX_DIMS:
        raise TensorError(
            name, f"shape {shape_text(shape)} has {len(shape)} dimensions, at most {MAX_DIMS}"
        )
    count = nonzero = 1
    for dim in shape:
        if dim < 0:
            raise TensorError(name, f"shape {shape_text(shape)} has a negative dimension")
        count *= dim
        nonzero *= dim or 1
    if nonzero > _MAX_ELEMENTS:  # numpy refuses these even when another dimension is 0
        raise TensorError(
            name, f"shape {shape_text(shape)} is too large: at most 2**63 - 1 elements"
        )
    return count


def iter_bytes_elements(name: str, buffer: bytes) -> Iterator[bytes]:
    """The elements of a raw BYTES tensor one at a time, checking every length prefix;
    a reader that only needs some of them (the router's scan budget) stops early."""
    offset, end, index = 0, len(buffer), 0
    view = memoryview(buffer)
    while offset < end:
        if offset + 4 > end:
            raise TensorError(
                name,
                f"malformed BYTES data: element {index} has a truncated 4-byte length "
                f"prefix at byte {offset} of {end}",
            )
        (length,) = _LENGTH.unpack_from(buffer, offset)
        offset += 4
        if offset + length > end:
            raise TensorError(
                name,
                f"malformed BYTES data: element {index} declares {length} bytes "
                f"but only {end - offset} remain",
            )
        yield bytes(view[offset : offset + length])
        offset += length
        index += 1


def decode_bytes_elements(
    name: str, buffer: bytes, expected: int, *, check_count: bool = True
) -> list[bytes]:
    """Split a raw BYTES tensor into its elements, checking every length prefix (and,
    with `check_count`, that there are `expected` of them). A buffer with more elements
    than expected is refused at the first extra one: 14 million empty elements fit in
    a 53 MB request, and splitting them all took seconds and gigabytes."""
    if not check_count:
        return list(iter_bytes_elements(name, buffer))
    items: list[bytes] = []
    for item in iter_bytes_elements(name, buffer):
        if len(items) == expected:
            raise TensorError(name, f"shape needs {expected} BYTES elements, raw data holds more")
        items.append(item)
    if len(items) != expected:
        raise TensorError(
            name, f"shape needs {expected} BYTES elements, raw data holds {len(items)}"
        )
    return items


def encode_bytes_elements(items: Iterable[bytes | str]) -> bytes:
    """Serialise BYTES elements as length-prefixed raw data."""
    parts: list[bytes] = []
    for item in items:
        data = item.encode() if isinstance(item, str) else bytes(item)
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def _object_array(items: Sequence[bytes], shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array.reshape(shape)


def _decode_raw(name: str, datatype: str, shape: tuple[int, ...], raw: bytes) -> Any:
    count = _element_count(name, shape)
    if datatype == "BYTES":
        return _object_array(decode_bytes_elements(name, raw, count), shape)
    if datatype == "BF16":
        raise TensorError(name, "datatype BF16 is not supported by this server")
    dtype = DATATYPES[datatype]
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise TensorError(
            name,
            f"raw data is {len(raw)} bytes, expected {expected} "
            f"({count} x {datatype} for shape {shape_text(shape)})",
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _decode_typed(name: str, datatype: str, shape: tuple[int, ...], contents: Any) -> Any:
    count = _element_count(name, shape)
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise TensorError(name, f"datatype {datatype} travels only as raw_input_contents")
    values = getattr(contents, field)
    if len(values) != count:
        raise TensorError(
            name,
            f"{field} holds {len(values)} elements, expected {count} for shape {shape_text(shape)}",
        )
    for other in set(_CONTENTS_FIELD.values()) - {field}:
        if len(getattr(contents, other)):
            raise TensorError(name, f"datatype {datatype} must use {field}, not {other}")
    if datatype == "BYTES":
        return _object_array(list(values), shape)
    limits = _NARROW_INTEGERS.get(datatype)
    if limits is None:
        return np.asarray(values, dtype=DATATYPES[datatype]).reshape(shape)
    wide = np.asarray(values, dtype=np.int64)
    outside = np.flatnonzero((wide < limits.min) | (wide > limits.max))
    if outside.size:
        raise TensorError(
            name,
            f"{field} element {int(outside[0])} is outside the {datatype} range "
            f"{limits.min}..{limits.max}",
        )
    return wide.astype(DATATYPES[datatype]).reshape(shape)


def decode_inputs(request: pb.ModelInferRequest) -> list[InputTensor]:
    """Decode every input of a request, raw or typed, into numpy arrays."""
    raw_contents = request.raw_input_contents
    if raw_contents and len(raw_contents) != len(request.inputs):
        raise TensorError(
            "raw_input_contents",
            f"{len(raw_contents)} raw buffers for {len(request.inputs)} inputs; "
            "raw_input_contents[i] must belong to inputs[i]",
        )
    decoded: list[InputTensor] = []
    for index, tensor in enumerate(request.inputs):
        name, datatype = tensor.name, tensor.datatype
        if datatype not in DATATYPES and datatype != "BF16":
            raise TensorError(name, f"unknown datatype {quoted(datatype)}")
        shape = tuple(tensor.shape)
        if raw_contents:
            if tensor.HasField("contents"):
                raise TensorError(name, "has typed contents although the request uses raw data")
            array = _decode_raw(name, datatype, shape, raw_contents[index])
        else:
            array = _decode_typed(name, datatype, shape, tensor.contents)
        decoded.append(InputTensor(name, datatype, shape, array, raw=bool(raw_contents)))
    return decoded


def encode_output(
    response: pb.ModelInferResponse,
    name: str,
    datatype: str,
    array: np.ndarray[Any, Any],
    *,
    raw: bool,
) -> None:
    """Append one output to `response`, raw (tritonclient reads only raw) or typed."""
    out = response.outputs.add()
    out.name = name
    out.datatype = datatype
    out.shape.extend(array.shape)
    if datatype == "BYTES":
        flat = [x.encode() if isinstance(x, str) else bytes(x) for x in array.reshape(-1)]
        if raw:
            response.raw_output_contents.append(encode_bytes_elements(flat))
        else:
            out.contents.bytes_contents.extend(flat)
        return
    dtype = DATATYPES[datatype]
    if raw:
        response.raw_output_contents.append(np.ascontiguousarray(array, dtype=dtype).tobytes())
        return
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise TensorError(name, f"datatype {datatype} can only be answered raw")
    getattr(out.contents, field).extend(array.astype(dtype, copy=False).reshape(-1).tolist())
