"""LayerActivation (Captum's LayerActivation): the layer's activations (or its inputs) for the inputs."""

from __future__ import annotations

from dataclasses import dataclass

from attrserve_engine.algorithms.layer import LayerAlgorithm, layer_activations
from attrserve_engine.plan import Attribution, PassKind, Plan, Task


@dataclass(frozen=True)
class LayerActivationParams:
    attribute_to_layer_input: bool = False


class LayerActivation(LayerAlgorithm):
    name = "layer_activation"
    pass_kind = PassKind.FORWARD
    params_type = LayerActivationParams
    uses_target = False

    def plan(self, task: Task) -> Plan:
        result = yield layer_activations(task, task.inputs)
        return Attribution(result.layer_activations)


ALGORITHM = LayerActivation
