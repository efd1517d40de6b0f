"""Feature ablation (Captum's FeatureAblation): replace each feature (group) by its baseline and measure the output drop."""

from __future__ import annotations

from dataclasses import dataclass

from attrserve_engine.algorithms.base import Algorithm, Limits, example_baselines
from attrserve_engine.algorithms.perturbation import (
    check_perturbations_per_eval,
    coalition_rows,
    feature_ids,
    feature_index,
    feature_masks_or_default,
    forward_block,
    mask_features,
    one_feature_each,
    spread,
)
from attrserve_engine.plan import Attribution, PassKind, Plan, Rows, Task


@dataclass(frozen=True)
class FeatureAblationParams:
    # Accepted for Captum compatibility: attrserve packs rows into passes itself,
    # and ablation draws nothing at random, so the value changes no number.
    perturbations_per_eval: int = 1


class FeatureAblation(Algorithm):
    name = "feature_ablation"
    pass_kind = PassKind.FORWARD
    params_type = FeatureAblationParams
    needs_input_gradients = False
    uses_feature_mask = True
    uses_baselines = True
    rows_per_pass = True

    def check_params(self, params: FeatureAblationParams, limits: Limits) -> None:
        check_perturbations_per_eval(params.perturbations_per_eval, self.name)

    def rows(self, task: Task, n_examples: int) -> int:
        # the unablated inputs, then one copy per feature (group)
        return n_examples * (1 + mask_features(task)[0])

    def plan(self, task: Task) -> Plan:
        n = task.n
        masks = feature_masks_or_default(task)
        ids = feature_ids(masks)  # (P,) in Captum's order
        index = feature_index(masks, ids)  # per input (1 or n, *fs)
        n_feat = int(ids.numel())
        # NOTE: features are ablated across inputs at once (Captum 0.9's cross-tensor
        # ablation): an id used in two inputs' masks is one feature.
        # ((1 + P) * n, *fs): the inputs, then row group k with feature k at its baseline
        rows = tuple(
            Rows.cat([x, coalition_rows(one_feature_each(n_feat, idx.to(x.device)), n_feat, b, x, n)])
            for x, b, idx in zip(task.inputs, example_baselines(task), index)
        )
        result = yield forward_block(rows, task, 1 + n_feat)
        evals = result.selected.view(1 + n_feat, n)  # (1 + P, n), the output's dtype like Captum's attrib_type
        drop = evals[:1] - evals[1:]  # (P, n): initial_eval - modified_eval
        return Attribution(tuple(spread(drop, idx) for idx in index))


ALGORITHM = FeatureAblation
