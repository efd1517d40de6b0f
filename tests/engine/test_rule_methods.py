"""DeepLiftShap, GuidedBackprop and Deconvolution against Captum 0.9.0, through the engine: alone, fused with others, and wrapped in NoiseTunnel."""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from attrserve_engine import Engine, InvalidArgument, ModelSpec
from oracle import MODELS, Case, assert_all_close, assert_close, assert_fused_equals_alone, assert_split_passes, case_rng, engine_fixture, job_for, make_engine, run_fused

pytestmark = pytest.mark.filterwarnings("ignore:Setting backward hooks on ReLU:UserWarning")


class InplaceReLUNet(nn.Module):
    """ReLU(inplace=True) twice, one on a tensor that is used again afterwards.

    Captum's hooks hand each ReLU a clone of its input, so under Captum `skip`
    sees `a` as it was before the in-place write; we must run the same forward.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.fc1 = nn.Linear(5, 7)
        self.relu1 = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(7, 6)
        self.relu2 = nn.ReLU(inplace=True)
        self.head = nn.Linear(6, 3)
        self.skip = nn.Linear(7, 3)

    def forward(self, x):
        a = self.fc1(x)
        h = self.relu2(self.fc2(self.relu1(a)))
        return self.head(h) + 0.5 * self.skip(a)


class ResidualReLU(nn.Module):
    """A ReLU whose input also skips around it: Captum's rule replaces the gradient summed over both uses."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.fc1 = nn.Linear(4, 6)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x):
        a = self.fc1(x)
        return self.fc2(self.relu(a) - 0.5 * a)


