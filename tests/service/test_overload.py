"""Overload end to end: `attrserve serve` with a small explicit queue bound, offered several times what it can do
(open loop, ~3 s). Admission refuses the excess with RESOURCE_EXHAUSTED and a retry hint, the queue never
passes its bound, memory stays put, every answer it does give is Captum's, the metrics count what the clients saw,
and afterwards the server is idle, SERVING and correct. No timing is asserted (latency belongs to bench/overload.py).
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import torch
from captum.attr import IntegratedGradients
from grpc_health.v1 import health_pb2, health_pb2_grpc

from attrserve.v1 import attribution_service_pb2 as pb
from attrserve.v1 import attribution_service_pb2_grpc as pb_grpc
from attrserve_client import AttributionClient
from attrserve_client.tensors import from_tensor_proto
from attrserve_service.config import ServerConfig
from oracle import MODELS, assert_all_close
from servers import ROOT, ServeProcess, ServerThread, oracle_engine, scrape

MODEL = "image"
N_STEPS = 200  # IG on one example: 200 rows of model work a request
ROW_BOUND = 1_000  # --max-queued-rows: 5 such requests
INPUTS = 16  # distinct fixed examples, cycled
BURST_SECONDS = 3.0
BURST_RATE = 150.0  # req/s, open loop: ~30,000 rows/s offered, several times what 2 cores compute
STREAM_REQUESTS = 40  # one AttributeStream sent during the burst, too
PUSHBACK = "grpc-retry-pushback-ms"
RSS_GROWTH_BOUND_MB = 500
SERVICE = "attrserve.v1.AttributionService"


def demo_model(name: str) -> torch.nn.Module:
    """A demo model built as the server's loader builds it: model.py by path, weights.pt, eval()."""
    folder = ROOT / "service" / "attrserve_service" / "demo_models" / name
    spec = importlib.util.spec_from_file_location(f"overload_demo_{name}", folder / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.build_model()
    model.load_state_dict(torch.load(folder / "weights.pt", weights_only=True))
    return model.eval()


def examples() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.random((1, 3, 16, 16), dtype=np.float32) for _ in range(INPUTS)]


def request(xs: list[np.ndarray], i: int) -> pb.AttributeRequest:
    return AttributionClient.build_request(
        MODEL, "integrated_gradients", xs[i % INPUTS], target=i % 2, params={"n_steps": N_STEPS}, request_id=str(i)
    )


def captum_answers(xs: list[np.ndarray]) -> list[torch.Tensor]:
    model = demo_model(MODEL)
    ig = IntegratedGradients(model)
    return [ig.attribute(torch.from_numpy(x), target=i % 2, n_steps=N_STEPS).detach() for i, x in enumerate(xs)]


def health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10).status


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def gauge(scraped: dict, name: str) -> float:
    return scraped[(name, frozenset({"model": MODEL}.items()))]


def refused_total(scraped: dict) -> float:
    return sum(v for (name, labels), v in scraped.items() if name == "attrserve_requests_refused_total" and dict(labels)["model"] == MODEL)


class Sampler:
    """Samples the server's queue rows (its /metrics) and RSS every ~50 ms on a thread, until stopped."""

    def __init__(self, pid: int, metrics_port: int) -> None:
        self.pid, self.metrics_port = pid, metrics_port
        self.queue_rows: list[float] = []
        self.rss_kib: list[int] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.queue_rows.append(gauge(scrape(self.metrics_port), "attrserve_queue_rows"))
                self.rss_kib.append(rss_kib(self.pid))
            except Exception as e:  # reported by the test, never swallowed
                self.errors.append(e)
            self._stop.wait(0.05)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


