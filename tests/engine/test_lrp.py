"""LRP and LayerLRP against Captum 0.9.0 (its default rules), through the engine: alone, fused with others, in NoiseTunnel, and refused where Captum refuses."""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import captum.attr as ca
from attrserve_engine import AttributionJob, Engine, InputSpec, InvalidArgument, ModelSpec
from captum.attr._utils.custom_modules import Addition_Module
from oracle import MODELS, assert_all_close, assert_close, assert_fused_equals_alone, assert_split_passes, case_rng, engine_fixture, example_inputs, make_engine, run_fused

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class ConvLRP(nn.Module):
    """Every image layer Captum has a default rule for, plus the pass-through ones (an in-place ReLU, Dropout)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.relu2 = nn.ReLU(inplace=True)
        self.avg = nn.AvgPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d((2, 2))
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(6 * 2 * 2, 3)
        with torch.no_grad():  # running statistics that are not the identity
            self.bn.running_mean.uniform_(-0.2, 0.2)
            self.bn.running_var.uniform_(0.5, 1.5)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.1, 0.1)

    def forward(self, x):
        h = self.pool(self.relu1(self.bn(self.conv1(x))))
        h = self.gap(self.avg(self.relu2(self.conv2(h))))
        return self.fc(self.drop(h.flatten(1)))  # flattening as a tensor op: Captum has no rule for nn.Flatten


class TwoInput(nn.Module):
    """Two inputs joined by Captum's Addition_Module, one branch through Tanh."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(12)
        self.a = nn.Linear(4, 5)
        self.a_act = nn.Tanh()
        self.b = nn.Linear(3, 5)
        self.b_act = nn.ReLU()
        self.add = Addition_Module()
        self.head = nn.Linear(5, 2)

    def forward(self, x1, x2):
        return self.head(self.add(self.a_act(self.a(x1)), self.b_act(self.b(x2))))


class Residual(nn.Module):
    """A ReLU output used by two rule layers: its relevance is the sum over both (Captum hooks the tensor once)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(13)
        self.fc1 = nn.Linear(4, 6)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(6, 6)
        self.add = Addition_Module()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        a = self.relu(self.fc1(x))
        return self.head(self.add(a, self.fc2(a)))


class ReusedLinear(nn.Module):
    """One Linear applied twice: LRP refuses it (Captum: 'being used more than once')."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(14)
        self.fc = nn.Linear(4, 4)
        self.relu = nn.ReLU()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.fc(self.relu(self.fc(x))))


LRP_MODELS = {"toy": MODELS["toy"], "text": MODELS["text"], "grid": MODELS["grid"], "convlrp": ConvLRP, "two": TwoInput, "residual": Residual}
REFUSED = {"conv": ("relu2", "LeakyReLU"), "mlp": ("act1", "ELU"), "multi": ("b_act", "Softplus")}  # first leaf without a rule
N_CLASSES = {"toy": 2, "text": 2, "convlrp": 3, "two": 2, "residual": 3}


