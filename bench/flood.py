"""The front end's memory under a flood: open-loop callers send more requests than the engine process reads, or the
engine process is stopped and reads none. The front end holds at most --max-front-bytes of requests for the engine
process and refuses the rest (RESOURCE_EXHAUSTED, reason front_bytes); "unbounded" is the server before that bound
(--max-front-bytes 1 TiB), measured in the same run. A setting `NAME=env:KEY=VALUE [env:KEY=VALUE ...]` runs the server
with those environment variables and without the flag: the code before, through a worktree's PYTHONPATH, or settings
such as ATTRSERVE_MAX_PENDING_CALLS.

    .venv/bin/python bench/flood.py                      # the three scenarios below, both settings: ~3 minutes
    .venv/bin/python bench/flood.py --scenarios stopped --settings default,64MiB=67108864
    .venv/bin/python bench/flood.py --settings "before=env:PYTHONPATH=/tmp/wt/engine:/tmp/wt/service,unbounded,default"

Each scenario starts `attrserve serve` (bench/models' one model the workload uses, a fresh server per row) and sends the
workload's requests at a fixed rate, each with a 30 s deadline, whatever the answers: open loop, as many independent
services would. The front end's RSS is read every 0.1 s.

- stopped: W6 (588 KiB images) at 200 a second; the engine process is stopped (SIGSTOP) from 2 s to 12 s, then goes
  on; sending ends at 16 s.
- stopped-small: W1 (256-byte inputs) at 1,500 a second, stopped from 2 s to 10 s: what each request costs beyond its
  tensors.
- overload: W6 at 600 a second for 6 s, nothing stopped: three times what the engine computes.
- flood: W6 at up to 1,800 a second for 6 s (the load client sends what it can, ~700-1,800): more than the front end's
  event loop takes from gRPC. With the pod's settings:
  `--settings "pod=67108864,pod-p256=env:ATTRSERVE_MAX_FRONT_BYTES=67108864 env:ATTRSERVE_MAX_PENDING_CALLS=256"`.

`--repeat N` runs each scenario N times on the same server, a row a round. Per row: the front end's RSS before, its
peak, at the end (all answered) and 3 s later (what it handed back meanwhile: heap.HeapKeeper); the engine process's
RSS before, at the end, 3 s and 15 s later (what it handed back once idle for 10 s: heap.IdleKeeper); the requests the
front held at most (attrserve_front_held_bytes, scraped every 0.5 s); what the callers got; the refusals by reason; the
calls gRPC ended before attrserve's code saw them (attrserve_grpc_core_calls_started_total less
grpc_server_started_total: cancelled past --max-pending-calls or gRPC's own bound; "—" for a server without that
metric); a health Check every 0.5 s on a connection of its own (3 s timeout, as Kubernetes probes): what they got, and
the slowest. The server logs at INFO to bench/out/flood-<scenario>-<setting>.log. Nothing asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from query_of_death import print_rows  # noqa: E402

from attrserve.v1 import attribution_service_pb2_grpc as pb_grpc  # noqa: E402

import harness  # noqa: E402
from workloads import MODELS, all_workloads  # noqa: E402

# name → (workload, requests a second, seconds of sending, stopped from, stopped until)
SCENARIOS = {
    "stopped": ("W6", 200.0, 16.0, 2.0, 12.0),
    "stopped-small": ("W1", 1500.0, 12.0, 2.0, 10.0),
    "overload": ("W6", 600.0, 6.0, None, None),
    "flood": ("W6", 1800.0, 6.0, None, None),
}
SETTINGS = {"unbounded": 1 << 40, "default": 0}
QUIET = 3.0  # seconds without calls after each round, before its RSS is read again
ENGINE_QUIET = 15.0  # seconds without calls after which the engine process's RSS is read again (heap.IdleKeeper: 10 s)


def rss_kib(pid: int) -> int:
    """A process's VmRSS in KiB (0 once it is gone)."""
    return harness.proc_status_kib(pid, "VmRSS") or 0


