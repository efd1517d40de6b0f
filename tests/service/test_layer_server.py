"""Layer methods through the real server: parameters by Captum name, layer by dotted path, results equal Captum's."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

import captum.attr as ca
from attrserve.v1 import attribution_service_pb2 as pb
from attrserve_client import AttributionClient
from oracle import MODELS, assert_served_close, example_inputs


def test_layer_grad_cam_and_layer_ig_through_the_server(server) -> None:
    (x,), _ = example_inputs("conv", 3, seed=9)
    model = MODELS["conv"]().eval()
    with AttributionClient(server.address) as client:
        cam = client.attribute("conv", "layer_grad_cam", x.numpy(), target=2, layer="conv2", params={"relu_attributions": True})
        lig = client.attribute(
            "conv", "layer_integrated_gradients", x.numpy(), target=[0, 1, 2], layer="relu1",
            params={"n_steps": 16, "method": "riemann_middle"}, return_convergence_delta=True,
        )
        info = client.get_model("conv")
    want_cam = ca.LayerGradCam(model, model.conv2).attribute(x, target=2, relu_attributions=True)
    assert_served_close(cam.attributions, want_cam)
    want_lig, want_delta = ca.LayerIntegratedGradients(model, model.relu1).attribute(
        x, target=[0, 1, 2], n_steps=16, method="riemann_middle", return_convergence_delta=True
    )
    assert_served_close(lig.attributions, want_lig)
    assert_served_close(lig.convergence_delta, want_delta, informative=False)
    assert lig.attributions.shape == (3, 4, 8, 8)  # shaped like the layer's output, not the input
    names = {pb.Algorithm.Name(a) for a in info.algorithms}
    assert {"ALGORITHM_LAYER_INTEGRATED_GRADIENTS", "ALGORITHM_LAYER_GRAD_CAM", "ALGORITHM_LAYER_CONDUCTANCE"} <= names


def test_layer_errors_through_the_server(server) -> None:
    x = np.zeros((1, 6), np.float32)
    with AttributionClient(server.address) as client:
        with pytest.raises(grpc.RpcError) as missing:
            client.attribute("mlp", "layer_activation", x, layer="fc9")
        with pytest.raises(grpc.RpcError) as no_layer:
            client.attribute("mlp", "layer_activation", x)
        acts = client.attribute("mlp", "layer_activation", x, layer="act1", params={"attribute_to_layer_input": True})
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND and "has no layer 'fc9'" in missing.value.details()
    assert no_layer.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    model = MODELS["mlp"]().eval()
    with torch.no_grad():
        want = model.fc1(torch.from_numpy(x))
    assert_served_close(acts.attributions, want, atol=1e-6, rtol=1e-7)


def test_neuron_method_through_the_server(server) -> None:
    (x,), _ = example_inputs("conv", 2, seed=10)
    model = MODELS["conv"]().eval()
    with AttributionClient(server.address) as client:
        got = client.attribute(
            "conv", "neuron_conductance", x.numpy(), target=1, layer="conv2",
            params={"neuron_selector": (1, 2, 3), "n_steps": 8},
        )
    want = ca.NeuronConductance(model, model.conv2).attribute(x, neuron_selector=(1, 2, 3), target=1, n_steps=8)
    assert_served_close(got.attributions, want)
