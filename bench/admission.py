"""Admission in numbers: what a refusal costs the engine, and what six huge IG requests sent at once do.

    .venv/bin/python bench/admission.py

1. Engine time of a refused request: a model's queue is filled (held, so nothing drains), then 2,000 more requests
   are submitted and refused by the quick check, before any parsing (`Engine.submit` → `Scheduler.admit`).
2. Six 307 KB requests at once (IG on the demo `image` model, 100 examples × 1,000 steps = 100,000 rows each) to
   `attrserve serve --no-batch-probe`: what each gets, and the server's RSS before, at its peak and after.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from doubles import Linear3  # noqa: E402
from servers import ServeProcess  # noqa: E402

from attrserve.v1 import attribution_service_pb2_grpc as pb_grpc  # noqa: E402
from attrserve_client import AttributionClient  # noqa: E402
from attrserve_engine import AttributionJob, Engine, EngineLimits, InputSpec, ModelSpec, ResourceExhausted  # noqa: E402


def refusal_cost(n: int = 2000) -> float:
    engine = Engine(EngineLimits(probe_batch_rows=False, default_device="cpu"))
    engine.load(ModelSpec(name="m", module=Linear3(), inputs=[InputSpec("x", torch.float32, (3,))], max_batch_rows=64, max_queued_rows=100))
    job = AttributionJob(model="m", algorithm="integrated_gradients", inputs=(torch.randn(2, 3),), target=0)
    try:
        with engine.held():
            engine.submit(job)  # 100 rows: the queue is at its bound
            start = time.perf_counter()
            for _ in range(n):
                with contextlib.suppress(ResourceExhausted):
                    engine.submit(job)
            return (time.perf_counter() - start) / n
    finally:
        engine.shutdown(drain=False, timeout=5)


def rss_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024
    return 0


def six_big_requests() -> tuple[list[str], int, int, int]:
    with ServeProcess(["--no-batch-probe"]) as server:
        x = np.random.default_rng(0).random((100, 3, 16, 16), dtype=np.float32)
        request = AttributionClient.build_request("image", "integrated_gradients", x, target=1, params={"n_steps": 1000})
        before = rss_mib(server.proc.pid)
        peak = before
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.AttributionServiceStub(channel)
            calls = [stub.Attribute.future(request, timeout=300) for _ in range(6)]
            while not all(c.done() for c in calls):
                peak = max(peak, rss_mib(server.proc.pid))
                time.sleep(0.05)
            outcomes = []
            for call in calls:
                try:
                    call.result()
                    outcomes.append("OK")
                except grpc.RpcError as e:
                    outcomes.append(e.code().name)
        return outcomes, before, peak, rss_mib(server.proc.pid)


def main() -> None:
    print("| measure | value |\n|---|---|")
    print(f"| engine time of a refused request (queue at its bound) | {refusal_cost() * 1e6:.1f} µs |")
    outcomes, before, peak, after = six_big_requests()
    print(f"| six 100,000-row IG requests at once | {', '.join(f'{outcomes.count(o)} {o}' for o in sorted(set(outcomes)))} |")
    print(f"| server RSS before / peak / after | {before} / {peak} / {after} MiB |")


if __name__ == "__main__":
    main()
