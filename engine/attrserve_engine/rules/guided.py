"""Guided Backprop's and Deconvolution's ReLU rules as backward hooks, for fused passes of independent rows.

The rules follow Captum 0.9.0 (`captum/attr/_core/guided_backprop_deconvnet.py`,
ModifiedReluGradientAttribution): every `nn.ReLU` module (subclasses too,
whatever hooks it already has) passes back relu(grad_input) — Guided Backprop:
the ordinary ReLU gradient with its negative values dropped — or
relu(grad_output) — Deconvolution: the gradient from above with its negative
values dropped, ignoring the forward mask. Both are elementwise, so rows of
many requests can share a pass and a block can be split anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GUIDED_BACKPROP = "guided_backprop"
DECONVOLUTION = "deconvolution"


@dataclass(frozen=True)
class GuidedOptions:
    """A guided pass's settings (Block.options): which ReLU rule. Rows are independent, so the layout is unused."""

    rule: str  # GUIDED_BACKPROP or DECONVOLUTION

    def rules(self, model: nn.Module, rows_per_segment: list[int], device: torch.device) -> GuidedReluRules:
        return GuidedReluRules(model, self.rule)


def relu_modules(model: nn.Module) -> list[nn.Module]:
    """The modules Captum hooks: `isinstance(module, nn.ReLU)`, as its `model.apply(_register_hooks)` does."""
    return [m for m in model.modules() if isinstance(m, nn.ReLU)]


class GuidedReluRules:
    """Installs the ReLU hooks for one pass; `remove()` restores the model.

    Mirrors Captum's `_register_backward_hook` (captum/_utils/common.py): a
    forward pre-hook puts a tensor hook on the module's input and hands the
    module a clone of it (so `ReLU(inplace=True)` leaves the hooked tensor
    alone); a forward hook records the output's gradient; the input's tensor
    hook then replaces the gradient arriving at that input — everything that
    flows into it, as in Captum — with the rule's value.
    """

    def __init__(self, model: nn.Module, rule: str) -> None:
        if rule not in (GUIDED_BACKPROP, DECONVOLUTION):
            raise ValueError(f"unknown ReLU rule {rule!r}")
        self.model = model
        self.use_grad_output = rule == DECONVOLUTION  # Captum's use_relu_grad_output
        self.handles: list = []

    def install(self) -> None:
        for module in relu_modules(self.model):
            self._hook(module)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _hook(self, module: nn.Module) -> None:
        # NOTE: one slot per module, overwritten by each output gradient, as
        # Captum's per-device dict is: a module that runs twice pairs each input
        # gradient with the output gradient that arrived last.
        grad_out: list[Tensor] = []

        def output_grad_hook(grad: Tensor) -> None:
            grad_out[:] = [grad]

        def input_grad_hook(grad: Tensor) -> Tensor | None:
            if not grad_out:
                return None
            return F.relu(grad_out[0] if self.use_grad_output else grad)

        def pre_hook(mod: nn.Module, inp: tuple) -> tuple:
            x = inp[0]
            if x.requires_grad:  # Captum would fail here; nothing flows back through it anyway
                x.register_hook(input_grad_hook)
            return (x.clone(), *inp[1:])

        def forward_hook(mod: nn.Module, inp: tuple, out: Tensor | tuple) -> None:
            y = out[0] if isinstance(out, tuple) else out
            if y.requires_grad:
                y.register_hook(output_grad_hook)

        self.handles.append(module.register_forward_pre_hook(pre_hook))
        self.handles.append(module.register_forward_hook(forward_hook))
