"""Queries of death: what a request that kills the engine process costs the other callers, with the quarantine off
(`--quarantine-seconds 0`, the server before it) and on (600 s, the default), in one run.

    .venv/bin/python bench/query_of_death.py            # ~2 minutes
    .venv/bin/python bench/query_of_death.py --quarantine 0,600,30 --sends 5

A server (in this process, on free 127.0.0.1 ports) serves the tests' `good` MLP and `crashy` model (its forward calls
os._exit(13) on an input of 1234: tests/service/test_engine_process.py's FRAGILE). Two scenarios per setting, each on a
fresh server:

1. query of death: 8 callers send `good` IntegratedGradients requests in a closed loop (each its own inputs; a failed
   one is sent again, as a retrying client would, after 50 ms). After 2 s, a client with the Python client's default
   retries (5 attempts, the server's 1 s pushback) sends the deadly request, `--sends` times, each once the server
   serves again and 5 s after the last.
2. outside kill: 16 such callers; after 3 s the engine process is killed (SIGKILL), which no request caused.

Per scenario: what the deadly calls got, the engine process's deaths (attrserve_engine_process_restarts_total), the
other callers' answers and failures, the seconds health said NOT_SERVING (polled every 50 ms), and the suspects run
alone (attrserve_suspect_probes_total). Nothing here asserts anything.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "service"), str(ROOT / "tests")]

from grpc_health.v1 import health_pb2  # noqa: E402
from servers import ServerThread, scrape  # noqa: E402
from test_engine_process import FRAGILE, health  # noqa: E402
from test_model_management import TARGET, X, mlp, write  # noqa: E402

from attrserve_client import NO_RETRY, AttributionClient  # noqa: E402
from attrserve_engine import EngineLimits  # noqa: E402
from attrserve_service.config import ServerConfig  # noqa: E402

SERVING = health_pb2.HealthCheckResponse.SERVING
DEADLY = np.full((1, 4), 1234.0, np.float32)


def serve(quarantine: float) -> ServerThread:
    repo = Path(tempfile.mkdtemp())
    write(repo / "good", mlp(1))
    write(repo / "crashy", FRAGILE)
    limits = EngineLimits(default_device="cpu", probe_batch_rows=False)
    config = ServerConfig(port=0, metrics_port=0, model_repository=repo, limits=limits, quarantine_seconds=quarantine)
    return ServerThread(None, config)


class Load:
    """`callers` closed-loop callers of `good` and a health poller, until `end`."""

    def __init__(self, server: ServerThread, callers: int) -> None:
        self.server = server
        self.stop = threading.Event()
        self.ok = 0
        self.failed: dict[str, int] = {}
        self.down = 0.0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.call, args=(i,)) for i in range(callers)]
        self.threads.append(threading.Thread(target=self.watch))
        for thread in self.threads:
            thread.start()

    def call(self, seed: int) -> None:
        client = AttributionClient(self.server.address, retry=NO_RETRY)
        rng = np.random.default_rng(seed)
        x = X + rng.random(X.shape, dtype=np.float32)
        while not self.stop.is_set():
            try:
                client.attribute("good", "integrated_gradients", x, target=TARGET, timeout=10)
                with self.lock:
                    self.ok += 1
                x = X + rng.random(X.shape, dtype=np.float32)
            except grpc.RpcError as e:
                with self.lock:
                    self.failed[e.code().name] = self.failed.get(e.code().name, 0) + 1
                time.sleep(0.05)  # and the same request again

    def watch(self) -> None:
        while not self.stop.is_set():
            start = time.monotonic()
            up = health(self.server.address) == SERVING
            time.sleep(0.05)
            if not up:
                self.down += time.monotonic() - start

    def end(self) -> dict:
        self.stop.set()
        for thread in self.threads:
            thread.join()
        return {"other answered": self.ok, "other failed": sum(self.failed.values()), "NOT_SERVING s": round(self.down, 1)}


def counters(server: ServerThread) -> dict:
    page = scrape(server.running.metrics_port)
    found = {"deaths": page.get(("attrserve_engine_process_restarts_total", frozenset()), 0.0), "served": 0.0, "quarantined": 0.0}
    for (name, labels), value in page.items():
        if name == "attrserve_suspect_probes_total":  # summed over the models
            found[dict(labels)["outcome"]] += value
    return found


def grown(before: dict, after: dict) -> dict:
    return {key: int(after.get(key, 0) - before.get(key, 0)) for key in ("deaths", "served", "quarantined")}


def wait_serving(server: ServerThread) -> None:
    while health(server.address) != SERVING:
        time.sleep(0.05)


def query_of_death(quarantine: float, sends: int) -> dict:
    server = serve(quarantine)
    try:
        before = counters(server)
        load = Load(server, 8)
        time.sleep(2)
        got = []
        for _ in range(sends):
            start = time.monotonic()
            try:
                AttributionClient(server.address).attribute("crashy", "saliency", DEADLY, target=0, timeout=120)
                got.append("OK")
            except grpc.RpcError as e:
                got.append(f"{e.code().name} {time.monotonic() - start:.1f} s")
            wait_serving(server)
            time.sleep(5)
        others = load.end()
        row = {"scenario": f"query of death, {sends} sends", "the deadly calls got": ", ".join(got)}
        return {**row, **grown(before, counters(server)), **others}
    finally:
        server.stop()


def outside_kill(quarantine: float) -> dict:
    server = serve(quarantine)
    try:
        before = counters(server)
        load = Load(server, 16)
        time.sleep(3)
        os.kill(server.running.core.pid, signal.SIGKILL)
        time.sleep(0.5)
        wait_serving(server)
        answered = load.ok
        time.sleep(5)
        rate = (load.ok - answered) / 5
        others = load.end()
        row = {"scenario": "outside SIGKILL, 16 callers", "the deadly calls got": "", **grown(before, counters(server)), **others}
        return {**row, "other req/s, 5 s after": round(rate)}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quarantine", default="0,600", help="--quarantine-seconds settings to compare (comma-separated)")
    parser.add_argument("--sends", type=int, default=3, help="how many times the deadly request is sent")
    args = parser.parse_args()
    rows = []
    for quarantine in (float(q) for q in args.quarantine.split(",")):
        for row in (query_of_death(quarantine, args.sends), outside_kill(quarantine)):
            rows.append({"--quarantine-seconds": f"{quarantine:g}", **row})
            print(rows[-1], file=sys.stderr, flush=True)
    print_rows(rows)


def print_rows(rows: list[dict]) -> None:
    """`rows` as a Markdown table, its columns every key in the order first seen (blank where a row has none)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row.get(column, "")) for column in columns) + " |")


if __name__ == "__main__":
    main()
