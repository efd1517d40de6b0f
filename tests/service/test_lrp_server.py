"""LRP and LayerLRP through a real gRPC server and the Python client, against Captum 0.9.0."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

import captum.attr as ca
from attrserve.v1 import attribution_service_pb2 as pb
from attrserve_client import AttributionClient
from oracle import MODELS, assert_served_close

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ATOL = RTOL = 1e-5


def test_lrp_matches_captum(server) -> None:
    x = np.random.default_rng(0).random((4, 3)).astype(np.float32)
    target = [0, 1, 1, 0]
    with AttributionClient(server.address) as client:
        result = client.attribute("toy", "lrp", x, target=target, return_convergence_delta=True, timeout=60)
    want, want_delta = ca.LRP(MODELS["toy"]()).attribute(torch.from_numpy(x).requires_grad_(), target=target, return_convergence_delta=True)
    assert_served_close(result.attributions, want)
    assert_served_close(result.convergence_delta, want_delta, informative=False)


@pytest.mark.parametrize("layer, to_input", [("proj", False), ("head", True)])
def test_layer_lrp_matches_captum(server, layer: str, to_input: bool) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5, 6)).astype(np.float32)  # token embeddings
    mask = (rng.random((3, 5)) > 0.3).astype(np.float32)
    mask[:, 0] = 1.0
    with AttributionClient(server.address) as client:
        result = client.attribute(
            "text",
            "layer_lrp",
            x,
            target=1,
            additional_forward_args=mask,
            layer=layer,
            params={"attribute_to_layer_input": to_input},
            return_convergence_delta=True,
            timeout=60,
        )
    model = MODELS["text"]()
    want, want_delta = ca.LayerLRP(model, model.get_submodule(layer)).attribute(
        torch.from_numpy(x).requires_grad_(),
        target=1,
        additional_forward_args=(torch.from_numpy(mask),),
        attribute_to_layer_input=to_input,
        return_convergence_delta=True,
    )
    assert_served_close(result.attributions, want)
    assert_served_close(result.convergence_delta, want_delta, informative=False)


def test_lrp_on_a_model_without_rules_is_invalid_argument(server) -> None:
    x = np.zeros((1, 2, 8, 8), np.float32)
    with AttributionClient(server.address) as client, pytest.raises(grpc.RpcError) as err:
        client.attribute("conv", "lrp", x, target=0, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'relu2' (LeakyReLU)" in err.value.details()


def test_get_model_lists_lrp_where_it_runs(server) -> None:
    with AttributionClient(server.address) as client:
        info = client.get_model("fragile")  # warmed up: a Linear layer, which has a rule
    assert pb.ALGORITHM_LRP in info.algorithms
    assert pb.ALGORITHM_LAYER_LRP in info.algorithms
