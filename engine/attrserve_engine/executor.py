"""Executor: runs one fused pass (rows of many plans, one batch key) on a resident model."""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from attrserve_engine.errors import AttributionError, FailedPrecondition, InvalidArgument, ResourceExhausted
from attrserve_engine.events import SPLIT_FAILURE, SPLIT_OOM, PassKind
from attrserve_engine.models import LoadedModel
from attrserve_engine.plan import Block, BlockResult, build_rows, concat_results, slice_block
from attrserve_engine.targets import fused_flat_target

log = logging.getLogger(__name__)

SegmentOutcome = BlockResult | AttributionError


def run_pass(
    model: LoadedModel, segments: list[Block], on_split: Callable[[str], None] | None = None, replica: int = 0
) -> list[SegmentOutcome]:
    """Run `segments` (same batch key) as one pass on `model.replicas[replica]`; one outcome per segment, in order.

    NOTE: a failure is pinned on the segment that causes it: a failing fused
    pass is re-run in halves, so one bad request never fails its neighbours.
    Out-of-memory splits the same way, down to halves of a single block.
    `on_split(SPLIT_FAILURE or SPLIT_OOM)` is told of every split.
    """
    if refusal := rnn_gradient_refusal(model, segments[0].kind):
        return [refusal] * len(segments)
    try:
        return _fused_pass(model, segments, model.replicas[replica])
    except AttributionError as e:
        if len(segments) == 1:
            return [e]
        reason = SPLIT_FAILURE
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        reason = SPLIT_OOM
        if len(segments) == 1:
            block = segments[0]
            if not block.splittable or block.rows == 1:
                return [ResourceExhausted(f"model {model.name!r} ran out of device memory on {block.rows} rows")]
            if on_split is not None:
                on_split(reason)
            half = block.rows // 2
            outcomes = run_pass(model, [slice_block(block, 0, half)], on_split, replica) + run_pass(
                model, [slice_block(block, half, block.rows)], on_split, replica
            )
            failed = [o for o in outcomes if isinstance(o, AttributionError)]
            return [failed[0]] if failed else [concat_results(outcomes)]  # type: ignore[arg-type]
    except Exception as e:  # a model that raises on some input
        if len(segments) == 1:
            log.debug("model %s failed on a block", model.name, exc_info=True)
            hint = ""
            if segments[0].layer and "in-place operation" in str(e):
                hint = (
                    f" (the output of layer {segments[0].layer!r} is changed in place after it, e.g. by ReLU(inplace=True), "
                    "and this method hands the model tensors it takes gradients against; Captum fails here too: name the "
                    "module after the in-place op, or build the model with inplace=False)"
                )
            return [InvalidArgument(f"model {model.name!r} failed on this input: {type(e).__name__}: {e}{hint}")]
        reason = SPLIT_FAILURE
    if on_split is not None:
        on_split(reason)
    half = len(segments) // 2
    return run_pass(model, segments[:half], on_split, replica) + run_pass(model, segments[half:], on_split, replica)


class RnnTrainingMode:
    """cuDNN takes an RNN's gradient only in training mode ("cudnn RNN backward can only be called in training mode"),
    so a gradient pass on CUDA runs the model's eval-mode LSTM/GRU/RNN modules in training mode with dropout 0: the
    same numbers as eval mode (dropout is the only thing training mode changes in them), and the one cuDNN accepts.
    Scripted RNNs too, where their (constant) dropout drops nothing (LoadedModel.rnns). Each module's flag and
    dropout are put back after the pass; a replica runs one pass at a time."""

    def __init__(self, rnns: list[torch.nn.Module]) -> None:
        self.rnns = rnns
        self.saved: list[tuple[torch.nn.Module, float | None]] = []  # (module, its dropout to put back)

    def install(self) -> None:
        for rnn in self.rnns:
            if not rnn.training:
                # A scripted RNN's dropout is a constant, and 0 where it is listed (LoadedModel.rnns).
                dropout = rnn.dropout if isinstance(rnn, torch.nn.RNNBase) else None
                self.saved.append((rnn, dropout))
                rnn.training = True
                if isinstance(rnn, torch.nn.RNNBase):
                    rnn.dropout = 0.0

    def remove(self) -> None:
        for rnn, dropout in self.saved:
            rnn.training = False
            if isinstance(rnn, torch.nn.RNNBase) and dropout is not None:
                rnn.dropout = dropout
        self.saved.clear()


