"""The model zoo (tests/zoo.py) through the service: what a client sends over the wire (token ids, padding masks as
additional forward arguments, tuple targets, dict/tuple outputs chosen by the config, a TorchScript model.pt folder)
gets Captum's numbers, with the model's requests sent at once on one stream so they share passes; and GetModel's
`refused` lists exactly what the engine refuses, each with its reason.

tests/engine/test_model_zoo.py runs every (model, algorithm) pair at the engine; here a few per model, one per kind of
algorithm (input gradients, rule-based, layer, neuron, perturbation), so the wire paths are all crossed."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from attrserve.v1 import attribution_service_pb2 as pb
from attrserve_client import Attribution, AttributionClient
from attrserve_engine import Engine, EngineLimits, InputSpec, ModelSpec
from attrserve_engine.algorithms import ALGORITHMS
from attrserve_service.config import ServerConfig
from oracle import assert_all_close, assert_close, wait_in_flight
from servers import ServerThread
from zoo import ALGOS, ZOO, Request, captum_attribute, make_request

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.* is deprecated:DeprecationWarning"),
]

# One algorithm of each kind a model may serve; a model gets those it serves (and Captum runs).
PICKS = (
    "integrated_gradients",
    "deep_lift",
    "guided_backprop",
    "layer_integrated_gradients",
    "layer_deep_lift",
    "layer_gradient_x_activation",
    "neuron_gradient",
    "neuron_feature_ablation",
    "feature_ablation",
    "shapley_value_sampling",
    "lrp",
)
# The TorchScript zoo model, served from a repository folder (model.pt) rather than handed to the engine.
SCRIPTED_FOLDER = "scripted_pt"


def spec(name: str) -> ModelSpec:
    z = ZOO[name]
    inputs = [InputSpec("input_ids" if z.tokens else "x", z.dtype)]
    return ModelSpec(name=name, module=z.build(), inputs=inputs, output_key=z.output_key, output_index=z.output_index)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zoo_repository")
    (root / SCRIPTED_FOLDER).mkdir()
    ZOO["scripted"].build().save(str(root / SCRIPTED_FOLDER / "model.pt"))
    return root


@pytest.fixture(scope="module")
def engine(repo: Path) -> Engine:
    engine = Engine(EngineLimits(default_device="cpu", probe_batch_rows=False))
    for name in ZOO:
        if name != "scripted":
            engine.load(spec(name))
    # The folder as the repository would load it: model.pt found in it, TorchScript detected from the file.
    engine.load(ModelSpec(name=SCRIPTED_FOLDER, path=repo / SCRIPTED_FOLDER, inputs=[InputSpec("x", torch.float32)]))
    return engine


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[ServerThread]:
    s = ServerThread(engine, ServerConfig(port=0))
    yield s
    s.stop()


def served_name(model: str) -> str:
    return SCRIPTED_FOLDER if model == "scripted" else model


def wire_request(req: Request, request_id: str) -> pb.AttributeRequest:
    """The zoo request as a client builds it: numpy in, Captum's argument names."""
    return AttributionClient.build_request(
        served_name(req.zoo.name),
        req.algorithm,
        req.inputs.numpy(),
        baselines=None if req.baselines is None else [req.baselines.numpy()],
        target=(list(req.targets) if req.algo.target else None),
        additional_forward_args=[a.numpy() for a in req.args] or None,
        layer=req.layer or None,
        params=dict(req.params) or None,
        feature_mask=None if req.mask is None else [req.mask.numpy()],
        seed=req.seed,
        return_convergence_delta=req.delta,
        request_id=request_id,
    )


def picks(model: str, served: set[str]) -> list[Request]:
    out = []
    for algorithm in PICKS:
        if algorithm not in served:
            continue
        req = make_request(ZOO[model], algorithm, seed=sorted(ALGOS).index(algorithm), delta=ALGORITHMS[algorithm].has_convergence_delta)
        try:
            captum_attribute(req)
        except Exception:  # e.g. an in-place op after the layer: test_model_zoo checks the service refuses it too
            continue
        out.append(req)
    return out


