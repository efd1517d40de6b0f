"""Every case of the table against Captum 0.9.0, through the engine: alone, fused with others, and with passes split."""

from __future__ import annotations

import random
import zlib

import pytest
import torch

from attrserve_engine import Engine, EngineLimits, ModelSpec
from oracle import CASES, MODELS, Case, captum_attribute, example_inputs, job_for

ATOL = RTOL = 1e-5


def make_engine(**limits) -> Engine:
    engine = Engine(EngineLimits(**limits))
    for name, build in MODELS.items():
        engine.load(ModelSpec(name=name, module=build()))
    return engine


@pytest.fixture(scope="module")
def engine():
    e = make_engine()
    yield e
    e.shutdown()


def assert_close(got: torch.Tensor, want: torch.Tensor, atol: float = ATOL, rtol: float = RTOL) -> None:
    assert got.shape == want.shape, (got.shape, want.shape)
    assert torch.allclose(got, want.to(got.dtype), atol=atol, rtol=rtol), f"max abs diff {(got - want).abs().max():.3g}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_captum(engine: Engine, case: Case) -> None:
    built = case.build()
    want, want_delta = captum_attribute(case, MODELS[case.model](), built)
    got = engine.attribute(job_for(case, built), timeout=60)
    assert len(got.attributions) == len(want)
    for g, w in zip(got.attributions, want):
        assert_close(g, w)
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
    fused_engine = make_engine(default_max_queue_delay_us=200_000, default_max_batch_rows=max_batch_rows)
    try:
        rng = random.Random(zlib.crc32(case.id.encode()))
        others = [random_job(case.model, rng) for _ in range(15)]
        futures = [fused_engine.submit(j) for j in others[:8]]
        mine = fused_engine.submit(job_for(case, built))
        futures += [fused_engine.submit(j) for j in others[8:]]
        fused = mine.result(timeout=60)
        for f in futures:
            f.result(timeout=60)
    finally:
        fused_engine.shutdown()
    assert fused.timing.pass_requests > 1, "the request was never fused with another"
    for a, f in zip(alone.attributions, fused.attributions):
        assert_close(f, a, atol=1e-6, rtol=1e-6)
    if case.delta:
        assert_close(fused.convergence_delta, alone.convergence_delta, atol=1e-6, rtol=1e-6)


def test_concurrent_requests_share_passes() -> None:
    engine = make_engine(default_max_queue_delay_us=50_000, default_max_batch_rows=2048)
    try:
        jobs = []
        for i in range(32):
            case = Case("mlp", "integrated_gradients", {"n_steps": 50}, n=1, seed=i)
            jobs.append(job_for(case, case.build()))
        futures = [engine.submit(j) for j in jobs]
        results = [f.result(timeout=60) for f in futures]
    finally:
        engine.shutdown()
    # 32 requests × 50 rows fit in one pass of 2048 rows; allow a few for timing.
    assert engine.passes <= 4, engine.passes
    assert max(r.timing.pass_requests for r in results) >= 16
    assert all(r.timing.rows == 50 for r in results)


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
