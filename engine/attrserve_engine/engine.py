"""Engine facade: loads models, validates and formats jobs, and hands them to the scheduler of their device."""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import dataclasses
import functools
import itertools
import logging
import math
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from attrserve_engine.algorithms import ALGORITHMS, Algorithm
from attrserve_engine.algorithms.noise_tunnel import NoiseTunnelParams, noise_tunnel_plan, parse_noise_tunnel
from attrserve_engine.errors import (
    AttributionError,
    DeadlineExceeded,
    InvalidArgument,
    LoadStuck,
    NotFound,
    ResourceExhausted,
    Unavailable,
    inside,
    shown,
    size_text,
)
from attrserve_engine.evaluation import EvaluateParams, evaluated, parse_evaluate
from attrserve_engine.events import REFUSED_DEADLINE, EngineObserver, ModelState, Observers, PassStats
from attrserve_engine.formatting import check_inputs, check_tensor, format_baselines, format_feature_masks
from attrserve_engine.job import AlgorithmResult, AlgorithmSpec, AttributionJob, AttributionResult, InputCast, JobTiming
from attrserve_engine.limits import EngineLimits, cpu_limit, memory_limit
from attrserve_engine.models import (
    LoadAttempt,
    LoadedModel,
    ModelRecord,
    ModelSpec,
    ServedModels,
    example_bytes,
)
from attrserve_engine.plan import Attribution, Block, BlockResult, JobPlan, PassKind, Plan, PlanOf, RequestRNG, Task, concurrently
from attrserve_engine.plugins import load_plugins
from attrserve_engine.scheduler import BATCH, INTERACTIVE, LiveJob, Merge, Scheduler
from attrserve_engine.targets import check_target, format_target
from attrserve_engine.tuning import choose_memory_format, pick_batch_rows, probe_batch_rows, probe_key

log = logging.getLogger(__name__)

# Load-time probes an engine keeps (Engine.keep_probes): far more than a repository's versions, still a bound.
MAX_KEPT_PROBES = 256
# What a model's load measured (tuning.probe_key): rows/s by pass size (empty where the size is configured or probes
# are off).
Probes = dict[int, float]
MAX_SEED = 2**32 - 1  # numpy's legacy seeding, which Captum's users call, takes 32 bits


# Seeds for requests that bring none: a PRNG seeded once from the OS (no syscall, so no GIL hand-off, per request).
_SEEDS = random.Random()


def _cancel_if_cancelled(scheduler: Scheduler, job: weakref.ref[LiveJob], future: concurrent.futures.Future) -> None:
    """A request's future is done: when its caller cancelled it, its job stops (if the scheduler still holds it)."""
    live = job()
    if live is not None and future.cancelled():
        scheduler.cancel(live)


