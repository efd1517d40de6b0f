"""What a surge leaves free goes back to the kernel: the front end's heap (HeapKeeper) and the engine process's
(IdleKeeper).

A flood grows the front's glibc heap by up to gigabytes: the calls gRPC holds with their messages, the requests the front
holds for the engine process, the answers on their way out. When it is over that memory is free but stays mapped: it
lies in the middle of the heap's arenas, where glibc's trim threshold (`launch.FRONT_TRIM_THRESHOLD`, which acts on an
arena's top) does not reach. A pod's memory limit counts it against the engine process. 3 s after `bench/flood.py`'s
floods and overloads the front's RSS was 339–934 MiB without the keeper, 107–196 MiB with it (bench/RESULTS.md, issue
12 step 43). HeapKeeper runs in `attrserve serve`'s front end when its malloc is glibc with the front's thresholds
(`launch.tune_front_malloc`) and the engine runs in its own process: with `--no-engine-process` the heap holds the
passes' tensors too, whose pages the next pass would fault in again.

The engine process's tcmalloc keeps what a flood's queued requests and passes freed, 0.5–1.0 GiB over its start after
bench/flood.py's rounds, until the next flood reuses it. IdleKeeper hands it back once the engine has had no request
for IDLE_SECONDS (step 44). Imports neither torch nor grpc.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import time
from collections.abc import Callable
from typing import NamedTuple

from attrserve_service.launch import FRONT_TRIM_THRESHOLD

log = logging.getLogger(__name__)

PERIOD = 1.0  # seconds between looks at the heap
LONGEST_WAIT = 64.0  # seconds: the most a keeper waits between trims while the free memory stays


class Heap(NamedTuple):
    """What the process maps (its RSS) and what of its malloc heap is in use, in bytes."""

    rss: int
    in_use: int

    @property
    def idle(self) -> int:
        """Resident but not in glibc's use: the interpreter, the libraries, Python's own arenas, and the free heap."""
        return self.rss - self.in_use


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    ]


def _libc() -> ctypes.CDLL | None:
    """glibc with mallinfo2 (2.33 and later), else None."""
    with contextlib.suppress(OSError):
        libc = ctypes.CDLL("libc.so.6")
        if hasattr(libc, "mallinfo2") and hasattr(libc, "malloc_trim"):
            libc.mallinfo2.restype = _MallInfo2
            return libc
    return None


class HeapKeeper:
    """Once a second: the process's resident memory that its heap does not use (Heap.idle), against that at the start.
    Past `threshold` more, it trims the heap (malloc_trim, on a thread: tens of milliseconds after a flood) and waits
    before the next trim, twice as long each time (1, 2, 4 … LONGEST_WAIT seconds), so a steady load whose heap keeps
    that much free settles at one trim a minute; the wait starts again at a second once the excess is gone. A fall of
    the heap's use by `threshold` from its peak since the last trim (a surge ended) trims at once, whatever the wait, if
    an eighth of `threshold` is free.
    `of_this_process` gives the process's own `measure` and `trim`; tests give others, and a `clock`. `released` hears
    the bytes of resident memory each trim handed back (metrics.heap_released)."""

    def __init__(
        self,
        measure: Callable[[], Heap],
        trim: Callable[[], object],
        threshold: int = FRONT_TRIM_THRESHOLD,
        clock: Callable[[], float] = time.monotonic,
        released: Callable[[int], object] = lambda released: None,
    ) -> None:
        self.measure, self.trim, self.threshold, self.clock, self.released = measure, trim, threshold, clock, released
        self.base = measure().idle
        self.wait = PERIOD
        self.next_at = 0.0
        self.peak_in_use = 0

    @classmethod
    def of_this_process(cls, released: Callable[[int], object] = lambda released: None) -> HeapKeeper | None:
        """A keeper of this process's glibc heap; None where the C library is not glibc 2.33 or later."""
        libc = _libc()
        if libc is None:
            return None

        def measure() -> Heap:
            info = libc.mallinfo2()
            return Heap(_rss(), info.uordblks + info.hblkhd)

        return cls(measure, lambda: libc.malloc_trim(0), released=released)

    def due(self, now: Heap) -> bool:
        """Whether to trim now, given the heap as it is."""
        self.peak_in_use = max(self.peak_in_use, now.in_use)
        excess = now.idle - self.base
        if self.peak_in_use - now.in_use >= self.threshold and excess > self.threshold // 8:
            return True  # a surge ended: what it left is free, and no steady load takes it again soon
        if excess <= self.threshold:
            self.wait = PERIOD
            return False
        return self.clock() >= self.next_at

    def trimmed(self, after: Heap) -> None:
        """After a trim: the next waits; the peak of use starts again from now."""
        self.next_at = self.clock() + self.wait
        self.wait = min(2 * self.wait, LONGEST_WAIT)
        self.peak_in_use = after.in_use

    async def run(self) -> None:
        """Look every PERIOD seconds until cancelled; a heap it cannot read (OSError) ends it, logged."""
        while True:
            await asyncio.sleep(PERIOD)
            try:
                before = self.measure()
                if not self.due(before):
                    continue
                start = time.perf_counter()
                await asyncio.to_thread(self.trim)
                after = self.measure()
            except OSError as e:
                log.warning("the front end's heap is no longer watched: %s", e)
                return
            self.trimmed(after)
            freed = max(0, before.rss - after.rss)
            self.released(freed)
            log.log(
                logging.INFO if freed >= 1 << 20 else logging.DEBUG,
                "handed %d MiB of free heap back to the kernel in %.0f ms (RSS %d → %d MiB)",
                freed >> 20,
                (time.perf_counter() - start) * 1e3,
                before.rss >> 20,
                after.rss >> 20,
            )


