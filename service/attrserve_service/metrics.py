"""Every Prometheus metric attrserve exports, declared once here."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from attrserve_engine import DROP_CANCELLED, DROP_DEADLINE, EngineObserver, PassStats
from attrserve_engine.plan import PassKind

# Latency buckets span a ~1 ms cached saliency call to multi-second IG on big images.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Pass sizes are powers of two up to the largest max_batch_rows we expect to tune to.
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
# Requests per pass: 1 means no fusion happened.
_REQUEST_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

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
ATTRSERVE_REQUESTS_IN_FLIGHT = Gauge("attrserve_requests_in_flight", "Attribution requests accepted and not yet answered.")
ATTRSERVE_MODEL_READY = Gauge(
    "attrserve_model_ready", "1 when the model is loaded, warm and its device's worker is up.", ["model", "version"]
)
ATTRSERVE_REQUESTS_DROPPED_TOTAL = Counter(
    "attrserve_requests_dropped_total",
    "Requests dropped before all their rows ran, because their deadline passed or their caller cancelled.",
    ["model", "reason"],
)
ATTRSERVE_ROWS_DROPPED_TOTAL = Counter(
    "attrserve_rows_dropped_total", "Rows of dropped requests that were never computed.", ["model", "reason"]
)
ATTRSERVE_WORKER_UP = Gauge(
    "attrserve_worker_up", "1 while the device's engine worker runs; 0 from its failure to its restart.", ["device"]
)
ATTRSERVE_WORKER_RESTARTS_TOTAL = Counter(
    "attrserve_worker_restarts_total", "Engine workers restarted after they died (each failure is logged with its traceback).", ["device"]
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
PASS_KINDS = tuple(kind.value for kind in PassKind)
DROP_REASONS = (DROP_DEADLINE, DROP_CANCELLED)


def precreate(models: list[str], algorithms: list[str], methods: list[tuple[str, str, str]]) -> None:
    """Create label sets up front so dashboards show zeros instead of gaps."""
    for model in models:
        for algorithm in algorithms:
            ATTRSERVE_ATTRIBUTION_DURATION_SECONDS.labels(model, algorithm)
            for code in GRPC_CODES:
                ATTRSERVE_ATTRIBUTIONS_COMPLETED_TOTAL.labels(model, algorithm, code)
        ATTRSERVE_QUEUE_WAIT_SECONDS.labels(model)
        for reason in DROP_REASONS:
            ATTRSERVE_REQUESTS_DROPPED_TOTAL.labels(model, reason)
            ATTRSERVE_ROWS_DROPPED_TOTAL.labels(model, reason)
        for kind in PASS_KINDS:
            ATTRSERVE_PASSES_EXECUTED_TOTAL.labels(model, kind)
    for grpc_type, service, method in methods:
        GRPC_SERVER_STARTED_TOTAL.labels(grpc_type, service, method)
        GRPC_SERVER_HANDLING_SECONDS.labels(grpc_type, service, method)
        for code in GRPC_CODES:
            GRPC_SERVER_HANDLED_TOTAL.labels(grpc_type, service, method, code)


class EngineMetrics(EngineObserver):
    """What the engine reports from its worker threads, as metrics."""

    def __init__(self, devices: list[str]) -> None:
        for device in devices:
            ATTRSERVE_WORKER_UP.labels(device).set(1.0)
            ATTRSERVE_WORKER_RESTARTS_TOTAL.labels(device)

    def pass_executed(self, stats: PassStats) -> None:
        ATTRSERVE_PASSES_EXECUTED_TOTAL.labels(stats.model, stats.kind).inc()
        ATTRSERVE_PASS_ROWS.labels(stats.model, stats.kind).observe(stats.rows)
        ATTRSERVE_PASS_REQUESTS.labels(stats.model, stats.kind).observe(stats.requests)
        ATTRSERVE_PASS_DURATION_SECONDS.labels(stats.model, stats.kind).observe(stats.seconds)

    def request_dropped(self, model: str, reason: str, rows: int) -> None:
        ATTRSERVE_REQUESTS_DROPPED_TOTAL.labels(model, reason).inc()
        ATTRSERVE_ROWS_DROPPED_TOTAL.labels(model, reason).inc(rows)

    def worker_state(self, device: str, serving: bool, reason: str) -> None:
        ATTRSERVE_WORKER_UP.labels(device).set(1.0 if serving else 0.0)
        if serving:
            ATTRSERVE_WORKER_RESTARTS_TOTAL.labels(device).inc()
