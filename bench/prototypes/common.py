"""Shared pieces of the issue-12 prototypes: start a server, drive W1 (32 callers) / W5 (1 caller), measure.

Server CPU is summed over the server's process tree (children included), from /proc, so split layouts
(front + engine processes, SO_REUSEPORT pairs) are charged for every process they run."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # bench/

import harness  # noqa: E402
from workloads import MODELS, all_workloads  # noqa: E402

ROOT = HERE.parents[1]
W = all_workloads()
_TICK = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc/*/stat's ppid)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def tree_ticks(pids: list[int]) -> int:
    return sum(harness._proc_ticks(p) for p in pids)


def config_tokens(tokens: list[str], own: tuple[str, ...] = ()) -> tuple[list[str], dict[str, str]]:
    """A configuration's tokens (a prototype's `--config NAME=FLAGS`, split on spaces): its `attrserve serve` flags,
    and its `env:KEY=VALUE` environment variables for the server. Tokens that start with one of `own` (a tool's own
    settings, such as layout_ab's `scrape:S`) are in neither."""
    flags = [t for t in tokens if not t.startswith(("env:", *own))]
    env = dict(t[4:].split("=", 1) for t in tokens if t.startswith("env:"))
    return flags, env


def attrserve_argv(port: int, metrics_port: int, extra: list[str] | None = None) -> list[str]:
    return harness.attrserve_argv(MODELS, port, metrics_port, extra or [])


def start(name: str, argv: list[str], port: int, env: dict[str, str] | None = None, models=("bench_mlp", "bench_cnn")):
    s = harness.ServerProcess(name, argv, port, ROOT / "bench" / "out" / "proto_logs" / f"{name}.log", env=env)
    s.start()
    s.wait_ready(list(models))
    return s


def measure(
    server, wkey: str, seconds: float, warmup: float = 1.5, metrics_port: int | None = None, concurrency: int | None = None
) -> dict:
    w = W[wkey]
    reqs = w.requests()
    c = concurrency or w.concurrency
    harness.drive(server.target, reqs, c, warmup, record=False)
    pids = tree(server.pid)
    before = harness.scrape(metrics_port, w.model) if metrics_port else None
    t0, k0, b0 = time.monotonic(), tree_ticks(pids), harness._busy_ticks()
    load = harness.drive(server.target, reqs, c, seconds, record=True)
    wall = time.monotonic() - t0
    cpu_s = (tree_ticks(pids) - k0) / _TICK
    busy_s = (harness._busy_ticks() - b0) / _TICK
    n = len(load.latencies_ms)
    st = harness.latency_stats(load.latencies_ms)
    out = {
        "req_s": n / load.wall_s,
        "p50": st["p50_ms"],
        "p99": st["p99_ms"],
        "errors": load.errors,
        "cpu_ms_req": 1e3 * cpu_s / n if n else None,
        "server_cpu_frac": cpu_s / (wall * (os.cpu_count() or 1)),
        "machine_busy_frac": busy_s / (wall * (os.cpu_count() or 1)),
        "n": n,
        "err_samples": load.error_samples[:2],
    }
    if metrics_port:
        after = harness.scrape(metrics_port, w.model)
        e = harness.metrics_delta(before, after, load.wall_s)
        out["rows_per_pass"] = e["rows_per_pass"]
        out["req_per_pass"] = e["requests_per_pass"]
    return out


def fmt(v, d=2):
    return "—" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))


def table(rows: list[tuple[str, str, dict]]) -> str:
    """rows of (system, workload, mean-of-rounds dict with 'rounds' list)."""
    lines = [
        (
            "| system | workload | rounds | req/s (mean; per round) | p50 ms (median of rounds) | p99 ms "
            "| server CPU ms/req | server CPU % of 2 cores | rows/pass |"
        ),
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    import statistics as S

    for system, wk, rs in rows:
        rps = [r["req_s"] for r in rs]
        lines.append(
            f"| {system} | {wk} | {len(rs)} | {S.mean(rps):.1f} ({', '.join(f'{x:.0f}' for x in rps)}) | "
            f"{S.median([r['p50'] for r in rs]):.2f} | {S.median([r['p99'] for r in rs]):.2f} | "
            f"{S.median([r['cpu_ms_req'] for r in rs]):.2f} | {100 * S.mean([r['server_cpu_frac'] for r in rs]):.0f}% | "
            f"{fmt(S.median([r['rows_per_pass'] for r in rs]) if all(r.get('rows_per_pass') for r in rs) else None, 0)} |"
        )
    return "\n".join(lines)


async def _drive_multi(targets, requests, concurrency, seconds, channels, lat, errs):
    import asyncio

    import grpc

    from attrserve.v1 import attribution_service_pb2_grpc as pb_grpc

    chans = [
        grpc.aio.insecure_channel(targets[i % len(targets)], options=harness._CHANNEL_OPTIONS + [("grpc.use_local_subchannel_pool", 1)])
        for i in range(channels)
    ]
    stubs = [pb_grpc.AttributionServiceStub(c) for c in chans]
    t_end = time.perf_counter() + seconds

    async def caller(c: int) -> None:
        stub, i = stubs[c % channels], c
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            try:
                await stub.Attribute(requests[i % len(requests)], timeout=60)
                lat.append(1e3 * (time.perf_counter() - t0))
            except grpc.aio.AioRpcError:
                errs.append(1)
            i += concurrency

    await asyncio.gather(*(caller(c) for c in range(concurrency)))
    for c in chans:
        await c.close()


def drive_multi(target, requests, concurrency, seconds, channels):
    """Like harness.drive, but the callers are spread over `channels` separate channels (separate TCP
    connections: a local subchannel pool per channel), so SO_REUSEPORT can spread them over processes.
    `target` may be a list of servers: channel i goes to the i-th, in turns. Returns (latencies in ms, errors,
    wall seconds)."""
    import asyncio

    lat, errs = [], []
    t0 = time.perf_counter()
    targets = [target] if isinstance(target, str) else list(target)
    asyncio.run(_drive_multi(targets, requests, concurrency, seconds, channels, lat, errs))
    return lat, len(errs), time.perf_counter() - t0
