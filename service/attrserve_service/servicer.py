"""AttributionService and ModelRepositoryService servicers: each method decodes, calls the engine (or the model
manager), encodes. Errors are mapped by the interceptor."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc

from attrserve.v1 import attribution_service_pb2 as pb
from attrserve.v1 import attribution_service_pb2_grpc as pb_grpc
from attrserve.v1 import model_config_pb2 as mc
from attrserve_engine import AttributionError, Engine, ModelRecord, ModelState
from attrserve_service import metrics
from attrserve_service.config import effective_config, spec_config
from attrserve_service.convert import algorithm_enum, request_to_job, result_to_response
from attrserve_service.logs import REQUEST_ID
from attrserve_service.repository import UNLOADED, ModelManager, Status

# The server's deadline starts when the call arrives, a little after the client's: a client whose deadline
# passed cancels the call that much before the server's own deadline. A cancel that close to the deadline
# is the deadline.
_DEADLINE_SLACK_S = 0.025


def deadline_passed(context: grpc.aio.ServicerContext) -> bool:
    """True once the RPC's deadline has passed (grpc then cancels the handler: that is DEADLINE_EXCEEDED, not CANCELLED)."""
    remaining = context.time_remaining()
    return remaining is not None and remaining <= _DEADLINE_SLACK_S


def grpc_status(error: BaseException, context: grpc.aio.ServicerContext | None = None) -> tuple[grpc.StatusCode, str]:
    """The status a failed request gets: AttributionErrors carry theirs; anything else is a bug (INTERNAL).

    A cancelled handler is DEADLINE_EXCEEDED when its RPC's deadline passed, else CANCELLED (the caller left)."""
    if isinstance(error, AttributionError):
        return grpc.StatusCode[error.code], str(error)
    if isinstance(error, asyncio.CancelledError):
        if context is not None and deadline_passed(context):
            return grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed"
        return grpc.StatusCode.CANCELLED, "the request was cancelled"
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"


