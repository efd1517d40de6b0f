"""Every case of the table against Captum 0.9.0, through the engine: alone, fused with others, and with passes split."""

from __future__ import annotations

import dataclasses
import random
from functools import partial

import pytest
import torch

from attrserve_engine import Engine, ModelSpec
from oracle import (
    CASES,
    MODELS,
    Case,
    assert_all_close,
    assert_close,
    assert_fused_equals_alone,
    captum_attribute,
    case_rng,
    engine_fixture,
    example_inputs,
    job_for,
    make_engine,
    assert_split_passes,
    run_fused,
    submit_held,
)

engine = engine_fixture(MODELS)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_captum(engine: Engine, case: Case) -> None:
    built = case.build()
    want, want_delta = captum_attribute(case, MODELS[case.model](), built)
    got = engine.attribute(job_for(case, built), timeout=60)
    assert_all_close(got.attributions, want)
    if case.delta:
        assert_close(got.convergence_delta, want_delta)
    else:
        assert got.convergence_delta is None


def random_job(model: str, rng: random.Random):
    """Another request for the same model, with random algorithm, parameters and size."""
    algorithm = rng.choice(["integrated_gradients", "saliency", "input_x_gradient", "deep_lift", "gradient_shap"])
    case = Case(
        model,
        algorithm,
        params={"integrated_gradients": {"n_steps": rng.randint(2, 30)}, "gradient_shap": {"n_samples": rng.randint(1, 8)}}.get(algorithm, {}),
        baselines={"gradient_shap": "distribution", "saliency": "none", "input_x_gradient": "none"}.get(
            algorithm, rng.choice(["none", "row", "per_example"])
        ),
        target="per_example",
        n=rng.randint(1, 4),
        seed=rng.randint(0, 1000),
    )
    return job_for(case, case.build())


# One case per algorithm family and model kind is enough to show fusion changes nothing.
FUSION_CASES = [c for c in CASES if c.model in ("conv", "text", "multi") and c.n == 3][::3] + [
    c for c in CASES if c.noise_tunnel and c.algorithm == "deep_lift"
]


@pytest.mark.parametrize("max_batch_rows", [4096, 37], ids=["one-pass", "split-passes"])
@pytest.mark.parametrize("case", FUSION_CASES, ids=lambda c: c.id)
def test_fused_equals_alone(engine: Engine, case: Case, max_batch_rows: int) -> None:
    built = case.build()
    alone = engine.attribute(job_for(case, built), timeout=60)
    rng = case_rng(case.id)
    others = [random_job(case.model, rng) for _ in range(15)]
    run = run_fused(partial(make_engine, MODELS), job_for(case, built), others, max_batch_rows)
    assert_fused_equals_alone(run.fused, alone, case.delta)
    if max_batch_rows < 4096:
        assert_split_passes(run, max_batch_rows)


def test_concurrent_requests_share_passes() -> None:
    """32 requests of 50 rows (IG, one stage, one batch key), all queued before the first cut: 1,600 rows fit in one
    pass of 2,048, so exactly one pass runs, shared by all 32; each result still equals Captum's."""
    engine = make_engine(MODELS, default_max_queue_delay_us=0, default_max_batch_rows=2048)
    cases = [Case("mlp", "integrated_gradients", {"n_steps": 50}, n=1, seed=i) for i in range(32)]
    built = [c.build() for c in cases]
    try:
        futures = submit_held(engine, [job_for(c, b) for c, b in zip(cases, built)])
        results = [f.result(timeout=60) for f in futures]
    finally:
        engine.shutdown()
    assert (engine.passes, engine.rows) == (1, 32 * 50)
    assert [(r.timing.rows, r.timing.passes, r.timing.pass_rows, r.timing.pass_requests) for r in results] == [(50, 1, 1600, 32)] * 32
    for case, b, r in zip(cases, built, results):
        want, _ = captum_attribute(case, MODELS["mlp"](), b)
        assert_all_close(r.attributions, want)


