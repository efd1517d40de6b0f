"""Shared pytest set-up: the oracle helpers are importable as `oracle`; clients do not retry unless a test says so."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True, scope="module")
def _each_module_starts_without_the_series_of_the_ones_before():
    """prometheus_client keeps one registry per process, and every in-process server of the suite adds its labelled
    series to it (its models, methods, codes, devices); nothing took them away. By tests/service/test_security.py the
    page had ~20,000 lines and 2 MB, and each scrape a test made took ~1.4 s instead of ~0.05 (that module: 55 s
    instead of 4). Each module now starts without the labelled series of the modules before it: its servers add their
    own as they start, and tests compare counts before and after within a test. The children metrics.child made once
    go too (a cleared one would count where no page shows it); module-scoped servers end with their module."""
    metrics = sys.modules.get("attrserve_service.metrics")
    if metrics is not None:
        from prometheus_client.metrics import MetricWrapperBase

        for metric in vars(metrics).values():
            if isinstance(metric, MetricWrapperBase) and metric._labelnames:
                metric.clear()
        metrics._CHILDREN.clear()
    yield


@pytest.fixture(autouse=True)
def _clients_do_not_retry(monkeypatch):
    """A test of the server observes the server's own answers (an UNAVAILABLE while the engine restarts, a
    RESOURCE_EXHAUSTED from admission), not what the client's default retries make of them: clients built without
    `retry=` do not retry in tests. tests/clients/test_client_retries.py passes its policies explicitly."""
    import attrserve_client.client

    monkeypatch.setattr(attrserve_client.client, "DEFAULT_RETRY", attrserve_client.client.NO_RETRY)
