"""InputXGradient (Captum's InputXGradient): input times the gradient of the target w.r.t. it."""

from __future__ import annotations

from attrserve_engine.algorithms.base import Algorithm
from attrserve_engine.algorithms.saliency import gradient_block
from attrserve_engine.plan import Attribution, Plan, Task


class InputXGradient(Algorithm):
    name = "input_x_gradient"
    examples_independent = True

    def plan(self, task: Task) -> Plan:
        result = yield gradient_block(task)
        return Attribution(tuple(x * g for x, g in zip(task.inputs, result.grads)))


ALGORITHM = InputXGradient
