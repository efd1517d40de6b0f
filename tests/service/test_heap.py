"""The front end hands the heap a surge left free back to the kernel (heap.HeapKeeper): its rule on a heap the test
plays, its trim on this machine's glibc in a process of its own, and end to end on `attrserve serve`, whose front holds
a surge of large requests while its engine process is stopped, and gives the memory back once they are answered. The
engine process does too once it is idle (heap.IdleKeeper): its rule on a played engine, the engine's
release_free_memory on tcmalloc in a process of its own, and in the same end-to-end run."""

from __future__ import annotations

import asyncio
import ctypes.util
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from captum.attr import Saliency
from grpc_health.v1 import health_pb2
from servers import ServeProcess, scrape
from test_overload import Sampler, demo_model, health, rss_kib

from attrserve.v1 import attribution_service_pb2_grpc as pb_grpc
from attrserve_client import AttributionClient
from attrserve_service import launch
from attrserve_service.heap import IDLE_SECONDS, LONGEST_WAIT, PERIOD, Heap, HeapKeeper, IdleKeeper

MiB = 1 << 20
THRESHOLD = 128 * MiB


class PlayedHeap:
    """A heap the test sets: `rss` and `in_use`; a trim hands back what `returnable` says of the free memory."""

    def __init__(self) -> None:
        self.rss, self.in_use, self.now = 100 * MiB, 20 * MiB, 0.0
        self.returnable = 1.0
        self.trims: list[float] = []

    def measure(self) -> Heap:
        return Heap(self.rss, self.in_use)

    def trim(self) -> None:
        self.trims.append(self.now)
        base = 80 * MiB  # what is resident at the start and not the heap's
        self.rss -= int((self.rss - self.in_use - base) * self.returnable)

    def keeper(self) -> HeapKeeper:
        return HeapKeeper(self.measure, self.trim, THRESHOLD, clock=lambda: self.now)

    def ticks(self, keeper: HeapKeeper, seconds: float) -> None:
        """What HeapKeeper.run does every PERIOD, for `seconds`."""
        until = self.now + seconds
        while self.now < until:
            self.now += PERIOD
            if keeper.due(self.measure()):
                self.trim()
                keeper.trimmed(self.measure())


def test_a_heap_within_the_threshold_of_its_start_is_never_trimmed() -> None:
    heap = PlayedHeap()
    keeper = heap.keeper()
    heap.rss += 100 * MiB  # free memory a steady load keeps, under the threshold
    heap.ticks(keeper, 60)
    heap.in_use += 300 * MiB  # memory in use is no excess
    heap.rss += 300 * MiB
    heap.ticks(keeper, 60)
    assert heap.trims == []


def test_free_memory_past_the_threshold_is_trimmed_and_the_wait_doubles_while_it_stays() -> None:
    """What a trim cannot hand back (Python's own arenas, say) is tried again after 1, 2, 4 ... up to LONGEST_WAIT
    seconds: at most one trim a minute for a heap that stays so."""
    heap = PlayedHeap()
    keeper = heap.keeper()
    heap.rss += 200 * MiB
    heap.returnable = 0.0
    heap.ticks(keeper, 300)
    gaps = [b - a for a, b in zip(heap.trims, heap.trims[1:])]
    assert heap.trims[0] == 1.0  # at the first look
    assert gaps == [1, 2, 4, 8, 16, 32, 64, 64, 64][: len(gaps)] and len(gaps) >= 8, heap.trims
    assert max(gaps) == LONGEST_WAIT


def test_a_trim_that_hands_the_excess_back_starts_the_wait_again() -> None:
    heap = PlayedHeap()
    keeper = heap.keeper()
    for surge in range(3):  # three surges, 30 s apart: each trimmed at the first look after it
        heap.rss += 500 * MiB
        start = heap.now
        heap.ticks(keeper, 30)
        assert heap.trims[-1] == start + PERIOD and len(heap.trims) == surge + 1
        assert heap.rss == 100 * MiB  # the start's


def test_a_surge_that_ends_is_trimmed_at_once_whatever_the_wait() -> None:
    """While a surge holds its memory the trims wait longer each time; once its memory is freed (the heap's use falls
    by the threshold from its peak since the last trim) the next look trims."""
    heap = PlayedHeap()
    keeper = heap.keeper()
    heap.in_use += 600 * MiB
    heap.rss += 600 * MiB + 200 * MiB  # in use, and free beside it
    heap.returnable = 0.0  # what is free is the surge's churn, taken again at once
    heap.ticks(keeper, 20)
    trims = len(heap.trims)
    assert trims == 5 and keeper.wait == 32, heap.trims  # backing off: at 1, 2, 4, 8 and 16 s
    heap.in_use -= 600 * MiB  # the surge is answered: its memory is free now
    heap.returnable = 1.0
    heap.ticks(keeper, PERIOD)
    assert len(heap.trims) == trims + 1 and heap.trims[-1] == heap.now
    assert heap.rss == 100 * MiB


