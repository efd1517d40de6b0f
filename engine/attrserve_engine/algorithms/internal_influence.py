"""InternalInfluence (Captum's): gradients w.r.t. the layer integrated along the input-space path from baseline to input."""

from __future__ import annotations

from dataclasses import dataclass

from attrserve_engine.algorithms.base import Limits, example_baselines
from attrserve_engine.algorithms.integrated_gradients import check_steps, integrate, interpolate, step_sizes_and_alphas
from attrserve_engine.algorithms.layer import LayerAlgorithm, layer_block
from attrserve_engine.plan import Attribution, Plan, Task, repeat_rows


@dataclass(frozen=True)
class InternalInfluenceParams:
    n_steps: int = 50
    method: str = "gausslegendre"
    attribute_to_layer_input: bool = False


class InternalInfluence(LayerAlgorithm):
    name = "internal_influence"
    params_type = InternalInfluenceParams
    memory_hints = ("internal_batch_size",)
    uses_baselines = True
    needs_input_gradients = True  # the path runs through input space

    def check_params(self, params: InternalInfluenceParams, limits: Limits) -> None:
        check_steps(self.name, params.method, params.n_steps, limits)

    def rows(self, task: Task, n_examples: int) -> int:
        return task.params.n_steps * n_examples

    def plan(self, task: Task) -> Plan:
        p: InternalInfluenceParams = task.params
        step_sizes, alphas = step_sizes_and_alphas(p.method, p.n_steps)
        scaled = interpolate(task.inputs, example_baselines(task), alphas)
        args = tuple(repeat_rows(a, p.n_steps) for a in task.args)
        result = yield layer_block(task, scaled, args, repeat_rows(task.target, p.n_steps), gradients=True)
        return Attribution(integrate(result.layer_grads, step_sizes, task.n))


ALGORITHM = InternalInfluence
