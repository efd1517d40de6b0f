"""Shared pieces of the perturbation methods (FeatureAblation, Occlusion, Shapley, Lime, KernelShap): feature masks."""

from __future__ import annotations

import torch
from torch import Tensor

from attrserve_engine.plan import Task


def feature_masks_or_default(task: Task) -> tuple[Tensor, ...]:
    """The request's masks, or Captum's default: every scalar of every input its own feature, numbered across inputs.

    Each mask is int64 (1 or n, *feature_shape).
    """
    if task.feature_masks:
        return task.feature_masks
    masks, offset = [], 0
    for x in task.inputs:
        count = int(torch.tensor(x.shape[1:]).prod()) if x.dim() > 1 else 1
        masks.append((torch.arange(count, device=x.device) + offset).reshape((1, *x.shape[1:])))
        offset += count
    return tuple(masks)


def n_features(masks: tuple[Tensor, ...]) -> int:
    """Captum's `_get_max_feature_index(...) + 1`: feature ids are expected to run from 0."""
    return int(max(int(m.max()) for m in masks if m.numel())) + 1
