"""NeuronDeepLiftShap (Captum's): DeepLiftShap of one layer unit (baselines: a distribution)."""

from attrserve_engine.algorithms.deep_lift_shap import DeepLiftShap
from attrserve_engine.algorithms.neuron import NeuronMethod


class NeuronDeepLiftShap(NeuronMethod):
    name = "neuron_deep_lift_shap"
    base = DeepLiftShap()


ALGORITHM = NeuronDeepLiftShap
