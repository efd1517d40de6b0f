"""The front end's handle on the engine-core process (EngineProcess); the engine process's side is engine_main.py.

`attrserve serve` runs two processes. The front end (grpc.aio event loop: decode, validate the wire format, encode,
metrics, health; it never imports torch) and the engine core (engine_main.py: the models, the schedulers and their
worker threads, the model manager). They talk over two Unix socket pairs, one each way, in frames (frames.py: a
pickled list of messages, each a tuple; tensors and arrays as out-of-band buffers, which arrive as tensors in the
engine and as numpy arrays in the front). Messages go in batches: the front writes what one turn of its event loop
sent (the requests of many callers) as one frame, and a worker what one step of its loop sent (a pass's metrics event,
then the answers of the jobs it finished); one pickle, one system call and one wake-up of the other side per batch
instead of per message. The front starts the engine process through launch.py.

front → engine: ("init", config, log settings, the versions to load or None for all, load-time probes, the versions not
to load with why) once; ("submit", id, job); ("cancel", id); ("call", id, method, args); ("call", id, "alive", ()), the
heartbeat, is answered while the models load too.
engine → front: ("started",) once its event loop runs, then ("ready", snapshot) or ("fatal", message) once;
("result", id, result); ("error", id, exception); ("reply", id, value); ("reply_error", id, exception); ("snapshot",
snapshot) when a model or worker changes state; ("event", observer method, args) for every engine observer call (the
front's metrics replay them).

The engine process ignores SIGINT and SIGTERM (the front drains it with a "shutdown" call) and exits when the
front's socket closes, so it never outlives the front. The front notices the engine process's death from its
socket's end: health goes NOT_SERVING, every request it held fails with UNAVAILABLE, and a new engine process is
started (after a back-off while it keeps dying) that loads the repository again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, NoReturn

from attrserve_engine import limits
from attrserve_engine.errors import AttributionError, PassStuck, ResourceExhausted, Unavailable, size_text
from attrserve_engine.events import REFUSED_FRONT_BYTES, REFUSED_QUARANTINED, EngineObserver, ModelState, Observers
from attrserve_service import launch
from attrserve_service.config import ServerConfig
from attrserve_service.convert import Job, Result, payload_bytes
from attrserve_service.core import ANSWERS, Gauges, Snapshot
from attrserve_service.frames import FrameReader, frame_of
from attrserve_service.quarantine import PROBE_QUARANTINED, PROBE_SERVED, Board, Quarantine, fingerprint
from attrserve_service.repository import CONTROL_EXPLICIT, UNLOADED, RepositoryError, Status

log = logging.getLogger(__name__)

_RESTART_DELAY_S = 0.5
_MAX_RESTART_DELAY_S = 30.0
_STABLE_S = 60.0  # an engine process that served this long before it died restarts after the shortest delay
# The front asks a serving engine process for its gauges every _HEARTBEAT_S (or a quarter of stuck_pass_seconds); one
# that has not answered within _SILENT_S (or half of stuck_pass_seconds) is NOT_SERVING until it answers, and one that
# has not answered within stuck_pass_seconds is killed (_heartbeat).
_HEARTBEAT_S = 5.0
_SILENT_S = 10.0
_BACKLOG_TTL_S = 0.25
# An engine process's exit status is polled for every _REAP_POLL_S (`_exit_status`, on the event loop); its socket closes
# as it exits, so `_reap` gives one whose socket closed _REAP_S to go.
_REAP_S = 1.0
_REAP_POLL_S = 0.002
# A suspect's probe waits for the requests in flight before it to be answered, looking every _PROBE_POLL_S, for at most
# _PROBE_WAIT_S; then it runs with them (_probe).
_PROBE_POLL_S = 0.001
_PROBE_WAIT_S = 30.0
# What a request held for the engine process costs the front end beyond its tensors (its call, task and futures, its
# message and the message's parse, its frame): ~26 KiB each, measured with the engine process stopped (bench/flood.py).
REQUEST_COST = 32 << 10
_FRONT_BYTES_CAP = 256 << 20


def _lost_text(why: str) -> str:
    """The error of a request or call in flight when the engine process died (`why`: how)."""
    return f"{why}; the request was lost with it and may be retried"


class EngineLost(Unavailable):
    """A request or call in flight when the engine process died (`why`: how), not one refused while it was down.
    `computing`: the keys of the requests in the passes that were running then (quarantine.Board), None where that is
    not known. `outside_kill`: it was killed by SIGKILL, and not by the front (its heartbeat, its reaper): by an
    operator, or by the kernel's OOM killer (oom_kills tells)."""

    def __init__(self, why: str, computing: frozenset[int] | None = None, outside_kill: bool = False) -> None:
        super().__init__(_lost_text(why), retry_after_s=1.0)
        self.why = why
        self.computing = computing
        self.outside_kill = outside_kill


