"""Harness pieces: server subprocesses, the asyncio load client, /metrics scraping, RSS from /proc, stats."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from attrserve.v1 import attribution_service_pb2 as pb
from attrserve.v1 import attribution_service_pb2_grpc as pb_grpc
from attrserve_client.client import RETRY_PUSHBACK

ROOT = Path(__file__).resolve().parents[1]
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
# Polling a server that is starting: a refused connection is tried again within 100 ms. gRPC's default backoff (1 s,
# then x1.6 a try) would notice a server that listens after 12 s only at ~16 s.
READY_OPTIONS = [
    *_CHANNEL_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 100),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- RSS ----------------------------------------------------------------------------------------
def rss_sum_kib(pids: Sequence[int], field_name: str = "VmRSS") -> int | None:
    """The processes' `field_name` (VmRSS, VmHWM) summed in KiB; None when none of them can be read."""
    values = [proc_status_kib(p, field_name) for p in pids]
    return sum(v for v in values if v is not None) if any(v is not None for v in values) else None


def proc_status_kib(pid: int, field_name: str) -> int | None:
    """VmRSS / VmHWM of a process in KiB, from /proc/<pid>/status (psutil is not needed)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


# -- server subprocesses -----------------------------------------------------------------------
class ServerProcess:
    """A server started as a subprocess (no shell: its pid is the server's), always killed by stop()."""

    def __init__(
        self, name: str, argv: list[str], port: int, log_path: Path, ready_timeout: float = 180.0, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.env = env or {}
        self.argv = argv
        self.port = port
        self.log_path = log_path
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        self.proc = subprocess.Popen(
            self.argv, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL, start_new_session=True
        )

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_ready(
        self, models: list[str], since: float | None = None, poll_s: float = 0.2, also: Callable[[], bool] | None = None
    ) -> float:
        """Blocks until ListModels answers with every model ready (and `also()` holds); returns the seconds since
        `since` (a time.monotonic() reading; default: this call), which the timeout also counts from."""
        t0 = time.monotonic() if since is None else since
        deadline = t0 + self.ready_timeout
        with grpc.insecure_channel(self.target, options=READY_OPTIONS) as channel:
            stub = pb_grpc.AttributionServiceStub(channel)
            while True:
                if self.proc is None or self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited during start-up:\n{self.log_tail()}")
                try:
                    listed = stub.ListModels(pb.ListModelsRequest(), timeout=2)
                    ready = {m.config.name for m in listed.models if m.ready}
                    if all(m in ready for m in models) and (also is None or also()):
                        return time.monotonic() - t0
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} was not ready after {self.ready_timeout:.0f} s:\n{self.log_tail()}")
                time.sleep(poll_s)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)  # attrserve drains; nothing is in flight any more
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None


def attrserve_argv(
    repo: Path, port: int, metrics_port: int, extra: list[str], profile: Path | None = None, device: str = "cpu"
) -> list[str]:
    launcher = (
        ["-m", "attrserve_service.cli"] if profile is None else [str(ROOT / "bench" / "profile_server.py"), "--out", str(profile), "--"]
    )
    return [
        sys.executable,
        *launcher,
        "serve",
        "--model-repository",
        str(repo),
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        "--device",
        device,
        "--log-level",
        "WARNING",
        *extra,
    ]


def baseline_argv(repo: Path, port: int, noop: bool, device: str = "cpu") -> list[str]:
    return [
        sys.executable,
        str(ROOT / "bench" / "baseline_server.py"),
        "--model-repository",
        str(repo),
        "--port",
        str(port),
        "--device",
        device,
        *(["--noop"] if noop else []),
    ]


# -- CPU used by other processes during a measurement --------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK")


def _busy_ticks() -> int:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v) - v[3] - v[4]  # all but idle and iowait


def _proc_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime (all threads)
    except OSError:
        return 0