class Engine:
    """Entry point for the service edge (and for in-process use).

    `load` is called at start-up; `submit` from the event loop for each
    request (validation only, no model code); `shutdown` on SIGTERM.
    """

    def __init__(self, limits: EngineLimits | None = None, threads: int = 0) -> None:
        self.limits = limits if limits is not None else EngineLimits()
        self.served = ServedModels()
        # Told about every pass, dropped request and worker failure/restart (metrics, health). Append to add one.
        self.observers: list[EngineObserver] = [_PassCounter(self)]
        self._schedulers: dict[str, Scheduler] = {}
        self._lock = threading.Lock()
        self.passes = 0
        self.rows = 0
        self._closed = False
        # Built-ins plus plugins loaded into this engine.
        self.algorithms: dict[str, Algorithm] = dict(ALGORITHMS)
        # What a model's passes run with unless its config sets intra_op_threads (passes set the count per model, so it
        # is read once, here): `threads` as given (the server's count, which --engine-threads sets), else the process's
        # torch intra-op threads when the engine was made, at most the cores the process may use (torch's own default
        # counts the node's cores, not a container's CPU quota).
        self.default_threads = threads or min(torch.get_num_threads(), max(1, math.ceil(cpu_limit())))
        # Load-time probes by tuning.probe_key, the newest MAX_KEPT_PROBES: rows/s by pass size as a
        # load of this engine measured them, or the engine process before it (keep_probes). A load of the same key
        # takes them instead of timing passes again.
        self._probes: dict[tuple, Probes] = {}

    # -- models ------------------------------------------------------------
    def load(self, spec: ModelSpec) -> LoadedModel:
        """Load a model version, measure its pass size, warm every algorithm; then it serves.

        Loading a version that already serves is a reload: the previous load serves until the new one is
        warm, then finishes the requests it accepted (for at most `limits.drain_seconds`) and is released; if
        the new load fails, the previous one keeps serving. The observers hear how long it took or why it failed.
        A load still running after `limits.stuck_load_seconds` fails with LoadStuck (_watched_load)."""
        start = time.monotonic()
        if not spec.device:
            spec.device = self.limits.default_device
        attempt = self.served.begin_load(spec)
        Observers(self.observers).model_state_changed(spec.name, spec.version or "1")
        try:
            model = self._watched_load(spec, attempt)
        except BaseException as e:
            self.load_failed(spec.name, spec.version, e, spec)
            raise
        self._serves(model, self.served.loaded(model), time.monotonic() - start)
        return model

    def _serves(self, model: LoadedModel, previous: LoadedModel | None, seconds: float) -> None:
        """`model` serves from now on (ServedModels has it): the observers hear it, and `previous`, the load it
        replaced, finishes what it accepted and is released."""
        Observers(self.observers).model_loaded(model.name, seconds)
        Observers(self.observers).model_state_changed(model.name, model.version)
        log.info("loaded model %s v%s on %s", model.name, model.version, model.device)
        if previous is not None:
            self._retire(previous)

    def _watched_load(self, spec: ModelSpec, attempt: LoadAttempt) -> LoadedModel:
        """`_load` on a thread of its own, given up as stuck (LoadStuck) once it has run for `stuck_load_seconds`:
        a model whose build, weights or warm-up never returns (a download that stalls, a lock never released) held
        the server's start-up, every later poll of the repository, or a LoadModel, for ever. A thread cannot be
        stopped: one given up runs on, and if it ever returns what it built serves then, unless its version was
        unloaded meanwhile (_load_on_thread). No other load of the version starts until it does (begin_load)."""
        limit = self.limits.stuck_load_seconds
        if limit <= 0:
            with self._running(attempt):
                return self._load(spec)
        built: concurrent.futures.Future = concurrent.futures.Future()
        name = f"attrserve-load-{spec.name}-v{attempt.key[1]}"
        threading.Thread(target=self._load_on_thread, args=(spec, attempt, built), name=name, daemon=True).start()
        try:
            return built.result(limit)
        except concurrent.futures.TimeoutError:
            if not self.served.give_up_load(attempt):
                return built.result()  # it returned just now
        log.error("model %s v%s: its load has run for %g s (stuck_load_seconds); it is given up as stuck", *attempt.key, limit)
        raise LoadStuck(
            f"its load did not finish within {limit:g} s (stuck_load_seconds): the model's code (its build, its weights or "
            "its warm-up) is stuck; the load runs on, and the version serves if it ever returns"
        )

    @contextlib.contextmanager
    def _running(self, attempt: LoadAttempt) -> Iterator[None]:
        Observers(self.observers).load_running(*attempt.key, True)
        try:
            yield
        finally:
            Observers(self.observers).load_running(*attempt.key, False)

    def _load_on_thread(self, spec: ModelSpec, attempt: LoadAttempt, built: concurrent.futures.Future) -> None:
        try:
            with self._running(attempt):
                model = self._load(spec)
        except BaseException as e:
            if self.served.load_returned(attempt):
                built.set_exception(e)
            else:
                log.warning("model %s v%s: its load, given up as stuck, failed after all: %s: %s", *attempt.key, type(e).__name__, e)
            return
        if self.served.load_returned(attempt):
            built.set_result(model)
            return
        seconds = time.monotonic() - attempt.started
        serves, previous = self.served.late_loaded(model, attempt)
        if not serves:
            log.warning(
                "model %s v%s: its load, given up as stuck, returned after %.0f s; the version was unloaded or "
                "loaded again meanwhile, so it is dropped",
                *attempt.key,
                seconds,
            )
            del model
            torch.cuda.empty_cache()  # (nothing where CUDA was never initialised)
            release_free_memory()
            return
        log.warning("model %s v%s: its load, given up as stuck, returned after %.0f s; it serves now", *attempt.key, seconds)
        self._serves(model, previous, seconds)

    def load_failed(self, name: str, version: str, error: BaseException, spec: ModelSpec | None = None) -> None:
        """Record that a version could not be loaded (also for a folder whose config cannot be read): it is
        UNAVAILABLE with the error as its reason, unless a previous load of it still serves. Clients read the reason: it
        names the model's files from the repository that holds it ("m/model.py", "m/1/model.py"; `inside`), not where
        that is on the server (the caller's log has the error as raised)."""
        reason = f"{type(error).__name__}: {error}"
        if spec is not None and spec.path is not None:
            reason = inside(reason, spec.repository or Path(spec.path).parent)
        self.served.load_failed(name, version, reason, spec)
        Observers(self.observers).model_load_failed(name, error)
        Observers(self.observers).model_state_changed(name, version or "1")

    def unload(self, name: str, version: str = "") -> list[str]:
        """Stop serving a model's versions (all, or the one named): new requests are refused at once, accepted
        ones finish (for at most `limits.drain_seconds`), then each load is released. Returns the versions."""
        versions = [r.version for r in self.served.records() if r.name == name and (not version or r.version == version)]
        if not versions:
            self.served.record(name, version)  # raises NotFound naming what exists
        for v in versions:
            model = self.served.begin_unload(name, v)
            Observers(self.observers).model_state_changed(name, v)
            if model is not None:
                self._retire(model)
            self.served.remove(name, v)
            Observers(self.observers).model_state_changed(name, v)
            log.info("unloaded model %s v%s", name, v)
        return versions

    def _retire(self, model: LoadedModel) -> None:
        """Wait until a load that no longer takes requests has finished those it accepted, then free its memory."""
        model.ready = False
        deadline = time.monotonic() + self.limits.drain_seconds
        while self.backlog(model)[0] and time.monotonic() < deadline:
            time.sleep(0.01)
        if (left := self.backlog(model)[0]) > 0:
            log.warning(
                "model %s v%s: %d request(s) still running after %.0f s; they finish on it",
                model.name,
                model.version,
                left,
                self.limits.drain_seconds,
            )
        if model.device.type == "cuda":
            torch.cuda.empty_cache()
        release_free_memory()

    def _load(self, spec: ModelSpec) -> LoadedModel:
        model = LoadedModel(spec, self.limits.default_max_batch_rows, self.limits.default_max_queue_delay_us, self.default_threads)
        model.max_queued_rows = model.max_queued_rows or self.limits.default_max_queued_rows
        model.max_queued_bytes = model.max_queued_bytes or self.limits.default_max_queued_bytes or queued_bytes_bound(model.device)
        model.warm_up()
        model.measure_layers()
        key = probe_key(model)
        kept_rates = self._probes.get(key, {}) if key is not None else {}
        log.info("model %s: layout %s", model.name, choose_memory_format(model))  # before the probe times its passes
        if not spec.max_batch_rows and self.limits.probe_batch_rows:  # a config's value always wins
            measured = dict(kept_rates) if kept_rates else probe_batch_rows(model, self.limits.probe_seconds)
            if measured:
                model.batch_probe = measured
                model.max_batch_rows = pick_batch_rows(measured)
                model.rows_per_second = measured[model.max_batch_rows]
                log.info(
                    "model %s: %s rows/s by pass size%s; max_batch_rows=%d",
                    model.name,
                    {k: round(v) for k, v in measured.items()},
                    " (kept from an earlier load of the same files)" if kept_rates else "",
                    model.max_batch_rows,
                )
        if key is not None:
            self.keep_probes({key: model.batch_probe})
        self._scheduler(model)
        self._warm_up_algorithms(model)
        release_free_memory()  # the probe and warm-ups freed far more than serving keeps
        model.ready = True
        return model

    def keep_probes(self, probes: Mapping[tuple, Probes]) -> None:
        """Keep these load-time probes (tuning.probe_key → rows/s by pass size): a restarted engine
        process is handed its predecessor's (local_core.build_core), so it loads without timing passes again. The newest
        MAX_KEPT_PROBES stay."""
        with self._lock:
            for key, rates in probes.items():
                self._probes.pop(key, None)
                self._probes[key] = dict(rates)
            while len(self._probes) > MAX_KEPT_PROBES:
                del self._probes[next(iter(self._probes))]

    def probes(self) -> dict[tuple, Probes]:
        """The load-time probes kept (a copy), for the engine process that may follow this one."""
        with self._lock:
            return {key: dict(rates) for key, rates in self._probes.items()}

    def _warm_up_algorithms(self, model: LoadedModel) -> None:
        """Run each algorithm once on a zero example, so the first request pays no first-call costs
        and an algorithm the model cannot serve is dropped from GetModel rather than failing later.

        Perturbation methods get a feature mask of two features (every other element): the warm-up runs their
        code, passes and capability checks on a handful of rows. With the default mask (one feature per element)
        ShapleyValueSampling's warm-up on a 3x32x32 image was 76,777 rows: 8 s and 1.5 GiB more RSS at every load."""
        inputs = model.example_inputs()
        if inputs is None or model.output_shape is None:
            return
        k = len(model.output_shape) if math.prod(model.output_shape) > 1 else 0
        two_features = tuple((torch.arange(math.prod(x.shape[1:])) % 2).reshape(1, *x.shape[1:]) for x in inputs)
        futures = {}
        for name in self.supported_algorithms(model):
            if self.algorithms[name].layer_method:  # needs a layer named by the request
                continue
            algorithm = self.algorithms[name]
            # Distribution methods (DeepLiftShap) refuse a single baseline: give them two.
            baselines = tuple(torch.zeros((2, *x.shape[1:]), dtype=x.dtype) for x in inputs) if algorithm.baseline_distribution else ()
            target = torch.zeros((1, k), dtype=torch.int64) if algorithm.uses_target else None
            masks = two_features if algorithm.uses_feature_mask else ()
            job = AttributionJob(
                model=model.name, algorithm=name, inputs=inputs, baselines=baselines, target=target, feature_masks=masks, seed=0
            )
            try:
                live = self._prepare(job, model)
            except AttributionError:  # needs parameters a default request lacks (e.g. Occlusion's window): nothing to warm
                continue
            futures[name] = self._scheduler(model).submit(live, admit=False)  # load-time work is not the clients' queue
        for name, future in futures.items():
            try:
                future.result(timeout=120)
            except Exception as e:  # any failure means "not servable here"
                model.unsupported[name] = f"{type(e).__name__}: {e}"
                model.refusals.clear()  # answers given before the warm-up knew
                log.warning("model %s cannot serve %s: %s", model.name, name, model.unsupported[name])

    def load_plugins(self, source: str) -> list[str]:
        """Register the algorithms of a plugin (.py file, folder or module path); call before loading models."""
        names = []
        for algorithm in load_plugins(source):
            if algorithm.name in self.algorithms:
                raise InvalidArgument(f"plugin algorithm {algorithm.name!r} clashes with one this server already has")
            self.algorithms[algorithm.name] = algorithm
            names.append(algorithm.name)
        return names

    def models(self) -> list[LoadedModel]:
        """The loads that serve now."""
        return self.served.all()

    def get_model(self, name: str, version: str = "") -> LoadedModel:
        """The load a request for `name` (and `version`, or the newest ready one) goes to; NotFound or Unavailable."""
        return self.served.get(name, version)

    def model_record(self, name: str, version: str = "") -> ModelRecord:
        """The named version's record, or that of the version a request naming none would get; NotFound."""
        return self.served.record(name, version)

    def model_records(self) -> list[ModelRecord]:
        """Every model version known, with its state: ready, loading, failed (with why) or unloading."""
        return self.served.records()

    def supported_algorithms(self, model: LoadedModel, refused: dict[str, str] | None = None) -> list[str]:
        """Algorithms this model can serve (GetModel's list): those whose `refusal` has nothing to say (`refused`:
        refused_algorithms' answer, when the caller has it already)."""
        refused = self.refused_algorithms(model) if refused is None else refused
        return [name for name in self.algorithms if name not in refused]

    def refused_algorithms(self, model: LoadedModel) -> dict[str, str]:
        """The others, each with why: the message a request for it gets (GetModel's `refused`)."""
        reasons = {name: algorithm.refusal(model) for name, algorithm in self.algorithms.items()}
        return {name: reason for name, reason in reasons.items() if reason is not None}

    # -- jobs --------------------------------------------------------------
    def submit(self, job: AttributionJob) -> concurrent.futures.Future:
        """Validate `job` and queue it; the future resolves to an AttributionResult or an AttributionError."""
        if self._closed:
            raise Unavailable("the engine has shut down")
        model = self.served.get(job.model, job.model_version)
        if job.priority not in (INTERACTIVE, BATCH):
            raise InvalidArgument(f"priority must be {INTERACTIVE!r} or {BATCH!r}, got {job.priority[:20]!r}")
        scheduler = self._scheduler(model)
        scheduler.admit(model, job.priority)  # a full queue refuses before any parsing work
        live = self._prepare(job, model)
        self._refuse_if_late(scheduler, live)
        future = scheduler.submit(live)
        # Cancelling the future (asyncio cancels it when the RPC ends early) drops the job's rows. The callback holds
        # the job weakly: a future keeps its callbacks after it resolves, and the job holds its future, so a strong
        # reference made every request a reference cycle that only the cyclic collector freed, in pauses of 10-35 ms
        # (bench/RESULTS.md, issue 12 step 24). The scheduler holds the job until it finishes.
        future.add_done_callback(functools.partial(_cancel_if_cancelled, scheduler, weakref.ref(live)))
        return future

    def _refuse_if_late(self, scheduler: Scheduler, live: LiveJob) -> None:
        """Refuse now (DEADLINE_EXCEEDED) a request that cannot finish before its deadline: the rows of its model
        already queued plus its own, each job's at the measured rate of its pass kind (`Scheduler.estimate`), take longer
        than the time it has left. Other models' work on the device is not counted, so the estimate errs towards
        admitting."""
        model = live.model
        if live.deadline is None:
            return
        ahead, need = scheduler.estimate(model, live.rows, live.kind)
        left = live.deadline - time.monotonic()
        if need is not None and need > left:
            Observers(self.observers).request_refused(model.name, REFUSED_DEADLINE)
            rate = (ahead + live.rows) / need if need else 0.0  # (their mix's)
            raise DeadlineExceeded(
                f"this request would not finish before its deadline: {ahead} rows queued ahead of it and its own "
                f"{live.rows} take about {need * 1e3:.0f} ms at model {model.name!r}'s ~{rate:.0f} rows/s, "
                f"and {max(left, 0) * 1e3:.0f} ms are left"
            )

    def attribute(self, job: AttributionJob, timeout: float | None = None) -> AttributionResult:
        """Blocking convenience for in-process callers and tests; on timeout the job is cancelled."""
        future = self.submit(job)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def shutdown(self, drain: bool = True, timeout: float | None = 30.0) -> int:
        """Stop every worker (draining first, for at most `timeout` s); returns how many accepted jobs were lost."""
        self._closed = True
        lost = sum(scheduler.stop(drain=drain, timeout=timeout) for scheduler in list(self._schedulers.values()))
        self._schedulers.clear()
        return lost

    def in_flight(self) -> int:
        return sum(s.in_flight() for s in self._schedulers.values())

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Within the block, requests are accepted but no plan starts and no pass runs; at its end they start together
        (merged where they may be) and the queues are cut as usual. Makes the composition of merged plans and fused
        passes deterministic (tests) and pauses compute (operations)."""
        schedulers = list(self._schedulers.values())
        for scheduler in schedulers:
            scheduler.hold()
        try:
            yield
        finally:
            for scheduler in schedulers:
                scheduler.release()

    def backlog(self, model: str | LoadedModel) -> tuple[int, int]:
        """(requests, rows) accepted and not yet answered, less those whose callers gave up, of every load of a
        model (by name: the queue depth operators scale on) or of one load."""
        schedulers = list(self._schedulers.values())
        counts = [scheduler.backlog(model) for scheduler in schedulers]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    def serving(self) -> tuple[bool, str]:
        """Whether every device's worker is up; if not, which one is down and why."""
        for device, scheduler in list(self._schedulers.items()):
            up, reason = scheduler.serving()
            if not up:
                return False, f"the engine worker for {device} is down: {reason}"
        return True, ""

    def model_serving(self, model: LoadedModel) -> bool:
        """Loaded, warm, and its device's worker is up."""
        scheduler = self._schedulers.get(str(model.device))
        return model.ready and scheduler is not None and scheduler.serving()[0]

    def model_state(self, record: ModelRecord) -> tuple[ModelState, str]:
        """A version's state and reason as clients see them: READY only while it can compute now (its device's
        worker up); a READY version whose worker is down is UNAVAILABLE, with why."""
        if record.state == ModelState.READY and (record.model is None or not self.model_serving(record.model)):
            return ModelState.UNAVAILABLE, self.serving()[1]
        return record.state, record.reason

    # -- internals ---------------------------------------------------------
    def _scheduler(self, model: LoadedModel) -> Scheduler:
        key = str(model.device)
        with self._lock:
            if self._closed:  # e.g. a load still running when the server stopped: no new worker after shutdown
                raise Unavailable("the engine has shut down")
            if key not in self._schedulers:
                self._schedulers[key] = Scheduler(
                    key,
                    self.limits.max_queued_requests,
                    self.observers,
                    ready_check=lambda: self._check_device(key),
                    restart_delay_s=self.limits.worker_restart_delay_s,
                    max_queue_seconds=self.limits.max_queue_seconds,
                    max_pass_seconds=self.limits.max_pass_seconds,
                    stuck_pass_seconds=self.limits.stuck_pass_seconds,
                )
            return self._schedulers[key]

    def _check_device(self, device: str) -> None:
        """A restarted worker's first act: every loaded model on `device` still runs a forward (raises if not)."""
        for model in self.served.all():
            if str(model.device) == device and model.ready:
                model.warm_up()

    def _prepare(self, job: AttributionJob, model: LoadedModel) -> LiveJob:
        """Validate a job against its model and build what the worker runs: one plan per algorithm, driven together."""
        inputs, casts = check_inputs(job, model)
        n = int(inputs[0].shape[0])
        target = format_target(job.target, n)
        args = tuple(job.additional_forward_args)
        for j, a in enumerate(args):
            if check_tensor(a, f"additional_forward_args[{j}]", "a tensor with one row per example").dim() == 0 or a.shape[0] != n:
                raise InvalidArgument(f"additional_forward_args[{j}] has shape {tuple(a.shape)}; dim 0 must be the {n} examples")
        seed = job.seed if job.seed is not None else _SEEDS.getrandbits(32)
        if not 0 <= seed <= MAX_SEED:
            raise InvalidArgument(f"seed must be in [0, {MAX_SEED}], got {seed}")
        if not job.algorithm:
            return self._prepare_predictions(job, model, inputs, casts, target, args, seed)
        primary = AlgorithmSpec(job.algorithm, job.params, job.noise_tunnel, job.layer, job.return_convergence_delta)
        calls = [self._prepare_call(primary, job, model, inputs, target, args, seed)]
        for i, spec in enumerate(job.also):
            try:
                calls.append(self._prepare_call(spec, job, model, inputs, target, args, seed))
            except (InvalidArgument, NotFound) as e:  # the entry's index (as the engine's class: a plugin's own may take other arguments)
                raise (NotFound if isinstance(e, NotFound) else InvalidArgument)(f"also[{i}]: {e}") from None
        evaluate = parse_evaluate(dict(job.evaluate), self.limits.algorithm_limits, [x.dtype for x in inputs]) if job.evaluate else None
        # the outputs' forward rows are built at once: held as well as counted
        outputs = n if job.return_outputs else 0
        metric_rows, metric_held, explained_held = calls[0].evaluation_rows(evaluate) if evaluate is not None else (0, 0, 0)
        rows = sum(call.rows for call in calls) + outputs + metric_rows
        held = sum(call.held for call in calls) + outputs + metric_held
        layer_bytes = sum(call.held * call.layer_row_bytes for call in calls) + explained_held * calls[0].layer_row_bytes
        work_bytes = self._check_rows(rows, n, model, (*inputs, *args), held, layer_bytes)

        def plan_factory() -> JobPlan:
            plans: list[PlanOf[Any]] = [call.plan(model.device) for call in calls]
            if evaluate is not None:
                plans[0] = evaluated(calls[0].run, calls[0].task.to(model.device), evaluate)
            if job.return_outputs:
                plans.append(_outputs_plan(calls[0].task.to(model.device)))
            return concurrently(plans)

        def finish(returned: list, live: LiveJob) -> AttributionResult:
            timing = _final_timing(live)
            first, metrics = returned[0] if evaluate is not None else (returned[0], {})
            return AttributionResult(
                attributions=_cpu(first.attributions),
                convergence_delta=_cpu(first.convergence_delta),
                outputs=_cpu(returned[-1]) if job.return_outputs else None,
                model_version=model.version,
                seed=seed,
                timing=timing,
                request_id=job.request_id,
                also=tuple(
                    AlgorithmResult(call.name, _cpu(a.attributions), _cpu(a.convergence_delta))
                    for call, a in zip(calls[1:], returned[1 : len(calls)])
                ),
                infidelity=_cpu(metrics.get("infidelity")),
                sensitivity_max=_cpu(metrics.get("sensitivity_max")),
                input_casts=casts,
                layer_shaped=not calls[0].algorithm.input_shaped,
            )

        merge = _merge_of(calls[0], job, model) if len(calls) == 1 and evaluate is None else None
        infidelity = metric_held - explained_held  # the metrics' rows held that no explanation holds: infidelity's forwards
        kind = _job_kind(calls, metric_rows - infidelity, outputs + infidelity)
        return _live_job(job, model, rows, work_bytes, plan_factory, finish, merge, kind)

    def _check_rows(
        self, rows: int, n: int, model: LoadedModel, tensors: tuple[Tensor, ...], held: int | None = None, layer_bytes: int = 0
    ) -> int:
        """Refuse a request of `n` examples whose rows of model work pass the server's limits per request: their count,
        and the bytes of the `held` rows (default: all of them) its plans build at once (`tensors`: the inputs and
        forward args of the `n` examples), plus `layer_bytes` of layer values and gradients that layer methods' rows
        hold. Rows built a pass at a time (`Algorithm.rows_per_pass`) are not held. Returns those bytes: what the
        request holds while it is queued, admission's estimate of it."""
        if rows > self.limits.max_rows_per_request:
            raise ResourceExhausted(
                f"this request needs {_count(rows)} rows of model work ({n} example(s) with these parameters), "
                f"over this server's limit of {self.limits.max_rows_per_request} rows per request; "
                "send fewer examples, features or steps/samples",
                permanent=True,
            )
        held = rows if held is None else held
        total = held * example_bytes(tensors) + layer_bytes
        cap = self.limits.max_request_work_bytes or device_memory(model.device) // 4
        if total > cap:
            raise ResourceExhausted(
                f"this request's {held} rows of model work ({n} example(s) with these parameters) would hold "
                f"{size_text(total)} of inputs{' and layer values' if layer_bytes else ''} at once, over this server's limit "
                f"of {size_text(cap)} per request; "
                "send fewer examples, features or steps/samples",
                permanent=True,
            )
        return total

    def _prepare_predictions(
        self,
        job: AttributionJob,
        model: LoadedModel,
        inputs: tuple[Tensor, ...],
        casts: tuple[InputCast, ...],
        target: Tensor,
        args: tuple[Tensor, ...],
        seed: int,
    ) -> LiveJob:
        """A job without an algorithm (return_outputs set): the model's explained output alone (the Open Inference
        Protocol's ModelInfer). One forward row per example, no gradient, no target selected; its rows share passes
        with other predictions of the model."""
        if not job.return_outputs:
            raise InvalidArgument("algorithm is empty; name the algorithm to run (or set return_outputs for the model's outputs alone)")
        unused = {
            "target": job.target is not None,
            "baselines": bool(job.baselines),
            "params": bool(job.params),
            "noise_tunnel": job.noise_tunnel is not None,
            "layer": bool(job.layer),
            "feature_masks": bool(job.feature_masks),
            "return_convergence_delta": job.return_convergence_delta,
            "also": bool(job.also),
            "evaluate": bool(job.evaluate),
        }
        if any(unused.values()):
            names = ", ".join(name for name, used in unused.items() if used)
            raise InvalidArgument(f"{names}: only for an algorithm; a job without one returns the model's outputs")
        n = int(inputs[0].shape[0])
        work_bytes = self._check_rows(n, n, model, (*inputs, *args))
        task = Task(inputs=inputs, baselines=(), target=target, args=args, params=None, rng=RequestRNG(seed))

        def plan_factory() -> JobPlan:
            return concurrently([_outputs_plan(task.to(model.device), select=False)])

        def finish(returned: list, live: LiveJob) -> AttributionResult:
            timing = _final_timing(live)
            return AttributionResult(
                attributions=(),
                convergence_delta=None,
                outputs=_cpu(returned[0]),
                model_version=model.version,
                seed=seed,
                timing=timing,
                request_id=job.request_id,
                input_casts=casts,
            )

        return _live_job(job, model, n, work_bytes, plan_factory, finish, kind=PassKind.FORWARD)

    def _prepare_call(
        self,
        call: AlgorithmSpec,
        job: AttributionJob,
        model: LoadedModel,
        inputs: tuple[Tensor, ...],
        target: Tensor,
        args: tuple[Tensor, ...],
        seed: int,
    ) -> _PreparedCall:
        """Check one algorithm against the request and build its Task (on CPU) and row count."""
        name = call.algorithm
        algorithm = self.algorithms.get(name)
        if algorithm is None:
            raise InvalidArgument(f"unknown algorithm {shown(name)}; this server has: {', '.join(sorted(self.algorithms))}")
        refusal = algorithm.refusal(model, [x.dtype for x in inputs])
        if refusal:
            raise InvalidArgument(refusal)
        limits = self.limits.algorithm_limits
        params = algorithm.parse_params(dict(call.params), limits)
        nt = parse_noise_tunnel(dict(call.noise_tunnel), limits, job.seed is not None) if call.noise_tunnel is not None else None
        if algorithm.layer_method:
            if not call.layer:
                raise InvalidArgument(f"{name} needs `layer`, a dotted module path; GetModel lists the model's layers")
            if call.layer not in model.layers:
                raise NotFound(f"model {model.name!r} has no layer {shown(call.layer)}")
            algorithm.check_layer(model, call.layer, params)
        elif call.layer:
            raise InvalidArgument(f"layer is only for layer methods; {name} attributes to the inputs")
        if job.feature_masks and not algorithm.uses_feature_mask and not job.also:
            raise InvalidArgument(f"feature_masks is only for perturbation methods; {name} does not take it")
        if call.return_convergence_delta and not algorithm.has_convergence_delta:
            raise InvalidArgument(f"{name} has no convergence delta; do not set return_convergence_delta")
        if job.baselines and not algorithm.uses_baselines and not (nt and nt.draw_baseline_from_distrib) and not job.also:
            raise InvalidArgument(f"{name} takes no baselines")
        if not algorithm.uses_target and job.target is not None and not job.also:
            raise InvalidArgument(f"{name} takes no target; it does not look at the model's output")
        if algorithm.uses_target and model.output_shape is not None:
            check_target(target, model.output_shape)  # early, clear target errors
        distribution = algorithm.baseline_distribution or bool(nt and nt.draw_baseline_from_distrib)
        task = Task(
            inputs=inputs,
            baselines=format_baselines(job.baselines if algorithm.uses_baselines or distribution else (), inputs, distribution),
            target=target,
            args=args,
            params=params,
            rng=RequestRNG(seed),  # each algorithm draws as it would alone with this seed
            return_convergence_delta=call.return_convergence_delta,
            feature_masks=format_feature_masks(job.feature_masks, inputs) if algorithm.uses_feature_mask else (),
            layer=call.layer,
            deadline=job.deadline,
        )
        examples = task.n * nt.nt_samples if nt else task.n  # NoiseTunnel runs the algorithm on its noisy copies
        rows = algorithm.rows(task, examples) + (algorithm.delta_rows(task, examples) if call.return_convergence_delta else 0)
        # rows built a pass at a time are not held at once: such a call holds its examples (NoiseTunnel's noisy copies)
        held = examples if algorithm.rows_per_pass else rows
        # a layer method's rows also hold the layer's values: its activations (or those substituted) and their gradients
        layer_row_bytes = 2 * model.layer_bytes.get(call.layer, 0) if algorithm.layer_method and call.layer else 0
        return _PreparedCall(name, algorithm, nt, task, rows, held, layer_row_bytes)


