"""Servers for tests: a real attrserve server in a background thread of this process (ServerThread),
`attrserve serve` as a subprocess (ServeProcess), and a plain gRPC server around a test double (fake_server), all on
ports they pick themselves.

Importable from any test package (tests/ is on sys.path, see tests/conftest.py); the conftest.py files only
hold fixtures, so `import servers` works whichever test folders one run collects.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent import futures
from pathlib import Path

import grpc
import torch
from prometheus_client.parser import text_string_to_metric_families

from attrserve.v1 import attribution_service_pb2_grpc as pb_grpc
from attrserve_engine import Engine, InputSpec, ModelSpec
from attrserve_service.config import ServerConfig
from attrserve_service.server import RunningServer, create_server
from doubles import Fragile, Slow
from oracle import MODELS, make_engine

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def fake_server(servicer: object, workers: int = 4, repository: bool = False) -> Iterator[str]:
    """A synchronous gRPC server on a free 127.0.0.1 port whose AttributionService (and, with `repository`, its
    ModelRepositoryService) is `servicer`, a test double; yields its address and stops it afterwards."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    pb_grpc.add_AttributionServiceServicer_to_server(servicer, server)
    if repository:
        pb_grpc.add_ModelRepositoryServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None).wait()

# -- in-process ---------------------------------------------------------------------------------


class ServerThread:
    """Runs create_server on its own event loop so tests can use the blocking client. Without an engine, the
    server builds its own from config.model_repository, as `attrserve serve` does."""

    def __init__(self, engine: Engine | None, config: ServerConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.running: RunningServer = asyncio.run_coroutine_threadsafe(create_server(config, engine), self.loop).result(60)
        self.address = f"127.0.0.1:{self.running.port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.running.stop(2.0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def scrape(metrics_port: int) -> dict[tuple[str, frozenset], float]:
    """Every sample on a server's /metrics page: (name, frozenset of label items) → value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def oracle_engine(**limits) -> Engine:
    """The oracle models (tests/oracle.py MODELS) with `limits`, plus the `fragile` and `slow` doubles (256 rows a pass)."""
    engine = make_engine(MODELS, **limits)
    torch.manual_seed(0)
    engine.load(ModelSpec(name="fragile", module=Fragile(), inputs=[InputSpec("x", torch.float32, (3,))], max_batch_rows=256))
    engine.load(ModelSpec(name="slow", module=Slow(), inputs=[InputSpec("x", torch.float32, (3,))], max_batch_rows=256))
    return engine


def start_server(**limits) -> ServerThread:
    return ServerThread(oracle_engine(**limits), ServerConfig(port=0, metrics_port=0, max_request_bytes=1 << 20, reflection=True))


# -- `attrserve serve` as a subprocess ----------------------------------------------------------

LISTENING = re.compile(r"attrserve listening on (\S+):(\d+)(?: \(metrics on (\S+):(\d+)\))?")
SERVE_MODULE = (sys.executable, "-m", "attrserve_service.cli")


def stop_process(proc: subprocess.Popen, reader: threading.Thread, timeout: float = 15.0) -> None:
    """Terminate → wait(timeout) → kill → wait, then let the thread draining its output finish. Safe to call more
    than once, or after the process exited."""
    try:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
    finally:
        reader.join(10)
        if proc.stdout is not None:
            proc.stdout.close()


class ServeProcess:
    """`attrserve serve ARGS` in a subprocess, on ports it binds itself: `--port 0` and `--metrics-port 0` (or -1
    for none) are added unless ARGS set them, and the ports are read from the one line the server prints once
    it serves. stdout and stderr are merged and drained by a thread (the pipe never fills); `output()` is
    everything printed so far.

    Use as a context manager, or call `stop()` in a finally: SIGTERM, wait, SIGKILL if it is still there, wait.
    """

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        command: Sequence[str] = SERVE_MODULE,
        metrics: bool = False,
        env: dict[str, str] | None = None,
        cwd: Path | None = ROOT,
        start_timeout: float = 120.0,
    ) -> None:
        args = list(args)
        if "--port" not in args:
            args += ["--port", "0"]
        if "--metrics-port" not in args:
            args += ["--metrics-port", "0" if metrics else "-1"]
        self.args = [*command, "serve", *args]
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._listening = threading.Event()
        self.host = ""
        self.port = 0
        self.metrics_port: int | None = None
        self.proc = subprocess.Popen(
            self.args,
            cwd=cwd,
            env=dict(os.environ if env is None else env, PYTHONUNBUFFERED="1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, name="serve-output", daemon=True)
        self._reader.start()
        try:
            self._wait_listening(start_timeout)
        except BaseException:
            self.stop()
            raise

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self._lines.append(line)
            match = LISTENING.search(line)
            if match and not self._listening.is_set():
                self.host, self.port = match.group(1), int(match.group(2))
                self.metrics_port = int(match.group(4)) if match.group(4) else None
                self._listening.set()

    def _wait_listening(self, timeout: float) -> None:
        until = time.monotonic() + timeout
        while not self._listening.wait(0.1):
            if self.proc.poll() is not None:
                self._reader.join(10)  # the rest of its output
                raise AssertionError(f"`{' '.join(self.args)}` exited with {self.proc.returncode} before listening:\n{self.output()}")
            if time.monotonic() > until:
                raise AssertionError(f"`{' '.join(self.args)}` did not listen within {timeout:.0f} s:\n{self.output()}")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def output(self) -> str:
        with self._lock:
            return "".join(self._lines)

    def signal(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send `sig` and wait for the exit (at most `timeout` s, then it is killed and the test fails); the exit code."""
        self.proc.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the exit (at most `timeout` s, then it is killed and the test fails); the exit code."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"the server did not exit within {timeout:.0f} s:\n{self.output()}") from None
        self._reader.join(10)
        return code

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate → wait(timeout) → kill → wait. Safe to call more than once, or after the process exited."""
        stop_process(self.proc, self._reader, timeout)

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def send_held(server: ServerThread, client, requests: Sequence, timeout: float = 60.0) -> list:
    """Send `requests` as concurrent unary Attribute calls while the server's engine holds its passes, each once the
    previous one reached the engine (or failed before it), so they queue in this order; the engine is released when
    all are queued. Nothing else may be in flight. Returns the calls' futures (grpc.Future)."""
    engine = server.running.engine
    assert engine.in_flight() == 0, "requests of an earlier test are still in flight"
    calls = []
    with engine.held():
        for request in requests:
            queued = engine.in_flight()
            call = client._stub.Attribute.future(request, timeout=timeout)
            until = time.monotonic() + 30
            while engine.in_flight() == queued and not call.done():
                assert time.monotonic() < until, "a request never reached the engine"
                time.sleep(0.001)
            calls.append(call)
    return calls
