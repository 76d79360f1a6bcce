"""InvokeTool's ``idempotency_key`` (docs/integration.md, "Idempotency keys and
retry-safe tools"): a malformed key is INVALID_ARGUMENT on the field before anything
is sent; a good one reaches the tool the integration's way. Against real servers: the
suite's MCP server (tests/infra/mcpserver.py, which records the ``_meta`` key of each
call) and a gRPC expert (tests/e2e/toolexpert.py, which records each call's
metadata). A2A agents get it as the message id: tests/integration/kinds/test_a2a_experts.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from google.rpc import error_details_pb2

from switchboard.api.integration.v1 import integration_pb2 as ipb
from switchboard.integration.kinds.mcp import McpConnector
from switchboard.integration.tools import KEY_RULE
from switchboard.platform.security.egress import EgressPolicy
from switchboard.platform.values.idempotency import METADATA, call_key
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.toolexpert import ToolExpert
from tests.infra.mcpserver import McpTestServer
from tests.kits.authkit import detail
from tests.kits.contextkit import World, context_stub, ctx_world, refused
from tests.kits.integrationkit import (
    McpHub,
    Stub,
    create,
    expert,
    hub_mesh,
    integration_stub,
    mcp_hub,
)

pytestmark = pytest.mark.service

CODE = grpc.StatusCode
#: What a run's call carries.
RUN_KEY = call_key("workspaces/w1/runs/r1", "call-1")
GOOD = [RUN_KEY, "a", "order:42.retry_1-x", "k" * 64]
BAD = ["has space", "k" * 65, "ünï", "a/b", "line\n", "tab\t", "semi;colon", "=", "\x00"]


@pytest.fixture(scope="module")
def server() -> Iterator[McpTestServer]:
    with McpTestServer() as mcp:
        yield mcp


@pytest.fixture
async def hub(server: McpTestServer) -> AsyncIterator[McpHub]:
    async with mcp_hub(server.url) as made:
        yield made


def _struct(**values: Any) -> struct_pb2.Struct:
    found = struct_pb2.Struct()
    found.update(values)
    return found


async def _invoke(hub: McpHub, tool: str, key: str, **arguments: Any) -> ipb.InvokeToolResponse:
    return await hub.stub.InvokeTool(
        ipb.InvokeToolRequest(
            name=f"{hub.integration}/tools/{tool}",
            arguments=_struct(**arguments),
            idempotency_key=key,
        ),
        metadata=hub.world.editor.md,
        timeout=CALL_DEADLINE_S,
    )


async def _seen(hub: McpHub) -> list[list[str]]:
    """Each call's tool and ``_meta`` key, as the MCP server recorded them."""
    stats = await _invoke(hub, "stats", "")
    found = json_format.MessageToDict(stats.result)["idempotency_keys"]
    return [[str(item) for item in pair] for pair in found]


async def test_a_key_reaches_the_mcp_server_in_meta(hub: McpHub) -> None:
    before = len(await _seen(hub))
    for key in GOOD:
        answer = await _invoke(hub, "echo", key, message=f"with {key[:8]}")
        assert answer.text == f"with {key[:8]}"
    await _invoke(hub, "echo", "", message="without")
    assert (await _seen(hub))[before:] == [*(["echo", key] for key in GOOD), ["echo", ""]]


async def test_a_malformed_key_is_refused_before_the_call(hub: McpHub) -> None:
    before = len(await _seen(hub))
    for key in BAD:
        error = await refused(_invoke(hub, "echo", key, message="never"), CODE.INVALID_ARGUMENT)
        bad: error_details_pb2.BadRequest = detail(error, error_details_pb2.BadRequest)
        assert [(v.field, v.description) for v in bad.field_violations] == [
            ("idempotency_key", KEY_RULE)
        ], repr(key)
    # A bad key beside a bad name: both named, nothing sent.
    error = await refused(
        hub.stub.InvokeTool(
            ipb.InvokeToolRequest(name=f"{hub.integration}/tools/~41", idempotency_key="a b"),
            metadata=hub.world.editor.md,
            timeout=CALL_DEADLINE_S,
        ),
        CODE.INVALID_ARGUMENT,
    )
    bad = detail(error, error_details_pb2.BadRequest)
    assert [v.field for v in bad.field_violations] == ["name", "idempotency_key"]
    assert (await _seen(hub))[before:] == []


async def test_the_key_goes_beside_the_progress_token(server: McpTestServer) -> None:
    """The SDK adds ``progressToken`` to the same ``_meta``: both arrive."""
    mcp = McpConnector(
        server.url, egress=EgressPolicy(allow_loopback=True), connect_timeout_s=CALL_DEADLINE_S
    )
    steps: list[str] = []

    async def progress(value: float, total: float | None, message: str) -> None:
        steps.append(message)

    try:
        done = await mcp.call_tool(
            "slow",
            {"seconds": 0.01, "tag": "keyed"},
            timeout_s=CALL_DEADLINE_S,
            max_result_bytes=1000,
            progress=progress,
            idempotency_key=RUN_KEY,
        )
        assert done.text == "slow keyed done"
        stats = await mcp.call_tool(
            "stats", {}, timeout_s=CALL_DEADLINE_S, max_result_bytes=100_000
        )
    finally:
        await mcp.close()
    assert stats.structured is not None
    assert stats.structured["idempotency_keys"][-1] == ["slow", RUN_KEY]
    # Progress still arrives by its token (the server reports four steps; the last
    # may come after the result and is then dropped).
    assert steps[:1] == ["step 1"]


async def test_a_key_reaches_a_grpc_expert_in_metadata() -> None:
    async with ToolExpert("calc", interactive=False) as calc, hub_mesh() as (server, channel):
        world: World = await ctx_world(server, context_stub(channel))
        stub: Stub = integration_stub(channel)
        made = await create(
            stub,
            world.owner,
            world.name,
            expert(calc.address, credential="s3cret"),
            integration_id="calc",
        )
        for key in (RUN_KEY, ""):
            answer = await stub.InvokeTool(
                ipb.InvokeToolRequest(
                    name=f"{made.name}/tools/calc",
                    arguments=_struct(input="hello"),
                    idempotency_key=key,
                ),
                metadata=world.editor.md,
                timeout=CALL_DEADLINE_S,
            )
            assert answer.text == "reported 0 tool calls"
        error = await refused(
            stub.InvokeTool(
                ipb.InvokeToolRequest(
                    name=f"{made.name}/tools/calc",
                    arguments=_struct(input="never"),
                    idempotency_key="k" * 65,
                ),
                metadata=world.editor.md,
                timeout=CALL_DEADLINE_S,
            ),
            CODE.INVALID_ARGUMENT,
        )
        bad: error_details_pb2.BadRequest = detail(error, error_details_pb2.BadRequest)
        assert [v.field for v in bad.field_violations] == ["idempotency_key"]
    keyed, unkeyed = calc.calls
    assert keyed.method == unkeyed.method == "Handle"
    # Beside the credential; none sent for a call without a key.
    assert keyed.metadata[METADATA] == RUN_KEY
    assert keyed.metadata["authorization"] == "Bearer s3cret"
    assert METADATA not in unkeyed.metadata
