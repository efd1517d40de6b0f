"""The rest of the contract: streaming, ListModels/GetModel, health, reflection, /metrics, drain."""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.request

import grpc
import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients, Saliency
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from attrserve.v1 import attribution_service_pb2 as pb
from attrserve_client import AsyncAttributionClient, Attribution, AttributionClient
from attrserve_engine import AttributionJob, Unavailable
from attrserve_engine.algorithms import ALGORITHMS
from doubles import Fragile, Linear3
from oracle import MODELS, assert_all_close, wait_in_flight
from servers import scrape, start_server

X = np.array([[0.3, -0.2, 0.9], [1.0, 0.5, -0.4]], dtype=np.float32)


@pytest.mark.asyncio
async def test_stream_answers_every_request_by_id_and_errors_do_not_end_it(fusing_server) -> None:
    """12 good requests and one for a model that does not exist, on one stream, queued in order while the engine
    holds: the good ones are all gradient rows of `toy` (one batch key), 2 × (5 + i) rows each for IG with
    n_steps 5 + i and 2 for Saliency, 234 in all: exactly one pass, shared by all twelve, each equal to Captum."""
    requests = []
    for i in range(12):
        model = "nope" if i == 5 else "toy"
        requests.append(
            AttributionClient.build_request(model, "integrated_gradients", X * (i + 1), target=i % 2, request_id=f"r{i}", params={"n_steps": 5 + i})
        )
    requests.append(AttributionClient.build_request("toy", "saliency", X, target=0))  # no id: gets its position
    engine = fusing_server.running.engine
    assert engine.in_flight() == 0
    passes, rows = engine.passes, engine.rows
    all_queued = asyncio.Event()

    async def one_by_one():
        """Each request once the one before it reached the engine (the unknown model never does)."""
        for request in requests:
            queued = engine.in_flight()
            yield request
            until = time.monotonic() + 30
            while request.model != "nope" and engine.in_flight() == queued:
                assert time.monotonic() < until, "a request never reached the engine"
                await asyncio.sleep(0.001)
        all_queued.set()

    async def collect(stream) -> list:
        return [r async for r in stream]

    with contextlib.ExitStack() as hold:
        hold.enter_context(engine.held())
        async with AsyncAttributionClient(fusing_server.address) as client:
            answers = asyncio.ensure_future(collect(client.attribute_stream(one_by_one(), timeout=60)))
            await asyncio.wait_for(all_queued.wait(), 60)
            assert engine.in_flight() == 12
            hold.close()  # release: the queued rows are cut into passes
            responses = await asyncio.wait_for(answers, 60)
    by_id = {r.request_id: r for r in responses}
    assert len(responses) == 13 and set(by_id) == {f"r{i}" for i in range(12)} | {"12"}
    assert by_id["r5"].WhichOneof("result") == "error"
    assert by_id["r5"].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert "nope" in by_id["r5"].error.message
    toy = MODELS["toy"]()
    expected_rows = {f"r{i}": 2 * (5 + i) for i in range(12) if i != 5} | {"12": 2}
    assert sum(expected_rows.values()) == 234
    for request_id, n_rows in expected_rows.items():
        streamed = by_id[request_id]
        assert streamed.WhichOneof("result") == "response", streamed
        got = Attribution.from_response(streamed.response, single=True)
        if request_id == "12":
            want = Saliency(toy).attribute(torch.from_numpy(X).requires_grad_(), target=0)
        else:
            i = int(request_id[1:])
            want = IntegratedGradients(toy).attribute(torch.from_numpy(X * (i + 1)), target=i % 2, n_steps=5 + i)
        assert_all_close((torch.from_numpy(got.attributions),), (want.detach(),))
        assert {k: got.timing[k] for k in ("rows", "passes", "pass_rows", "pass_requests")} == {
            "rows": n_rows, "passes": 1, "pass_rows": 234, "pass_requests": 12}, request_id
    assert (engine.passes - passes, engine.rows - rows) == (1, 234)


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
    # fragile is one Linear: no module DeepLift has a rule for, so (as in Captum) DeepLift is its plain gradient.
    assert pb.ALGORITHM_DEEP_LIFT in fragile.algorithms
    # What a model cannot serve is listed with why: conv's LeakyReLU has no LRP rule, in Captum too.
    refused = {r.name: r.reason for r in info.refused}
    assert "LeakyReLU" in refused["lrp"] and "relu2" in refused["lrp"]
    named = {pb.Algorithm.Name(a).removeprefix("ALGORITHM_").lower() for a in info.algorithms} | set(info.custom_algorithms)
    assert not named & set(refused) and all(refused.values())
    assert len(named | set(refused)) == len(ALGORITHMS)
    assert [(s.name, list(s.dims)) for s in fragile.config.inputs] == [("x", [3])]
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_float64_inputs_are_cast_to_the_pinned_dtype_and_said_so(server) -> None:
    """numpy's default float64, sent to a model whose config pins float32: computed in float32 (Captum's numbers on
    the cast input), and the response lists the cast; a float32 request lists none."""
    x64 = X.astype(np.float64) + 1e-9  # not representable in float32: the cast is a real one
    with AttributionClient(server.address) as client:
        cast = client.attribute("fragile", "integrated_gradients", x64, target=1)
        exact = client.attribute("fragile", "integrated_gradients", X, target=1)
    assert cast.input_casts == ((0, "float64", "float32"),) and exact.input_casts == ()
    want = IntegratedGradients(Fragile()).attribute(torch.from_numpy(x64).float(), target=1)
    assert cast.attributions.dtype == np.float32
    assert_all_close((torch.from_numpy(cast.attributions),), (want.detach(),))