@pytest.mark.parametrize("model", list(ZOO))
def test_zoo_model_through_the_service_like_captum(server: ServerThread, engine: Engine, model: str) -> None:
    with AttributionClient(server.address) as client:
        info = client.get_model(served_name(model))
        served = {pb.Algorithm.Name(a).removeprefix("ALGORITHM_").lower() for a in info.algorithms}
        refused = {r.name: r.reason for r in info.refused}
        reqs = picks(model, served)
        assert len(reqs) >= 3, (model, sorted(served))
        # One stream, all at once: the model's requests queue together and share passes. Held until every one is
        # queued: otherwise the worker may cut a pass before the next arrives (3 runs in 8 shared none, then).
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            with engine.held():
                sent = pool.submit(lambda: list(client.attribute_stream([wire_request(r, str(i)) for i, r in enumerate(reqs)], timeout=120)))
                wait_in_flight(engine, len(reqs))
            responses = sent.result(timeout=120)
    assert info.ready and served and not served & set(refused) and all(refused.values())
    assert served | set(refused) == set(ALGORITHMS)
    by_id = {r.request_id: r for r in responses}
    assert len(by_id) == len(reqs)
    shared = 0
    for i, req in enumerate(reqs):
        entry = by_id[str(i)]
        assert entry.WhichOneof("result") == "response", (req.algorithm, entry.error.message)
        got = Attribution.from_response(entry.response, single=True)
        want, want_delta = captum_attribute(req)
        assert_all_close((torch.from_numpy(np.asarray(got.attributions)),), want)
        if req.delta:
            assert_close(torch.from_numpy(got.convergence_delta), want_delta)
        shared = max(shared, got.timing["pass_requests"])
    assert shared > 1, "no two of the model's requests shared a pass"


def test_get_model_refusals_are_the_engines(server: ServerThread) -> None:
    """GetModel's `refused` is the engine's own refusal message, per algorithm (a request for one gets that message)."""
    with AttributionClient(server.address) as client:
        infos = {m.config.name: m for m in client.list_models()}
    engine = server.running.engine
    for name in map(served_name, ZOO):
        assert {r.name: r.reason for r in infos[name].refused} == engine.refused_algorithms(engine.get_model(name)), name
    scripted = {r.name: r.reason for r in infos[SCRIPTED_FOLDER].refused}
    assert "TorchScript" in scripted["deep_lift"] and "TorchScript" in scripted["layer_integrated_gradients"]
    assert "guided_backprop" not in scripted  # Captum's plain gradient: served


MASKED_MODEL_PY = """
import torch
from torch import nn


class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.l1 = nn.Linear(5, 8)
        self.relu = nn.ReLU()
        self.l2 = nn.Linear(8, 3)

    def forward(self, x, mask):  # the mask arrives as an additional forward argument
        return self.l2(self.relu(self.l1(x * mask)))


def build_model():
    return Masked()
"""


def test_a_model_with_additional_forward_args_and_pinned_shapes_loads_and_serves(tmp_path: Path) -> None:
    """config.pbtxt pins the inputs of a model whose forward also takes a mask: no config describes the mask, so the
    load-time warm-up cannot run it and must not try (it failed the load with forward's TypeError); requests that send
    the mask as additional_forward_args get Captum's numbers, and health says SERVING."""
    import captum.attr as ca
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    folder = tmp_path / "masked"
    folder.mkdir()
    (folder / "model.py").write_text(MASKED_MODEL_PY)
    (folder / "config.pbtxt").write_text('inputs { name: "x" dtype: DATA_TYPE_FLOAT32 dims: 5 }\n')
    x = torch.tensor([[0.5, -1.0, 2.0, 0.3, -0.7], [1.5, 0.2, -0.4, 1.1, 0.9], [-0.3, 0.8, 0.6, -1.2, 0.4]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0], [1.0, 0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 0.0]])
    limits = EngineLimits(default_device="cpu", probe_batch_rows=False)
    s = ServerThread(None, ServerConfig(port=0, metrics_port=0, model_repository=tmp_path, limits=limits, engine_process=False))
    try:
        with AttributionClient(s.address) as client:
            info = client.get_model("masked")
            assert info.ready, info.reason
            sent = {"target": [0, 1, 2], "additional_forward_args": [mask.numpy()], "params": {"n_steps": 8}}
            ig = client.attribute("masked", "integrated_gradients", x.numpy(), **sent)
            lig = client.attribute("masked", "layer_integrated_gradients", x.numpy(), layer="l1", **sent)
        with grpc.insecure_channel(s.address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="attrserve.v1.AttributionService"))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        s.stop()
    namespace: dict = {}
    exec(MASKED_MODEL_PY, namespace)
    model = namespace["build_model"]().eval()
    want_ig = ca.IntegratedGradients(model).attribute(x, target=[0, 1, 2], additional_forward_args=(mask,), n_steps=8)
    want_lig = ca.LayerIntegratedGradients(model, model.l1).attribute(x, target=[0, 1, 2], additional_forward_args=(mask,), n_steps=8)
    assert_all_close((torch.from_numpy(np.asarray(ig.attributions)),), (want_ig.detach(),))
    assert_all_close((torch.from_numpy(np.asarray(lig.attributions)),), (want_lig.detach(),))


