"""Every Prometheus metric attrserve exports, declared once here."""

from __future__ import annotations

import contextlib
import json
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
from grpc._cython import cygrpc  # type: ignore[attr-defined]  # channelz: no public Python API in grpcio
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.metrics import MetricWrapperBase

from attrserve_engine.events import (
    DROP_CANCELLED,
    DROP_DEADLINE,
    REFUSAL_REASONS,
    SPLIT_FAILURE,
    SPLIT_OOM,
    EngineObserver,
    PassKind,
    PassStats,
)
from attrserve_service.auth import FAILED, LOADED
from attrserve_service.quarantine import PROBE_OUTCOMES

if TYPE_CHECKING:
    from attrserve_service.auth import ServerSecurity
    from attrserve_service.core import Core

# No `_created` series: the text format carries each as a gauge of its own, one more series per counter and
# histogram child for Prometheus to store, and no dashboard or rule reads them (28% of a page).
disable_created_metrics()

# Latency buckets span a ~1 ms cached saliency call to multi-second IG on big images.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Pass sizes are powers of two up to the largest max_batch_rows we expect to tune to.
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
# Requests per pass: 1 means no fusion happened.
_REQUEST_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# |convergence delta| per example: decades from float32 round-off (1e-7) to an integral that missed badly (10).
_DELTA_BUCKETS = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0)
# Model loads: a tiny MLP in well under a second, a big network with its probe and warm-ups in a minute or more.
_LOAD_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# Standard gRPC server metrics (go-grpc-prometheus names), so existing dashboards work.
GRPC_SERVER_STARTED_TOTAL = Counter(
    "grpc_server_started_total", "RPCs started on the server.", ["grpc_type", "grpc_service", "grpc_method"]
)
GRPC_SERVER_HANDLED_TOTAL = Counter(
    "grpc_server_handled_total", "RPCs completed on the server.", ["grpc_type", "grpc_service", "grpc_method", "grpc_code"]
)
GRPC_SERVER_HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time to handle an RPC on the server.",
    ["grpc_type", "grpc_service", "grpc_method"],
    buckets=_LATENCY_BUCKETS,
)

