"""LRP's default epsilon rules as forward and tensor hooks, for fused passes of independent rows.

The rules follow Captum 0.9.0 (`captum/attr/_core/lrp.py`, `captum/attr/_utils/lrp_rules.py`).
Captum walks the model's leaf modules: Linear, Conv2d, the pools and
BatchNorm2d get an EpsilonRule (eps = 1e-9), ReLU, Dropout and Tanh pass
relevance through, anything else is refused. Backpropagating the target
output (seeded with 1) through the hooks gives the *normalised* relevance:

    at a rule layer's output z:  R / (z + eps * sign(z))   (sign 0 counts as +1)
    at a rule layer's input a:   a * grad                   (the layer's relevance R_in)
    at a pass-through layer:     the relevance of its output, unmasked

which the plan rescales by the output. Every rule is elementwise per row and
the model runs in eval mode (BatchNorm uses its running statistics), so rows
of many requests can share a pass and a block can be split anywhere.

Captum changes weights in a first forward and feeds the layers their saved
activations in a second one; its default rule changes no weight, so both
forwards compute the same values and one hooked forward reproduces it. Nothing
is left on the model: the hooks' state lives in this object for one pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attrserve_engine.errors import InvalidArgument
from attrserve_engine.rules.hooks import ModuleHooks, replace_input_gradient

EPSILON = 1e-9  # Captum's EpsilonRule() default STABILITY_FACTOR

# Captum's SUPPORTED_LAYERS_WITH_RULES (lrp.py:436) and SUPPORTED_NON_LINEAR_LAYERS (lrp.py:448), matched on exact type.
RULE_LAYERS: tuple[type, ...] = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.Conv2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Linear,
    nn.BatchNorm2d,
)
PASS_THROUGH_LAYERS: tuple[type, ...] = (nn.ReLU, nn.Dropout, nn.Tanh)
# Captum's own two-input module for additions; matched by name, since Captum is never imported at run time.
ADDITION_MODULE = ("captum.attr._utils.custom_modules", "Addition_Module")

# Set on a gradient by a rule layer's input hook, read by a pass-through layer that produced that tensor
# (Captum's `grad.replace_out`, lrp_rules.py:77): two hooks sit on the same tensor.
_RELEVANCE_ATTR = "_attrserve_lrp_relevance"


def _has_rule(module: nn.Module) -> bool:
    kind = type(module)
    return kind in RULE_LAYERS or (kind.__module__, kind.__name__) == ADDITION_MODULE


def leaf_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Captum's `_get_layers` (lrp.py:291): the modules without children, by dotted path, the root excluded."""
    found: dict[str, nn.Module] = {}
    seen: set[int] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        if name and not any(True for _ in module.children()) and id(module) not in seen:
            seen.add(id(module))
            found[name] = module
    return found


def lrp_refusal(model: nn.Module) -> str | None:
    """Why Captum's LRP refuses `model` (its `_check_and_attach_rules`, lrp.py:298), or None where it takes it."""
    if isinstance(model, torch.jit.ScriptModule):
        return "LRP hooks every layer of an eager model; this model is TorchScript, which takes no hooks"
    for name, module in leaf_layers(model).items():
        if getattr(module, "rule", None) is not None:
            return f"module {name!r} ({type(module).__name__}) sets a custom LRP `rule`; this server applies Captum's default rules only"
        if not _has_rule(module) and type(module) not in PASS_THROUGH_LAYERS:
            return (
                f"LRP has no rule for module {name!r} ({type(module).__name__}): Captum's default rules cover "
                "Linear, Conv2d, MaxPool1d/2d/3d, AvgPool2d, AdaptiveAvgPool2d and BatchNorm2d, and pass relevance "
                "through ReLU, Dropout and Tanh (write other steps, e.g. flattening, as tensor operations in forward)"
            )
    return None


def layer_refusal(model: nn.Module, layer: str) -> str | None:
    """Why LayerLRP cannot attribute to `layer`: Captum reads the relevance its rule recorded (layer_lrp.py:273)."""
    module = model.get_submodule(layer)
    if not any(m is module for m in leaf_layers(model).values()) or not _has_rule(module):
        return (
            f"LayerLRP attributes to a layer with an LRP rule (Linear, Conv2d, MaxPool, AvgPool2d, "
            f"AdaptiveAvgPool2d, BatchNorm2d); layer {layer!r} is {type(module).__name__}"
            + (", which only passes relevance through" if type(module) in PASS_THROUGH_LAYERS else "")
        )
    return None


