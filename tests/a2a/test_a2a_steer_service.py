"""A message to a working A2A task steers its run (docs/a2a.md, "Steering a working task"),
driven by the official ``a2a-sdk`` client over its gRPC transport against a real server.

The run is the llm handler's on the local model server (``FakeOpenAI``) with an MCP tool:
its first model call (a tool call) is held until the steer has been sent, so the steer
arrives while the task is working and is consumed at the next step boundary: the model's
second request holds it, after the tool's result. The task's subscription shows the steer
accepted, then consumed at step 2. A message to a task that has ended is A2A's
UNSUPPORTED_OPERATION and stores nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from typing import Any

import pytest
from a2a.client import ClientConfig, ClientFactory
from a2a.client.auth.interceptor import AuthInterceptor
from a2a.client.client import Client
from a2a.types import a2a_pb2 as a2a
from a2a.utils.errors import UnsupportedOperationError
from google.protobuf import json_format
from grpc import aio

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as dpb
from tests.a2a.test_a2a import CODE, _Token, answer_of, request, stub
from tests.conftest import CALL_DEADLINE_S
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.infra.mcpserver import McpTestServer
from tests.kits.authkit import reasons
from tests.kits.contextkit import Caller, context_stub, refused
from tests.kits.dispatchkit import dispatcher_stub
from tests.kits.integrationkit import McpHub, mcp_hub

pytestmark = pytest.mark.service

STEER = "use the other account"


def _client(card: a2a.AgentCard, caller: Caller, *, streaming: bool = True) -> Client:
    config = ClientConfig(
        streaming=streaming,
        supported_protocol_bindings=["GRPC"],
        grpc_channel_factory=aio.insecure_channel,
    )
    return ClientFactory(config).create(card, interceptors=[AuthInterceptor(_Token(caller.token))])


def _steer_details(event: a2a.StreamResponse) -> dict[str, Any] | None:
    """The ``steer`` data of a steer's status update, None for any other event."""
    if not event.HasField("status_update"):
        return None
    for part in event.status_update.status.message.parts:
        if part.HasField("data"):
            found = json_format.MessageToDict(part.data)
            if isinstance(found, dict) and "steer" in found:
                steer: dict[str, Any] = found["steer"]
                return steer
    return None


def _steer_task(message: a2a.Message) -> str:
    """The steer's own task, as its message in a task's history names it."""
    return str(
        message.metadata.fields["switchboard.steer"].struct_value.fields["task_id"].string_value
    )


