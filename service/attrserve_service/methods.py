"""What every call of the server runs around its method: the bearer-token check (auth on), the status an exception
stands for (the one place exceptions become gRPC statuses), and the standard grpc_server_* metrics.

Each method's handler is wrapped once, where its service is registered (`Registrar`), not per call by a
grpc.aio.ServerInterceptor: grpc runs interceptors as a chain of coroutines on every call, each building the wrapped
handler anew, and that was a tenth of the front end's CPU a request at 32 callers (bench/RESULTS.md, issue 12 step 33).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from types import TracebackType
from typing import Any, TypeAlias

import grpc

from attrserve_service import metrics
from attrserve_service.auth import TokenAuth
from attrserve_service.logs import REQUEST_ID
from attrserve_service.servicer import RPC_WINDOW, deadline_passed, grpc_status

log = logging.getLogger(__name__)

# Trailing metadata with the milliseconds after which a refused call may be retried (gRPC's retry design A6).
RETRY_PUSHBACK = "grpc-retry-pushback-ms"

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic in grpc's stubs only


async def _refuse_unless_allowed(auth: TokenAuth, path: str, context: grpc.aio.ServicerContext) -> None:
    """Aborts the call (UNAUTHENTICATED, PERMISSION_DENIED) unless its metadata carries a token it may use."""
    refused = auth.check(path, context.invocation_metadata())
    if refused is not None:
        log.info("refused %s: %s (%s)", path, refused[0].name, refused[1])
        await context.abort(*refused)


class _Method:
    """A method: its grpc_server_* series (made once) and its token check."""

    def __init__(self, grpc_type: str, service: str, name: str, auth: TokenAuth | None) -> None:
        self.path = f"/{service}/{name}"
        self.labels = (grpc_type, service, name)
        self.started = metrics.child(metrics.GRPC_SERVER_STARTED_TOTAL, *self.labels)
        self.handling = metrics.child(metrics.GRPC_SERVER_HANDLING_SECONDS, *self.labels)
        # the token check its calls need; None where auth is off or the service is exempt (health, by default)
        self.auth = None if auth is None or service in auth.exempt_services else auth


class _Call:
    """`async with _Call(method, context)` around a call's handler: checks its token, counts and times it, and
    turns an escaping exception into the status it stands for. A class, not a generator-based context manager: it
    runs on every call."""

    __slots__ = ("context", "method", "start")

    def __init__(self, method: _Method, context: grpc.aio.ServicerContext) -> None:
        self.method = method
        self.context = context

    async def __aenter__(self) -> None:
        # This RPC's task only: its log lines carry it. Our methods get raw bytes (servicer._unary, so that a request that
        # does not parse is an INVALID_ARGUMENT counted here): the servicer sets it once parsed.
        REQUEST_ID.set("")
        RPC_WINDOW.set(self.context.time_remaining())  # this RPC's task (and the tasks it starts): what deadline_passed measures against
        self.method.started.inc()
        self.start = time.monotonic()
        if self.method.auth is not None:
            try:
                await _refuse_unless_allowed(self.method.auth, self.method.path, self.context)
            except BaseException as refused:  # counted with its status, as any other end of the call
                await self.__aexit__(type(refused), refused, None)
                raise

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None, _tb: TracebackType | None) -> None:
        context = self.context
        code = grpc.StatusCode.OK
        try:
            if error is None:
                remaining = context.time_remaining()
                if remaining is not None and remaining <= 0:  # answered after its deadline: the client got DEADLINE_EXCEEDED
                    code = grpc.StatusCode.DEADLINE_EXCEEDED
            elif isinstance(error, grpc.aio.AbortError):  # the handler (or the token check) set its own status
                code = context.code() or grpc.StatusCode.UNKNOWN
            elif isinstance(error, asyncio.CancelledError):  # grpc cancels the handler when the deadline passes or the client leaves
                code = grpc.StatusCode.DEADLINE_EXCEEDED if deadline_passed(context) else grpc.StatusCode.CANCELLED
            elif isinstance(error, Exception):
                code, message = grpc_status(error)
                if (retry := getattr(error, "retry_after_s", None)) is not None:  # admission's hint, honoured by gRPC retry policies
                    context.set_trailing_metadata(((RETRY_PUSHBACK, str(round(retry * 1e3))),))
                # INTERNAL: a fixed message with an error id; grpc_status has logged the exception (once) under that id.
                try:
                    await context.abort(code, message)
                except grpc.aio.AbortError:
                    raise
                except Exception:
                    remaining = context.time_remaining()
                    if remaining is None or remaining > 0:
                        raise
                    # The deadline passed as the answer came (the engine's DEADLINE_EXCEEDED, say): gRPC has ended the
                    # call with DEADLINE_EXCEEDED, so no status can be sent, and grpc would log the failed send with a
                    # traceback. The handler ends as grpc ends one whose deadline passed: cancelled.
                    code = grpc.StatusCode.DEADLINE_EXCEEDED
                    raise asyncio.CancelledError from None
        finally:
            method = self.method
            metrics.child(metrics.GRPC_SERVER_HANDLED_TOTAL, *method.labels, code.name).inc()
            method.handling.observe(time.monotonic() - self.start)


def _inside(behavior: Callable[..., Any], method: _Method) -> Callable[..., Any]:
    """`behavior` run inside `_Call(method, context)`. Under grpc.aio a handler is a coroutine function, or, where it
    streams its answers, an async generator function or a coroutine function that writes them (health's Watch); the
    wrapper is of the same kind."""
    if inspect.isasyncgenfunction(behavior):

        async def streamed(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with _Call(method, context):
                async for response in behavior(request, context):
                    yield response

        return streamed

    async def awaited(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with _Call(method, context):
            return await behavior(request, context)

    return awaited


_KINDS = (  # a handler's attribute, its grpc_type label, the constructor of its kind
    ("unary_unary", "unary", grpc.unary_unary_rpc_method_handler),
    ("unary_stream", "server_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_unary", "client_stream", grpc.stream_unary_rpc_method_handler),
    ("stream_stream", "bidi_stream", grpc.stream_stream_rpc_method_handler),
)


def wrap(service: str, name: str, handler: Handler, auth: TokenAuth | None) -> Handler:
    """`handler` with what every call runs around it (`_Call`), whatever its kind."""
    attribute, grpc_type, kind = next(k for k in _KINDS if getattr(handler, k[0]) is not None)
    wrapped = _inside(getattr(handler, attribute), _Method(grpc_type, service, name, auth))
    return kind(wrapped, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


class Registrar:
    """Registers services on `server` with every method wrapped (`wrap`). It stands in for the server wherever a
    service's add_*_to_server function takes one: ours (servicer.py, oip.py), health's and reflection's generated ones.
    Those register each service twice, as its methods and as a generic handler of the same methods; calls use the
    methods (grpc matches a registered method first), so the registrar registers those and leaves the generic
    handlers out: no call runs a method unwrapped."""

    def __init__(self, server: grpc.aio.Server, auth: TokenAuth | None) -> None:
        self.server = server
        self.auth = auth

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Handler]) -> None:
        self.server.add_registered_method_handlers(service, {name: wrap(service, name, h, self.auth) for name, h in handlers.items()})

    def add_generic_rpc_handlers(self, generic_handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        """Left out (see the class): a service registered only this way would not be served, which its tests see."""
