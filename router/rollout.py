"""Canary and shadow rollouts, compiled: what a route's `rollouts:` block becomes at load.

A route may split a model's traffic between versions by weight (canary) and mirror a
share of it to a candidate version whose replies are compared, then discarded
(shadow). The schema is in `policy` (`RolloutSpec`), the load-time checks (the zone
guard for shadow copies among them) in `policy.checks`, the fire-and-forget mirroring
in `shadow`. This module is the part every request touches, so it is kept small:

- the version is set without re-serialising the request: the encoded field 2
  (`model_version`, a string) is appended to the original bytes. Protobuf parsers keep
  the *last* occurrence of a singular field, so the node sees the appended version
  whatever the caller sent (tests/test_rollout.py checks this against the generated
  `ModelInferRequest`). Each version's encoding is built once, at load;
- a split applies only to requests that name no version: a caller that asks for
  version 1 gets version 1;
- `outputs_agree` decides whether a candidate's reply agrees with the serving one. It
  runs in the shadow task, after the caller has its reply, never on the request path.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
from google.protobuf.message import DecodeError

from hybridroute.protos import inference_pb2 as pb
from hybridroute.protos.tensors import DATATYPES, decode_bytes_elements

if TYPE_CHECKING:
    from hybridroute.router.policy.schema import Pool, Route

__all__ = [
    "FLOAT_TOLERANCE",
    "Rollout",
    "ShadowPlan",
    "compile_rollouts",
    "outputs_agree",
    "version_field",
    "with_version",
]

_MODEL_VERSION_TAG = b"\x12"  # field 2, wire type 2 (length-delimited)
FLOAT_TOLERANCE = 1e-6  # relative: floating-point outputs this close still agree


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def version_field(version: str) -> bytes:
    """`model_version = version` as protobuf wire bytes (tag, length, UTF-8)."""
    data = version.encode("utf-8")
    return _MODEL_VERSION_TAG + _varint(len(data)) + data


def with_version(raw: bytes, version: str) -> bytes:
    """A serialised ModelInferRequest with its `model_version` set to `version`."""
    return raw + version_field(version)


@dataclass(frozen=True, slots=True)
class ShadowPlan:
    """Where and how a share of a model's requests is mirrored (see `policy.schema.Shadow`)."""

    version: str
    share: float  # 0 < share <= 1
    pool: str
    zone: str  # the pool's zone at load; the forwarder checks the endpoint's zone again
    timeout: float
    compare: frozenset[str] | None  # output names; None: every output of the serving reply
    max_in_flight: int
    field: bytes  # version_field(version)


@dataclass(frozen=True, slots=True)
class Rollout:
    """One `routes.<route>.rollouts.<model>` entry, ready for the request path."""

    route: str
    model: str
    versions: tuple[str, ...]  # the split's versions (empty: no split)
    weights: tuple[int, ...]
    cumulative: tuple[int, ...]  # running totals of `weights`, for the weighted draw
    fields: tuple[bytes, ...]  # version_field of each version
    shadow: ShadowPlan | None

    def pick(self, draw: float) -> int:
        """The index of the version a request goes to; `draw` is uniform in [0, 1)."""
        return bisect.bisect_right(self.cumulative, draw * self.cumulative[-1])


def compile_rollouts(
    routes: Mapping[str, Route], pools: Mapping[str, Pool]
) -> Mapping[tuple[str, str], Rollout]:
    """Every route's rollouts keyed by (route, model): one dict lookup per request, and
    none at all when the policy has no rollouts (the mapping is empty)."""
    compiled: dict[tuple[str, str], Rollout] = {}
    for route_name, route in routes.items():
        for model, spec in route.rollouts.items():
            split = spec.split or {}
            versions = tuple(split)
            weights = tuple(split[v] for v in versions)
            shadow = None
            if spec.shadow is not None:
                s = spec.shadow
                pool = s.pool or route.pool
                shadow = ShadowPlan(
                    version=s.version,
                    share=s.percent / 100,
                    pool=pool,
                    zone=pools[pool].zone,
                    timeout=s.timeout,
                    compare=frozenset(s.compare) if s.compare is not None else None,
                    max_in_flight=s.max_in_flight,
                    field=version_field(s.version),
                )
            compiled[(route_name, model)] = Rollout(
                route=route_name,
                model=model,
                versions=versions,
                weights=weights,
                cumulative=tuple(itertools.accumulate(weights)),
                fields=tuple(version_field(v) for v in versions),
                shadow=shadow,
            )
    return MappingProxyType(compiled)


# --- agreement ---------------------------------------------------------------------------


def outputs_agree(serving: bytes, candidate: bytes, compare: frozenset[str] | None) -> bool:
    """Whether the candidate's ModelInferResponse agrees with the serving one.

    They agree when every compared output of the serving reply (all of them, or the
    policy's `compare:` list) is in the candidate's reply with the same datatype and
    shape and equal values; floating-point values may differ by FLOAT_TOLERANCE
    (relative), so a retrained model that predicts the same is not called different
    for its last bits. A reply that cannot be parsed does not agree.
    """
    try:
        ours = _outputs(pb.ModelInferResponse.FromString(serving))
        theirs = _outputs(pb.ModelInferResponse.FromString(candidate))
    except (DecodeError, ValueError, OverflowError):
        return False
    names = ours.keys() if compare is None else compare
    return all(
        name in ours and name in theirs and _same(ours[name], theirs[name]) for name in names
    )


_Tensor = tuple[str, tuple[int, ...], Any]  # datatype, shape, values


def _outputs(response: pb.ModelInferResponse) -> dict[str, _Tensor]:
    """Each output's values, read the same way whether the server answered raw or typed
    (the protocol allows either): a numpy array of the datatype, or for BYTES the list
    of elements (never numpy strings: they drop trailing NUL bytes)."""
    raw = response.raw_output_contents
    out: dict[str, _Tensor] = {}
    for i, tensor in enumerate(response.outputs):
        dtype = DATATYPES.get(tensor.datatype)
        values: Any
        if raw:
            data = raw[i] if i < len(raw) else b""
            if tensor.datatype == "BYTES":
                values = decode_bytes_elements(tensor.name, data, 0, check_count=False)
            elif dtype is not None:
                values = np.frombuffer(data, dtype=dtype)
            else:  # a datatype this router does not decode (BF16): its bytes
                values = data
        else:
            fields = tensor.contents.ListFields()
            items = list(fields[0][1]) if fields else []
            if tensor.datatype == "BYTES" or dtype is None:
                values = items
            else:
                values = np.asarray(items, dtype=dtype)
        out[tensor.name] = (tensor.datatype, tuple(tensor.shape), values)
    return out


def _same(a: _Tensor, b: _Tensor) -> bool:
    if a[0] != b[0] or a[1] != b[1]:
        return False
    x, y = a[2], b[2]
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        return bool(x == y)  # BYTES elements, or the bytes of an undecoded datatype
    if x.shape != y.shape:
        return False
    if x.dtype.kind == "f":
        return bool(np.allclose(x, y, rtol=FLOAT_TOLERANCE, atol=0.0, equal_nan=True))
    return bool(np.array_equal(x, y))
