"""Deconvolution (Captum's Deconvolution): gradients where each ReLU passes back relu(grad_output), ignoring its forward mask."""

from __future__ import annotations

from attrserve_engine.algorithms.guided_backprop import ModifiedReluGradient
from attrserve_engine.rules import DECONVOLUTION


class Deconvolution(ModifiedReluGradient):
    name = "deconvolution"
    rule = DECONVOLUTION


ALGORITHM = Deconvolution
