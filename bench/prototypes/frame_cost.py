"""CPU per frame between attrserve's two processes: one thread encodes and writes frames to a socket pair as the
engine does (`encode_parts`, `send_parts`), the event loop reads and decodes them with the front's reader (`FrameReader`);
each side's CPU time per frame (`time.thread_time`).

    .venv/bin/python bench/prototypes/frame_cost.py                                   # this checkout
    PYTHONPATH=<other checkout>/service:<other checkout>/engine .venv/bin/python bench/prototypes/frame_cost.py

Two frames: a W6 result (a 3x224x224 float32 attribution, 588 KiB, and the output) and a W1 worker step (five
results of a 64-feature MLP). Every frame is decoded and its messages handed on, as the front does. Run it under
either checkout's code through PYTHONPATH to compare them (an older checkout without `send_parts` is written to
with `sendall(encode(...))`, as that code's engine did). Pure CPU, a few seconds per checkout.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import socket
import statistics
import threading
import time

import torch

from attrserve_service import frames as ep

FRAMES = {
    "W6 result (588 KiB)": [("result", 1, {"attributions": torch.randn(1, 3, 224, 224), "output": torch.randn(1, 10)})],
    "W1 worker step (5 results)": [("result", i, {"attributions": torch.randn(1, 64), "output": torch.randn(1, 2)}) for i in range(5)],
}


async def cpu_per_frame(message: list, count: int) -> tuple[float, float]:
    """Microseconds of CPU per frame: the writer thread's (encode, write), the event loop's (read, decode)."""
    writer_end, reader_end = getattr(ep, "_socketpair", socket.socketpair)()
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    seen = 0

    def received(_message: object) -> None:
        nonlocal seen
        seen += 1
        if seen == count * len(message):
            done.set()

    front = {"tensors": False} if "tensors" in inspect.signature(ep.FrameReader).parameters else {}  # numpy arrays
    transport, _ = await loop.create_unix_connection(lambda: ep.FrameReader(received, lambda: None, **front), sock=reader_end)
    if hasattr(ep, "send_parts"):
        # The engine's answers are checked for what the front may read (`to_front`, since issue 12 step 32; before, always).
        engine = {"to_front": True} if "to_front" in inspect.signature(ep.encode_parts).parameters else {}

        def send() -> None:
            ep.send_parts(writer_end, ep.encode_parts(message, **engine))
    else:

        def send() -> None:
            writer_end.sendall(ep.encode(message))

    writer_cpu = 0.0

    def write() -> None:
        nonlocal writer_cpu
        start = time.thread_time()
        for _ in range(count):
            send()
        writer_cpu = time.thread_time() - start

    reader_start = time.thread_time()
    writer = threading.Thread(target=write)
    writer.start()
    await done.wait()
    reader_cpu = time.thread_time() - reader_start
    writer.join()
    transport.close()
    writer_end.close()
    return writer_cpu / count * 1e6, reader_cpu / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--frames", type=int, default=2000, help="frames per repeat")
    args = parser.parse_args()
    print(f"code: {ep.__file__}")
    print("| frame | writer CPU µs per frame: median (min-max) | reader CPU µs per frame: median (min-max) |")
    print("|---|---:|---:|")
    for name, message in FRAMES.items():
        runs = [asyncio.run(cpu_per_frame(message, args.frames)) for _ in range(args.repeats)]
        cells = []
        for side in (0, 1):
            values = [r[side] for r in runs]
            cells.append(f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})")
        print(f"| {name} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
