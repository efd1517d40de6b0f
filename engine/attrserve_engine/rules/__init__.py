"""Rule passes: backward hooks that replace gradients (DeepLift's multipliers, guided ReLUs, ...), by pass kind.

Each entry builds an object with install()/remove() for one fused pass, from
the model, the block's options and the pass's SegmentLayout.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from attrserve_engine.plan import DEEPLIFT, GUIDED, LRP
from attrserve_engine.rules.deeplift import DeepLiftRules, SegmentLayout
from attrserve_engine.rules.guided import GuidedReluRules
from attrserve_engine.rules.lrp import LrpRules

RULE_PASSES: dict[str, Callable[[nn.Module, tuple, SegmentLayout], object]] = {
    DEEPLIFT: lambda model, options, layout: DeepLiftRules(model, eps=options[0], layout=layout),
    # Row-independent: the layout is not needed.
    GUIDED: lambda model, options, layout: GuidedReluRules(model, rule=options[0]),
    # Row-independent too; options are (number of explained inputs, LayerLRP's layer or "").
    LRP: lambda model, options, layout: LrpRules(model, n_inputs=options[0], layer=options[1]),
}

__all__ = ["RULE_PASSES", "SegmentLayout"]
