"""Run `attrserve serve` with a sampling profiler and per-thread CPU accounting (diagnosis, not a benchmark).

    python bench/profile_server.py --out prof.txt -- serve --model-repository bench/models --port 50051 ...

bench/run.py uses it with `--attrserve-profile DIR`. Every --interval seconds a sampler thread records
each Python thread's stack (leaf function and the innermost few frames); at exit (SIGTERM, as the bench
stops servers) it writes, per thread: CPU seconds (from /proc/self/task/<tid>/stat, so OpenMP and gRPC
threads without Python frames are counted too) and where its samples fell. A thread blocked in C code
without the GIL still shows the Python line that called it, so read the samples together with the CPU
seconds. The sampler costs a little CPU and GIL time of its own (it is reported as a thread too).
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import sys
import threading
import time
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def _thread_cpu() -> dict[int, tuple[str, float]]:
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                raw = f.read()
            comm = raw[raw.index("(") + 1 : raw.rindex(")")]
            fields = raw.rsplit(")", 1)[1].split()
            out[int(tid)] = (comm, (int(fields[11]) + int(fields[12])) / _TICK)
        except (OSError, ValueError):
            continue
    return out


class Sampler:
    def __init__(self, interval: float, depth: int = 4) -> None:
        self.interval = interval
        self.depth = depth
        self.leaf: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.stacks: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self.reset()

    def reset(self) -> None:
        """Start the window afresh (SIGUSR1: the bench's measured window begins)."""
        self.leaf.clear()
        self.stacks.clear()
        self.samples = 0
        self.t0 = time.monotonic()
        self.cpu0 = _thread_cpu()

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(self.interval):
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                name = names.get(ident, str(ident))
                chain = []
                f = frame
                while f is not None and len(chain) < self.depth:
                    code = f.f_code
                    chain.append(f"{Path(code.co_filename).name}:{f.f_lineno}:{code.co_name}")
                    f = f.f_back
                self.leaf[name][chain[0]] += 1
                self.stacks[name][" <- ".join(chain)] += 1
            self.samples += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def report(self, top: int = 15) -> str:
        wall = time.monotonic() - self.t0
        lines = [
            f"wall {wall:.1f} s, {self.samples} samples every {1e3 * self.interval:.1f} ms",
            "",
            "CPU seconds per thread in the window:",
        ]
        natives = {t.native_id: t.name for t in threading.enumerate()}
        cpu = {tid: (comm, secs - self.cpu0.get(tid, ("", 0.0))[1]) for tid, (comm, secs) in _thread_cpu().items()}
        lines.append(f"  {sum(s for _, s in cpu.values()):8.2f} s  all threads ({wall:.1f} s wall)")
        for tid, (comm, secs) in sorted(cpu.items(), key=lambda kv: -kv[1][1]):
            if secs >= 0.05:
                lines.append(f"  {secs:8.2f} s  tid {tid:<8} {natives.get(tid, '(no Python thread: ' + comm + ')')}")
        for name, counter in sorted(self.leaf.items(), key=lambda kv: -sum(kv[1].values())):
            total = sum(counter.values())
            lines += ["", f"thread {name}: {total} samples; leaf functions:"]
            lines += [f"  {100 * n / total:5.1f}%  {where}" for where, n in counter.most_common(top)]
            lines += ["  stacks:"]
            lines += [f"  {100 * n / total:5.1f}%  {where}" for where, n in self.stacks[name].most_common(top)]
        return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--interval", type=float, default=0.002)
    p.add_argument("serve_args", nargs=argparse.REMAINDER, help="-- serve ARGS (as for `attrserve`)")
    args = p.parse_args()
    serve_args = args.serve_args[1:] if args.serve_args[:1] == ["--"] else args.serve_args
    from attrserve_service.cli import main as attrserve_main

    sampler = Sampler(args.interval)

    def write(*_) -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(sampler.report())

    signal.signal(signal.SIGUSR1, lambda *_: sampler.reset())  # the measured window starts
    signal.signal(signal.SIGUSR2, write)  # ... and ends
    sampler.start()
    try:
        return attrserve_main(serve_args)
    finally:
        sampler.stop()
        if not args.out.exists():
            write()


if __name__ == "__main__":
    sys.exit(main())