def test_what_a_surge_leaves_is_handed_back_even_under_the_threshold_but_not_a_crumb() -> None:
    heap = PlayedHeap()
    keeper = heap.keeper()
    heap.in_use += 300 * MiB
    heap.rss += 300 * MiB
    heap.ticks(keeper, 5)
    heap.in_use -= 300 * MiB  # answered: 300 MiB free now, but glibc handed 250 of them back itself (at its top)
    heap.rss -= 250 * MiB
    heap.ticks(keeper, PERIOD)
    assert heap.trims == [heap.now] and heap.rss == 100 * MiB  # the 50 MiB left: past an eighth of the threshold
    heap.in_use += 300 * MiB
    heap.rss += 300 * MiB
    heap.ticks(keeper, 5)
    heap.in_use -= 300 * MiB
    heap.rss -= 290 * MiB  # 10 MiB left
    heap.ticks(keeper, 5)
    assert len(heap.trims) == 1


# The keeper of this process's own glibc heap, in a process of its own: 400 buffers of 1 MiB made with a small one after
# each (so that nothing freed lies at the heap's top, where glibc trims by itself), the large ones freed, then looks.
REAL = textwrap.dedent(
    """
    import asyncio
    import sys

    from attrserve_service import heap, launch

    print(launch.front_heap_tuned(), launch.tune_front_malloc({}), launch.front_heap_tuned(), sep="|")
    keeper = heap.HeapKeeper.of_this_process()
    start = keeper.measure()
    large, small = [], []
    for _ in range(400):
        large.append(bytearray(1 << 20))
        small.append(bytearray(1000))  # from glibc (Python keeps only objects of up to 512 bytes)
    grown = keeper.measure()
    del large
    freed = keeper.measure()
    due = keeper.due(freed)
    keeper.trim()
    after = keeper.measure()
    print(start.rss >> 20, grown.rss >> 20, freed.rss >> 20, due, after.rss >> 20, keeper.due(after))
    """
)


def test_no_keeper_where_the_front_end_runs_another_malloc_or_the_operators_glibc_settings() -> None:
    """`serve` keeps the heap only where tune_front_malloc fixed glibc's thresholds (these calls return before)."""
    assert launch.tune_front_malloc({"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"}) == "tcmalloc"
    assert launch.tune_front_malloc({"MALLOC_TRIM_THRESHOLD_": "1"}) == "glibc, as the environment tunes it"
    assert not launch.front_heap_tuned()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_this_machines_glibc_hands_a_freed_heap_back_when_the_keeper_trims() -> None:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    said, numbers = subprocess.run([sys.executable, "-c", REAL], capture_output=True, text=True, check=True, env=env).stdout.splitlines()
    assert said == "False|glibc, mmap threshold 32 MiB, trim threshold 128 MiB|True"  # what `serve` asks before it keeps
    start, grown, freed, due, after, still_due = numbers.split()
    start, grown, freed, after = int(start), int(grown), int(freed), int(after)
    print(f"\nRSS: start {start} MiB, 400 MiB made {grown}, freed {freed}, trimmed {after}")
    assert grown - start >= 380  # the buffers are resident
    assert freed - start >= 380  # freed, and still resident: glibc keeps what is not at its top
    assert due == "True"
    assert after - start < 64 and still_due == "False"  # handed back


class PlayedEngine:
    """An engine process's heap and requests, as the test sets them: `free` bytes, `busy` or not, at `now`."""

    def __init__(self) -> None:
        self.free, self.busy, self.now = 0, False, 0.0
        self.releases: list[float] = []

    def release(self) -> None:
        self.releases.append(self.now)
        self.free = 0

    def keeper(self) -> IdleKeeper:
        return IdleKeeper(lambda: self.free, self.release, lambda: self.busy, THRESHOLD, IDLE_SECONDS, clock=lambda: self.now)

    def ticks(self, keeper: IdleKeeper, seconds: float) -> None:
        """What IdleKeeper.run does every PERIOD, for `seconds`."""
        until = self.now + seconds
        while self.now < until:
            self.now += PERIOD
            if keeper.due():
                self.release()
                keeper.spent = True


