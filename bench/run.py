"""attrserve benchmark: one command, every system measured in the same run, a markdown table and a JSON file.

    .venv/bin/python bench/run.py                       # W1-W6, 10 s per system per workload
    .venv/bin/python bench/run.py --rss-soak 60         # plus a 60 s steady run per workload for the RSS target
    .venv/bin/python bench/run.py --tail-sweep 1,2,4,8,16,32   # plus attrserve at these callers: p99 <= 3x p50 at each
    .venv/bin/python bench/run.py --smoke --workloads W1,W4,W5 --json /tmp/r.json   # tiny sizes (the test)

Systems (see bench/README.md): attrserve; B1 Captum in-process one request at a time; B2 a grpc.aio
server calling Captum per request in a thread pool; B3 a TorchServe-style server batching up to 8 requests
(5 ms) onto 2 single-threaded worker processes, one Captum call per batch; L the fused in-process limit
(W1-W4); noop a no-op RPC of the same payload (the transport ceiling). Servers run one at a time as subprocesses on
free 127.0.0.1 ports, each warmed up before its measured window, and are always killed afterwards.
"""

from __future__ import annotations

import argparse
import ctypes.util
import datetime
import json
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc
import torch

from attrserve.v1 import attribution_service_pb2_grpc as pb_grpc
from attrserve_client.tensors import from_tensor_proto
from attrserve_service.local_core import heap_allocator

import harness
from captum_calls import CHECK_TOLERANCE, PassCounter, error_of, run_captum
from limit import measure_limit
from workloads import Workload, all_workloads, build_model, gpu_workloads, repository

SYSTEMS = ("attrserve", "B1", "B2", "B3", "L", "noop")
# The soak's load before its first sample. Steady means past start-up: the first requests' allocations, what the
# allocator gives back after the load-time warm-up, and the pass-size tuner's first trials, which cut passes twice the
# size (issue 12 step 44: after 10 s, W4's RSS still rose in steps as they came, 770 -> 895 MiB over the next 60 s;
# after 60 s it stayed within 0.7% for 120 s). A trial's larger passes leave the heap that much larger: a high-water
# mark, not a leak.
SOAK_WARMUP_S = 60.0
LABELS = {
    "attrserve": "attrserve",
    "B1": "B1 Captum in-process",
    "B2": "B2 gRPC + Captum thread pool",
    "B3": "B3 TorchServe-style batched Captum",
    "L": "L fused in-process limit",
    "noop": "no-op RPC (transport ceiling)",
}


# -- one system ---------------------------------------------------------------------------------
def _summary(system: str, requests: int, errors: int, wall_s: float, latencies: list[float], **extra) -> dict:
    out = {
        "system": system,
        "label": LABELS[system],
        "requests": requests,
        "errors": errors,
        "wall_s": round(wall_s, 3),
        "throughput_rps": requests / wall_s if wall_s > 0 else 0.0,
        "passes": None,
        "rows": None,
        "rows_per_pass": None,
        "rss_peak_mib": None,
        "rss_start_mib": None,
        "rss_end_mib": None,
    }
    out.update(harness.latency_stats(latencies))
    out.update(extra)
    return out


def run_b1(w: Workload, model: torch.nn.Module, seconds: float, warmup: float) -> dict:
    """B1: in this process, Captum on one request at a time, back to back (latency = one attribute call)."""
    xs = [torch.from_numpy(a) for a in w.inputs()]
    ts = w.targets()
    counter = PassCounter(model)
    try:

        def once(i: int) -> None:
            run_captum(model, w.algorithm, xs[i % len(xs)], target=ts[i % len(ts)], baselines=w.baselines, params=w.params, layer=w.layer)

        i = 0
        end = time.perf_counter() + warmup
        while time.perf_counter() < end:
            once(i)
            i += 1
        counter.take()
        latencies = []
        watch = harness.CpuWatch([])
        t_start = time.perf_counter()
        end = t_start + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            once(i)
            latencies.append(1e3 * (time.perf_counter() - t0))
            i += 1
        wall = time.perf_counter() - t_start
        cpu = watch.stop()
        passes, rows = counter.take()
    finally:
        counter.handle.remove()
    return _summary(
        "B1", len(latencies), 0, wall, latencies, passes=passes, rows=rows, rows_per_pass=rows / passes if passes else None, cpu=cpu
    )


def run_l(w: Workload, model: torch.nn.Module, concurrency: int, smoke: bool) -> dict:
    watch = harness.CpuWatch([])
    lim = measure_limit(w, model, n_requests=concurrency, min_seconds=0.05 if smoke else 0.3)
    return _summary(
        "L",
        lim["requests"],
        0,
        lim["seconds"],
        [],
        throughput_rps=lim["throughput_rps"],
        passes=lim["passes"],
        rows=lim["rows"],
        rows_per_pass=lim["rows"] / lim["passes"],
        limit=lim,
        cpu=watch.stop(),
    )