def inputs_for(model: str, n: int, seed: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    if model in MODELS:
        return example_inputs(model, n, seed)
    g = torch.Generator().manual_seed(seed)
    if model == "convlrp":
        return (torch.randn(n, 2, 8, 8, generator=g),), ()
    if model == "two":
        return (torch.randn(n, 4, generator=g), torch.randn(n, 3, generator=g)), ()
    return (torch.randn(n, 4, generator=g),), ()


@dataclass
class LrpCase:
    model: str
    layer: str = ""  # LayerLRP where set
    layer_input: bool = False
    target: str = "per_example"  # per_example | index
    delta: bool = False
    noise_tunnel: dict | None = None
    n: int = 3
    seed: int = 0

    @property
    def algorithm(self) -> str:
        return "layer_lrp" if self.layer else "lrp"

    @property
    def id(self) -> str:
        bits = [self.model, self.algorithm] + ([self.layer + ("-in" if self.layer_input else "-out")] if self.layer else [])
        bits += [f"t={self.target}", f"n={self.n}"] + (["delta"] if self.delta else [])
        return "-".join(bits + ([f"nt={self.noise_tunnel['nt_type']}"] if self.noise_tunnel else []))

    def build(self) -> dict[str, Any]:
        inputs, args = inputs_for(self.model, self.n, 100 + self.seed)
        if self.model == "grid":
            rows = [(i % 2, (i + 1) % 3) for i in range(self.n)] if self.target == "per_example" else [(1, 2)] * self.n
            captum_target: Any = rows
        else:
            rows = [(i % N_CLASSES[self.model],) for i in range(self.n)] if self.target == "per_example" else [(1,)] * self.n
            captum_target = [r[0] for r in rows] if self.target == "per_example" else 1
        return {"inputs": inputs, "args": args, "target": torch.tensor(rows, dtype=torch.int64), "captum_target": captum_target}

    def job(self, built: dict[str, Any]) -> AttributionJob:
        return AttributionJob(
            model=self.model,
            algorithm=self.algorithm,
            inputs=built["inputs"],
            target=built["target"],
            additional_forward_args=built["args"],
            params={"attribute_to_layer_input": self.layer_input} if self.layer else {},
            layer=self.layer,
            noise_tunnel=self.noise_tunnel,
            return_convergence_delta=self.delta,
            seed=self.seed,
        )


def captum_lrp(case: LrpCase, built: dict[str, Any]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """The oracle: Captum 0.9.0's LRP / LayerLRP (NoiseTunnel around LRP), seeded as docs/ARCHITECTURE.md says (Captum-parity traps)."""
    model = LRP_MODELS[case.model]().eval()
    method = ca.LayerLRP(model, model.get_submodule(case.layer)) if case.layer else ca.LRP(model)
    kwargs: dict[str, Any] = {"target": built["captum_target"], "return_convergence_delta": case.delta}
    if built["args"]:
        kwargs["additional_forward_args"] = built["args"]
    if case.layer:
        kwargs["attribute_to_layer_input"] = case.layer_input
    inputs = tuple(x.clone().requires_grad_() for x in built["inputs"])
    torch.manual_seed(case.seed)
    np.random.seed(case.seed)
    if case.noise_tunnel:
        nt = {k: tuple(v) if isinstance(v, list) else v for k, v in case.noise_tunnel.items()}
        out = ca.NoiseTunnel(method).attribute(inputs, **nt, **kwargs)
    else:
        out = method.attribute(inputs if len(inputs) > 1 else inputs[0], **kwargs)
    delta = None
    if case.delta:
        out, delta = out
    out = out if isinstance(out, tuple) else (out,)
    return tuple(o.detach() for o in out), (None if delta is None else delta.detach())


CASES = [
    LrpCase("toy", delta=True),
    LrpCase("toy", target="index", n=1),
    LrpCase("text", target="index", delta=True),  # a padding mask as additional forward arg, (B, T, D) activations
    LrpCase("grid", delta=True),  # index-tuple targets, a ReLU as the last layer
    LrpCase("convlrp", delta=True, n=4),
    LrpCase("two", delta=True),
    LrpCase("residual", target="index", delta=True),
    # LayerLRP: to layer outputs and inputs
    LrpCase("toy", "lin1", delta=True),
    LrpCase("toy", "lin1", layer_input=True),  # the model's input, as the first layer sees it
    LrpCase("toy", "lin2", layer_input=True, delta=True),
    LrpCase("toy", "lin2"),  # the output layer: its relevance is the one-hot target times the output
    LrpCase("convlrp", "conv2", delta=True, n=4),
    LrpCase("convlrp", "conv2", layer_input=True),
    LrpCase("convlrp", "pool", layer_input=True),
    LrpCase("convlrp", "bn"),
    LrpCase("convlrp", "gap", delta=True),
    LrpCase("convlrp", "fc", layer_input=True, target="index"),
    LrpCase("text", "proj", delta=True),
    LrpCase("text", "head", layer_input=True),
    LrpCase("two", "b", delta=True),
    LrpCase("two", "head", layer_input=True),
    LrpCase("residual", "fc2", layer_input=True, delta=True),  # its input also skips to `add`: both uses count
    LrpCase("residual", "add"),
    # NoiseTunnel around LRP (Captum's NoiseTunnel cannot wrap LayerLRP: its attribute has no __wrapped__)
    LrpCase("convlrp", noise_tunnel={"nt_type": "smoothgrad", "nt_samples": 4, "stdevs": 0.2}, delta=True, seed=3),
    LrpCase("two", noise_tunnel={"nt_type": "vargrad", "nt_samples": 3, "stdevs": [0.1, 0.3]}, seed=5),
    LrpCase("toy", noise_tunnel={"nt_type": "smoothgrad_sq", "nt_samples": 2, "stdevs": 0.5}, target="index", seed=8),
]

engine = engine_fixture({**LRP_MODELS, **{m: MODELS[m] for m in REFUSED}, "reused": ReusedLinear})


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_captum(engine: Engine, case: LrpCase) -> None:
    built = case.build()
    want, want_delta = captum_lrp(case, built)
    got = engine.attribute(case.job(built), timeout=60)
    assert_all_close(got.attributions, want)
    if case.delta:
        assert_close(got.convergence_delta, want_delta)
    else:
        assert got.convergence_delta is None


def test_relevance_is_conserved_where_no_bias_absorbs_it(engine: Engine) -> None:
    """The delta means something: output − Σ relevance; only biases (and eps) absorb relevance."""
    case = LrpCase("toy", delta=True, n=4)
    got = engine.attribute(case.job(case.build()), timeout=30)
    assert got.convergence_delta.shape == (4,)
    assert got.convergence_delta.abs().max() > 1e-3  # lin2 has a bias of 1
    assert not torch.allclose(got.attributions[0], torch.zeros_like(got.attributions[0]))


def test_layer_input_of_a_two_input_layer_is_in_input_order(engine: Engine) -> None:
    """Captum lists an Addition_Module's input relevances in the order its backward hooks fire
    (here: the second input first); attrserve returns them in input order."""
    case = LrpCase("two", "add", layer_input=True, delta=True)
    built = case.build()
    want, want_delta = captum_lrp(case, built)
    got = engine.attribute(case.job(built), timeout=30)
    assert_all_close(got.attributions, tuple(reversed(want)))
    assert_close(got.convergence_delta, want_delta)


@pytest.mark.parametrize("model", sorted(REFUSED))
@pytest.mark.parametrize("algorithm", ["lrp", "layer_lrp"])
def test_models_captum_refuses_are_invalid_argument_naming_the_module(engine: Engine, model: str, algorithm: str) -> None:
    name, kind = REFUSED[model]
    with pytest.raises(TypeError, match="no rule defined"):  # Captum refuses them too
        ca.LRP(MODELS[model]()).attribute(example_inputs(model, 1, 0)[0][0].requires_grad_(), target=0)
    inputs, args = example_inputs(model, 2, 0)
    layer = next(n for n, m in MODELS[model]().named_modules() if isinstance(m, nn.Linear))
    job = AttributionJob(model=model, algorithm=algorithm, inputs=inputs, target=torch.zeros((2, 1), dtype=torch.int64), layer=layer if algorithm == "layer_lrp" else "")
    with pytest.raises(InvalidArgument, match=f"no rule for module '{name}' \\({kind}\\)"):
        engine.attribute(job, timeout=30)


@pytest.mark.parametrize("layer, why", [("relu", "only passes relevance through"), ("", None)])
def test_layer_lrp_needs_a_layer_with_a_rule(engine: Engine, layer: str, why: str | None) -> None:
    inputs, _ = example_inputs("toy", 2, 0)
    job = AttributionJob(model="toy", algorithm="layer_lrp", inputs=inputs, target=torch.zeros((2, 1), dtype=torch.int64), layer=layer)
    with pytest.raises(InvalidArgument, match=why or "needs `layer`"):
        engine.attribute(job, timeout=30)
    if layer:
        model = MODELS["toy"]()
        with pytest.raises(AttributeError):  # Captum fails on it: a pass-through layer records no relevance
            ca.LayerLRP(model, model.get_submodule(layer)).attribute(inputs[0].clone().requires_grad_(), target=0)


def test_a_layer_used_twice_is_invalid_argument(engine: Engine) -> None:
    x = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="used more than once"):
        ca.LRP(ReusedLinear()).attribute(x.clone().requires_grad_(), target=0)
    job = AttributionJob(model="reused", algorithm="lrp", inputs=(x,), target=torch.zeros((2, 1), dtype=torch.int64))
    with pytest.raises(InvalidArgument, match="more than once"):
        engine.attribute(job, timeout=30)


def test_hooks_are_removed_and_the_model_is_unchanged(engine: Engine) -> None:
    case = LrpCase("convlrp", delta=True)
    built = case.build()
    saliency = AttributionJob(model="convlrp", algorithm="saliency", inputs=built["inputs"], target=built["target"])
    before = engine.attribute(saliency, timeout=30).attributions[0]
    state = {k: v.clone() for k, v in engine.get_model("convlrp").module.state_dict().items()}
    engine.attribute(case.job(built), timeout=30)
    module = engine.get_model("convlrp").module
    for m in module.modules():
        assert not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks), m
        assert not hasattr(m, "rule") and not hasattr(m, "activations")
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in state.items())
    assert torch.equal(engine.attribute(saliency, timeout=30).attributions[0], before)


