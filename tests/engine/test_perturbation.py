"""Forward-only perturbation methods (FeatureAblation, FeaturePermutation, Occlusion, ShapleyValueSampling, ShapleyValues)
against Captum 0.9.0: alone, fused with other requests, with passes split, and from concurrent callers."""

from __future__ import annotations

import random
import threading
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from attrserve_engine import AttributionJob, Engine, InvalidArgument, ResourceExhausted
from oracle import MODELS, assert_all_close, assert_fused_equals_alone, assert_split_passes, case_rng, engine_fixture, example_inputs, make_engine, run_fused

VOCAB = 12


class TokenModel(nn.Module):
    """Token ids (B, 6) → embeddings → a position-aware linear head: ablating means replacing ids (baseline 0 = padding)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.emb = nn.Embedding(VOCAB, 4)
        self.act = nn.Tanh()
        self.head = nn.Linear(6 * 4, 3)

    def forward(self, ids):
        return self.head(self.act(self.emb(ids)).flatten(1))


PERTURBATION_MODELS = {name: MODELS[name] for name in ("conv", "multi", "text", "mlp")} | {"tokens": TokenModel}
CAPTUM = {
    "feature_ablation": "FeatureAblation",
    "feature_permutation": "FeaturePermutation",
    "occlusion": "Occlusion",
    "shapley_value_sampling": "ShapleyValueSampling",
    "shapley_values": "ShapleyValues",
}
N_CLASSES = {"conv": 3, "multi": 2, "text": 2, "mlp": 3, "tokens": 3}


def model_inputs(model: str, n: int, seed: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    if model == "tokens":
        return (torch.randint(1, VOCAB, (n, 6), generator=torch.Generator().manual_seed(seed)),), ()
    return example_inputs(model, n, seed)


def grouped_masks(model: str, n: int, per_example: bool) -> tuple[torch.Tensor, ...]:
    """Feature groups: one mask row for all examples (broadcast where Captum allows), or one per example."""
    e = torch.arange(n).view(n, 1) if per_example else torch.zeros(1, 1, dtype=torch.int64)
    if model == "conv":  # (2, 8, 8): 4×4 blocks shared by both channels, or per channel and shifted per example
        r, c = torch.arange(8).view(8, 1), torch.arange(8).view(1, 8)
        block = (r // 4) * 2 + c // 4  # (8, 8)
        if not per_example:
            return (block.view(1, 1, 8, 8),)
        ch = torch.arange(2).view(1, 2, 1, 1)
        return (ch * 4 + (block.view(1, 1, 8, 8) + e.view(n, 1, 1, 1)) % 4,)
    if model == "multi":  # (4,), (3,): feature 1 spans both inputs (cross-tensor)
        if not per_example:
            return (torch.tensor([[0, 0, 1, 1]]), torch.tensor([[1, 2, 2]]))
        g = torch.Generator().manual_seed(n)
        return (torch.randint(0, 4, (n, 4), generator=g), torch.randint(0, 4, (n, 3), generator=g))
    if model == "text":  # (5, 6): one feature per token, or token pairs shifted per example
        t = torch.arange(5).view(1, 5, 1)
        return ((t + e.view(-1, 1, 1)) // 2 if per_example else t,)
    j = torch.arange(6).view(1, 6)  # mlp, tokens: (6,)
    return ((j + e) % 3 if per_example else j // 2,)


@dataclass
class Case:
    model: str
    algorithm: str
    params: dict[str, Any] = field(default_factory=dict)
    mask: str = "none"  # none | grouped | per_example
    baselines: str = "none"  # none | scalar | row | per_example
    n: int = 3
    seed: int = 0

    @property
    def id(self) -> str:
        bits = [self.model, self.algorithm] + [f"{k}={v}" for k, v in self.params.items()]
        return "-".join(bits + [f"m={self.mask}", f"b={self.baselines}", f"n={self.n}", f"s={self.seed}"])

    def build(self) -> dict[str, Any]:
        inputs, args = model_inputs(self.model, self.n, seed=300 + self.seed)
        g = torch.Generator().manual_seed(400 + self.seed)
        tokens = self.model == "tokens"

        def baseline(shape: tuple[int, ...]) -> torch.Tensor:
            return torch.randint(0, VOCAB, shape, generator=g) if tokens else 0.1 * torch.randn(shape, generator=g)

        baselines: tuple = {
            "none": (),
            "scalar": tuple(0 if tokens else 0.25 for _ in inputs),
            "row": tuple(baseline((1, *x.shape[1:])) for x in inputs),
            "per_example": tuple(baseline(tuple(x.shape)) for x in inputs),
        }[self.baselines]
        masks = () if self.mask == "none" else grouped_masks(self.model, self.n, self.mask == "per_example")
        targets = [i % N_CLASSES[self.model] for i in range(self.n)]
        return {"inputs": inputs, "args": args, "baselines": baselines, "masks": masks, "targets": targets}

    def job(self, built: dict[str, Any]) -> AttributionJob:
        return AttributionJob(
            model=self.model,
            algorithm=self.algorithm,
            inputs=built["inputs"],
            baselines=built["baselines"],
            target=torch.tensor(built["targets"]).view(-1, 1),
            additional_forward_args=built["args"],
            feature_masks=built["masks"],
            params=dict(self.params),
            seed=self.seed,
        )


def captum_attribute(case: Case, built: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """The oracle: Captum 0.9.0 on the same request, after torch.manual_seed(seed); np.random.seed(seed)."""
    import captum.attr as ca

    method = getattr(ca, CAPTUM[case.algorithm])(PERTURBATION_MODELS[case.model]())
    kwargs: dict[str, Any] = dict(case.params, target=built["targets"])
    if built["args"]:
        kwargs["additional_forward_args"] = built["args"]
    if built["baselines"]:
        kwargs["baselines"] = built["baselines"]
    if built["masks"]:
        kwargs["feature_mask"] = built["masks"]
    torch.manual_seed(case.seed)
    np.random.seed(case.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "at least 10 features" and skipped-group notices
        out = method.attribute(tuple(built["inputs"]), **kwargs)
    return out if isinstance(out, tuple) else (out,)


def _cases() -> list[Case]:
    fa, fp, occ, svs, sv = CAPTUM
    cases = [Case(m, fa) for m in PERTURBATION_MODELS]
    cases += [
        Case("conv", fa, mask="grouped", baselines="row"),
        Case("multi", fa, mask="grouped", baselines="scalar"),
        Case("multi", fa, {"perturbations_per_eval": 4}, mask="per_example", baselines="per_example"),
        Case("text", fa, mask="per_example", baselines="per_example"),
        Case("mlp", fa, {"perturbations_per_eval": 4}, mask="per_example", baselines="scalar"),
        Case("tokens", fa, mask="grouped", baselines="row"),
        Case("tokens", fa, mask="per_example", baselines="per_example"),
    ]
    cases += [Case(m, fp, n=4, seed=1) for m in PERTURBATION_MODELS]
    cases += [
        Case("multi", fp, {"perturbations_per_eval": 3}, n=4, seed=2),  # the draws depend on perturbations_per_eval
        Case("multi", fp, {"perturbations_per_eval": 2}, mask="grouped", n=5, seed=3),
        Case("conv", fp, {"perturbations_per_eval": 3}, mask="grouped", n=4, seed=4),
        Case("text", fp, mask="per_example", n=3, seed=5),
        Case("tokens", fp, {"perturbations_per_eval": 2}, mask="grouped", n=2, seed=6),  # n=2: redraws the identity
        Case("mlp", fp, n=1),  # one example: Captum skips every feature and returns zeros
    ]
    cases += [
        Case("conv", occ, {"sliding_window_shapes": (2, 3, 3), "strides": (1, 2, 2)}),  # overlapping, last window cut off
        Case("conv", occ, {"sliding_window_shapes": (2, 4, 4), "strides": 4, "perturbations_per_eval": 5}, baselines="row"),
        Case("conv", occ, {"sliding_window_shapes": (1, 3, 3), "strides": (1, 2, 3)}, baselines="scalar"),
        Case("conv", occ, {"sliding_window_shapes": (2, 5, 3), "strides": (1, 3, 2)}, baselines="per_example"),
        Case("multi", occ, {"sliding_window_shapes": ((2,), (2,)), "strides": (1, (1,))}, baselines="scalar"),
        Case("multi", occ, {"sliding_window_shapes": ((3,), (1,))}, baselines="per_example"),
        Case("text", occ, {"sliding_window_shapes": (2, 6), "strides": (1, 6)}, baselines="per_example"),
        Case("text", occ, {"sliding_window_shapes": (3, 4), "strides": (2, 2)}),
        Case("mlp", occ, {"sliding_window_shapes": (3,), "strides": 2}, baselines="row"),
        Case("tokens", occ, {"sliding_window_shapes": (2,), "strides": (1,)}),
        Case("tokens", occ, {"sliding_window_shapes": (3,), "strides": (2,)}, baselines="row"),
    ]
    cases += [
        Case("conv", svs, {"n_samples": 5}, mask="grouped", seed=7),
        Case("conv", svs, {"n_samples": 2}, seed=8),
        Case("multi", svs, {"n_samples": 10}, baselines="scalar", seed=9),
        Case("multi", svs, {"n_samples": 6}, mask="per_example", baselines="per_example", seed=10),
        Case("text", svs, {"n_samples": 4, "perturbations_per_eval": 3}, mask="per_example", seed=11),
        Case("mlp", svs, {"n_samples": 6, "perturbations_per_eval": 3}, baselines="row", seed=12),
        Case("tokens", svs, {"n_samples": 5}, mask="grouped", baselines="row", seed=13),
        Case("tokens", svs, {}, seed=14),  # Captum's default n_samples=25
    ]
    cases += [
        Case("conv", sv, mask="grouped"),
        Case("multi", sv, mask="grouped", baselines="row"),
        Case("multi", sv, {"perturbations_per_eval": 2}, mask="per_example", baselines="per_example"),  # ids with gaps
        Case("text", sv, mask="grouped", baselines="scalar"),
        Case("mlp", sv, mask="per_example", baselines="per_example"),
        Case("tokens", sv, mask="grouped"),
    ]
    return cases


CASES = _cases()
engine = engine_fixture(PERTURBATION_MODELS)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_captum(engine: Engine, case: Case) -> None:
    built = case.build()
    want = captum_attribute(case, built)
    rows_before = engine.rows
    got = engine.attribute(case.job(built), timeout=60)
    # FeaturePermutation cannot shuffle one example: Captum skips every feature and answers exact zeros. That case pins
    # the degenerate answer, so it asserts exact zeros on both sides instead of a comparison zeros would pass anyway.
    zeros_by_design = case.algorithm == "feature_permutation" and case.n == 1
    if zeros_by_design:
        assert all(torch.equal(w, torch.zeros_like(w)) for w in want)
        assert all(torch.equal(g, torch.zeros_like(g)) for g in got.attributions)
    assert_all_close(got.attributions, want, informative=not zeros_by_design)
    assert engine.rows - rows_before == got.timing.rows, "rows() must count exactly the rows the plan runs"


def test_permutation_draws_follow_perturbations_per_eval() -> None:
    """Captum's FeaturePermutation draws per (group, input, feature): grouping changes its numbers, and ours with it."""
    one, three = Case("multi", "feature_permutation", n=4, seed=2), Case("multi", "feature_permutation", {"perturbations_per_eval": 3}, n=4, seed=2)
    assert not torch.allclose(captum_attribute(one, one.build())[1], captum_attribute(three, three.build())[1])


