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

from attrserve_engine.rules.hooks import ModuleHooks, replace_input_gradient

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


class GuidedReluRules(ModuleHooks):
    """Installs the ReLU hooks for one pass (`rules.hooks.replace_input_gradient` on every `nn.ReLU`);
    `remove()` restores the model."""

    def __init__(self, model: nn.Module, rule: str) -> None:
        super().__init__()
        if rule not in (GUIDED_BACKPROP, DECONVOLUTION):
            raise ValueError(f"unknown ReLU rule {rule!r}")
        self.model = model
        self.use_grad_output = rule == DECONVOLUTION  # Captum's use_relu_grad_output

    def install(self) -> None:
        for module in relu_modules(self.model):
            replace_input_gradient(module, self, self._rule)

    def _rule(self, grad_in: Tensor, grad_out: Tensor) -> Tensor:
        return F.relu(grad_out if self.use_grad_output else grad_in)
