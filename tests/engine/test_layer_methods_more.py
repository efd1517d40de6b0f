"""LayerDeepLift, LayerDeepLiftShap, LayerGradientShap, LayerFeatureAblation and GuidedGradCam against Captum 0.9.0, alone and fused."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import captum.attr as ca
from attrserve_engine import AttributionJob, Engine, InvalidArgument, ResourceExhausted
from oracle import LAYER_MODELS, MODELS, assert_all_close, assert_close, assert_fused_equals_alone, assert_split_passes, case_rng, engine_fixture, example_inputs, make_engine, run_fused


CAPTUM = {
    "layer_deep_lift": ca.LayerDeepLift,
    "layer_deep_lift_shap": ca.LayerDeepLiftShap,
    "layer_gradient_shap": ca.LayerGradientShap,
    "layer_feature_ablation": ca.LayerFeatureAblation,
    "guided_grad_cam": ca.GuidedGradCam,
}
CTOR_PARAMS = {"multiply_by_inputs"}
HAS_DELTA = {"layer_deep_lift", "layer_deep_lift_shap", "layer_gradient_shap"}


def inputs_for(model: str, n: int, seed: int):
    if model == "tokens":
        g = torch.Generator().manual_seed(seed)
        return (torch.randint(1, 20, (n, 7), generator=g),), ()
    return example_inputs(model, n, seed)


@dataclass
class MoreCase:
    model: str
    algorithm: str
    layer: str
    params: dict[str, Any] = field(default_factory=dict)
    baselines: str = "none"  # none | scalar | row | per_example | distribution
    target: str = "per_example"  # per_example | index
    delta: bool = False
    seed: int = 0
    n: int = 3

    @property
    def id(self) -> str:
        bits = [self.model, self.algorithm, self.layer] + [f"{k}={v}" for k, v in self.params.items()]
        return "-".join(bits + [f"b={self.baselines}", f"t={self.target}", f"s={self.seed}"] + (["delta"] if self.delta else []))

    def build(self) -> dict:
        inputs, args = inputs_for(self.model, self.n, seed=400 + self.seed)
        g = torch.Generator().manual_seed(401 + self.seed)

        def draw(rows: int, x: torch.Tensor) -> torch.Tensor:
            if not x.is_floating_point():  # token ids: the padding token as baseline
                return torch.zeros((rows, *x.shape[1:]), dtype=x.dtype)
            return 0.1 * torch.randn((rows, *x.shape[1:]), generator=g)

        rows = {"row": 1, "per_example": self.n, "distribution": 4}.get(self.baselines)
        if self.baselines == "scalar":
            baselines: tuple = tuple(0.25 for _ in inputs)
        else:
            baselines = () if rows is None else tuple(draw(rows, x) for x in inputs)
        target = [i % 2 for i in range(self.n)] if self.target == "per_example" else 1
        return {"inputs": inputs, "args": args, "baselines": baselines, "target": target}


def captum_more(case: MoreCase, built: dict):
    """The oracle, seeded as docs/ARCHITECTURE.md says (Captum-parity traps)."""
    model = LAYER_MODELS[case.model]().eval()
    layer = model.get_submodule(case.layer)
    ctor = {k: v for k, v in case.params.items() if k in CTOR_PARAMS}
    kwargs: dict[str, Any] = {k: v for k, v in case.params.items() if k not in CTOR_PARAMS}
    if isinstance(kwargs.get("stdevs"), list):
        kwargs["stdevs"] = tuple(kwargs["stdevs"])
    method = CAPTUM[case.algorithm](model, layer, **ctor)
    kwargs["target"] = built["target"]
    if built["args"]:
        kwargs["additional_forward_args"] = built["args"]
    if built["baselines"]:
        kwargs["baselines"] = built["baselines"]
    elif case.algorithm == "layer_gradient_shap":  # Captum requires them; attrserve defaults to zeros
        kwargs["baselines"] = tuple(torch.zeros((1, *x.shape[1:])) for x in built["inputs"])
    if case.delta:
        kwargs["return_convergence_delta"] = True
    inputs = tuple(x.clone().requires_grad_() if x.is_floating_point() else x for x in built["inputs"])
    torch.manual_seed(case.seed)
    np.random.seed(case.seed)
    out = method.attribute(inputs if len(inputs) > 1 else inputs[0], **kwargs)
    delta = None
    if case.delta:
        out, delta = out
    out = out if isinstance(out, (tuple, list)) else (out,)
    return tuple(o.detach() for o in out), delta


def job(case: MoreCase, built: dict) -> AttributionJob:
    target = built["target"]
    rows = [[t] for t in target] if isinstance(target, list) else [[target]] * case.n
    return AttributionJob(
        model=case.model,
        algorithm=case.algorithm,
        inputs=built["inputs"],
        baselines=built["baselines"],
        target=torch.tensor(rows),
        additional_forward_args=built["args"],
        params=dict(case.params),
        layer=case.layer,
        return_convergence_delta=case.delta,
        seed=case.seed,
    )


def _cases() -> list[MoreCase]:
    to_input = {"attribute_to_layer_input": True}
    cases = []
    # (model, a layer's output, a layer whose input is attributed)
    for model, out_layer, in_layer in [("conv", "conv2", "relu2"), ("mlp", "fc2", "act2"), ("multi", "head", "b_act"), ("text", "proj", "act")]:
        cases += [
            MoreCase(model, "layer_deep_lift", out_layer, baselines="row", delta=True),
            MoreCase(model, "layer_deep_lift", in_layer, dict(to_input), baselines="per_example", target="index", delta=True),
            MoreCase(model, "layer_deep_lift", out_layer, {"multiply_by_inputs": False}, baselines="scalar"),
            MoreCase(model, "layer_deep_lift_shap", out_layer, baselines="distribution", delta=True),
            MoreCase(model, "layer_deep_lift_shap", in_layer, {**to_input, "multiply_by_inputs": False}, baselines="distribution"),
            MoreCase(model, "layer_gradient_shap", out_layer, {"n_samples": 4, "stdevs": 0.1}, baselines="distribution", delta=True, seed=7),
            MoreCase(model, "layer_gradient_shap", in_layer, {**to_input, "n_samples": 3}, target="index", seed=3),
            MoreCase(model, "layer_feature_ablation", out_layer),
            MoreCase(model, "layer_feature_ablation", in_layer, {**to_input, "layer_baselines": 0.5, "perturbations_per_eval": 4}, target="index"),
        ]
    cases += [
        # The layer is itself a rule-hooked module (ReLU, MaxPool, Softmax, ELU): Captum leaves it unhooked for its output.
        MoreCase("conv", "layer_deep_lift", "relu1", baselines="row", delta=True),
        MoreCase("conv", "layer_deep_lift", "relu1", {"attribute_to_layer_input": True}, baselines="row"),
        MoreCase("conv", "layer_deep_lift", "pool", baselines="per_example"),
        MoreCase("conv", "layer_deep_lift_shap", "pool", {"attribute_to_layer_input": True}, baselines="distribution", delta=True),
        MoreCase("mlp", "layer_deep_lift", "softmax", {"attribute_to_layer_input": True}, baselines="row", delta=True),
        MoreCase("mlp", "layer_deep_lift", "act1", baselines="row", n=5),
        MoreCase("multi", "layer_gradient_shap", "a_act", {"n_samples": 5, "stdevs": [0.2, 0.0], "multiply_by_inputs": False}, baselines="distribution", delta=True, seed=11),
        MoreCase("conv", "layer_gradient_shap", "pool", {"n_samples": 2, "stdevs": 0.3}, baselines="row", seed=5),
        MoreCase("conv", "layer_feature_ablation", "relu1", {"layer_baselines": -0.1}, n=2),
        # An embedding (token ids): ablation and DeepLift need no gradient w.r.t. the inputs.
        MoreCase("tokens", "layer_feature_ablation", "embedding"),
        MoreCase("tokens", "layer_feature_ablation", "fc", {"attribute_to_layer_input": True, "layer_baselines": 0.3}, target="index"),
        MoreCase("tokens", "layer_deep_lift", "embedding", baselines="row", delta=True),
        # GuidedGradCam: input-shaped attributions, the CAM upsampled with each mode.
        MoreCase("conv", "guided_grad_cam", "conv2"),
        MoreCase("conv", "guided_grad_cam", "conv1", {"interpolate_mode": "bilinear"}, target="index"),
        MoreCase("conv", "guided_grad_cam", "relu2", {"attribute_to_layer_input": True, "interpolate_mode": "area"}),
        MoreCase("conv", "guided_grad_cam", "pool", {"interpolate_mode": "bicubic"}, n=1),
        MoreCase("text", "guided_grad_cam", "proj", {"interpolate_mode": "linear"}),
    ]
    return cases


CASES = _cases()
engine = engine_fixture(LAYER_MODELS)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_more_layer_methods_match_captum(engine: Engine, case: MoreCase) -> None:
    built = case.build()
    want, want_delta = captum_more(case, built)
    got = engine.attribute(job(case, built), timeout=60)
    assert_all_close(got.attributions, want)
    if case.delta:
        assert_close(got.convergence_delta, want_delta)
    if case.algorithm == "guided_grad_cam":  # a layer method whose attributions are shaped like the inputs
        assert [tuple(a.shape) for a in got.attributions] == [tuple(x.shape) for x in built["inputs"]]


def _fusion_cases() -> list[MoreCase]:
    """Per algorithm, the first conv case to the layer's output and to its input, the cases whose rows
    then meet MaxPool's rule (it looks beyond a row pair), and the token-model cases."""
    seen, picked = set(), []
    for c in CASES:
        key = (c.model, c.algorithm, bool(c.params.get("attribute_to_layer_input")))
        if (c.model == "conv" and (key not in seen or c.layer == "relu1")) or c.model == "tokens":
            seen.add(key)
            picked.append(c)
    return picked


