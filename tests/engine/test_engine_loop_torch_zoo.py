"""Every algorithm's requests are taken in without torch on the submitting thread (the engine process's event loop):
no tensor dies there and no torch operator runs there but `from_numpy`'s (tests/torch_calls.py says why). The zoo's
requests carry what the bench's do not: baselines as tensors, feature masks, neuron selectors, noise tunnels, layers.
Until step 28 of issue 12, baselines were broadcast with torch there, and the seven feature-mask methods checked and
counted their masks with torch (4-15 freed tensors a request).

Each request runs once alone first (its answer to compare with, and what a first request fills: a constant baseline
of its shape), then is submitted under `Engine.held()` while the thread is watched, and dropped."""

from __future__ import annotations

import pytest
import torch
from test_model_zoo import answerable, request, zoo_engine
from torch_calls import ALLOWED, torch_on_this_thread
from zoo import job_for

from attrserve_engine import Engine

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.* is deprecated:DeprecationWarning"),
]

MODELS = ["resnet", "transformer"]  # images (convolutions, 4-D masks) and token ids (an embedding, 2-D masks)


@pytest.fixture(scope="module")
def engine():
    e = zoo_engine(MODELS)
    yield e
    e.shutdown()


@pytest.mark.parametrize("model", MODELS)
def test_every_algorithm_is_taken_in_without_torch_on_the_submitting_thread(engine: Engine, model: str) -> None:
    names = answerable(engine, model)
    assert len(names) > 10
    found = {}
    for name in names:
        alone = engine.attribute(job_for(request(model, name)), timeout=120)
        job = job_for(request(model, name))
        with engine.held():
            with torch_on_this_thread() as (died, operators):
                future = engine.submit(job)
                del job
        if died or set(operators) - ALLOWED:
            found[name] = (died, dict(operators))
        got = future.result(timeout=120)
        for a, b in zip(got.attributions, alone.attributions, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert found == {}, f"{model}: (tensors freed, operators run) on the submitting thread: {found}"
