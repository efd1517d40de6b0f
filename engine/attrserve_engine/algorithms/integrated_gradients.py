"""Integrated Gradients (Captum's IntegratedGradients): path integral of gradients from baseline to input."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from attrserve_engine.algorithms.base import Algorithm, Limits, check_positive, delta_block, delta_from, example_baselines
from attrserve_engine.errors import InvalidArgument
from attrserve_engine.plan import GRADIENT, Attribution, Block, Plan, Task, repeat_rows

RIEMANN_METHODS = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
METHODS = RIEMANN_METHODS + ("gausslegendre",)


@dataclass(frozen=True)
class IntegratedGradientsParams:
    n_steps: int = 50
    method: str = "gausslegendre"
    multiply_by_inputs: bool = True


def step_sizes_and_alphas(method: str, n: int) -> tuple[list[float], list[float]]:
    """Quadrature weights and points on [0, 1], exactly as Captum's approximation_methods."""
    if method == "gausslegendre":
        points, weights = np.polynomial.legendre.leggauss(n)
        return (0.5 * weights).tolist(), (0.5 * (1 + points)).tolist()
    deltas = [1 / n] * n
    if method == "riemann_trapezoid":
        deltas[0] /= 2
        deltas[-1] /= 2
        return deltas, torch.linspace(0, 1, n).tolist()
    start, stop = {
        "riemann_left": (0.0, 1 - 1 / n),
        "riemann_middle": (1 / (2 * n), 1 - 1 / (2 * n)),
        "riemann_right": (1 / n, 1.0),
    }[method]
    return deltas, torch.linspace(start, stop, n).tolist()


class IntegratedGradients(Algorithm):
    name = "integrated_gradients"
    params_type = IntegratedGradientsParams
    has_convergence_delta = True
    uses_baselines = True

    def check_params(self, params: IntegratedGradientsParams, limits: Limits) -> None:
        if params.method not in METHODS:
            raise InvalidArgument(f"integrated_gradients.method must be one of {', '.join(METHODS)}, got {params.method!r}")
        minimum = 2 if params.method in RIEMANN_METHODS else 1
        check_positive(params.n_steps, "integrated_gradients.n_steps", limits.max_n_steps, minimum)

    def rows(self, task: Task, n_examples: int) -> int:
        return task.params.n_steps * n_examples

    def plan(self, task: Task) -> Plan:
        p: IntegratedGradientsParams = task.params
        n, n_steps = task.n, p.n_steps
        step_sizes, alphas = step_sizes_and_alphas(p.method, n_steps)
        baselines = example_baselines(task)
        # scaled: (n_steps * n, *feature_shape), step-major like Captum
        scaled = tuple(torch.cat([b + a * (x - b) for a in alphas], dim=0) for x, b in zip(task.inputs, baselines))
        blocks = [
            Block(
                kind=GRADIENT,
                inputs=scaled,
                args=tuple(repeat_rows(a, n_steps) for a in task.args),
                target=repeat_rows(task.target, n_steps),
            )
        ]
        if task.return_convergence_delta:
            blocks.append(delta_block(task.inputs, baselines, task.args, task.target))
        results = yield blocks
        weights = torch.tensor(step_sizes).float().view(n_steps, 1)
        attributions = []
        for grad, x, b in zip(results[0].grads, task.inputs, baselines):
            scaled_grad = grad.contiguous().view(n_steps, -1) * weights.to(grad.device)  # (n_steps, n * features)
            total = torch.sum(scaled_grad.reshape((n_steps, n) + tuple(grad.shape[1:])), dim=0)  # (n, *feature_shape)
            attributions.append(total * (x - b) if p.multiply_by_inputs else total)
        delta = delta_from(results[1], tuple(attributions)) if task.return_convergence_delta else None
        return Attribution(tuple(attributions), delta)


ALGORITHM = IntegratedGradients