class _PassCounter(EngineObserver):
    """Engine.passes and Engine.rows: totals over the engine's life (tests and benchmarks read them)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def pass_executed(self, stats: PassStats) -> None:
        self.engine.passes += 1
        self.engine.rows += stats.rows


@dataclass
class _PreparedCall:
    name: str
    algorithm: Algorithm
    nt: NoiseTunnelParams | None
    task: Task  # on CPU until the worker starts the plan
    rows: int
    held: int  # of `rows`, those its plan builds at once (all, unless the algorithm builds them a pass at a time)
    layer_row_bytes: int = 0  # layer methods: the layer's bytes each held row holds (measured at load; 0 if unknown)

    def plan(self, device: torch.device) -> Plan:
        return self.run(self.task.to(device))

    def run(self, task: Task) -> Plan:
        """This algorithm (with its noise tunnel) on `task` — the request's, or perturbed copies for sensitivity_max."""
        return noise_tunnel_plan(self.algorithm, self.nt, task) if self.nt else self.algorithm.plan(task)

    def evaluation_rows(self, p: EvaluateParams) -> tuple[int, int, int]:
        """Rows of the metrics: infidelity's forwards; sensitivity_max's explanations (inputs again, then perturbed).
        Returns (rows, held, explained): of the rows, those built at once (infidelity's forwards are; the explanations
        hold what the algorithm's own rows hold: its examples alone where it builds its rows a pass at a time), and of
        those the explanations' (a layer method's hold the layer's values too)."""
        n, rows, held, explained = self.task.n, 0, 0, 0
        nt = self.nt.nt_samples if self.nt else 1
        if p.infidelity is not None:
            if not self.algorithm.input_shaped:
                raise InvalidArgument(f"infidelity needs attributions shaped like the inputs; {self.name} attributes to a layer")
            rows += n * p.infidelity.n_perturb_samples + n
            held += n * p.infidelity.n_perturb_samples + n
        if p.sensitivity_max is not None:
            examples = (n * nt, n * nt * p.sensitivity_max.n_perturb_samples)  # the inputs again, then the perturbed ones
            explanations = sum(self.algorithm.rows(self.task, e) for e in examples)
            explained = sum(examples) if self.algorithm.rows_per_pass else explanations
            rows, held = rows + explanations, held + explained
        return rows, held, explained


