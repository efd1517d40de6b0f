"""DeepLift (Captum's DeepLift): gradients with the rescale rules, input and reference rows in one pass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from attrserve_engine.algorithms.base import Algorithm, Limits, delta_block, delta_from, example_baselines
from attrserve_engine.plan import Attribution, Block, PassKind, Plan, Task
from attrserve_engine.rules import DeepLiftOptions


@dataclass(frozen=True)
class DeepLiftParams:
    multiply_by_inputs: bool = True
    eps: float = 1e-10


class DeepLift(Algorithm):
    name = "deep_lift"
    pass_kind = PassKind.DEEPLIFT
    params_type = DeepLiftParams
    has_convergence_delta = True
    needs_module_hooks = True
    uses_baselines = True

    def parse_params(self, raw: dict[str, Any], limits: Limits) -> DeepLiftParams:
        params: DeepLiftParams = super().parse_params(raw, limits)
        # Captum takes any eps: the rules use the plain quotient where |Δin| >= eps. For eps <= 0 and NaN that is
        # everywhere, exactly as for eps = 0; one value keeps the batch key (Block.options) a plain float.
        return params if params.eps > 0 else dataclasses.replace(params, eps=0.0)

    def rows(self, task: Task, n_examples: int) -> int:
        return 2 * n_examples

    def plan(self, task: Task) -> Plan:
        p: DeepLiftParams = task.params
        baselines = example_baselines(task)
        # The executor runs cat([inputs, refs]) with the rule hooks; grads are w.r.t. the inputs.
        blocks = [
            Block(
                kind=PassKind.DEEPLIFT,
                inputs=task.inputs,
                refs=baselines,
                args=task.args,
                target=task.target,
                options=DeepLiftOptions(p.eps),
            )
        ]
        if task.return_convergence_delta:  # a plain forward: Captum computes the delta with the hooks removed
            blocks.append(delta_block(task.inputs, baselines, task.args, task.target))
        results = yield blocks
        grads = results[0].grads
        attributions = tuple((x - b) * g for x, b, g in zip(task.inputs, baselines, grads)) if p.multiply_by_inputs else tuple(grads)
        delta = delta_from(results[1], attributions) if task.return_convergence_delta else None
        return Attribution(attributions, delta)


ALGORITHM = DeepLift
