"""NeuronDeconvolution (Captum's): Deconvolution gradients of one layer unit."""

from attrserve_engine.algorithms.deconvolution import Deconvolution
from attrserve_engine.algorithms.neuron import NeuronMethod


class NeuronDeconvolution(NeuronMethod):
    name = "neuron_deconvolution"
    base = Deconvolution()


ALGORITHM = NeuronDeconvolution
