"""Executor: runs one fused pass (rows of many plans, one batch key) on a resident model."""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from attrserve_engine.errors import AttributionError, InvalidArgument, ResourceExhausted
from attrserve_engine.plan import DEEPLIFT, FORWARD, Block, BlockResult, concat_results, slice_block
from attrserve_engine.registry import LoadedModel
from attrserve_engine.rules.deeplift import DeepLiftRules, SegmentLayout

log = logging.getLogger(__name__)

SegmentOutcome = BlockResult | AttributionError


def run_pass(model: LoadedModel, segments: list[Block]) -> list[SegmentOutcome]:
    """Run `segments` (same batch key) as one pass; one outcome per segment, in order.

    NOTE: a failure is pinned on the segment that causes it: a failing fused
    pass is re-run in halves, so one bad request never fails its neighbours.
    Out-of-memory splits the same way, down to halves of a single block.
    """
    try:
        return _fused_pass(model, segments)
    except AttributionError as e:
        if len(segments) == 1:
            return [e]
    except torch.cuda.OutOfMemoryError:
        if len(segments) == 1:
            block = segments[0]
            if not block.splittable or block.rows == 1:
                return [ResourceExhausted(f"model {model.name!r} ran out of device memory on {block.rows} rows")]
            torch.cuda.empty_cache()
            half = block.rows // 2
            outcomes = run_pass(model, [slice_block(block, 0, half)]) + run_pass(
                model, [slice_block(block, half, block.rows)]
            )
            failed = [o for o in outcomes if isinstance(o, AttributionError)]
            return [failed[0]] if failed else [concat_results(outcomes)]  # type: ignore[arg-type]
        torch.cuda.empty_cache()
    except Exception as e:  # a model that raises on some input
        if len(segments) == 1:
            log.debug("model %s failed on a block", model.name, exc_info=True)
            return [InvalidArgument(f"model {model.name!r} failed on this input: {type(e).__name__}: {e}")]
    half = len(segments) // 2
    return run_pass(model, segments[:half]) + run_pass(model, segments[half:])


def flat_target(target: Tensor, out_shape: tuple[int, ...]) -> Tensor:
    """(rows, k) index tuples → (rows,) flat index into each row's output; Captum's target rules."""
    k = int(target.shape[1])
    if k > len(out_shape):
        raise InvalidArgument(f"target has {k} indices but the model output per example has shape {out_shape}")
    rest = math.prod(out_shape[k:])
    if rest != 1:
        need = len(out_shape) if out_shape else 0
        raise InvalidArgument(
            f"target must select one value per example: the output per example has shape {out_shape}, "
            f"so the target needs {need} index(es), got {k}"
        )
    flat = torch.zeros(target.shape[0], dtype=torch.int64, device=target.device)
    for j in range(k):
        size = out_shape[j]
        col = target[:, j]
        if bool(((col < -size) | (col >= size)).any()):
            bad = int(col[(col < -size) | (col >= size)][0])
            raise InvalidArgument(f"target index {bad} is out of range for output dim {j + 1} of size {size}")
        flat = flat * size + torch.remainder(col, size)
    return flat


def _fused_pass(model: LoadedModel, segments: list[Block]) -> list[SegmentOutcome]:
    kind = segments[0].kind
    paired = kind == DEEPLIFT
    n_inputs = len(segments[0].inputs)
    seg_rows = [int(s.inputs[0].shape[0]) for s in segments]
    # 1) stack rows; DEEPLIFT keeps Captum's pairing: [inputs of all segments; refs of all segments]
    def stack(parts: list[Tensor]) -> Tensor:
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    xs = []
    for i in range(n_inputs):
        parts = [s.inputs[i] for s in segments] + ([s.refs[i] for s in segments] if paired else [])  # type: ignore[index]
        xs.append(stack(parts))
    args = []
    for j in range(len(segments[0].args)):
        parts = [s.args[j] for s in segments]
        args.append(stack(parts * 2 if paired else parts))
    grad_mode = kind != FORWARD
    if grad_mode:
        for i, x in enumerate(xs):
            if not x.is_floating_point():
                raise InvalidArgument(f"inputs[{i}] has dtype {x.dtype}; gradient methods need floating point inputs")
            xs[i] = x.detach().requires_grad_(True)  # a fresh leaf, whatever the plan built
    rules = DeepLiftRules(model.module, eps=segments[0].options[0], layout=SegmentLayout.of(seg_rows, xs[0].device)) if paired else None

    # 2) forward, select each row's target, backward
    with torch.set_grad_enabled(grad_mode):
        if rules is not None:
            rules.install()
        try:
            out = model.forward(*xs, *args)  # (R, *out_shape)
            out_shape = tuple(out.shape[1:])
            outcomes: list[SegmentOutcome | None] = [None] * len(segments)
            flats = []
            for s, seg in enumerate(segments):
                try:
                    flats.append(flat_target(seg.target, out_shape))
                except InvalidArgument as e:
                    outcomes[s] = e
                    flats.append(torch.zeros(seg_rows[s], dtype=torch.int64, device=out.device))
            flat = stack(flats * 2 if paired else flats)
            selected = out.reshape(out.shape[0], -1).gather(1, flat[:, None].to(out.device)).squeeze(1)  # (R,)
            grads: tuple[Tensor, ...] | None = None
            if grad_mode:
                objective = selected.sum()
                if any(o is not None for o in outcomes):  # rows of rejected segments must not contribute
                    keep = torch.cat([torch.full((r,), float(o is None), device=out.device) for r, o in zip(seg_rows, outcomes)])
                    objective = (selected * (torch.cat([keep, keep]) if paired else keep).to(selected.dtype)).sum()
                raw = torch.autograd.grad(objective, xs, allow_unused=True)
                grads = tuple(torch.zeros_like(x) if g is None else g for x, g in zip(xs, raw))
        finally:
            if rules is not None:
                rules.remove()

    # 3) split per segment
    out = out.detach()
    selected = selected.detach()
    start = 0
    for s, rows in enumerate(seg_rows):
        if outcomes[s] is None:
            stop = start + rows
            outcomes[s] = BlockResult(
                outputs=out[start:stop],
                selected=selected[start:stop],
                grads=None if grads is None else tuple(g[start:stop] for g in grads),
            )
        start += rows
    return outcomes  # type: ignore[return-value]
