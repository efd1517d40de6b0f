"""LayerDeepLift, LayerDeepLiftShap, LayerGradientShap, LayerFeatureAblation and GuidedGradCam through the real server, against Captum."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

import captum.attr as ca
from attrserve.v1 import attribution_service_pb2 as pb
from attrserve_client import AttributionClient
from oracle import MODELS, assert_served_close, example_inputs

TOL = {"atol": 1e-5, "rtol": 1e-5}


def test_layer_deep_lift_through_the_server(server) -> None:
    (x,), _ = example_inputs("conv", 3, seed=21)
    baseline = 0.1 * torch.ones((1, 2, 8, 8))
    with AttributionClient(server.address) as client:
        got = client.attribute(
            "conv", "layer_deep_lift", x.numpy(), baselines=baseline.numpy(), target=[0, 1, 2], layer="relu1",
            return_convergence_delta=True,
        )
        info = client.get_model("conv")
    model = MODELS["conv"]().eval()
    want, want_delta = ca.LayerDeepLift(model, model.relu1).attribute(x, baseline, target=[0, 1, 2], return_convergence_delta=True)
    assert_served_close(got.attributions, want)
    assert_served_close(got.convergence_delta, want_delta, informative=False)
    assert got.attributions.shape == (3, 4, 8, 8)  # shaped like the layer's output
    names = {pb.Algorithm.Name(a) for a in info.algorithms}
    assert {
        "ALGORITHM_LAYER_DEEP_LIFT", "ALGORITHM_LAYER_DEEP_LIFT_SHAP", "ALGORITHM_LAYER_GRADIENT_SHAP",
        "ALGORITHM_LAYER_FEATURE_ABLATION", "ALGORITHM_GUIDED_GRAD_CAM",
    } <= names


def test_layer_deep_lift_shap_through_the_server(server) -> None:
    (x,), _ = example_inputs("mlp", 2, seed=22)
    distribution = torch.randn((5, 6), generator=torch.Generator().manual_seed(23))
    with AttributionClient(server.address) as client:
        got = client.attribute(
            "mlp", "layer_deep_lift_shap", x.numpy(), baselines=distribution.numpy(), target=2, layer="act2",
            params={"attribute_to_layer_input": True},
        )
    model = MODELS["mlp"]().eval()
    want = ca.LayerDeepLiftShap(model, model.act2).attribute(x, distribution, target=2, attribute_to_layer_input=True)
    assert_served_close(got.attributions, want)


def test_layer_gradient_shap_through_the_server(server) -> None:
    (x1, x2), _ = example_inputs("multi", 3, seed=24)
    g = torch.Generator().manual_seed(25)
    distribution = (torch.randn((4, 4), generator=g), torch.randn((4, 3), generator=g))
    with AttributionClient(server.address) as client:
        got = client.attribute(
            "multi", "layer_gradient_shap", (x1.numpy(), x2.numpy()), baselines=tuple(d.numpy() for d in distribution),
            target=[1, 0, 1], layer="b_act", params={"n_samples": 6, "stdevs": [0.1, 0.2]}, seed=31,
            return_convergence_delta=True,
        )
    model = MODELS["multi"]().eval()
    torch.manual_seed(31)
    np.random.seed(31)
    want, want_delta = ca.LayerGradientShap(model, model.b_act).attribute(
        (x1, x2), distribution, n_samples=6, stdevs=(0.1, 0.2), target=[1, 0, 1], return_convergence_delta=True
    )
    assert got.seed == 31
    # The client returns a tuple because the inputs were a tuple; the layer has one tensor.
    (attributions,) = got.attributions
    assert_served_close(attributions, want)
    assert_served_close(got.convergence_delta, want_delta, informative=False)


def test_layer_feature_ablation_through_the_server(server) -> None:
    (x,), (mask,) = example_inputs("text", 2, seed=26)
    with AttributionClient(server.address) as client:
        got = client.attribute(
            "text", "layer_feature_ablation", x.numpy(), additional_forward_args=mask.numpy(), target=1, layer="proj",
            params={"layer_baselines": 0.25, "perturbations_per_eval": 8},
        )
    model = MODELS["text"]().eval()
    want = ca.LayerFeatureAblation(model, model.proj).attribute(x, layer_baselines=0.25, target=1, additional_forward_args=(mask,), perturbations_per_eval=8)
    assert_served_close(got.attributions, want)


def test_guided_grad_cam_through_the_server(server) -> None:
    (x,), _ = example_inputs("conv", 2, seed=27)
    with AttributionClient(server.address) as client:
        got = client.attribute("conv", "guided_grad_cam", x.numpy(), target=[2, 0], layer="conv2", params={"interpolate_mode": "bilinear"})
        with pytest.raises(grpc.RpcError) as bad_mode:
            client.attribute("conv", "guided_grad_cam", x.numpy(), target=0, layer="conv2", params={"interpolate_mode": "cubic"})
        with pytest.raises(grpc.RpcError) as flat:
            client.attribute("mlp", "guided_grad_cam", np.zeros((1, 6), np.float32), target=0, layer="fc2")
    model = MODELS["conv"]().eval()
    want = ca.GuidedGradCam(model, model.conv2).attribute(x, target=[2, 0], interpolate_mode="bilinear")
    assert_served_close(got.attributions, want)
    assert got.attributions.shape == x.shape  # a layer method whose attributions are shaped like the inputs
    assert bad_mode.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "interpolate_mode" in bad_mode.value.details()
    assert flat.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cannot upsample" in flat.value.details()
