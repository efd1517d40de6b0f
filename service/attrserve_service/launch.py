"""Starting an engine-core process (engine_main.main): its command line, its environment (torch's intra-op threads,
the malloc it runs on), its two socket pairs and its first frame, ("init", config, log settings, versions, probes,
versions skipped).

Imports neither torch nor grpc. `attrserve serve` builds its configuration and starts the engine process (`start`)
before the front end imports grpc, so the engine imports torch (seconds on a small machine) and loads its models while
the front builds its server; EngineProcess.start takes the running process over (docs/ARCHITECTURE.md, "Start-up").
The front end never imports torch. EngineProcess starts every later one (a restart) here too.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import math
import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from attrserve_engine.limits import cpu_limit
from attrserve_service import eventloop
from attrserve_service.config import ConfigError, ServerConfig
from attrserve_service.frames import encode_parts, send_parts, socketpair
from attrserve_service.quarantine import Board

# The malloc libraries known by name in a memory map (local_core.heap_allocator) or an LD_PRELOAD (allocator_preload).
MALLOCS = ("tcmalloc", "jemalloc")
# The engine process's exit code when it gave up a pass stuck in a model's code (Scheduler.give_up_stuck_pass): its
# worker thread cannot be stopped, so the process ends and the front starts another.
EXIT_STUCK = 75  # EX_TEMPFAIL


def _preloaded(environ: Mapping[str, str]) -> list[str]:
    """The libraries of the environment's LD_PRELOAD (space- or colon-separated)."""
    return environ.get("LD_PRELOAD", "").replace(":", " ").split()


def _malloc_of(library: str) -> str | None:
    """Which of MALLOCS the preloaded `library` is, if any."""
    return next((name for name in MALLOCS if f"lib{name}" in os.path.basename(library)), None)


@dataclass
class Launched:
    """An engine process that has been sent its "init" frame, and the front's ends of its sockets, not yet on an event
    loop. EngineProcess takes it over (`taken`); `close` ends one that nothing took (start-up failed before)."""

    proc: subprocess.Popen
    to_engine: socket.socket
    from_engine: socket.socket
    preload: str | None  # its LD_PRELOAD: allocator_preload's answer
    event_loop: str  # its event loop: eventloop.resolve's answer
    board: Board | None = None  # what its workers are computing (quarantine.Board; None where there is no memfd)
    taken: bool = False

    def close(self) -> None:
        if self.taken:
            return
        self.taken = True
        for end in (self.to_engine, self.from_engine):
            end.close()
        if self.board is not None:
            self.board.close()
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


def start(config: ServerConfig, log_settings: tuple[str, str]) -> Launched:
    """The first engine process of a server: its malloc and event loop resolved from `config` (ConfigError when one
    cannot be had), then `launch`."""
    return launch(config, log_settings, allocator_preload(config, os.environ), eventloop.resolve(config.event_loop))


def launch(
    config: ServerConfig,
    log_settings: tuple[str, str],
    preload: str | None,
    event_loop: str,
    restore: set[tuple[str, str]] | None = None,
    probes: Mapping[tuple, dict[int, float]] | None = None,  # engine.Probes, which would import torch here
    skip: Mapping[tuple[str, str], str] | None = None,
) -> Launched:
    """Start `python -m attrserve_service.engine_main` on two new socket pairs and write its "init" frame, which
    waits in the socket until the process has imported its modules and reads it; `restore`: the versions to load
    (None: the whole repository); `probes`: the load-time probes (pass-size rates) the process before kept
    (Engine.probes), which its loads of the same files take instead of timing passes again; `skip`: versions it does
    not load, with why (ModelManager.load_all)."""
    to_engine, engine_in = socketpair()
    engine_out, from_engine = socketpair()
    env = dict(os.environ, OMP_NUM_THREADS=str(intra_op_threads(config)))
    if preload:
        env["LD_PRELOAD"] = preload
        # tcmalloc reports every allocation over 1 GiB on stderr, outside the server's log format; the byte caps bound them.
        env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 62))
    elif preload == "":
        env.pop("LD_PRELOAD", None)
    board = Board.create()
    fds = (engine_in.fileno(), engine_out.fileno(), -1 if board is None else board.fd)
    try:
        init = ("init", config, log_settings, restore, dict(probes or {}), dict(skip or {}))
        send_parts(to_engine, encode_parts([init]))  # KiB: the socket holds it
        proc = subprocess.Popen(
            [sys.executable, "-m", "attrserve_service.engine_main", *map(str, fds), event_loop],
            pass_fds=[fd for fd in fds if fd >= 0],
            env=env,
        )
    except BaseException:
        for end in (to_engine, from_engine):
            end.close()
        if board is not None:
            board.close()
        raise
    finally:
        engine_in.close()
        engine_out.close()
    return Launched(proc, to_engine, from_engine, preload, event_loop, board)


def intra_op_threads(config: ServerConfig) -> int:
    """The engine's torch intra-op threads: as configured, else one per core this process may use (cpu_limit, rounded
    up) less one, which the front end keeps (on 2 cores: 1, measured best for short passes; bench/RESULTS.md, issue 12
    step 2). The count is fixed for the process: a pass's numbers must not depend on its size or company, and a
    convolution's do depend on the thread count."""
    return config.engine_threads or max(1, math.ceil(cpu_limit()) - 1)