BOOL_MODEL_PY = """
import torch
from torch import nn


class Decision(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(x) > 0  # a decision, not a score
"""


def test_a_model_returning_bools_is_refused_naming_why_and_the_server_serves_on(tmp_path: Path) -> None:
    """A bool output cannot be explained by subtracting it: Captum's perturbation methods raise (a RuntimeError the
    server answered INTERNAL; ShapleyValues answered numbers). They are refused with INVALID_ARGUMENT saying why. Lime
    and KernelShap fit their surrogate to the output cast to float, as Captum does: they get Captum's numbers (they
    were refused with the others). A numeric model beside it still gets Captum's numbers, and health says SERVING."""
    import captum.attr as ca
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for name, source in (("decision", BOOL_MODEL_PY + "\n\ndef build_model():\n    return Decision()\n"), ("masked", MASKED_MODEL_PY)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.py").write_text(source)
    x = torch.tensor([[0.5, -1.0, 2.0, 0.3, -0.7], [1.5, 0.2, -0.4, 1.1, 0.9]])
    mask = torch.ones_like(x)
    refused = {
        "feature_ablation": None,
        "occlusion": {"sliding_window_shapes": (1,)},
        "shapley_value_sampling": {"n_samples": 2},
        "shapley_values": None,
        "feature_permutation": None,
    }
    regressed = {"lime": ca.Lime, "kernel_shap": ca.KernelShap}
    limits = EngineLimits(default_device="cpu", probe_batch_rows=False)
    s = ServerThread(None, ServerConfig(port=0, metrics_port=0, model_repository=tmp_path, limits=limits, engine_process=False))
    try:
        with AttributionClient(s.address) as client:
            for algorithm, params in refused.items():
                with pytest.raises(grpc.RpcError) as err:
                    client.attribute("decision", algorithm, x.numpy(), target=1, params=params, seed=0, timeout=60)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (algorithm, err.value.details())
                assert "model 'decision' returns a bool tensor" in err.value.details(), (algorithm, err.value.details())
            ok = client.attribute("masked", "feature_ablation", x.numpy(), target=1, additional_forward_args=[mask.numpy()], timeout=60)
            regressions = {a: client.attribute("decision", a, x.numpy(), target=1, params={"n_samples": 5}, seed=0, timeout=60) for a in regressed}
        with grpc.insecure_channel(s.address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="attrserve.v1.AttributionService"))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        s.stop()
    namespace: dict = {}
    exec(BOOL_MODEL_PY, namespace)
    with pytest.raises(RuntimeError, match="Subtraction, the `-` operator, with two bool tensors"):  # Captum fails too
        ca.FeatureAblation(namespace["Decision"]().eval()).attribute(x, target=1)
    for algorithm, method in regressed.items():
        explainer = method(namespace["Decision"]().eval())  # (built before seeding: it seeds the global RNG)
        torch.manual_seed(0)
        np.random.seed(0)
        want = explainer.attribute(x, target=1, n_samples=5)
        assert float(want.abs().sum()) > 0, algorithm
        assert_all_close((torch.from_numpy(np.asarray(regressions[algorithm].attributions)),), (want.detach(),))
    namespace = {}
    exec(MASKED_MODEL_PY, namespace)
    want = ca.FeatureAblation(namespace["build_model"]().eval()).attribute(x, target=1, additional_forward_args=(mask,))
    assert_all_close((torch.from_numpy(np.asarray(ok.attributions)),), (want.detach(),))
