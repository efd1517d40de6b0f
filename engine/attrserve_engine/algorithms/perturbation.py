"""Shared pieces of the perturbation methods (FeatureAblation, FeaturePermutation, Occlusion, Shapley, Lime, KernelShap).

Feature masks in Captum's numbering, the rows that mix an input with a
replacement feature by feature, and the spreading of per-feature values back
onto the input's positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from attrserve_engine.errors import InvalidArgument
from attrserve_engine.plan import Block, PassKind, Rows, Task, repeat_rows, settled


def feature_masks_or_default(task: Task) -> tuple[Tensor, ...]:
    """The request's masks, or Captum's default: every scalar of every input its own feature, numbered across inputs.

    Captum's `_format_feature_mask(None, inputs)` (captum/_utils/common.py:195) numbers
    input 0's scalars 0..k0-1, input 1's k0..k0+k1-1, and so on. Each mask is
    int64 (1 or n, *feature_shape).
    """
    if task.feature_masks:
        return task.feature_masks
    masks, offset = [], 0
    for x in task.inputs:
        count = math.prod(x.shape[1:])
        masks.append((torch.arange(count, device=x.device) + offset).reshape((1, *x.shape[1:])))
        offset += count
    return tuple(masks)


def mask_features(task: Task) -> tuple[int, int, int]:
    """(how many feature ids are present, the smallest, the largest) in the request's masks, or in Captum's default
    (every scalar its own id): what `rows` and the checks before a plan need, read without torch. They run on the
    engine process's event loop (Engine._prepare), where a torch call or a freed tensor hands the GIL to the worker
    (docs/ARCHITECTURE.md, "Threads, the GIL and the hot path"), so the masks are read as numpy arrays
    (`np.from_dlpack` makes no tensor) and the default masks are not built. (0, 0, -1) without any id."""
    if not task.feature_masks:
        total = sum(math.prod(x.shape[1:]) for x in task.inputs)
        return total, 0, total - 1
    present = [np.unique(a) for a in _mask_arrays(task)]
    if not present:
        return 0, 0, -1
    ids = np.unique(np.concatenate(present))
    return len(ids), int(ids[0]), int(ids[-1])


def mask_id_range(task: Task) -> tuple[int, int] | None:
    """(the smallest, the largest) feature id, as mask_features reads them but without counting the distinct ids (a
    sort): None without any id."""
    if not task.feature_masks:
        total = sum(math.prod(x.shape[1:]) for x in task.inputs)
        return (0, total - 1) if total else None
    arrays = _mask_arrays(task)
    return (min(int(a.min()) for a in arrays), max(int(a.max()) for a in arrays)) if arrays else None


def _mask_arrays(task: Task) -> list[np.ndarray]:
    """The request's non-empty masks as numpy arrays (views: np.from_dlpack makes no tensor)."""
    return [np.from_dlpack(m if m.device.type == "cpu" else m.cpu()) for m in task.feature_masks if m.numel()]


def n_features(masks: tuple[Tensor, ...]) -> int:
    """Captum's `_get_max_feature_index(...) + 1`: feature ids are expected to run from 0."""
    return int(max(int(m.max()) for m in masks if m.numel())) + 1


def check_has_features(task: Task, owner: str) -> None:
    """Methods that number features by their ids (Lime, KernelShap, ShapleyValueSampling) need at least one scalar."""
    if not any(math.prod(x.shape[1:]) for x in task.inputs):
        shapes = ", ".join(str(tuple(x.shape)) for x in task.inputs[:8])
        raise InvalidArgument(f"inputs have no scalars after dim 0 ({shapes}); {owner} needs at least one feature to attribute to")


def feature_ids(masks: tuple[Tensor, ...]) -> Tensor:
    """The feature ids present in the masks, in Captum's order (`_get_feature_idx_to_tensor_idx`):
    each mask's sorted unique ids, in order of first appearance across inputs. int64 (P,)."""
    seen: dict[int, None] = {}
    for m in masks:
        seen.update(dict.fromkeys(torch.unique(m).tolist()))
    return torch.tensor(list(seen), dtype=torch.int64)


def feature_index(masks: tuple[Tensor, ...], ids: Tensor) -> tuple[Tensor, ...]:
    """Per input, each position's feature as an index into `ids`: int64 (1 or n, *feature_shape)."""
    sorted_ids, order = torch.sort(ids)
    out = []
    for m in masks:
        sorted_ids_d, order_d = sorted_ids.to(m.device), order.to(m.device)
        out.append(order_d[torch.searchsorted(sorted_ids_d, m.contiguous())])
    return tuple(out)


def tensors_with_feature(masks: tuple[Tensor, ...], ids: Tensor) -> list[list[int]]:
    """For each feature in `ids`, the inputs its id appears in (ascending), as Captum's feature→tensor map."""
    where: dict[int, list[int]] = {int(f): [] for f in ids.tolist()}
    for i, m in enumerate(masks):
        for f in torch.unique(m).tolist():
            where[int(f)].append(i)
    return [where[int(f)] for f in ids.tolist()]


