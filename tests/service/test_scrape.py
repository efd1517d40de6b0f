"""/metrics on the front end's event loop (attrserve_service.scrape): the page prometheus_client would write, written a
slice at a time so requests are answered during a scrape, and an HTTP endpoint that refuses what it does not serve
without harming the server."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import re
import socket

import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, Info, Summary, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeHistogramMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from servers import ServerThread, start_server
from test_model_management import health

from attrserve_client import AttributionClient
from attrserve_service import metrics
from attrserve_service.scrape import CONTENT_TYPE, MAX_HEAD_BYTES, exposition
from oracle import MODELS

X = np.array([[0.3, -0.2, 0.9], [1.0, 0.5, -0.4]], dtype=np.float32)


class _Families:
    """A collector of ready-made families: samples the text format moves out of their family (_created, _gsum,
    _gcount) and timestamps, which prometheus_client's own metrics do not make here."""

    def collect(self):
        counter = CounterMetricFamily("jobs", "Jobs, with a created time.", labels=["queue"])
        counter.add_metric(["a"], 3.0, created=1700000000.5, timestamp=1700000001.25)
        counter.add_metric(["b"], 0.0, created=1700000002.0)
        gauge_histogram = GaugeHistogramMetricFamily("in_flight_bytes", "Bytes in flight.", buckets=[("1.0", 2.0), ("+Inf", 5.0)], gsum_value=9.5)
        return [counter, gauge_histogram]


def odd_registry() -> CollectorRegistry:
    """Every kind of metric, label values that need escaping, a HELP with a backslash and a newline, infinities."""
    registry = CollectorRegistry()
    Counter("odd_requests", 'Help with a \\ backslash\nand a newline "quoted".', ["path"], registry=registry).labels('a"b\\c\nd').inc(2.5)
    Gauge("plain", "No labels.", registry=registry).set(float("inf"))
    Gauge("negative", "Minus infinity.", ["k"], registry=registry).labels("x").set(float("-inf"))
    histogram = Histogram("latency_seconds", "A histogram.", ["model"], buckets=(0.1, 1.0), registry=registry)
    histogram.labels("m").observe(0.05)
    histogram.labels("n")
    Summary("sizes", "A summary.", registry=registry).observe(3.0)
    Info("build", "An info.", registry=registry).info({"version": "1.2"})
    Enum("phase", "An enum.", states=["a", "b"], registry=registry).state("b")
    registry.register(_Families())
    return registry


def test_the_page_is_what_generate_latest_writes() -> None:
    """Byte for byte, for every kind of metric and the escapes the text format has; and for attrserve's own registry
    (the process collectors' readings, which move between two calls, left out)."""
    registry = odd_registry()
    assert asyncio.run(exposition(registry, slice_s=0, pause_s=0)) == generate_latest(registry)
    assert asyncio.run(exposition(registry)) == generate_latest(registry)

    metrics.ATTRSERVE_ATTRIBUTION_DURATION_SECONDS.labels("page_test", "saliency").observe(0.004)
    metrics.ATTRSERVE_ATTRIBUTIONS_COMPLETED_TOTAL.labels("page_test", "saliency", "OK").inc()
    ours, theirs = asyncio.run(exposition()), generate_latest()
    moving = re.compile(rb"^(process|python_gc)_\S+ \S+$", re.MULTILINE)
    assert moving.sub(b"", ours) == moving.sub(b"", theirs)
    assert b'attrserve_attributions_completed_total{algorithm="saliency",grpc_code="OK",model="page_test"} 1.0\n' in ours
    assert b"_created" not in ours  # metrics.py turns them off: a gauge per series that no dashboard reads


def test_a_page_lets_the_event_loop_run_inside_a_family() -> None:
    """A family of 500 series (one collect() in prometheus_client) is written with the loop running other work
    between its series: with no time allowed per slice, another task runs after every one of them. Its series are
    read as the page reaches them, not all at once first (a gauge's function notes when it was read)."""
    registry = CollectorRegistry()
    counter = Counter("wide", "Many series.", ["i"], registry=registry)
    gauge = Gauge("read_at", "The other task's turns when the page read this series.", ["i"], registry=registry)
    read_at: list[int] = []
    ticks = 0
    for i in range(500):
        counter.labels(str(i)).inc(i)
        gauge.labels(str(i)).set_function(lambda: read_at.append(ticks) or 0.0)

    async def main() -> tuple[bytes, int]:
        nonlocal ticks
        done = False

        async def other_work() -> None:
            nonlocal ticks
            while not done:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.ensure_future(other_work())
        page = await exposition(registry, slice_s=0, pause_s=0)
        done = True
        await task
        return page, ticks

    page, turns = asyncio.run(main())
    assert turns >= 1000
    assert len(read_at) == 500 and read_at == sorted(read_at) and read_at[-1] - read_at[0] >= 499
    assert page == generate_latest(registry)


