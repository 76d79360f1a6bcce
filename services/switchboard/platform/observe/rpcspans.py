"""The SERVER span of each call: a small aio interceptor on the OpenTelemetry API.

It replaces ``opentelemetry-instrumentation-grpc``'s aio server interceptor
(docs/decisions.md, 33). That one makes the span current with ``attach`` and
``detach`` around the handler's async generator. When a client goes away
while the server is sending, grpc leaves the generator at a ``yield`` and
Python finalizes it later, in a task of its own, whose context did not make
the tokens: each such call logged "Failed to detach context" twice, and its
span ended only when the generator was collected, saying OK. It also
iterates whatever a streaming handler returns, so a ``context.write``-style
handler (health's ``Watch``) fails under it.

Here:

- the span is made current once, when the call starts, and never detached:
  grpc runs every call in a task of its own, so the value dies with the
  call's context (as the request id does, ``platform/rpc/interceptors.py``);
- the span ends once, when the handler returns or raises in the call's task
  or, for a stream grpc abandons, when grpc reports the call done
  (``context.add_done_callback``);
- ``rpc.grpc.status_code`` is the code the client sees: the code the
  handler aborted with or set, CANCELLED when the client went away, OK
  otherwise. The span's status is ERROR only for the codes the conventions
  call server errors; a client's fault (INVALID_ARGUMENT, NOT_FOUND,
  UNAUTHENTICATED, ...) leaves it unset.

The attributes are the semantic conventions' (``rpc.system``,
``rpc.service``, ``rpc.method``, ``rpc.grpc.status_code``, the peer's
``net.peer.ip`` and ``net.peer.port``), as the library set them. The span is
named after the full method (``/package.Service/Method``).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import grpc
from grpc import aio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    _InterceptorBase = aio.ServerInterceptor[Any, Any]
else:  # the runtime classes are not subscriptable
    Handler = grpc.RpcMethodHandler
    _InterceptorBase = aio.ServerInterceptor

Behavior = Callable[..., Any]
Context = aio.ServicerContext[Any, Any]

#: Codes that are the server's error, not the client's (OpenTelemetry's gRPC conventions).
SERVER_ERRORS: Final = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
_BY_VALUE: Final = {code.value[0]: code for code in grpc.StatusCode}
#: How a call ends that is not a fault to record on the span.
_EXPECTED: Final = (aio.AbortError, asyncio.CancelledError, GeneratorExit)


def _peer(peer: str) -> dict[str, AttributeValue]:
    """``net.peer.ip`` and ``net.peer.port`` of ``ipv4:1.2.3.4:5`` or ``ipv6:[::1]:5``."""
    kind, _, address = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return {}
    host, _, port = address.split(",")[0].rpartition(":")
    if not host or not port:
        return {}
    return {"net.peer.ip": host, "net.peer.port": port}


def _code(context: Context, error: BaseException | None) -> grpc.StatusCode:
    """The status the client sees, as far as the server knows it.

    ``error`` is what ended the handler: ``CancelledError`` (the call's task
    was cancelled) and ``GeneratorExit`` (grpc abandoned the stream) mean the
    client went away, unless the handler had already set or aborted with a code.
    """
    code: Any = context.code()
    if isinstance(code, grpc.StatusCode):
        found = code
    elif isinstance(code, int):
        found = _BY_VALUE.get(code, grpc.StatusCode.UNKNOWN)
    else:
        found = grpc.StatusCode.OK
    if found != grpc.StatusCode.OK or error is None or isinstance(error, aio.AbortError):
        return found
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)) or context.cancelled():
        return grpc.StatusCode.CANCELLED
    # An exception nobody mapped: grpc answers UNKNOWN.
    return grpc.StatusCode.UNKNOWN


class _CallSpan:
    """One call's span: started and made current in the call's task, ended once."""

    __slots__ = ("ended", "span")

    def __init__(self, tracer: trace.Tracer, method: str, context: Context) -> None:
        carrier = {
            key: value
            for key, value in context.invocation_metadata() or ()
            if isinstance(value, str)
        }
        parent = extract(carrier, context=otel_context.Context())
        service, _, name = method.lstrip("/").partition("/")
        attributes: dict[str, AttributeValue] = {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": name,
            "rpc.grpc.status_code": grpc.StatusCode.OK.value[0],
            # Read now: after a client cancels, the transport frees the peer
            # string (grpc/grpc#29069, platform/rpc/interceptors.py).
            **_peer(context.peer()),
        }
        if "user-agent" in carrier:
            attributes["rpc.user_agent"] = carrier["user-agent"]
        self.span = tracer.start_span(
            method, context=parent, kind=SpanKind.SERVER, attributes=attributes
        )
        self.ended = False
        # Never detached: the value dies with the call's task (see the module doc).
        otel_context.attach(trace.set_span_in_context(self.span, parent))

    def end(self, code: grpc.StatusCode, error: BaseException | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        span = self.span
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if error is not None and not isinstance(error, _EXPECTED):
            span.record_exception(error)
        if code in SERVER_ERRORS:
            span.set_status(Status(StatusCode.ERROR, f"{code.name}"))
        span.end()


def _unary(tracer: trace.Tracer, method: str, behavior: Behavior) -> Behavior:
    async def handler(request: Any, context: Context) -> Any:
        call = _CallSpan(tracer, method, context)
        error: BaseException | None = None
        try:
            result = behavior(request, context)
            if inspect.isawaitable(result):
                result = await result
            return result
        except BaseException as exc:
            error = exc
            raise
        finally:
            call.end(_code(context, error), error)

    return handler


def _stream(tracer: trace.Tracer, method: str, behavior: Behavior) -> Behavior:
    async def handler(request: Any, context: Context) -> AsyncIterator[Any]:
        call = _CallSpan(tracer, method, context)
        # A stream grpc abandons at a ``yield`` (the client left mid-send) is
        # finalized later, elsewhere: its span ends when the call is done.
        # grpc says neither cancelled() nor a code then: an unfinished stream
        # at the call's end is one whose client went away.
        # (grpc-stubs declares the callback as a class, not a callable type.)
        on_done: Any = lambda done: call.end(_code(done, GeneratorExit()))  # noqa: E731
        context.add_done_callback(on_done)
        error: BaseException | None = None
        try:
            result = behavior(request, context)
            if inspect.isasyncgen(result):
                try:
                    async for item in result:
                        yield item
                finally:
                    await result.aclose()
            elif inspect.isawaitable(result):
                await result  # context.write style: it writes itself
            else:
                for item in result:
                    yield item
        except BaseException as exc:
            error = exc
            raise
        finally:
            call.end(_code(context, error), error)

    return handler


class ServerSpans(_InterceptorBase):
    """A SERVER span per call, the caller's trace context its parent.

    Calls for which ``traced(method)`` is false get no span (health's). The
    wrapped handler of each method is built once: everything per call
    happens inside it.
    """

    def __init__(self, tracer: trace.Tracer, traced: Callable[[str], bool]) -> None:
        self._tracer = tracer
        self._traced = traced
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        method: Any = handler_call_details.method
        if isinstance(method, bytes):  # grpc/grpc#31092
            method = method.decode()
        handler: Handler | None = await continuation(handler_call_details)
        if handler is None or not self._traced(method):
            return handler  # type: ignore[return-value]
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _wrap(self._tracer, method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped


def _wrap(tracer: trace.Tracer, method: str, handler: Handler) -> Handler:
    common: dict[str, Any] = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _unary(tracer, method, handler.unary_unary), **common
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _unary(tracer, method, handler.stream_unary), **common
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _stream(tracer, method, handler.unary_stream), **common
        )
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            _stream(tracer, method, handler.stream_stream), **common
        )
    return handler
