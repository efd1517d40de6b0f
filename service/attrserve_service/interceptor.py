"""The one place exceptions become gRPC statuses, and where the standard grpc_server_* metrics are recorded."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import grpc

from attrserve_service import metrics
from attrserve_service.logs import REQUEST_ID
from attrserve_service.servicer import RPC_WINDOW, deadline_passed, grpc_status

log = logging.getLogger(__name__)

# Trailing metadata with the milliseconds after which a refused call may be retried (gRPC's retry design A6).
RETRY_PUSHBACK = "grpc-retry-pushback-ms"


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


@contextlib.asynccontextmanager
async def _handled(grpc_type: str, full_method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """Counts the RPC and times it; turns an escaping exception into the status it stands for."""
    service, method = _split(full_method)
    labels = (grpc_type, service, method)
    RPC_WINDOW.set(context.time_remaining())  # this RPC's task (and the tasks it starts): what deadline_passed measures against
    metrics.GRPC_SERVER_STARTED_TOTAL.labels(*labels).inc()
    start = time.monotonic()
    code = grpc.StatusCode.OK
    try:
        yield
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:  # answered after its deadline: the client got DEADLINE_EXCEEDED
            code = grpc.StatusCode.DEADLINE_EXCEEDED
    except grpc.aio.AbortError:  # the handler set its own status
        code = context.code() or grpc.StatusCode.UNKNOWN
        raise
    except asyncio.CancelledError:  # grpc cancels the handler when the deadline passes or the client leaves
        code = grpc.StatusCode.DEADLINE_EXCEEDED if deadline_passed(context) else grpc.StatusCode.CANCELLED
        raise
    except Exception as e:
        code, message = grpc_status(e)
        if (retry := getattr(e, "retry_after_s", None)) is not None:  # admission's hint, honoured by gRPC retry policies
            context.set_trailing_metadata(((RETRY_PUSHBACK, str(round(retry * 1e3))),))
        # INTERNAL: a fixed message with an error id; grpc_status has logged the exception (once) under that id.
        await context.abort(code, message)
    finally:
        metrics.GRPC_SERVER_HANDLED_TOTAL.labels(*labels, code.name).inc()
        metrics.GRPC_SERVER_HANDLING_SECONDS.labels(*labels).observe(time.monotonic() - start)


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Wraps unary and bidi handlers: AttributionError → its status code with its message; anything else → INTERNAL."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        # grpc's stubs type method handlers for the sync server; under grpc.aio they are coroutine functions
        # (async generators for streams) that take an aio context, hence the casts.
        handler = await continuation(details)
        if handler is None:
            return handler
        if handler.unary_unary is not None:
            behavior = cast("Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]", handler.unary_unary)

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                # This RPC's task only: its log lines carry it. Our methods get raw bytes (servicer.add_attribution_service,
                # so that a request that does not parse is an INVALID_ARGUMENT counted below): the servicer sets it once parsed.
                REQUEST_ID.set(getattr(request, "request_id", ""))
                async with _handled("unary", details.method, context):
                    return await behavior(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
            )
        if handler.stream_stream is not None:
            stream = cast("Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]", handler.stream_stream)

            async def bidi(request_iterator: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async with _handled("bidi_stream", details.method, context):
                    async for response in stream(request_iterator, context):
                        yield response

            return grpc.stream_stream_rpc_method_handler(
                bidi, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
            )
        return handler
