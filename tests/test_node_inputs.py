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
from sklearn.datasets import load_iris
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from support import running_node

from hybridroute.node.loading import allows_nan
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


@pytest.fixture(scope="module")
def node(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeServer]:
    root = tmp_path_factory.mktemp("inputs")
    for name, estimator in [
        ("iris-lr", LogisticRegression(max_iter=500)),
        ("iris-imputed", make_pipeline(SimpleImputer(), LogisticRegression(max_iter=500))),
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
