"""The oracle case table through a real gRPC server and the Python client, alone and fused."""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest
import torch

from attrserve_client import AttributionClient
from oracle import CASES, MODELS, Case, captum_attribute

ATOL = RTOL = 1e-5


def call(client: AttributionClient, case: Case, built: dict) -> object:
    inputs = tuple(x.numpy() for x in built["inputs"])
    target = built["target"].numpy()
    return client.attribute(
        case.model,
        case.algorithm,
        inputs,
        baselines=tuple(b if isinstance(b, float) else b.numpy() for b in built["baselines"]) or None,
        target=[tuple(int(i) for i in row) for row in target],
        additional_forward_args=tuple(a.numpy() for a in built["args"]) or None,
        params=case.params or None,
        noise_tunnel=case.noise_tunnel,
        seed=case.seed,
        return_convergence_delta=case.delta,
        timeout=60,
    )


def check(result, case: Case, built: dict) -> None:
    want, want_delta = captum_attribute(case, MODELS[case.model](), built)
    assert len(result.attributions) == len(want)
    for got, w in zip(result.attributions, want):
        np.testing.assert_allclose(got, w.numpy(), atol=ATOL, rtol=RTOL)
    if case.delta:
        np.testing.assert_allclose(result.convergence_delta, want_delta.numpy(), atol=ATOL, rtol=RTOL)
    else:
        assert result.convergence_delta is None


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_server_matches_captum(server, case: Case) -> None:
    built = case.build()
    with AttributionClient(server.address) as client:
        result = call(client, case, built)
    check(result, case, built)
    assert result.seed == case.seed
    assert result.model_version == "1"


def test_concurrent_requests_fuse_and_stay_correct(fusing_server) -> None:
    cases = [c for c in CASES if c.model == "conv"]
    built = [c.build() for c in cases]
    with AttributionClient(fusing_server.address) as client, concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(lambda cb: call(client, *cb), zip(cases, built)))
    for case, b, result in zip(cases, built, results):
        check(result, case, b)
    assert max(r.timing["pass_requests"] for r in results) > 1
    # Fused: far fewer passes than requests × stages.
    total_passes = sum(r.timing["passes"] for r in results)
    assert min(r.timing["passes"] for r in results) >= 1
    assert total_passes >= len(cases)  # every request counts the passes it took part in


def test_return_outputs_through_the_server(server) -> None:
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    with AttributionClient(server.address) as client:
        result = client.attribute("mlp", "saliency", x, target=2, return_outputs=True)
    with torch.no_grad():
        want = MODELS["mlp"]()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(result.outputs, want, atol=1e-6)
    assert result.attributions.shape == x.shape
