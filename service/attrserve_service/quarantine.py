"""Queries of death: a request that kills the engine process whenever it runs (a model's code that segfaults, calls
os._exit, or never returns on some input) is found and refused, so that its retries cannot take the engine process,
and every request in flight with it, down again and again.

Without this, a client that retries UNAVAILABLE (the Python client does, five attempts by default; a balanced client
retries on the next server) sends the request again as soon as a new engine process serves, and it kills that one
too: each death fails every request the engine process held, and health says NOT_SERVING until the next restart.

What the front end (EngineProcess) does with this table:
- An engine process dies. Every request that was in flight to it fails with UNAVAILABLE, as before. Those whose rows
  were in a pass that was running then (the Board says which) become *suspects*: their fingerprints (what each asks
  the engine to compute, not its request id or deadline) are kept. Where the board cannot say (no pass was running:
  the death came from elsewhere, or a pass held more requests than a slot holds), every request in flight is one.
  The requests of a pass given up as stuck are answered with PassStuck before the engine process exits: suspects too.
- A suspect sent again runs alone: the front stops sending other requests, waits until none is in flight (at most
  30 s), sends the suspect, and sends the others once it is answered. A death then can only be the suspect's doing, and took nothing
  else with it: the suspect is *quarantined* and its caller gets FAILED_PRECONDITION, which clients do not retry. A
  suspect that is answered (with attributions or with any error) is cleared. Except a SIGKILL that neither the front
  nor the kernel's OOM killer sent (an operator's): the request's code cannot have done that unless it kills its own
  process, so it stays a suspect, and only a second such kill during its runs alone quarantines it (`strike`).
- A quarantined request, and every identical one, is refused with FAILED_PRECONDITION before it reaches the engine,
  for `quarantine_seconds`.

So one query of death costs at most two engine restarts (three for one that SIGKILLs its own process), and only the
first takes other requests with it. Suspects and quarantined fingerprints expire after `quarantine_seconds`; each
table holds at most CAPACITY, the oldest dropped first. Nothing here runs on the request path while both tables are
empty (EngineProcess checks `watching`).

Imports neither torch nor grpc (the front end's)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import mmap
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from attrserve_engine.errors import FailedPrecondition
from attrserve_service.frames import encode_parts

# What a suspect's run alone came to (attrserve_suspect_probes_total's outcome label).
PROBE_SERVED = "served"
PROBE_QUARANTINED = "quarantined"
PROBE_OUTCOMES = (PROBE_SERVED, PROBE_QUARANTINED)
# Fingerprints each table keeps at most; beyond it the oldest is forgotten (a suspect: it runs with the others again;
# quarantined: it may kill the engine process again, once).
CAPACITY = 4096


def fingerprint(job: Any) -> bytes:
    """What identifies a request across its retries: everything the engine computes from (model, version, algorithm,
    inputs' bytes, dtypes and shapes, baselines, target, parameters, seed, ...), not its request id, deadline, arrival
    or priority, which a retry may change."""
    same = dataclasses.replace(job, request_id="", deadline=None, arrival=0.0, priority="interactive")
    digest = hashlib.blake2b(digest_size=16)
    for part in encode_parts(same):
        digest.update(part)
    return digest.digest()


@dataclasses.dataclass
class _Entry:
    expires: float
    why: str = ""
    strikes: int = 0  # a suspect's runs alone that ended in a kill from outside (strike)


class Quarantine:
    """The suspects and the quarantined fingerprints of one front end (module docstring). `seconds` 0: off."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self._suspects: OrderedDict[bytes, _Entry] = OrderedDict()
        self._quarantined: OrderedDict[bytes, _Entry] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.seconds > 0

    @property
    def watching(self) -> bool:
        """Whether a request must be fingerprinted: some suspect or quarantined fingerprint is live. One truth test
        while both tables are empty, as they are unless an engine process died in the last `seconds`."""
        if not (self._suspects or self._quarantined):
            return False
        self._expire(self._suspects)
        self._expire(self._quarantined)
        return bool(self._suspects or self._quarantined)

    def suspect(self, key: bytes) -> None:
        """`key` was in flight when the engine process died (a suspect already keeps its strikes)."""
        if self.enabled:
            known = self._live(self._suspects, key)
            self._put(self._suspects, key, _Entry(self._clock() + self.seconds, strikes=known.strikes if known else 0))

    def suspected(self, key: bytes) -> bool:
        return self._live(self._suspects, key) is not None

    def clear(self, key: bytes) -> None:
        """`key` ran alone and the engine process lived: it is not a query of death."""
        self._suspects.pop(key, None)

    def strike(self, key: bytes) -> int:
        """`key` ran alone and the engine process was killed from outside (SIGKILL, by no OOM kill): how many times now.
        It stays a suspect (EngineProcess._probe quarantines it at the second)."""
        entry = self._live(self._suspects, key)
        if entry is None:
            return 0
        entry.strikes += 1
        return entry.strikes

    def quarantine(self, key: bytes, why: str) -> None:
        """`key` ran alone and the engine process died (`why`): refuse it from now on."""
        self._suspects.pop(key, None)
        self._put(self._quarantined, key, _Entry(self._clock() + self.seconds, why))

    def refusal(self, key: bytes, model: str, algorithm: str) -> FailedPrecondition | None:
        """The error for a quarantined `key` (None: it is not)."""
        entry = self._live(self._quarantined, key)
        if entry is None:
            return None
        left = max(0.0, entry.expires - self._clock())
        return FailedPrecondition(
            f"this request (model {model!r}, algorithm {algorithm!r}) is quarantined as a query of death: the engine "
            f"process died while it ran alone ({entry.why}), after it had been computing when it died before. It and "
            f"every identical request are refused for {left:.0f} s more (--quarantine-seconds); the model's code "
            "cannot serve this input, and retrying will not help"
        )

    def _put(self, table: OrderedDict[bytes, _Entry], key: bytes, entry: _Entry) -> None:
        table.pop(key, None)
        table[key] = entry
        self._expire(table)
        while len(table) > CAPACITY:
            table.popitem(last=False)

    def _live(self, table: OrderedDict[bytes, _Entry], key: bytes) -> _Entry | None:
        self._expire(table)
        return table.get(key)

    def _expire(self, table: OrderedDict[bytes, _Entry]) -> None:
        """Drop the expired entries (oldest first: each table is in the order its entries expire, as they all live
        `seconds`)."""
        now = self._clock()
        while table:
            key, entry = next(iter(table.items()))
            if entry.expires > now:
                return
            del table[key]


class Board:
    """What each worker thread of an engine process is running, in memory both processes map (a memfd the front
    creates and the engine process inherits): per worker, the front's keys of the requests whose rows are in its
    pass, written before the pass starts and cleared when it returns. The front reads it after the process died, so a
    crash, an os._exit, a kill or a stuck pass names the requests that were computing, not every request queued.

    The board is int64s: first the number of workers that found no slot (then it cannot say who ran what), then SLOTS
    slots of SLOT_WORDS: the count of keys (0: no pass; -1: more requests than fit, unknown), then the keys. The keys
    are written before the count, so a death between the two reads as the pass not started (no model code of it has
    run)."""

    SLOTS = 64
    SLOT_WORDS = 1024  # a count and up to 1,023 keys: 8 KiB a slot, 512 KiB a board
    UNKNOWN = -1
    BYTES = 8 * (1 + SLOTS * SLOT_WORDS)

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._map = mmap.mmap(fd, self.BYTES)
        self._words = np.frombuffer(self._map, dtype=np.int64)
        self._slots: dict[Any, int] = {}  # the engine's: a worker's slot, by (device, worker index)
        self._lock = threading.Lock()

    @classmethod
    def create(cls) -> Board | None:
        """A new board, zeroed, for an engine process about to start (None where memfd_create is missing)."""
        if not hasattr(os, "memfd_create"):
            return None
        fd = os.memfd_create("attrserve-board")  # launch hands it to the engine process (pass_fds)
        os.ftruncate(fd, cls.BYTES)
        return cls(fd)

    def running(self, worker: Any, keys: Iterable[int]) -> None:
        """The engine's: `worker` starts a pass holding the requests `keys` (empty: its pass returned)."""
        slot = self._slots.get(worker)
        if slot is None:
            with self._lock:
                slot = self._slots.setdefault(worker, len(self._slots))
        if slot >= self.SLOTS:  # more workers than slots: the board cannot say who ran what
            self._words[0] += 1
            return
        at = 1 + slot * self.SLOT_WORDS
        keys = list(keys)
        if len(keys) >= self.SLOT_WORDS:
            self._words[at] = self.UNKNOWN
            return
        self._words[at + 1 : at + 1 + len(keys)] = keys
        self._words[at] = len(keys)

    def computing(self) -> frozenset[int] | None:
        """The front's, after the engine process died: the keys of the requests in the passes that were running, or
        None where the board cannot say (no pass was running, or a slot overflowed)."""
        words = self._words[1:].reshape(self.SLOTS, self.SLOT_WORDS)
        counts = words[:, 0]
        if self._words[0] or (counts < 0).any() or not counts.any():
            return None
        return frozenset(int(key) for row, count in zip(words, counts) for key in row[1 : 1 + count])

    def close(self) -> None:
        del self._words
        with contextlib.suppress(BufferError):
            self._map.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)