def test_supported_algorithms_leave_out_lrp_for_models_captum_refuses() -> None:
    """A model Captum's LRP refuses is left out at load, pinned input shapes or not."""
    engine = Engine()
    try:
        conv = engine.load(ModelSpec(name="conv", module=MODELS["conv"](), inputs=[InputSpec("x", torch.float32, (2, 8, 8))]))
        toy = engine.load(ModelSpec(name="toy", module=MODELS["toy"](), inputs=[InputSpec("x", torch.float32, (3,))]))
        assert {"lrp", "layer_lrp"} <= set(engine.supported_algorithms(toy))
        assert "lrp" not in engine.supported_algorithms(conv)
        reason = engine.algorithms["lrp"].refusal(conv)
        assert "relu2" in reason and "LeakyReLU" in reason
        assert "layer_lrp" not in engine.supported_algorithms(conv)  # refused at load, without a warm-up
        unpinned = engine.load(ModelSpec(name="conv_unpinned", module=MODELS["conv"]()))
        assert not {"lrp", "layer_lrp"} & set(engine.supported_algorithms(unpinned))
    finally:
        engine.shutdown()


# -- fused with other requests ---------------------------------------------------------------------
def random_job(case: LrpCase, rng: random.Random) -> AttributionJob:
    """Another request for the same model: LRP or LayerLRP on the same layer (they share passes), or a gradient method."""
    algorithm = rng.choice(["lrp", "lrp", "layer", "layer", "saliency", "input_x_gradient"])
    n = rng.randint(1, 4)
    if algorithm in ("lrp", "layer"):
        other = LrpCase(
            case.model,
            case.layer if algorithm == "layer" else "",
            case.layer_input,
            delta=rng.random() < 0.5,
            noise_tunnel={"nt_samples": 2, "stdevs": 0.1} if rng.random() < 0.3 else None,
            n=n,
            seed=rng.randint(0, 1000),
        )
        if algorithm == "layer" and not case.layer:
            other.layer = rng.choice([name for name, m in LRP_MODELS[case.model]().named_modules() if isinstance(m, nn.Linear)])
        return other.job(other.build())
    built = LrpCase(case.model, n=n, seed=rng.randint(0, 1000)).build()
    return AttributionJob(model=case.model, algorithm=algorithm, inputs=built["inputs"], target=built["target"], additional_forward_args=built["args"])


FUSION_CASES = [
    LrpCase("convlrp", delta=True, n=5),
    LrpCase("convlrp", "conv2", layer_input=True, delta=True, n=4),
    LrpCase("two", noise_tunnel={"nt_type": "smoothgrad", "nt_samples": 3, "stdevs": 0.2}, delta=True, seed=4),
    LrpCase("text", "proj", n=4),
]


@pytest.mark.parametrize("max_batch_rows", [4096, 7], ids=["one-pass", "split-passes"])
@pytest.mark.parametrize("case", FUSION_CASES, ids=lambda c: c.id)
def test_fused_equals_alone(engine: Engine, case: LrpCase, max_batch_rows: int) -> None:
    built = case.build()
    alone = engine.attribute(case.job(built), timeout=60)
    rng = case_rng(case.id)
    others = [random_job(case, rng) for _ in range(15)]
    run = run_fused(partial(make_engine, {case.model: LRP_MODELS[case.model]}), case.job(built), others, max_batch_rows)
    assert_fused_equals_alone(run.fused, alone, case.delta)
    if max_batch_rows < 4096:
        assert_split_passes(run, max_batch_rows)
