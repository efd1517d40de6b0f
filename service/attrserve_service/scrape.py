"""The Prometheus endpoint (/metrics), served on the front end's event loop, a slice at a time.

prometheus_client's own server answers a scrape on a thread. Writing ~4,000 series takes 40–70 ms of Python, and
under the interpreter lock that thread kept the event loop waiting for 5 ms switch intervals at a time: with one
caller and a scrape every 2 s, p99 tripled (bench/RESULTS.md, issue 12 step 12). Here the page is written on the
loop itself, and after every SLICE_S of writing it pauses while the loop runs whatever is ready (a request's
frames, a gRPC completion). gzip runs on a thread (zlib releases the lock); a kept-alive connection costs no thread.

The page is the text format 0.0.4, byte for byte what prometheus_client.generate_latest writes (a test compares
them). GET and HEAD of /metrics (and /, as prometheus_client answered it); anything else is 404 or 405.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import re
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Iterator

from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

# The longest stretch of page writing before the event loop runs what is ready; then the page waits PAUSE_S (epoll
# rounds it up to 1 ms), so a scrape takes at most about a third of the loop while requests come and go.
SLICE_S = 0.0005
PAUSE_S = 0.001
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PATHS = ("/metrics", "/")
# zlib's fastest level: a page of ~3,700 series in ~2 ms of a core instead of ~10 at gzip's default 9, for ~1.2× the bytes.
GZIP_LEVEL = 1
# A request head longer than this is refused (a scrape's is ~200 bytes).
MAX_HEAD_BYTES = 16 * 1024
# A kept-alive connection that sends no request for this long is closed (Prometheus scrapes every 15–60 s and
# opens a new one when it finds it closed).
IDLE_S = 300.0

# Samples the text format moves out of their family into a gauge of their own, as generate_latest does.
_OM_SUFFIXES = ("_created", "_gsum", "_gcount")
_TYPES = {"info": "gauge", "stateset": "gauge", "gaugehistogram": "histogram", "unknown": "untyped"}
_NAME_SUFFIX = {"counter": "_total", "info": "_info"}
_LEGACY_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_INVALID_NAME_CHAR = re.compile(r"[^a-zA-Z0-9_:]")


def _name(name: str) -> str:
    """A metric or label name as the text format writes it: characters it cannot carry become underscores."""
    if _LEGACY_NAME.match(name):
        return name
    name = _INVALID_NAME_CHAR.sub("_", name)
    return "_" + name[1:] if name[:1].isdigit() else name


def _help(name: str, documentation: str, kind: str) -> str:
    text = documentation.replace("\\", r"\\").replace("\n", r"\n")
    return f"# HELP {name} {text}\n# TYPE {name} {kind}\n"


def _line(sample: Sample) -> str:
    value = floatToGoString(sample.value)
    stamp = "" if sample.timestamp is None else f" {int(float(sample.timestamp) * 1000):d}"
    if not sample.labels:
        return f"{_name(sample.name)} {value}{stamp}\n"
    labels = ",".join(
        _name(key) + '="' + str(v).replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"") + '"'
        for key, v in sorted(sample.labels.items())
    )
    return f"{_name(sample.name)}{{{labels}}} {value}{stamp}\n"


def _families(registry: Collector) -> Iterator[tuple[Metric, Iterable[Sample]]]:
    """Each metric family of `registry` and its samples. A labelled metric of prometheus_client's own kinds
    (Counter, Gauge, Histogram, ...) gives its samples one child at a time, as the page reaches them: its collect()
    would build them all at once, ~10 ms for the 2,000 series of attrserve_attribution_duration_seconds. This reads
    two private names of prometheus_client (the registry's collectors, a metric's `_samples`), and falls back to
    collect() where they are missing; a test checks the page against generate_latest's."""
    collectors = getattr(registry, "_collector_to_names", None)
    lock = getattr(registry, "_lock", None)
    if collectors is None or lock is None or getattr(registry, "_target_info", None):
        yield from ((metric, metric.samples) for metric in registry.collect())
        return
    with lock:
        collectors = list(collectors)
    for collector in collectors:
        samples = getattr(collector, "_samples", None)
        if isinstance(collector, MetricWrapperBase) and samples is not None:
            (metric,) = collector.describe()
            yield metric, (sample._replace(name=metric.name + sample.name) for sample in samples())
        else:
            yield from ((metric, metric.samples) for metric in collector.collect())


