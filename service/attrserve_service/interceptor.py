"""The one place exceptions become gRPC statuses, and where the standard grpc_server_* metrics are recorded."""

from __future__ import annotations

import logging
import time
from typing import Any, Awaitable, Callable

import grpc

from attrserve_service import metrics
from attrserve_service.servicer import grpc_status

log = logging.getLogger(__name__)


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler: AttributionError → its status code with its message; anything else → INTERNAL."""

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        service, method = _split(details.method)
        if handler.unary_unary is not None:
            behavior = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                labels = ("unary", service, method)
                metrics.GRPC_SERVER_STARTED_TOTAL.labels(*labels).inc()
                start = time.monotonic()
                code = grpc.StatusCode.OK
                try:
                    return await behavior(request, context)
                except grpc.aio.AbortError:  # the handler set its own status
                    code = context.code() or grpc.StatusCode.UNKNOWN  # type: ignore[assignment]
                    raise
                except Exception as e:  # noqa: BLE001
                    code, message = grpc_status(e)
                    if code is grpc.StatusCode.INTERNAL:
                        log.exception("%s failed", details.method)
                    await context.abort(code, message)
                finally:
                    metrics.GRPC_SERVER_HANDLED_TOTAL.labels(*labels, code.name).inc()
                    metrics.GRPC_SERVER_HANDLING_SECONDS.labels(*labels).observe(time.monotonic() - start)

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
            )
        if handler.stream_stream is not None:
            stream = handler.stream_stream

            async def bidi(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
                labels = ("bidi_stream", service, method)
                metrics.GRPC_SERVER_STARTED_TOTAL.labels(*labels).inc()
                start = time.monotonic()
                code = grpc.StatusCode.OK
                try:
                    async for response in stream(request_iterator, context):
                        yield response
                except grpc.aio.AbortError:
                    code = context.code() or grpc.StatusCode.UNKNOWN  # type: ignore[assignment]
                    raise
                except Exception as e:  # noqa: BLE001
                    code, message = grpc_status(e)
                    await context.abort(code, message)
                finally:
                    metrics.GRPC_SERVER_HANDLED_TOTAL.labels(*labels, code.name).inc()
                    metrics.GRPC_SERVER_HANDLING_SECONDS.labels(*labels).observe(time.monotonic() - start)

            return grpc.stream_stream_rpc_method_handler(
                bidi, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
            )
        return handler
