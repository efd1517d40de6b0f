"""LocalCore: an Engine and its ModelManager in this process. The engine-core process runs one (engine_main.py);
`--no-engine-process` and tests serve from one in the front end's own process."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Callable, Collection, Coroutine, Mapping, Sequence
from typing import Any

import torch

from attrserve.v1 import attribution_service_pb2 as pb
from attrserve.v1 import model_config_pb2 as mc
from attrserve_engine import AttributionJob, Engine, EngineObserver, ModelRecord, ModelState
from attrserve_engine.engine import Probes, memory_allocated
from attrserve_service import eventloop, frames
from attrserve_service.config import ServerConfig, effective_config, spec_config
from attrserve_service.convert import Job, Result, algorithm_enum
from attrserve_service.core import STATES, Gauges, Snapshot
from attrserve_service.demo_models import DEMO_MODEL_REPOSITORY
from attrserve_service.launch import MALLOCS
from attrserve_service.repository import ModelManager, RepositoryError, Status


@functools.cache
def heap_allocator() -> str:
    """The malloc this process runs on: "tcmalloc" or "jemalloc" when that library is mapped (LD_PRELOAD), else
    "glibc" (attrserve_build_info's allocator label; launch.allocator_preload chooses it)."""
    try:
        with open("/proc/self/maps") as maps:
            mapped = maps.read()
    except OSError:
        return "unknown"
    return next((name for name in MALLOCS if f"lib{name}" in mapped), "glibc")


class LocalCore:
    """The engine and its model manager, in this process."""

    held_bytes = 0  # (Core) the engine's admission refuses before this process holds anything for it

    def __init__(self, engine: Engine, manager: ModelManager) -> None:
        self.engine = engine
        self.manager = manager
        self.event_loop = eventloop.running()  # made on the loop that serves it (build_core, create_server)
        self._changing: set[asyncio.Task] = set()  # loads and unloads under way (_to_the_end)

    # -- requests -------------------------------------------------------------------------------------------------
    def submit(self, job: AttributionJob) -> concurrent.futures.Future:
        """Validate and queue a job of torch tensors (Engine.submit; an `also` entry's errors name its index)."""
        return self.engine.submit(job)

    async def attribute(self, job: Job) -> Result:
        """A job of numpy arrays (Core.attribute), answered in numpy arrays; they cross as the engine process's frames
        would carry them, without the bytes."""
        result = await asyncio.wrap_future(self.submit(frames.translate(job, tensors=True)))
        return frames.translate(result, tensors=False)

    def labels(self, model: str, algorithm: str) -> tuple[str, str]:
        """Metric labels stay bounded: names a client makes up are counted as "unknown"."""
        return (
            model if model in self.engine.served.names() else "unknown",
            algorithm if algorithm in self.engine.algorithms else "unknown",
        )

    # -- models -----------------------------------------------------------------------------------------------------
    async def model_infos(self) -> list[pb.ModelInfo]:
        """Every model version the server knows of: those that serve, and those loading or failed (with why)."""
        return [self._info(r) for r in self.engine.model_records()]

    async def model_info(self, name: str, version: str) -> pb.ModelInfo:
        return self._info(self.engine.model_record(name, version))

    def _info(self, record: ModelRecord) -> pb.ModelInfo:
        model = record.model
        if model is None:  # loading, or its load failed: what was asked for, and why it does not serve
            config = spec_config(record.spec) if record.spec is not None else mc.ModelConfig(name=record.name, version=record.version)
            return pb.ModelInfo(config=config, state=STATES[record.state], reason=record.reason)
        refused = self.engine.refused_algorithms(model)
        names = self.engine.supported_algorithms(model, refused)
        state, reason = self.engine.model_state(record)
        return pb.ModelInfo(
            config=effective_config(model),
            layers=model.layers,
            algorithms=[e for e in map(algorithm_enum, names) if e is not None],
            custom_algorithms=[name for name in names if algorithm_enum(name) is None],
            refused=[pb.RefusedAlgorithm(name=name, reason=why) for name, why in sorted(refused.items())],
            ready=state == ModelState.READY,
            state=STATES[state],
            reason=reason,
            batch_probe=[pb.BatchProbe(rows=rows, rows_per_second=rate) for rows, rate in sorted(model.batch_probe.items())],
        )

    def readiness(self, strict: bool) -> tuple[bool, str]:
        """SERVING: every device's worker is up and a model serves (strict: every model version the server knows
        of serves). Otherwise NOT_SERVING, and why."""
        up, reason = self.engine.serving()
        if not up:
            return False, reason
        records = self.engine.model_records()
        serving = [r for r in records if self.engine.model_state(r)[0] == ModelState.READY]
        if not serving:
            return False, "no model can serve"
        if strict and len(serving) < len(records):
            waiting = [f"{r.name} v{r.version} ({r.state.value})" for r in records if r not in serving]
            return False, f"strict readiness: {', '.join(waiting)} not ready"
        return True, ""

    def statuses(self) -> list[Status]:
        return self.manager.statuses()

    async def index(self, name: str | None = None) -> list[Status]:
        return await self.manager.index(name)

    async def load(self, name: str, version: str = "") -> list[Status]:
        return await self._to_the_end(self.manager.load(name, version))

    async def unload(self, name: str, version: str = "") -> list[Status]:
        return await self._to_the_end(self.manager.unload(name, version))

    def _to_the_end(self, change: Coroutine[Any, Any, list[Status]]) -> asyncio.Future[list[Status]]:
        """A load or unload runs to its end when its caller leaves (a LoadModel's deadline, a cancel), as the engine
        process runs a call (engine_main): cancelled with its caller, it stopped between a model's versions, some loaded
        and some not. An error nobody waits for any more is dropped, as the front drops a late reply."""
        task = asyncio.ensure_future(change)
        self._changing.add(task)  # the event loop holds its tasks weakly
        task.add_done_callback(self._changed)
        return asyncio.shield(task)

    def _changed(self, task: asyncio.Task) -> None:
        self._changing.discard(task)
        if not task.cancelled():
            task.exception()  # (retrieved: asyncio logs a failed task's error that nobody retrieved)

    async def poll_forever(self, interval: float) -> None:
        await self.manager.poll_forever(interval)

    # -- metrics and health ----------------------------------------------------------------------------------------
    async def refresh(self) -> None:
        """Nothing to ask: backlog and device_memory read the engine in this process."""

    def backlog(self, name: str) -> tuple[int, int]:
        return self.engine.backlog(name)

    def device_memory(self, device: str) -> int:
        """Bytes torch has allocated on a CUDA device, in the process that runs the models (this one)."""
        return memory_allocated(device)

    def gauges(self) -> Gauges:
        """What /metrics reads of the engine at each scrape; the engine process's answer to its front's refresh."""
        return Gauges(
            backlogs={name: self.engine.backlog(name) for name in self.engine.served.names()},
            device_memory={device: memory_allocated(device) for device in self.devices() if device.startswith("cuda")},
        )

    def devices(self) -> tuple[str, ...]:
        """The devices the loaded models run on."""
        return tuple(sorted({str(m.device) for m in self.engine.models()}))

    def watched(self, name: str) -> list[tuple[list[str], str]]:
        """(algorithms, device) of each load of a model that serves: the label sets its metrics create up front."""
        return [(self.engine.supported_algorithms(m), str(m.device)) for m in self.engine.models() if m.name == name]

    def snapshot(self) -> Snapshot:
        names = self.engine.served.names()
        return Snapshot(
            names=frozenset(names),
            algorithms=frozenset(self.engine.algorithms),
            workers=self.engine.serving(),
            readiness=self.readiness(False),
            strict_readiness=self.readiness(True),
            statuses=tuple(self.statuses()),
            watched={name: self.watched(name) for name in names},
            devices=self.devices(),
            allocator=heap_allocator(),
            event_loop=self.event_loop,
            torch=str(torch.__version__),  # a TorchVersion would make the front import torch to unpickle it
            probes=self.engine.probes(),
        )

    def watch(self, observer: EngineObserver) -> None:
        """`observer` hears the engine's events (on its worker and loading threads)."""
        self.engine.observers.append(observer)

    def on_change(self, callback: Callable[[], None], loop: asyncio.AbstractEventLoop) -> None:
        """`callback` runs on `loop` whenever a worker or a model version changes state (health follows)."""
        self.watch(_Changes(callback, loop))

    async def shutdown(self, drain: bool = True, timeout: float | None = 30.0) -> int:
        """Stop the engine (draining for at most `timeout` s); how many accepted requests were lost."""
        return await asyncio.get_running_loop().run_in_executor(None, lambda: self.engine.shutdown(drain=drain, timeout=timeout))


async def build_core(
    config: ServerConfig,
    observers: Callable[[LocalCore], Sequence[EngineObserver]] = lambda core: (),
    only: Collection[tuple[str, str]] | None = None,
    probes: Mapping[tuple, Probes] | None = None,
    skip: Mapping[tuple[str, str], str] | None = None,
) -> LocalCore:
    """An engine with the configured plugins and the repository's models (the built-in demo models without one;
    `only`: just these versions; `probes`: the load-time probes (pass-size rates) the engine process before
    this one kept, which its loads of the same files take instead of timing passes again; `skip`: versions not loaded,
    with why: ModelManager.load_all); `observers(core)` hear the loads too. RepositoryError when nothing can serve
    (a model that fails is reported, not fatal)."""
    # The count this process's torch was given (launch.intra_op_threads or in_process_threads: an explicit
    # --engine-threads as it is, else capped at the cores the process may use), not capped again by the Engine.
    engine = Engine(config.limits, threads=torch.get_num_threads())
    engine.keep_probes(probes or {})
    for plugin in config.plugins:
        try:
            engine.load_plugins(plugin)
        except Exception as e:
            raise RepositoryError(f"plugin {plugin} could not be loaded: {type(e).__name__}: {e}") from e
    core = LocalCore(engine, ModelManager(engine, config.model_repository or DEMO_MODEL_REPOSITORY, config.model_control))
    for observer in observers(core):
        core.watch(observer)
    await core.manager.load_all(only, skip)
    return core


class _Changes(EngineObserver):
    def __init__(self, callback: Callable[[], None], loop: asyncio.AbstractEventLoop) -> None:
        self.callback = callback
        self.loop = loop

    def worker_state(self, device: str, serving: bool, reason: str) -> None:
        self._changed()

    def model_state_changed(self, model: str, version: str) -> None:
        self._changed()

    def _changed(self) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.callback)
