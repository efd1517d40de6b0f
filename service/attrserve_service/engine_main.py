"""The engine-core process: `python -m attrserve_service.engine_main`, started by launch.py. It runs a LocalCore
(the models, the schedulers and their worker threads, the model manager) and serves the front end's frames on its
event loop; engine_process.py describes the messages and holds the front end's handle."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import threading
import uuid
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch

from attrserve_engine import AttributionJob, EngineObserver, PassStats
from attrserve_engine.engine import release_free_memory
from attrserve_engine.errors import AttributionError
from attrserve_service import eventloop, heap, logs
from attrserve_service.core import ANSWERS, ERROR_ID, settle_heap
from attrserve_service.frames import FrameReader, frame_of, send_parts
from attrserve_service.launch import EXIT_STUCK, intra_op_threads, threads_said
from attrserve_service.local_core import LocalCore, build_core
from attrserve_service.quarantine import Board
from attrserve_service.repository import CONTROL_POLL, RepositoryError

log = logging.getLogger(__name__)


def portable(error: BaseException) -> BaseException:
    """An exception the other process can unpickle: the engine's AttributionErrors as they are, and a plugin's or a
    model's own subclass of one as the engine's class it extends, with its message and every attribute that class
    sets (retry_after_s, ResourceExhausted's permanent, PassStuck's why) (the front cannot import the module that
    defines it, and would fail the whole frame); anything else is a bug, logged here with its traceback under an
    error id that travels with it (the front's INTERNAL status quotes it)."""
    if isinstance(error, AttributionError):
        if type(error).__module__ == AttributionError.__module__:
            return error
        engines = next(kind for kind in type(error).__mro__ if kind.__module__ == AttributionError.__module__)
        twin = engines(str(error))
        for name, default in vars(twin).items():
            setattr(twin, name, getattr(error, name, default))
        return twin
    error_id = getattr(error, ERROR_ID, None) or uuid.uuid4().hex[:16]
    if getattr(error, ERROR_ID, None) is None:
        log.error("internal error (id %s): %s: %s", error_id, type(error).__name__, error, exc_info=error)
    internal = RuntimeError(f"{type(error).__name__} in the engine process")
    setattr(internal, ERROR_ID, error_id)
    return internal


def _unpicklable_answer(message: tuple, error: Exception) -> tuple | None:
    """An answer the front cannot be sent becomes an error answer, so its caller does not wait forever."""
    if message[0] in ANSWERS:
        return (ANSWERS[message[0]], message[1], portable(error))
    log.error("a %r message could not be pickled; it is not sent: %s", message[0], error, exc_info=error)
    return None


class _Out:
    """The engine's side of engine → front: whole frames, from any thread (worker threads answer their jobs).

    Inside `holding()`, what a thread sends is kept and goes out as one frame when it ends."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self._held = threading.local()

    def send(self, message: tuple) -> None:
        held: list | None = getattr(self._held, "messages", None)
        if held is not None:
            held.append(message)
        else:
            self._write([message])

    def event(self, method: str, *args: Any) -> None:
        """An engine observer's call, for the front to replay on its observers (its metrics)."""
        self.send(("event", method, args))

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        if getattr(self._held, "messages", None) is not None:  # nested: the outermost sends
            yield
            return
        held: list[tuple] = []
        self._held.messages = held
        try:
            yield
        finally:
            self._held.messages = None
            if held:
                self._write(held)

    def _write(self, messages: list[tuple]) -> None:
        parts = frame_of(messages, _unpicklable_answer, to_front=True)
        if not parts:
            return
        with self.lock, contextlib.suppress(OSError):  # the front is gone: the reading side sees the end and exits
            send_parts(self.sock, parts)


class _Forward(EngineObserver):
    """Every engine event goes to the front (its metrics), a fresh snapshot first when a state changed; what each
    worker computes goes on the board, for the front to read should this process die (quarantine.Board)."""

    def __init__(self, out: _Out, core: LocalCore, board: Board | None, keys: dict[concurrent.futures.Future, int]) -> None:
        self.out = out
        self.core = core
        self.board = board
        self.keys = keys  # the front's key of each request this process holds, by its future (_Engine's)

    def worker_running(self, device: str, worker: int, callers: tuple[Any, ...]) -> None:
        if self.board is not None:
            found = map(self.keys.get, callers)  # (one lookup each: the event loop removes answered ones meanwhile)
            self.board.running((device, worker), [key for key in found if key is not None])  # (warm-ups have none)

    def _changed(self) -> None:
        self.out.send(("snapshot", self.core.snapshot()))

    def worker_step(self) -> contextlib.AbstractContextManager[None]:
        return self.out.holding()

    def pass_executed(self, stats: PassStats) -> None:
        self.out.event("pass_executed", stats)

    def request_refused(self, model: str, reason: str) -> None:
        self.out.event("request_refused", model, reason)

    def request_dropped(self, model: str, reason: str, rows: int) -> None:
        self.out.event("request_dropped", model, reason, rows)

    def pass_split(self, model: str, reason: str) -> None:
        self.out.event("pass_split", model, reason)

    def model_load_failed(self, model: str, error: BaseException) -> None:
        self.out.event("model_load_failed", model, RuntimeError(f"{type(error).__name__}: {error}"))

    def worker_state(self, device: str, serving: bool, reason: str) -> None:
        self._changed()
        self.out.event("worker_state", device, serving, reason)

    def worker_stuck(self, device: str, reason: str) -> None:
        """The pass cannot be stopped, and until it returns the model may hold its hooks: this process ends and the
        front starts another. The device's requests have had their answers (the scheduler failed them first); the
        front fails what else this process held with UNAVAILABLE, naming the exit code."""
        self.out.event("worker_stuck", device, reason)
        log.error("the engine process exits (code %d), and the front starts another: %s", EXIT_STUCK, reason)
        sys.stderr.flush()
        os._exit(EXIT_STUCK)

    def model_loaded(self, model: str, seconds: float) -> None:
        self._changed()
        self.out.event("model_loaded", model, seconds)

    def model_state_changed(self, model: str, version: str) -> None:
        self._changed()
        self.out.event("model_state_changed", model, version)

    def load_running(self, model: str, version: str, running: bool) -> None:
        self.out.event("load_running", model, version, running)


def _alive(out: _Out, message: tuple) -> bool:
    """Answer the front's heartbeat (EngineProcess._heartbeat), from this process's event loop: before the models are
    loaded too, so that a load holding the event loop (a model's code stuck with the GIL held) is noticed."""
    if message[0] == "call" and message[2] == "alive":
        out.send(("reply", message[1], None))
        return True
    return False


class _Engine:
    """Serves the front's messages from the engine process's event loop."""

    CALLS = ("model_infos", "model_info", "index", "load", "unload", "gauges", "shutdown")

    def __init__(self, core: LocalCore, out: _Out, keys: dict[concurrent.futures.Future, int]) -> None:
        self.core = core
        self.out = out
        self.futures: dict[int, concurrent.futures.Future] = {}
        self.keys = keys  # the other way round (_Forward's)
        self.stopped = asyncio.Event()
        self.tasks: set[asyncio.Task] = set()

    def handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "submit":
            self.submit(message[1], message[2])
        elif kind == "cancel":
            self.cancel(message[1])
        elif kind == "call" and not _alive(self.out, message):
            task = asyncio.ensure_future(self.call(message[1], message[2], message[3]))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def submit(self, key: int, job: AttributionJob) -> None:
        try:
            future = self.core.submit(job)
        except BaseException as e:
            self.out.send(("error", key, portable(e)))
            return
        self.futures[key] = future
        self.keys[future] = key
        future.add_done_callback(partial(self._done, key))

    def _done(self, key: int, future: concurrent.futures.Future) -> None:
        self.futures.pop(key, None)
        self.keys.pop(future, None)
        if future.cancelled():
            return  # the front cancelled it: nobody waits for an answer
        error = future.exception()
        self.out.send(("result", key, future.result()) if error is None else ("error", key, portable(error)))

    def cancel(self, key: int) -> None:
        future = self.futures.pop(key, None)
        if future is not None:
            future.cancel()

    async def call(self, key: int, method: str, args: tuple) -> None:
        try:
            if method not in self.CALLS:
                raise ValueError(f"no call {method!r}")
            value = getattr(self.core, method)(*args)
            if asyncio.iscoroutine(value):
                value = await value
            self.out.send(("reply", key, value))
        except BaseException as e:
            self.out.send(("reply_error", key, portable(e)))
        if method == "shutdown":
            self.stopped.set()


async def _engine_main(fd_in: int, fd_out: int, fd_board: int) -> int:
    loop = asyncio.get_running_loop()
    board = Board(fd_board) if fd_board >= 0 else None
    keys: dict[concurrent.futures.Future, int] = {}
    out = _Out(socket.socket(fileno=fd_out))
    out.sock.setblocking(True)
    init: asyncio.Future = loop.create_future()
    gone = asyncio.Event()
    engine: _Engine | None = None

    def received(message: Any) -> None:
        if engine is not None:
            engine.handle(message)
        elif not init.done():
            init.set_result(message)
        else:
            _alive(out, message)  # loading: nothing else is asked before "ready"

    reader = partial(FrameReader, received, gone.set, tensors=True)
    transport, _ = await loop.create_unix_connection(reader, sock=socket.socket(fileno=fd_in))
    _, config, (log_level, log_format), only, probes, skip = await init
    out.send(("started",))  # the front's heartbeat asks from now on: no model's code has run yet
    logs.configure(log_level, log_format)
    torch.set_num_threads(intra_op_threads(config))
    log.info("%s", threads_said(torch.get_num_threads()))
    building = asyncio.ensure_future(build_core(config, lambda core: [_Forward(out, core, board, keys)], only, probes, skip))
    await asyncio.wait([building, asyncio.ensure_future(gone.wait())], return_when=asyncio.FIRST_COMPLETED)
    if not building.done():
        # The front died or gave up on this process while it loaded (a load stuck in a model's code, say). Exit now:
        # an orphan would hold its memory, and the front's stdout, until its loads return. asyncio.run would wait for
        # the loading threads; they are abandoned.
        log.info("the front end is gone while the models load; the engine process stops")
        sys.stderr.flush()
        os._exit(0)
    try:
        core = building.result()
    except RepositoryError as e:
        out.send(("fatal", str(e)))
        return 2
    settle_heap()
    out.send(("ready", core.snapshot()))
    engine = _Engine(core, out, keys)
    free = heap.free_heap_bytes()
    if free is not None:  # what a flood left free goes back once the engine is idle (heap.IdleKeeper)
        in_flight = engine.futures
        keeper = heap.IdleKeeper(
            free,
            release_free_memory,
            busy=lambda: bool(in_flight),
            released=partial(out.event, "heap_released", "engine"),  # the front's metrics
        )
        engine.tasks.add(asyncio.ensure_future(keeper.run()))
    if config.model_control == CONTROL_POLL:
        engine.tasks.add(asyncio.ensure_future(core.poll_forever(config.repository_poll_seconds)))
    ends = [asyncio.ensure_future(gone.wait()), asyncio.ensure_future(engine.stopped.wait())]
    await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
    if not engine.stopped.is_set():
        log.info("the front end is gone; the engine process stops")
        core.engine.shutdown(drain=False, timeout=1.0)
    transport.close()
    return 0


_PR_SET_PDEATHSIG = 1  # prctl(2)


def _die_with_the_front() -> None:
    """Have the kernel kill this process (SIGKILL) when the front end that started it ends, however it ends. This
    process also exits when the front's socket closes, but only while its event loop runs: one held by a model's code
    stuck with the GIL (a load, a pass) outlived a front that was killed, holding its memory and the front's output
    pipe. (Linux; elsewhere the socket is all.)"""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def main(argv: list[str]) -> int:
    _die_with_the_front()
    # The front end owns the signals: SIGTERM drains the engine through it, and a terminal's Ctrl-C (sent to the
    # whole process group) must not kill the engine under a drain.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    code = eventloop.run(partial(_engine_main, int(argv[0]), int(argv[1]), int(argv[2])), argv[3])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # worker and executor threads are done or abandoned: do not wait for them


if __name__ == "__main__":
    # Run from the module under its own name, so what this process pickles names attrserve_service.engine_main.
    from attrserve_service import engine_main

    engine_main.main(sys.argv[1:])
