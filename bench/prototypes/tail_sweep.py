"""attrserve's tail latency at several concurrencies: p50, p99 and p99/p50 against the issue's "p99 <= 3x p50 at every
concurrency", for comparing configurations (bench/run.py --tail-sweep judges the defaults in the table of record). W1
missed it at 4 and 8 callers while it met it at 32 (bench/RESULTS.md, issue 12 step 24).

    .venv/bin/python bench/prototypes/tail_sweep.py --workload W1 [--callers 2,4,8,16,32] [--seconds 8] [--rounds 2] \\
        [--config "old=env:PYTHONPATH=<tree>/engine:<tree>/service:<tree>/clients/python" --config "new="]

Every (round, callers, configuration) starts a fresh server and measures it as bench/run.py does (`tail_point`: ready,
warm-up, the measured window). A `--config NAME=FLAGS` is extra `attrserve serve` flags, space-separated; a token
`env:KEY=VALUE` sets an environment variable of the server instead (default: one configuration, the defaults). Inside a
round the configurations alternate at each concurrency. The table gives each round's p99/p50 and their median.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # bench/

import common  # noqa: E402
import run  # noqa: E402

from workloads import all_workloads  # noqa: E402


def configs(specs: list[str]) -> dict[str, tuple[list[str], dict[str, str]]]:
    """NAME=FLAGS → name: (attrserve flags, environment)."""
    out = {}
    for spec in specs or ["attrserve="]:
        name, _, flags = spec.partition("=")
        out[name] = common.config_tokens(flags.split())
    return out


def _joined(rs: list[dict], key: str, digits: int) -> str:
    return ", ".join(run._fmt(r[key], digits) for r in rs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="W1")
    p.add_argument("--callers", default="2,4,8,16,32", help="comma-separated concurrencies")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--warmup-seconds", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--config", action="append", default=[], metavar="NAME=FLAGS")
    p.add_argument("--smoke", action="store_true", help="bench/models_smoke's tiny models (the plumbing's test)")
    args = p.parse_args(argv)
    w = all_workloads(args.smoke)[args.workload]
    callers = [int(c) for c in args.callers.split(",")]
    runs = configs(args.config)
    log_dir = HERE.parent / "out" / "proto_logs"
    results: dict[tuple[int, str], list[dict]] = {}
    for number in range(1, args.rounds + 1):
        for c in callers:
            for name, (flags, env) in runs.items():
                base = ["--workloads", w.key, "--systems", "attrserve", "--seconds", str(args.seconds)]
                base += ["--warmup-seconds", str(args.warmup_seconds)] + (["--smoke"] if args.smoke else [])
                base += [f"--attrserve-arg={f}" for f in flags] + [f"--attrserve-env={k}={v}" for k, v in env.items()]
                settings = run.parse_args(base)
                r = run.tail_point(w, settings, c, log_dir)
                results.setdefault((c, name), []).append(r)
                print(
                    f"round {number}, {c} callers, {name}: {r['throughput_rps']:.1f} req/s, p50 {run._fmt(r['p50_ms'], 2)} ms, "
                    f"p99 {run._fmt(r['p99_ms'], 2)} ms ({run._fmt(r['p99_over_p50'], 2)}x), {r['errors']} errors",
                    file=sys.stderr,
                    flush=True,
                )
    print(f"\n{w.key}: {w.title}; {args.rounds} round(s) of {args.seconds:g} s per concurrency and configuration\n")
    print("| callers | config | req/s by round | p50 ms by round | p99 ms by round | p99/p50 by round | median p99/p50 | p99 <= 3x p50 |")
    print("|---:|---|---|---|---|---|---:|---|")
    limit = run.P99_OVER_P50
    for (c, name), rs in results.items():
        median = run.tail_summary(rs)["p99_over_p50"]
        print(
            f"| {c} | {name} | {_joined(rs, 'throughput_rps', 1)} | {_joined(rs, 'p50_ms', 2)} | {_joined(rs, 'p99_ms', 2)} | "
            f"{_joined(rs, 'p99_over_p50', 2)} | {run._fmt(median, 2)} | {'met' if median is not None and median <= limit else 'MISSED'} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