def oom_kills() -> int | None:
    """How many processes the kernel's OOM killer has ended on this machine (/proc/vmstat's oom_kill: Linux 4.13 on,
    a container's memory limit included), or None where that cannot be read."""
    try:
        with open("/proc/vmstat", "rb") as f:
            for line in f:
                if line.startswith(b"oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _computing(lost: EngineLost | PassStuck, sent: int) -> bool:
    """Whether the request sent as `sent`, failed with `lost`, was computing: in the pass given up as stuck, or in a pass
    running when the engine process died (any request in flight, where its board could not say)."""
    return isinstance(lost, PassStuck) or lost.computing is None or sent in lost.computing


def describe_exit(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    if code == launch.EXIT_STUCK:
        return f"exit code {code}: it gave up a pass stuck in a model's code"
    return f"exit code {code}"


# Busy polling (EngineProcess._lone) keeps one core turning while the engine computes on another: it needs two.
BUSY_POLL_CORES = 2.0


def busy_poll_seconds(config: ServerConfig) -> float:
    """How long the front polls for a lone request's answer: `busy_poll_us`, unless this process may use fewer than
    BUSY_POLL_CORES cores (limits.cpu_limit: its affinity, its CPU quota). There the polling loop would take the core or
    the quota the engine's pass needs: on one core it runs until the kernel preempts it, and under a quota it spends the
    pod's CPU time and gets the whole pod throttled (bench/RESULTS.md, issue 12 step 36). Then 0: off, and logged."""
    if not config.busy_poll_us:
        return 0.0
    cores = limits.cpu_limit()
    if cores < BUSY_POLL_CORES:
        log.info("busy polling off: this process may use %.3g core(s) (its CPU affinity and quota); it needs %g", cores, BUSY_POLL_CORES)
        return 0.0
    return config.busy_poll_us / 1e6


def front_bytes_bound(config: ServerConfig) -> int:
    """How many bytes of requests the front end may hold for the engine process (`EngineProcess.attribute`):
    --max-front-bytes, or a thirty-second of the memory the server may use (limits.memory_limit: the machine's, or its
    cgroup's limit where that is less), at most 256 MiB: 64 MiB in the default 2 GiB pod.

    Why a bound: the engine's admission bounds what the engine process has read, but nothing bounded what the front
    held before that. With the engine process stopped (or its event loop held) for 10 s, 200 requests a second of
    588 KiB grew the front end to 4.5 GiB (bench/RESULTS.md, issue 12 step 41): a pod is killed for memory long before,
    every request in flight with it. The front's memory grows by 2-3 bytes for each byte it holds (gRPC's copy of the
    message, the arrays, and the unsent frame while the engine process does not read: a peak of 603 MiB at 256 MiB
    held there), so a thirty-second keeps it under a tenth of the pod's memory; 256 MiB is ~430 such requests."""
    if config.max_front_bytes:
        return config.max_front_bytes
    return min(_FRONT_BYTES_CAP, limits.memory_limit() // 32)


class EngineProcess:
    """The engine core in its own process, behind the calls LocalCore answers in this one."""

    def __init__(self, config: ServerConfig, log_settings: tuple[str, str] = ("INFO", "text")) -> None:
        self.config = config
        self.log_settings = log_settings
        self.observers: list[EngineObserver] = []  # hear the engine's events (replayed here, on the event loop)
        self.listeners: list[Callable[[], None]] = []  # called on the event loop when readiness may have changed
        self.up = False
        self.reason = "the engine process is starting"
        self._snapshot = Snapshot()
        self._preload: str | None = None  # the engine process's LD_PRELOAD (allocator_preload), chosen at start
        self._event_loop = "asyncio"  # the engine process's event loop (eventloop.resolve), chosen at start
        self._pending: dict[int, asyncio.Future] = {}
        self._outbox: list[tuple] = []  # messages of this turn of the event loop, not yet written (_write)
        self._ids = itertools.count()
        self._generation = 0
        self._proc: subprocess.Popen | None = None
        self._board: Board | None = None  # what the engine process's workers compute (quarantine.Board)
        self._writer: asyncio.WriteTransport | None = None
        self._reader: asyncio.BaseTransport | None = None
        self._ready: asyncio.Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._restarting: asyncio.Task | None = None
        self._reaping: asyncio.Future | None = None  # reads a dead engine process's exit status (_ended)
        self._started_at = 0.0
        self._delay = _RESTART_DELAY_S
        self._gauges = Gauges({}, {})
        self._gauges_at = 0.0
        self._gauges_changes = -1
        self._changes = 0  # requests, cancels and engine messages so far (a backlog answer is stale once it moves)
        self._killed_why = ""  # why the front killed the engine process (_heartbeat), for its requests' errors
        self._killed_in_load = False  # ... while loads ran model code (_stuck_loads has them)
        self._heartbeats: set[asyncio.Task] = set()
        self._busy_poll_s = busy_poll_seconds(config)  # see _lone
        self._lone_s: dict[tuple[str, str], float] = {}  # (model, algorithm) → its lone answers' time, smoothed (_lone)
        self._attributing = 0  # requests sent to the engine process and not yet answered (calls are not counted)
        self._quarantine = Quarantine(config.quarantine_seconds)  # queries of death (quarantine.py; _guarded)
        self._probing = False  # a suspect runs alone: nothing else is sent until it is answered (_probe)
        self._probe_over = asyncio.Event()
        self._probe_over.set()
        self._started = False  # the engine process's event loop runs ("started", before any model's code)
        self._loaded = False  # ... and has loaded its models ("ready"): its snapshots are taken (_take)
        self._loading: set[tuple[str, str]] = set()  # versions whose load runs the model's code now ("load_running")
        # Versions that were loading when an engine process stopped answering and was killed (_heartbeat): the ones
        # after it do not load them (ModelManager.load_all's skip), with this reason, until one of them is READY again.
        self._stuck_loads: dict[tuple[str, str], str] = {}
        self._held_bound = front_bytes_bound(config)  # what `attribute` may hold (--max-front-bytes)
        self.held_bytes = 0  # requests' bytes held from `attribute` to their answer (attrserve_front_held_bytes)
        self._answered_bytes = 0  # ... and released so far: how fast held bytes drain (_refuse_held's hint)
        self._drain = (time.monotonic(), 0, 0.0)  # (when, _answered_bytes then, the rate measured then: bytes a second)
        self._silent = ""  # why health says NOT_SERVING though the engine process is up: it has not answered (_heartbeat)
        self._silent_at = 0.0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self, launched: launch.Launched | None = None) -> None:
        """Start the engine process, or take over `launched` (started for this config by `attrserve serve` before it
        imported torch), and wait until its models are loaded; RepositoryError when it cannot serve."""
        self._loop = asyncio.get_running_loop()
        if launched is None:
            launched = launch.start(self.config, self.log_settings)
        self._preload, self._event_loop = launched.preload, launched.event_loop
        while True:
            skipped = len(self._stuck_loads)
            try:
                await self._take(launched)
                return
            except RepositoryError:
                if len(self._stuck_loads) == skipped:  # not killed in a load: it cannot serve
                    raise
            log.error("starting another engine process, which does not load %s", ", ".join(f"{n} v{v}" for n, v in self._stuck_loads))
            launched = self._launch(None)

    def _launch(self, restore: set[tuple[str, str]] | None) -> launch.Launched:
        return launch.launch(
            self.config, self.log_settings, self._preload, self._event_loop, restore, self._snapshot.probes, self._stuck_loads
        )

    async def _spawn(self) -> None:
        """A new engine process (a restart), with the first one's malloc and event loop, and the load-time probes the
        last one reported (its Snapshot: layouts, pass-size rates): its loads of unchanged files skip timing passes,
        which was over half of a restart on bench/models (bench/RESULTS.md, issue 12 step 28)."""
        launched = self._launch(self._restore())
        # Counted as started, not once it serves: one that dies while it loads (a model whose load ends the process,
        # a kill) is a restart too, and counted after it served, a crash loop counted nothing.
        self._tell("engine_process_restarted")
        await self._take(launched)

    async def _take(self, launched: launch.Launched) -> None:
        loop = asyncio.get_running_loop()
        launched.taken = True
        self._generation += 1
        generation = self._generation
        self._proc = launched.proc
        if self._board is not None:
            self._board.close()
        self._board = launched.board
        self._loading = set()
        self._started = False  # its event loop runs: it has said "started"
        # Its snapshots are taken from its "ready" on (_received). Until then the front keeps the last serving process's:
        # a loading one's names only the models it has loaded so far. Taken, the requests refused meanwhile were counted
        # under model "unknown" (labels), ListModels left the others out, and had it died too, the next one under
        # explicit model control would have restored only what it had loaded (_restore).
        self._loaded = False
        self._ready = loop.create_future()
        self._writer, _ = await loop.create_unix_connection(asyncio.Protocol, sock=launched.to_engine)
        self._reader, _ = await loop.create_unix_connection(
            lambda: FrameReader(
                partial(self._received, generation),
                partial(self._ended, generation),
                tensors=False,
                on_unreadable=partial(self._unreadable, generation),
            ),
            sock=launched.from_engine,
        )
        if self.config.limits.stuck_pass_seconds > 0:  # from the start: a load may hold the event loop too
            task = asyncio.ensure_future(self._heartbeat(generation, self._proc))
            self._heartbeats.add(task)
            task.add_done_callback(self._heartbeats.discard)
        await self._ready  # _received takes its snapshot
        self._started_at = time.monotonic()
        self.up = True
        self.reason = ""
        snapshot = self._snapshot
        log.info("engine process %d serves (malloc: %s, event loop: %s)", self._proc.pid, snapshot.allocator, snapshot.event_loop)
        if self._preload and self._snapshot.allocator == "glibc":
            log.warning("engine process %d runs on glibc's malloc: LD_PRELOAD=%s did not load", self._proc.pid, self._preload)
        self._tell("engine_process_state", True, "")
        self._changed()

    async def _heartbeat(self, generation: int, proc: subprocess.Popen) -> None:
        """Kill an engine process that stops answering. The engine's own watchdogs give up a pass or a load stuck in a
        model's code (Scheduler._watch, Engine._watched_load), but code stuck with the GIL held (a C extension's busy
        loop, a blocking call that keeps the GIL) stops them and the engine's event loop with it: its requests waited
        for their deadlines while health said SERVING, and a load held the server's start for ever. Every few seconds,
        from its start, the front asks the engine process for its gauges (before it serves: whether it is alive); one
        that has not answered within stuck_pass_seconds is killed, and its requests fail and it is started again as
        after any death. The loads it was running then are not run by the ones after it (_stuck_loads).

        Before that, a serving one that has not answered within _SILENT_S (or half of stuck_pass_seconds) makes health
        say NOT_SERVING (`_silent`) until it answers: it cannot take work meanwhile (stopped, its event loop held), and
        a balancer or a client that watches health moves its calls to another replica, for the tens of seconds before
        the kill. Its requests are held meanwhile (at most --max-front-bytes) and answered if it answers again."""
        limit = self.config.limits.stuck_pass_seconds
        while True:
            await asyncio.sleep(min(_HEARTBEAT_S, limit / 4))
            if not self._current(generation, proc):
                return
            if not self._started:  # still importing torch: its event loop does not run yet
                continue
            try:
                if self.up:
                    await self._answered_within(self._ask_gauges(limit), min(_SILENT_S, limit / 2), proc.pid)
                else:
                    await asyncio.wait_for(self._post("call", "alive", ())[1], limit)
            except asyncio.TimeoutError:
                break
            except Unavailable:  # it is down or died meanwhile: _lost has it, and a new one has its own heartbeat
                return
            except Exception:  # it answered, with an error: it is alive
                pass
            self._heard(generation)
        if not self._current(generation, proc):
            return
        loading = sorted(self._loading)
        held = f" while it loaded {', '.join(f'{n} v{v}' for n, v in loading)}" if loading else ""
        self._killed_why = (
            f"the engine process {proc.pid} did not answer for {limit:g} s (stuck_pass_seconds){held}: something holds "
            "its event loop, such as a model's code stuck with the GIL held; it was killed"
        )
        self._killed_in_load = bool(loading)
        self._skip_loads(
            loading,
            f"the engine process stopped answering for {limit:g} s (stuck_pass_seconds) while this version "
            "loaded (its code stuck with the GIL held, say) and was killed",
        )
        log.error("%s", self._killed_why)
        proc.kill()

    def _skip_loads(self, keys: Iterable[tuple[str, str]], why: str) -> None:
        """The engine processes after this one do not run these versions' loads (_stuck_loads), saying `why`."""
        for key in keys:
            self._stuck_loads[key] = (
                f"{why}; the engine processes after it do not load this version (a LoadModel, or a change to its files "
                "under --model-control poll, loads it again)"
            )

    async def _answered_within(self, ask: Any, seconds: float, pid: int) -> None:
        """Await `ask` (a heartbeat's question); if it takes longer than `seconds`, say NOT_SERVING meanwhile."""
        task = asyncio.ensure_future(ask)
        done, _ = await asyncio.wait({task}, timeout=seconds)
        if not done:
            self._silent = (
                f"the engine process {pid} has not answered for {seconds:g} s: something holds its event loop (stopped, or "
                "a model's code holding the GIL); it is killed if it does not answer within stuck_pass_seconds"
            )
            self._silent_at = time.monotonic() - seconds
            log.warning("%s; NOT_SERVING until it answers", self._silent)
            self._changed()
        await task

    def _heard(self, generation: int) -> None:
        """The heartbeat's question was answered: health follows the engine's own state again."""
        if self._silent and generation == self._generation:
            log.warning("the engine process %s answers again, after %.1f s without an answer", self.pid, time.monotonic() - self._silent_at)
            self._silent = ""
            self._changed()

    def _current(self, generation: int, proc: subprocess.Popen) -> bool:
        """Whether `proc` is the engine process of `generation`, the latest, and its connection is still open."""
        writer = self._writer
        return generation == self._generation and proc.poll() is None and writer is not None and not writer.is_closing()

    def _restore(self) -> set[tuple[str, str]] | None:
        """What a restarted engine process loads: under explicit model control, the versions that were loaded (or
        loading, or failed) before, so a model unloaded on request stays unloaded; otherwise the whole repository.
        Only restarts ask (_spawn): the first process, started by `launch.start`, loads the whole repository."""
        if self.config.model_control != CONTROL_EXPLICIT:
            return None
        return {(s.name, s.version) for s in self._snapshot.statuses if s.state not in (UNLOADED, ModelState.UNLOADING.value)}

    def _write(self, message: tuple) -> None:
        """Send `message` with the others of this turn of the event loop, as one frame (written at the next turn)."""
        self._outbox.append(message)
        if len(self._outbox) == 1:
            assert self._loop is not None
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        messages, self._outbox = self._outbox, []
        if self._writer is not None and not self._writer.is_closing():
            self._writer.writelines(frame_of(messages, self._unsendable))

    def _unsendable(self, message: tuple, error: Exception) -> None:
        """A request or call that cannot be pickled fails alone (INTERNAL); the others of its frame go."""
        future = self._pending.pop(message[1], None) if message[0] in ("submit", "call") else None
        if future is None:
            log.error("a %r message could not be pickled; it is not sent: %s", message[0], error, exc_info=error)
        elif not future.done():
            future.set_exception(error)

    def _received(self, generation: int, message: Any) -> None:
        if generation != self._generation:
            return
        kind = message[0]
        if kind != "reply":
            self._changes += 1  # something changed in the engine: the next scrape asks again
        if kind in ("result", "reply"):
            future = self._pending.pop(message[1], None)
            if future is not None and not future.done():
                future.set_result(message[2])
        elif kind in ("error", "reply_error"):
            future = self._pending.pop(message[1], None)
            if future is not None and not future.done():
                future.set_exception(message[2])
        elif kind == "started":
            self._started = True
        elif kind == "event":
            if message[1] == "load_running":
                model, version, running = message[2]
                (self._loading.add if running else self._loading.discard)((model, version))
            self._tell(message[1], *message[2])
        elif kind == "snapshot":
            snapshot = message[1]
            if self._stuck_loads:  # one loaded again (a LoadModel, a changed folder): later processes load it again
                for status in snapshot.statuses:
                    if status.state == ModelState.READY.value:
                        self._stuck_loads.pop((status.name, status.version), None)
            if self._loaded:  # see _take: a process still loading has only some of the models
                self._snapshot = snapshot
                self._changed()
        elif kind in ("ready", "fatal") and self._ready is not None and not self._ready.done():
            if kind == "ready":
                self._loaded = True
                self._snapshot = message[1]
                self._ready.set_result(message[1])
            else:
                self._ready.set_exception(RepositoryError(message[1]))

    def _unreadable(self, generation: int, message: Any, why: str) -> None:
        """A message of the engine process's that the front end could not read whole (it holds an object of a class or
        function the front end does not import, which the engine's pickler should have refused): an answer fails
        alone, INTERNAL (the servicer logs it with an id); any other is logged and dropped. The engine serves on."""
        if generation != self._generation:
            return
        kind = message[0] if isinstance(message, tuple) and message and isinstance(message[0], str) else "malformed"
        problem = f"the engine process's {kind!r} message holds what the front end does not read: {why}"
        if kind in ANSWERS:
            future = self._pending.pop(message[1], None)
            if future is not None and not future.done():
                future.set_exception(RuntimeError(problem))
                return
        if kind in ("ready", "fatal") and self._ready is not None and not self._ready.done():
            self._ready.set_exception(RepositoryError(problem))
            return
        log.error("%s; it is dropped", problem)

    def _tell(self, method: str, *args: Any) -> None:
        getattr(Observers(self.observers), method)(*args)  # an observer that raises is logged and ignored

    def _changed(self) -> None:
        for listener in list(self.listeners):
            listener()

    def _ended(self, generation: int) -> None:
        """The engine process's socket closed: it exited, or is exiting (told to shut down, or dying). It stops serving
        at once (health, metrics); the requests it held fail once its exit status is known, which `_reap` reads
        without blocking the event loop."""
        if generation != self._generation:
            return
        proc = self._proc
        was_up, self.up = self.up, False
        self._outbox.clear()  # for the process that is gone: its requests fail below
        if self._writer is not None:
            self._writer.close()
        if self._closing or proc is None:  # shutdown() waits for the exit itself
            self._lost(proc, None if proc is None else proc.poll(), was_up)
            return
        self.reason = f"the engine process {proc.pid} closed its connection"
        if was_up:
            self._tell("engine_process_state", False, self.reason)
            self._changed()
        self._reaping = asyncio.ensure_future(self._reap(proc, was_up))

    async def _reap(self, proc: subprocess.Popen, was_up: bool) -> None:
        """Wait (polling, on the event loop) for the exit of an engine process whose socket closed: moments, as a
        process's sockets close when it exits. One that lingers, e.g. stuck in a model's code after it closed its
        end, is killed after _REAP_S: it can serve nothing and must not hold its memory beside the next one."""
        code = await _exit_status(proc, _REAP_S)
        lingered = code is None
        if lingered:
            proc.kill()
            code = await _exit_status(proc, _REAP_S)
        self._lost(proc, code, was_up, lingered)

    def _lost(self, proc: subprocess.Popen | None, code: int | None, was_up: bool, lingered: bool = False) -> None:
        """The engine process is gone: fail what it held with why, and start another (unless the server is closing)."""
        pid = proc.pid if proc is not None else "?"
        in_a_load, self._killed_in_load = self._killed_in_load, False
        outside_kill = code == -signal.SIGKILL and not self._killed_why and not lingered
        computing = self._board.computing() if self._board is not None else None  # the passes it ran as it went
        if self._killed_why:
            reason, self._killed_why = self._killed_why, ""
        elif lingered:
            reason = f"the engine process {pid} closed its connection and did not exit within {_REAP_S:g} s; it was killed"
        else:
            reason = f"the engine process {pid} exited ({describe_exit(code)})"
            # It died in a load's model code (os._exit, a crash, the OOM killer) where no pass ran: a pass that ran is
            # the suspect instead (quarantine), and the loads beside it load again.
            if self._loading and not self._closing and not computing:
                in_a_load = True
                self._skip_loads(sorted(self._loading), f"{reason} while this version loaded")
        self.reason = reason
        self._silent = ""  # (the death's reason is health's now)
        lost: Unavailable
        if self._closing:  # nothing is suspected: the process was told to exit
            lost = Unavailable(_lost_text(reason), retry_after_s=1.0)
        else:
            if computing is None and in_a_load:  # no pass ran: the load that held it is to blame, not a request
                computing = frozenset()
            lost = EngineLost(reason, computing, outside_kill)
            if self._quarantine.enabled and self._attributing:
                log.warning(
                    "%d request(s) were in flight; %s suspects: each runs alone if it is sent again, and one that kills "
                    "the engine process then is quarantined (--quarantine-seconds)",
                    self._attributing,
                    "all are" if computing is None else f"the {len(computing)} whose rows were computing are",
                )
        for future in self._pending.values():
            if not future.done():
                future.set_exception(lost)
        self._pending.clear()
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(RepositoryError(f"{reason} before its models were loaded"))
        if self._closing:
            return
        if was_up:
            log.error("%s; NOT_SERVING until a new engine process has loaded the models", reason)
            self._changed()
            served_for = time.monotonic() - self._started_at
            self._delay = _RESTART_DELAY_S if served_for > _STABLE_S else min(self._delay * 2, _MAX_RESTART_DELAY_S)
            if self._restarting is None or self._restarting.done():
                self._restarting = asyncio.ensure_future(self._restart())

    async def _restart(self) -> None:
        while not self._closing:
            await asyncio.sleep(self._delay)
            if self._closing:
                return
            try:
                await self._spawn()
            except Exception as e:
                log.error("the engine process could not be restarted: %s; trying again in %.1f s", e, self._delay)
                self._delay = min(self._delay * 2, _MAX_RESTART_DELAY_S)
                continue
            return

    def _unavailable(self) -> Unavailable:
        return Unavailable(f"the engine is not serving: {self.reason}", retry_after_s=1.0)

    def _send(self, kind: str, *payload: Any) -> tuple[int, asyncio.Future]:
        """Send a request or a call; its answer resolves the returned future (or the engine's death fails it)."""
        if not self.up:
            raise self._unavailable()
        return self._post(kind, *payload)

    def _post(self, kind: str, *payload: Any) -> tuple[int, asyncio.Future]:
        """_send, up or not (the heartbeat asks an engine process that is still loading whether it is alive)."""
        assert self._loop is not None
        key = next(self._ids)
        future = self._loop.create_future()
        self._pending[key] = future
        self._write((kind, key, *payload))
        return key, future

    async def _call(self, method: str, *args: Any) -> Any:
        return await self._send("call", method, args)[1]

    # -- what LocalCore answers ---------------------------------------------------------------------------------------
    async def attribute(self, job: Job) -> Result:
        """`job`'s answer. The front holds the request until then, and holds at most `front_bytes_bound` of them:
        one that would pass it is refused (an empty front takes any request, so none is refused for ever)."""
        size = payload_bytes(job) + REQUEST_COST
        if self.held_bytes and self.held_bytes + size > self._held_bound:
            self._refuse_held(job, size)
        self.held_bytes += size
        try:
            if self._probing or self._quarantine.watching:  # only after an engine process died (quarantine.py)
                return await self._guarded(job)
            return await self._attribute(job)
        finally:
            self.held_bytes -= size
            self._answered_bytes += size

    def _refuse_held(self, job: Job, size: int) -> NoReturn:
        """RESOURCE_EXHAUSTED, counted (reason front_bytes), with a hint: the time the bytes above the bound take to be
        answered at the rate held bytes were answered over the last second or more (1 s where none were)."""
        now = time.monotonic()
        since, answered, rate = self._drain
        if now - since >= 1.0:
            rate = (self._answered_bytes - answered) / (now - since) if now - since <= 10.0 else 0.0
            self._drain = (now, self._answered_bytes, rate)
        excess = self.held_bytes + size - self._held_bound
        retry = min(5.0, max(0.05, excess / rate)) if rate else 1.0
        self._tell("request_refused", self.labels(job.model, job.algorithm)[0], REFUSED_FRONT_BYTES)
        raise ResourceExhausted(
            f"the front end holds ~{size_text(self.held_bytes)} of requests the engine process has not answered; this "
            f"request's ~{size_text(size)} would pass its bound of {size_text(self._held_bound)} (--max-front-bytes); "
            f"retry in about {retry * 1e3:.0f} ms",
            retry_after_s=retry,
        )

    async def _attribute(self, job: Job, key: bytes | None = None) -> Result:
        """Send `job` and wait for its answer (`key`: its fingerprint, where known)."""
        return await self._answer(job, *self._send("submit", job), key)  # (no frame but _answer's holds the future)

    async def _answer(self, job: Job, sent: int, future: asyncio.Future, key: bytes | None) -> Result:
        """The answer to `job`, sent as `sent`. One whose rows were computing when the engine process died (or every one
        in flight, where the board cannot say) becomes a suspect.

        Only this frame (and _lone's) holds `future`, and lets go of it before an exception leaves: a failed future
        holds its exception, whose traceback holds every frame it passed through, so a frame that still held the future
        made a reference cycle, and the request's message and arrays waited for the collector's rare full collection
        (bench/RESULTS.md, issue 12 step 41; tests/service/test_failed_call_cycles.py)."""
        self._changes += 1  # the engine's backlog moves
        self._attributing += 1
        try:
            if self._busy_poll_s and len(self._pending) == 1:
                return await self._lone(job, future)
            return await future
        except asyncio.CancelledError:
            if self._pending.pop(sent, None) is not None:
                self._write(("cancel", sent))  # its rows are dropped before they cost compute
                self._changes += 1
            raise
        except (EngineLost, PassStuck) as lost:
            if self._quarantine.enabled and _computing(lost, sent):
                with contextlib.suppress(Exception):  # (it was pickled to be sent: it can be fingerprinted)
                    self._quarantine.suspect(fingerprint(job) if key is None else key)
            raise
        finally:
            self._attributing -= 1
            del future  # (see the docstring)

    async def _guarded(self, job: Job) -> Result:
        """A request while some fingerprint is suspected or quarantined (quarantine.py): a quarantined one is refused
        with FAILED_PRECONDITION, a suspect runs alone (_probe), and any other waits while a suspect runs alone."""
        quarantine = self._quarantine
        try:
            key = fingerprint(job)
        except Exception:  # it cannot be pickled, so not sent either: _send's frame fails it alone, as ever
            return await self._attribute(job)
        while True:
            refusal = quarantine.refusal(key, job.model, job.algorithm)
            if refusal is not None:
                self._tell("request_refused", self.labels(job.model, job.algorithm)[0], REFUSED_QUARANTINED)
                raise refusal
            if not self._probing:
                if quarantine.suspected(key):
                    return await self._probe(job, key)
                return await self._attribute(job, key)
            await self._probe_over.wait()  # then look again: an identical request's probe may have settled it

    async def _probe(self, job: Job, key: bytes) -> Result:
        """Run a suspect alone: hold back every other request (`_probing`), wait until none is in flight, send it, and
        let the others go once it is answered. If the engine process dies meanwhile, the suspect did it (nothing else
        ran): it is quarantined and its caller gets FAILED_PRECONDITION, which clients do not retry. Any answer, an
        error too, clears it. A cancel, or an engine process that is down when it is sent, leaves it a suspect.

        Requests in flight that are not answered within _PROBE_WAIT_S (a pass stuck with the watchdog off, say) do not
        hold everything back for longer: the suspect then runs with them (an answer clears it; a death proves nothing
        then, and it stays a suspect), and lets the others go at once: another suspect may then start a probe of its
        own, which holds `_probing` until it is answered. So only the probe that holds `_probing` releases it (`holding`):
        the first one's end had let plain requests go out beside the second suspect, which a death then quarantined
        for what another request did. What the front cannot see: a request whose caller gave up just before may still
        be in the engine's pass."""
        self._probing = True
        self._probe_over.clear()
        holding = True  # this probe holds the others back (_probing); it lets them go once, and only while it holds
        model = self.labels(job.model, job.algorithm)[0]
        try:
            assert self._loop is not None
            give_up = self._loop.time() + _PROBE_WAIT_S
            while self._attributing:
                if self._loop.time() > give_up:
                    log.warning("a suspect of model %r could not run alone within %g s; it runs with the others", job.model, _PROBE_WAIT_S)
                    holding = self._probing = False
                    self._probe_over.set()
                    result = await self._attribute(job, key)
                    self._quarantine.clear(key)  # answered: not the cause (a death proves nothing, with others in flight)
                    return result
                await asyncio.sleep(_PROBE_POLL_S)
            ooms = oom_kills()
            sent, future = self._send("submit", job)
            answer = self._answer(job, sent, future, key)
            del future  # only _answer holds it (its docstring)
            try:
                result = await answer
            except (EngineLost, PassStuck) as lost:
                if not _computing(lost, sent):
                    raise  # it was not computing: what was (a request its caller left) is not known here; still a suspect
                # Killed from outside, by no OOM kill (an operator, say): proof of nothing, once. It stays a suspect, and
                # a second such kill while it runs alone quarantines it: a request whose code SIGKILLs its own process
                # costs three deaths, and a request that was merely there is not refused for quarantine_seconds
                # (bench/chaos.py: every identical `good` request was, after one outside kill).
                outside = isinstance(lost, EngineLost) and lost.outside_kill and ooms is not None and oom_kills() == ooms
                if outside and self._quarantine.strike(key) < 2:
                    log.warning(
                        "a suspect of model %r ran alone and the engine process was killed from outside (SIGKILL, by no OOM "
                        "kill): it stays a suspect; a second such kill while it runs alone quarantines it",
                        job.model,
                    )
                    raise
                self._quarantine.quarantine(key, lost.why)
                self._tell("suspect_probed", model, PROBE_QUARANTINED)
                log.error(
                    "quarantined a query of death for %g s: model %r, algorithm %r, request id %r (fingerprint %s) ran alone and %s",
                    self._quarantine.seconds,
                    job.model,
                    job.algorithm,
                    job.request_id,
                    key.hex(),
                    lost.why,
                )
                refusal = self._quarantine.refusal(key, job.model, job.algorithm)
                raise (lost if refusal is None else refusal) from None  # (None: a quarantine shorter than the log line)
            except Unavailable:  # the engine process was down, or its device: nothing learnt
                raise
            except Exception:
                self._cleared(key, model)
                raise
            self._cleared(key, model)
            return result
        finally:
            if holding:  # (one that gave up waiting let go then: `_probing` may be another suspect's probe's now)
                self._probing = False
                self._probe_over.set()

    def _cleared(self, key: bytes, model: str) -> None:
        self._quarantine.clear(key)
        self._tell("suspect_probed", model, PROBE_SERVED)

    async def _lone(self, job: Job, future: asyncio.Future) -> Result:
        """A request alone in flight: its answer is polled for (below) unless this model and algorithm's lone answers
        have been taking more than twice the budget (the smoothed time from send to answer, `_lone_s`), which the
        polling would not reach: it would only spend a core.

        Polling: the event loop turns without sleeping until `future` is done, another request or call is in flight,
        or `busy_poll_us` have passed. Each turn still polls the loop's sockets (with a timeout of 0) and runs its
        callbacks, so nothing else waits; the thread just never blocks, and its core never idles.

        Why: on the 2-core VM of bench/RESULTS.md a core that idles runs the next thing it is given several times slower
        (issue 12 steps 19, 33 and 34), and a lone request's every step, in both processes, came after such an idle gap.
        Keeping the front's loop turning while the engine computes made W5's answers come sooner (step 35). With two or
        more requests in flight the loop has work of its own, and a core more of polling would take CPU from the
        engine's passes: it sleeps as before."""
        assert self._loop is not None
        loop, kind = self._loop, (job.model, job.algorithm)
        start = loop.time()
        if self._lone_s.get(kind, 0.0) <= 2 * self._busy_poll_s:
            end = start + self._busy_poll_s
            try:
                while not future.done() and len(self._pending) == 1 and loop.time() < end:
                    await asyncio.sleep(0)
            finally:
                self._tell("busy_polled", loop.time() - start)  # attrserve_busy_poll_seconds_total
        try:
            result = await future
        except BaseException:
            del future  # (a reference cycle otherwise: _answer's docstring)
            raise
        took = loop.time() - start
        self._lone_s[kind] = took if kind not in self._lone_s else 0.75 * self._lone_s[kind] + 0.25 * took
        return result

    def labels(self, model: str, algorithm: str) -> tuple[str, str]:
        snapshot = self._snapshot
        return (model if model in snapshot.names else "unknown", algorithm if algorithm in snapshot.algorithms else "unknown")

    async def model_infos(self) -> list:
        return await self._call("model_infos")

    async def model_info(self, name: str, version: str) -> Any:
        return await self._call("model_info", name, version)

    def readiness(self, strict: bool) -> tuple[bool, str]:
        if not self.up:
            return False, self.reason
        if self._silent:
            return False, self._silent
        return self._snapshot.strict_readiness if strict else self._snapshot.readiness

    def statuses(self) -> list[Status]:
        if self.up:
            return list(self._snapshot.statuses)
        return [s if s.state == UNLOADED else Status(s.name, s.version, "unavailable", self.reason) for s in self._snapshot.statuses]

    async def index(self, name: str | None = None) -> list[Status]:
        return await self._call("index", name)

    async def load(self, name: str, version: str = "") -> list[Status]:
        return await self._call("load", name, version)

    async def unload(self, name: str, version: str = "") -> list[Status]:
        return await self._call("unload", name, version)

    async def poll_forever(self, interval: float) -> None:
        """The engine process follows the repository itself."""

    async def refresh(self) -> None:
        """Ask the engine for every model's backlog and its devices' memory (LocalCore.gauges); /metrics calls this
        before it writes a page. One answer serves the scrapes of 0.25 s unless a request, a cancel or a message from
        the engine came since. An engine that does not answer within a second leaves the last answer."""
        now, changes = time.monotonic(), self._changes
        if not self.up or (changes == self._gauges_changes and now - self._gauges_at <= _BACKLOG_TTL_S):
            return
        with contextlib.suppress(Exception):
            await self._ask_gauges(1.0)

    async def _ask_gauges(self, timeout: float) -> None:
        """The engine's gauges (LocalCore.gauges), kept with when they were asked for and the changes seen then: what
        `refresh` serves a scrape from. Raises what the call raises (TimeoutError after `timeout` s)."""
        asked, changes = time.monotonic(), self._changes
        self._gauges = await asyncio.wait_for(self._call("gauges"), timeout)
        self._gauges_at, self._gauges_changes = asked, changes

    def backlog(self, name: str) -> tuple[int, int]:
        """(requests, rows) queued for a model: the engine's answer to the last `refresh`."""
        return self._gauges.backlogs.get(name, (0, 0)) if self.up else (0, 0)

    def device_memory(self, device: str) -> int:
        """Bytes torch has allocated on a CUDA device in the engine process: its answer to the last `refresh` (0 while
        no engine process runs: a dead one's memory is freed)."""
        return self._gauges.device_memory.get(device, 0) if self.up else 0

    def watched(self, name: str) -> list[tuple[list[str], str]]:
        return self._snapshot.watched.get(name, [])

    def snapshot(self) -> Snapshot:
        return self._snapshot

    def watch(self, observer: EngineObserver) -> None:
        self.observers.append(observer)

    def on_change(self, callback: Callable[[], None], loop: asyncio.AbstractEventLoop) -> None:
        self.listeners.append(callback)

    async def shutdown(self, drain: bool = True, timeout: float | None = 30.0) -> int:
        """Drain the engine process (for at most `timeout` s) and let it exit; how many accepted requests were lost.

        A serving engine process is drained by a "shutdown" call. One that does not serve (a restarted one still
        loading its models, or one that has not started its event loop yet) is told to go by its socket's end: it
        exits when the front's socket closes (engine_main). Before, it was waited for 10 s with that socket open and
        then killed: a SIGTERM during a restart took 10 s more than the drain. A restart in its back-off is cancelled
        first, so no process is started after this."""
        self._closing = True
        restarting = self._restarting
        if restarting is not None and not restarting.done():
            restarting.cancel()  # in its back-off, or waiting for a new engine process's "ready" (_take)
            await asyncio.wait({restarting})  # settled: self._proc and self._writer are that process's, if it started one
        for task in list(self._heartbeats):
            task.cancel()
        lost = 0
        if self.up:
            try:
                lost = await asyncio.wait_for(self._call("shutdown", drain, timeout), (timeout or 30.0) + 10.0)
            except (asyncio.TimeoutError, AttributionError) as e:
                log.error("the engine process did not shut down cleanly: %s", e)
        self.up = False
        self.reason = "the server is shutting down"
        # Drained (it exits now), or not serving: its socket's end tells it to go. The reader stays open until it has
        # exited, so that what it still writes meanwhile does not fail on a closed socket.
        if self._writer is not None:
            self._writer.close()
        proc = self._proc
        if proc is not None and await _exit_status(proc, 10.0) is None:
            log.error("the engine process %d did not exit within 10 s of the server's shutdown; it is killed", proc.pid)
            proc.kill()
            proc.wait()
        for transport in (self._writer, self._reader):
            if transport is not None:
                transport.close()
        if self._board is not None:
            self._board.close()
            self._board = None
        return lost


async def _exit_status(proc: subprocess.Popen, within: float) -> int | None:
    """`proc`'s exit status once it exits, polled without blocking the event loop; None if it is still running after `within` s."""
    give_up = time.monotonic() + within
    while (code := proc.poll()) is None and time.monotonic() < give_up:
        await asyncio.sleep(_REAP_POLL_S)
    return code
