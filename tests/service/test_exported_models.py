"""A `torch.export` program (`model.pt2`) in a model folder, served through a real gRPC server, against Captum 0.9.0 on
`torch.export.load(path).module()`, the module the server loads.

What Captum runs on that module (one graph, its layers inlined: the submodules only hold parameters and are never
called, and it checks its arguments against the exported ones in a forward pre-hook) the server serves with
Captum's numbers; what Captum fails on (layer and neuron methods, DeepLift and its family, LRP) it refuses, saying
why. A program exported with a fixed batch size cannot take the server's passes of other sizes: it is refused at load.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import captum.attr as ca
import grpc
import numpy as np
import pytest
import torch
from torch import nn

from attrserve.v1 import attribution_service_pb2 as pb
from attrserve.v1 import model_config_pb2 as mc
from attrserve_client import AttributionClient
from attrserve_engine import EngineLimits
from attrserve_service.config import ServerConfig
from oracle import assert_served_close
from servers import ServerThread

X = torch.tensor([[0.3, -0.2, 0.9, 1.4], [1.0, 0.5, -0.4, 0.2], [-0.7, 1.1, 0.4, -0.3]])  # 3 rows: the example had 2
TARGETS = [0, 1, 2]
CONFIG = 'inputs { name: "x" dtype: DATA_TYPE_FLOAT32 dims: 4 }\n'  # pinned: every algorithm is warmed up at load

# Every algorithm Captum runs on the exported module, with the params and seed of the case (None: defaults).
SERVED: dict[str, tuple[dict[str, Any] | None, int]] = {
    "saliency": (None, 0),
    "integrated_gradients": ({"n_steps": 20}, 0),
    "input_x_gradient": (None, 0),
    "gradient_shap": ({"n_samples": 4}, 3),
    # No nn.ReLU module is left in the graph, so (as in Captum) these two are the plain gradient.
    "guided_backprop": (None, 0),
    "deconvolution": (None, 0),
    "feature_ablation": (None, 0),
    "feature_permutation": (None, 4),
    "occlusion": ({"sliding_window_shapes": (2,)}, 0),
    "shapley_value_sampling": ({"n_samples": 3}, 5),
    "shapley_values": (None, 0),
    "lime": (None, 6),
    "kernel_shap": (None, 7),
}
CAPTUM = {
    "saliency": ca.Saliency,
    "integrated_gradients": ca.IntegratedGradients,
    "input_x_gradient": ca.InputXGradient,
    "gradient_shap": ca.GradientShap,
    "guided_backprop": ca.GuidedBackprop,
    "deconvolution": ca.Deconvolution,
    "feature_ablation": ca.FeatureAblation,
    "feature_permutation": ca.FeaturePermutation,
    "occlusion": ca.Occlusion,
    "shapley_value_sampling": ca.ShapleyValueSampling,
    "shapley_values": ca.ShapleyValues,
    "lime": ca.Lime,
    "kernel_shap": ca.KernelShap,
}


def mlp() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()


def export(folder: Path, dynamic: bool) -> Path:
    """What a model folder's author runs: export in eval mode from an example of 2 rows, dim 0 dynamic (or not)."""
    folder.mkdir(parents=True)
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    torch.export.save(torch.export.export(mlp(), (torch.randn(2, 4),), dynamic_shapes=shapes), folder / "model.pt2")
    (folder / "config.pbtxt").write_text(CONFIG)
    return folder / "model.pt2"


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repository")
    export(root / "exported", dynamic=True)
    export(root / "fixed", dynamic=False)
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerThread]:
    limits = EngineLimits(default_device="cpu", probe_batch_rows=False)
    s = ServerThread(None, ServerConfig(port=0, metrics_port=0, model_repository=repo, limits=limits, engine_process=False))
    yield s
    s.stop()


def oracle(repo: Path) -> nn.Module:
    return torch.export.load(repo / "exported" / "model.pt2").module()


