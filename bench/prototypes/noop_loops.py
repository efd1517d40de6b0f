"""The no-op RPC server (bench/baseline_server.py --noop, the bench's transport ceiling) on each event loop that
`attrserve serve --event-loop` offers: how much of attrserve's gain on uvloop the ceiling gains too.

    .venv/bin/python bench/prototypes/noop_loops.py [--workloads W1,W5] [--rounds 3] [--seconds 5]

Each round starts one server per loop and measures bursts of `--seconds` in the order uvloop, asyncio, asyncio,
uvloop, so both see the same phase of the machine; each burst at the workload's concurrency, with its payload.
Server CPU is the server process's, from /proc. (attrserve itself: `layout_ab.py --paired --config uvloop= --config
"asyncio=--event-loop asyncio"`.)
"""

from __future__ import annotations

import argparse
import statistics

import common
from common import MODELS, harness

LOOPS = ("uvloop", "asyncio")


def run(workload: str, rounds: int, seconds: float) -> dict[str, list[dict]]:
    bursts: dict[str, list[dict]] = {loop: [] for loop in LOOPS}
    for _ in range(rounds):
        servers = {}
        try:
            for loop in LOOPS:
                port = harness.free_port()
                servers[loop] = common.start(f"noop_{loop}", [*harness.baseline_argv(MODELS, port, True), "--event-loop", loop], port)
            for loop in (*LOOPS, *reversed(LOOPS)):
                bursts[loop].append(common.measure(servers[loop], workload, seconds, warmup=1.0))
        finally:
            for server in servers.values():
                server.stop()
    return bursts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="W1,W5")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args()
    print("| workload | loop | req/s (median of bursts) | p50 ms | server CPU ms/req | bursts: req/s / CPU ms a request |")
    print("|---|---|---:|---:|---:|---|")
    for workload in args.workloads.split(","):
        for loop, ms in run(workload, args.rounds, args.seconds).items():
            print(
                f"| {workload} | {loop} | {statistics.median(m['req_s'] for m in ms):.0f} | "
                f"{statistics.median(m['p50'] for m in ms):.3f} | {statistics.median(m['cpu_ms_req'] for m in ms):.3f} | "
                + ", ".join(f"{m['req_s']:.0f} / {m['cpu_ms_req']:.3f}" for m in ms)
                + " |"
            )


if __name__ == "__main__":
    main()
