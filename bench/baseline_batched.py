"""B3: the strongest thing a user could run instead of attrserve: a well-tuned TorchServe with a batched Captum handler.

    python bench/baseline_batched.py --port 50072 [--workers 2] [--batch-size 8] [--max-batch-delay-ms 5]

It speaks the same `attrserve.v1.AttributionService` `Attribute` RPC as B2 (bench/baseline_server.py), so
the same load client drives it with the same requests, models and weights. Its shape is TorchServe's:

- a front process (grpc.aio, on the event loop `attrserve serve` picks: `--event-loop`, default auto) decodes each
  request and puts it on one queue;
- `--workers` worker processes (multiprocessing "spawn"), each with `OMP_NUM_THREADS=1` in its environment
  before torch is imported and `torch.set_num_threads(1)`, each loading every model once. As in TorchServe's
  batch aggregator, a worker that is free takes the first queued request and then up to `--batch-size` - 1
  more, waiting at most `--max-batch-delay-ms` after that first one; the batch goes to the worker as numpy
  arrays pickled over a pipe (TorchServe serialises too), the answers come back the same way;
- the worker's handler groups the batch by what a single Captum call can share (model, algorithm, layer,
  parameters, baseline kind, input shape and dtype, target kind), concatenates each group's inputs along dim 0
  and calls Captum ONCE per group with per-example targets (one entry per example, from each request's
  target), then splits the attributions back per request. A group whose call fails is retried one request at a
  time, so one bad request only fails itself.

`AttributeResponse.timing` carries each group's Captum passes (model forward calls) and rows, on the group's
first answer (pass_requests = the group's size), so the bench's per-response sums are the worker's totals.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc
import numpy as np
import torch
from baseline_server import BaselineServicer, decode

from attrserve.v1 import attribution_service_pb2 as pb
from attrserve.v1 import attribution_service_pb2_grpc as pb_grpc
from attrserve_client.tensors import to_tensor_proto
from attrserve_service import eventloop

from captum_calls import PassCounter, run_captum
from workloads import MODELS, build_model, model_names

WORKER_THREADS = 1


# -- the worker process: the batched handler ------------------------------------------------------
def _per_example(target: Any, n: int) -> list:
    """A request's target as one entry per example (int or tuple), or None for every example."""
    if isinstance(target, list):
        if len(target) != n:
            raise ValueError(f"{len(target)} per-example targets for {n} examples")
        return list(target)
    return [target] * n


def _target_kind(targets: list) -> str | None:
    kinds = {None if t is None else type(t).__name__ for t in targets}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def _group_key(index: int, call: dict) -> tuple:
    """What must be equal for requests to share one Captum call."""
    x = call["x"]
    b = call["baselines"]
    baseline = None if b is None else ("tensor",) if isinstance(b, np.ndarray) else ("scalar", b)
    kind = _target_kind(call["targets"])
    solo = index if kind == "mixed" else None  # a request mixing int and tuple targets gets a call of its own
    params = tuple(sorted((k, repr(v)) for k, v in call["params"].items()))
    return (call["model"], call["algorithm"], call["layer"], params, baseline, x.shape[1:], x.dtype.str, kind, solo)


def _captum(model: torch.nn.Module, counter: PassCounter, device: torch.device, calls: list[dict]) -> tuple[list[np.ndarray], int, int]:
    """One Captum call for `calls` (same group): inputs concatenated along dim 0, one target per example."""
    first = calls[0]
    x = torch.from_numpy(np.concatenate([c["x"] for c in calls])).to(device)
    baselines = first["baselines"]
    if isinstance(baselines, np.ndarray):
        baselines = torch.from_numpy(np.concatenate([np.broadcast_to(c["baselines"], c["x"].shape) for c in calls])).to(device)
    targets = [t for c in calls for t in c["targets"]]
    target = None if all(t is None for t in targets) else targets
    counter.take()
    out = run_captum(model, first["algorithm"], x, target=target, baselines=baselines, params=first["params"], layer=first["layer"])
    passes, rows = counter.take()
    out = out.detach().cpu().numpy()
    splits = np.cumsum([c["x"].shape[0] for c in calls])[:-1]
    return np.split(out, splits), passes, rows


