"""Tiny deterministic models and the (algorithm × model × params) case table every oracle test runs.

Each case builds the same request for attrserve (an AttributionJob) and for
Captum 0.9.0 (the oracle), so a test only compares numbers.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import pytest
import torch
from torch import nn

if TYPE_CHECKING:
    from attrserve_engine import AttributionJob, AttributionResult, Engine


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


class ToyModel(nn.Module):
    """Captum's overview ToyModel."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(3, 3)
        self.relu = nn.ReLU()
        self.lin2 = nn.Linear(3, 2)
        with torch.no_grad():
            self.lin1.weight.copy_(torch.arange(-4.0, 5.0).view(3, 3))
            self.lin1.bias.zero_()
            self.lin2.weight.copy_(torch.arange(-3.0, 3.0).view(2, 3))
            self.lin2.bias.fill_(1.0)

    def forward(self, x):
        return self.lin2(self.relu(self.lin1(x)))


class SoftmaxMLP(nn.Module):
    """Linear layers with ELU, Sigmoid and a Softmax head (DeepLift's softmax rule)."""

    def __init__(self) -> None:
        super().__init__()
        _seeded(1)
        self.fc1 = nn.Linear(6, 8)
        self.act1 = nn.ELU()
        self.fc2 = nn.Linear(8, 8)
        self.act2 = nn.Sigmoid()
        self.fc3 = nn.Linear(8, 3)
        self.softmax = nn.Softmax(dim=1)

    def forward(self, x):
        return self.softmax(self.fc3(self.act2(self.fc2(self.act1(self.fc1(x))))))


class ConvNet(nn.Module):
    """Conv → ReLU → MaxPool → conv → LeakyReLU → linear, on 2×8×8 images."""

    def __init__(self) -> None:
        super().__init__()
        _seeded(2)
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu2 = nn.LeakyReLU(0.1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(self.flatten(self.relu2(self.conv2(self.pool(self.relu1(self.conv1(x)))))))


class MultiInput(nn.Module):
    """Two inputs (4 and 3 features) merged after their own nonlinearities."""

    def __init__(self) -> None:
        super().__init__()
        _seeded(3)
        self.a = nn.Linear(4, 5)
        self.a_act = nn.ReLU()
        self.b = nn.Linear(3, 5)
        self.b_act = nn.Softplus()
        self.head = nn.Linear(10, 2)

    def forward(self, x1, x2):
        return self.head(torch.cat([self.a_act(self.a(x1)), self.b_act(self.b(x2))], dim=1))


class EmbeddedText(nn.Module):
    """A text classifier on token embeddings (B, T, D) with a padding mask as additional forward arg."""

    def __init__(self) -> None:
        super().__init__()
        _seeded(4)
        self.proj = nn.Linear(6, 6)
        self.act = nn.Tanh()
        self.head = nn.Linear(6, 2)

    def forward(self, embeddings, mask):
        h = self.act(self.proj(embeddings))  # (B, T, D)
        pooled = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)  # (B, D)
        return self.head(pooled)


class GridOutput(nn.Module):
    """Output (B, 2, 3): targets are index tuples."""

    def __init__(self) -> None:
        super().__init__()
        _seeded(5)
        self.fc = nn.Linear(5, 6)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.fc(x)).view(-1, 2, 3) * 2.0


MODELS: dict[str, Callable[[], nn.Module]] = {
    "toy": ToyModel,
    "mlp": SoftmaxMLP,
    "conv": ConvNet,
    "multi": MultiInput,
    "text": EmbeddedText,
    "grid": GridOutput,
}


