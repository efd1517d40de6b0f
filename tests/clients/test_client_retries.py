"""The Python client's retries, deadlines, torch tensors in, and attribute_many, against in-process fake servers."""

import asyncio
import queue
import threading
import time

import grpc
import numpy as np
import pytest

from attrserve.v1 import attribution_service_pb2 as pb
from attrserve.v1 import attribution_service_pb2_grpc as pb_grpc
from attrserve.v1 import tensor_pb2
from attrserve_client import (AsyncAttributionClient, Attribution, AttributionClient, RequestFailed, RetryPolicy,
                              build_request, from_tensor_proto, replayable, to_tensor_proto)
from servers import fake_server

FAST = RetryPolicy(initial_backoff=0.01, max_backoff=0.02)
X = np.array([[1.0, 2.0, 3.0]], np.float32)


class Flaky(pb_grpc.AttributionServiceServicer, pb_grpc.ModelRepositoryServiceServicer):
    """Refuses the first `fail` calls of every method with `code` (and `pushback_ms` as the retry hint), then answers."""

    def __init__(self):
        self.fail, self.code, self.pushback_ms, self.delay = 0, grpc.StatusCode.UNAVAILABLE, None, 0.0
        self.calls = {}
        self.times = []
        self.deadlines = []
        self.lock = threading.Lock()

    def _gate(self, name, context):
        with self.lock:
            n = self.calls[name] = self.calls.get(name, 0) + 1
            self.times.append(time.monotonic())
            self.deadlines.append(context.time_remaining())
        time.sleep(self.delay)
        if n <= self.fail:
            if self.pushback_ms is not None:
                context.set_trailing_metadata((("grpc-retry-pushback-ms", str(self.pushback_ms)),))
            context.abort(self.code, f"refused ({n})")

    def ListModels(self, request, context):
        self._gate("ListModels", context)
        return pb.ListModelsResponse(models=[pb.ModelInfo(config={"name": "toy"})])

    def GetModel(self, request, context):
        self._gate("GetModel", context)
        return pb.GetModelResponse(model=pb.ModelInfo(config={"name": request.model}))

    def Attribute(self, request, context):
        self._gate("Attribute", context)
        self.last = request
        return pb.AttributeResponse(attributions=[to_tensor_proto(from_tensor_proto(t) * 2) for t in request.inputs])

    def RepositoryIndex(self, request, context):
        self._gate("RepositoryIndex", context)
        return pb.RepositoryIndexResponse()

    def LoadModel(self, request, context):
        self._gate("LoadModel", context)
        return pb.LoadModelResponse()

    def UnloadModel(self, request, context):
        self._gate("UnloadModel", context)
        return pb.UnloadModelResponse()

    def AttributeStream(self, request_iterator, context):
        """Collects what has arrived for 30 ms, then answers it in reverse order: out of order, and it shows how many
        requests the client had in flight at once (`most_pending`)."""
        arrived = queue.Queue()
        done = object()

        def read():
            for item in request_iterator:
                arrived.put(item.request)
            arrived.put(done)

        threading.Thread(target=read, daemon=True).start()
        self.most_pending, finished = 0, False
        while not finished:
            time.sleep(0.03)
            batch = []
            while not arrived.empty():
                item = arrived.get()
                if item is done:
                    finished = True
                else:
                    batch.append(item)
            self.most_pending = max(self.most_pending, len(batch))
            for request in reversed(batch):
                if request.model == "broken":
                    error = pb.RequestError(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message="no such model")
                    yield pb.AttributeStreamResponse(request_id=request.request_id, error=error)
                    continue
                response = pb.AttributeResponse(request_id=request.request_id,
                                                attributions=[to_tensor_proto(from_tensor_proto(t) * 2) for t in request.inputs])
                yield pb.AttributeStreamResponse(request_id=request.request_id, response=response)


@pytest.fixture
def flaky():
    fake = Flaky()
    with fake_server(fake, workers=8, repository=True) as address:
        yield address, fake


# --- retries -------------------------------------------------------------------------------------