def test_row_counts(engine: Engine) -> None:
    """rows() is what the per-request cap sees: inputs + one copy per feature/window/coalition."""
    expected = [
        (Case("mlp", "feature_ablation"), 3 * (1 + 6)),
        (Case("mlp", "feature_permutation", n=1), 1),
        (Case("conv", "occlusion", {"sliding_window_shapes": (2, 3, 3), "strides": (1, 2, 2)}), 3 * (1 + 1 * 4 * 4)),
        (Case("mlp", "shapley_value_sampling", {"n_samples": 5}, mask="grouped"), 3 * (2 + 5 * 2)),
        (Case("mlp", "shapley_values", mask="grouped"), 3 * 2**3),
    ]
    for case, rows in expected:
        assert engine.attribute(case.job(case.build()), timeout=60).timing.rows == rows, case.id


def random_job(model: str, rng: random.Random) -> AttributionJob:
    """Another request for the same model: a random perturbation method, mask, baselines, size and seed."""
    windows = {"conv": (2, 4, 4), "multi": ((2,), (3,)), "text": (2, 6), "mlp": (2,), "tokens": (2,)}
    algorithm = rng.choice(list(CAPTUM))
    params = {
        "occlusion": {"sliding_window_shapes": windows[model], "strides": 2 if model in ("conv", "text") else 1},
        "shapley_value_sampling": {"n_samples": rng.randint(1, 4)},
        "feature_ablation": {"perturbations_per_eval": rng.randint(1, 3)},
    }.get(algorithm, {})
    case = Case(
        model,
        algorithm,
        params,
        mask="none" if algorithm == "occlusion" else rng.choice(["grouped", "per_example"]),
        baselines="none" if algorithm == "feature_permutation" else rng.choice(["none", "scalar", "row", "per_example"]),
        n=rng.randint(1, 4),
        seed=rng.randint(0, 1000),
    )
    if case.algorithm == "shapley_values" and case.model == "conv":
        case.mask = "grouped"  # 8 per-example features would be 256 coalitions; keep the others small
    return case.job(case.build())


