"""JSON (and Structs) from outside nested deeper than anyone should read, end to end.

Real servers on ports the tests pick answer with documents nested thousands of
levels deep, or just past the limit (``jsonbounds.MAX_DEPTH``, 24): an A2A
agent's card (a mebibyte of ``[``, extension ``params`` 5,000 objects deep),
its JSON-RPC answers, an MCP server over HTTP and over stdio (where the SDK's
own parser reads the answers), a gRPC expert's Struct, a model's stream, a
webhook receiver's answer. Each time the caller gets a precise status, never
INTERNAL or UNKNOWN; a malformed answer counts against the integration's
breaker until it opens; an expert whose card cannot be read is marked down and
is refreshed again (it comes back when its card does); and nothing is left in a
task whose exception no one reads.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from grpc import aio

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.integration.v1 import integration_pb2 as ipb
from switchboard.dispatcher.handlers import remote_a2a
from switchboard.integration.service import IntegrationHub
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.values.jsonbounds import MAX_DEPTH
from tests.conftest import CALL_DEADLINE_S, built
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.infra.httprecorder import Reply as HttpReply
from tests.infra.httprecorder import recording
from tests.infra.nestedjson import NestedExpert, NestedMcp, nested_objects, stdio_setting
from tests.kits.authkit import reason
from tests.kits.contextkit import (
    World,
    append,
    context_stub,
    create_conversation,
    ctx_world,
    refused,
    struct,
)
from tests.kits.dispatchkit import dispatcher_stub, reason_of, request, send, watch_all
from tests.kits.integrationkit import (
    Stub,
    create,
    expert,
    hub_mesh,
    integration_stub,
    mcp_hub,
    webhook,
)

pytestmark = pytest.mark.service

CODE = grpc.StatusCode
MIB = 1 << 20
CARD = "/.well-known/agent-card.json"
DEEP = f"nested deeper than {MAX_DEPTH} levels"
UNAVAILABLE = "ERROR_REASON_DEPENDENCY_UNAVAILABLE"


@pytest.fixture(autouse=True)
def nothing_lost(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """No task's exception goes unread, and nothing recursed past Python's limit."""
    caplog.set_level(logging.WARNING)
    # Everything alive before the test is set aside, so that the collection below walks
    # only what the test made (a task and its exception, made here, are among it): a
    # full collection of the suite's heap takes about a second, for every test.
    gc.freeze()
    yield
    try:
        gc.collect()  # a task whose exception was never read says so when it is collected
    finally:
        gc.unfreeze()  # back among the oldest generation, collected as usual
    lost = [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert lost == []
    recursed = [
        r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], RecursionError)
    ]
    assert recursed == []


async def eventually(
    check: Callable[[], Awaitable[Any]], what: str, timeout_s: float = CALL_DEADLINE_S
) -> Any:
    """Poll ``check`` until it returns something truthy, within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = await check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)  # polling, with a deadline


def card(interface_url: str = "http://127.0.0.1:9/a2a", *, params: str = '{"a": 1}') -> bytes:
    """An Agent Card (text: ``params`` is inserted as it is) naming one JSON-RPC interface."""
    text = (
        '{"name": "deep", "description": "An agent", "version": "1", '
        '"supportedInterfaces": [{"url": "URL", "protocolBinding": "JSONRPC", '
        '"protocolVersion": "1.0"}], '
        '"capabilities": {"streaming": true, "extensions": [{"uri": "urn:x", "params": PARAMS}]}, '
        '"defaultInputModes": ["text/plain"], "defaultOutputModes": ["text/plain"], "skills": []}'
    )
    return text.replace("URL", interface_url).replace("PARAMS", params).encode()


def json_reply(body: bytes, status: int = 200) -> HttpReply:
    return HttpReply(status, {"content-type": "application/json"}, body)


def agent(endpoint: str) -> ipb.Integration:
    return ipb.Integration(
        kind=ipb.INTEGRATION_KIND_A2A_AGENT, endpoint=endpoint, display_name="Agent"
    )


async def invoke(stub: Stub, world: World, tool: str, **arguments: Any) -> ipb.InvokeToolResponse:
    response: ipb.InvokeToolResponse = await stub.InvokeTool(
        ipb.InvokeToolRequest(name=tool, arguments=struct(**arguments)),
        metadata=world.editor.md,
        timeout=CALL_DEADLINE_S,
    )
    return response


