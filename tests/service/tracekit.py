"""Shared by the tracing and cancelled-stream tests: a traced server, and a watch on
what the process logs and what its event loop leaves unhandled while a test runs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from opentelemetry.sdk.trace.export import SpanExporter

from switchboard.mesh import create_server
from switchboard.platform.observe.telemetry import Tracing, installed
from switchboard.platform.rpc.server import SwitchboardServer
from tests.conftest import make_settings

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
