"""What the engine tells the outside, in names the outside can import without torch (the front-end process never
imports torch): the observer interface and the reasons and pass kinds its events carry, and the states of a model
version and their order. The engine's modules import these from here."""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# Why a job's rows were dropped before compute (a metric label).
DROP_DEADLINE = "deadline"
DROP_CANCELLED = "cancelled"

# The server's deadline starts when the call arrives, a little after the client's: a client whose deadline
# passed cancels the call that much before the server's own deadline. A cancel that close to the deadline
# is the deadline: within 25 ms of it, or within the last 5% of the RPC's deadline window (at most 250 ms), whichever
# is more. On a busy machine the call's headers take a while to arrive (measured: 0-8 ms with both cores busy; a
# full CI run once counted a client's deadline as CANCELLED, most likely past the 25 ms alone). The front's status
# (servicer.deadline_passed) and the engine's drop reason (Scheduler._dead) both judge a cancel by it.
_DEADLINE_SLACK_S = 0.025
_DEADLINE_SLACK_SHARE = 0.05
_DEADLINE_SLACK_MAX_S = 0.25


def deadline_slack(window: float | None) -> float:
    """How long before its deadline a cancel counts as the deadline, for a call whose deadline was `window` seconds
    away when it arrived (None: unknown)."""
    share = min(_DEADLINE_SLACK_SHARE * window, _DEADLINE_SLACK_MAX_S) if window else 0.0
    return max(_DEADLINE_SLACK_S, share)


# Why a request was refused at admission (a metric label).
REFUSED_ROWS = "queue_rows"  # its model's queued rows would pass the model's bound
REFUSED_BYTES = "queue_bytes"  # their estimated bytes would
REFUSED_REQUESTS = "queue_requests"  # the device holds max_queued_requests already
REFUSED_DEADLINE = "deadline"  # the work ahead of it and its own would not finish before its deadline
# The front end refuses it: it killed the engine process when it ran alone (a query of death, service quarantine.py).
REFUSED_QUARANTINED = "quarantined"
# The front end refuses it: the requests it holds for the engine process would pass --max-front-bytes (service
# engine_process.py).
REFUSED_FRONT_BYTES = "front_bytes"
REFUSAL_REASONS = (REFUSED_ROWS, REFUSED_BYTES, REFUSED_REQUESTS, REFUSED_DEADLINE, REFUSED_QUARANTINED, REFUSED_FRONT_BYTES)

# Why a fused pass was re-run in two halves (a metric label).
SPLIT_FAILURE = "failure"
SPLIT_OOM = "oom"


class PassKind(str, enum.Enum):
    """What a fused pass does; the executor knows how to run each (and metrics label passes with it)."""

    GRADIENT = "gradient"  # forward + backward w.r.t. the inputs (or the hooked layer)
    FORWARD = "forward"  # forward only, no autograd
    DEEPLIFT = "deeplift"  # forward + backward with DeepLift's rule hooks, rows paired with references
    GUIDED = "guided"  # forward + backward with Guided Backprop's or Deconvolution's ReLU hooks
    LRP = "lrp"  # forward + backward with LRP's relevance rules (gradients are normalised relevances)


class ModelState(str, enum.Enum):
    """Where a model version is in its life (ServedModels' records)."""

    LOADING = "loading"  # being built, measured and warmed up; requests get UNAVAILABLE
    READY = "ready"  # serving
    UNAVAILABLE = "unavailable"  # its load failed (the record's reason says why)
    UNLOADING = "unloading"  # finishing the requests it accepted; new ones are refused


def version_order(version: str) -> tuple[bool, int, str, str]:
    """Sort key of versions: numbers (ASCII digits) by value, after any other names; the last one is the newest.
    Never raises: the value is compared as digits, as int() cannot read "²" and refuses over 4,300 digits."""
    numeric = version.isascii() and version.isdigit()
    digits = version.lstrip("0") if numeric else ""
    return (numeric, len(digits), digits, version)