FUSION = _fusion_cases()


@pytest.mark.parametrize("max_batch_rows", [4096, 23], ids=["one-pass", "split-passes"])
@pytest.mark.parametrize("case", FUSION, ids=lambda c: c.id)
def test_more_layer_methods_fused_equal_alone(engine: Engine, case: MoreCase, max_batch_rows: int) -> None:
    """Rows of other requests (these methods and others, other layers) in the same passes change nothing."""
    case = dataclasses.replace(case, delta=case.algorithm in HAS_DELTA)  # fused or not, the delta too where there is one
    built = case.build()
    alone = engine.attribute(job(case, built), timeout=60)
    rng = case_rng(case.id)
    others = []
    for i in range(10):
        other = random.Random(rng.random())
        # a few requests like this one (so some pass is surely shared), the rest anything on this model
        pick = case if i % 3 == 0 else other.choice([c for c in CASES if c.model == case.model])
        o = MoreCase(case.model, pick.algorithm, pick.layer, dict(pick.params), pick.baselines, pick.target, pick.algorithm in HAS_DELTA, other.randint(0, 9), n=other.randint(1, 3))
        others.append(job(o, o.build()))
    run = run_fused(partial(make_engine, LAYER_MODELS), job(case, built), others, max_batch_rows, before=5)
    assert_fused_equals_alone(run.fused, alone, case.delta)
    if max_batch_rows < 4096:
        assert_split_passes(run, max_batch_rows)