class CpuWatch:
    """CPU seconds spent during a window by this bench process + the server, and by everything else.

    Other processes on the machine (a test run, an editor) compete for the same 2 cores; their share
    is reported with every measurement so a noisy number can be recognised."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = [os.getpid(), *pids]
        self.t0 = time.monotonic()
        self.busy0 = _busy_ticks()
        self.ours0 = sum(_proc_ticks(p) for p in self.pids)
        self.servers0 = sum(_proc_ticks(p) for p in self.pids[1:])

    def stop(self) -> dict:
        wall = time.monotonic() - self.t0
        busy = (_busy_ticks() - self.busy0) / _TICK
        ours = (sum(_proc_ticks(p) for p in self.pids) - self.ours0) / _TICK
        servers = (sum(_proc_ticks(p) for p in self.pids[1:]) - self.servers0) / _TICK
        cpus = os.cpu_count() or 1
        return {
            "wall_s": round(wall, 2),
            "busy_cpu_s": round(busy, 2),
            "ours_cpu_s": round(ours, 2),
            "server_cpu_s": round(servers, 2),
            "foreign_cpu_s": round(max(0.0, busy - ours), 2),
            "foreign_cpu_fraction": round(max(0.0, busy - ours) / (wall * cpus), 3) if wall > 0 else None,
        }


# -- /metrics -----------------------------------------------------------------------------------
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s+([-+0-9.eEinfNa]+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def samples(metrics_port: int):
    """(name, labels, value) of every sample on attrserve's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if m := _SAMPLE.match(line):
            yield m.group(1), dict(_LABEL.findall(m.group(2) or "")), float(m.group(3))


def scrape(metrics_port: int, model: str) -> dict[str, float]:
    """attrserve's pass counters for one model, summed over pass kinds."""
    wanted = {
        "attrserve_passes_executed_total": "passes",
        "attrserve_pass_rows_sum": "rows",
        "attrserve_pass_rows_count": "row_passes",
        "attrserve_pass_requests_sum": "pass_requests",
        "attrserve_pass_duration_seconds_sum": "pass_seconds",
        "attrserve_queue_wait_seconds_sum": "queue_seconds",
        "attrserve_queue_wait_seconds_count": "queue_count",
    }
    out = dict.fromkeys(wanted.values(), 0.0)
    for name, labels, value in samples(metrics_port):
        if name in wanted and labels.get("model") == model:
            out[wanted[name]] += value
    return out


def device_memory(metrics_port: int) -> dict[str, float]:
    """attrserve_device_memory_bytes by device: what torch holds on each CUDA device in the engine process."""
    return {labels["device"]: value for name, labels, value in samples(metrics_port) if name == "attrserve_device_memory_bytes"}


def pass_sizes(metrics_port: int, model: str) -> dict[str, int]:
    """The rows `model`'s latest pass of each kind was cut to at most (the attrserve_pass_size_rows gauge): its
    max_batch_rows as configured, or where the load-time probe and the tuner have taken it."""
    return {
        labels["kind"]: int(value)
        for name, labels, value in samples(metrics_port)
        if name == "attrserve_pass_size_rows" and labels.get("model") == model
    }


def metrics_delta(before: dict[str, float], after: dict[str, float], wall: float) -> dict:
    d = {k: after[k] - before[k] for k in before}
    passes = d["row_passes"] or d["passes"]
    return {
        "passes": round(d["passes"]),
        "rows": round(d["rows"]),
        "rows_per_pass": d["rows"] / passes if passes else None,
        "requests_per_pass": d["pass_requests"] / passes if passes else None,
        "mean_pass_ms": 1e3 * d["pass_seconds"] / passes if passes else None,
        "worker_busy_fraction": d["pass_seconds"] / wall if wall > 0 else None,
        "mean_queue_wait_ms": 1e3 * d["queue_seconds"] / d["queue_count"] if d["queue_count"] else None,
    }


# -- the load client ----------------------------------------------------------------------------
@dataclass
class LoadResult:
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    timing_rows: int = 0  # from responses' timing (B2: Captum's rows; attrserve: the request's rows)
    timing_passes: int = 0
    timing_ms: list[tuple[float, float, float]] = field(default_factory=list)  # (queue, compute, total) per answer
    rss_samples_kib: list[tuple[float, int]] = field(default_factory=list)


_ITEMSIZE = {1: 4, 2: 8, 3: 2, 4: 2, 5: 8, 6: 4, 7: 2, 8: 1, 9: 1, 10: 1}


def well_formed(response: pb.AttributeResponse) -> bool:
    """One attribution tensor for the one example, its bytes matching its dtype and shape."""
    if len(response.attributions) != 1:
        return False
    t = response.attributions[0]
    return len(t.shape) >= 1 and t.shape[0] == 1 and t.dtype in _ITEMSIZE and len(t.data) == _ITEMSIZE[t.dtype] * int(np.prod(t.shape))


def retry_pushback_s(error: grpc.aio.AioRpcError) -> float:
    """The retry hint of a refusal in seconds (its `grpc-retry-pushback-ms` trailer), 0 without one."""
    for key, value in error.trailing_metadata() or ():
        if key == RETRY_PUSHBACK:
            with contextlib.suppress(ValueError):
                return max(0, int(value)) / 1e3
    return 0.0


