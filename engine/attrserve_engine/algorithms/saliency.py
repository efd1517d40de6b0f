"""Saliency (Captum's Saliency): the gradient of the target w.r.t. the inputs, absolute by default."""

from __future__ import annotations

from dataclasses import dataclass

from attrserve_engine.algorithms.base import Algorithm
from attrserve_engine.plan import Attribution, Block, PassKind, Plan, Task


@dataclass(frozen=True)
class SaliencyParams:
    abs: bool = True


def gradient_block(task: Task) -> Block:
    """One gradient row per example: the block Saliency and InputXGradient share."""
    return Block(kind=PassKind.GRADIENT, inputs=task.inputs, args=task.args, target=task.target)


class Saliency(Algorithm):
    name = "saliency"
    examples_independent = True
    params_type = SaliencyParams

    def plan(self, task: Task) -> Plan:
        result = yield gradient_block(task)
        grads = result.grads
        return Attribution(tuple(g.abs() for g in grads) if task.params.abs else tuple(grads))


ALGORITHM = Saliency
