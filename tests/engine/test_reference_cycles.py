"""A request leaves no reference cycle behind in the engine: what it made is freed by reference counting once its answer
is taken, not by Python's cyclic collector. One cycle per request (the job and its future, through the future's cancel
callback; a merged job and its members) made every object a request allocated wait for the collector. In the engine
process at bench W1's rate that was a generation-0 collection of ~21,000 objects every ~0.5 s, 10-35 ms during which
every pass and request waited: p99 3.5-4x p50 at 4 callers (bench/RESULTS.md, issue 12 step 24).

Each test runs its requests once to warm the code paths up (first calls build caches that live on), then runs them
again with the collector off and asks it how many unreachable objects the second run left."""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
from collections.abc import Iterator

import pytest
import torch

from attrserve_engine import AttributionJob, Engine
from oracle import submit_held
from test_model_zoo import answerable, request, zoo_engine
from zoo import job_for

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.* is deprecated:DeprecationWarning"),
]

MODELS = ["resnet", "transformer", "norm_act", "lstm"]


@pytest.fixture(scope="module")
def engine():
    e = zoo_engine(MODELS)
    yield e
    e.shutdown()


@contextlib.contextmanager
def cycles_left() -> Iterator[list[int]]:
    """The collector off within the block; after it, the number of unreachable objects the block left (a list of one)."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    left: list[int] = []
    try:
        yield left
    finally:
        left.append(gc.collect())
        if enabled:
            gc.enable()


def _answers(futures: list[concurrent.futures.Future]) -> None:
    for future in futures:
        future.result(timeout=120)


@pytest.mark.parametrize("model", MODELS)
def test_requests_of_every_algorithm_leave_no_reference_cycle(engine: Engine, model: str) -> None:
    names = answerable(engine, model)
    assert len(names) > 10
    for name in names:  # alone
        engine.attribute(job_for(request(model, name)), timeout=120)
    with cycles_left() as left:
        for name in names:
            engine.attribute(job_for(request(model, name)), timeout=120)
    assert left == [0], f"{left[0]} objects in reference cycles after one request of each of {names}"


@pytest.mark.parametrize("model", MODELS)
def test_fused_requests_leave_no_reference_cycle(engine: Engine, model: str) -> None:
    names = answerable(engine, model)
    _answers(submit_held(engine, [job_for(request(model, n)) for n in names]))
    with cycles_left() as left:
        _answers(submit_held(engine, [job_for(request(model, n)) for n in names]))
    assert left == [0], f"{left[0]} objects in reference cycles after {len(names)} fused requests"


def _merging() -> list[AttributionJob]:
    """Four IntegratedGradients requests that differ only in their examples: one merged plan."""
    jobs = [job_for(request("norm_act", "integrated_gradients")) for _ in range(4)]
    return [AttributionJob(**{**job.__dict__, "inputs": (job.inputs[0] + i,)}) for i, job in enumerate(jobs)]


def test_merged_requests_and_requests_that_end_early_leave_no_reference_cycle(engine: Engine) -> None:
    """A merged plan whose members all succeed, and one whose member is cancelled while it waits."""

    def run() -> None:
        merged = submit_held(engine, _merging())
        _answers(merged)
        assert min(f.result().timing.pass_requests for f in merged) == 4  # one merged plan, so one pass of all four
        with engine.held():
            futures = [engine.submit(job) for job in _merging()]
            assert futures[1].cancel()
        _answers([f for i, f in enumerate(futures) if i != 1])

    run()
    with cycles_left() as left:
        run()
    assert left == [0], f"{left[0]} objects in reference cycles after merged requests"
    # The engine still answers, and answers right: the same request gives the same numbers as before.
    job = job_for(request("norm_act", "integrated_gradients"))
    first, again = engine.attribute(job, timeout=60), engine.attribute(job, timeout=60)
    torch.testing.assert_close(first.attributions[0], again.attributions[0], rtol=0, atol=0)
    assert engine.in_flight() == 0
