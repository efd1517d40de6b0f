"""Occlusion (Captum's Occlusion): slide a baseline window over each input; each position gets the mean output drop
of the windows that cover it."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attrserve_engine.algorithms.base import Algorithm, Limits, example_baselines, parse_dataclass
from attrserve_engine.algorithms.perturbation import check_perturbations_per_eval, coalition_rows, forward_block
from attrserve_engine.errors import InvalidArgument, shown
from attrserve_engine.plan import Attribution, PassKind, Plan, Rows, Task


@dataclass(frozen=True)
class OcclusionParams:
    # One window shape per input; a flat tuple is the window of a single input (as in Captum).
    sliding_window_shapes: Any = None
    # None: 1 along every dim; an int for all inputs; or one int / tuple per input (as in Captum).
    strides: Any = None
    perturbations_per_eval: int = 1  # changes no number: attrserve packs passes itself


def _int_tuple(value: Any, label: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise InvalidArgument(f"{label} must be a list of integers, got {shown(value)}")
    return tuple(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integral(value: Any) -> Any:
    """Whole floats as ints, in nested lists too: a protobuf Struct (custom_params, also[i].params) has only doubles."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_integral(v) for v in value)
    return value


# What a request's windows need besides its own numbers (the windows' masks, which windows cover each position) depends
# only on the windows and the input's shape, which the requests of one model and one parameter set share. So it is
# built once and kept, for the last _KEPT (windows, shape, device); the masks of all windows only while they take at
# most _MASKS_KEPT_BYTES (bench W4: 64 windows on 3x32x32, 192 KiB), and a pass's share of them is then a view. Larger
# ones (one 1x1 window per position of a 224x224 image: 22 GiB) are still built a pass at a time. Kept tensors are
# shared by every request that uses them: nothing writes to them.
_KEPT = 64
_MASKS_KEPT_BYTES = 1 << 20