ATTRSERVE_ATTRIBUTIONS_COMPLETED_TOTAL = Counter(
    "attrserve_attributions_completed_total", "Attribution requests completed.", ["model", "algorithm", "grpc_code"]
)
ATTRSERVE_ATTRIBUTION_DURATION_SECONDS = Histogram(
    "attrserve_attribution_duration_seconds",
    "Arrival to response of an attribution request.",
    ["model", "algorithm"],
    buckets=_LATENCY_BUCKETS,
)
ATTRSERVE_QUEUE_WAIT_SECONDS = Histogram(
    "attrserve_queue_wait_seconds", "Arrival to the first fused pass of a request.", ["model"], buckets=_LATENCY_BUCKETS
)
ATTRSERVE_PASSES_EXECUTED_TOTAL = Counter("attrserve_passes_executed_total", "Fused passes executed.", ["model", "kind"])
ATTRSERVE_PASS_ROWS = Histogram("attrserve_pass_rows", "Rows in one fused pass.", ["model", "kind"], buckets=_ROW_BUCKETS)
ATTRSERVE_PASS_REQUESTS = Histogram(
    "attrserve_pass_requests", "Requests sharing one fused pass.", ["model", "kind"], buckets=_REQUEST_BUCKETS
)
ATTRSERVE_PASS_DURATION_SECONDS = Histogram(
    "attrserve_pass_duration_seconds", "Duration of one fused pass.", ["model", "kind"], buckets=_LATENCY_BUCKETS
)
ATTRSERVE_PASS_SIZE_ROWS = Gauge(
    "attrserve_pass_size_rows",
    "Rows the model's latest fused pass of this kind was cut to at most: its max_batch_rows as configured, or as the "
    "load-time probe chose it and the tuner moves it on served passes (a trial alternates two sizes), capped at "
    "max_pass_seconds of work. attrserve_pass_rows shows how full the passes were.",
    ["model", "kind"],
)
ATTRSERVE_REQUESTS_IN_FLIGHT = Gauge("attrserve_requests_in_flight", "Attribution requests accepted and not yet answered.")
ATTRSERVE_MODEL_READY = Gauge(
    "attrserve_model_ready", "1 when the model is loaded, warm and its device's worker is up.", ["model", "version"]
)
ATTRSERVE_REQUESTS_DROPPED_TOTAL = Counter(
    "attrserve_requests_dropped_total",
    "Requests dropped before all their rows ran, because their deadline passed or their caller cancelled.",
    ["model", "reason"],
)
ATTRSERVE_REQUESTS_REFUSED_TOTAL = Counter(
    "attrserve_requests_refused_total",
    "Requests refused at admission before any work: the model's queued rows or bytes at their bound, the device's "
    "request limit reached, a deadline the queued work would not let it meet, or a quarantined query of death.",
    ["model", "reason"],
)
ATTRSERVE_ROWS_DROPPED_TOTAL = Counter(
    "attrserve_rows_dropped_total",
    "Rows of dropped requests that were never computed: those declared at admission less those run (an estimate where the "
    "declared rows are).",
    ["model", "reason"],
)
ATTRSERVE_WORKER_UP = Gauge(
    "attrserve_worker_up",
    "1 while the device's engine worker runs; 0 from its failure to its restart, and while the engine process is down.",
    ["device"],
)
ATTRSERVE_WORKER_RESTARTS_TOTAL = Counter(
    "attrserve_worker_restarts_total", "Engine workers restarted after they died (each failure is logged with its traceback).", ["device"]
)
ATTRSERVE_PASSES_STUCK_TOTAL = Counter(
    "attrserve_passes_stuck_total",
    "Passes given up as stuck in a model's code (--stuck-pass-seconds): the device's requests failed with UNAVAILABLE, "
    "and the engine process was started again.",
    ["device"],
)
ATTRSERVE_ENGINE_PROCESS_UP = Gauge(
    "attrserve_engine_process_up",
    "1 while the engine core serves (its own process, or the front end's with --no-engine-process); 0 from its death to its restart.",
)
ATTRSERVE_ENGINE_PROCESS_RESTARTS_TOTAL = Counter(
    "attrserve_engine_process_restarts_total",
    "Engine-core processes started again after one died, whether they then serve or die too (each death is logged).",
)
ATTRSERVE_BUSY_POLL_SECONDS_TOTAL = Counter(
    "attrserve_busy_poll_seconds",
    "Seconds the front end's event loop polled for a lone request's answer instead of sleeping (--busy-poll-us): "
    "CPU spent so that a lone caller is answered sooner.",
)
ATTRSERVE_HEAP_RELEASED_BYTES_TOTAL = Counter(
    "attrserve_heap_released_bytes",
    "Bytes of free heap a server process handed back to the kernel (its resident memory before less after), by process: "
    "the front end's trims after a surge, the engine process's release once idle for 10 s.",
    ["process"],
)
ATTRSERVE_HEAP_RELEASES_TOTAL = Counter(
    "attrserve_heap_releases", "Times a server process handed its free heap back to the kernel, by process.", ["process"]
)
ATTRSERVE_FRONT_HELD_BYTES = Gauge(
    "attrserve_front_held_bytes",
    "Bytes of requests the front end holds for the engine process until they are answered (their tensors plus 32 KiB "
    "each); at --max-front-bytes, new requests are refused (reason front_bytes). 0 without an engine process.",
)
ATTRSERVE_GRPC_CORE_CALLS_STARTED_TOTAL = Counter(
    "attrserve_grpc_core_calls_started",
    "Calls gRPC's core started on the server (its channelz count, followed at each scrape of /metrics), those "
    "attrserve's code never saw included: less the sum of grpc_server_started_total, the calls gRPC ended itself "
    "(cancelled past --max-pending-calls).",
)
ATTRSERVE_SUSPECT_PROBES_TOTAL = Counter(
    "attrserve_suspect_probes_total",
    "Requests run alone because they were computing when the engine process died, by outcome: served (answered, so not "
    "the cause), or quarantined (the engine process died again: a query of death, refused for --quarantine-seconds).",
    ["model", "outcome"],
)
ATTRSERVE_QUEUE_REQUESTS = Gauge(
    "attrserve_queue_requests",
    "Attribution requests of the model accepted by the engine and not yet finished, less those whose callers gave up.",
    ["model"],
)
ATTRSERVE_QUEUE_ROWS = Gauge(
    "attrserve_queue_rows", "Rows of model work of those requests not yet computed: the backlog to scale on.", ["model"]
)
ATTRSERVE_PASS_SPLITS_TOTAL = Counter(
    "attrserve_pass_splits_total",
    "Fused passes re-run in two halves, after a failure (pinning it on its request) or a device out-of-memory.",
    ["model", "reason"],
)
ATTRSERVE_MODEL_LOAD_SECONDS = Histogram(
    "attrserve_model_load_seconds", "Time to load a model: build, weights, pass-size probe and warm-ups.", ["model"], buckets=_LOAD_BUCKETS
)
ATTRSERVE_MODEL_LOAD_FAILURES_TOTAL = Counter("attrserve_model_load_failures_total", "Model loads that failed.", ["model"])
ATTRSERVE_CONVERGENCE_DELTA = Histogram(
    "attrserve_convergence_delta",
    "Absolute convergence delta per example of answers that asked for it: a silent-accuracy signal (e.g. too few steps).",
    ["model", "algorithm"],
    buckets=_DELTA_BUCKETS,
)
ATTRSERVE_DEVICE_MEMORY_BYTES = Gauge("attrserve_device_memory_bytes", "Device memory allocated by torch (CUDA devices only).", ["device"])
ATTRSERVE_BUILD_INFO = Gauge(
    "attrserve_build_info",
    "1, labelled with the server's version, torch's version, its devices, and the malloc and event loop its models run on.",
    ["version", "torch", "device", "allocator", "event_loop"],
)
ATTRSERVE_CREDENTIALS_RELOADS_TOTAL = Counter(
    "attrserve_credentials_reloads_total",
    "Changed TLS or token files read again, by kind (tls, tokens) and outcome: loaded (served from then on), or failed "
    "(not used: the last good ones serve on, and the log says why).",
    ["kind", "outcome"],
)
# Registered by watch_credentials, with TLS only: a plaintext server has no such series.
ATTRSERVE_TLS_CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS = Gauge(
    "attrserve_tls_certificate_expiry_timestamp_seconds",
    "The notAfter of the TLS certificate the server serves to new connections, as Unix time.",
    registry=None,
)