def test_more_layer_method_errors(engine: Engine) -> None:
    one = MoreCase("mlp", "layer_deep_lift_shap", "fc2", baselines="row")
    with pytest.raises(InvalidArgument, match="at least 2 rows.*use layer_deep_lift"):
        engine.submit(job(one, one.build()))
    ablation = MoreCase("mlp", "layer_feature_ablation", "fc2", baselines="row")
    with pytest.raises(InvalidArgument, match="takes no baselines"):
        engine.submit(job(ablation, ablation.build()))
    mode = MoreCase("conv", "guided_grad_cam", "conv2", {"interpolate_mode": "cubic"})
    with pytest.raises(InvalidArgument, match="interpolate_mode must be one of"):
        engine.submit(job(mode, mode.build()))
    tokens = MoreCase("tokens", "layer_gradient_shap", "embedding")
    with pytest.raises(InvalidArgument, match="must be floating point"):
        engine.submit(job(tokens, tokens.build()))
    flat = MoreCase("mlp", "guided_grad_cam", "fc2")  # 2-D inputs: nothing to upsample the CAM to
    with pytest.raises(InvalidArgument, match="cannot upsample"):
        engine.attribute(job(flat, flat.build()), timeout=60)
    big = MoreCase("conv", "layer_feature_ablation", "conv1", n=400)  # 256 units × 400 examples
    with pytest.raises(ResourceExhausted, match="pick a smaller layer"):
        engine.attribute(job(big, big.build()), timeout=60)
