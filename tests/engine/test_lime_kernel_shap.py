"""Lime and KernelShap against Captum 0.9.0 with its default scikit-learn surrogates, alone and fused; the torch surrogates against scikit-learn.

Tolerances (torch.allclose, atol and rtol):
- Lime vs Captum: 1e-5 (measured ≤ 1e-6). The Lasso replays scikit-learn's coordinate
  descent and stopping rule in float64; scikit-learn runs it in float32 on Captum's data.
- KernelShap vs Captum: 1e-5 (measured ≤ 3e-6) on designs with n_samples ≥ 2·F or ≤ F/4.
  Between those, and for F/2 ≤ n_samples ≤ F above all, Captum's own float32 solve is
  unstable (it moves by up to ~1e-3 between float32 and float64) and no solver matches it
  closely; the cases here stay outside that band.
- fused with 15 other requests (one pass and split passes) vs alone: 1e-6.
- `lasso` vs sklearn.linear_model.Lasso on float64 data, same tol: 1e-9; both at tol=1e-12: 1e-8.
- `weighted_least_squares` vs sklearn LinearRegression on float64 data, full rank and
  rank-deficient (minimum norm): 1e-9 relative. On float32 KernelShap designs (n_samples ≥ 2·F):
  3e-5 — torch's (MKL) and scipy's (OpenBLAS) float32 gelsd round differently; over 400 such
  designs the gap was ≤ 1e-5 in 99.8% and 1.2e-5 at most, while scikit-learn's own float32
  answer sits up to 4e-4 from its float64 one.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from attrserve_engine import AttributionJob, Engine, InvalidArgument
from attrserve_engine.algorithms.linear_models import lasso, weighted_least_squares
from oracle import MODELS, Case, assert_all_close, assert_fused_equals_alone, assert_split_passes, case_rng, engine_fixture, example_inputs, job_for, make_engine, run_fused

VOCAB = 10


class TokenModel(nn.Module):
    """Integer token ids (B, 5) → embeddings → linear head: Lime switches ids to the baseline id."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(8)
        self.emb = nn.Embedding(VOCAB, 4)
        self.head = nn.Linear(5 * 4, 2)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)).flatten(1))


LK_MODELS = {name: MODELS[name] for name in ("conv", "multi", "text", "mlp")} | {"tokens": TokenModel}
N_CLASSES = {"conv": 3, "multi": 2, "text": 2, "mlp": 3, "tokens": 2}


def grouped_masks(model: str, inputs: tuple[torch.Tensor, ...], rows: int) -> tuple[torch.Tensor, ...]:
    """Feature ids grouping neighbouring scalars, numbered from 2 (Captum shifts them to 0); `rows` 1 or n, each row its own grouping."""
    masks = []
    for x in inputs:
        shape = tuple(x.shape[1:])
        if model == "conv":  # a 4×4 quadrant per channel: 8 features
            c, h, w = torch.meshgrid(*(torch.arange(s) for s in shape), indexing="ij")
            base = c * 4 + (h // 4) * 2 + w // 4
        elif model == "text":  # one feature per token
            base = torch.arange(shape[0])[:, None].expand(shape)
        else:  # pairs of neighbours
            base = torch.arange(int(np.prod(shape))).reshape(shape) // 2
        masks.append(torch.stack([(base + r) % (int(base.max()) + 1) for r in range(rows)]))
    offset, out = 2, []
    for m in masks:  # number across inputs, as one id space
        out.append(m + offset)
        offset += int(m.max()) + 1
    return tuple(out)


@dataclass
class LKCase:
    model: str
    algorithm: str  # lime | kernel_shap
    params: dict[str, Any] = field(default_factory=dict)
    mask: str = "none"  # none | grouped (1 row) | per_example (n rows)
    baselines: str = "none"  # none | scalar | row | per_example
    target: str = "index"  # index | per_example
    n: int = 2
    seed: int = 0

    @property
    def id(self) -> str:
        params = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.model}-{self.algorithm}-{params}-m={self.mask}-b={self.baselines}-t={self.target}-n={self.n}-s={self.seed}"

    def build(self) -> dict[str, Any]:
        if self.model == "tokens":
            g = torch.Generator().manual_seed(100 + self.seed)
            inputs, args = (torch.randint(1, VOCAB, (self.n, 5), generator=g),), ()
        else:
            inputs, args = example_inputs(self.model, self.n, seed=100 + self.seed)
        g = torch.Generator().manual_seed(200 + self.seed)
        baselines: tuple = {
            "none": (),
            "scalar": tuple(0.25 if x.is_floating_point() else 0 for x in inputs),
            "row": tuple(0.1 * torch.randn((1, *x.shape[1:]), generator=g) for x in inputs),
            "per_example": tuple(0.1 * torch.randn(x.shape, generator=g) for x in inputs),
        }[self.baselines]
        masks = () if self.mask == "none" else grouped_masks(self.model, inputs, 1 if self.mask == "grouped" else self.n)
        if self.target == "per_example":
            classes = [i % N_CLASSES[self.model] for i in range(self.n)]
        else:
            classes = [1] * self.n
        return {
            "inputs": inputs,
            "args": args,
            "baselines": baselines,
            "masks": masks,
            "target": torch.tensor(classes, dtype=torch.int64).reshape(self.n, 1),
            "captum_target": classes if self.target == "per_example" else 1,
        }

    def job(self, built: dict[str, Any]) -> AttributionJob:
        return AttributionJob(
            model=self.model,
            algorithm=self.algorithm,
            inputs=built["inputs"],
            baselines=built["baselines"],
            target=built["target"],
            additional_forward_args=built["args"],
            feature_masks=built["masks"],
            params=dict(self.params),
            seed=self.seed,
        )


