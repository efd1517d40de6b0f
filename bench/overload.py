"""Overload: what attrserve does when it is offered far more work than it can do, and whether it recovers.

    .venv/bin/python bench/overload.py                 # ~30 s: capacity 5 s, 0.5x 5 s, 4x burst 10 s, 0.5x 5 s
    .venv/bin/python bench/overload.py --quick         # every phase 3 s
    .venv/bin/python bench/overload.py --seconds 20 --factor 8 --json /tmp/overload.json

`attrserve serve` (demo models, --device cpu, default admission flags unless --server-arg adds some) runs as a
subprocess on free 127.0.0.1 ports. The workload is IntegratedGradients on the demo `image` model (one 3x16x16
example, n_steps 50), 16 fixed inputs cycled, target = index mod 2. Phases, all in one run against one server:

1. warm-up (1 s, closed loop, unmeasured);
2. capacity: closed loop, --callers (16) concurrent callers for --capacity-seconds (5 s): answered requests / s;
3. baseline: open loop at --after-factor (0.5) x capacity for --after-seconds (5 s): normal latency;
4. burst: open loop at --factor (4) x capacity for --seconds (10 s);
5. recovery: once every burst request has its answer, open loop at 0.5 x capacity again for --after-seconds.

Open loop: one asyncio process sends each request at its scheduled time (t0 + i / rate) whether or not earlier ones
have answered (grpc.aio: a send never waits for a response); every request carries a --deadline (2 s) gRPC deadline.
Per request it records the outcome code, the latency (send -> answer or error) and, for RESOURCE_EXHAUSTED, whether
the `grpc-retry-pushback-ms` trailer came back. A thread samples the server's VmRSS (/proc/PID/status) every 100 ms
and its `attrserve_queue_rows{model="image"}` (/metrics) every 250 ms; refusal counts by reason come from
`attrserve_requests_refused_total` read before and after the burst.

Prints a markdown table (and writes the JSON with every number, --json). Nothing here asserts anything.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from attrserve.v1 import attribution_service_pb2 as pb
from attrserve_client import AsyncAttributionClient, AttributionClient

import harness

MODEL = "image"
PUSHBACK = "grpc-retry-pushback-ms"
BOUND = re.compile(r"would pass its bound of (\d+)")
OUT = Path(__file__).resolve().parent / "out"


# -- requests ------------------------------------------------------------------------------------
def build_requests(n_steps: int, count: int = 16) -> list[pb.AttributeRequest]:
    """`count` fixed single-example IG requests on the demo image model (built once, before any clock starts)."""
    rng = np.random.default_rng(0)
    return [
        AttributionClient.build_request(
            MODEL, "integrated_gradients", rng.random((1, 3, 16, 16), dtype=np.float32), target=i % 2, params={"n_steps": n_steps}
        )
        for i in range(count)
    ]


@dataclass
class Outcome:
    phase: str
    sent: float  # monotonic send time
    latency_ms: float
    code: str
    pushback_ms: str | None = None  # the trailer's value on RESOURCE_EXHAUSTED (None: absent)
    up_front: bool = False  # DEADLINE_EXCEEDED refused by admission (the queued work would miss the deadline)
    bound: int | None = None  # the row bound a RESOURCE_EXHAUSTED message names (admission's view at that moment)
    details: str = ""  # the message of an outcome other than OK, RESOURCE_EXHAUSTED and DEADLINE_EXCEEDED


@dataclass
class Samples:
    """RSS (KiB) and queue-row samples taken by a thread while the run goes on; (monotonic time, value)."""

    rss: list[tuple[float, int]] = field(default_factory=list)
    queue_rows: list[tuple[float, float]] = field(default_factory=list)


async def one(stub, request: pb.AttributeRequest, phase: str, deadline: float, out: list[Outcome]) -> None:
    sent = time.monotonic()
    call = stub.Attribute(request, timeout=deadline)
    try:
        await call
        out.append(Outcome(phase, sent, 1e3 * (time.monotonic() - sent), "OK"))
    except grpc.aio.AioRpcError as e:
        took = 1e3 * (time.monotonic() - sent)
        code = e.code().name
        pushback = None
        if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            pushback = dict(e.trailing_metadata() or ()).get(PUSHBACK)
        up_front = e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "would not finish before its deadline" in (e.details() or "")
        bound = BOUND.search(e.details() or "") if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else None
        usual = e.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED)
        details = "" if usual else (e.details() or "")[:300]
        out.append(Outcome(phase, sent, took, code, pushback, up_front, int(bound.group(1)) if bound else None, details))


async def closed_loop(stub, requests, callers: int, seconds: float, phase: str, deadline: float, out: list[Outcome]) -> float:
    """`callers` callers, each sending its next request when the previous one answered; returns the wall time."""
    until = time.monotonic() + seconds
    start = time.monotonic()
    counter = iter(range(1 << 62))

    async def caller() -> None:
        while time.monotonic() < until:
            i = next(counter)
            await one(stub, requests[i % len(requests)], phase, deadline, out)

    await asyncio.gather(*(caller() for _ in range(callers)))
    return time.monotonic() - start


async def open_loop(stub, requests, rate: float, seconds: float, phase: str, deadline: float, out: list[Outcome]) -> dict:
    """Send at `rate` req/s for `seconds` on a fixed schedule (late sends go out at once, so the offered rate holds
    even when the loop lags); then wait for every answer. Returns what was offered and how long it took."""
    tasks = []
    start = time.monotonic()
    total = max(1, int(rate * seconds))
    for i in range(total):
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(stub, requests[i % len(requests)], phase, deadline, out)))
    sending = time.monotonic() - start
    await asyncio.gather(*tasks)
    return {"sent": total, "send_seconds": sending, "offered_rate": total / max(sending, 1e-9), "wall_seconds": time.monotonic() - start}


class Ticks:
    """CPU seconds (all threads) a live process spends from now on."""

    def __init__(self, pid: int) -> None:
        self.pid, self.start = pid, harness._proc_ticks(pid)

    def seconds(self) -> float:
        return (harness._proc_ticks(self.pid) - self.start) / harness._TICK


def sampler(pid: int, metrics_port: int, samples: Samples, stop: threading.Event) -> None:
    last_scrape = 0.0
    while not stop.is_set():
        now = time.monotonic()
        kib = harness.proc_status_kib(pid, "VmRSS")
        if kib is not None:
            samples.rss.append((now, kib))
        if now - last_scrape >= 0.25:
            last_scrape = now
            rows = metric(metrics_port, "attrserve_queue_rows", model=MODEL)
            if rows is not None:
                samples.queue_rows.append((now, rows))
        stop.wait(0.1)


def scrape_all(metrics_port: int) -> dict[tuple[str, frozenset], float]:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def metric(metrics_port: int, name: str, **labels: str) -> float | None:
    try:
        return scrape_all(metrics_port).get((name, frozenset(labels.items())))
    except OSError:
        return None


def refused(scraped: dict) -> dict[str, float]:
    return {
        dict(labels)["reason"]: value
        for (name, labels), value in scraped.items()
        if name == "attrserve_requests_refused_total" and dict(labels).get("model") == MODEL
    }


# A separate process that calls ListModels (no model work: the server's event loop only) every 50 ms and prints its
# latencies as JSON: how responsive the server's RPC edge is, free of the load client's own event-loop lag.
EDGE_PROBE = """
import json, sys, time, grpc
from attrserve.v1 import attribution_service_pb2 as pb, attribution_service_pb2_grpc as pb_grpc
address, seconds = sys.argv[1], float(sys.argv[2])
out = []
with grpc.insecure_channel(address) as channel:
    stub = pb_grpc.AttributionServiceStub(channel)
    stub.ListModels(pb.ListModelsRequest(), timeout=10)
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        t = time.monotonic()
        try:
            stub.ListModels(pb.ListModelsRequest(), timeout=10)
            out.append(1e3 * (time.monotonic() - t))
        except grpc.RpcError:
            out.append(None)
        time.sleep(max(0.0, 0.05 - (time.monotonic() - t)))
