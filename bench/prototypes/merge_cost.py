"""The engine's CPU per request when k requests of one workload arrive together, in-process, no RPC: each on its own
plan, merged into one plan by the scheduler (Scheduler._merged), and sent as one request of k examples.

    .venv/bin/python bench/prototypes/merge_cost.py [--workload W1] [--ks 1,2,5,10,32] [--repeats 40]

The k requests are submitted under `Engine.held()`, so the worker takes them all at one pass boundary; the process's
CPU time (every thread: the submitting thread's validation and plans, the worker's passes) from the first submit to
the last answer, divided by k; medians of `--repeats` runs. "own plans" turns merging off by marking the workload's
algorithm as not `examples_independent`, which is all that makes a job mergeable. One intra-op thread, as the engine
process runs on 2 cores. Run it under tcmalloc (LD_PRELOAD) as the engine process does.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # bench/

import torch  # noqa: E402

from attrserve_engine import AttributionJob, Engine, EngineLimits  # noqa: E402
from attrserve_service.repository import load_repository  # noqa: E402

from workloads import all_workloads  # noqa: E402

ROOT = HERE.parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="W1")
    parser.add_argument("--ks", default="1,2,5,10,32")
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    w = all_workloads()[args.workload]
    engine = Engine(EngineLimits(probe_batch_rows=False, default_device="cpu"))
    spec = next(s for s in load_repository(ROOT / "bench" / "models") if s.name == w.model)
    spec.max_batch_rows, spec.instances = 4096, 1
    engine.load(spec)
    ks = [int(k) for k in args.ks.split(",")]
    inputs, targets = w.inputs(max(ks)), w.targets(max(ks))
    algorithm = engine.algorithms[w.algorithm]

    def job(examples: range) -> AttributionJob:
        x = torch.cat([torch.from_numpy(inputs[i]) for i in examples])
        return AttributionJob(
            model=w.model, algorithm=w.algorithm, inputs=(x,), target=[int(targets[i]) for i in examples], params=dict(w.params)
        )

    def cpu_per_request(k: int, how: str) -> float:
        jobs = [job(range(k))] if how == "one request" else [job(range(i, i + 1)) for i in range(k)]
        algorithm.examples_independent = how != "own plans"
        start = time.process_time()
        with engine.held():
            futures = [engine.submit(j) for j in jobs]
        for future in futures:
            future.result(60)
        return (time.process_time() - start) / k * 1e3

    ways = ("own plans", "merged", "one request")
    print(f"{args.workload} ({w.title}): engine CPU ms per request, median of {args.repeats}")
    print("| k requests | " + " | ".join(ways) + " |")
    print("|---:|" + "---:|" * len(ways))
    try:
        for k in ks:
            cells = []
            for how in ways:
                cpu_per_request(k, how)  # warm
                cells.append(f"{statistics.median(cpu_per_request(k, how) for _ in range(args.repeats)):.3f}")
            print(f"| {k} | " + " | ".join(cells) + " |")
    finally:
        algorithm.examples_independent = True
        engine.shutdown(drain=False, timeout=5)


if __name__ == "__main__":
    main()
