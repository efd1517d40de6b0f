"""The rest of the contract: streaming, ListModels/GetModel, health, reflection, /metrics, drain."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from attrserve.v1 import attribution_service_pb2 as pb
from attrserve_client import AsyncAttributionClient, AttributionClient
from attrserve_engine import AttributionJob, Unavailable
from conftest import start_server
from oracle import MODELS

X = np.array([[0.3, -0.2, 0.9], [1.0, 0.5, -0.4]], dtype=np.float32)


@pytest.mark.asyncio
async def test_stream_answers_every_request_by_id_and_errors_do_not_end_it(fusing_server) -> None:
    requests = []
    for i in range(12):
        model = "nope" if i == 5 else "toy"
        requests.append(
            AttributionClient.build_request(model, "integrated_gradients", X * (i + 1), target=i % 2, request_id=f"r{i}", params={"n_steps": 5 + i})
        )
    requests.append(AttributionClient.build_request("toy", "saliency", X, target=0))  # no id: gets its position
    async with AsyncAttributionClient(fusing_server.address) as client:
        responses = [r async for r in client.attribute_stream(requests)]
    by_id = {r.request_id: r for r in responses}
    assert set(by_id) == {f"r{i}" for i in range(12)} | {"12"}
    assert by_id["r5"].WhichOneof("result") == "error"
    assert by_id["r5"].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert "nope" in by_id["r5"].error.message
    async with AsyncAttributionClient(fusing_server.address) as client:
        for i in (0, 7, 11):
            alone = await client.attribute("toy", "integrated_gradients", X * (i + 1), target=i % 2, params={"n_steps": 5 + i})
            streamed = by_id[f"r{i}"].response
            got = np.frombuffer(streamed.attributions[0].data, dtype=np.float32).reshape(2, 3)
            np.testing.assert_allclose(got, alone.attributions, atol=1e-6)
    assert max(r.response.timing.pass_requests for r in responses if r.WhichOneof("result") == "response") > 1


def test_list_and_get_model(server) -> None:
    with AttributionClient(server.address) as client:
        models = client.list_models()
        info = client.get_model("conv")
        fragile = client.get_model("fragile")
        with pytest.raises(grpc.RpcError) as missing:
            client.get_model("nope")
    assert {m.config.name for m in models} == set(MODELS) | {"fragile", "slow"}
    assert info.ready
    assert {"conv1", "relu1", "pool", "conv2", "fc"} <= set(info.layers)
    assert pb.ALGORITHM_DEEP_LIFT in info.algorithms and pb.ALGORITHM_INTEGRATED_GRADIENTS in info.algorithms
    assert info.config.max_batch_rows > 0 and info.config.device == "cpu" and info.config.version == "1"
    # fragile has no DeepLift-hookable module, so DeepLift is not offered.
    assert pb.ALGORITHM_DEEP_LIFT not in fragile.algorithms
    assert [(s.name, list(s.dims)) for s in fragile.config.inputs] == [("x", [3])]
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_and_reflection(server) -> None:
    with grpc.insecure_channel(server.address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="attrserve.v1.AttributionService"))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(iter(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))))
        names = {s.name for s in reply.list_services_response.service}
    assert "attrserve.v1.AttributionService" in names and "grpc.health.v1.Health" in names


def test_metrics_count_requests_and_passes(server) -> None:
    with AttributionClient(server.address) as client:
        for _ in range(3):
            client.attribute("toy", "deep_lift", X, target=1)
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.running.metrics_port}/metrics", timeout=10).read().decode()

    def value(line_start: str) -> float:
        return float(next(line for line in text.splitlines() if line.startswith(line_start)).rsplit(" ", 1)[1])

    assert value('attrserve_attributions_completed_total{algorithm="deep_lift",grpc_code="OK",model="toy"}') >= 3
    assert value('attrserve_passes_executed_total{kind="deeplift",model="toy"}') >= 3
    assert value('grpc_server_handled_total{grpc_code="OK",grpc_method="Attribute",grpc_service="attrserve.v1.AttributionService",grpc_type="unary"}') >= 3
    # Label sets exist before any traffic, so dashboards show zeros.
    assert 'attrserve_attributions_completed_total{algorithm="gradient_shap",grpc_code="RESOURCE_EXHAUSTED",model="conv"} 0.0' in text


def test_drain_finishes_in_flight_requests_then_refuses() -> None:
    s = start_server()
    try:
        with AttributionClient(s.address) as client:
            pending = [client._stub.Attribute.future(AttributionClient.build_request("slow", "saliency", X[:1], target=0)) for _ in range(3)]
            deadline = time.monotonic() + 10
            while s.running.engine.in_flight() < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            stopping = asyncio.run_coroutine_threadsafe(s.running.stop(5.0), s.loop)
            results = [p.result(timeout=30) for p in pending]
            stopping.result(30)
        assert all(len(r.attributions) == 1 for r in results)
        with pytest.raises(Unavailable):  # the engine refuses new work once drained
            s.running.engine.submit(AttributionJob(model="toy", algorithm="saliency", inputs=(torch.zeros(1, 3),)))
    finally:
        s.loop.call_soon_threadsafe(s.loop.stop)
        s.thread.join(10)