# One case per algorithm and model kind; every model appears.
FUSION_CASES = [
    Case("conv", "feature_ablation", mask="grouped", baselines="row"),
    Case("tokens", "feature_ablation", mask="per_example", baselines="per_example"),
    Case("multi", "feature_permutation", {"perturbations_per_eval": 3}, n=4, seed=2),
    Case("conv", "occlusion", {"sliding_window_shapes": (2, 3, 3), "strides": (1, 2, 2)}),
    Case("text", "occlusion", {"sliding_window_shapes": (2, 6), "strides": (1, 6)}, baselines="per_example"),
    Case("text", "shapley_value_sampling", {"n_samples": 4}, mask="per_example", seed=11),
    Case("mlp", "shapley_value_sampling", {"n_samples": 6}, baselines="row", seed=12),
    Case("multi", "shapley_values", mask="grouped", baselines="row"),
    Case("tokens", "shapley_values", mask="grouped"),
]


@pytest.mark.parametrize("max_batch_rows", [4096, 37], ids=["one-pass", "split-passes"])
@pytest.mark.parametrize("case", FUSION_CASES, ids=lambda c: c.id)
def test_fused_equals_alone(engine: Engine, case: Case, max_batch_rows: int) -> None:
    built = case.build()
    alone = engine.attribute(case.job(built), timeout=60)
    rng = case_rng(case.id)
    others = [random_job(case.model, rng) for _ in range(15)]
    run = run_fused(partial(make_engine, PERTURBATION_MODELS), case.job(built), others, max_batch_rows)
    assert_fused_equals_alone(run.fused, alone, delta=False)
    if max_batch_rows < 4096:
        assert_split_passes(run, max_batch_rows)


