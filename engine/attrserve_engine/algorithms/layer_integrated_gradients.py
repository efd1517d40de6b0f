"""LayerIntegratedGradients (Captum's): Integrated Gradients in the layer's activation space (e.g. token embeddings)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attrserve_engine.algorithms.base import Limits, delta_block, delta_from, example_baselines
from attrserve_engine.algorithms.integrated_gradients import check_steps, integrate, interpolate, step_sizes_and_alphas
from attrserve_engine.algorithms.layer import LayerAlgorithm, layer_activations, layer_block
from attrserve_engine.plan import Attribution, Plan, Task, repeat_rows


@dataclass(frozen=True)
class LayerIntegratedGradientsParams:
    n_steps: int = 50
    method: str = "gausslegendre"
    multiply_by_inputs: bool = True
    attribute_to_layer_input: bool = False


class LayerIntegratedGradients(LayerAlgorithm):
    name = "layer_integrated_gradients"
    params_type = LayerIntegratedGradientsParams
    memory_hints = ("internal_batch_size",)
    uses_baselines = True
    has_convergence_delta = True

    def check_params(self, params: LayerIntegratedGradientsParams, limits: Limits) -> None:
        check_steps(self.name, params.method, params.n_steps, limits)

    def rows(self, task: Task, n_examples: int) -> int:
        return (2 + task.params.n_steps) * n_examples  # activations at inputs and baselines, then the path

    def plan(self, task: Task) -> Plan:
        p: LayerIntegratedGradientsParams = task.params
        n, n_steps = task.n, p.n_steps
        step_sizes, alphas = step_sizes_and_alphas(p.method, n_steps)
        baselines = example_baselines(task)
        # 1) the layer's activations for inputs and baselines: rows [inputs; baselines]
        both = tuple(torch.cat([x, b]) for x, b in zip(task.inputs, baselines))
        blocks = [layer_activations(task, both, times=2)]
        if task.return_convergence_delta:
            blocks.append(delta_block(task.inputs, baselines, task.args, task.target))
        results = yield blocks
        acts = results[0].layer_activations
        layer_inputs, layer_baselines = tuple(a[:n] for a in acts), tuple(a[n:] for a in acts)
        # 2) the model re-run on the inputs with the layer's output replaced by points on the path
        path = yield layer_block(
            task,
            tuple(repeat_rows(x, n_steps) for x in task.inputs),
            tuple(repeat_rows(a, n_steps) for a in task.args),
            repeat_rows(task.target, n_steps),
            gradients=True,
            values=interpolate(layer_inputs, layer_baselines, alphas),
        )
        totals = integrate(path.layer_grads, step_sizes, n)
        attributions = tuple(t * (x - b) for t, x, b in zip(totals, layer_inputs, layer_baselines)) if p.multiply_by_inputs else totals
        delta = delta_from(results[1], attributions) if task.return_convergence_delta else None
        return Attribution(attributions, delta)


ALGORITHM = LayerIntegratedGradients