async def malformed(call: Awaitable[Any], *words: str) -> aio.AioRpcError:
    """``call`` fails UNAVAILABLE (a dependency's, not the circuit's) saying ``words``."""
    error = await refused(call, CODE.UNAVAILABLE)
    assert reason(error) == UNAVAILABLE, error.details()
    for word in words:
        assert word in (error.details() or ""), error.details()
    return error


async def hub_world(server: SwitchboardServer, channel: aio.Channel) -> tuple[Stub, World]:
    return integration_stub(channel), await ctx_world(server, context_stub(channel))


# -- an A2A agent's card -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"[" * MIB, id="a-mebibyte-of-brackets"),
        pytest.param(card(params=nested_objects(5000, "params")), id="params-5000-deep"),
    ],
)
async def test_an_agent_card_nested_too_deep_is_unavailable_until_the_circuit_opens(
    body: bytes,
) -> None:
    with recording() as site:
        site.routes[CARD] = json_reply(body)
        async with hub_mesh(integration_breaker_failures=2) as (server, channel):
            stub, world = await hub_world(server, channel)
            made = await create(stub, world.owner, world.name, agent(site.url(CARD)))
            tool = f"{made.name}/tools/send_message"
            for _ in range(2):
                await malformed(invoke(stub, world, tool, input="hi"), "the agent card", DEEP)
            opened = await refused(invoke(stub, world, tool, input="hi"), CODE.UNAVAILABLE)
            assert reason(opened) == "ERROR_REASON_CIRCUIT_OPEN"
            # The probe reads the card too: the integration's health says why.
            hub = built(server, IntegrationHub)
            await hub.probe_all()
            await hub.probe_all()
            got = await stub.GetIntegration(
                ipb.GetIntegrationRequest(name=made.name),
                metadata=world.viewer.md,
                timeout=CALL_DEADLINE_S,
            )
            status = got.integration.status
            assert status.health == ipb.HEALTH_STATE_UNHEALTHY
            assert status.last_error.code == CODE.UNAVAILABLE.value[0]
            assert DEEP in status.last_error.message


async def test_a_workspace_expert_whose_card_is_too_deep_is_down_until_its_card_is_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A down agent is asked again 5 s after it went down; sooner here, the same path.
    monkeypatch.setattr(remote_a2a, "RETRY_AFTER_S", 0.5)
    with recording() as site:
        site.routes[CARD] = json_reply(card(params=nested_objects(5000, "params")))
        # GetTask of an unknown task: the agent's own answer, which is what a probe wants.
        site.routes["/a2a"] = json_reply(
            b'{"jsonrpc": "2.0", "id": 1, "error": {"code": -32001, "message": "no such task"}}'
        )
        async with hub_mesh() as (server, channel):
            stub, world = await hub_world(server, channel)
            await create(stub, world.owner, world.name, agent(site.url(CARD)), integration_id="ag")
            dispatcher = dispatcher_stub(channel)

            async def expert_listed(available: bool) -> bool:
                listed = await dispatcher.ListHandlers(
                    pb.ListHandlersRequest(parent=world.name),
                    metadata=world.viewer.md,
                    timeout=CALL_DEADLINE_S,
                )
                return any(
                    h.integration.endswith("/integrations/ag") and h.available == available
                    for h in listed.handlers
                )

            # The refresh that describes it read the card and marked it down.
            await eventually(lambda: expert_listed(False), "the expert marked down")
            # Still down later: a card that cannot be read is no card.
            assert await expert_listed(False)
            # The refresh keeps going: once the card can be read, the expert is back.
            site.routes[CARD] = json_reply(card(site.url("/a2a")))
            await eventually(lambda: expert_listed(True), "the expert back", timeout_s=30.0)


async def test_an_agent_answering_json_rpc_nested_too_deep_is_unavailable() -> None:
    with recording() as site:
        site.routes[CARD] = json_reply(card(site.url("/a2a")))
        site.routes["/a2a"] = json_reply(b"[" * MIB)
        async with hub_mesh() as (server, channel):
            stub, world = await hub_world(server, channel)
            made = await create(stub, world.owner, world.name, agent(site.url(CARD)))
            await malformed(
                invoke(stub, world, f"{made.name}/tools/send_message", input="hi"), DEEP
            )
            assert site.requests_to("/a2a")


