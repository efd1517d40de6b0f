"""GPU check, accuracy and precision: attrserve on CUDA against Captum on the same GPU, and what bf16 autocast costs.

    python3 bench/gpu_accuracy.py          # needs CUDA; run by bench/gpu_check.sh

In process (no RPC): loads bench/gpu_models (ResNet-18, float32) and bench/gpu_models_bf16 (the same weights
under bfloat16 autocast) into one Engine on cuda, explains the G2 inputs with IntegratedGradients (50 steps), and prints
a markdown table: per model, the error against Captum float32 on the GPU (relative L2, max abs error
relative to the largest attribution, cosine similarity) and throughput with 256 requests in flight
(fused passes; what admission refuses is submitted again as earlier ones finish). float32 must agree with
Captum; bf16's numbers are its measured cost.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

from attrserve_engine import AttributionJob, Engine, EngineLimits, ResourceExhausted
from attrserve_service.repository import load_repository

from captum_calls import run_captum
from workloads import GPU_MODELS, build_model, gpu_workloads

N_EXAMPLES = 8
N_THROUGHPUT = 256


def job(model: str, x: torch.Tensor, target: int, params: dict) -> AttributionJob:
    return AttributionJob(
        model=model, algorithm="integrated_gradients", inputs=(x,), target=torch.tensor([[target]]), params=params, seed=0
    )


def throughput(engine: Engine, model: str, xs: list[torch.Tensor], ts: list[int], params: dict, n: int) -> float:
    """Requests/s of n requests, submitted as fast as admission takes them (the engine fuses them): a request that
    admission refuses (its model's queue is at its bound) is submitted again once an earlier one has finished."""
    start = time.perf_counter()
    pending: collections.deque[concurrent.futures.Future] = collections.deque()
    for i in range(n):
        while True:
            try:
                pending.append(engine.submit(job(model, xs[i % len(xs)], ts[i % len(ts)], params)))
                break
            except ResourceExhausted:
                pending.popleft().result()
    for f in pending:
        f.result()
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="a dry run of the plumbing: 2 examples, n_steps 2, 4 requests in flight")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: CUDA is not available", file=sys.stderr)
        return 2
    w = gpu_workloads(args.smoke)["G2"]
    n_examples, n_requests = (2, 4) if args.smoke else (N_EXAMPLES, N_THROUGHPUT)
    xs = [torch.from_numpy(a) for a in w.inputs(n_examples)]
    ts = w.targets(n_examples)
    engine = Engine(EngineLimits(default_device=args.device))
    try:
        for repo in (GPU_MODELS, GPU_MODELS.parent / "gpu_models_bf16"):
            for spec in load_repository(repo):
                engine.load(spec)
        reference = build_model(w.model, GPU_MODELS).to(args.device)
        want = [run_captum(reference, w.algorithm, x.to(args.device), target=t, params=w.params).detach().cpu() for x, t in zip(xs, ts)]
        where = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device
        print(
            f"| model ({where}) | precision | rel. L2 error vs Captum fp32 | max abs error / max abs attribution "
            f"| cosine similarity | IG req/s (in process, {n_requests} in flight) |"
        )
        print("|---|---|---:|---:|---:|---:|")
        for name in ("bench_resnet18", "bench_resnet18_bf16"):
            model = engine.get_model(name)
            got = [engine.attribute(job(name, x, t, w.params), timeout=300).attributions[0] for x, t in zip(xs, ts)]
            g, r = torch.cat(got).double(), torch.cat(want).double()
            rel_l2 = float((g - r).norm() / r.norm())
            rel_max = float((g - r).abs().max() / r.abs().max())
            cosine = float(torch.nn.functional.cosine_similarity(g.flatten(), r.flatten(), dim=0))
            rps = throughput(engine, name, xs, ts, w.params, n_requests)
            print(f"| {name} | {model.spec.precision or 'float32'} | {rel_l2:.2e} | {rel_max:.2e} | {cosine:.6f} | {rps:.1f} |")
    finally:
        engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
