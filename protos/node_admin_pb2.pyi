from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("name", "version", "repository", "hostname", "version_policy")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REPOSITORY_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_POLICY_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    repository: str
    hostname: str
    version_policy: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., repository: _Optional[str] = ..., hostname: _Optional[str] = ..., version_policy: _Optional[str] = ...) -> None: ...

class DriftRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class FeatureDrift(_message.Message):
    __slots__ = ("feature", "test", "score_kind", "statistic", "threshold", "drift", "bin_edges", "reference_shares", "current_shares", "categorical")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    TEST_FIELD_NUMBER: _ClassVar[int]
    SCORE_KIND_FIELD_NUMBER: _ClassVar[int]
    STATISTIC_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DRIFT_FIELD_NUMBER: _ClassVar[int]
    BIN_EDGES_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_SHARES_FIELD_NUMBER: _ClassVar[int]
    CURRENT_SHARES_FIELD_NUMBER: _ClassVar[int]
    CATEGORICAL_FIELD_NUMBER: _ClassVar[int]
    feature: str
    test: str
    score_kind: str
    statistic: float
    threshold: float
    drift: bool
    bin_edges: _containers.RepeatedScalarFieldContainer[float]
    reference_shares: _containers.RepeatedScalarFieldContainer[float]
    current_shares: _containers.RepeatedScalarFieldContainer[float]
    categorical: bool
    def __init__(self, feature: _Optional[str] = ..., test: _Optional[str] = ..., score_kind: _Optional[str] = ..., statistic: _Optional[float] = ..., threshold: _Optional[float] = ..., drift: bool = ..., bin_edges: _Optional[_Iterable[float]] = ..., reference_shares: _Optional[_Iterable[float]] = ..., current_shares: _Optional[_Iterable[float]] = ..., categorical: bool = ...) -> None: ...

class ModelDrift(_message.Message):
    __slots__ = ("model", "version", "status", "drift", "window", "window_size", "min_window", "reference_rows", "baseline_kind", "evaluated_at", "features", "dropped")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DRIFT_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SIZE_FIELD_NUMBER: _ClassVar[int]
    MIN_WINDOW_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_ROWS_FIELD_NUMBER: _ClassVar[int]
    BASELINE_KIND_FIELD_NUMBER: _ClassVar[int]
    EVALUATED_AT_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    status: str
    drift: bool
    window: int
    window_size: int
    min_window: int
    reference_rows: int
    baseline_kind: str
    evaluated_at: float
    features: _containers.RepeatedCompositeFieldContainer[FeatureDrift]
    dropped: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., status: _Optional[str] = ..., drift: bool = ..., window: _Optional[int] = ..., window_size: _Optional[int] = ..., min_window: _Optional[int] = ..., reference_rows: _Optional[int] = ..., baseline_kind: _Optional[str] = ..., evaluated_at: _Optional[float] = ..., features: _Optional[_Iterable[_Union[FeatureDrift, _Mapping]]] = ..., dropped: _Optional[int] = ...) -> None: ...

class DriftResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelDrift]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelDrift, _Mapping]]] = ...) -> None: ...
