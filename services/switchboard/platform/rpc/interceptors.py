"""The one server interceptor: request ids, access logs, the auth guard and error mapping.

With a ``Guard``, every call first passes its method's access check
(``switchboard.platform.security.authn``), inside the same error mapping.
Every call gets a request id (the caller's ``x-request-id`` if well formed, else
a fresh one), returned in trailing metadata and in ``ErrorInfo.metadata``.
A ``SwitchboardError`` becomes its rich status. Anything else is a bug: it is
logged with the request id and the stack, and the client sees INTERNAL with a
generic message, never the exception text.

Request bodies are decoded here too, never by grpc: a body that does not parse
(any method, health and reflection included; any message of a client stream)
ends the call with INVALID_ARGUMENT and a generic message. Such bodies are the
client's fault and cost nothing to send, so they are logged at most once per
interval, with a count of the ones left out, and never with a traceback.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import grpc
from grpc import aio

from switchboard.platform.errors import (
    InternalError,
    InvalidArgument,
    NotImplementedYet,
    SwitchboardError,
)
from switchboard.platform.observe.logging import method_var, request_id_var
from switchboard.platform.observe.metrics import Metrics, RpcMetrics
from switchboard.platform.resilience.inflight import CALLS
from switchboard.platform.rpc.outbound.peers import call_failure
from switchboard.platform.rpc.status import REQUEST_ID_KEY, to_grpc_status
from switchboard.platform.security.authn import Checker, Guard
from switchboard.platform.store.db import DatabaseUnavailable, is_outage
from switchboard.platform.values import names
from switchboard.platform.values.names import new_id

log = logging.getLogger("switchboard.access")
error_log = logging.getLogger("switchboard.errors")

_REQUEST_ID_RE = names.CLIENT_LABEL
# Probes and reflection are chatty; their access lines go to DEBUG.
_QUIET_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
GENERIC_INTERNAL_MESSAGE = "internal error; quote the request id when reporting it"
#: At most one "malformed request" log line per this many seconds.
MALFORMED_LOG_INTERVAL_S = 10.0

Behavior = Callable[..., Any]

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    _InterceptorBase = aio.ServerInterceptor[Any, Any]
else:  # the runtime classes are not subscriptable
    Handler = grpc.RpcMethodHandler
    _InterceptorBase = aio.ServerInterceptor


def _request_id(context: aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _REQUEST_ID_RE.fullmatch(value):
            return value
    return new_id()


class _Undecodable:
    """What a request deserializer returns for a body that does not parse."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<undecodable request>"


UNDECODABLE: Final = _Undecodable()


def tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserializer`` that returns ``UNDECODABLE`` instead of raising.

    grpc turns a deserializer's exception into UNKNOWN with the exception's
    text and logs its traceback; returning a marker instead lets the handler
    answer INVALID_ARGUMENT itself.
    """
    if deserializer is None:  # raw bytes: nothing to decode
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # noqa: BLE001 - whatever a body makes the parser raise is the body's fault
            return UNDECODABLE

    return deserialize


def message_name(deserializer: Callable[[bytes], Any] | None) -> str:
    """The full name of the message ``deserializer`` (a ``FromString``) builds."""
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", None)
    return name if isinstance(name, str) else "request message"


class MalformedLog:
    """At most one log line per interval about undecodable requests.

    An anonymous client can send garbage as fast as the network allows; the
    line says how many were left out since the last one instead.
    """

    def __init__(
        self,
        interval_s: float = MALFORMED_LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._quiet_until = -math.inf
        self._suppressed = 0

    def record(self, method: str, peer: str) -> None:
        now = self._clock()
        if now < self._quiet_until:
            self._suppressed += 1
            return
        log.warning(
            "malformed request body",
            extra={"method": method, "peer": peer, "suppressed": self._suppressed},
        )
        self._suppressed = 0
        self._quiet_until = now + self._interval_s


class _Malformed:
    """How one method refuses an undecodable body."""

    __slots__ = ("log", "message", "method")

    def __init__(self, method: str, deserializer: Callable[[bytes], Any] | None, log: MalformedLog):
        self.method = method
        self.log = log
        self.message = f"the request body is not a valid {message_name(deserializer)}"


class _Call:
    """Bookkeeping for one call: context vars, outcome, timing, access line.

    Written as explicit begin/fault/end steps rather than a context manager:
    this runs on every call, and a generator-based context manager costs more
    than everything else here together.
    """

    __slots__ = (
        "code",
        "context",
        "inside",
        "malformed",
        "method",
        "peer",
        "request_id",
        "rpc",
        "start",
        "stopped",
        "task",
    )

    def __init__(
        self, method: str, context: aio.ServicerContext[Any, Any], rpc: RpcMetrics | None
    ) -> None:
        self.method = method
        self.context = context
        self.rpc = rpc
        if rpc is not None:
            rpc.in_flight.inc()
        # Read now, not in end(): after a client cancels, the transport frees the
        # peer string and context.peer() reads freed memory (the process can die
        # with SIGSEGV; grpc/grpc#29069).
        self.peer = context.peer()
        self.request_id = _request_id(context)
        self.code = grpc.StatusCode.OK
        self.start = time.perf_counter()
        # Set, never reset: grpc runs every call in a task of its own, so these
        # values die with the call's context. Resetting them would fail when a
        # cancelled stream's generator is finalized later in another context.
        request_id_var.set(self.request_id)
        method_var.set(method)
        #: The refusal of an undecodable client-stream message, once one came.
        self.malformed: InvalidArgument | None = None
        #: Whether the call's task is awaiting the servicer (so it may be cancelled).
        self.inside = False
        self.stopped = False
        self.task: asyncio.Task[Any] | None = None
        context.set_trailing_metadata(((REQUEST_ID_KEY, self.request_id),))

    def begin(self, request: Any, streaming_request: bool, how: _Malformed) -> Any:
        """The request the servicer gets; raises the refusal of an undecodable body."""
        if streaming_request:
            self.task = asyncio.current_task()
            return _Requests(request, self, how)
        if request is UNDECODABLE:
            raise self.refuse(how)
        return request

    def raise_if_refused(self) -> None:
        if self.malformed is not None:
            raise self.malformed

    def refuse(self, how: _Malformed) -> InvalidArgument:
        """The error for an undecodable body; logged at most once per interval."""
        if self.malformed is None:
            how.log.record(self.method, self.peer)
            self.malformed = InvalidArgument(how.message)
            # A servicer reading its requests in a task of its own may not end
            # the call when that task fails: stop the call's task so the
            # refusal becomes the call's status now.
            task = self.task
            if self.inside and task is not None and task is not asyncio.current_task():
                self.stopped = True
                task.cancel()
        return self.malformed

    def stopped_by_refusal(self) -> bool:
        """Whether a cancellation is our own (``refuse``); if so it is taken back."""
        if not self.stopped:
            return False
        self.stopped = False
        if self.task is not None:
            self.task.uncancel()
        return True

    def interrupted(self) -> None:
        """Cancelled, or aborted by the handler itself: record the code and let it go."""
        code = self.context.code()
        self.code = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.CANCELLED

    async def fail(self, exc: Exception) -> None:
        """Abort the call with the status ``exc`` maps to (raises AbortError)."""
        if isinstance(exc, SwitchboardError):
            error = exc
        elif isinstance(exc, NotImplementedError):
            # What a generated servicer base (or a library's, like health's
            # List) does for a method nobody wrote: UNIMPLEMENTED, not a bug.
            error = NotImplementedYet(f"{self.method} is not implemented by this server")
        elif is_outage(exc):
            # A raw database/network failure no store mapped: an outage, not a bug.
            error_log.warning("dependency unavailable: %s", type(exc).__name__)
            error = DatabaseUnavailable("a dependency is unavailable; retry")
        elif (failed := call_failure(exc, peer="a service this one calls")) is not None:
            # A call to another process that no port mapped: its status by its reason
            # (that process gone, or its channel closed: UNAVAILABLE), never INTERNAL.
            error_log.warning("a call to another process failed: %s", type(exc).__name__)
            error = failed
        else:
            error_log.error("unhandled exception", exc_info=(type(exc), exc, exc.__traceback__))
            error = InternalError(GENERIC_INTERNAL_MESSAGE)
        status = to_grpc_status(error, self.request_id)
        self.code = status.code
        await self.context.abort(status.code, status.details, status.trailing_metadata)

    def end(self) -> None:
        duration = time.perf_counter() - self.start
        if self.rpc is not None:
            self.rpc.ended(self.code.name, duration)
        level = logging.DEBUG if self.method.startswith(_QUIET_PREFIXES) else logging.INFO
        if log.isEnabledFor(level):
            log.log(
                level,
                "rpc finished",
                extra={
                    # Explicit, not only from the context variables: a cancelled
                    # stream's generator may be finalized in another context.
                    "request_id": self.request_id,
                    "method": self.method,
                    "code": self.code.name,
                    "duration_ms": round(duration * 1000, 3),
                    "peer": self.peer,
                },
            )


class _Requests:
    """A client stream's requests; an undecodable one fails the call with INVALID_ARGUMENT.

    The refusal is raised to whoever reads (so a servicer stops at it) and
    kept on the call, so it is the call's status even if the servicer
    swallows it or reads in another task.
    """

    __slots__ = ("_call", "_how", "_inner")

    def __init__(self, inner: AsyncIterator[Any], call: _Call, how: _Malformed) -> None:
        self._inner = inner
        self._call = call
        self._how = how

    def __aiter__(self) -> _Requests:
        return self

    async def __anext__(self) -> Any:
        if self._call.malformed is not None:
            raise self._call.malformed
        item = await self._inner.__anext__()
        if item is UNDECODABLE:
            raise self._call.refuse(self._how)
        return item


def _wrap_unary_response(
    method: str,
    behavior: Behavior,
    check: Checker | None,
    streaming_request: bool,
    how: _Malformed,
    rpc: RpcMetrics | None = None,
) -> Behavior:
    async def handler(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        call = _Call(method, context, rpc)
        CALLS.unary += 1
        try:
            request = call.begin(request, streaming_request, how)
            if check is not None:
                await check(None if streaming_request else request, context)
            result = behavior(request, context)
            if inspect.isawaitable(result):
                call.inside = True
                try:
                    result = await result
                finally:
                    call.inside = False
            call.raise_if_refused()
            return result
        except (asyncio.CancelledError, aio.AbortError):
            if call.stopped_by_refusal() and call.malformed is not None:
                await call.fail(call.malformed)
            call.interrupted()
            raise
        except Exception as exc:  # noqa: BLE001 - the one place every fault is mapped
            call.stopped_by_refusal()
            await call.fail(call.malformed or exc)
        finally:
            CALLS.unary -= 1
            call.end()

    return handler


async def _responses(call: _Call, result: Any) -> AsyncGenerator[Any, None]:
    """What a streaming servicer produced, whichever style it is written in."""
    if inspect.isasyncgen(result):
        try:
            while True:
                call.inside = True
                try:
                    item = await anext(result)
                except StopAsyncIteration:
                    break
                finally:
                    call.inside = False
                call.raise_if_refused()
                yield item
        finally:
            # Run the servicer's cleanup now, in this call's task, also when the
            # client went away while a response was being sent.
            await result.aclose()
    elif inspect.isawaitable(result):
        # context.write style handler: it writes itself and returns None.
        call.inside = True
        try:
            await result
        finally:
            call.inside = False
    else:
        for item in result:
            yield item
    call.raise_if_refused()


def _wrap_stream_response(
    method: str,
    behavior: Behavior,
    check: Checker | None,
    streaming_request: bool,
    how: _Malformed,
    rpc: RpcMetrics | None = None,
) -> Behavior:
    async def handler(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        call = _Call(method, context, rpc)
        try:
            request = call.begin(request, streaming_request, how)
            if check is not None:
                await check(None if streaming_request else request, context)
            result = behavior(request, context)
            # A server stream of a unary request has no client message left to
            # refuse, so the servicer's own generator is iterated as it is (one
            # async-generator hop less per item on the fan-out path); closing it
            # below still runs its cleanup in this call's task.
            responses = (
                result
                if not streaming_request and inspect.isasyncgen(result)
                else _responses(call, result)
            )
            try:
                async for item in responses:
                    yield item
            finally:
                await responses.aclose()
        except (asyncio.CancelledError, aio.AbortError):
            if call.stopped_by_refusal() and call.malformed is not None:
                await call.fail(call.malformed)
            call.interrupted()
            raise
        except Exception as exc:  # noqa: BLE001 - the one place every fault is mapped
            call.stopped_by_refusal()
            await call.fail(call.malformed or exc)
        finally:
            call.end()

    return handler


def _wrap(
    method: str,
    handler: Handler,
    check: Checker | None,
    malformed: MalformedLog,
    metrics: Metrics | None = None,
) -> Handler:
    how = _Malformed(method, handler.request_deserializer, malformed)
    # Latency is recorded for calls with one response; a stream's duration is its lifetime.
    timed = handler.unary_unary is not None or handler.stream_unary is not None
    rpc = metrics.rpc(method, timed=timed) if metrics is not None else None
    common = {
        "request_deserializer": tolerant(handler.request_deserializer),
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _wrap_unary_response(method, handler.unary_unary, check, False, how, rpc),
            **common,
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _wrap_unary_response(method, handler.stream_unary, check, True, how, rpc),
            **common,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _wrap_stream_response(method, handler.unary_stream, check, False, how, rpc),
            **common,
        )
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            _wrap_stream_response(method, handler.stream_stream, check, True, how, rpc),
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

    def __init__(
        self,
        guard: Guard | None = None,
        malformed: MalformedLog | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._wrapped: dict[str, Handler] = {}
        self._guard = guard
        self._malformed = malformed or MalformedLog()
        #: RED metrics per method (platform/observe/metrics.py), when the process keeps them.
        self._metrics = metrics

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
        wrapped = self._wrapped[method] = _wrap(
            method, handler, check, self._malformed, self._metrics
        )
        return wrapped
