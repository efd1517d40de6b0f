"""Aggregate py-spy `--format raw` (collapsed stacks, recorded with --threads) into phases per thread role.

    python bench/prototypes/fold.py bench/out/prof/W1-idle.txt [--cpu bench/out/prof/W1-idle.cpu.json] [--top 0]

A sample is one line `thread (TID): NAME;frame;frame;...;leaf COUNT`. Every sample gets exactly one phase: the
first rule below that matches, so the table is reproducible from the file. Roles: the event loop (MainThread),
the engine worker (attrserve-worker-*), gRPC's poller (_poll_wrapper), asyncio's default executor threads,
the metrics HTTP server, other. The rules are about names in the stack (py-spy --native resolves the
Python frames and the exported C symbols; static libc/libgomp symbols show as addresses in their library).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys

LINE = re.compile(r"^thread \((\d+)\): ([^;]*);(.*) (\d+)$")


def role(name: str) -> str:
    if name.startswith("MainThread"):
        return "event loop"
    if name.startswith("attrserve-worker"):
        return "engine worker"
    if "_poll_wrapper" in name:
        return "gRPC poller"
    if name.startswith("asyncio_"):
        return "asyncio executor"
    if "serve_forever" in name or "process_request" in name:
        return "metrics HTTP"
    return "other"


def has(stack: str, *words: str) -> bool:
    return any(w in stack for w in words)


def leaf_lib(frames: list[str]) -> str:
    m = re.search(r"\(([^()]*)\)\s*$", frames[-1])
    return m.group(1).rsplit("/", 1)[-1] if m else ""


KERNEL = re.compile(r"at::native::|mkl_|sgemm|sgemv|Vectorized|cpu_kernel|_kernel|avx|vml|dnnl|ideep|max_pool|relu|addmm", re.IGNORECASE)


def classify(frames: list[str]) -> str:
    stack = ";".join(frames)
    leaf = frames[-1]
    lib = leaf_lib(frames)
    tail = ";".join(frames[-4:])
    # 1. waiting for the GIL: a C function that released it re-takes it (take_gil's condition wait), i.e. a
    #    pthread_cond_timedwait that is not a Python lock's own wait (PyThread_acquire_lock_timed).
    if "pthread_cond_timedwait" in tail and "PyThread_acquire_lock_timed" not in tail:
        return "GIL wait (take_gil)"
    if has(tail, "take_gil", "gil_scoped_acquire", "PyEval_RestoreThread", "PyEval_AcquireThread"):
        return "GIL wait (take_gil)"
    # 2. idle: blocked in epoll, a condition/queue wait, select
    if has(stack, "Scheduler._loop") and has(stack, "Condition.wait"):
        return "idle: waiting for work (queue condition)"
    # (uvloop's loop waits in libuv's uv__io_poll, in epoll_pwait)
    if has(tail, "epoll_wait", "epoll_pwait", "select_epoll_poll", "EpollSelector.select") or has(stack, "EpollSelector.select"):
        return "idle: epoll wait"
    if has(stack, "SimpleQueue_get", "serve_forever", "selectors.py", "select_poll_poll"):
        return "idle: executor/http threads waiting"
    if has(tail, "PyThread_acquire_lock_timed"):
        return "lock wait (Python lock/condition)"
    # 3. engine worker work
    if has(stack, "Scheduler.") and has(stack, "/algorithms/", "plan.py:", "targets.py:") and not has(stack, "run_pass"):
        return "engine: per-request plan steps (interpolate/integrate, targets; torch ops per request)"
    if has(stack, "Scheduler.") and not has(stack, "run_pass", "Engine._prepare", "Scheduler.submit"):
        if has(stack, "metrics.py", "prometheus_client", "EngineMetrics"):
            return "engine: metrics observers"
        if has(stack, "_resolve", "_succeed", "call_soon_threadsafe", "set_result", "_chain_future", "Future."):
            return "engine: hand results back (futures, loop wake-up)"
        return "engine: scheduler bookkeeping"
    if has(stack, "run_pass", "_fused_pass"):
        if "libgomp" in lib:
            return "torch: OpenMP fork/join/barrier (libgomp)"
        if has(stack, "_engine_run_backward", "autograd/__init__.py", "grad ("):
            if KERNEL.search(tail) or "libgomp" in stack:
                return "torch: backward kernels"
            if leaf.endswith(".py)") or re.search(r"\.py:\d+\)$", leaf):
                return "torch: autograd Python wrapper"
            if has(tail, "malloc", "free", "operator new", "operator delete", "madvise", "munmap", "mmap"):
                return "torch: allocator (malloc/free/mmap)"
            return "torch: autograd engine / dispatch (C++)"
        if has(stack, "forward (", "Module._call_impl", "_wrapped_call_impl"):
            if KERNEL.search(tail) or "libgomp" in stack:
                return "torch: forward kernels"
            if re.search(r"\.py:\d+\)$", leaf):
                return "torch: nn.Module Python (call/hooks)"
            if has(tail, "malloc", "free", "operator new", "operator delete", "madvise", "munmap", "mmap"):
                return "torch: allocator (malloc/free/mmap)"
            return "torch: forward dispatch (C++)"
        if KERNEL.search(tail) or "libgomp" in stack:
            return "torch: other kernels (plan: expand/cat/scale)"
        if re.search(r"\.py:\d+\)$", leaf):
            return "engine: executor Python (plan, targets, scatter)"
        return "engine: executor C/torch ops outside model"
    # 4. event loop / request path
    if has(stack, "request_to_job", "tensor_from_proto", "array_from_proto"):
        return "request: protobuf -> tensor (convert)"
    if has(stack, "result_to_response", "tensor_to_proto", "array_to_proto"):
        return "request: tensor -> protobuf (convert)"
    if has(stack, "Engine._prepare", "check_target", "format_target", "formatting.py", "parse_params", "check_inputs"):
        return "request: validation / _prepare"
    if has(stack, "Scheduler.submit", "Scheduler.admit", "Engine.submit", "pending_rows", "wrap_future"):
        return "request: engine submit / scheduler bookkeeping"
    if has(stack, "prometheus_client", "metrics.py"):
        return "request: metrics"
    if has(stack, "methods.py", "interceptor.py", "servicer.py"):
        return "request: servicer / methods.py Python"
    if "cygrpc" in stack:
        return "gRPC core (cygrpc: recv/send/call setup, HTTP/2)"
    if has(stack, "base_events.py", "events.py", "futures.py", "tasks.py", "base_futures.py", "selector_events.py"):
        return "asyncio loop machinery"
    if has(tail, "malloc", "free"):
        return "allocator (other)"
    return "other"


def load(path: str):
    per = collections.defaultdict(collections.Counter)
    tids = {}
    with open(path, errors="replace") as fh:
        for line in fh:
            m = LINE.match(line.rstrip("\n"))
            if not m:
                continue
            tid, name, rest, n = m.group(1), m.group(2), m.group(3), int(m.group(4))
            frames = rest.split(";")
            r = role(name)
            tids[int(tid)] = r
            per[r][classify(frames)] += n
    return per, tids


def report(path: str, cpu_path: str | None = None, roles=("event loop", "engine worker", "gRPC poller", "asyncio executor")) -> str:
    per, tids = load(path)
    out = [f"### {path}"]
    cpu = None
    if cpu_path:
        with open(cpu_path) as fh:
            cpu = json.load(fh)
    if cpu:
        wall = cpu["wall_s"]
        out.append(f"CPU per thread in the window ({wall:.1f} s wall, {cpu['requests']} requests; from /proc/<pid>/task):")
        out.append("| thread | role | CPU s | % of one core | CPU ms/req |")
        out.append("|---|---|---:|---:|---:|")
        groups = collections.Counter()
        for tid, (_comm, secs) in cpu["threads"].items():
            r = tids.get(int(tid), "non-Python (OpenMP pool / gRPC C-core / other)")
            groups[r] += secs
        for r, secs in groups.most_common():
            if secs >= 0.01:
                out.append(f"| {r} | | {secs:.2f} | {100 * secs / wall:.0f}% | {1e3 * secs / max(1, cpu['requests']):.3f} |")
        tot = sum(groups.values())
        out.append(f"| all | | {tot:.2f} | {100 * tot / wall:.0f}% | {1e3 * tot / max(1, cpu['requests']):.3f} |")
    for r in roles:
        c = per.get(r)
        if not c:
            continue
        total = sum(c.values())
        busy = sum(n for k, n in c.items() if not k.startswith("idle"))
        out += ["", f"{r}: {total} samples ({busy} not idle)", "| phase | % of all samples | % of non-idle |", "|---|---:|---:|"]
        for k, n in c.most_common():
            out.append(f"| {k} | {100 * n / total:.1f}% | {'' if k.startswith('idle') else f'{100 * n / busy:.1f}%'} |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("files", nargs="+")
    p.add_argument("--other", action="store_true", help="print the stacks classified 'other' (to refine the rules)")
    a = p.parse_args()
    for f in a.files:
        cpu = f[:-4] + ".cpu.json" if f.endswith(".txt") else None
        if cpu is not None:
            try:
                with open(cpu):  # only checks that the .cpu.json next to the profile exists and is readable
                    pass
            except OSError:
                cpu = None
        print(report(f, cpu))
        print()
        if a.other:
            with open(f) as fh:
                for line in fh:
                    m = LINE.match(line.rstrip("\n"))
                    if m and classify(m.group(3).split(";")) in (
                        "other",
                        "torch: forward dispatch (C++)",
                        "torch: autograd engine / dispatch (C++)",
                    ):
                        print(m.group(2), m.group(4), re.sub(r"/[^ ;]*/", "", ";".join(m.group(3).split(";")[-5:])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