@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_idempotent_calls_are_retried_until_they_answer(flaky, code):
    address, fake = flaky
    fake.fail, fake.code = 2, code
    with AttributionClient(address, retry=FAST) as client:
        assert [m.config.name for m in client.list_models()] == ["toy"]
        assert client.get_model("toy").config.name == "toy"
        assert client.repository_index() == []
        assert client.attribute("toy", "saliency", X).attributions.tolist() == [[2.0, 4.0, 6.0]]  # draws nothing at random
    assert fake.calls == {"ListModels": 3, "GetModel": 3, "RepositoryIndex": 3, "Attribute": 3}


def test_attempts_are_capped(flaky):
    address, fake = flaky
    fake.fail = 10
    with AttributionClient(address, retry=RetryPolicy(max_attempts=3, initial_backoff=0.01)) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.list_models()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and err.value.details() == "refused (3)"
    assert fake.calls == {"ListModels": 3}


def test_total_retry_time_is_capped(flaky):
    address, fake = flaky
    fake.fail, fake.pushback_ms = 10, 200
    start = time.monotonic()
    with AttributionClient(address, retry=RetryPolicy(max_attempts=10, max_total=0.5)) as client:
        with pytest.raises(grpc.RpcError):
            client.list_models()
    assert fake.calls == {"ListModels": 3} and time.monotonic() - start < 2  # waits 0.2 + 0.2; a third would end past 0.5


def test_resource_exhausted_waits_for_the_pushback_hint(flaky):
    address, fake = flaky
    fake.fail, fake.code, fake.pushback_ms = 1, grpc.StatusCode.RESOURCE_EXHAUSTED, 400
    with AttributionClient(address, retry=FAST) as client:
        client.get_model("toy")
    waited = fake.times[1] - fake.times[0]
    assert fake.calls == {"GetModel": 2} and 0.38 <= waited < 1.5, waited


def test_negative_pushback_means_no_retry(flaky):
    address, fake = flaky
    fake.fail, fake.code, fake.pushback_ms = 1, grpc.StatusCode.RESOURCE_EXHAUSTED, -1
    with AttributionClient(address, retry=FAST) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.get_model("toy")
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and fake.calls == {"GetModel": 1}


def test_non_idempotent_calls_are_not_retried(flaky):
    address, fake = flaky
    fake.fail = 1
    with AttributionClient(address, retry=FAST) as client:
        for call in (client.load_model, client.unload_model):
            with pytest.raises(grpc.RpcError) as err:
                call("toy")
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # An unseeded request of an algorithm that draws random numbers would answer differently: not retried.
        with pytest.raises(grpc.RpcError):
            client.attribute("toy", "gradient_shap", X, baselines=np.zeros((2, 3), np.float32))
    assert fake.calls == {"LoadModel": 1, "UnloadModel": 1, "Attribute": 1}


def test_seeded_random_requests_are_retried(flaky):
    address, fake = flaky
    fake.fail = 1
    with AttributionClient(address, retry=FAST) as client:
        client.attribute("toy", "gradient_shap", X, baselines=np.zeros((2, 3), np.float32), seed=3)
    assert fake.calls == {"Attribute": 2} and fake.last.seed == 3


def test_replayable():
    assert replayable(build_request("m", "integrated_gradients", X))
    assert replayable(build_request("m", "saliency", X, also=[{"algorithm": "deep_lift"}]))
    assert not replayable(build_request("m", "lime", X))
    assert replayable(build_request("m", "lime", X, seed=0))
    assert not replayable(build_request("m", "saliency", X, noise_tunnel={"nt_samples": 2}))
    assert not replayable(build_request("m", "saliency", X, also=[{"algorithm": "kernel_shap"}]))
    assert not replayable(build_request("m", "saliency", X, evaluate={"infidelity": {}}))
    assert not replayable(build_request("m", "my_plugin", X))  # a plugin may draw


@pytest.mark.asyncio
async def test_async_client_retries_too(flaky):
    address, fake = flaky
    fake.fail = 2
    async with AsyncAttributionClient(address, retry=FAST) as client:
        assert [m.config.name for m in await client.list_models()] == ["toy"]
        with pytest.raises(grpc.aio.AioRpcError):
            await client.load_model("toy")
    assert fake.calls == {"ListModels": 3, "LoadModel": 1}


# --- deadlines -----------------------------------------------------------------------------------

