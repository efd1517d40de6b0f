"""Scheduler: the worker threads of one device, which queue plan blocks by batch key, cut fused passes and route results.

Who calls what:
- `submit`, `cancel`, `in_flight`, `serving`, `stop`: any thread (the service's event loop, the engine
  facade, a future's done-callback). They only touch the inbox, the cancel list and flags, under `_cv`.
- everything else runs on the workers, which drive plans, own the queues and run the model. A device has one
  worker, or as many as the most `instances` (replicas) any of its models has: a worker holds `_state` while it
  takes the inbox into the queues, cuts a pass or routes a pass's results, and runs the pass itself without it,
  on a replica no other pass uses. So every waiting request's rows can join the next pass, whichever worker cuts
  it, and the passes of a model with two replicas overlap. A model of one replica runs on the first worker only
  (its passes stay on one thread); the others run the replicas of models that have several. News of work wakes the
  first worker, and the others only when it is work of a model of several replicas that the first is not idle to
  take (`_offer`); a worker that queued work it may not run tells the others (`_changed_now`). Cancels, holds,
  stops and crashes wake every worker (`_wake`).

Arrivals that may run as one plan (`Merge`: same load and key, set by the engine) start as one merged job
(`_merged`): it holds the plan, its members stay the jobs the scheduler accounts for, and its answer is split into
theirs (docs/ARCHITECTURE.md, "Merged plans").

NOTE: jobs leave the queues in one place, `_evict`, at a pass boundary; nothing removes queue entries while
another step walks them. A job that dies (deadline passed, caller cancelled, a failed block) is failed at
once and its rows are gone before the next pass is cut.

NOTE: nothing may escape a worker silently. Whatever kills a loop (a bug here, a model raising
SystemExit) is logged with its traceback, every job the device held fails with UNAVAILABLE (its other workers
leave too), observers hear `serving=False` at once (health goes NOT_SERVING), and a new generation of workers
starts after a back-off, once the device's models answer again (`ready_check`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import heapq
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, NamedTuple, NoReturn

from attrserve_engine.errors import AttributionError, Cancelled, DeadlineExceeded, PassStuck, ResourceExhausted, Unavailable, size_text
from attrserve_engine.events import (
    DROP_CANCELLED,
    DROP_DEADLINE,
    REFUSED_BYTES,
    REFUSED_REQUESTS,
    REFUSED_ROWS,
    EngineObserver,
    Observers,
    PassStats,
    deadline_slack,
)
from attrserve_engine.executor import run_pass
from attrserve_engine.job import JobTiming
from attrserve_engine.models import LoadedModel
from attrserve_engine.plan import Block, BlockResult, JobPlan, PassKind, concat_results, slice_block
from attrserve_engine.tuning import PassSizeTuner, tuning_start

log = logging.getLogger(__name__)

# (the model's load, Block.pass_key): what rows must share to be fused. The load itself, not its name and
# version: while a reload replaces a version, rows of the old and the new load never share a pass.
BatchKey = tuple

INTERACTIVE, BATCH = "interactive", "batch"
# Admission's rows bound of a model whose rate is not measured yet (and whose config sets none).
AUTO_ROWS_WITHOUT_RATE = 100_000
# A pass is given up as stuck after stuck_pass_seconds, or after this many times as long as the model's measured rate
# says its rows take, whichever is longer: a slow model's long passes are not taken for stuck ones.
STUCK_PASS_FACTOR = 20.0
# A model none of whose passes has ended yet (nor a load-time probe timed: a model without pinned input shapes, whose
# load runs no warm-up, before its first pass ends) gets this many times stuck_pass_seconds: its first pass may be a
# large model's max_batch_rows rows.
STUCK_UNMEASURED_FACTOR = 10.0
# While interactive rows wait, ripe batch rows still get at least one pass in this many (starvation bound).
BATCH_EVERY = 4
# Batch requests are admitted only while their model's queue is under this share of its bounds, and the device's
# requests under this share of max_queued_jobs: back-fills never fill the queue that online calls need.
BATCH_SHARE = 0.5


@dataclass(frozen=True)
class Merge:
    """How a job may run as one plan with others that arrive with it (the engine sets it where the algorithm's examples
    are independent of one another): jobs of one load with equal `key` may, as many as one pass of `kind` holds.
    `combine` takes their `payload`s, in order, and returns the plan over all their examples and a function that cuts
    that plan's returned values into each job's."""

    key: Hashable
    kind: PassKind  # the pass kind of the jobs' rows
    payload: Any
    combine: Callable[[list[Any]], tuple[JobPlan, Callable[[list], list[list]]]]


@dataclass(eq=False)
class LiveJob:
    """A submitted job while its plan runs. Created by the engine, owned by the worker afterwards."""

    model: LoadedModel
    plan_factory: Callable[[], JobPlan]
    finish: Callable[[list, LiveJob], Any]  # builds the caller's result from the plan's return value (worker thread)
    rows: int
    deadline: float | None
    arrival: float
    request_id: str = ""  # the caller's id, for log lines about the job
    priority: str = INTERACTIVE  # or BATCH
    row_bytes: int = 0  # admission's estimate of one row's bytes (LoadedModel.row_bytes)
    kind: PassKind = PassKind.GRADIENT  # the pass kind of most of its rows: admission's estimates count them all at its rate
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    plan: JobPlan | None = None
    cancelled: bool = False  # set by any thread (Scheduler.cancel); acted on by the worker
    done: bool = False
    # blocks of the current yield
    pending: int = 0
    results: list = field(default_factory=list)
    timing: JobTiming = field(default_factory=JobTiming)  # filled pass by pass; queue/total at finish
    first_pass_start: float | None = None
    rows_done: int = 0  # rows of this job computed so far
    queue_keys: set = field(default_factory=set)  # batch keys it has (or had) blocks queued under
    rows_released: int = 0  # of `rows`, how many no longer count as queued work (admission)
    merge: Merge | None = None  # may run as one plan with others (Scheduler._merged)
    merged_into: LiveJob | None = None  # the merged job whose plan runs its examples
    # A merged job: the jobs whose examples its plan runs, and how its returned values split into theirs.
    members: tuple[LiveJob, ...] = ()
    split: Callable[[list], list[list]] | None = None


@dataclass
class _Backlog:
    jobs: int = 0
    rows: int = 0
    bytes: int = 0
    kinds: dict[PassKind, int] = field(default_factory=dict)  # `rows` by the jobs' pass kinds (LiveJob.kind)


_NO_BACKLOG = _Backlog()  # (read only)


@dataclass
class QueuedBlock:
    job: LiveJob
    block: Block
    index: int  # position in the job's current yield
    enqueued: float
    taken: int = 0  # rows already cut into passes
    parts: list = field(default_factory=list)  # (first row's offset in the block, result) per pass that ran some
    parts_expected: int = 0


@dataclass
class _Cut:
    """One pass a worker cut: its model, its segments (each with its first row's offset in its block), the replica it
    runs on, the size it was cut to, the rows that size allowed (the pass budget) and the tuner that chose the size
    (None where the size is configured), which hears how the pass ran."""

    model: LoadedModel
    segments: list[tuple[QueuedBlock, Block, int]]
    replica: int
    size: int
    budget: int
    tuner: PassSizeTuner | None


class _Running(NamedTuple):
    """A pass running now (Scheduler._running): when it started, its model and rows, its requests' futures, and the
    replica it runs on, which no other pass may use until it returns, whatever generation the device is in by then."""

    start: float
    model: LoadedModel
    rows: int
    callers: tuple[concurrent.futures.Future, ...]
    replica: int


def batch_key(model: LoadedModel, block: Block) -> BatchKey:
    return (model, block.pass_key)  # LoadedModel hashes by identity


def _callers(segments: list[tuple[QueuedBlock, Block, int]]) -> tuple[concurrent.futures.Future, ...]:
    """The futures of the requests a pass holds rows of (a merged job's: its members')."""
    jobs = {id(qb.job): qb.job for qb, _, _ in segments}.values()
    return tuple(member.future for job in jobs for member in (job.members or (job,)))


def _finished(*_: Any) -> Any:
    raise AssertionError("a finished job has let go of its plan (Scheduler._close_plan)")


def _finished_by_members(returned: list, job: LiveJob) -> Any:
    raise AssertionError("a merged job finishes through its members (Scheduler._succeed_members)")


def _drop_tracebacks(error: BaseException) -> None:
    """`error`, and every exception it was raised from or while handling, without its traceback."""
    todo, seen = [error], set()
    while todo:
        e = todo.pop()
        if id(e) not in seen:
            seen.add(id(e))
            e.__traceback__ = None
            todo += [chained for chained in (e.__cause__, e.__context__) if chained is not None]


# What a finished job holds in place of its caller's future, never resolved: that one went with the answer (_answer).
_ANSWERED: concurrent.futures.Future = concurrent.futures.Future()


def _answer(job: LiveJob, result: Any = None, error: BaseException | None = None) -> None:
    """Complete `job`'s caller's future unless the caller cancelled it first (a race the worker must not die of), and
    let go of it. A finished job's bookkeeping may outlive it (Scheduler._close_plan), and the future holds the answer,
    or an error whose traceback holds the frames of the plan and of the pass it came from, with their tensors.

    An error the caller can act on (AttributionError) goes without its traceback, and the ones it was raised from
    without theirs: the caller gets its type and message, and nothing shows the frames. An internal error keeps its
    traceback for the log line that gives it an id (the servicer's, the engine process's); it holds those frames for
    as long as its caller holds it."""
    future, job.future = job.future, _ANSWERED
    if future is _ANSWERED:  # answered already (a stop answered the callers of a pass that returned after it)
        return
    if isinstance(error, AttributionError):
        _drop_tracebacks(error)
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass  # cancelled by its caller meanwhile: nobody is waiting for it


class Scheduler:
    def __init__(
        self,
        name: str,
        max_queued_jobs: int,
        observers: list[EngineObserver],
        ready_check: Callable[[], None] = lambda: None,
        restart_delay_s: float = 0.1,
        run_pass: Callable[[LoadedModel, list[Block], Callable[[str], None], int], list] = run_pass,
        max_queue_seconds: float = 2.0,
        max_pass_seconds: float = 0.25,
        stuck_pass_seconds: float = 0.0,
    ) -> None:
        self.name = name
        self._run_pass = run_pass  # the executor; tests give a fake
        self.max_queued_jobs = max_queued_jobs
        self.max_queue_seconds = max_queue_seconds
        self.max_pass_seconds = max_pass_seconds
        # Per load: its jobs accepted and not finished, their rows not yet computed and those rows' estimated bytes
        # (admission's bounds and the backlog the metrics and drains read).
        self._pending: dict[LoadedModel, _Backlog] = {}
        # Fairness: the pass number at which each load last had a pass (least recently served goes first),
        # and passes since batch rows last ran while some waited.
        self._served_at: weakref.WeakKeyDictionary[LoadedModel, int] = weakref.WeakKeyDictionary()
        self._passes = 0
        self._since_batch = 0
        self._observers = Observers(observers)
        self._ready_check = ready_check  # run on a restarted worker before it serves again
        self._restart_delay_s = restart_delay_s
        # One lock, two conditions: the first worker (it runs every model) and the stop() waiter wait on `_cv`; the
        # other workers, which run only models of several replicas, on `_siblings`, so work they cannot take does
        # not wake them.
        lock = threading.RLock()
        self._cv = threading.Condition(lock)
        self._siblings = threading.Condition(lock)
        # The workers' own state (queues, plans, replicas in use); taken before `_cv` when both are held.
        self._state = threading.Lock()
        self._workers = 1  # worker threads per generation: the most replicas of a model submitted here
        self._generation = 0  # a crash starts a new one; the workers of an old one leave
        self._threads: list[threading.Thread] = []
        self._changed = 0  # bumped (under _cv) when a worker made work another worker could take
        self._first_idle = False  # the first worker waits and no news has been sent to it since (under _cv)
        # Per load, the replicas no pass uses now, the most recently used last (absent: all of them). A pass takes the
        # last: on one caller a model's passes then stay on one replica, whose weights are warm in the caches.
        self._free: weakref.WeakKeyDictionary[LoadedModel, collections.deque[int]] = weakref.WeakKeyDictionary()
        # Per load whose max_batch_rows the probe chose, the rows per pass of each pass kind, tuned on its passes.
        self._tuners: weakref.WeakKeyDictionary[LoadedModel, dict[PassKind, PassSizeTuner]] = weakref.WeakKeyDictionary()
        # Per load, the measured rows/s of each pass kind (the pass budget's and admission's), and under None its rate before its
        # first pass (the probe's): a forward pass runs several times as many rows a second as a gradient pass, so one
        # rate over both cut a slow model's gradient passes to many times max_pass_seconds after forward traffic.
        self._rates: weakref.WeakKeyDictionary[LoadedModel, dict[PassKind | None, float]] = weakref.WeakKeyDictionary()
        self._inbox: list[LiveJob] = []
        self._cancelled: list[LiveJob] = []
        self._jobs: set[LiveJob] = set()  # accepted and not finished: inbox, queued or in a pass
        self._deadlines: list[tuple[float, int, LiveJob]] = []  # heap; entries of finished jobs are skipped
        self._sequence = itertools.count()
        self._queues: dict[BatchKey, collections.deque[QueuedBlock]] = {}
        self._queue_rows: dict[BatchKey, int] = {}
        self._evicted_keys: set[BatchKey] = set()  # queues holding blocks of jobs that died since the last boundary
        self._held = 0  # > 0: queue what arrives, cut no pass (hold/release)
        self._stopping = False  # no new jobs
        self._exit = False  # the workers leave their loops
        self._serving = True
        self._down_reason = ""
        self.restarts = 0
        # A pass that runs longer than stuck_pass_seconds (0: never) is given up (_watch): (generation, worker index) ->
        # each pass running now, of this generation or an ended one, and the (generation, index) of a pass given up, until
        # it returns.
        self.stuck_pass_seconds = stuck_pass_seconds
        self._running: dict[tuple[int, int], _Running] = {}
        self._stalled: tuple[int, int] | None = None
        self._stopped = threading.Event()  # the watchdog's: set at stop
        self._failures_in_a_row = 0
        self._started = time.monotonic()
        # Smoothed time between arrivals: waiting for company only pays when company comes sooner than the delay.
        self._last_arrival = time.monotonic()
        self._arrival_gap = 0.0
        self._start_workers(None)
        if stuck_pass_seconds > 0:
            watchdog = threading.Thread(target=self._watch, name=f"attrserve-watchdog-{name}", daemon=True)
            watchdog.start()

    # -- any thread --------------------------------------------------------
    def submit(self, job: LiveJob, admit: bool = True) -> concurrent.futures.Future:
        """Queue a job; with `admit`, refuse it (ResourceExhausted) when it would pass its model's bounds."""
        with self._cv:
            self._check_open()
            if admit:
                self._admit(job.model, job.rows, job.rows * job.row_bytes, job.priority, job.kind)
            pending = self._pending.get(job.model)
            if pending is None:  # (not setdefault: a backlog and its dict built for every request)
                pending = self._pending[job.model] = _Backlog()
            pending.jobs += 1
            pending.rows += job.rows
            pending.bytes += job.rows * job.row_bytes
            pending.kinds[job.kind] = pending.kinds.get(job.kind, 0) + job.rows
            self._jobs.add(job)
            self._inbox.append(job)
            if job.deadline is not None:
                heapq.heappush(self._deadlines, (job.deadline, next(self._sequence), job))
            now = time.monotonic()
            gap = min(now - self._last_arrival, 1.0)
            self._last_arrival = now
            self._arrival_gap = 0.8 * self._arrival_gap + 0.2 * gap
            if job.model.instances > self._workers:  # more workers now (after a crash, the restart starts them)
                if self._serving:
                    self._spawn(self._generation, job.model.instances - self._workers)
                self._workers = job.model.instances
            self._offer(shared=job.model.instances > 1)
        return job.future

    def admit(self, model: LoadedModel, priority: str = INTERACTIVE) -> None:
        """Refuse at once, before a request is even parsed, when its model's queue is already full."""
        with self._cv:
            self._check_open()
            self._admit(model, 1, 0, priority)

    def row_bound(self, model: LoadedModel, kind: PassKind = PassKind.GRADIENT, share: float = 1.0) -> int:
        """Admission's bound on a model's queued rows for a request of `kind`'s rows, within `share` of the bounds (batch
        requests'): its own (max_queued_rows), or the rows that make `share` of max_queue_seconds of work at the measured
        rates: those queued, each at its own kind's rate, and as many of `kind`'s as the seconds left hold. The bound is
        in seconds for every kind: a forward pass runs several times as many rows a second as a gradient pass, and one
        rate over both let a queue of gradient rows grow to many times the seconds, or refused forward rows at a fraction.
        Holds the lock."""
        if model.max_queued_rows:
            return int(model.max_queued_rows * share)
        pending = self._pending.get(model, _NO_BACKLOG)
        estimate = self._seconds(model, pending, 0, kind)
        if estimate is None:
            return int(AUTO_ROWS_WITHOUT_RATE * share)
        queued, rate = estimate
        room = int((self.max_queue_seconds * share - queued) * rate * model.instances)
        return max(int(2 * model.max_batch_rows * share), pending.rows + room)

    def pending_rows(self, model: LoadedModel) -> int:
        """Rows of `model`'s (this load's) accepted requests not yet computed."""
        with self._cv:
            return self._pending.get(model, _NO_BACKLOG).rows

    def estimate(self, model: LoadedModel, rows: int, kind: PassKind) -> tuple[int, float | None]:
        """`model`'s (this load's) queued rows, and the seconds they and `rows` more of `kind` take (None before any rate
        is known): the deadline estimate (Engine._refuse_if_late)."""
        with self._cv:
            pending = self._pending.get(model, _NO_BACKLOG)
            estimate = self._seconds(model, pending, rows, kind)
            return pending.rows, None if estimate is None else estimate[0]

    def _seconds(
        self, model: LoadedModel, pending: _Backlog, rows: int = 0, kind: PassKind = PassKind.GRADIENT
    ) -> tuple[float, float] | None:
        """The seconds `model`'s replicas together take for its queued rows, each job's at the rate of its pass kind, and
        for `rows` more of `kind`; and one replica's rows/s of `kind`. Rates as `_rate` reads them; None before any is
        known. Holds the lock."""
        rate = self._rate(model, kind)
        if not rate:
            return None
        # (a queued kind's rate is known where `kind`'s is: both are measured, or both the slowest known, or the probe's)
        seconds = rows / rate + sum(queued / (self._rate(model, k) or rate) for k, queued in pending.kinds.items() if queued)
        return seconds / model.instances, rate

    def _check_open(self) -> None:
        if self._stopping:
            raise Unavailable("the engine is shutting down")
        if not self._serving:
            if self._stalled is not None:
                raise Unavailable(f"the engine worker for {self.name} is down until a stuck pass returns ({self._down_reason})")
            raise Unavailable(f"the engine worker for {self.name} is restarting after a failure ({self._down_reason}); retry shortly")

    def _admit(self, model: LoadedModel, rows: int, nbytes: int, priority: str, kind: PassKind = PassKind.GRADIENT) -> None:
        """Raise ResourceExhausted (with a retry hint) when this work would pass a bound. Holds the lock.

        An empty queue takes any request (the per-request row cap still applies), so no request is refused
        forever; batch requests may fill only BATCH_SHARE of the bounds."""
        share = BATCH_SHARE if priority == BATCH else 1.0
        held = sum(backlog.jobs for backlog in self._pending.values())  # abandoned jobs no longer count
        if held >= max(1, int(self.max_queued_jobs * share)):
            self._refuse(
                model,
                REFUSED_REQUESTS,
                f"this server holds {held} requests for {self.name}, its limit"
                + (f" for batch requests ({BATCH_SHARE:.0%} of {self.max_queued_jobs})" if priority == BATCH else ""),
            )
        pending = self._pending.get(model, _NO_BACKLOG)
        queued_rows, queued_bytes = pending.rows, pending.bytes
        if not queued_rows:
            return
        rows_bound = self.row_bound(model, kind, share)
        if queued_rows + rows > rows_bound:
            self._refuse(
                model,
                REFUSED_ROWS,
                f"model {model.name!r} has {queued_rows} rows of work queued; {rows} more would pass its bound of {rows_bound}"
                + (" for batch requests" if priority == BATCH else ""),
            )
        bytes_bound = int(model.max_queued_bytes * share)
        if model.max_queued_bytes and queued_bytes + nbytes > bytes_bound:
            self._refuse(
                model,
                REFUSED_BYTES,
                f"model {model.name!r} has ~{size_text(queued_bytes)} of work queued; this request's ~{size_text(nbytes)} "
                f"would pass its bound of {size_text(bytes_bound)}" + (" for batch requests" if priority == BATCH else ""),
            )

    def _refuse(self, model: LoadedModel, reason: str, why: str) -> NoReturn:
        estimate = self._seconds(model, self._pending.get(model, _NO_BACKLOG))
        retry = min(30.0, max(0.05, estimate[0])) if estimate is not None else 1.0
        self._observers.request_refused(model.name, reason)
        raise ResourceExhausted(f"{why}; retry in about {retry * 1e3:.0f} ms", retry_after_s=retry)

    def cancel(self, job: LiveJob) -> None:
        """The caller gave up on `job`: its rows are dropped at the next pass boundary, before they cost compute, and
        stop counting as queued work now: admission's bounds and the deadline estimate must not refuse a request for
        work nobody waits for while a long pass runs (a storm of cancelled calls once made the next request look 6 s
        late)."""
        with self._cv:
            if job in self._jobs and not job.cancelled:
                self._abandon(job)
                self._wake(everyone=True)

    def _abandon(self, job: LiveJob) -> None:
        """Nobody waits for `job` any more: it stops counting as held work now (admission's bounds, the backlog), and
        the worker drops it at the next pass boundary. Holds the lock."""
        job.cancelled = True
        self._uncount(job)
        self._cancelled.append(job)

    def _uncount(self, job: LiveJob) -> None:
        """`job`, held and not yet abandoned, stops counting: its rows and its place. Holds the lock."""
        self._release(job, job.rows)
        pending = self._pending[job.model]
        pending.jobs -= 1
        if not pending.jobs:
            del self._pending[job.model]

    def in_flight(self) -> int:
        """Jobs accepted and not yet finished, the abandoned ones until a worker has dropped them."""
        with self._cv:
            return len(self._jobs)

    def hold(self) -> None:
        """Accept what arrives but start no plan and cut no pass until `release` (nested holds count): then the arrivals
        start together, in order. Deadlines and cancels still apply."""
        with self._cv:
            self._held += 1

    def release(self) -> None:
        with self._cv:
            self._held -= 1
            self._wake(everyone=True)

    def backlog(self, model: str | LoadedModel) -> tuple[int, int]:
        """(requests, rows) accepted and not finished, of every load of a model (by name) or of one load: their
        jobs, and their rows not yet computed (each job's row count less the rows already run). A job whose caller
        gave up counts in neither from that moment (`_abandon`). Read at scrape time (metrics) and while a load
        drains, any thread."""
        with self._cv:
            if isinstance(model, str):
                loads = [pending for load, pending in self._pending.items() if load.name == model]
            else:
                loads = [self._pending.get(model, _Backlog())]
            return sum(p.jobs for p in loads), sum(p.rows for p in loads)

    def serving(self) -> tuple[bool, str]:
        """Whether the worker is up, and if not, why."""
        with self._cv:
            return self._serving, self._down_reason

    def stop(self, drain: bool, timeout: float | None = None) -> int:
        """Stop taking jobs; with drain, let the ones in flight finish first (for at most `timeout` seconds).

        Jobs still unfinished after that fail with UNAVAILABLE. Returns how many jobs were lost that way.
        """
        self._stopped.set()
        with self._cv:
            self._stopping = True
            if not drain:
                for job in self._jobs:
                    if not job.cancelled:
                        self._abandon(job)
            self._wake(everyone=True)
            until = None if timeout is None else time.monotonic() + timeout
            while self._jobs and (until is None or time.monotonic() < until):
                self._cv.wait(0.05 if until is None else max(0.0, min(0.05, until - time.monotonic())))
            lost = len(self._jobs)
            self._exit = True  # the workers fail what is left and leave
            self._wake(everyone=True)
            threads = list(self._threads)
        until = time.monotonic() + 5
        for thread in threads:
            thread.join(timeout=max(0.0, until - time.monotonic()))
        if any(thread.is_alive() for thread in threads):  # stuck in a model's forward: answer its callers anyway
            with self._cv:
                stranded, self._jobs, self._pending = list(self._jobs), set(), {}
            for job in stranded:
                job.done = True  # what the stuck pass returns later is not routed to it
                _answer(job, error=Unavailable("the server shut down before this request finished"))
        return lost

    # -- worker threads ----------------------------------------------------
    def _start_workers(self, restart_delay: float | None) -> None:
        """A new generation of workers: the first (after a crash: waits, checks the models, serves again) starts the rest."""
        self._threads = []
        self._spawn(self._generation, 1, restart_delay)

    def _spawn(self, generation: int, count: int, restart_delay: float | None = None) -> None:
        for _ in range(count):
            index = len(self._threads)  # 0 for a generation's first worker, the only one that runs one-replica models
            name = f"attrserve-worker-{self.name}" + (f"-{index}" if index else "")
            thread = threading.Thread(target=self._work, args=(generation, restart_delay, index), name=name, daemon=True)
            self._threads.append(thread)
            thread.start()

    def _work(self, generation: int, restart_delay: float | None, index: int) -> None:
        """Thread body: (after a crash: wait, check the models, serve again) then the loop; recovery if it dies."""
        try:
            if restart_delay is not None:
                with self._cv:
                    self._cv.wait_for(lambda: self._exit, timeout=restart_delay)
                    if self._exit:
                        return
                self._ready_check()
                with self._cv:
                    self._serving, self._down_reason = True, ""
                    self._started = time.monotonic()
                    self._spawn(generation, self._workers - 1)
                log.warning("engine worker for %s restarted (restart %d); serving again", self.name, self.restarts)
                self._observers.worker_state(self.name, True, "")
            self._loop(generation, index)
        except BaseException as e:  # whatever killed it, the worker must not die silently
            self._crashed(e, generation)

    def _crashed(self, error: BaseException, generation: int) -> None:
        """A worker died: every job on the device fails with UNAVAILABLE, its other workers leave (they may be in a pass:
        its results are dropped), and a new generation starts after a back-off."""
        reason = f"{type(error).__name__}: {error}"[:500]
        log.error("engine worker for %s died: %s", self.name, reason, exc_info=error)
        lost = Unavailable(f"the engine worker for {self.name} failed ({reason}) before this request finished; it is restarting, retry")
        delay = self._give_up(generation, reason, lost)
        if delay is not None:
            with self._cv:
                self._start_workers(delay)

    def _give_up(
        self,
        generation: int,
        reason: str,
        lost: Unavailable,
        stalled: int | None = None,
        stuck: tuple[set[concurrent.futures.Future], PassStuck] | None = None,
    ) -> float | None:
        """End `generation`: the device is down for `reason`, and every job on it fails with `lost` (those whose futures
        are in `stuck`'s set: with its error); its workers leave at their next boundary (the results of their passes
        are dropped). With `stalled`, the worker of that index is stuck in a pass, and the next generation waits for it
        (_returned). Returns the back-off before a new generation
        starts; None when the workers are exiting, when `generation` is over already (a sibling's crash ended it), or
        when the stalled pass has returned meanwhile (then nothing is given up)."""
        with self._state, self._cv:
            if generation != self._generation:
                return None
            if stalled is not None:
                if (generation, stalled) not in self._running:  # the stuck pass returned meanwhile: nothing to give up
                    return None
                self._stalled = (generation, stalled)
            self._generation += 1
            self._serving, self._down_reason = False, reason
            held, self._jobs = list(self._jobs), set()
            self._inbox, self._cancelled, self._deadlines = [], [], []
            self._queues, self._queue_rows, self._evicted_keys = {}, {}, set()
            self._pending = {}
            self._free = self._replicas_not_running()
            exiting = self._exit
            self.restarts += 1
            # Back off when it keeps dying (a model that kills the worker on every request), not after a rare crash.
            self._failures_in_a_row = 1 if time.monotonic() - self._started > 60 else self._failures_in_a_row + 1
            delay = min(self._restart_delay_s * 2 ** (self._failures_in_a_row - 1), 30.0)
            self._wake(everyone=True)
        self._observers.worker_state(self.name, False, reason)  # health first, then the callers hear why
        for job in held:
            job.done = True
            self._close_plan(job)
            _answer(job, error=stuck[1] if stuck is not None and job.future in stuck[0] else lost)
        return None if exiting else delay

    def _replicas_not_running(self) -> weakref.WeakKeyDictionary[LoadedModel, collections.deque[int]]:
        """The free replicas a new generation starts with (holds _state): all but those a pass still runs on. A pass of
        the ended generation keeps its replica until it returns (its hooks may be on the model: a layer method's, a
        rule's, an RNN's training mode), and a pass of the new one on that replica would run with them (a crashed
        worker's sibling in a long pass; a second stuck pass when the first given up returns). _execute gives it back."""
        busy: dict[LoadedModel, set[int]] = {}
        for running in self._running.values():
            busy.setdefault(running.model, set()).add(running.replica)
        return weakref.WeakKeyDictionary({m: collections.deque(r for r in range(m.instances) if r not in used) for m, used in busy.items()})

    def _watch(self) -> None:
        """The watchdog's thread: every second (or a quarter of stuck_pass_seconds) it looks for a stuck pass."""
        period = min(1.0, self.stuck_pass_seconds / 4)
        while not self._stopped.wait(period):
            self.give_up_stuck_pass()

    def give_up_stuck_pass(self) -> str:
        """Give up a pass that has run longer than it may (stuck_pass_seconds, or STUCK_PASS_FACTOR times what its rows
        take as the model's passes so far and its probe measured them; STUCK_UNMEASURED_FACTOR times stuck_pass_seconds
        before any was measured): a model's code that never returns (a deadlock, a wait on something that
        never comes) held the device, and health said SERVING while every request on it waited for its deadline. Its
        jobs and every other on the device fail with UNAVAILABLE saying why, health says NOT_SERVING, new requests are
        refused, and observers hear `worker_stuck` (the engine process then exits, and the front starts another).
        The device serves again once the pass returns: a thread cannot be stopped, and until then the model may still
        hold the pass's hooks. Returns why, or "" when no pass is stuck."""
        now = time.monotonic()
        for (generation, index), (start, model, rows, callers, _) in list(self._running.items()):
            # the longer of two estimates of a row's time: every pass's (small ones overstate it) and the probe's rate
            per_row = max(model.row_seconds or 0.0, 1 / model.rows_per_second if model.rows_per_second else 0.0)
            limit = STUCK_PASS_FACTOR * rows * per_row if per_row else STUCK_UNMEASURED_FACTOR * self.stuck_pass_seconds
            limit = max(self.stuck_pass_seconds, limit)
            if now - start <= limit:
                continue
            reason = (
                f"a pass of model {model.name!r} ({rows} rows) has run for {now - start:.1f} s, over the {limit:.1f} s "
                "a pass may take (stuck_pass_seconds): the model's code is stuck"
            )
            message = f"the engine worker for {self.name} gave up: {reason}; retry"
            lost, stuck = Unavailable(message), PassStuck(message, why=reason)
            if self._give_up(generation, reason, lost, stalled=index, stuck=(set(callers), stuck)) is None:
                continue
            log.error("engine worker for %s: %s; NOT_SERVING until that pass returns", self.name, reason)
            self._observers.worker_stuck(self.name, reason)
            return reason
        return ""

    def _returned(self, generation: int, index: int) -> None:
        """A pass given up as stuck returned: the device serves again (a new generation, at once: the pass's hooks are
        off the model now)."""
        with self._cv:
            self._stalled = None
            if not self._exit:
                log.warning("engine worker for %s: the pass given up as stuck returned; restarting the worker", self.name)
                self._start_workers(0.0)

    def _loop(self, generation: int, index: int) -> None:
        while True:
            with self._observers.worker_step(), self._state:
                # The inbox and the deaths are taken under _state too: a job that died before a worker's cut is
                # dropped before it, whichever worker took the news.
                with self._cv:
                    if self._exit or generation != self._generation:
                        break
                    seen = self._changed
                    held = self._held > 0
                    # While held, arrivals wait in the inbox: their plans start together at the release (merged where
                    # they may be), so what a held block queues runs the same way however the submitter was scheduled.
                    arrivals, self._inbox = ([], self._inbox) if held else (self._inbox, [])
                    dead, self._cancelled = self._cancelled, []
                    now = time.monotonic()
                    while self._deadlines and (self._deadlines[0][2].done or self._deadlines[0][0] <= now):
                        dead.append(heapq.heappop(self._deadlines)[2])
                # 1) drop the jobs that died since the last pass boundary (deadline passed, caller cancelled)
                for job in dead:
                    self._drop_if_dead(job, now)
                # 2) start new plans (one for the arrivals that may run as one): their first blocks join the queues
                for job in self._merged(arrivals):
                    self._advance(job, None)
                self._evict()
                # 3) cut one fused pass from the ripest queue whose model has a free replica
                cut = None if held else self._cut(index)
                wake_in = self._queues_wake_in(index) if cut is None and not held else None
                shared = self._shared_work()
                if (arrivals or dead) and self._workers > 1 and (cut is None or index):
                    # What it queued may be a pass only another worker may run: the first worker's (a model of one
                    # replica), which may have looked at the inbox before this worker emptied it and be about to sleep.
                    self._changed_now(shared)
            if cut is None:
                with self._cv:
                    # Anything that may have changed since the lists were taken wakes the loop: no lost wake-ups.
                    changed = self._changed != seen or (self._held > 0) != held
                    arrived = bool(self._inbox) and not held
                    if not (self._exit or generation != self._generation or arrived or self._cancelled or changed):
                        if self._deadlines:
                            due = self._deadlines[0][0] - time.monotonic()
                            wake_in = due if wake_in is None else min(wake_in, due)
                        if wake_in is None or wake_in > 0:
                            if index:
                                self._siblings.wait(wake_in)
                            else:
                                self._first_idle = True
                                self._cv.wait(wake_in)
                                self._first_idle = False
                continue
            if shared:
                self._changed_now(shared=True)  # a sibling may cut the next pass while this one runs
            if not self._execute(cut, generation, index):
                break
        # Leaving (stop): whatever is still here will not be computed.
        with self._state:
            if generation == self._generation:
                with self._cv:
                    left = list(self._jobs)
                for job in left:
                    self._fail(job, Unavailable("the server shut down before this request finished"))

    def _execute(self, cut: _Cut, generation: int, index: int) -> bool:
        """4) Run the pass `cut` on its replica, then route the results back to their plans; False when the generation
        ended meanwhile. The pass's blocks and outputs are this call's locals: they go when it returns, not when the
        worker cuts its next pass (an idle worker held its last pass's tensors for as long as it waited)."""
        model, segments, replica = cut.model, cut.segments, cut.replica
        start = time.monotonic()
        parts = [part for _, part, _ in segments]
        # The callers' futures are not a local: a plan's error raised while its results are routed holds this frame (its
        # traceback's), and this frame would hold the error's future, a reference cycle only the collector ends.
        with self._state:
            if generation != self._generation:  # ended since the cut: its jobs have failed, its replica is the new one's
                return False
            self._running[generation, index] = _Running(start, model, sum(part.rows for part in parts), _callers(segments), replica)
        self._observers.worker_running(self.name, index, self._running[generation, index].callers)
        try:
            outcomes = self._run_pass(model, parts, partial(self._observers.pass_split, model.name), replica)
        finally:
            self._observers.worker_running(self.name, index, ())
            with self._state:  # against a watchdog giving this pass up as it returns (_give_up checks under it)
                del self._running[generation, index]
                given_up = self._stalled == (generation, index)
                ended = generation != self._generation
                if ended:  # the generation that began meanwhile left this replica out (_replicas_not_running): it is free now
                    self._free[model].append(replica)
            if ended:
                self._changed_now(shared=model.instances > 1)  # a worker may wait for a replica of this model
            if given_up:
                self._returned(generation, index)
        seconds = time.monotonic() - start
        with self._observers.worker_step(), self._state:
            if generation != self._generation:
                return False
            self._free[model].append(replica)
            self._route(cut, outcomes, start, seconds)
            shared = self._shared_work()
        if shared:
            self._changed_now(shared=True)
        return True

    def _changed_now(self, shared: bool) -> None:
        with self._cv:
            self._changed += 1
            self._offer(shared)

    def _offer(self, shared: bool) -> None:
        """News of work (holds _cv): wake the first worker, which may run every model; with `shared` (work of a model of
        several replicas) also the others, unless the first worker was idle and this is the first news since: it takes
        that work itself, and a pass it cuts that leaves work behind wakes them then. The others run only models of
        several replicas, so news of other work leaves them asleep: woken by every arrival, the second worker of
        bench's CPU device took 12% of a core and every W5 request's plan start on a turn of its own; woken by every
        arrival of a two-replica model, one caller's plans and passes hopped between workers and replicas, a
        hand-over and a cold copy per request (bench/RESULTS.md, issue 12 steps 7 and 8)."""
        idle, self._first_idle = self._first_idle, False
        self._wake(everyone=shared and not idle)

    def _wake(self, everyone: bool) -> None:
        """Wake the first worker (and a `stop` that waits for the drain); with `everyone`, the other workers too (holds
        _cv): cancels, holds, stops and crashes, which every worker must see."""
        self._cv.notify_all()
        if everyone and self._workers > 1:
            self._siblings.notify_all()

    def _shared_work(self) -> bool:
        """Whether a queue holds work a worker other than the first may run: a model of several replicas (holds _state)."""
        return self._workers > 1 and any(queue[0].job.model.instances > 1 for queue in self._queues.values())

    def _queues_wake_in(self, index: int) -> float | None:
        """Seconds until some queue whose model has a free replica must be cut (<= 0: now); None when none waits."""
        now = time.monotonic()
        soonest = None
        for key, queue in self._queues.items():
            model = queue[0].job.model
            if not self._may_run(model, index):
                continue  # the worker that returns a replica looks again
            if self._queue_rows[key] >= self._full_at(model, queue[0].block.kind):
                return 0.0
            due = queue[0].enqueued + self._delay(model) - now
            soonest = due if soonest is None else min(soonest, due)
        return soonest

    def _may_run(self, model: LoadedModel, index: int) -> bool:
        """Whether worker `index` may cut a pass of `model` now: a replica is free, and a model of one replica runs
        on the first worker only. Its passes then stay on one thread, as with a single worker: on 2 cores, passes
        of one CNN that hopped between two threads served W4 8% slower (bench/RESULTS.md, issue 12 step 6)."""
        if index and model.instances == 1:
            return False
        free = self._free.get(model)
        return free is None or bool(free)

    def _delay(self, model: LoadedModel) -> float:
        """How long a queue waits for more rows: the model's max_queue_delay, or nothing when requests
        arrive further apart than that (a lone caller would only wait for company that is not coming)."""
        return 0.0 if self._arrival_gap > model.max_queue_delay_s else model.max_queue_delay_s

    def _dead(self, job: LiveJob, now: float) -> tuple[str, AttributionError] | None:
        """Why a live job must stop now, or None. A passed deadline wins over a cancel (the client's deadline
        is what cancelled the RPC), and so does one within the slack of the deadline (events.deadline_slack): the
        client's deadline cancels the call a moment before the server's, and the front counts that call
        DEADLINE_EXCEEDED; the drop was counted "cancelled" (15-22% of the requests whose deadline passed in the queue)."""
        if job.deadline is not None and now >= job.deadline - (deadline_slack(job.deadline - job.arrival) if job.cancelled else 0.0):
            return DROP_DEADLINE, DeadlineExceeded("the request's deadline passed before its attribution was computed")
        if job.cancelled:
            return DROP_CANCELLED, Cancelled("the request was cancelled by its caller")
        return None

    def _drop_if_dead(self, job: LiveJob, now: float) -> bool:
        if job.done:
            return False
        if job.members:  # a merged job lives while one of its jobs does (each dies on its own, as any job)
            if not all(member.done for member in job.members):
                return False
            self._close(job)
            self._evicted_keys |= job.queue_keys
            return True
        dead = self._dead(job, now)
        if dead is None:
            return False
        reason, error = dead
        merged = job.merged_into
        if merged is None:
            dropped = max(job.rows - job.rows_done, 0)
        elif all(member.done or member is job for member in merged.members):
            dropped = max(merged.rows - merged.rows_done, 0)  # the last of a merged job's members: its rows go with it
        else:
            dropped = 0  # the merged job's rows run for its other members
        self._observers.request_dropped(job.model.name, reason, dropped)
        self._fail(job, error)
        if merged is not None:
            self._drop_if_dead(merged, now)
        return True

    def _enqueue(self, job: LiveJob, block: Block, index: int) -> None:
        key = batch_key(job.model, block)
        self._queues.setdefault(key, collections.deque()).append(QueuedBlock(job, block, index, time.monotonic()))
        self._queue_rows[key] = self._queue_rows.get(key, 0) + block.rows
        job.queue_keys.add(key)

    def _evict(self) -> None:
        """Take the blocks of finished jobs out of their queues (the one place queue entries are removed)."""
        for key in self._evicted_keys:
            queue = self._queues.get(key)
            if queue is None:
                continue
            alive = collections.deque(qb for qb in queue if not qb.job.done)
            if alive:
                self._queues[key] = alive
                self._queue_rows[key] = sum(qb.block.rows - qb.taken for qb in alive)
            else:
                del self._queues[key]
                del self._queue_rows[key]
        self._evicted_keys = set()

    def _cut(self, index: int) -> _Cut | None:
        """One fused pass from a ripe queue (full, or its oldest row waited the model's delay) whose model has a free
        replica.

        Which queue: interactive rows before batch rows (batch rows that wait get every BATCH_EVERY-th pass),
        then the model served least recently (models on a device take turns), then the oldest rows. Within
        the queue, blocks of that priority first, oldest first, up to the pass budget (`_pass_budget`)."""
        now = time.monotonic()
        ripe = [
            key
            for key, queue in self._queues.items()
            if self._may_run(queue[0].job.model, index)
            and (
                self._queue_rows[key] >= self._full_at(queue[0].job.model, queue[0].block.kind)
                or now - queue[0].enqueued >= self._delay(queue[0].job.model)
            )
        ]
        if not ripe:
            return None
        with_batch = {key for key in ripe if any(qb.job.priority == BATCH for qb in self._queues[key])}
        with_interactive = {key for key in ripe if any(qb.job.priority != BATCH for qb in self._queues[key])}
        batch_turn = bool(with_batch) and (not with_interactive or self._since_batch >= BATCH_EVERY - 1)
        pool = with_batch if batch_turn else with_interactive
        ripe_key = min(pool, key=lambda k: (self._served_at.get(self._queues[k][0].job.model, -1), self._queues[k][0].enqueued))
        queue = self._queues[ripe_key]
        model = queue[0].job.model
        first = [qb for qb in queue if (qb.job.priority == BATCH) == batch_turn]
        tuner = self._tuner(model, queue[0].block.kind)
        size = tuner.take() if tuner is not None else model.max_batch_rows
        budget = planned = self._pass_budget(model, queue[0].block.kind, size)
        segments: list[tuple[QueuedBlock, Block, int]] = []
        for qb in first + [qb for qb in queue if (qb.job.priority == BATCH) != batch_turn]:
            if budget <= 0:
                break
            left = qb.block.rows - qb.taken
            if left <= budget or (not qb.block.splittable and not segments):
                part = qb.block if qb.taken == 0 else slice_block(qb.block, qb.taken, qb.block.rows)
                take = left
            elif qb.block.splittable:
                part = slice_block(qb.block, qb.taken, qb.taken + budget)
                take = budget
            else:
                continue  # a paired block that does not fit waits for a pass of its own (it goes first when oldest)
            segments.append((qb, part, qb.taken))
            qb.taken += take
            qb.parts_expected += 1
            budget -= take
            self._queue_rows[ripe_key] -= take
        left_over = collections.deque(qb for qb in queue if qb.taken < qb.block.rows)
        if left_over:
            self._queues[ripe_key] = left_over
        else:
            del self._queues[ripe_key]
            del self._queue_rows[ripe_key]
        ran_batch = any(qb.job.priority == BATCH for qb, _, _ in segments)
        self._since_batch = 0 if ran_batch or not with_batch else self._since_batch + 1
        self._served_at[model] = self._passes
        self._passes += 1
        replica = self._free.setdefault(model, collections.deque(range(model.instances))).pop()
        return _Cut(model, segments, replica, size, planned, tuner)

    def _tuner(self, model: LoadedModel, kind: PassKind) -> PassSizeTuner | None:
        """The tuner of `model`'s passes of `kind`, when the probe chose its pass size (a configured one stays)."""
        if not model.batch_probe:
            return None
        tuners = self._tuners.setdefault(model, {})
        if kind not in tuners:
            tuners[kind] = PassSizeTuner(tuning_start(model.batch_probe), f"model {model.name!r} {kind.value} passes")
        return tuners[kind]

    def _full_at(self, model: LoadedModel, kind: PassKind) -> int:
        """Queued rows that fill a pass of `model`'s `kind` (the queue is ripe then): the size its next pass is cut to,
        within the pass budget, as `_cut` takes it. A queue that already holds a pass's worth does not wait for more."""
        tuner = self._tuner(model, kind)
        return self._pass_budget(model, kind, tuner.peek() if tuner is not None else model.max_batch_rows)

    def _pass_budget(self, model: LoadedModel, kind: PassKind, size: int) -> int:
        """Rows in one pass: `size`, fewer when that would take longer than max_pass_seconds at the measured rate of
        the model's passes of `kind` (until one ran, the slowest rate known), so a slow model does not hold the device
        for long."""
        rate = self._rate(model, kind)
        if rate:
            return max(1, int(min(size, rate * self.max_pass_seconds)))  # (no int() of a product past any int)
        return size

    def _rate(self, model: LoadedModel, kind: PassKind) -> float | None:
        """Rows/s of one replica's passes of `kind` of `model`: measured, or until one ran the slowest rate known (the
        probe's before any pass); None before anything is known."""
        rates = self._rates.get(model)  # (never empty)
        return model.rows_per_second if rates is None else rates.get(kind) or min(rates.values())

    def _route(self, cut: _Cut, outcomes: list, start: float, seconds: float) -> None:
        """After a pass: learn the model's rate (and tune its pass size), count, and hand each segment's outcome to its
        job's plan."""
        model, segments = cut.model, cut.segments
        rows = sum(part.rows for _, part, _ in segments)
        if seconds > 0 and rows >= cut.budget / 2:  # near-full passes only: small ones pay fixed costs
            rate = rows / seconds
            rates = self._rates.setdefault(model, {None: model.rows_per_second} if model.rows_per_second else {})
            model.rows_per_second = rate if model.rows_per_second is None else 0.8 * model.rows_per_second + 0.2 * rate
            kind = segments[0][1].kind
            rates[kind] = 0.8 * rates[kind] + 0.2 * rate if kind in rates else rate
        if rows:
            per_row = seconds / rows
            model.row_seconds = per_row if model.row_seconds is None else 0.8 * model.row_seconds + 0.2 * per_row
        if cut.tuner is not None:
            cut.tuner.observe(cut.size, rows >= cut.budget, rows, seconds)
        jobs = {id(qb.job): qb.job for qb, _, _ in segments}
        requests = sum(len(job.members) or 1 for job in jobs.values())
        for qb, part, _ in segments:
            qb.job.rows_done += part.rows
        with self._cv:
            for job in jobs.values():
                self._release(job, min(job.rows, job.rows_done))
        for job in jobs.values():
            job.first_pass_start = job.first_pass_start or start
            job.timing.compute_ms += 1e3 * seconds
            job.timing.passes += 1
            job.timing.pass_rows += rows
            job.timing.pass_requests = max(job.timing.pass_requests, requests)
        self._observers.pass_executed(PassStats(model.name, segments[0][1].kind.value, rows, requests, seconds, cut.budget))
        now = time.monotonic()
        for (qb, _, offset), outcome in zip(segments, outcomes):
            job = qb.job
            if job.done or self._drop_if_dead(job, now):  # died mid-pass: its remaining rows are not computed
                continue
            if isinstance(outcome, AttributionError):
                self._fail(job, outcome)
                continue
            qb.parts.append((offset, outcome))  # parts of a block may come back out of order (two replicas)
            if qb.taken == qb.block.rows and len(qb.parts) == qb.parts_expected:
                job.results[qb.index] = concat_results([part for _, part in sorted(qb.parts, key=lambda p: p[0])])
                job.pending -= 1
                if job.pending == 0:
                    self._advance(job, job.results)

    def _advance(self, job: LiveJob, sent: list[BlockResult] | None) -> None:
        """Resume the job's plan with its results; queue what it yields next, or finish it.

        Plans are driven through `concurrently`, so they yield lists of blocks and get lists of results."""
        if job.done or self._drop_if_dead(job, time.monotonic()):
            return
        try:
            if job.plan is None:
                job.plan = job.plan_factory()
                yielded = next(job.plan)
            else:
                assert sent is not None  # only a new job's plan starts without results
                yielded = job.plan.send(sent)
        except StopIteration as stop:
            self._succeed(job, stop.value)
            return
        except Exception as e:  # an AttributionError, or a bug reported as INTERNAL
            if not isinstance(e, AttributionError):
                log.exception("plan failed", extra={"request_id": job.request_id})
            self._fail(job, e)
            return
        job.pending = len(yielded)
        job.results = [None] * len(yielded)
        for i, block in enumerate(yielded):
            self._enqueue(job, block, i)

    def _merged(self, arrivals: list[LiveJob]) -> list[LiveJob]:
        """The arrivals, in order, with those that may run as one plan (same load, same Merge.key) as one merged job
        each. A merged job holds at most the rows of one pass (the load's pass size for Merge.kind; a job larger than
        that runs alone), so no member waits for more rows than the pass it would have shared with the others.

        The merged job holds the plan and is not one of `_jobs`. Its members stay there, with their own futures,
        deadlines, cancels and admission counts: one that dies fails alone, and its rows are computed with the
        others'; the members' rows count as queued work until each finishes."""
        order: list[LiveJob | list[LiveJob]] = []
        groups: dict[tuple, list[LiveJob]] = {}  # the open group of each key, and its rows
        rows: dict[tuple, int] = {}
        for job in arrivals:
            if job.merge is None or job.done:
                order.append(job)
                continue
            key = (job.model, job.merge.key)
            group = groups.get(key)
            if group is None or rows[key] + job.rows > self._full_at(job.model, job.merge.kind):
                group = groups[key] = []
                rows[key] = 0
                order.append(group)
            group.append(job)
            rows[key] += job.rows
        out: list[LiveJob] = []
        for item in order:
            if isinstance(item, LiveJob):
                out.append(item)
            elif len(item) == 1:
                out.append(item[0])
            else:
                try:
                    out.append(self._merge(item))
                except Exception:  # a bug in building the merged plan must not cost the requests (or the worker)
                    log.exception("merging %d jobs failed; each runs on its own plan", len(item))
                    out.extend(item)
        return out

    @staticmethod
    def _merge(jobs: list[LiveJob]) -> LiveJob:
        first = jobs[0]
        assert first.merge is not None
        plan, split = first.merge.combine([job.merge.payload for job in jobs if job.merge])
        merged = LiveJob(
            model=first.model,
            plan_factory=lambda: plan,
            finish=_finished_by_members,
            rows=sum(job.rows for job in jobs),
            deadline=None,  # never read: its members' deadlines apply, each to its own member (_drop_if_dead)
            arrival=min(job.arrival for job in jobs),
            request_id=f"{first.request_id} (+{len(jobs) - 1} merged)",
            priority=first.priority,
            row_bytes=first.row_bytes,
            members=tuple(jobs),
            split=split,
        )
        for job in jobs:
            job.merged_into = merged
        return merged

    def _succeed(self, job: LiveJob, returned: list) -> None:
        if job.members:
            self._succeed_members(job, returned)
            return
        try:
            result = job.finish(returned, job)
        except Exception as e:
            log.exception("finishing a job failed", extra={"request_id": job.request_id})
            self._fail(job, e)
            return
        self._close(job)
        _answer(job, result)

    def _succeed_members(self, merged: LiveJob, returned: list) -> None:
        """A merged job's plan finished: each member still waiting finishes with its share and the merged job's timing."""
        self._close(merged)
        assert merged.split is not None
        try:
            shares = merged.split(returned)
        except Exception as e:
            log.exception("splitting a merged job's results failed", extra={"request_id": merged.request_id})
            for member in merged.members:
                self._fail(member, e)
            return
        now = time.monotonic()
        for member, share in zip(merged.members, shares):
            if member.done or self._drop_if_dead(member, now):  # died in the last pass: as a job alone would
                continue
            member.timing = replace(merged.timing)
            member.first_pass_start = merged.first_pass_start
            member.rows_done = member.rows
            self._succeed(member, share)

    def _fail(self, job: LiveJob, error: BaseException) -> None:
        if job.done:
            return
        self._close(job)
        self._evicted_keys |= job.queue_keys
        if job.members:
            # A merged plan failed: each member still waiting runs alone, so that it gets its own verdict (one
            # member's bad input must not fail the others).
            for member in job.members:
                if not member.done:
                    member.merged_into = None
                    self._advance(member, None)
            return
        _answer(job, error=error)

    def _close(self, job: LiveJob) -> None:
        job.done = True
        # A member and its merged job refer to each other; the member's side goes when it finishes, so that neither
        # waits for the cyclic collector (Engine.submit says why that matters).
        job.merged_into = None
        self._close_plan(job)
        with self._cv:
            if job in self._jobs and not job.cancelled:
                self._uncount(job)
            self._jobs.discard(job)
            self._cv.notify_all()

    def _release(self, job: LiveJob, upto: int) -> None:
        """Rows of `job` up to `upto` no longer count as queued work. Holds the lock."""
        rows = upto - job.rows_released
        if rows <= 0 or job not in self._jobs:  # a finished job released all its rows when it closed
            return
        job.rows_released = upto
        pending = self._pending[job.model]
        pending.rows -= rows
        pending.bytes -= rows * job.row_bytes
        pending.kinds[job.kind] -= rows

    @staticmethod
    def _close_plan(job: LiveJob) -> None:
        """A finished job lets go of its request: the plan (closed), what builds it, its results so far and its merge
        payload. What outlives the job (its entry in the deadline heap until that reaches the top, a worker's list of
        the jobs that died) then holds none of the request's tensors: a flood's finished jobs kept hundreds of MiB in
        the engine process until their deadlines passed (bench/RESULTS.md, issue 12 step 44). A merged job keeps its
        members and split, which finishing it reads after."""
        plan, job.plan, job.results, job.merge = job.plan, None, [], None
        job.plan_factory = job.finish = _finished
        if plan is None:
            return
        try:
            plan.close()
        except Exception:  # a plan that misbehaves on close must not take the worker with it
            log.exception("closing a plan failed")