def test_concurrent_callers_share_forward_passes() -> None:
    """4 callers on their own threads, 5 perturbation requests each, queued together under held(): every request is
    one group of forward rows under one batch key (8 or 16 rows), so all 20 share exactly one pass of 224 rows."""
    engine = make_engine(PERTURBATION_MODELS, default_max_queue_delay_us=0, default_max_batch_rows=4096)
    algorithms = [
        ("feature_ablation", {}),
        ("feature_permutation", {}),
        ("occlusion", {"sliding_window_shapes": (2,), "strides": 2}),
        ("shapley_value_sampling", {"n_samples": 3}),
        ("shapley_values", {}),
    ]
    callers, per_caller = 4, 5
    # n=2 examples, 3 feature groups (occlusion: 3 windows): the inputs plus one copy per feature, per sampled
    # permutation (the first and last coalitions are shared: 2 + 3 × (3 − 1)), or per coalition (2^3).
    rows = {"feature_ablation": 2 * (1 + 3), "feature_permutation": 2 * (1 + 3), "occlusion": 2 * (1 + 3),
            "shapley_value_sampling": 2 * (2 + 3 * (3 - 1)), "shapley_values": 2 * 2**3}
    cases = [[Case("mlp", a, p, mask="none" if a == "occlusion" else "grouped", n=2, seed=c) for a, p in algorithms[:per_caller]] for c in range(callers)]
    built = [[case.build() for case in mine] for mine in cases]
    futures: list = [None] * callers
    barrier = threading.Barrier(callers)

    def caller(c: int) -> None:
        jobs = [case.job(b) for case, b in zip(cases[c], built[c])]
        barrier.wait()
        futures[c] = [engine.submit(j) for j in jobs]

    threads = [threading.Thread(target=caller, args=(c,)) for c in range(callers)]
    try:
        with engine.held():
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert engine.in_flight() == callers * per_caller
        results = [[f.result(timeout=60) for f in mine] for mine in futures]
    finally:
        engine.shutdown()
    total = callers * sum(rows[a] for a, _ in algorithms)
    assert (engine.passes, engine.rows, total) == (1, total, 224)
    for mine, b, got in zip(cases, built, results):
        for case, bb, r in zip(mine, b, got):
            assert (r.timing.rows, r.timing.passes, r.timing.pass_rows, r.timing.pass_requests) == (rows[case.algorithm], 1, total, 20), case.id
            assert_all_close(r.attributions, captum_attribute(case, bb))


