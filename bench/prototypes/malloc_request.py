"""One long request in-process under different mallocs: wall time, peak RSS growth and RSS afterwards.

A default ShapleyValueSampling request on bench_cnn's model (76,777 rows: one feature per element of a 3x32x32 image,
25 orders) runs through `Engine.attribute` in 256-row passes on one intra-op thread, after a small warm-up request.
Each run is a fresh process with the malloc preloaded (LD_PRELOAD); the mallocs alternate, round after round.

    .venv/bin/python bench/prototypes/malloc_request.py --rounds 3
    .venv/bin/python bench/prototypes/malloc_request.py --algorithm feature_ablation --mallocs glibc,tcmalloc

Step 11 of bench/RESULTS.md has its table (jemalloc twice as slow, tcmalloc as fast as glibc with less growth).
"""

from __future__ import annotations

import argparse
import ctypes.util
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIBRARIES = {"glibc": None, "tcmalloc": "tcmalloc_minimal", "jemalloc": "jemalloc"}


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


def one_request(algorithm: str) -> str:
    import torch

    from attrserve_engine import AttributionJob, Engine, EngineLimits
    from attrserve_service.repository import load_repository

    torch.set_num_threads(1)
    engine = Engine(EngineLimits(probe_batch_rows=False, default_device="cpu"))
    spec = next(s for s in load_repository(ROOT / "bench" / "models") if s.name == "bench_cnn")
    spec.max_batch_rows, spec.instances = 256, 1
    engine.load(spec)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mask = torch.arange(12).repeat_interleave(256).view(1, 3, 32, 32)
    warm_up = AttributionJob(model="bench_cnn", algorithm="feature_ablation", inputs=(x,), target=1, feature_masks=(mask,))
    engine.attribute(warm_up, timeout=60)
    peak_before, before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rss_mib()
    start = time.perf_counter()
    result = engine.attribute(AttributionJob(model="bench_cnn", algorithm=algorithm, inputs=(x,), target=1), timeout=1800)
    wall = time.perf_counter() - start
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - peak_before
    after = rss_mib()
    engine.shutdown(drain=False, timeout=5)
    return f"{wall:.1f} | {growth:.0f} | {before:.0f} | {after:.0f} | {float(result.attributions[0].sum()):.6f}"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--algorithm", default="shapley_value_sampling")
    p.add_argument("--mallocs", default="glibc,jemalloc,tcmalloc")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(one_request(a.algorithm), flush=True)
        return 0
    print(f"{a.algorithm} on bench_cnn, one request per fresh process")
    print("| round | malloc | wall s | peak RSS growth MiB | RSS before MiB | RSS after MiB | attribution sum |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in range(1, a.rounds + 1):
        for name in a.mallocs.split(","):
            env = dict(os.environ)
            env.pop("LD_PRELOAD", None)
            if LIBRARIES[name]:
                library = ctypes.util.find_library(LIBRARIES[name])
                if library is None:
                    print(f"| {r} | {name} | not installed | | | | |")
                    continue
                env["LD_PRELOAD"] = library
            cmd = [sys.executable, __file__, "--child", "--algorithm", a.algorithm]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            print(f"| {r} | {name} | {out} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
