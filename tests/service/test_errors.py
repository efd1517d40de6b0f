"""Every status code a caller can get, with a message that names the field, and bad requests never harm their neighbours."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients, Saliency
from grpc_health.v1 import health_pb2

from attrserve.v1 import attribution_service_pb2 as pb
from attrserve.v1 import attribution_service_pb2_grpc as pb_grpc
from attrserve.v1 import tensor_pb2
from attrserve_client import Attribution, AttributionClient, to_tensor_proto
from doubles import Linear3
from oracle import MODELS, assert_all_close
from servers import send_held, start_server
from test_model_management import health

X = np.array([[0.1, 0.2, 0.3]], dtype=np.float32)


def status_of(address: str, request: pb.AttributeRequest, timeout: float = 30) -> tuple[grpc.StatusCode, str]:
    with grpc.insecure_channel(address) as channel:
        try:
            pb_grpc.AttributionServiceStub(channel).Attribute(request, timeout=timeout)
        except grpc.RpcError as e:
            return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def request(**fields) -> pb.AttributeRequest:
    base = dict(model="toy", algorithm=pb.ALGORITHM_SALIENCY, inputs=[to_tensor_proto(X)], target=pb.Target(index=0))
    base.update(fields)
    return pb.AttributeRequest(**base)


CASES = {
    "unknown model": (request(model="nope"), grpc.StatusCode.NOT_FOUND, "model 'nope' is not served"),
    "unknown version": (request(model_version="7"), grpc.StatusCode.NOT_FOUND, "has no version '7'"),
    "unspecified algorithm": (request(algorithm=pb.ALGORITHM_UNSPECIFIED), grpc.StatusCode.INVALID_ARGUMENT, "ALGORITHM_UNSPECIFIED"),
    "no inputs": (request(inputs=[]), grpc.StatusCode.INVALID_ARGUMENT, "inputs is empty"),
    "wrong byte length": (
        request(inputs=[tensor_pb2.Tensor(dtype=1, shape=[1, 3], data=b"\0" * 8)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[0]: shape [1, 3] of DATA_TYPE_FLOAT32 needs 12 bytes of data, got 8",
    ),
    "unspecified dtype": (request(inputs=[tensor_pb2.Tensor(shape=[1, 3], data=b"\0" * 12)]), grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].dtype"),
    "wrong dtype for a gradient": (
        request(model="toy", inputs=[to_tensor_proto(np.array([[1, 2, 3]], dtype=np.int64))]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "floating point",
    ),
    "wrong shape": (
        request(model="fragile", inputs=[to_tensor_proto(np.zeros((1, 4), np.float32))]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[0] ('x'): expected shape (n, 3), got (1, 4)",
    ),
    "wrong dtype against the config": (
        request(model="fragile", inputs=[to_tensor_proto(np.zeros((1, 3), np.int64))]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[0] ('x'): expected dtype float32, got int64",
    ),
    "target out of range": (request(target=pb.Target(index=5)), grpc.StatusCode.INVALID_ARGUMENT, "target index 5 is out of range"),
    "target count": (
        request(target=pb.Target(per_example=pb.TargetIndexList(indices=[pb.TargetIndex(index=[0])] * 2))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "target.per_example has 2 entries; there are 1 examples",
    ),
    "no target on a vector output": (request(target=None), grpc.StatusCode.INVALID_ARGUMENT, "target must select one value per example"),
    "bad method": (
        request(algorithm=pb.ALGORITHM_INTEGRATED_GRADIENTS, integrated_gradients=pb.IntegratedGradientsParams(method="simpson")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "integrated_gradients.method must be one of",
    ),
    "params for another algorithm": (
        request(deep_lift=pb.DeepLiftParams(eps=1e-3)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "params are for deep_lift but algorithm is saliency",
    ),
    "n_steps over the cap": (
        request(algorithm=pb.ALGORITHM_INTEGRATED_GRADIENTS, integrated_gradients=pb.IntegratedGradientsParams(n_steps=501)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "integrated_gradients.n_steps is 501, over this server's limit of 500",
    ),
    "bad nt_type": (request(noise_tunnel=pb.NoiseTunnel(nt_type="blur")), grpc.StatusCode.INVALID_ARGUMENT, "noise_tunnel.nt_type"),
    "delta where there is none": (request(return_convergence_delta=True), grpc.StatusCode.INVALID_ARGUMENT, "saliency has no convergence delta"),
    "baseline that does not broadcast": (
        request(algorithm=pb.ALGORITHM_INTEGRATED_GRADIENTS, baselines=[pb.Baseline(tensor=to_tensor_proto(np.zeros((1, 4), np.float32)))]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "baselines[0] has shape (1, 4); it must broadcast",
    ),
    "seed out of range": (request(seed=2**40), grpc.StatusCode.INVALID_ARGUMENT, "seed must be in"),
    "too many rows": (
        request(
            inputs=[to_tensor_proto(np.zeros((100, 3), np.float32))],
            algorithm=pb.ALGORITHM_INTEGRATED_GRADIENTS,
            integrated_gradients=pb.IntegratedGradientsParams(n_steps=300),
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "needs 30000 rows of model work",
    ),
    "request too big": (
        request(inputs=[to_tensor_proto(np.zeros((100_000, 3), np.float32))]),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "",
    ),
    "layer on an input method": (request(layer="lin1"), grpc.StatusCode.INVALID_ARGUMENT, "layer is only for layer methods"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_request_gets_a_clear_status(server, name: str) -> None:
    req, code, message = CASES[name]
    got_code, details = status_of(server.address, req)
    assert got_code == code, details
    assert message in details


def outcomes_of(calls: list[grpc.Future]) -> list:
    """Each call's response, or the RpcError it ended with."""
    outcomes = []
    for call in calls:
        try:
            outcomes.append(call.result(timeout=60))
        except grpc.RpcError as e:
            outcomes.append(e)
    return outcomes


