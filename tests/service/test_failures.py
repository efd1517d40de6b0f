"""Clients that time out or leave, a worker that dies, SIGTERM mid-storm: the server keeps answering correctly,
health tells the truth, and the metrics count what happened."""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from attrserve.v1 import attribution_service_pb2 as pb
from attrserve.v1 import attribution_service_pb2_grpc as pb_grpc
from attrserve_client import AttributionClient
from attrserve_engine import InputSpec, ModelSpec
from attrserve_service.config import ServerConfig
from attrserve_service.servicer import RPC_WINDOW, deadline_passed
from doubles import Exiting, Gated
from oracle import MODELS, Case, assert_all_close, captum_attribute, make_engine, wait_in_flight
from servers import ServeProcess, ServerThread, oracle_engine, scrape, start_server

SERVICE = "attrserve.v1.AttributionService"


def health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5).status


def assert_serves_captums_numbers(address: str, seed: int) -> None:
    """A normal request, answered within seconds and equal to Captum."""
    case = Case("conv", "integrated_gradients", {"n_steps": 16}, target="per_example", n=2, seed=seed)
    built = case.build()
    want, _ = captum_attribute(case, MODELS["conv"](), built)
    with AttributionClient(address) as client:
        got = client.attribute("conv", "integrated_gradients", built["inputs"][0].numpy(), target=[[0], [1]],
                               params={"n_steps": 16}, timeout=5)
    assert_all_close((torch.from_numpy(got.attributions),), want)


def heavy_request(rng: random.Random) -> pb.AttributeRequest:
    """IG on 20 conv examples × 200 steps: 4,000 rows, many passes — long enough to expire mid-way."""
    x = np.asarray(rng.random() * np.ones((20, 2, 8, 8)), dtype=np.float32)
    return AttributionClient.build_request("conv", "integrated_gradients", x, target=1, params={"n_steps": 200})


class _Remaining:
    """A servicer context as deadline_passed reads it."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds

    def time_remaining(self) -> float | None:
        return self.seconds


def test_a_cancel_close_to_the_deadline_is_the_deadline() -> None:
    """A client whose deadline passed cancels the call a little before the server's own deadline (the server's
    starts when the headers arrive): a cancel within 25 ms of it, or within the last 5% of the RPC's window (at most
    250 ms), is DEADLINE_EXCEEDED; an earlier one is the caller leaving."""

    def passed(remaining: float | None, window: float | None) -> bool:
        token = RPC_WINDOW.set(window)
        try:
            return deadline_passed(_Remaining(remaining))  # type: ignore[arg-type]
        finally:
            RPC_WINDOW.reset(token)

    assert passed(0.02, None) and passed(0.02, 0.1)
    assert not passed(0.03, 0.1)  # 5% of 100 ms is under the 25 ms floor
    assert passed(0.045, 1.0) and not passed(0.06, 1.0)  # the storm's sure stream: 1 s, so the last 50 ms
    assert passed(0.2, 30.0) and not passed(0.3, 30.0)  # a 30 s call cancelled 1.5 s early is the caller leaving
    assert not passed(None, None) and not passed(0.5, None)


def test_a_stream_that_ends_by_deadline_or_cancel_after_its_answers_is_not_counted_ok() -> None:
    """Under grpc.aio a client's deadline or cancel ends the server's request iterator like a half-close; a stream whose
    requests were all answered must still be counted DEADLINE_EXCEEDED or CANCELLED (CI runs counted one, then two, OK), and a
    stream the client half-closes is OK. Each kind several times; then the server still serves Captum's numbers."""
    s = start_server()
    try:
        before = scrape(s.running.metrics_port)
        toy = pb.AttributeStreamRequest(request=AttributionClient.build_request("toy", "saliency", np.ones((1, 3), np.float32), target=0))
        with grpc.insecure_channel(s.address) as channel:
            stub = pb_grpc.AttributionServiceStub(channel)
            for _ in range(4):
                release = threading.Event()

                def one_then_wait() -> Iterator[pb.AttributeStreamRequest]:
                    yield toy
                    release.wait(10)

                with pytest.raises(grpc.RpcError) as expired:  # its deadline passes after its one answer
                    list(stub.AttributeStream(one_then_wait(), timeout=0.5))
                assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                release.set()
                release = threading.Event()
                left = stub.AttributeStream(one_then_wait())
                assert next(left).WhichOneof("result") == "response"
                left.cancel()  # its caller leaves after its one answer
                release.set()
                assert [r.WhichOneof("result") for r in stub.AttributeStream(iter([toy, toy]), timeout=10)] == ["response"] * 2
        time.sleep(0.2)  # the last handler's metrics
        after = scrape(s.running.metrics_port)
        assert_serves_captums_numbers(s.address, seed=0)
        assert health(s.address) == health_pb2.HealthCheckResponse.SERVING
    finally:
        s.stop()
    streams = {
        code: after.get(key := ("grpc_server_handled_total", frozenset(dict(grpc_code=code, grpc_type="bidi_stream", grpc_service=SERVICE,
                                                                          grpc_method="AttributeStream").items())), 0.0) - before.get(key, 0.0)
        for code in ("OK", "DEADLINE_EXCEEDED", "CANCELLED")
    }
    assert streams == {"OK": 4, "DEADLINE_EXCEEDED": 4, "CANCELLED": 4}, streams