def threads_said(threads: int) -> str:
    """The log line that tells an engine's torch intra-op threads, in either layout."""
    return f"torch intra-op threads: {threads} (this process may use {cpu_limit():.3g} cores, by its CPU affinity and CPU quota)"


def in_process_threads(config: ServerConfig, torch_default: int) -> int:
    """Torch's intra-op threads for an engine in the front end's own process (--no-engine-process): as configured,
    else torch's default (its count of cores, which ignores a CPU quota) capped by cpu_limit, rounded up."""
    return config.engine_threads or max(1, min(torch_default, math.ceil(cpu_limit())))


# glibc's malloc in the front end (the process `attrserve serve` runs in): allocations under this size come from its
# heap, and the heap keeps up to this much free memory at its top. glibc's defaults (a threshold that starts at 128 KiB
# and follows what is freed, a trim threshold of twice that) hand a large payload's buffers back to the kernel when
# they are freed and fault them in again for the next request: building and serialising a 588 KiB answer cost 1.2 ms
# against 0.14 ms so on this VM (bench/RESULTS.md, issue 12 step 32). 32 MiB is the largest glibc takes.
FRONT_MMAP_THRESHOLD = 32 << 20
FRONT_TRIM_THRESHOLD = 128 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
_GLIBC_TUNABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
_front_tuned = False  # tune_front_malloc fixed the thresholds in this process


def front_heap_tuned() -> bool:
    """Whether this process's malloc is glibc with the front end's thresholds, which tune_front_malloc fixed."""
    return _front_tuned


def tune_front_malloc(environ: Mapping[str, str]) -> str:
    """Fix glibc's mmap and trim thresholds in this process (FRONT_MMAP_THRESHOLD, FRONT_TRIM_THRESHOLD), and say
    what malloc it runs on. Left alone: another malloc preloaded (tcmalloc, jemalloc: they do not hand memory back so
    eagerly), thresholds the operator set in the environment, a C library that is not glibc."""
    global _front_tuned
    preloaded = next((name for name in map(_malloc_of, _preloaded(environ)) if name), None)
    if preloaded:
        return preloaded
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):
        return "the C library's own"
    if any(name in environ for name in _GLIBC_TUNABLES):
        return "glibc, as the environment tunes it"
    if libc.mallopt(_M_MMAP_THRESHOLD, FRONT_MMAP_THRESHOLD) != 1 or libc.mallopt(_M_TRIM_THRESHOLD, FRONT_TRIM_THRESHOLD) != 1:
        return "glibc"
    _front_tuned = True
    return f"glibc, mmap threshold {FRONT_MMAP_THRESHOLD >> 20} MiB, trim threshold {FRONT_TRIM_THRESHOLD >> 20} MiB"


def allocator_preload(config: ServerConfig, environ: Mapping[str, str]) -> str | None:
    """The LD_PRELOAD the engine process starts with, for config.allocator; None: the environment's own, "": none.

    The engine's tensors are allocated with malloc. With tcmalloc, LayerIntegratedGradients over bench_text's
    transformer served 14% more requests per second and IntegratedGradients on bench_cnn 6% more, others the same
    (bench/RESULTS.md, issue 12 step 11). "auto" takes it where it is installed (Debian: libtcmalloc-minimal4,
    Ubuntu 24.04: libtcmalloc-minimal4t64; the CPU image has it), and leaves an LD_PRELOAD that the operator set
    alone. "glibc" takes tcmalloc and jemalloc out of an inherited LD_PRELOAD and keeps the rest (a profiler, say).
    "tcmalloc" must be installed and a path must be a shared library: ConfigError otherwise. A library that the
    engine process then fails to preload leaves it on glibc's malloc, which the front logs as a warning."""
    choice = config.allocator
    inherited = _preloaded(environ)
    if choice == "glibc":
        kept = [p for p in inherited if _malloc_of(p) is None]
        return None if kept == inherited else " ".join(kept)
    if choice == "auto" and inherited:
        return None
    if choice in ("auto", "tcmalloc"):
        library = ctypes.util.find_library("tcmalloc_minimal")
        if library is None:
            if choice == "auto":
                return None
            raise ConfigError("--allocator tcmalloc: libtcmalloc_minimal is not installed (Debian: libtcmalloc-minimal4)")
    elif "/" in choice:
        library = choice  # checked, not loaded: a malloc must come first in a process, not be dlopen'ed into this one
        try:
            with open(library, "rb") as f:
                elf = f.read(4) == b"\x7fELF"
        except OSError as e:
            raise ConfigError(f"--allocator {choice}: cannot be read ({e.strerror or type(e).__name__})") from None
        if not elf:
            raise ConfigError(f"--allocator {choice}: not a shared library")
    else:
        raise ConfigError(f"--allocator {choice!r}: use auto, tcmalloc, glibc or the path of a malloc library")
    return " ".join([library, *inherited])
