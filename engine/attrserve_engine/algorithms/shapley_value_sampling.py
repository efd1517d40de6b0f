"""Shapley value sampling (Captum's ShapleyValueSampling): add features to the baseline one by one in random
orders; each feature gets its mean output gain."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from attrserve_engine.algorithms.base import Algorithm, Limits, check_positive
from attrserve_engine.algorithms.lime import MAX_FEATURES
from attrserve_engine.algorithms.perturbation import (
    check_has_features,
    check_perturbations_per_eval,
    coalition_block,
    feature_ids,
    feature_index,
    feature_masks_or_default,
    mask_features,
    n_features,
    spread,
)
from attrserve_engine.errors import InvalidArgument
from attrserve_engine.plan import Attribution, PassKind, Plan, Task


@dataclass(frozen=True)
class ShapleyValueSamplingParams:
    n_samples: int = 25
    perturbations_per_eval: int = 1  # changes no number: the orders are drawn before their evaluations


def check_feature_ids(task: Task, count: int) -> int:
    """Captum's feature count, max id + 1: each order is a permutation of every id up to the largest, present in the
    masks or not (Captum takes any). Refused past the inputs' scalars and Lime's MAX_FEATURES, as Lime refuses its
    span of ids: one order at a time is drawn over them."""
    limit = max(sum(math.prod(x.shape[1:]) for x in task.inputs), MAX_FEATURES)
    if count > limit:
        raise InvalidArgument(
            f"feature_masks use id {count - 1}; {ShapleyValueSampling.name} draws orders of every id from 0 to the largest, "
            f"{count} here, over this server's limit of {limit}; number the features 0 .. n_features - 1"
        )
    return count


def _prefixes(rank: Tensor) -> Callable[[int, int], Tensor]:
    """(a, b) → (b - a, P) bool, coalitions a..b-1 of [no feature; every feature; order s's first j features for each
    order s and j = 1 .. P-1]. rank: (ns, P), each feature's position in each order."""
    n_feat = int(rank.shape[1])

    def members(a: int, b: int) -> Tensor:
        k = torch.arange(a, b)
        out = (k == 1).view(-1, 1).expand(b - a, n_feat).clone()  # coalition 1: every feature
        prefix = k >= 2
        if bool(prefix.any()):
            j = k[prefix] - 2
            out[prefix] = rank[j // (n_feat - 1)] < (j % (n_feat - 1) + 1).view(-1, 1)
        return out

    return members


class ShapleyValueSampling(Algorithm):
    name = "shapley_value_sampling"
    pass_kind = PassKind.FORWARD
    params_type = ShapleyValueSamplingParams
    needs_input_gradients = False
    uses_feature_mask = True
    uses_baselines = True
    rows_per_pass = True

    def check_params(self, params: ShapleyValueSamplingParams, limits: Limits) -> None:
        # NOTE: Captum takes n_samples <= 0 too: no order is drawn and every attribution is 0 / 0, NaN. So does this one.
        check_positive(params.n_samples, f"{self.name}.n_samples", limits.max_nt_samples, minimum=-(2**63))
        check_perturbations_per_eval(params.perturbations_per_eval, self.name)

    def rows(self, task: Task, n_examples: int) -> int:
        check_has_features(task, self.name)
        n_feat, _, high = mask_features(task)
        check_feature_ids(task, high + 1)
        # the baseline, the full input, and each order's n_feat - 1 proper prefixes
        return n_examples * (2 + max(task.params.n_samples, 0) * (n_feat - 1))

    def plan(self, task: Task) -> Plan:
        p: ShapleyValueSamplingParams = task.params
        n, ns = task.n, max(p.n_samples, 0)
        masks = feature_masks_or_default(task)
        total = check_feature_ids(task, n_features(masks))
        ids = feature_ids(masks)  # (P,) present ids
        index = feature_index(masks, ids)
        n_feat = int(ids.numel())
        # 1) Captum's orders: torch.randperm(max id + 1) per sample (shapley_value.py:55-57), ids absent
        #    from every mask dropped — adding one changes no input, so its gain is 0 and lands nowhere.
        position = torch.full((total,), -1, dtype=torch.int64)
        position[ids] = torch.arange(n_feat)
        order = torch.empty((ns, n_feat), dtype=torch.int64)  # (ns, P) feature indices in the order they are added
        for s in range(ns):  # one (total,) permutation at a time: the ids may far outnumber the features
            drawn = position[torch.randperm(total, generator=task.rng.torch_gen)]
            order[s] = drawn[drawn >= 0]
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(n_feat).expand(ns, n_feat))  # (ns, P)
        # 2) coalitions: [baseline; full input; each order's prefixes of 1 .. P-1 features], built a pass at a time
        result = yield coalition_block(task, _prefixes(rank), 2 + ns * (n_feat - 1), index)
        evals = result.selected.view(-1, n)  # (K, n)
        # 3) each order's chain of evaluations, from the baseline to the full input
        chain = torch.cat(
            [evals[0].expand(ns, 1, n), evals[2:].view(ns, n_feat - 1, n), evals[1].expand(ns, 1, n)], dim=1
        )  # (ns, P + 1, n)
        gains = chain[:, 1:] - chain[:, :-1]  # (ns, P, n): gain of the k-th added feature
        per_feature = gains.gather(1, rank.to(gains.device).unsqueeze(-1).expand(ns, n_feat, n))  # (ns, P, n)
        mean = (per_feature.to(torch.float64).sum(0) / ns).to(torch.float32)  # (P, n); Captum accumulates in float32; 0 / 0: NaN
        return Attribution(tuple(spread(mean, idx) for idx in index))


ALGORITHM = ShapleyValueSampling
