"""Attribution quality in the same request: Captum's infidelity and sensitivity_max as plans that follow the attribution.

Both draw from the request's own generators after the attribution, in
Captum's order (infidelity's noise, then sensitivity_max's explanation at the
inputs, its perturbations and its explanations of them), so a seeded request
reproduces `captum.metrics` run after the attribution with the same seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor

from attrserve_engine.algorithms.base import Limits, check_positive, parse_dataclass
from attrserve_engine.errors import InvalidArgument
from attrserve_engine.plan import Attribution, Block, BlockResult, PassKind, Plan, PlanOf, Task, concurrently, interleave_rows

# uniform_(-radius, radius) draws in float32 and refuses a range (2 × radius) past float32's largest number.
MAX_PERTURB_RADIUS = float(np.finfo(np.float32).max) / 2


@dataclass(frozen=True)
class InfidelityParams:
    n_perturb_samples: int = 10
    noise_scale: float = 0.003
    normalize: bool = False


@dataclass(frozen=True)
class SensitivityMaxParams:
    perturb_radius: float = 0.02
    n_perturb_samples: int = 10


@dataclass(frozen=True)
class EvaluateParams:
    infidelity: InfidelityParams | None = None
    sensitivity_max: SensitivityMaxParams | None = None


def parse_evaluate(raw: dict[str, Any], limits: Limits, input_dtypes: Sequence[torch.dtype]) -> EvaluateParams:
    unknown = sorted(set(raw) - {"infidelity", "sensitivity_max"})
    if unknown:
        raise InvalidArgument(f"evaluate: unknown metric(s) {', '.join(unknown)}; valid: infidelity, sensitivity_max")
    # Both add real-valued noise to every input: token ids (or flags) cannot take it. Captum fails on them too; the
    # noise cast to an integer dtype would be all but zero (a meaningless infidelity of 0).
    asked = [name for name in ("infidelity", "sensitivity_max") if raw.get(name) is not None]
    integer = next(((i, dtype) for i, dtype in enumerate(input_dtypes) if not dtype.is_floating_point), None)
    if asked and integer is not None:
        i, dtype = integer
        raise InvalidArgument(
            f"evaluate.{asked[0]} adds random noise to the inputs, so they must be floating point; "
            f"inputs[{i}] has dtype {str(dtype).replace('torch.', '')}"
        )
    infidelity = sensitivity = None
    if raw.get("infidelity") is not None:
        infidelity = parse_dataclass(InfidelityParams, raw["infidelity"], "evaluate.infidelity")
        check_positive(infidelity.n_perturb_samples, "evaluate.infidelity.n_perturb_samples", limits.max_nt_samples)
        # the noise's standard deviation: 0 is no noise (infidelity 0, as Captum computes it)
        if not (math.isfinite(infidelity.noise_scale) and infidelity.noise_scale >= 0):
            raise InvalidArgument(f"evaluate.infidelity.noise_scale must be a finite number >= 0, got {infidelity.noise_scale}")
    if raw.get("sensitivity_max") is not None:
        sensitivity = parse_dataclass(SensitivityMaxParams, raw["sensitivity_max"], "evaluate.sensitivity_max")
        check_positive(sensitivity.n_perturb_samples, "evaluate.sensitivity_max.n_perturb_samples", limits.max_nt_samples)
        # Captum's uniform_(-radius, radius) refuses a negative radius (and torch an infinite one); 0 perturbs nothing
        if not (math.isfinite(sensitivity.perturb_radius) and sensitivity.perturb_radius >= 0):
            raise InvalidArgument(f"evaluate.sensitivity_max.perturb_radius must be a finite number >= 0, got {sensitivity.perturb_radius}")
        if sensitivity.perturb_radius > MAX_PERTURB_RADIUS:  # torch's uniform_ would raise RuntimeError: an INTERNAL error
            raise InvalidArgument(
                f"evaluate.sensitivity_max.perturb_radius is {sensitivity.perturb_radius}, over {MAX_PERTURB_RADIUS:.6g}: "
                "the noise is drawn in float32, whose range must hold 2 × the radius"
            )
    return EvaluateParams(infidelity, sensitivity)


def _safe_div(num: Tensor, denom: Tensor) -> Tensor:
    return num / torch.where(denom != 0, denom, torch.ones_like(denom))


def infidelity_plan(task: Task, attributions: tuple[Tensor, ...], p: InfidelityParams) -> PlanOf[Tensor]:
    """E[(attributions · noise − (f(x) − f(x − noise)))²] over n_perturb_samples noise draws per example."""
    n, k = task.n, p.n_perturb_samples
    expanded = tuple(interleave_rows(x, k) for x in task.inputs)  # (n * k, *shape)
    noise = tuple((torch.randn(x.shape, generator=task.rng.torch_gen) * p.noise_scale).to(x.device, x.dtype) for x in expanded)
    perturbed = tuple(x - e for x, e in zip(expanded, noise))
    # rows: [perturbed inputs (n * k); inputs (n)]
    result: BlockResult = yield Block(
        kind=PassKind.FORWARD,
        inputs=tuple(torch.cat([q, x]) for q, x in zip(perturbed, task.inputs)),
        args=tuple(torch.cat([interleave_rows(a, k), a]) for a in task.args),
        target=torch.cat([interleave_rows(task.target, k), task.target]),
    )
    assert result.selected is not None  # a FORWARD block selects each row's target
    perturbed_out, out = result.selected[: n * k], result.selected[n * k :]
    fwd_diffs = (interleave_rows(out, k) - perturbed_out).view(n, -1)  # (n, k)
    dots = sum(torch.sum((interleave_rows(a, k) * e).view(n * k, -1), dim=1) for a, e in zip(attributions, noise))  # (n * k,)
    attr_dot_noise = cast(Tensor, dots).view(n, -1)  # (n, k)
    if p.normalize:
        a0 = attr_dot_noise.pow(2).sum(-1)
        a1 = (attr_dot_noise * fwd_diffs).sum(-1)
        a2 = fwd_diffs.pow(2).sum(-1)
        beta = _safe_div(a1, a0)
        values = beta * beta * a0 - 2 * beta * a1 + a2
    else:
        values = (attr_dot_noise - fwd_diffs).pow(2).sum(-1)
    return values / k


def sensitivity_max_plan(
    explain: Callable[[Task], Plan], task: Task, attributions: tuple[Tensor, ...], rerun: bool, p: SensitivityMaxParams
) -> PlanOf[Tensor]:
    """max over perturbations of ‖expl(x) − expl(x + δ)‖ / ‖expl(x)‖, δ uniform in [−radius, radius]."""
    n, k = task.n, p.n_perturb_samples
    if rerun:  # Captum explains the inputs again; a method that draws must draw again (its delta is not needed)
        attributions = (yield from explain(task.replace(return_convergence_delta=False))).attributions
    expanded = tuple(interleave_rows(x, k) for x in task.inputs)
    perturbed = tuple(
        x
        + torch.empty(x.shape, dtype=torch.float32).uniform_(-p.perturb_radius, p.perturb_radius, generator=task.rng.torch_gen).to(x.device)
        for x in expanded
    )
    baselines = tuple(interleave_rows(b, k) if b.shape[0] == n and n > 1 else b for b in task.baselines)
    masks = tuple(interleave_rows(m, k) if m.shape[0] == n and n > 1 else m for m in task.feature_masks)
    perturbed_task = task.replace(
        inputs=perturbed,
        baselines=baselines,
        target=interleave_rows(task.target, k),
        args=tuple(interleave_rows(a, k) for a in task.args),
        feature_masks=masks,
        return_convergence_delta=False,
    )
    explained: Attribution = yield from explain(perturbed_task)
    diffs = torch.cat([(interleave_rows(a, k) - e).view(n * k, -1) for a, e in zip(attributions, explained.attributions)], dim=1)
    norms = torch.norm(torch.cat([a.view(n, -1) for a in attributions], dim=1), p="fro", dim=1, keepdim=True)
    norms = interleave_rows(torch.where(norms == 0.0, torch.ones_like(norms), norms), k)
    ratios = torch.norm(diffs, p="fro", dim=1, keepdim=True) / norms  # (n * k, 1)
    return torch.max(ratios.view(n, -1), dim=1).values


def evaluated(explain: Callable[[Task], Plan], task: Task, p: EvaluateParams) -> PlanOf[tuple[Attribution, dict[str, Tensor]]]:
    """The attribution, then its metrics: returns (Attribution, {metric name: (n,) tensor})."""
    torch_state, numpy_state = task.rng.torch_gen.get_state(), task.rng.numpy_gen.get_state()
    attribution: Attribution = yield from explain(task)
    drew = not torch.equal(torch_state, task.rng.torch_gen.get_state()) or any(
        not np.array_equal(a, b) if hasattr(a, "shape") else a != b for a, b in zip(numpy_state, task.rng.numpy_gen.get_state())
    )
    names, plans = [], []
    if p.infidelity is not None:
        names.append("infidelity")
        plans.append(infidelity_plan(task, attribution.attributions, p.infidelity))
    if p.sensitivity_max is not None:
        names.append("sensitivity_max")
        plans.append(sensitivity_max_plan(explain, task, attribution.attributions, drew, p.sensitivity_max))
    values = yield from concurrently(plans)
    return attribution, dict(zip(names, values))