def test_health_and_reflection(server) -> None:
    """Health's Check and Watch and reflection answer, and each call is counted under its kind (grpc_type), whatever
    kind its method is (methods.py wraps them all)."""
    services = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")
    before = scrape(server.running.metrics_port)
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        status = stub.Check(health_pb2.HealthCheckRequest(service="attrserve.v1.AttributionService"))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert next(iter(watch)).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(iter(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))))
        names = {s.name for s in reply.list_services_response.service}
    assert "attrserve.v1.AttributionService" in names and "grpc.health.v1.Health" in names
    # (kind, service, method): the codes its end may have. Reflection's stream ends OK once its requests are answered,
    # or CANCELLED where the channel closes first; the client cancels Watch, which never ends by itself.
    calls = {
        ("unary", services[0], "Check"): ("OK",),
        ("server_stream", services[0], "Watch"): ("CANCELLED",),
        ("bidi_stream", services[1], "ServerReflectionInfo"): ("OK", "CANCELLED"),
    }
    labels = ("grpc_type", "grpc_service", "grpc_method")

    def grew(after: dict, name: str, call: tuple, **code: str) -> float:
        key = (name, frozenset({**dict(zip(labels, call)), **code}.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    deadline = time.monotonic() + 10  # a call is counted as it ends on the server, after the client has its answer
    while True:
        after = scrape(server.running.metrics_port)
        ended = {call: sum(grew(after, "grpc_server_handled_total", call, grpc_code=c) for c in codes) for call, codes in calls.items()}
        if all(ended.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert ended == dict.fromkeys(calls, 1.0)
    assert {call: grew(after, "grpc_server_started_total", call) for call in calls} == dict.fromkeys(calls, 1.0)


def test_metrics_count_requests_and_passes(server) -> None:
    """What three DeepLift requests add to the counters (read before and after: other tests share this server)."""
    before = scrape(server.running.metrics_port)
    with AttributionClient(server.address) as client:
        for _ in range(3):
            client.attribute("toy", "deep_lift", X, target=1)
    after = scrape(server.running.metrics_port)
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.running.metrics_port}/metrics", timeout=10).read().decode()

    def grew(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after[key] - before.get(key, 0.0)

    # Sequential requests of one DeepLift block each (no delta): one pass apiece, alone, with the 2 × 2 rows of its pairs.
    assert grew("attrserve_attributions_completed_total", algorithm="deep_lift", grpc_code="OK", model="toy") == 3
    assert grew("attrserve_passes_executed_total", kind="deeplift", model="toy") == 3
    assert grew("attrserve_pass_rows_count", kind="deeplift", model="toy") == 3
    assert grew("attrserve_pass_rows_sum", kind="deeplift", model="toy") == 3 * 4
    assert grew("attrserve_pass_requests_sum", kind="deeplift", model="toy") == 3
    assert grew("grpc_server_handled_total", grpc_code="OK", grpc_method="Attribute", grpc_service="attrserve.v1.AttributionService", grpc_type="unary") == 3
    # Label sets exist before any traffic, so dashboards show zeros.
    assert 'attrserve_attributions_completed_total{algorithm="gradient_shap",grpc_code="RESOURCE_EXHAUSTED",model="conv"} 0.0' in text


def test_drain_finishes_in_flight_requests_then_refuses() -> None:
    s = start_server()
    try:
        with AttributionClient(s.address) as client:
            pending = [client._stub.Attribute.future(AttributionClient.build_request("slow", "saliency", X[:1] * (k + 1), target=0), timeout=60) for k in range(3)]
            wait_in_flight(s.running.engine, 3)
            stopping = asyncio.run_coroutine_threadsafe(s.running.stop(5.0), s.loop)
            results = [Attribution.from_response(p.result(timeout=30), single=True) for p in pending]
            stopping.result(30)
        want = Saliency(Linear3()).attribute(torch.from_numpy(X[:1]).requires_grad_(), target=0).detach()  # |W[0]|, whatever x
        for r in results:
            assert_all_close((torch.from_numpy(r.attributions),), (want,))
        with pytest.raises(Unavailable):  # the engine refuses new work once drained
            s.running.engine.submit(AttributionJob(model="toy", algorithm="saliency", inputs=(torch.zeros(1, 3),)))
    finally:
        s.loop.call_soon_threadsafe(s.loop.stop)
        s.thread.join(10)
