"""The rest of the contract: streaming, ListModels/GetModel, health, reflection, /metrics, drain."""

from __future__ import annotations

import asyncio
import contextlib
import threading
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
from attrserve.v1 import attribution_service_pb2_grpc as pb_grpc
from attrserve_client import AsyncAttributionClient, Attribution, AttributionClient
from attrserve_engine import AttributionJob, Unavailable
from attrserve_engine.algorithms import ALGORITHMS
from attrserve_service.config import ServerConfig
from attrserve_service.servicer import NO_RETRY_MS
from doubles import Fragile, Linear3
from oracle import MODELS, assert_all_close, wait_in_flight
from servers import ServerThread, oracle_engine, scrape, start_server

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


def test_a_stream_whose_client_stops_reading_stops_taking_work(tmp_path) -> None:
    """A client that sends 40 requests on a stream and reads nothing: the server computes the stream's
    max_requests_per_stream (4) and waits for the client to read, where it answered all 40 and held the answers
    (256 KiB each) without bound. Once the client reads: every answer, Captum's; then nothing in flight, SERVING."""
    s = ServerThread(oracle_engine(), ServerConfig(port=0, metrics_port=0, max_request_bytes=1 << 20, max_requests_per_stream=4))
    engine = s.running.engine
    xs = [np.random.default_rng(i).random((512, 2, 8, 8), dtype=np.float32) for i in range(40)]  # answers of 256 KiB
    requests = [pb.AttributeStreamRequest(request=AttributionClient.build_request("conv", "saliency", x, target=1, request_id=f"r{i}"))
                for i, x in enumerate(xs)]
    # No BDP probing: gRPC's flow-control window stays at 64 KiB, so what the server computes is what it holds.
    options = [("grpc.http2.bdp_probe", 0), ("grpc.max_receive_message_length", -1)]
    try:
        with grpc.insecure_channel(s.address, options=options) as channel:
            rows = engine.rows
            stream = pb_grpc.AttributionServiceStub(channel).AttributeStream(iter(requests), timeout=120)
            until = time.monotonic() + 60
            while engine.rows - rows < 4 * 512 and time.monotonic() < until:  # the stream's first 4, however slow the machine
                time.sleep(0.05)
            quiet, seen = time.monotonic(), engine.rows
            while time.monotonic() - quiet < 1.0 and time.monotonic() < until:  # then until the engine has been idle for 1 s
                time.sleep(0.05)
                if engine.rows != seen or engine.in_flight():
                    quiet, seen = time.monotonic(), engine.rows
            computed = (engine.rows - rows) // 512
            answers = {entry.request_id: entry for entry in stream}
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(s.address)).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        in_flight = scrape(s.running.metrics_port)[("attrserve_requests_in_flight", frozenset())]
    finally:
        s.stop()
    assert 4 <= computed <= 8, f"{computed} of 40 requests computed for a client that read none of their answers"
    assert set(answers) == {f"r{i}" for i in range(40)}
    conv = MODELS["conv"]()
    for i in (0, 39):
        want = Saliency(conv).attribute(torch.from_numpy(xs[i]).requires_grad_(), target=1).detach()
        assert_all_close((torch.from_numpy(Attribution.from_response(answers[f"r{i}"].response, single=True).attributions),), (want,))
    assert health == health_pb2.HealthCheckResponse.SERVING and in_flight == 0


def test_a_stream_tells_a_permanent_refusal_not_to_retry(server) -> None:
    """A request over --max-rows-per-request (20,000 here) is refused whenever it is sent: on a stream its error entry
    says "do not retry" (retry_after_ms 4294967295, the unsigned field's largest value: it said 0, which reads as "no
    hint"), as a unary call's trailer says -1; the stream's other request is answered, Captum's."""
    big = AttributionClient.build_request("toy", "integrated_gradients", np.ones((50, 3), np.float32), target=0, params={"n_steps": 500})
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.AttributionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as unary:
            stub.Attribute(big, timeout=30)
        big.request_id = "big"
        ok = AttributionClient.build_request("toy", "saliency", X, target=0, request_id="ok")
        streamed = stub.AttributeStream(iter([pb.AttributeStreamRequest(request=r) for r in (big, ok)]), timeout=30)
        entries = {e.request_id: e for e in streamed}
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert health == health_pb2.HealthCheckResponse.SERVING
    assert unary.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ("grpc-retry-pushback-ms", "-1") in tuple(unary.value.trailing_metadata())
    refused = entries["big"].error
    assert (refused.code, refused.message) == (grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], unary.value.details())
    assert refused.retry_after_ms == NO_RETRY_MS == 2**32 - 1
    want = Saliency(MODELS["toy"]()).attribute(torch.from_numpy(X).requires_grad_(), target=0).detach()
    assert_all_close((torch.from_numpy(Attribution.from_response(entries["ok"].response, single=True).attributions),), (want,))


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


