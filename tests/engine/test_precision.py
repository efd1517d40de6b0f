"""Per-model autocast: bfloat16 passes stay close to float32 (the measured cost is asserted loosely), float32 stays exact."""

from __future__ import annotations

import pytest
import torch

from attrserve_engine import AttributionJob, Engine, EngineLimits, InvalidArgument, ModelSpec
from oracle import MODELS, example_inputs


def test_bfloat16_autocast_costs_little_accuracy() -> None:
    engine = Engine(EngineLimits(probe_batch_rows=False))
    try:
        engine.load(ModelSpec(name="fp32", module=MODELS["conv"]()))
        engine.load(ModelSpec(name="bf16", module=MODELS["conv"](), precision="bfloat16"))
        (x,), _ = example_inputs("conv", 4, seed=3)
        job = dict(algorithm="integrated_gradients", inputs=(x,), target=torch.tensor([[0], [1], [2], [0]]), params={"n_steps": 16}, return_convergence_delta=True)
        full = engine.attribute(AttributionJob(model="fp32", **job), timeout=60)
        half = engine.attribute(AttributionJob(model="bf16", **job), timeout=60)
    finally:
        engine.shutdown()
    a, b = full.attributions[0], half.attributions[0]
    assert b.dtype == torch.float32  # outputs and attributions come back in float32
    relative = (a - b).norm() / a.norm()
    assert 0 < relative < 0.05, relative  # bf16 keeps ~3 significant digits: a real but small cost
    assert not torch.equal(a, b)


def test_unknown_precision_is_refused() -> None:
    engine = Engine()
    try:
        with pytest.raises(InvalidArgument, match="precision 'int4'"):
            engine.load(ModelSpec(name="x", module=MODELS["toy"](), precision="int4"))
    finally:
        engine.shutdown()