# -- MCP -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [5000, MAX_DEPTH + 6])
async def test_an_mcp_server_answering_nested_json_over_http(depth: int) -> None:
    with NestedMcp(call_depth=depth) as mcp:
        async with mcp_hub(mcp.url, integration_breaker_failures=2) as hub:
            tool = f"{hub.integration}/tools/deep"
            for _ in range(2):
                await malformed(invoke(hub.stub, hub.world, tool), "tools/call", DEEP)
            opened = await refused(invoke(hub.stub, hub.world, tool), CODE.UNAVAILABLE)
            assert reason(opened) == "ERROR_REASON_CIRCUIT_OPEN"
            assert mcp.calls == 2


async def test_an_mcp_server_answering_at_the_limit_is_answered() -> None:
    """The JSON-RPC envelope counts: a message 24 deep holds a result 22 deep."""
    with NestedMcp(call_depth=MAX_DEPTH - 2) as mcp:
        async with mcp_hub(mcp.url) as hub:
            answer = await invoke(hub.stub, hub.world, f"{hub.integration}/tools/deep")
    assert answer.text == "deep"
    assert json_format.MessageToDict(answer.result) == json.loads(
        nested_objects(MAX_DEPTH - 2).replace("1", "1.0")
    )


@pytest.mark.parametrize(
    ("depth", "words"),
    [
        # Past what pydantic's parser reads: a line that is not JSON-RPC ends the session.
        (5000, ("not valid JSON-RPC",)),
        # Read by pydantic, refused before anything walks it.
        (MAX_DEPTH + 6, ("structured content", DEEP)),
    ],
)
async def test_an_mcp_server_answering_nested_json_over_stdio(
    depth: int, words: tuple[str, ...]
) -> None:
    setting = stdio_setting("nested", call_depth=depth)
    async with mcp_hub("stdio:nested", integration_mcp_stdio_servers=setting) as hub:
        await malformed(invoke(hub.stub, hub.world, f"{hub.integration}/tools/deep"), *words)


@pytest.mark.parametrize("over", ["http", "stdio"])
async def test_an_mcp_tool_schema_nested_too_deep(over: str) -> None:
    with NestedMcp(schema_depth=MAX_DEPTH + 6) as mcp:
        endpoint, settings = mcp.url, {}
        if over == "stdio":
            endpoint = "stdio:nested"
            setting = stdio_setting("nested", schema_depth=MAX_DEPTH + 6)
            settings = {"integration_mcp_stdio_servers": setting}
        async with mcp_hub(endpoint, **settings) as hub:
            await malformed(
                hub.stub.ListTools(
                    ipb.ListToolsRequest(parent=hub.integration),
                    metadata=hub.world.viewer.md,
                    timeout=CALL_DEADLINE_S,
                ),
                DEEP,
            )


# -- a gRPC expert's Struct ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("depth", "words"),
    [
        # Deeper than protobuf's decoder goes: grpc hands over no message at all.
        (200, ("cannot be decoded",)),
        # Decoded, and deeper than JSON from outside may be.
        (MAX_DEPTH + 6, (DEEP,)),
    ],
)
async def test_a_grpc_expert_answering_a_nested_struct(depth: int, words: tuple[str, ...]) -> None:
    async with (
        NestedExpert(depth) as remote,
        hub_mesh(integration_breaker_failures=2) as (
            server,
            channel,
        ),
    ):
        stub, world = await hub_world(server, channel)
        made = await create(stub, world.owner, world.name, expert(remote.endpoint))
        tool = f"{made.name}/tools/deep"
        for _ in range(2):
            await malformed(invoke(stub, world, tool, input="hi"), *words)
        opened = await refused(invoke(stub, world, tool, input="hi"), CODE.UNAVAILABLE)
        assert reason(opened) == "ERROR_REASON_CIRCUIT_OPEN"


@pytest.mark.parametrize("depth", [200, MAX_DEPTH + 6])
async def test_a_run_on_a_grpc_expert_answering_a_nested_struct_fails_precisely(
    depth: int,
) -> None:
    async with NestedExpert(depth) as remote, hub_mesh() as (server, channel):
        stub, world = await hub_world(server, channel)
        await create(stub, world.owner, world.name, expert(remote.endpoint), integration_id="deep")
        contexts, dispatcher = context_stub(channel), dispatcher_stub(channel)
        conversation = (await create_conversation(contexts, world.editor, world.name)).name
        sent = await send(
            dispatcher, world.editor, request(conversation, "hi", handler="handlers/deep")
        )
        run = (await watch_all(dispatcher, world.editor, sent.run.name)).final
    assert run.state == pb.RUN_STATE_FAILED
    assert reason_of(run) == "ERROR_REASON_HANDLER_FAILED"
    assert run.error.code == CODE.UNAVAILABLE.value[0]
    assert "remote handler 'deep' answered with a message" in run.error.message
    assert remote.handled == 1