def test_drain_answers_what_open_streams_took_then_ends_them() -> None:
    """A stream the client keeps open and one it half-closed, each with requests queued when the server stops: both
    get their answers (Captum's); the open one then ends UNAVAILABLE, saying that what it did not answer was not
    started, and a request sent on it during the drain is not computed (it was taken and computed until the grace
    cut the stream off); the half-closed one ends OK; nothing is lost."""
    from prometheus_client import REGISTRY

    def handled(code: str) -> float:
        labels = dict(grpc_code=code, grpc_method="AttributeStream", grpc_service="attrserve.v1.AttributionService", grpc_type="bidi_stream")
        return REGISTRY.get_sample_value("grpc_server_handled_total", labels) or 0.0

    s = start_server()
    engine = s.running.engine
    before = {code: handled(code) for code in ("OK", "UNAVAILABLE")}
    item = [pb.AttributeStreamRequest(request=AttributionClient.build_request("slow", "saliency", X[:1] * (k + 1), target=0, request_id=f"r{k}"))
            for k in range(5)]
    drained, finish, sent_r4 = threading.Event(), threading.Event(), threading.Event()

    def kept_open():
        yield from item[:3]
        drained.wait(30)
        yield item[4]  # sent during the drain
        sent_r4.set()  # (gRPC asks for the next request once it has sent this one)
        finish.wait(30)

    def read(stream, into: list) -> None:
        try:
            into.extend(stream)
        except grpc.RpcError as e:
            into.append(e)

    try:
        with grpc.insecure_channel(s.address) as channel:
            stub = pb_grpc.AttributionServiceStub(channel)
            open_answers: list = []
            closed_answers: list = []
            with engine.held():
                rows = engine.rows
                readers = [threading.Thread(target=read, args=(stub.AttributeStream(kept_open(), timeout=60), open_answers)),
                           threading.Thread(target=read, args=(stub.AttributeStream(iter(item[3:4]), timeout=60), closed_answers))]
                for reader in readers:
                    reader.start()
                wait_in_flight(engine, 4)
                stopping = asyncio.run_coroutine_threadsafe(s.running.stop(5.0), s.loop)
                until = time.monotonic() + 30
                while not s.running.attribution.stopping.is_set():
                    assert time.monotonic() < until, "the drain never began"
                    time.sleep(0.01)
                drained.set()
                assert sent_r4.wait(30), "the client never sent r4"
            lost = stopping.result(30)
            finish.set()
            for reader in readers:
                reader.join(30)
            computed = engine.rows - rows
    finally:
        drained.set()
        finish.set()
        s.loop.call_soon_threadsafe(s.loop.stop)
        s.thread.join(10)
    *answers, ended = open_answers
    assert isinstance(ended, grpc.RpcError) and ended.code() == grpc.StatusCode.UNAVAILABLE, ended
    assert "shutting down" in ended.details() and "not started" in ended.details(), ended.details()
    assert sorted(a.request_id for a in answers) == ["r0", "r1", "r2"] and [a.request_id for a in closed_answers] == ["r3"]
    want = Saliency(Linear3()).attribute(torch.from_numpy(X[:1]).requires_grad_(), target=0).detach()  # |W[0]|, whatever x
    for a in answers + closed_answers:
        assert_all_close((torch.from_numpy(Attribution.from_response(a.response, single=True).attributions),), (want,))
    assert computed == 4 and lost == 0
    assert {code: handled(code) - before[code] for code in before} == {"OK": 1, "UNAVAILABLE": 1}
