"""Hook mechanics the rule passes share: Captum's way of replacing the gradient at a module's input."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from attrserve_engine.errors import InvalidArgument


class ModuleHooks:
    """The hooks of one pass; `remove()` takes them all off the model again."""

    def __init__(self) -> None:
        self.handles: list[RemovableHandle] = []

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def replace_input_gradient(
    module: nn.Module,
    hooks: ModuleHooks,
    replace: Callable[[Tensor, Tensor], Tensor | None],
    on_input: Callable[[Tensor], None] | None = None,
    on_output: Callable[[Tensor], None] | None = None,
    only_last_use: str | None = None,
) -> None:
    """Captum's `_register_backward_hook` (captum/_utils/common.py) on one module.

    A forward pre-hook puts a tensor hook on the module's input and hands the module a clone of it (so an
    in-place module leaves the hooked tensor alone); a forward hook records the gradient arriving at the
    module's output; the input's tensor hook then replaces the gradient arriving at that input — everything
    that flows into it, as in Captum — with `replace(grad_at_input, grad_at_output)`. `on_input` and
    `on_output` see the forward values (DeepLift keeps them).

    NOTE: one slot per module, overwritten by each output gradient, as Captum's per-device dict is: a module
    that runs twice pairs each input gradient with the output gradient that arrived last. With `only_last_use`
    (DeepLift, whose rule reads the values of the module's last run, as Captum keeps them), a gradient flowing
    back through any earlier run of the module raises InvalidArgument with that message: there Captum either
    fails (the values were used up) or silently pairs this run's gradient with another run's values.
    """
    grad_out: list[Tensor] = []
    runs = [0]

    def output_grad_hook(grad: Tensor) -> None:
        grad_out[:] = [grad]

    def input_grad_hook(run: int, grad: Tensor) -> Tensor | None:
        if only_last_use is not None and run != runs[0]:
            raise InvalidArgument(only_last_use)
        return replace(grad, grad_out[0]) if grad_out else None

    def pre_hook(mod: nn.Module, inp: tuple) -> tuple:
        x = inp[0]
        runs[0] += 1
        if on_input is not None:
            on_input(x)
        if x.requires_grad:  # nothing flows back through an input that needs no gradient
            x.register_hook(partial(input_grad_hook, runs[0]))
        return (x.clone(), *inp[1:])

    def forward_hook(mod: nn.Module, inp: tuple, out: Tensor | tuple) -> None:
        y = out[0] if isinstance(out, tuple) else out
        if on_output is not None:
            on_output(y)
        if y.requires_grad:
            y.register_hook(output_grad_hook)

    hooks.handles.append(module.register_forward_pre_hook(pre_hook))
    hooks.handles.append(module.register_forward_hook(forward_hook))
