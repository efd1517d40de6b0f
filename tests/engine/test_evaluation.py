"""Attribution quality in the same request, against captum.metrics (infidelity, sensitivity_max) for the same seed."""

from __future__ import annotations

import pytest
import torch

import captum.attr as ca
from attrserve_engine import AttributionJob, Engine, InvalidArgument, ResourceExhausted
from oracle import MODELS, assert_all_close, assert_metric_close, captum_quality, engine_fixture, example_inputs

engine = engine_fixture(MODELS)


CAPTUM = {"integrated_gradients": ca.IntegratedGradients, "saliency": ca.Saliency, "gradient_shap": ca.GradientShap, "deep_lift": ca.DeepLift}

CASES = [
    ("conv", "integrated_gradients", {"n_steps": 8}, None),
    ("mlp", "saliency", {}, None),
    ("multi", "gradient_shap", {"n_samples": 3, "stdevs": 0.1}, None),  # draws: sensitivity explains the inputs again
    ("text", "deep_lift", {}, None),
    ("mlp", "saliency", {}, {"nt_type": "smoothgrad", "nt_samples": 3, "stdevs": 0.2}),
]


def captum_reference(model_name: str, algorithm: str, params: dict, nt: dict | None, seed: int, infid: dict, sens: dict):
    """attribute, then infidelity, then sensitivity_max — one seeded sequence, as the service documents."""
    model = MODELS[model_name]().eval()
    inputs, args = example_inputs(model_name, 3, seed=77)
    target = [0, 1, 1]
    params = dict(params)
    if algorithm == "gradient_shap":
        params["baselines"] = tuple(torch.zeros((1, *x.shape[1:])) for x in inputs)
    attributions, infid_value, sens_value = captum_quality(model, CAPTUM[algorithm](model), params, nt, inputs, args, target, seed, infid, sens)
    return inputs, args, target, attributions, infid_value, sens_value


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("model_name,algorithm,params,nt", CASES, ids=lambda v: str(v))
def test_metrics_match_captum(engine: Engine, model_name, algorithm, params, nt, normalize) -> None:
    infid = {"n_perturb_samples": 4, "noise_scale": 0.05, "normalize": normalize}
    sens = {"perturb_radius": 0.05, "n_perturb_samples": 3}
    inputs, args, target, attributions, want_infid, want_sens = captum_reference(model_name, algorithm, params, nt, 11, infid, sens)
    job = AttributionJob(
        model=model_name, algorithm=algorithm, inputs=inputs, additional_forward_args=args, params=dict(params), noise_tunnel=nt,
        target=torch.tensor([[t] for t in target]), seed=11, evaluate={"infidelity": infid, "sensitivity_max": sens},
    )
    got = engine.attribute(job, timeout=60)
    assert_all_close(got.attributions, tuple(w.detach() for w in (attributions if isinstance(attributions, tuple) else (attributions,))))
    assert_metric_close(got.infidelity, want_infid)
    assert_metric_close(got.sensitivity_max, want_sens)


def test_metrics_defaults_errors_and_caps(engine: Engine) -> None:
    (x,), _ = example_inputs("conv", 2, seed=1)
    base = dict(model="conv", inputs=(x,), target=torch.tensor([[0], [1]]))
    got = engine.attribute(AttributionJob(algorithm="saliency", evaluate={"infidelity": {}}, **base), timeout=60)
    assert got.infidelity.shape == (2,) and got.sensitivity_max is None and bool((got.infidelity >= 0).all())
    with pytest.raises(InvalidArgument, match="infidelity needs attributions shaped like the inputs"):
        engine.submit(AttributionJob(algorithm="layer_grad_cam", layer="conv2", evaluate={"infidelity": {}}, **base))
    with pytest.raises(InvalidArgument, match="unknown metric"):
        engine.submit(AttributionJob(algorithm="saliency", evaluate={"faithfulness": {}}, **base))
    with pytest.raises(InvalidArgument, match="perturb_radius must be a finite number >= 0"):  # Captum takes 0 (and gives 0)
        engine.submit(AttributionJob(algorithm="saliency", evaluate={"sensitivity_max": {"perturb_radius": -1.0}}, **base))
    with pytest.raises(ResourceExhausted):
        engine.submit(AttributionJob(algorithm="integrated_gradients", params={"n_steps": 500}, evaluate={"sensitivity_max": {"n_perturb_samples": 500}}, **base))
    # A layer method's sensitivity is measured in the layer's space.
    lay = engine.attribute(AttributionJob(algorithm="layer_grad_cam", layer="conv2", evaluate={"sensitivity_max": {"n_perturb_samples": 2}}, **base), timeout=60)
    assert lay.sensitivity_max.shape == (2,)
