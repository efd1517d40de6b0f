"""Several single-threaded pass workers against one worker with more intra-op threads, in-process, no RPC.

For W1-W4, the rows L times (bench/limit.py's definition) are cut into passes of a fixed size and run:
  1x1: one thread, 1 intra-op thread (the engine's default on 2 cores);
  1x2: one thread, 2 intra-op threads (ModelConfig.intra_op_threads = 2);
  2x1: two Python threads taking passes from one list, 1 intra-op thread each (two pass workers per device).
Rounds alternate (1x1, 1x2, 2x1, 1x1, ...); rows/s per round. Torch releases the GIL inside its ops and
autograd's backward, so two workers overlap compute and pay only the Python between ops twice.

  .venv/bin/python bench/prototypes/workers_ab.py --workloads W2,W3 --rounds 3 --pass-rows 128
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # bench/

import torch  # noqa: E402

from workloads import all_workloads, build_model  # noqa: E402


def passes(w, model, n_requests: int, pass_rows: int) -> list:
    """Closures, one per pass, over the rows 32 requests need (as bench/limit.py builds them)."""
    x = torch.cat([torch.from_numpy(a) for a in w.inputs(n_requests)])
    targets = torch.tensor(w.targets(n_requests), dtype=torch.int64)
    n_steps = int(w.params.get("n_steps", 50))
    alphas = torch.linspace(0.0, 1.0, n_steps)
    out = []
    if w.algorithm == "integrated_gradients":
        rows = (alphas.view(-1, 1, *([1] * (x.dim() - 1))) * x.unsqueeze(0)).reshape(-1, *x.shape[1:])
        row_t = targets.repeat(n_steps)
        for s in range(0, rows.shape[0], pass_rows):

            def grad_pass(chunk=rows[s : s + pass_rows], t=row_t[s : s + pass_rows]):
                chunk = chunk.detach().requires_grad_(True)
                torch.autograd.grad(model(chunk).gather(1, t[:, None]).sum(), chunk)

            out.append(grad_pass)
    elif w.algorithm == "layer_integrated_gradients":
        layer = model.get_submodule(w.layer)
        with torch.no_grad():
            emb_x, emb_b = layer(x), layer(torch.zeros_like(x))
        rows = (emb_b.unsqueeze(0) + alphas.view(-1, 1, 1, 1) * (emb_x - emb_b).unsqueeze(0)).reshape(-1, *emb_x.shape[1:])
        tokens, row_t = x.repeat(n_steps, 1), targets.repeat(n_steps)
        for s in range(0, rows.shape[0], pass_rows):

            def layer_pass(chunk=rows[s : s + pass_rows], tok=tokens[s : s + pass_rows], t=row_t[s : s + pass_rows]):
                chunk = chunk.detach().requires_grad_(True)
                handle = layer.register_forward_hook(lambda m, i, o: chunk)
                try:
                    y = model(tok)
                finally:
                    handle.remove()
                torch.autograd.grad(y.gather(1, t[:, None]).sum(), chunk)

            out.append(layer_pass)
    elif w.algorithm == "occlusion":
        copies = [x]
        win, stride = w.params["sliding_window_shapes"], w.params["strides"]
        counts = [(size - k) // st + 1 for size, k, st in zip(x.shape[1:], win, stride)]
        for idx in torch.cartesian_prod(*[torch.arange(n) for n in counts]).tolist():
            occluded = x.clone()
            occluded[(slice(None), *[slice(i * st, i * st + k) for i, st, k in zip(idx, stride, win)])] = 0.0
            copies.append(occluded)
        rows = torch.cat(copies)
        for s in range(0, rows.shape[0], pass_rows):

            def forward_pass(chunk=rows[s : s + pass_rows]):
                with torch.no_grad():
                    model(chunk)

            out.append(forward_pass)
    return out


def run(work: list[list], workers: int, threads: int) -> float:
    """Seconds to run every pass on `workers` threads of `threads` intra-op threads each. work[i] is the passes
    over worker i's own copy of the model (hooks are module state: concurrent passes need their own instance)."""
    lock = threading.Lock()
    left = [len(work[0])]

    def body(mine: list) -> None:
        torch.set_num_threads(threads)
        while True:
            with lock:
                if not left[0]:
                    return
                left[0] -= 1
                i = left[0]
            mine[i]()

    pool = [threading.Thread(target=body, args=(work[i],)) for i in range(workers)]
    start = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="W1,W2,W3,W4")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pass-rows", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3, help="times the 32 requests' rows are run per measurement")
    args = ap.parse_args()
    configs = {"1x1": (1, 1), "1x2": (1, 2), "2x1": (2, 1)}
    print("| workload | pass rows | config | rows/s per round | median rows/s | vs 1x1 |")
    print("|---|---:|---|---|---:|---:|")
    for key in args.workloads.split(","):
        w = all_workloads()[key]
        model = build_model(w.model).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        work = [passes(w, m, w.concurrency, args.pass_rows) * args.repeat for m in (model, copy.deepcopy(model))]
        rows = len(work[0]) * args.pass_rows  # the last pass of each repeat may be short: close enough
        run(work, 2, 1)  # warm-up
        got: dict[str, list[float]] = {name: [] for name in configs}
        for _ in range(args.rounds):
            for name, (workers, threads) in configs.items():
                got[name].append(rows / run(work, workers, threads))
        base = statistics.median(got["1x1"])
        for name, values in got.items():
            med = statistics.median(values)
            print(f"| {key} | {args.pass_rows} | {name} | {', '.join(f'{v:,.0f}' for v in values)} | {med:,.0f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
