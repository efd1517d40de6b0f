"""Deadlines and cancellation through the whole engine (real executor, real model): a job that dies is never
computed afterwards, counting the rows the model's forward saw; the requests around it stay exact."""

from __future__ import annotations

import concurrent.futures
import time

import pytest
import torch

from attrserve_engine import AttributionJob, DeadlineExceeded, Engine, EngineLimits, EngineObserver, ModelSpec
from doubles import Gated
from oracle import assert_close, wait_in_flight

X = torch.tensor([[0.5, -1.0, 2.0]])


class Drops(EngineObserver):
    def __init__(self) -> None:
        self.dropped: list[tuple[str, str, int]] = []

    def request_dropped(self, model: str, reason: str, rows: int) -> None:
        self.dropped.append((model, reason, rows))


@pytest.fixture
def gated():
    """An engine serving one Gated model (no pinned shapes: nothing runs at load), 10 rows per pass."""
    model = Gated()
    engine = Engine(EngineLimits(probe_batch_rows=False, default_max_batch_rows=10, default_max_queue_delay_us=1))
    drops = Drops()
    engine.observers.append(drops)
    engine.load(ModelSpec(name="gated", module=model))
    yield engine, model, drops
    model.open()
    engine.shutdown(drain=False)


def ig(n_steps: int, deadline: float | None = None, x: torch.Tensor = X) -> AttributionJob:
    return AttributionJob(model="gated", algorithm="integrated_gradients", inputs=(x,), target=torch.tensor([[1]] * len(x)),
                          params={"n_steps": n_steps}, deadline=deadline)


def hold_worker(engine: Engine, model: Gated) -> concurrent.futures.Future:
    """Park the worker inside the forward of a 1-row job, so what comes next waits in the queue."""
    model.hold()
    blocker = engine.submit(ig(1))
    assert model.entered.wait(10)
    return blocker


def test_a_deadline_that_passes_in_the_queue_costs_no_rows(gated) -> None:
    engine, model, drops = gated
    blocker = hold_worker(engine, model)
    doomed = engine.submit(ig(40, deadline=time.monotonic() + 0.05))
    bystander = engine.submit(ig(20, x=2 * X))
    time.sleep(0.1)
    model.open()
    with pytest.raises(DeadlineExceeded):
        doomed.result(10)
    assert_close(bystander.result(10).attributions[0], model.integrated_gradients(2 * X, 1))
    blocker.result(10)
    assert model.rows_seen == [1, 10, 10]  # the blocker, then the bystander's 20 rows; none of the 40
    assert drops.dropped == [("gated", "deadline", 40)]
    assert engine.in_flight() == 0


def test_a_cancelled_future_costs_no_rows(gated) -> None:
    engine, model, drops = gated
    blocker = hold_worker(engine, model)
    doomed = engine.submit(ig(40))
    bystander = engine.submit(ig(20, x=2 * X))
    assert doomed.cancel()
    model.open()
    assert_close(bystander.result(10).attributions[0], model.integrated_gradients(2 * X, 1))
    blocker.result(10)
    assert model.rows_seen == [1, 10, 10]
    assert drops.dropped == [("gated", "cancelled", 40)]
    assert engine.in_flight() == 0


@pytest.mark.parametrize("death", ["deadline", "cancel"])
def test_a_job_that_dies_mid_pass_runs_no_further_pass(gated, death: str) -> None:
    engine, model, drops = gated
    model.hold()
    doomed = engine.submit(ig(40, deadline=time.monotonic() + 0.1 if death == "deadline" else None))  # 4 passes of 10
    assert model.entered.wait(10)  # its first pass is running
    if death == "cancel":
        assert doomed.cancel()
    else:
        time.sleep(0.15)
    bystander = engine.submit(ig(20, x=3 * X))
    model.open()
    assert_close(bystander.result(10).attributions[0], model.integrated_gradients(3 * X, 1))
    if death == "deadline":
        with pytest.raises(DeadlineExceeded):
            doomed.result(10)
    assert model.rows_seen == [10, 10, 10]  # its pass in flight, then the bystander only
    assert drops.dropped == [("gated", "deadline" if death == "deadline" else "cancelled", 30)]


def test_a_deadline_between_stages_stops_a_multi_stage_plan(gated) -> None:
    """LayerIntegratedGradients runs two stages (capture the layer, then integrate); the deadline passes during
    the first, so the second never runs."""
    engine, model, drops = gated
    model.hold()
    job = AttributionJob(model="gated", algorithm="layer_integrated_gradients", inputs=(X,), target=torch.tensor([[1]]),
                         layer="fc", params={"n_steps": 8}, deadline=time.monotonic() + 0.1)
    doomed = engine.submit(job)
    assert model.entered.wait(10)
    time.sleep(0.15)
    model.open()
    with pytest.raises(DeadlineExceeded):
        doomed.result(10)
    assert model.rows_seen == [2]  # stage 1 (input and baseline); not the 8 rows of stage 2
    assert drops.dropped[0][:2] == ("gated", "deadline")


def test_attribute_timeout_cancels_the_job(gated) -> None:
    engine, model, drops = gated
    blocker = hold_worker(engine, model)
    with pytest.raises(concurrent.futures.TimeoutError):
        engine.attribute(ig(40), timeout=0.05)
    model.open()
    blocker.result(10)
    wait_in_flight(engine, 0)  # the cancelled job is dropped at the pass boundary after the blocker's pass
    assert model.rows_seen == [1]
