"""Client spans of streaming calls that end when the call ends (``telemetry.client_interceptors``).

Its own module so that ``platform/observe/telemetry.py`` does not import grpc: the llm
handler's process side (``dispatcher/llm/client.py``) asks telemetry for its HTTP
instrumentation and must stay free of grpc.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from grpc import aio
from opentelemetry import trace
from opentelemetry.propagate import inject
from opentelemetry.trace import StatusCode

from switchboard.platform import background

log = logging.getLogger("switchboard.telemetry")


class StreamSpans(
    aio.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    aio.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """A CLIENT span per server- or bidirectional-streaming call that ends when the call
    ends: its status, a deadline, or a cancellation.

    opentelemetry-instrumentation-grpc's aio interceptors end a streaming call's span
    only when its responses are read to the end. A caller that stops at the frame it
    needs and cancels the rest (the dispatcher after an expert's ``result``), or is
    cancelled itself, left that span open: never exported, so the expert's server span
    had no parent in the trace. The span has the instrumentation's name and
    attributes, its trace context goes out in ``traceparent``, and the call is returned
    as it is (``read`` and ``write`` keep working). A call its caller cancelled is not
    an error of the call: its span records CANCELLED without an error status.
    """

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer
        self._ending: set[asyncio.Task[None]] = set()

    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return await self._traced(continuation, client_call_details, request)

    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await self._traced(continuation, client_call_details, request_iterator)

    async def _traced(self, continuation: Any, details: Any, request: Any) -> Any:
        method = details.method
        if isinstance(method, bytes):  # grpc/grpc#31092
            method = method.decode()
        service, _, name = method.lstrip("/").partition("/")
        span = self._tracer.start_span(
            method,
            kind=trace.SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        )
        carrier: dict[str, str] = {}
        inject(carrier, context=trace.set_span_in_context(span))
        metadata = aio.Metadata(*tuple(details.metadata or ()))
        for key, value in carrier.items():
            metadata.add(key, value)
        traced = aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )
        try:
            with trace.use_span(span, end_on_exit=False):
                call = await continuation(traced, request)
        except BaseException as exc:
            span.set_status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}")
            span.end()
            raise
        call.add_done_callback(lambda done: self._end_soon(span, done))
        return call

    def _end_soon(self, span: trace.Span, call: Any) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no loop any more (a process stopping): end it as it is
            span.end()
            return
        # The status is read with an await (done already, it does not wait).
        background.spawn(
            _end_stream_span(span, call), name="client-span-end", logger=log, keep=self._ending
        )


async def _end_stream_span(span: trace.Span, call: Any) -> None:
    try:
        code = await call.code()
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code.name != "OK" and not (code.name == "CANCELLED" and call.cancelled()):
            span.set_status(StatusCode.ERROR, await call.details())
    finally:
        span.end()
