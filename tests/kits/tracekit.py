"""Shared by the tracing and cancelled-stream tests: a traced server, and a watch on
what the process logs and what its event loop leaves unhandled while a test runs."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from switchboard.mesh import create_server
from switchboard.platform.observe.telemetry import Tracing, installed
from switchboard.platform.rpc.server import SwitchboardServer
from tests.conftest import CALL_DEADLINE_S, make_settings

H = TypeVar("H", bound=logging.Handler)


@asynccontextmanager
async def traced_server(exporter: SpanExporter) -> AsyncIterator[SwitchboardServer]:
    """A started all-in-one server whose spans go to ``exporter``; its tracing is
    uninstalled with the server's resources."""
    tracing = Tracing.to_exporter(exporter, service_name="switchboard-test")
    server, _port = await create_server(make_settings(), tracing=tracing)
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown(grace=0)
    assert installed() is None  # undone with the server's resources


@asynccontextmanager
async def watching(handler: H) -> AsyncIterator[tuple[H, list[dict[str, Any]]]]:
    """``handler`` on the root logger (access lines at INFO), and the loop's unhandled
    exceptions collected in a list, for as long as the block runs."""
    root = logging.getLogger()
    root.addHandler(handler)
    access = logging.getLogger("switchboard.access")
    level = access.level
    access.setLevel(logging.INFO)
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    try:
        yield handler, unhandled
    finally:
        loop.set_exception_handler(previous)
        access.setLevel(level)
        root.removeHandler(handler)


@asynccontextmanager
async def watching_alone(handler: H) -> AsyncIterator[tuple[H, list[dict[str, Any]]]]:
    """``watching``, with everything alive before it (the server included) frozen out of
    the collector meanwhile: a wait that polls ``gc.collect()`` for an abandoned
    generator then collects only what the test made, in milliseconds, where a full
    collection of a late xdist worker's heap held the loop a second or more each time
    (cancel cases of 12 to 27 s, most of it in gc)."""
    gc.freeze()
    try:
        async with watching(handler) as watched:
            yield watched
    finally:
        gc.unfreeze()


class Spans(InMemorySpanExporter):
    """The in-memory exporter, and a way to wait until a span has ended."""

    def __init__(self) -> None:
        super().__init__()
        self._changed = asyncio.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = super().export(spans)
        # Spans end on the loop's thread (SimpleSpanProcessor exports at once).
        self._changed.set()
        return result

    async def wait_for(
        self, found: Callable[[list[ReadableSpan]], list[ReadableSpan]], what: str
    ) -> list[ReadableSpan]:
        """Until ``found`` picks something from the finished spans; returns it."""
        async with asyncio.timeout(CALL_DEADLINE_S):
            while True:
                self._changed.clear()
                picked = found(list(self.get_finished_spans()))
                if picked:
                    return picked
                try:
                    await self._changed.wait()
                except TimeoutError:  # pragma: no cover - reported below
                    break
        raise AssertionError(f"no span: {what}")
