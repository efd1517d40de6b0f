"""Request formatting: a job's inputs, baselines, feature masks and target checked and put in the shapes algorithms expect.

Every check raises InvalidArgument with a message that names the field and
the expected and given values.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from attrserve_engine.errors import InvalidArgument, shown
from attrserve_engine.job import AttributionJob, InputCast
from attrserve_engine.models import LoadedModel


def check_tensor(value: object, label: str, what: str = "a tensor") -> Tensor:
    """`value` where it is a tensor; else INVALID_ARGUMENT naming `label` (the wire carries tensors, an in-process
    caller may pass anything: an int's missing .dim() was an AttributeError, INTERNAL)."""
    if not isinstance(value, Tensor):
        raise InvalidArgument(f"{label} is {type(value).__name__}; send {what}")
    return value


def check_inputs(job: AttributionJob, model: LoadedModel) -> tuple[tuple[Tensor, ...], tuple[InputCast, ...]]:
    """The job's inputs checked against the model, in the dtypes it computes in, and the casts made to get them."""
    inputs = tuple(job.inputs)
    if not inputs:
        raise InvalidArgument("inputs is empty; send one tensor per model input")
    for i, x in enumerate(inputs):
        if check_tensor(x, f"inputs[{i}]").dim() == 0:
            raise InvalidArgument(f"inputs[{i}] is a scalar; dim 0 must index examples")
        if x.shape[0] != inputs[0].shape[0]:
            raise InvalidArgument(f"inputs[{i}] has {x.shape[0]} examples but inputs[0] has {inputs[0].shape[0]}")
    if inputs[0].shape[0] == 0:
        raise InvalidArgument("inputs have 0 examples")
    return model.conform_inputs(inputs)


@functools.lru_cache(maxsize=512)
def constant_baseline(feature_shape: tuple[int, ...], dtype: torch.dtype, value: float) -> Tensor:
    """A (1, *feature_shape) baseline of one value, made once and shared by every request that uses it.

    Read-only like every tensor of a task. `device_copies` keeps its copy on each device the models live
    on (Task.to uses it), so a request without baselines costs no allocation and no host-to-device copy.
    """
    t = torch.full((1, *feature_shape), value, dtype=dtype)
    t.device_copies = {}  # type: ignore[attr-defined]  # an attribute of our own on this one tensor (read by plan._mover)
    return t


def scalar_filled(fill: Callable[[float], Tensor], value: float, dtype: torch.dtype, what: str) -> Tensor:
    """fill(value): a tensor of `dtype` filled with a client's number, or InvalidArgument naming `what` where the dtype
    cannot hold it (torch raises RuntimeError "value cannot be converted to type float without overflow" for 1e300 in
    float32, 300 in uint8, NaN in int64; float() an OverflowError for an int past a double), not an INTERNAL error."""
    try:
        return fill(float(value))
    except OverflowError:
        raise InvalidArgument(f"{what} is {shown(value)}, too large for a number") from None
    except RuntimeError as e:
        if "overflow" not in str(e):
            raise
        name = str(dtype).removeprefix("torch.")
        raise InvalidArgument(f"{what} is {shown(value)}, which {name} (the dtype it fills) cannot hold") from None


def format_baselines(baselines: tuple, inputs: tuple[Tensor, ...], distribution: bool) -> tuple[Tensor, ...]:
    """Each baseline → (b, *feature_shape) in the input's dtype: b = 1, n, or (distributions) any m."""
    if baselines and len(baselines) != len(inputs):
        raise InvalidArgument(f"give one baseline per input ({len(inputs)}) or none, got {len(baselines)}")
    out = []
    for i, x in enumerate(inputs):
        b = baselines[i] if baselines else None
        feature_shape = tuple(x.shape[1:])
        if b is None or isinstance(b, (int, float)):
            out.append(scalar_filled(functools.partial(constant_baseline, feature_shape, x.dtype), b or 0, x.dtype, f"baselines[{i}]"))
            continue
        if check_tensor(b, f"baselines[{i}]", "a number or a tensor").dim() == 0:
            b = b.reshape(1, *([1] * len(feature_shape)))
        elif b.dim() == x.dim() - 1:
            b = b.unsqueeze(0)
        if b.dim() != x.dim():
            raise InvalidArgument(f"baselines[{i}] has shape {tuple(b.shape)}; it must broadcast to inputs[{i}] {tuple(x.shape)}")
        # Each torch call below is skipped where it would change nothing: this runs on the engine process's event loop
        # (docs/ARCHITECTURE.md, "Threads, the GIL and the hot path"), and a baseline sent whole needs none of them.
        if tuple(b.shape[1:]) != feature_shape:
            try:
                b = torch.broadcast_to(b, (b.shape[0], *feature_shape))
            except RuntimeError:
                shapes = f"baselines[{i}] has shape {tuple(b.shape)}; it must broadcast to inputs[{i}] {tuple(x.shape)}"
                raise InvalidArgument(shapes) from None
        if not distribution and b.shape[0] not in (1, x.shape[0]):
            raise InvalidArgument(f"baselines[{i}] has {b.shape[0]} rows; give 1 or one per example ({x.shape[0]})")
        if distribution and b.shape[0] == 0:  # nothing to draw from (GradientShap, draw_baseline_from_distrib)
            raise InvalidArgument(f"baselines[{i}] has 0 rows: an empty baseline distribution, nothing to draw from")
        if b.dtype != x.dtype:
            b = b.to(x.dtype)
        out.append(b if b.is_contiguous() else b.contiguous())
    return tuple(out)


def format_feature_masks(masks: tuple, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Each mask → int64 (1 or n, *feature_shape): Captum's feature_mask, one per input (or none)."""
    if not masks:
        return ()
    if len(masks) != len(inputs):
        raise InvalidArgument(f"give one feature mask per input ({len(inputs)}) or none, got {len(masks)}")
    out = []
    for i, (m, x) in enumerate(zip(masks, inputs)):
        if check_tensor(m, f"feature_masks[{i}]").is_floating_point() or m.dtype == torch.bool:
            raise InvalidArgument(f"feature_masks[{i}] must hold integer feature ids, got dtype {str(m.dtype).replace('torch.', '')}")
        # In numpy: this runs on the engine process's event loop, where a torch call or a freed tensor hands the GIL to
        # the worker (docs/ARCHITECTURE.md, "Threads, the GIL and the hot path"); np.from_dlpack makes no tensor.
        a = np.from_dlpack(m if m.device.type == "cpu" else m.cpu())
        if a.ndim == x.dim() - 1:
            a = a[np.newaxis]
        if a.ndim != x.dim() or a.shape[0] not in (1, x.shape[0]):
            raise InvalidArgument(
                f"feature_masks[{i}] has shape {tuple(a.shape)}; "
                f"it must broadcast to inputs[{i}] {tuple(x.shape)} with 1 or {x.shape[0]} rows"
            )
        try:
            a = np.broadcast_to(a, (a.shape[0], *x.shape[1:]))
        except ValueError:
            raise InvalidArgument(
                f"feature_masks[{i}] has shape {tuple(a.shape)}; it must broadcast to inputs[{i}] {tuple(x.shape)}"
            ) from None
        if a.size and a.min() < 0:
            raise InvalidArgument(f"feature_masks[{i}] has negative feature ids")
        out.append(torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)))
    return tuple(out)