def test_storms_of_expiring_and_cancelled_requests_never_disturb_the_worker() -> None:
    """Rounds of unary calls with 1-50 ms deadlines, unary calls cancelled mid-flight, a stream with a deadline
    and a stream cancelled by its caller. After each round: Captum's numbers within seconds, SERVING, nothing
    left in the engine."""
    rng = random.Random(3)
    s = start_server(default_max_queued_rows=10**9)  # about deadlines, not admission: the queue bound never refuses
    try:
        before = scrape(s.running.metrics_port)
        client_deadlines = 0
        with grpc.insecure_channel(s.address) as channel:
            stub = pb_grpc.AttributionServiceStub(channel)
            for round_ in range(3):
                # One caller surely leaves while its request is in the engine (queued under a hold, so it cannot
                # finish first): the server sees the cancel, whatever the storm below does in time.
                with s.running.engine.held():
                    sure = stub.Attribute.future(heavy_request(rng), timeout=60)
                    wait_in_flight(s.running.engine, 1)
                    sure.cancel()
                    wait_in_flight(s.running.engine, 0)  # dropped at once, even while held
                assert sure.cancelled()
                # And one stream surely reaches its deadline on the server (the storm's 30 ms stream may expire
                # before the server sees it, on a busy machine, and then no server counts it): its caller sends a
                # request and keeps the stream open past the deadline.
                release = threading.Event()

                def one_then_wait() -> Iterator[pb.AttributeStreamRequest]:
                    # Another model's small request: conv's measured rate (which refuses hopeless deadlines up front)
                    # and the storm's random draws stay as they were.
                    yield pb.AttributeStreamRequest(request=AttributionClient.build_request("toy", "saliency", np.ones((1, 3), np.float32), target=0))
                    release.wait(10)

                with pytest.raises(grpc.RpcError) as expired:
                    list(stub.AttributeStream(one_then_wait(), timeout=1.0))
                release.set()
                assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                expiring = [stub.Attribute.future(heavy_request(rng), timeout=rng.uniform(0.001, 0.05)) for _ in range(30)]
                leaving = [stub.Attribute.future(heavy_request(rng)) for _ in range(10)]
                stream = stub.AttributeStream(iter([pb.AttributeStreamRequest(request=heavy_request(rng)) for _ in range(10)]), timeout=0.03)
                abandoned = stub.AttributeStream(iter([pb.AttributeStreamRequest(request=heavy_request(rng)) for _ in range(10)]))
                for call in leaving:
                    time.sleep(rng.uniform(0, 0.003))
                    call.cancel()
                time.sleep(0.02)
                abandoned.cancel()
                for call in expiring:
                    try:
                        call.result(timeout=10)
                    except grpc.RpcError as e:
                        assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                        client_deadlines += 1
                for call in leaving:
                    assert call.cancelled() or call.done()
                with pytest.raises(grpc.RpcError) as streamed:
                    list(stream)
                assert streamed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                with pytest.raises(grpc.RpcError) as left:
                    list(abandoned)
                assert left.value.code() == grpc.StatusCode.CANCELLED
                assert_serves_captums_numbers(s.address, seed=round_)
                assert health(s.address) == health_pb2.HealthCheckResponse.SERVING
                until = time.monotonic() + 5
                while s.running.engine.in_flight() and time.monotonic() < until:  # dropped at the next pass boundary
                    time.sleep(0.01)
                assert s.running.engine.in_flight() == 0
        after = scrape(s.running.metrics_port)
    finally:
        s.stop()

    def grew(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    attribute = dict(grpc_type="unary", grpc_service=SERVICE, grpc_method="Attribute")
    # A client's deadline is DEADLINE_EXCEEDED in the metrics, never CANCELLED (calls that expire before the
    # server sees them are not counted there at all).
    assert 0 < grew("grpc_server_handled_total", grpc_code="DEADLINE_EXCEEDED", **attribute) <= client_deadlines
    assert 0 < grew("attrserve_attributions_completed_total", model="conv", algorithm="integrated_gradients", grpc_code="DEADLINE_EXCEEDED")
    assert grew("grpc_server_handled_total", grpc_code="CANCELLED", **attribute) > 0
    # The three sure ones, and each round's 30 ms stream when the server saw it before it expired.
    streams = {
        code: grew("grpc_server_handled_total", grpc_code=code, grpc_type="bidi_stream", grpc_service=SERVICE, grpc_method="AttributeStream")
        for code in ("OK", "DEADLINE_EXCEEDED", "CANCELLED", "UNKNOWN", "INTERNAL")
    }
    assert 3 <= streams["DEADLINE_EXCEEDED"] <= 6, streams
    assert grew("attrserve_requests_dropped_total", model="conv", reason="deadline") > 0
    assert grew("attrserve_requests_dropped_total", model="conv", reason="cancelled") > 0
    assert grew("attrserve_rows_dropped_total", model="conv", reason="deadline") > 0
    assert grew("attrserve_worker_restarts_total", device="cpu") == 0
    assert after[("attrserve_requests_in_flight", frozenset())] == before[("attrserve_requests_in_flight", frozenset())]


def test_the_server_drops_an_expired_request_itself() -> None:
    """The client's own timeout gives DEADLINE_EXCEEDED whatever the server does; this checks the server's side:
    the request queued behind a pass that holds the worker (a gated model: the pass waits until the test opens
    it) is dropped before compute and counted."""
    engine = oracle_engine()
    gated = Gated()
    engine.load(ModelSpec(name="gated", module=gated, inputs=[InputSpec("x", torch.float32, (3,))], max_batch_rows=256))
    s = ServerThread(engine, ServerConfig(port=0, metrics_port=0))
    try:
        before = scrape(s.running.metrics_port)
        x = np.ones((1, 3), np.float32)
        with AttributionClient(s.address) as client:
            gated.hold()
            first = client._stub.Attribute.future(AttributionClient.build_request("gated", "saliency", x, target=0), timeout=30)
            assert gated.entered.wait(10)  # its pass runs, and holds the worker
            rows_before = engine.rows
            with pytest.raises(grpc.RpcError) as expired:
                client.attribute("gated", "integrated_gradients", x, target=0, params={"n_steps": 50}, timeout=0.1)
            assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            gated.open()
            first.result(10)
        wait_in_flight(engine, 0)
        after = scrape(s.running.metrics_port)
        assert engine.rows - rows_before == 1  # the saliency row; none of the 50 IG rows
    finally:
        gated.open()
        s.stop()
    key = ("attrserve_requests_dropped_total", frozenset({"model": "gated", "reason": "deadline"}.items()))
    assert after[key] - before.get(key, 0.0) == 1
    rows_key = ("attrserve_rows_dropped_total", frozenset({"model": "gated", "reason": "deadline"}.items()))
    assert after[rows_key] - before.get(rows_key, 0.0) == 50


def test_a_worker_that_dies_flips_health_fails_its_requests_and_comes_back(caplog) -> None:
    """A model kills the worker while requests are queued: they fail with UNAVAILABLE, health goes NOT_SERVING,
    new work is refused; the restarted worker's check of the models waits (killer.back) until the test has seen
    all that, then the worker serves again."""
    engine = make_engine({"conv": MODELS["conv"]})
    killer = Exiting()
    engine.load(ModelSpec(name="killer", module=killer, inputs=[InputSpec("x", torch.float32, (3,))], max_batch_rows=64))
    s = ServerThread(engine, ServerConfig(port=0, metrics_port=0))
    statuses: list[int] = []
    watching = threading.Event()

    def watch() -> None:
        while not watching.is_set():
            try:
                statuses.append(health(s.address))
            except grpc.RpcError:
                pass
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    try:
        before = scrape(s.running.metrics_port)
        assert_serves_captums_numbers(s.address, seed=0)
        watcher.start()
        x_conv = np.zeros((1, 2, 8, 8), np.float32)
        with AttributionClient(s.address) as client, caplog.at_level(logging.ERROR):
            doomed = client._stub.Attribute.future(AttributionClient.build_request("killer", "saliency", np.full((1, 3), 200.0, np.float32), target=0), timeout=30)
            assert killer.entered.wait(10)
            queued = [client._stub.Attribute.future(AttributionClient.build_request("conv", "saliency", x_conv, target=0), timeout=30) for _ in range(3)]
            wait_in_flight(engine, 4)
            killer.release.set()
            for call in [doomed, *queued]:
                with pytest.raises(grpc.RpcError) as failed:
                    call.result(timeout=10)
                assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "SystemExit" in failed.value.details() and "restarting" in failed.value.details()
            # While it restarts: NOT_SERVING, not ready, new work refused with UNAVAILABLE.
            assert health(s.address) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert not client.get_model("conv").ready
            down = scrape(s.running.metrics_port)
            with pytest.raises(grpc.RpcError) as refused:
                client.attribute("conv", "saliency", x_conv, target=0, timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "restarting" in refused.value.details()
            until = time.monotonic() + 10
            while health_pb2.HealthCheckResponse.NOT_SERVING not in statuses:  # a watcher polling health saw it too
                assert time.monotonic() < until, "the health watcher never saw NOT_SERVING"
                time.sleep(0.01)
            seen_down = len(statuses)
            killer.back.set()  # the restarted worker's check of the models may finish now
            until = time.monotonic() + 15
            while health(s.address) != health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < until, "the worker never came back"
                time.sleep(0.02)
            assert client.get_model("conv").ready
            until = time.monotonic() + 10
            while health_pb2.HealthCheckResponse.SERVING not in statuses[seen_down:]:  # and the watcher sees it back
                assert time.monotonic() < until, "the health watcher never saw SERVING again"
                time.sleep(0.01)
        assert_serves_captums_numbers(s.address, seed=1)
        after = scrape(s.running.metrics_port)
    finally:
        watching.set()
        killer.release.set()
        killer.back.set()
        if watcher.is_alive():
            watcher.join(10)
        s.stop()
    assert statuses[0] == health_pb2.HealthCheckResponse.SERVING  # before the death
    assert down[("attrserve_worker_up", frozenset({"device": "cpu"}.items()))] == 0
    assert down[("attrserve_model_ready", frozenset({"model": "conv", "version": "1"}.items()))] == 0
    assert after[("attrserve_worker_up", frozenset({"device": "cpu"}.items()))] == 1
    assert after[("attrserve_model_ready", frozenset({"model": "conv", "version": "1"}.items()))] == 1
    key = ("attrserve_worker_restarts_total", frozenset({"device": "cpu"}.items()))
    assert after[key] - before.get(key, 0.0) == 1
    deaths = [r for r in caplog.records if r.name == "attrserve_engine.scheduler" and r.levelno == logging.ERROR and r.exc_info]
    assert deaths and deaths[0].exc_info[0] is SystemExit  # logged with its traceback


def test_sigterm_during_a_storm_exits_promptly_and_cleanly() -> None:
    """SIGTERM while requests expire, leave, and run past the grace: the server exits within the grace and a
    few seconds, every call gets an answer, and nothing dies on the way (no traceback in the log)."""
    # Admission bounds out of the way: this storm must leave more work queued than the grace can finish.
    with ServeProcess(["--no-batch-probe", "--grace-seconds", "1", "--max-queued-rows", "10000000", "--max-queued-bytes", str(1 << 40)]) as server:
        rng = np.random.default_rng(0)
        image = rng.random((40, 3, 16, 16), dtype=np.float32)
        long_request = AttributionClient.build_request("image", "integrated_gradients", image, target=1, params={"n_steps": 500})
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.AttributionServiceStub(channel)
            calls = [stub.Attribute.future(long_request, timeout=random.uniform(0.001, 0.03)) for _ in range(20)]
            calls += [stub.Attribute.future(long_request, timeout=60) for _ in range(12)]  # 20,000 rows each: past the grace
            leaving = [stub.Attribute.future(long_request, timeout=60) for _ in range(4)]
            time.sleep(0.3)
            for call in leaving:
                call.cancel()
            signalled = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            for call in calls:
                try:
                    call.result(timeout=15)
                except grpc.RpcError as e:
                    # RESOURCE_EXHAUSTED: admission refuses what would pass the image model's queue bound
                    assert e.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE,
                                        grpc.StatusCode.RESOURCE_EXHAUSTED), e
        code = server.wait(15)
        took = time.monotonic() - signalled
        assert code == 3, server.output()  # the 20,000-row requests still ran when the 1 s grace ended: lost, and said so
        assert "accepted request(s) did not finish within the 1.0 s grace and were lost" in server.output()
        err = server.output()
    assert took < 1 + 4, f"SIGTERM took {took:.1f} s with a 1 s grace"
    assert "Traceback" not in err and "Exception in thread" not in err, err
