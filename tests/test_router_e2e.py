"""The router end to end, as `hybridroute up` runs it: real processes, real mTLS.

Each test sends requests an application would send and checks where they went, from
the reply metadata and from the nodes' own request counters (a sensitive request must
never move the cloud node's counter).
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import Stack

from hybridroute.certs.credentials import channel_credentials
from hybridroute.protos import inference_pb2 as pb
from hybridroute.protos import inference_pb2_grpc as pb_grpc
from hybridroute.protos.tensors import encode_bytes_elements

CLEAN = "the app crashes when I open the settings page"


def ticket(text: str, model: str = "ticket-triage") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="text", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(encode_bytes_elements([text.encode()]))
    return request


def iris_row() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="iris")
    request.inputs.add(name="input", datatype="FP64", shape=[1, 4])
    request.raw_input_contents.append(np.array([[5.1, 3.5, 1.4, 0.2]]).tobytes())
    return request


def send(
    stack: Stack,
    request: pb.ModelInferRequest,
    *,
    app: str = "demo-app",
    label: str | None = None,
    session: str | None = None,
) -> tuple[str, dict[str, str]]:
    """(status code name, reply metadata) for one request through the router."""
    metadata = []
    if label:
        metadata.append(("x-data-classification", label))
    if session:
        metadata.append(("x-session-id", session))
    with stack.channel(app) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            _, call = stub.ModelInfer.with_call(request, metadata=metadata, timeout=10)
        except grpc.RpcError as exc:
            return exc.code().name, dict(exc.trailing_metadata() or ())
    return "OK", dict(call.trailing_metadata())


def node_requests(stack: Stack, name: str) -> float:
    """The node's own count of ModelInfer requests it has answered (any code)."""
    text = urllib.request.urlopen(stack.node(name)["metrics"], timeout=5).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("hybridroute_node_requests_total{")
    )


SENSITIVE = [
    pytest.param(dict(request=ticket(CLEAN), label="confidential"), id="label-confidential"),
    pytest.param(dict(request=ticket(CLEAN), label="internal"), id="label-internal"),
    pytest.param(
        dict(request=ticket("please update my SSN 321-54-9876"), label="public"),
        id="ssn-in-public-text",
    ),
    pytest.param(
        dict(request=ticket("refund to card 4111 1111 1111 1111"), label="public"),
        id="card-in-public-text",
    ),
    pytest.param(
        dict(request=ticket("mail me at jane.doe@example.com"), label="public"),
        id="email-in-public-text",
    ),
    pytest.param(dict(request=ticket(CLEAN), label=None), id="no-label"),
    pytest.param(
        dict(request=ticket(CLEAN), label="public", app="batch-jobs"), id="sensitive-caller"
    ),
]


@pytest.mark.parametrize("case", SENSITIVE)
def test_sensitive_requests_go_on_prem_and_never_touch_the_cloud(stack: Stack, case) -> None:
    before = node_requests(stack, "cloud-1")
    code, reply = send(stack, **case)
    assert code == "OK"
    assert reply["x-hybridroute-zone"] == "onprem"
    assert reply["x-hybridroute-route"] == "onprem"
    assert len(reply["x-hybridroute-request-id"]) == 32
    assert node_requests(stack, "cloud-1") == before


def test_a_sensitive_model_is_decided_on_prem_even_when_no_node_has_it(stack: Stack) -> None:
    before = node_requests(stack, "cloud-1")
    code, reply = send(stack, ticket(CLEAN, model="hr-salaries"), label="public")
    assert code == "NOT_FOUND"  # the on-prem node answered: it has no such model
    assert reply["x-hybridroute-zone"] == "onprem"
    assert node_requests(stack, "cloud-1") == before


def test_public_clean_requests_go_to_the_cloud(stack: Stack) -> None:
    before = node_requests(stack, "cloud-1")
    for request in (ticket(CLEAN), iris_row()):
        code, reply = send(stack, request, label="public")
        assert (code, reply["x-hybridroute-zone"]) == ("OK", "cloud")
        assert reply["x-hybridroute-route"] == "cloud"
    assert node_requests(stack, "cloud-1") == before + 2


