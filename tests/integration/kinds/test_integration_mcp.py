"""MCP servers through IntegrationService: the reference server registered by an owner,
its tools listed in pages and invoked by an editor, arguments checked against each
tool's JSON Schema first, a client deadline that cancels the call on the server, and
an operator-configured stdio server that an integration may name but never define."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2

from switchboard.api.integration.v1 import integration_pb2 as ipb
from switchboard.platform.rpc.server import SwitchboardServer
from tests.conftest import CALL_DEADLINE_S
from tests.infra.mcpeverything import EVERYTHING_MAIN, PACKAGES, EverythingServer
from tests.infra.webhookreceiver import until
from tests.kits.contextkit import World, context_stub, ctx_world, refused, violations
from tests.kits.integrationkit import Stub, create, hub_mesh, integration_stub

pytestmark = pytest.mark.service

CODE = grpc.StatusCode


@pytest.fixture(scope="module")
def everything() -> Iterator[EverythingServer]:
    with EverythingServer() as server:
        yield server


@pytest.fixture
async def hub() -> AsyncIterator[tuple[SwitchboardServer, Stub, World]]:
    stdio = {
        "everything": {"command": ["node", str(EVERYTHING_MAIN), "stdio"], "cwd": str(PACKAGES)}
    }
    async with hub_mesh(integration_mcp_stdio_servers=json.dumps(stdio)) as (server, channel):
        world = await ctx_world(server, context_stub(channel))
        yield server, integration_stub(channel), world


def mcp(endpoint: str) -> ipb.Integration:
    return ipb.Integration(
        kind=ipb.INTEGRATION_KIND_MCP_SERVER, endpoint=endpoint, display_name="Everything"
    )


def arguments(**values: Any) -> struct_pb2.Struct:
    found = struct_pb2.Struct()
    found.update(values)
    return found


async def _all_tools(stub: Stub, world: World, parent: str) -> list[ipb.Tool]:
    tools: list[ipb.Tool] = []
    token = ""
    while True:
        page = await stub.ListTools(
            ipb.ListToolsRequest(parent=parent, page_size=3, page_token=token),
            metadata=world.viewer.md,
            timeout=CALL_DEADLINE_S,
        )
        tools += page.tools
        token = page.next_page_token
        if not token:
            return tools


async def test_the_reference_servers_tools_are_listed_and_invoked(
    everything: EverythingServer, hub: tuple[SwitchboardServer, Stub, World]
) -> None:
    _, stub, world = hub
    made = await create(stub, world.owner, world.name, mcp(everything.url), integration_id="ev")
    tools = {tool.name.rsplit("/", 1)[1]: tool for tool in await _all_tools(stub, world, made.name)}
    assert {"echo", "get-sum"} <= tools.keys()
    assert tools["get-sum"].input_schema.fields["type"].string_value == "object"
    echoed = await stub.InvokeTool(
        ipb.InvokeToolRequest(name=tools["echo"].name, arguments=arguments(message="hello hub")),
        metadata=world.editor.md,
        timeout=CALL_DEADLINE_S,
    )
    assert "hello hub" in echoed.text
    assert not echoed.is_error
    summed = await stub.InvokeTool(
        ipb.InvokeToolRequest(name=tools["get-sum"].name, arguments=arguments(a=2, b=3)),
        metadata=world.editor.md,
        timeout=CALL_DEADLINE_S,
    )
    assert "5" in summed.text


async def test_arguments_that_break_the_schema_never_reach_the_server(
    everything: EverythingServer, hub: tuple[SwitchboardServer, Stub, World]
) -> None:
    _, stub, world = hub
    made = await create(stub, world.owner, world.name, mcp(everything.url))
    tool = f"{made.name}/tools/get-sum"
    wrong = await refused(
        stub.InvokeTool(
            ipb.InvokeToolRequest(name=tool, arguments=arguments(a="two")),
            metadata=world.editor.md,
            timeout=CALL_DEADLINE_S,
        ),
        CODE.INVALID_ARGUMENT,
    )
    assert set(violations(wrong)) == {"arguments", "arguments.a"}


async def test_a_deadline_cancels_the_call_on_the_server(
    everything: EverythingServer, hub: tuple[SwitchboardServer, Stub, World]
) -> None:
    _, stub, world = hub
    made = await create(stub, world.owner, world.name, mcp(everything.url))
    slow = ipb.InvokeToolRequest(
        name=f"{made.name}/tools/trigger-long-running-operation",
        arguments=arguments(duration=30, steps=30),
        timeout=duration_pb2.Duration(nanos=700_000_000),
    )
    before = everything.stderr().count("observed cancel")
    error = await refused(
        stub.InvokeTool(slow, metadata=world.editor.md, timeout=CALL_DEADLINE_S),
        CODE.DEADLINE_EXCEEDED,
    )
    assert made.name in (error.details() or "")
    await until(
        lambda: everything.stderr().count("observed cancel") > before,
        "server-everything to receive notifications/cancelled",
    )


async def test_an_operator_configured_stdio_server_is_named_not_defined(
    hub: tuple[SwitchboardServer, Stub, World],
) -> None:
    _, stub, world = hub
    made = await create(stub, world.owner, world.name, mcp("stdio:everything"))
    echoed = await stub.InvokeTool(
        ipb.InvokeToolRequest(name=f"{made.name}/tools/echo", arguments=arguments(message="hi")),
        metadata=world.editor.md,
        timeout=CALL_DEADLINE_S,
    )
    assert "hi" in echoed.text
    # A command in the request is not a thing: only the operator's ids exist.
    unknown = await refused(
        create(stub, world.owner, world.name, mcp("stdio:node")), CODE.INVALID_ARGUMENT
    )
    assert violations(unknown) == ["integration.endpoint"]
