"""Predictions alone: a job without an algorithm and with return_outputs runs one forward row per example (no
gradient, no target), equals the model's forward, and shares passes with other predictions (the OIP ModelInfer)."""

from __future__ import annotations

import pytest
import torch

from attrserve_engine import AttributionJob, Engine, EngineLimits, InputSpec, InvalidArgument, ModelSpec
from doubles import Linear3
from oracle import wait_in_flight

X = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.7, -1.1]])


def predict(x: torch.Tensor) -> AttributionJob:
    return AttributionJob(model="m", algorithm="", inputs=(x,), return_outputs=True)


@pytest.fixture
def engine():
    engine = Engine(EngineLimits(probe_batch_rows=False, default_device="cpu"))
    engine.load(ModelSpec(name="m", module=Linear3(), inputs=[InputSpec("x", torch.float32, (3,))], max_batch_rows=64))
    yield engine
    engine.shutdown(drain=False, timeout=5)


def test_predictions_equal_the_models_forward_and_fuse_into_one_pass(engine) -> None:
    model = Linear3()
    inputs = [X, X[:1] * 3, torch.randn(5, 3, generator=torch.Generator().manual_seed(1))]
    passes, rows = engine.passes, engine.rows
    with engine.held():
        futures = [engine.submit(predict(x)) for x in inputs]
        wait_in_flight(engine, len(inputs))
    results = [f.result(30) for f in futures]
    for x, result in zip(inputs, results):
        with torch.no_grad():
            expected = model(x)
        assert result.attributions == ()
        assert result.convergence_delta is None
        assert result.outputs is not None
        torch.testing.assert_close(result.outputs, expected, rtol=0, atol=1e-6)
        assert result.timing.rows == x.shape[0]  # one forward row per example
        assert result.timing.pass_requests == len(inputs)  # every prediction shared the one pass
    assert engine.passes - passes == 1
    assert engine.rows - rows == sum(x.shape[0] for x in inputs)


def test_an_attribution_queued_beside_predictions_is_unchanged_and_its_outputs_equal_them(engine) -> None:
    ig = AttributionJob(model="m", algorithm="integrated_gradients", inputs=(X,), target=1, return_outputs=True)
    with engine.held():
        alone = engine.submit(predict(X))
        attribution = engine.submit(ig)
        wait_in_flight(engine, 2)
    predicted, explained = alone.result(30), attribution.result(30)
    torch.testing.assert_close(predicted.outputs, explained.outputs, rtol=0, atol=1e-6)
    torch.testing.assert_close(explained.attributions[0], Linear3().integrated_gradients(X, 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"return_outputs": False}, "algorithm is empty"),
        ({"target": 0}, "target: only for an algorithm"),
        ({"params": {"n_steps": 5}, "layer": "fc"}, "params, layer: only for an algorithm"),
        ({"baselines": (0.0,)}, "baselines: only for an algorithm"),
    ],
)
def test_a_predictions_job_refuses_what_only_an_algorithm_takes(engine, changes, message) -> None:
    job = predict(X)
    for key, value in changes.items():
        setattr(job, key, value)
    with pytest.raises(InvalidArgument, match=message):
        engine.submit(job)


@pytest.mark.parametrize("arg", [2, None, "s", [1.0, 2.0]], ids=["int", "None", "str", "list"])
@pytest.mark.parametrize("field", ["additional_forward_args", "inputs", "baselines", "feature_masks"])
def test_a_tensor_field_that_holds_no_tensor_is_refused_naming_it(engine, field, arg) -> None:
    """In process a caller may pass anything where a job holds tensors: an input, baseline, feature mask or additional
    forward argument that is no tensor raised AttributeError ('int' object has no attribute 'dim'), INTERNAL; it is
    INVALID_ARGUMENT naming it (a number or None is a baseline, Captum's scalar), and the engine serves on."""
    fields = {"inputs": (X,), field: (X, arg) if field == "inputs" else (arg,)}
    algorithm = "feature_ablation" if field == "feature_masks" else "integrated_gradients" if field == "baselines" else "saliency"
    job = AttributionJob(model="m", algorithm=algorithm, target=0, **fields)
    if field == "inputs":
        job.inputs = (arg,)
    if field == "baselines" and (arg is None or isinstance(arg, int)):
        engine.attribute(job, timeout=30)  # a scalar baseline, or none
    else:
        with pytest.raises(InvalidArgument, match=rf"{field}\[0\] is \w+; send (a tensor|a number or a tensor)"):
            engine.submit(job)
    answer = engine.attribute(AttributionJob(model="m", algorithm="", inputs=(X,), return_outputs=True), timeout=30)
    torch.testing.assert_close(answer.outputs, Linear3()(X).detach())