GRPC_CODES = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "RESOURCE_EXHAUSTED",
    "UNAVAILABLE",
    "INTERNAL",
)
# RPC-level codes besides those: admin calls refused by model control, and token refusals.
RPC_CODES = (*GRPC_CODES, "FAILED_PRECONDITION", "UNAUTHENTICATED", "PERMISSION_DENIED")
PASS_KINDS = tuple(kind.value for kind in PassKind)
DROP_REASONS = (DROP_DEADLINE, DROP_CANCELLED)
SPLIT_REASONS = (SPLIT_FAILURE, SPLIT_OOM)
# The processes whose heap goes back to the kernel (heap.py's keepers): the front end and the engine process.
HEAP_PROCESSES = ("front", "engine")
RELOAD_OUTCOMES = (LOADED, FAILED)


def precreate_methods(methods: list[tuple[str, str, str]]) -> None:
    """Create the RPC label sets up front so dashboards show zeros instead of gaps."""
    for grpc_type, service, method in methods:
        GRPC_SERVER_STARTED_TOTAL.labels(grpc_type, service, method)
        GRPC_SERVER_HANDLING_SECONDS.labels(grpc_type, service, method)
        for code in RPC_CODES:
            GRPC_SERVER_HANDLED_TOTAL.labels(grpc_type, service, method, code)