def _children(pid: int) -> list[int]:
    """The processes `pid` started (B3's workers), from /proc/*/stat's parent pid."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def check_against_captum(target: str, w: Workload, model: torch.nn.Module, requests: list, timeout: float) -> dict:
    """Sends the workload's distinct requests all at once (so a batching server batches them) and compares every
    answer with Captum called on that one request in this process (same weights); raises if one differs."""
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(target, options=options) as channel:
        stub = pb_grpc.AttributionServiceStub(channel)
        futures = [stub.Attribute.future(r, timeout=timeout) for r in requests]
        answers = [f.result() for f in futures]
    worst = 0.0
    for i, (x, t, answer) in enumerate(zip(w.inputs(len(requests)), w.targets(len(requests)), answers)):
        want = run_captum(model, w.algorithm, torch.from_numpy(x), target=t, baselines=w.baselines, params=w.params, layer=w.layer)
        want_np = want.detach().numpy()
        got = from_tensor_proto(answer.attributions[0])
        if got.shape != want_np.shape:
            raise AssertionError(f"{w.key} request {i}: attributions of shape {got.shape}, Captum's are {want_np.shape}")
        err = error_of(got, want_np)
        if not err <= CHECK_TOLERANCE:
            raise AssertionError(f"{w.key} request {i}: max error {err:.2e} of the largest attribution (tolerance {CHECK_TOLERANCE:g})")
        worst = max(worst, err)
    return {"requests": len(requests), "max_rel_error": worst, "tolerance": CHECK_TOLERANCE}


def run_server(
    system: str,
    w: Workload,
    args: argparse.Namespace,
    concurrency: int,
    requests: list,
    log_dir: Path,
    seconds: float | None = None,
    rss_every: float = 0.5,
    warmup: float | None = None,
    model: torch.nn.Module | None = None,
) -> dict:
    """Start the server, wait until ready, warm up, measure, read its metrics and RSS, kill it.

    B3 and attrserve (a front process and its workers / its engine process): their answers are first checked against
    Captum per request (`model`, on the CPU); their CPU and RSS are the front's plus its children's."""
    seconds = args.seconds if seconds is None else seconds
    repo = repository(args.smoke, args.gpu)
    port = harness.free_port()
    metrics_port = None
    if system == "attrserve":
        metrics_port = harness.free_port()
        profile = args.attrserve_profile / f"{w.key}-attrserve.txt" if args.attrserve_profile else None
        argv = harness.attrserve_argv(repo, port, metrics_port, args.attrserve_arg, profile, args.device)
    elif system == "B3":
        argv = [sys.executable, str(harness.ROOT / "bench" / "baseline_batched.py"), "--model-repository", str(repo)]
        argv += ["--port", str(port), "--device", args.device]
    else:
        argv = harness.baseline_argv(repo, port, noop=system == "noop", device=args.device)
    env = dict(kv.split("=", 1) for kv in args.attrserve_env) if system == "attrserve" else {}
    server = harness.ServerProcess(system, argv, port, log_dir / f"{w.key}-{system}.log", env=env)
    try:
        server.start()
        ready_s = server.wait_ready([w.model])
        workers = _children(server.pid) if system in ("B3", "attrserve") else []  # B3's workers, attrserve's engine process
        check = None
        if system in ("B3", "attrserve") and model is not None and args.device == "cpu":
            check = check_against_captum(server.target, w, model, requests, args.timeout)
        harness.drive(
            server.target, requests, concurrency, args.warmup_seconds if warmup is None else warmup, record=False, timeout=args.timeout
        )
        before = harness.scrape(metrics_port, w.model) if metrics_port else None
        profiling = system == "attrserve" and args.attrserve_profile
        if profiling:
            os.kill(server.pid, signal.SIGUSR1)
        watch = harness.CpuWatch([server.pid, *workers])
        load = harness.drive(
            server.target,
            requests,
            concurrency,
            seconds,
            record=True,
            timeout=args.timeout,
            pids=[server.pid, *workers],
            rss_every=rss_every,
        )
        cpu = watch.stop()
        if profiling:
            os.kill(server.pid, signal.SIGUSR2)
            time.sleep(0.5)
        after = harness.scrape(metrics_port, w.model) if metrics_port else None
        sizes = harness.pass_sizes(metrics_port, w.model) if metrics_port else None
        # On a GPU: the gauge must show the engine process's models and buffers (it read the front's torch, 0, until
        # issue 12 step 29).
        memory = harness.device_memory(metrics_port) if metrics_port and args.device != "cpu" else None
        hwm = harness.rss_sum_kib([server.pid, *workers], "VmHWM")
    finally:
        server.stop()
    assert load is not None
    rss = [kib for _, kib in load.rss_samples_kib]
    out = _summary(
        system,
        len(load.latencies_ms),
        load.errors,
        load.wall_s,
        load.latencies_ms,
        error_samples=load.error_samples,
        ready_s=round(ready_s, 2),
        rss_peak_mib=harness.mib(hwm),
        rss_start_mib=harness.mib(rss[0]) if rss else None,
        rss_end_mib=harness.mib(rss[-1]) if rss else None,
        rss_max_mib=harness.mib(max(rss)) if rss else None,
        cpu=cpu,
        server_timing=harness.server_timing(load),
        rss_samples_mib=[(round(t, 2), harness.mib(k)) for t, k in load.rss_samples_kib],
    )
    if check is not None:
        out["check"] = check
    if memory is not None:
        out["device_memory_bytes"] = memory
        print(f"  {w.key} attrserve: attrserve_device_memory_bytes {memory or 'MISSING'}", flush=True)
    if workers:
        out["worker_pids"] = workers
    if system == "attrserve":
        engine = harness.metrics_delta(before, after, load.wall_s)
        engine["pass_size_rows"] = sizes  # by pass kind, at the end of the window: the tuner may move it between runs
        out.update(passes=engine.pop("passes"), rows=engine.pop("rows"), rows_per_pass=engine.pop("rows_per_pass"), engine=engine)
        out["request_rows"] = load.timing_rows  # rows the answered requests needed, from their timing
    elif system in ("B2", "B3"):
        out.update(
            passes=load.timing_passes,
            rows=load.timing_rows,
            rows_per_pass=load.timing_rows / load.timing_passes if load.timing_passes else None,
        )
    else:
        out.update(passes=0, rows=0)
    return out


def run_workload(w: Workload, args: argparse.Namespace, log_dir: Path) -> dict:
    concurrency = args.concurrency or w.concurrency
    systems = [s for s in args.systems if s != "L" or w.limit]
    model = build_model(w.model, repository(args.smoke, args.gpu))
    requests = w.requests()
    rounds: list[dict[str, dict]] = []
    for number in range(1, args.rounds + 1):  # A, B, C, A, B, C, ...: a ratio is taken inside one round
        results: dict[str, dict] = {}
        for system in systems:
            shown = f"{LABELS[system]}" + (f" (round {number}/{args.rounds})" if args.rounds > 1 else "")
            print(f"[{w.key}] {shown} ...", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            if system == "L":
                results[system] = run_l(w, model, concurrency, args.smoke)
            elif system == "B1":
                results[system] = run_b1(w, model, args.seconds, args.warmup_seconds)
            else:
                results[system] = run_server(system, w, args, concurrency, requests, log_dir, model=model)
            r = results[system]
            print(
                f"[{w.key}] {shown}: {r['throughput_rps']:.1f} req/s, p50 {_fmt(r['p50_ms'], 2)} ms, "
                f"{r['errors']} errors ({time.monotonic() - t0:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
        for r in results.values():
            for ref, key in RATIOS:
                base = results.get(ref)
                r[key] = r["throughput_rps"] / base["throughput_rps"] if base and base["throughput_rps"] else None
        rounds.append(results)
    results = {system: merge_rounds([r[system] for r in rounds]) for system in systems}
    return {
        "workload": w.key,
        "title": w.title,
        "model": w.model,
        "algorithm": w.algorithm,
        "params": _jsonable(w.params),
        "concurrency": concurrency,
        "rows_per_request": w.rows(),
        "payload_bytes": w.payload_bytes(),
        "systems": results,
    }


RATIOS = (("B2", "ratio_vs_B2"), ("B3", "ratio_vs_B3"), ("L", "ratio_vs_L"), ("noop", "ratio_vs_noop"))


def merge_rounds(runs: list[dict]) -> dict:
    """One system's row from its rounds: the measurement of its median round (by throughput; every field from that
    one real run) except `errors`, which counts every round's, and each ratio, the median of the ratios taken inside
    each round; every round's figures are kept under `rounds`."""
    if len(runs) == 1:
        return runs[0]
    chosen = dict(sorted(runs, key=lambda r: r["throughput_rps"])[(len(runs) - 1) // 2])
    chosen["errors"] = sum(r["errors"] for r in runs)
    for _, key in RATIOS:
        ratios = [r[key] for r in runs if r.get(key) is not None]
        chosen[key] = statistics.median(ratios) if ratios else None
    chosen["rounds"] = [
        {"throughput_rps": r["throughput_rps"], "p50_ms": r.get("p50_ms"), "p99_ms": r.get("p99_ms"), "errors": r["errors"]}
        | {key: r.get(key) for _, key in RATIOS}
        for r in runs
    ]
    return chosen


def run_soak(w: Workload, args: argparse.Namespace, log_dir: Path) -> dict:
    """attrserve under the workload's steady load for --rss-soak seconds, VmRSS sampled every second.

    Steady means after --soak-warmup-seconds of the same load (SOAK_WARMUP_S); start = the first sample after it."""
    concurrency = args.concurrency or w.concurrency
    print(f"[{w.key}] RSS soak: attrserve, {args.rss_soak:.0f} s ...", file=sys.stderr, flush=True)
    r = run_server(
        "attrserve",
        w,
        args,
        concurrency,
        w.requests(),
        log_dir,
        seconds=args.rss_soak,
        rss_every=1.0,
        warmup=args.soak_warmup_seconds,
    )
    start, end = r["rss_start_mib"], r["rss_end_mib"]
    drift = (end - start) / start if start else None
    print(f"[{w.key}] RSS soak: {start} -> {end} MiB ({100 * drift:+.1f}%)", file=sys.stderr, flush=True)
    return soak_range(
        {
            "workload": w.key,
            "seconds": args.rss_soak,
            "warmup_seconds": args.soak_warmup_seconds,
            "requests": r["requests"],
            "errors": r["errors"],
            "throughput_rps": r["throughput_rps"],
            "rss_start_mib": start,
            "rss_end_mib": end,
            "rss_peak_mib": r["rss_peak_mib"],
            "drift": drift,
            "rss_samples_mib": r["rss_samples_mib"],
        }
    )


def soak_range(soak: dict) -> dict:
    """Adds the soak's RSS range and its largest deviation from the first sample (what "flat" is judged on)."""
    samples = [mib for _, mib in soak["rss_samples_mib"]]
    start = soak["rss_start_mib"]
    soak.update(
        rss_min_mib=min(samples), rss_max_mib=max(samples), max_deviation=max(abs(s - start) for s in samples) / start if start else None
    )
    return soak


def tail_point(w: Workload, args: argparse.Namespace, callers: int, log_dir: Path) -> dict:
    """attrserve alone at `callers` (a fresh server, measured as in the table): req/s, p50, p99, their ratio, errors."""
    r = run_server("attrserve", w, args, callers, w.requests(), log_dir)
    ratio = r["p99_ms"] / r["p50_ms"] if r.get("p50_ms") and r.get("p99_ms") is not None else None
    return {k: r[k] for k in ("throughput_rps", "p50_ms", "p99_ms", "errors")} | {"p99_over_p50": ratio}


def run_tail_sweep(w: Workload, args: argparse.Namespace, own: int, log_dir: Path) -> dict:
    """The issue's "p99 <= 3x p50 at every concurrency" beyond the workload's own (`own`, measured in the table):
    attrserve at each of --tail-sweep's callers, --tail-sweep-rounds times each (a concurrency's ratio is the median of
    its runs'). Step 24 found W1 meeting the target at its own 32 callers and missing it at 4 and 8."""
    callers = [c for c in args.tail_sweep if c != own]
    runs: dict[int, list[dict]] = {c: [] for c in callers}
    for number in range(1, args.tail_sweep_rounds + 1):
        for c in callers:
            r = tail_point(w, args, c, log_dir)
            runs[c].append(r)
            print(
                f"[{w.key}] tail sweep, {c} callers (round {number}/{args.tail_sweep_rounds}): {r['throughput_rps']:.1f} "
                f"req/s, p50 {_fmt(r['p50_ms'], 2)} ms, p99 {_fmt(r['p99_ms'], 2)} ms, {r['errors']} errors",
                file=sys.stderr,
                flush=True,
            )
    return {str(c): tail_summary(rs) for c, rs in runs.items()}


def tail_summary(runs: list[dict]) -> dict:
    """One concurrency's tail_point runs: kept, their median p99/p50 (None when no run had latencies), their errors."""
    ratios = [r["p99_over_p50"] for r in runs if r["p99_over_p50"] is not None]
    return {"runs": runs, "p99_over_p50": statistics.median(ratios) if ratios else None, "errors": sum(r["errors"] for r in runs)}


# -- targets ------------------------------------------------------------------------------------
THROUGHPUT_TARGETS = (  # (workload, target, reference system, least attrserve/reference req/s in the same run)
    ("W1", "throughput >= 2x B3", "B3", 2.0),
    ("W1", "throughput >= 8x B2", "B2", 8.0),
    ("W1", "throughput >= 50% of the no-op RPC", "noop", 0.5),
    ("W2", "throughput >= 1.3x B3", "B3", 1.3),
    ("W2", "throughput >= 1.5x B2", "B2", 1.5),
    ("W2", "throughput >= 80% of L", "L", 0.8),
    ("W3", "throughput >= 3x B2", "B2", 3.0),
    ("W3", "throughput >= 80% of L", "L", 0.8),
    ("W4", "throughput >= 2x B2", "B2", 2.0),
    ("G2", "throughput >= 10x B2 on the same GPU", "B2", 10.0),
)
P50_SLACK_MS = {"W5": 0.5, "W6": 2.0}  # attrserve p50 <= B1 p50 + no-op RPC p50 + this
CPU_PER_REQUEST_VS_NOOP = ("W1", 2.0)  # server CPU per request <= this x the no-op RPC server's
CPU_BUSY = ("W1", 0.9)  # server CPU >= this share of the machine's cores over the window
P99_OVER_P50 = 3.0  # every workload
RSS_DEVIATION = 0.10  # every workload: every RSS sample of the steady run within this of its first


def _server_cpu_share(r: dict, cpus: int) -> float | None:
    """Server CPU over the window as a share of the machine's cores (1.0 = every core busy with the server)."""
    cpu = r.get("cpu") or {}
    return cpu["server_cpu_s"] / (cpu["wall_s"] * cpus) if cpu.get("server_cpu_s") is not None and cpu.get("wall_s") else None


def evaluate_targets(
    workloads: dict[str, dict], soaks: dict[str, dict], cpus: int | None = None, sweeps: dict[str, dict] | None = None
) -> list[dict]:
    """The issue's targets, per workload in run order: each with its measured value, threshold and status (met /
    MISSED / not measured: a system or a figure the run did not measure). `cpus`: the machine's (default this one's);
    `sweeps`: run_tail_sweep's by workload."""
    sweeps = sweeps or {}
    cpus = cpus or os.cpu_count() or 1
    out = []

    def sys_of(wk: str, s: str) -> dict:
        return workloads.get(wk, {}).get("systems", {}).get(s) or {}

    def add(wk: str, text: str, value, threshold, higher_is_better: bool, shown: str, missing: str = "n/a", **figures) -> None:
        """`shown`: the measured figures in words, a str.format template of `v` (the value), `thr` and `figures`,
        filled in only when the value and the threshold were measured."""
        if wk not in workloads:
            return
        if value is None or threshold is None:
            status, shown = "not measured", missing
        else:
            status = "met" if (value >= threshold if higher_is_better else value <= threshold) else "MISSED"
            shown = shown.format(v=value, thr=threshold, **figures)
        out.append(
            {
                "workload": wk,
                "target": text,
                "measured": shown,
                "value": value,
                "compare": ">=" if higher_is_better else "<=",
                "threshold": threshold,
                "status": status,
            }
        )

    def ratio(wk: str, ref: str) -> float | None:
        """attrserve's req/s over `ref`'s: the ratio taken inside the run (with --rounds, the median of the rounds')."""
        a, b = sys_of(wk, "attrserve"), sys_of(wk, ref)
        if a.get(f"ratio_vs_{ref}") is not None:
            return a[f"ratio_vs_{ref}"]
        return a["throughput_rps"] / b["throughput_rps"] if a and b and b["throughput_rps"] else None

    for wk, text, ref, thr in THROUGHPUT_TARGETS:
        a, b = sys_of(wk, "attrserve"), sys_of(wk, ref)
        shown = "{v:.2f}x" if thr >= 1 else "{v:.0%}"
        # With rounds, the value is the median of the ratios inside each round, which the rows' medians (each system's
        # median round) need not give: show both.
        by_round = [r.get(f"ratio_vs_{ref}") for r in a.get("rounds", ())]
        rounds = (
            "the median of the rounds' " + ", ".join(shown.format(v=v) for v in by_round) + "; the rows' "
            if by_round and None not in by_round
            else ""
        )
        # A target against a baseline may lie above L, the fused in-process limit the same run measured: no server
        # reaches it, whatever it costs around the passes. Say so beside the figures.
        ceiling = sys_of(wk, "L").get(f"ratio_vs_{ref}") if ref in ("B2", "B3") else None
        above = (
            f"; L, the fused in-process limit, is {ceiling:.2f}x {ref} in this run: the target lies above it"
            if ceiling and ceiling < thr
            else ""
        )
        add(
            wk,
            text,
            ratio(wk, ref),
            thr,
            True,
            shown + " ({rounds}{a:.1f} vs {b:.1f} req/s{above})",
            rounds=rounds,
            a=a.get("throughput_rps"),
            b=b.get("throughput_rps"),
            above=above,
        )
    for wk, slack in P50_SLACK_MS.items():
        a, b1, noop = (sys_of(wk, s).get("p50_ms") for s in ("attrserve", "B1", "noop"))
        add(
            wk,
            f"p50 <= in-process (B1) p50 + no-op RPC p50 + {slack:g} ms",
            a,
            b1 + noop + slack if b1 is not None and noop is not None else None,
            False,
            "{v:.2f} ms vs {b1:.2f} + {noop:.2f} + {slack:g} = {thr:.2f} ms",
            b1=b1,
            noop=noop,
            slack=slack,
        )
    wk, thr = CPU_PER_REQUEST_VS_NOOP
    a_ms, noop_ms = _server_cpu_ms(sys_of(wk, "attrserve")), _server_cpu_ms(sys_of(wk, "noop"))
    add(
        wk,
        f"server CPU per request <= {thr:g}x the no-op RPC's",
        a_ms / noop_ms if a_ms is not None and noop_ms else None,
        thr,
        False,
        "{a:.2f} vs {noop:.2f} ms/req = {v:.2f}x",
        a=a_ms,
        noop=noop_ms,
    )
    wk, thr = CPU_BUSY
    a = sys_of(wk, "attrserve")
    add(
        wk,
        f"CPU busy: server CPU >= {thr:.0%} of the machine's cores",
        _server_cpu_share(a, cpus),
        thr,
        True,
        "{v:.0%} ({cpu[server_cpu_s]:.1f} CPU s in {cpu[wall_s]:.1f} s on {cpus} cores)",
        cpu=a.get("cpu"),
        cpus=cpus,
    )
    for wk, res in workloads.items():
        a = res["systems"].get("attrserve") or {}
        own = a["p99_ms"] / a["p50_ms"] if a.get("p50_ms") and a.get("p99_ms") is not None else None
        add(
            wk,
            f"p99 <= {P99_OVER_P50:g}x p50 (at {res['concurrency']} callers)",
            own,
            P99_OVER_P50,
            False,
            "{p99:.1f} / {p50:.1f} ms = {v:.2f}x",
            p99=a.get("p99_ms"),
            p50=a.get("p50_ms"),
        )
        # at every concurrency: the worst of the sweep's points and the own one (the row above)
        sweep = {int(c): p["p99_over_p50"] for c, p in (sweeps.get(wk) or {}).items()}
        points = sorted((sweep | {res["concurrency"]: own}).items())
        measured = [(c, v) for c, v in points if v is not None]
        worst = max(measured, key=lambda cv: cv[1]) if sweep and measured and len(measured) == len(points) else None
        add(
            wk,
            f"p99 <= {P99_OVER_P50:g}x p50 at every concurrency",
            worst[1] if worst else None,
            P99_OVER_P50,
            False,
            "worst {v:.2f}x at {c} callers (" + ", ".join(f"{c}: {v:.2f}x" for c, v in measured) + ")",
            missing="n/a" if sweep else "not run (use --tail-sweep 1,2,4,8,16,32)",
            c=worst[0] if worst else None,
        )
    for wk in workloads:
        soak = soaks.get(wk) or {}
        add(  # flat: every sample of the steady run within RSS_DEVIATION of its first, not just the last one
            wk,
            f"server RSS within +-{RSS_DEVIATION:.0%} over a 60 s steady run",
            soak.get("max_deviation"),
            RSS_DEVIATION,
            False,
            "max deviation {v:.1%}: {s[rss_start_mib]} -> {s[rss_end_mib]} MiB over {s[seconds]:.0f} s ({s[drift]:+.1%}), "
            "range {s[rss_min_mib]}-{s[rss_max_mib]} MiB, after {s[warmup_seconds]:.0f} s of the same load",
            missing="n/a" if soak else "not run (use --rss-soak 60)",
            s=soak,
        )
    order = list(workloads)
    return sorted(out, key=lambda t: order.index(t["workload"]))  # stable: each workload's targets in the order above


# -- output -------------------------------------------------------------------------------------
def _fmt(v, digits: int = 1) -> str:
    if v is None:
        return "—"
    if isinstance(v, int):
        return str(v)
    return f"{v:.{digits}f}"


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.0f}%"


def _ratio(v) -> str:
    return "—" if v is None else f"{v:.2f}x"


def _server_cpu_ms(r: dict) -> float | None:
    """Server process CPU (all threads) per answered request: steadier than req/s on a shared machine."""
    cpu = (r.get("cpu") or {}).get("server_cpu_s")
    return 1e3 * cpu / r["requests"] if cpu is not None and r.get("requests") else None


TAIL_COLUMNS = (("throughput_rps", 1), ("p50_ms", 2), ("p99_ms", 2))


def markdown(report: dict) -> str:
    lines = [
        (
            "| workload | system | req/s | p50 ms | p99 ms | errors | requests | passes | rows/pass | peak RSS MiB | RSS in load MiB "
            "| vs B2 | vs B3 | vs L | vs no-op | server CPU ms/req | other CPU |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for wk, res in report["workloads"].items():
        lines.extend(
            f"| {wk} (c={res['concurrency']}) | {r['label']} | {r['throughput_rps']:.1f} | {_fmt(r['p50_ms'], 2)} | "
            f"{_fmt(r['p99_ms'], 2)} | {r['errors']} | {r['requests']} | {_fmt(r['passes'])} | "
            f"{_fmt(r['rows_per_pass'])} | {_fmt(r['rss_peak_mib'])} | {_fmt(r.get('rss_max_mib'))} | "
            f"{_ratio(r.get('ratio_vs_B2'))} | {_ratio(r.get('ratio_vs_B3'))} | "
            f"{_ratio(r.get('ratio_vs_L'))} | {_ratio(r.get('ratio_vs_noop'))} | "
            f"{_fmt(_server_cpu_ms(r), 2)} | {_pct((r.get('cpu') or {}).get('foreign_cpu_fraction'))} |"
            for r in res["systems"].values()
        )
    lines += ["", "| workload | target | measured | status |", "|---|---|---|---|"]
    for t in report["targets"]:
        lines.append(f"| {t['workload']} | {t['target']} | {t['measured']} | {t['status']} |")
    if report["rss_soak"]:
        lines += [
            "",
            (
                "| RSS soak | warm-up s | seconds | requests | errors | RSS start MiB | RSS end MiB | min MiB | max MiB | end vs start "
                "| max deviation |"
            ),
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for wk, s in report["rss_soak"].items():
            lines.append(
                f"| {wk} attrserve | {s['warmup_seconds']:.0f} | {s['seconds']:.0f} | {s['requests']} | {s['errors']} | "
                f"{s['rss_start_mib']} | {s['rss_end_mib']} | {s['rss_min_mib']} | {s['rss_max_mib']} | {100 * s['drift']:+.1f}% | "
                f"{100 * s['max_deviation']:.1f}% |"
            )
    if report.get("tail_sweep"):
        lines += [
            "",
            "| tail sweep | callers | req/s by run | p50 ms by run | p99 ms by run | p99/p50 (median) | errors |",
            "|---|---:|---|---|---|---:|---:|",
        ]
        for wk, sweep in report["tail_sweep"].items():
            for c, p in sweep.items():
                lines.append(
                    f"| {wk} attrserve | {c} | "
                    + " | ".join(", ".join(_fmt(r[k], d) for r in p["runs"]) for k, d in TAIL_COLUMNS)
                    + f" | {_fmt(p['p99_over_p50'], 2)} | {p['errors']} |"
                )
    notes = []
    for wk, res in report["workloads"].items():
        a = res["systems"].get("attrserve", {})
        e = a.get("engine")
        if e:
            notes.append(
                f"- {wk} attrserve engine: {_fmt(e['requests_per_pass'])} requests/pass, "
                f"mean pass {_fmt(e['mean_pass_ms'], 2)} ms, worker busy {_fmt(100 * (e['worker_busy_fraction'] or 0), 0)}%, "
                f"mean queue wait {_fmt(e['mean_queue_wait_ms'], 2)} ms"
                + (f", pass size at the end {e['pass_size_rows']} rows" if e.get("pass_size_rows") else "")
            )
        lim = res["systems"].get("L", {}).get("limit")
        if lim:
            notes.append(
                f"- {wk} L: {lim['rows']} rows of {lim['requests']} requests, best chunk {lim['best_chunk_rows']} rows "
                f"({lim['rows_per_s']:.0f} rows/s); rows/s by chunk: {lim['per_chunk_rows_per_s']}"
            )
    malloc = report.get("meta", {}).get("malloc")
    if malloc:
        notes.append(f"- malloc of every system in this run: {malloc}")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="attrserve benchmark: attrserve vs its baselines, measured in the same run.")
    p.add_argument("--workloads", default="W1,W2,W3,W4,W5,W6", help="comma-separated subset of W1..W6")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    p.add_argument("--seconds", type=float, default=None, help="measured seconds per system per workload (default 10; --smoke 2)")
    p.add_argument("--warmup-seconds", type=float, default=None, help="unmeasured load before each window (default 2; --smoke 0.5)")
    p.add_argument("--concurrency", type=int, default=0, help="callers for every workload (default: each workload's own)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the systems of a workload in this many interleaved rounds (A, B, A, B, ...); a row is the system's median "
        "round and a ratio the median of the ratios inside each round, so no ratio straddles the machine's fast and slow phases",
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes for the test: n_steps 4, 2 s, concurrency 4")
    p.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "out" / "results.json")
    p.add_argument(
        "--rss-soak",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="also run attrserve steady this long per soaked workload and report its RSS (the target: 60, within +-10%%)",
    )
    p.add_argument(
        "--soak-warmup-seconds",
        type=float,
        default=SOAK_WARMUP_S,
        metavar="SECONDS",
        help=f"the soak's load before its first RSS sample (default {SOAK_WARMUP_S:.0f}: past the pass-size tuner's first trials)",
    )
    p.add_argument(
        "--rss-soak-workloads", default="all", help="workloads to soak (default 'all' = every selected one; e.g. W1,W4 to narrow it)"
    )
    p.add_argument(
        "--tail-sweep",
        default="",
        metavar="CALLERS",
        help="also run attrserve alone at each of these comma-separated concurrencies per workload (its own is the "
        "table's) for the target p99 <= 3x p50 at every concurrency, e.g. 1,2,4,8,16,32",
    )
    p.add_argument("--tail-sweep-rounds", type=int, default=1, help="runs per swept concurrency (its ratio: their median)")
    p.add_argument(
        "--attrserve-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra flag for `attrserve serve` (repeatable), e.g. --attrserve-arg=--max-batch-rows=512",
    )
    p.add_argument(
        "--attrserve-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment variable for the attrserve process (repeatable), e.g. OMP_NUM_THREADS=1",
    )
    p.add_argument(
        "--attrserve-profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="diagnosis: run attrserve under bench/profile_server.py and write DIR/<W>-attrserve.txt "
        "(per-thread CPU and sampled stacks of the measured window); perturbs the numbers a little",
    )
    p.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="JSON",
        help="print the table and targets of an earlier run's JSON (re-evaluated), run nothing",
    )
    p.add_argument(
        "--gpu", action="store_true", help="the GPU check: workload G2 (ResNet-18, bench/gpu_models) for attrserve vs B2, both on --device"
    )
    p.add_argument("--device", default=None, help="where attrserve and B2 run models (default: cuda with --gpu, else cpu)")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request deadline in seconds")
    p.add_argument(
        "--malloc",
        choices=("auto", "glibc"),
        default="auto",
        help="the malloc of every system in the run. auto: tcmalloc where installed, which attrserve's engine process "
        "takes by default (--allocator auto); the run executes itself again with it preloaded, so that B1, L, the "
        "baselines' servers and the load client run on it too. glibc: the C library's for all (attrserve: --allocator glibc)",
    )
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if args.gpu else "cpu")
    if args.gpu:
        if args.workloads == p.get_default("workloads"):
            args.workloads = "G2"
        if args.systems == p.get_default("systems"):
            args.systems = "attrserve,B2"
        if {s.strip() for s in args.systems.split(",")} & {"B1", "L"}:
            p.error("--gpu compares attrserve with B2 (and noop); B1 and L run on the CPU")
    if args.seconds is None:
        args.seconds = 2.0 if args.smoke else 10.0
    if args.warmup_seconds is None:
        args.warmup_seconds = 0.5 if args.smoke else 2.0
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    try:
        args.tail_sweep = sorted({int(c) for c in args.tail_sweep.split(",") if c.strip()})
    except ValueError:
        p.error(f"--tail-sweep: comma-separated caller counts, got {args.tail_sweep!r}")
    if any(c < 1 for c in args.tail_sweep) or args.tail_sweep_rounds < 1:
        p.error("--tail-sweep's callers and --tail-sweep-rounds must be at least 1")
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        p.error(f"unknown systems {sorted(unknown)}; valid: {', '.join(SYSTEMS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        report = json.loads(args.render.read_text())
        for soak in report.get("rss_soak", {}).values():
            soak_range(soak)
        report["targets"] = evaluate_targets(
            report["workloads"], report.get("rss_soak", {}), report.get("meta", {}).get("cpus"), report.get("tail_sweep")
        )
        print(markdown(report))
        return 0
    if args.malloc == "glibc":
        args.attrserve_arg.append("--allocator=glibc")
        if argv is None and heap_allocator() != "glibc":  # started with a malloc preloaded: again without it
            os.execve(sys.executable, [sys.executable, *sys.argv], {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"})
    elif argv is None and "LD_PRELOAD" not in os.environ and (tcmalloc := ctypes.util.find_library("tcmalloc_minimal")):
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, LD_PRELOAD=tcmalloc))
    # SIGTERM (a test's timeout, a CI cancel) unwinds like Ctrl-C, so every server is stopped in its finally.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    catalog = gpu_workloads(args.smoke) if args.gpu else all_workloads(args.smoke)
    keys = [k.strip().upper() for k in args.workloads.split(",") if k.strip()]
    bad = [k for k in keys if k not in catalog]
    if bad:
        print(f"error: unknown workloads {bad}; valid: {', '.join(catalog)}", file=sys.stderr)
        return 2
    soak_keys = (
        keys
        if args.rss_soak_workloads.strip().lower() == "all"
        else [k.strip().upper() for k in args.rss_soak_workloads.split(",") if k.strip()]
    )
    log_dir = args.json.resolve().parent / "logs"
    started = time.time()
    report = {
        "meta": {
            "started": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
            "argv": sys.argv[1:] if argv is None else argv,
            "smoke": args.smoke,
            "rounds": args.rounds,
            "tail_sweep": args.tail_sweep,
            "tail_sweep_rounds": args.tail_sweep_rounds,
            "seconds": args.seconds,
            "warmup_seconds": args.warmup_seconds,
            "attrserve_args": args.attrserve_arg,
            "attrserve_env": args.attrserve_env,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "malloc": heap_allocator(),  # this process's, and so every system's of the run
            "device": args.device,
            "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") and torch.cuda.is_available() else None,
        },
        "workloads": {},
        "rss_soak": {},
        "tail_sweep": {},
        "targets": [],
    }
    failures = []
    for k in keys:
        try:
            report["workloads"][k] = run_workload(catalog[k], args, log_dir)
        except Exception as e:  # one broken workload must not lose the others' numbers
            traceback.print_exc()
            failures.append(f"{k}: {type(e).__name__}: {e}")
    for k in keys if args.tail_sweep and "attrserve" in args.systems else ():
        if k in report["workloads"]:
            try:
                report["tail_sweep"][k] = run_tail_sweep(catalog[k], args, report["workloads"][k]["concurrency"], log_dir)
            except Exception as e:
                traceback.print_exc()
                failures.append(f"{k} tail sweep: {type(e).__name__}: {e}")
    if args.rss_soak > 0:
        for k in soak_keys:
            if k in catalog:
                try:
                    report["rss_soak"][k] = run_soak(catalog[k], args, log_dir)
                except Exception as e:
                    traceback.print_exc()
                    failures.append(f"{k} soak: {type(e).__name__}: {e}")
    report["targets"] = evaluate_targets(report["workloads"], report["rss_soak"], report["meta"]["cpus"], report["tail_sweep"])
    report["meta"]["elapsed_s"] = round(time.time() - started, 1)
    report["failures"] = failures
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(_jsonable(report), indent=1))
    print(markdown(report))
    print(f"\nJSON: {args.json}   server logs: {log_dir}   ({report['meta']['elapsed_s']:.0f} s)")
    for f in failures:
        print(f"FAILED {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
