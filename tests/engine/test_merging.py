"""Requests whose algorithm treats each example on its own (IntegratedGradients, Saliency, InputXGradient) and that
agree in everything but their examples run as one plan over all their examples (Scheduler._merged). Each answer is
still its own request's and equals Captum's; a request that fails, is cancelled or passes its deadline does so alone."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import pytest
import torch
from torch import nn

from attrserve_engine import AttributionJob, DeadlineExceeded, Engine, InvalidArgument, ModelSpec
from attrserve_engine.scheduler import EngineObserver, Scheduler
from oracle import MODELS, Case, assert_all_close, assert_close, captum_attribute, job_for, make_engine, passes_of, submit_held


@pytest.fixture
def merges(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every merged job the schedulers build, in order."""
    sizes: list[int] = []
    merge = Scheduler._merge

    def counted(jobs: list) -> Any:
        sizes.append(len(jobs))
        return merge(jobs)

    monkeypatch.setattr(Scheduler, "_merge", staticmethod(counted))
    return sizes


class Drops(EngineObserver):
    def __init__(self) -> None:
        self.dropped: list[tuple[str, int]] = []

    def request_dropped(self, model: str, reason: str, rows: int) -> None:
        self.dropped.append((reason, rows))


def _check(case: Case, built: dict, result: Any, outputs: bool = False) -> None:
    want, want_delta = captum_attribute(case, MODELS[case.model](), built)
    assert_all_close(result.attributions, want)
    if case.delta:
        assert_close(result.convergence_delta, want_delta)
    else:
        assert result.convergence_delta is None
    if outputs:
        with torch.no_grad():
            assert_close(result.outputs, MODELS[case.model]()(*built["inputs"], *built["args"]))


# Each group merges: same model, algorithm, parameters, delta and outputs; 1 to 3 examples each; baselines of one form,
# or (the last group) of every form: none, a number, one row, one per example.
GROUPS = [
    [Case("conv", "integrated_gradients", {"n_steps": 12}, target="per_example", n=n, seed=s) for s, n in enumerate((1, 3, 2))],
    [Case("conv", "integrated_gradients", {"n_steps": 12}, baselines="row", delta=True, n=n, seed=10 + s) for s, n in enumerate((2, 1))],
    [Case("conv", "integrated_gradients", {"n_steps": 12}, baselines="per_example", n=n, seed=20 + s) for s, n in enumerate((1, 2))],
    [Case("multi", "integrated_gradients", {"n_steps": 7}, baselines="scalar", target="per_example", n=n, seed=30 + s) for s, n in enumerate((3, 1))],
    [Case("mlp", "saliency", {"abs": False}, target="per_example", n=n, seed=40 + s) for s, n in enumerate((1, 2, 1))],
    [Case("multi", "input_x_gradient", n=n, seed=50 + s) for s, n in enumerate((2, 2))],
    [Case("conv", "integrated_gradients", {"n_steps": 9}, baselines=b, n=2, seed=60 + s) for s, b in enumerate(("none", "scalar", "row", "per_example"))],
]


def test_merged_requests_each_equal_captum(merges: list[int]) -> None:
    engine = make_engine(MODELS, default_max_queue_delay_us=0, default_max_batch_rows=4096)
    cases = [case for group in GROUPS for case in group]
    built = [case.build() for case in cases]
    jobs = [job_for(case, b) for case, b in zip(cases, built)]
    for job in jobs[::4]:
        job.return_outputs = True  # in the key: these merge only with each other
    try:
        with passes_of(engine) as passes:
            results = [f.result(timeout=60) for f in submit_held(engine, jobs)]
        again = engine.attribute(jobs[0], timeout=60)  # and the engine serves as before
    finally:
        engine.shutdown()
    assert sorted(merges) and all(size >= 2 for size in merges), merges
    assert sum(merges) >= len(cases) - 8, merges  # most requests ran merged
    for case, b, job, result in zip(cases, built, jobs, results):
        _check(case, b, result, outputs=job.return_outputs)
        assert result.timing.rows == (job.params.get("n_steps", 1) + (2 if case.delta else 0)) * case.n + (case.n if job.return_outputs else 0)
    # The passes count the requests, not the merged plans: every pass's requests are the requests that ran in it.
    assert sum(p.requests for p in passes) == sum(r.timing.passes for r in results)
    assert max(p.requests for p in passes) == max(r.timing.pass_requests for r in results)
    _check(cases[0], built[0], again, outputs=True)


