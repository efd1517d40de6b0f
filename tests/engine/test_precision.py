"""Per-model autocast: bfloat16 passes stay within a few percent of Captum's float32 answer, float32 passes equal it."""

from __future__ import annotations

import pytest
import torch
from captum.attr import IntegratedGradients

from attrserve_engine import AttributionJob, Engine, EngineLimits, InvalidArgument, ModelSpec
from oracle import MODELS, assert_all_close, assert_close, example_inputs


def test_bfloat16_autocast_costs_little_accuracy() -> None:
    """Both against Captum's float32 answer: the float32 model within ATOL, the bfloat16 one within a few percent."""
    engine = Engine(EngineLimits(probe_batch_rows=False))
    targets = [0, 1, 2, 0]
    try:
        engine.load(ModelSpec(name="fp32", module=MODELS["conv"]()))
        engine.load(ModelSpec(name="bf16", module=MODELS["conv"](), precision="bfloat16"))
        (x,), _ = example_inputs("conv", 4, seed=3)
        job = dict(algorithm="integrated_gradients", inputs=(x,), target=torch.tensor([[t] for t in targets]), params={"n_steps": 16}, return_convergence_delta=True)
        full = engine.attribute(AttributionJob(model="fp32", **job), timeout=60)
        half = engine.attribute(AttributionJob(model="bf16", **job), timeout=60)
    finally:
        engine.shutdown()
    want, want_delta = IntegratedGradients(MODELS["conv"]()).attribute(x.clone(), target=targets, n_steps=16, return_convergence_delta=True)
    assert_all_close(full.attributions, (want,))
    assert_close(full.convergence_delta, want_delta)
    b = half.attributions[0]
    assert b.dtype == torch.float32  # outputs and attributions come back in float32
    assert not torch.equal(b, want)  # the passes really ran in bfloat16
    # bfloat16 keeps 8 significant bits (~0.4% a rounding); through two convolutions and 16 steps that measures
    # 0.4-2.9% per example here (norm of the error over the norm of Captum's answer): 5% bounds it honestly.
    relative = (b - want).flatten(1).norm(dim=1) / want.flatten(1).norm(dim=1)
    assert bool((relative < 0.05).all()), relative
    assert float((b - want).abs().max()) < 0.05 * float(want.abs().max())


def test_unknown_precision_is_refused() -> None:
    engine = Engine()
    try:
        with pytest.raises(InvalidArgument, match="precision 'int4'"):
            engine.load(ModelSpec(name="x", module=MODELS["toy"](), precision="int4"))
    finally:
        engine.shutdown()