_DEVICES: set[str] = set()


def watch_model(core: Core, name: str, algorithms: list[str], device: str) -> None:
    """A model that serves: its queue-depth gauges (read from the engine at scrape time, summed over its versions),
    its device's gauges, and its label sets created up front (zeros instead of gaps)."""
    ATTRSERVE_QUEUE_REQUESTS.labels(name).set_function(partial(_backlog, core, name, 0))
    ATTRSERVE_QUEUE_ROWS.labels(name).set_function(partial(_backlog, core, name, 1))
    for algorithm in algorithms:
        ATTRSERVE_ATTRIBUTION_DURATION_SECONDS.labels(name, algorithm)
        for code in GRPC_CODES:
            ATTRSERVE_ATTRIBUTIONS_COMPLETED_TOTAL.labels(name, algorithm, code)
    ATTRSERVE_QUEUE_WAIT_SECONDS.labels(name)
    ATTRSERVE_MODEL_LOAD_FAILURES_TOTAL.labels(name)
    for reason in REFUSAL_REASONS:
        ATTRSERVE_REQUESTS_REFUSED_TOTAL.labels(name, reason)
    for reason in DROP_REASONS:
        ATTRSERVE_REQUESTS_DROPPED_TOTAL.labels(name, reason)
        ATTRSERVE_ROWS_DROPPED_TOTAL.labels(name, reason)
    for kind in PASS_KINDS:
        ATTRSERVE_PASSES_EXECUTED_TOTAL.labels(name, kind)
    for reason in SPLIT_REASONS:
        ATTRSERVE_PASS_SPLITS_TOTAL.labels(name, reason)
    for outcome in PROBE_OUTCOMES:
        ATTRSERVE_SUSPECT_PROBES_TOTAL.labels(name, outcome)
    watch_device(core, device)


def watch_device(core: Core, device: str) -> None:
    """A device that models serve on: its workers' gauge and restarts, and a CUDA device's memory, read at scrape time
    from the process that runs the models (core.device_memory; with an engine process, not the front's own torch)."""
    if device not in _DEVICES:  # afterwards EngineMetrics.worker_state keeps it true
        _DEVICES.add(device)
        ATTRSERVE_WORKER_UP.labels(device).set(1.0 if core.snapshot().workers[0] else 0.0)
    ATTRSERVE_WORKER_RESTARTS_TOTAL.labels(device)
    ATTRSERVE_PASSES_STUCK_TOTAL.labels(device)
    if device.startswith("cuda"):
        ATTRSERVE_DEVICE_MEMORY_BYTES.labels(device).set_function(partial(_device_memory, core, device))


def observe_engine(core: Core, version: str) -> None:
    """The models that serve now (watch_model; later loads are watched by EngineMetrics), the build info, and what the
    front end holds for the engine (read at each scrape)."""
    ATTRSERVE_FRONT_HELD_BYTES.set_function(lambda: core.held_bytes)
    snapshot = core.snapshot()
    for name, loads in snapshot.watched.items():
        for algorithms, device in loads:
            watch_model(core, name, algorithms, device)
    devices = ",".join(snapshot.devices) or "none"
    ATTRSERVE_BUILD_INFO.labels(version, snapshot.torch, devices, snapshot.allocator, snapshot.event_loop).set(1.0)


def watch_heaps() -> None:
    """The heap-release series of both processes, up front (zeros instead of gaps); a server with an engine process."""
    for process in HEAP_PROCESSES:
        ATTRSERVE_HEAP_RELEASES_TOTAL.labels(process)
        ATTRSERVE_HEAP_RELEASED_BYTES_TOTAL.labels(process)


