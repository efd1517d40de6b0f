"""Integrated Gradients (Captum's IntegratedGradients): path integral of gradients from baseline to input."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from attrserve_engine.algorithms.base import Algorithm, Limits, check_positive, delta_block, delta_from, example_baselines
from attrserve_engine.errors import InvalidArgument, shown
from attrserve_engine.plan import Attribution, Block, PassKind, Plan, Task, repeat_rows

RIEMANN_METHODS = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
METHODS = RIEMANN_METHODS + ("gausslegendre",)


@dataclass(frozen=True)
class IntegratedGradientsParams:
    n_steps: int = 50
    method: str = "gausslegendre"
    multiply_by_inputs: bool = True


@functools.lru_cache(maxsize=256)
def step_sizes_and_alphas(method: str, n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Quadrature weights and points on [0, 1], exactly as Captum's approximation_methods.

    Cached: Gauss-Legendre nodes cost ~2 ms to compute (numpy's eigensolver), more than a request's pass.
    """
    if method == "gausslegendre":
        points, weights = np.polynomial.legendre.leggauss(n)
        return tuple((0.5 * weights).tolist()), tuple((0.5 * (1 + points)).tolist())
    deltas = [1 / n] * n
    if method == "riemann_trapezoid":
        deltas[0] /= 2
        deltas[-1] /= 2
        return tuple(deltas), tuple(torch.linspace(0, 1, n).tolist())
    start, stop = {
        "riemann_left": (0.0, 1 - 1 / n),
        "riemann_middle": (1 / (2 * n), 1 - 1 / (2 * n)),
        "riemann_right": (1 / n, 1.0),
    }[method]
    return tuple(deltas), tuple(torch.linspace(start, stop, n).tolist())


@functools.lru_cache(maxsize=256)
def _alphas(alphas: tuple[float, ...], dtype: torch.dtype, device: torch.device, dims: int) -> Tensor:
    """The path's points as a (steps, 1, ...) tensor that broadcasts over a `dims`-dimensional input; cached, never
    written to (building it from the floats was a third of `interpolate`'s time)."""
    return torch.tensor(alphas, dtype=dtype, device=device).view(-1, *([1] * dims))


def interpolate(inputs: tuple[Tensor, ...], baselines: tuple[Tensor, ...], alphas: tuple[float, ...]) -> tuple[Tensor, ...]:
    """Points on the straight path, step-major like Captum: (len(alphas) * n, *shape) per tensor.

    One broadcast op per tensor instead of Captum's loop over steps; the same two roundings per element
    (`alpha * (x - b)`, then `b + ...`), so the values are bit-identical. Integer inputs (token ids under a
    layer method) become floating point as they do in Captum. Captum's alpha is a Python float, which torch
    multiplies a half-precision tensor by in float32 before rounding: so do these, not by alphas rounded to
    the tensor's own dtype first.
    """
    out = []
    for x, b in zip(inputs, baselines):
        dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
        if dtype in _HALF:
            scaled = (_alphas(alphas, torch.float32, x.device, x.dim()) * (x - b)).to(dtype)
        else:
            scaled = _alphas(alphas, dtype, x.device, x.dim()) * (x - b)
        out.append((b + scaled).reshape(len(alphas) * x.shape[0], *x.shape[1:]))
    return tuple(out)


_HALF = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=256)
def _weights(step_sizes: tuple[float, ...]) -> Tensor:
    """Step sizes as Captum's float32 column (n_steps, 1); cached, never written to."""
    return torch.tensor(step_sizes, dtype=torch.float32).view(len(step_sizes), 1)


def integrate(grads: tuple[Tensor, ...], step_sizes: tuple[float, ...], n: int) -> tuple[Tensor, ...]:
    """Captum's weighted sum over steps: step-major (n_steps * n, *shape) gradients → (n, *shape)."""
    n_steps = len(step_sizes)
    weights = _weights(step_sizes)
    totals = []
    for grad in grads:
        # (n_steps, n * features)
        scaled_grad = grad.contiguous().view(n_steps, -1) * (weights if grad.device.type == "cpu" else weights.to(grad.device))
        totals.append(torch.sum(scaled_grad.reshape((n_steps, n) + tuple(grad.shape[1:])), dim=0))  # (n, *shape)
    return tuple(totals)


def check_steps(owner: str, method: str, n_steps: int, limits: Limits, points: int = 0) -> None:
    """Captum's rules for `method` and `n_steps` (a quadrature needs a point, Riemann sums 2), and this server's cap.

    `points`: how many more path points than n_steps the method takes (LayerConductance: 1)."""
    if method not in METHODS:
        raise InvalidArgument(f"{owner}.method must be one of {', '.join(METHODS)}, got {shown(method)}")
    check_positive(n_steps, f"{owner}.n_steps", limits.max_n_steps, (2 if method in RIEMANN_METHODS else 1) - points)


class IntegratedGradients(Algorithm):
    name = "integrated_gradients"
    examples_independent = True
    params_type = IntegratedGradientsParams
    memory_hints = ("internal_batch_size",)
    has_convergence_delta = True
    uses_baselines = True

    def check_params(self, params: IntegratedGradientsParams, limits: Limits) -> None:
        check_steps(self.name, params.method, params.n_steps, limits)

    def rows(self, task: Task, n_examples: int) -> int:
        return task.params.n_steps * n_examples

    def plan(self, task: Task) -> Plan:
        p: IntegratedGradientsParams = task.params
        n, n_steps = task.n, p.n_steps
        step_sizes, alphas = step_sizes_and_alphas(p.method, n_steps)
        baselines = example_baselines(task)
        blocks = [
            Block(
                kind=PassKind.GRADIENT,
                inputs=interpolate(task.inputs, baselines, alphas),
                args=tuple(repeat_rows(a, n_steps) for a in task.args),
                target=repeat_rows(task.target, n_steps),
            )
        ]
        if task.return_convergence_delta:
            blocks.append(delta_block(task.inputs, baselines, task.args, task.target))
        results = yield blocks
        totals = integrate(results[0].grads, step_sizes, n)
        attributions = tuple(t * (x - b) for t, x, b in zip(totals, task.inputs, baselines)) if p.multiply_by_inputs else totals
        delta = delta_from(results[1], attributions) if task.return_convergence_delta else None
        return Attribution(attributions, delta)


ALGORITHM = IntegratedGradients