async def _tooled_agent(hub: McpHub) -> a2a.AgentCard:
    """An llm assistant that may call the MCP ``echo`` without asking, as an A2A agent."""
    world = hub.world
    await dispatcher_stub(hub.channel).CreateAssistant(
        dpb.CreateAssistantRequest(
            parent=world.name,
            assistant_id="worker",
            assistant=dpb.Assistant(
                display_name="Worker",
                handler="handlers/llm",
                tools=[dpb.AssistantTools(integration=hub.integration, tools=["echo"])],
            ),
        ),
        metadata=world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    card: a2a.AgentCard = await stub(hub.channel).GetExtendedAgentCard(
        a2a.GetExtendedAgentCardRequest(tenant=world.name.removeprefix("workspaces/") + ".worker"),
        metadata=world.editor.md,
        timeout=CALL_DEADLINE_S,
    )
    return card


async def test_a_message_to_a_working_task_is_consumed_between_two_tool_steps() -> None:
    with McpTestServer() as mcp:
        async with FakeOpenAI() as fake:
            settings: dict[str, Any] = {
                "llm_base_url": fake.url,
                "llm_model": "m-1",
                "llm_max_retries": 0,
            }
            async with mcp_hub(mcp.url, **settings) as hub:
                card = await _tooled_agent(hub)
                # Step 1's answer (a tool call) waits until the steer is in.
                gate = asyncio.Event()
                fake.script(
                    dataclasses.replace(
                        Reply.tool_calls([("mcp__echo", {"message": "one"}, "c1")]), gate=gate
                    ),
                    lambda body: Reply.text(
                        "Heard: "
                        + " | ".join(
                            str(m["content"]) for m in body["messages"] if m.get("role") == "user"
                        )
                    ),
                )
                editor = hub.world.editor
                client = _client(card, editor, streaming=False)
                streaming = _client(card, editor)
                try:
                    first = a2a.SendMessageRequest(
                        message=a2a.Message(
                            message_id=str(uuid.uuid4()),
                            role=a2a.ROLE_USER,
                            parts=[a2a.Part(text="echo one")],
                        )
                    )
                    first.configuration.return_immediately = True
                    [started] = [event.task async for event in client.send_message(first)]
                    await fake.wait_requests(1)  # the run is in its first model call
                    # The task's subscription, open before the steer.
                    events = streaming.subscribe(a2a.SubscribeToTaskRequest(id=started.id))
                    snapshot = await anext(events)
                    assert snapshot.task.status.state == a2a.TASK_STATE_WORKING
                    rest = asyncio.create_task(_collect(events))

                    steer_id = str(uuid.uuid4())
                    steer = a2a.SendMessageRequest(
                        message=a2a.Message(
                            message_id=steer_id,
                            task_id=started.id,
                            context_id=started.context_id,
                            role=a2a.ROLE_USER,
                            parts=[a2a.Part(text=STEER)],
                        )
                    )
                    steer.configuration.return_immediately = True
                    [answered] = [event.task async for event in client.send_message(steer)]
                    # The same task, still working, the steer recorded in its history.
                    assert answered.id == started.id
                    assert answered.status.state == a2a.TASK_STATE_WORKING
                    assert [m.parts[0].text for m in answered.history] == ["echo one", STEER]
                    assert [m.role for m in answered.history] == [a2a.ROLE_USER] * 2
                    steer_task = _steer_task(answered.history[-1])
                    assert steer_task != started.id
                    # The same message id again is the same steer (idempotent), not a second.
                    [again] = [event.task async for event in client.send_message(steer)]
                    assert again.history[-1].message_id == answered.history[-1].message_id
                    assert _steer_task(again.history[-1]) == steer_task

                    gate.set()
                    streamed = await asyncio.wait_for(rest, CALL_DEADLINE_S)
                finally:
                    await client.close()
                    await streaming.close()

                # The model's second request holds the steer, after step 1's tool result.
                assert len(fake.requests) == 2
                messages = fake.requests[1].body["messages"]
                roles = [m.get("role") for m in messages]
                steered_at = next(
                    i for i, m in enumerate(messages) if m.get("role") == "user" and STEER in str(m)
                )
                assert roles.index("tool") < steered_at
                # The subscription: the steer accepted, then consumed before step 2, each a
                # status update that keeps the task working; then the answer and the end.
                steers = [(e, d) for e in streamed if (d := _steer_details(e)) is not None]
                assert [d["state"] for _, d in steers] == ["accepted", "consumed"]
                assert steers[1][1]["step"] == 2
                assert all(d["task_id"] == steer_task for _, d in steers)
                assert all(
                    e.status_update.status.state == a2a.TASK_STATE_WORKING for e, _ in steers
                )
                assert streamed[-1].status_update.status.state == a2a.TASK_STATE_COMPLETED
                # The steer's own task was answered by the steered one: completed.
                async with aio.insecure_channel(card.supported_interfaces[0].url) as channel:
                    tenant = card.supported_interfaces[0].tenant
                    own = await stub(channel).GetTask(
                        a2a.GetTaskRequest(tenant=tenant, id=steer_task),
                        metadata=editor.md,
                        timeout=CALL_DEADLINE_S,
                    )
                    done = await stub(channel).GetTask(
                        a2a.GetTaskRequest(tenant=tenant, id=started.id),
                        metadata=editor.md,
                        timeout=CALL_DEADLINE_S,
                    )
                assert own.status.state == a2a.TASK_STATE_COMPLETED
                assert STEER in answer_of(done)


async def _collect(events: Any) -> list[a2a.StreamResponse]:
    return [event async for event in events]


async def test_a_message_to_a_task_that_ended_is_refused_and_stores_nothing() -> None:
    with McpTestServer() as mcp:
        async with mcp_hub(mcp.url) as hub:
            world = hub.world
            await dispatcher_stub(hub.channel).CreateAssistant(
                dpb.CreateAssistantRequest(
                    parent=world.name,
                    assistant_id="echoer",
                    assistant=dpb.Assistant(display_name="Echoer", handler="handlers/echo"),
                ),
                metadata=world.owner.md,
                timeout=CALL_DEADLINE_S,
            )
            tenant = world.name.removeprefix("workspaces/") + ".echoer"
            a2a_stub = stub(hub.channel)
            done = await a2a_stub.SendMessage(
                request("hello", tenant), metadata=world.editor.md, timeout=CALL_DEADLINE_S
            )
            ended = done.task
            assert ended.status.state == a2a.TASK_STATE_COMPLETED
            conversation = f"{world.name}/conversations/{ended.context_id}"

            async def stored() -> list[str]:
                listed = await context_stub(hub.channel).ListMessages(
                    cpb.ListMessagesRequest(parent=conversation, page_size=100),
                    metadata=world.editor.md,
                    timeout=CALL_DEADLINE_S,
                )
                return [m.name for m in listed.messages]

            before = await stored()
            late = request("one more thing", tenant, context_id=ended.context_id)
            late.message.task_id = ended.id
            # Over the wire: A2A's reason first, then ours (the dispatcher's RUN_ENDED).
            error = await refused(
                a2a_stub.SendMessage(late, metadata=world.editor.md, timeout=CALL_DEADLINE_S),
                CODE.FAILED_PRECONDITION,
            )
            assert reasons(error) == [
                ("a2a-protocol.org", "UNSUPPORTED_OPERATION"),
                ("switchboard.dev", "ERROR_REASON_RUN_ENDED"),
            ]
            assert "task" in (error.details() or "")
            assert "runs/" not in (error.details() or "")
            # The official client raises A2A's typed error, streaming or not.
            card = await a2a_stub.GetExtendedAgentCard(
                a2a.GetExtendedAgentCardRequest(tenant=tenant),
                metadata=world.editor.md,
                timeout=CALL_DEADLINE_S,
            )
            for streaming in (False, True):
                client = _client(card, world.editor, streaming=streaming)
                try:
                    late.message.message_id = str(uuid.uuid4())
                    late.tenant = ""
                    with pytest.raises(UnsupportedOperationError):
                        async for _ in client.send_message(late):
                            pass
                finally:
                    await client.close()
            # Nothing stored: no message, no task.
            assert await stored() == before
            listed = await a2a_stub.ListTasks(
                a2a.ListTasksRequest(tenant=tenant, context_id=ended.context_id),
                metadata=world.editor.md,
                timeout=CALL_DEADLINE_S,
            )
            assert [task.id for task in listed.tasks] == [ended.id]
