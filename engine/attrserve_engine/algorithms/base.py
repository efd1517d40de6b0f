"""The small common base of every algorithm: parameter parsing, shared row builders and reducers."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from attrserve_engine.errors import InvalidArgument, shown
from attrserve_engine.limits import INT64_MAX, INT64_MIN
from attrserve_engine.models import LoadedModel
from attrserve_engine.plan import Block, BlockResult, PassKind, Plan, Task, repeat_rows


@dataclass(frozen=True)
class Limits:
    """Per-request caps the algorithms enforce while parsing parameters."""

    max_n_steps: int = 1000
    max_nt_samples: int = 1000


@dataclass(frozen=True)
class NoParams:
    pass


class Algorithm:
    """One attribution algorithm: validates its parameters and builds its plan.

    Who calls what: the engine calls `parse_params` when a job is submitted
    (on the caller's thread), `rows` to enforce the per-request row cap, and
    `plan` on the worker thread, which then drives the generator.
    """

    name: ClassVar[str]
    params_type: ClassVar[type] = NoParams
    has_convergence_delta: ClassVar[bool] = False
    # Hooks the model's own forward (Captum's DeepLift family: a forward pre-hook pairs inputs with baselines),
    # which TorchScript does not take. Modules without a rule need no hook: they pass their plain gradient.
    needs_module_hooks: ClassVar[bool] = False
    # Gradients w.r.t. the inputs need floating point inputs (token ids need a layer method).
    needs_input_gradients: ClassVar[bool] = True
    # Why, in the words a refused request with integer inputs gets.
    float_inputs_why: ClassVar[str] = (
        "takes gradients w.r.t. the inputs, so they must be floating point (for token ids, use a layer method on the embedding)"
    )
    # Takes `feature_masks` (perturbation methods).
    uses_feature_mask: ClassVar[bool] = False
    # Attributes to (or through) the request's `layer`.
    layer_method: ClassVar[bool] = False
    # Explains the output at `target` (LayerActivation does not).
    uses_target: ClassVar[bool] = True
    # Attributions shaped like the inputs (what infidelity needs); layer methods' are shaped like the layer.
    input_shaped: ClassVar[bool] = True
    uses_baselines: ClassVar[bool] = False
    # True where baselines are a distribution to draw from (GradientShap).
    baseline_distribution: ClassVar[bool] = False
    # Yields its rows as plan.Rows, built a pass at a time (perturbation methods): a request then holds its examples,
    # not every row of its work at once (what the per-request byte cap counts).
    rows_per_pass: ClassVar[bool] = False
    # The kind of the passes most of its work runs in: admission's estimates of its time count all its rows at that
    # kind's rate (LayerIntegratedGradients' forward rows before its gradient path, and LayerGradientShap's layer
    # forwards, twice its gradient rows but faster, count as gradient rows).
    pass_kind: ClassVar[PassKind] = PassKind.GRADIENT
    # Each example's attribution depends on that example's rows alone: no random draws, no rule that looks across the
    # batch, no per-request cap on work that a larger batch would pass. Requests that agree in everything but their
    # examples may then run as one plan over all their examples (Scheduler._merged), as Captum would on their batch.
    examples_independent: ClassVar[bool] = False

    # Captum's memory hints its attribute takes (internal_batch_size): accepted and checked, then dropped (MEMORY_HINTS).
    memory_hints: ClassVar[tuple[str, ...]] = ()

    def parse_params(self, raw: dict[str, Any], limits: Limits) -> Any:
        params = parse_dataclass(self.params_type, raw, self.name, self.memory_hints)
        self.check_params(params, limits)
        return params

    def check_params(self, params: Any, limits: Limits) -> None:
        """Range checks beyond types; raise InvalidArgument naming the field."""

    def refusal(self, model: LoadedModel, input_dtypes: Sequence[torch.dtype | None] | None = None) -> str | None:
        """Why this algorithm cannot serve `model`, or None: the one place capability rules live.

        GetModel's list asks without `input_dtypes` (the dtypes the model's config pins, None where it pins
        none); each request asks with the dtypes of its inputs. The answer is the message a refused request
        gets. Remembered per model and dtypes, so a request pays a dict lookup.
        """
        dtypes = tuple(input_dtypes) if input_dtypes is not None else tuple(s.dtype for s in model.spec.inputs)
        key = (self.name, dtypes)
        if key not in model.refusals:
            reason = self._refusal(model, dtypes)
            if len(model.refusals) < 4096:  # bounded: a client picks the dtypes
                model.refusals[key] = reason
            return reason
        return model.refusals[key]

    def _refusal(self, model: LoadedModel, dtypes: tuple[torch.dtype | None, ...]) -> str | None:
        if self.name in model.unsupported:  # failed at warm-up
            return f"model {model.name!r} cannot serve {self.name}: {model.unsupported[self.name]}"
        if self.needs_module_hooks and model.is_torchscript:
            return (
                f"{self.name} hooks the model's forward (as Captum's DeepLift does); model {model.name!r} is TorchScript, "
                "which takes no hooks (Captum raises on it too); serve it as an eager model.py"
            )
        if self.layer_method and model.is_torchscript:
            return f"{self.name} hooks a layer; model {model.name!r} is TorchScript, which takes no hooks"
        if self.layer_method and model.is_exported:  # Captum: "Forward hook did not obtain any outputs for given layer"
            return (
                f"{self.name} hooks a layer; model {model.name!r} is a torch.export program, whose layers are inlined into "
                "one graph: its submodules only hold parameters and are never called, so a hook on one never runs"
            )
        if self.needs_module_hooks and model.is_exported:  # Captum: "Trying to flatten user inputs with exported input tree spec"
            return (
                f"{self.name} runs the model on inputs and baselines joined by a forward pre-hook (as Captum's DeepLift does); "
                f"model {model.name!r} is a torch.export program, which checks its arguments against the exported ones before "
                "that hook runs (Captum fails on it too)"
            )
        if self.needs_input_gradients:
            for i, dtype in enumerate(dtypes):
                if dtype is not None and not dtype.is_floating_point:
                    return f"inputs[{i}] has dtype {str(dtype).replace('torch.', '')}; {self.name} {self.float_inputs_why}"
        reason = self.module_refusal(model.module)
        return f"model {model.name!r} cannot serve {self.name}: {reason}" if reason else None

    def module_refusal(self, module: nn.Module) -> str | None:
        """Why this algorithm cannot explain `module` (eager or TorchScript) at all (e.g. LRP: a module type with no
        rule), or None.

        Override for rules of the model's structure; `refusal` asks it once per model."""
        return None

    def check_layer(self, model: LoadedModel, layer: str, params: Any) -> None:
        """Refuse (InvalidArgument) `layer` of `model` for these parsed params where its structure, measured at load
        (`LoadedModel.layer_tensors`), rules it out; called before any pass. Layer methods that need it override it."""

    def rows(self, task: Task, n_examples: int) -> int:
        """Rows of model work the plan needs for `task` run on n_examples (NoiseTunnel multiplies them)."""
        return n_examples

    def delta_rows(self, task: Task, n_examples: int) -> int:
        """Forward rows of the convergence delta: end and start point per example."""
        return 2 * n_examples

    def plan(self, task: Task) -> Plan:
        raise NotImplementedError