def release_free_memory() -> None:
    """Give the C heap's free pages back to the OS: tcmalloc's where it is the process's malloc (the engine process's
    by default), glibc's (malloc_trim); a no-op for what is absent.

    Called after a model's load-time probe and warm-ups, which free far more than serving keeps: glibc would
    otherwise keep that memory mapped and hand it back only bit by bit under load (RSS drifting down by
    hundreds of MiB for minutes), and tcmalloc keeps it until it is reused. Trimming once a second during load was
    tried too: it lowers RSS but does not make it flat, and the pages it returns are faulted back in by the next
    passes."""
    with contextlib.suppress(OSError):
        release = getattr(ctypes.CDLL(None), "MallocExtension_ReleaseFreeMemory", None)  # tcmalloc's (gperftools)
        if release is not None:
            release()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@functools.cache
def device_memory(device: torch.device) -> int:
    """Bytes of memory work on `device` may use: a CUDA device's total memory; for the CPU, the machine's memory or
    this process's cgroup limit, whichever is less."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return memory_limit()


def memory_allocated(device: str) -> int:
    """Bytes torch has allocated on `device` in this process: a CUDA device's (attrserve_device_memory_bytes); 0 for
    the CPU, whose use the process's RSS shows."""
    return int(torch.cuda.memory_allocated(device)) if device.startswith("cuda") else 0


