"""A failed call leaves no reference cycle behind in the front end: its request's message, parse and arrays are freed by
reference counting as it ends, as a served call's are. Before, each failed call left a cycle of ~50 objects holding
them: grpc's `context.abort` kept its AbortError on the call's state, whose traceback held every frame of the call, and
a failed future held its exception, whose traceback held the frames that held the future. The front's collector runs
rarely (core.settle_heap), so under refusals a 588 KiB request kept 1.75 MiB for minutes: ~800 MiB after 500 refused
ones (bench/RESULTS.md, issue 12 step 41).

Each case runs its calls once to warm the code paths up, then again with the collector off, and asks the collector
what the second run left. grpc leaves a few objects of its own in a cycle per call, served or failed (the aio server's
`_HandlerCallDetails`, their metadata and the method-handler closure: five): a failed call may leave what a served one
leaves, and no frame, traceback, message or job. The client runs in this process too (without a token: client_of)."""

from __future__ import annotations

import collections
import gc
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from servers import ServerThread
from test_model_management import TARGET, X, captum, mlp, write

from attrserve.v1 import attribution_service_pb2 as pb
from attrserve_client import NO_RETRY, AttributionClient, build_request
from attrserve_engine import EngineLimits
from attrserve_service.config import ServerConfig
from attrserve_service.engine_process import REQUEST_COST

GRPC_PER_CALL = 5  # what grpc's aio server leaves in a cycle per call, served or failed
CALLS = 10
EXPECTED = captum(1)  # (computed once: captum() execs the model's source, a cycle of its own)
OURS = {"frame", "traceback", "coroutine", "AttributeRequest", "AttributionJob", "ndarray", "bytes"}
TOKEN = "cycles-token"


