"""The grpc.aio server: engine + servicer + health + reflection + /metrics, with graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from attrserve.v1 import attribution_service_pb2 as pb
from attrserve_engine.events import ModelState
from attrserve_service import __version__, eventloop, heap, launch, logs, metrics
from attrserve_service.auth import ServerSecurity
from attrserve_service.config import ConfigError, ServerConfig
from attrserve_service.core import Core, settle_heap
from attrserve_service.engine_process import EngineProcess
from attrserve_service.launch import Launched
from attrserve_service.methods import Registrar
from attrserve_service.oip import METHODS as OIP_METHODS
from attrserve_service.oip import SERVICE_NAME as OIP_SERVICE_NAME
from attrserve_service.oip import InferenceServicer, add_inference_service
from attrserve_service.repository import CONTROL_POLL, ModelManager
from attrserve_service.scrape import MetricsEndpoint
from attrserve_service.servicer import AttributionServicer, ModelRepositoryServicer, add_attribution_service, add_model_repository_service

if TYPE_CHECKING:
    from attrserve_engine import Engine

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AttributionService"].full_name
REPOSITORY_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ModelRepositoryService"].full_name


@dataclass
class RunningServer:
    """What create_server returns: stop() drains in the order readiness → RPCs → engine."""

    server: grpc.aio.Server
    port: int
    core: Core
    health: health.aio.HealthServicer
    engine: Engine | None = None  # the engine, when it runs in this process (--no-engine-process, tests)
    strict_readiness: bool = False
    metrics_port: int | None = None
    _metrics_http: MetricsEndpoint | None = None
    _poller: asyncio.Task | None = None
    attribution: AttributionServicer | None = None
    _ready_labels: set[tuple[str, str]] = dataclasses.field(default_factory=set)
    _serving: bool | None = None
    draining: bool = False

    def can_serve(self) -> tuple[bool, str]:
        """SERVING: the engine's workers are up and a model serves (with strict readiness: every model version the
        server knows of serves). Otherwise NOT_SERVING, and why."""
        return self.core.readiness(self.strict_readiness)

    async def sync_health(self) -> None:
        """Health and model readiness say what the engine can do now: NOT_SERVING while the engine process or a
        worker is down or no model can serve; attrserve_model_ready 0 for a version that is loading, failed or
        unloading."""
        labels = set()
        for known in self.core.statuses():
            labels.add((known.name, known.version))
            metrics.ATTRSERVE_MODEL_READY.labels(known.name, known.version).set(1.0 if known.state == ModelState.READY.value else 0.0)
        for gone in self._ready_labels - labels:
            metrics.ATTRSERVE_MODEL_READY.remove(*gone)
        self._ready_labels = labels
        if self.draining:
            return  # enter_graceful_shutdown set NOT_SERVING for good
        up, reason = self.can_serve()
        if self._serving is not None and up != self._serving:
            log.log(logging.INFO if up else logging.ERROR, "health: %s", "SERVING" if up else f"NOT_SERVING ({reason})")
        self._serving = up
        status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self, grace: float = 10.0, prestop: float = 0.0) -> int:
        """NOT_SERVING; for `prestop` seconds new requests are still accepted while balancers and clients move
        away; then `grace` seconds for the requests in flight; then the engine stops. Returns how many accepted
        attribution requests were lost: still running when the grace ended (cut off), or left in the engine."""
        self.draining = True
        if self._poller is not None:
            self._poller.cancel()
        await self.health.enter_graceful_shutdown()  # NOT_SERVING first, so balancers move away
        if prestop > 0:
            log.info("NOT_SERVING; accepting requests for %.1f s more while clients move away", prestop)
            await asyncio.sleep(prestop)
        loop = asyncio.get_running_loop()
        if self.attribution is not None:
            self.attribution.drain()  # open AttributeStreams take no new request either
        stopping = asyncio.ensure_future(self.server.stop(grace))  # refuses new RPCs; cancels the rest after `grace`
        until = loop.time() + grace
        while self._active() and loop.time() < until - 0.05:
            await asyncio.sleep(0.02)
        cut_off = self._active()
        await stopping
        left = await self.core.shutdown(drain=True, timeout=grace)
        if self._metrics_http is not None:
            await self._metrics_http.close()
        lost = max(cut_off, left)  # a request cut off by the grace is also cancelled in the engine: count it once
        if lost:
            log.error("%d accepted request(s) did not finish within the %.1f s grace and were lost", lost, grace)
        return lost

    def _active(self) -> int:
        return self.attribution.active if self.attribution is not None else 0


async def _start_core(config: ServerConfig, engine: Engine | None, launched: Launched | None) -> tuple[Core, Engine | None]:
    """The models: `engine` as it is (tests, embedding; the repository only read when config.model_repository names
    one), an engine-core process (the default; `launched`: the one `attrserve serve` started already), or an engine in
    this process (config.engine_process False)."""
    if engine is None and config.engine_process:
        process = EngineProcess(config, logs.current())
        process.watch(metrics.EngineMetrics(process))  # before the start, so the loads are measured
        await process.start(launched)
        return process, None
    from attrserve_service.local_core import LocalCore, build_core  # imports torch: only an engine in this process needs it

    if engine is not None:
        local = LocalCore(engine, ModelManager(engine, config.model_repository, config.model_control))
        local.watch(metrics.EngineMetrics(local))
        return local, engine
    if config.allocator not in ("auto", "glibc"):
        raise ConfigError(f"--allocator {config.allocator}: applies to the engine process (with --no-engine-process, set LD_PRELOAD)")
    import torch  # (local_core imported it)

    torch.set_num_threads(launch.in_process_threads(config, torch.get_num_threads()))
    log.info("%s", launch.threads_said(torch.get_num_threads()))
    local = await build_core(config, lambda core: [metrics.EngineMetrics(core)])
    return local, local.engine


async def create_server(config: ServerConfig, engine: Engine | None = None, launched: Launched | None = None) -> RunningServer:
    """Load the models, bind, and start serving; port 0 binds any free port (tests).

    With `engine`, its models are served as they are (tests, embedding) and the repository is only read when
    `config.model_repository` names one. `launched`: the engine process, already started for `config` (`serve`)."""
    # TLS files and tokens first: a bad setting fails before any load. Their files are followed as they rotate.
    security = ServerSecurity.from_config(config, reloaded=metrics.credentials_reloaded)
    metrics.watch_credentials(security)
    core, engine = await _start_core(config, engine, launched)
    metrics.observe_engine(core, __version__)
    metrics.ATTRSERVE_ENGINE_PROCESS_UP.set(1.0)
    if config.engine_process:
        metrics.watch_heaps()
    metrics.precreate_methods(
        [
            ("unary", SERVICE_NAME, "Attribute"),
            ("bidi_stream", SERVICE_NAME, "AttributeStream"),
            ("unary", SERVICE_NAME, "ListModels"),
            ("unary", SERVICE_NAME, "GetModel"),
            ("unary", REPOSITORY_SERVICE_NAME, "RepositoryIndex"),
            ("unary", REPOSITORY_SERVICE_NAME, "LoadModel"),
            ("unary", REPOSITORY_SERVICE_NAME, "UnloadModel"),
            *(("unary", OIP_SERVICE_NAME, method) for method in OIP_METHODS),
        ]
    )

    servers_before = metrics.grpc_server_ids()
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", config.max_request_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),
            *pending_calls_options(config.max_pending_calls),
        ],
    )
    grpc_calls = metrics.GrpcCoreCalls(servers_before)
    # Every service through the registrar: each method wrapped once with its token check, statuses and metrics
    # (methods.py; no interceptors, which grpc runs on every call).
    registrar = Registrar(server, security.auth)
    attribution = AttributionServicer(core, config.max_requests_per_stream)
    add_attribution_service(attribution, registrar)
    add_model_repository_service(ModelRepositoryServicer(core), registrar)
    add_inference_service(InferenceServicer(core, attribution, config.strict_readiness), registrar)  # KServe v2 / Triton clients
    health_servicer = health.aio.HealthServicer()
    # the generated functions call only the two methods the registrar has (their stubs type a server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, cast("grpc.aio.Server", registrar))
    if config.reflection:
        names = (SERVICE_NAME, REPOSITORY_SERVICE_NAME, OIP_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        # reflection.enable_server_reflection picks its servicer by the server's type; the registrar is not a server
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflection.aio.ReflectionServicer(names), registrar)
    address = f"{config.host}:{config.port}"
    credentials = security.credentials
    try:
        port = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    except RuntimeError:  # gRPC's "Failed to bind to address" (older releases returned 0)
        port = 0
    if port == 0:
        await core.shutdown(drain=False, timeout=1.0)
        why = bind_failure(config.host, config.port)
        if credentials is not None and why == UNEXPLAINED:  # the address is free: gRPC refused the certificate or its key
            tls = f"--tls-cert {config.tls_cert}, --tls-key {config.tls_key}"
            raise ConfigError(f"{tls}: gRPC cannot serve TLS with them (its log says why)")
        raise ConfigError(f"--port {config.port}: cannot listen on {address}: {why}")
    await server.start()

    running = RunningServer(
        server=server,
        port=port,
        core=core,
        health=health_servicer,
        engine=engine,
        strict_readiness=config.strict_readiness,
        attribution=attribution,
    )
    if config.metrics_port is not None:

        async def before_page() -> None:
            grpc_calls.sync()
            await core.refresh()

        endpoint = MetricsEndpoint(before=before_page)
        try:
            running.metrics_port = await endpoint.start(config.host, config.metrics_port)
        except OSError as e:
            await server.stop(None)
            await core.shutdown(drain=False, timeout=1.0)
            where = f"{config.host}:{config.metrics_port}"
            raise ConfigError(f"--metrics-port {config.metrics_port}: cannot listen on {where}: {_why(e)}") from None
        running._metrics_http = endpoint
    loop = asyncio.get_running_loop()
    syncs: set[asyncio.Task] = set()

    def sync() -> None:
        task = asyncio.ensure_future(running.sync_health())
        syncs.add(task)
        task.add_done_callback(syncs.discard)

    core.on_change(sync, loop)
    # Readiness only now: every model is loaded and warm (or has failed, with its reason).
    await running.sync_health()
    if config.model_control == CONTROL_POLL:
        running._poller = asyncio.ensure_future(core.poll_forever(config.repository_poll_seconds))
    return running


UNEXPLAINED = "the address could not be bound"  # bind_failure's answer where a plain socket binds


def bind_failure(host: str, port: int) -> str:
    """Why gRPC could not listen on `host`:`port` (it says only that it failed): a plain socket's bind tells, e.g.
    "address already in use"."""
    try:
        family, kind, proto, _, where = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: a port left in TIME_WAIT is free
            probe.bind(where)
    except OSError as e:
        return _why(e)
    return UNEXPLAINED


def _why(error: OSError) -> str:
    """An OSError's reason alone ("address already in use"), without the call and address asyncio wraps it in."""
    return (os.strerror(error.errno) if error.errno and error.errno > 0 else error.strerror or str(error)).lower()  # (<0: getaddrinfo's)


