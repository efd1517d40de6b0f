"""NoiseTunnel must wrap every method Captum allows it to wrap.

Captum's NoiseTunnel takes any Attribution whose `attribute` takes the inputs
first (captum/attr/_core/noise_tunnel.py:63-76, 386-405): input methods,
perturbation methods, layer and neuron methods alike — the noise goes on the
model inputs. One seeded case per algorithm in ALGORITHMS, against
`captum.attr.NoiseTunnel(CaptumClass(...)).attribute(...)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

import captum.attr as ca
from attrserve_engine import AttributionJob, Engine
from attrserve_engine.algorithms import ALGORITHMS
from oracle import MODELS, N_CLASSES, assert_all_close, engine_fixture, example_inputs

CTOR_PARAMS = {"multiply_by_inputs"}
NT_TYPES = ("smoothgrad", "smoothgrad_sq", "vargrad")


@dataclass
class WrapCase:
    """One algorithm inside NoiseTunnel: our name, the Captum class, a small model and the fewest parameters."""

    algorithm: str
    captum: Any
    model: str
    layer: str = ""
    params: dict[str, Any] = field(default_factory=dict)  # Captum's names; CTOR_PARAMS go to the constructor
    baselines: str = "none"  # none | row | distribution
    draw_baseline_from_distrib: bool = False
    feature_mask: bool = False
    target: bool = True
    nt_type: str = ""  # "": by the seed, so the types rotate over the table (see SMALL)

    @property
    def id(self) -> str:
        return f"{self.algorithm}-{self.model}" + (f"-{self.layer}" if self.layer else "")


def _neuron(selector: tuple[int, ...], **params: Any) -> dict[str, Any]:
    return {"neuron_selector": selector, **params}


# Every algorithm NoiseTunnel can wrap in Captum, with what it needs. A name here that
# ALGORITHMS lacks (an algorithm still being written) is skipped; a name in ALGORITHMS
# that is neither here nor in CANNOT_WRAP fails test_every_algorithm_is_covered.
TABLE = [
    WrapCase("deconvolution", ca.Deconvolution, "conv"),
    WrapCase("deep_lift", ca.DeepLift, "mlp", baselines="row"),
    WrapCase("deep_lift_shap", ca.DeepLiftShap, "mlp", baselines="distribution", draw_baseline_from_distrib=True),
    WrapCase("feature_ablation", ca.FeatureAblation, "multi", feature_mask=True),
    WrapCase("feature_permutation", ca.FeaturePermutation, "mlp"),
    WrapCase("gradient_shap", ca.GradientShap, "mlp", params={"n_samples": 3}, baselines="distribution", draw_baseline_from_distrib=True),
    WrapCase("guided_backprop", ca.GuidedBackprop, "conv"),
    WrapCase("guided_grad_cam", ca.GuidedGradCam, "conv", "conv2"),
    WrapCase("input_x_gradient", ca.InputXGradient, "multi"),
    WrapCase("integrated_gradients", ca.IntegratedGradients, "mlp", params={"n_steps": 8}, baselines="row"),
    WrapCase("internal_influence", ca.InternalInfluence, "mlp", "fc2", {"n_steps": 8}),
    WrapCase("kernel_shap", ca.KernelShap, "toy", params={"n_samples": 12}),
    WrapCase("layer_activation", ca.LayerActivation, "mlp", "act1", target=False),
    WrapCase("layer_conductance", ca.LayerConductance, "conv", "conv2", {"n_steps": 6}),
    WrapCase("layer_deep_lift", ca.LayerDeepLift, "conv", "conv2", baselines="row"),
    WrapCase("layer_deep_lift_shap", ca.LayerDeepLiftShap, "mlp", "fc2", baselines="distribution", draw_baseline_from_distrib=True),
    WrapCase("layer_feature_ablation", ca.LayerFeatureAblation, "mlp", "act2"),
    WrapCase("layer_grad_cam", ca.LayerGradCam, "conv", "conv2"),
    WrapCase("layer_gradient_shap", ca.LayerGradientShap, "multi", "head", {"n_samples": 3}, baselines="row"),
    WrapCase("layer_gradient_x_activation", ca.LayerGradientXActivation, "text", "proj"),
    WrapCase("layer_integrated_gradients", ca.LayerIntegratedGradients, "multi", "a_act", {"n_steps": 6}),
    WrapCase("lime", ca.Lime, "toy", params={"n_samples": 12}),
    WrapCase("lrp", getattr(ca, "LRP", None), "toy"),
    WrapCase("neuron_conductance", ca.NeuronConductance, "mlp", "fc2", _neuron((3,), n_steps=6)),
    WrapCase("neuron_deconvolution", ca.NeuronDeconvolution, "conv", "conv2", _neuron((1, 2, 2)), target=False),
    WrapCase("neuron_deep_lift", ca.NeuronDeepLift, "mlp", "fc2", _neuron((3,)), baselines="row", target=False),
    WrapCase("neuron_deep_lift_shap", ca.NeuronDeepLiftShap, "mlp", "fc2", _neuron((3,)), baselines="distribution", draw_baseline_from_distrib=True, target=False),
    WrapCase("neuron_feature_ablation", ca.NeuronFeatureAblation, "toy", "lin1", _neuron((1,)), target=False),
    WrapCase("neuron_gradient", ca.NeuronGradient, "mlp", "fc2", _neuron((2,)), target=False),
    WrapCase("neuron_gradient_shap", ca.NeuronGradientShap, "mlp", "fc1", _neuron((0,), n_samples=3), baselines="row", target=False),
    WrapCase("neuron_guided_backprop", ca.NeuronGuidedBackprop, "conv", "conv2", _neuron((0, 1, 1)), target=False),
    WrapCase("neuron_integrated_gradients", ca.NeuronIntegratedGradients, "mlp", "fc2", _neuron((3,), n_steps=6), target=False),
    WrapCase("occlusion", ca.Occlusion, "conv", params={"sliding_window_shapes": [[2, 3, 3]], "strides": [[1, 2, 2]]}),
    WrapCase("saliency", ca.Saliency, "mlp"),
    WrapCase("shapley_value_sampling", ca.ShapleyValueSampling, "multi", params={"n_samples": 3}),
    WrapCase("shapley_values", ca.ShapleyValues, "toy"),
]
# NOTE: these algorithms' attributions here are 1e-4..1e-2, so their squares (smoothgrad_sq) and variances over the
# noise (vargrad) are within ATOL of zero: an answer of zeros would pass. They run SmoothGrad instead of the type
# their seed picks (the other cases keep covering smoothgrad_sq and vargrad).
SMALL = {"deep_lift_shap", "gradient_shap", "guided_grad_cam", "layer_grad_cam", "neuron_conductance"}
for _case in TABLE:
    if _case.algorithm in SMALL:
        _case.nt_type = "smoothgrad"
BY_NAME = {c.algorithm: c for c in TABLE}

# NOTE: NoiseTunnel's own `stdevs` takes the keyword, so Captum can only wrap the GradientShap
# family with their inner stdevs at the default 0.0 (noise_tunnel.py:89); the cases above do so.

# Algorithms Captum's NoiseTunnel cannot wrap, with why.
CANNOT_WRAP: dict[str, str] = {
    # noise_tunnel.py:397 calls attribute.__wrapped__, which only @log_usage-decorated methods have.
    "layer_lrp": "Captum 0.9.0's LayerLRP.attribute is not @log_usage-wrapped, so NoiseTunnel fails on attribute.__wrapped__",
}


def _params() -> list:
    """One test per algorithm name known anywhere, skipped (with the reason in its id) where it cannot run."""
    out = []
    for name in sorted(set(ALGORITHMS) | set(BY_NAME) | set(CANNOT_WRAP)):
        if name in CANNOT_WRAP:
            out.append(pytest.param(None, id=f"{name}-captum-cannot-wrap", marks=pytest.mark.skip(reason=CANNOT_WRAP[name])))
        elif name not in ALGORITHMS:
            out.append(pytest.param(None, id=f"{name}-not-in-ALGORITHMS", marks=pytest.mark.skip(reason=f"{name} is not (yet) an attrserve algorithm")))
        elif name in BY_NAME:
            out.append(pytest.param(BY_NAME[name], id=BY_NAME[name].id))
    return out


engine = engine_fixture(MODELS)


def _request(case: WrapCase, seed: int) -> dict[str, Any]:
    n = 2
    inputs, args = example_inputs(case.model, n, seed=500 + seed)
    g = torch.Generator().manual_seed(501 + seed)
    rows = {"row": 1, "distribution": 4}.get(case.baselines)
    baselines = () if rows is None else tuple(0.1 * torch.randn((rows, *x.shape[1:]), generator=g) for x in inputs)
    masks = ()
    if case.feature_mask:  # pairs of neighbouring features share an id, numbered across inputs
        offset, built = 0, []
        for x in inputs:
            k = x[0].numel()
            built.append((torch.arange(k) // 2 + offset).reshape((1, *x.shape[1:])))
            offset = int(built[-1].max()) + 1
        masks = tuple(built)
    target = [i % N_CLASSES[case.model] for i in range(n)] if case.target else None
    nt = {"nt_type": case.nt_type or NT_TYPES[seed % 3], "nt_samples": 3, "stdevs": 0.1}
    if case.draw_baseline_from_distrib:
        nt["draw_baseline_from_distrib"] = True
    return {"inputs": inputs, "args": args, "baselines": baselines, "masks": masks, "target": target, "nt": nt}


def _captum(case: WrapCase, req: dict[str, Any], seed: int) -> tuple[torch.Tensor, ...]:
    model = MODELS[case.model]().eval()
    ctor = {k: v for k, v in case.params.items() if k in CTOR_PARAMS}
    kwargs = {k: v for k, v in case.params.items() if k not in CTOR_PARAMS}
    for key in ("sliding_window_shapes", "strides"):
        if key in kwargs:
            kwargs[key] = tuple(tuple(v) for v in kwargs[key])
    method = case.captum(model, model.get_submodule(case.layer), **ctor) if case.layer else case.captum(model, **ctor)
    if req["target"] is not None:
        kwargs["target"] = req["target"]
    if req["args"]:
        kwargs["additional_forward_args"] = req["args"]
    if req["baselines"]:
        kwargs["baselines"] = req["baselines"]
    elif case.algorithm in ("gradient_shap", "layer_gradient_shap", "neuron_gradient_shap"):
        kwargs["baselines"] = tuple(torch.zeros((1, *x.shape[1:])) for x in req["inputs"])
    if req["masks"]:
        kwargs["feature_mask"] = req["masks"]
    torch.manual_seed(seed)
    np.random.seed(seed)
    out = ca.NoiseTunnel(method).attribute(tuple(x.clone() for x in req["inputs"]), **req["nt"], **kwargs)
    out = out if isinstance(out, tuple) else (out,)
    return tuple(o.detach() for o in out)


def _job(case: WrapCase, req: dict[str, Any], seed: int) -> AttributionJob:
    target = None if req["target"] is None else torch.tensor([[t] for t in req["target"]])
    return AttributionJob(
        model=case.model,
        algorithm=case.algorithm,
        inputs=req["inputs"],
        baselines=req["baselines"],
        target=target,
        additional_forward_args=req["args"],
        params=dict(case.params),
        noise_tunnel=dict(req["nt"]),
        layer=case.layer,
        feature_masks=req["masks"],
        seed=seed,
    )


@pytest.mark.parametrize("case", _params())
def test_noise_tunnel_wraps_like_captum(engine: Engine, case: WrapCase) -> None:
    seed = sorted(BY_NAME).index(case.algorithm)  # each algorithm its own seed and nt_type
    req = _request(case, seed)
    want = _captum(case, req, seed)
    got = engine.attribute(_job(case, req, seed), timeout=60)
    assert_all_close(got.attributions, want)


def test_every_algorithm_is_covered() -> None:
    """A new algorithm must join TABLE (or CANNOT_WRAP, with Captum's reason)."""
    missing = sorted(set(ALGORITHMS) - set(BY_NAME) - set(CANNOT_WRAP))
    assert not missing, f"add a NoiseTunnel case for: {', '.join(missing)}"


def test_noise_tunnel_expands_per_example_feature_masks(engine: Engine) -> None:
    case = WrapCase("feature_ablation", ca.FeatureAblation, "mlp", feature_mask=True)
    req = _request(case, seed=1)
    req["masks"] = (torch.tensor([[0, 0, 1, 1, 2, 2], [0, 1, 1, 2, 2, 2]]),)  # one mask per example
    want = _captum(case, req, seed=1)
    got = engine.attribute(_job(case, req, seed=1), timeout=60)
    assert_all_close(got.attributions, want)
