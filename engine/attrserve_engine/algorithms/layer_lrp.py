"""LayerLRP (Captum's LayerLRP with its default rules): LRP's relevance at a layer's output or input."""

from __future__ import annotations

from dataclasses import dataclass

from attrserve_engine.algorithms.layer import LayerAlgorithm
from attrserve_engine.algorithms.lrp import LRP, lrp_delta, scaled
from attrserve_engine.plan import Attribution, Block, PassKind, Plan, Task
from attrserve_engine.rules.lrp import LrpOptions


@dataclass(frozen=True)
class LayerLRPParams:
    attribute_to_layer_input: bool = False


class LayerLRP(LayerAlgorithm, LRP):
    """LRP's pass with the layer hooked: the gradient w.r.t. the layer's output (input) is its normalised relevance.

    The rule hooks on the layer's consumers (its own, for the input) have run
    by the time autograd hands that gradient back, so it is what Captum's rule
    records in `relevance_output` (`relevance_input`). LRP's refusals and its delta (no extra rows) hold as they are.
    """

    name = "layer_lrp"
    params_type = LayerLRPParams

    def plan(self, task: Task) -> Plan:
        result = yield Block(
            kind=PassKind.LRP,
            inputs=task.inputs,
            args=task.args,
            target=task.target,
            options=LrpOptions(len(task.inputs), task.layer),
            layer=task.layer,
            layer_input=task.params.attribute_to_layer_input,
            grad_wrt_layer=True,
        )
        output = result.selected  # (n,)
        relevances = scaled(tuple(result.layer_grads), output)  # (n, *layer_shape) per activation tensor
        delta = lrp_delta(relevances, output) if task.return_convergence_delta else None
        return Attribution(relevances, delta)


ALGORITHM = LayerLRP