def garbage_of(calls: Callable[[], None]) -> tuple[int, collections.Counter]:
    """The unreachable objects `calls` left with the collector off (after one warm-up run), and their types."""
    calls()
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        calls()
        gc.set_debug(gc.DEBUG_SAVEALL)
        found = gc.collect()
        kinds = collections.Counter(type(o).__name__ for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if enabled:
            gc.enable()
    return found, kinds


def assert_only_grpcs(calls: Callable[[], None], count: int = CALLS) -> None:
    found, kinds = garbage_of(calls)
    # (10 to spare for what the process's other threads may leave meanwhile; a failed call's cycle was ~50 objects)
    assert found <= GRPC_PER_CALL * count + 10, f"{found} unreachable objects after {count} calls: {kinds.most_common(12)}"
    assert not OURS & set(kinds), kinds.most_common(12)


def failing(call: Callable[[], object], code: grpc.StatusCode, count: int = CALLS) -> Callable[[], None]:
    """`count` calls that must fail with `code` (caught without pytest.raises, whose ExceptionInfo would hold its
    traceback's frames in a cycle of the test's own)."""

    def calls() -> None:
        for _ in range(count):
            try:
                call()
                got, why = grpc.StatusCode.OK, ""
            except grpc.RpcError as e:
                got, why = e.code(), e.details()
            assert got == code, why

    return calls


def serve(repo: Path, **settings: object) -> ServerThread:
    write(repo / "good", mlp(1))
    limits = EngineLimits(default_device="cpu", probe_batch_rows=False)
    return ServerThread(None, ServerConfig(port=0, metrics_port=0, model_repository=repo, limits=limits, **settings))


@pytest.fixture(scope="module", params=["engine process", "one process"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    server = serve(tmp_path_factory.mktemp("repo"), engine_process=request.param == "engine process")
    yield server
    server.stop()


def client_of(server: ServerThread) -> AttributionClient:
    """A client without a token: with one on a plaintext channel, the Python client adds it with a grpc interceptor,
    and grpc's interceptor path leaves a cycle per failed call in the client (its _InactiveRpcError raises itself)."""
    return AttributionClient(server.address, retry=NO_RETRY)


def test_served_calls_leave_only_grpcs_own(server: ServerThread) -> None:
    client = client_of(server)

    def calls() -> None:
        for _ in range(CALLS):
            np.testing.assert_allclose(
                client.attribute("good", "integrated_gradients", X, target=TARGET, timeout=30).attributions, EXPECTED, atol=1e-5
            )

    assert_only_grpcs(calls)


@pytest.mark.parametrize(
    ("name", "call", "code"),
    [
        ("an unknown model", lambda c: c.attribute("nope", "saliency", X, target=TARGET, timeout=30), grpc.StatusCode.NOT_FOUND),
        (
            "a target out of range (the engine)",
            lambda c: c.attribute("good", "saliency", X, target=7, timeout=30),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "inputs of the wrong width (the engine)",
            lambda c: c.attribute("good", "saliency", X[:, :3], target=0, timeout=30),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "an unknown algorithm (convert)",
            lambda c: c._stub.Attribute(pb.AttributeRequest(model="good", custom_algorithm="nope"), timeout=30),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ],
)
def test_failed_calls_leave_only_grpcs_own(server: ServerThread, name: str, call: Callable, code: grpc.StatusCode) -> None:
    client = client_of(server)
    assert_only_grpcs(failing(lambda: call(client), code))
    # and the server serves right after them
    np.testing.assert_allclose(
        client.attribute("good", "integrated_gradients", X, target=TARGET, timeout=30).attributions, EXPECTED, atol=1e-5
    )


def test_undecodable_calls_leave_only_grpcs_own(server: ServerThread) -> None:
    with grpc.insecure_channel(server.address) as channel:
        raw = channel.unary_unary("/attrserve.v1.AttributionService/Attribute", request_serializer=None, response_deserializer=None)
        assert_only_grpcs(failing(lambda: raw(b"\xff\xff\xff", timeout=30), grpc.StatusCode.INVALID_ARGUMENT))


def test_calls_refused_for_their_token_leave_only_grpcs_own(tmp_path: Path) -> None:
    """Refused before their handler runs (no token, a wrong one): before, by `context.abort` too."""
    (tmp_path / "tokens").write_text(TOKEN + "\n")
    server = serve(tmp_path / "repo", auth_tokens_file=tmp_path / "tokens")
    try:
        client = client_of(server)
        assert_only_grpcs(
            failing(lambda: client.attribute("good", "saliency", X, target=TARGET, timeout=30), grpc.StatusCode.UNAUTHENTICATED)
        )
        authorized = AttributionClient(server.address, retry=NO_RETRY, token=TOKEN)
        np.testing.assert_allclose(
            authorized.attribute("good", "integrated_gradients", X, target=TARGET, timeout=30).attributions, EXPECTED, atol=1e-5
        )
    finally:
        server.stop()


def test_a_streams_failed_requests_leave_only_grpcs_own(server: ServerThread) -> None:
    """Error entries on one AttributeStream: the stream is one call."""
    client = client_of(server)
    bad = build_request("good", "saliency", X, target=7)

    def calls() -> None:
        answers = list(client.attribute_stream([bad] * CALLS, timeout=30))
        assert len(answers) == CALLS and all(a.WhichOneof("result") == "error" for a in answers), answers[0]

    assert_only_grpcs(calls, count=1)


def test_requests_refused_by_a_front_that_holds_its_bound_leave_only_grpcs_own(tmp_path: Path) -> None:
    """The engine process stopped with one request held at --max-front-bytes: the rest are refused with
    RESOURCE_EXHAUSTED (EngineProcess._refuse_held). Before, each kept its 588 KiB-request's 1.75 MiB in a cycle."""
    server = serve(tmp_path, max_front_bytes=X.nbytes + REQUEST_COST)
    try:
        client = client_of(server)
        core = server.running.core
        pid = core.pid
        os.kill(pid, signal.SIGSTOP)
        held: list = []
        try:
            thread = threading.Thread(
                target=lambda: held.append(client.attribute("good", "integrated_gradients", X, target=TARGET, timeout=60))
            )
            thread.start()
            until = time.monotonic() + 10
            while not core.held_bytes:
                assert time.monotonic() < until, "the front never held the request"
                time.sleep(0.02)
            assert_only_grpcs(
                failing(lambda: client.attribute("good", "saliency", X, target=TARGET, timeout=30), grpc.StatusCode.RESOURCE_EXHAUSTED)
            )
        finally:
            os.kill(pid, signal.SIGCONT)
        thread.join(60)
        np.testing.assert_allclose(held[0].attributions, EXPECTED, atol=1e-5)
        np.testing.assert_allclose(
            client.attribute("good", "integrated_gradients", X, target=TARGET, timeout=30).attributions, EXPECTED, atol=1e-5
        )
        assert core.held_bytes == 0
    finally:
        server.stop()
