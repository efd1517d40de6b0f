"""The perturbation methods through a real gRPC server and the Python client, against Captum 0.9.0."""

from __future__ import annotations

import warnings

import grpc
import numpy as np
import pytest
import torch

from attrserve_client import AttributionClient
from oracle import MODELS, assert_served_close, example_inputs

ATOL = RTOL = 1e-5

CONV_MASK = ((torch.arange(8).view(8, 1) // 4) * 2 + torch.arange(8).view(1, 8) // 4).view(1, 1, 8, 8)  # four 4×4 blocks

# (id, model, algorithm, params, feature masks, baselines, seed); targets are per example.
CASES = [
    ("ablation-conv-blocks", "conv", "feature_ablation", {"perturbations_per_eval": 2}, (CONV_MASK,), (0.25,), 0),
    ("permutation-multi", "multi", "feature_permutation", {"perturbations_per_eval": 3}, (), (), 7),
    ("occlusion-conv", "conv", "occlusion", {"sliding_window_shapes": (2, 3, 3), "strides": (1, 2, 2)}, (), (), 0),
    ("occlusion-multi-per-input", "multi", "occlusion", {"sliding_window_shapes": ((2,), (2,)), "strides": ((1,), (1,))}, (), (0.5, -0.5), 0),
    # Captum's other stride forms: an int for one input's every dim; per input an int (its every dim) or a list
    ("occlusion-conv-int-stride", "conv", "occlusion", {"sliding_window_shapes": (2, 3, 3), "strides": 2}, (), (), 0),
    ("occlusion-multi-int-per-input", "multi", "occlusion", {"sliding_window_shapes": ((2,), (2,)), "strides": (2, 1)}, (), (), 0),
    ("occlusion-multi-int-and-list", "multi", "occlusion", {"sliding_window_shapes": ((2,), (2,)), "strides": (1, (2,))}, (), (), 0),
    ("shapley-sampling-text", "text", "shapley_value_sampling", {"n_samples": 4, "perturbations_per_eval": 2}, (torch.arange(5).view(1, 5, 1),), (), 11),
    ("shapley-exact-mlp", "mlp", "shapley_values", {}, (torch.tensor([[0, 0, 1, 1, 2, 3]]),), (0.1,), 0),
]
CAPTUM = {
    "feature_ablation": "FeatureAblation",
    "feature_permutation": "FeaturePermutation",
    "occlusion": "Occlusion",
    "shapley_value_sampling": "ShapleyValueSampling",
    "shapley_values": "ShapleyValues",
}


def captum_attribute(model, algorithm, params, inputs, args, targets, masks, baselines, seed):
    import captum.attr as ca

    method = getattr(ca, CAPTUM[algorithm])(MODELS[model]())  # before seeding: the models seed their own init
    kwargs = dict(params, target=targets)
    if args:
        kwargs["additional_forward_args"] = args
    if masks:
        kwargs["feature_mask"] = masks
    if baselines:
        kwargs["baselines"] = baselines
    torch.manual_seed(seed)
    np.random.seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = method.attribute(inputs, **kwargs)
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_server_matches_captum(server, case) -> None:
    _, model, algorithm, params, masks, baselines, seed = case
    n = 4
    inputs, args = example_inputs(model, n, seed=500)
    targets = [i % 2 for i in range(n)]
    with AttributionClient(server.address) as client:
        result = client.attribute(
            model,
            algorithm,
            tuple(x.numpy() for x in inputs),
            baselines=baselines or None,
            target=targets,
            additional_forward_args=tuple(a.numpy() for a in args) or None,
            feature_mask=tuple(m.numpy() for m in masks) or None,
            params=params,
            seed=seed,
            timeout=60,
        )
    want = captum_attribute(model, algorithm, params, inputs, args, targets, masks, baselines, seed)
    assert len(result.attributions) == len(want)
    for got, w in zip(result.attributions, want):
        assert_served_close(got, w)
    assert result.seed == seed


def test_exact_shapley_on_20_features_is_resource_exhausted(server) -> None:
    x = np.random.default_rng(0).standard_normal((1, 2, 8, 8)).astype(np.float32)
    mask = (np.arange(2 * 8 * 8) % 20).reshape(1, 2, 8, 8)
    with AttributionClient(server.address) as client, pytest.raises(grpc.RpcError) as err:
        client.attribute("conv", "shapley_values", x, target=0, feature_mask=mask, timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "needs 1048576 rows" in err.value.details()


def test_occlusion_without_a_window_is_invalid_argument(server) -> None:
    x = np.zeros((1, 6), np.float32)
    with AttributionClient(server.address) as client, pytest.raises(grpc.RpcError) as err:
        client.attribute("mlp", "occlusion", x, target=0, params={"perturbations_per_eval": 2}, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "occlusion.sliding_window_shapes is required" in err.value.details()
