"""NeuronFeatureAblation (Captum's): how ablating each input feature changes one layer unit."""

from attrserve_engine.algorithms.feature_ablation import FeatureAblation
from attrserve_engine.algorithms.neuron import NeuronMethod


class NeuronFeatureAblation(NeuronMethod):
    name = "neuron_feature_ablation"
    base = FeatureAblation()


ALGORITHM = NeuronFeatureAblation