IDLE_SECONDS = 10.0  # how long the engine process has had no request before its free heap goes back
IDLE_THRESHOLD = 128 << 20  # bytes: a free heap smaller than this stays


class IdleKeeper:
    """The engine process's heap after a surge: once no request has been in the engine for IDLE_SECONDS, its malloc's
    free memory goes back to the kernel, when it is `threshold` or more (bench/flood.py: 450-1,000 MiB 10 s after
    each round, the engine process back at its start's RSS; bench/RESULTS.md, issue 12 step 44).

    Only when idle: under load, what the passes will take again cannot be told from what a surge left. Each pass takes
    and frees hundreds of MiB within milliseconds, between two looks. Handing back what stayed free over every look of
    the last 10 s (ten a second) was tried: W2 and W4 took it back within 0.15-5 s, and their heaps then grew 60-110 MiB
    past where they had been. Once idle, the first requests fault in their passes' memory again (tens of
    milliseconds for hundreds of MiB); a free heap under `threshold` is not worth that.

    Looks once a second; `free` gives the malloc's free bytes, `release` hands them back (`engine.release_free_memory`),
    `busy` says whether a request is in the engine, `released` hears the bytes of resident memory each release handed
    back (the front's metrics.heap_released). One release per idle spell."""

    def __init__(
        self,
        free: Callable[[], int],
        release: Callable[[], object],
        busy: Callable[[], bool],
        threshold: int = IDLE_THRESHOLD,
        quiet: float = IDLE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        released: Callable[[int], object] = lambda released: None,
    ) -> None:
        self.free, self.release, self.busy, self.threshold, self.quiet, self.clock = free, release, busy, threshold, quiet, clock
        self.released = released
        self.idle_since: float | None = None
        self.spent = False  # released in this idle spell

    def due(self) -> bool:
        """Whether to hand the free heap back now."""
        if self.busy():
            self.idle_since, self.spent = None, False
            return False
        now = self.clock()
        if self.idle_since is None:
            self.idle_since = now
        return not self.spent and now - self.idle_since >= self.quiet and self.free() >= self.threshold

    async def run(self) -> None:
        """Look every PERIOD seconds until cancelled; a heap it cannot read (OSError) ends it, logged."""
        while True:
            await asyncio.sleep(PERIOD)
            try:
                if not self.due():
                    continue
                before, start = _rss(), time.perf_counter()
                await asyncio.to_thread(self.release)
                after = _rss()
            except OSError as e:
                log.warning("the engine process's heap is no longer watched: %s", e)
                return
            self.spent = True
            freed = max(0, before - after)
            self.released(freed)
            log.info(
                "idle for %.0f s: released %d MiB of the engine process's free heap to the kernel in %.0f ms (RSS %d → %d MiB)",
                self.quiet,
                freed >> 20,
                (time.perf_counter() - start) * 1e3,
                before >> 20,
                after >> 20,
            )


def free_heap_bytes() -> Callable[[], int] | None:
    """This process's malloc's free bytes, read: tcmalloc's free page heap (gperftools), else glibc's free chunks
    (mallinfo2: near 0 under jemalloc, whose own decay hands memory back); None where neither can be read."""
    with contextlib.suppress(OSError):
        get = getattr(ctypes.CDLL(None), "MallocExtension_GetNumericProperty", None)
        if get is not None:

            def tcmalloc_free() -> int:
                value = ctypes.c_size_t()
                if not get(b"tcmalloc.pageheap_free_bytes", ctypes.byref(value)):
                    raise OSError("tcmalloc does not tell its free bytes")
                return value.value

            return tcmalloc_free
    libc = _libc()
    return None if libc is None else (lambda: libc.mallinfo2().fordblks)


def _rss() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