def test_default_deadline_applies_and_can_be_overridden(flaky):
    address, fake = flaky
    with AttributionClient(address) as client:
        client.list_models()
    assert 25 < fake.deadlines[-1] <= 30.1  # the default: 30 s (the server reads it a little differently)
    fake.delay = 0.5
    with AttributionClient(address, timeout=0.2) as client:
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            client.get_model("toy")
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - start < 0.45
        assert client.get_model("toy", timeout=5).config.name == "toy"  # a call's own timeout wins
        assert 4 < fake.deadlines[-1] <= 5.1
        client.list_models(timeout=float("inf"))  # none at all
        assert fake.deadlines[-1] is None or fake.deadlines[-1] > 1e6


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("-inf"), "5"])
def test_a_timeout_that_is_no_positive_number_is_refused_naming_it(flaky, bad):
    """gRPC failed such a call at once with DEADLINE_EXCEEDED (a string: a TypeError from the client's arithmetic)."""
    address, fake = flaky
    with pytest.raises(ValueError, match="timeout: expected a positive number of seconds"):
        AttributionClient(address, timeout=bad)
    with AttributionClient(address) as client:
        with pytest.raises(ValueError, match="timeout: expected a positive number of seconds"):
            client.list_models(timeout=bad)
        with pytest.raises(ValueError, match="timeout: expected a positive number of seconds"):
            list(client.attribute_stream([build_request("toy", "saliency", X)], timeout=bad))
        with pytest.raises(ValueError, match="timeout: expected a positive number of seconds"):
            list(client.attribute_many([{"model": "toy", "algorithm": "saliency", "inputs": X}], timeout=bad))
        assert client.list_models()[0].config.name == "toy"
    assert fake.calls == {"ListModels": 1}  # nothing else was sent


def test_a_timeout_past_what_grpc_can_hold_is_no_deadline(flaky):
    """gRPC holds a deadline as int64 nanoseconds since the epoch: a timeout of 1e10 s was DEADLINE_EXCEEDED at once."""
    address, fake = flaky
    with AttributionClient(address, timeout=1e12) as client:
        assert client.list_models()[0].config.name == "toy"
        assert client.get_model("toy", timeout=1e10).config.name == "toy"
        assert [r.attributions.tolist() for r in client.attribute_many([{"model": "toy", "algorithm": "saliency", "inputs": X}],
                                                                     timeout=1e10)] == [(X * 2).tolist()]
    assert all(d is None or d > 1e6 for d in fake.deadlines)

    async def main():
        async with AsyncAttributionClient(address) as client:
            return (await client.list_models(timeout=1e12))[0].config.name

    assert asyncio.run(main()) == "toy"


def test_the_deadline_covers_every_attempt(flaky):
    address, fake = flaky
    fake.fail, fake.pushback_ms = 10, 150
    with AttributionClient(address, timeout=0.5, retry=RetryPolicy(max_attempts=10)) as client:
        start = time.monotonic()
        with pytest.raises(grpc.RpcError):
            client.list_models()
    assert time.monotonic() - start < 0.5 and fake.calls["ListModels"] == 4  # 3 waits of 0.15; a 4th would pass it


# --- torch tensors in ----------------------------------------------------------------------------

def test_torch_tensors_in(flaky):
    torch = pytest.importorskip("torch")
    address, fake = flaky
    x = torch.tensor([[0.5, -1.0, 2.0]], requires_grad=True)
    with AttributionClient(address) as client:
        result = client.attribute("toy", "integrated_gradients", x, baselines=torch.zeros(1, 3), target=torch.tensor([0]),
                                  additional_forward_args=torch.ones(1, dtype=torch.int64))
        assert result.attributions.tolist() == [[1.0, -2.0, 4.0]]
        sent = fake.last
        assert sent.inputs[0].dtype == tensor_pb2.DATA_TYPE_FLOAT32
        assert from_tensor_proto(sent.baselines[0].tensor).tolist() == [[0.0, 0.0, 0.0]]
        assert sent.target == pb.Target(index=0)  # a tensor of one element is one index, as Captum reads it
        assert sent.additional_forward_args[0].dtype == tensor_pb2.DATA_TYPE_INT64
        two = client.attribute("toy", "saliency", (x, torch.tensor([[1, 2]])))  # a tuple of tensors: one per input
        assert [a.tolist() for a in two.attributions] == [[[1.0, -2.0, 4.0]], [[2, 4]]]
    wire = to_tensor_proto(torch.tensor([[1.5, -2.0]], dtype=torch.bfloat16))
    assert wire.dtype == tensor_pb2.DATA_TYPE_BFLOAT16 and from_tensor_proto(wire).tolist() == [[1.5, -2.0]]
    assert to_tensor_proto(torch.arange(3, dtype=torch.int16)).dtype == tensor_pb2.DATA_TYPE_INT16


