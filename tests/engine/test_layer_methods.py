"""Layer methods against Captum 0.9.0: every method on several models and layers, to layer outputs and inputs, alone and fused."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
import torch
from torch import nn

import captum.attr as ca
from attrserve_engine import AttributionJob, Engine, InvalidArgument, NotFound
from oracle import LAYER_MODELS, MODELS, assert_all_close, assert_close, assert_fused_equals_alone, assert_split_passes, case_rng, engine_fixture, example_inputs, make_engine, run_fused




def inputs_for(model: str, n: int, seed: int):
    if model == "tokens":
        g = torch.Generator().manual_seed(seed)
        return (torch.randint(1, 20, (n, 7), generator=g),), ()
    return example_inputs(model, n, seed)


CAPTUM = {
    "layer_integrated_gradients": ca.LayerIntegratedGradients,
    "layer_conductance": ca.LayerConductance,
    "internal_influence": ca.InternalInfluence,
    "layer_gradient_x_activation": ca.LayerGradientXActivation,
    "layer_activation": ca.LayerActivation,
    "layer_grad_cam": ca.LayerGradCam,
}
CTOR_PARAMS = {"multiply_by_inputs"}
NO_TARGET = {"layer_activation"}
HAS_BASELINES = {"layer_integrated_gradients", "layer_conductance", "internal_influence"}
HAS_DELTA = {"layer_integrated_gradients", "layer_conductance"}  # the layer methods Captum gives a convergence delta


@dataclass
class LayerCase:
    model: str
    algorithm: str
    layer: str
    params: dict[str, Any] = field(default_factory=dict)
    baselines: str = "none"  # none | row
    delta: bool = False
    n: int = 3

    @property
    def id(self) -> str:
        return "-".join([self.model, self.algorithm, self.layer] + [f"{k}={v}" for k, v in self.params.items()] + [self.baselines] + (["delta"] if self.delta else []))

    def build(self) -> dict:
        inputs, args = inputs_for(self.model, self.n, seed=300)
        baselines: tuple = ()
        if self.baselines == "row":
            g = torch.Generator().manual_seed(301)
            baselines = tuple(
                torch.zeros((1, *x.shape[1:]), dtype=x.dtype) if not x.is_floating_point() else 0.1 * torch.randn((1, *x.shape[1:]), generator=g)
                for x in inputs
            )
        target = [i % 2 for i in range(self.n)]
        return {"inputs": inputs, "args": args, "baselines": baselines, "target": target}


def captum_layer(case: LayerCase, built: dict):
    model = LAYER_MODELS[case.model]().eval()
    layer = model.get_submodule(case.layer)
    ctor = {k: v for k, v in case.params.items() if k in CTOR_PARAMS}
    call = {k: v for k, v in case.params.items() if k not in CTOR_PARAMS}
    method = CAPTUM[case.algorithm](model, layer, **ctor)
    kwargs: dict[str, Any] = dict(call)
    if case.algorithm not in NO_TARGET:
        kwargs["target"] = built["target"]
    if built["args"]:
        kwargs["additional_forward_args"] = built["args"]
    if built["baselines"]:
        kwargs["baselines"] = built["baselines"]
    if case.delta:
        kwargs["return_convergence_delta"] = True
    inputs = tuple(x.clone().requires_grad_() if x.is_floating_point() else x for x in built["inputs"])
    out = method.attribute(inputs if len(inputs) > 1 else inputs[0], **kwargs)
    delta = None
    if case.delta:
        out, delta = out
    out = out if isinstance(out, (tuple, list)) else (out,)
    return tuple(o.detach() for o in out), delta


def job(case: LayerCase, built: dict) -> AttributionJob:
    target = None if case.algorithm in NO_TARGET else torch.tensor([[t] for t in built["target"]])
    return AttributionJob(
        model=case.model,
        algorithm=case.algorithm,
        inputs=built["inputs"],
        baselines=built["baselines"],
        target=target,
        additional_forward_args=built["args"],
        params=dict(case.params),
        layer=case.layer,
        return_convergence_delta=case.delta,
    )


def _cases() -> list[LayerCase]:
    cases = []
    for model, layer, layer_input in [("conv", "conv2", "pool"), ("mlp", "fc2", "act1"), ("multi", "head", "b_act"), ("text", "proj", "act")]:
        for name in ("layer_activation", "layer_gradient_x_activation", "layer_grad_cam", "internal_influence", "layer_conductance", "layer_integrated_gradients"):
            steps = {"n_steps": 12} if name in HAS_BASELINES else {}
            cases.append(LayerCase(model, name, layer, dict(steps), delta=name in ("layer_conductance", "layer_integrated_gradients")))
            cases.append(LayerCase(model, name, layer_input, {**steps, "attribute_to_layer_input": True}, baselines="row" if name in HAS_BASELINES else "none"))
    cases += [
        LayerCase("conv", "layer_grad_cam", "relu1", {"relu_attributions": True, "attr_dim_summation": False}),
        LayerCase("conv", "layer_gradient_x_activation", "conv1", {"multiply_by_inputs": False}),
        LayerCase("mlp", "layer_integrated_gradients", "fc1", {"n_steps": 9, "method": "riemann_trapezoid", "multiply_by_inputs": False}, baselines="row"),
        LayerCase("conv", "layer_conductance", "relu1", {"n_steps": 7, "method": "riemann_left"}, baselines="row", delta=True),
        LayerCase("tokens", "layer_integrated_gradients", "embedding", {"n_steps": 20}, delta=True),
        LayerCase("tokens", "layer_integrated_gradients", "embedding", {"n_steps": 10}, baselines="row"),
        LayerCase("tokens", "layer_gradient_x_activation", "embedding"),
        LayerCase("tokens", "layer_activation", "fc"),
        LayerCase("tokens", "layer_grad_cam", "fc"),
        # Captum's memory hint: its passes cut into chunks of 3 rows, the numbers the same.
        LayerCase("mlp", "layer_integrated_gradients", "fc1", {"n_steps": 8, "internal_batch_size": 3}, baselines="row", delta=True),
        LayerCase("mlp", "layer_conductance", "act1", {"n_steps": 7, "internal_batch_size": 3}, delta=True),
        LayerCase("mlp", "internal_influence", "fc2", {"n_steps": 6, "internal_batch_size": 4}, baselines="row"),
    ]
    return cases


CASES = _cases()
engine = engine_fixture(LAYER_MODELS)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_layer_method_matches_captum(engine: Engine, case: LayerCase) -> None:
    built = case.build()
    want, want_delta = captum_layer(case, built)
    got = engine.attribute(job(case, built), timeout=60)
    assert_all_close(got.attributions, want)
    if case.delta:
        assert_close(got.convergence_delta, want_delta)


FUSION = [c for c in CASES if c.model in ("conv", "tokens") and not c.params.get("attribute_to_layer_input")]


@pytest.mark.parametrize("max_batch_rows", [4096, 23], ids=["one-pass", "split-passes"])
@pytest.mark.parametrize("case", FUSION, ids=lambda c: c.id)
def test_layer_method_fused_equals_alone(engine: Engine, case: LayerCase, max_batch_rows: int) -> None:
    case = dataclasses.replace(case, delta=case.algorithm in HAS_DELTA)  # fused or not, the delta too where there is one
    built = case.build()
    alone = engine.attribute(job(case, built), timeout=60)
    rng = case_rng(case.id)
    others = []
    for _ in range(15):
        other = random.Random(rng.random())
        name = other.choice([c for c in CASES if c.model == case.model])
        o = LayerCase(case.model, name.algorithm, name.layer, dict(name.params), delta=name.algorithm in HAS_DELTA, n=other.randint(1, 4))
        ob = o.build()
        others.append(job(o, ob))
    run = run_fused(partial(make_engine, LAYER_MODELS), job(case, built), others, max_batch_rows)
    assert_fused_equals_alone(run.fused, alone, case.delta)
    if max_batch_rows < 4096:
        assert_split_passes(run, max_batch_rows)


def test_layer_errors(engine: Engine) -> None:
    built = LayerCase("conv", "layer_grad_cam", "conv2").build()
    bad = job(LayerCase("conv", "layer_grad_cam", "nope"), built)
    with pytest.raises(NotFound, match="has no layer 'nope'"):
        engine.submit(bad)
    missing = job(LayerCase("conv", "layer_grad_cam", ""), built)
    with pytest.raises(InvalidArgument, match="needs `layer`"):
        engine.submit(missing)
    tokens = LayerCase("tokens", "internal_influence", "fc")
    with pytest.raises(InvalidArgument, match="must be floating point"):
        engine.submit(job(tokens, tokens.build()))
    assert "layer_integrated_gradients" in engine.supported_algorithms(engine.get_model("tokens"))
    assert "integrated_gradients" in engine.supported_algorithms(engine.get_model("tokens"))  # no input specs: dtype unknown
