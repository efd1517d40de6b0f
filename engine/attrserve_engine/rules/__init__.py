"""Rule passes: backward hooks that replace gradients (DeepLift's multipliers, guided ReLUs, LRP's relevance).

A rule pass is a Block whose `options` is one of these frozen dataclasses; the executor asks it for the
hooks of one fused pass (`options.rules(model, rows_per_segment, device)`), installs them before the
forward and removes them after the backward.
"""

from attrserve_engine.rules.deeplift import DeepLiftOptions
from attrserve_engine.rules.guided import DECONVOLUTION, GUIDED_BACKPROP, GuidedOptions
from attrserve_engine.rules.lrp import LrpOptions

__all__ = ["DECONVOLUTION", "GUIDED_BACKPROP", "DeepLiftOptions", "GuidedOptions", "LrpOptions"]