def rnn_gradient_refusal(model: LoadedModel, kind: PassKind) -> FailedPrecondition | None:
    """Why a pass of `kind` cannot run: a gradient pass on CUDA through a scripted RNN that RnnTrainingMode cannot
    switch (its dropout is a TorchScript constant that training mode would apply, and cuDNN refuses the gradient in
    eval mode). Names the module and the ways out, instead of cuDNN's "cudnn RNN backward can only be called in
    training mode"; the whole pass is refused at once, not split in search of a culprit."""
    if not model.dropping_rnns or kind is PassKind.FORWARD or model.device.type != "cuda":
        return None
    name, rnn = model.dropping_rnns[0]
    return FailedPrecondition(
        f"model {model.name!r}: its scripted {rnn.original_name} {name or '(the model)'!r} has dropout {rnn.dropout:g} between "
        f"its {rnn.num_layers} layers, fixed by TorchScript; on CUDA, cuDNN takes an RNN's gradient only in training mode, "
        "where that dropout would apply, so methods that take gradients cannot run on it here. Script it with dropout=0 "
        "(eval mode gives the same numbers), serve it unscripted, or serve it on the CPU; methods without gradients "
        "(feature_ablation, occlusion, shapley_values, lime, ...) serve it as it is",
    )


class LayerHook:
    """Captures (or substitutes) a layer's output — or its input — for one fused pass.

    Layer methods use it: capture the activations (and make them something
    gradients can be taken against), or replace them with the rows' own values
    (LayerIntegratedGradients' interpolated activations).
    """

    def __init__(self, module: torch.nn.Module, block: Block, substitute: tuple[Tensor, ...] | None, grad: bool) -> None:
        self.module = module.get_submodule(block.layer)
        self.use_input = block.layer_input
        self.substitute = substitute
        self.grad = grad
        # LayerLRP reads the relevance LRP's rules leave on the gradient of the very tensors the layer consumes
        # (Captum reads its rule's record, not a hook's copy): no clone there.
        self.clone = block.kind is not PassKind.LRP
        self.activations: tuple[Tensor, ...] | None = None
        self.handle: RemovableHandle | None = None

    def _capture(self, acts: tuple) -> tuple:
        """What the model goes on with. Captum's `_forward_layer_distributed_eval`: the kept activations are never the
        tensors the model goes on with, so an in-place op after the layer (`ReLU(inplace=True)`, a residual `+=`)
        leaves them alone — a clone is kept, or, when gradients are taken against them, they are kept and the model
        gets a clone. Substituted values (LayerIntegratedGradients) go in as they are, as in Captum."""
        if self.activations is not None:
            raise InvalidArgument(f"layer {type(self.module).__name__} runs more than once per forward; attribute to a layer used once")
        if self.substitute is not None:
            self.activations = tuple(v.detach().requires_grad_(self.grad) for v in self.substitute)
            return self.activations
        if self.grad:
            self.activations = tuple(a if a.requires_grad else a.detach().requires_grad_() for a in acts)
            return tuple(a.clone() for a in self.activations) if self.clone else self.activations
        self.activations = tuple(a.clone() for a in acts) if self.clone else acts
        return acts

    def install(self) -> None:
        if self.use_input:
            self.handle = self.module.register_forward_pre_hook(lambda mod, inp: self._capture(tuple(inp)))
        else:

            def forward_hook(mod: torch.nn.Module, inp: tuple, out: Tensor | tuple) -> Tensor | tuple:
                acts = self._capture(out if isinstance(out, tuple) else (out,))
                return acts if isinstance(out, tuple) else acts[0]

            self.handle = self.module.register_forward_hook(forward_hook)

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()