print(json.dumps(out))
"""


def start_edge_probe(address: str, seconds: float):
    import subprocess

    return subprocess.Popen([sys.executable, "-c", EDGE_PROBE, address, str(seconds)], stdout=subprocess.PIPE, text=True)


def edge_probe_result(proc) -> list[float | None]:
    out, _ = proc.communicate(timeout=60)
    try:
        return json.loads(out)
    except ValueError:
        return []


# -- stats ---------------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def rss_between(samples: Samples, start: float, end: float) -> list[int]:
    return [kib for t, kib in samples.rss if start <= t <= end]


def summarize(outcomes: list[Outcome], phase: str) -> dict:
    mine = [o for o in outcomes if o.phase == phase]
    ok = [o.latency_ms for o in mine if o.code == "OK"]
    exhausted = [o for o in mine if o.code == "RESOURCE_EXHAUSTED"]
    deadline = [o for o in mine if o.code == "DEADLINE_EXCEEDED"]
    return {
        "requests": len(mine),
        "codes": dict(Counter(o.code for o in mine)),
        "ok": len(ok),
        "ok_p50_ms": pct(ok, 50),
        "ok_p99_ms": pct(ok, 99),
        "refused": len(exhausted),
        "refused_with_pushback": sum(1 for o in exhausted if o.pushback_ms is not None),
        "row_bound_p50": pct([o.bound for o in exhausted if o.bound is not None], 50),
        "pushback_ms_p50": pct([float(o.pushback_ms) for o in exhausted if o.pushback_ms is not None], 50),
        "refusal_p50_ms": pct([o.latency_ms for o in exhausted], 50),
        "refusal_p99_ms": pct([o.latency_ms for o in exhausted], 99),
        "deadline_exceeded": len(deadline),
        "deadline_up_front": sum(1 for o in deadline if o.up_front),
        "deadline_up_front_p50_ms": pct([o.latency_ms for o in deadline if o.up_front], 50),
        "unusual": [(o.code, round(o.latency_ms, 1), o.details) for o in mine if o.details][:20],
        "first_sent": min((o.sent for o in mine), default=None),
        "last_answer": max((o.sent + o.latency_ms / 1e3 for o in mine), default=None),
    }


def cores(cpu: dict, key: str) -> float | None:
    return cpu[key] / cpu["wall_s"] if cpu.get("wall_s") else None


def _f(v, digits: int = 0) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def markdown(r: dict) -> str:
    cap, burst, base, after = r["capacity"], r["burst"], r["baseline"], r["recovery"]
    rss, edge, cpu = r["rss_mib"], r["edge_probe"], r["cpu"]
    other = {k: v for k, v in burst["codes"].items() if k not in ("OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED")}
    expired = burst["deadline_exceeded"] - burst["deadline_up_front"]
    sample = {code: details for code, _, details in reversed(burst["unusual"])}
    goodput_pct = None if burst["goodput_vs_capacity"] is None else 100 * burst["goodput_vs_capacity"]
    low = f"{r['after_factor']:g}x capacity"
    implied = burst["row_bound_p50"] / r["queue_seconds"] if burst["row_bound_p50"] else None
    served_rows = cap["rps"] * r["n_steps"]
    overestimate = implied / served_rows if implied and served_rows else None
    refusals = ", ".join(f"{k} {int(v):,}" for k, v in r["server_refused"].items() if v) or "none"
    rows = [
        (
            f"capacity (closed loop, {r['callers']} callers, {cap['seconds']:g} s)",
            f"**{_f(cap['rps'], 1)} req/s** (p50 {_f(cap['p50_ms'], 1)} ms, p99 {_f(cap['p99_ms'], 1)} ms; errors {cap['errors']})",
        ),
        (
            f"offered (open loop, {r['factor']:g}x for {burst['seconds']:g} s)",
            f"{_f(burst['target_rate'], 1)} req/s asked, {_f(burst['offered_rate'], 1)} req/s sent ({burst['requests']:,} requests)",
        ),
        (
            "admitted (OK)",
            f"{burst['ok']:,} — goodput {_f(burst['goodput_rps'], 1)} req/s = **{_f(goodput_pct, 0)}% of capacity**",
        ),
        ("admitted latency p50 / p99", f"{_f(burst['ok_p50_ms'], 1)} / {_f(burst['ok_p99_ms'], 1)} ms"),
        (
            "refused (RESOURCE_EXHAUSTED)",
            f"{burst['refused']:,} ({burst['refused_with_pushback']:,} with `{PUSHBACK}`, p50 pushback {_f(burst['pushback_ms_p50'])} ms)",
        ),
        ("time to refusal p50 / p99", f"{_f(burst['refusal_p50_ms'], 1)} / {_f(burst['refusal_p99_ms'], 1)} ms"),
        (
            "DEADLINE_EXCEEDED",
            (
                f"{burst['deadline_exceeded']:,} ({burst['deadline_up_front']:,} refused up front by admission, "
                f"p50 {_f(burst['deadline_up_front_p50_ms'], 1)} ms; {expired:,} expired after being admitted)"
            ),
        ),
        ("other outcomes", ", ".join(f"{k} {v} (e.g. {sample.get(k, '')!r})" for k, v in other.items()) or "none"),
        ("server refusals (`attrserve_requests_refused_total` during the burst)", refusals),
        (
            "admission's row bound (median named by the refusals) vs the rows/s actually served",
            (
                f"{_f(burst['row_bound_p50'])} rows = {_f(implied)} rows/s at {r['queue_seconds']:g} s of work; served "
                f"{_f(served_rows)} rows/s at capacity ({r['n_steps']} rows a request): **{_f(overestimate, 1)}x**"
            ),
        ),
        (
            "peak `attrserve_queue_rows` (sampled every 250 ms) / its bound",
            f"{_f(r['queue_rows_peak'])} / {r['row_bound']} (once every burst request had its answer: {_f(r['queue_rows_after_burst'])})",
        ),
        (
            f"RPC edge: ListModels from another process, p50 / p99, at {low} → during the burst",
            (
                f"{_f(edge['baseline_p50_ms'], 1)} / {_f(edge['baseline_p99_ms'], 1)} ms → {_f(edge['burst_p50_ms'], 1)} / "
                f"{_f(edge['burst_p99_ms'], 1)} ms ({edge['burst_errors']} errors of {edge['burst_calls']})"
            ),
        ),
        ("server RSS before / peak / after", f"{_f(rss['before'], 1)} / {_f(rss['peak'], 1)} / {_f(rss['after'], 1)} MiB"),
        (
            f"latency at {low}, before the burst: p50 / p99",
            f"{_f(base['ok_p50_ms'], 1)} / {_f(base['ok_p99_ms'], 1)} ms ({base['ok']:,} OK of {base['requests']:,})",
        ),
        (
            f"latency at {low}, after the burst: p50 / p99",
            f"{_f(after['ok_p50_ms'], 1)} / {_f(after['ok_p99_ms'], 1)} ms ({after['ok']:,} OK of {after['requests']:,})",
        ),
        ("after / before (p50, p99)", f"{_f(r['recovery_ratio_p50'], 2)}x, {_f(r['recovery_ratio_p99'], 2)}x"),
        (
            "CPU of the server (all threads) / of this load client: capacity phase; burst",
            (
                f"{_f(cores(cpu['capacity'], 'server_cpu_s'), 2)} / {_f(cores(cpu['capacity'], 'client_cpu_s'), 2)} cores; "
                f"{_f(cores(cpu['burst'], 'server_cpu_s'), 2)} / {_f(cores(cpu['burst'], 'client_cpu_s'), 2)} cores "
                "(a client near 1 core lags: its latencies include its own queueing)"
            ),
        ),
        (
            "other CPU (processes not in this run): capacity phase / burst",
            (
                f"{_f(100 * cpu['capacity']['foreign_cpu_fraction'], 0)}% / {_f(100 * cpu['burst']['foreign_cpu_fraction'], 0)}% "
                "of the machine (not ~0%: the numbers are noisy)"
            ),
        ),
    ]
    title = (
        f"### attrserve overload — `image` IG (1 example, n_steps {r['n_steps']}), deadline {r['deadline_s']:g} s, "
        f"{r['cpus']} CPUs, admission: {r['admission']}"
    )
    return "\n".join([title, "", "| | value |", "|---|---|", *(f"| {label} | {value} |" for label, value in rows)])


# -- the run -------------------------------------------------------------------------------------
async def run_phases(address: str, args: argparse.Namespace, pid: int, metrics_port: int) -> dict:
    requests = build_requests(args.n_steps)
    outcomes: list[Outcome] = []
    samples = Samples()
    stop = threading.Event()
    thread = threading.Thread(target=sampler, args=(pid, metrics_port, samples, stop), daemon=True)
    thread.start()
    marks: dict[str, float] = {}
    try:
        async with AsyncAttributionClient(address) as client:
            stub = client._stub
            await closed_loop(stub, requests, args.callers, 1.0, "warmup", 30.0, outcomes)

            watch, mine = harness.CpuWatch([pid]), Ticks(os.getpid())
            wall = await closed_loop(stub, requests, args.callers, args.capacity_seconds, "capacity", 30.0, outcomes)
            cpu_capacity = watch.stop() | {"client_cpu_s": mine.seconds()}
            cap = [o for o in outcomes if o.phase == "capacity"]
            ok = [o.latency_ms for o in cap if o.code == "OK"]
            capacity = len(ok) / wall
            print(f"capacity: {capacity:.1f} req/s ({len(ok)} in {wall:.1f} s)", file=sys.stderr, flush=True)

            low = capacity * args.after_factor
            probe = start_edge_probe(address, args.after_seconds)
            base = await open_loop(stub, requests, low, args.after_seconds, "baseline", args.deadline, outcomes)
            edge_base = await asyncio.get_running_loop().run_in_executor(None, edge_probe_result, probe)

            refused_before = refused(scrape_all(metrics_port))
            probe = start_edge_probe(address, args.seconds)
            marks["burst_start"] = time.monotonic()
            watch, mine = harness.CpuWatch([pid]), Ticks(os.getpid())  # (the ListModels probe counts as "other")
            burst = await open_loop(stub, requests, capacity * args.factor, args.seconds, "burst", args.deadline, outcomes)
            cpu_burst = watch.stop() | {"client_cpu_s": mine.seconds()}
            marks["burst_end"] = time.monotonic()
            edge_burst = await asyncio.get_running_loop().run_in_executor(None, edge_probe_result, probe)
            rows_left = metric(metrics_port, "attrserve_queue_rows", model=MODEL)
            refused_after = refused(scrape_all(metrics_port))
            print(f"burst: {burst['sent']} sent at {burst['offered_rate']:.1f} req/s", file=sys.stderr, flush=True)

            after = await open_loop(stub, requests, low, args.after_seconds, "recovery", args.deadline, outcomes)
            marks["end"] = time.monotonic()
            info = await client.get_model(MODEL, timeout=10)
    finally:
        stop.set()
        thread.join(5)

    burst_s = summarize(outcomes, "burst")
    window = burst_s["last_answer"] - burst_s["first_sent"]
    burst_s.update(
        seconds=args.seconds,
        target_rate=capacity * args.factor,
        offered_rate=burst["offered_rate"],
        window_seconds=window,
        goodput_rps=burst_s["ok"] / window if window > 0 else None,
    )
    burst_s["goodput_vs_capacity"] = burst_s["goodput_rps"] / capacity if burst_s["goodput_rps"] is not None else None
    base_s = summarize(outcomes, "baseline") | {"offered_rate": base["offered_rate"]}
    after_s = summarize(outcomes, "recovery") | {"offered_rate": after["offered_rate"]}
    before_rss = [kib for t, kib in samples.rss if t <= marks["burst_start"]][-1:]
    during = rss_between(samples, marks["burst_start"], marks["burst_end"])
    end_rss = samples.rss[-1:]
    queue_peak = max((v for t, v in samples.queue_rows if marks["burst_start"] <= t <= marks["burst_end"]), default=None)
    configured = info.config.max_queued_rows
    batch_probe = {p.rows: p.rows_per_second for p in info.batch_probe}
    probe_rate = batch_probe.get(info.config.max_batch_rows)
    queue_seconds = server_setting(args.server_arg, "--max-queue-seconds", 2.0)
    auto_bound = (
        f"auto: {queue_seconds:g} s at the measured rows/s (load-time probe: {_f(probe_rate)} rows/s at "
        f"{info.config.max_batch_rows} rows a pass = {_f((probe_rate or 0) * queue_seconds)} rows)"
    )
    return {
        "n_steps": args.n_steps,
        "deadline_s": args.deadline,
        "callers": args.callers,
        "factor": args.factor,
        "after_factor": args.after_factor,
        "cpus": os.cpu_count(),
        "admission": " ".join(args.server_arg) or "server defaults",
        "capacity": {
            "seconds": args.capacity_seconds,
            "rps": capacity,
            "p50_ms": pct(ok, 50),
            "p99_ms": pct(ok, 99),
            "errors": sum(1 for o in cap if o.code != "OK"),
        },
        "baseline": base_s,
        "burst": burst_s,
        "recovery": after_s,
        "recovery_ratio_p50": after_s["ok_p50_ms"] / base_s["ok_p50_ms"] if after_s["ok_p50_ms"] and base_s["ok_p50_ms"] else None,
        "recovery_ratio_p99": after_s["ok_p99_ms"] / base_s["ok_p99_ms"] if after_s["ok_p99_ms"] and base_s["ok_p99_ms"] else None,
        "server_refused": {k: refused_after.get(k, 0.0) - refused_before.get(k, 0.0) for k in refused_after},
        "cpu": {"capacity": cpu_capacity, "burst": cpu_burst},
        "batch_probe": batch_probe,
        "max_batch_rows": info.config.max_batch_rows,
        "queue_seconds": queue_seconds,
        "queue_rows_peak": queue_peak,
        "queue_rows_after_burst": rows_left,
        "edge_probe": {
            "baseline_p50_ms": pct([v for v in edge_base if v is not None], 50),
            "baseline_p99_ms": pct([v for v in edge_base if v is not None], 99),
            "burst_p50_ms": pct([v for v in edge_burst if v is not None], 50),
            "burst_p99_ms": pct([v for v in edge_burst if v is not None], 99),
            "burst_calls": len(edge_burst),
            "burst_errors": sum(1 for v in edge_burst if v is None),
        },
        "row_bound": str(configured) if configured else auto_bound,
        "rss_mib": {
            "before": harness.mib(before_rss[0]) if before_rss else None,
            "peak": harness.mib(max(during)) if during else None,
            "after": harness.mib(end_rss[0][1]) if end_rss else None,
        },
        "rss_samples_mib": [(round(t - marks["burst_start"], 2), harness.mib(k)) for t, k in samples.rss],
        "queue_rows_samples": [(round(t - marks["burst_start"], 2), v) for t, v in samples.queue_rows],
    }


def server_setting(server_args: list[str], flag: str, default: float) -> float:
    """A numeric flag among the --server-arg values (`--flag=V` or `--flag V`), else the server's default."""
    for i, arg in enumerate(server_args):
        if arg.startswith(flag + "="):
            return float(arg.split("=", 1)[1])
        if arg == flag and i + 1 < len(server_args):
            return float(server_args[i + 1])
    return default


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="attrserve under overload: capacity, a burst at N x capacity, recovery.")
    p.add_argument("--seconds", type=float, default=10.0, help="burst length (default 10)")
    p.add_argument("--capacity-seconds", type=float, default=5.0, help="closed-loop capacity measurement (default 5)")
    p.add_argument("--after-seconds", type=float, default=5.0, help="each 0.5x phase, before and after the burst (default 5)")
    p.add_argument("--quick", action="store_true", help="every phase 3 s")
    p.add_argument("--factor", type=float, default=4.0, help="burst rate as a multiple of the measured capacity (default 4)")
    p.add_argument("--after-factor", type=float, default=0.5, help="rate of the phases around the burst (default 0.5)")
    p.add_argument("--callers", type=int, default=16, help="closed-loop callers for the capacity (default 16)")
    p.add_argument("--deadline", type=float, default=2.0, help="gRPC deadline of every open-loop request (default 2 s)")
    p.add_argument("--n-steps", type=int, default=50)
    p.add_argument(
        "--server-arg", action="append", default=[], help="an extra `attrserve serve` flag, e.g. --server-arg=--max-queued-rows=2000"
    )
    p.add_argument("--json", type=Path, default=OUT / "overload.json")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds = args.capacity_seconds = args.after_seconds = 3.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    port, metrics_port = harness.free_port(), harness.free_port()
    argv_server = [
        sys.executable, "-m", "attrserve_service.cli", "serve",
        "--port", str(port), "--metrics-port", str(metrics_port), "--device", "cpu", "--log-level", "WARNING",
        *args.server_arg,
    ]  # fmt: skip
    server = harness.ServerProcess("attrserve", argv_server, port, args.json.parent / "logs" / "overload-attrserve.log")
    try:
        server.start()
        server.wait_ready([MODEL])
        report = asyncio.run(run_phases(server.target, args, server.pid, metrics_port))
    finally:
        server.stop()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1, default=str))
    print(markdown(report))
    print(f"\n(JSON: {args.json}; server log: {server.log_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
