"""GuidedGradCam (Captum's): Guided Backprop at the inputs times the layer's Grad-CAM, upsampled to the input size."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attrserve_engine.algorithms.base import Limits
from attrserve_engine.algorithms.guided_backprop import GuidedBackprop
from attrserve_engine.algorithms.layer import LayerAlgorithm
from attrserve_engine.algorithms.layer_grad_cam import LayerGradCam, LayerGradCamParams
from attrserve_engine.errors import InvalidArgument, shown
from attrserve_engine.plan import Attribution, Plan, Task, concurrently

INTERPOLATE_MODES = ("nearest", "nearest-exact", "linear", "bilinear", "bicubic", "trilinear", "area")


@dataclass(frozen=True)
class GuidedGradCamParams:
    interpolate_mode: str = "nearest"
    attribute_to_layer_input: bool = False


class GuidedGradCam(LayerAlgorithm):
    """Attributes to the inputs through a layer: `layer_method`, with input-shaped attributions."""

    name = "guided_grad_cam"
    params_type = GuidedGradCamParams
    needs_input_gradients = True
    input_shaped = True  # the upsampled CAM times Guided Backprop, at the inputs

    def check_params(self, params: GuidedGradCamParams, limits: Limits) -> None:
        if params.interpolate_mode not in INTERPOLATE_MODES:
            raise InvalidArgument(
                f"guided_grad_cam.interpolate_mode must be one of {', '.join(INTERPOLATE_MODES)}, got {shown(params.interpolate_mode)}"
            )

    def rows(self, task: Task, n_examples: int) -> int:
        return 2 * n_examples  # the Grad-CAM pass and the Guided Backprop pass

    def plan(self, task: Task) -> Plan:
        p: GuidedGradCamParams = task.params
        # Both stages' blocks go out together (guided_grad_cam.py:185-205 runs them one after the other).
        cam_task = task.replace(params=LayerGradCamParams(relu_attributions=True, attribute_to_layer_input=p.attribute_to_layer_input))
        cam, guided = yield from concurrently([LayerGradCam().plan(cam_task), GuidedBackprop().plan(task.replace(params=None))])
        if len(cam.attributions) != 1:
            raise InvalidArgument(
                f"guided_grad_cam needs a layer with one {'input' if p.attribute_to_layer_input else 'output'} tensor; "
                f"{task.layer!r} has {len(cam.attributions)}"
            )
        grad_cam = cam.attributions[0]  # (n, 1, *layer_spatial)
        attributions, failures = [], []
        for i, (x, g) in enumerate(zip(task.inputs, guided.attributions)):
            # Captum (guided_grad_cam.py:207-224): an input the CAM cannot be resized to or
            # broadcast against gets an empty tensor (and a warning) instead of failing the call.
            try:
                attributions.append(g * F.interpolate(grad_cam, tuple(x.shape[2:]), mode=p.interpolate_mode))
            except Exception as e:  # whatever F.interpolate or broadcasting raises
                failures.append(f"inputs[{i}] {tuple(x.shape)}: {e}")
                attributions.append(torch.empty(0, device=x.device))
        if len(failures) == len(attributions):  # an all-empty answer helps nobody: say why instead
            raise InvalidArgument(
                f"guided_grad_cam cannot upsample layer {task.layer!r}'s Grad-CAM {tuple(grad_cam.shape)} "
                f"to the inputs with mode {p.interpolate_mode!r} ({'; '.join(failures)}); use a convolutional layer of an image model"
            )
        return Attribution(tuple(attributions))


ALGORITHM = GuidedGradCam