def chosen_positions(members: Tensor, index: Tensor) -> Tensor:
    """members: (K, P) bool, which features each of K rows picks; index: (1 or n, *feature_shape).

    Returns (K, 1 or n, *feature_shape) bool: the positions each row picks.
    """
    return members[:, index]


def mix_rows(chosen: Tensor, picked: Tensor, other: Tensor, n: int) -> Tensor:
    """Row k of example e: `picked` where chosen[k] else `other`, as (K * n, *feature_shape), row-major in (k, e).

    chosen: (K, 1 or n, *fs) bool; picked, other: (1 or n, *fs) or (K, n, *fs).
    NOTE: Captum writes x * (1 - mask) + b * mask; with a 0/1 mask and finite
    values that is exactly torch.where, which also keeps integer (token id) inputs integer.
    """
    k, feature_shape = chosen.shape[0], tuple(chosen.shape[2:])
    rows = torch.where(chosen, picked, other)  # (K, 1 or n, *fs)
    return rows.expand((k, n) + feature_shape).reshape((k * n,) + feature_shape)


Chosen = Callable[[int, int], Tensor]  # (a, b) → (b - a, 1 or n, *feature_shape) bool: the positions coalitions a..b-1 pick


def coalition_rows(chosen: Chosen, count: int, picked: Tensor | Chosen, other: Tensor, n: int) -> Rows:
    """`mix_rows` for `count` coalitions, built a pass at a time (`Rows`): row (k, e) of example e is `picked` where
    coalition k picks, `other` elsewhere; coalition-major, `count * n` rows.

    picked, other: (1 or n, *fs) tensors; `picked` may instead be a function of (a, b) giving (b - a, n, *fs), one
    replacement per coalition (FeaturePermutation's shuffled examples)."""
    shape = tuple(other.shape[1:])
    dtype = torch.result_type(picked, other) if isinstance(picked, Tensor) else other.dtype

    def make(start: int, stop: int) -> Tensor:
        a, b = start // n, -(-stop // n)  # the coalitions these rows belong to
        replacement = picked if isinstance(picked, Tensor) else picked(a, b)
        return mix_rows(chosen(a, b), replacement, other, n)[start - a * n : stop - a * n]

    return Rows(count * n, shape, dtype, other.device, make)


def one_feature_each(n_feat: int, index: Tensor) -> Chosen:
    """Coalition k is feature k alone (FeatureAblation, FeaturePermutation): its positions in `index`."""

    def chosen(a: int, b: int) -> Tensor:
        members = torch.arange(a, b, device=index.device).view(-1, 1) == torch.arange(n_feat, device=index.device)  # (b - a, P)
        return chosen_positions(members, index)

    return chosen


def spread(values: Tensor, index: Tensor) -> Tensor:
    """Per-feature values (P, n) onto an input's positions: (n, *feature_shape), each position its feature's value."""
    n = values.shape[1]
    flat = index.expand((n,) + tuple(index.shape[1:])).reshape(n, -1)  # (n, numel)
    return values.t().gather(1, flat.to(values.device)).reshape((n,) + tuple(index.shape[1:]))


def forward_block(inputs: tuple[Tensor | Rows, ...], task: Task, times: int) -> Block:
    """A FORWARD block of `times` groups of the request's n examples, each group with the request's args (built per
    pass) and targets."""
    return Block(
        kind=PassKind.FORWARD,
        inputs=tuple(map(settled, inputs)),
        args=tuple(settled(Rows.repeated(a, times)) if times > 1 else a for a in task.args),
        target=repeat_rows(task.target, times),
    )


def check_perturbations_per_eval(value: int, owner: str) -> None:
    """Captum asserts perturbations_per_eval >= 1; attrserve fuses rows itself, so the value only matters where
    Captum's random draws depend on it (FeaturePermutation)."""
    if value < 1:
        raise InvalidArgument(f"{owner}.perturbations_per_eval must be at least 1, got {value}")


def coalition_block(task: Task, members: Callable[[int, int], Tensor], count: int, index: tuple[Tensor, ...]) -> Block:
    """One FORWARD row group per coalition: the inputs on the coalition's features, baselines elsewhere.

    members(a, b): (b - a, P) bool, coalitions a..b-1 over the features of `index`; `count` coalitions. Rows are
    coalition-major, (count * n) per input, built a pass at a time.
    """

    def on(idx: Tensor) -> Chosen:
        return lambda a, b: chosen_positions(members(a, b).to(idx.device), idx)

    rows = tuple(coalition_rows(on(idx.to(x.device)), count, x, b, task.n) for x, b, idx in zip(task.inputs, task.baselines, index))
    return forward_block(rows, task, count)
