"""Shared pytest set-up: the oracle helpers are importable as `oracle`; clients do not retry unless a test says so."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _clients_do_not_retry(monkeypatch):
    """A test of the server observes the server's own answers (an UNAVAILABLE while the engine restarts, a
    RESOURCE_EXHAUSTED from admission), not what the client's default retries make of them: clients built without
    `retry=` do not retry in tests. tests/clients/test_client_retries.py passes its policies explicitly."""
    import attrserve_client.client

    monkeypatch.setattr(attrserve_client.client, "DEFAULT_RETRY", attrserve_client.client.NO_RETRY)