def test_exact_shapley_on_20_features_is_refused_before_any_work(engine: Engine) -> None:
    inputs, _ = model_inputs("conv", 1, seed=0)
    mask = (torch.arange(2 * 8 * 8) % 20).view(1, 2, 8, 8)
    job = AttributionJob(model="conv", algorithm="shapley_values", inputs=inputs, target=torch.zeros(1, 1, dtype=torch.int64), feature_masks=(mask,))
    passes = engine.passes
    with pytest.raises(ResourceExhausted, match=r"needs 1048576 rows"):
        engine.submit(job)
    # the default mask (128 features) is 2**128 rows: counted, not enumerated
    with pytest.raises(ResourceExhausted, match=str(2**128)):
        engine.submit(AttributionJob(model="conv", algorithm="shapley_values", inputs=inputs, target=torch.zeros(1, 1, dtype=torch.int64)))
    assert engine.passes == passes
    # sampling the same 20 features is cheap
    job.algorithm, job.params = "shapley_value_sampling", {"n_samples": 2}
    assert engine.attribute(job, timeout=60).timing.rows == 2 + 2 * 19


X6 = (torch.randn(2, 6),)
BAD = [
    ("feature_ablation", {"perturbations_per_eval": 0}, {}, "feature_ablation.perturbations_per_eval must be at least 1"),
    ("feature_ablation", {"n_samples": 3}, {}, "feature_ablation: unknown parameter"),
    ("feature_ablation", {"perturbations_per_eval": 1.5}, {}, "feature_ablation.perturbations_per_eval must be an integer"),
    ("feature_permutation", {"perturbations_per_eval": -2}, {}, "feature_permutation.perturbations_per_eval"),
    ("feature_permutation", {}, {"baselines": (0.5,)}, "feature_permutation takes no baselines"),
    ("occlusion", {}, {}, "occlusion.sliding_window_shapes is required"),
    ("occlusion", {"sliding_window_shapes": (7,)}, {}, r"occlusion.sliding_window_shapes\[0\] \(7,\) exceeds"),
    ("occlusion", {"sliding_window_shapes": (2, 2)}, {}, r"occlusion.sliding_window_shapes\[0\] is \(2, 2\)"),
    ("occlusion", {"sliding_window_shapes": (0,)}, {}, "must be positive"),
    ("occlusion", {"sliding_window_shapes": (2,), "strides": 3}, {}, "larger than the window"),
    ("occlusion", {"sliding_window_shapes": (2,), "strides": (0,)}, {}, "occlusion.strides"),
    ("occlusion", {"sliding_window_shapes": ((2,), (2,))}, {}, "give one per input"),
    ("occlusion", {"sliding_window_shapes": "2x2"}, {}, "occlusion.sliding_window_shapes"),
    ("occlusion", {"sliding_window_shapes": (2,)}, {"feature_masks": (torch.zeros(1, 6, dtype=torch.int64),)}, "does not take it"),
    ("shapley_value_sampling", {"perturbations_per_eval": 0}, {}, "shapley_value_sampling.perturbations_per_eval"),  # n_samples=0: Captum gives NaN
    ("shapley_value_sampling", {"n_samples": 10**6}, {}, "shapley_value_sampling.n_samples is 1000000, over"),
    # ids past the scalars are Captum's too (test_sparse_feature_ids_match_captum); past Lime's limit on ids, refused
    ("shapley_value_sampling", {}, {"feature_masks": (torch.tensor([[0, 0, 1, 1, 2, 100_000]]),)}, "feature_masks use id 100000"),
    ("shapley_values", {"perturbations_per_eval": 0}, {}, "shapley_values.perturbations_per_eval"),
    ("shapley_values", {"n_samples": 4}, {}, "shapley_values: unknown parameter"),
]