class Sampler(threading.Thread):
    """The front end's RSS every 0.1 s, and attrserve_front_held_bytes every 0.5 s, until stopped."""

    def __init__(self, pid: int, metrics_port: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.metrics_port = pid, metrics_port
        self.rss_kib: list[int] = []
        self.held: list[float] = []
        self.done = threading.Event()

    def run(self) -> None:
        ticks = 0
        while not self.done.wait(0.1):
            kib = harness.proc_status_kib(self.pid, "VmRSS")
            if kib is not None:
                self.rss_kib.append(kib)
            ticks += 1
            if ticks % 5 == 0:
                self.held.append(
                    next((value for name, _, value in harness.samples(self.metrics_port) if name == "attrserve_front_held_bytes"), 0.0)
                )


class HealthProber(threading.Thread):
    """A gRPC health Check every 0.5 s on a connection of its own with a 3 s timeout, as Kubernetes' probes make them
    (deploy/k8s: readiness 3 s, liveness 5 s), until stopped: what each got, and the slowest answer."""

    def __init__(self, target: str) -> None:
        super().__init__(daemon=True)
        self.target = target
        self.outcomes: dict[str, int] = {}
        self.slowest = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            start = time.monotonic()
            with grpc.insecure_channel(self.target) as channel:
                try:
                    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3).status
                    outcome = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
                except grpc.RpcError as e:
                    outcome = e.code().name
            self.slowest = max(self.slowest, time.monotonic() - start)
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def said(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items())) + f"; slowest {self.slowest:.1f} s"


