"""NeuronGuidedBackprop (Captum's): Guided Backprop gradients of one layer unit."""

from attrserve_engine.algorithms.guided_backprop import GuidedBackprop
from attrserve_engine.algorithms.neuron import NeuronMethod


class NeuronGuidedBackprop(NeuronMethod):
    name = "neuron_guided_backprop"
    base = GuidedBackprop()


ALGORITHM = NeuronGuidedBackprop