# -- a model's stream ----------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [5000, MAX_DEPTH + 1])
async def test_a_model_streaming_a_nested_chunk_fails_the_run_precisely(depth: int) -> None:
    async with FakeOpenAI() as model:
        # One chunk of text shown, then the nested one: the answer is cut off.
        model.script(Reply.nested_after(1, depth))
        async with hub_mesh(llm_base_url=model.url, llm_model="m-1", llm_max_retries=0) as (
            server,
            channel,
        ):
            world = await ctx_world(server, context_stub(channel))
            contexts, dispatcher = context_stub(channel), dispatcher_stub(channel)
            conversation = (await create_conversation(contexts, world.editor, world.name)).name
            sent = await send(
                dispatcher, world.editor, request(conversation, "hi", handler="handlers/llm")
            )
            run = (await watch_all(dispatcher, world.editor, sent.run.name)).final
    assert run.state == pb.RUN_STATE_FAILED
    assert reason_of(run) == "ERROR_REASON_HANDLER_FAILED"
    assert run.error.code == CODE.UNAVAILABLE.value[0]
    assert f"a chunk {DEEP}" in run.error.message


# -- a webhook receiver's answer -------------------------------------------------------------------


async def _settled(stub: Stub, world: World, name: str, count: int) -> list[ipb.WebhookDelivery]:
    async def listed() -> list[ipb.WebhookDelivery] | None:
        page = await stub.ListWebhookDeliveries(
            ipb.ListWebhookDeliveriesRequest(parent=name, page_size=100),
            metadata=world.viewer.md,
            timeout=CALL_DEADLINE_S,
        )
        found = list(page.deliveries)
        done = all(d.last_http_status for d in found)
        return found if len(found) >= count and done else None

    result: list[ipb.WebhookDelivery] = await eventually(listed, f"{count} deliveries settled")
    return result


@pytest.mark.parametrize("status", [200, 500])
async def test_a_webhook_answering_nested_json_is_never_parsed(status: int) -> None:
    """A receiver's body is at most a snippet of text in the delivery's error: a body
    a mebibyte of ``[`` deep is a success (2xx) or a failed attempt, like any other."""
    with recording() as site:
        site.routes["/hook"] = json_reply(b"[" * MIB, status)
        async with hub_mesh() as (server, channel):
            stub, world = await hub_world(server, channel)
            hook = await create(
                stub,
                world.owner,
                world.name,
                webhook(site.url("/hook"), event_types=["MESSAGE_CREATED"]),
            )
            contexts = context_stub(channel)
            conversation = await create_conversation(contexts, world.editor, world.name)
            await append(contexts, world.editor, conversation.name, "hello")
            (delivery,) = await _settled(stub, world, hook.name, 1)
    assert delivery.last_http_status == status
    if status == 200:
        assert delivery.state == ipb.DELIVERY_STATE_SUCCEEDED
    else:
        assert delivery.last_error.startswith("HTTP 500: [[[")


async def test_the_log_says_why_an_agent_is_down(caplog: pytest.LogCaptureFixture) -> None:
    """Its card's problem in words, never the card."""
    with recording() as site:
        site.routes[CARD] = json_reply(b"[" * MIB)
        async with hub_mesh() as (server, channel):
            stub, world = await hub_world(server, channel)
            await create(stub, world.owner, world.name, agent(site.url(CARD)), integration_id="ag")
            dispatcher = dispatcher_stub(channel)

            async def warned() -> bool:
                await dispatcher.ListHandlers(
                    pb.ListHandlersRequest(parent=world.name),
                    metadata=world.viewer.md,
                    timeout=CALL_DEADLINE_S,
                )
                return any(r.getMessage() == "A2A agent unreachable" for r in caplog.records)

            await eventually(warned, "the warning")
    record = next(r for r in caplog.records if r.getMessage() == "A2A agent unreachable")
    assert DEEP in record.__dict__["reason"]
    assert "[[[" not in record.__dict__["reason"]
