"""Neuron methods against Captum 0.9.0: several models, layers and neurons, to layer outputs and inputs, alone and fused."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import captum.attr as ca
from attrserve_engine import AttributionJob, Engine, InvalidArgument
from oracle import MODELS, assert_all_close, assert_fused_equals_alone, assert_split_passes, engine_fixture, example_inputs, make_engine, run_fused

CAPTUM = {
    "neuron_gradient": ca.NeuronGradient,
    "neuron_integrated_gradients": ca.NeuronIntegratedGradients,
    "neuron_gradient_shap": ca.NeuronGradientShap,
    "neuron_deep_lift": ca.NeuronDeepLift,
    "neuron_conductance": ca.NeuronConductance,
    "neuron_deep_lift_shap": ca.NeuronDeepLiftShap,
    "neuron_guided_backprop": ca.NeuronGuidedBackprop,
    "neuron_deconvolution": ca.NeuronDeconvolution,
    "neuron_feature_ablation": ca.NeuronFeatureAblation,
}
NO_BASELINES = {"neuron_gradient", "neuron_guided_backprop", "neuron_deconvolution"}
DISTRIBUTION = {"neuron_gradient_shap", "neuron_deep_lift_shap"}
CTOR = {"multiply_by_inputs"}


@dataclass
class NeuronCase:
    model: str
    algorithm: str
    layer: str
    neuron: tuple
    params: dict[str, Any] = field(default_factory=dict)
    baselines: str = "none"  # none | row | distribution
    to_input: bool = False
    seed: int = 0
    n: int = 3

    @property
    def id(self) -> str:
        return "-".join([self.model, self.algorithm, self.layer, str(self.neuron)] + [f"{k}={v}" for k, v in self.params.items()] + [self.baselines] + (["input"] if self.to_input else []))

    def build(self) -> dict:
        inputs, args = example_inputs(self.model, self.n, seed=400 + self.seed)
        g = torch.Generator().manual_seed(401)
        rows = {"none": 0, "row": 1, "distribution": 3}[self.baselines]
        baselines = tuple(0.1 * torch.randn((rows, *x.shape[1:]), generator=g) for x in inputs) if rows else ()
        return {"inputs": inputs, "args": args, "baselines": baselines, "target": [i % 2 for i in range(self.n)]}


def captum_neuron(case: NeuronCase, built: dict) -> tuple[torch.Tensor, ...]:
    model = MODELS[case.model]().eval()
    ctor = {k: v for k, v in case.params.items() if k in CTOR}
    kwargs: dict[str, Any] = {k: v for k, v in case.params.items() if k not in CTOR}
    method = CAPTUM[case.algorithm](model, model.get_submodule(case.layer), **ctor)
    if built["args"]:
        kwargs["additional_forward_args"] = built["args"]
    if built["baselines"]:
        kwargs["baselines"] = built["baselines"]
    elif case.algorithm == "neuron_gradient_shap":
        kwargs["baselines"] = tuple(torch.zeros((1, *x.shape[1:])) for x in built["inputs"])
    if case.algorithm == "neuron_conductance":
        kwargs["target"] = built["target"]
    if case.algorithm == "neuron_deep_lift_shap" and not built["baselines"]:
        kwargs["baselines"] = tuple(torch.zeros((2, *x.shape[1:])) for x in built["inputs"])
    inputs = tuple(x.clone().requires_grad_() for x in built["inputs"])
    torch.manual_seed(case.seed)
    np.random.seed(case.seed)
    out = method.attribute(inputs, neuron_selector=case.neuron, attribute_to_neuron_input=case.to_input, **kwargs)
    return tuple(o.detach() for o in (out if isinstance(out, tuple) else (out,)))


def job(case: NeuronCase, built: dict) -> AttributionJob:
    return AttributionJob(
        model=case.model,
        algorithm=case.algorithm,
        inputs=built["inputs"],
        baselines=built["baselines"],
        target=torch.tensor([[t] for t in built["target"]]) if case.algorithm == "neuron_conductance" else None,
        additional_forward_args=built["args"],
        params={**case.params, "neuron_selector": list(case.neuron), "attribute_to_neuron_input": case.to_input},
        layer=case.layer,
        seed=case.seed,
    )


def _cases() -> list[NeuronCase]:
    cases = []
    for model, layer, neuron, in_layer, in_neuron in [
        ("conv", "conv2", (1, 2, 3), "relu2", (3, 1, 1)),
        ("mlp", "fc2", (4,), "act2", (2,)),
        ("multi", "head", (1,), "head", (7,)),
        ("text", "proj", (2, 1), "act", (4, 5)),
    ]:
        for name in CAPTUM:
            params = {"n_steps": 10} if name in ("neuron_integrated_gradients", "neuron_conductance") else {}
            if name == "neuron_gradient_shap":
                params = {"n_samples": 4, "stdevs": 0.1}
            base = "distribution" if name in DISTRIBUTION else "none"
            other = "none" if name in NO_BASELINES else "distribution" if base == "distribution" else "row"
            cases.append(NeuronCase(model, name, layer, neuron, dict(params), baselines=base, seed=5))
            cases.append(NeuronCase(model, name, in_layer, in_neuron, dict(params), baselines=other, to_input=True, seed=6))
    cases += [
        NeuronCase("conv", "neuron_integrated_gradients", "conv1", (0, 4, 4), {"n_steps": 8, "method": "riemann_right", "multiply_by_inputs": False}),
        NeuronCase("conv", "neuron_conductance", "relu1", (2, 3, 3), {"n_steps": 6, "method": "gausslegendre"}, baselines="row"),
        NeuronCase("mlp", "neuron_deep_lift", "act1", (1,), {"multiply_by_inputs": False}, baselines="row"),
        NeuronCase("conv", "neuron_gradient", "pool", (1, 2, 2), n=5),
        # Captum's memory hint: its passes cut into chunks of 3 rows, the numbers the same.
        NeuronCase("mlp", "neuron_integrated_gradients", "fc2", (4,), {"n_steps": 8, "internal_batch_size": 3}, baselines="row"),
        NeuronCase("mlp", "neuron_conductance", "act1", (1,), {"n_steps": 6, "internal_batch_size": 3}, baselines="row"),
    ]
    return cases


CASES = _cases()
engine = engine_fixture(MODELS)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_neuron_method_matches_captum(engine: Engine, case: NeuronCase) -> None:
    built = case.build()
    want = captum_neuron(case, built)
    got = engine.attribute(job(case, built), timeout=60).attributions
    assert_all_close(got, want, check_dtype=True)


def test_neuron_methods_fused_equal_alone() -> None:
    """Every conv case queued together (held) on an engine of 64 rows a pass: each equals itself alone, and
    run_fused checks the passes (bounds per request from its rows, exact accounting); the first shares a pass."""
    cases = [c for c in CASES if c.model == "conv"]
    jobs = [job(c, c.build()) for c in cases]
    run = run_fused(partial(make_engine, MODELS), jobs[0], jobs[1:], 64, before=0)
    assert_fused_equals_alone(run.fused, run.alone, delta=False)
    assert_split_passes(run, 64)
    assert len(run.results) == len(cases)


def test_neuron_selector_errors(engine: Engine) -> None:
    case = NeuronCase("mlp", "neuron_gradient", "fc2", (99,))
    with pytest.raises(InvalidArgument, match="neuron_selector index 99 is out of range"):
        engine.attribute(job(case, case.build()), timeout=30)
    missing = job(case, case.build())
    missing.params = {}
    with pytest.raises(InvalidArgument, match="neuron_selector is required"):
        engine.submit(missing)


class _Split(nn.Module):
    def forward(self, x):
        return x[:, :3], x[:, 3:] * 2.0


class _Join(nn.Module):
    def forward(self, a, b):
        return a * b + a


class TwoTensorLayers(nn.Module):
    """`split` returns two tensors and `join` takes two: neither has the one tensor a neuron selector indexes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(9)
        self.fc = nn.Linear(5, 6)
        self.act = nn.Tanh()
        self.split = _Split()
        self.join = _Join()
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        a, b = self.split(self.act(self.fc(x)))
        return self.head(self.join(a, b))


