"""Server configuration, and the effective ModelConfig of a served model (GetModel).

Imports neither torch nor grpc: `attrserve serve` builds its ServerConfig and starts the engine process before the
front end imports them (launch.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from attrserve.v1 import model_config_pb2 as mc
from attrserve_engine.limits import EngineLimits

if TYPE_CHECKING:
    from attrserve_engine import LoadedModel, ModelSpec


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port
    metrics_port: int | None = 9090  # None: no /metrics endpoint; 0: any free port
    model_repository: Path | None = None  # None: the built-in demo models
    plugins: list[str] = field(default_factory=list)  # algorithm plugins: .py files, folders or module paths
    limits: EngineLimits = field(default_factory=EngineLimits)
    max_request_bytes: int = 64 * 1024 * 1024
    max_requests_per_stream: int = 256  # in flight on one AttributeStream
    grace_seconds: float = 10.0
    # On SIGTERM, health says NOT_SERVING this long before the listener stops taking requests: clients that
    # watch health (the Python client with several servers, Kubernetes readiness) move away without losing a call.
    prestop_seconds: float = 1.0
    # Runtime model management: "none" (load the repository at start-up), "explicit" (and load/unload through
    # the ModelRepositoryService), "poll" (and follow the repository's folders every repository_poll_seconds).
    model_control: str = "none"
    repository_poll_seconds: float = 15.0
    # Health says SERVING only when every model version in the repository serves (default: at least one).
    strict_readiness: bool = False
    # TLS: the server's certificate chain and key (PEM); both or neither (plaintext). With tls_client_ca, clients
    # must present a certificate signed by that CA (mutual TLS).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # Bearer tokens (`authorization: Bearer <token>`): accepted tokens from a file (one a line, # comments) and/or
    # from the environment variable named by auth_token_env (comma-separated). Any of the three turns auth on.
    # With admin tokens, only they may call LoadModel / UnloadModel.
    auth_tokens_file: Path | None = None
    admin_tokens_file: Path | None = None
    auth_token_env: str | None = None  # the NAME of the variable, not a token
    auth_health: bool = False  # health checks need a token too (default: exempt, for probes and balancers)
    reflection: bool = False  # gRPC server reflection (grpcurl list/describe); needs a token when auth is on
    # The models run in an engine-core process of their own (the front end's event loop and the engine's worker
    # then never share an interpreter lock); False: in this process (embedding, tests with in-memory models).
    engine_process: bool = True
    engine_threads: int = 0  # torch intra-op threads of the engine process (0: launch.intra_op_threads)
    # While one request is in flight to the engine process and nothing else is, the front end's event loop keeps
    # turning instead of sleeping, for up to this many microseconds (0: never), so that its core is awake when the
    # answer comes. It costs up to that much of a core's CPU per lone request (EngineProcess._lone). Off where the
    # server may use fewer than 2 cores (engine_process.busy_poll_seconds).
    busy_poll_us: int = 3000
    # Queries of death (quarantine.py): a request computing when the engine process died runs alone when it is sent
    # again; if the engine process dies then too, it and every identical request are refused with FAILED_PRECONDITION
    # for this many seconds (0: off, and every retry runs with the others). Only with engine_process.
    quarantine_seconds: float = 600.0
    # Bytes of requests the front end may hold for the engine process, sent or waiting to be, and not yet answered:
    # their tensors plus engine_process.REQUEST_COST each. A request that would pass it is refused with
    # RESOURCE_EXHAUSTED (EngineProcess.attribute); 0: engine_process.front_bytes_bound's default. Only with
    # engine_process: an engine in this process refuses at admission before the front holds anything.
    max_front_bytes: int = 0
    # Calls gRPC's core may hold, each with its message, that the front end's event loop has not taken yet (gRPC's
    # grpc.server.max_pending_requests and its hard limit, both set to it); past it gRPC cancels a new call (CANCELLED)
    # before attrserve's code sees it (attrserve_grpc_core_calls_started_total counts it). 0: gRPC's own, which starts
    # cancelling at 1,000 and cancels every call past 3,000. They wait only while the event loop is behind.
    max_pending_calls: int = 0
    # The engine process's C heap (launch.allocator_preload): "auto" (tcmalloc where it is installed and
    # LD_PRELOAD is not set), "tcmalloc" (required), "glibc" (the C library's malloc), or a malloc library's path.
    allocator: str = "auto"
    # The event loop of both processes (eventloop.py): "auto" (uvloop where it is installed), "uvloop" (required),
    # "asyncio" (the standard library's).
    event_loop: str = "auto"


class ConfigError(ValueError):
    """A setting the server cannot start with (a TLS file that is missing, a key without its certificate, ...);
    the message names the setting. `attrserve serve` exits with 2."""


def effective_config(model: LoadedModel) -> mc.ModelConfig:
    """The config a model is served with, defaults filled in (for GetModel)."""
    config = spec_config(model.spec)
    config.version = model.version
    config.platform = (
        mc.PLATFORM_TORCHSCRIPT if model.is_torchscript else mc.PLATFORM_TORCH_EXPORT if model.is_exported else mc.PLATFORM_PYTORCH_EAGER
    )
    config.max_batch_rows = model.max_batch_rows
    config.max_queue_delay_microseconds = round(model.max_queue_delay_s * 1e6)
    config.device = str(model.device)
    config.precision = model.spec.precision or "float32"
    config.max_queued_rows = model.max_queued_rows  # 0: auto, Scheduler.row_bound
    config.max_queued_bytes = model.max_queued_bytes
    config.intra_op_threads = model.intra_op_threads if model.device.type == "cpu" else model.spec.intra_op_threads
    config.instances = model.instances
    config.memory_format = model.memory_format
    return config


def spec_config(spec: ModelSpec) -> mc.ModelConfig:
    """The config a model version asked for (a version that is not loaded: GetModel of a failed load)."""
    config = mc.ModelConfig(
        name=spec.name,
        version=spec.version,
        max_batch_rows=spec.max_batch_rows,
        max_queue_delay_microseconds=spec.max_queue_delay_us,
        device=spec.device,
        description=spec.description,
        precision=spec.precision,
        max_queued_rows=spec.max_queued_rows,
        max_queued_bytes=spec.max_queued_bytes,
        strict_input_dtypes=spec.strict_input_dtypes,
        intra_op_threads=spec.intra_op_threads,
        instances=spec.instances,
        memory_format=spec.memory_format,
    )
    from attrserve_service.convert import wire_dtype

    for s in spec.inputs:
        wire = wire_dtype(s.dtype) if s.dtype is not None else 0  # 0: DATA_TYPE_UNSPECIFIED, any dtype
        config.inputs.add(name=s.name, dtype=wire, dims=list(s.dims or ()))
    if spec.output_key is not None:
        config.output.key = spec.output_key
    elif spec.output_index is not None:
        config.output.index = spec.output_index
    return config
