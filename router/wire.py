"""What parsing a request would silently drop: a check of its wire format.

The router decides on the parsed request but forwards the bytes that arrived, so the
two must say the same thing. Protobuf parsing is forgiving where that matters: an
unknown field is kept aside (never seen by the policy), a singular field or a oneof
sent twice keeps only its last value, a map key sent twice keeps only its last entry.
Each of those lets a caller hide text from the scan that still travels upstream.
`hidden_data` walks the wire format against the message's descriptor and names the
first such construct; the front door makes it a problem (the request is sensitive,
invariant 2). Canonical encoders (protobuf's own, so tritonclient and the KServe SDK)
never produce any of them.

The walk skips over payloads by their length (tensor data is not read), so its cost is
the number of fields, bounded by `MAX_FIELDS`: past that the request is doubt too.
"""

from __future__ import annotations

from typing import cast

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

__all__ = ["MAX_FIELDS", "hidden_data", "read_varint"]

MAX_FIELDS = 250_000  # field entries walked per request; more is doubt, not work
_MAX_DEPTH = 8  # the OIP messages nest 3 deep (request, tensor, contents/parameter)

_LENGTH_DELIMITED = 2
_SCALAR_WIRE = {  # wire types a scalar field of each type arrives as (unpacked)
    FieldDescriptor.TYPE_DOUBLE: 1,
    FieldDescriptor.TYPE_FIXED64: 1,
    FieldDescriptor.TYPE_SFIXED64: 1,
    FieldDescriptor.TYPE_FLOAT: 5,
    FieldDescriptor.TYPE_FIXED32: 5,
    FieldDescriptor.TYPE_SFIXED32: 5,
}


class _Hidden(Exception):
    pass


class _Walk:
    def __init__(self) -> None:
        self.fields = 0

    def message(self, descriptor: Descriptor, data: memoryview, depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise _Hidden(f"{descriptor.name} nested deeper than any request message")
        seen: set[int] = set()
        oneofs: set[str] = set()
        keys: dict[int, set[bytes]] = {}
        i, end = 0, len(data)
        while i < end:
            self.fields += 1
            if self.fields > MAX_FIELDS:
                raise _Hidden(f"more than {MAX_FIELDS} fields to check")
            tag, i = _varint(data, i)
            number, wire = tag >> 3, tag & 7
            field = descriptor.fields_by_number.get(number)
            if field is None:
                raise _Hidden(f"unknown field {number} in {descriptor.name}")
            i, value = _skip(data, i, wire)
            if wire != _expected_wire(field) and not (
                field.is_repeated and wire == _LENGTH_DELIMITED  # a packed repeated scalar
            ):
                raise _Hidden(f"field {descriptor.name}.{field.name} has wire type {wire}")
            if not field.is_repeated:
                if number in seen:
                    raise _Hidden(f"field {descriptor.name}.{field.name} sent twice")
                seen.add(number)
                oneof = field.containing_oneof
                if oneof is not None:
                    if oneof.name in oneofs:
                        raise _Hidden(f"{descriptor.name}.{oneof.name} set twice")
                    oneofs.add(oneof.name)
            entry = field.message_type
            if entry is not None and value is not None:
                if entry.GetOptions().map_entry:
                    key = _map_key(value)
                    if key in keys.setdefault(number, set()):
                        raise _Hidden(f"map {descriptor.name}.{field.name} has a key twice")
                    keys[number].add(key)
                self.message(entry, value, depth + 1)


def hidden_data(kind: type[Message], data: bytes) -> str | None:
    """What in `data` parsing as a `kind` would drop or merge silently (None: nothing;
    the message must have parsed already, so the wire format itself is sound)."""
    try:
        # upb's descriptors implement the same interface as the Python ones the stubs name.
        _Walk().message(cast(Descriptor, kind.DESCRIPTOR), memoryview(data), 0)
    except _Hidden as exc:
        return str(exc)
    except IndexError:  # cannot happen after a successful parse; doubt all the same
        return "the request's wire format does not parse"
    return None


def _expected_wire(field: FieldDescriptor) -> int:
    if field.type in (
        FieldDescriptor.TYPE_STRING,
        FieldDescriptor.TYPE_BYTES,
        FieldDescriptor.TYPE_MESSAGE,
    ):
        return _LENGTH_DELIMITED
    return _SCALAR_WIRE.get(field.type, 0)


def _skip(data: memoryview, i: int, wire: int) -> tuple[int, memoryview | None]:
    """Past one value of wire type `wire` at `i`; a length-delimited value is returned."""
    if wire == 0:
        return _varint(data, i)[1], None
    if wire == 1:
        return _within(data, i + 8), None
    if wire == 5:
        return _within(data, i + 4), None
    if wire == _LENGTH_DELIMITED:
        length, i = _varint(data, i)
        end = _within(data, i + length)
        return end, data[i:end]
    raise _Hidden(f"wire type {wire} (groups) is not used by these messages")


def _within(data: memoryview, end: int) -> int:
    if end > len(data):
        raise IndexError(end)
    return end


def read_varint(data: bytes | memoryview, i: int) -> tuple[int, int]:
    """The varint at `i` and the index after it. IndexError when `data` ends inside it,
    ValueError when it runs past the 10 bytes a 64-bit value takes."""
    value = shift = 0
    while True:
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i += 1
        if byte < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("a varint longer than 10 bytes")


def _varint(data: memoryview, i: int) -> tuple[int, int]:
    try:
        return read_varint(data, i)
    except ValueError as exc:
        raise _Hidden(str(exc)) from None


def _map_key(entry: memoryview) -> bytes:
    """The raw bytes of a map entry's key (field 1), b"" when absent (the default key)."""
    i, end = 0, len(entry)
    while i < end:
        tag, start = _varint(entry, i)
        i, _ = _skip(entry, start, tag & 7)
        if tag >> 3 == 1:
            return bytes(entry[start:i])
    return b""