def test_seeded_requests_reproduce_and_differ(engine: Engine) -> None:
    case = Case("conv", "gradient_shap", {"n_samples": 4, "stdevs": 0.3}, baselines="distribution", seed=42)
    built = case.build()
    first = engine.attribute(job_for(case, built)).attributions[0]
    again = engine.attribute(job_for(case, built)).attributions[0]
    other = Case("conv", "gradient_shap", {"n_samples": 4, "stdevs": 0.3}, baselines="distribution", seed=43)
    different = engine.attribute(job_for(other, built)).attributions[0]
    assert torch.equal(first, again)
    assert not torch.allclose(first, different)
    # The global RNGs are untouched by requests.
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    engine.attribute(job_for(case, built))
    assert torch.equal(before, torch.rand(3))


def test_unseeded_request_reports_a_seed_that_reproduces_it(engine: Engine) -> None:
    case = Case("toy", "gradient_shap", {"n_samples": 3, "stdevs": 0.2}, baselines="distribution")
    built = case.build()
    job = job_for(case, built)
    job.seed = None
    first = engine.attribute(job)
    job2 = job_for(case, built)
    job2.seed = first.seed
    assert torch.equal(engine.attribute(job2).attributions[0], first.attributions[0])


def test_return_outputs_are_the_model_outputs(engine: Engine) -> None:
    inputs, _ = example_inputs("conv", 4, seed=1)
    case = Case("conv", "saliency", n=4)
    job = job_for(case, case.build())
    job.return_outputs = True
    result = engine.attribute(job)
    with torch.no_grad():
        want = MODELS["conv"]()(*case.build()["inputs"])
    assert_close(result.outputs, want)


class ReusedReLU(torch.nn.Module):
    """One ReLU module applied twice: Captum refuses DeepLift on it, and so do we."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(3, 3)
        self.b = torch.nn.Linear(3, 2)
        self.relu = torch.nn.ReLU()

    def forward(self, x):
        return self.b(self.relu(self.a(self.relu(x))))


def test_deep_lift_refuses_a_module_used_twice() -> None:
    from attrserve_engine import AttributionJob, InputSpec, InvalidArgument

    engine = Engine()
    try:
        with_specs = engine.load(ModelSpec(name="reused", module=ReusedReLU(), inputs=[InputSpec("x", torch.float32, (3,))]))
        assert "deep_lift" not in engine.supported_algorithms(with_specs)  # found at warm-up
        assert "more than once" in with_specs.unsupported["deep_lift"]
        engine.load(ModelSpec(name="reused_nospec", module=ReusedReLU()))
        job = AttributionJob(model="reused_nospec", algorithm="deep_lift", inputs=(torch.rand(2, 3),), target=torch.zeros(2, 1, dtype=torch.int64))
        with pytest.raises(InvalidArgument, match="more than once"):
            engine.attribute(job, timeout=30)
    finally:
        engine.shutdown()


# Captum 0.9.0's attribute methods that take internal_batch_size, with the params and layer of a request to each.
HINTED = [
    ("integrated_gradients", "", {"n_steps": 8}),
    ("layer_integrated_gradients", "fc1", {"n_steps": 8}),
    ("layer_conductance", "act1", {"n_steps": 8}),
    ("internal_influence", "fc2", {"n_steps": 8}),
    ("neuron_integrated_gradients", "fc2", {"n_steps": 8, "neuron_selector": [1]}),
    ("neuron_conductance", "act1", {"n_steps": 8, "neuron_selector": [1]}),
]


def test_internal_batch_size_is_taken_where_captum_takes_it() -> None:
    """Every algorithm takes internal_batch_size exactly where Captum 0.9.0's attribute does (its name in CamelCase)."""
    import inspect

    import captum.attr as ca

    from attrserve_engine.algorithms import ALGORITHMS, Limits

    takes = set()
    for name, algorithm in ALGORITHMS.items():
        captum = getattr(ca, "".join(w.capitalize() for w in name.split("_")).replace("Lrp", "LRP"))
        raw: dict = {"internal_batch_size": 3, **({"neuron_selector": [0]} if name.startswith("neuron_") else {})}
        try:
            algorithm.parse_params(raw, Limits())
            takes.add(name)
        except Exception as e:  # refused for another reason than the hint (a required parameter): it took the hint
            if "internal_batch_size" not in str(e):
                takes.add(name)
        assert (name in takes) == ("internal_batch_size" in inspect.signature(captum.attribute).parameters), name
    assert takes == {name for name, _, _ in HINTED}


