"""Neuron methods: an input-attribution method whose objective is one unit of a layer instead of the model's output.

Captum builds each Neuron* method by swapping its base method's gradient (or
forward) function for one that reads `layer_output[:, *neuron_selector]`.
Here the same happens to the base plan's blocks: the request's neuron
selector stands in for the target (so the base plan expands it exactly as it
would a target), and every block the plan yields hooks the layer and
explains that unit.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from attrserve_engine.algorithms.base import Algorithm, Limits
from attrserve_engine.errors import InvalidArgument, shown
from attrserve_engine.models import LoadedModel
from attrserve_engine.plan import Attribution, Block, BlockResult, Plan, Task
from attrserve_engine.targets import check_int64

MAX_SELECTOR = 32  # indices in a neuron selector, one per dim of the layer's output after dim 0


@dataclass(frozen=True)
class NeuronParams:
    neuron_selector: tuple[int, ...]
    attribute_to_neuron_input: bool
    base: Any  # the base method's parsed parameters


def parse_neuron_params(owner: str, base: Algorithm, raw: dict[str, Any], limits: Limits) -> NeuronParams:
    raw = dict(raw)
    if "neuron_selector" not in raw:
        raise InvalidArgument(f"{owner}.neuron_selector is required: the index of the neuron in the layer's output (after dim 0)")
    selector = raw.pop("neuron_selector")
    if not isinstance(selector, (int, float, list, tuple)):
        raise InvalidArgument(f"{owner}.neuron_selector must be one or more integers, got {shown(selector)}")
    selector = (selector,) if isinstance(selector, (int, float)) else tuple(selector)
    if len(selector) > MAX_SELECTOR:
        raise InvalidArgument(
            f"{owner}.neuron_selector has {len(selector)} indices; a layer's output has far fewer dims (at most {MAX_SELECTOR})"
        )
    if all(isinstance(i, float) and i.is_integer() for i in selector):  # from a protobuf Struct
        selector = tuple(int(i) for i in selector)
    if not selector or not all(isinstance(i, int) and not isinstance(i, bool) for i in selector):
        raise InvalidArgument(f"{owner}.neuron_selector must be one or more integers, got {shown(selector)}")
    check_int64(selector, f"{owner}.neuron_selector")  # a JSON number, or a Struct's whole double (1e300), may be past it
    to_input = raw.pop("attribute_to_neuron_input", False)
    if not isinstance(to_input, bool):
        raise InvalidArgument(f"{owner}.attribute_to_neuron_input must be a bool, got {shown(to_input)}")
    with relabelled(base.name, owner):
        return NeuronParams(selector, to_input, base.parse_params(raw, limits))


@contextlib.contextmanager
def relabelled(base: str, owner: str) -> Iterator[None]:
    """The base method's errors name the neuron method's fields ("gradient_shap.stdevs" → "neuron_gradient_shap.stdevs")."""
    try:
        yield
    except InvalidArgument as e:
        message = str(e)
        if base != owner and message.startswith((f"{base}.", f"{base}:")):
            raise InvalidArgument(owner + message[len(base) :]) from None
        raise


def neuron_rows(task: Task) -> torch.Tensor:
    """The selector as one index tuple per example, (n, k): what the base plan expands like a target."""
    return torch.tensor([list(task.params.neuron_selector)] * task.n, dtype=torch.int64, device=task.inputs[0].device)


def check_one_tensor(results: BlockResult | list[BlockResult], task: Task, owner: str) -> None:
    """A neuron selector indexes one tensor: Captum refuses a layer of several outputs (or inputs, with
    attribute_to_neuron_input) — "Cannot select neuron index from layer with multiple tensors" — where the pass
    explained the first of them. After each pass, for a layer `check_layer_tensors` could not check before it."""
    for result in results if isinstance(results, list) else [results]:
        _refuse_several(len(result.layer_activations or ()), task.layer, task.params.attribute_to_neuron_input, owner)


def check_layer_tensors(model: LoadedModel, layer: str, params: NeuronParams, owner: str) -> None:
    """The same refusal before any pass, where the load measured the layer (pinned shapes: `LoadedModel.layer_tensors`)."""
    if layer in model.layer_tensors:
        inputs, outputs = model.layer_tensors[layer]
        _refuse_several(inputs if params.attribute_to_neuron_input else outputs, layer, params.attribute_to_neuron_input, owner)


def _refuse_several(count: int, layer: str, to_input: bool, owner: str) -> None:
    if count > 1:
        what = "inputs" if to_input else "outputs"
        raise InvalidArgument(
            f"{owner}.neuron_selector indexes one tensor, but layer {layer!r} has {count} {what}; "
            f"name a layer (or a submodule of it) with one {what[:-1]} tensor (Captum refuses this too)"
        )


def hook_neuron(block: Block, task: Task) -> Block:
    return dataclasses.replace(block, layer=task.layer, layer_input=task.params.attribute_to_neuron_input, objective_layer=True)


class NeuronMethod(Algorithm):
    """Base of the Neuron* methods built on an input-attribution method (`base`)."""

    base: ClassVar[Algorithm]
    layer_method = True
    uses_target = False
    has_convergence_delta = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "base" in cls.__dict__:
            cls.needs_input_gradients = cls.base.needs_input_gradients
            cls.needs_module_hooks = cls.base.needs_module_hooks
            cls.uses_baselines = cls.base.uses_baselines
            cls.baseline_distribution = cls.base.baseline_distribution
            cls.uses_feature_mask = cls.base.uses_feature_mask
            cls.rows_per_pass = cls.base.rows_per_pass
            cls.pass_kind = cls.base.pass_kind

    def parse_params(self, raw: dict[str, Any], limits: Limits) -> NeuronParams:
        return parse_neuron_params(self.name, self.base, raw, limits)

    def check_layer(self, model: LoadedModel, layer: str, params: NeuronParams) -> None:
        check_layer_tensors(model, layer, params, self.name)

    def rows(self, task: Task, n_examples: int) -> int:
        with relabelled(self.base.name, self.name):
            return self.base.rows(task.replace(params=task.params.base), n_examples)

    def plan(self, task: Task) -> Plan:
        inner = self.base.plan(task.replace(params=task.params.base, target=neuron_rows(task), return_convergence_delta=False))
        sent = None
        try:
            while True:
                yielded = inner.send(sent)
                if isinstance(yielded, list):
                    sent = yield [hook_neuron(b, task) for b in yielded]
                else:
                    sent = yield hook_neuron(yielded, task)
                check_one_tensor(sent, task, self.name)
        except StopIteration as stop:
            result: Attribution = stop.value
            return Attribution(result.attributions)