def test_the_engine_hands_its_free_heap_back_once_idle_for_the_quiet_time_once_a_spell() -> None:
    engine = PlayedEngine()
    keeper = engine.keeper()
    engine.busy, engine.free = True, 900 * MiB  # a flood: nothing while requests are in
    engine.ticks(keeper, 60)
    assert engine.releases == []
    engine.busy = False  # over at 60 s
    engine.ticks(keeper, IDLE_SECONDS - 2 * PERIOD)
    assert engine.releases == []
    engine.ticks(keeper, 3 * PERIOD)
    assert engine.releases == [pytest.approx(60 + IDLE_SECONDS + PERIOD)]  # the first look a quiet time after the last request
    engine.free = 500 * MiB  # what a release could not hand back is not tried again in the same idle spell
    engine.ticks(keeper, 60)
    assert len(engine.releases) == 1
    engine.busy = True  # a request, then idle again: a new spell
    engine.ticks(keeper, PERIOD)
    engine.busy = False
    engine.ticks(keeper, IDLE_SECONDS + PERIOD)
    assert len(engine.releases) == 2


def test_a_busy_engine_or_a_small_free_heap_is_left_alone() -> None:
    engine = PlayedEngine()
    keeper = engine.keeper()
    engine.free = THRESHOLD - MiB  # idle, but too little free to be worth the faults the next passes pay
    engine.ticks(keeper, 120)
    engine.free, engine.busy = 2 * THRESHOLD, True  # much free, but a request in every look (a steady load)
    engine.ticks(keeper, 120)
    for _ in range(30):  # requests that come just under the quiet time apart
        engine.busy = False
        engine.ticks(keeper, IDLE_SECONDS - 2 * PERIOD)
        engine.busy = True
        engine.ticks(keeper, PERIOD)
    assert engine.releases == []


def test_an_engine_heap_that_cannot_be_read_ends_its_keeper_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    engine = PlayedEngine()

    def unreadable() -> int:
        raise OSError("tcmalloc does not tell its free bytes")

    keeper = IdleKeeper(unreadable, engine.release, lambda: False, THRESHOLD, quiet=0.0)
    monkeypatch.setattr("attrserve_service.heap.PERIOD", 0.0)
    asyncio.run(asyncio.wait_for(keeper.run(), 5))
    assert "the engine process's heap is no longer watched: tcmalloc does not tell its free bytes" in caplog.text
    assert engine.releases == []


def test_each_keeper_tells_the_resident_bytes_every_release_handed_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """run() tells `released` (the server's metrics.heap_released: attrserve_heap_released_bytes_total and
    attrserve_heap_releases_total) once per trim or release, with the resident memory it handed back, 0 for none."""
    monkeypatch.setattr("attrserve_service.heap.PERIOD", 0.0)

    async def until_told(run, told: list[int], n: int) -> None:
        task = asyncio.ensure_future(run())
        while len(told) < n:
            await asyncio.sleep(0)
        await asyncio.sleep(0.05)  # nothing more in the meantime
        task.cancel()

    heap, front = PlayedHeap(), []
    keeper = HeapKeeper(heap.measure, heap.trim, THRESHOLD, released=front.append)
    heap.rss += 2 * THRESHOLD  # free memory past the threshold: trimmed at the first look
    asyncio.run(asyncio.wait_for(until_told(keeper.run, front, 1), 5))
    assert front == [2 * THRESHOLD] and len(heap.trims) == 1

    heap, front = PlayedHeap(), []
    heap.returnable = 0.0  # a trim that hands nothing back is still one, of 0 bytes
    keeper = HeapKeeper(heap.measure, heap.trim, THRESHOLD, released=front.append)
    heap.rss += 2 * THRESHOLD
    asyncio.run(asyncio.wait_for(until_told(keeper.run, front, 1), 5))
    assert front[0] == 0

    engine, told = PlayedEngine(), []
    resident = iter([900 * MiB, 300 * MiB])  # the engine process's RSS before and after its release
    monkeypatch.setattr("attrserve_service.heap._rss", lambda: next(resident))
    idle = IdleKeeper(lambda: 600 * MiB, engine.release, lambda: False, THRESHOLD, quiet=0.0, released=told.append)
    asyncio.run(asyncio.wait_for(until_told(idle.run, told, 1), 5))
    assert told == [600 * MiB] and len(engine.releases) == 1  # once in the idle spell


