"""LRP (Captum's LRP with its default rules): relevance propagated back from the target output, layer by layer."""

from __future__ import annotations

from typing import cast

from torch import Tensor, nn

from attrserve_engine.algorithms.base import Algorithm, sum_rows
from attrserve_engine.plan import Attribution, Block, PassKind, Plan, Task
from attrserve_engine.rules.lrp import LrpOptions, lrp_refusal


def scaled(relevances: tuple[Tensor, ...], output: Tensor) -> tuple[Tensor, ...]:
    """Normalised relevance × the target output per row (captum lrp.py:222, layer_lrp.py:285)."""
    return tuple(r * output.reshape((-1,) + (1,) * (r.dim() - 1)) for r in relevances)


def lrp_delta(relevances: tuple[Tensor, ...], output: Tensor) -> Tensor:
    """Captum's LRP.compute_convergence_delta (lrp.py:252): output − sum of relevance, per example.

    NOTE: the sign is the reverse of the other methods' sum(attributions) − Δoutput.
    """
    summed = cast(Tensor, sum(sum_rows(r) for r in relevances))  # (n,)
    return output.flatten() - summed.flatten()


class LRP(Algorithm):
    """One hooked forward + backward row per example; the backward carries normalised relevance.

    Rows are independent, so the block fuses with any other LRP rows of the
    model and splits anywhere. The delta needs no extra rows: LRP compares
    the relevance with the output it started from.
    """

    name = "lrp"
    pass_kind = PassKind.LRP
    has_convergence_delta = True

    def module_refusal(self, module: nn.Module) -> str | None:
        """Why this eager/TorchScript module cannot be explained with LRP (None: it can); for GetModel and submit."""
        return lrp_refusal(module)

    def delta_rows(self, task: Task, n_examples: int) -> int:
        return 0

    def plan(self, task: Task) -> Plan:
        result = yield Block(
            kind=PassKind.LRP, inputs=task.inputs, args=task.args, target=task.target, options=LrpOptions(len(task.inputs))
        )
        output = result.selected  # (n,) the target output, the relevance the propagation starts from
        relevances = scaled(tuple(result.grads), output)  # (n, *feature_shape) per input
        delta = lrp_delta(relevances, output) if task.return_convergence_delta else None
        return Attribution(relevances, delta)


ALGORITHM = LRP
