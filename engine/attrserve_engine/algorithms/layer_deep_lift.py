"""LayerDeepLift (Captum's): DeepLift's rescale multipliers at a layer, times the layer's change from baseline to input."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from attrserve_engine.algorithms.base import delta_block, delta_from, example_baselines
from attrserve_engine.algorithms.deep_lift import DeepLiftParams
from attrserve_engine.algorithms.layer import LayerAlgorithm, layer_activations
from attrserve_engine.plan import Attribution, Block, PassKind, Plan, Task
from attrserve_engine.rules import DeepLiftOptions

# Captum's LayerDeepLift has no eps: it keeps DeepLift's default.
DEFAULT_EPS = DeepLiftParams().eps


@dataclass(frozen=True)
class LayerDeepLiftParams:
    multiply_by_inputs: bool = True
    attribute_to_layer_input: bool = False


def layer_deep_lift_plan(task: Task, baselines: tuple[Tensor, ...], multiply_by_inputs: bool) -> Plan:
    """LayerDeepLift of `task` against `baselines` (one row per example).

    Captum (captum/attr/_core/layer/layer_deep_lift.py:303-371) runs cat([inputs, baselines])
    with the rule hooks and takes the layer's activations and gradients of the
    input half. The paired block gives the input half; the baselines' activations
    come from a plain forward (the rule hooks change no forward value).
    NOTE: Captum leaves the layer itself unhooked when attributing to its output
    (deep_lift.py:486); our rule hooks sit on the layer's input, upstream of the
    gradient taken, so they change nothing there either.
    """
    paired = Block(
        kind=PassKind.DEEPLIFT,
        inputs=task.inputs,
        refs=baselines,
        args=task.args,
        target=task.target,
        options=DeepLiftOptions(DEFAULT_EPS),
        layer=task.layer,
        layer_input=task.params.attribute_to_layer_input,
        grad_wrt_layer=True,
    )
    blocks = [paired, layer_activations(task, baselines)]
    if task.return_convergence_delta:  # Captum computes the delta with the hooks removed: a plain forward
        blocks.append(delta_block(task.inputs, baselines, task.args, task.target))
    results = yield blocks
    grads = results[0].layer_grads  # (n, *layer_shape) each: d output / d layer, with the rules of the modules after it
    at_inputs, at_baselines = results[0].layer_activations, results[1].layer_activations
    attributions = tuple((x - b) * g for x, b, g in zip(at_inputs, at_baselines, grads)) if multiply_by_inputs else tuple(grads)
    delta = delta_from(results[2], attributions) if task.return_convergence_delta else None
    return Attribution(attributions, delta)


class LayerDeepLift(LayerAlgorithm):
    name = "layer_deep_lift"
    pass_kind = PassKind.DEEPLIFT
    params_type = LayerDeepLiftParams
    has_convergence_delta = True
    needs_module_hooks = True
    uses_baselines = True

    def rows(self, task: Task, n_examples: int) -> int:
        return 3 * n_examples  # the (input, baseline) pairs, then the baselines' activations

    def plan(self, task: Task) -> Plan:
        return (yield from layer_deep_lift_plan(task, example_baselines(task), task.params.multiply_by_inputs))


ALGORITHM = LayerDeepLift
