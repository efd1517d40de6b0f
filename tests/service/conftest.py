"""Fixtures: a real attrserve server in a background thread (port 0 on 127.0.0.1), serving the oracle models and a
few test doubles. The helpers live in tests/servers.py (import them from there, never from a conftest)."""

from __future__ import annotations

import pytest

from servers import start_server


@pytest.fixture(scope="module")
def server():
    s = start_server(max_rows_per_request=20_000, max_n_steps=500)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def fusing_server():
    """No wait for company (max_queue_delay 0) and room for 4096 rows a pass: tests make requests share passes
    deterministically by queueing them under `engine.held()` (see tests/servers.py `send_held`)."""
    s = start_server(default_max_queue_delay_us=0, default_max_batch_rows=4096)
    yield s
    s.stop()
