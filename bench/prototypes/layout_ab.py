"""`attrserve serve` in different configurations, in alternating rounds, under one workload: throughput, latency and
CPU per request of every process and thread of the server (front end, engine-core process), of the load client, and
how busy the whole machine was.
With `--scrape-every S` (or a config's token `scrape:S`, for that configuration only) a thread fetches /metrics every
S seconds during the measured load (gzip, as Prometheus asks for it); the table shows the tail (p99.9, max) and
what the scrapes took.

    .venv/bin/python bench/prototypes/layout_ab.py --workload W1 --rounds 3 --seconds 6 \\
        --config split= --config one-process=--no-engine-process

Each `--config NAME=FLAGS` is a set of extra `attrserve serve` flags (space-separated; empty: the defaults; a token
`env:KEY=VALUE` sets an environment variable of the server instead). Rounds
alternate the configurations (A, B, A, B, ...) with a fresh server each time, so a comparison does not straddle the
machine's fast and slow phases: read the ratios inside a round. The load client is bench/harness.py's, in this process.

`--paired` starts every configuration's server afresh in each round, all at once, and measures them in bursts of
`--seconds` in the order A, B, B, A (after a 0.3 s warm-up each), so both see the same phase of the machine; the two
bursts of a configuration are averaged. Before the bursts each fresh server gets `--settle` seconds of unmeasured load
(2 by default); 20 or more measure where the pass-size tuner settles rather than its start. It ends with each
configuration's ratios against the first, round by round: the median, the range and in how many rounds it did better.
Why: the machine's phases last tens of seconds and swing throughput by up to 40%, and two servers of the same code
differ by ~5% for their whole life (an A/A run, 10 rounds of bursts on one pair of servers: 0.94×, 2 of 10 faster); a
fresh pair each round averages that out.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import threading
import time
import urllib.request

import common
from common import W, harness

_TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pids: list[int]) -> dict[tuple[int, str], tuple[str, float]]:
    """(pid, tid) → (thread name, CPU seconds so far) for every thread of `pids`."""
    out = {}
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    raw = f.read()
            except OSError:
                continue
            fields = raw.rsplit(")", 1)[1].split()
            out[(pid, tid)] = (raw[raw.index("(") + 1 : raw.rindex(")")], (int(fields[11]) + int(fields[12])) / _TICK)
    return out


def _client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _machine() -> tuple[int, int]:
    """(all, idle) jiffies of every core since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return sum(values), values[3] + values[4]  # idle + iowait


class Scraper(threading.Thread):
    """GET /metrics every `every` seconds until stopped: how long each took and how many bytes came."""

    def __init__(self, metrics_port: int, every: float) -> None:
        super().__init__(daemon=True)
        self.url, self.every = f"http://127.0.0.1:{metrics_port}/metrics", every
        self.stopped = threading.Event()
        self.took: list[float] = []
        self.nbytes = 0

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            start = time.perf_counter()
            with urllib.request.urlopen(urllib.request.Request(self.url, headers={"Accept-Encoding": "gzip"}), timeout=30) as r:
                self.nbytes = len(r.read())
            self.took.append(time.perf_counter() - start)


class Config:
    """One configuration's server, started from its tokens (flags, `env:KEY=VALUE`, `scrape:S`)."""

    def __init__(self, name: str, tokens: list[str], scrape_every: float | None) -> None:
        self.name = name
        self.port, self.metrics_port = harness.free_port(), harness.free_port()
        self.flags, self.env = common.config_tokens(tokens, own=("scrape:",))
        self.scrape_every = next((float(t[7:]) for t in tokens if t.startswith("scrape:")), scrape_every)
        self.server = common.start(f"ab-{name}", common.attrserve_argv(self.port, self.metrics_port, self.flags), self.port, env=self.env)
        self.pids = common.tree(self.server.pid)


def run(name: str, tokens: list[str], workload: str, seconds: float, scrape_every: float | None = None) -> dict:
    """A fresh server of the configuration: 1.5 s of warm-up, then `seconds` measured."""
    config = Config(name, tokens, scrape_every)
    try:
        return measure(config, workload, seconds, warmup=1.5)
    finally:
        config.server.stop()


