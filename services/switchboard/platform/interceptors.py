"""The one server interceptor: request ids, access logs and error mapping.

Every call gets a request id (the caller's ``x-request-id`` if well formed, else
a fresh one), returned in trailing metadata and in ``ErrorInfo.metadata``.
A ``SwitchboardError`` becomes its rich status. Anything else is a bug: it is
logged with the request id and the stack, and the client sees INTERNAL with a
generic message, never the exception text.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio

from switchboard.platform.errors import InternalError, SwitchboardError
from switchboard.platform.logging import method_var, request_id_var
from switchboard.platform.status import REQUEST_ID_KEY, to_grpc_status

log = logging.getLogger("switchboard.access")
error_log = logging.getLogger("switchboard.errors")

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
# Probes and reflection are chatty; their access lines go to DEBUG.
_QUIET_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
GENERIC_INTERNAL_MESSAGE = "internal error; quote the request id when reporting it"

Behavior = Callable[..., Any]

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    _InterceptorBase = aio.ServerInterceptor[Any, Any]
else:  # the runtime classes are not subscriptable
    Handler = grpc.RpcMethodHandler
    _InterceptorBase = aio.ServerInterceptor


def _request_id(details: grpc.HandlerCallDetails) -> str:
    for key, value in details.invocation_metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _REQUEST_ID_RE.match(value):
            return value
    return uuid.uuid4().hex


class _Call:
    """Bookkeeping for one call: context vars, outcome, timing, access line."""

    def __init__(self, method: str, request_id: str) -> None:
        self.method = method
        self.request_id = request_id
        self.code = grpc.StatusCode.OK
        self.start = time.perf_counter()

    @contextlib.asynccontextmanager
    async def guard(self, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
        """Run the handler body with the request id bound, and map what escapes it."""
        tokens = (request_id_var.set(self.request_id), method_var.set(self.method))
        try:
            context.set_trailing_metadata(((REQUEST_ID_KEY, self.request_id),))
            yield
        except (asyncio.CancelledError, aio.AbortError):
            self.code = context.code() if _has_code(context) else grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:  # noqa: BLE001 - the one place every fault is mapped
            await self._fail(context, exc)
        finally:
            self._log(context)
            request_id_var.reset(tokens[0])
            method_var.reset(tokens[1])

    def _log(self, context: aio.ServicerContext[Any, Any]) -> None:
        level = logging.DEBUG if self.method.startswith(_QUIET_PREFIXES) else logging.INFO
        if log.isEnabledFor(level):
            log.log(
                level,
                "rpc finished",
                extra={
                    "code": self.code.name,
                    "duration_ms": round((time.perf_counter() - self.start) * 1000, 3),
                    "peer": context.peer(),
                },
            )

    async def _fail(self, context: aio.ServicerContext[Any, Any], exc: Exception) -> None:
        if isinstance(exc, SwitchboardError):
            error = exc
        else:
            error_log.error("unhandled exception", exc_info=(type(exc), exc, exc.__traceback__))
            error = InternalError(GENERIC_INTERNAL_MESSAGE)
        status = to_grpc_status(error, self.request_id)
        self.code = status.code
        await context.abort(status.code, status.details, status.trailing_metadata)


def _wrap_unary_response(method: str, request_id: str, behavior: Behavior) -> Behavior:
    async def handler(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        async with _Call(method, request_id).guard(context):
            result = behavior(request, context)
            if inspect.isawaitable(result):
                result = await result
            return result

    return handler


def _wrap_stream_response(method: str, request_id: str, behavior: Behavior) -> Behavior:
    async def handler(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        async with _Call(method, request_id).guard(context):
            result = behavior(request, context)
            if inspect.isasyncgen(result):
                async for item in result:
                    yield item
            elif inspect.isawaitable(result):
                # context.write style handler: it writes itself and returns None.
                await result
            else:
                for item in result:
                    yield item

    return handler


def _has_code(context: aio.ServicerContext[Any, Any]) -> bool:
    code = context.code()
    return isinstance(code, grpc.StatusCode)


class ErrorInterceptor(_InterceptorBase):
    """Wraps every handler with request-id, access-log and error-mapping logic."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler: Handler | None = await continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED itself
            return handler  # type: ignore[return-value]
        method = handler_call_details.method
        request_id = _request_id(handler_call_details)
        common = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary_response(method, request_id, handler.unary_unary), **common
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary_response(method, request_id, handler.stream_unary), **common
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream_response(method, request_id, handler.unary_stream), **common
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream_response(method, request_id, handler.stream_stream), **common
            )
        return handler
