"""Prototypes 2a (thread settings) and 2c (SO_REUSEPORT, 2 full server processes on one port), alternating rounds.

    .venv/bin/python bench/prototypes/threads_reuseport.py [--rounds 2] [--seconds 6] [--only a,b,...]

Every configuration is a fresh `attrserve serve` (bench models) started by bench/prototypes/launch.py; each
round runs every configuration once (A, B, C, ... then again), W1 (32 callers) then W5 (1 caller) on the
same server. Server CPU is the whole process tree's (both processes for the SO_REUSEPORT pair)."""

from __future__ import annotations

import argparse
import json
import sys
import time

import common
from common import ROOT, harness

LAUNCH = [sys.executable, str(ROOT / "bench" / "prototypes" / "launch.py")]

CONFIGS = {
    "baseline (default: 2 intra-op threads, OpenMP spin)": ([], {}, 1),
    "OMP_NUM_THREADS=1 (1 intra-op thread)": (["--intra", "1"], {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, 1),
    "OMP_WAIT_POLICY=PASSIVE": ([], {"OMP_WAIT_POLICY": "PASSIVE"}, 1),
    "1 intra-op + PASSIVE + 1 inter-op": (
        ["--intra", "1", "--interop", "1"],
        {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"},
        1,
    ),
    "SO_REUSEPORT x2 (default threads)": (["--reuseport"], {}, 2),
    "SO_REUSEPORT x2, 1 intra-op thread each": (["--reuseport", "--intra", "1"], {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, 2),
}


def run(name: str, seconds: float) -> dict:
    flags, env, n = CONFIGS[name]
    port = harness.free_port()
    servers, mports = [], []
    try:
        for i in range(n):
            mp = harness.free_port()
            argv = [*LAUNCH, *flags, "--", *common.attrserve_argv(port, mp)[3:]]
            s = harness.ServerProcess(f"tr{i}", argv, port, ROOT / "bench" / "out" / "proto_logs" / f"tr-{i}.log", env=env)
            s.start()
            servers.append(s)
            mports.append(mp)
        for s in servers:
            # the port is shared: ListModels may be answered by the other process, so also wait for each one's
            # "listening" line (printed once its models are loaded and warm and /metrics is up)
            s.wait_ready(["bench_mlp", "bench_cnn"])
            t0 = time.monotonic()
            while "attrserve listening" not in s.log_path.read_text(errors="replace"):
                if time.monotonic() - t0 > 180 or s.proc.poll() is not None:
                    raise RuntimeError(f"{s.name} not ready:\n{s.log_tail()}")
                time.sleep(0.2)
        out = {}
        for wk in ("W1", "W5"):
            out[wk] = measure_all(servers, mports, wk, seconds)
        return out
    finally:
        for s in servers:
            s.stop()


def measure_all(servers, mports, wk, seconds):
    """One load client on one port; CPU of all server processes; rows/pass from every process's /metrics."""
    w = common.W[wk]
    before = [harness.scrape(m, w.model) for m in mports]
    pids = [p for s in servers for p in common.tree(s.pid)]
    import time

    reqs = w.requests()
    ch = min(CHANNELS, w.concurrency)
    common.drive_multi(servers[0].target, reqs, w.concurrency, 1.5, ch)
    before = [harness.scrape(m, w.model) for m in mports]
    t0, k0 = time.monotonic(), common.tree_ticks(pids)
    lat, errors, load_wall = common.drive_multi(servers[0].target, reqs, w.concurrency, seconds, ch)
    load = harness.LoadResult(latencies_ms=lat, errors=errors, wall_s=load_wall)
    wall = time.monotonic() - t0
    cpu_s = (common.tree_ticks(pids) - k0) / common._TICK
    after = [harness.scrape(m, w.model) for m in mports]
    rows = sum(a["rows"] - b["rows"] for a, b in zip(after, before))
    passes = sum((a["row_passes"] or a["passes"]) - (b["row_passes"] or b["passes"]) for a, b in zip(after, before))
    per_proc = [round(a["pass_requests"] - b["pass_requests"]) for a, b in zip(after, before)]
    st = harness.latency_stats(load.latencies_ms)
    n = len(load.latencies_ms)
    return {
        "req_s": n / load.wall_s,
        "p50": st["p50_ms"],
        "p99": st["p99_ms"],
        "errors": load.errors,
        "cpu_ms_req": 1e3 * cpu_s / n,
        "server_cpu_frac": cpu_s / (wall * 2),
        "rows_per_pass": rows / passes if passes else None,
        "requests_per_process": per_proc,
        "n": n,
    }


CHANNELS = 1


def main() -> int:
    global CHANNELS
    p = argparse.ArgumentParser()
    p.add_argument("--channels", type=int, default=1, help="client channels (TCP connections); SO_REUSEPORT spreads connections, not calls")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=6)
    p.add_argument("--only", default="")
    p.add_argument("--json", default=str(ROOT / "bench" / "out" / "threads_reuseport.json"))
    a = p.parse_args()
    CHANNELS = a.channels
    names = [n for i, n in enumerate(CONFIGS) if not a.only or str(i) in a.only.split(",")]
    results: dict[str, dict[str, list]] = {n: {"W1": [], "W5": []} for n in names}
    for r in range(a.rounds):
        for n in names:
            res = run(n, a.seconds)
            for wk in res:
                results[n][wk].append(res[wk])
                x = res[wk]
                print(
                    f"round {r + 1} {n} {wk}: {x['req_s']:.0f} req/s p50 {x['p50']:.2f} ms cpu {x['cpu_ms_req']:.2f} ms/req "
                    f"rows/pass {x['rows_per_pass'] and round(x['rows_per_pass'])} per-process {x['requests_per_process']} "
                    f"err {x['errors']}",
                    flush=True,
                )
    with open(a.json, "w") as fh:
        json.dump(results, fh, indent=1)
    rows = [(n, wk, results[n][wk]) for wk in ("W1", "W5") for n in names]
    print(common.table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
