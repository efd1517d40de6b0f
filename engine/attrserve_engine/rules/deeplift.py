"""DeepLift's rescale rules as backward hooks, for fused passes of (input, reference) row pairs.

The rules follow Captum 0.9.0 (`captum/attr/_core/deep_lift.py`). A fused
pass holds rows [inputs of all requests; references of all requests], so row
i pairs with row R + i exactly as in Captum's own cat([inputs, baselines]).
Two Captum rules look beyond a row pair — Softmax normalises by the sum over
the whole batch, MaxPool falls back to the batch's first row — so they are
evaluated per request segment, giving each request what Captum gives it alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attrserve_engine.rules.hooks import ModuleHooks, replace_input_gradient


@dataclass
class SegmentLayout:
    """Which request segment each of the 2R rows of a paired pass belongs to."""

    segment_of_row: Tensor  # (2R,) int64
    first_row_of_row: Tensor  # (2R,) int64: the segment's first input row
    n_segments: int

    @staticmethod
    def of(rows_per_segment: list[int], device: torch.device) -> SegmentLayout:
        counts = torch.tensor(rows_per_segment, dtype=torch.int64, device=device)
        ids = torch.repeat_interleave(torch.arange(len(rows_per_segment), device=device), counts)  # (R,)
        starts = torch.cumsum(counts, 0) - counts  # (S,)
        return SegmentLayout(torch.cat([ids, ids]), torch.cat([starts[ids], starts[ids]]), len(rows_per_segment))


def _diffs(inputs: Tensor, outputs: Tensor) -> tuple[Tensor, Tensor]:
    x, x_ref = inputs.chunk(2)
    y, y_ref = outputs.chunk(2)
    return torch.cat(2 * [x - x_ref]), torch.cat(2 * [y - y_ref])


def _nonlinear(module: nn.Module, x: Tensor, y: Tensor, grad_in: Tensor, grad_out: Tensor, eps: float, layout: SegmentLayout) -> Tensor:
    delta_in, delta_out = _diffs(x, y)
    return torch.where(abs(delta_in) < eps, grad_in, grad_out * delta_out / delta_in)


def _softmax(module: nn.Module, x: Tensor, y: Tensor, grad_in: Tensor, grad_out: Tensor, eps: float, layout: SegmentLayout) -> Tensor:
    delta_in, delta_out = _diffs(x, y)
    unnorm = torch.where(abs(delta_in) < eps, grad_in, grad_out * delta_out / delta_in)  # (2R, *shape)
    # Captum subtracts the mean over its whole batch: here, over each request's rows.
    row_sums = unnorm.reshape(unnorm.shape[0], -1).sum(1)  # (2R,)
    seg_sums = torch.zeros(layout.n_segments, dtype=unnorm.dtype, device=unnorm.device).index_add_(0, layout.segment_of_row, row_sums)
    seg_rows = torch.bincount(layout.segment_of_row, minlength=layout.n_segments)
    seg_numel = seg_rows.to(unnorm.dtype) * (unnorm[0].numel())
    mean = (seg_sums * 1 / seg_numel)[layout.segment_of_row]  # (2R,)
    return unnorm - mean.view(-1, *([1] * (unnorm.dim() - 1)))


def _maxpool(pool: Callable, unpool: Callable) -> Callable:
    def rule(module: nn.Module, x: Tensor, y: Tensor, grad_in: Tensor, grad_out: Tensor, eps: float, layout: SegmentLayout) -> Tensor:
        with torch.no_grad():
            x_in, x_ref = x.chunk(2)
            y_in, y_ref = y.chunk(2)
            delta_in = torch.cat(2 * [x_in - x_ref])
            y_max = torch.max(y_in, y_ref)
            delta_out = torch.cat([y_max - y_ref, y_in - y_max])
            _, indices = pool(x, module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode, True)
            unpooled = unpool(grad_out * delta_out, indices, module.kernel_size, module.stride, module.padding, list(x.shape))
            a, b = torch.chunk(unpooled, 2)
        summed = a + b
        summed = torch.cat(2 * [summed])
        # Captum falls back to grad_input[0], its batch's first row: each request's own first row here.
        return torch.where(abs(delta_in) < eps, grad_in[layout.first_row_of_row], summed / delta_in)

    return rule


RULES: dict[type, Callable] = {
    nn.ReLU: _nonlinear,
    nn.ELU: _nonlinear,
    nn.LeakyReLU: _nonlinear,
    nn.Sigmoid: _nonlinear,
    nn.Tanh: _nonlinear,
    nn.Softplus: _nonlinear,
    nn.MaxPool1d: _maxpool(F.max_pool1d, F.max_unpool1d),
    nn.MaxPool2d: _maxpool(F.max_pool2d, F.max_unpool2d),
    nn.MaxPool3d: _maxpool(F.max_pool3d, F.max_unpool3d),
    nn.Softmax: _softmax,
}


def hooked_modules(model: nn.Module) -> list[nn.Module]:
    """The modules DeepLift replaces gradients of (Captum's rule: exact type, no user backward hooks)."""
    return [m for m in model.modules() if type(m) in RULES and not m._backward_hooks]


@dataclass(frozen=True)
class DeepLiftOptions:
    """A DeepLift pass's settings (Block.options)."""

    eps: float

    def rules(self, model: nn.Module, rows_per_segment: list[int], device: torch.device) -> DeepLiftRules:
        return DeepLiftRules(model, self.eps, SegmentLayout.of(rows_per_segment, device))


class DeepLiftRules(ModuleHooks):
    """Installs the rule hooks for one paired pass; `remove()` restores the model.

    Captum's hook mechanics (`rules.hooks.replace_input_gradient`), keeping each module's input and output
    values: the gradient at the module's input becomes the rule's multiplier.
    """

    def __init__(self, model: nn.Module, eps: float, layout: SegmentLayout) -> None:
        super().__init__()
        self.model = model
        self.eps = eps
        self.layout = layout

    def install(self) -> None:
        for module in hooked_modules(self.model):
            self._hook(module)

    def _hook(self, module: nn.Module) -> None:
        rule = RULES[type(module)]
        state: dict[str, Tensor] = {}

        def keep_input(x: Tensor) -> None:
            state["input"] = x.detach().clone()  # a module that runs twice keeps its last run's values, as in Captum

        def keep_output(y: Tensor) -> None:
            state["output"] = y.detach().clone()

        def multiplier(grad_in: Tensor, grad_out: Tensor) -> Tensor:
            return rule(module, state["input"], state["output"], grad_in, grad_out, self.eps, self.layout)

        replace_input_gradient(
            module,
            self,
            multiplier,
            on_input=keep_input,
            on_output=keep_output,
            only_last_use=(
                f"module {type(module).__name__} runs more than once per forward and the gradient flows back through a run "
                "other than its last; DeepLift's rule needs each run's own input and output (Captum fails or mixes runs "
                "here): give each use its own module"
            ),
        )
