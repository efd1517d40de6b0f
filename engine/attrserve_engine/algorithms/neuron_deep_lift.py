"""NeuronDeepLift (Captum's): DeepLift multipliers of one layer unit."""

from __future__ import annotations

from typing import Any

from attrserve_engine.algorithms.base import Limits
from attrserve_engine.algorithms.deep_lift import DeepLift
from attrserve_engine.algorithms.neuron import NeuronMethod, NeuronParams, parse_neuron_params
from attrserve_engine.errors import InvalidArgument


class NeuronDeepLift(NeuronMethod):
    name = "neuron_deep_lift"
    base = DeepLift()

    def parse_params(self, raw: dict[str, Any], limits: Limits) -> NeuronParams:
        if "eps" in raw:  # Captum's NeuronDeepLift has no eps
            raise InvalidArgument("neuron_deep_lift takes no eps")
        return parse_neuron_params(self.name, self.base, raw, limits)


ALGORITHM = NeuronDeepLift
