"""The on-prem node end to end: real gRPC server, real mutual TLS, real clients.

tritonclient (a client nobody here wrote) proves wire compatibility; our own stubs
cover typed inputs and the error paths.
"""

from __future__ import annotations

import shutil
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import mtls_channel, running_node

from hybridroute.certs.credentials import channel_credentials
from hybridroute.certs.pki import init_pki
from hybridroute.node.dataplane import BatchingDefaults
from hybridroute.node.repository import ModelRepository
from hybridroute.node.server import NodeServer
from hybridroute.protos import inference_pb2 as pb
from hybridroute.protos import inference_pb2_grpc as pb_grpc
from hybridroute.protos.tensors import TensorError, decode_inputs, encode_bytes_elements


@pytest.fixture(scope="module")
def repo(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample models plus one whose file is corrupt."""
    root = tmp_path_factory.mktemp("node-repo")
    shutil.copytree(model_repo, root, dirs_exist_ok=True)
    broken = root / "broken" / "1"
    shutil.copytree(model_repo / "iris" / "1", broken)
    (broken / "model.yaml").write_text(
        (broken / "model.yaml").read_text().replace("name: iris", "name: broken")
    )
    (broken / "model.skops").write_bytes(b"this is not a zip file")
    return root


@pytest.fixture(scope="module")
def node(repo: Path, pki: Path) -> Iterator[NodeServer]:
    with running_node(
        repo, pki, metrics_listen="127.0.0.1:0", max_message_bytes=1024 * 1024
    ) as server:
        yield server


@pytest.fixture(scope="module")
def address(node: NodeServer) -> str:
    return f"localhost:{node.port}"


@pytest.fixture(scope="module")
def stub(address: str, pki: Path) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    channel = mtls_channel(address, pki)
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def client(address: str, pki: Path) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(
        address,
        ssl=True,
        root_certificates=str(pki / "ca.pem"),
        private_key=str(pki / "app-demo-app.key"),
        certificate_chain=str(pki / "app-demo-app.pem"),
    )
    yield c
    c.close()


@pytest.fixture(scope="module")
def iris(model_repo: Path):
    return ModelRepository.load(model_repo).get("iris").estimator


ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]])


# --------------------------------------------------------------- tritonclient, mTLS


def test_tritonclient_reads_server_and_model_metadata(client) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("iris") and not client.is_model_ready("broken")
    meta = client.get_server_metadata()
    assert meta.name == "hybridroute-node" and "model_repository" in meta.extensions
    model = client.get_model_metadata("iris")
    assert model.versions == ["1"] and model.platform == "sklearn"
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [
        ("input", "FP64", [-1, 4])
    ]
    assert {t.name for t in model.outputs} == {"label", "probabilities"}


def test_tritonclient_infers_iris_raw_with_requested_outputs(client, iris) -> None:
    tensor = triton.InferInput("input", list(ROWS.shape), "FP64")
    tensor.set_data_from_numpy(ROWS)
    result = client.infer(
        "iris",
        [tensor],
        model_version="1",
        request_id="r-1",
        outputs=[
            triton.InferRequestedOutput("label"),
            triton.InferRequestedOutput("probabilities"),
        ],
    )
    np.testing.assert_array_equal(result.as_numpy("label"), iris.predict(ROWS))
    np.testing.assert_allclose(result.as_numpy("probabilities"), iris.predict_proba(ROWS))
    response = result.get_response()
    assert response.model_version == "1" and response.id == "r-1"


def test_tritonclient_default_outputs_only(client, iris) -> None:
    tensor = triton.InferInput("input", [1, 4], "FP64")
    tensor.set_data_from_numpy(ROWS[:1])
    result = client.infer("iris", [tensor])
    assert result.as_numpy("probabilities") is None
    np.testing.assert_array_equal(result.as_numpy("label"), iris.predict(ROWS[:1]))


def test_tritonclient_classifies_ticket_texts(client, model_repo: Path) -> None:
    texts = np.array(
        [b"I was charged twice on my invoice", b"the app crashes on login"], dtype=object
    )
    tensor = triton.InferInput("text", [2], "BYTES")
    tensor.set_data_from_numpy(texts)
    labels = client.infer("ticket-triage", [tensor]).as_numpy("label")
    model = ModelRepository.load(model_repo).get("ticket-triage").estimator
    expected = model.predict([t.decode() for t in texts])
    assert [x.decode() for x in labels] == list(expected)


def test_typed_inputs_get_typed_answers(stub, iris) -> None:
    request = pb.ModelInferRequest(model_name="iris")
    tensor = request.inputs.add(name="input", datatype="FP64", shape=list(ROWS.shape))
    tensor.contents.fp64_contents.extend(ROWS.reshape(-1).tolist())
    response = stub.ModelInfer(request, timeout=10)
    assert not response.raw_output_contents
    assert list(response.outputs[0].contents.int64_contents) == list(iris.predict(ROWS))


# --------------------------------------------------------------------- rejections


def test_a_client_without_certificate_is_refused(address: str, pki: Path) -> None:
    creds = channel_credentials(pki / "ca.pem")  # TLS, but no client certificate
    with grpc.secure_channel(address, creds) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_certificate_from_another_ca_is_refused(address: str, pki: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-pki"
    init_pki(other, apps=["demo-app"])
    creds = channel_credentials(
        pki / "ca.pem", other / "app-demo-app.pem", other / "app-demo-app.key"
    )
    with grpc.secure_channel(address, creds) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_an_identity_not_on_the_allow_list_is_permission_denied(address: str, pki: Path) -> None:
    with (
        mtls_channel(address, pki, app="other-app") as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "other-app" in info.value.details()


# ----------------------------------------------------------------------- batching


def test_64_concurrent_callers_each_get_their_own_answers(stub, iris, node) -> None:
    rng = np.random.default_rng(7)
    rows = [rng.uniform([4, 2, 1, 0.1], [8, 4.5, 7, 2.5], size=(1 + i % 3, 4)) for i in range(64)]
    before = _batch_count(node)

    def call(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        request = pb.ModelInferRequest(model_name="iris")
        request.inputs.add(name="input", datatype="FP64", shape=list(x.shape))
        request.outputs.add(name="label")
        request.outputs.add(name="probabilities")
        request.raw_input_contents.append(x.tobytes())
        response = stub.ModelInfer(request, timeout=30)
        labels = np.frombuffer(response.raw_output_contents[0], dtype="<i8")
        proba = np.frombuffer(response.raw_output_contents[1], dtype="<f8").reshape(-1, 3)
        return labels, proba

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(call, rows))
    for x, (labels, proba) in zip(rows, results, strict=True):
        np.testing.assert_array_equal(labels, iris.predict(x))
        np.testing.assert_array_equal(proba, iris.predict_proba(x))
    calls = _batch_count(node) - before
    assert calls < 64, f"64 requests took {calls} estimator calls: nothing was batched"


def _batch_count(node: NodeServer) -> float:
    value = node.metrics.registry.get_sample_value(
        "hybridroute_node_batch_size_count", {"model": "iris", "version": "1"}
    )
    return value or 0.0


# -------------------------------------------------------------------- bad requests


def _iris_request(x: np.ndarray | None = None, **overrides) -> pb.ModelInferRequest:
    x = ROWS[:1] if x is None else x
    request = pb.ModelInferRequest(
        model_name=overrides.pop("model", "iris"), model_version=overrides.pop("version", "")
    )
    request.inputs.add(
        name=overrides.pop("name", "input"),
        datatype=overrides.pop("datatype", "FP64"),
        shape=overrides.pop("shape", list(x.shape)),
    )
    request.raw_input_contents.append(overrides.pop("raw", x.tobytes()))
    for name in overrides.pop("outputs", []):
        request.outputs.add(name=name)
    assert not overrides
    return request


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (_iris_request(model="nope"), "NOT_FOUND", "unknown model 'nope'"),
        (_iris_request(version="9"), "NOT_FOUND", "available versions: 1"),
        (
            _iris_request(name="features"),
            "INVALID_ARGUMENT",
            "takes one input 'input' (FP64 [-1, 4]), got 'features'",
        ),
        (
            _iris_request(datatype="FP32", raw=b"\0" * 16),
            "INVALID_ARGUMENT",
            "tensor 'input': datatype FP32, expected FP64",
        ),
        (
            _iris_request(np.zeros((1, 3))),
            "INVALID_ARGUMENT",
            "tensor 'input': shape [1, 3] does not match the model's [-1, 4]",
        ),
        (
            _iris_request(raw=b"\0" * 31),
            "INVALID_ARGUMENT",
            "tensor 'input': raw data is 31 bytes, expected 32",
        ),
        (_iris_request(outputs=["score"]), "INVALID_ARGUMENT", "no output 'score'"),
        (_iris_request(model="broken"), "UNAVAILABLE", "broken"),
    ],
    ids=[
        "unknown-model",
        "unknown-version",
        "tensor-name",
        "datatype",
        "shape",
        "raw-length",
        "output-name",
        "not-ready",
    ],
)
def test_bad_requests_get_the_right_status_and_say_what_was_wrong(
    stub, request_, code: str, message: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request_, timeout=10)
    assert info.value.code().name == code
    assert message in info.value.details()


def test_malformed_bytes_elements_are_invalid_argument(stub) -> None:
    request = pb.ModelInferRequest(model_name="ticket-triage")
    request.inputs.add(name="text", datatype="BYTES", shape=[2])
    request.raw_input_contents.append(encode_bytes_elements([b"hello"]) + b"\x09\0\0\0ab")
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tensor 'text': malformed BYTES data: element 1 declares 9 bytes" in (
        info.value.details()
    )


def test_invalid_utf8_text_is_invalid_argument_without_echoing_it(stub) -> None:
    request = pb.ModelInferRequest(model_name="ticket-triage")
    request.inputs.add(name="text", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(encode_bytes_elements([b"secret \xff\xfe"]))
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "secret" not in info.value.details()


def test_oversized_message_is_resource_exhausted(stub) -> None:
    big = np.zeros((40_000, 4))  # 1.28 MB > the node's 1 MiB limit
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(_iris_request(big), timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # on purpose
def test_estimator_failure_is_internal_names_the_model_and_node_keeps_serving(stub) -> None:
    poisoned = np.array([[1e300, 1.0, 1.0, 1.0]])  # overflows float32 inside the trees
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(_iris_request(poisoned), timeout=10)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "iris" in info.value.details()
    assert stub.ModelInfer(_iris_request(), timeout=10).outputs[0].name == "label"


# ------------------------------------------------------------ repository, health


def test_a_broken_model_is_unavailable_with_its_reason_and_others_serve(stub) -> None:
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=5)
    states = {(m.name, m.version): (m.state, m.reason) for m in index.models}
    assert states[("iris", "1")][0] == "READY"
    assert states[("ticket-triage", "1")][0] == "READY"
    state, reason = states[("broken", "1")]
    assert state == "UNAVAILABLE" and "model.skops" in reason
    ready_only = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=5)
    assert "broken" not in {m.name for m in ready_only.models}


def test_health_per_node_and_per_model(address: str, pki: Path) -> None:
    with mtls_channel(address, pki) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def status(service: str) -> int:
            request = health_pb2.HealthCheckRequest(service=service)
            return health.Check(request, timeout=5).status

        serving = health_pb2.HealthCheckResponse.SERVING
        assert status("") == serving
        assert status("iris") == serving and status("ticket-triage") == serving
        assert status("broken") == health_pb2.HealthCheckResponse.NOT_SERVING


def test_metrics_count_requests_by_model_version_and_code(node: NodeServer, stub) -> None:
    stub.ModelInfer(_iris_request(), timeout=10)
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(_iris_request(np.zeros((1, 3))), timeout=10)
    url = f"http://127.0.0.1:{node.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    assert 'hybridroute_node_requests_total{code="OK",model="iris",version="1"}' in text
    # A refused request is counted under the version it resolved to.
    assert (
        'hybridroute_node_requests_total{code="INVALID_ARGUMENT",model="iris",version="1"}' in text
    )
    for name in (
        "hybridroute_node_request_duration_seconds_bucket",
        "hybridroute_node_batch_size_bucket",
        "hybridroute_node_queue_depth",
    ):
        assert name in text


def test_batching_can_be_switched_off(repo: Path, pki: Path, iris) -> None:
    unbatched = BatchingDefaults(enabled=False)
    with running_node(repo, None, insecure=True, batching=unbatched) as server:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda _: stub.ModelInfer(_iris_request(), timeout=10), range(32)))
        sizes = server.metrics.registry.get_sample_value(
            "hybridroute_node_batch_size_sum", {"model": "iris", "version": "1"}
        )
        count = server.metrics.registry.get_sample_value(
            "hybridroute_node_batch_size_count", {"model": "iris", "version": "1"}
        )
        assert sizes == count == 32


# ------------------------------------------------------------ limits and labels


def _refused(stub, request: pb.ModelInferRequest, code: str = "INVALID_ARGUMENT") -> str:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=10)
    assert info.value.code().name == code, info.value.details()
    return info.value.details()


def _typed_iris(values: list[float], shape: list[int], model: str = "iris") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="input", datatype="FP64", shape=shape)
    tensor.contents.fp64_contents.extend(values)
    return request


def test_more_rows_than_max_batch_size_are_refused_before_decoding(stub, iris) -> None:
    rows = np.tile(ROWS[:1], (33, 1))  # iris: max_batch_size 32
    message = _refused(stub, _iris_request(rows))
    assert "tensor 'input'" in message and "33 rows" in message and "at most 32" in message
    # Refused from the shape alone: undecodable data would otherwise be the complaint.
    assert _refused(stub, _iris_request(rows, raw=b"")) == message
    texts = pb.ModelInferRequest(model_name="ticket-triage")  # max_batch_size 64
    texts.inputs.add(name="text", datatype="BYTES", shape=[65])
    texts.raw_input_contents.append(b"\0\0\0\0" * 100_000)  # 100k empty texts
    message = _refused(stub, texts)
    assert "tensor 'text'" in message and "65 rows" in message and "at most 64" in message
    labels = stub.ModelInfer(_iris_request(rows[:32]), timeout=10).raw_output_contents[0]
    np.testing.assert_array_equal(np.frombuffer(labels, "<i8"), iris.predict(rows[:32]))


def test_a_raw_bytes_buffer_with_more_texts_than_its_shape_is_refused(stub) -> None:
    request = pb.ModelInferRequest(model_name="ticket-triage")
    request.inputs.add(name="text", datatype="BYTES", shape=[2])
    request.raw_input_contents.append(encode_bytes_elements([b"a"] * 3) + b"\xff")
    assert "tensor 'text': shape needs 2 BYTES elements, raw data holds more" in _refused(
        stub, request
    )


def test_infinite_values_are_invalid_argument_naming_the_element(stub, iris) -> None:
    x = ROWS[:2].copy()
    x[1, 2] = np.inf
    message = _refused(stub, _iris_request(x))
    assert message == "tensor 'input': values must be finite; element [1, 2] is infinite"
    overflowing = _typed_iris([1e308 * 10, 1.0, 1.0, 1.0], [1, 4])  # parses as inf
    assert "values must be finite; element [0, 0]" in _refused(stub, overflowing)
    missing = _typed_iris([np.nan, 3.0, 1.4, 0.2], [1, 4])  # NaN: a missing value, passed on
    assert stub.ModelInfer(missing, timeout=10).outputs[0].name == "label"


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ([1] * 65 + [4], "tensor 'input': shape [1, 1, 1, 1, ... (66 dimensions)] does not"),
        ([2**62, 4, 0], "tensor 'input': shape [4611686018427387904, 4, 0] does not match"),
        ([0, 4], "tensor 'input': shape [0, 4] has no rows; send 1 to 32"),
        ([1, -4], "tensor 'input': shape [1, -4] has a negative dimension"),
    ],
    ids=["66-dimensions", "huge-times-zero", "zero-rows", "negative"],
)
def test_impossible_shapes_are_invalid_argument(stub, shape: list[int], message: str) -> None:
    assert message in _refused(stub, _typed_iris([], shape))


def test_over_long_versions_are_not_found_in_a_short_message(stub) -> None:
    version = "9" * 5000  # more digits than Python's int() converts
    message = _refused(stub, _iris_request(version=version), "NOT_FOUND")
    assert "(5000 characters) (available versions: 1)" in message and len(message) < 200
    ready = stub.ModelReady(pb.ModelReadyRequest(name="iris", version=version), timeout=5)
    assert ready.ready is False
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelMetadata(pb.ModelMetadataRequest(name="iris", version=version), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"name": "x" * 20_000},
            "got 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'... (20000 characters)",
        ),
        (
            {"outputs": ["o" * 20_000]},
            "has no output 'oooooooooooooooooooooooooooooooooooooooo'...",
        ),
        ({"outputs": [f"o{i}" for i in range(5000)]}, "'o7', ... (5000 unknown outputs)"),
        ({"datatype": "D" * 20_000}, "datatype 'DDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDD'..."),
    ],
    ids=["input-name", "output-name", "many-outputs", "datatype"],
)
def test_over_long_names_are_invalid_argument_in_a_short_message(
    stub, overrides: dict[str, object], message: str
) -> None:
    """A status message over gRPC's 16 KiB metadata limit reaches the client as
    RESOURCE_EXHAUSTED, hiding what was wrong: names from the request are cut short."""
    details = _refused(stub, _iris_request(**overrides))
    assert message in details and len(details) < 300, details[:300]


def test_an_unknown_datatype_is_cut_short_when_decoding() -> None:
    request = pb.ModelInferRequest(model_name="iris")
    request.inputs.add(name="n" * 50_000, datatype="D" * 50_000, shape=[1])
    with pytest.raises(TensorError) as info:
        decode_inputs(request)
    assert str(info.value) == (
        f"tensor {'n' * 40!r}... (50000 characters): "
        f"unknown datatype {'D' * 40!r}... (50000 characters)"
    )


def test_metric_labels_are_only_known_models_and_versions(node: NodeServer, stub) -> None:
    for i in range(20):
        _refused(stub, _iris_request(version=f"v{i}-" + "x" * 1000), "NOT_FOUND")
        _refused(stub, _iris_request(model=f"nope-{i}", version=str(i)), "NOT_FOUND")
    _refused(stub, _iris_request(version="7"), "NOT_FOUND")
    assert stub.ModelInfer(_iris_request(version="01"), timeout=10).model_version == "1"
    labels = {
        (sample.labels["model"], sample.labels["version"])
        for metric in node.metrics.requests.collect()
        for sample in metric.samples
    }
    assert {("iris", "_unknown"), ("_unknown", "_unknown"), ("iris", "1")} <= labels
    assert {model for model, _ in labels} <= {"iris", "ticket-triage", "broken", "_unknown"}
    assert {version for _, version in labels} <= {"", "1", "_unknown"}


# ------------------------------------------------------- models declared otherwise


def _variant(root: Path, source: Path, name: str, edit) -> None:
    """iris/1 of `source` copied as model `name`, its model.yaml changed by `edit`."""
    target = root / name / "1"
    shutil.copytree(source / "iris" / "1", target)
    config = yaml.safe_load((target / "model.yaml").read_text())
    config["name"] = name
    edit(config)
    (target / "model.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


@pytest.fixture(scope="module")
def variant_node(
    model_repo: Path, pki: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NodeServer]:
    root = tmp_path_factory.mktemp("variants")
    _variant(root, model_repo, "iris-u8", lambda c: c["inputs"][0].update(datatype="UINT8"))
    _variant(root, model_repo, "iris16", lambda c: c["outputs"][1].update(datatype="FP16"))
    _variant(root, model_repo, "iris-slow", lambda c: c["batching"].update(max_queue_delay_ms=300))
    _variant(root, model_repo, "iris-wide", lambda c: c["batching"].update(max_batch_size=5000))
    patient = {"max_queue_delay_ms": 60_000}  # a lone request waits for company
    _variant(root, model_repo, "iris-patient", lambda c: c["batching"].update(patient))
    with running_node(root, pki, drift_window=0) as server:
        yield server


@pytest.fixture(scope="module")
def variant_stub(variant_node: NodeServer, pki: Path) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    channel = mtls_channel(f"localhost:{variant_node.port}", pki)
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def test_zero_rows_are_refused_even_when_they_would_share_a_batch(variant_stub) -> None:
    """iris-slow waits 300 ms for company, so both requests meet in the queue."""
    full = variant_stub.ModelInfer.future(_iris_request(model="iris-slow"), timeout=10)
    empty = variant_stub.ModelInfer.future(
        _iris_request(np.zeros((0, 4)), model="iris-slow"), timeout=10
    )
    with pytest.raises(grpc.RpcError) as info:
        empty.result()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tensor 'input': shape [0, 4] has no rows" in info.value.details()
    assert full.result().outputs[0].name == "label"


def test_typed_integers_outside_their_datatype_are_invalid_argument(variant_stub) -> None:
    request = pb.ModelInferRequest(model_name="iris-u8")
    tensor = request.inputs.add(name="input", datatype="UINT8", shape=[1, 4])
    tensor.contents.uint_contents.extend([5, 3, 300, 0])
    message = _refused(variant_stub, request)
    assert message == "tensor 'input': uint_contents element 2 is outside the UINT8 range 0..255"
    del tensor.contents.uint_contents[2]
    tensor.contents.uint_contents.insert(2, 255)
    assert variant_stub.ModelInfer(request, timeout=10).outputs[0].name == "label"


def test_a_model_with_an_fp16_output_answers_typed_requests_raw(variant_stub, iris) -> None:
    request = _typed_iris(ROWS.ravel().tolist(), list(ROWS.shape), model="iris16")
    request.outputs.add(name="label")
    request.outputs.add(name="probabilities")
    response = variant_stub.ModelInfer(request, timeout=10)
    assert [o.datatype for o in response.outputs] == ["INT64", "FP16"]
    assert not response.outputs[0].HasField("contents")  # all raw: never half typed
    labels = np.frombuffer(response.raw_output_contents[0], "<i8")
    proba = np.frombuffer(response.raw_output_contents[1], "<f2").reshape(-1, 3)
    np.testing.assert_array_equal(labels, iris.predict(ROWS))
    np.testing.assert_allclose(proba, iris.predict_proba(ROWS), atol=1e-3)


def test_large_requests_are_converted_off_the_event_loop(
    variant_stub, iris, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hybridroute.node import servicer

    threads: list[tuple[str, str]] = []

    def recorded(step: str, function):
        def call(*args, **kwargs):
            threads.append((step, threading.current_thread().name))
            return function(*args, **kwargs)

        return call

    monkeypatch.setattr(servicer, "decode_inputs", recorded("decode", servicer.decode_inputs))
    monkeypatch.setattr(servicer, "encode_output", recorded("encode", servicer.encode_output))
    rows = np.tile(ROWS, (400, 1))  # 1200 x 4 inputs, 1200 x (1 + 3) outputs
    response = variant_stub.ModelInfer(
        _iris_request(rows, model="iris-wide", outputs=["label", "probabilities"]), timeout=30
    )
    labels = np.frombuffer(response.raw_output_contents[0], "<i8")
    np.testing.assert_array_equal(labels, iris.predict(rows))
    assert {step for step, _ in threads} == {"decode", "encode"}
    assert all(name.startswith("estimator") for _, name in threads), threads
    threads.clear()
    variant_stub.ModelInfer(_iris_request(model="iris-wide"), timeout=10)  # one row: inline
    assert threads and not any(name.startswith("estimator") for _, name in threads), threads


def test_callers_that_time_out_or_cancel_are_counted_and_leave_the_queue(
    variant_node: NodeServer, variant_stub
) -> None:
    """iris-patient holds a lone request for a minute: every caller gives up first."""

    def sample(name: str, **labels: str) -> float:
        value = variant_node.metrics.registry.get_sample_value(name, labels)
        return value or 0.0

    def until(condition, what: str) -> None:
        deadline = time.monotonic() + 10
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.01)

    labels = {"model": "iris-patient", "version": "1"}
    timed_out = [
        variant_stub.ModelInfer.future(_iris_request(model="iris-patient"), timeout=0.3)
        for _ in range(3)
    ]
    for call in timed_out:
        with pytest.raises(grpc.RpcError) as info:
            call.result()
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    requests = "hybridroute_node_requests_total"
    until(lambda: sample(requests, **labels, code="DEADLINE_EXCEEDED") == 3, "3 counted")
    until(lambda: sample("hybridroute_node_queue_depth", **labels) == 0, "an empty queue")

    cancelled = [
        variant_stub.ModelInfer.future(_iris_request(model="iris-patient"), timeout=30)
        for _ in range(2)
    ]
    until(lambda: sample("hybridroute_node_queue_depth", **labels) == 2, "2 queued")
    for call in cancelled:
        call.cancel()
    until(lambda: sample(requests, **labels, code="CANCELLED") == 2, "2 counted")
    until(lambda: sample("hybridroute_node_queue_depth", **labels) == 0, "an empty queue")
    assert sample("hybridroute_node_in_flight_requests") == 0
    assert sample(requests, **labels, code="OK") == 0
    assert sample("hybridroute_node_batch_size_count", **labels) == 0  # nothing computed
