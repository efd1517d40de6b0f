"""A model's two replicas as two worker threads of one engine (today's layout) against two processes of one replica
each, in process, no RPC: how much the threads cost the passes.

    LD_PRELOAD=libtcmalloc_minimal.so.4 .venv/bin/python bench/prototypes/replicas_ab.py [--workload W2] \\
        [--sizes 128,512] [--rounds 2] [--seconds 15]

Each configuration runs in a fresh interpreter (one intra-op thread, as the engine process runs on 2 cores) and keeps
`--callers` requests of the workload in flight (a request that finishes is replaced at once) for `--seconds`, after 3
s of the same unmeasured:

- threads: one `Engine`, the model at `instances: 2` (two worker threads, one queue, fused passes on either replica);
- processes: two interpreters, each one `Engine` with the model at `instances: 1` and half the callers (no fusion across
  them, and no hop between them: an upper bound for replicas in processes of their own, fed by one engine core);
- one: one `Engine`, one replica, all the callers (one core's worth).

The pass size is pinned (`max_batch_rows`, no probe, no tuner). Rounds alternate the configurations; the table gives
each one's requests per second and engine CPU per request (`time.process_time`, every thread), and the ratio of
processes to threads inside each round. Run it on a quiet machine under tcmalloc, as the engine process runs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))  # bench/


def _serve(
    workload: str, instances: int, callers: int, size: int, seconds: float, start_at: float | None = None
) -> tuple[int, float, float]:
    """Requests answered, wall seconds and process CPU seconds of `callers` requests kept in flight for `seconds`."""
    import torch

    from attrserve_engine import AttributionJob, Engine, EngineLimits
    from attrserve_service.repository import load_repository

    from workloads import all_workloads

    torch.set_num_threads(1)
    w = all_workloads()[workload]
    engine = Engine(EngineLimits(probe_batch_rows=False, default_device="cpu"))
    spec = next(s for s in load_repository(ROOT / "bench" / "models") if s.name == w.model)
    spec.max_batch_rows, spec.instances = size, instances
    engine.load(spec)
    inputs, targets = w.inputs(callers), w.targets(callers)

    def submit(i: int) -> concurrent.futures.Future:
        job = AttributionJob(
            model=w.model,
            algorithm=w.algorithm,
            inputs=(torch.from_numpy(inputs[i % callers]),),
            target=[int(targets[i % callers])],
            params=dict(w.params),
        )
        return engine.submit(job)

    def flow(secs: float) -> int:
        live = {submit(i) for i in range(callers)}
        t0, answered, i = time.perf_counter(), 0, callers
        while time.perf_counter() - t0 < secs:
            done, live = concurrent.futures.wait(live, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                future.result()
                answered += 1
                live.add(submit(i))
                i += 1
        concurrent.futures.wait(live)
        return answered

    try:
        flow(3.0)
        if start_at is not None:  # the other process is ready too
            while time.time() < start_at:
                time.sleep(0.001)
        t0, c0 = time.perf_counter(), time.process_time()
        answered = flow(seconds)
        return answered, time.perf_counter() - t0, time.process_time() - c0
    finally:
        engine.shutdown(drain=False, timeout=5)


def _child(queue, *args) -> None:
    queue.put(_serve(*args))


def measure(config: str, workload: str, callers: int, size: int, seconds: float) -> dict:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    if config == "processes":
        start_at = time.time() + 30  # both loaded and warm by then
        procs = [ctx.Process(target=_child, args=(queue, workload, 1, callers // 2, size, seconds, start_at)) for _ in range(2)]
    else:
        procs = [ctx.Process(target=_child, args=(queue, workload, 2 if config == "threads" else 1, callers, size, seconds))]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join()
    answered = sum(r[0] for r in results)
    wall = max(r[1] for r in results)
    cpu = sum(r[2] for r in results)
    return {"req_s": answered / wall, "cpu_ms": 1e3 * cpu / answered}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="W2")
    parser.add_argument("--sizes", default="128,512")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--callers", type=int, default=32)
    args = parser.parse_args()
    configs = ("threads", "processes", "one")
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        runs: dict[str, list[dict]] = {c: [] for c in configs}
        for r in range(args.rounds):
            for config in configs:
                res = measure(config, args.workload, args.callers, size, args.seconds)
                runs[config].append(res)
                print(f"round {r + 1}, {size} rows, {config}: {res['req_s']:.1f} req/s, {res['cpu_ms']:.2f} ms CPU a request", flush=True)
        ratios = [p["req_s"] / t["req_s"] for p, t in zip(runs["processes"], runs["threads"])]
        rows.append((size, runs, ratios))
    print(f"\n{args.workload}, {args.callers} requests in flight, one intra-op thread per replica, ", end="")
    print(f"{args.rounds} rounds of {args.seconds:g} s")
    print(
        "| pass rows | threads req/s | processes req/s | one replica req/s | processes / threads (per round) "
        "| CPU ms a request: threads, processes, one |"
    )
    print("|---:|---|---|---|---|---|")
    for size, runs, ratios in rows:
        rates = [", ".join(f"{r['req_s']:.1f}" for r in runs[c]) for c in configs]
        cpu = "; ".join(f"{statistics.median(r['cpu_ms'] for r in runs[c]):.2f}" for c in configs)
        print(f"| {size} | {' | '.join(rates)} | {statistics.median(ratios):.2f}× ({', '.join(f'{x:.2f}' for x in ratios)}) | {cpu} |")


if __name__ == "__main__":
    main()
