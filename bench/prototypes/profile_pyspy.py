"""py-spy on a running `attrserve serve` under W5-like (1 caller) and W1-like (32 callers) load.

    .venv/bin/python bench/prototypes/profile_pyspy.py [--seconds 15] [--modes native,gil,idle] [--process engine]

`--process` picks the process sampled: the front end (the default) or the engine-core process.

For each load and mode it writes bench/out/prof/<W>-<mode>.txt (py-spy --format raw: collapsed stacks, one
thread per root frame) and <W>-<mode>.svg (flame graph), then bench/prototypes/fold.py aggregates them.
The load client runs in this process, the server in its own (started as the bench starts it)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import common
from common import ROOT, harness

PYSPY = str(ROOT / ".venv" / "bin" / "py-spy")
OUT = ROOT / "bench" / "out" / "prof"

MODES = {
    "native": ["--native", "--rate", "50"],  # Python + C frames; py-spy drops (most) idle samples
    "idle": ["--native", "--idle", "--rate", "50"],  # idle (blocked) samples kept too: a wall-clock view per thread
    "gil": ["--gil", "--rate", "100"],  # only samples of the thread that holds the GIL (Python frames only)
}


def thread_cpu(pid: int) -> dict[str, tuple[str, float]]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                raw = fh.read()
            f = raw.rsplit(")", 1)[1].split()
            out[tid] = (raw[raw.index("(") + 1 : raw.rindex(")")], (int(f[11]) + int(f[12])) / common._TICK)
        except (OSError, ValueError):
            pass
    return out


def record(pid: int, seconds: int, mode: str, name: str, fmt: str) -> subprocess.Popen:
    ext = "txt" if fmt == "raw" else "svg"
    return subprocess.Popen(
        [
            PYSPY,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(seconds),
            "--threads",
            "--format",
            fmt,
            "-o",
            str(OUT / f"{name}-{mode}.{ext}"),
            *MODES[mode],
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=int, default=15)
    p.add_argument("--modes", default="native,idle,gil")
    p.add_argument("--loads", default="W5,W1")
    p.add_argument("--process", choices=("front", "engine"), default="front")
    a = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    port, mport = harness.free_port(), harness.free_port()
    server = common.start("prof-attrserve", common.attrserve_argv(port, mport), port)
    sampled = server.pid if a.process == "front" else next(p for p in common.tree(server.pid) if p != server.pid)
    try:
        for wk in a.loads.split(","):
            w = common.W[wk]
            name = wk if a.process == "front" else f"{wk}-engine"  # the output files' stem
            reqs = w.requests()
            harness.drive(server.target, reqs, w.concurrency, 2.0, record=False)
            base = common.measure(server, wk, a.seconds, warmup=0.1, metrics_port=mport)
            print(
                f"{wk} unprofiled: {base['req_s']:.0f} req/s p50 {base['p50']:.2f} ms, cpu {base['cpu_ms_req']:.2f} ms/req, "
                f"rows/pass {base.get('rows_per_pass')}",
                flush=True,
            )
            for mode in a.modes.split(","):
                # raw (collapsed) and svg from the same window would need two samplers at once; take raw,
                # and render the svg from a second, shorter window (the svg is for looking, the raw for numbers).
                for fmt in ("raw", "flamegraph"):
                    secs = a.seconds if fmt == "raw" else max(5, a.seconds // 3)
                    spy = record(sampled, secs, mode, name, fmt)
                    time.sleep(0.5)
                    t0 = thread_cpu(sampled)
                    res = common.measure(server, wk, secs + 0.5, warmup=0.1, metrics_port=mport)
                    t1 = thread_cpu(sampled)
                    out, _ = spy.communicate(timeout=120)
                    if fmt == "raw":
                        (OUT / f"{name}-{mode}.cpu.json").write_text(
                            json.dumps(
                                {
                                    "wall_s": secs + 0.5,
                                    "requests": res["n"],
                                    "load": res,
                                    "threads": {tid: (c, s - t0.get(tid, (c, 0.0))[1]) for tid, (c, s) in t1.items()},
                                },
                                indent=1,
                            )
                        )
                    print(
                        f"{wk} {mode} {fmt}: {res['req_s']:.0f} req/s p50 {res['p50']:.2f} ms, cpu {res['cpu_ms_req']:.2f} ms/req; "
                        f"py-spy: {out.strip().splitlines()[-1] if out.strip() else ''}",
                        flush=True,
                    )
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
