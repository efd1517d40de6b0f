"""A finished job lets go of its request: once its answer is out, none of the request's tensors stay in the engine, and
none of its passes', whatever is still ahead (its deadline an hour away, the worker idle) and however it ended
(answered, failed, cancelled, its deadline passed, merged with others). An error a caller can act on, which the caller
may keep, keeps none of them either: it goes without its traceback, and so do the errors it was raised from.

The scheduler's bookkeeping outlives a job: its entry in the deadline heap stays until it reaches the heap's top, and a
worker's list of the jobs that died at its last pass boundary stays while it waits, as did its last pass's blocks and
outputs. After bench/flood.py's floods those held 350-570 MiB of the flood's inputs in the engine process, until the
deadlines passed or new traffic came (bench/RESULTS.md, issue 12 step 44)."""

from __future__ import annotations

import concurrent.futures
import threading
import time
import weakref

import pytest
import torch
from oracle import assert_all_close, assert_close, submit_held, wait_in_flight
from test_model_zoo import captum_answer, request, zoo_engine
from test_scheduler import FakePasses, Recorder, model, scheduler
from zoo import job_for

from attrserve_engine import AttributionJob, Cancelled, DeadlineExceeded, Engine, InvalidArgument
from attrserve_engine.plan import Attribution, Block, BlockResult, PassKind
from attrserve_engine.scheduler import LiveJob

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.* is deprecated:DeprecationWarning"),
]

HOUR = 3600.0