def test_model_failure_is_invalid_argument_and_fails_only_its_request(fusing_server) -> None:
    """8 IG requests of 50 rows on `fragile` (256 rows a pass), queued in order while the engine holds; the 4th
    breaks the model. They merge into two plans of at most a pass: requests 0-4 (250 rows) and 5-7 (150). Pass 1
    (0-4 and 6 rows of 5-7) fails and is re-run in halves: the failure is pinned on 0-4, whose requests start again
    each on its own plan, behind the rest of 5-7. Pass 2: the rest of 5-7 (144), 0, 1 and 12 rows of 2 (256). Pass 3:
    the rest of 2, 3 and 4 (138), re-run in halves until only 3 fails. Each other request equals Captum's answer for
    it and reports the passes it shared (a pass counts the requests in it, merged or not)."""
    good = np.array([[0.5, -1.0, 2.0]], dtype=np.float32)
    bad = np.array([[500.0, 0.0, 0.0]], dtype=np.float32)
    inputs = [bad if i == 3 else good * (i + 1) for i in range(8)]
    with AttributionClient(fusing_server.address) as client:
        calls = send_held(fusing_server, client, [
            AttributionClient.build_request("fragile", "integrated_gradients", x, target=1, params={"n_steps": 50}) for x in inputs
        ])
        outcomes = outcomes_of(calls)
    bad_outcome = outcomes[3]
    assert isinstance(bad_outcome, grpc.RpcError)
    assert bad_outcome.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input out of the model's range" in bad_outcome.details()
    timing = {0: (1, 256, 6), 1: (1, 256, 6), 2: (2, 394, 6), 4: (1, 138, 3), 5: (2, 512, 8), 6: (2, 512, 8), 7: (2, 512, 8)}
    for i, (passes, pass_rows, pass_requests) in timing.items():
        result = Attribution.from_response(outcomes[i], single=True)
        want = IntegratedGradients(Linear3()).attribute(torch.from_numpy(inputs[i]), target=1, n_steps=50)
        assert_all_close((torch.from_numpy(result.attributions),), (want.detach(),))
        assert {k: result.timing[k] for k in ("rows", "passes", "pass_rows", "pass_requests")} == {
            "rows": 50, "passes": passes, "pass_rows": pass_rows, "pass_requests": pass_requests}, i


def test_bad_target_in_a_fused_pass_fails_alone(fusing_server) -> None:
    """6 Saliency requests of 2 rows on `grid` (outputs (2, 3)), queued while the engine holds; the 3rd targets (2, 0),
    outside the output. All 12 rows share one pass; the pass rejects that request's rows alone, and every other
    request equals Captum's answer for it."""
    x = np.random.default_rng(1).standard_normal((2, 5)).astype(np.float32)
    with AttributionClient(fusing_server.address) as client:
        calls = send_held(fusing_server, client, [
            AttributionClient.build_request("grid", "saliency", x * (i + 1), target=(1, 2) if i != 2 else (2, 0)) for i in range(6)
        ])
        outcomes = outcomes_of(calls)
    assert isinstance(outcomes[2], grpc.RpcError) and outcomes[2].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "target" in outcomes[2].details()
    for i in (0, 1, 3, 4, 5):
        result = Attribution.from_response(outcomes[i], single=True)
        want = Saliency(MODELS["grid"]()).attribute(torch.from_numpy(x * (i + 1)).requires_grad_(), target=(1, 2))
        assert_all_close((torch.from_numpy(result.attributions),), (want.detach(),))
        assert {k: result.timing[k] for k in ("rows", "passes", "pass_rows", "pass_requests")} == {
            "rows": 2, "passes": 1, "pass_rows": 12, "pass_requests": 6}, i