def measure(config: Config, workload: str, seconds: float, warmup: float) -> dict:
    server, pids = config.server, config.pids
    w = W[workload]
    requests = w.requests()
    harness.drive(server.target, requests, w.concurrency, warmup, record=False)
    before, start, client0, machine0 = thread_cpu(pids), time.monotonic(), _client_cpu(), _machine()
    scraper = Scraper(config.metrics_port, config.scrape_every) if config.scrape_every else None
    if scraper is not None:
        scraper.start()
    load = harness.drive(server.target, requests, w.concurrency, seconds, record=True)
    if scraper is not None:
        scraper.stopped.set()
        scraper.join()
    after, wall, client1, machine1 = thread_cpu(pids), time.monotonic() - start, _client_cpu(), _machine()
    n = len(load.latencies_ms)
    stats = harness.latency_stats(load.latencies_ms)
    per_process: dict[int, float] = {}
    threads = []
    for key, (thread, cpu) in after.items():
        used = cpu - before.get(key, (thread, 0.0))[1]
        per_process[key[0]] = per_process.get(key[0], 0.0) + used
        if used > 0.02 * wall:
            threads.append(f"{'front' if key[0] == server.pid else 'engine'}/{thread} {100 * used / wall:.0f}%")
    return {
        "req_s": n / load.wall_s,
        "p50": stats["p50_ms"],
        "p99": stats["p99_ms"],
        "errors": load.errors,
        "front_ms": 1e3 * per_process.get(server.pid, 0.0) / n if n else None,
        "engine_ms": 1e3 * sum(v for p, v in per_process.items() if p != server.pid) / n if n else None,
        "busy": sum(per_process.values()) / wall / (os.cpu_count() or 1),
        "client_ms": 1e3 * (client1 - client0) / n if n else None,  # the load client (this process)
        "machine": 1 - (machine1[1] - machine0[1]) / max(machine1[0] - machine0[0], 1),  # every core, all processes
        "threads": ", ".join(threads),
        "p999": stats["p999_ms"],
        "max": stats["max_ms"],
        "scrapes": f"{len(scraper.took)}, {1e3 * statistics.mean(scraper.took):.0f} ms, {scraper.nbytes / 1024:.0f} KiB"
        if scraper is not None and scraper.took
        else "",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="W1")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--config", action="append", required=True, metavar="NAME=FLAGS")
    p.add_argument("--scrape-every", type=float, default=None, metavar="S", help="scrape /metrics every S s during the load")
    p.add_argument("--paired", action="store_true", help="per round: fresh servers of all configs, bursts A, B, B, A; paired ratios")
    p.add_argument("--settle", type=float, default=2.0, metavar="S", help="--paired: unmeasured load on each fresh server first")
    args = p.parse_args()
    configs = [(c.split("=", 1)[0], c.split("=", 1)[1].split()) for c in args.config]
    rows: dict[str, list[dict]] = {name: [] for name, _ in configs}
    _rounds(args, configs, rows)
    for name, runs in rows.items():
        req_s, p50 = statistics.median(r["req_s"] for r in runs), statistics.median(r["p50"] for r in runs)
        p99 = statistics.median(r["p99"] for r in runs)
        print(f"{args.workload} {name}: median {req_s:.0f} req/s, p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    if args.paired:
        _paired_summary(args.workload, rows)


def _paired_round(args: argparse.Namespace, configs: list[tuple[str, list[str]]]) -> dict[str, dict]:
    """Fresh servers of every configuration, measured A, B, B, A; each configuration's two bursts averaged."""
    servers: dict[str, Config] = {}
    try:
        for name, flags in configs:
            servers[name] = Config(name, flags, args.scrape_every)
            harness.drive(servers[name].server.target, W[args.workload].requests(), W[args.workload].concurrency, args.settle, record=False)
        bursts: dict[str, list[dict]] = {name: [] for name, _ in configs}
        for name, _ in configs + configs[::-1]:
            bursts[name].append(measure(servers[name], args.workload, args.seconds, warmup=0.3))
    finally:
        for config in servers.values():
            config.server.stop()
    return {
        name: {k: (statistics.mean(b[k] for b in runs) if isinstance(v, (int, float)) else v) for k, v in runs[0].items()}
        for name, runs in bursts.items()
    }


def _rounds(args: argparse.Namespace, configs: list[tuple[str, list[str]]], rows: dict[str, list[dict]]) -> None:
    print(
        "| round | config | req/s | p50 ms | p99 ms | p99.9 ms | max ms | errors | front CPU ms/req | engine CPU ms/req | "
        f"server CPU % of {os.cpu_count()} cores | client CPU ms/req | machine busy | threads (% of a core) | scrapes: count, mean, page |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for number in range(1, args.rounds + 1):
        paired = _paired_round(args, configs) if args.paired else {}
        for name, flags in configs:
            r = paired[name] if args.paired else run(name, flags, args.workload, args.seconds, args.scrape_every)
            rows[name].append(r)
            print(
                f"| {number} | {name} | {r['req_s']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['p999']:.2f} | {r['max']:.1f} | "
                f"{r['errors']} | {r['front_ms']:.3f} | {r['engine_ms']:.3f} | {100 * r['busy']:.0f}% | {r['client_ms']:.3f} | "
                f"{100 * r['machine']:.0f}% | {r['threads']} | {r['scrapes']} |",
                flush=True,
            )


def _paired_summary(workload: str, rows: dict[str, list[dict]]) -> None:
    """Each configuration against the first, round by round: the median ratio, its range, how many rounds it won."""
    names = list(rows)
    base = rows[names[0]]
    print(
        f"\n| {workload}: against {names[0]}, same round | req/s ratio: median (min–max) | rounds faster | p50 ratio: median | "
        "rounds with lower p50 | server CPU per request ratio: median |"
    )
    print("|---|---|---:|---|---:|---|")
    for name in names[1:]:
        pairs = list(zip(rows[name], base))
        rate = [a["req_s"] / b["req_s"] for a, b in pairs]
        p50 = [a["p50"] / b["p50"] for a, b in pairs]
        cpu = [(a["front_ms"] + a["engine_ms"]) / (b["front_ms"] + b["engine_ms"]) for a, b in pairs]
        print(
            f"| {name} | {statistics.median(rate):.3f} ({min(rate):.3f}–{max(rate):.3f}) | {sum(r > 1 for r in rate)}/{len(pairs)} | "
            f"{statistics.median(p50):.3f} | {sum(r < 1 for r in p50)}/{len(pairs)} | {statistics.median(cpu):.3f} |"
        )


if __name__ == "__main__":
    main()
