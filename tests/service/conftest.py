"""A real attrserve server in a background thread (port 0 on 127.0.0.1), serving the oracle models and a few test doubles."""

from __future__ import annotations

import asyncio
import threading
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from attrserve_engine import Engine, InputSpec, ModelSpec
from attrserve_service.config import ServerConfig
from attrserve_service.server import RunningServer, create_server
from doubles import Fragile, Slow
from oracle import MODELS, make_engine


class ServerThread:
    """Runs create_server on its own event loop so tests can use the blocking client."""

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
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
    engine = make_engine(MODELS, **limits)
    torch.manual_seed(0)
    engine.load(ModelSpec(name="fragile", module=Fragile(), inputs=[InputSpec("x", torch.float32, (3,))], max_batch_rows=256))
    engine.load(ModelSpec(name="slow", module=Slow(), inputs=[InputSpec("x", torch.float32, (3,))], max_batch_rows=256))
    return engine


def start_server(**limits) -> ServerThread:
    return ServerThread(oracle_engine(**limits), ServerConfig(port=0, metrics_port=0, max_request_bytes=1 << 20))


@pytest.fixture(scope="module")
def server():
    s = start_server(max_rows_per_request=20_000, max_n_steps=500)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def fusing_server():
    """Waits up to 300 ms for company, so concurrent requests land in the same passes."""
    s = start_server(default_max_queue_delay_us=300_000, default_max_batch_rows=4096)
    yield s
    s.stop()