async def burst(address: str, xs: list[np.ndarray]) -> tuple[list, list]:
    """Open loop at BURST_RATE for BURST_SECONDS (sends never wait for answers), plus one stream of STREAM_REQUESTS
    sent in the middle. Returns the unary outcomes (i, code, details, trailers, response) and the stream's entries."""
    unary: list = []
    stream_entries: list = []
    prebuilt = [request(xs, i) for i in range(int(BURST_RATE * BURST_SECONDS))]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.AttributionServiceStub(channel)

        async def one(i: int) -> None:
            call = stub.Attribute(prebuilt[i], timeout=60)
            try:
                unary.append((i, grpc.StatusCode.OK, "", (), await call))
            except grpc.aio.AioRpcError as e:
                unary.append((i, e.code(), e.details(), tuple(e.trailing_metadata() or ()), None))

        async def streamed() -> None:
            call = stub.AttributeStream(
                iter([pb.AttributeStreamRequest(request=request(xs, 10_000 + i)) for i in range(STREAM_REQUESTS)]), timeout=60
            )
            async for entry in call:
                stream_entries.append(entry)

        tasks = []
        start = time.monotonic()
        for i in range(len(prebuilt)):
            delay = start + i / BURST_RATE - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(i)))
            if i == len(prebuilt) // 2:
                tasks.append(asyncio.ensure_future(streamed()))
        await asyncio.gather(*tasks)
    return unary, stream_entries


def test_a_burst_far_over_capacity_is_refused_with_a_retry_hint_and_leaves_the_server_correct_and_idle() -> None:
    xs = examples()
    want = captum_answers(xs)
    args = ["--device", "cpu", "--no-batch-probe", "--max-queued-rows", str(ROW_BOUND), "--log-level", "WARNING"]
    with ServeProcess(args, metrics=True) as server:
        assert server.metrics_port is not None
        with AttributionClient(server.address) as client:  # warm: the model's first requests, then an idle queue
            for i in range(4):
                got = client.attribute(MODEL, "integrated_gradients", xs[i], target=i % 2, params={"n_steps": N_STEPS}, timeout=60)
                assert_all_close((torch.from_numpy(got.attributions),), (want[i],))
                assert got.timing["rows"] == N_STEPS
            assert client.get_model(MODEL).config.max_queued_rows == ROW_BOUND
        before = scrape(server.metrics_port)
        rss_before = rss_kib(server.proc.pid)
        with Sampler(server.proc.pid, server.metrics_port) as sampled:
            unary, stream_entries = asyncio.run(burst(server.address, xs))
        assert not sampled.errors, sampled.errors
        after_burst = scrape(server.metrics_port)

        codes = Counter(code.name for _, code, _, _, _ in unary)
        names = {c.value[0]: c.name for c in grpc.StatusCode}
        stream_codes = Counter("OK" if e.WhichOneof("result") == "response" else names[e.error.code] for e in stream_entries)
        print(f"\nunary outcomes {dict(codes)}; stream outcomes {dict(stream_codes)}; "
              f"queue rows peak {max(sampled.queue_rows):.0f} (bound {ROW_BOUND}); "
              f"RSS {rss_before / 1024:.0f} MiB → peak {max(sampled.rss_kib) / 1024:.0f} MiB")

        # Only answers and refusals: the 60 s deadline never passes here, and nothing breaks.
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
        assert set(stream_codes) <= {"OK", "RESOURCE_EXHAUSTED"}, stream_codes
        assert codes["RESOURCE_EXHAUSTED"] > 0 and codes["OK"] > 0, codes  # saturated, and still serving
        assert len(stream_entries) == STREAM_REQUESTS  # every stream request got its entry

        # Every refusal carries its retry hint: the trailer on a unary call (an integer of ms), retry_after_ms on a stream.
        for i, code, details, trailers, _ in unary:
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                hints = [v for k, v in trailers if k == PUSHBACK]
                assert len(hints) == 1 and hints[0].isdigit(), (i, details, trailers)
        for entry in stream_entries:
            if entry.WhichOneof("result") == "error":
                assert entry.error.retry_after_ms > 0, entry

        # Every answer is Captum's for its input (request i explains example i mod 16 for target i mod 2).
        for i, code, _, _, response in unary:
            if code == grpc.StatusCode.OK:
                assert_all_close((torch.from_numpy(from_tensor_proto(response.attributions[0])),), (want[i % INPUTS],))
        for entry in stream_entries:
            if entry.WhichOneof("result") == "response":
                i = int(entry.request_id)
                assert_all_close((torch.from_numpy(from_tensor_proto(entry.response.attributions[0])),), (want[i % INPUTS],))

        # The queue stayed within its bound (an empty queue takes any one request: the bound plus one request's rows).
        assert sampled.queue_rows and max(sampled.queue_rows) <= ROW_BOUND + N_STEPS, max(sampled.queue_rows)
        # Memory, not time: refusing thousands of requests does not grow the server.
        growth_mb = (max(sampled.rss_kib) - rss_before) / 1024
        assert growth_mb < RSS_GROWTH_BOUND_MB, f"RSS grew {growth_mb:.0f} MiB during the burst"

        # The server counted exactly the refusals the clients saw.
        seen = codes["RESOURCE_EXHAUSTED"] + stream_codes["RESOURCE_EXHAUSTED"]
        assert refused_total(after_burst) - refused_total(before) == seen

        # Afterwards: idle, SERVING, and Captum's numbers.
        until = time.monotonic() + 30
        while True:
            now = scrape(server.metrics_port)
            if gauge(now, "attrserve_queue_rows") == 0 and gauge(now, "attrserve_queue_requests") == 0:
                break
            assert time.monotonic() < until, "the queue never emptied after the burst"
            time.sleep(0.05)
        assert now[("attrserve_requests_in_flight", frozenset())] == 0
        assert health(server.address) == health_pb2.HealthCheckResponse.SERVING
        with AttributionClient(server.address) as client:
            for i in (5, 6):
                got = client.attribute(MODEL, "integrated_gradients", xs[i], target=i % 2, params={"n_steps": N_STEPS}, timeout=60)
                assert_all_close((torch.from_numpy(got.attributions),), (want[i],))
        assert "Traceback" not in server.output(), server.output()


