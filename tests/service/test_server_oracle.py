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


def test_captums_memory_hints_are_taken_and_change_nothing(server) -> None:
    """internal_batch_size on each of the six algorithms whose Captum attribute takes it, and NoiseTunnel's
    nt_samples_batch_size: the client sets them on the typed messages and the server answers as without them (0 too:
    Captum takes any internal_batch_size). An nt_samples_batch_size of 0 (Captum divides by it) is INVALID_ARGUMENT
    naming the field; then health says SERVING and the next request gets Captum's numbers."""
    import grpc
    from grpc_health.v1 import health_pb2

    from test_model_management import health

    x = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)
    hinted = {
        "integrated_gradients": ("", {"n_steps": 8}),
        "layer_integrated_gradients": ("fc1", {"n_steps": 8}),
        "layer_conductance": ("act1", {"n_steps": 8}),
        "internal_influence": ("fc2", {"n_steps": 8}),
        "neuron_integrated_gradients": ("fc2", {"n_steps": 8, "neuron_selector": [1]}),
        "neuron_conductance": ("act1", {"n_steps": 8, "neuron_selector": [1]}),
    }
    with AttributionClient(server.address) as client:
        for algorithm, (layer, params) in hinted.items():
            target = None if algorithm == "neuron_integrated_gradients" else [0, 1, 2]
            request = AttributionClient.build_request("mlp", algorithm, x, target=target, layer=layer, params={**params, "internal_batch_size": 3})
            assert getattr(request, algorithm).internal_batch_size == 3
            want = client.attribute("mlp", algorithm, x, target=target, layer=layer, params=params, timeout=60).attributions[0]
            for value in (3, 0):
                got = client.attribute("mlp", algorithm, x, target=target, layer=layer, params={**params, "internal_batch_size": value}, timeout=60)
                np.testing.assert_array_equal(got.attributions[0], want, err_msg=f"{algorithm} internal_batch_size={value}")
        nt = {"nt_samples": 4, "stdevs": 0.2}
        want = client.attribute("mlp", "saliency", x, target=0, noise_tunnel=nt, seed=3, timeout=60).attributions[0]
        got = client.attribute("mlp", "saliency", x, target=0, noise_tunnel={**nt, "nt_samples_batch_size": 4}, seed=3, timeout=60)
        np.testing.assert_array_equal(got.attributions[0], want)
        with pytest.raises(grpc.RpcError) as refused:  # under nt_samples with a seed: Captum's numbers depend on the chunk
            client.attribute("mlp", "saliency", x, target=0, noise_tunnel={**nt, "nt_samples_batch_size": 2}, seed=3, timeout=60)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "nt_samples_batch_size 2 is below nt_samples 4" in refused.value.details()
        got = client.attribute("mlp", "saliency", x, target=0, noise_tunnel={**nt, "nt_samples_batch_size": 2}, timeout=60)  # unseeded: taken
        assert got.attributions[0].shape == want.shape
        with pytest.raises(grpc.RpcError) as refused:
            client.attribute("mlp", "saliency", x, target=0, noise_tunnel={**nt, "nt_samples_batch_size": 0}, seed=3, timeout=60)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "noise_tunnel.nt_samples_batch_size must be at least 1, got 0" in refused.value.details()
        assert health(server.address) == health_pb2.HealthCheckResponse.SERVING
        case = next(c for c in CASES if c.params.get("internal_batch_size"))
        built = case.build()
        check(call(client, case, built), case, built)
