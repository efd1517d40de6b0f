"""GuidedBackprop (Captum's GuidedBackprop): gradients where each ReLU passes back only non-negative gradients."""

from __future__ import annotations

from typing import ClassVar

from attrserve_engine.algorithms.base import Algorithm
from attrserve_engine.plan import Attribution, Block, PassKind, Plan, Task
from attrserve_engine.rules import GUIDED_BACKPROP, GuidedOptions


class ModifiedReluGradient(Algorithm):
    """Captum's ModifiedReluGradientAttribution: one gradient row per example, with the ReLU hooks of `rule`.

    Rows are independent, so the block fuses with any other request's rows
    of the same rule and splits anywhere.
    """

    rule: ClassVar[str]
    pass_kind = PassKind.GUIDED

    def plan(self, task: Task) -> Plan:
        result = yield Block(kind=PassKind.GUIDED, inputs=task.inputs, args=task.args, target=task.target, options=GuidedOptions(self.rule))
        return Attribution(tuple(result.grads))  # grads: (n, *feature_shape) per input


class GuidedBackprop(ModifiedReluGradient):
    name = "guided_backprop"
    rule = GUIDED_BACKPROP


ALGORITHM = GuidedBackprop
