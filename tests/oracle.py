"""Tiny deterministic models and the (algorithm × model × params) case table every oracle test runs.

Each case builds the same request for attrserve (an AttributionJob) and for
Captum 0.9.0 (the oracle), so a test only compares numbers.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import random
import time
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pytest
import torch
from torch import nn

if TYPE_CHECKING:
    from attrserve_engine import AttributionJob, AttributionResult, Engine
    from attrserve_engine.scheduler import Scheduler


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


class TokenClassifier(nn.Module):
    """Token ids → nn.Embedding → mean → MLP: the text case layer methods (LayerIntegratedGradients) exist for."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.embedding = nn.Embedding(20, 5, padding_idx=0)
        self.fc = nn.Linear(5, 4)
        self.act = nn.Tanh()
        self.head = nn.Linear(4, 2)

    def forward(self, tokens):
        return self.head(self.act(self.fc(self.embedding(tokens).mean(1))))


# The table's models plus a token-id model, for layer methods.
LAYER_MODELS: dict[str, Callable[[], nn.Module]] = {**MODELS, "tokens": TokenClassifier}


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


def captum_quality(model: nn.Module, method: Any, params: dict, nt: dict | None, inputs: tuple, args: tuple, target: list, seed: int, infid: dict, sens: dict):
    """Captum's attribute, then captum.metrics.infidelity, then sensitivity_max: one sequence seeded with `seed`, in the
    order and with the perturbation the service documents. `method` is the Captum attribution object.
    Returns (attributions, infidelity, sensitivity_max)."""
    from captum.attr import NoiseTunnel
    from captum.metrics import infidelity, sensitivity_max

    kwargs: dict[str, Any] = dict(params, target=target)
    if args:
        kwargs["additional_forward_args"] = args
    explain = NoiseTunnel(method).attribute if nt else method.attribute
    if nt:
        kwargs.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in nt.items()})
    torch.manual_seed(seed)
    np.random.seed(seed)
    attributions = explain(inputs, **kwargs)

    def perturb(xs):  # the service's documented perturbation: noise ~ N(0, scale²), input − noise
        noise = tuple(torch.randn(x.shape) * infid["noise_scale"] for x in xs)
        return noise, tuple(x - e for x, e in zip(xs, noise))

    def perturb_one(x):  # Captum passes a lone tensor for one input
        (noise,), (perturbed,) = perturb((x,))
        return noise, perturbed

    infid_value = infidelity(
        model, perturb if len(inputs) > 1 else perturb_one, inputs, attributions, target=target,
        additional_forward_args=args or None, n_perturb_samples=infid["n_perturb_samples"], normalize=infid.get("normalize", False),
    )
    sens_value = sensitivity_max(explain, inputs, perturb_radius=sens["perturb_radius"], n_perturb_samples=sens["n_perturb_samples"], **kwargs)
    return attributions, infid_value, sens_value


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
        # Captum's memory hints: its passes cut into chunks, the numbers the same (the server cuts its own passes).
        Case("mlp", "integrated_gradients", {"n_steps": 8, "internal_batch_size": 3}, baselines="row", delta=True),
        Case("toy", "integrated_gradients", {"n_steps": 4, "internal_batch_size": 2}, noise_tunnel={"nt_samples": 2, "stdevs": 0.1, "nt_samples_batch_size": 2}, delta=True, seed=8),
        Case("mlp", "saliency", noise_tunnel={"nt_type": "smoothgrad_sq", "nt_samples": 3, "stdevs": 0.2, "nt_samples_batch_size": 7}, seed=3),
    ]
    return cases


CASES = _cases()


# -- scaffolding the engine test modules share ---------------------------------------------------

ATOL = RTOL = 1e-5
FUSED_TOL = 1e-6  # fused with other requests vs alone
# On CUDA, cuBLAS and cuDNN choose kernels by shape, so a row's float32 rounding depends on the size of the pass it
# ran in, and LRP's divisions by small outputs amplify it: on an H200 (bench/RESULTS.md, GPU check) one LRP request
# whose largest attribution was 5.33 differed by 2e-4 fused vs alone (the CPU: under 1e-7). There a fused result is
# compared relative to its largest attribution; rows mixed between requests would be off by far more.
FUSED_TOL_CUDA = 1e-4
ALONE_ROWS = 1 << 20  # an engine that never splits a request: each of its passes is one group of one request's blocks


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