@pytest.mark.parametrize("value", [3, 1, 0, -1, 10**6])
@pytest.mark.parametrize("algorithm,layer,params", HINTED, ids=[h[0] for h in HINTED])
def test_internal_batch_size_changes_nothing(engine: Engine, algorithm: str, layer: str, params: dict, value: int) -> None:
    """Captum's internal_batch_size only cuts its passes into chunks (below the examples' count, 0 and negatives
    included, it warns and takes the count): taken, and the result is bit for bit the one without it."""
    from attrserve_engine import AttributionJob

    inputs, _ = example_inputs("mlp", 3, seed=5)
    target = None if algorithm.startswith("neuron_") and algorithm != "neuron_conductance" else torch.tensor([[0], [1], [2]])

    def run(extra: dict):
        job = AttributionJob(model="mlp", algorithm=algorithm, inputs=inputs, target=target, params={**params, **extra}, layer=layer)
        return engine.attribute(job, timeout=60).attributions

    for got, want in zip(run({"internal_batch_size": value}), run({})):
        assert torch.equal(got, want)


def test_nt_samples_batch_size_is_checked_as_captum_does_then_changes_nothing(engine: Engine) -> None:
    """NoiseTunnel's nt_samples_batch_size: Captum divides by 0, and runs no sample for a negative (no attributions
    for a tuple of inputs, an AssertionError for a tensor), so those are INVALID_ARGUMENT naming the field. At or over
    nt_samples the numbers are those without it (Captum's too: the table's case). Under it, Captum draws the noise a
    chunk at a time, so its seeded numbers depend on the chunk: refused in a seeded request, taken in another."""
    import captum.attr as ca

    from attrserve_engine import InvalidArgument

    case = Case("mlp", "saliency", noise_tunnel={"nt_samples": 4, "stdevs": 0.2}, seed=3)
    built = case.build()
    want = engine.attribute(job_for(case, built), timeout=60).attributions
    nt = ca.NoiseTunnel(ca.Saliency(MODELS["mlp"]()))
    with pytest.raises(ZeroDivisionError):
        nt.attribute(built["inputs"], target=1, nt_samples=4, nt_samples_batch_size=0)
    assert nt.attribute(built["inputs"], target=1, nt_samples=4, nt_samples_batch_size=-1) == ()  # no samples run, no attributions
    for value in (0, -1):
        bad = Case("mlp", "saliency", noise_tunnel={**case.noise_tunnel, "nt_samples_batch_size": value}, seed=3)
        with pytest.raises(InvalidArgument, match=f"noise_tunnel.nt_samples_batch_size must be at least 1, got {value}"):
            engine.attribute(job_for(bad, built), timeout=60)
    for value in (4, 100):  # at or over nt_samples: Captum's numbers are its numbers without it, and so are these
        hinted = Case("mlp", "saliency", noise_tunnel={**case.noise_tunnel, "nt_samples_batch_size": value}, seed=3)
        for got, w in zip(engine.attribute(job_for(hinted, built), timeout=60).attributions, want):
            assert torch.equal(got, w)
    for value in (1, 3):  # under it, Captum's seeded numbers depend on the chunk: refused with a seed, taken without one
        hinted = Case("mlp", "saliency", noise_tunnel={**case.noise_tunnel, "nt_samples_batch_size": value}, seed=3)
        with pytest.raises(InvalidArgument, match=f"nt_samples_batch_size {value} is below nt_samples 4 in a seeded request"):
            engine.attribute(job_for(hinted, built), timeout=60)
        unseeded = Case("mlp", "saliency", noise_tunnel={**case.noise_tunnel, "nt_samples_batch_size": value})
        got = engine.attribute(dataclasses.replace(job_for(unseeded, built), seed=None), timeout=60).attributions
        assert [g.shape for g in got] == [w.shape for w in want] and all(torch.isfinite(g).all() for g in got)
    for value, message in ((2.5, "must be an integer, got 2.5"), ("2", "must be an integer")):
        bad = Case("mlp", "saliency", noise_tunnel={**case.noise_tunnel, "nt_samples_batch_size": value}, seed=3)
        with pytest.raises(InvalidArgument, match=f"noise_tunnel.nt_samples_batch_size {message}"):
            engine.attribute(job_for(bad, built), timeout=60)
    typo = Case("mlp", "integrated_gradients", {"internal_batch_sise": 3})
    with pytest.raises(InvalidArgument, match="unknown parameter.*internal_batch_sise; valid: .*internal_batch_size"):
        engine.attribute(job_for(typo, built), timeout=60)
