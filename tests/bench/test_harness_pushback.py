"""The bench's load client honours admission's retry hint: after a RESOURCE_EXHAUSTED carrying
`grpc-retry-pushback-ms` a caller waits that long before its next request, as a gRPC retry policy would, instead
of resending at once (on the GPU check's G2 that turned a full queue into ~340 refused payloads a second)."""

from __future__ import annotations

import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc

from attrserve.v1 import attribution_service_pb2 as pb
from attrserve.v1 import attribution_service_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import harness  # noqa: E402


class Refusing(pb_grpc.AttributionServiceServicer):
    def __init__(self, pushback_ms: str | None) -> None:
        self.pushback_ms = pushback_ms
        self.calls = 0
        self.lock = threading.Lock()

    def Attribute(self, request, context):
        with self.lock:
            self.calls += 1
        if self.pushback_ms is not None:
            context.set_trailing_metadata(((harness.RETRY_PUSHBACK, self.pushback_ms),))
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "model 'm' has work queued past its bound")


def refused_calls(pushback_ms: str | None, seconds: float) -> tuple[int, harness.LoadResult]:
    servicer = Refusing(pushback_ms)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_AttributionServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        result = harness.drive(f"127.0.0.1:{port}", [pb.AttributeRequest(model="m")], concurrency=2, seconds=seconds)
    finally:
        server.stop(grace=None).wait(5)
    assert result is not None
    return servicer.calls, result


def test_a_refused_caller_waits_the_retry_hint_before_its_next_request() -> None:
    calls, result = refused_calls("300", seconds=0.5)
    # Two callers, each refused at once and then waiting 300 ms: at most 2 requests each in 0.5 s.
    assert 2 <= calls <= 4, calls
    assert result.errors == calls and not result.latencies_ms
    assert result.error_samples[0].startswith("RESOURCE_EXHAUSTED: model 'm' has work queued")


def test_a_hint_that_is_not_a_number_means_no_wait() -> None:
    calls, result = refused_calls("soon", seconds=0.3)
    # Without a wait, the callers resend at once: far more than the 4 requests a 300 ms wait would allow (a refusal
    # over loopback takes about a millisecond).
    assert calls == result.errors > 8, calls