class ReusedReLU(nn.Module):
    """One ReLU module applied twice: Captum's guided hooks allow it (DeepLift does not)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(8)
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 2)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.b(self.relu(self.a(self.relu(x))))


EXTRA_MODELS = {"inplace": InplaceReLUNet, "residual": ResidualReLU, "reused": ReusedReLU}
ALL_MODELS = {**MODELS, **EXTRA_MODELS}
EXTRA_FEATURES = {"inplace": 5, "residual": 4, "reused": 4}
N_CLASSES = {"toy": 2, "mlp": 3, "conv": 3, "multi": 2, "text": 2, "inplace": 3, "residual": 2, "reused": 2}


@dataclass
class RuleCase(Case):
    """An oracle Case with a baseline distribution of `m` rows (deep_lift_shap) and the extra models."""

    m: int = 0

    @property
    def id(self) -> str:
        return super().id + (f"-m={self.m}" if self.m else "")

    def build(self) -> dict[str, Any]:
        if self.model in EXTRA_MODELS:
            g = torch.Generator().manual_seed(100 + self.seed)
            built = {"inputs": (torch.randn(self.n, EXTRA_FEATURES[self.model], generator=g),), "args": (), "baselines": ()}
        else:
            built = super().build()
        if self.target == "per_example":
            rows = [i % N_CLASSES[self.model] for i in range(self.n)]
        else:
            rows = [1] * self.n
        built["target"] = torch.tensor(rows, dtype=torch.int64)[:, None]
        built["captum_target"] = rows
        if self.m:
            g = torch.Generator().manual_seed(300 + self.seed)
            built["baselines"] = tuple(0.3 * torch.randn((self.m, *x.shape[1:]), generator=g) for x in built["inputs"])
        return built


def captum_attribute(case: RuleCase, built: dict[str, Any]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """The oracle: Captum 0.9.0 on the same request, seeded as docs/ARCHITECTURE.md says (Captum-parity traps)."""
    import captum.attr as ca

    model = ALL_MODELS[case.model]()
    method = {
        "guided_backprop": lambda: ca.GuidedBackprop(model),
        "deconvolution": lambda: ca.Deconvolution(model),
        "deep_lift_shap": lambda: ca.DeepLiftShap(model, **case.params),
    }[case.algorithm]()
    kwargs: dict[str, Any] = {"target": built["captum_target"]}
    if built["args"]:
        kwargs["additional_forward_args"] = built["args"]
    if built["baselines"]:
        kwargs["baselines"] = built["baselines"]
    if case.delta:
        kwargs["return_convergence_delta"] = True
    inputs = tuple(x.clone().requires_grad_() for x in built["inputs"])
    torch.manual_seed(case.seed)
    np.random.seed(case.seed)
    if case.noise_tunnel:
        nt = {k: tuple(v) if isinstance(v, list) else v for k, v in case.noise_tunnel.items()}
        out = ca.NoiseTunnel(method).attribute(inputs, **nt, **kwargs)
    else:
        out = method.attribute(inputs, **kwargs)
    delta = None
    if case.delta:
        out, delta = out
    out = out if isinstance(out, tuple) else (out,)
    return tuple(o.detach() for o in out), (None if delta is None else delta.detach())


def _cases() -> list[RuleCase]:
    cases: list[RuleCase] = []
    for m in ("toy", "mlp", "conv", "multi", "text", "inplace", "residual", "reused"):
        cases += [
            RuleCase(m, "guided_backprop", target="per_example"),
            RuleCase(m, "deconvolution", target="per_example"),
        ]
        if m != "reused":  # DeepLift refuses a module used twice, as Captum does
            cases.append(RuleCase(m, "deep_lift_shap", target="per_example", delta=True, m=2 + len(cases) % 4))
    cases += [
        RuleCase("conv", "deep_lift_shap", {"multiply_by_inputs": False}, m=5, n=4),
        RuleCase("mlp", "deep_lift_shap", {"multiply_by_inputs": False}, target="per_example", m=3, delta=True),
        RuleCase("multi", "deep_lift_shap", baselines="per_example", delta=True),  # m == n == 3
        RuleCase("toy", "deep_lift_shap", baselines="distribution", n=1),
        RuleCase("conv", "guided_backprop", n=1),
        # NoiseTunnel wraps all three (Captum needs m == n, or drawing, for deep_lift_shap)
        RuleCase("conv", "guided_backprop", noise_tunnel={"nt_type": "smoothgrad", "nt_samples": 4, "stdevs": 0.2}, target="per_example", seed=3),
        RuleCase("multi", "deconvolution", noise_tunnel={"nt_type": "vargrad", "nt_samples": 3, "stdevs": [0.1, 0.3]}, seed=5),
        RuleCase("inplace", "guided_backprop", noise_tunnel={"nt_type": "smoothgrad_sq", "nt_samples": 3, "stdevs": 0.5}, seed=8),
        RuleCase("mlp", "deep_lift_shap", noise_tunnel={"nt_type": "smoothgrad", "nt_samples": 2, "stdevs": 0.1}, baselines="per_example", n=2, delta=True, seed=2),
        RuleCase(
            "conv",
            "deep_lift_shap",
            noise_tunnel={"nt_type": "vargrad", "nt_samples": 2, "stdevs": 0.1, "draw_baseline_from_distrib": True},
            m=4,
            n=2,
            target="per_example",
            seed=6,
        ),
        # a 1-row distribution is fine where NoiseTunnel draws n * nt_samples rows from it, as in Captum
        RuleCase("toy", "deep_lift_shap", noise_tunnel={"nt_samples": 2, "stdevs": 0.1, "draw_baseline_from_distrib": True}, m=1, n=2, seed=1),
    ]
    return cases


CASES = _cases()
engine = engine_fixture(ALL_MODELS)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_captum(engine: Engine, case: RuleCase) -> None:
    built = case.build()
    want, want_delta = captum_attribute(case, built)
    got = engine.attribute(job_for(case, built), timeout=60)
    assert_all_close(got.attributions, want)
    if case.delta:
        assert_close(got.convergence_delta, want_delta)
    else:
        assert got.convergence_delta is None


def test_guided_rules_change_the_gradient(engine: Engine) -> None:
    """The hooks are really installed (and removed): three different answers on a ReLU model, plain saliency after."""
    case = RuleCase("inplace", "guided_backprop", target="per_example", n=4)
    built = case.build()
    results = {}
    for algorithm in ("saliency", "guided_backprop", "deconvolution", "saliency"):
        job = job_for(RuleCase("inplace", algorithm, {"abs": False} if algorithm == "saliency" else {}), built)
        results.setdefault(algorithm, []).append(engine.attribute(job, timeout=30).attributions[0])
    assert torch.equal(results["saliency"][0], results["saliency"][1])
    assert not torch.allclose(results["guided_backprop"][0], results["saliency"][0])
    assert not torch.allclose(results["deconvolution"][0], results["guided_backprop"][0])


@pytest.mark.parametrize("rows", [1, 0])
def test_deep_lift_shap_refuses_a_single_baseline(engine: Engine, rows: int) -> None:
    case = RuleCase("conv", "deep_lift_shap", m=rows)  # m=0: no baselines, i.e. one zero baseline
    with pytest.raises(InvalidArgument, match="at least 2 rows"):
        engine.attribute(job_for(case, case.build()), timeout=30)


def test_deep_lift_shap_in_noise_tunnel_refuses_a_single_undrawn_baseline(engine: Engine) -> None:
    case = RuleCase("toy", "deep_lift_shap", noise_tunnel={"nt_samples": 2, "stdevs": 0.1}, m=1)
    with pytest.raises(InvalidArgument, match="at least 2 rows"):
        engine.attribute(job_for(case, case.build()), timeout=30)


def test_deep_lift_shap_stays_listed_where_warm_up_runs() -> None:
    """Warm-up sends no baselines, which DeepLiftShap refuses at validation: not warmed, but still served."""
    from attrserve_engine import InputSpec

    engine = Engine()
    try:
        model = engine.load(ModelSpec(name="conv", module=MODELS["conv"](), inputs=[InputSpec("x", torch.float32, (2, 8, 8))]))
        assert {"deep_lift_shap", "guided_backprop", "deconvolution"} <= set(engine.supported_algorithms(model)), model.unsupported
    finally:
        engine.shutdown()


def test_deep_lift_shap_refuses_unequal_distributions(engine: Engine) -> None:
    case = RuleCase("multi", "deep_lift_shap", m=3)
    built = case.build()
    built["baselines"] = (built["baselines"][0], built["baselines"][1][:2])
    with pytest.raises(InvalidArgument, match="same number of baseline rows"):
        engine.attribute(job_for(case, built), timeout=30)


def test_guided_methods_take_no_baselines_or_delta(engine: Engine) -> None:
    case = RuleCase("conv", "guided_backprop", baselines="row")
    with pytest.raises(InvalidArgument, match="takes no baselines"):
        engine.attribute(job_for(case, case.build()), timeout=30)
    case = RuleCase("conv", "deconvolution", delta=True)
    with pytest.raises(InvalidArgument, match="no convergence delta"):
        engine.attribute(job_for(case, case.build()), timeout=30)


def random_job(model: str, rng: random.Random):
    """Another request for the same model: one of these methods, or DeepLift (it shares DeepLiftShap's passes)."""
    algorithm = rng.choice(["guided_backprop", "deconvolution", "deep_lift_shap", "deep_lift"])
    case = RuleCase(
        model,
        algorithm,
        baselines="row" if algorithm == "deep_lift" else "none",
        target="per_example",
        n=rng.randint(1, 4),
        m=rng.randint(2, 5) if algorithm == "deep_lift_shap" else 0,
        seed=rng.randint(0, 1000),
        delta=algorithm in ("deep_lift_shap", "deep_lift") and rng.random() < 0.5,  # their delta rows fuse too
    )
    return job_for(case, case.build())


# Paired blocks (deep_lift_shap) are never split; guided blocks and delta rows split at 8 rows.
FUSION_CASES = [
    RuleCase("conv", "guided_backprop", target="per_example", n=5),
    RuleCase("conv", "deconvolution", n=3),
    RuleCase("conv", "deep_lift_shap", target="per_example", delta=True, m=4),
    RuleCase("mlp", "deep_lift_shap", {"multiply_by_inputs": False}, target="per_example", delta=True, m=3),
    RuleCase("text", "guided_backprop", target="per_example"),
    RuleCase("multi", "deconvolution", noise_tunnel={"nt_type": "smoothgrad", "nt_samples": 5, "stdevs": 0.2}, target="per_example", seed=4),
]


@pytest.mark.parametrize("max_batch_rows", [4096, 8], ids=["one-pass", "split-passes"])
@pytest.mark.parametrize("case", FUSION_CASES, ids=lambda c: c.id)
def test_fused_equals_alone(engine: Engine, case: RuleCase, max_batch_rows: int) -> None:
    built = case.build()
    alone = engine.attribute(job_for(case, built), timeout=60)
    rng = case_rng(case.id)
    others = [random_job(case.model, rng) for _ in range(15)]
    run = run_fused(partial(make_engine, ALL_MODELS), job_for(case, built), others, max_batch_rows)
    assert_fused_equals_alone(run.fused, alone, case.delta)
    if max_batch_rows < 4096:
        assert_split_passes(run, max_batch_rows)
