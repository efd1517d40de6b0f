"""What a caller hands the engine (AttributionJob) and what it gets back (AttributionResult)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic

from typing_extensions import TypeVar

if TYPE_CHECKING:
    from torch import Tensor

    from attrserve_engine.targets import TargetLike

# What a job's and a result's tensors are: torch tensors in the engine (the default), numpy arrays in the service's
# front end, whose request path does not use torch. The frames between its two processes turn one into the other.
# This module imports no torch, so that the front end's does not.
A = TypeVar("A", default="Tensor")


@dataclass
class AlgorithmSpec:
    """One more algorithm to run on a job's inputs (several algorithms in one request; proto AlgorithmSpec)."""

    algorithm: str
    params: dict[str, Any] = field(default_factory=dict)
    noise_tunnel: dict[str, Any] | None = None
    layer: str = ""
    return_convergence_delta: bool = False


@dataclass
class AttributionJob(Generic[A]):
    """One attribution request, already decoded into torch tensors (on CPU).

    Built by the service edge (or a test) and passed to `Engine.submit`.
    """

    model: str
    algorithm: str  # Captum's class name in snake_case, e.g. "integrated_gradients"
    inputs: tuple[A, ...]  # each (n_examples, *feature_shape)
    # One per input: None (zeros), a Python number, or a tensor broadcastable to
    # the input (GradientShap: a baseline distribution along dim 0).
    baselines: tuple[A | float | None, ...] = ()
    # Captum's forms (None, an int, an index tuple, or one per example) or an (n_examples, k) int64 tensor:
    # k indices per example into the output after dim 0 (attrserve_engine.targets).
    target: TargetLike = None
    additional_forward_args: tuple[A, ...] = ()  # each (n_examples, ...)
    params: dict[str, Any] = field(default_factory=dict)  # Captum's parameter names
    noise_tunnel: dict[str, Any] | None = None  # nt_type, nt_samples, stdevs, draw_baseline_from_distrib
    layer: str = ""
    feature_masks: tuple[A, ...] = ()
    return_convergence_delta: bool = False
    return_outputs: bool = False
    seed: int | None = None
    model_version: str = ""
    request_id: str = ""
    deadline: float | None = None  # time.monotonic() after which the job is dropped
    # More algorithms on the same inputs, baselines, target and masks; their rows share passes.
    also: tuple[AlgorithmSpec, ...] = ()
    # Quality metrics of the attributions: {"infidelity": {...}, "sensitivity_max": {...}} (Captum names).
    evaluate: dict[str, Any] | None = None
    # "interactive" (default): a caller waits, its rows go first; "batch": a back-fill, never starved.
    priority: str = "interactive"
    arrival: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class InputCast:
    """A request input computed in the model's pinned dtype instead of the one it was sent in (the dtypes' names, such
    as "float64": a result carries nothing that needs torch to read)."""

    input: int
    sent: str
    used: str


@dataclass
class JobTiming:
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    total_ms: float = 0.0
    rows: int = 0
    passes: int = 0
    pass_rows: int = 0
    pass_requests: int = 0


@dataclass
class AlgorithmResult(Generic[A]):
    """The result of one AlgorithmSpec of a job (proto AlgorithmResult; the client's AlgorithmResult)."""

    algorithm: str
    attributions: tuple[A, ...]
    convergence_delta: A | None


@dataclass
class AttributionResult(Generic[A]):
    attributions: tuple[A, ...]  # one per input, shaped like it, on CPU (a layer method's: its layer's tensors)
    convergence_delta: A | None
    outputs: A | None  # the explained model output for the inputs
    model_version: str
    seed: int
    timing: JobTiming
    request_id: str = ""
    also: tuple[AlgorithmResult[A], ...] = ()  # one per AttributionJob.also, in order
    infidelity: A | None = None  # (n,), when asked for in evaluate
    sensitivity_max: A | None = None  # (n,)
    input_casts: tuple[InputCast, ...] = ()  # inputs computed in the model's pinned dtype, not the one sent
    layer_shaped: bool = False  # the attributions are a layer's (a layer method's), not one per input
