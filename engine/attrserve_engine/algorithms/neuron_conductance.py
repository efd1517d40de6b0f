"""NeuronConductance (Captum's): how each input flows through one layer unit into the target output."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from attrserve_engine.algorithms.base import Algorithm, Limits, example_baselines
from attrserve_engine.algorithms.integrated_gradients import check_steps, integrate, interpolate, step_sizes_and_alphas
from attrserve_engine.algorithms.neuron import NeuronParams, check_layer_tensors, check_one_tensor, neuron_rows, parse_neuron_params
from attrserve_engine.models import LoadedModel
from attrserve_engine.plan import Attribution, Block, PassKind, Plan, Task, repeat_rows
from attrserve_engine.targets import flat_target


@dataclass(frozen=True)
class NeuronConductanceParams:
    n_steps: int = 50
    method: str = "riemann_trapezoid"  # Captum's default here, unlike IG's
    multiply_by_inputs: bool = True


class _Path(Algorithm):
    """Parses the path parameters for NeuronConductance (the base of its params)."""

    name = "neuron_conductance"
    params_type = NeuronConductanceParams
    memory_hints = ("internal_batch_size",)

    def check_params(self, params: NeuronConductanceParams, limits: Limits) -> None:
        check_steps(self.name, params.method, params.n_steps, limits)


class NeuronConductance(Algorithm):
    name = "neuron_conductance"
    layer_method = True
    uses_baselines = True

    def parse_params(self, raw: dict[str, Any], limits: Limits) -> NeuronParams:
        return parse_neuron_params(self.name, _Path(), raw, limits)

    def check_layer(self, model: LoadedModel, layer: str, params: NeuronParams) -> None:
        check_layer_tensors(model, layer, params, self.name)

    def rows(self, task: Task, n_examples: int) -> int:
        return 2 * task.params.base.n_steps * n_examples  # one pass for the layer's gradients, one for the unit's

    def plan(self, task: Task) -> Plan:
        p: NeuronParams = task.params
        path: NeuronConductanceParams = p.base
        n, n_steps = task.n, path.n_steps
        step_sizes, alphas = step_sizes_and_alphas(path.method, n_steps)
        baselines = example_baselines(task)
        scaled = interpolate(task.inputs, baselines, alphas)
        args = tuple(repeat_rows(a, n_steps) for a in task.args)
        neurons = repeat_rows(neuron_rows(task), n_steps)
        hooked = Block(
            kind=PassKind.GRADIENT,
            inputs=scaled,
            args=args,
            target=repeat_rows(task.target, n_steps),
            layer=task.layer,
            layer_input=p.attribute_to_neuron_input,
        )
        # 1) d output[target] / d layer, read at the unit; 2) d unit / d inputs
        to_layer, to_inputs = yield [
            dataclasses.replace(hooked, grad_wrt_layer=True),
            dataclasses.replace(hooked, target=neurons, objective_layer=True),
        ]
        check_one_tensor(to_inputs, task, self.name)
        layer_grad = to_layer.layer_grads[0]  # (n_steps * n, *layer_shape)
        unit = flat_target(neurons, tuple(layer_grad.shape[1:]), "neuron_selector")
        mid = layer_grad.reshape(layer_grad.shape[0], -1).gather(1, unit[:, None]).squeeze(1)  # (n_steps * n,)
        scaled_grads = tuple(g * mid.reshape((g.shape[0],) + (1,) * (g.dim() - 1)) for g in to_inputs.grads)
        totals = integrate(scaled_grads, step_sizes, n)
        attributions = tuple(t * (x - b) for t, x, b in zip(totals, task.inputs, baselines)) if path.multiply_by_inputs else totals
        return Attribution(attributions)


ALGORITHM = NeuronConductance
