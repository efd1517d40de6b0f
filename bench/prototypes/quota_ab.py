"""`attrserve serve` under a CPU quota (a cgroup's, as Kubernetes' limits.cpu sets it) or on a CPU affinity, in
configurations compared in alternating rounds, a fresh server each time: requests per second, p50 and p99, the server's
CPU a request, and how often the kernel throttled the cgroup (the share of its CFS periods, and milliseconds a second).

    sudo .venv/bin/python bench/prototypes/quota_ab.py --workload W5 --rounds 3 --seconds 5 --quota 1 \\
        --config "old=env:PYTHONPATH=<worktree>/engine:<worktree>/service:<worktree>/clients/python" --config "new="
    .venv/bin/python bench/prototypes/quota_ab.py --workload W5 --cpus 0 --config ... --config ...

`--quota Q` (cores) makes the cgroup `attrserve-quota` with a quota of Q × 100 ms per 100 ms period and starts each
server in it (the load client stays outside). It needs root and a writable cgroup file system: v1's cpu controller at
/sys/fs/cgroup/cpu, or v2 at /sys/fs/cgroup with the cpu controller enabled for its children. `--cpus LIST` runs the
server under `taskset -c LIST` instead (or as well). Each `--config NAME=FLAGS` is extra `attrserve serve` flags, and
`env:KEY=VALUE` tokens set the server's environment (layout_ab.py's syntax).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import common
from common import W, harness

V1 = "/sys/fs/cgroup/cpu"
NAME = "attrserve-quota"


def make_cgroup(quota: float) -> tuple[str, int]:
    """The cgroup with `quota` cores, and its version."""
    period = 100_000
    if os.path.isdir(V1):
        path = os.path.join(V1, NAME)
        os.makedirs(path, exist_ok=True)
        for name, value in (("cpu.cfs_period_us", period), ("cpu.cfs_quota_us", int(quota * period))):
            with open(os.path.join(path, name), "w") as f:
                f.write(str(value))
        return path, 1
    path = os.path.join("/sys/fs/cgroup", NAME)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "cpu.max"), "w") as f:
        f.write(f"{int(quota * period)} {period}")
    return path, 2


def throttling(cgroup: str | None) -> tuple[int, int, float]:
    """The cgroup's CFS periods so far, those throttled, and the seconds throttled (0s without a cgroup)."""
    if cgroup is None:
        return 0, 0, 0.0
    with open(os.path.join(cgroup, "cpu.stat")) as f:
        stat = dict(line.split() for line in f)
    seconds = int(stat["throttled_time"]) / 1e9 if "throttled_time" in stat else int(stat.get("throttled_usec", 0)) / 1e6
    return int(stat["nr_periods"]), int(stat["nr_throttled"]), seconds


def run(name: str, tokens: list[str], workload: str, seconds: float, cgroup: str | None, cpus: str) -> dict:
    flags, env = common.config_tokens(tokens)
    port, metrics_port = harness.free_port(), harness.free_port()
    argv = common.attrserve_argv(port, metrics_port, flags)
    enter = f"echo $$ > {cgroup}/cgroup.procs; " if cgroup else ""
    argv = ["sh", "-c", enter + 'exec "$@"', "sh", *(["taskset", "-c", cpus] if cpus else []), *argv]
    server = common.start(f"quota-{name}", argv, port, env=env)
    try:
        w = W[workload]
        harness.drive(server.target, w.requests(), w.concurrency, 3.0, record=False)
        before = throttling(cgroup)
        out = common.measure(server, workload, seconds, warmup=0.0)
        after = throttling(cgroup)
        periods, wall = after[0] - before[0], out["n"] / out["req_s"] if out["n"] else seconds
        out["throttled"] = (after[1] - before[1]) / periods if periods else 0.0
        out["throttled_ms_s"] = 1e3 * (after[2] - before[2]) / wall
        return out
    finally:
        server.stop()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--workload", default="W5")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--quota", type=float, default=0.0, help="cores of CPU quota for the server (0: none)")
    p.add_argument("--cpus", default="", help="the server's CPU affinity, as taskset -c takes it")
    p.add_argument("--config", action="append", required=True, help="NAME=FLAGS (env:KEY=VALUE for the environment)")
    a = p.parse_args()
    cgroup = make_cgroup(a.quota)[0] if a.quota else None
    configs = [(c.partition("=")[0], c.partition("=")[2].split()) for c in a.config]
    results: dict[str, list[dict]] = {name: [] for name, _ in configs}
    for r in range(a.rounds):
        for name, tokens in configs if r % 2 == 0 else configs[::-1]:
            out = run(name, tokens, a.workload, a.seconds, cgroup, a.cpus)
            results[name].append(out)
            print(
                f"round {r + 1} {name}: {out['req_s']:.0f} req/s, p50 {out['p50']:.2f} ms, p99 {out['p99']:.2f} ms, "
                f"{out['errors']} errors, server CPU {out['cpu_ms_req']:.2f} ms/req, throttled in "
                f"{100 * out['throttled']:.0f}% of periods, {out['throttled_ms_s']:.0f} ms/s",
                flush=True,
            )
    where = ", ".join(filter(None, [f"CPU quota {a.quota:g} cores" if a.quota else "", f"CPUs {a.cpus}" if a.cpus else ""]))
    print(f"\n{a.workload}, {where or 'no quota'}, medians of {a.rounds} rounds:")
    print("| config | req/s (rounds) | p50 ms | p99 ms | server CPU ms/req | periods throttled | throttled ms/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, rounds in results.items():

        def median(key: str, rounds: list[dict] = rounds) -> float:
            return statistics.median(x[key] for x in rounds)

        each = ", ".join(f"{x['req_s']:.0f}" for x in rounds)
        print(
            f"| {name} | {median('req_s'):.0f} ({each}) | {median('p50'):.2f} | {median('p99'):.2f} | "
            f"{median('cpu_ms_req'):.2f} | {100 * median('throttled'):.0f}% | {median('throttled_ms_s'):.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
