"""L, the compute limit: the rows of N concurrent requests as fused in-process passes, no RPC, no Captum.

Definition (W1-W4). Take the N = concurrency requests that are in flight at once (32 single-example
requests by default). Materialize, before the clock starts, every model row those N requests need —
  IntegratedGradients: the N*n_steps interpolated inputs (baseline 0, x * alpha);
  LayerIntegratedGradients: the 2N token rows whose embedding activations are needed (inputs and
    baselines), and the N*n_steps interpolated embedding activations;
  Occlusion: the N unoccluded inputs and the N*windows occluded copies —
then time only what the model must do with them, in chunks of c rows:
  gradient rows: forward, pick each row's target logit, sum, torch.autograd.grad w.r.t. the rows
    (for LayerIntegratedGradients w.r.t. the embedding output, substituted by a forward hook);
  forward rows: forward under torch.no_grad.
Each chunk size c in CHUNKS (and c = all rows) is timed best-of-several; L's throughput is
N / (best total time) requests per second, and its chunk size is the best c. Gradient rows run in PyTorch's
default (contiguous) layout, the one Captum runs in: channels_last runs a CNN faster on a CPU but its
gradients are not Captum's on every input, so attrserve lays gradient passes out so only where a config
opts in, and an L in it would bound answers that differ. Forward rows (Occlusion) of a model with 2-D
convolutions are also timed with channels_last inputs, which move outputs by rounding only, and L takes
the faster, as attrserve's load does (docs/ARCHITECTURE.md, "Pass layout"). It leaves out what any
serving path must add — building and reducing rows, (de)serialization, RPC, scheduling — so it is an
upper bound on what fusion can reach on this machine, not something a server can equal.
"""

from __future__ import annotations

import copy
import functools
import time

import torch

from workloads import Workload

CHUNKS = (16, 32, 64, 128, 256, 512, 1024)


def _chunks(total: int) -> list[int]:
    return sorted({c for c in CHUNKS if c < total} | {total})


def _best(fn, min_seconds: float, max_reps: int = 5) -> float:
    fn()  # warm-up (allocator, first-call costs)
    best = float("inf")
    spent = 0.0
    reps = 0
    while reps < 2 or (spent < min_seconds and reps < max_reps):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best = min(best, dt)
        spent += dt
        reps += 1
    return best


def measure_limit(w: Workload, model: torch.nn.Module, n_requests: int, min_seconds: float = 0.3) -> dict:
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    inputs = w.inputs(n_requests)
    x = torch.cat([torch.from_numpy(a) for a in inputs])  # (N, *shape)
    targets = torch.tensor(w.targets(n_requests), dtype=torch.int64)
    n_steps = int(w.params.get("n_steps", 50))
    alphas = torch.linspace(0.0, 1.0, n_steps)

    def gradient_rows(rows: torch.Tensor, t: torch.Tensor, c: int, tokens: torch.Tensor | None = None) -> None:
        for s in range(0, rows.shape[0], c):
            chunk = rows[s : s + c].detach().requires_grad_(True)
            if tokens is None:
                out = model(chunk)
            else:  # LayerIntegratedGradients: the chunk replaces the embedding's output
                handle = model.get_submodule(w.layer).register_forward_hook(lambda m, i, o, chunk=chunk: chunk)
                try:
                    out = model(tokens[s : s + c])
                finally:
                    handle.remove()
            sel = out.gather(1, t[s : s + c, None]).sum()
            torch.autograd.grad(sel, chunk)

    def forward_rows(rows: torch.Tensor, c: int) -> None:
        with torch.no_grad():
            for s in range(0, rows.shape[0], c):
                model(rows[s : s + c])

    if w.algorithm == "integrated_gradients":
        rows = (alphas.view(-1, 1, *([1] * (x.dim() - 1))) * x.unsqueeze(0)).reshape(-1, *x.shape[1:])  # step-major
        row_t = targets.repeat(n_steps)
        total = rows.shape[0]

        def run(rows: torch.Tensor, c: int) -> None:
            gradient_rows(rows, row_t, c)
    elif w.algorithm == "layer_integrated_gradients":
        base = torch.zeros_like(x)
        stage1 = torch.cat([x, base])
        with torch.no_grad():
            emb_x = model.get_submodule(w.layer)(x)
            emb_b = model.get_submodule(w.layer)(base)
        rows = (emb_b.unsqueeze(0) + alphas.view(-1, 1, 1, 1) * (emb_x - emb_b).unsqueeze(0)).reshape(-1, *emb_x.shape[1:])
        tokens = x.repeat(n_steps, 1)
        row_t = targets.repeat(n_steps)
        total = rows.shape[0] + stage1.shape[0]

        def run(rows: torch.Tensor, c: int) -> None:
            forward_rows(stage1, c)
            gradient_rows(rows, row_t, c, tokens)
    elif w.algorithm == "occlusion":
        win, stride = w.params["sliding_window_shapes"], w.params["strides"]
        copies = [x]
        counts = [(size - k) // s + 1 for size, k, s in zip(x.shape[1:], win, stride)]
        for idx in torch.cartesian_prod(*[torch.arange(n) for n in counts]).tolist():
            occluded = x.clone()
            occluded[(slice(None), *[slice(i * s, i * s + k) for i, s, k in zip(idx, stride, win)])] = 0.0
            copies.append(occluded)
        rows = torch.cat(copies)
        total = rows.shape[0]
        run = forward_rows
    else:
        raise ValueError(f"L is not defined for {w.algorithm}")

    layouts = [torch.contiguous_format]
    if run is forward_rows and rows.dim() == 4 and any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        layouts.append(torch.channels_last)  # forward rows alone: their outputs move by rounding only (attrserve's auto)
    timed = {
        layout: {c: _best(functools.partial(run, rows.contiguous(memory_format=layout), c), min_seconds) for c in _chunks(total)}
        for layout in layouts
    }
    layout = min(timed, key=lambda k: min(timed[k].values()))
    per_chunk = timed[layout]
    best_c = min(per_chunk, key=per_chunk.get)
    best = per_chunk[best_c]
    return {
        "requests": n_requests,
        "rows": total,
        "best_chunk_rows": best_c,
        "passes": -(-total // best_c),
        "seconds": best,
        "throughput_rps": n_requests / best,
        "rows_per_s": total / best,
        "per_chunk_rows_per_s": {str(c): round(total / t, 1) for c, t in per_chunk.items()},
        "layout": "channels_last inputs" if layout is torch.channels_last else "contiguous",
    }
