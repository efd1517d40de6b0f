"""Every case of the table against Captum 0.9.0, through the engine: alone, fused with others, and with passes split."""

from __future__ import annotations

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
