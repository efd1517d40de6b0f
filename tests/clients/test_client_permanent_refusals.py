"""Refusals that the same request meets whenever it is sent are not retried by the Python client, against a real
server (its engine in an engine process, as `attrserve serve` runs it): a request over --max-rows-per-request or
--max-request-work-bytes (the server says so with `grpc-retry-pushback-ms: -1`, gRPC's A6 "do not retry"), and a
message over --max-request-bytes (refused by gRPC itself, before attrserve's code sees it). Attempts are counted
from the server's metrics. After each, the server answers a correct request with Captum's numbers and health is
SERVING."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients
from grpc_health.v1 import health_pb2, health_pb2_grpc

from attrserve_client import AsyncAttributionClient, AttributionClient, RequestFailed, RetryPolicy
from attrserve_engine import EngineLimits
from attrserve_service.config import ServerConfig
from servers import ServerThread, scrape

RETRY = RetryPolicy(max_attempts=5, initial_backoff=0.01, max_backoff=0.02)  # the default's attempts, quicker
X = np.array([[0.3, -0.2, 0.9, 1.4], [1.0, 0.5, -0.4, 0.2]], dtype=np.float32)  # 16 bytes an example
TARGET = [0, 1]
MODEL = """
import torch
from torch import nn


def build_model():
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
"""
# IG's rows: examples × n_steps. Default (50 steps): 100 rows, 1,600 bytes, under both caps.
MAX_ROWS, MAX_WORK_BYTES, MAX_REQUEST_BYTES = 1000, 4000, 20_000


def captum() -> np.ndarray:
    namespace: dict = {}
    exec(MODEL, namespace)
    return IntegratedGradients(namespace["build_model"]()).attribute(torch.from_numpy(X), target=TARGET).numpy()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerThread]:
    repo = tmp_path_factory.mktemp("repo")
    (repo / "m").mkdir()
    (repo / "m" / "model.py").write_text(MODEL)
    (repo / "m" / "config.pbtxt").write_text('inputs { name: "x" dtype: DATA_TYPE_FLOAT32 dims: 4 }\n')
    limits = EngineLimits(default_device="cpu", probe_batch_rows=False, max_rows_per_request=MAX_ROWS,
                          max_request_work_bytes=MAX_WORK_BYTES)
    server = ServerThread(None, ServerConfig(port=0, metrics_port=0, model_repository=Path(repo), limits=limits,
                                             max_request_bytes=MAX_REQUEST_BYTES))
    yield server
    server.stop()


def counts(server: ServerThread) -> dict[str, float]:
    """Attribute calls the server handled, by code, and the calls gRPC's core started (attrserve's code saw or not)."""
    page = scrape(server.running.metrics_port)
    out = {"core": page[("attrserve_grpc_core_calls_started_total", frozenset())]}
    for (name, labels), value in page.items():
        labels = dict(labels)
        if name == "grpc_server_handled_total" and labels["grpc_method"] == "Attribute" and labels["grpc_type"] == "unary":
            out[labels["grpc_code"]] = value
    return out


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}


def still_serving(server: ServerThread) -> None:
    with AttributionClient(server.address, retry=RETRY) as client:
        answer = client.attribute("m", "integrated_gradients", X, target=TARGET, timeout=60)
        np.testing.assert_allclose(answer.attributions, captum(), atol=1e-5)
        reply = health_pb2_grpc.HealthStub(client._channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def refused_async(server: ServerThread, params: dict | None = None, options: list | None = None) -> grpc.RpcError:
    """The error AsyncAttributionClient raises for IG on X with `params` over a channel with `options`."""

    async def call() -> grpc.RpcError:
        async with AsyncAttributionClient(server.address, retry=RETRY, options=options) as client:
            with pytest.raises(grpc.RpcError) as refused:
                await client.attribute("m", "integrated_gradients", X, target=TARGET, params=params, timeout=60)
        return refused.value

    return asyncio.run(call())


@pytest.mark.parametrize(
    ("n_steps", "says"),
    [(600, "over this server's limit of 1000 rows per request"), (200, "over this server's limit of 3.9 KiB per request")],
    ids=["max-rows-per-request", "max-request-work-bytes"],
)
def test_a_request_over_a_limit_per_request_is_sent_once(server, n_steps, says) -> None:
    still_serving(server)  # (the model is loaded and warm)
    before = counts(server)
    with AttributionClient(server.address, retry=RETRY) as client, pytest.raises(grpc.RpcError) as refused:
        # IG draws no random numbers: replayable, so the client would retry it
        client.attribute("m", "integrated_gradients", X, target=TARGET, params={"n_steps": n_steps}, timeout=60)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and says in refused.value.details(), refused.value.details()
    assert delta(before, counts(server)) == {"core": 1, "RESOURCE_EXHAUSTED": 1}  # one attempt (the bug: 5)
    assert ("grpc-retry-pushback-ms", "-1") in tuple(refused.value.trailing_metadata())

    before = counts(server)
    assert refused_async(server, params={"n_steps": n_steps}).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert delta(before, counts(server)) == {"core": 1, "RESOURCE_EXHAUSTED": 1}
    still_serving(server)


def test_a_message_over_max_request_bytes_is_sent_once(server) -> None:
    big = np.zeros((2000, 4), np.float32)  # 32,000 bytes of tensor
    before = counts(server)
    with AttributionClient(server.address, retry=RETRY) as client, pytest.raises(grpc.RpcError) as refused:
        client.attribute("m", "integrated_gradients", big, target=0, timeout=60)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.details().startswith("SERVER: Received message larger than max ("), refused.value.details()
    # gRPC refused it before attrserve's code saw it: one call gRPC started, none handled
    assert delta(before, counts(server)) == {"core": 1}
    still_serving(server)


def test_an_answer_over_the_clients_max_receive_message_length_is_asked_for_once(server) -> None:
    # gRPC's client refuses the answer itself ("Stream removed (CLIENT: Received message larger than max (N vs. 64))"):
    # the same answer is as large every time, so a retry only repeats the server's work (the bug: 5 attempts)
    small = [("grpc.max_receive_message_length", 64)]
    still_serving(server)
    before = counts(server)
    with AttributionClient(server.address, retry=RETRY, options=small) as client, pytest.raises(grpc.RpcError) as refused:
        client.attribute("m", "integrated_gradients", X, target=TARGET, timeout=60)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "CLIENT: Received message larger than max (" in refused.value.details(), refused.value.details()
    assert delta(before, counts(server)) == {"core": 1, "OK": 1}  # one attempt, answered

    before = counts(server)
    assert refused_async(server, options=small).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert delta(before, counts(server)) == {"core": 1, "OK": 1}
    still_serving(server)


def test_a_streamed_request_over_a_limit_per_request_is_failed_as_permanent(server) -> None:
    """On AttributeStream the refusal's entry carries the unsigned field's largest value for "do not retry" (it said 0,
    "no hint"): attribute_many's RequestFailed tells it as `permanent`; the stream's other request is answered."""
    items = [{"model": "m", "algorithm": "integrated_gradients", "inputs": X, "target": TARGET, "params": {"n_steps": 600}},
             {"model": "m", "algorithm": "integrated_gradients", "inputs": X, "target": TARGET}]
    with AttributionClient(server.address, retry=RETRY) as client:
        refused, answered = list(client.attribute_many(items, timeout=60))
    assert isinstance(refused, RequestFailed) and refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.permanent and refused.retry_after_ms == RequestFailed.NO_RETRY_MS == 2**32 - 1
    np.testing.assert_allclose(answered.attributions, captum(), atol=1e-5)
    still_serving(server)
