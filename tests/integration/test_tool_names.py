"""Every tool ListTools names can be invoked and enabled on an assistant (issue 42, finding 3).

Tool names follow the MCP specification (2025-11-25): 1-128 ASCII letters,
digits, ``_``, ``-`` and ``.``, case-sensitive; such a name is its own resource
name segment. A server may still use other names (the specification only says
SHOULD): each byte outside that set is written ``~XX``, so every name of at most
128 UTF-8 bytes has exactly one segment; a longer one is left out of the list.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as dpb
from switchboard.api.integration.v1 import integration_pb2 as ipb
from switchboard.platform.values import names
from tests.conftest import CALL_DEADLINE_S
from tests.infra.mcpserver import McpTestServer
from tests.kits.contextkit import World, refused, violations
from tests.kits.dispatchkit import dispatcher_stub
from tests.kits.integrationkit import Stub, mcp_hub

pytestmark = pytest.mark.service

CODE = grpc.StatusCode
_OBJECT = {"type": "object", "properties": {"q": {"type": "string"}}}
LONGEST = "L" * 64 + "o.n-g_" + "x" * 58
#: Names as the specification writes them, and the segment each has.
SPEC_NAMES = {name: name for name in ["snake_case.Echo", "CamelCase", "dotted.v2-name", LONGEST]}
#: Names outside it, escaped.
OTHER_NAMES = {
    "with space": "with~20space",
    "slash/name": "slash~2Fname",
    "tilde~x": "tilde~7Ex",
    "ünï": "~C3~BCn~C3~AF",
}
TOO_LONG = "y" * 129


@pytest.fixture(scope="module")
def server() -> Iterator[McpTestServer]:
    tools = [
        {"name": name, "input_schema": _OBJECT} for name in [*SPEC_NAMES, *OTHER_NAMES, TOO_LONG]
    ]
    with McpTestServer(extra_tools=tools) as mcp:
        yield mcp


@pytest.fixture
async def hub(server: McpTestServer) -> AsyncIterator[tuple[Stub, World, str, Any]]:
    overrides = {"llm_base_url": "http://127.0.0.1:1/v1", "llm_model": "test-model"}
    async with mcp_hub(server.url, **overrides) as made:
        yield made.stub, made.world, made.integration, made.channel


def test_the_longest_name_is_the_specifications_longest() -> None:
    assert len(LONGEST) == 128
    assert names.TOOL_NAME.fullmatch(LONGEST)
    assert not names.TOOL_NAME.fullmatch(LONGEST + "x")


def test_segments_are_reversible_and_unique() -> None:
    for name, segment in {**SPEC_NAMES, **OTHER_NAMES}.items():
        assert names.tool_segment(name) == segment
        assert names.tool_from_segment(segment) == name
    assert names.tool_segment(TOO_LONG) is None
    assert names.tool_segment("") is None
    # Only the canonical spelling names a tool: one name, one segment.
    for spelling in ["~41", "tilde~7ex", "~C3", "a~", "~ZZ"]:
        assert names.tool_from_segment(spelling) is None, spelling


async def test_listed_names_are_invoked_by_their_listed_names(
    hub: tuple[Stub, World, str, Any],
) -> None:
    stub, world, parent, _ = hub
    listed = await stub.ListTools(
        ipb.ListToolsRequest(parent=parent, page_size=200),
        metadata=world.viewer.md,
        timeout=CALL_DEADLINE_S,
    )
    segments = {tool.name.removeprefix(f"{parent}/tools/") for tool in listed.tools}
    expected = {**SPEC_NAMES, **OTHER_NAMES}
    assert set(expected.values()) <= segments
    assert not any(segment.startswith("yyy") for segment in segments)
    for name, segment in expected.items():
        done = await stub.InvokeTool(
            ipb.InvokeToolRequest(name=f"{parent}/tools/{segment}", arguments=struct_pb2.Struct()),
            metadata=world.editor.md,
            timeout=CALL_DEADLINE_S,
        )
        assert done.text == name, segment


async def test_the_access_check_reads_every_tool_name(
    hub: tuple[Stub, World, str, Any],
) -> None:
    stub, world, parent, _ = hub
    for segment in ["snake_case.Echo", LONGEST, "slash~2Fname"]:
        # An outsider is refused as one (not as a malformed name) ...
        await refused(
            stub.InvokeTool(
                ipb.InvokeToolRequest(name=f"{parent}/tools/{segment}"),
                metadata=world.outsider.md,
                timeout=CALL_DEADLINE_S,
            ),
            CODE.NOT_FOUND,
        )
        # ... and a viewer may not call tools.
        await refused(
            stub.InvokeTool(
                ipb.InvokeToolRequest(name=f"{parent}/tools/{segment}"),
                metadata=world.viewer.md,
                timeout=CALL_DEADLINE_S,
            ),
            CODE.PERMISSION_DENIED,
        )
    for bad in ["~41", LONGEST + "x", "has space", "a/b"]:
        error = await refused(
            stub.InvokeTool(
                ipb.InvokeToolRequest(name=f"{parent}/tools/{bad}"),
                metadata=world.editor.md,
                timeout=CALL_DEADLINE_S,
            ),
            CODE.INVALID_ARGUMENT,
        )
        assert violations(error) == ["name"], bad


async def test_an_assistant_enables_tools_by_their_listed_names(
    hub: tuple[Stub, World, str, Any],
) -> None:
    _, world, parent, channel = hub
    stub = dispatcher_stub(channel)
    segments = [*SPEC_NAMES.values(), *OTHER_NAMES.values()]
    made = await stub.CreateAssistant(
        dpb.CreateAssistantRequest(
            parent=world.name,
            assistant=dpb.Assistant(
                display_name="Names",
                tools=[
                    dpb.AssistantTools(
                        integration=parent,
                        tools=segments,
                        approval_required_tools=["snake_case.Echo", "with~20space"],
                    )
                ],
            ),
        ),
        metadata=world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    assert list(made.assistant.tools[0].tools) == segments
    error = await refused(
        stub.CreateAssistant(
            dpb.CreateAssistantRequest(
                parent=world.name,
                assistant=dpb.Assistant(
                    display_name="Bad",
                    tools=[
                        dpb.AssistantTools(integration=parent, tools=["ok", "~41", "has space"])
                    ],
                ),
            ),
            metadata=world.owner.md,
            timeout=CALL_DEADLINE_S,
        ),
        CODE.INVALID_ARGUMENT,
    )
    assert violations(error) == ["assistant.tools[0].tools[1]", "assistant.tools[0].tools[2]"]
