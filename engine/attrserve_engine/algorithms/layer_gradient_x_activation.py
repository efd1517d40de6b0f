"""LayerGradientXActivation (Captum's): the layer's activations times the gradient of the target w.r.t. them."""

from __future__ import annotations

from dataclasses import dataclass

from attrserve_engine.algorithms.layer import LayerAlgorithm, layer_block
from attrserve_engine.plan import Attribution, Plan, Task


@dataclass(frozen=True)
class LayerGradientXActivationParams:
    multiply_by_inputs: bool = True
    attribute_to_layer_input: bool = False


class LayerGradientXActivation(LayerAlgorithm):
    name = "layer_gradient_x_activation"
    params_type = LayerGradientXActivationParams

    def plan(self, task: Task) -> Plan:
        result = yield layer_block(task, task.inputs, task.args, task.target, gradients=True)
        grads, acts = result.layer_grads, result.layer_activations
        return Attribution(tuple(g * a for g, a in zip(grads, acts)) if task.params.multiply_by_inputs else grads)


ALGORITHM = LayerGradientXActivation