def pending_calls_options(bound: int) -> list[tuple[str, int]]:
    """gRPC's options for --max-pending-calls: the calls its core holds that the event loop has not taken yet. Past the
    soft limit gRPC cancels a new call with a chance that grows to 1 at the hard limit; both at `bound`: every new call
    past it. [] (0): gRPC's own, 1,000 and 3,000, which let a flood of 588 KiB images hold ~2 GiB in the front end
    (bench/RESULTS.md, issue 12 step 42)."""
    if not bound:
        return []
    return [("grpc.server.max_pending_requests", bound), ("grpc.server.max_pending_requests_hard_limit", bound)]


async def serve(config: ServerConfig, launched: Launched | None = None) -> int:
    """Run until SIGTERM/SIGINT, then drain; returns how many accepted requests were lost. `launched`: the engine
    process, started by the command line before this process imported torch (launch.py)."""
    running = await create_server(config, launched=launched)
    # SIGTERM drains from the moment the port is open (before, the handlers came after the "listening" line, and a
    # SIGTERM in between killed the process with the requests it had accepted). While the models load it still ends
    # the process at once: nothing was accepted yet.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    settle_heap()
    # The front's heap after a surge (heap.py): where the engine's tensors are not in it, and its malloc is glibc tuned.
    keeper = (
        heap.HeapKeeper.of_this_process(released=partial(metrics.heap_released, "front"))
        if config.engine_process and launch.front_heap_tuned()
        else None
    )
    keeping = asyncio.ensure_future(keeper.run()) if keeper is not None else None
    statuses = running.core.snapshot().statuses
    ready = sorted({s.name for s in statuses if s.state == ModelState.READY.value})
    not_ready = [f"{s.name} v{s.version}: {s.state}" for s in statuses if s.state != ModelState.READY.value]
    log.info(
        "attrserve serving %s%s on %s:%d (metrics on :%s, event loop: %s)",
        ", ".join(ready) or "no model",
        f" (not serving: {'; '.join(not_ready)})" if not_ready else "",
        config.host,
        running.port,
        running.metrics_port,
        eventloop.running(),
    )
    # One line a supervisor (or a test that bound port 0) can read the ports from.
    scraped = f" (metrics on {config.host}:{running.metrics_port})" if running.metrics_port is not None else ""
    print(f"attrserve listening on {config.host}:{running.port}{scraped}", flush=True)
    await stop.wait()
    log.info("draining")
    if keeping is not None:
        keeping.cancel()
    return await running.stop(config.grace_seconds, config.prestop_seconds)