def heap_released(process: str, released: int) -> None:
    """A heap keeper of `process` handed its free heap back: `released` bytes of resident memory (0 when none went)."""
    ATTRSERVE_HEAP_RELEASES_TOTAL.labels(process).inc()
    ATTRSERVE_HEAP_RELEASED_BYTES_TOTAL.labels(process).inc(released)


def watch_credentials(security: ServerSecurity) -> None:
    """The reload series of the credentials the server follows (zeros up front), and with TLS, the expiry of the
    certificate it serves (read at each scrape)."""
    for kind in security.watched:
        for outcome in RELOAD_OUTCOMES:
            ATTRSERVE_CREDENTIALS_RELOADS_TOTAL.labels(kind, outcome)
    tls = security.tls
    if tls is not None:
        ATTRSERVE_TLS_CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS.set_function(lambda: tls.not_after)
        with contextlib.suppress(ValueError):  # registered already: by a server before in this process (tests)
            REGISTRY.register(ATTRSERVE_TLS_CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS)


def credentials_reloaded(kind: str, outcome: str) -> None:
    """TLS or token files that changed were read again (auth.py; TLS's on gRPC's threads)."""
    ATTRSERVE_CREDENTIALS_RELOADS_TOTAL.labels(kind, outcome).inc()


def grpc_server_ids() -> set[int]:
    """The channelz ids of the gRPC servers of this process (grpc's core registers a server when it is built and drops
    it when it stops)."""
    ids: set[int] = set()
    while True:
        page = json.loads(cygrpc.channelz_get_servers(max(ids, default=-1) + 1))
        ids.update(int(server["ref"]["serverId"]) for server in page.get("server", ()))
        if page.get("end", True) or not page.get("server"):
            return ids


class GrpcCoreCalls:
    """Follows gRPC's channelz count of the calls its core started on one server into
    attrserve_grpc_core_calls_started_total. Every call that reaches attrserve's code is in grpc_server_started_total
    (methods.py); the difference is the calls gRPC ended itself: cancelled while they waited for the event loop to take
    them (past --max-pending-calls, or gRPC's own bound), or of a method the server does not have."""

    def __init__(self, before: set[int]) -> None:
        """The server is the one gRPC built since `before` (grpc_server_ids() then); with none or several (servers built
        at once in one process, as tests may), nothing is followed."""
        built = grpc_server_ids() - before
        self.server_id = built.pop() if len(built) == 1 else None
        self.counted = 0

    def sync(self) -> None:
        """Add the calls started since the last sync (the /metrics endpoint calls it ahead of every page)."""
        if self.server_id is None:
            return
        try:
            started = int(json.loads(cygrpc.channelz_get_server(self.server_id))["server"]["data"].get("callsStarted", 0))
        except (ValueError, KeyError):  # the server has stopped: channelz has dropped it
            return
        if started > self.counted:
            ATTRSERVE_GRPC_CORE_CALLS_STARTED_TOTAL.inc(started - self.counted)
            self.counted = started


def _backlog(core: Core, name: str, which: int) -> float:
    return float(core.backlog(name)[which])


def _device_memory(core: Core, device: str) -> float:
    return float(core.device_memory(device))


# The children of the families a request or a pass updates, by their label values (bounded: the names are the served
# models' and algorithms', "unknown" otherwise). prometheus_client's labels() checks the values and takes the family's
# lock on every call: 2.4 µs each, eight a request at one pass a request (bench/RESULTS.md, issue 12 step 32).
_CHILDREN: dict[tuple[MetricWrapperBase, tuple[str, ...]], Any] = {}


def child(family: MetricWrapperBase, *values: str) -> Any:
    """family.labels(*values), made once. Only for families whose series are never removed: a removed series' child
    would go on counting where no scrape sees it."""
    key = (family, values)
    found = _CHILDREN.get(key)
    if found is None:
        found = _CHILDREN[key] = family.labels(*values)
    return found


