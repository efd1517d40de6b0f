"""Exact Shapley values (Captum's ShapleyValues): each feature's mean output gain over every order of adding
features to the baseline."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attrserve_engine.algorithms.base import Algorithm, Limits
from attrserve_engine.algorithms.perturbation import (
    check_perturbations_per_eval,
    coalition_block,
    feature_ids,
    feature_index,
    feature_masks_or_default,
    mask_features,
    spread,
)
from attrserve_engine.plan import Attribution, PassKind, Plan, Task


@dataclass(frozen=True)
class ShapleyValuesParams:
    perturbations_per_eval: int = 1  # changes no number: attrserve packs passes itself


class ShapleyValues(Algorithm):
    """Captum averages the gains over all P! orders, evaluating P * P! prefixes (shapley_value.py:50-52, 1257-1263).

    NOTE: an order's prefixes are coalitions, and there are only 2^P of them: this plan
    evaluates each coalition once and weighs the gains as the P! orders do
    (|S|! (P - |S| - 1)! / P! for adding a feature to S) — the same average, 2^P rows
    per example instead of P * P! (7 features: 128 instead of 35,280).
    """

    name = "shapley_values"
    pass_kind = PassKind.FORWARD
    params_type = ShapleyValuesParams
    needs_input_gradients = False
    uses_feature_mask = True
    uses_baselines = True
    rows_per_pass = True

    def check_params(self, params: ShapleyValuesParams, limits: Limits) -> None:
        check_perturbations_per_eval(params.perturbations_per_eval, self.name)

    def rows(self, task: Task, n_examples: int) -> int:
        # Python ints: 20 features is 2**20 rows per example, refused by the row cap before any work
        return n_examples * 2 ** mask_features(task)[0]

    def plan(self, task: Task) -> Plan:
        n = task.n
        masks = feature_masks_or_default(task)
        ids = feature_ids(masks)  # (P,) present ids; absent ids are null players and change no value
        index = feature_index(masks, ids)
        n_feat = int(ids.numel())
        coalitions = torch.arange(2**n_feat)  # (K,) bit f set: feature f is in
        bit = 1 << torch.arange(n_feat)  # (P,)
        members = (coalitions.view(-1, 1) & bit) != 0  # (K, P)
        result = yield coalition_block(task, lambda a, b: members[a:b], int(members.shape[0]), index)
        value = result.selected.view(-1, n).to(torch.float64)  # (K, n) the model on each coalition
        # gain of adding feature f to coalition S, weighted by the share of orders that put exactly S before f
        size = members.sum(1)  # (K,)
        share = torch.tensor([1.0 / (n_feat * math.comb(n_feat - 1, s)) for s in range(n_feat)] + [0.0], dtype=torch.float64)
        weight = share[size].view(-1, 1) * (~members)  # (K, P), zero where f is already in S
        with_f = coalitions.view(-1, 1) | bit  # (K, P)
        gains = value[with_f.to(value.device)] - value.unsqueeze(1)  # (K, P, n)
        phi = torch.einsum("kp,kpn->pn", weight.to(value.device), gains).to(torch.float32)  # (P, n)
        return Attribution(tuple(spread(phi, idx) for idx in index))


ALGORITHM = ShapleyValues
