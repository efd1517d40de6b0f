"""What the front end (servicers, health, metrics) asks of the models: the `Core` protocol and what it answers with.
Two cores answer it: local_core.LocalCore, an Engine and its ModelManager in this process, and
engine_process.EngineProcess, the front end's handle on an engine-core process that runs a LocalCore. This module
imports no torch: the front-end process never does. Protobuf appears here only in ModelInfo, which GetModel returns
as it is."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol

from attrserve.v1 import attribution_service_pb2 as pb
from attrserve_engine.events import EngineObserver, ModelState
from attrserve_service.convert import Job, Result
from attrserve_service.repository import UNLOADED, Status

if TYPE_CHECKING:
    from attrserve_engine.engine import Probes


def settle_heap() -> None:
    """After start-up: the objects built so far (torch, the models) leave the cyclic collector's generations, and
    generation 0 is collected every 20,000 allocations instead of 700, so a collection no longer walks the models'
    objects every few requests. A request allocates hundreds of objects and almost no cycles."""
    gc.freeze()
    gc.set_threshold(20_000, 10, 10)


class Gauges(NamedTuple):
    """The engine's numbers that /metrics reads at each scrape (Core.refresh): per model (requests, rows) queued, and
    per CUDA device the bytes torch has allocated in the models' process."""

    backlogs: dict[str, tuple[int, int]]
    device_memory: dict[str, int]


# Set on an exception once it has been logged as an internal error, to the id its INTERNAL status quotes.
ERROR_ID = "_attrserve_error_id"

# The engine process's answers to the front end's requests and calls, each with the kind of answer that fails it in its
# place (INTERNAL at the front, with an error id): where the engine cannot pickle an answer (engine_main), or the front
# cannot read one (EngineProcess._unreadable).
ANSWERS = {"result": "error", "reply": "reply_error", "error": "error", "reply_error": "reply_error"}


@dataclass(frozen=True)
class Snapshot:
    """What the front reads without asking (per request, per health check, per scrape): the served model names
    and algorithm names (metric labels), readiness, every version's status, and what each model's metrics watch."""

    names: frozenset[str] = frozenset()
    algorithms: frozenset[str] = frozenset()
    workers: tuple[bool, str] = (False, "starting")
    readiness: tuple[bool, str] = (False, "starting")  # at least one version serves
    strict_readiness: tuple[bool, str] = (False, "starting")  # every version serves
    statuses: tuple[Status, ...] = ()
    watched: dict[str, list[tuple[list[str], str]]] = field(default_factory=dict)  # model → (algorithms, device) per load
    devices: tuple[str, ...] = ()
    allocator: str = ""  # the models' process's malloc (heap_allocator)
    event_loop: str = ""  # the models' process's event loop (eventloop.running)
    torch: str = ""  # the models' process's torch.__version__ (attrserve_build_info)
    probes: dict[tuple, Probes] = field(default_factory=dict)  # Engine.probes: handed to a restarted engine process


class Core(Protocol):
    """What the front end asks of the models: LocalCore (this process) or engine_process.EngineProcess (another one).

    `attribute` takes a job whose tensors are numpy arrays, as convert.py builds it, and answers with numpy arrays:
    the front end's request path does not use torch. `held_bytes`: what the front end holds of the requests it sent
    and that are not answered yet (EngineProcess.attribute bounds it; LocalCore holds none: its engine refuses at
    admission before it holds anything)."""

    held_bytes: int

    async def attribute(self, job: Job) -> Result: ...
    def labels(self, model: str, algorithm: str) -> tuple[str, str]: ...
    async def model_infos(self) -> list[pb.ModelInfo]: ...
    async def model_info(self, name: str, version: str) -> pb.ModelInfo: ...
    def readiness(self, strict: bool) -> tuple[bool, str]: ...
    def statuses(self) -> list[Status]: ...
    async def index(self, name: str | None = None) -> list[Status]: ...
    async def load(self, name: str, version: str = "") -> list[Status]: ...
    async def unload(self, name: str, version: str = "") -> list[Status]: ...
    async def poll_forever(self, interval: float) -> None: ...
    async def refresh(self) -> None: ...
    def backlog(self, name: str) -> tuple[int, int]: ...
    def device_memory(self, device: str) -> int: ...
    def watched(self, name: str) -> list[tuple[list[str], str]]: ...
    def snapshot(self) -> Snapshot: ...
    def watch(self, observer: EngineObserver) -> None: ...
    def on_change(self, callback: Callable[[], None], loop: asyncio.AbstractEventLoop) -> None: ...
    async def shutdown(self, drain: bool = True, timeout: float | None = 30.0) -> int: ...


STATES = {
    ModelState.LOADING: pb.MODEL_STATE_LOADING,
    ModelState.READY: pb.MODEL_STATE_READY,
    ModelState.UNAVAILABLE: pb.MODEL_STATE_UNAVAILABLE,
    ModelState.UNLOADING: pb.MODEL_STATE_UNLOADING,
}
STATE_NAMES = {state.value: code for state, code in STATES.items()} | {UNLOADED: pb.MODEL_STATE_UNLOADED}
