"""Permutation feature importance (Captum's FeaturePermutation): shuffle each feature (group) across the request's
examples and measure the output drop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from attrserve_engine.algorithms.base import Algorithm, Limits
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
    tensors_with_feature,
)
from attrserve_engine.plan import Attribution, PassKind, Plan, Rows, Task


@dataclass(frozen=True)
class FeaturePermutationParams:
    # NOTE: unlike ablation, this one changes the numbers: Captum draws the
    # permutations group by group of perturbations_per_eval features.
    perturbations_per_eval: int = 1


def draw_permutation(n: int, gen: torch.Generator) -> Tensor:
    """Captum's `_permute_feature` draw: torch.randperm(n), redrawn while it is the identity."""
    perm = torch.randperm(n, generator=gen)
    identity = torch.arange(n)
    while bool((perm == identity).all()):
        perm = torch.randperm(n, generator=gen)
    return perm


def draw_permutations(task: Task, masks: tuple[Tensor, ...], ids: Tensor, per_eval: int) -> list[Tensor]:
    """Per input, the example permutation each feature's rows use: (P, n) int64 (identity where unused).

    NOTE: the draws follow Captum's loops exactly (feature_permutation.py:308-351 under
    feature_ablation.py:611-653): for each group of `per_eval` features, for each input
    any of them touches (ascending), for each feature of the group — even one absent from
    that input — one draw.
    """
    n, n_feat = task.n, int(ids.numel())
    perms = [torch.arange(n).repeat(n_feat, 1) for _ in task.inputs]  # each (P, n)
    touched = tensors_with_feature(masks, ids)
    for start in range(0, n_feat, per_eval):
        group = range(start, min(start + per_eval, n_feat))
        for i in sorted({t for f in group for t in touched[f]}):
            for f in group:
                perms[i][f] = draw_permutation(n, task.rng.torch_gen)
    return perms


def _shuffled(x: Tensor, perms: Tensor) -> Callable[[int, int], Tensor]:
    """(a, b) → (b - a, n, *fs): the examples of `x` reordered by the permutations of features a..b-1 (perms: (P, n))."""
    return lambda a, b: x[perms[a:b]]


class FeaturePermutation(Algorithm):
    name = "feature_permutation"
    pass_kind = PassKind.FORWARD
    params_type = FeaturePermutationParams
    needs_input_gradients = False
    uses_feature_mask = True
    rows_per_pass = True

    def check_params(self, params: FeaturePermutationParams, limits: Limits) -> None:
        check_perturbations_per_eval(params.perturbations_per_eval, self.name)

    def rows(self, task: Task, n_examples: int) -> int:
        if n_examples < 2:  # nothing to permute: Captum skips every feature
            return n_examples
        return n_examples * (1 + mask_features(task)[0])

    def plan(self, task: Task) -> Plan:
        p: FeaturePermutationParams = task.params
        n = task.n
        masks = feature_masks_or_default(task)
        ids = feature_ids(masks)  # (P,) in Captum's order
        index = feature_index(masks, ids)  # per input (1 or n, *fs)
        # NOTE: with one example Captum skips every feature group (_min_examples_per_batch_grouped = 2)
        # and returns zeros; only the initial eval runs, for the output dtype.
        n_feat = int(ids.numel()) if n >= 2 else 0
        perms = draw_permutations(task, masks, ids, p.perturbations_per_eval) if n_feat else []
        rows: list[Tensor | Rows] = []
        for i, (x, idx) in enumerate(zip(task.inputs, index)):
            if not n_feat:
                rows.append(x)
                continue
            # the inputs, then row group k with feature k taken from the examples reordered by feature k's permutation
            shuffled = _shuffled(x, perms[i].to(x.device))
            rows.append(Rows.cat([x, coalition_rows(one_feature_each(n_feat, idx.to(x.device)), n_feat, shuffled, x, n)]))
        result = yield forward_block(tuple(rows), task, 1 + n_feat)
        evals = result.selected.view(1 + n_feat, n)  # (1 + P, n)
        if not n_feat:
            return Attribution(tuple(torch.zeros(x.shape, dtype=evals.dtype, device=evals.device) for x in task.inputs))
        drop = evals[:1] - evals[1:]  # (P, n)
        return Attribution(tuple(spread(drop, idx) for idx in index))


ALGORITHM = FeaturePermutation