# --- attribute_many ------------------------------------------------------------------------------

def test_attribute_many_in_order_with_bounded_in_flight(flaky):
    address, fake = flaky
    requests = ({"model": "toy", "algorithm": "saliency", "inputs": X * i} for i in range(20))
    with AttributionClient(address) as client:
        results = list(client.attribute_many(requests, max_in_flight=4))
    assert [r.request_id for r in results] == [str(i) for i in range(20)]
    assert all(isinstance(r, Attribution) for r in results)
    assert [r.attributions.tolist() for r in results] == [(X * i * 2).tolist() for i in range(20)]
    assert 1 < fake.most_pending <= 4


def test_attribute_many_as_completed_and_errors_in_place(flaky):
    address, fake = flaky
    requests = [build_request("broken" if i == 3 else "toy", "saliency", (X * i, X), request_id=f"r{i}") for i in range(6)]
    with AttributionClient(address) as client:
        results = list(client.attribute_many(requests, max_in_flight=6, ordered=False))
    by_id = {r.request_id: r for r in results}
    assert sorted(by_id) == [f"r{i}" for i in range(6)] and len(results) == 6
    assert [r.request_id for r in results] != [f"r{i}" for i in range(6)]  # the fake answers each batch backwards
    assert isinstance(by_id["r3"], RequestFailed) and by_id["r3"].code == grpc.StatusCode.INVALID_ARGUMENT
    assert isinstance(by_id["r1"].attributions, tuple) and by_id["r1"].attributions[1].tolist() == (X * 2).tolist()


def test_attribute_many_bad_request_raises(flaky):
    address, _ = flaky
    with AttributionClient(address) as client:
        with pytest.raises(ValueError, match=r"requests\[1\]: needs model, algorithm and inputs; missing inputs"):
            list(client.attribute_many([{"model": "toy", "algorithm": "saliency", "inputs": X},
                                        {"model": "toy", "algorithm": "saliency"}]))


@pytest.mark.asyncio
async def test_async_attribute_many_in_order_as_completed_and_errors_in_place(flaky):
    address, fake = flaky

    async def requests():  # an async iterable, read as room opens
        for i in range(12):
            yield {"model": "toy", "algorithm": "saliency", "inputs": X * i}

    async with AsyncAttributionClient(address) as client:
        ordered = [r async for r in client.attribute_many(requests(), max_in_flight=4)]
        assert 1 < fake.most_pending <= 4  # bounded in flight
        mixed = [build_request("broken" if i == 3 else "toy", "saliency", X * i, request_id=f"r{i}") for i in range(6)]
        completed = [r async for r in client.attribute_many(mixed, max_in_flight=6, ordered=False)]
    assert [r.request_id for r in ordered] == [str(i) for i in range(12)]
    assert [r.attributions.tolist() for r in ordered] == [(X * i * 2).tolist() for i in range(12)]
    by_id = {r.request_id: r for r in completed}
    assert sorted(by_id) == [f"r{i}" for i in range(6)] and len(completed) == 6
    assert isinstance(by_id["r3"], RequestFailed) and by_id["r3"].code == grpc.StatusCode.INVALID_ARGUMENT
    assert by_id["r2"].attributions.tolist() == (X * 4).tolist()


def test_a_client_retries_by_default_outside_the_tests(monkeypatch) -> None:
    """tests/conftest.py turns the default off for the other tests; the package's own default retries."""
    import attrserve_client.client as module

    monkeypatch.undo()  # this test's view: the package as installed
    assert module.DEFAULT_RETRY == RetryPolicy() and RetryPolicy().max_attempts > 1
    with module.AttributionClient("127.0.0.1:1") as client:  # no call: nothing connects
        assert client._retry == RetryPolicy()
