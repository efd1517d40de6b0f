"""Shared pieces of the layer methods: blocks that hook the request's layer, and the parameters they all take."""

from __future__ import annotations

from torch import Tensor

from attrserve_engine.algorithms.base import Algorithm
from attrserve_engine.plan import Block, PassKind, Rows, Task, repeat_rows, settled


class LayerAlgorithm(Algorithm):
    """A method that attributes to (or through) the request's `layer`; gradients are w.r.t. the layer."""

    layer_method = True
    needs_input_gradients = False
    input_shaped = False


def layer_block(
    task: Task,
    inputs: tuple[Tensor | Rows, ...],
    args: tuple[Tensor | Rows, ...],
    target: Tensor,
    *,
    gradients: bool,
    values: tuple[Tensor | Rows, ...] | None = None,
    select: bool = True,
) -> Block:
    """Rows whose pass hooks task.layer: capture its activations (or substitute `values`),
    and with `gradients` take d output[target] / d activations."""
    return Block(
        kind=PassKind.GRADIENT if gradients else PassKind.FORWARD,
        inputs=tuple(map(settled, inputs)),
        args=tuple(map(settled, args)),
        target=target,
        layer=task.layer,
        layer_input=task.params.attribute_to_layer_input,
        layer_values=None if values is None else tuple(map(settled, values)),
        grad_wrt_layer=gradients,
        select=select,
    )


def layer_activations(task: Task, inputs: tuple[Tensor, ...], times: int = 1) -> Block:
    """Forward rows capturing the layer's activations for `inputs` (times * n rows, args/target repeated)."""
    return layer_block(
        task, inputs, tuple(repeat_rows(a, times) for a in task.args), repeat_rows(task.target, times), gradients=False, select=False
    )
