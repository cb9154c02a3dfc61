from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EndpointStatus(_message.Message):
    __slots__ = ("pool", "zone", "address", "healthy", "outstanding", "last_error", "seconds_since_check")
    POOL_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    OUTSTANDING_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_CHECK_FIELD_NUMBER: _ClassVar[int]
    pool: str
    zone: str
    address: str
    healthy: bool
    outstanding: int
    last_error: str
    seconds_since_check: float
    def __init__(self, pool: _Optional[str] = ..., zone: _Optional[str] = ..., address: _Optional[str] = ..., healthy: bool = ..., outstanding: _Optional[int] = ..., last_error: _Optional[str] = ..., seconds_since_check: _Optional[float] = ...) -> None: ...

class PolicyStatus(_message.Message):
    __slots__ = ("path", "version_hash", "loaded_at", "last_refused_error", "last_refused_at", "warnings", "signed_by", "signed_at")
    PATH_FIELD_NUMBER: _ClassVar[int]
    VERSION_HASH_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_REFUSED_ERROR_FIELD_NUMBER: _ClassVar[int]
    LAST_REFUSED_AT_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    SIGNED_BY_FIELD_NUMBER: _ClassVar[int]
    SIGNED_AT_FIELD_NUMBER: _ClassVar[int]
    path: str
    version_hash: str
    loaded_at: float
    last_refused_error: str
    last_refused_at: float
    warnings: int
    signed_by: str
    signed_at: float
    def __init__(self, path: _Optional[str] = ..., version_hash: _Optional[str] = ..., loaded_at: _Optional[float] = ..., last_refused_error: _Optional[str] = ..., last_refused_at: _Optional[float] = ..., warnings: _Optional[int] = ..., signed_by: _Optional[str] = ..., signed_at: _Optional[float] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("version", "serving", "not_serving_reason", "started_at", "in_flight", "policy", "endpoints", "audit_failure", "rollouts")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    NOT_SERVING_REASON_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    AUDIT_FAILURE_FIELD_NUMBER: _ClassVar[int]
    ROLLOUTS_FIELD_NUMBER: _ClassVar[int]
    version: str
    serving: bool
    not_serving_reason: str
    started_at: float
    in_flight: int
    policy: PolicyStatus
    endpoints: _containers.RepeatedCompositeFieldContainer[EndpointStatus]
    audit_failure: str
    rollouts: _containers.RepeatedCompositeFieldContainer[RolloutStatus]
    def __init__(self, version: _Optional[str] = ..., serving: bool = ..., not_serving_reason: _Optional[str] = ..., started_at: _Optional[float] = ..., in_flight: _Optional[int] = ..., policy: _Optional[_Union[PolicyStatus, _Mapping]] = ..., endpoints: _Optional[_Iterable[_Union[EndpointStatus, _Mapping]]] = ..., audit_failure: _Optional[str] = ..., rollouts: _Optional[_Iterable[_Union[RolloutStatus, _Mapping]]] = ...) -> None: ...

class VersionShare(_message.Message):
    __slots__ = ("version", "weight", "requests")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    version: str
    weight: int
    requests: int
    def __init__(self, version: _Optional[str] = ..., weight: _Optional[int] = ..., requests: _Optional[int] = ...) -> None: ...

class ShadowStatus(_message.Message):
    __slots__ = ("version", "percent", "pool", "agreed", "disagreed", "failed", "dropped", "refused", "no_endpoint", "agreement_rate", "latency_difference_ms")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    AGREED_FIELD_NUMBER: _ClassVar[int]
    DISAGREED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    NO_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_RATE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_DIFFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    version: str
    percent: float
    pool: str
    agreed: int
    disagreed: int
    failed: int
    dropped: int
    refused: int
    no_endpoint: int
    agreement_rate: float
    latency_difference_ms: float
    def __init__(self, version: _Optional[str] = ..., percent: _Optional[float] = ..., pool: _Optional[str] = ..., agreed: _Optional[int] = ..., disagreed: _Optional[int] = ..., failed: _Optional[int] = ..., dropped: _Optional[int] = ..., refused: _Optional[int] = ..., no_endpoint: _Optional[int] = ..., agreement_rate: _Optional[float] = ..., latency_difference_ms: _Optional[float] = ...) -> None: ...

class RolloutStatus(_message.Message):
    __slots__ = ("route", "model", "split", "shadow")
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    route: str
    model: str
    split: _containers.RepeatedCompositeFieldContainer[VersionShare]
    shadow: ShadowStatus
    def __init__(self, route: _Optional[str] = ..., model: _Optional[str] = ..., split: _Optional[_Iterable[_Union[VersionShare, _Mapping]]] = ..., shadow: _Optional[_Union[ShadowStatus, _Mapping]] = ...) -> None: ...

class ReloadPolicyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadPolicyResponse(_message.Message):
    __slots__ = ("accepted", "version_hash", "error")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    VERSION_HASH_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    version_hash: str
    error: str
    def __init__(self, accepted: bool = ..., version_hash: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...