def handle_batch(models: dict, device: torch.device, batch: list[dict]) -> list[dict]:
    """The handler: one answer per request of the batch (attributions or an error), in order."""
    answers: list[dict] = [{} for _ in batch]
    groups: dict[tuple, list[int]] = {}
    for i, call in enumerate(batch):
        try:
            if call["model"] not in models:
                raise KeyError(f"model {call['model']!r} is not served")
            call["targets"] = _per_example(call["target"], call["x"].shape[0])
            groups.setdefault(_group_key(i, call), []).append(i)
        except Exception as e:
            answers[i] = {"error": f"{type(e).__name__}: {e}"}
    for members in groups.values():
        calls = [batch[i] for i in members]
        model, counter = models[calls[0]["model"]]
        start = time.perf_counter()
        try:
            parts, passes, rows = _captum(model, counter, device, calls)
        except Exception as e:
            if len(members) == 1:
                answers[members[0]] = {"error": f"{type(e).__name__}: {e}"}
            else:  # one bad request must not fail the others: each on its own, each with its own answer
                for i in members:
                    answers[i] = handle_batch(models, device, [batch[i]])[0]
            continue
        compute_ms = 1e3 * (time.perf_counter() - start)
        total_n = sum(c["x"].shape[0] for c in calls)
        shares = [rows * c["x"].shape[0] // total_n for c in calls]
        shares[0] += rows - sum(shares)
        for j, (i, part) in enumerate(zip(members, parts)):
            answers[i] = {
                "attributions": part,
                "compute_ms": compute_ms,
                "passes": passes if j == 0 else 0,  # the group's passes once, so the bench's sums are the worker's totals
                "rows": shares[j],
                "pass_rows": rows,
                "pass_requests": len(members),
            }
    return answers


def worker_main(conn: multiprocessing.connection.Connection, repo: str, names: list[str], device: str) -> None:
    """A worker process: load every model once, then answer batches until told to stop (None) or the front is gone."""
    torch.set_num_threads(WORKER_THREADS)
    dev = torch.device(device)
    models = {}
    for name in names:
        model = build_model(name, Path(repo)).to(dev)
        models[name] = (model, PassCounter(model))
    conn.send(("ready", os.getpid(), torch.get_num_threads()))
    while True:
        try:
            batch = conn.recv()
        except (EOFError, OSError):
            return
        if batch is None:
            return
        conn.send(handle_batch(models, dev, batch))


# -- the front process ------------------------------------------------------------------------------
class Worker:
    """The front's end of one worker process: its pipe and a thread that does the blocking send/recv."""

    def __init__(self, ctx: Any, repo: Path, names: list[str], device: str, index: int) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main, args=(child, str(repo), names, device), name=f"b3-worker-{index}", daemon=True)
        self.proc.start()
        child.close()
        self.io = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"b3-io-{index}")

    def wait_ready(self) -> tuple:
        return self.conn.recv()

    def roundtrip(self, batch: list[dict]) -> list[dict]:
        self.conn.send(batch)
        return self.conn.recv()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        self.io.shutdown(wait=False, cancel_futures=True)