def test_deadline_exceeded(server) -> None:
    code, _ = status_of(server.address, request(model="slow"), timeout=0.05)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_request_whose_rows_would_hold_too_many_bytes_is_refused_and_the_server_serves_on() -> None:
    """A request's plans build its rows at once (64 examples × 50 IG steps of a 2×8×8 image: 3,200 rows, 1.6 MiB), so
    their bytes are capped per request (--max-request-work-bytes; by default a quarter of the device's memory, where a
    request of 100,000 rows could otherwise take the engine's memory): over the cap, RESOURCE_EXHAUSTED that says why,
    before any work; then health still says SERVING and the next request gets Captum's numbers."""
    s = start_server(max_request_work_bytes=1 << 20)
    try:
        x = np.random.default_rng(0).standard_normal((64, 2, 8, 8)).astype(np.float32)
        big = AttributionClient.build_request("conv", "integrated_gradients", x, target=0, params={"n_steps": 50})
        code, details = status_of(s.address, big)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert "3200 rows of model work (64 example(s)" in details and "1.6 MiB of inputs" in details and "limit of 1.0 MiB" in details
        assert health(s.address) == health_pb2.HealthCheckResponse.SERVING
        with AttributionClient(s.address) as client:
            got = client.attribute("conv", "integrated_gradients", x[:8], target=0, params={"n_steps": 50}, timeout=60)  # 400 rows
        want = IntegratedGradients(MODELS["conv"]()).attribute(torch.from_numpy(x[:8]), target=0, n_steps=50)
        assert_all_close((torch.from_numpy(got.attributions),), (want.detach(),))
    finally:
        s.stop()


class EndedCall:
    """A grpc.aio context with `remaining` seconds to its deadline; it records the status set on it."""

    def __init__(self, remaining: float) -> None:
        self.remaining = remaining
        self.status: list = []

    def time_remaining(self) -> float:
        return self.remaining

    def set_trailing_metadata(self, metadata) -> None:
        pass

    def set_code(self, code) -> None:
        self.status.append(code)

    def set_details(self, details) -> None:
        self.status.append(details)


def test_an_error_that_comes_after_the_deadline_ends_the_handler_as_cancelled_not_with_a_failed_send() -> None:
    """The engine's DEADLINE_EXCEEDED can come back just after gRPC ended the call at its deadline: the status can no
    longer be sent, and grpc logged the failed send with a traceback (issue 12 step 38, test_failures' SIGTERM storm).
    The handler now ends as one that grpc cancelled at its deadline, counted DEADLINE_EXCEEDED. Before the deadline
    the error's status is set on the call, which grpc sends as the handler returns: the handler ends without raising
    (methods._Call; issue 12 step 41: `context.abort` left a reference cycle through the call's frames)."""
    import asyncio

    from attrserve_engine.errors import DeadlineExceeded
    from attrserve_service import metrics
    from attrserve_service.methods import _Call, _Method

    method = _Method("unary", "attrserve.test.Errors", "Late", None)
    counted = metrics.child(metrics.GRPC_SERVER_HANDLED_TOTAL, *method.labels, "DEADLINE_EXCEEDED")
    before = counted._value.get()
    message = "the request's deadline passed before its attribution was computed"

    async def end(context: EndedCall) -> bool:
        call = _Call(method, context)
        call.start = 0.0
        error = DeadlineExceeded(message)
        return await call.__aexit__(type(error), error, None)

    late = EndedCall(remaining=-0.001)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(end(late))
    assert late.status == [] and counted._value.get() == before + 1
    on_time = EndedCall(remaining=5.0)
    assert asyncio.run(end(on_time)) is True  # the exception is answered, not raised
    assert on_time.status == [grpc.StatusCode.DEADLINE_EXCEEDED, message] and counted._value.get() == before + 2


