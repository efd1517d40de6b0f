"""Where one caller's request spends its time, hop by hop: client, front end, engine-core process, its worker.

    .venv/bin/python bench/prototypes/hops.py [--workload W5] [--seconds 15] [--warmup 3] [--attrserve-arg=--flag ...]

Starts `attrserve serve` on bench/models with hops_site/ first on PYTHONPATH, whose sitecustomize wraps the functions
a request passes through in both server processes and records CLOCK_MONOTONIC at each (one clock for every process of
the machine). One caller (whatever the workload's own concurrency) sends the workload's requests one after another,
marking each send and answer. A request's marks are the first of each kind after the one before; a request whose chain
does not close before the next send is left out. A frame is marked once encoded, before its write: its reader may wake
before the writer's system call returns, so "encoded → read" is the write and the wake-up together. Prints the median
and mean of every step, and of the whole.

A wrapper with two marks costs ~0.35 µs when hot (timeit), a few µs a request in all: read the steps against each other,
and the run's p50 against an unmarked run's. Machine phases move every step together (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # bench/

from attrserve.v1 import attribution_service_pb2_grpc as pb_grpc  # noqa: E402

import harness  # noqa: E402
from workloads import MODELS, all_workloads  # noqa: E402

ROOT = HERE.parents[1]
STEPS = [
    "client: sends",
    "front: handler starts",
    "front: request decoded",
    "front: next loop turn, frame out",
    "front: frame encoded",
    "engine: frame read",
    "engine: request decoded",
    "engine: validated, queued",
    "worker: takes the arrival",
    "worker: pass starts",
    "worker: pass ends",
    "worker: answer frame encoded",
    "front: answer frame read",
    "front: answer decoded",
    "front: handler returns",
    "client: has the answer",
]


async def _drive(target: str, requests: list, seconds: float, marks: list | None) -> int:
    """One caller, closed loop; returns the answers it got."""
    got = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.AttributionServiceStub(channel)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.monotonic_ns()
            await stub.Attribute(requests[got % len(requests)], timeout=30)
            t1 = time.monotonic_ns()
            got += 1
            if marks is not None:
                marks += [(t0, "client: sends"), (t1, "client: has the answer")]
    return got


def chains(events: dict[str, list[int]]) -> list[list[int]]:
    """Each request's time at every step (STEPS), for the requests whose marks all fall before the next send."""
    sends = events[STEPS[0]]
    out = []
    for i, t0 in enumerate(sends):
        limit = sends[i + 1] if i + 1 < len(sends) else float("inf")
        times = [t0]
        for step in STEPS[1:]:
            seen = events.get(step, [])
            j = bisect.bisect_left(seen, times[-1])
            if j == len(seen) or seen[j] > limit:
                break
            times.append(seen[j])
        if len(times) == len(STEPS):
            out.append(times)
    return out


def table(rows: list[list[int]]) -> str:
    lines = ["| from | to | p50 µs | mean µs |", "|---|---|---:|---:|"]
    for k in range(1, len(STEPS)):
        d = [(r[k] - r[k - 1]) / 1e3 for r in rows]
        lines.append(f"| {STEPS[k - 1]} | {STEPS[k]} | {statistics.median(d):.0f} | {statistics.mean(d):.0f} |")
    total = [(r[-1] - r[0]) / 1e3 for r in rows]
    lines.append(f"| **{STEPS[0]}** | **{STEPS[-1]}** | **{statistics.median(total):.0f}** | **{statistics.mean(total):.0f}** |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="W5")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--attrserve-arg", action="append", default=[])
    args = parser.parse_args()
    w = all_workloads()[args.workload]
    requests = w.requests()
    with tempfile.TemporaryDirectory() as where:
        path = os.pathsep.join(p for p in (str(HERE / "hops_site"), os.environ.get("PYTHONPATH", "")) if p)
        port, metrics_port = harness.free_port(), harness.free_port()
        server = harness.ServerProcess(
            "attrserve-hops",
            harness.attrserve_argv(MODELS, port, metrics_port, args.attrserve_arg),
            port,
            ROOT / "bench" / "out" / "proto_logs" / "hops.log",
            env={"PYTHONPATH": path, "ATTRSERVE_HOPS_DIR": where},
        )
        client: list[tuple[int, str]] = []
        try:
            server.start()
            server.wait_ready([w.model])
            asyncio.run(_drive(server.target, requests, args.warmup, None))
            begun = time.monotonic_ns()
            n = asyncio.run(_drive(server.target, requests, args.seconds, client))
            time.sleep(0.6)  # the processes' last marks reach their files
        finally:
            server.stop()
        events: dict[str, list[int]] = {}
        for role in ("front", "engine"):
            file = Path(where) / f"marks-{role}.txt"
            if not file.exists():
                raise SystemExit(f"no marks from the {role} process: see bench/out/proto_logs/hops.log")
            for line in file.read_text().splitlines():
                t, step = line.split(" ", 1)
                if int(t) >= begun:
                    events.setdefault(step, []).append(int(t))
        for t, step in client:
            events.setdefault(step, []).append(t)
        for seen in events.values():
            seen.sort()
    rows = chains(events)
    if not rows:
        raise SystemExit("no request's marks formed a whole chain")
    print(f"{args.workload} ({w.title}), one caller: {n} answers in {args.seconds:.0f} s, {len(rows)} whole chains")
    print(table(rows))


if __name__ == "__main__":
    main()
