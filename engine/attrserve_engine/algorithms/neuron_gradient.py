"""NeuronGradient (Captum's): the gradient of one layer unit w.r.t. the inputs."""

from __future__ import annotations

from typing import Any

from attrserve_engine.algorithms.base import Limits
from attrserve_engine.algorithms.neuron import NeuronMethod, NeuronParams, parse_neuron_params
from attrserve_engine.algorithms.saliency import Saliency
from attrserve_engine.errors import InvalidArgument, shown


class NeuronGradient(NeuronMethod):
    name = "neuron_gradient"
    base = Saliency()

    def parse_params(self, raw: dict[str, Any], limits: Limits) -> NeuronParams:
        if set(raw) - {"neuron_selector", "attribute_to_neuron_input"}:
            raise InvalidArgument(f"neuron_gradient takes only neuron_selector and attribute_to_neuron_input, got {shown(sorted(raw))}")
        return parse_neuron_params(self.name, self.base, {**raw, "abs": False}, limits)  # the raw, signed gradient


ALGORITHM = NeuronGradient