def test_requests_that_differ_do_not_merge(merges: list[int]) -> None:
    """Other parameters, a convergence delta, a noise tunnel, another priority, an algorithm whose rules look across the
    batch: separate plans."""
    engine = make_engine(MODELS, default_max_queue_delay_us=0, default_max_batch_rows=4096)
    cases = [
        Case("mlp", "integrated_gradients", {"n_steps": 5}, n=1, seed=1),
        Case("mlp", "integrated_gradients", {"n_steps": 6}, n=1, seed=2),
        Case("mlp", "integrated_gradients", {"n_steps": 5}, delta=True, n=1, seed=3),
        Case("mlp", "integrated_gradients", {"n_steps": 5}, noise_tunnel={"nt_type": "smoothgrad", "nt_samples": 2, "stdevs": 0.1}, n=1, seed=4),
        Case("mlp", "integrated_gradients", {"n_steps": 5}, n=1, seed=5),  # as the first, but a batch request
        Case("mlp", "deep_lift", n=1, seed=6),
        Case("mlp", "deep_lift", n=1, seed=7),  # DeepLift's rules look across the batch: never merged
    ]
    built = [c.build() for c in cases]
    jobs = [job_for(c, b) for c, b in zip(cases, built)]
    jobs[4].priority = "batch"
    try:
        results = [f.result(timeout=60) for f in submit_held(engine, jobs)]
    finally:
        engine.shutdown()
    assert merges == []
    for case, b, result in zip(cases, built, results):
        if not case.noise_tunnel:  # (the noise tunnel's draws are checked against Captum elsewhere)
            _check(case, b, result)


def test_merged_jobs_are_capped_at_a_pass(merges: list[int]) -> None:
    """At most one pass of rows a merged job: 30 requests of 50 rows with 400 rows a pass merge 8, 8, 8 and 6."""
    engine = make_engine(MODELS, default_max_queue_delay_us=0, default_max_batch_rows=400)
    cases = [Case("mlp", "integrated_gradients", {"n_steps": 50}, target="per_example", n=1, seed=i) for i in range(30)]
    built = [c.build() for c in cases]
    try:
        results = [f.result(timeout=60) for f in submit_held(engine, [job_for(c, b) for c, b in zip(cases, built)])]
    finally:
        engine.shutdown()
    assert merges == [8, 8, 8, 6]
    for case, b, result in zip(cases, built, results):
        _check(case, b, result)