@pytest.fixture(scope="module")
def server():
    server = start_server()
    yield server
    server.stop()


def connection(server: ServerThread) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", server.running.metrics_port, timeout=10)


def families(text: str) -> dict[str, object]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def still_serves(server: ServerThread) -> None:
    """After whatever a test sent to /metrics: Attribute equals Captum, health says SERVING, /metrics answers."""
    with AttributionClient(server.address) as client:
        got = client.attribute("toy", "integrated_gradients", X, target=1, params={"n_steps": 20}, timeout=60)
    expected = IntegratedGradients(MODELS["toy"]()).attribute(torch.from_numpy(X), target=1, n_steps=20).numpy()
    np.testing.assert_allclose(got.attributions, expected, rtol=1e-5, atol=1e-6)
    assert health(server.address) == health_pb2.HealthCheckResponse.SERVING
    http_ = connection(server)
    try:
        http_.request("GET", "/metrics")
        answer = http_.getresponse()
        assert answer.status == 200 and "attrserve_attributions_completed" in families(answer.read().decode())  # the parser drops _total
    finally:
        http_.close()


def test_get_head_and_gzip_on_one_kept_alive_connection(server: ServerThread) -> None:
    """What Prometheus does: GET /metrics again and again on one connection, asking for gzip."""
    http_ = connection(server)
    http_.request("GET", "/metrics")
    plain = http_.getresponse()
    body = plain.read()
    assert plain.status == 200 and plain.getheader("Content-Type") == CONTENT_TYPE
    assert int(plain.getheader("Content-Length")) == len(body) and plain.getheader("Connection") is None
    first_socket = http_.sock
    assert "attrserve_queue_rows" in families(body.decode())

    http_.request("GET", "/metrics", headers={"Accept-Encoding": "gzip, deflate"})
    zipped = http_.getresponse()
    assert zipped.status == 200 and zipped.getheader("Content-Encoding") == "gzip"
    assert "attrserve_queue_rows" in families(gzip.decompress(zipped.read()).decode())

    http_.request("GET", "/metrics", headers={"Accept-Encoding": "gzip;q=0"})
    refused = http_.getresponse()
    assert refused.getheader("Content-Encoding") is None and refused.read().startswith(b"# HELP")

    http_.request("HEAD", "/metrics")
    head = http_.getresponse()
    assert head.status == 200 and int(head.getheader("Content-Length")) > 0 and head.read() == b""
    assert http_.sock is first_socket  # every answer on the one connection

    http_.request("GET", "/", headers={"Connection": "close"})  # prometheus_client served / too
    last = http_.getresponse()
    assert last.status == 200 and last.getheader("Connection") == "close" and b"attrserve_" in last.read()
    http_.close()
    still_serves(server)


def raw(server: ServerThread, data: bytes) -> bytes:
    """Send `data`, read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", server.running.metrics_port), timeout=10) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize(
    "request_bytes, status, says",
    [
        (b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"404", b"/metrics"),
        (b"POST /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"405", b"GET and HEAD"),
        (b"GET /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", b"400", b"no request body"),
        (b"hello there\r\n\r\n", b"400", b"HTTP/1.x"),
        (b"GET /metrics HTTP/1.1\r\nX-Long: " + b"a" * (MAX_HEAD_BYTES + 10) + b"\r\n\r\n", b"400", b"too long"),
    ],
    ids=["unknown-path", "post", "body", "not-http", "head-too-long"],
)
def test_what_the_endpoint_does_not_serve_is_refused_and_harms_nothing(server: ServerThread, request_bytes: bytes, status: bytes, says: bytes) -> None:
    answer = raw(server, request_bytes)
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
    assert says in answer
    still_serves(server)


def test_a_scraper_that_hangs_up_midway_harms_nothing(server: ServerThread) -> None:
    """Half a request, then gone; a whole request, then gone before the answer is read."""
    with socket.create_connection(("127.0.0.1", server.running.metrics_port), timeout=10) as s:
        s.sendall(b"GET /metr")
    with socket.create_connection(("127.0.0.1", server.running.metrics_port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    still_serves(server)
