"""A plugin algorithm served by name (custom_algorithm + Struct params), listed by GetModel, loaded by `serve --plugins`.

The plugin, Blur Integrated Gradients, is not in Captum: its answers are checked against `blur_ig`, an independent
reference written here from the algorithm's definition (examples/plugins/blur_integrated_gradients.py) with plain
torch autograd, in float64.
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from attrserve_client import AttributionClient
from attrserve_engine import Engine, ModelSpec
from attrserve_service.config import ServerConfig
from oracle import MODELS, assert_all_close, example_inputs
from servers import ServeProcess, ServerThread

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "examples" / "plugins" / "blur_integrated_gradients.py"
DEMO_MODELS = ROOT / "service" / "attrserve_service" / "demo_models"


def blur_matrix(size: int, sigma: float) -> torch.Tensor:
    """(size, size) float64 B such that B @ v is v blurred along its length: Gaussian weights exp(−t²/2σ²) over the
    taps |t| ≤ min(max(1, ⌈3σ⌉), size − 1), normalised to sum to one, with reflect boundaries (index −j reads j,
    size − 1 + j reads size − 1 − j). σ = 0 is the identity."""
    if sigma <= 0:
        return torch.eye(size, dtype=torch.float64)
    radius = min(max(1, math.ceil(3 * sigma)), size - 1)
    weights = [math.exp(-(t * t) / (2 * sigma * sigma)) for t in range(-radius, radius + 1)]
    total = sum(weights)
    matrix = torch.zeros(size, size, dtype=torch.float64)
    for i in range(size):
        for t, w in zip(range(-radius, radius + 1), weights):
            j = abs(i + t)
            j = 2 * (size - 1) - j if j > size - 1 else j
            matrix[i, j] += w / total
    return matrix


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """(n, c, h, w) float64 images blurred along both spatial axes (the blur is separable: B_h X B_wᵀ per channel)."""
    return blur_matrix(images.shape[2], sigma) @ images @ blur_matrix(images.shape[3], sigma).T


def blur_ig(model: torch.nn.Module, x: torch.Tensor, targets: list[int], n_steps: int, max_sigma: float) -> torch.Tensor:
    """Blur IG by its definition: the path x(s) = blur(x, s) for s_i = max_sigma · (1 − i / n_steps), i = 0..n_steps,
    and Σ_{i=1..n} ∇f_target(x(s_i)) · (x(s_i) − x(s_{i−1})), one example and one point at a time, in float64."""
    model = model.double().eval()
    x = x.double()
    path = [blur(x, max_sigma * (1 - i / n_steps)) for i in range(n_steps + 1)]
    out = torch.zeros_like(x)
    for e, target in enumerate(targets):
        for i in range(1, n_steps + 1):
            point = path[i][e : e + 1].clone().requires_grad_()
            (grad,) = torch.autograd.grad(model(point)[0, target], point)
            out[e] += (grad * (path[i][e : e + 1] - path[i - 1][e : e + 1]))[0]
    return out.float()


def image_model() -> torch.nn.Module:
    """The `image` demo model as the server loads it: model.py's build_model() with weights.pt."""
    spec = importlib.util.spec_from_file_location("test_plugin_demo_image", DEMO_MODELS / "image" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.build_model()
    model.load_state_dict(torch.load(DEMO_MODELS / "image" / "weights.pt", weights_only=True))
    return model.eval()


@pytest.fixture(scope="module")
def plugin_server():
    engine = Engine()
    engine.load_plugins(str(PLUGIN))
    engine.load(ModelSpec(name="conv", module=MODELS["conv"]()))
    s = ServerThread(engine, ServerConfig(port=0, metrics_port=None))
    yield s
    s.stop()


def test_reference_blur_is_a_blur() -> None:
    """The reference's own sanity: rows of B sum to one, σ = 0 changes nothing, a blur removes variance."""
    assert torch.allclose(blur_matrix(8, 2.5).sum(1), torch.ones(8, dtype=torch.float64))
    (x,), _ = example_inputs("conv", 2, seed=5)
    assert torch.equal(blur(x.double(), 0.0), x.double())
    assert blur(x.double(), 1.5).var() < x.double().var()


def test_plugin_by_name_through_the_client(plugin_server) -> None:
    (x,), _ = example_inputs("conv", 2, seed=5)
    with AttributionClient(plugin_server.address) as client:
        got = client.attribute("conv", "blur_integrated_gradients", x.numpy(), target=[1, 2], params={"n_steps": 9, "max_sigma": 2.5})
        info = client.get_model("conv")
        with pytest.raises(grpc.RpcError) as bad:
            client.attribute("conv", "blur_integrated_gradients", x.numpy(), target=1, params={"n_steps": 2.5})
        with pytest.raises(grpc.RpcError) as unknown:
            client.attribute("conv", "no_such_plugin", x.numpy(), target=1)
    want = blur_ig(MODELS["conv"](), x, [1, 2], n_steps=9, max_sigma=2.5)
    assert_all_close((torch.from_numpy(got.attributions),), (want,))
    assert list(info.custom_algorithms) == ["blur_integrated_gradients"]
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "n_steps must be an integer" in bad.value.details()
    assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown algorithm 'no_such_plugin'" in unknown.value.details()


def test_serve_cli_loads_plugins_and_reports_bad_ones(tmp_path: Path) -> None:
    bad = subprocess.run(
        [sys.executable, "-m", "attrserve_service.cli", "serve", "--plugins", str(tmp_path / "missing.py"), "--port", "0", "--metrics-port", "-1"],
        capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 2 and "plugin" in bad.stderr and "missing.py" in bad.stderr

    with ServeProcess(["--plugins", str(PLUGIN), "--device", "cpu"]) as server:
        with AttributionClient(server.address) as client:
            info = client.get_model("image", timeout=10)
            x = np.random.default_rng(0).random((1, 3, 16, 16), dtype=np.float32)
            result = client.attribute("image", "blur_integrated_gradients", x, target=1, params={"n_steps": 8}, timeout=30)
    assert "blur_integrated_gradients" in info.custom_algorithms
    want = blur_ig(image_model(), torch.from_numpy(x), [1], n_steps=8, max_sigma=5.0)  # the plugin's default max_sigma
    assert_all_close((torch.from_numpy(result.attributions),), (want,))


REFUSER = '''
from dataclasses import dataclass

from attrserve_engine.algorithms.base import Algorithm
from attrserve_engine.errors import ResourceExhausted


class TooManySteps(ResourceExhausted):
    """The plugin's own refusal: about the request itself, so never worth a retry."""


@dataclass(frozen=True)
class Params:
    n_steps: int = 1


class Refuser(Algorithm):
    name = "refuser"
    params_type = Params

    def check_params(self, params, limits):
        raise TooManySteps(f"n_steps {params.n_steps} is more than this plugin takes", permanent=True)


ALGORITHM = Refuser
'''


@pytest.mark.parametrize("engine_process", [True, False], ids=["engine-process", "one-process"])
def test_a_plugins_own_permanent_refusal_tells_clients_not_to_retry(tmp_path: Path, engine_process: bool) -> None:
    """A plugin's own subclass of ResourceExhausted(permanent=True) crosses from the engine process to the front as the
    engine's class with its `permanent` flag (it was dropped there: the client was told nothing, and retried)."""
    from captum.attr import IntegratedGradients
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from attrserve_engine import EngineLimits

    (tmp_path / "plugin.py").write_text(REFUSER)
    model_folder = tmp_path / "repo" / "mlp"
    model_folder.mkdir(parents=True)
    (model_folder / "model.py").write_text(
        "import torch\nfrom torch import nn\n\n\ndef build_model():\n    torch.manual_seed(3)\n"
        "    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))\n"
    )
    (model_folder / "config.pbtxt").write_text('inputs { name: "x" dtype: DATA_TYPE_FLOAT32 dims: 4 }\n')
    limits = EngineLimits(default_device="cpu", probe_batch_rows=False)
    config = ServerConfig(
        port=0, metrics_port=None, model_repository=tmp_path / "repo", plugins=[str(tmp_path / "plugin.py")],
        engine_process=engine_process, limits=limits,
    )
    server = ServerThread(None, config)
    x = np.array([[0.3, -0.2, 0.9, 1.4], [1.0, 0.5, -0.4, 0.2]], dtype=np.float32)
    try:
        with AttributionClient(server.address) as client, grpc.insecure_channel(server.address) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                client.attribute("mlp", "refuser", x, target=0, params={"n_steps": 7}, timeout=30)
            got = client.attribute("mlp", "integrated_gradients", x, target=[0, 1], timeout=30)
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    finally:
        server.stop()
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.details() == "n_steps 7 is more than this plugin takes"
    assert ("grpc-retry-pushback-ms", "-1") in tuple(refused.value.trailing_metadata())
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    want = IntegratedGradients(model).attribute(torch.from_numpy(x), target=[0, 1])
    assert_all_close((torch.from_numpy(got.attributions),), (want,))
    assert health == health_pb2.HealthCheckResponse.SERVING
