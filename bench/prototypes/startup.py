"""Start-up: seconds from exec to every model ready and to the first answer, attrserve against B2, in alternating rounds.

    .venv/bin/python bench/prototypes/startup.py [--rounds 5] [--smoke-models] [--restarts N] \\
        [--config "old=env:PYTHONPATH=<tree>/engine:<tree>/service:<tree>/clients/python" --config "new="]

Every round starts each system once, in turn: B2 (bench/baseline_server.py: one process, gRPC + Captum, what a user
could run instead), then attrserve in each `--config NAME=FLAGS` (extra `attrserve serve` flags; `env:KEY=VALUE` sets
a variable of the server; default: one configuration, the defaults). Each serves bench/models, the bench's four
models, whose pass-size probes take seconds (`--smoke-models`: bench/models_smoke, the same four at tiny sizes).
Measured per start, from the exec: every model ready (ListModels, polled every 20 ms on a channel that reconnects
within 100 ms), the first answer (Saliency on bench_mlp, checked against Captum), and the RSS of the server's process
tree then, and of its front end alone. With `--restarts N`, attrserve's engine process is then killed (SIGKILL) N
times, and each recovery is measured the same way from the kill: every model ready again in a new engine process,
and its first answer. Each kill comes 1 s after the last recovery, so the front's back-off doubles as for a process
that keeps dying (0.5 s before the first restart, then 1 s, 2 s, ...; the stderr lines give each). The table gives
the median and the range over the rounds (and the restarts).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/

from common import ROOT, config_tokens, tree

from attrserve_client import AttributionClient

import harness
from workloads import build_model

NAMES = ("bench_cnn", "bench_cnn224", "bench_mlp", "bench_text")
POLL_S = 0.02


def answer(server: harness.ServerProcess, t0: float, x: np.ndarray, expected: np.ndarray) -> float:
    """Seconds from `t0` until the first answer is back; it must equal Captum's."""
    with AttributionClient(server.target) as client:
        got = client.attribute("bench_mlp", "saliency", x, target=0, timeout=60).attributions
    answered = time.monotonic() - t0
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    return answered


def one_start(name: str, argv: list[str], port: int, env: dict[str, str], x: np.ndarray, expected: np.ndarray, restarts: int) -> dict:
    server = harness.ServerProcess(name, argv, port, ROOT / "bench" / "out" / "proto_logs" / f"startup-{name}.log", env=env)
    t0 = time.monotonic()
    server.start()
    try:
        ready = server.wait_ready(list(NAMES), since=t0, poll_s=POLL_S)
        answered = answer(server, t0, x, expected)
        rss_kib = sum(harness.proc_status_kib(pid, "VmRSS") or 0 for pid in tree(server.pid))
        front_kib = harness.proc_status_kib(server.pid, "VmRSS") or 0  # attrserve's front end; B2's one process
        out = {"ready": ready, "answer": answered, "rss": harness.mib(rss_kib), "front": harness.mib(front_kib), "restarts": []}
        for _ in range(restarts):
            time.sleep(1.0)  # the front's restart delay counts from the last start
            engine = next(pid for pid in tree(server.pid) if pid != server.pid)
            t0 = time.monotonic()
            os.kill(engine, signal.SIGKILL)
            # every model ready again, in a new engine process
            again = server.wait_ready(list(NAMES), since=t0, poll_s=POLL_S, also=lambda gone=engine: gone not in tree(server.pid))
            out["restarts"].append({"ready": again, "answer": answer(server, t0, x, expected)})
        return out
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--config", action="append", default=[], metavar="NAME=FLAGS")
    parser.add_argument("--smoke-models", action="store_true", help="bench/models_smoke instead of bench/models")
    parser.add_argument("--restarts", type=int, default=0, help="then kill attrserve's engine process this many times")
    args = parser.parse_args()
    repo = ROOT / "bench" / ("models_smoke" if args.smoke_models else "models")
    configs = {spec.split("=", 1)[0]: config_tokens(spec.split("=", 1)[1].split()) for spec in args.config} or {"attrserve": ([], {})}

    from captum.attr import Saliency  # the oracle of the first answer

    model = build_model("bench_mlp", repo)
    features = next(m for m in model.modules() if isinstance(m, torch.nn.Linear)).in_features
    x = np.random.default_rng(0).standard_normal((1, features)).astype(np.float32)
    expected = Saliency(model).attribute(torch.from_numpy(x), target=0).detach().numpy()

    systems: dict[str, tuple[list[str], dict[str, str]]] = {"B2": ([], {})}
    systems |= {f"attrserve {name}" if name != "attrserve" else name: c for name, c in configs.items()}
    runs: dict[str, list[dict]] = {s: [] for s in systems}
    for number in range(1, args.rounds + 1):
        for system, (flags, env) in systems.items():
            port = harness.free_port()
            if system == "B2":
                argv = harness.baseline_argv(repo, port, noop=False)
            else:
                argv = harness.attrserve_argv(repo, port, harness.free_port(), flags)
            r = one_start(system, argv, port, env, x, expected, 0 if system == "B2" else args.restarts)
            runs[system].append(r)
            again = "".join(f", restart {a['ready']:.2f} s" for a in r["restarts"])
            print(
                f"round {number}, {system}: ready {r['ready']:.2f} s, first answer {r['answer']:.2f} s, "
                f"{r['rss']:.0f} MiB (front {r['front']:.0f}){again}",
                file=sys.stderr,
                flush=True,
            )

    def cell(values: list[float], digits: int = 2) -> str:
        return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"

    print(f"\n{args.rounds} rounds; {os.cpu_count()} CPUs; {repo.relative_to(ROOT)}: {', '.join(NAMES)}\n")
    head = "| system | every model ready, s | first answer, s | RSS then, MiB | the front end's (B2: its one process), MiB |"
    rule = "|---|---:|---:|---:|---:|"
    if args.restarts:
        head, rule = head + " after a SIGKILL of the engine process: every model ready, s | its first answer, s |", rule + "---:|---:|"
    print(head)
    print(rule)
    for system, rs in runs.items():
        row = f"| {system} | {cell([r['ready'] for r in rs])} | {cell([r['answer'] for r in rs])} | "
        row += f"{cell([r['rss'] for r in rs], 0)} | {cell([r['front'] for r in rs], 0)} |"
        if args.restarts:
            again = [a for r in rs for a in r["restarts"]]
            row += f" {cell([a['ready'] for a in again])} | {cell([a['answer'] for a in again])} |" if again else " — | — |"
        print(row)


if __name__ == "__main__":
    main()