async def exposition(registry: Collector = REGISTRY, slice_s: float = SLICE_S, pause_s: float = PAUSE_S) -> bytes:
    """Every metric of `registry` in the text format, written a slice at a time: after `slice_s` of writing it waits
    `pause_s` while the event loop runs what is ready, then goes on."""
    out: list[str] = []
    resume_at = time.perf_counter() + slice_s
    for metric, samples in _families(registry):
        name = _name(metric.name + _NAME_SUFFIX.get(metric.type, ""))
        out.append(_help(name, metric.documentation, _TYPES.get(metric.type, metric.type)))
        moved: dict[str, list[str]] = {}
        suffix_of = {metric.name + suffix: suffix for suffix in _OM_SUFFIXES}
        for sample in samples:
            suffix = suffix_of.get(sample.name)
            if suffix is None:
                out.append(_line(sample))
            else:
                moved.setdefault(suffix, []).append(_line(sample))
            if time.perf_counter() >= resume_at:
                await asyncio.sleep(pause_s)
                resume_at = time.perf_counter() + slice_s
        for suffix, lines in sorted(moved.items()):
            out.append(_help(_name(metric.name + suffix), metric.documentation, "gauge"))
            out.extend(lines)
    return "".join(out).encode()


def _wants_gzip(accept_encoding: str) -> bool:
    for coding in accept_encoding.split(","):
        token, _, params = coding.partition(";")
        if token.strip().lower() == "gzip":
            q = params.strip().lower()
            return not (q.startswith("q=") and q[2:].strip() in ("0", "0.0", "0.00", "0.000"))
    return False


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


class MetricsEndpoint:
    """/metrics on the running event loop. `before` runs ahead of every page (the engine process's backlogs are
    asked for then, so the queue gauges read a fresh answer without a thread waiting on the loop)."""

    def __init__(self, before: Callable[[], Awaitable[None]] | None = None) -> None:
        self.before = before
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen on `host`:`port` (0: a free port); the port it got."""
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_HEAD_BYTES)
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and close every connection, kept-alive ones included."""
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._connections):
            writer.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 5.0)
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_S)
                except asyncio.LimitOverrunError:
                    await self._answer(writer, 400, b"request head too long\n", close=True)
                    return
                except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
                    return
                if not await self._respond(head, writer):
                    return
        except ConnectionError:
            pass  # the scraper went away mid-answer
        finally:
            self._connections.discard(writer)
            writer.close()

    async def _respond(self, head: bytes, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; whether the connection stays open for another."""
        request, *header_lines = head.decode("latin-1").split("\r\n")
        parts = request.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await self._answer(writer, 400, b"not an HTTP/1.x request line\n", close=True)
            return False
        method, target, version = parts
        headers = {}
        for line in header_lines:
            key, sep, value = line.partition(":")
            if sep:
                headers[key.strip().lower()] = value.strip()
        close = version == "HTTP/1.0" or headers.get("connection", "").lower() == "close"
        if headers.get("content-length", "0") != "0" or "transfer-encoding" in headers:
            await self._answer(writer, 400, b"a scrape has no request body\n", close=True)
            return False
        if urllib.parse.urlsplit(target).path not in PATHS:
            await self._answer(writer, 404, b"not found: the metrics are at /metrics\n", close=close)
            return not close
        if method not in ("GET", "HEAD"):
            await self._answer(writer, 405, b"only GET and HEAD\n", close=close, extra="Allow: GET, HEAD\r\n")
            return not close
        if self.before is not None:
            await self.before()
        body = await exposition()
        extra = ""
        if _wants_gzip(headers.get("accept-encoding", "")):
            body = await asyncio.to_thread(gzip.compress, body, GZIP_LEVEL)
            extra = "Content-Encoding: gzip\r\n"
        await self._answer(writer, 200, body, close=close, extra=extra, content_type=CONTENT_TYPE, head_only=method == "HEAD")
        return not close

    @staticmethod
    async def _answer(
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        close: bool,
        extra: str = "",
        content_type: str = "text/plain; charset=utf-8",
        head_only: bool = False,
    ) -> None:
        connection = "Connection: close\r\n" if close else ""
        head = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            f"{extra}{connection}\r\n"
        )
        writer.write(head.encode("latin-1") if head_only else head.encode("latin-1") + body)
        await writer.drain()
