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


def test_metrics_refuse_integer_inputs_and_the_engine_serves_on() -> None:
    """Both metrics add real-valued noise to the inputs: token ids cannot take it (Captum fails on them too). Refused,
    naming the metric and the input, rather than a failed model (sensitivity_max) or an infidelity of 0 (the noise
    cast to int64 was all but zero); the engine then serves the same inputs correctly."""
    from oracle import LAYER_MODELS, make_engine

    tokens = torch.tensor([[3, 7, 1, 0], [5, 2, 9, 4]])
    engine = make_engine({"tokens": LAYER_MODELS["tokens"]})
    try:
        for metric in ("infidelity", "sensitivity_max"):
            job = AttributionJob(model="tokens", algorithm="feature_ablation", inputs=(tokens,), target=1, evaluate={metric: {}})
            with pytest.raises(InvalidArgument, match=rf"evaluate\.{metric} adds random noise to the inputs.*inputs\[0\] has dtype int64"):
                engine.submit(job)
        got = engine.attribute(AttributionJob(model="tokens", algorithm="feature_ablation", inputs=(tokens,), target=1), timeout=60)
    finally:
        engine.shutdown()
    want = ca.FeatureAblation(LAYER_MODELS["tokens"]().eval()).attribute(tokens, target=1)
    assert_all_close(got.attributions, (want,))


def test_sensitivity_max_rerun_computes_no_convergence_delta(engine: Engine) -> None:
    """A drawing method (GradientShap) is explained again for sensitivity_max, as Captum does; the request's
    convergence delta belongs to its attribution alone, so the rerun computes none: the rows run are the rows the
    request declared, and the numbers are Captum's."""
    infid, sens = {"n_perturb_samples": 3, "noise_scale": 0.05}, {"perturb_radius": 0.05, "n_perturb_samples": 3}
    params = {"n_samples": 2, "stdevs": 0.1}
    inputs, args, target, attributions, want_infid, want_sens = captum_reference("mlp", "gradient_shap", params, None, 13, infid, sens)
    job = AttributionJob(
        model="mlp", algorithm="gradient_shap", inputs=inputs, params=params, baselines=tuple(torch.zeros((1, *x.shape[1:])) for x in inputs),
        target=torch.tensor([[t] for t in target]), seed=13, return_convergence_delta=True, evaluate={"infidelity": infid, "sensitivity_max": sens},
    )
    before = engine.rows
    got = engine.attribute(job, timeout=60)
    assert engine.rows - before == got.timing.rows
    assert got.convergence_delta is not None and got.convergence_delta.shape == (3 * 2,)
    assert_all_close(got.attributions, tuple(a.detach() for a in attributions))
    assert_metric_close(got.infidelity, want_infid)
    assert_metric_close(got.sensitivity_max, want_sens)


def test_sensitivity_max_of_a_method_built_a_pass_at_a_time_holds_its_examples() -> None:
    """FeatureAblation builds its rows a pass at a time, so explaining the perturbed inputs holds those examples, not
    every ablated row (129 an example here): the per-request byte cap takes the request (it once counted 1040 rows held,
    520 KiB over a 98 KiB cap, and refused it as too big for good), and its numbers are Captum's. A method whose rows are
    built at once is still counted whole."""
    from oracle import make_engine

    infid, sens = {"n_perturb_samples": 2, "noise_scale": 0.05}, {"perturb_radius": 0.05, "n_perturb_samples": 3}
    model = MODELS["conv"]().eval()
    (x,), _ = example_inputs("conv", 2, seed=5)
    want, want_infid, want_sens = captum_quality(model, ca.FeatureAblation(model), {}, None, (x,), (), [0, 2], 9, infid, sens)
    capped = make_engine(MODELS, max_request_work_bytes=100_000)
    try:
        evaluate = {"infidelity": infid, "sensitivity_max": sens}
        with pytest.raises(ResourceExhausted, match="would hold"):  # IG's 50 steps an example: 500 rows at once, 250 KiB
            capped.submit(AttributionJob(model="conv", algorithm="integrated_gradients", params={"n_steps": 50}, inputs=(x,), target=0,
                                         evaluate={"sensitivity_max": sens}))
        got = capped.attribute(AttributionJob(model="conv", algorithm="feature_ablation", inputs=(x,), target=[0, 2], seed=9, evaluate=evaluate), timeout=60)
    finally:
        capped.shutdown()
    assert_all_close(got.attributions, want)
    assert_metric_close(got.infidelity, want_infid)
    assert_metric_close(got.sensitivity_max, want_sens)


@pytest.mark.parametrize(
    "algorithm,params,nt,layer",
    [
        ("saliency", {}, None, ""),  # draws nothing: sensitivity_max reuses its attribution (it once declared the rerun's 3 rows)
        ("integrated_gradients", {"n_steps": 4}, None, ""),
        ("saliency", {}, {"nt_type": "smoothgrad", "nt_samples": 2, "stdevs": 0.1}, ""),  # draws: explained again
        ("layer_feature_ablation", {}, None, "fc1"),  # one row per layer unit, unknown at submission (it declared 2 an example)
    ],
    ids=lambda v: str(v),
)
def test_timing_rows_are_the_rows_that_ran(engine: Engine, algorithm, params, nt, layer) -> None:
    """timing.rows is what the request's passes ran, whatever the request declared for admission."""
    (x,), _ = example_inputs("mlp", 3, seed=4)
    for evaluate in (None, {"sensitivity_max": {"n_perturb_samples": 10}}):
        before = engine.rows
        got = engine.attribute(
            AttributionJob(model="mlp", algorithm=algorithm, inputs=(x,), params=params, noise_tunnel=nt, layer=layer, target=0, seed=2, evaluate=evaluate),
            timeout=60,
        )
        assert got.timing.rows == engine.rows - before, (algorithm, evaluate)