@dataclass(frozen=True)
class Windows:
    """One input's sliding windows: shape, stride and window count per dim (Captum's shift_counts)."""

    shape: tuple[int, ...]
    strides: tuple[int, ...]
    counts: tuple[int, ...]

    @property
    def total(self) -> int:
        return math.prod(self.counts)

    def masks(self, sizes: tuple[int, ...], device: torch.device, start: int, stop: int) -> Tensor:
        """(stop - start, *sizes) bool, windows start..stop-1 in Captum's numbering (dim 0's window index fastest,
        occlusion.py:312-318): mask k is the positions window k occludes. A view of the kept masks where they are kept."""
        every = _all_masks(self, sizes, device)
        return every[start:stop] if every is not None else self.build_masks(sizes, device, start, stop)

    def build_masks(self, sizes: tuple[int, ...], device: torch.device, start: int, stop: int) -> Tensor:
        """`masks`, built."""
        k = torch.arange(start, stop, device=device)
        mask = torch.ones((stop - start,) + (1,) * len(sizes), dtype=torch.bool, device=device)
        step = 1
        for d, cov in enumerate(_cover(self, sizes, device)):
            view = [stop - start] + [1] * len(sizes)
            view[1 + d] = sizes[d]
            mask = mask & cov[(k // step) % self.counts[d]].view(view)  # this window's interval along dim d
            step *= self.counts[d]
        return mask

    def average(self, drops: Tensor, sizes: tuple[int, ...]) -> Tensor:
        """drops: (total, n) output drop per window → (n, *sizes) mean drop over the windows covering each position.

        The sum over windows factors per dim (a window is a product of intervals), so
        it is D small matmuls rather than a (windows × positions) product.
        """
        n, dims = drops.shape[1], len(sizes)
        cover, count = _cover_counts(self, sizes, drops.device)
        # (n, counts[D-1], ..., counts[0]) → (n, counts[0], ..., counts[D-1])
        total = drops.to(torch.float64).t().reshape((n,) + tuple(reversed(self.counts)))
        total = total.permute((0,) + tuple(range(dims, 0, -1)))
        for d, cov in enumerate(cover):
            total = torch.movedim(torch.movedim(total, 1 + d, -1) @ cov, -1, 1 + d)  # window axis d → position axis d
        return (total / count).to(torch.float32)  # (n, *sizes); Captum returns total.float() / weight


@functools.lru_cache(maxsize=_KEPT)
def _cover(w: Windows, sizes: tuple[int, ...], device: torch.device) -> tuple[Tensor, ...]:
    """Per dim d, (counts[d], sizes[d]) bool: which positions the k-th window along d covers. The last window may run
    past the end and is cut off, as Captum's negative padding does."""
    out = []
    for shape, stride, count, size in zip(w.shape, w.strides, w.counts, sizes):
        start = torch.arange(count, device=device).view(count, 1) * stride  # (count, 1)
        pos = torch.arange(size, device=device).view(1, size)  # (1, size)
        out.append((pos >= start) & (pos < start + shape))
    return tuple(out)


@functools.lru_cache(maxsize=_KEPT)
def _cover_counts(w: Windows, sizes: tuple[int, ...], device: torch.device) -> tuple[tuple[Tensor, ...], Tensor]:
    """Windows.average's operands: the cover as float64, and (*sizes) how many windows cover each position."""
    cover = tuple(c.to(torch.float64) for c in _cover(w, sizes, device))
    count = torch.ones((), dtype=torch.float64, device=device)
    for cov in cover:
        count = count.unsqueeze(-1) * cov.sum(0)
    return cover, count


@functools.lru_cache(maxsize=_KEPT)
def _all_masks(w: Windows, sizes: tuple[int, ...], device: torch.device) -> Tensor | None:
    """Every window's mask (Windows.build_masks), where they take at most _MASKS_KEPT_BYTES; else None."""
    if w.total * math.prod(sizes) > _MASKS_KEPT_BYTES:
        return None
    return w.build_masks(sizes, device, 0, w.total)


def _window_masks(w: Windows, x: Tensor) -> Callable[[int, int], Tensor]:
    """(a, b) → (b - a, 1, *fs): the positions of x's features that windows a..b-1 occlude."""
    return lambda a, b: w.masks(tuple(x.shape[1:]), x.device, a, b).unsqueeze(1)


class Occlusion(Algorithm):
    name = "occlusion"
    pass_kind = PassKind.FORWARD
    params_type = OcclusionParams
    needs_input_gradients = False
    uses_baselines = True
    rows_per_pass = True

    def parse_params(self, raw: dict[str, Any], limits: Limits) -> OcclusionParams:
        params = parse_dataclass(self.params_type, raw, self.name)
        shapes = _integral(params.sliding_window_shapes)
        if shapes is None:
            raise InvalidArgument("occlusion.sliding_window_shapes is required: one window shape per input (dims after dim 0)")
        if isinstance(shapes, (list, tuple)) and shapes and all(_is_int(v) for v in shapes):
            shapes = (shapes,)  # one input's window, as Captum accepts
        if not isinstance(shapes, (list, tuple)) or not shapes:
            raise InvalidArgument(f"occlusion.sliding_window_shapes must be one list of integers per input, got {shown(shapes)}")
        shapes = tuple(_int_tuple(s, f"occlusion.sliding_window_shapes[{i}]") for i, s in enumerate(shapes))
        for i, s in enumerate(shapes):
            if any(v < 1 for v in s):
                raise InvalidArgument(f"occlusion.sliding_window_shapes[{i}] must be positive, got {shown(s)}")
        strides = _integral(params.strides)
        if isinstance(strides, (list, tuple)):
            strides = tuple(v if _is_int(v) else _int_tuple(v, f"occlusion.strides[{i}]") for i, v in enumerate(strides))
        elif strides is not None and not _is_int(strides):
            raise InvalidArgument(f"occlusion.strides must be an integer or one integer list per input, got {shown(strides)}")
        params = OcclusionParams(shapes, strides, params.perturbations_per_eval)
        check_perturbations_per_eval(params.perturbations_per_eval, self.name)
        return params

    def windows(self, task: Task) -> list[Windows]:
        """Captum's _format_and_verify_strides / _format_and_verify_sliding_window_shapes and shift counts
        (occlusion.py:217-257), checked against the inputs."""
        p: OcclusionParams = task.params
        n_inputs = len(task.inputs)
        if len(p.sliding_window_shapes) != n_inputs:
            count = len(p.sliding_window_shapes)
            raise InvalidArgument(f"occlusion.sliding_window_shapes has {count} window(s); give one per input ({n_inputs})")
        strides: Any = p.strides
        if strides is None:
            strides = (1,) * n_inputs
        elif _is_int(strides):
            strides = (strides,) * n_inputs
        elif n_inputs == 1 and len(strides) != 1 and all(_is_int(v) for v in strides):
            strides = (strides,)  # one input's per-dim strides, as Captum accepts
        if len(strides) != n_inputs:
            raise InvalidArgument(f"occlusion.strides has {len(strides)} entries; give one per input ({n_inputs})")
        out = []
        for i, (x, shape, stride) in enumerate(zip(task.inputs, p.sliding_window_shapes, strides)):
            sizes = tuple(x.shape[1:])
            label = f"inputs[{i}] {tuple(x.shape)}"
            if len(shape) != len(sizes):
                raise InvalidArgument(f"occlusion.sliding_window_shapes[{i}] is {shown(shape)}; {label} needs {len(sizes)} dims")
            if _is_int(stride) or len(stride) in (0, 1):  # an IntList of one value is Captum's int stride
                stride = (stride if _is_int(stride) else (stride[0] if stride else 1),) * len(sizes)
            if len(stride) != len(sizes):
                raise InvalidArgument(f"occlusion.strides[{i}] is {shown(stride)}; {label} needs one int or {len(sizes)}")
            if any(s < 1 for s in stride):
                raise InvalidArgument(f"occlusion.strides[{i}] must be positive, got {shown(stride)}")
            if any(w > size for w, size in zip(shape, sizes)):
                raise InvalidArgument(f"occlusion.sliding_window_shapes[{i}] {shown(shape)} exceeds {label}")
            if any(size > w and s > w for w, s, size in zip(shape, stride, sizes)):
                raise InvalidArgument(f"occlusion.strides[{i}] {shown(stride)} is larger than the window {shown(shape)}")
            counts = tuple(-(-(size - w) // s) + 1 for w, s, size in zip(shape, stride, sizes))  # ceil((size - w) / s) + 1
            out.append(Windows(shape, stride, counts))
        return out

    def rows(self, task: Task, n_examples: int) -> int:
        # the unoccluded inputs, then one copy per window of each input
        return n_examples * (1 + sum(w.total for w in self.windows(task)))

    def plan(self, task: Task) -> Plan:
        n = task.n
        windows = self.windows(task)
        totals = [w.total for w in windows]
        # NOTE: window features of input i occlude input i only (occlusion.py:332-342); the rows are
        # [inputs; input 0's windows; input 1's windows; ...], the other inputs left as they are.
        # Built a pass at a time: one 1x1 window per position of a 224x224 image is 150,528 copies of it.
        rows = []
        for i, (x, b, w) in enumerate(zip(task.inputs, example_baselines(task), windows)):
            parts: list[Tensor | Rows] = [x]
            for j, count in enumerate(totals):
                if j == i:
                    parts.append(coalition_rows(_window_masks(w, x), count, b, x, n))  # (W_i * n, *fs)
                else:
                    parts.append(Rows.repeated(x, count))
            rows.append(Rows.cat(parts))
        result = yield forward_block(tuple(rows), task, 1 + sum(totals))
        evals = result.selected.view(1 + sum(totals), n)  # (1 + W, n)
        drops = evals[:1] - evals[1:]  # (W, n): initial_eval - modified_eval
        attributions, start = [], 0
        for x, w, count in zip(task.inputs, windows, totals):
            attributions.append(w.average(drops[start : start + count], tuple(x.shape[1:])))
            start += count
        return Attribution(tuple(attributions))


ALGORITHM = Occlusion
