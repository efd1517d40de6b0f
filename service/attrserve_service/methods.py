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
from attrserve_service.servicer import RPC_WINDOW, deadline_passed, grpc_status, retry_after_ms

log = logging.getLogger(__name__)

# Trailing metadata with the milliseconds after which a refused call may be retried (gRPC's retry design A6; -1 for a
# refusal that the same request meets every time, "do not retry", which gRPC's own retry policies and attrserve's
# clients honour: servicer.retry_after_ms).
RETRY_PUSHBACK = "grpc-retry-pushback-ms"

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic in grpc's stubs only


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
    """`async with _Call(method, context) as allowed:` around a call's handler: checks its token, counts and times it,
    and answers an escaping exception with the status it stands for. A class, not a generator-based context manager:
    it runs on every call.

    A status is set on the context and the handler then ends without raising (__aexit__ swallows the exception), never
    by `context.abort`: abort raises grpc's AbortError and keeps it on the call's state, which its traceback's frames
    hold, a reference cycle through every frame of the failed call. The collector, which runs rarely here
    (core.settle_heap), then kept each failed request's message, its parse and its arrays: 1.75 MiB for a refused
    588 KiB request, ~800 MiB after 500 refusals (bench/RESULTS.md, issue 12 step 41). grpc sends the status set on
    the context when the handler returns, and no answer."""

    __slots__ = ("context", "method", "refused", "start")

    def __init__(self, method: _Method, context: grpc.aio.ServicerContext) -> None:
        self.method = method
        self.context = context
        self.refused: grpc.StatusCode | None = None

    async def __aenter__(self) -> bool:
        """Whether the handler may run: False for a call without a token it may use (UNAUTHENTICATED,
        PERMISSION_DENIED), whose refusal is then its status."""
        # This RPC's task only: its log lines carry it. Our methods get raw bytes (servicer._unary, so that a request that
        # does not parse is an INVALID_ARGUMENT counted here): the servicer sets it once parsed.
        REQUEST_ID.set("")
        context = self.context
        RPC_WINDOW.set(context.time_remaining())  # this RPC's task (and the tasks it starts): what deadline_passed measures against
        self.method.started.inc()
        self.start = time.monotonic()
        if self.method.auth is not None:
            refused = self.method.auth.check(self.method.path, context.invocation_metadata())
            if refused is not None:
                log.info("refused %s: %s (%s)", self.method.path, refused[0].name, refused[1])
                self.refused = refused[0]
                context.set_code(refused[0])
                context.set_details(refused[1])
                return False
        return True

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None, _tb: TracebackType | None) -> bool:
        context = self.context
        code = self.refused or grpc.StatusCode.OK
        try:
            if error is None:
                remaining = context.time_remaining()
                if code == grpc.StatusCode.OK and remaining is not None and remaining <= 0:
                    code = grpc.StatusCode.DEADLINE_EXCEEDED  # answered after its deadline: the client got DEADLINE_EXCEEDED
            elif isinstance(error, grpc.aio.AbortError):  # a handler that called context.abort (health's, reflection's)
                code = context.code() or grpc.StatusCode.UNKNOWN
            elif isinstance(error, asyncio.CancelledError):  # grpc cancels the handler when the deadline passes or the client leaves
                code = grpc.StatusCode.DEADLINE_EXCEEDED if deadline_passed(context) else grpc.StatusCode.CANCELLED
            elif isinstance(error, Exception):
                code, message = grpc_status(error)
                remaining = context.time_remaining()
                if remaining is not None and remaining <= 0:
                    # The deadline passed as the answer came (the engine's DEADLINE_EXCEEDED, say): gRPC has ended the
                    # call with DEADLINE_EXCEEDED, and no status can be sent. The handler ends as grpc ends one whose
                    # deadline passed: cancelled.
                    code = grpc.StatusCode.DEADLINE_EXCEEDED
                    raise asyncio.CancelledError from None
                if (hint := retry_after_ms(error)) is not None:  # admission's, or -1 for a limit per request
                    context.set_trailing_metadata(((RETRY_PUSHBACK, str(hint)),))
                # INTERNAL: a fixed message with an error id; grpc_status has logged the exception (once) under that id.
                context.set_code(code)
                context.set_details(message)
                return True
            return False
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
            async with _Call(method, context) as allowed:
                if allowed:
                    async for response in behavior(request, context):
                        yield response

        return streamed

    async def awaited(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with _Call(method, context) as allowed:
            if allowed:
                return await behavior(request, context)
        return None  # its status is set on the context (_Call)

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
