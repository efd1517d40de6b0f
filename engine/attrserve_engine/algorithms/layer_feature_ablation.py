"""LayerFeatureAblation (Captum's): set each unit of a layer to a baseline value and measure the output drop."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from attrserve_engine.algorithms.base import Limits
from attrserve_engine.algorithms.layer import LayerAlgorithm, layer_block
from attrserve_engine.algorithms.perturbation import (
    check_perturbations_per_eval,
    coalition_rows,
    feature_ids,
    feature_index,
    feature_masks_or_default,
    one_feature_each,
    spread,
)
from attrserve_engine.errors import ResourceExhausted
from attrserve_engine.formatting import scalar_filled
from attrserve_engine.plan import Attribution, PassKind, Plan, Rows, Task, repeat_rows

# NOTE: a layer's size is unknown when the job is submitted, so `rows` cannot
# count the ablation rows; the plan refuses a layer whose rows pass this cap
# (the engine's default max_rows_per_request) before building them.
MAX_ABLATION_ROWS = 100_000


@dataclass(frozen=True)
class LayerFeatureAblationParams:
    # Captum's layer_baselines as a scalar: the value an ablated unit takes.
    layer_baselines: float = 0.0
    # Accepted for Captum compatibility: attrserve packs rows into passes itself,
    # and ablation draws nothing at random, so the value changes no number.
    perturbations_per_eval: int = 1
    attribute_to_layer_input: bool = False


class LayerFeatureAblation(LayerAlgorithm):
    name = "layer_feature_ablation"
    pass_kind = PassKind.FORWARD
    params_type = LayerFeatureAblationParams
    uses_baselines = False  # the baseline is the layer value `layer_baselines`, not an input
    rows_per_pass = True

    def check_params(self, params: LayerFeatureAblationParams, limits: Limits) -> None:
        check_perturbations_per_eval(params.perturbations_per_eval, self.name)

    def rows(self, task: Task, n_examples: int) -> int:
        # The layer's activations, then one copy per unit: the units are only known once the
        # layer has run, so this counts the first pass and one ablation (see MAX_ABLATION_ROWS).
        return 2 * n_examples

    def plan(self, task: Task) -> Plan:
        p: LayerFeatureAblationParams = task.params
        n = task.n
        # 1) the layer's activations, and the output at the target (Captum's initial eval, layer_feature_ablation.py:291)
        first = yield layer_block(task, task.inputs, task.args, task.target, gradients=False)
        acts = first.layer_activations  # (n, *layer_shape) each
        # Captum's default layer_mask: every unit of every layer tensor its own feature, numbered across tensors.
        masks = feature_masks_or_default(task.replace(inputs=acts, feature_masks=()))
        ids = feature_ids(masks)  # (P,)
        index = feature_index(masks, ids)  # per layer tensor (1, *layer_shape)
        n_feat = int(ids.numel())
        if n * n_feat > MAX_ABLATION_ROWS:
            raise ResourceExhausted(
                f"layer_feature_ablation on layer {task.layer!r} needs {n * n_feat} rows ({n_feat} units × {n} example(s)), "
                f"over the limit of {MAX_ABLATION_ROWS}; pick a smaller layer or send fewer examples",
                permanent=True,
            )
        # 2) the model re-run with the layer replaced by ablated copies: row (k, e) is example e with unit k at the baseline
        #    (P * n, *layer_shape) each, built a pass at a time
        values = tuple(
            coalition_rows(
                one_feature_each(n_feat, idx.to(a.device)),
                n_feat,
                scalar_filled(
                    functools.partial(torch.full_like, a[:1]), p.layer_baselines, a.dtype, "layer_feature_ablation.layer_baselines"
                ),
                a,
                n,
            )
            for a, idx in zip(acts, index)
        )
        ablated = yield layer_block(
            task,
            tuple(Rows.repeated(x, n_feat) for x in task.inputs),
            tuple(Rows.repeated(a, n_feat) for a in task.args),
            repeat_rows(task.target, n_feat),
            gradients=False,
            values=values,
        )
        modified = ablated.selected.view(n_feat, n)  # (P, n)
        drop = first.selected.view(1, n) - modified  # (P, n): initial_eval - modified_eval
        return Attribution(tuple(spread(drop, idx) for idx in index))


ALGORITHM = LayerFeatureAblation
