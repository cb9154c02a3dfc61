"""Inputs a model cannot take are refused before they are queued: NaN for an estimator
that refuses missing values, text that is not UTF-8. In a batch, such a request would
fail the estimator call of every caller in it, and the batch would be re-run request
by request."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from sklearn.calibration import CalibratedClassifierCV
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_iris
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline, make_union
from sklearn.preprocessing import FunctionTransformer, StandardScaler
from support import running_node

from hybridroute.node import loading
from hybridroute.node.loading import _probe_nan, allows_nan, load_version
from hybridroute.node.modelconfig import Batching
from hybridroute.node.packaging import package_model
from hybridroute.node.server import NodeServer
from hybridroute.protos import inference_pb2 as pb
from hybridroute.protos import inference_pb2_grpc as pb_grpc
from hybridroute.protos.tensors import encode_bytes_elements

IRIS_X, IRIS_Y = load_iris(return_X_y=True)
GOOD = [5.1, 3.5, 1.4, 0.2]
# A batch fires at 3 rows and otherwise waits a minute: the 3 good requests of a test
# are computed together at once, and a bad one that got queued would be noticed.
THREE_ROWS = {"max_batch_size": 3, "max_queue_delay_ms": 60_000}


def _columns(transformer: object) -> ColumnTransformer:
    return ColumnTransformer([("all", transformer, [0, 1, 2, 3])])


def _search(pipeline: object) -> GridSearchCV:
    return GridSearchCV(pipeline, {"logisticregression__C": [1.0]}, cv=2)


@pytest.fixture(scope="module")
def node(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeServer]:
    root = tmp_path_factory.mktemp("inputs")
    for name, estimator in [
        ("iris-lr", LogisticRegression(max_iter=500)),
        ("iris-imputed", make_pipeline(SimpleImputer(), LogisticRegression(max_iter=500))),
        # The tags of these say no NaN; the load probe finds that the first two take it.
        ("iris-ct", make_pipeline(_columns(SimpleImputer()), LogisticRegression(max_iter=500))),
        ("iris-search", _search(make_pipeline(SimpleImputer(), LogisticRegression(max_iter=500)))),
        ("iris-ct-scaled", make_pipeline(_columns(StandardScaler()), LogisticRegression())),
    ]:
        package_model(
            estimator.fit(IRIS_X, IRIS_Y),
            name=name,
            version=1,
            repo=root,
            input_name="input",
            input_datatype="FP64",
            features=["sl", "sw", "pl", "pw"],
            baseline_sample=IRIS_X[:50],
            batching=Batching(**THREE_ROWS),
        )
    target = root / "triage" / "1"
    shutil.copytree(model_repo / "ticket-triage" / "1", target)
    config = yaml.safe_load((target / "model.yaml").read_text())
    config["name"] = "triage"
    config["batching"] = THREE_ROWS
    (target / "model.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    with running_node(root, None, insecure=True, drift_window=0) as server:
        yield server


@pytest.fixture(scope="module")
def stub(node: NodeServer) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{node.port}") as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _rows(model: str, values: list[float]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP64", shape=[1, 4])
    request.raw_input_contents.append(np.asarray(values, dtype="<f8").tobytes())
    return request


def _texts(texts: list[bytes]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="triage")
    request.inputs.add(name="text", datatype="BYTES", shape=[len(texts)])
    request.raw_input_contents.append(encode_bytes_elements(texts))
    return request


def _estimator_calls(node: NodeServer, model: str) -> tuple[float, float]:
    """(estimator calls, rows computed) of `model` so far."""
    registry = node.metrics.registry
    labels = {"model": model, "version": "1"}
    calls = registry.get_sample_value("hybridroute_node_batch_size_count", labels) or 0.0
    rows = registry.get_sample_value("hybridroute_node_batch_size_sum", labels) or 0.0
    return calls, rows


def _one_bad_among_three_good(
    stub: pb_grpc.GRPCInferenceServiceStub, good: pb.ModelInferRequest, bad: pb.ModelInferRequest
) -> str:
    """Send them together; the good ones must be answered by one estimator call."""
    refused = stub.ModelInfer.future(bad, timeout=10)
    answered = [stub.ModelInfer.future(good, timeout=10) for _ in range(3)]
    with pytest.raises(grpc.RpcError) as info:
        refused.result()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert all(call.result().outputs[0].name == "label" for call in answered)
    return info.value.details()


def test_nan_for_a_model_that_refuses_it_is_invalid_argument_and_fails_no_batch(
    node: NodeServer, stub, caplog: pytest.LogCaptureFixture
) -> None:
    before = _estimator_calls(node, "iris-lr")
    message = _one_bad_among_three_good(
        stub, _rows("iris-lr", GOOD), _rows("iris-lr", [5.1, 3.5, np.nan, 0.2])
    )
    assert message == (
        "tensor 'input': element [0, 2] is NaN; "
        "model 'iris-lr' does not take missing values (its estimator refuses NaN)"
    )
    calls, rows = _estimator_calls(node, "iris-lr")
    assert (calls - before[0], rows - before[1]) == (1, 3)  # one call, the good rows only
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_nan_reaches_a_pipeline_whose_imputer_fills_it_in(stub) -> None:
    missing = [_rows("iris-imputed", [5.1, 3.5, np.nan, 0.2]) for _ in range(3)]
    calls = [stub.ModelInfer.future(request, timeout=10) for request in missing]
    assert all(call.result().outputs[0].name == "label" for call in calls)


def test_text_that_is_not_utf8_is_refused_before_it_joins_a_batch(node: NodeServer, stub) -> None:
    before = _estimator_calls(node, "triage")
    message = _one_bad_among_three_good(
        stub, _texts([b"my invoice was charged twice"]), _texts([b"\xff\xfe broken"])
    )
    assert message == "input 'text' element 0 is not valid UTF-8 text"
    calls, rows = _estimator_calls(node, "triage")
    assert (calls - before[0], rows - before[1]) == (1, 3)


@pytest.mark.parametrize(
    ("estimator", "expected"),
    [
        (LogisticRegression(), False),
        (HistGradientBoostingClassifier(), True),
        (make_pipeline(StandardScaler(), LogisticRegression()), False),
        (make_pipeline(SimpleImputer(), LogisticRegression()), True),
        (make_pipeline(StandardScaler(), HistGradientBoostingClassifier()), True),
        (make_pipeline(SimpleImputer(missing_values=-1), LogisticRegression()), False),
        (object(), False),  # no scikit-learn tags: not known to take NaN
    ],
    ids=["linear", "hgb", "scaler-linear", "imputer-linear", "scaler-hgb", "imputer-1", "none"],
)
def test_whether_an_estimator_takes_nan(estimator: object, expected: bool) -> None:
    assert allows_nan(estimator) is expected


@pytest.mark.parametrize("model", ["iris-ct", "iris-search"])
def test_nan_reaches_an_imputer_the_tags_cannot_see(stub, model: str) -> None:
    # A ColumnTransformer or a GridSearchCV tags itself as refusing NaN, though the
    # imputer inside fills it in; the load probe asked the estimator instead.
    missing = [_rows(model, [5.1, 3.5, np.nan, 0.2]) for _ in range(3)]
    calls = [stub.ModelInfer.future(request, timeout=10) for request in missing]
    assert all(call.result().outputs[0].name == "label" for call in calls)


def test_nan_for_a_model_the_probe_finds_refusing_it_is_invalid_argument(stub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(_rows("iris-ct-scaled", [5.1, np.nan, 1.4, 0.2]), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == (
        "tensor 'input': element [0, 1] is NaN; "
        "model 'iris-ct-scaled' does not take missing values (its estimator refuses NaN)"
    )


def _loaded(estimator: object, repo: Path, name: str = "m") -> loading.LoadedModel:
    path = package_model(
        estimator.fit(IRIS_X, IRIS_Y),  # type: ignore[attr-defined]
        name=name,
        version=1,
        repo=repo,
        input_name="input",
        input_datatype="FP64",
        features=["sl", "sw", "pl", "pw"],
        baseline_sample=IRIS_X[:50],
    )
    return load_version(path)


def _lr() -> LogisticRegression:
    return LogisticRegression(max_iter=500)


@pytest.mark.parametrize(
    ("estimator", "expected"),
    [
        (make_pipeline(_columns(SimpleImputer()), _lr()), True),
        (_search(make_pipeline(SimpleImputer(), _lr())), True),
        (make_pipeline(make_union(SimpleImputer(), SimpleImputer(strategy="median")), _lr()), True),
        (CalibratedClassifierCV(make_pipeline(SimpleImputer(), _lr()), cv=2), True),
        (make_pipeline(FunctionTransformer(), SimpleImputer(), _lr()), True),
        (make_pipeline(FunctionTransformer(), _lr()), False),
        (make_pipeline(_columns(StandardScaler()), _lr()), False),
        (_search(make_pipeline(StandardScaler(), _lr())), False),
    ],
    ids=[
        "columns-imputer",
        "search-imputer",
        "union-imputers",
        "calibrated-imputer",
        "function-imputer",
        "function-linear",
        "columns-scaler",
        "search-scaler",
    ],
)
def test_a_loaded_model_takes_nan_when_its_estimator_does(
    estimator: object, expected: bool, tmp_path: Path
) -> None:
    assert allows_nan(estimator) is False  # the tags alone would refuse NaN
    model = _loaded(estimator, tmp_path)
    assert model.allows_nan is expected
    missing = np.array([[5.1, np.nan, np.nan, 0.2]])
    if expected:
        assert model.run(missing)["label"].shape == (1,)
    else:
        with pytest.raises(loading.ModelRuntimeError):
            model.run(missing)


def test_the_probe_runs_only_when_the_tags_say_no(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probed: list[str] = []

    def probe(model: loading.LoadedModel) -> bool:
        probed.append(model.name)
        return False

    monkeypatch.setattr(loading, "_probe_nan", probe)
    hgb = _loaded(HistGradientBoostingClassifier(max_iter=5), tmp_path, "hgb")
    lr = _loaded(_lr(), tmp_path, "lr")
    probed.clear()  # packaging loaded each once, too
    assert load_version(hgb.path).allows_nan
    assert not load_version(lr.path).allows_nan
    assert probed == ["lr"]


class _Exploding:
    """predict fails on NaN with a message quoting its input, as estimators' errors do."""

    def __init__(self, inner: object, error: type[BaseException]) -> None:
        self.inner = inner
        self.error = error

    def predict(self, x: np.ndarray) -> np.ndarray:
        if np.isnan(x).any():
            raise self.error(f"cannot take {x.tolist()}")
        return self.inner.predict(x)  # type: ignore[attr-defined]


@pytest.mark.parametrize("error", [ValueError, MemoryError, RecursionError, KeyError])
def test_a_failing_probe_refuses_nan_and_logs_no_values(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, error: type[BaseException]
) -> None:
    model = _loaded(_lr(), tmp_path)
    model.estimator = _Exploding(model.estimator, error)
    with caplog.at_level("DEBUG", logger="hybridroute.node.loading"):
        assert _probe_nan(model) is False
    assert error.__name__ in caplog.text  # the estimator's error, by type only
    assert "cannot take" not in caplog.text


def test_no_probe_for_inputs_that_cannot_hold_nan(model_repo: Path) -> None:
    triage = load_version(model_repo / "ticket-triage" / "1")  # BYTES input
    assert triage.allows_nan is False and _probe_nan(triage) is False