# engine.release_free_memory in a process of its own on tcmalloc: 300 MiB made and freed (tcmalloc keeps what is freed
# until it is reused), then released.
RELEASE = textwrap.dedent(
    """
    import os

    from attrserve_engine.engine import release_free_memory
    from attrserve_service.heap import free_heap_bytes

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20

    free = free_heap_bytes()
    start = rss()
    large = [bytearray(1 << 20) for _ in range(300)]
    del large
    freed, free_before = rss(), free() >> 20
    release_free_memory()
    print(start, freed, rss(), free_before, free() >> 20)
    """
)


def test_release_free_memory_hands_back_what_tcmalloc_keeps() -> None:
    """The engine process runs on tcmalloc where it is installed (--allocator auto), and releases its free memory after
    a model's load-time probe and warm-ups, and when idle after a surge: glibc's malloc_trim alone left it mapped there
    (bench W6's engine process started at 608 MiB of RSS, and at 285 with tcmalloc's release; issue 12 step 43). What
    the IdleKeeper reads as free is what goes."""
    library = ctypes.util.find_library("tcmalloc_minimal")
    if library is None:
        pytest.skip("libtcmalloc_minimal is not installed (CI installs libtcmalloc-minimal4)")
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env["LD_PRELOAD"] = library
    out = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True, check=True, env=env).stdout
    start, freed, released, free_before, free_after = map(int, out.split())
    print(f"\nRSS {start} MiB at the start, {freed} with 300 MiB freed, {released} released; free heap {free_before} → {free_after}")
    assert freed - start >= 280  # freed, still resident
    assert released - start < 64
    assert free_before >= 280 and free_after < 32  # what the engine process's IdleKeeper reads


# End to end: 1 MiB requests (341 of the image model's rows each) that the front holds while its engine process is
# stopped, more than the keeper's threshold in all.
ROWS = 341
REQUESTS = 300
BACK_WITHIN = 30.0  # seconds after the answers for the front's RSS to come back near its start
# MiB over its start: what the keeper may leave (its threshold of free heap) and some. With it 8-117 MiB stayed (13 runs),
# without it 69-245 (5 runs): what tells them apart is what the keeper's log lines say it handed back, 585-733 MiB.
BACK_NEAR = THRESHOLD // MiB + 32


def engine_pid(front: int) -> int:
    return int(Path(f"/proc/{front}/task/{front}/children").read_text().split()[0])


async def surge(address: str, xs: np.ndarray, metrics_port: int, pid: int) -> Counter:
    """REQUESTS calls at once while the engine process is stopped; it goes on once the front holds them all (or after
    30 s). Returns the callers' codes."""
    codes: Counter = Counter()
    request = AttributionClient.build_request("image", "saliency", xs, target=1)
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", -1)]) as channel:
        stub = pb_grpc.AttributionServiceStub(channel)

        async def one() -> None:
            try:
                await stub.Attribute(request, timeout=120)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as e:
                codes[e.code().name] += 1

        os.kill(pid, signal.SIGSTOP)
        try:
            calls = [asyncio.ensure_future(one()) for _ in range(REQUESTS)]
            until = time.monotonic() + 30
            while time.monotonic() < until:
                held = scrape(metrics_port).get(("attrserve_front_held_bytes", frozenset()), 0.0)
                if held >= REQUESTS * xs.nbytes * 0.95:
                    break
                await asyncio.sleep(0.2)
        finally:
            os.kill(pid, signal.SIGCONT)
        await asyncio.gather(*calls)
    return codes


