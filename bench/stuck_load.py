"""A model whose load never returns: when `attrserve serve` serves its other models, with the watchdogs off (the
server before them) and on, in one run.

    .venv/bin/python bench/stuck_load.py                     # ~3 minutes
    .venv/bin/python bench/stuck_load.py --limit 10 --wait 60 --scenarios waits,gil,runtime

`attrserve serve` (a subprocess, on free 127.0.0.1 ports) with a repository of the tests' `good` MLP and a model whose
build never returns:

- waits: its build sleeps in Python until a file appears that never does, as a stalled download would (the GIL is
  free). Off: `--stuck-load-seconds 0`; on: `--stuck-load-seconds LIMIT`.
- gil: its build sleeps in libc with the GIL held, as a C extension's hang would. Off: `--stuck-pass-seconds 0` (no
  heartbeat); on: `--stuck-pass-seconds LIMIT`.
- runtime (on only: off is the server before issue 12 step 37, which never noticed): `--model-control explicit`, the
  model loads at start (its file is there), 8 callers send `good` requests, and a LoadModel reloads it without the
  file: its build holds the GIL. The front kills the engine process after LIMIT s; when health said SERVING again
  (within WAIT s), and what the callers saw. The code before issue 12 step 39 can run this one
  (`PYTHONPATH=<its engine>:<its service>:<its client> ... --scenarios runtime`).

Per run: the seconds until the port opened (or that it did not within WAIT s), what ListModels says of the stuck
model, whether `good` answered. Nothing here asserts anything.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests" / "service"), str(ROOT / "tests")]

from query_of_death import Load, print_rows  # noqa: E402
from servers import ServeProcess  # noqa: E402
from test_engine_process import held_load  # noqa: E402
from test_model_management import TARGET, X, health, mlp, stuck_mlp, write  # noqa: E402

from attrserve.v1 import attribution_service_pb2 as pb  # noqa: E402
from attrserve_client import NO_RETRY, AttributionClient  # noqa: E402

BUILDS = {"waits": stuck_mlp, "gil": held_load}
FLAGS = {"waits": "--stuck-load-seconds", "gil": "--stuck-pass-seconds"}


def repository(build: str, release: Path) -> Path:
    repo = Path(tempfile.mkdtemp())
    write(repo / "good", mlp(1))
    write(repo / "stuck", BUILDS[build](6, release))
    return repo


def shown(client: AttributionClient) -> str:
    try:
        (model,) = [m for m in client.list_models(timeout=10) if m.config.name == "stuck"]
    except grpc.RpcError as e:
        return f"ListModels: {e.code().name}"
    reason = model.reason if len(model.reason) < 90 else model.reason[:90] + "..."
    return f"{pb.ModelState.Name(model.state).removeprefix('MODEL_STATE_')}: {reason}"


def serving_again(address: str, wait: float) -> str:
    """Seconds until health says SERVING (polled every 50 ms), or that it did not within `wait` s."""
    started = time.monotonic()
    while health(address) != health_pb2.HealthCheckResponse.SERVING:
        if time.monotonic() - started > wait:
            return f"not within {wait:g} s"
        time.sleep(0.05)
    return f"after {time.monotonic() - started:.1f} s"


def good_answers(client: AttributionClient) -> str:
    try:
        client.attribute("good", "integrated_gradients", X, target=TARGET, timeout=30)
        return "yes"
    except grpc.RpcError as e:
        return e.code().name


def start_up(build: str, limit: float, wait: float) -> dict:
    """The server's start with the stuck model in its repository, `FLAGS[build]` set to `limit`."""
    release = Path(tempfile.mkdtemp()) / "never"
    repo = repository(build, release)
    started = time.monotonic()
    row = {"scenario": f"start-up, build {build}", "setting": f"{FLAGS[build]} {limit:g}"}
    try:
        server = ServeProcess(["--model-repository", str(repo), FLAGS[build], str(limit), "--no-batch-probe"], start_timeout=wait)
    except AssertionError:
        return {**row, "port open after": f"not within {wait:g} s", "the stuck model": "", "good answers": "no"}
    try:
        with AttributionClient(server.address, retry=NO_RETRY) as client:
            opened = time.monotonic() - started
            return {**row, "port open after": f"{opened:.1f} s", "the stuck model": shown(client), "good answers": good_answers(client)}
    finally:
        server.stop()


def runtime(limit: float, wait: float) -> dict:
    release = Path(tempfile.mkdtemp()) / "release"
    release.touch()
    repo = repository("gil", release)
    args = ["--model-repository", str(repo), "--model-control", "explicit", "--stuck-pass-seconds", str(limit), "--no-batch-probe"]
    row = {"scenario": "run time: LoadModel, build gil, 8 callers", "setting": f"--stuck-pass-seconds {limit:g}"}
    server = ServeProcess(args, start_timeout=wait, metrics=True)
    try:
        load = Load(server, 8)  # type: ignore[arg-type]  # (it needs .address)
        time.sleep(2)
        release.unlink()
        started = time.monotonic()
        try:
            AttributionClient(server.address, retry=NO_RETRY).load_model("stuck", timeout=wait)
            outcome = "OK"
        except grpc.RpcError as e:
            outcome = e.code().name
        took = time.monotonic() - started
        back = serving_again(server.address, wait)
        time.sleep(2)
        others = load.end()
        with AttributionClient(server.address, retry=NO_RETRY) as client:
            stuck = shown(client)
            answers = good_answers(client)
        got = f"{outcome} after {took:.1f} s"
        return {**row, "LoadModel got": got, "SERVING again": back, "the stuck model": stuck, "good answers": answers, **others}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=float, default=10.0, help="the watchdogs' setting when on (seconds)")
    parser.add_argument("--wait", type=float, default=60.0, help="how long to wait for a port to open")
    parser.add_argument("--scenarios", default="waits,gil,runtime")
    args = parser.parse_args()
    rows = []
    for scenario in args.scenarios.split(","):
        runs = (
            [lambda: runtime(args.limit, args.wait)]
            if scenario == "runtime"
            else [lambda s=scenario, limit=limit: start_up(s, limit, args.wait) for limit in (0.0, args.limit)]
        )
        for run in runs:
            rows.append(run())
            print(rows[-1], file=sys.stderr, flush=True)
    print_rows(rows)


if __name__ == "__main__":
    main()