# Captum's memory hints, by the least value Captum takes (None: any integer; its internal batching raises a smaller
# one to the examples' count, where NoiseTunnel divides by nt_samples_batch_size). They only cut Captum's work into
# chunks, and this server cuts its own passes (max_batch_rows, the tuner): checked, then dropped from the params, so
# the numbers, the passes and which requests merge are those without them.
MEMORY_HINTS: dict[str, int | None] = {"internal_batch_size": None, "nt_samples_batch_size": 1}


def parse_dataclass(cls: type, raw: dict[str, Any], owner: str, hints: tuple[str, ...] = ()) -> Any:
    """Build a params dataclass from Captum-named values, with messages that name the field; `hints` name the
    MEMORY_HINTS it takes."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields) - set(hints))
    if unknown:
        valid = ", ".join([*fields, *hints]) or "none"
        listed = ", ".join(k if len(k) <= 40 else f"{k[:40]}... ({len(k)} characters)" for k in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise InvalidArgument(f"{owner}: unknown parameter(s) {listed}{more}; valid: {valid}")
    values = {}
    for name, value in raw.items():
        if name in hints:
            minimum = MEMORY_HINTS[name]
            value = _coerce(value, 0, f"{owner}.{name}")
            if minimum is not None and value < minimum:
                raise InvalidArgument(f"{owner}.{name} must be at least {minimum}, got {shown(value)}")
            continue
        f = fields[name]
        default = f.default
        if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        values[name] = _coerce(value, default, f"{owner}.{name}")
    return cls(**values)


def _coerce(value: Any, default: Any, label: str) -> Any:
    """`value` as the type of the field's default, or InvalidArgument naming the field. Integers fit in an int64 and
    numbers in a double: a JSON number (ModelInfer's parameters) has no bound, and a whole double of a protobuf Struct
    (1e300) becomes a Python int of any size, which torch and numpy refuse with OverflowError (an INTERNAL error)."""
    try:
        return _coerced(value, default, label)
    except OverflowError:  # float() of an int past a double's range
        raise InvalidArgument(f"{label} holds a number too large for a double, got {shown(value)}") from None


def _int64(value: int, label: str) -> int:
    if not INT64_MIN <= value <= INT64_MAX:
        raise InvalidArgument(f"{label} is {shown(value)}, outside the int64 range")
    return value


def _coerced(value: Any, default: Any, label: str) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise InvalidArgument(f"{label} must be a bool, got {shown(value)}")
        return value
    if isinstance(default, int):
        if isinstance(value, float) and value.is_integer():  # JSON / protobuf Struct numbers are doubles
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgument(f"{label} must be an integer, got {shown(value)}")
        return _int64(value, label)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidArgument(f"{label} must be a number, got {shown(value)}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise InvalidArgument(f"{label} must be a string, got {shown(value)}")
        return value
    if isinstance(default, tuple):  # a number per input (stdevs): Occlusion's int lists per input default to None, parsed there
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return (float(value),)
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise InvalidArgument(f"{label} must be a number or a list of numbers, got {shown(value)}")
        return tuple(float(v) for v in value)
    return value


def per_input_values(values: tuple[float, ...], n_inputs: int, label: str) -> tuple[float, ...]:
    """One value for all inputs, or one per input (Captum's float-or-tuple `stdevs`)."""
    if len(values) == 1:
        return values * n_inputs
    if len(values) != n_inputs:
        raise InvalidArgument(f"{label}: give one value or one per input ({n_inputs}), got {len(values)}")
    return values


def check_positive(value: int, label: str, cap: int, minimum: int = 1) -> None:
    if value < minimum:
        raise InvalidArgument(f"{label} must be at least {minimum}, got {shown(value)}")
    if value > cap:
        raise InvalidArgument(f"{label} is {shown(value)}, over this server's limit of {cap}")


def check_stdevs(values: tuple[float, ...], label: str) -> None:
    """Standard deviations of Gaussian noise: Captum's torch.normal refuses negative ones and NaN (infinity it takes)."""
    for i, v in enumerate(values):
        if not v >= 0:
            where = label if len(values) == 1 else f"{label}[{i}]"
            raise InvalidArgument(f"{where} must be >= 0 (a standard deviation), got {v}")


def example_baselines(task: Task) -> tuple[Tensor, ...]:
    """Baselines as one row per example, (n, *feature_shape) each — Captum's `_tensorize_baseline`."""
    out = []
    for i, (x, b) in enumerate(zip(task.inputs, task.baselines)):
        if b.shape[0] == x.shape[0]:
            out.append(b)
        elif b.shape[0] == 1:
            out.append(b.expand_as(x).contiguous())
        else:
            raise InvalidArgument(f"baselines[{i}] has {b.shape[0]} rows; it must have 1 or one per example ({x.shape[0]})")
    return tuple(out)


def sum_rows(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).sum(1)


def delta_block(inputs: tuple[Tensor, ...], baselines: tuple[Tensor, ...], args: tuple[Tensor, ...], target: Tensor) -> Block:
    """The forward rows Captum's compute_convergence_delta needs: [end points; start points]."""
    return Block(
        kind=PassKind.FORWARD,
        inputs=tuple(torch.cat([x, b]) for x, b in zip(inputs, baselines)),
        args=tuple(repeat_rows(a, 2) for a in args),
        target=repeat_rows(target, 2),
    )


def delta_from(result: BlockResult, attributions: tuple[Tensor, ...]) -> Tensor:
    """sum(attributions) - (f(inputs) - f(baselines)) per example, from a delta_block's result."""
    n = int(attributions[0].shape[0])
    assert result.selected is not None  # a delta_block selects each row's target
    end, start = result.selected[:n], result.selected[n:]  # (n,) each
    attr_sum = torch.stack([sum(rs) for rs in zip(*[sum_rows(a) for a in attributions])])  # (n,)
    return attr_sum - (end - start)