class BatchedServicer(BaselineServicer):
    """B2's servicer (ListModels, the model check) with `Attribute` going through the batch queue."""

    def __init__(self, names: list[str], workers: list[Worker], batch_size: int, max_delay_s: float) -> None:
        super().__init__(dict.fromkeys(names), noop=False, pool=None)
        self.workers = workers
        self.batch_size = batch_size
        self.max_delay_s = max_delay_s
        self.queue: asyncio.Queue[tuple[dict, float, asyncio.Future]] = asyncio.Queue()
        self.tasks = [asyncio.ensure_future(self._serve(w)) for w in workers]

    async def _serve(self, worker: Worker) -> None:
        """TorchServe's batch aggregator for one worker: when free, take the first request, fill up to batch_size
        within max_delay of it, run the batch on the worker, answer every request of it."""
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + self.max_delay_s
            while len(items) < self.batch_size:
                if not self.queue.empty():
                    items.append(self.queue.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            dispatched = time.perf_counter()
            try:
                answers = await loop.run_in_executor(worker.io, worker.roundtrip, [call for call, _, _ in items])
            except Exception as e:
                answers = [{"error": f"worker failed: {type(e).__name__}: {e}"}] * len(items)
            for (_, arrival, future), answer in zip(items, answers):
                if not future.done():
                    future.set_result((answer, arrival, dispatched))

    async def Attribute(self, request: pb.AttributeRequest, context: grpc.aio.ServicerContext) -> pb.AttributeResponse:
        if request.model not in self.models:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.model!r} is not served")
        arrival = time.perf_counter()
        try:
            call = decode(request)
        except (ValueError, KeyError, IndexError) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{type(e).__name__}: {e}")
        call["x"] = call["x"].numpy()
        if isinstance(call["baselines"], torch.Tensor):
            call["baselines"] = call["baselines"].numpy()
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        await self.queue.put((call, arrival, future))
        answer, arrival, dispatched = await future
        if "error" in answer:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, answer["error"])
        return pb.AttributeResponse(
            request_id=request.request_id,
            attributions=[to_tensor_proto(answer["attributions"])],
            model_version="1",
            timing=pb.Timing(
                queue_ms=1e3 * (dispatched - arrival),
                compute_ms=answer["compute_ms"],
                total_ms=1e3 * (time.perf_counter() - arrival),
                rows=answer["rows"],
                passes=answer["passes"],
                pass_rows=answer["pass_rows"],
                pass_requests=answer["pass_requests"],
            ),
        )


async def serve(port: int, n_workers: int, batch_size: int, max_delay_ms: float, repo: Path, names: list[str], device: str = "cpu") -> None:
    # The workers read OMP_NUM_THREADS when they import torch (spawn: a fresh interpreter that inherits this environment).
    os.environ["OMP_NUM_THREADS"] = str(WORKER_THREADS)
    ctx = multiprocessing.get_context("spawn")
    workers = [Worker(ctx, repo, names, device, i) for i in range(n_workers)]
    try:
        loop = asyncio.get_running_loop()
        ready = await asyncio.gather(*(loop.run_in_executor(w.io, w.wait_ready) for w in workers))
        servicer = BatchedServicer(names, workers, batch_size, max_delay_ms / 1e3)
        server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1), ("grpc.so_reuseport", 0)]
        )
        pb_grpc.add_AttributionServiceServicer_to_server(servicer, server)
        bound = server.add_insecure_port(f"127.0.0.1:{port}")
        if bound == 0:
            raise OSError(f"could not bind 127.0.0.1:{port}")
        await server.start()
        pids = ", ".join(f"pid {pid} ({threads} torch thread{'s' * (threads != 1)})" for _, pid, threads in ready)
        print(
            f"batched baseline server ({n_workers} workers: {pids}; batches of <= {batch_size}, <= {max_delay_ms:g} ms delay, {device}) "
            f"listening on 127.0.0.1:{bound}",
            flush=True,
        )
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop(2)
        for task in servicer.tasks:
            task.cancel()
    finally:
        for w in workers:
            w.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--workers", type=int, default=2, help="worker processes, one torch thread each (default 2)")
    p.add_argument("--batch-size", type=int, default=8, help="most requests per batch (default 8)")
    p.add_argument("--max-batch-delay-ms", type=float, default=5.0, help="longest wait after a batch's first request (default 5)")
    p.add_argument("--model-repository", type=Path, default=MODELS, help="folder of model folders (default: bench/models)")
    p.add_argument("--models", default="", help="comma-separated model folders to serve (default: all)")
    p.add_argument("--device", default="cpu", help="where the workers run Captum: cpu or cuda[:i]")
    p.add_argument(
        "--event-loop", default="auto", choices=eventloop.EVENT_LOOPS, help="as attrserve serve's (default auto: uvloop where installed)"
    )
    args = p.parse_args(argv)
    names = [n for n in args.models.split(",") if n] or model_names(args.model_repository)
    eventloop.run(
        partial(serve, args.port, args.workers, args.batch_size, args.max_batch_delay_ms, args.model_repository, names, args.device),
        args.event_loop,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
