"""Scheduler: one worker thread per device that queues plan blocks by batch key, cuts fused passes and routes results.

Who calls what:
- `submit` / `cancel`: any thread (the service's event loop); they only touch the inbox.
- everything else runs on the worker thread, which alone drives plans and the model.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from attrserve_engine.errors import AttributionError, Cancelled, DeadlineExceeded, ResourceExhausted, Unavailable
from attrserve_engine.executor import run_pass
from attrserve_engine.job import JobTiming
from attrserve_engine.plan import Attribution, Block, BlockResult, Plan, concat_results, slice_block
from attrserve_engine.registry import LoadedModel

log = logging.getLogger(__name__)

# (model, pass signature, per-input (feature shape, dtype), per-arg (shape, dtype))
BatchKey = tuple


@dataclass
class PassStats:
    """What one fused pass did; handed to observers (metrics) after each pass."""

    model: str
    kind: str
    rows: int
    requests: int
    seconds: float


@dataclass
class LiveJob:
    """A submitted job while its plan runs. Created by the engine, owned by the worker afterwards."""

    model: LoadedModel
    plan_factory: Callable[[], Plan]
    finish: Callable[[Attribution, "LiveJob"], Any]  # builds the caller's result (worker thread)
    rows: int
    deadline: float | None
    arrival: float
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    plan: Plan | None = None
    cancelled: bool = False
    done: bool = False
    # blocks of the current yield
    pending: int = 0
    results: list = field(default_factory=list)
    yielded_list: bool = False
    timing: JobTiming = field(default_factory=JobTiming)  # filled pass by pass; queue/total at finish
    first_pass_start: float | None = None


@dataclass
class QueuedBlock:
    job: LiveJob
    block: Block
    index: int  # position in the job's current yield
    enqueued: float
    taken: int = 0  # rows already cut into passes
    parts: list = field(default_factory=list)
    parts_expected: int = 0


def batch_key(model: LoadedModel, block: Block) -> BatchKey:
    return (
        model.key,
        block.pass_signature,
        tuple((tuple(x.shape[1:]), x.dtype) for x in block.inputs),
        tuple((tuple(a.shape[1:]), a.dtype) for a in block.args),
    )


class Scheduler:
    def __init__(self, name: str, max_queued_jobs: int, observers: list[Callable[[PassStats], None]]) -> None:
        self.name = name
        self.max_queued_jobs = max_queued_jobs
        self.observers = observers
        self._cv = threading.Condition()
        self._inbox: list[LiveJob] = []
        self._queues: dict[BatchKey, collections.deque[QueuedBlock]] = {}
        self._queue_rows: dict[BatchKey, int] = {}
        self._live = 0
        self._jobs_by_id: dict[int, LiveJob] = {}
        self._stopping = False
        # Smoothed time between arrivals: waiting for company only pays when company comes sooner than the delay.
        self._last_arrival = time.monotonic()
        self._arrival_gap = 0.0
        self._thread = threading.Thread(target=self._loop, name=f"attrserve-worker-{name}", daemon=True)
        self._thread.start()

    # -- any thread --------------------------------------------------------
    def submit(self, job: LiveJob) -> concurrent.futures.Future:
        with self._cv:
            if self._stopping:
                raise Unavailable("the engine is shutting down")
            if self._live >= self.max_queued_jobs:
                raise ResourceExhausted(f"the queue is full ({self.max_queued_jobs} requests in flight); retry later")
            self._live += 1
            self._jobs_by_id[id(job)] = job
            self._inbox.append(job)
            now = time.monotonic()
            gap = min(now - self._last_arrival, 1.0)
            self._last_arrival = now
            self._arrival_gap = 0.8 * self._arrival_gap + 0.2 * gap
            self._cv.notify()
        return job.future

    def cancel(self, job: LiveJob) -> None:
        # The worker drops the job's rows before they cost compute.
        job.cancelled = True
        with self._cv:
            self._cv.notify()

    def in_flight(self) -> int:
        with self._cv:
            return self._live

    def stop(self, drain: bool, timeout: float | None = None) -> None:
        """Stop taking jobs; with drain, finish the ones in flight first."""
        with self._cv:
            self._stopping = True
            if not drain:
                for job in self._jobs_by_id.values():
                    job.cancelled = True
            self._cv.notify()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._live and (deadline is None or time.monotonic() < deadline):
                self._cv.wait(0.05 if deadline is None else max(0.0, min(0.05, deadline - time.monotonic())))
            self._live = -1  # tells the worker to exit
            self._cv.notify()
        self._thread.join(timeout=5)

    # -- worker thread -----------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._inbox and self._live >= 0:
                    wait = self._next_cut_in()
                    if wait is not None and wait <= 0:
                        break
                    self._cv.wait(wait)
                if self._live < 0:
                    return
                arrivals, self._inbox = self._inbox, []
            # 1) start new plans: their first blocks join the queues
            for job in arrivals:
                self._advance(job, None)
            # 2) cut one fused pass from the ripest queue
            cut = self._cut()
            if cut is not None:
                # 3) execute it and 4) route the results back to their plans
                self._execute(*cut)

    def _next_cut_in(self) -> float | None:
        """Seconds until some queue must be cut (<= 0: now); None when all queues are empty."""
        now = time.monotonic()
        soonest = None
        for key, queue in self._queues.items():
            if not queue:
                continue
            model = queue[0].job.model
            if self._queue_rows[key] >= model.max_batch_rows:
                return 0.0
            due = queue[0].enqueued + self._delay(model) - now
            soonest = due if soonest is None else min(soonest, due)
        return soonest

    def _delay(self, model: LoadedModel) -> float:
        """How long a queue waits for more rows: the model's max_queue_delay, or nothing when requests
        arrive further apart than that (a lone caller would only wait for company that is not coming)."""
        return 0.0 if self._arrival_gap > model.max_queue_delay_s else model.max_queue_delay_s

    def _enqueue(self, job: LiveJob, block: Block, index: int) -> None:
        key = batch_key(job.model, block)
        self._queues.setdefault(key, collections.deque()).append(QueuedBlock(job, block, index, time.monotonic()))
        self._queue_rows[key] = self._queue_rows.get(key, 0) + block.rows

    def _cut(self) -> tuple[LoadedModel, list[tuple[QueuedBlock, Block]]] | None:
        now = time.monotonic()
        ripe = None
        for key, queue in self._queues.items():
            self._drop_dead(key)
            if not queue:
                continue
            model = queue[0].job.model
            full = self._queue_rows[key] >= model.max_batch_rows
            if full or now - queue[0].enqueued >= self._delay(model):
                if ripe is None or queue[0].enqueued < self._queues[ripe][0].enqueued:
                    ripe = key
        if ripe is None:
            return None
        queue = self._queues[ripe]
        model = queue[0].job.model
        budget = model.max_batch_rows
        segments: list[tuple[QueuedBlock, Block]] = []
        while queue and budget > 0:
            qb = queue[0]
            left = qb.block.rows - qb.taken
            if left <= budget or (not qb.block.splittable and not segments):
                part = qb.block if qb.taken == 0 else slice_block(qb.block, qb.taken, qb.block.rows)
                take = left
            elif qb.block.splittable:
                part = slice_block(qb.block, qb.taken, qb.taken + budget)
                take = budget
            else:
                break
            qb.taken += take
            qb.parts_expected += 1
            budget -= take
            self._queue_rows[ripe] -= take
            segments.append((qb, part))
            if qb.taken == qb.block.rows:
                queue.popleft()
        if not queue:
            del self._queues[ripe]
            del self._queue_rows[ripe]
        return model, segments

    def _drop_dead(self, key: BatchKey) -> None:
        queue = self._queues[key]
        now = time.monotonic()
        alive = collections.deque()
        for qb in queue:
            job = qb.job
            if not job.done and job.deadline is not None and now > job.deadline:
                self._fail(job, DeadlineExceeded("the request's deadline passed while it waited for compute"))
            elif not job.done and job.cancelled:
                self._fail(job, Cancelled("the request was cancelled"))
            if job.done:
                self._queue_rows[key] -= qb.block.rows - qb.taken
            else:
                alive.append(qb)
        self._queues[key] = alive

    def _execute(self, model: LoadedModel, segments: list[tuple[QueuedBlock, Block]]) -> None:
        start = time.monotonic()
        outcomes = run_pass(model, [part for _, part in segments])
        seconds = time.monotonic() - start
        rows = sum(part.rows for _, part in segments)
        jobs = {id(qb.job): qb.job for qb, _ in segments}
        for job in jobs.values():
            job.first_pass_start = job.first_pass_start or start
            job.timing.compute_ms += 1e3 * seconds
            job.timing.passes += 1
            job.timing.pass_rows += rows
            job.timing.pass_requests = max(job.timing.pass_requests, len(jobs))
        stats = PassStats(model.name, segments[0][1].kind, rows, len(jobs), seconds)
        for observe in self.observers:
            try:
                observe(stats)
            except Exception:  # an observer must never break the engine
                log.exception("pass observer failed")
        for (qb, _), outcome in zip(segments, outcomes):
            job = qb.job
            if job.done:
                continue
            if isinstance(outcome, AttributionError):
                self._fail(job, outcome)
                continue
            qb.parts.append(outcome)
            if qb.taken == qb.block.rows and len(qb.parts) == qb.parts_expected:
                job.results[qb.index] = concat_results(qb.parts)
                job.pending -= 1
                if job.pending == 0:
                    self._advance(job, job.results if job.yielded_list else job.results[0])

    def _advance(self, job: LiveJob, sent: BlockResult | list | None) -> None:
        """Resume the job's plan with its results; queue what it yields next, or finish it."""
        if job.done:
            return
        if job.cancelled:
            self._fail(job, Cancelled("the request was cancelled"))
            return
        try:
            if job.plan is None:
                job.plan = job.plan_factory()
                yielded = next(job.plan)
            else:
                yielded = job.plan.send(sent)
        except StopIteration as stop:
            self._succeed(job, stop.value)
            return
        except Exception as e:  # noqa: BLE001 - an AttributionError, or a bug reported as INTERNAL
            if not isinstance(e, AttributionError):
                log.exception("plan failed")
            self._fail(job, e)
            return
        blocks = yielded if isinstance(yielded, list) else [yielded]
        job.yielded_list = isinstance(yielded, list)
        job.pending = len(blocks)
        job.results = [None] * len(blocks)
        for i, block in enumerate(blocks):
            self._enqueue(job, block, i)

    def _succeed(self, job: LiveJob, attribution: Attribution) -> None:
        try:
            result = job.finish(attribution, job)
        except Exception as e:  # noqa: BLE001
            log.exception("finishing a job failed")
            self._fail(job, e)
            return
        self._close(job)
        if not job.future.done():
            job.future.set_result(result)

    def _fail(self, job: LiveJob, error: BaseException) -> None:
        if job.done:
            return
        self._close(job)
        if not job.future.done():
            job.future.set_exception(error)

    def _close(self, job: LiveJob) -> None:
        job.done = True
        if job.plan is not None:
            job.plan.close()
        with self._cv:
            self._live -= 1
            self._jobs_by_id.pop(id(job), None)
            self._cv.notify_all()