def queued_bytes_bound(device: torch.device) -> int:
    """Admission's default bound on a model's queued work in estimated bytes (what its requests' plans hold:
    `Engine._check_rows`): 1 GiB on the CPU, or a quarter of the memory the process may use where that is less (its
    cgroup's limit, `device_memory`: a 2 GiB pod queues at most 512 MiB a model, where 1 GiB beside the models' own
    memory could get it killed for memory, every request in flight with it); on a GPU, whose memory holds the started
    plans' rows, a quarter of it (at least 1 GiB), which leaves the rest to the models and a pass's activations. 64
    callers' ResNet-18 IG-50 requests hold ~1.9 GiB (bench/RESULTS.md, step 16)."""
    if device.type == "cpu":
        return min(1 << 30, device_memory(device) // 4)
    return max(1 << 30, device_memory(device) // 4)


def _count(rows: int) -> str:
    """A row count for a message; exact Shapley counts can have more digits than Python will print."""
    # a readable length (and Python prints at most 4,300 digits)
    return str(rows) if rows.bit_length() <= 130 else f"about 2^{rows.bit_length() - 1}"


def _final_timing(live: LiveJob) -> JobTiming:
    """A finished job's timing: its queue wait (until its first pass) and total time, and the rows its passes ran. Not
    the rows it declared (`live.rows`, admission's estimate): sensitivity_max explains the inputs again only for a method
    that draws, and LayerFeatureAblation runs one row per layer unit, which submission does not know."""
    now = time.monotonic()
    return dataclasses.replace(
        live.timing,
        queue_ms=1e3 * ((live.first_pass_start or now) - live.arrival),
        total_ms=1e3 * (now - live.arrival),
        rows=live.rows_done,
    )


def _live_job(
    job: AttributionJob,
    model: LoadedModel,
    rows: int,
    work_bytes: int,
    plan_factory: Callable[[], JobPlan],
    finish: Callable[[list, LiveJob], AttributionResult],
    merge: Merge | None = None,
    kind: PassKind = PassKind.GRADIENT,
) -> LiveJob:
    """The scheduler's job; its queued bytes (admission's max_queued_bytes) are the `work_bytes` its plans hold
    (`Engine._check_rows`), spread evenly over its `rows` and released as they are computed; its rows count at the rate
    of `kind`'s passes (`_job_kind`)."""
    return LiveJob(
        kind=kind,
        merge=merge,
        model=model,
        plan_factory=plan_factory,
        finish=finish,
        rows=rows,
        deadline=job.deadline,
        arrival=job.arrival,
        request_id=job.request_id,
        priority=job.priority,
        row_bytes=-(-work_bytes // max(rows, 1)),
    )


def _job_kind(calls: list[_PreparedCall], explanation_rows: int, forward_rows: int) -> PassKind:
    """The pass kind of most of a job's rows, at whose rate admission's estimates count them all: each call's are of
    its algorithm's `pass_kind` (its convergence delta's few forward rows too), sensitivity_max's explanations
    (`explanation_rows`) of the first call's, and the outputs' and infidelity's (`forward_rows`) are forward rows. A tie
    goes to the algorithm's kind."""
    if len(calls) == 1 and not forward_rows:
        return calls[0].algorithm.pass_kind
    rows: dict[PassKind, int] = {}
    for call in calls:
        rows[call.algorithm.pass_kind] = rows.get(call.algorithm.pass_kind, 0) + call.rows
    rows[calls[0].algorithm.pass_kind] += explanation_rows
    rows[PassKind.FORWARD] = rows.get(PassKind.FORWARD, 0) + forward_rows
    return max(rows, key=rows.__getitem__)


def _merge_of(call: _PreparedCall, job: AttributionJob, model: LoadedModel) -> Merge | None:
    """How a job of one algorithm may run as one plan with others (Scheduler._merged): where the algorithm treats each
    example on its own and no noise tunnel draws, with the jobs that agree in everything but their examples' values."""
    task = call.task
    if call.nt is not None or not call.algorithm.examples_independent or task.feature_masks:
        return None
    key = (
        call.name,
        task.params,
        task.return_convergence_delta,
        task.layer,
        job.return_outputs,
        job.priority,
        _signature(task.inputs),
        _signature(task.baselines),
        _signature((task.target,)),
        _signature(task.args),
    )
    try:
        hash(key)
    except TypeError:  # parameters that do not hash (a plugin's) are not compared: such jobs run alone
        return None
    # Their rows are gradient rows (and a delta's or the outputs' forward rows, a fraction of them): a merged job holds
    # at most one gradient pass.
    return Merge(key, PassKind.GRADIENT, (call, job.return_outputs, model.device), _combine)


def _signature(tensors: tuple[Tensor, ...]) -> tuple:
    return tuple((tuple(t.shape[1:]), t.dtype, t.device) for t in tensors)


def _combine(payloads: list[tuple[_PreparedCall, bool, torch.device]]) -> tuple[JobPlan, Callable[[list], list[list]]]:
    """Merge.combine: one plan over the examples of several jobs (_merge_of), and the split of what it returns into each
    job's share, as its own plan would have returned it."""
    call, outputs, device = payloads[0]
    tasks = [c.task for c, _, _ in payloads]
    deadlines = [t.deadline for t in tasks]
    task = tasks[0].replace(
        inputs=_cat_examples([t.inputs for t in tasks]),
        baselines=_cat_examples([t.baselines for t in tasks], [t.n for t in tasks]),
        target=torch.cat([t.target for t in tasks]),
        args=_cat_examples([t.args for t in tasks]),
        deadline=None if None in deadlines else max(d for d in deadlines if d is not None),
    )
    merged = dataclasses.replace(call, task=task)
    plans: list[PlanOf[Any]] = [merged.plan(device)]
    if outputs:
        plans.append(_outputs_plan(task.to(device)))
    bounds = list(itertools.accumulate((t.n for t in tasks), initial=0))

    def split(returned: list) -> list[list]:
        attribution: Attribution = returned[0]
        shares = []
        for start, stop in itertools.pairwise(bounds):
            cut = _examples(start, stop)
            share: list = [Attribution(cut(attribution.attributions), cut(attribution.convergence_delta), cut(attribution.outputs))]
            if outputs:
                share.append(cut(returned[-1]))
            shares.append(share)
        return shares

    return concurrently(plans), split


def _cat_examples(per_job: list[tuple[Tensor, ...]], examples: list[int] | None = None) -> tuple[Tensor, ...]:
    """Each position's tensors of several jobs, one after another along dim 0. With `examples` (baselines: 1 or n
    rows each), a tensor every job shares as one row stays that row, and the others are expanded to their job's n."""
    merged = []
    for parts in zip(*per_job):
        if examples is not None and all(p is parts[0] for p in parts) and parts[0].shape[0] == 1:
            merged.append(parts[0])
        elif examples is not None:
            merged.append(torch.cat([p.expand(n, *p.shape[1:]) for p, n in zip(parts, examples)]))
        else:
            merged.append(torch.cat(parts))
    return tuple(merged)


def _examples(start: int, stop: int) -> Callable[[Any], Any]:
    """Examples [start, stop) of a tensor or a tuple of them (None stays None)."""

    def cut(value: Any) -> Any:
        if value is None:
            return None
        return tuple(t[start:stop] for t in value) if isinstance(value, tuple) else value[start:stop]

    return cut


def _outputs_plan(task: Task, select: bool = True) -> PlanOf[Tensor]:
    """The model's explained output for the inputs (return_outputs; select=False: predictions alone, no target)."""
    result: BlockResult = yield Block(kind=PassKind.FORWARD, inputs=task.inputs, args=task.args, target=task.target, select=select)
    return result.outputs


def _cpu(value: Any) -> Any:
    """Detached CPU copies of a tensor or a tuple of them (None stays None)."""
    if value is None:
        return None
    return tuple(map(_cpu_tensor, value)) if isinstance(value, tuple) else _cpu_tensor(value)


def _cpu_tensor(t: Tensor) -> Tensor:
    # Skipping the no-op calls on CPU matters: every torch call hands the GIL to the event loop and back.
    return t if t.device.type == "cpu" and not t.requires_grad else t.detach().cpu()