def unseen_calls(scraped: dict) -> float:
    """Calls gRPC's core started that attrserve's code never saw: its channelz count less grpc_server_started_total."""
    seen = sum(v for (name, _), v in scraped.items() if name == "grpc_server_started_total")
    return scraped[("attrserve_grpc_core_calls_started_total", frozenset())] - seen


def test_past_max_pending_calls_grpc_cancels_what_the_event_loop_has_not_taken_counted_and_the_server_serves_on() -> None:
    """--max-pending-calls 4 and the front end's event loop held for 2 s, as a flood it cannot read as fast as it comes
    holds it: of 24 calls sent meanwhile, gRPC keeps a few (its bound, and the one the server had asked for) and cancels
    the rest before attrserve's code sees them. attrserve_grpc_core_calls_started_total counts each of those, which no
    metric showed before. Once the loop runs, the calls kept are answered with Captum's numbers, health says SERVING and
    a new call is answered too."""
    x = np.array([[0.3, -0.2, 0.9]], dtype=np.float32)
    want = IntegratedGradients(MODELS["toy"]()).attribute(torch.from_numpy(x), target=1, n_steps=20)
    message = AttributionClient.build_request("toy", "integrated_gradients", x, target=1, params={"n_steps": 20})
    server = ServerThread(oracle_engine(), ServerConfig(port=0, metrics_port=0, max_pending_calls=4))
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.AttributionServiceStub(channel)
            first = stub.Attribute(message, timeout=30)  # the channel is connected; the server waits for calls
            assert_all_close((torch.from_numpy(from_tensor_proto(first.attributions[0])),), (want,))
            before = scrape(server.running.metrics_port)  # (the process's counts: other tests' servers are in them)

            holding = threading.Event()

            def hold() -> None:
                holding.set()
                time.sleep(2.0)

            server.loop.call_soon_threadsafe(hold)
            assert holding.wait(10)
            calls = [stub.Attribute.future(message, timeout=30) for _ in range(24)]
            outcomes = Counter()
            for call in calls:
                try:
                    answer = call.result()
                    assert_all_close((torch.from_numpy(from_tensor_proto(answer.attributions[0])),), (want,))
                    outcomes["OK"] += 1
                except grpc.RpcError:
                    outcomes[call.code().name] += 1
            print(f"\n24 calls while the event loop was held: {dict(outcomes)}")
            assert set(outcomes) == {"OK", "CANCELLED"} and 0 < outcomes["OK"] <= 8, outcomes

            after = scrape(server.running.metrics_port)
            assert unseen_calls(after) - unseen_calls(before) == outcomes["CANCELLED"]
            ok = ("grpc_server_handled_total", frozenset({"grpc_service": SERVICE, "grpc_method": "Attribute", "grpc_type": "unary", "grpc_code": "OK"}.items()))
            assert after[ok] - before[ok] == outcomes["OK"]
            assert health(server.address) == health_pb2.HealthCheckResponse.SERVING
            again = stub.Attribute(message, timeout=30)
            assert_all_close((torch.from_numpy(from_tensor_proto(again.attributions[0])),), (want,))
    finally:
        server.stop()
