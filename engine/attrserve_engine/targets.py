"""Targets: Captum's rules for which output value each example explains, in one place.

A request's target arrives as Captum takes it — None (the output is one value per example), an int, an
index tuple, or a list with one of those per example — or already as an (n, k) int64 tensor.
`format_target` turns it into that tensor: k indices per example into the explained output after dim 0,
which every algorithm expands like any other row (and neuron methods use for their neuron_selector).

The rules (how many indices a target needs, which values are in range) are checked twice: `check_target` when a
request is submitted, and `flat_target` on the worker, for every fused pass, where it also builds the flat index
the executor gathers with. `check_target`'s caller is the engine process's event loop, where a torch call would
hand the GIL to the worker and wait to get it back; so would freeing a tensor, which PyTorch destroys without the
GIL, and `target.numpy()` makes one (the array's base) that dies with the array. So it reads the values as Python
ints (`tolist()` makes no tensor) and checks them in Python (docs/ARCHITECTURE.md, "Threads, the GIL and the hot
path"). `flat_target` works on a CPU target (a pass's, unless a plan moved it) in numpy: a torch call on a few
integers costs several microseconds of dispatch, a numpy call one; a target on another device stays in torch there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from attrserve_engine.errors import InvalidArgument, shown
from attrserve_engine.limits import INT64_MAX, INT64_MIN

# Indices in one target: one per output dim after dim 0 (torch tensors have at most 64 dims; models far fewer).
MAX_INDICES = 32

# What a caller may pass as a target (Captum's forms, or the formatted tensor).
TargetLike = None | int | Sequence[int] | Sequence[int | Sequence[int]] | Tensor


def format_target(target: TargetLike, n: int) -> Tensor:
    """The (n, k) int64 index tuples of a request with n examples (k = 0: the output is a scalar per example)."""
    if target is None:
        return torch.from_numpy(np.zeros((n, 0), dtype=np.int64))
    if isinstance(target, Tensor):
        if target.dim() != 2 or target.shape[0] != n:
            raise InvalidArgument(f"target must give an index tuple per example, shape ({n}, k); got {tuple(target.shape)}")
        return target if target.dtype is torch.int64 else target.to(torch.int64)
    # numpy, then a zero-copy view: no torch arithmetic on the caller's thread.
    if isinstance(target, (int, np.integer)):
        check_int64([int(target)], "target")
        return torch.from_numpy(np.full((n, 1), int(target), dtype=np.int64))
    if isinstance(target, tuple):
        if len(target) > MAX_INDICES:
            raise InvalidArgument(f"target.tuple has {len(target)} indices; an output has far fewer dims (at most {MAX_INDICES})")
        try:
            index = np.asarray(target, dtype=np.int64).reshape(1, len(target))
        except OverflowError:
            check_int64(target, "target.tuple")
            raise
        return torch.from_numpy(np.ascontiguousarray(np.broadcast_to(index, (n, len(target)))))
    if len(target) != n:  # before building anything: the count alone refuses a huge list
        raise InvalidArgument(f"target.per_example has {len(target)} entries; there are {n} examples")
    rows = [(row,) if isinstance(row, (int, np.integer)) else tuple(row) for row in target]
    if len({len(r) for r in rows}) > 1:
        raise InvalidArgument("target.per_example entries must all have the same number of indices")
    if rows and len(rows[0]) > MAX_INDICES:
        raise InvalidArgument(
            f"target.per_example entries have {len(rows[0])} indices; an output has far fewer dims (at most {MAX_INDICES})"
        )
    try:
        return torch.from_numpy(np.asarray(rows, dtype=np.int64).reshape(n, len(rows[0]) if rows else 0))
    except OverflowError:  # only then look for the value (the common path pays nothing)
        for i, row in enumerate(rows):
            check_int64(row, f"target.per_example[{i}]")
        raise


def check_int64(values: Sequence[int], what: str) -> None:
    """Refuse an index past int64 (InvalidArgument naming `what`): no output dim is that large, and no tensor holds it."""
    for value in values:
        if isinstance(value, (int, np.integer)) and not INT64_MIN <= int(value) <= INT64_MAX:
            raise InvalidArgument(f"{what} index {shown(int(value))} is out of range: an index must fit in an int64")


def index_width(target: Tensor, out_shape: tuple[int, ...], what: str = "target") -> int:
    """k of a (rows, k) index tuple, checked against the explained output's shape (Captum's target rules)."""
    k = int(target.shape[1])
    if k > len(out_shape):
        raise InvalidArgument(f"{what} has {k} indices but the explained output per example has shape {out_shape}")
    if math.prod(out_shape[k:]) != 1:
        need = len(out_shape) if out_shape else 0
        raise InvalidArgument(
            f"{what} must select one value per example: the explained output per example has shape {out_shape}, "
            f"so {what} needs {need} index(es), got {k}"
        )
    return k


def _out_of_range(what: str, value: int, j: int, size: int) -> InvalidArgument:
    return InvalidArgument(f"{what} index {value} is out of range for output dim {j + 1} of size {size}")


def _flat_numpy(t: np.ndarray, out_shape: tuple[int, ...], k: int, what: str) -> np.ndarray:
    """flat_target on a CPU target's numpy view (k >= 1): a few numpy calls, microseconds where torch's take tens."""
    sizes = np.asarray(out_shape[:k], dtype=np.int64)
    bad = (t < -sizes) | (t >= sizes)
    if bad.any():
        row, j = np.argwhere(bad)[0]
        raise _out_of_range(what, int(t[row, j]), int(j), out_shape[j])
    wrapped = np.remainder(t, sizes)
    if k == 1:
        return np.ascontiguousarray(wrapped[:, 0])
    return wrapped @ np.asarray([math.prod(out_shape[j + 1 : k]) for j in range(k)], dtype=np.int64)


def check_target(target: Tensor, out_shape: tuple[int, ...], what: str = "target") -> None:
    """flat_target's checks on the request's CPU tensor, on its values as Python ints (see the module doc)."""
    k = index_width(target, out_shape, what)
    if not k:
        return
    sizes = out_shape[:k]
    for row in target.tolist():
        for j, (value, size) in enumerate(zip(row, sizes)):
            if not -size <= value < size:
                raise _out_of_range(what, value, j, size)


def flat_target(target: Tensor, out_shape: tuple[int, ...], what: str = "target") -> Tensor:
    """(rows, k) index tuples → (rows,) flat index into each row's output; negative indices count from the end.

    `what` names the index in messages: the target, or a neuron method's neuron_selector.
    A handful of array operations whatever the row count: the executor calls it once per fused pass.
    """
    k = index_width(target, out_shape, what)
    if k == 0:
        return torch.zeros(target.shape[0], dtype=torch.int64, device=target.device)
    if target.device.type == "cpu":
        return torch.from_numpy(_flat_numpy(target.numpy(), out_shape, k, what))
    return _flat_torch(target, out_shape, k, what)


def _flat_torch(target: Tensor, out_shape: tuple[int, ...], k: int, what: str) -> Tensor:
    """flat_target on the target's own device (k >= 1): no copy to the CPU and back for a GPU's pass."""
    sizes = torch.tensor(out_shape[:k], dtype=torch.int64, device=target.device)
    bad = (target < -sizes) | (target >= sizes)
    if bool(bad.any()):
        row, j = (int(v) for v in bad.nonzero()[0])
        raise _out_of_range(what, int(target[row, j]), j, out_shape[j])
    wrapped = torch.remainder(target, sizes)
    if k == 1:
        return wrapped[:, 0]
    strides = torch.tensor([math.prod(out_shape[j + 1 : k]) for j in range(k)], dtype=torch.int64, device=target.device)
    return (wrapped * strides).sum(1)


def fused_flat_target(targets: list[Tensor], out_shape: tuple[int, ...], failures: list, what: str = "target") -> Tensor:
    """One fused pass's flat target: one flat_target over every segment's targets; when that fails, segment by
    segment, so only the segments with bad targets get their error in `failures` (their rows select index 0)."""
    try:
        return flat_target(torch.cat(targets) if len(targets) > 1 else targets[0], out_shape, what)
    except InvalidArgument:
        pass
    flats = []
    for s, target in enumerate(targets):
        try:
            flats.append(flat_target(target, out_shape, what))
        except InvalidArgument as e:
            failures[s] = e
            flats.append(torch.zeros(target.shape[0], dtype=torch.int64, device=target.device))
    return torch.cat(flats)
