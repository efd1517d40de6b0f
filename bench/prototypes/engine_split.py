"""Where one request's time goes in the engine alone, in process and hot: no gRPC, no frames, no second process.

    .venv/bin/python bench/prototypes/engine_split.py [--workloads W5,W1] [--seconds 5] [--threads 1]

Loads the workload's model from bench/models into an `Engine` (as the engine process does, without the load-time
probe), and submits its requests one after another from this thread, each waited for. For each request: `submit`
(validation, plans, queueing: the engine process's event loop), submitted → the pass starts (the worker's wake-up,
its plan steps and cut), the pass (`run_pass`: forward, backward, targets), and the pass's end → the result in this
thread (routing, the plan's finish, the future, this thread's wake-up). Medians, after the first 50 requests.
B1, Captum on the same request in this process (bench/run.py's), alternates with it: the engine's part is the
difference. Torch's intra-op threads: `--threads` (the engine process's count on 2 cores is 1).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch
from common import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from attrserve_engine import AttributionJob, Engine, EngineLimits
from attrserve_engine.scheduler import Scheduler
from attrserve_service.repository import load_repository

from captum_calls import run_captum
from workloads import all_workloads, build_model


def median_ms(values: list[float]) -> float:
    return 1e3 * statistics.median(values[50:] if len(values) > 100 else values)


def engine_split(key: str, seconds: float) -> dict[str, float]:
    w = all_workloads()[key]
    engine = Engine(EngineLimits(probe_batch_rows=False, default_device="cpu"))
    try:
        engine.load(next(s for s in load_repository(ROOT / "bench" / "models") if s.name == w.model))
        inputs, targets = w.inputs(16), w.targets(16)
        jobs = [
            AttributionJob(
                model=w.model, algorithm=w.algorithm, inputs=(torch.from_numpy(inputs[i]),), target=[int(targets[i])], params=dict(w.params)
            )
            for i in range(16)
        ]
        engine.submit(jobs[0]).result(30)  # the scheduler and its worker exist from the first request on
        starts: list[float] = []
        ends: list[float] = []
        schedulers = [s for s in vars(engine).values() if isinstance(s, Scheduler)]
        schedulers += [s for d in vars(engine).values() if isinstance(d, dict) for s in d.values() if isinstance(s, Scheduler)]
        for scheduler in schedulers:
            run = scheduler._run_pass

            def marked(*args, _run=run, **kwargs):  # type: ignore[no-untyped-def]
                starts.append(time.perf_counter())
                try:
                    return _run(*args, **kwargs)
                finally:
                    ends.append(time.perf_counter())

            scheduler._run_pass = marked
        whole, submit, wake, passes, back = [], [], [], [], []
        end = time.perf_counter() + seconds
        i = 0
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            future = engine.submit(jobs[i % len(jobs)])
            t1 = time.perf_counter()
            future.result(30)
            t2 = time.perf_counter()
            whole.append(t2 - t0)
            submit.append(t1 - t0)
            wake.append(starts[-1] - t1)
            passes.append(ends[-1] - starts[-1])
            back.append(t2 - ends[-1])
            i += 1
    finally:
        engine.shutdown(drain=False, timeout=5)
    return {
        "requests": i,
        "whole": median_ms(whole),
        "submit": median_ms(submit),
        "to pass": median_ms(wake),
        "pass": median_ms(passes),
        "to result": median_ms(back),
    }


def captum_ms(key: str, seconds: float) -> float:
    w = all_workloads()[key]
    model = build_model(w.model).eval()
    xs = [torch.from_numpy(a) for a in w.inputs()]
    ts = w.targets()
    latencies = []
    end = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        run_captum(model, w.algorithm, xs[i % len(xs)], target=ts[i % len(ts)], baselines=w.baselines, params=w.params, layer=w.layer)
        latencies.append(time.perf_counter() - t0)
        i += 1
    return median_ms(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="W5,W1")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # Captum's "did not already require gradients"
    torch.set_num_threads(args.threads)
    print("| workload | round | engine: whole ms | submit | submitted → pass | pass | pass ends → result | engine's own | B1 Captum ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key in args.workloads.split(","):
        for r in range(1, args.rounds + 1):
            split = engine_split(key, args.seconds)
            b1 = captum_ms(key, args.seconds)
            own = split["whole"] - split["pass"]
            cells = " | ".join(f"{split[k]:.3f}" for k in ("whole", "submit", "to pass", "pass", "to result"))
            print(f"| {key} | {r} | {cells} | {own:.3f} | {b1:.3f} |", flush=True)


if __name__ == "__main__":
    main()
