"""Served: a model's two replicas as two worker threads of one server (today's layout) against two servers of one
replica each, the callers split between them. The served upper bound for replicas in processes of their own
(`replicas_ab.py` measures the same in process, without RPC).

    .venv/bin/python bench/prototypes/replicas_served.py [--workload W2] [--size 0] [--rounds 4] [--seconds 6] \\
        [--settle 20]

- threads: one `attrserve serve`, the model at `instances: 2`, all `--callers` (the workload's concurrency);
- servers: two `attrserve serve`, each with the model at `instances: 1` and half the callers. Two front ends and two
  engine processes: no fusion across them, and no hop from one engine core to replica processes, so an upper bound
  for replica processes fed by one engine core.

`--size 0` leaves the pass size to each server's probe and tuner; a size pins it (`max_batch_rows`). Each round starts
fresh servers, gives each `--settle` seconds of unmeasured load, then measures bursts of `--seconds` in the order
threads, servers, servers, threads (the bursts of a layout averaged), so both see the same phase of the machine. Server
CPU is every process of the servers, from /proc.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import tempfile
from pathlib import Path

import common
from common import MODELS, W, harness


def repository(root: Path, model: str, instances: int, size: int) -> Path:
    """A repository of one model: the bench's, at `instances` replicas and, with a size, that pass size."""
    repo = root / f"instances{instances}"
    shutil.copytree(MODELS / model, repo / model)
    config = repo / model / "config.pbtxt"
    text = re.sub(r"(?m)^instances: \d+$", "", config.read_text()) + f"\ninstances: {instances}\n"
    config.write_text(text + (f"max_batch_rows: {size}\n" if size else ""))
    return repo


def burst(servers: list, requests: list, callers: int, seconds: float) -> dict:
    pids = [p for s in servers for p in common.tree(s.pid)]
    ticks = common.tree_ticks(pids)
    # Caller c on server c % len(servers), each server on a channel of its own.
    latencies, errors, wall = common.drive_multi([s.target for s in servers], requests, callers, seconds, len(servers))
    cpu_s = (common.tree_ticks(pids) - ticks) / os.sysconf("SC_CLK_TCK")
    p50 = statistics.median(latencies) if latencies else float("nan")
    return {"req_s": len(latencies) / wall, "p50": p50, "errors": errors, "cpu_ms": 1e3 * cpu_s / max(len(latencies), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="W2")
    ap.add_argument("--size", type=int, default=0, help="pinned pass size; 0: the probe's and the tuner's")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--settle", type=float, default=20.0)
    a = ap.parse_args()
    w = W[a.workload]
    requests = w.requests()
    logs = common.ROOT / "bench" / "out" / "proto_logs"

    def start(name: str, repo: Path):
        port, metrics_port = harness.free_port(), harness.free_port()
        server = harness.ServerProcess(name, harness.attrserve_argv(repo, port, metrics_port, []), port, logs / f"{name}.log")
        server.start()
        server.wait_ready([w.model])
        return server

    print(f"{a.workload}, {w.concurrency} callers, pass size {a.size or 'probe + tuner'}, settle {a.settle:g} s, bursts {a.seconds:g} s")
    print(
        "| round | threads req/s | servers req/s | servers / threads | p50 ms: threads, servers "
        "| server CPU ms a request: threads, servers | errors |"
    )
    print("|---:|---:|---:|---:|---|---|---:|")
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        two, one = repository(Path(tmp), w.model, 2, a.size), repository(Path(tmp), w.model, 1, a.size)
        for r in range(a.rounds):
            layouts = {"threads": [start("threads", two)], "servers": [start("servers-a", one), start("servers-b", one)]}
            try:
                for servers in layouts.values():
                    burst(servers, requests, w.concurrency, a.settle)
                got: dict[str, list[dict]] = {"threads": [], "servers": []}
                for name in ("threads", "servers", "servers", "threads"):
                    burst(layouts[name], requests, w.concurrency, 0.3)
                    got[name].append(burst(layouts[name], requests, w.concurrency, a.seconds))
            finally:
                for servers in layouts.values():
                    for server in servers:
                        server.stop()
            m = {k: {f: statistics.mean(b[f] for b in v) for f in ("req_s", "p50", "cpu_ms")} for k, v in got.items()}
            errors = sum(b["errors"] for v in got.values() for b in v)
            ratios.append(m["servers"]["req_s"] / m["threads"]["req_s"])
            print(
                f"| {r + 1} | {m['threads']['req_s']:.1f} | {m['servers']['req_s']:.1f} | {ratios[-1]:.3f} | "
                f"{m['threads']['p50']:.1f}, {m['servers']['p50']:.1f} | "
                f"{m['threads']['cpu_ms']:.2f}, {m['servers']['cpu_ms']:.2f} | {errors} |",
                flush=True,
            )
    print(f"servers / threads: median {statistics.median(ratios):.3f}, range {min(ratios):.3f}–{max(ratios):.3f}")


if __name__ == "__main__":
    main()