def example_inputs(model: str, n: int, seed: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """(inputs, additional_forward_args) for `n` examples of a model."""
    g = torch.Generator().manual_seed(seed)
    if model == "toy":
        return (torch.rand(n, 3, generator=g),), ()
    if model == "mlp":
        return (torch.randn(n, 6, generator=g),), ()
    if model == "conv":
        return (torch.randn(n, 2, 8, 8, generator=g),), ()
    if model == "multi":
        return (torch.randn(n, 4, generator=g), torch.randn(n, 3, generator=g)), ()
    if model == "text":
        mask = (torch.rand(n, 5, generator=g) > 0.3).float()
        mask[:, 0] = 1.0
        return (torch.randn(n, 5, 6, generator=g),), (mask,)
    if model == "grid":
        return (torch.randn(n, 5, generator=g),), ()
    raise KeyError(model)


N_CLASSES = {"toy": 2, "mlp": 3, "conv": 3, "multi": 2, "text": 2}


@dataclass
class Case:
    model: str
    algorithm: str
    params: dict[str, Any] = field(default_factory=dict)
    noise_tunnel: dict[str, Any] | None = None
    baselines: str = "none"  # none | scalar | row | per_example | distribution
    target: str = "index"  # index | per_example | tuple
    delta: bool = False
    n: int = 3
    seed: int = 0

    @property
    def id(self) -> str:
        bits = [self.model, self.algorithm]
        bits += [f"{k}={v}" for k, v in self.params.items()]
        if self.noise_tunnel:
            bits.append("nt=" + ",".join(f"{k}={v}" for k, v in self.noise_tunnel.items()))
        bits += [f"b={self.baselines}", f"t={self.target}"] + (["delta"] if self.delta else [])
        return "-".join(bits)

    def build(self) -> dict[str, Any]:
        """Inputs, baselines, target and args as both sides take them."""
        inputs, args = example_inputs(self.model, self.n, seed=100 + self.seed)
        g = torch.Generator().manual_seed(200 + self.seed)
        if self.baselines == "none":
            baselines: tuple = ()
        elif self.baselines == "scalar":
            baselines = tuple(0.25 for _ in inputs)
        elif self.baselines == "row":
            baselines = tuple(0.1 * torch.randn((1, *x.shape[1:]), generator=g) for x in inputs)
        elif self.baselines == "per_example":
            baselines = tuple(0.1 * torch.randn(x.shape, generator=g) for x in inputs)
        elif self.baselines == "distribution":
            baselines = tuple(0.1 * torch.randn((4, *x.shape[1:]), generator=g) for x in inputs)
        else:
            raise KeyError(self.baselines)
        if self.model == "grid":
            target_rows = [(1, 2)] * self.n if self.target == "tuple" else [(i % 2, (i + 1) % 3) for i in range(self.n)]
            captum_target: Any = (1, 2) if self.target == "tuple" else target_rows
        elif self.target == "per_example":
            target_rows = [(i % N_CLASSES[self.model],) for i in range(self.n)]
            captum_target = [t[0] for t in target_rows]
        else:
            target_rows = [(1,)] * self.n
            captum_target = 1
        return {
            "inputs": inputs,
            "args": args,
            "baselines": baselines,
            "target": torch.tensor(target_rows, dtype=torch.int64),
            "captum_target": captum_target,
        }


def captum_attribute(case: Case, model: nn.Module, built: dict[str, Any]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """The oracle: Captum 0.9.0 on the same request, seeded as docs/ARCHITECTURE.md says (Captum-parity traps)."""
    import captum.attr as ca

    cls = {
        "integrated_gradients": ca.IntegratedGradients,
        "saliency": ca.Saliency,
        "input_x_gradient": ca.InputXGradient,
        "deep_lift": ca.DeepLift,
        "gradient_shap": ca.GradientShap,
    }[case.algorithm]
    ctor = {k: v for k, v in case.params.items() if k == "multiply_by_inputs" or (k == "eps" and case.algorithm == "deep_lift")}
    call = {k: v for k, v in case.params.items() if k not in ctor}
    if "stdevs" in call and isinstance(call["stdevs"], list):
        call["stdevs"] = tuple(call["stdevs"])
    method = cls(model, **ctor)
    kwargs: dict[str, Any] = dict(call)
    kwargs["target"] = built["captum_target"]
    if built["args"]:
        kwargs["additional_forward_args"] = built["args"]
    if built["baselines"]:
        kwargs["baselines"] = built["baselines"]
    elif case.algorithm == "gradient_shap":
        kwargs["baselines"] = tuple(torch.zeros((1, *x.shape[1:])) for x in built["inputs"])
    if case.delta:
        kwargs["return_convergence_delta"] = True
    inputs = tuple(x.clone().requires_grad_() for x in built["inputs"])
    torch.manual_seed(case.seed)
    np.random.seed(case.seed)
    if case.noise_tunnel:
        nt = dict(case.noise_tunnel)
        if isinstance(nt.get("stdevs"), list):
            nt["stdevs"] = tuple(nt["stdevs"])
        out = ca.NoiseTunnel(method).attribute(inputs, **nt, **kwargs)
    else:
        out = method.attribute(inputs, **kwargs)
    delta = None
    if case.delta:
        out, delta = out
    out = out if isinstance(out, tuple) else (out,)
    return tuple(o.detach() for o in out), (None if delta is None else delta.detach())


def job_for(case: Case, built: dict[str, Any]):
    from attrserve_engine import AttributionJob

    return AttributionJob(
        model=case.model,
        algorithm=case.algorithm,
        inputs=built["inputs"],
        baselines=built["baselines"],
        target=built["target"],
        additional_forward_args=built["args"],
        params=dict(case.params),
        noise_tunnel=case.noise_tunnel,
        return_convergence_delta=case.delta,
        seed=case.seed,
    )


def _cases() -> list[Case]:
    cases: list[Case] = []
    main_models = ["toy", "mlp", "conv", "multi", "text"]
    for m in main_models:
        cases += [
            Case(m, "integrated_gradients", delta=True),
            Case(m, "integrated_gradients", {"n_steps": 20, "method": "riemann_trapezoid"}, baselines="row", target="per_example", delta=True),
            Case(m, "saliency"),
            Case(m, "saliency", {"abs": False}, target="per_example"),
            Case(m, "input_x_gradient", target="per_example"),
            Case(m, "deep_lift", delta=True),
            Case(m, "deep_lift", {"multiply_by_inputs": False}, baselines="per_example", target="per_example"),
            Case(m, "gradient_shap", {"n_samples": 6, "stdevs": 0.1}, baselines="distribution", delta=True, seed=7),
            Case(m, "saliency", noise_tunnel={"nt_type": "smoothgrad", "nt_samples": 4, "stdevs": 0.2}, seed=3),
        ]
    for method in ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"):
        cases.append(Case("mlp", "integrated_gradients", {"n_steps": 7, "method": method}, baselines="scalar", delta=True))
    cases += [
        Case("toy", "integrated_gradients", {"multiply_by_inputs": False}, baselines="per_example"),
        Case("conv", "integrated_gradients", {"n_steps": 16}, noise_tunnel={"nt_type": "vargrad", "nt_samples": 3, "stdevs": 0.1}, delta=True, seed=11),
        Case("multi", "integrated_gradients", {"n_steps": 8}, noise_tunnel={"nt_type": "smoothgrad_sq", "nt_samples": 3, "stdevs": [0.1, 0.3]}, baselines="per_example", seed=5),
        Case("mlp", "deep_lift", noise_tunnel={"nt_type": "smoothgrad", "nt_samples": 3, "stdevs": 0.5}, baselines="row", delta=True, seed=2),
        Case("conv", "deep_lift", {"eps": 1e-6}, baselines="scalar", n=5),
        Case("multi", "input_x_gradient", noise_tunnel={"nt_type": "vargrad", "nt_samples": 5, "stdevs": 0.3}, seed=9),
        Case("toy", "integrated_gradients", noise_tunnel={"nt_type": "smoothgrad", "nt_samples": 4, "stdevs": 0.1, "draw_baseline_from_distrib": True}, baselines="distribution", seed=4),
        Case("multi", "gradient_shap", {"n_samples": 3, "stdevs": [0.0, 0.2], "multiply_by_inputs": False}, baselines="distribution", delta=True, seed=13),
        Case("mlp", "gradient_shap", noise_tunnel={"nt_type": "smoothgrad", "nt_samples": 2, "stdevs": 0.1, "draw_baseline_from_distrib": True}, baselines="distribution", seed=21),
        Case("grid", "integrated_gradients", target="tuple", delta=True),
        Case("grid", "saliency", target="per_example"),
        Case("grid", "deep_lift", target="per_example", delta=True),
        Case("toy", "saliency", n=1),
    ]
    return cases


CASES = _cases()


# -- scaffolding the engine test modules share ---------------------------------------------------

ATOL = RTOL = 1e-5
FUSED_TOL = 1e-6  # fused with other requests vs alone


def make_engine(models: Mapping[str, Callable[[], nn.Module]], **limits) -> Engine:
    """An engine with `EngineLimits(**limits)` serving a fresh instance of each model under its name."""
    from attrserve_engine import Engine, EngineLimits, ModelSpec

    engine = Engine(EngineLimits(**limits))
    for name, build in models.items():
        engine.load(ModelSpec(name=name, module=build()))
    return engine


def engine_fixture(models: Mapping[str, Callable[[], nn.Module]]):
    """A module-scoped `engine` fixture over make_engine(models); bind it as `engine = engine_fixture(...)`."""

    @pytest.fixture(scope="module")
    def engine():
        e = make_engine(models)
        yield e
        e.shutdown()

    return engine


def assert_close(got: torch.Tensor, want: torch.Tensor, atol: float = ATOL, rtol: float = RTOL, check_dtype: bool = False) -> None:
    """Same shape (and, with check_dtype, the same dtype), then torch.allclose with the largest difference in the message."""
    assert got.shape == want.shape, (got.shape, want.shape)
    if check_dtype:
        assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert torch.allclose(got, want.to(got.dtype), atol=atol, rtol=rtol), f"max abs diff {(got - want).abs().max():.3g}"


def assert_all_close(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor], atol: float = ATOL, rtol: float = RTOL, check_dtype: bool = False) -> None:
    """As many tensors as wanted, each assert_close to its counterpart."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert_close(g, w, atol, rtol, check_dtype)


def case_rng(case_id: str) -> random.Random:
    """The random source for a case's other requests: fixed by its id."""
    return random.Random(zlib.crc32(case_id.encode()))


def run_fused(
    make: Callable[..., Engine],
    job: AttributionJob,
    others: Sequence[AttributionJob],
    max_batch_rows: int,
    *,
    delay_us: int = 200_000,
    before: int = 8,
) -> AttributionResult:
    """`job` on a fresh engine that waits `delay_us` for company: submitted after `others[:before]` and before the rest.

    Waits for every request, shuts the engine down, checks the job really shared a pass, and returns its result.
    """
    engine = make(default_max_queue_delay_us=delay_us, default_max_batch_rows=max_batch_rows)
    try:
        futures = [engine.submit(j) for j in others[:before]]
        mine = engine.submit(job)
        futures += [engine.submit(j) for j in others[before:]]
        fused = mine.result(timeout=60)
        for f in futures:
            f.result(timeout=60)
    finally:
        engine.shutdown()
    assert fused.timing.pass_requests > 1, "the request was never fused with another"
    return fused


def assert_fused_equals_alone(fused: AttributionResult, alone: AttributionResult, delta: bool, check_dtype: bool = False) -> None:
    """The fused result's attributions (and delta, where asked for) within FUSED_TOL of the result alone."""
    assert_all_close(fused.attributions, alone.attributions, FUSED_TOL, FUSED_TOL, check_dtype)
    if delta:
        assert_close(fused.convergence_delta, alone.convergence_delta, FUSED_TOL, FUSED_TOL, check_dtype)
