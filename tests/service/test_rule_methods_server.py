"""DeepLiftShap, GuidedBackprop and Deconvolution through a real gRPC server and the Python client, against Captum 0.9.0."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from attrserve.v1 import attribution_service_pb2 as pb
from attrserve_client import AttributionClient
from oracle import MODELS, assert_served_close

pytestmark = pytest.mark.filterwarnings("ignore:Setting backward hooks on ReLU:UserWarning")

ATOL = RTOL = 1e-5

X = np.random.default_rng(0).standard_normal((3, 2, 8, 8)).astype(np.float32)  # three conv examples
TARGET = [0, 2, 1]


def captum(algorithm: str, baselines: np.ndarray | None = None, **params):
    import captum.attr as ca

    model = MODELS["conv"]()
    inputs = torch.from_numpy(X).clone().requires_grad_()
    if algorithm == "deep_lift_shap":
        return ca.DeepLiftShap(model, **params).attribute(inputs, torch.from_numpy(baselines), target=TARGET, return_convergence_delta=True)
    method = {"guided_backprop": ca.GuidedBackprop, "deconvolution": ca.Deconvolution}[algorithm](model)
    return method.attribute(inputs, target=TARGET), None


@pytest.mark.parametrize("algorithm", ["guided_backprop", "deconvolution"])
def test_guided_methods_match_captum(server, algorithm: str) -> None:
    with AttributionClient(server.address) as client:
        result = client.attribute("conv", algorithm, X, target=TARGET, timeout=60)
    want, _ = captum(algorithm)
    assert_served_close(result.attributions, want)
    assert result.convergence_delta is None


@pytest.mark.parametrize("multiply_by_inputs", [True, False])
def test_deep_lift_shap_matches_captum(server, multiply_by_inputs: bool) -> None:
    baselines = 0.2 * np.random.default_rng(1).standard_normal((4, 2, 8, 8)).astype(np.float32)  # a distribution of 4
    with AttributionClient(server.address) as client:
        result = client.attribute(
            "conv",
            "deep_lift_shap",
            X,
            baselines=baselines,
            target=TARGET,
            params={"multiply_by_inputs": multiply_by_inputs},
            return_convergence_delta=True,
            timeout=60,
        )
    want, want_delta = captum("deep_lift_shap", baselines, multiply_by_inputs=multiply_by_inputs)
    assert_served_close(result.attributions, want)
    assert result.convergence_delta.shape == (3 * 4,)  # one per (example, baseline) pair, as Captum returns it
    assert_served_close(result.convergence_delta, want_delta, informative=False)


def test_deep_lift_shap_with_one_baseline_is_invalid_argument(server) -> None:
    with AttributionClient(server.address) as client, pytest.raises(grpc.RpcError) as err:
        client.attribute("conv", "deep_lift_shap", X, baselines=0.0, target=TARGET, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at least 2 rows" in err.value.details()


def test_get_model_lists_the_rule_methods(server) -> None:
    with AttributionClient(server.address) as client:
        info = client.get_model("conv")
    for algorithm in (pb.ALGORITHM_GUIDED_BACKPROP, pb.ALGORITHM_DECONVOLUTION, pb.ALGORITHM_DEEP_LIFT_SHAP):
        assert algorithm in info.algorithms, pb.Algorithm.Name(algorithm)