async def _drive(
    target: str,
    requests: list[pb.AttributeRequest],
    concurrency: int,
    seconds: float,
    timeout: float,
    result: LoadResult | None,
    pids: Sequence[int],
    rss_every: float,
) -> None:
    """`concurrency` closed-loop callers on one channel, each sending its next request as soon as the last returns,
    or, after a refusal that carries a retry hint (`grpc-retry-pushback-ms`, admission's RESOURCE_EXHAUSTED), once the
    hint's time has passed, as a gRPC retry policy would: a caller that resends at once turns a full queue into a stream
    of refused payloads (the GPU check's G2: ~340 a second, bench/RESULTS.md step 15)."""
    async with grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.AttributionServiceStub(channel)
        t_start = time.perf_counter()
        t_end = t_start + seconds

        async def caller(c: int) -> None:
            i = c
            while time.perf_counter() < t_end:
                request = requests[i % len(requests)]
                t0 = time.perf_counter()
                try:
                    response = await stub.Attribute(request, timeout=timeout)
                except grpc.aio.AioRpcError as e:
                    if result is not None:
                        result.errors += 1
                        if len(result.error_samples) < 5:
                            result.error_samples.append(f"{e.code().name}: {e.details()}")
                    i += concurrency
                    pushback = retry_pushback_s(e)
                    if pushback:
                        await asyncio.sleep(min(pushback, max(0.0, t_end - time.perf_counter())))
                    continue
                dt = time.perf_counter() - t0
                if result is not None:
                    if not well_formed(response):
                        result.errors += 1
                        if len(result.error_samples) < 5:
                            result.error_samples.append(f"malformed answer: {str(response)[:200]}")
                    else:
                        result.latencies_ms.append(1e3 * dt)
                        result.timing_rows += response.timing.rows
                        result.timing_passes += response.timing.passes
                        tm = response.timing
                        result.timing_ms.append((tm.queue_ms, tm.compute_ms, tm.total_ms))
                i += concurrency

        async def sample_rss() -> None:
            while True:
                kib = rss_sum_kib(pids)
                if kib is not None and result is not None:
                    result.rss_samples_kib.append((time.perf_counter() - t_start, kib))
                await asyncio.sleep(rss_every)

        sampler = asyncio.ensure_future(sample_rss()) if (pids and result is not None) else None
        try:
            await asyncio.gather(*(caller(c) for c in range(concurrency)))
        finally:
            if sampler is not None:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
        if result is not None:
            result.wall_s = time.perf_counter() - t_start
            kib = rss_sum_kib(pids)  # None without pids
            if kib is not None:
                result.rss_samples_kib.append((result.wall_s, kib))


def drive(
    target: str,
    requests: list[pb.AttributeRequest],
    concurrency: int,
    seconds: float,
    *,
    record: bool = True,
    timeout: float = 60.0,
    pids: Sequence[int] = (),
    rss_every: float = 0.5,
) -> LoadResult | None:
    """`seconds` of closed-loop load; record=False for a warm-up (nothing kept). With `pids`, their RSS summed every
    `rss_every` seconds (a server's processes: attrserve's front and engine process, B3's front and workers)."""
    result = LoadResult() if record else None
    asyncio.run(_drive(target, requests, concurrency, seconds, timeout, result, pids if record else (), rss_every))
    return result


# -- statistics ---------------------------------------------------------------------------------
def server_timing(result: LoadResult) -> dict | None:
    """Medians of what the server says it spent per request (AttributeResponse.timing), next to the client's
    latency: the difference is transport, (de)serialization and the servicer."""
    if not result.timing_ms or not any(t for row in result.timing_ms for t in row):
        return None
    a = np.asarray(result.timing_ms)
    lat = np.asarray(result.latencies_ms)
    return {
        "queue_ms_p50": float(np.median(a[:, 0])),
        "compute_ms_p50": float(np.median(a[:, 1])),
        "server_total_ms_p50": float(np.median(a[:, 2])),
        "client_minus_server_ms_p50": float(np.median(lat - a[:, 2])) if len(lat) == len(a) else None,
    }


def latency_stats(latencies_ms: list[float]) -> dict:
    if not latencies_ms:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "p999_ms": None, "mean_ms": None, "max_ms": None}
    a = np.asarray(latencies_ms)
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p90_ms": float(np.percentile(a, 90)),
        "p99_ms": float(np.percentile(a, 99)),
        "p999_ms": float(np.percentile(a, 99.9)),
        "mean_ms": float(a.mean()),
        "max_ms": float(a.max()),
    }
