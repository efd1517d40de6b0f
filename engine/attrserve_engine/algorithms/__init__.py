"""Algorithm registry: Captum class names in snake_case → one Algorithm per file."""

from __future__ import annotations

from attrserve_engine.algorithms.base import Algorithm, Limits
from attrserve_engine.algorithms.deep_lift import DeepLift
from attrserve_engine.algorithms.gradient_shap import GradientShap
from attrserve_engine.algorithms.input_x_gradient import InputXGradient
from attrserve_engine.algorithms.integrated_gradients import IntegratedGradients
from attrserve_engine.algorithms.saliency import Saliency

ALGORITHMS: dict[str, Algorithm] = {
    a.name: a for a in (IntegratedGradients(), Saliency(), InputXGradient(), DeepLift(), GradientShap())
}

__all__ = ["ALGORITHMS", "Algorithm", "Limits"]
