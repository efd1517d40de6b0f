"""bench/prototypes/hops.py's marks inside `attrserve serve`: loaded by Python at start-up (this folder leads PYTHONPATH),
it does nothing unless ATTRSERVE_HOPS_DIR is set. Then, in the front end and in the engine-core process, it wraps the
functions a request passes through and appends (mark, CLOCK_MONOTONIC ns) to ATTRSERVE_HOPS_DIR/marks-<role>.txt every
0.2 s. The engine process ends with os._exit (no atexit), hence the periodic writes. A wrapped function that no longer
exists raises here; Python reports the error and starts the process without marks, and hops.py stops with "no marks":
the tool must follow the code, not measure something else."""

from __future__ import annotations

import collections
import inspect
import os
import sys
import threading
import time

_DIR = os.environ.get("ATTRSERVE_HOPS_DIR")
_ARGV = " ".join(getattr(sys, "orig_argv", sys.argv))
_ROLE = "engine" if "attrserve_service.engine_main" in _ARGV else "front" if "attrserve_service.cli" in _ARGV else None


def _install(marks: collections.deque) -> None:
    now = time.monotonic_ns

    def wrap(owner, name, before=None, after=None, when=None):  # type: ignore[no-untyped-def]
        inner = getattr(owner, name)  # AttributeError: the code moved; update the marks
        if inspect.iscoroutinefunction(inner):

            async def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
                if before:
                    marks.append((before, now()))
                value = await inner(*args, **kwargs)
                if after:
                    marks.append((after, now()))
                return value

        else:

            def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
                hit = when is None or when(*args, **kwargs)
                if before and hit:
                    marks.append((before, now()))
                value = inner(*args, **kwargs)
                if after and hit:
                    marks.append((after, now()))
                return value

        setattr(owner, name, wrapped)

    if _ROLE == "front":
        from attrserve_service import engine_process, frames, servicer

        wrap(servicer.AttributionServicer, "_attribute", "front: handler starts", "front: handler returns")
        wrap(servicer, "request_to_job", None, "front: request decoded")
        wrap(engine_process.EngineProcess, "_flush", "front: next loop turn, frame out", None)
        # marked once encoded, before the write: the reader may run before a write's system call returns
        wrap(engine_process, "frame_of", None, "front: frame encoded")
        wrap(frames.FrameReader, "buffer_updated", "front: answer frame read", None)
        wrap(engine_process.EngineProcess, "_received", "front: answer decoded", None, when=lambda self, g, m: m[0] == "result")
    else:
        from attrserve_engine import executor, scheduler
        from attrserve_service import engine_main, frames

        wrap(frames.FrameReader, "buffer_updated", "engine: frame read", None)
        wrap(engine_main._Engine, "handle", "engine: request decoded", "engine: validated, queued", when=lambda self, m: m[0] == "submit")
        wrap(scheduler.Scheduler, "_merged", "worker: takes the arrival", None, when=lambda self, arrivals: bool(arrivals))
        wrap(executor, "_fused_pass", "worker: pass starts", "worker: pass ends")
        wrap(engine_main, "frame_of", None, "worker: answer frame encoded")


def _flush_forever(marks: collections.deque, path: str) -> None:
    while True:
        time.sleep(0.2)
        taken = [marks.popleft() for _ in range(len(marks))]  # deque appends and pops are atomic: none is lost
        if taken:
            with open(path, "a") as f:
                f.writelines(f"{t} {m}\n" for m, t in taken)


if _DIR and _ROLE:
    _MARKS: collections.deque = collections.deque()
    _install(_MARKS)
    threading.Thread(target=_flush_forever, args=(_MARKS, os.path.join(_DIR, f"marks-{_ROLE}.txt")), daemon=True).start()
