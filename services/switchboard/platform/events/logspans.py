"""Spans for the event log: one per append (a batch is one), inside a traced call or run.

``EventBus`` wraps its backend in ``TracedLog`` when tracing is on; off, the
backend is used as it is and nothing here runs. The span covers the wait for
the embedded log's group write or the Redis round trip, the part of a
publish that explains latency; events are never one span each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from opentelemetry.trace import SpanKind, StatusCode, Tracer, get_current_span

from switchboard.api.events.v1 import events_pb2
from switchboard.platform.observe import telemetry

if TYPE_CHECKING:
    from switchboard.platform.events.eventlog import LogBackend


class TracedLog:
    """A log backend whose appends are spans; everything else is the backend's."""

    def __init__(self, backend: LogBackend, tracer: Tracer) -> None:
        self._backend = backend
        self._tracer = tracer
        self._system = type(backend).__name__

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    async def append(self, event: events_pb2.Event) -> events_pb2.Event:
        if not get_current_span().get_span_context().is_valid:
            return await self._backend.append(event)
        with self._tracer.start_as_current_span(
            "events.append",
            kind=SpanKind.PRODUCER,
            attributes={"switchboard.events.log": self._system, "switchboard.events.count": 1},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                return await self._backend.append(event)
            except Exception as exc:
                span.set_status(StatusCode.ERROR, type(exc).__name__)
                raise

    async def append_many(self, events: Sequence[events_pb2.Event]) -> None:
        if not get_current_span().get_span_context().is_valid:
            await self._backend.append_many(events)
            return
        with self._tracer.start_as_current_span(
            "events.append",
            kind=SpanKind.PRODUCER,
            attributes={
                "switchboard.events.log": self._system,
                "switchboard.events.count": len(events),
            },
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                await self._backend.append_many(events)
            except Exception as exc:
                span.set_status(StatusCode.ERROR, type(exc).__name__)
                raise


def traced(backend: LogBackend) -> LogBackend:
    """``backend``, its appends traced when tracing is on (decided once, here)."""
    tracer = telemetry.tracer("switchboard.events")
    if tracer is None:
        return backend
    return cast("LogBackend", TracedLog(backend, tracer))