def observe_delta(model: str, algorithm: str, delta: np.ndarray) -> None:
    """One observation per example (the largest |delta| of its entries, e.g. DeepLiftShap's per baseline)."""
    histogram = ATTRSERVE_CONVERGENCE_DELTA.labels(model, algorithm)
    for value in np.abs(delta.reshape(delta.shape[0], -1) if delta.ndim > 1 else delta.reshape(-1, 1)).max(axis=1):
        histogram.observe(float(value))


class EngineMetrics(EngineObserver):
    """What the engine reports from its worker threads (and loading threads), as metrics; with an engine process,
    its reports replayed on the front's event loop, and the engine process's own state."""

    def __init__(self, core: Core) -> None:
        self.core = core

    def model_loaded(self, model: str, seconds: float) -> None:
        ATTRSERVE_MODEL_LOAD_SECONDS.labels(model).observe(seconds)
        for algorithms, device in self.core.watched(model):
            watch_model(self.core, model, algorithms, device)

    def engine_process_state(self, serving: bool, reason: str) -> None:
        ATTRSERVE_ENGINE_PROCESS_UP.set(1.0 if serving else 0.0)
        # The workers are the engine process's: none runs while it is down, and a new one's serve as its first snapshot
        # says. They are new, not restarted: they report no worker_state, and a gauge a stuck pass or a dying worker
        # had set to 0 in the process before stayed 0 (AttrserveWorkerDown firing) while the new one served.
        up = 1.0 if serving and self.core.snapshot().workers[0] else 0.0
        for device in _DEVICES:
            ATTRSERVE_WORKER_UP.labels(device).set(up)

    def engine_process_restarted(self) -> None:
        ATTRSERVE_ENGINE_PROCESS_RESTARTS_TOTAL.inc()

    def busy_polled(self, seconds: float) -> None:
        ATTRSERVE_BUSY_POLL_SECONDS_TOTAL.inc(seconds)

    def heap_released(self, process: str, released: int) -> None:
        heap_released(process, released)

    def suspect_probed(self, model: str, outcome: str) -> None:
        ATTRSERVE_SUSPECT_PROBES_TOTAL.labels(model, outcome).inc()

    def model_load_failed(self, model: str, error: BaseException) -> None:
        ATTRSERVE_MODEL_LOAD_FAILURES_TOTAL.labels(model).inc()

    def pass_split(self, model: str, reason: str) -> None:
        ATTRSERVE_PASS_SPLITS_TOTAL.labels(model, reason).inc()

    def pass_executed(self, stats: PassStats) -> None:
        child(ATTRSERVE_PASSES_EXECUTED_TOTAL, stats.model, stats.kind).inc()
        child(ATTRSERVE_PASS_ROWS, stats.model, stats.kind).observe(stats.rows)
        child(ATTRSERVE_PASS_REQUESTS, stats.model, stats.kind).observe(stats.requests)
        child(ATTRSERVE_PASS_DURATION_SECONDS, stats.model, stats.kind).observe(stats.seconds)
        child(ATTRSERVE_PASS_SIZE_ROWS, stats.model, stats.kind).set(stats.size)

    def request_refused(self, model: str, reason: str) -> None:
        ATTRSERVE_REQUESTS_REFUSED_TOTAL.labels(model, reason).inc()

    def request_dropped(self, model: str, reason: str, rows: int) -> None:
        ATTRSERVE_REQUESTS_DROPPED_TOTAL.labels(model, reason).inc()
        ATTRSERVE_ROWS_DROPPED_TOTAL.labels(model, reason).inc(rows)

    def worker_state(self, device: str, serving: bool, reason: str) -> None:
        ATTRSERVE_WORKER_UP.labels(device).set(1.0 if serving else 0.0)
        if serving:
            ATTRSERVE_WORKER_RESTARTS_TOTAL.labels(device).inc()

    def worker_stuck(self, device: str, reason: str) -> None:
        ATTRSERVE_PASSES_STUCK_TOTAL.labels(device).inc()
