"""A real attrserve server in a background thread (port 0 on 127.0.0.1), serving the oracle models and a few test doubles."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from torch import nn

from attrserve_engine import Engine, InputSpec, ModelSpec
from attrserve_service.config import ServerConfig
from attrserve_service.server import RunningServer, create_server
from oracle import MODELS, make_engine


class Fragile(nn.Module):
    """Raises on inputs over 100: a request that breaks the model must fail alone."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        if bool((x > 100).any()):
            raise ValueError("input out of the model's range")
        return self.fc(x)


class Slow(nn.Module):
    """Sleeps in forward, so deadlines can pass while it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        time.sleep(0.3)
        return self.fc(x)


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