def test_the_front_and_the_engine_process_hand_back_the_memory_a_surge_of_large_requests_left_and_serve_on() -> None:
    """The front's keeper hands back what the held requests left; the engine process's (IdleKeeper), once it has been
    idle for IDLE_SECONDS, what the requests and their passes left in its tcmalloc heap."""
    xs = np.random.default_rng(5).random((ROWS, 3, 16, 16), dtype=np.float32)
    want = Saliency(demo_model("image")).attribute(torch.from_numpy(xs[:4].copy()).requires_grad_(), target=1).detach().numpy()
    args = [
        "--device",
        "cpu",
        "--no-batch-probe",
        "--max-front-bytes",
        str(512 * MiB),
        "--max-queued-rows",
        "200000",
        "--log-level",
        "INFO",
    ]
    with ServeProcess(args, metrics=True) as server:
        assert server.metrics_port is not None
        with AttributionClient(server.address) as client:
            np.testing.assert_allclose(client.attribute("image", "saliency", xs[:4], target=1, timeout=60).attributions, want, atol=1e-6)
        start, engine = rss_kib(server.proc.pid) >> 10, engine_pid(server.proc.pid)
        engine_start = rss_kib(engine) >> 10
        with Sampler(server.proc.pid, server.metrics_port) as sampled:
            codes = asyncio.run(surge(server.address, xs, server.metrics_port, engine))
        engine_end = rss_kib(engine) >> 10
        assert not sampled.errors, sampled.errors
        peak = max(sampled.rss_kib) >> 10
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"} and codes["OK"] > 0, codes  # answers, and the queue's refusals
        assert peak - start >= 250, (start, peak)  # the surge's requests were resident

        until = time.monotonic() + BACK_WITHIN
        while (now := rss_kib(server.proc.pid) >> 10) - start > BACK_NEAR and time.monotonic() < until:
            time.sleep(0.5)
        print(f"\n{dict(codes)}; the front's RSS: {start} MiB at the start, {peak} at most, {now} after")
        assert now - start <= BACK_NEAR, server.output()[-3000:]
        handed = [int(mib) for mib in re.findall(r"handed (\d+) MiB of free heap back to the kernel", server.output())]
        assert sum(handed) >= 200, server.output()[-3000:]  # the keeper's doing (glibc alone hands back much of it too)

        # The surge's memory, free in the engine now: well past what the check below lets stay (314 -> 630 MiB in runs).
        assert engine_end - engine_start >= BACK_NEAR + 100, (engine_start, engine_end)
        until = time.monotonic() + IDLE_SECONDS + BACK_WITHIN
        while (engine_now := rss_kib(engine) >> 10) - engine_start > BACK_NEAR and time.monotonic() < until:
            time.sleep(0.5)
        print(f"the engine process's RSS: {engine_start} MiB at the start, {engine_end} after the surge, {engine_now} later")
        assert engine_now - engine_start <= BACK_NEAR, server.output()[-3000:]
        # Who handed it back: the keeper (its line comes once it has released, and may reach the output after the RSS
        # above fell), or tcmalloc itself, which returns free spans as it goes and left the keeper under its threshold
        # (seen once in CI, issue 12 step 47: 724 -> 411 MiB with no release line). Either way the metrics below must
        # count exactly what the lines say; the keeper's own decisions are tested above
        # (test_the_engine_hands_its_free_heap_back_once_idle_for_the_quiet_time_once_a_spell).
        until = time.monotonic() + IDLE_SECONDS + 5
        while not re.search(r"idle for 10 s: released \d+ MiB of the engine process's", server.output()) and time.monotonic() < until:
            time.sleep(0.2)

        # The metrics count what the logs say each keeper handed back (a log line gives whole MiB; a front trim of
        # less than 1 MiB is logged at DEBUG only). A trim is counted before its line is logged, and the front may trim
        # at any time: every line logged before the scrape is counted in it, and every release counted in it at INFO is
        # logged within the half second after it.
        def logged() -> dict[str, list[int]]:
            out = server.output()
            return {
                "front": [int(mib) for mib in re.findall(r"handed (\d+) MiB of free heap back to the kernel", out)],
                "engine": [int(mib) for mib in re.findall(r"idle for 10 s: released (\d+) MiB of the engine process's", out)],
            }

        before = logged()
        page = scrape(server.metrics_port)
        time.sleep(0.5)
        after = logged()
        for process in ("front", "engine"):
            releases = page[("attrserve_heap_releases_total", frozenset({("process", process)}))]
            released_bytes = page[("attrserve_heap_released_bytes_total", frozenset({("process", process)}))]
            assert releases >= len(before[process]), (process, releases, before[process])
            if process == "engine":  # one release an idle spell, all at INFO
                assert releases == len(before[process]) == len(after[process]), (releases, before[process], after[process])
            assert sum(before[process]) * MiB <= released_bytes, (process, released_bytes, before[process])
            assert released_bytes < (sum(after[process]) + releases) * MiB, (process, released_bytes, after[process])

        assert health(server.address) == health_pb2.HealthCheckResponse.SERVING
        with AttributionClient(server.address) as client:
            np.testing.assert_allclose(client.attribute("image", "saliency", xs[:4], target=1, timeout=60).attributions, want, atol=1e-6)
        assert "Traceback" not in server.output()


def test_a_heap_that_cannot_be_read_ends_the_keeper_with_a_warning_not_an_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    heap = PlayedHeap()
    keeper = heap.keeper()

    def unreadable() -> Heap:
        raise FileNotFoundError("/proc/self/statm")

    keeper.measure = unreadable
    monkeypatch.setattr("attrserve_service.heap.PERIOD", 0.0)
    asyncio.run(asyncio.wait_for(keeper.run(), 5))
    assert "the front end's heap is no longer watched: /proc/self/statm" in caplog.text
    assert heap.trims == []