def captum(repo: Path, algorithm: str, params: dict[str, Any] | None, seed: int) -> torch.Tensor:
    kwargs = dict(params or {})
    if algorithm == "gradient_shap":
        kwargs["baselines"] = torch.zeros(1, 4)  # the server's default baselines
    method = CAPTUM[algorithm](oracle(repo))
    torch.manual_seed(seed)
    np.random.seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return method.attribute(X.clone(), target=TARGETS, **kwargs).detach()


def test_get_model_lists_what_captum_runs_and_refuses_the_rest_saying_why(server: ServerThread) -> None:
    with AttributionClient(server.address) as client:
        info = client.get_model("exported")
    assert info.ready, info.reason
    assert info.config.platform == mc.PLATFORM_TORCH_EXPORT and list(info.layers) == []  # no layer a hook would reach
    assert {pb.Algorithm.Name(a).removeprefix("ALGORITHM_").lower() for a in info.algorithms} == set(SERVED)
    refused = {r.name: r.reason for r in info.refused}
    for name in ("layer_integrated_gradients", "layer_activation", "neuron_gradient", "guided_grad_cam", "layer_deep_lift"):
        assert "torch.export program, whose layers are inlined into one graph" in refused[name], refused[name]
    for name in ("deep_lift", "deep_lift_shap"):
        assert "checks its arguments against the exported ones" in refused[name], refused[name]
    assert "LRP has no rule for module '0'" in refused["lrp"]


@pytest.mark.parametrize("algorithm", list(SERVED))
def test_served_algorithms_equal_captum_on_the_loaded_program(server: ServerThread, repo: Path, algorithm: str) -> None:
    params, seed = SERVED[algorithm]
    with AttributionClient(server.address) as client:
        result = client.attribute("exported", algorithm, X.numpy(), target=TARGETS, params=params, seed=seed, timeout=60)
    assert_served_close(result.attributions, captum(repo, algorithm, params, seed))


@pytest.mark.parametrize(
    ("algorithm", "layer", "says", "captum", "captum_error", "captum_says"),
    [
        (
            "layer_integrated_gradients",
            "0",
            "whose layers are inlined into one graph",
            lambda m: ca.LayerIntegratedGradients(m, m.get_submodule("0")),
            AssertionError,
            "Forward hook did not obtain any outputs for given layer",
        ),
        ("deep_lift", None, "checks its arguments against the exported ones", ca.DeepLift, ValueError, "exported input tree spec"),
        ("lrp", None, "LRP has no rule for module '0'", ca.LRP, TypeError, "has no rule defined"),
    ],
)
def test_refused_algorithms_say_why_and_captum_fails_too(
    server: ServerThread, repo: Path, algorithm, layer, says, captum, captum_error, captum_says
) -> None:
    with AttributionClient(server.address) as client, pytest.raises(grpc.RpcError) as err:
        client.attribute("exported", algorithm, X.numpy(), target=TARGETS, layer=layer, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model 'exported'" in err.value.details() and says in err.value.details(), err.value.details()
    with warnings.catch_warnings(), pytest.raises(captum_error, match=captum_says):
        warnings.simplefilter("ignore")
        captum(oracle(repo)).attribute(X.clone(), target=TARGETS)


def test_a_program_exported_with_a_fixed_batch_size_is_refused_at_load(server: ServerThread, repo: Path) -> None:
    with AttributionClient(server.address) as client:
        info = client.get_model("fixed")
    assert info.state == pb.MODEL_STATE_UNAVAILABLE
    # The input is named as forward names it (Sequential.forward(input)).
    assert "input 'input' has a fixed batch size (dim 0: 2)" in info.reason and 'torch.export.Dim("batch")' in info.reason, info.reason
    with pytest.raises(AssertionError, match=r"Guard failed: .*size\(\)\[0\] == 2"):  # why: it takes 2 rows, no other number
        torch.export.load(repo / "fixed" / "model.pt2").module()(X)
