"""The oracle case table through a real gRPC server and the Python client, alone and fused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attrserve_client import Attribution, AttributionClient
from oracle import CASES, MODELS, Case, assert_informative, captum_attribute
from servers import send_held

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
    assert_informative(want, ATOL)
    for got, w in zip(result.attributions, want):
        assert got.dtype == w.numpy().dtype == np.float32
        np.testing.assert_allclose(got, w.numpy(), atol=ATOL, rtol=RTOL)
    if case.delta:
        assert result.convergence_delta.dtype == np.float32
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


def request_for(case: Case, built: dict):
    return AttributionClient.build_request(
        case.model,
        case.algorithm,
        tuple(x.numpy() for x in built["inputs"]),
        baselines=tuple(b if isinstance(b, float) else b.numpy() for b in built["baselines"]) or None,
        target=[tuple(int(i) for i in row) for row in built["target"].numpy()],
        additional_forward_args=tuple(a.numpy() for a in built["args"]) or None,
        params=case.params or None,
        noise_tunnel=case.noise_tunnel,
        seed=case.seed,
        return_convergence_delta=case.delta,
    )


def groups_of(case: Case) -> dict[str, int]:
    """The batch keys a case's rows go to, and how many rows it puts under each. Every case of the table is one stage:
    gradient rows (steps, samples or the inputs, for each noise-tunnel copy), DeepLift's pairs (keyed by eps too), and
    the convergence delta's forward rows (end and start point per example; per sample for GradientShap)."""
    examples = case.n * (case.noise_tunnel["nt_samples"] if case.noise_tunnel else 1)
    per_example = {"integrated_gradients": case.params.get("n_steps", 50), "gradient_shap": case.params.get("n_samples", 5)}.get(case.algorithm, 1)
    if case.algorithm == "deep_lift":
        groups = {f"deeplift eps={case.params.get('eps', 1e-10)}": 2 * examples}
    else:
        groups = {"gradient": per_example * examples}
    if case.delta:
        groups["forward"] = 2 * examples * (per_example if case.algorithm == "gradient_shap" else 1)
    return groups


def test_concurrent_requests_fuse_and_stay_correct(fusing_server) -> None:
    """Every conv case of the table, queued together (held): each batch key's rows are cut in exactly one pass (all
    fit in 4096 rows), so a request takes one pass per key it uses, shared with every request using that key."""
    cases = [c for c in CASES if c.model == "conv"]
    built = [c.build() for c in cases]
    groups = [groups_of(c) for c in cases]
    rows_of_key: dict[str, int] = {}
    requests_of_key: dict[str, int] = {}
    for g in groups:
        for key, rows in g.items():
            rows_of_key[key] = rows_of_key.get(key, 0) + rows
            requests_of_key[key] = requests_of_key.get(key, 0) + 1
    assert max(rows_of_key.values()) <= 4096 and set(rows_of_key) == {"gradient", "forward", "deeplift eps=1e-10", "deeplift eps=1e-06"}
    engine = fusing_server.running.engine
    passes, rows = engine.passes, engine.rows
    with AttributionClient(fusing_server.address) as client:
        calls = send_held(fusing_server, client, [request_for(c, b) for c, b in zip(cases, built)])
        results = [Attribution.from_response(call.result(timeout=60), single=False) for call in calls]
    for case, b, result in zip(cases, built, results):
        check(result, case, b)
    assert (engine.passes - passes, engine.rows - rows) == (len(rows_of_key), sum(rows_of_key.values()))
    for case, g, result in zip(cases, groups, results):
        expected = {
            "rows": sum(g.values()),
            "passes": len(g),
            "pass_rows": sum(rows_of_key[k] for k in g),
            "pass_requests": max(requests_of_key[k] for k in g),
        }
        assert {k: result.timing[k] for k in expected} == expected, case.id


def test_return_outputs_through_the_server(server) -> None:
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    with AttributionClient(server.address) as client:
        result = client.attribute("mlp", "saliency", x, target=2, return_outputs=True)
    with torch.no_grad():
        want = MODELS["mlp"]()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(result.outputs, want, atol=1e-6)
    assert result.attributions.shape == x.shape