def test_layer_of_several_tensors_is_refused() -> None:
    """Captum refuses a neuron selector on a layer with several output (or, with attribute_to_neuron_input, input)
    tensors ("Cannot select neuron index from layer with multiple tensors"); attrserve explained the first tensor
    silently. Every neuron method is refused with INVALID_ARGUMENT naming neuron_selector, and the engine then serves
    a neuron of a one-tensor layer of the same model as Captum does."""
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    dist = 0.1 * torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    engine = make_engine({"two": TwoTensorLayers})
    try:
        for name, cls in CAPTUM.items():
            baselines = (dist,) if name in DISTRIBUTION else () if name in NO_BASELINES else (dist[:1],)
            params: dict[str, Any] = {"n_steps": 4} if name in ("neuron_integrated_gradients", "neuron_conductance") else {}
            for layer, to_input in (("split", False), ("join", True)):
                model = TwoTensorLayers()
                kwargs: dict[str, Any] = dict(params, baselines=baselines[0]) if baselines else dict(params)
                if name == "neuron_conductance":
                    kwargs["target"] = 1
                with pytest.raises(AssertionError, match="multiple tensors"):
                    cls(model, model.get_submodule(layer)).attribute(x.clone().requires_grad_(), neuron_selector=(1,), attribute_to_neuron_input=to_input, **kwargs)
                request = AttributionJob(
                    model="two",
                    algorithm=name,
                    inputs=(x,),
                    baselines=baselines,
                    target=torch.tensor([[1]] * 3) if name == "neuron_conductance" else None,
                    params={**params, "neuron_selector": [1], "attribute_to_neuron_input": to_input},
                    layer=layer,
                    seed=0,
                )
                what = "inputs" if to_input else "outputs"
                with pytest.raises(InvalidArgument, match=f"{name}.neuron_selector indexes one tensor, but layer '{layer}' has 2 {what}"):
                    engine.attribute(request, timeout=60)
        model = TwoTensorLayers()
        want = ca.NeuronGradient(model, model.act).attribute(x.clone().requires_grad_(), neuron_selector=(4,))
        good = AttributionJob(model="two", algorithm="neuron_gradient", inputs=(x,), params={"neuron_selector": [4]}, layer="act")
        assert_all_close(engine.attribute(good, timeout=60).attributions, (want.detach(),))
    finally:
        engine.shutdown()


