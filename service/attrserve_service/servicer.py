"""AttributionService and ModelRepositoryService servicers: each method decodes, calls the engine (or the model
manager), encodes. Errors are mapped by methods.py."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from attrserve.v1 import attribution_service_pb2 as pb
from attrserve.v1 import attribution_service_pb2_grpc as pb_grpc
from attrserve_engine import AttributionError, InvalidArgument, ModelState, Unavailable
from attrserve_engine.events import deadline_slack
from attrserve_service import metrics
from attrserve_service.convert import ALGORITHM_NAMES, decode, request_to_job, result_to_response
from attrserve_service.core import ERROR_ID, STATE_NAMES, Core
from attrserve_service.logs import REQUEST_ID
from attrserve_service.repository import Status

if TYPE_CHECKING:
    from attrserve_service.methods import Registrar

# Under grpc.aio a client that cancels a stream, or whose deadline passes, ends the request iterator just as a
# half-close does; grpc cancels the handler a moment later (a second completion from grpc's core: measured 0.05-0.4 ms
# after the end of the requests; a single turn of the event loop missed it 1 time in 40, a CI run 2 times in 4). A
# stream whose requests were all answered waits this long for that cancel before it ends OK, so its caller leaving is
# counted CANCELLED (a deadline after the last answer is DEADLINE_EXCEEDED whatever the wait). It delays only the
# status of a stream the client half-closed, never an answer.
_STREAM_CANCEL_GRACE_S = 0.002
# RequestError.retry_after_ms of a refusal that the same request meets whenever it is sent (ResourceExhausted.permanent:
# a limit per request): the field's largest value (~49.7 days), "do not retry" (the field is unsigned; a unary call's
# grpc-retry-pushback-ms trailer says -1, retry_after_ms's). 0 stays "no hint".
NO_RETRY_MS = 2**32 - 1
# The RPC's deadline window (seconds from its arrival to its deadline; None without one), set by methods.py.
RPC_WINDOW: contextvars.ContextVar[float | None] = contextvars.ContextVar("rpc_window", default=None)
log = logging.getLogger(__name__)


def retry_after_ms(error: BaseException) -> int | None:
    """The retry hint a refusal carries, in milliseconds, for a unary call's grpc-retry-pushback-ms trailer and a
    stream's RequestError: admission's `retry_after_s`; -1 for one the same request meets whenever it is sent
    (ResourceExhausted.permanent: gRPC's retry design A6 reads a negative hint as "do not retry"); None: no hint."""
    if (retry := getattr(error, "retry_after_s", None)) is not None:
        return round(retry * 1e3)
    return -1 if getattr(error, "permanent", False) else None


def deadline_passed(context: grpc.aio.ServicerContext) -> bool:
    """True once the RPC's deadline has passed (grpc then cancels the handler: that is DEADLINE_EXCEEDED, not CANCELLED)."""
    remaining = context.time_remaining()
    if remaining is None:
        return False
    return remaining <= deadline_slack(RPC_WINDOW.get())  # a cancel that close to the deadline is the deadline


def grpc_status(error: BaseException, context: grpc.aio.ServicerContext | None = None) -> tuple[grpc.StatusCode, str]:
    """The status a failed request gets: AttributionErrors carry theirs; anything else is a bug (INTERNAL).

    A cancelled handler is DEADLINE_EXCEEDED when its RPC's deadline passed, else CANCELLED (the caller left).

    An INTERNAL message says nothing of the exception (its text may hold paths, data or configuration): it carries
    an error id, and the exception is logged once with that id and its traceback (the id stays with the exception,
    so every caller that maps it again gets the same id and no second log line)."""
    if isinstance(error, AttributionError):
        return grpc.StatusCode[error.code], str(error)
    if isinstance(error, asyncio.CancelledError):
        if context is not None and deadline_passed(context):
            return grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed"
        return grpc.StatusCode.CANCELLED, "the request was cancelled"
    error_id = getattr(error, ERROR_ID, None)
    if error_id is None:
        error_id = uuid.uuid4().hex[:16]
        log.error("internal error (id %s): %s: %s", error_id, type(error).__name__, error, exc_info=error)
        with contextlib.suppress(AttributeError, TypeError):
            setattr(error, ERROR_ID, error_id)
    return grpc.StatusCode.INTERNAL, f"internal error (id {error_id}); the server's log has the details"


class AttributionServicer(pb_grpc.AttributionServiceServicer):
    def __init__(self, core: Core, max_requests_per_stream: int) -> None:
        self.core = core
        self.max_requests_per_stream = max_requests_per_stream
        self.active = 0  # attribution requests between arrival and answer (a stream's each count): the drain waits on them
        self.stopping = asyncio.Event()  # set by drain()

    def drain(self) -> None:
        """The server takes no new call (RunningServer.stop, once its prestop is over): each open AttributeStream takes no
        new request either, answers those it took, and ends UNAVAILABLE, so the drain ends with the last answer and not
        with the grace (a stream the client kept open took requests until the grace cut them off)."""
        self.stopping.set()

    def _undecodable(self) -> None:
        """A request that did not parse is counted with the others (model and algorithm unknown)."""
        metrics.ATTRSERVE_ATTRIBUTIONS_COMPLETED_TOTAL.labels("unknown", "unknown", grpc.StatusCode.INVALID_ARGUMENT.name).inc()

    async def _attribute(self, request: pb.AttributeRequest, context: grpc.aio.ServicerContext) -> pb.AttributeResponse:
        """One request through the engine, with its metrics; raises AttributionError on failure.

        The RPC's deadline (a stream's, for each of its requests) goes to the engine, which drops the job's
        rows once it passes; an RPC that ends early cancels the engine's future, which drops them too."""
        start = time.monotonic()
        remaining = context.time_remaining()
        deadline = None if remaining is None else start + remaining
        name = ALGORITHM_NAMES.get(request.algorithm, request.custom_algorithm)
        labels = self.core.labels(request.model, name)  # bounded: names a client makes up count as "unknown"
        metrics.ATTRSERVE_REQUESTS_IN_FLIGHT.inc()
        self.active += 1
        code = "OK"
        try:
            job = request_to_job(request, deadline)
            # The job's arrays are copies of the message's bytes: nothing holds the parse from here (nor its caller, which
            # let go of it: Attribute, AttributeStream), so a held request costs the front one copy less (issue 12 step 41).
            del request
            result = await self.core.attribute(job)
            del job
            metrics.child(metrics.ATTRSERVE_QUEUE_WAIT_SECONDS, labels[0]).observe(result.timing.queue_ms / 1e3)
            if result.convergence_delta is not None:
                metrics.observe_delta(*labels, result.convergence_delta)
            return result_to_response(result)
        except BaseException as e:
            code = grpc_status(e, context)[0].name
            raise
        finally:
            self.active -= 1
            metrics.ATTRSERVE_REQUESTS_IN_FLIGHT.dec()
            metrics.child(metrics.ATTRSERVE_ATTRIBUTIONS_COMPLETED_TOTAL, *labels, code).inc()
            metrics.child(metrics.ATTRSERVE_ATTRIBUTION_DURATION_SECONDS, *labels).observe(time.monotonic() - start)

    async def Attribute(self, request: pb.AttributeRequest | bytes, context: grpc.aio.ServicerContext) -> pb.AttributeResponse:
        """`request` is the message's wire bytes as the server hands them over (add_attribution_service), or a message."""
        try:
            message = decode(pb.AttributeRequest, request)
        except InvalidArgument:
            self._undecodable()
            raise
        REQUEST_ID.set(message.request_id)  # this RPC's task only: its log lines carry it
        attributed = self._attribute(message, context)
        del message  # (_attribute lets go of it once its job is built)
        return await attributed

    async def AttributeStream(
        self, request_iterator: AsyncIterator[pb.AttributeStreamRequest | bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AttributeStreamResponse]:
        """Requests run concurrently (at most max_requests_per_stream at once, answers not yet sent included: a client that
        stops reading stops the stream's work); responses go out as they finish.

        Each message is parsed on its own: one that does not parse gets an INVALID_ARGUMENT error entry (its
        position on the stream as request_id) and the stream goes on. Once the server drains (drain()) the stream starts
        no further request; when those it started are answered it ends OK if the client had half-closed it by then with
        nothing left unstarted, else UNAVAILABLE. (It went on reading until then: a half-close that had not reached the
        handler when the drain began ended a stream whose every request was answered UNAVAILABLE.)"""
        done: asyncio.Queue = asyncio.Queue()
        slots = asyncio.Semaphore(self.max_requests_per_stream)
        tasks: set[asyncio.Task] = set()

        async def one(position: int, item: pb.AttributeStreamRequest | bytes) -> None:
            # NOTE: an empty request_id is replaced by the request's position on the stream, so every answer is matchable.
            request_id = str(position)
            try:
                try:
                    request = decode(pb.AttributeStreamRequest, item).request
                except InvalidArgument:
                    self._undecodable()
                    raise
                request_id = request.request_id or request_id
                REQUEST_ID.set(request_id)  # this request's task only: its log lines carry it
                attributed = self._attribute(request, context)
                del request, item  # (_attribute lets go of the parse once its job is built)
                response = await attributed
                response.request_id = request_id
                await done.put(pb.AttributeStreamResponse(request_id=request_id, response=response))
            except Exception as e:  # every failure becomes an error entry; the stream goes on
                code, message = grpc_status(e)
                hint = retry_after_ms(e)
                hint = NO_RETRY_MS if hint == -1 else hint or 0  # (the field is unsigned)
                error = pb.RequestError(code=code.value[0], message=message, retry_after_ms=hint)
                await done.put(pb.AttributeStreamResponse(request_id=request_id, error=error))

        started = 0
        unstarted = False  # a request read once the server drained: not started, so the stream ends UNAVAILABLE

        async def read() -> None:
            nonlocal started, unstarted
            async for item in request_iterator:
                await slots.acquire()
                if self.stopping.is_set():
                    unstarted = True
                    return
                task = asyncio.ensure_future(one(started, item))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                started += 1

        reader = asyncio.ensure_future(read())
        stopping = asyncio.ensure_future(self.stopping.wait())
        getter: asyncio.Future | None = None
        sent = 0
        try:
            while True:
                if reader.done() and not reader.cancelled():
                    if (error := reader.exception()) is not None:
                        raise error
                    if sent == started and not unstarted:  # every request read and answered
                        await asyncio.sleep(_STREAM_CANCEL_GRACE_S)  # a cancel that ended the requests lands here
                        break
                if stopping.done() and sent == started:  # draining, and what the stream started is answered
                    reader.cancel()
                    raise Unavailable("the server is shutting down: the requests it did not answer on this stream were not started")
                if getter is None:
                    getter = asyncio.ensure_future(done.get())
                await asyncio.wait({f for f in (getter, reader, stopping) if not f.done()}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                    sent += 1
                    getter = None
                    slots.release()  # once sent, not once computed: a client that stops reading stops the stream's work
        finally:
            # The stream ended early (client left, deadline, error): nothing of it may linger.
            for task in [reader, stopping, getter, *tasks]:
                if task is not None:
                    task.cancel()

    async def ListModels(self, request: pb.ListModelsRequest | bytes, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        """Every model version the server knows of: those that serve, and those loading or failed (with why)."""
        decode(pb.ListModelsRequest, request)
        return pb.ListModelsResponse(models=await self.core.model_infos())

    async def GetModel(self, request: pb.GetModelRequest | bytes, context: grpc.aio.ServicerContext) -> pb.GetModelResponse:
        message = decode(pb.GetModelRequest, request)
        return pb.GetModelResponse(model=await self.core.model_info(message.model, message.model_version))


class ModelRepositoryServicer(pb_grpc.ModelRepositoryServiceServicer):
    """Runtime model management (the ModelManager does the work; this maps it to the contract)."""

    def __init__(self, core: Core) -> None:
        self.core = core

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest | bytes, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        message = decode(pb.RepositoryIndexRequest, request)
        statuses = await self.core.index()
        if message.ready_only:
            statuses = [s for s in statuses if s.state == ModelState.READY.value]
        return pb.RepositoryIndexResponse(models=_statuses(statuses))

    async def LoadModel(self, request: pb.LoadModelRequest | bytes, context: grpc.aio.ServicerContext) -> pb.LoadModelResponse:
        message = decode(pb.LoadModelRequest, request)
        return pb.LoadModelResponse(models=_statuses(await self.core.load(message.model, message.version)))

    async def UnloadModel(self, request: pb.UnloadModelRequest | bytes, context: grpc.aio.ServicerContext) -> pb.UnloadModelResponse:
        message = decode(pb.UnloadModelRequest, request)
        return pb.UnloadModelResponse(models=_statuses(await self.core.unload(message.model, message.version)))


def _statuses(statuses: list[Status]) -> list[pb.ModelStatus]:
    return [pb.ModelStatus(model=s.name, version=s.version, state=STATE_NAMES[s.state], reason=s.reason) for s in statuses]


# -- registration ---------------------------------------------------------------------------------------------------
# grpc runs a method's request deserializer before its handler, and one that raises fails the call with UNKNOWN
# ("Unexpected DecodeError") before what wraps the handler (methods.py) sees it. Our methods are registered without one: each handler gets
# the message's bytes and parses them itself (convert.decode), so a request that does not parse is an INVALID_ARGUMENT
# naming the message type, counted like any other status, and on AttributeStream one bad message is an error entry
# while the stream goes on.

_Unary = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _unary(behavior: _Unary, response_type: Any) -> grpc.RpcMethodHandler[Any, Any]:
    # request_deserializer=None: the handler gets the request's raw bytes
    return grpc.unary_unary_rpc_method_handler(
        behavior,
        request_deserializer=None,
        response_serializer=response_type.SerializeToString,
    )


def add_attribution_service(servicer: AttributionServicer, server: Registrar) -> None:
    """Registers attrserve.v1.AttributionService (in place of the generated add_AttributionServiceServicer_to_server)."""
    server.add_registered_method_handlers(
        "attrserve.v1.AttributionService",
        {
            "Attribute": _unary(servicer.Attribute, pb.AttributeResponse),
            "AttributeStream": grpc.stream_stream_rpc_method_handler(
                servicer.AttributeStream,
                request_deserializer=None,
                response_serializer=pb.AttributeStreamResponse.SerializeToString,
            ),
            "ListModels": _unary(servicer.ListModels, pb.ListModelsResponse),
            "GetModel": _unary(servicer.GetModel, pb.GetModelResponse),
        },
    )


def add_model_repository_service(servicer: ModelRepositoryServicer, server: Registrar) -> None:
    """Registers attrserve.v1.ModelRepositoryService (in place of the generated add_ModelRepositoryServiceServicer_to_server)."""
    server.add_registered_method_handlers(
        "attrserve.v1.ModelRepositoryService",
        {
            "RepositoryIndex": _unary(servicer.RepositoryIndex, pb.RepositoryIndexResponse),
            "LoadModel": _unary(servicer.LoadModel, pb.LoadModelResponse),
            "UnloadModel": _unary(servicer.UnloadModel, pb.UnloadModelResponse),
        },
    )