@dataclass
class PassStats:
    """What one fused pass did; handed to observers (metrics) after each pass."""

    model: str
    kind: str
    rows: int
    requests: int
    seconds: float
    # The rows it was cut to at most: the model's pass size for the kind (configured, or chosen by the probe and moved
    # by its tuner; a trial alternates two) capped at max_pass_seconds of work. `rows` is less when the queue held less.
    size: int


class EngineObserver:
    """What the engine tells the outside (metrics, health) as it happens. Override what you need.

    Called on worker threads: keep each call short. An observer that raises is logged and ignored.
    """

    def worker_step(self) -> contextlib.AbstractContextManager[None]:
        """Around one step of a worker: taking the new and dead jobs, or routing one pass's results. What the step
        tells observers (pass_executed first) and the answers it completes happen inside; an observer that forwards
        them elsewhere may hold them and send them together when the step ends."""
        return contextlib.nullcontext()

    def pass_executed(self, stats: PassStats) -> None:
        """After every fused pass."""

    def worker_running(self, device: str, worker: int, callers: tuple[Any, ...]) -> None:
        """Worker `worker` of `device` starts a pass holding rows of the requests whose callers wait on `callers` (the
        futures Engine.submit returned), right before the model runs; `()` when the pass has returned. Lets an
        engine process tell, after it died, which requests were computing (the service's quarantine.Board)."""

    def request_refused(self, model: str, reason: str) -> None:
        """A request was refused at admission (REFUSAL_REASONS), before any work."""

    def request_dropped(self, model: str, reason: str, rows: int) -> None:
        """A request died before all its rows ran (DROP_DEADLINE or DROP_CANCELLED); `rows` were never computed."""

    def worker_state(self, device: str, serving: bool, reason: str) -> None:
        """A device's worker went down (serving=False, with why) or is serving again after a restart."""

    def worker_stuck(self, device: str, reason: str) -> None:
        """A pass on `device` ran so long that it was given up as stuck (Scheduler.give_up_stuck_pass); worker_state
        has said the device is down, and its jobs have failed."""

    def pass_split(self, model: str, reason: str) -> None:
        """A fused pass was re-run in two halves, after a failure (SPLIT_FAILURE) or a device out-of-memory (SPLIT_OOM)."""

    def model_loaded(self, model: str, seconds: float) -> None:
        """A model finished loading (build, weights, probe, warm-ups) in `seconds`; it is ready."""

    def model_load_failed(self, model: str, error: BaseException) -> None:
        """A model failed to load."""

    def load_running(self, model: str, version: str, running: bool) -> None:
        """A load of a model version starts running the model's code (True), on the thread that runs it; False once
        that code has returned or raised (a load given up as stuck runs on until then). Lets an engine process's front
        tell which loads were running when the process stopped answering."""

    def model_state_changed(self, model: str, version: str) -> None:
        """A model version started or finished loading, failed to, started unloading, or is gone (see the
        engine's model_records); readiness and health follow."""


class Observers:
    """Fans one call out to every observer; a failing observer never breaks the engine."""

    def __init__(self, observers: list[EngineObserver]) -> None:
        self._observers = observers

    @contextlib.contextmanager
    def worker_step(self) -> Iterator[None]:
        entered = []
        for observer in list(self._observers):
            try:
                step = observer.worker_step()
                step.__enter__()
                entered.append((observer, step))
            except Exception:
                log.exception("engine observer %s.worker_step failed", type(observer).__name__)
        try:
            yield
        finally:
            for observer, step in reversed(entered):
                try:
                    step.__exit__(None, None, None)
                except Exception:
                    log.exception("engine observer %s.worker_step failed", type(observer).__name__)

    def __getattr__(self, method: str) -> Callable[..., None]:
        def call(*args: Any) -> None:
            for observer in list(self._observers):
                try:
                    getattr(observer, method)(*args)
                except Exception:
                    log.exception("engine observer %s.%s failed", type(observer).__name__, method)

        return call