@dataclass(frozen=True)
class LrpOptions:
    """An LRP pass's settings (Block.options): how many leading forward arguments are explained inputs, and
    LayerLRP's layer ("" for LRP). Rows are independent, so the layout is unused."""

    n_inputs: int
    layer: str = ""

    def rules(self, model: nn.Module, rows_per_segment: list[int], device: torch.device) -> LrpRules:
        return LrpRules(model, self.n_inputs, self.layer)


class LrpRules(ModuleHooks):
    """Installs Captum's default LRP hooks for one pass; `remove()` restores the model.

    `n_inputs` leading positional arguments of the model are the explained
    inputs: like Captum's `_forward_fn_wrapper` (lrp.py:422) they enter the
    model as `x + 0`, so the first layer's input hook sits on a tensor of this
    pass, and they require gradients (LayerLRP's backward runs through the
    whole model, as Captum's does, so a tensor shared by several layers
    collects relevance from all of them). `layer` (LayerLRP) is checked to
    carry a rule.
    """

    def __init__(self, model: nn.Module, n_inputs: int, layer: str = "") -> None:
        super().__init__()
        self.model = model
        self.n_inputs = n_inputs
        self.layer = layer
        self._ran: set[int] = set()  # rule layers seen in this forward
        self._hooked: dict[int, Tensor] = {}  # tensors with an input hook (Captum's `hook_registered`), kept alive so ids stay unique

    def install(self) -> None:
        refusal = lrp_refusal(self.model) or (layer_refusal(self.model, self.layer) if self.layer else None)
        if refusal:
            raise InvalidArgument(refusal)
        self.handles.append(self.model.register_forward_pre_hook(self._wrap_inputs))
        for module in leaf_layers(self.model).values():
            if type(module) in PASS_THROUGH_LAYERS:
                self._hook_pass_through(module)
            else:
                self.handles.append(module.register_forward_hook(self._rule_forward_hook))

    def remove(self) -> None:
        super().remove()
        self._ran.clear()
        self._hooked.clear()

    def _wrap_inputs(self, model: nn.Module, args: tuple) -> tuple:
        wrapped = list(args)
        for i, x in enumerate(args[: self.n_inputs]):
            if isinstance(x, Tensor) and x.is_floating_point():
                wrapped[i] = (x if x.requires_grad else x.detach().requires_grad_()) + 0
        return tuple(wrapped)

    # -- layers with an EpsilonRule (PropagationRule.forward_hook, lrp_rules.py:26) -----------
    def _rule_forward_hook(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        if id(module) in self._ran:  # lrp_rules.py:99
            raise InvalidArgument(
                f"module {type(module).__name__} runs more than once per forward, which LRP does not support; give each use its own module"
            )
        self._ran.add(id(module))
        for x in inputs:
            if isinstance(x, Tensor) and x.requires_grad and id(x) not in self._hooked:
                self._hooked[id(x)] = x
                x.register_hook(_input_relevance_hook(x.detach()))
        if output.requires_grad:
            output.register_hook(_output_relevance_hook(output.detach()))
        return output.clone()

    # -- ReLU, Dropout, Tanh (captum/_utils/common.py:861 with PropagationRule.backward_hook_activation) --
    def _hook_pass_through(self, module: nn.Module) -> None:
        replace_input_gradient(module, self, _pass_relevance_on)


def _pass_relevance_on(grad_in: Tensor, grad_out: Tensor) -> Tensor:
    """A pass-through layer's input gets the relevance of its output, unmasked; where a rule layer consumed the
    output, the relevance that layer recorded on the gradient (Captum's `grad.replace_out`)."""
    relevance = getattr(grad_out, _RELEVANCE_ATTR, None)
    if relevance is not None:
        delattr(grad_out, _RELEVANCE_ATTR)
        return relevance
    return grad_out


def _input_relevance_hook(activation: Tensor) -> Callable[[Tensor], Tensor]:
    def hook(grad: Tensor) -> Tensor:
        relevance = grad * activation  # (rows, *input_shape)
        setattr(grad, _RELEVANCE_ATTR, relevance)
        return relevance

    return hook


def _output_relevance_hook(output: Tensor) -> Callable[[Tensor], Tensor]:
    def hook(grad: Tensor) -> Tensor:
        sign = torch.sign(output)
        sign[sign == 0] = 1
        return grad / (output + sign * EPSILON)  # (rows, *output_shape)

    return hook
