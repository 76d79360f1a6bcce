"""One log line per outgoing HTTP request, at DEBUG unless its answer is an error.

An MCP call goes through the SDK's httpx2 client and then the egress-checked httpx
client (``integration/kinds/mcp.py``): each logged its own INFO line for every request,
about half of a short session's log.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator

import pytest
from google.protobuf import struct_pb2

from switchboard.api.integration.v1 import integration_pb2 as ipb
from tests.conftest import CALL_DEADLINE_S
from tests.infra.mcpeverything import EverythingServer
from tests.kits.contextkit import World, context_stub, ctx_world
from tests.kits.integrationkit import Stub, create, hub_mesh, integration_stub

pytestmark = pytest.mark.service


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("HTTP Request:"):
            self.records.append(record)


@pytest.fixture(scope="module")
def everything() -> Iterator[EverythingServer]:
    with EverythingServer() as server:
        yield server


@pytest.fixture
async def hub() -> AsyncIterator[tuple[Stub, World]]:
    async with hub_mesh() as (server, channel):
        yield integration_stub(channel), await ctx_world(server, context_stub(channel))


@pytest.fixture(params=[logging.INFO, logging.DEBUG], ids=["info", "debug"])
def lines(request: pytest.FixtureRequest) -> Iterator[tuple[Lines, int]]:
    """The HTTP clients' request lines, their loggers at the level given."""
    handler = Lines()
    loggers = [logging.getLogger(name) for name in ("httpx", "httpx2")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(request.param)
        logger.addHandler(handler)
    try:
        yield handler, request.param
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)


async def test_an_mcp_call_logs_each_request_once_at_debug(
    everything: EverythingServer, hub: tuple[Stub, World], lines: tuple[Lines, int]
) -> None:
    stub, world = hub
    handler, level = lines
    made = await create(
        stub,
        world.owner,
        world.name,
        ipb.Integration(kind=ipb.INTEGRATION_KIND_MCP_SERVER, endpoint=everything.url),
    )
    arguments = struct_pb2.Struct()
    arguments.update({"message": "hello"})
    answer = await stub.InvokeTool(
        ipb.InvokeToolRequest(name=f"{made.name}/tools/echo", arguments=arguments),
        metadata=world.editor.md,
        timeout=CALL_DEADLINE_S,
    )
    assert "hello" in answer.text
    if level == logging.INFO:
        assert [r.getMessage() for r in handler.records] == []
        return
    assert handler.records, "the requests are logged at DEBUG"
    assert {(r.name, r.levelno) for r in handler.records} == {("httpx", logging.DEBUG)}
    # The origin only: a path or a query may hold a secret.
    origin = everything.url.split("/mcp", 1)[0].rstrip("/")
    for record in handler.records:
        method, url, *_ = record.getMessage().removeprefix("HTTP Request: ").split(" ")
        assert (method, url) in {("POST", origin), ("GET", origin), ("DELETE", origin)}
