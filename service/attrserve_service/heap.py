"""The front end's heap after a surge: HeapKeeper hands the memory a flood of requests left free back to the kernel.

A flood grows the front's glibc heap by up to gigabytes: the calls gRPC holds with their messages, the requests the front
holds for the engine process, the answers on their way out. When it is over that memory is free but stays mapped: it
lies in the middle of the heap's arenas, where glibc's trim threshold (`launch.FRONT_TRIM_THRESHOLD`, which acts on an
arena's top) does not reach. A pod's memory limit counts it against the engine process. 3 s after `bench/flood.py`'s
floods and overloads the front's RSS was 339–934 MiB without the keeper, 107–196 MiB with it (bench/RESULTS.md, issue
12 step 43).

Runs in `attrserve serve`'s front end when its malloc is glibc with the front's thresholds (`launch.tune_front_malloc`)
and the engine runs in its own process: with `--no-engine-process` the heap holds the passes' tensors too, whose pages
the next pass would fault in again. Imports neither torch nor grpc.
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
    `of_this_process` gives the process's own `measure` and `trim`; tests give others, and a `clock`."""

    def __init__(
        self,
        measure: Callable[[], Heap],
        trim: Callable[[], object],
        threshold: int = FRONT_TRIM_THRESHOLD,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.measure, self.trim, self.threshold, self.clock = measure, trim, threshold, clock
        self.base = measure().idle
        self.wait = PERIOD
        self.next_at = 0.0
        self.peak_in_use = 0

    @classmethod
    def of_this_process(cls) -> HeapKeeper | None:
        """A keeper of this process's glibc heap; None where the C library is not glibc 2.33 or later."""
        libc = _libc()
        if libc is None:
            return None
        page = os.sysconf("SC_PAGE_SIZE")

        def measure() -> Heap:
            with open("/proc/self/statm", "rb") as f:
                rss = int(f.read().split()[1]) * page
            info = libc.mallinfo2()
            return Heap(rss, info.uordblks + info.hblkhd)

        return cls(measure, lambda: libc.malloc_trim(0))

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
            log.log(
                logging.INFO if before.rss - after.rss >= 1 << 20 else logging.DEBUG,
                "handed %d MiB of free heap back to the kernel in %.0f ms (RSS %d → %d MiB)",
                max(0, before.rss - after.rss) >> 20,
                (time.perf_counter() - start) * 1e3,
                before.rss >> 20,
                after.rss >> 20,
            )
