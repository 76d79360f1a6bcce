"""The one server interceptor: request ids, access logs, the auth guard and error mapping.

With a ``Guard``, every call first passes its method's access check
(``switchboard.platform.authn``), inside the same error mapping.
Every call gets a request id (the caller's ``x-request-id`` if well formed, else
a fresh one), returned in trailing metadata and in ``ErrorInfo.metadata``.
A ``SwitchboardError`` becomes its rich status. Anything else is a bug: it is
logged with the request id and the stack, and the client sees INTERNAL with a
generic message, never the exception text.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio

from switchboard.platform.authn import Checker, Guard
from switchboard.platform.db import DatabaseUnavailable, is_outage
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


def _request_id(context: aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _REQUEST_ID_RE.match(value):
            return value
    return os.urandom(16).hex()


class _Call:
    """Bookkeeping for one call: context vars, outcome, timing, access line.

    Written as explicit begin/fault/end steps rather than a context manager:
    this runs on every call, and a generator-based context manager costs more
    than everything else here together.
    """

    __slots__ = ("code", "context", "method", "peer", "request_id", "start", "tokens")

    def __init__(self, method: str, context: aio.ServicerContext[Any, Any]) -> None:
        self.method = method
        self.context = context
        # Read now, not in end(): after a client cancels, the transport frees the
        # peer string and context.peer() reads freed memory (the process can die
        # with SIGSEGV; grpc/grpc#29069).
        self.peer = context.peer()
        self.request_id = _request_id(context)
        self.code = grpc.StatusCode.OK
        self.start = time.perf_counter()
        self.tokens = (request_id_var.set(self.request_id), method_var.set(method))
        context.set_trailing_metadata(((REQUEST_ID_KEY, self.request_id),))

    def interrupted(self) -> None:
        """Cancelled, or aborted by the handler itself: record the code and let it go."""
        code = self.context.code()
        self.code = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.CANCELLED

    async def fail(self, exc: Exception) -> None:
        """Abort the call with the status ``exc`` maps to (raises AbortError)."""
        if isinstance(exc, SwitchboardError):
            error = exc
        elif is_outage(exc):
            # A raw database/network failure no store mapped: an outage, not a bug.
            error_log.warning("dependency unavailable: %s", type(exc).__name__)
            error = DatabaseUnavailable("a dependency is unavailable; retry")
        else:
            error_log.error("unhandled exception", exc_info=(type(exc), exc, exc.__traceback__))
            error = InternalError(GENERIC_INTERNAL_MESSAGE)
        status = to_grpc_status(error, self.request_id)
        self.code = status.code
        await self.context.abort(status.code, status.details, status.trailing_metadata)

    def end(self) -> None:
        level = logging.DEBUG if self.method.startswith(_QUIET_PREFIXES) else logging.INFO
        if log.isEnabledFor(level):
            log.log(
                level,
                "rpc finished",
                extra={
                    "code": self.code.name,
                    "duration_ms": round((time.perf_counter() - self.start) * 1000, 3),
                    "peer": self.peer,
                },
            )
        request_id_var.reset(self.tokens[0])
        method_var.reset(self.tokens[1])


def _wrap_unary_response(
    method: str, behavior: Behavior, check: Checker | None, streaming_request: bool
) -> Behavior:
    async def handler(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        call = _Call(method, context)
        try:
            if check is not None:
                await check(None if streaming_request else request, context)
            result = behavior(request, context)
            if inspect.isawaitable(result):
                result = await result
            return result
        except (asyncio.CancelledError, aio.AbortError):
            call.interrupted()
            raise
        except Exception as exc:  # noqa: BLE001 - the one place every fault is mapped
            await call.fail(exc)
        finally:
            call.end()

    return handler


def _wrap_stream_response(
    method: str, behavior: Behavior, check: Checker | None, streaming_request: bool
) -> Behavior:
    async def handler(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        call = _Call(method, context)
        try:
            if check is not None:
                await check(None if streaming_request else request, context)
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
        except (asyncio.CancelledError, aio.AbortError):
            call.interrupted()
            raise
        except Exception as exc:  # noqa: BLE001 - the one place every fault is mapped
            await call.fail(exc)
        finally:
            call.end()

    return handler


def _wrap(method: str, handler: Handler, check: Checker | None) -> Handler:
    common = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _wrap_unary_response(method, handler.unary_unary, check, False),
            **common,
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _wrap_unary_response(method, handler.stream_unary, check, True),
            **common,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _wrap_stream_response(method, handler.unary_stream, check, False),
            **common,
        )
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            _wrap_stream_response(method, handler.stream_stream, check, True),
            **common,
        )
    return handler


class ErrorInterceptor(_InterceptorBase):
    """Wraps every handler with request-id, access-log and error-mapping logic.

    The wrapped handler of each method is built once and reused: everything
    per call (request id, timing) happens inside it, so intercepting a call is
    a dictionary lookup. The cache holds at most one entry per registered method.
    Consequence for any interceptor placed after this one: it is consulted once
    per method, not once per call, so per-call work (authentication, say) must
    live in the handler it returns, as it does here.
    """

    def __init__(self, guard: Guard | None = None) -> None:
        self._wrapped: dict[str, Handler] = {}
        self._guard = guard

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler: Handler | None = await continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED itself
            return handler  # type: ignore[return-value]
        check = self._guard.checker(method) if self._guard is not None else None
        wrapped = self._wrapped[method] = _wrap(method, handler, check)
        return wrapped
