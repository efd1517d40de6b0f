"""Prototype 2b: the cost of a front-end / engine-core process split, against the same code in one process.

    .venv/bin/python bench/prototypes/split.py [--rounds 2] [--seconds 6] [--systems inproc,pipe,shm] [--intra 0]

Each system is a grpc.aio front that decodes attrserve's AttributeRequest (bench W1/W5 requests, attrserve's
protobuf) and an engine that runs the same compute code on the bench models:
  W1 (bench_mlp, IG n_steps 50, gausslegendre as Captum): every request waiting is fused into one pass
     (interpolate all, one forward+backward, per-request target, integrate) - attrserve's idea, minimal code;
  W5 (bench_cnn, Saliency): forward + backward on the one example, abs.
Systems (the engine loop is the same function in all three):
  inproc: the engine is a thread of the front process (queue.Queue in, loop.call_soon_threadsafe out): today's
          layout, two threads sharing one GIL;
  pipe:   the engine is its own process; requests and answers are pickled through multiprocessing.Pipe
          (a socketpair), the front reads answers with loop.add_reader;
  shm:    the engine is its own process; inputs and outputs live in one multiprocessing.shared_memory block
          (fixed slots, numpy/torch views: the engine reads the input and the front reads the output
          without a copy through the socket); only a 24-byte header (slot, kind, target) crosses a unix
          socketpair each way.
Run by this script as `split.py --serve SYSTEM --port P` in a fresh process per round; the load client is the
bench harness (W1: 32 callers, W5: 1 caller); server CPU is the front's process tree (engine included)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import socket
import struct
import sys
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # bench/

KIND_IG, KIND_SAL = 0, 1
SHAPES = {KIND_IG: (64,), KIND_SAL: (3, 32, 32)}
NSLOTS = 128
SLOT = 3 * 32 * 32 * 4
HDR = struct.Struct("<iiq q")  # slot/request id, kind, target, pad
N_STEPS = 50


# ------------------------------------------------------------------ engine (same code in every layout)
class Compute:
    def __init__(self, intra: int) -> None:
        import torch
        from captum.attr._utils.approximation_methods import approximation_parameters

        from workloads import build_model

        if intra:
            torch.set_num_threads(intra)
        self.torch = torch
        self.models = {KIND_IG: build_model("bench_mlp").eval(), KIND_SAL: build_model("bench_cnn").eval()}
        step_sizes, alphas = approximation_parameters("gausslegendre")
        self.steps = torch.tensor(step_sizes(N_STEPS), dtype=torch.float32)
        self.alphas = torch.tensor(alphas(N_STEPS), dtype=torch.float32)
        # warm
        self.run([(KIND_IG, np.zeros((1, 64), np.float32), 0)] * 4)
        self.run([(KIND_SAL, np.zeros((1, 3, 32, 32), np.float32), 0)])

    def run(self, jobs: list[tuple[int, np.ndarray, int]]) -> list[np.ndarray]:
        """jobs: (kind, input (1, ...), target) -> one attribution per job, same shape as its input."""
        torch = self.torch
        out: list = [None] * len(jobs)
        ig = [i for i, j in enumerate(jobs) if j[0] == KIND_IG]
        if ig:
            x = torch.cat([torch.from_numpy(jobs[i][1]) for i in ig])  # (k, F)
            k = x.shape[0]
            t = torch.tensor([jobs[i][2] for i in ig])
            scaled = (self.alphas.view(-1, 1, 1) * x.unsqueeze(0)).reshape(N_STEPS * k, -1).requires_grad_()  # baseline 0
            y = self.models[KIND_IG](scaled)
            sel = y.gather(1, t.repeat(N_STEPS).view(-1, 1)).sum()
            (g,) = torch.autograd.grad(sel, scaled)
            attr = (g.view(N_STEPS, k, -1) * self.steps.view(-1, 1, 1)).sum(0) * x
            a = attr.numpy()
            for n, i in enumerate(ig):
                out[i] = a[n : n + 1]
        for i, (kind, arr, target) in enumerate(jobs):
            if kind == KIND_SAL:
                x = torch.from_numpy(arr).requires_grad_()
                y = self.models[KIND_SAL](x)
                (g,) = torch.autograd.grad(y[0, target], x)
                out[i] = g.abs().numpy()
        return out


def engine_pipe(conn, intra: int) -> None:
    c = Compute(intra)
    conn.send("ready")
    while True:
        conn.poll(None)
        batch = []
        while conn.poll(0):
            batch.append(conn.recv())
        res = c.run([(k, a, t) for _, k, a, t in batch])
        for (rid, *_), r in zip(batch, res):
            conn.send((rid, r))


def engine_shm(sock: socket.socket, shm_name: str, intra: int) -> None:
    from multiprocessing import shared_memory

    c = Compute(intra)
    shm = shared_memory.SharedMemory(name=shm_name)
    inp = np.ndarray((NSLOTS, SLOT // 4), np.float32, shm.buf, 0)
    outp = np.ndarray((NSLOTS, SLOT // 4), np.float32, shm.buf, NSLOTS * SLOT)
    sock.sendall(b"R" * HDR.size)
    buf = b""
    while True:
        sock.setblocking(True)
        data = sock.recv(1 << 16)
        if not data:
            return
        buf += data
        sock.setblocking(False)
        try:
            while True:
                more = sock.recv(1 << 16)
                if not more:
                    break
                buf += more
        except BlockingIOError:
            pass
        n = len(buf) // HDR.size
        heads = [HDR.unpack_from(buf, i * HDR.size) for i in range(n)]
        buf = buf[n * HDR.size :]
        jobs = []
        for slot, kind, target, _ in heads:
            size = int(np.prod(SHAPES[kind]))
            jobs.append((kind, inp[slot, :size].reshape(1, *SHAPES[kind]), target))  # a view: no copy
        res = c.run(jobs)
        for (slot, _kind, _target, _), r in zip(heads, res):
            outp[slot, : r.size] = r.reshape(-1)
        sock.setblocking(True)
        sock.sendall(b"".join(HDR.pack(slot, kind, 0, 0) for slot, kind, _, _ in heads))


# ------------------------------------------------------------------ front
def serve(system: str, port: int, intra: int) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    futs: dict[int, asyncio.Future] = {}

    if system == "pipe":
        front, back = ctx.Pipe()
        proc = ctx.Process(target=engine_pipe, args=(back, intra), daemon=True)
        proc.start()
        assert front.recv() == "ready"
    elif system == "shm":
        from multiprocessing import shared_memory

        shm = shared_memory.SharedMemory(create=True, size=2 * NSLOTS * SLOT)
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        proc = ctx.Process(target=engine_shm, args=(b, shm.name, intra), daemon=True)  # the socket travels by DupFd
        proc.start()
        a.recv(HDR.size)
        inp = np.ndarray((NSLOTS, SLOT // 4), np.float32, shm.buf, 0)
        outp = np.ndarray((NSLOTS, SLOT // 4), np.float32, shm.buf, NSLOTS * SLOT)
        free = list(range(NSLOTS))
    else:
        compute = Compute(intra)
        q: queue.Queue = queue.Queue()

    import grpc

    from attrserve.v1 import attribution_service_pb2 as pb
    from attrserve.v1 import tensor_pb2

    SAL = pb.ALGORITHM_SALIENCY

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ids = iter(range(1 << 62))

        if system == "pipe":

            def on_read() -> None:
                while front.poll(0):
                    rid, r = front.recv()
                    f = futs.pop(rid)
                    if not f.done():
                        f.set_result(r)

            loop.add_reader(front.fileno(), on_read)
        elif system == "shm":
            a.setblocking(False)
            pend = bytearray()

            def on_read() -> None:
                try:
                    pend.extend(a.recv(1 << 16))
                except BlockingIOError:
                    return
                n = len(pend) // HDR.size
                for i in range(n):
                    slot, kind, _, _ = HDR.unpack_from(pend, i * HDR.size)
                    f = futs.pop(slot)
                    if not f.done():
                        f.set_result(outp[slot, : int(np.prod(SHAPES[kind]))].reshape(1, *SHAPES[kind]))
                    else:
                        free.append(slot)
                del pend[: n * HDR.size]

            loop.add_reader(a.fileno(), on_read)
        else:

            def worker() -> None:
                while True:
                    batch = [q.get()]
                    while True:
                        try:
                            batch.append(q.get_nowait())
                        except queue.Empty:
                            break
                    res = compute.run([(k, arr, t) for _, k, arr, t in batch])
                    for (f, *_), r in zip(batch, res):
                        loop.call_soon_threadsafe(f.set_result, r)

            threading.Thread(target=worker, daemon=True, name="engine").start()

        async def attribute(req: pb.AttributeRequest, context) -> pb.AttributeResponse:
            t = req.inputs[0]
            kind = KIND_SAL if req.algorithm == SAL else KIND_IG
            target = req.target.index
            arr = np.frombuffer(t.data, np.float32).reshape(tuple(t.shape))
            f = loop.create_future()
            if system == "pipe":
                rid = next(ids)
                futs[rid] = f
                front.send((rid, kind, arr, target))
                r = await f
                data = r.tobytes()
            elif system == "shm":
                slot = free.pop()
                inp[slot, : arr.size] = arr.reshape(-1)  # the one copy: protobuf bytes -> shared slot
                futs[slot] = f
                a.send(HDR.pack(slot, kind, target, 0))
                r = await f
                data = r.tobytes()  # shared slot -> protobuf bytes
                free.append(slot)
            else:
                q.put((f, kind, arr, target))
                r = await f
                data = r.tobytes()
            return pb.AttributeResponse(
                request_id=req.request_id, attributions=[tensor_pb2.Tensor(dtype=t.dtype, shape=list(t.shape), data=data)]
            )

        server = grpc.aio.server(options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)])
        handler = grpc.method_handlers_generic_handler(
            pb.DESCRIPTOR.services_by_name["AttributionService"].full_name,
            {
                "Attribute": grpc.unary_unary_rpc_method_handler(
                    attribute,
                    request_deserializer=pb.AttributeRequest.FromString,
                    response_serializer=pb.AttributeResponse.SerializeToString,
                )
            },
        )
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


# ------------------------------------------------------------------ driver
def wait_ready(target: str, proc, timeout: float = 120) -> None:
    import grpc

    from attrserve.v1 import attribution_service_pb2_grpc as pb_grpc

    from workloads import all_workloads

    req = all_workloads()["W1"].requests(1)[0]
    t0 = time.monotonic()
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.AttributionServiceStub(ch)
        while time.monotonic() - t0 < timeout:
            if proc.poll() is not None:
                raise RuntimeError("server exited")
            try:
                stub.Attribute(req, timeout=2)
                return
            except grpc.RpcError:
                time.sleep(0.2)
    raise RuntimeError("not ready")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--serve")
    p.add_argument("--port", type=int)
    p.add_argument("--intra", type=int, default=0, help="engine torch.set_num_threads (0: torch's default, 2 here)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=6)
    p.add_argument("--systems", default="attrserve,inproc,pipe,shm")
    p.add_argument("--json", default=os.path.join(HERE, "..", "out", "split.json"))
    a = p.parse_args()
    if a.serve:
        serve(a.serve, a.port, a.intra)
        return 0

    import common
    from common import harness

    systems = a.systems.split(",")
    results = {s: {"W1": [], "W5": []} for s in systems}
    for r in range(a.rounds):
        for s in systems:
            port = harness.free_port()
            mport = None
            if s == "attrserve":
                mport = harness.free_port()
                server = common.start("split-attrserve", common.attrserve_argv(port, mport), port)
            else:
                name, _, intra = s.partition(":")
                argv = [sys.executable, os.path.abspath(__file__), "--serve", name, "--port", str(port), "--intra", intra or str(a.intra)]
                server = harness.ServerProcess(s, argv, port, common.ROOT / "bench" / "out" / "proto_logs" / f"split-{s}.log")
                server.start()
                wait_ready(server.target, server.proc)
            try:
                for wk in ("W1", "W5"):
                    x = common.measure(server, wk, a.seconds, warmup=1.5, metrics_port=mport)
                    results[s][wk].append(x)
                    print(
                        f"round {r + 1} {s} {wk}: {x['req_s']:.0f} req/s p50 {x['p50']:.2f} ms p99 {x['p99']:.2f} "
                        f"cpu {x['cpu_ms_req']:.2f} ms/req ({100 * x['server_cpu_frac']:.0f}% of 2 cores) "
                        f"err {x['errors']} {x['err_samples']}",
                        flush=True,
                    )
            finally:
                server.stop()
    with open(a.json, "w") as fh:
        json.dump(results, fh, indent=1)
    print(common.table([(s, wk, results[s][wk]) for wk in ("W1", "W5") for s in systems]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