def test_layer_of_several_tensors_is_refused_before_any_pass_where_its_shapes_are_pinned() -> None:
    """A model whose input shapes are pinned has its layers measured at load: a neuron method on a layer of several
    output (or input) tensors is refused at submission with the same message, before a pass runs (it once ran the
    whole pass and threw it away); the engine then serves a one-tensor layer of the model as Captum does."""
    from attrserve_engine import EngineLimits, InputSpec, ModelSpec

    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    engine = Engine(EngineLimits())
    try:
        engine.load(ModelSpec(name="two", module=TwoTensorLayers(), inputs=[InputSpec("x", torch.float32, (5,))]))
        passes = engine.passes
        for name in CAPTUM:
            baselines = (x[:1] * 0,) if name not in NO_BASELINES else ()
            params: dict[str, Any] = {"n_steps": 4} if name in ("neuron_integrated_gradients", "neuron_conductance") else {}
            for layer, to_input in (("split", False), ("join", True)):
                what = "inputs" if to_input else "outputs"
                request = AttributionJob(
                    model="two", algorithm=name, inputs=(x,), baselines=baselines, target=torch.tensor([[1]] * 3) if name == "neuron_conductance" else None,
                    params={**params, "neuron_selector": [1], "attribute_to_neuron_input": to_input}, layer=layer, seed=0,
                )
                with pytest.raises(InvalidArgument, match=f"{name}.neuron_selector indexes one tensor, but layer '{layer}' has 2 {what}"):
                    engine.submit(request)
        assert engine.passes == passes  # refused at submission: no pass ran
        model = TwoTensorLayers()
        want = ca.NeuronGradient(model, model.act).attribute(x.clone().requires_grad_(), neuron_selector=(4,))
        good = AttributionJob(model="two", algorithm="neuron_gradient", inputs=(x,), params={"neuron_selector": [4]}, layer="act")
        assert_all_close(engine.attribute(good, timeout=60).attributions, (want.detach(),))
        assert engine.passes > passes
    finally:
        engine.shutdown()