@pytest.mark.parametrize("algorithm,params,extra,match", BAD, ids=[f"{b[0]}-{b[3][:30]}" for b in BAD])
def test_bad_params_are_invalid_argument(engine: Engine, algorithm: str, params: dict, extra: dict, match: str) -> None:
    job = AttributionJob(model="mlp", algorithm=algorithm, inputs=X6, target=torch.zeros(2, 1, dtype=torch.int64), params=params, **extra)
    with pytest.raises(InvalidArgument, match=match):
        engine.submit(job)


@pytest.mark.parametrize("algorithm", ["feature_ablation", "feature_permutation", "shapley_value_sampling"])
def test_sparse_feature_ids_match_captum(engine: Engine, algorithm: str) -> None:
    """Feature ids past the inputs' scalars, with gaps (e.g. segment labels): Captum takes them in every perturbation
    method that takes a mask (ShapleyValueSampling draws its orders over every id up to the largest); attrserve refused
    them in ShapleyValueSampling alone. One mask row and per-example masks, then fused with other requests. (Captum's
    ShapleyValues enumerates the orders of every id up to the largest: 14! here, so it is left out.)"""
    inputs, _ = model_inputs("mlp", 3, seed=7)
    masks = [torch.tensor([[0, 0, 9, 9, 4, 13]]), torch.tensor([[13, 2, 2, 40, 40, 0], [5, 5, 5, 7, 7, 7], [30, 1, 30, 1, 30, 1]])]
    params = {"n_samples": 4} if algorithm == "shapley_value_sampling" else {}
    baselines = () if algorithm == "feature_permutation" else (0.2,)
    for mask in masks:
        built = {"inputs": inputs, "args": (), "baselines": baselines, "masks": (mask,), "targets": [0, 1, 2]}
        case = Case("mlp", algorithm, params, seed=3)
        want = captum_attribute(case, built)
        assert_all_close(engine.attribute(case.job(built), timeout=60).attributions, want)
    others = [random_job("mlp", random.Random(i)) for i in range(6)]
    run = run_fused(partial(make_engine, PERTURBATION_MODELS), case.job(built), others, 4096, before=3)
    assert_all_close(run.fused.attributions, want)


SEEN_INPUT_BYTES: list[int] = []  # the storage behind each input a RecordingImage forward got (replicas share this list)


class RecordingImage(nn.Module):
    """A small CNN on 3x16x16 (768 features with the default mask) that records how many bytes of input it was handed."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 3))

    def forward(self, x):
        SEEN_INPUT_BYTES.append(x.untyped_storage().nbytes())
        return self.net(x)


@pytest.mark.parametrize(
    "algorithm,params,n,rows",
    [
        ("shapley_value_sampling", {"n_samples": 2}, 1, 2 + 2 * 767),
        ("feature_ablation", {}, 2, 2 * 769),
        ("feature_permutation", {}, 2, 2 * 769),
        ("occlusion", {"sliding_window_shapes": (1, 1, 1)}, 1, 769),
        ("neuron_feature_ablation", {"neuron_selector": [0, 0, 0]}, 1, 769),
    ],
)
def test_perturbation_rows_are_built_a_pass_at_a_time_so_a_request_over_the_byte_cap_runs_and_equals_captum(
    algorithm, params, n, rows
) -> None:
    """A perturbation plan's rows (one per feature ablated, per order's prefix, per window) are made as each pass takes
    them, not all at once: every forward is handed at most one pass of rows (the block used to be built whole and
    passes were views into it), and a request whose rows would hold more than max_request_work_bytes at once runs —
    its examples are all it holds — and equals Captum. A gradient method's request of the same size is still refused."""
    from attrserve_engine import EngineLimits, InputSpec, ModelSpec

    import captum.attr as ca

    row_bytes, cap = 3 * 16 * 16 * 4, 200_000  # every row's inputs: 3 KiB; the cap: ~65 rows
    assert rows * row_bytes > 5 * cap
    engine = Engine(EngineLimits(probe_batch_rows=False, default_device="cpu", max_request_work_bytes=cap))
    try:
        spec = ModelSpec(name="img", module=RecordingImage(), inputs=[InputSpec("x", torch.float32, (3, 16, 16))], max_batch_rows=32)
        engine.load(spec)
        x = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(5))
        target = None if algorithm.startswith("neuron") else torch.tensor([[1]] * n)
        SEEN_INPUT_BYTES.clear()
        layer = "net.0" if algorithm.startswith("neuron") else ""
        job = AttributionJob(model="img", algorithm=algorithm, inputs=(x,), target=target, params=params, layer=layer, seed=9)
        got = engine.attribute(job, timeout=120)
        assert got.timing.rows == rows and got.timing.passes >= rows // 32
        assert max(SEEN_INPUT_BYTES) <= 32 * row_bytes, max(SEEN_INPUT_BYTES)

        module = RecordingImage().eval()
        kwargs: dict[str, Any] = {"target": 1} if target is not None else {}
        if algorithm == "shapley_value_sampling":
            kwargs["n_samples"] = 2
        elif algorithm == "occlusion":
            kwargs["sliding_window_shapes"] = (1, 1, 1)
        torch.manual_seed(9)
        if algorithm == "neuron_feature_ablation":
            want = ca.NeuronFeatureAblation(module, module.net[0]).attribute(x, neuron_selector=(0, 0, 0))
        else:
            want = getattr(ca, CAPTUM[algorithm])(module).attribute(x, **kwargs)
        assert_all_close(got.attributions, (want,))

        # the same bytes of gradient work are built at once, and refused
        with pytest.raises(ResourceExhausted, match=r"would hold .* of inputs at once, over this server's limit"):
            engine.submit(
                AttributionJob(
                    model="img", algorithm="integrated_gradients", inputs=(x,), target=torch.tensor([[1]] * n), params={"n_steps": 100}
                )
            )
        assert engine.in_flight() == 0 and engine.serving() == (True, "")
    finally:
        engine.shutdown(drain=False, timeout=5)