def assert_informative(want: Sequence[torch.Tensor], atol: float = ATOL) -> None:
    """The expected attributions are not (within `atol`) all zeros, so an answer of zeros would fail the comparison:
    a case whose oracle answers zeros checks nothing and must be changed (another target, input or baseline)."""
    biggest = max((float(w.abs().max()) for w in want if w.numel()), default=0.0)
    assert biggest > atol, f"the expected attributions are all within {atol:g} of zero (largest {biggest:.3g}): the case cannot tell a right answer from zeros"


def assert_close(got: torch.Tensor, want: torch.Tensor, atol: float = ATOL, rtol: float = RTOL, check_dtype: bool = True) -> None:
    """Same shape and dtype (the engine answers float32 for float32 models, as Captum does), then torch.allclose with the
    largest difference in the message. check_dtype=False only where the reference is computed in another precision."""
    assert got.shape == want.shape, (got.shape, want.shape)
    if check_dtype:
        assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert torch.allclose(got, want.to(got.dtype), atol=atol, rtol=rtol), f"max abs diff {(got - want.to(got.dtype)).abs().max():.3g}"


def assert_all_close(
    got: Sequence[torch.Tensor],
    want: Sequence[torch.Tensor],
    atol: float = ATOL,
    rtol: float = RTOL,
    check_dtype: bool = True,
    informative: bool = True,
) -> None:
    """As many tensors as wanted, each assert_close to its counterpart; attributions, so (unless informative=False,
    for a case that asserts an answer of exact zeros) the wanted ones must not be all zeros (assert_informative)."""
    assert len(got) == len(want), (len(got), len(want))
    if informative:
        assert_informative(want, atol)
    for g, w in zip(got, want):
        assert_close(g, w, atol, rtol, check_dtype)


