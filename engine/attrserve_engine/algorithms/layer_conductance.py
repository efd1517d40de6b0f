"""LayerConductance (Captum's): gradients w.r.t. the layer times the change of its activations, along the input-space path."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attrserve_engine.algorithms.base import Limits, delta_block, delta_from, example_baselines
from attrserve_engine.algorithms.integrated_gradients import check_steps, interpolate, step_sizes_and_alphas
from attrserve_engine.algorithms.layer import LayerAlgorithm, layer_block
from attrserve_engine.plan import Attribution, Plan, Task, repeat_rows


@dataclass(frozen=True)
class LayerConductanceParams:
    n_steps: int = 50
    method: str = "gausslegendre"
    attribute_to_layer_input: bool = False


class LayerConductance(LayerAlgorithm):
    name = "layer_conductance"
    params_type = LayerConductanceParams
    memory_hints = ("internal_batch_size",)
    uses_baselines = True
    has_convergence_delta = True
    needs_input_gradients = True  # the path runs through input space

    def check_params(self, params: LayerConductanceParams, limits: Limits) -> None:
        # Captum takes n_steps + 1 path points (layer_conductance.py:289): n_steps=0 is one point, and no step
        check_steps(self.name, params.method, params.n_steps, limits, points=1)

    def rows(self, task: Task, n_examples: int) -> int:
        return (task.params.n_steps + 1) * n_examples

    def plan(self, task: Task) -> Plan:
        p: LayerConductanceParams = task.params
        n, points = task.n, p.n_steps + 1
        # Captum takes n_steps + 1 path points and differences consecutive activations.
        _, alphas = step_sizes_and_alphas(p.method, points)
        baselines = example_baselines(task)
        scaled = interpolate(task.inputs, baselines, alphas)
        args = tuple(repeat_rows(a, points) for a in task.args)
        blocks = [layer_block(task, scaled, args, repeat_rows(task.target, points), gradients=True)]
        if task.return_convergence_delta:
            blocks.append(delta_block(task.inputs, baselines, task.args, task.target))
        results = yield blocks
        attributions = []
        for grad, act in zip(results[0].layer_grads, results[0].layer_activations):
            steps = (act[n:] - act[:-n]) * grad[:-n]  # (n_steps * n, *layer_shape)
            attributions.append(torch.sum(steps.reshape((p.n_steps, n) + tuple(act.shape[1:])), dim=0))
        attributions_t = tuple(attributions)
        delta = delta_from(results[1], attributions_t) if task.return_convergence_delta else None
        return Attribution(attributions_t, delta)


ALGORITHM = LayerConductance