async def flood(target: str, requests: list, rate: float, seconds: float, stop: tuple, engine_pid: int) -> dict[str, int]:
    """Send `rate` requests a second for `seconds` on 4 channels without waiting for answers; SIGSTOP the engine process
    from stop[0] to stop[1] s. Returns the callers' status codes, counted, once every call has ended."""
    codes: dict[str, int] = {}
    channels = [grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", -1)]) for _ in range(4)]
    stubs = [pb_grpc.AttributionServiceStub(c) for c in channels]
    calls: set[asyncio.Task] = set()

    async def call(i: int) -> None:
        try:
            await stubs[i % 4].Attribute(requests[i % len(requests)], timeout=30)
            code = "OK"
        except grpc.aio.AioRpcError as e:
            code = e.code().name
        codes[code] = codes.get(code, 0) + 1

    start, sent, stopped = time.monotonic(), 0, False
    try:
        while (now := time.monotonic() - start) < seconds:
            if stop[0] is not None and not stopped and stop[0] <= now < stop[1]:
                os.kill(engine_pid, signal.SIGSTOP)
                stopped = True
            if stopped and now >= stop[1]:
                os.kill(engine_pid, signal.SIGCONT)
                stopped = False
            while sent < now * rate:
                task = asyncio.ensure_future(call(sent))
                calls.add(task)
                task.add_done_callback(calls.discard)
                sent += 1
            await asyncio.sleep(0.005)
    finally:
        if stopped:
            os.kill(engine_pid, signal.SIGCONT)
    await asyncio.gather(*calls, return_exceptions=True)
    for channel in channels:
        await channel.close()
    return codes


def counts(metrics_port: int, model: str) -> dict[str, float]:
    """The server's counts so far: its refusals of `model`'s requests by reason, gRPC's own count of the calls its core
    started ("core") and the calls that reached attrserve's code ("seen")."""
    samples = list(harness.samples(metrics_port))
    out = {
        labels["reason"]: value
        for name, labels, value in samples
        if name == "attrserve_requests_refused_total" and labels.get("model") == model
    }
    out["core"] = sum(value for name, _, value in samples if name == "attrserve_grpc_core_calls_started_total")
    out["seen"] = sum(value for name, _, value in samples if name == "grpc_server_started_total")
    return out


def run(scenario: str, setting: str, value: str, repeat: int = 1) -> list[dict]:
    """One scenario `repeat` times on one fresh server with one setting (`value`: --max-front-bytes, or env:KEY=VALUE
    ...): a row a round, each with that round's counts."""
    name, rate, seconds, *stop = SCENARIOS[scenario]
    w = all_workloads()[name]
    repo = Path(tempfile.mkdtemp())
    (repo / w.model).symlink_to(MODELS / w.model)
    port, metrics_port = harness.free_port(), harness.free_port()
    env = dict(token.removeprefix("env:").split("=", 1) for token in value.split()) if value.startswith("env:") else {}
    argv = harness.attrserve_argv(repo, port, metrics_port, ["--log-level", "INFO"] + ([] if env else ["--max-front-bytes", value]))
    server = harness.ServerProcess(setting, argv, port, HERE / "out" / f"flood-{scenario}-{setting}.log", env=env)
    server.start()
    try:
        server.wait_ready([w.model])
        with open(f"/proc/{server.pid}/task/{server.pid}/children") as f:
            engine_pid = int(f.read().split()[0])
        rows, last = [], counts(metrics_port, w.model)
        for round_ in range(1, repeat + 1):
            sampler = Sampler(server.pid, metrics_port)
            before = rss_kib(server.pid)
            engine_before = rss_kib(engine_pid)
            prober = HealthProber(server.target)
            sampler.start()
            prober.start()
            codes = asyncio.run(flood(server.target, w.requests(), rate, seconds, tuple(stop), engine_pid))
            for thread in (sampler, prober):
                thread.done.set()
                thread.join()
            at_end = rss_kib(server.pid)
            engine_at_end = rss_kib(engine_pid)
            time.sleep(QUIET)
            front_later = rss_kib(server.pid)
            engine_later = rss_kib(engine_pid)
            time.sleep(ENGINE_QUIET - QUIET)
            engine_quiet = rss_kib(engine_pid)
            now = counts(metrics_port, w.model)
            grew = {key: int(now[key] - last.get(key, 0.0)) for key in now}
            last = now
            rows.append(
                {
                    "scenario": scenario,
                    "setting": setting,
                    "round": round_,
                    "front RSS before MiB": before >> 10,
                    "peak MiB": max(sampler.rss_kib, default=0) >> 10,
                    "at the end MiB": at_end >> 10,
                    f"{QUIET:g} s later MiB": front_later >> 10,
                    f"engine process MiB: before, at the end, {QUIET:g} s and {ENGINE_QUIET:g} s later": ", ".join(
                        str(kib >> 10) for kib in (engine_before, engine_at_end, engine_later, engine_quiet)
                    ),
                    "held at most MiB": f"{max(sampler.held, default=0.0) / 2**20:.1f}",
                    "sent": sum(codes.values()),
                    "callers got": ", ".join(f"{k} {v}" for k, v in sorted(codes.items())),
                    "refused by reason": ", ".join(f"{k} {v}" for k, v in grew.items() if v and k not in ("core", "seen")),
                    "ended by gRPC": grew["core"] - grew["seen"] if now["core"] else "—",
                    "health checks": prober.said(),
                    "engine process": "the same" if server.proc.poll() is None and os.path.exists(f"/proc/{engine_pid}") else "GONE",
                }
            )
            print(rows[-1], flush=True)
        return rows
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {', '.join(SCENARIOS)}")
    parser.add_argument(
        "--settings",
        default=",".join(SETTINGS),
        help="comma-separated NAME, NAME=BYTES (--max-front-bytes; 0: the default) or NAME=env:KEY=VALUE [env:KEY=VALUE ...] (no flag)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="rounds of each scenario on the same server (a row each)")
    args = parser.parse_args()
    settings = []
    for item in args.settings.split(","):
        name, _, value = item.partition("=")
        settings.append((name, value or str(SETTINGS[name])))
    rows = []
    for scenario in args.scenarios.split(","):
        for name, value in settings:
            rows += run(scenario, name, value, args.repeat)
    print()
    print_rows(rows)


if __name__ == "__main__":
    main()
