"""LayerGradCam (Captum's): channel weights = gradients averaged over spatial dims, times the activations, summed over channels."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attrserve_engine.algorithms.layer import LayerAlgorithm, layer_block
from attrserve_engine.plan import Attribution, Plan, Task


@dataclass(frozen=True)
class LayerGradCamParams:
    relu_attributions: bool = False
    attr_dim_summation: bool = True
    attribute_to_layer_input: bool = False


class LayerGradCam(LayerAlgorithm):
    name = "layer_grad_cam"
    params_type = LayerGradCamParams

    def plan(self, task: Task) -> Plan:
        p: LayerGradCamParams = task.params
        result = yield layer_block(task, task.inputs, task.args, task.target, gradients=True)
        attributions = []
        for grad, act in zip(result.layer_grads, result.layer_activations):
            # weights: (n, channels, 1, ...) — the mean gradient over every dim after the channel dim
            weights = torch.mean(grad, dim=tuple(range(2, grad.dim())), keepdim=True) if grad.dim() > 2 else grad
            cam = torch.sum(weights * act, dim=1, keepdim=True) if p.attr_dim_summation else weights * act
            attributions.append(F.relu(cam) if p.relu_attributions else cam)
        return Attribution(tuple(attributions))


ALGORITHM = LayerGradCam