def test_lazy_rows_slice_and_join_like_the_tensors_they_stand_for() -> None:
    """plan.Rows against the eager tensors: any run of rows, sliced again, across the parts of a join, of repeated
    rows, and of coalition rows mixed per coalition (perturbation.coalition_rows against mix_rows)."""
    from attrserve_engine.algorithms.perturbation import chosen_positions, coalition_rows, mix_rows, one_feature_each
    from attrserve_engine.plan import Rows, repeat_rows

    g = torch.Generator().manual_seed(0)
    n, x, b = 3, torch.randn(3, 2, 4, generator=g), torch.randn(1, 2, 4, generator=g)
    index = (torch.arange(8) % 5).view(1, 2, 4)  # 5 features
    eye = torch.eye(5, dtype=torch.bool)
    shuffled = torch.randn(5, n, 2, 4, generator=g)  # one replacement per coalition
    lazy = Rows.cat([x, coalition_rows(one_feature_each(5, index), 5, b, x, n), Rows.repeated(x, 2), x[:0]])
    eager = torch.cat([x, mix_rows(chosen_positions(eye, index), b, x, n), repeat_rows(x, 2), x[:0]])
    per_coalition = coalition_rows(one_feature_each(5, index), 5, lambda a, c: shuffled[a:c], x, n)
    per_coalition_eager = mix_rows(chosen_positions(eye, index), shuffled, x, n)
    assert lazy.shape == eager.shape and lazy.dtype == eager.dtype and per_coalition.shape == per_coalition_eager.shape
    rng = random.Random(1)
    for _ in range(200):
        start = rng.randrange(0, eager.shape[0] + 1)
        stop = rng.randrange(start, eager.shape[0] + 1)
        part = lazy[start:stop]
        assert torch.equal(part.build(), eager[start:stop]), (start, stop)
        inner = rng.randrange(0, part.count + 1)
        assert torch.equal(part[inner:].build(), eager[start + inner : stop])
        stop = min(stop, per_coalition_eager.shape[0])
        start = min(start, stop)
        assert torch.equal(per_coalition[start:stop].build(), per_coalition_eager[start:stop])
    # small rows are built when yielded (building a pass's share per segment costs Python on every pass); large stay lazy
    from attrserve_engine.plan import EAGER_ROWS_BYTES, settled

    small, large = Rows.repeated(x, 2), Rows.repeated(x, EAGER_ROWS_BYTES // (8 * 4 * 3) + 1)
    assert isinstance(settled(small), torch.Tensor) and torch.equal(settled(small), repeat_rows(x, 2))
    assert isinstance(settled(large), Rows)


def test_occlusion_keeps_the_masks_its_requests_share_builds_large_ones_a_pass_at_a_time_and_never_writes_to_them() -> None:
    """Occlusion's masks and covers depend only on the windows and the input's shape: they are built once and kept, and
    a pass's masks are a view of them (bench W4: 64 windows on 3x32x32, ~165 us a request to build, bench/RESULTS.md
    issue 12 step 20). Masks over _MASKS_KEPT_BYTES are not kept and are built a pass at a time, as before. Requests
    of different windows and shapes, fused in one engine, each equal Captum, and what was kept still equals what is
    built afresh: no request wrote to it."""
    import captum.attr as ca

    from attrserve_engine import EngineLimits, InputSpec, ModelSpec
    from attrserve_engine.algorithms import occlusion
    from attrserve_engine.algorithms.occlusion import Windows
    from attrserve_engine.plan import Task

    cpu = torch.device("cpu")
    w4 = Windows((3, 4, 4), (3, 4, 4), (1, 8, 8))
    sizes = (3, 32, 32)
    every = w4.masks(sizes, cpu, 0, w4.total)
    assert torch.equal(every, w4.build_masks(sizes, cpu, 0, w4.total)) and every.shape == (64, 3, 32, 32)
    for a, b in ((0, 1), (5, 37), (63, 64)):
        part = w4.masks(sizes, cpu, a, b)
        assert torch.equal(part, w4.build_masks(sizes, cpu, a, b))
        assert part.untyped_storage().data_ptr() == every.untyped_storage().data_ptr()  # a view of the kept masks
    large = Windows((1, 1, 1), (1, 1, 1), (3, 224, 224))  # 150,528 masks of 150,528 positions: 22 GiB
    assert occlusion._all_masks(large, (3, 224, 224), cpu) is None
    first = large.masks((3, 224, 224), cpu, 1000, 1004)
    assert first.shape == (4, 3, 224, 224) and first.sum().item() == 4
    # window k occludes one position: dim 0's window index fastest (Captum's numbering)
    assert all(first[i].flatten()[(k % 3) * 224 * 224 + (k // 3 % 224) * 224 + k // (3 * 224)] for i, k in enumerate(range(1000, 1004)))

    engine = Engine(EngineLimits(probe_batch_rows=False, default_device="cpu"))
    try:
        engine.load(ModelSpec(name="img", module=RecordingImage(), inputs=[InputSpec("x", torch.float32, (3, 16, 16))], max_batch_rows=64))
        g = torch.Generator().manual_seed(11)
        cases = [((3, 4, 4), (3, 4, 4)), ((1, 5, 5), (1, 3, 3)), ((3, 4, 4), (3, 4, 4)), ((3, 16, 16), (3, 16, 16))]
        xs = [torch.randn(2, 3, 16, 16, generator=g) for _ in cases]
        target = torch.tensor([[1], [2]])
        jobs = [
            AttributionJob(
                model="img", algorithm="occlusion", inputs=(x,), target=target, params={"sliding_window_shapes": s, "strides": t}
            )
            for x, (s, t) in zip(xs, cases)
        ]
        futures = [engine.submit(job) for job in jobs]  # fused: their rows share passes
        module = RecordingImage().eval()
        for future, x, (s, t) in zip(futures, xs, cases):
            want = ca.Occlusion(module).attribute(x, sliding_window_shapes=s, strides=t, target=[1, 2])
            assert_all_close(future.result(60).attributions, (want,))
        for s, t in set(cases):
            x = xs[cases.index((s, t))]
            (w,) = occlusion.Occlusion().windows(Task((x,), (), target, (), occlusion.OcclusionParams((s,), (t,)), rng=None))
            kept = occlusion._all_masks(w, (3, 16, 16), cpu)
            assert kept is not None and torch.equal(kept, w.build_masks((3, 16, 16), cpu, 0, w.total))
            fresh = occlusion._cover.__wrapped__(w, (3, 16, 16), cpu)
            assert all(torch.equal(a, b) for a, b in zip(occlusion._cover(w, (3, 16, 16), cpu), fresh))
            cover, count = occlusion._cover_counts(w, (3, 16, 16), cpu)
            assert all(torch.equal(a, b.to(torch.float64)) for a, b in zip(cover, fresh))
            assert torch.equal(count, occlusion._cover_counts.__wrapped__(w, (3, 16, 16), cpu)[1])
        assert engine.in_flight() == 0 and engine.serving() == (True, "")
    finally:
        engine.shutdown(drain=False, timeout=5)