def test_a_session_that_carried_personal_data_stays_on_prem(stack: Stack) -> None:
    session = "session-e2e-pin"
    assert (
        send(stack, ticket(CLEAN), label="public", session=session)[1]["x-hybridroute-zone"]
        == "cloud"
    )
    assert (
        send(stack, ticket("my ssn is 321-54-9876"), label="public", session=session)[1][
            "x-hybridroute-zone"
        ]
        == "onprem"
    )
    code, reply = send(stack, ticket(CLEAN), label="public", session=session)
    assert (code, reply["x-hybridroute-zone"]) == ("OK", "onprem")


def test_an_unknown_caller_is_denied_naming_the_rule_not_the_data(stack: Stack) -> None:
    code, reply = send(stack, ticket("ssn 321-54-9876"), app="admin", label="public")
    assert code == "PERMISSION_DENIED"
    assert reply["x-hybridroute-request-id"]
    with stack.channel("admin") as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(ticket("ssn 321-54-9876"), timeout=10)
    assert "deny-unknown-callers" in info.value.details()
    assert "321-54" not in info.value.details()


def test_a_caller_without_credentials_is_refused(stack: Stack) -> None:
    creds = channel_credentials(Path(stack.info["router"]["ca"]))  # TLS, no client cert
    with (
        grpc.secure_channel(stack.router_address, creds) as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(ticket(CLEAN), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails


def test_malformed_request_bytes_are_invalid_argument_with_metadata(stack: Stack) -> None:
    with stack.channel() as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as info:
            call(b"\xff\xff\xff not protobuf", timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(info.value.trailing_metadata())["x-hybridroute-request-id"]


def test_metadata_calls_are_routed_and_work_with_tritonclient(stack: Stack) -> None:
    import tritonclient.grpc as triton

    app = stack.info["apps"]["demo-app"]
    client = triton.InferenceServerClient(
        stack.router_address,
        ssl=True,
        root_certificates=stack.info["router"]["ca"],
        private_key=app["key"],
        certificate_chain=app["cert"],
    )
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.get_server_metadata().name == "hybridroute-router"
        assert client.is_model_ready("iris", headers={"x-data-classification": "public"})
        meta = client.get_model_metadata("ticket-triage")
        assert meta.inputs[0].datatype == "BYTES"
        x = triton.InferInput("input", [1, 4], "FP64")
        x.set_data_from_numpy(np.array([[6.7, 3.0, 5.2, 2.3]]))
        result = client.infer("iris", [x], headers={"x-data-classification": "public"})
        assert result.as_numpy("label").tolist() == [2]
        # A clean public text as tritonclient encodes it, with the protocol's own
        # parameters (a random 63-bit sequence id, priority, a request id), is read
        # whole by the router and goes to the cloud.
        text = triton.InferInput("text", [1], "BYTES")
        text.set_data_from_numpy(np.array([CLEAN.encode()], dtype=object))
        before = node_requests(stack, "cloud-1")
        client.infer(
            "ticket-triage",
            [text],
            headers={"x-data-classification": "public"},
            request_id="order-17",
            sequence_id=4111111111111111,  # passes the card check, as 1 id in 10 does
            priority=1,
        )
        assert node_requests(stack, "cloud-1") == before + 1
    finally:
        client.close()


# KServe's SDK in a process of its own: its generated stubs and tritonclient's both
# define the `inference` protobuf package, and one process cannot import the two.
_KSERVE_CLIENT = """
import asyncio, json, sys
import grpc, numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest

address, ca, cert, key = sys.argv[1:]
public = [("x-data-classification", "public")]

async def main():
    read = lambda path: open(path, "rb").read()
    creds = grpc.ssl_channel_credentials(read(ca), read(key), read(cert))
    client = InferenceGRPCClient(address, creds=creds, timeout=10)
    row = InferInput("input", [1, 4], "FP64", data=np.array([[6.7, 3.0, 5.2, 2.3]]))
    iris = await client.infer(InferRequest("iris", [row]), headers=public)
    print(json.dumps({
        "live": await client.is_server_live(),
        "ready": await client.is_server_ready(),
        "model_ready": await client.is_model_ready("iris", headers=public),
        "label": iris.get_output_by_name("label").as_numpy().tolist(),
    }), flush=True)
    for line in sys.stdin:  # one ticket text per line, answered "done"
        text = InferInput("text", [1], "BYTES", data=[line.rstrip("\\n")])
        await client.infer(InferRequest("ticket-triage", [text], request_id="k1"), headers=public)
        print("done", flush=True)
    await client.close()

asyncio.run(main())
"""


def test_the_kserve_sdk_grpc_client_works_through_the_router(stack: Stack) -> None:
    """KServe's own Python SDK (its asyncio V2 gRPC client and its own stubs) talks to
    the router over mutual TLS, and what it sends is classified like anything else: a
    clean public text goes to the cloud, personal data stays on-prem."""
    app = stack.info["apps"]["demo-app"]
    args = [stack.router_address, stack.info["router"]["ca"], app["cert"], app["key"]]
    with subprocess.Popen(
        [sys.executable, "-c", _KSERVE_CLIENT, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as client:
        assert client.stdin is not None and client.stdout is not None
        first = json.loads(client.stdout.readline() or "{}")
        assert first == {"live": True, "ready": True, "model_ready": True, "label": [2]}
        cloud = [node_requests(stack, "cloud-1")]
        for text in (CLEAN, "please call me back on jane.doe@example.com"):
            client.stdin.write(text + "\n")
            client.stdin.flush()
            assert client.stdout.readline() == "done\n"
            cloud.append(node_requests(stack, "cloud-1"))
        client.stdin.close()
        assert client.wait(timeout=30) == 0
    assert cloud[1] == cloud[0] + 1  # the clean text went to the cloud
    assert cloud[2] == cloud[1]  # the email did not


def test_router_metrics_count_requests_by_route_zone_and_code(stack: Stack) -> None:
    send(stack, ticket(CLEAN), label="public")
    text = urllib.request.urlopen(stack.info["router"]["metrics"], timeout=5).read().decode()
    assert (
        'hybridroute_router_requests_total{code="OK",decision="routed",model="ticket-triage",'
        'pool="cloud",route="cloud",zone="cloud"}'
    ) in text
    assert "hybridroute_router_request_duration_seconds_bucket" in text
    assert "hybridroute_router_endpoint_healthy{endpoint=" in text


def _sums(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.endswith(("_sum", "_count"))
    }


def test_router_metrics_split_a_requests_time_into_upstream_and_audit_wait(
    stack: Stack,
) -> None:
    """An operator asking "is it the model, the trail or the router?" reads it off
    /metrics: each request's duration holds its upstream call and its audit wait."""
    url = stack.info["router"]["metrics"]
    duration = ("hybridroute_router_request_duration_seconds", (("route", "cloud"),))
    upstream = ("hybridroute_router_upstream_duration_seconds", (("pool", "cloud"),))
    wait = ("hybridroute_router_audit_wait_seconds", ())
    before = _sums(url)
    for _ in range(5):
        send(stack, ticket(CLEAN), label="public")
    after = _sums(url)

    def delta(name: tuple[str, tuple[tuple[str, str], ...]], part: str) -> float:
        key = (f"{name[0]}_{part}", name[1])
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert [delta(m, "count") for m in (duration, upstream, wait)] == [5, 5, 5]
    assert delta(upstream, "sum") > 0 and delta(wait, "sum") > 0
    # one after the other inside each request's time, with the router's own work besides
    assert delta(duration, "sum") > delta(upstream, "sum") + delta(wait, "sum")
