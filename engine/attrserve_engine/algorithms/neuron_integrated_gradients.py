"""NeuronIntegratedGradients (Captum's): Integrated Gradients of one layer unit."""

from attrserve_engine.algorithms.integrated_gradients import IntegratedGradients
from attrserve_engine.algorithms.neuron import NeuronMethod


class NeuronIntegratedGradients(NeuronMethod):
    name = "neuron_integrated_gradients"
    base = IntegratedGradients()


ALGORITHM = NeuronIntegratedGradients