def assert_metric_close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-4, resolution: float = 1e-6) -> None:
    """A quality metric (infidelity, sensitivity_max) within `rtol` of Captum's, or within what float32 resolves of it:
    infidelities of these small models are 1e-7..1e-4, where any absolute tolerance of ATOL's size would let zeros pass.

    NOTE: infidelity is a mean of squared residuals (a dot product minus an output difference, each of order 1, that
    nearly cancel), so a residual r is known to about `resolution` and its square to 2 * |r| * resolution: on a nearly
    linear model (infidelity 6e-8, |r| ~ 2.4e-4) that is ~5e-4 relative, and CPUs whose kernels round differently
    (AVX-512 against AVX2) disagree by that much. Zero still fails: its distance is the whole value."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype, want.dtype)
    assert bool((want.abs() > 0).all()), want
    allowed = torch.maximum(rtol * want.abs(), 2 * want.abs().sqrt() * resolution)
    assert bool(((got - want).abs() <= allowed).all()), f"{got} vs {want}: max relative diff {((got - want).abs() / want.abs()).max():.3g}"


def assert_served_close(got: Any, want: Any, atol: float = ATOL, rtol: float = RTOL, informative: bool = True) -> None:
    """A served answer (the client's numpy array, or tuple of them) against the oracle's tensor(s): assert_all_close,
    so float32 and not all zeros where wanted too. informative=False for a convergence delta (about zero by design)."""
    got = got if isinstance(got, tuple) else (got,)
    want = tuple(want) if isinstance(want, (tuple, list)) else (want,)
    assert_all_close(tuple(torch.from_numpy(np.asarray(g)) for g in got), tuple(w.detach() for w in want), atol, rtol, informative=informative)


def case_rng(case_id: str) -> random.Random:
    """The random source for a case's other requests: fixed by its id."""
    return random.Random(zlib.crc32(case_id.encode()))


@contextlib.contextmanager
def passes_of(engine: Engine) -> Iterator[list]:
    """Within the block, the PassStats of every pass `engine` runs, in order (a load's warm-up passes too)."""
    from attrserve_engine.scheduler import EngineObserver

    passes: list = []

    class PassLog(EngineObserver):  # the engine's other news: EngineObserver's no-ops
        def pass_executed(self, stats) -> None:  # on the worker thread
            passes.append(stats)

    log = PassLog()
    engine.observers.append(log)
    try:
        yield passes
    finally:
        engine.observers.remove(log)


def submit_held(engine: Engine, jobs: Sequence[AttributionJob]) -> list[concurrent.futures.Future]:
    """Submit `jobs` in this order under `engine.held()`: every first block is queued, in this order, before the first
    pass is cut. With max_queue_delay 0 every later cut is determined too, so pass counts are exact, not timing."""
    base = engine.in_flight()
    with engine.held():
        futures = [engine.submit(j) for j in jobs]
        assert engine.in_flight() == base + len(jobs)  # Engine.submit queues synchronously
    return futures


def wait_in_flight(engine: Engine | Scheduler, count: int, timeout: float = 30.0) -> None:
    """Until exactly `count` requests are in `engine` (accepted, not yet answered or dropped; a request its caller
    cancelled stays until a worker's next pass boundary drops it, after its future is done). Fails after `timeout` s."""
    until = time.monotonic() + timeout
    while engine.in_flight() != count:
        assert time.monotonic() < until, f"{engine.in_flight()} requests in flight, expected {count}"
        time.sleep(0.002)


@dataclass
class FusedRun:
    fused: AttributionResult  # the job's result, fused with the others
    alone: AttributionResult  # the job alone on an engine that never splits it
    results: list  # every request's fused result, in submission order (others[:before], job, others[before:])
    alones: list  # the same requests, each alone
    passes: list  # PassStats of every pass of the fused run
    split: list  # per request (as `results`): took more passes fused than alone, i.e. some group of it was split
    groups: list  # per request: (pass kind, rows) of each group of its blocks, from its passes alone
    index: int  # the job's position in `results`

    @property
    def job_split(self) -> bool:
        return self.split[self.index]

    def job_must_split(self, max_batch_rows: int) -> bool:
        """The job has a group of splittable rows (not DeepLift's pairs) bigger than a pass of `max_batch_rows`."""
        return any(kind != "deeplift" and rows > max_batch_rows for kind, rows in self.groups[self.index])


def run_fused(
    make: Callable[..., Engine],
    job: AttributionJob,
    others: Sequence[AttributionJob],
    max_batch_rows: int,
    *,
    before: int = 8,
) -> FusedRun:
    """`job` fused with `others` on a fresh engine with `max_batch_rows` rows a pass, each request also run alone; checks
    every request and the passes, and returns the runs for the caller's comparison of `job`.

    Alone: each request by itself on a fresh engine whose passes never split anything, so each of a request's
    passes there is one group of its blocks (one stage, one batch key) and `timing.passes` counts its groups.
    Fused: submitted under `held()` (others[:before], job, others[before:]) with no wait for company, so every cut
    is determined by the rows. Checked here:
    - every other request's result equals itself alone (FUSED_TOL; its delta where it asked for one);
    - the accounting: the passes ran exactly the rows the requests ran alone, each pass within max_batch_rows (or one
      DeepLift pair block, which is never split, alone), and each request's timing adds up to the passes;
    - the job shared a pass with another request;
    - splitting, for every request: at least ceil(rows / max_batch_rows) and at most one more passes per group of
      splittable rows, exactly one per group of DeepLift pairs (never split), so a request with a group over
      max_batch_rows rows was split (more passes than alone); where all the rows of the run fit in one pass nothing
      may be split (as many passes as alone, for every request).
    """
    jobs = [*others[:before], job, *others[before:]]
    alone_engine = make(default_max_queue_delay_us=0, default_max_batch_rows=ALONE_ROWS)
    try:
        alones, groups = [], []
        for j in jobs:
            with passes_of(alone_engine) as passes:
                alones.append(alone_engine.attribute(j, timeout=60))
            groups.append([(p.kind, p.rows) for p in passes])
            assert len(passes) == alones[-1].timing.passes and all(p.requests == 1 for p in passes)
    finally:
        alone_engine.shutdown()
    engine = make(default_max_queue_delay_us=0, default_max_batch_rows=max_batch_rows)
    try:
        assert engine.passes == 0
        with passes_of(engine) as passes:
            futures = submit_held(engine, jobs)
            results = [f.result(timeout=60) for f in futures]
    finally:
        engine.shutdown()
    fused, alone = results[before], alones[before]

    for j, got, want in zip(jobs, results, alones):
        assert_fused_equals_alone(got, want, j.return_convergence_delta)
    # Accounting: the fused passes ran exactly the rows the requests ran alone, within the budget, and each request's
    # timing adds up (`timing.rows`: the rows its passes ran, fused or alone).
    assert [r.timing.rows for r in results] == [a.timing.rows for a in alones]
    assert sum(p.rows for p in passes) == engine.rows == sum(rows for g in groups for _, rows in g)
    assert len(passes) == engine.passes
    assert sum(p.requests for p in passes) == sum(r.timing.passes for r in results)
    assert sum(p.rows * p.requests for p in passes) == sum(r.timing.pass_rows for r in results)
    assert max(p.requests for p in passes) == max(r.timing.pass_requests for r in results)
    oversized = [p for p in passes if p.rows > max_batch_rows]
    assert all(p.kind == "deeplift" and p.requests == 1 for p in oversized), oversized
    assert fused.timing.pass_requests > 1, "the request never shared a pass with another"

    def least_passes(request_groups: list[tuple[str, int]]) -> int:
        # DeepLift's pair blocks are never split: one pass per such group, whatever its size.
        return sum(1 if kind == "deeplift" else math.ceil(rows / max_batch_rows) for kind, rows in request_groups)

    def most_passes(request_groups: list[tuple[str, int]]) -> int:
        # A group's rows are queued together, so full passes cut them, with at most one partial pass at each end.
        return sum(1 if kind == "deeplift" else math.ceil(rows / max_batch_rows) + 1 for kind, rows in request_groups)

    split = [r.timing.passes > a.timing.passes for r, a in zip(results, alones)]  # took more passes than its groups
    for r, a, g, was_split in zip(results, alones, groups, split):
        assert max(least_passes(g), a.timing.passes) <= r.timing.passes <= most_passes(g), (r.timing.passes, a.timing.passes, g)
        if least_passes(g) > len(g):  # a group of splittable rows bigger than a pass
            assert was_split, f"a request with a group over {max_batch_rows} rows was never split: {g}"
    if engine.rows <= max_batch_rows:  # every row of the run fits in one pass: nothing may be split
        assert not any(split), [(r.timing.passes, a.timing.passes) for r, a in zip(results, alones)]
    return FusedRun(fused, alone, results, alones, list(passes), split, groups, before)


def assert_split_passes(run: FusedRun, max_batch_rows: int) -> None:
    """The split-passes variants (a small max_batch_rows): splitting is the point. A job with a group of splittable
    rows over max_batch_rows was cut into more passes than it has groups; a job without one (DeepLift's pair blocks
    are never split; small groups) is not forced to split, but some request of the run must have been, or the
    variant tests no splitting at all."""
    if run.job_must_split(max_batch_rows):
        assert run.fused.timing.passes > run.alone.timing.passes, (run.fused.timing.passes, run.groups[run.index])
    assert any(run.split), "no request of the run was split across passes"


def assert_fused_equals_alone(fused: AttributionResult, alone: AttributionResult, delta: bool, check_dtype: bool = True) -> None:
    """The fused result's attributions (and delta, where asked for) within FUSED_TOL of the result alone, same dtype
    (with the engine's default device on CUDA: within FUSED_TOL_CUDA of the largest attribution)."""
    atol = rtol = FUSED_TOL
    if torch.cuda.is_available():
        rtol = FUSED_TOL_CUDA
        atol = FUSED_TOL_CUDA * max([float(a.abs().max()) for a in alone.attributions if a.numel()] + [1.0])
    assert_all_close(fused.attributions, alone.attributions, atol, rtol, check_dtype, informative=False)
    if delta:
        assert_close(fused.convergence_delta, alone.convergence_delta, atol, rtol, check_dtype)
    else:
        assert fused.convergence_delta is None and alone.convergence_delta is None