class Tracked:
    """Weak references to tensors that must be gone once the jobs that made them are answered."""

    def __init__(self) -> None:
        self.refs: list[tuple[str, weakref.ref]] = []
        self.lock = threading.Lock()

    def add(self, what: str, tensor: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.refs.append((what, weakref.ref(tensor)))
        return tensor

    def alive(self) -> list[str]:
        with self.lock:
            return [what for what, ref in self.refs if ref() is not None]

    def assert_gone(self, timeout: float = 5.0) -> None:
        """All of them freed within `timeout` s (the worker frees its pass's tensors just after the answers go out)."""
        until = time.monotonic() + timeout
        while self.alive():
            assert time.monotonic() < until, f"still alive: {sorted(set(self.alive()))}"
            time.sleep(0.01)


class TrackedPasses(FakePasses):
    """FakePasses whose pass outputs are new tensors, tracked."""

    def __init__(self, tracked: Tracked) -> None:
        super().__init__()
        self.tracked = tracked

    def __call__(self, model, segments: list[Block], on_split=None, replica=0) -> list[BlockResult]:
        results = super().__call__(model, segments, on_split, replica)
        return [BlockResult(outputs=self.tracked.add("a pass's output", r.outputs.clone()), selected=r.selected) for r in results]


def _check(values: torch.Tensor) -> None:
    raise ValueError(f"{values.shape}: not allowed")


def tracked_job(m, tracked: Tracked, tag: float, deadline: float, fail: bool = False) -> LiveJob:
    """A job of one block whose rows and payload (a tensor its plan holds, as a request's inputs) are tracked."""
    payload = tracked.add("a request's payload", torch.full((4, 1), tag))

    def plan():
        rows = tracked.add("a block's rows", payload.clone())
        results = yield [Block(kind=PassKind.FORWARD, inputs=(rows,), args=(), target=torch.zeros((4, 0), dtype=torch.int64))]
        if fail:  # an error the scheduler does not log (pytest's log capture would keep its traceback's frames),
            try:  # raised from another, whose traceback holds a frame with a tensor of its own
                _check(tracked.add("a failed check's tensor", payload * 2))
            except ValueError as e:
                raise InvalidArgument("this plan fails after its pass") from e
        return Attribution((results[0].outputs.sum().reshape(1) + payload.sum(),))

    return LiveJob(
        model=m, plan_factory=plan, finish=lambda a, live: float(a.attributions[0]), rows=4, deadline=deadline, arrival=time.monotonic()
    )


def _fails(i: int) -> bool:
    """Whether the i-th job of the first test fails: every fifth."""
    return i % 5 == 4


def _check_answers(futures: list[concurrent.futures.Future]) -> list[BaseException]:
    """The failing jobs failed, the others answered (the futures go when this returns). Returns the errors."""
    errors = []
    for i, future in enumerate(futures):
        if _fails(i):
            errors.append(future.exception(timeout=10))
        else:
            assert future.result(timeout=10) == pytest.approx(8.0 * i)
    return errors


def test_answered_and_failed_jobs_let_go_of_their_tensors_while_their_deadlines_are_ahead() -> None:
    tracked = Tracked()
    s = scheduler(TrackedPasses(tracked), Recorder())
    try:
        m = model(max_batch_rows=16)
        now = time.monotonic()
        jobs = [tracked_job(m, tracked, float(i), now + HOUR, fail=_fails(i)) for i in range(20)]
        errors = _check_answers([s.submit(job) for job in jobs])
        wait_in_flight(s, 0)
        # The jobs themselves are still held here, as the scheduler's bookkeeping may hold them, and the errors, as a
        # caller may: neither holds the requests' tensors.
        assert all(job.done for job in jobs)
        tracked.assert_gone()
        # What a caller acts on is all there: the error's type, its message, and what it was raised from.
        assert len(errors) == 4 and all(isinstance(e, InvalidArgument) for e in errors)
        assert all(str(e) == "this plan fails after its pass" and isinstance(e.__cause__, ValueError) for e in errors)
        # The scheduler still answers right.
        assert s.submit(tracked_job(m, tracked, 7.0, time.monotonic() + HOUR)).result(timeout=10) == 56.0
        tracked.assert_gone()
    finally:
        s.stop(drain=False)


def test_cancelled_and_expired_jobs_let_go_of_their_tensors() -> None:
    """One job cancelled while it waits, one whose deadline passes during its pass; the other an hour ahead."""
    tracked = Tracked()
    passes = TrackedPasses(tracked)
    passes.during = lambda segments: time.sleep(0.3)
    s = scheduler(passes, Recorder())
    try:
        m = model(max_batch_rows=16)
        now = time.monotonic()
        s.hold()
        doomed = tracked_job(m, tracked, 1.0, now + 0.1)
        cancelled = tracked_job(m, tracked, 2.0, now + HOUR)
        answered = tracked_job(m, tracked, 3.0, now + HOUR)
        futures = [s.submit(job) for job in (doomed, cancelled, answered)]
        s.cancel(cancelled)
        s.release()
        assert futures[2].result(timeout=10) == 24.0
        with pytest.raises((Cancelled, concurrent.futures.CancelledError)):
            futures[1].result(timeout=10)
        wait_in_flight(s, 0)
        assert all(job.done for job in (doomed, cancelled, answered))
        tracked.assert_gone()
        with pytest.raises(DeadlineExceeded):
            futures[0].result(timeout=0)
    finally:
        s.stop(drain=False)


@pytest.fixture(scope="module")
def engine():
    e = zoo_engine(["norm_act", "resnet"])
    yield e
    e.shutdown()


def _with_deadline(job: AttributionJob, tracked: Tracked, shift: float) -> AttributionJob:
    inputs = tuple(tracked.add("a request's input", x + shift) for x in job.inputs)
    return AttributionJob(**{**job.__dict__, "inputs": inputs, "deadline": time.monotonic() + HOUR})


@pytest.mark.parametrize("name", ["integrated_gradients", "saliency", "occlusion", "feature_ablation", "layer_grad_cam"])
def test_engine_requests_alone_fused_and_merged_let_go_of_their_inputs(engine: Engine, name: str) -> None:
    """Through the engine, on real models: four requests at once (fused; IntegratedGradients' merged into one plan),
    their deadlines an hour ahead. Once answered, none of their inputs is alive, and the engine still answers as Captum."""
    model_name = "norm_act" if name != "layer_grad_cam" else "resnet"
    base = job_for(request(model_name, name))
    tracked = Tracked()
    futures = submit_held(engine, [_with_deadline(base, tracked, float(i)) for i in range(4)])
    answers = [f.result(timeout=120) for f in futures]
    del futures
    if name == "integrated_gradients":
        assert min(a.timing.pass_requests for a in answers) == 4
    del answers
    wait_in_flight(engine, 0)
    tracked.assert_gone()
    want, want_delta = captum_answer(model_name, name)
    got = engine.attribute(base, timeout=60)
    assert_all_close(got.attributions, want)
    if request(model_name, name).delta:
        assert_close(got.convergence_delta, want_delta)