def captum_attribute(case: LKCase, built: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """The oracle: Captum 0.9.0 with its default surrogates, seeded as docs/ARCHITECTURE.md says (Captum-parity traps)."""
    import captum.attr as ca
    from captum._utils.models.linear_model import SkLearnLasso
    from captum.attr._core.lime import get_exp_kernel_similarity_function

    model = LK_MODELS[case.model]()  # NOTE: before seeding: the test models seed the global RNG as they build
    if case.algorithm == "lime":
        method = ca.Lime(
            model,
            interpretable_model=SkLearnLasso(alpha=case.params.get("alpha", 0.01)),
            similarity_func=get_exp_kernel_similarity_function("cosine", case.params.get("kernel_width", 1.0)),
        )
    else:
        method = ca.KernelShap(model)
    single = len(built["inputs"]) == 1

    def one_or_tuple(values):
        return (values[0] if single else tuple(values)) if values else None

    kwargs = {k: v for k, v in case.params.items() if k in ("n_samples", "perturbations_per_eval")}
    torch.manual_seed(case.seed)
    np.random.seed(case.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multiple inputs ...", "shifting indices to start at 0"
        out = method.attribute(
            one_or_tuple(built["inputs"]),
            baselines=one_or_tuple(built["baselines"]),
            target=built["captum_target"],
            additional_forward_args=tuple(built["args"]) or None,
            feature_mask=one_or_tuple(built["masks"]),
            **kwargs,
        )
    return out if isinstance(out, tuple) else (out,)


CASES = [
    # Lime: default alpha (mostly zero coefficients on these small models) and smaller ones with real structure.
    LKCase("conv", "lime", {"n_samples": 60, "alpha": 0.001}, mask="grouped"),
    LKCase("conv", "lime", {"n_samples": 40, "alpha": 0.002}, baselines="row", target="per_example", seed=1),
    LKCase("multi", "lime", {"n_samples": 50}, baselines="scalar", target="per_example", n=3, seed=2),
    LKCase("multi", "lime", {"n_samples": 80, "alpha": 0.003, "kernel_width": 0.5}, mask="grouped", baselines="per_example", seed=3),
    LKCase("text", "lime", {"n_samples": 50}, mask="grouped", target="per_example", seed=4),
    LKCase("text", "lime", {"n_samples": 40, "alpha": 0.001}, baselines="row", n=1, seed=5),
    LKCase("mlp", "lime", {"n_samples": 100, "alpha": 0.0005}, mask="per_example", baselines="scalar", target="per_example", n=3, seed=6),
    LKCase("mlp", "lime", {"n_samples": 30, "alpha": 0.001, "perturbations_per_eval": 7}, seed=7),
    LKCase("tokens", "lime", {"n_samples": 40, "alpha": 0.001}, target="per_example", seed=8),
    # KernelShap: n_samples ≥ 2·F or ≤ F/4 (see the module docstring).
    LKCase("conv", "kernel_shap", {"n_samples": 40}, mask="grouped"),
    LKCase("conv", "kernel_shap", {"n_samples": 300}, baselines="row", target="per_example", n=1, seed=1),
    LKCase("conv", "kernel_shap", {"n_samples": 20}, baselines="scalar", seed=2),
    LKCase("multi", "kernel_shap", {"n_samples": 30}, baselines="scalar", target="per_example", n=3, seed=3),
    LKCase("multi", "kernel_shap", {"n_samples": 25, "perturbations_per_eval": 4}, mask="grouped", baselines="per_example", seed=4),
    LKCase("text", "kernel_shap", {"n_samples": 100}, target="per_example", seed=5),
    LKCase("text", "kernel_shap", {"n_samples": 25}, mask="grouped", baselines="row", n=1, seed=6),
    LKCase("mlp", "kernel_shap", {"n_samples": 60}, mask="per_example", target="per_example", n=3, seed=7),
    LKCase("mlp", "kernel_shap", {"n_samples": 2}, seed=8),  # only the all-on and all-off patterns
    LKCase("tokens", "kernel_shap", {"n_samples": 50}, target="per_example", seed=9),
]
engine = engine_fixture(LK_MODELS)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_captum(engine: Engine, case: LKCase) -> None:
    built = case.build()
    want = captum_attribute(case, built)
    got = engine.attribute(case.job(built), timeout=60)
    assert_all_close(got.attributions, want, check_dtype=True)
    assert got.timing.rows == case.n * case.params["n_samples"]  # `rows` is exact: every pattern, nothing else


def test_the_cases_are_not_all_zero(engine: Engine) -> None:
    """Lasso at alpha=0.01 zeroes most coefficients on these models; the table must still test real fits."""
    nonzero = [c.id for c in CASES if c.algorithm == "lime" and any(bool(a.ne(0).any()) for a in engine.attribute(c.job(c.build())).attributions)]
    assert len(nonzero) >= 6, nonzero


def random_job(model: str, rng: random.Random) -> AttributionJob:
    """Another request for the same model: Lime or KernelShap with random parameters, or a gradient method."""
    kind = rng.choice(["lime", "kernel_shap", "kernel_shap", "integrated_gradients", "saliency"])
    if kind in ("integrated_gradients", "saliency"):
        case = Case(model, kind, {"n_steps": rng.randint(2, 20)} if kind == "integrated_gradients" else {}, target="per_example", n=rng.randint(1, 3), seed=rng.randint(0, 99))
        return job_for(case, case.build())
    params = {"n_samples": rng.randint(2, 40)} | ({"alpha": rng.choice([0.01, 0.001])} if kind == "lime" else {})
    other = LKCase(model, kind, params, mask=rng.choice(["none", "grouped"]), baselines=rng.choice(["none", "row"]), target="per_example", n=rng.randint(1, 3), seed=rng.randint(0, 99))
    return other.job(other.build())


FUSION_CASES = [CASES[0], CASES[3], CASES[14], CASES[16]]


@pytest.mark.parametrize("max_batch_rows", [4096, 37], ids=["one-pass", "split-passes"])
@pytest.mark.parametrize("case", FUSION_CASES, ids=lambda c: c.id)
def test_fused_equals_alone(engine: Engine, case: LKCase, max_batch_rows: int) -> None:
    built = case.build()
    alone = engine.attribute(case.job(built), timeout=60)
    rng = case_rng(case.id)
    others = [random_job(case.model, rng) for _ in range(15)]
    run = run_fused(partial(make_engine, LK_MODELS), case.job(built), others, max_batch_rows)
    assert_fused_equals_alone(run.fused, alone, delta=False)
    if max_batch_rows < 4096:
        assert_split_passes(run, max_batch_rows)


def test_seeds_reproduce_differ_and_leave_the_global_rng_alone(engine: Engine) -> None:
    case = LKCase("mlp", "kernel_shap", {"n_samples": 30}, seed=5)
    built = case.build()
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    first = engine.attribute(case.job(built)).attributions[0]
    assert torch.equal(before, torch.rand(3))
    assert torch.equal(first, engine.attribute(case.job(built)).attributions[0])
    other = LKCase("mlp", "kernel_shap", {"n_samples": 30}, seed=6)
    assert not torch.allclose(first, engine.attribute(other.job(built)).attributions[0])


@pytest.mark.parametrize(
    "algorithm, params, masks, message",
    [
        ("kernel_shap", {}, (torch.zeros(1, 6, dtype=torch.int64),), "at least 2 interpretable features"),
        ("lime", {"kernel_width": 0.0}, (), "kernel_width"),
        ("lime", {"alpha": -1.0}, (), "alpha"),
        ("lime", {"n_samples": 0}, (), "n_samples"),
        ("kernel_shap", {"alpha": 0.1}, (), "unknown parameter"),
    ],
)
def test_bad_requests_are_invalid_arguments(engine: Engine, algorithm: str, params: dict, masks: tuple, message: str) -> None:
    job = AttributionJob(model="mlp", algorithm=algorithm, inputs=(torch.randn(2, 6),), target=torch.zeros(2, 1, dtype=torch.int64), params=params, feature_masks=masks, seed=0)
    with pytest.raises(InvalidArgument, match=message):
        engine.attribute(job, timeout=30)


# -- the torch surrogates against scikit-learn ------------------------------------------------


def weighted_problem(rng: np.random.RandomState, binary: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s, f = rng.randint(8, 60), rng.randint(2, 25)
    x = (rng.rand(s, f) < 0.5).astype(np.float64) if binary else rng.randn(s, f)
    y = x @ (rng.randn(f) * (rng.rand(f) < 0.6)) + 0.1 * rng.randn(s) + rng.randn()
    return x, y, rng.rand(s) + 0.05


def test_lasso_matches_sklearn() -> None:
    from sklearn.linear_model import Lasso

    rng = np.random.RandomState(0)
    for trial in range(60):
        x, y, w = weighted_problem(rng, binary=trial % 2 == 0)
        alpha = float(10 ** rng.uniform(-3.5, -0.5))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning where max_iter runs out: we must stop there too
            want = Lasso(alpha=alpha).fit(x, y, sample_weight=w)
        got = lasso(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(w), alpha)
        np.testing.assert_allclose(got.coef.numpy(), want.coef_, atol=1e-9, rtol=1e-9)
        np.testing.assert_allclose(float(got.intercept), want.intercept_, atol=1e-9, rtol=1e-9)
        assert got.n_iter == want.n_iter_
    # Without weights, and converged tightly: the optimum itself.
    for trial in range(6):
        x, y, w = weighted_problem(rng, binary=False)
        x, y = x[:, :8], y
        want = Lasso(alpha=0.05, tol=1e-12, max_iter=100_000).fit(x, y)
        got = lasso(torch.from_numpy(x), torch.from_numpy(y), None, 0.05, tol=1e-12, max_iter=100_000)
        np.testing.assert_allclose(got.coef.numpy(), want.coef_, atol=1e-8, rtol=1e-8)


def test_weighted_least_squares_matches_sklearn() -> None:
    from sklearn.linear_model import LinearRegression

    rng = np.random.RandomState(1)
    for trial in range(60):
        x, y, w = weighted_problem(rng, binary=trial % 2 == 0)
        if trial % 3 == 0:  # rank-deficient: a duplicated and a scaled column
            x[:, 1] = x[:, 0]
            x[:, -1] = 0.5 * x[:, 0]
        if trial % 4 == 0:  # fewer samples than features: minimum-norm solution
            x, y, w = x[:5], y[:5], w[:5]
        want = LinearRegression().fit(x, y, sample_weight=w)
        got = weighted_least_squares(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(w))
        scale = max(1.0, float(np.abs(want.coef_).max()))
        np.testing.assert_allclose(got.coef.numpy() / scale, want.coef_ / scale, atol=1e-9)
        np.testing.assert_allclose(float(got.intercept) / scale, want.intercept_ / scale, atol=1e-9)
    # float32 KernelShap designs (all-on and all-off rows weighted 1e6), as Captum hands them over.
    for trial in range(30):
        f = rng.randint(3, 40)
        s = rng.randint(2 * f, 6 * f)
        x = np.zeros((s, f), dtype=np.float32)
        x[0] = 1
        for i in range(2, s):
            x[i, rng.permutation(f)[: rng.randint(1, f)]] = 1
        y = (1 / (1 + np.exp(-x @ rng.randn(f) * 0.2))).astype(np.float32)
        w = np.ones(s, dtype=np.float32)
        w[:2] = 1e6
        want = LinearRegression().fit(x, y, sample_weight=w)
        got = weighted_least_squares(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(w))
        assert got.coef.dtype == torch.float32
        np.testing.assert_allclose(got.coef.numpy(), want.coef_, atol=3e-5, rtol=1e-5)