class AttributionServicer(pb_grpc.AttributionServiceServicer):
    def __init__(self, engine: Engine, max_requests_per_stream: int) -> None:
        self.engine = engine
        self.max_requests_per_stream = max_requests_per_stream

    async def _attribute(self, request: pb.AttributeRequest, context: grpc.aio.ServicerContext) -> pb.AttributeResponse:
        """One request through the engine, with its metrics; raises AttributionError on failure.

        The RPC's deadline (a stream's, for each of its requests) goes to the engine, which drops the job's
        rows once it passes; an RPC that ends early cancels the engine's future, which drops them too."""
        start = time.monotonic()
        remaining = context.time_remaining()
        deadline = None if remaining is None else start + remaining
        # Metric labels stay bounded: names a client makes up are counted as "unknown".
        model = request.model if request.model in self.engine.served.names() else "unknown"
        known = request.algorithm in pb.Algorithm.values() and request.algorithm != pb.ALGORITHM_UNSPECIFIED
        name = pb.Algorithm.Name(request.algorithm)[len("ALGORITHM_") :].lower() if known else request.custom_algorithm
        labels = (model, name if name in self.engine.algorithms else "unknown")
        metrics.ATTRSERVE_REQUESTS_IN_FLIGHT.inc()
        code = "OK"
        try:
            job = request_to_job(request, deadline)
            result = await asyncio.wrap_future(self.engine.submit(job))
            metrics.ATTRSERVE_QUEUE_WAIT_SECONDS.labels(labels[0]).observe(result.timing.queue_ms / 1e3)
            if result.convergence_delta is not None:
                metrics.observe_delta(*labels, result.convergence_delta.numpy())
            return result_to_response(result)
        except BaseException as e:
            code = grpc_status(e, context)[0].name
            raise
        finally:
            metrics.ATTRSERVE_REQUESTS_IN_FLIGHT.dec()
            metrics.ATTRSERVE_ATTRIBUTIONS_COMPLETED_TOTAL.labels(*labels, code).inc()
            metrics.ATTRSERVE_ATTRIBUTION_DURATION_SECONDS.labels(*labels).observe(time.monotonic() - start)

    async def Attribute(self, request: pb.AttributeRequest, context: grpc.aio.ServicerContext) -> pb.AttributeResponse:
        return await self._attribute(request, context)

    async def AttributeStream(
        self, request_iterator: AsyncIterator[pb.AttributeStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AttributeStreamResponse]:
        """Requests run concurrently (at most max_requests_per_stream at once); responses go out as they finish."""
        done: asyncio.Queue = asyncio.Queue()
        slots = asyncio.Semaphore(self.max_requests_per_stream)
        tasks: set[asyncio.Task] = set()

        async def one(position: int, request: pb.AttributeRequest) -> None:
            # NOTE: an empty request_id is replaced by the request's position on the stream, so every answer is matchable.
            request_id = request.request_id or str(position)
            REQUEST_ID.set(request_id)  # this request's task only: its log lines carry it
            try:
                response = await self._attribute(request, context)
                response.request_id = request_id
                await done.put(pb.AttributeStreamResponse(request_id=request_id, response=response))
            except Exception as e:  # every failure becomes an error entry; the stream goes on
                code, message = grpc_status(e)
                error = pb.RequestError(code=code.value[0], message=message)
                await done.put(pb.AttributeStreamResponse(request_id=request_id, error=error))
            finally:
                slots.release()

        async def read() -> int:
            count = 0
            async for item in request_iterator:
                await slots.acquire()
                task = asyncio.ensure_future(one(count, item.request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                count += 1
            return count

        reader = asyncio.ensure_future(read())
        getter: asyncio.Future | None = None
        sent = 0
        try:
            while True:
                if reader.done():
                    if (error := reader.exception()) is not None:
                        raise error
                    if sent == reader.result():  # every request read and answered
                        break
                if getter is None:
                    getter = asyncio.ensure_future(done.get())
                await asyncio.wait({getter} if reader.done() else {getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                    sent += 1
                    getter = None
        finally:
            # The stream ended early (client left, deadline, error): nothing of it may linger.
            for task in [reader, getter, *tasks]:
                if task is not None:
                    task.cancel()

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        """Every model version the server knows of: those that serve, and those loading or failed (with why)."""
        return pb.ListModelsResponse(models=[self._info(r) for r in self.engine.model_records()])

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.GetModelResponse:
        return pb.GetModelResponse(model=self._info(self.engine.model_record(request.model, request.model_version)))

    def _info(self, record: ModelRecord) -> pb.ModelInfo:
        model = record.model
        if model is None:  # loading, or its load failed: what was asked for, and why it does not serve
            config = spec_config(record.spec) if record.spec is not None else mc.ModelConfig(name=record.name, version=record.version)
            return pb.ModelInfo(config=config, state=_STATES[record.state], reason=record.reason)
        names = self.engine.supported_algorithms(model)
        serving = record.state == ModelState.READY and self.engine.model_serving(model)
        state = _STATES[record.state] if serving or record.state != ModelState.READY else pb.MODEL_STATE_UNAVAILABLE
        return pb.ModelInfo(
            config=effective_config(model),
            layers=model.layers,
            algorithms=[e for e in map(algorithm_enum, names) if e is not None],
            custom_algorithms=[name for name in names if algorithm_enum(name) is None],
            ready=serving,
            state=state,
            reason=record.reason if serving or record.state != ModelState.READY else self.engine.serving()[1],
            batch_probe=[pb.BatchProbe(rows=rows, rows_per_second=rate) for rows, rate in sorted(model.batch_probe.items())],
        )


_STATES = {
    ModelState.LOADING: pb.MODEL_STATE_LOADING,
    ModelState.READY: pb.MODEL_STATE_READY,
    ModelState.UNAVAILABLE: pb.MODEL_STATE_UNAVAILABLE,
    ModelState.UNLOADING: pb.MODEL_STATE_UNLOADING,
}
_STATE_NAMES = {state.value: code for state, code in _STATES.items()} | {UNLOADED: pb.MODEL_STATE_UNLOADED}


class ModelRepositoryServicer(pb_grpc.ModelRepositoryServiceServicer):
    """Runtime model management (the ModelManager does the work; this maps it to the contract)."""

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext) -> pb.RepositoryIndexResponse:
        statuses = self.manager.statuses()
        if request.ready_only:
            statuses = [s for s in statuses if s.state == ModelState.READY.value]
        return pb.RepositoryIndexResponse(models=_statuses(statuses))

    async def LoadModel(self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext) -> pb.LoadModelResponse:
        return pb.LoadModelResponse(models=_statuses(await self.manager.load(request.model, request.version)))

    async def UnloadModel(self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext) -> pb.UnloadModelResponse:
        return pb.UnloadModelResponse(models=_statuses(await self.manager.unload(request.model, request.version)))


def _statuses(statuses: list[Status]) -> list[pb.ModelStatus]:
    return [pb.ModelStatus(model=s.name, version=s.version, state=_STATE_NAMES[s.state], reason=s.reason) for s in statuses]
