"""NeuronGradientShap (Captum's): GradientShap of one layer unit (seeded)."""

from attrserve_engine.algorithms.gradient_shap import GradientShap
from attrserve_engine.algorithms.neuron import NeuronMethod


class NeuronGradientShap(NeuronMethod):
    name = "neuron_gradient_shap"
    base = GradientShap()


ALGORITHM = NeuronGradientShap