class Picky(nn.Module):
    """Fails on an input with an element over 100, as a model may fail on one request's data. With a `gate`, a pass
    waits for it to open (`entered` is set then): the test decides what happens while the worker is in a pass."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3)
        self.gate, self.entered = gate, threading.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x > 100).any()):
            raise ValueError("an element over 100")
        if self.gate is not None and not self.gate.is_set():
            self.entered.set()
            assert self.gate.wait(30)
        return self.lin(x)


def _picky_engine(gate: threading.Event | None = None) -> tuple[Engine, Drops, Picky]:
    """"picky", and with a gate "gated" (loaded first: its passes are cut before picky's, the model served least
    recently), one worker for both."""
    engine = Engine()
    drops = Drops()
    engine.observers.append(drops)
    gated = Picky(gate)
    if gate is not None:
        gate.set()  # open through the load's warm-ups
        engine.load(ModelSpec(name="gated", module=gated, max_queue_delay_us=0))
        gate.clear()
    engine.load(ModelSpec(name="picky", module=Picky(), max_queue_delay_us=0))
    return engine, drops, gated


def _picky_jobs(count: int, bad: int | None = None, model: str = "picky") -> list[AttributionJob]:
    g = torch.Generator().manual_seed(3)
    jobs = []
    for i in range(count):
        x = torch.rand(1 + i % 2, 4, generator=g)
        if i == bad:
            x[0, 1] = 1000.0
        jobs.append(AttributionJob(model=model, algorithm="integrated_gradients", inputs=(x,), target=i % 3, params={"n_steps": 8}))
    return jobs


def _alone(jobs: list[AttributionJob]) -> list[torch.Tensor]:
    engine, _, _ = _picky_engine()
    try:
        return [engine.attribute(dataclasses.replace(job, model="picky"), timeout=30).attributions[0] for job in jobs]
    finally:
        engine.shutdown()


def test_a_failing_request_fails_alone_and_the_others_run_again_unmerged(merges: list[int]) -> None:
    jobs = _picky_jobs(4, bad=2)
    engine, _, _ = _picky_engine()
    try:
        futures = submit_held(engine, jobs)
        with pytest.raises(InvalidArgument, match="failed on this input: ValueError: an element over 100"):
            futures[2].result(timeout=30)
        got = [futures[i].result(timeout=30).attributions[0] for i in (0, 1, 3)]
        after = engine.attribute(jobs[0], timeout=30).attributions[0]  # the engine serves as before
        assert engine.serving()[0]
    finally:
        engine.shutdown()
    assert merges == [4]
    want = _alone([jobs[i] for i in (0, 1, 3)])
    for g, w in zip(got, want):
        assert_close(g, w)
    assert_close(after, want[0])


@pytest.mark.parametrize("when", ["before its pass", "during its pass"])
def test_a_cancelled_or_late_member_ends_alone_and_its_rows_still_run(merges: list[int], when: str) -> None:
    """A member cancelled, and one whose deadline passed, after their merge: each gets its own error, the others their
    attributions; their rows are computed with the others', so none counts as dropped. Before its pass: the worker is
    in another model's pass meanwhile; during: in the merged job's own pass."""
    gate = threading.Event()
    engine, drops, gated = _picky_engine(gate)
    jobs = _picky_jobs(4, model="picky" if when == "before its pass" else "gated")
    try:
        jobs[3].deadline = time.monotonic() + 0.3
        with engine.held():
            blocker = engine.submit(_picky_jobs(1, model="gated")[0]) if when == "before its pass" else None
            futures = [engine.submit(job) for job in jobs]
        assert gated.entered.wait(30)  # the worker is in a pass, the jobs merged
        futures[1].cancel()
        time.sleep(max(jobs[3].deadline - time.monotonic(), 0) + 0.02)  # jobs[3]'s deadline passes
        gate.set()
        with pytest.raises(DeadlineExceeded):
            futures[3].result(timeout=30)
        got = [futures[i].result(timeout=30).attributions[0] for i in (0, 2)]
        assert futures[1].cancelled()
        if blocker is not None:
            blocker.result(timeout=30)
        assert engine.in_flight() == 0
        after = engine.attribute(jobs[1], timeout=30).attributions[0]  # the engine serves as before
        assert engine.serving()[0]
    finally:
        gate.set()
        engine.shutdown()
    assert merges == [4]
    assert sorted(drops.dropped) == [("cancelled", 0), ("deadline", 0)]
    for g, w in zip([*got, after], _alone([jobs[0], jobs[2], jobs[1]])):
        assert_close(g, w)


def test_when_every_member_is_gone_the_merged_job_runs_no_pass(merges: list[int]) -> None:
    """Its rows are dropped with the last member, before they cost a pass, and counted as dropped once."""
    gate = threading.Event()
    engine, drops, gated = _picky_engine(gate)
    jobs = _picky_jobs(3)
    try:
        with passes_of(engine) as passes:
            with engine.held():
                blocker = engine.submit(_picky_jobs(1, model="gated")[0])
                futures = [engine.submit(job) for job in jobs]
            assert gated.entered.wait(30)
            for future in futures:
                future.cancel()
            time.sleep(0.01)
            gate.set()
            blocker.result(timeout=30)
            deadline = time.monotonic() + 10
            while engine.in_flight() and time.monotonic() < deadline:
                time.sleep(0.005)
        assert engine.in_flight() == 0
        assert [p.model for p in passes] == ["gated"]
        # the last member out takes the merged job's rows with it: every row is counted as dropped, once
        assert sorted(drops.dropped) == [("cancelled", 0), ("cancelled", 0), ("cancelled", sum(8 * j.inputs[0].shape[0] for j in jobs))]
        assert_close(engine.attribute(jobs[0], timeout=30).attributions[0], _alone(jobs[:1])[0])
    finally:
        gate.set()
        engine.shutdown()
    assert merges == [3]


def test_a_merge_that_cannot_be_built_leaves_each_request_its_own_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in building a merged plan is logged; the requests run unmerged, right, and the worker stays up."""
    from attrserve_engine import scheduler

    def broken(jobs: list) -> Any:
        raise RuntimeError("no merge today")

    monkeypatch.setattr(scheduler.Scheduler, "_merge", staticmethod(broken))
    jobs = _picky_jobs(3)
    engine, _, _ = _picky_engine()
    try:
        got = [f.result(timeout=30).attributions[0] for f in submit_held(engine, jobs)]
        assert engine.serving()[0]
    finally:
        engine.shutdown()
    for g, w in zip(got, _alone(jobs)):
        assert_close(g, w)


class Running(EngineObserver):
    """What each worker says it computes (worker_running): every pass's callers, and () as each pass returns."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, tuple]] = []

    def worker_running(self, device: str, worker: int, callers: tuple) -> None:
        self.calls.append((device, worker, callers))


def test_a_worker_names_the_requests_of_its_pass_before_it_runs_and_none_after_merged_requests_each_by_their_own(
    merges: list[int],
) -> None:
    """What the engine process writes on its board (the service's quarantine.Board), so the front knows which
    requests were computing should the process die: the futures their callers hold, a merged plan's members each."""
    engine = make_engine(MODELS, default_max_queue_delay_us=0, default_max_batch_rows=4096)
    running = Running()
    engine.observers.append(running)
    cases = GROUPS[0]
    try:
        futures = submit_held(engine, [job_for(case, case.build()) for case in cases])
        for future in futures:
            future.result(timeout=60)
    finally:
        engine.shutdown()
    assert merges == [len(cases)]
    named = [callers for _, _, callers in running.calls if callers]
    assert named and all(set(callers) == set(futures) for callers in named), named
    assert len(running.calls) == 2 * len(named) and all(not c for _, _, c in running.calls[1::2])  # each pass ends ()
