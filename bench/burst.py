"""What a burst of calls sent at once gets, by --max-pending-calls: the price of that bound (bench/flood.py measures
what it saves). Calls that come faster than the front end's event loop takes them from gRPC wait in gRPC's core; past
the bound gRPC cancels the new ones (CANCELLED).

    .venv/bin/python bench/burst.py                                   # bursts of 500 and 2,000; ~1 minute
    .venv/bin/python bench/burst.py --bursts 300,1000 --settings 0,128,256,512

Each setting starts `attrserve serve` on the demo models (a fresh server, --device cpu), warms four channels with one
call each, then sends each burst at once: Saliency on the demo `image` model (one 3x16x16 example, a small request),
spread over the four channels, each call with a 30 s deadline. Per row: what the calls got and how long the burst
took. Nothing asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from query_of_death import print_rows  # noqa: E402
from servers import ServeProcess  # noqa: E402

from attrserve.v1 import attribution_service_pb2_grpc as pb_grpc  # noqa: E402
from attrserve_client import AttributionClient  # noqa: E402

CHANNELS = 4


async def burst(address: str, sizes: list[int]) -> list[tuple[dict[str, int], float]]:
    """Each burst in turn on the same four channels: (the calls' status codes, counted; seconds until the last ended)."""
    channels = [grpc.aio.insecure_channel(address) for _ in range(CHANNELS)]
    stubs = [pb_grpc.AttributionServiceStub(c) for c in channels]
    x = np.random.default_rng(0).random((1, 3, 16, 16), dtype=np.float32)
    request = AttributionClient.build_request("image", "saliency", x, target=1)
    await asyncio.gather(*(stub.Attribute(request, timeout=30) for stub in stubs))  # connected and warm
    out = []
    for n in sizes:
        codes: Counter[str] = Counter()

        async def one(i: int, codes: Counter[str] = codes) -> None:
            try:
                await stubs[i % CHANNELS].Attribute(request, timeout=30)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as e:
                codes[e.code().name] += 1

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        out.append((dict(codes), time.perf_counter() - start))
    for channel in channels:
        await channel.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bursts", default="500,2000", help="comma-separated calls a burst")
    parser.add_argument("--settings", default="0,256,512", help="comma-separated --max-pending-calls (0: gRPC's own)")
    args = parser.parse_args()
    sizes = [int(n) for n in args.bursts.split(",")]
    rows = []
    for bound in (int(v) for v in args.settings.split(",")):
        flags = ["--device", "cpu", "--log-level", "WARNING", "--max-pending-calls", str(bound)]
        with ServeProcess(flags) as server:
            for n, (codes, seconds) in zip(sizes, asyncio.run(burst(server.address, sizes))):
                rows.append(
                    {
                        "--max-pending-calls": bound or "0 (gRPC's own)",
                        "calls at once": n,
                        "got": ", ".join(f"{k} {v}" for k, v in sorted(codes.items())),
                        "seconds": f"{seconds:.2f}",
                    }
                )
    print_rows(rows)


if __name__ == "__main__":
    main()
