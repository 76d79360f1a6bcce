"""A tool's input schema never makes the hub fetch anything, nor stall other callers
(issue 42, findings 1 and 2).

A real MCP server (tests/infra/mcpserver.py) lists tools whose schemas refer
outside themselves: a remote ``$ref`` (to a recording server that would answer
with a redirect to a second one), a relative ``$ref`` against a remote ``$id``,
a remote ``$dynamicRef``, a remote ``$schema``, a ``format`` a checker could
look up. None of those addresses is ever asked; a tool whose schema refers
outside itself is listed and refused with FAILED_PRECONDITION naming it; local
references (``#/$defs``, anchors, the schema's own ``$id``, the meta-schemas the
library ships) keep working.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.api.integration.v1 import integration_pb2 as ipb
from tests.conftest import CALL_DEADLINE_S
from tests.infra.httprecorder import Recorder, Reply, recording
from tests.infra.mcpserver import McpTestServer
from tests.kits.contextkit import World, refused, violations
from tests.kits.integrationkit import Stub, mcp_hub

pytestmark = pytest.mark.service

CODE = grpc.StatusCode


@pytest.fixture(scope="module")
def schemas() -> Iterator[Recorder]:
    with recording() as recorder:
        yield recorder


@pytest.fixture(scope="module")
def beyond() -> Iterator[Recorder]:
    with recording() as recorder:
        yield recorder


def _tools(schemas: Recorder) -> list[dict[str, Any]]:
    remote = schemas.url("/schema.json")
    string = {"type": "string"}
    return [
        {
            "name": "remote_ref",
            "input_schema": {"type": "object", "properties": {"q": {"$ref": remote}}},
        },
        {
            "name": "slow_ref",
            "input_schema": {"type": "object", "properties": {"q": {"$ref": schemas.url("/slow")}}},
        },
        {
            "name": "relative_ref",
            "input_schema": {
                "$id": schemas.url("/base/root.json"),
                "type": "object",
                "properties": {"q": {"$ref": "other.json"}},
            },
        },
        {
            "name": "dynamic_ref",
            "input_schema": {"type": "object", "properties": {"q": {"$dynamicRef": remote}}},
        },
        {
            "name": "embedded_id",
            "input_schema": {
                "type": "object",
                "properties": {"q": {"$id": schemas.url("/embedded/"), "$ref": "#/x"}},
            },
        },
        {
            "name": "local_refs",
            "input_schema": {
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "$id": "https://tools.example/local.json",
                "type": "object",
                "properties": {
                    "q": {"$ref": "#/$defs/q"},
                    "r": {"$ref": "#r"},
                    "s": {"$ref": "https://tools.example/local.json#/$defs/q"},
                    "link": {"type": "string", "format": "uri"},
                    "host": {"type": "string", "format": "hostname"},
                },
                "required": ["q"],
                "$defs": {"q": string, "r": {"$anchor": "r", "type": "integer"}},
            },
        },
        {
            "name": "redos",
            "input_schema": {
                "type": "object",
                "properties": {"q": {"type": "string", "pattern": "^(a|aa)+$"}},
            },
        },
        {
            "name": "redos_keys",
            "input_schema": {
                "type": "object",
                "patternProperties": {"^(a|aa)+$": {"type": "string"}},
                "additionalProperties": False,
            },
        },
        {
            "name": "remote_meta_schema",
            "input_schema": {
                "$schema": schemas.url("/meta.json"),
                "type": "object",
                "properties": {"q": string},
            },
        },
    ]


@pytest.fixture(scope="module")
def server(schemas: Recorder, beyond: Recorder) -> Iterator[McpTestServer]:
    # What a fetch would find: a redirect to a second server, as the red team's did.
    schemas.routes["/schema.json"] = Reply(302, {"location": beyond.url("/metadata")})
    with McpTestServer(extra_tools=_tools(schemas)) as mcp:
        yield mcp


@pytest.fixture
async def hub(server: McpTestServer) -> AsyncIterator[tuple[Stub, World, str, Any]]:
    async with mcp_hub(server.url) as made:
        yield made.stub, made.world, made.integration, made.channel


def arguments(**values: Any) -> struct_pb2.Struct:
    found = struct_pb2.Struct()
    found.update(values)
    return found


async def _invoke(stub: Stub, world: World, name: str, **values: Any) -> ipb.InvokeToolResponse:
    response: ipb.InvokeToolResponse = await stub.InvokeTool(
        ipb.InvokeToolRequest(name=name, arguments=arguments(**values)),
        metadata=world.editor.md,
        timeout=CALL_DEADLINE_S,
    )
    return response


@pytest.mark.parametrize(
    "tool", ["remote_ref", "relative_ref", "dynamic_ref", "embedded_id", "slow_ref"]
)
async def test_a_schema_that_refers_outside_itself_is_refused_and_nothing_is_fetched(
    hub: tuple[Stub, World, str, Any], schemas: Recorder, beyond: Recorder, tool: str
) -> None:
    stub, world, parent, _ = hub
    listed = await stub.ListTools(
        ipb.ListToolsRequest(parent=parent, page_size=200),
        metadata=world.viewer.md,
        timeout=CALL_DEADLINE_S,
    )
    assert f"{parent}/tools/{tool}" in {listed_tool.name for listed_tool in listed.tools}
    error = await refused(
        _invoke(stub, world, f"{parent}/tools/{tool}", q="x"), CODE.FAILED_PRECONDITION
    )
    assert f"{parent}/tools/{tool}" in (error.details() or "")
    assert "never fetched" in (error.details() or "") or "resolves to nothing" in (
        error.details() or ""
    )
    assert schemas.seen == []
    assert beyond.seen == []


async def test_local_references_formats_and_the_meta_schemas_still_work(
    hub: tuple[Stub, World, str, Any], schemas: Recorder
) -> None:
    stub, world, parent, _ = hub
    tool = f"{parent}/tools/local_refs"
    done = await _invoke(stub, world, tool, q="x", r=3, s="y", link="not a uri", host="-")
    assert done.text == "local_refs"
    wrong = await refused(_invoke(stub, world, tool, q=1, r="three", s=2), CODE.INVALID_ARGUMENT)
    assert set(violations(wrong)) >= {"arguments.q", "arguments.r", "arguments.s"}
    # A $schema the library does not know is read as 2020-12, never fetched.
    meta = await _invoke(stub, world, f"{parent}/tools/remote_meta_schema", q="x")
    assert meta.text == "remote_meta_schema"
    assert schemas.seen == []


async def test_a_slow_remote_ref_stalls_no_other_caller(
    hub: tuple[Stub, World, str, Any], schemas: Recorder
) -> None:
    """The schema server holds its answer until the test lets it go (or its hold runs out).

    A hub that fetched the ``$ref`` on its event loop could not answer the other
    caller's GetPrincipal before the hold ended: the test releases the hold only
    after that answer arrived, so such a hub fails here, whatever the machine's speed.
    """
    stub, world, parent, channel = hub
    release = threading.Event()
    schemas.routes["/slow"] = Reply(200, {"content-type": "application/json"}, b"{}", release)
    try:
        invoking = asyncio.ensure_future(_invoke(stub, world, f"{parent}/tools/slow_ref", q="x"))
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        for _ in range(3):
            principal = await auth.GetPrincipal(
                auth_pb2.GetPrincipalRequest(), metadata=world.viewer.md, timeout=CALL_DEADLINE_S
            )
            assert principal.user.name
        assert not release.is_set(), "the other caller was answered only after the hold ended"
        await refused(invoking, CODE.FAILED_PRECONDITION)
    finally:
        release.set()
    assert schemas.requests_to("/slow") == []


#: Exponential for a backtracking matcher: ^(a|aa)+$ tries every split of the a's.
EVIL = "a" * 64 + "b"


@pytest.mark.parametrize("tool", ["redos", "redos_keys"])
async def test_a_pattern_that_backtracks_forever_stalls_no_one(
    hub: tuple[Stub, World, str, Any], tool: str
) -> None:
    """With ``re`` holding the interpreter lock for the whole match, this call would
    freeze the process (GetPrincipal included) for longer than the universe lasts."""
    stub, world, parent, channel = hub
    name = f"{parent}/tools/{tool}"
    bad = {"q": EVIL} if tool == "redos" else {EVIL: "x"}
    good = {"q": "aaaa"} if tool == "redos" else {"aaaa": "x"}
    wrong = {"q": "b"} if tool == "redos" else {"b": "x"}
    invoking = asyncio.ensure_future(_invoke(stub, world, name, **bad))
    auth = auth_pb2_grpc.AuthServiceStub(channel)
    principal = await auth.GetPrincipal(
        auth_pb2.GetPrincipalRequest(), metadata=world.viewer.md, timeout=CALL_DEADLINE_S
    )
    assert principal.user.name
    error = await refused(invoking, CODE.FAILED_PRECONDITION)
    assert f"{name} cannot be called" in (error.details() or "")
    assert "patterns take longer" in (error.details() or "")
    # Patterns still mean what they meant.
    assert (await _invoke(stub, world, name, **good)).text == tool
    await refused(_invoke(stub, world, name, **wrong), CODE.INVALID_ARGUMENT)