class _CpuThreads:
    """CPU passes run together only when they use the same torch intra-op thread count.

    Each model's passes set its own count (ModelConfig.intra_op_threads), and part of that count (MKL's) is the
    process's, not the thread's; replicas' passes run on several workers at once, and a model being loaded runs
    its probe passes on its loading thread (tuning.py). A pass whose count differs from the running ones waits
    until they end, and passes that would join them wait behind it (so it is not starved)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._threads = 0  # the count the running passes use
        self._running = 0
        self._waiting: collections.Counter[int] = collections.Counter()  # passes waiting, by their count

    @contextlib.contextmanager
    def use(self, threads: int) -> Iterator[None]:
        with self._cv:
            self._waiting[threads] += 1
            self._cv.wait_for(lambda: self._running == 0 or (self._threads == threads and self._waiting.total() == self._waiting[threads]))
            self._waiting[threads] -= 1
            self._threads = threads
            self._running += 1
        try:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            yield
        finally:
            with self._cv:
                self._running -= 1
                self._cv.notify_all()


_CPU_THREADS = _CpuThreads()


def _fused_pass(model: LoadedModel, segments: list[Block], module: torch.nn.Module) -> list[SegmentOutcome]:
    if model.device.type != "cpu":
        outcomes = _pass(model, module, segments)
        wait_for_device(model.device)
        return outcomes
    with _CPU_THREADS.use(model.intra_op_threads):
        return _pass(model, module, segments)


def wait_for_device(device: torch.device) -> None:
    """Wait for a GPU to finish the pass just launched. CUDA runs kernels after their launch returns, so without it a
    pass's time is its launches, and the model's rate, the pass-size tuner, worker busy and compute_ms measured that
    (G2 on an H200: passes of 76 ms and "busy 42%" while the GPU ran kernels 87% of the time). It costs no overlap:
    the plans' next steps wait for the results anyway. An asynchronous CUDA error surfaces here, pinned on the pass."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _pass(model: LoadedModel, module: torch.nn.Module, segments: list[Block]) -> list[SegmentOutcome]:
    segments = [build_rows(s) for s in segments]  # rows that plans left lazy are made now, one pass's worth
    first = segments[0]
    kind = first.kind
    paired = first.refs is not None
    seg_rows = [int(s.inputs[0].shape[0]) for s in segments]

    # 1) stack rows; paired passes keep Captum's layout: [inputs of all segments; refs of all segments]
    def stack(parts: list[Tensor]) -> Tensor:
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def stacked(field: str, twice: bool = False) -> list[Tensor]:
        count = len(getattr(first, field) or ())
        return [stack([getattr(s, field)[i] for s in segments] * (2 if twice else 1)) for i in range(count)]

    xs = [stack([s.inputs[i] for s in segments] + ([s.refs[i] for s in segments] if paired else [])) for i in range(len(first.inputs))]  # type: ignore[index,arg-type]  # tensors: built above
    args = stacked("args", twice=paired)
    grad_mode = kind is not PassKind.FORWARD
    xs = [model.laid_out(x, forward=not grad_mode) for x in xs]  # the layout its load set (tuning.choose_memory_format)
    wrt_inputs = grad_mode and not first.grad_wrt_layer
    if wrt_inputs:
        for i, x in enumerate(xs):
            if not x.is_floating_point():
                raise InvalidArgument(f"inputs[{i}] has dtype {x.dtype}; gradient methods need floating point inputs")
            xs[i] = x.detach().requires_grad_(True)  # a fresh leaf, whatever the plan built
    hooks: list = []  # each has install() and remove()
    if grad_mode and model.device.type == "cuda" and (rnns := model.rnns(module)):
        hooks.append(RnnTrainingMode(rnns))
    if first.options is not None:  # a rule pass
        hooks.append(first.options.rules(module, seg_rows, xs[0].device))
    layer_hook = None
    if first.layer:
        substitute = tuple(stacked("layer_values")) if first.layer_values is not None else None
        layer_hook = LayerHook(module, first, substitute, grad=grad_mode and first.grad_wrt_layer)
        hooks.append(layer_hook)

    # 2) forward, select each row's target, backward
    with torch.set_grad_enabled(grad_mode):
        for h in hooks:
            h.install()
        try:
            out = model.forward(*xs, *args, module=module)  # (R, *out_shape)
            # Neuron methods explain one unit of the layer instead of the model's output.
            explained = out
            if first.select and not first.objective_layer and out.dtype == torch.bool and not first.bool_output:
                # Captum subtracts outputs (FeatureAblation, Occlusion, Shapley values, FeaturePermutation raise on bool);
                # Lime and KernelShap fit their surrogate to the output cast to float (Block.bool_output).
                raise InvalidArgument(
                    f"model {model.name!r} returns a bool tensor; the explained output must be numbers (logits, probabilities, "
                    "scores): return one, or pick it with the config's output.key or output.index"
                )
            if first.objective_layer:
                if layer_hook is None or layer_hook.activations is None:
                    raise InvalidArgument(f"layer {first.layer!r} did not run in the model's forward")
                explained = layer_hook.activations[0]
            out_shape = tuple(explained.shape[1:])
            outcomes: list[SegmentOutcome | None] = [None] * len(segments)
            if first.select:
                what = "neuron_selector" if first.objective_layer else "target"
                flat = fused_flat_target([s.target for s in segments], out_shape, outcomes, what)
            else:
                flat = torch.zeros(sum(seg_rows), dtype=torch.int64)
            flat = torch.cat([flat, flat]) if paired else flat
            selected = explained.reshape(explained.shape[0], -1).gather(1, flat[:, None].to(out.device)).squeeze(1)  # (R,)
            grads: tuple[Tensor, ...] | None = None
            layer_grads: tuple[Tensor, ...] | None = None
            if grad_mode:
                objective = selected.sum()
                if any(o is not None for o in outcomes):  # rows of rejected segments must not contribute
                    keep = torch.cat([torch.full((r,), float(o is None), device=out.device) for r, o in zip(seg_rows, outcomes)])
                    objective = (selected * (torch.cat([keep, keep]) if paired else keep).to(selected.dtype)).sum()
                wrt = layer_hook.activations if layer_hook is not None and first.grad_wrt_layer else tuple(xs)
                if wrt is None:
                    raise InvalidArgument(f"layer {first.layer!r} did not run in the model's forward")
                raw = torch.autograd.grad(objective, wrt, allow_unused=True)
                got = tuple(torch.zeros_like(x) if g is None else g for x, g in zip(wrt, raw))
                layer_grads, grads = (got, None) if first.grad_wrt_layer else (None, got)
        finally:
            for h in hooks:
                h.remove()
    activations = None
    if layer_hook is not None:
        if layer_hook.activations is None:
            raise InvalidArgument(f"layer {first.layer!r} did not run in the model's forward")
        activations = tuple(a.detach() for a in layer_hook.activations)

    # 3) split per segment
    out = out.detach()
    selected = selected.detach()
    start = 0
    for s, rows in enumerate(seg_rows):
        if outcomes[s] is None:
            stop = start + rows
            outcomes[s] = BlockResult(
                outputs=out[start:stop],
                selected=selected[start:stop] if first.select else None,
                grads=None if grads is None else tuple(g[start:stop] for g in grads),
                layer_activations=None if activations is None else tuple(a[start:stop] for a in activations),
                layer_grads=None if layer_grads is None else tuple(g[start:stop] for g in layer_grads),
            )
        start += rows
    return outcomes  # type: ignore[return-value]
