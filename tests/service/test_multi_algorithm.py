"""Several algorithms on one input in one request: each equals its own request, and their rows share passes."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from attrserve_client import AttributionClient
from oracle import example_inputs


def test_several_algorithms_in_one_request_equal_separate_requests(fusing_server) -> None:
    (x,), _ = example_inputs("conv", 2, seed=21)
    x = x.numpy()
    common = dict(target=[0, 2], baselines=0.1, seed=3)
    also = [
        {"algorithm": "saliency", "params": {"abs": False}},
        {"algorithm": "deep_lift", "return_convergence_delta": True},
        {"algorithm": "gradient_shap", "params": {"n_samples": 4, "stdevs": 0.2}},
        {"algorithm": "layer_grad_cam", "layer": "conv2", "params": {"relu_attributions": True}},
        {"algorithm": "saliency", "noise_tunnel": {"nt_type": "smoothgrad", "nt_samples": 3, "stdevs": 0.1}},
    ]
    with AttributionClient(fusing_server.address) as client:
        combined = client.attribute("conv", "integrated_gradients", x, params={"n_steps": 16}, return_convergence_delta=True, also=also, **common)
        alone = client.attribute("conv", "integrated_gradients", x, params={"n_steps": 16}, return_convergence_delta=True, **common)
        separate = []
        for spec in also:
            kwargs = dict(common)
            if spec["algorithm"] in ("saliency", "layer_grad_cam"):
                kwargs.pop("baselines")
            separate.append(
                client.attribute(
                    "conv", spec["algorithm"], x, params=spec.get("params"), layer=spec.get("layer"),
                    noise_tunnel=spec.get("noise_tunnel"), return_convergence_delta=spec.get("return_convergence_delta", False), **kwargs,
                )
            )
    np.testing.assert_allclose(combined.attributions, alone.attributions, atol=1e-6)
    np.testing.assert_allclose(combined.convergence_delta, alone.convergence_delta, atol=1e-6)
    assert [a.algorithm for a in combined.also] == [s["algorithm"] for s in also]
    for got, want in zip(combined.also, separate):
        np.testing.assert_allclose(got.attributions, want.attributions, atol=1e-6)
        if want.convergence_delta is not None:
            np.testing.assert_allclose(got.convergence_delta, want.convergence_delta, atol=1e-6)
    # One request, one set of passes: the combined request needed far fewer passes than the six separate ones.
    assert combined.timing["passes"] < sum(r.timing["passes"] for r in [alone, *separate])
    assert combined.timing["rows"] == alone.timing["rows"] + sum(r.timing["rows"] for r in separate)


def test_bad_also_entries_are_named(server) -> None:
    x = np.zeros((1, 6), np.float32)
    with AttributionClient(server.address) as client:
        with pytest.raises(grpc.RpcError) as bad:
            client.attribute("mlp", "saliency", x, target=0, also=[{"algorithm": "integrated_gradients", "params": {"n_steps": -3}}])
        with pytest.raises(grpc.RpcError) as layer:
            client.attribute("mlp", "saliency", x, target=0, also=[{"algorithm": "layer_activation", "layer": "nope"}])
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "n_steps" in bad.value.details()
    assert layer.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in layer.value.details()


def test_quality_metrics_in_the_same_request(server) -> None:
    import torch

    from attrserve_engine import AttributionJob

    (x,), _ = example_inputs("conv", 2, seed=22)
    evaluate = {"infidelity": {"n_perturb_samples": 3, "noise_scale": 0.02}, "sensitivity_max": {"n_perturb_samples": 2, "perturb_radius": 0.03}}
    with AttributionClient(server.address) as client:
        got = client.attribute("conv", "integrated_gradients", x.numpy(), target=[1, 0], params={"n_steps": 10}, seed=4, evaluate=evaluate)
        plain = client.attribute("conv", "integrated_gradients", x.numpy(), target=[1, 0], params={"n_steps": 10}, seed=4)
    want = server.running.engine.attribute(
        AttributionJob(model="conv", algorithm="integrated_gradients", inputs=(x,), target=torch.tensor([[1], [0]]), params={"n_steps": 10}, seed=4, evaluate=evaluate)
    )
    np.testing.assert_allclose(got.attributions, plain.attributions, atol=1e-6)
    np.testing.assert_allclose(got.infidelity, want.infidelity.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.sensitivity_max, want.sensitivity_max.numpy(), rtol=1e-5, atol=1e-7)
    assert plain.infidelity is None and got.infidelity.shape == (2,)
