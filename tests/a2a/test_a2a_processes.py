"""The A2A front door as its own process: it reaches the dispatcher and the context
service in other processes through their contracts only.

Three real processes on one PostgreSQL and one Redis: auth, context, events and
integration in one; a dispatcher in another (it reaches context over gRPC); the
a2a front door in a third (``SWITCHBOARD_DISPATCHER_ADDRESS`` and
``SWITCHBOARD_CONTEXT_ADDRESS``). The official SDK client, built from the card
the a2a process serves, streams an answer, reads and lists the task; a stranger
learns nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from a2a.client import ClientConfig, ClientFactory
from a2a.client.auth.interceptor import AuthInterceptor
from a2a.types import a2a_pb2 as a2a
from grpc import aio

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as dpb
from tests.a2a.test_a2a import _Token, stub
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.procs import ServeProcess, shared_env
from tests.infra.redis import RedisServer
from tests.kits.authkit import PASSWORD, reason, unique_email
from tests.kits.contextkit import Caller, context_stub, create_workspace, refused, violations
from tests.kits.dispatchkit import dispatcher_stub

pytestmark = pytest.mark.e2e

BUDGET = "https://switchboard.dev/a2a/extensions/budget/v1"


@pytest.fixture
def env(tmp_path: Path, postgres_url: str, redis_server: RedisServer) -> dict[str, str]:
    return shared_env(tmp_path, postgres_url, redis_server.url)


@pytest.fixture
def processes(env: dict[str, str]) -> Iterator[tuple[ServeProcess, ServeProcess, ServeProcess]]:
    with ServeProcess("--services", "auth,context,events,integration", env=env) as front:
        dispatcher_env = {**env, "SWITCHBOARD_CONTEXT_ADDRESS": front.address}
        with ServeProcess("--services", "dispatcher", env=dispatcher_env) as dispatcher:
            a2a_env = {
                **env,
                "SWITCHBOARD_CONTEXT_ADDRESS": front.address,
                "SWITCHBOARD_DISPATCHER_ADDRESS": dispatcher.address,
            }
            with ServeProcess("--services", "a2a", env=a2a_env) as front_door:
                yield front, dispatcher, front_door


async def _register(channel: aio.Channel) -> Caller:
    response = await auth_pb2_grpc.AuthServiceStub(channel).Register(
        auth_pb2.RegisterRequest(email=unique_email("a2a"), password=PASSWORD),
        timeout=CALL_DEADLINE_S,
    )
    return Caller(response.user.name.removeprefix("users/"), response.tokens.access_token)


async def test_the_front_door_in_its_own_process(
    processes: tuple[ServeProcess, ServeProcess, ServeProcess],
) -> None:
    front, dispatcher, front_door = processes
    async with aio.insecure_channel(front.address) as channel:
        owner, stranger = await _register(channel), await _register(channel)
        workspace = (await create_workspace(context_stub(channel), owner, "A2A")).name
    async with aio.insecure_channel(dispatcher.address) as channel:
        await dispatcher_stub(channel).CreateAssistant(
            dpb.CreateAssistantRequest(
                parent=workspace,
                assistant_id="echoer",
                assistant=dpb.Assistant(display_name="Echoer", handler="handlers/echo"),
            ),
            metadata=owner.md,
            timeout=CALL_DEADLINE_S,
        )
    tenant = workspace.removeprefix("workspaces/") + ".echoer"
    async with aio.insecure_channel(front_door.address) as channel:
        card = await stub(channel).GetExtendedAgentCard(
            a2a.GetExtendedAgentCardRequest(tenant=tenant),
            metadata=owner.md,
            timeout=CALL_DEADLINE_S,
        )
        assert card.supported_interfaces[0].url == front_door.address
        await refused(
            stub(channel).GetExtendedAgentCard(
                a2a.GetExtendedAgentCardRequest(tenant=tenant),
                metadata=stranger.md,
                timeout=CALL_DEADLINE_S,
            ),
            grpc.StatusCode.NOT_FOUND,
        )
    config = ClientConfig(
        supported_protocol_bindings=["GRPC"], grpc_channel_factory=aio.insecure_channel
    )
    client = ClientFactory(config).create(card, interceptors=[AuthInterceptor(_Token(owner.token))])
    events: list[Any] = []
    try:
        async for event in client.send_message(
            a2a.SendMessageRequest(
                message=a2a.Message(
                    message_id=str(uuid.uuid4()),
                    role=a2a.ROLE_USER,
                    parts=[a2a.Part(text="across three processes")],
                )
            )
        ):
            events.append(event)
    finally:
        await client.close()
    assert events[0].HasField("task")
    assert events[-1].status_update.status.state == a2a.TASK_STATE_COMPLETED
    streamed = "".join(
        part.text
        for event in events
        if event.HasField("artifact_update")
        for part in event.artifact_update.artifact.parts
    )
    assert streamed.startswith("across three processes")
    task_id = events[-1].status_update.task_id
    async with aio.insecure_channel(front_door.address) as channel:
        got = await stub(channel).GetTask(
            a2a.GetTaskRequest(tenant=tenant, id=task_id),
            metadata=owner.md,
            timeout=CALL_DEADLINE_S,
        )
        assert got.status.state == a2a.TASK_STATE_COMPLETED
        assert got.history[0].parts[0].text == "across three processes"
        assert "".join(p.text for p in got.artifacts[0].parts) == streamed
        listed = await stub(channel).ListTasks(
            a2a.ListTasksRequest(tenant=tenant, context_id=got.context_id),
            metadata=owner.md,
            timeout=CALL_DEADLINE_S,
        )
        assert [task.id for task in listed.tasks] == [task_id]
        # Every context's (the dispatcher's ListRuns of the workspace, over its contract),
        # counted; a stranger learns nothing.
        everywhere = await stub(channel).ListTasks(
            a2a.ListTasksRequest(tenant=tenant), metadata=owner.md, timeout=CALL_DEADLINE_S
        )
        assert ([task.id for task in everywhere.tasks], everywhere.total_size) == ([task_id], 1)
        await refused(
            stub(channel).ListTasks(
                a2a.ListTasksRequest(tenant=tenant), metadata=stranger.md, timeout=CALL_DEADLINE_S
            ),
            grpc.StatusCode.NOT_FOUND,
        )
        await refused(
            stub(channel).GetTask(
                a2a.GetTaskRequest(tenant=tenant, id=task_id),
                metadata=stranger.md,
                timeout=CALL_DEADLINE_S,
            ),
            grpc.StatusCode.NOT_FOUND,
        )
        # An error the dispatcher process raised, in the A2A caller's terms.
        first = a2a.SendMessageRequest(
            tenant=tenant,
            message=a2a.Message(
                message_id="same-id", role=a2a.ROLE_USER, parts=[a2a.Part(text="one")]
            ),
        )
        await stub(channel).SendMessage(first, metadata=owner.md, timeout=CALL_DEADLINE_S)
        first.message.parts[0].text = "another"
        error = await refused(
            stub(channel).SendMessage(first, metadata=owner.md, timeout=CALL_DEADLINE_S),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert violations(error) == ["message.message_id"]
        # A budget handed in the budget extension reaches the dispatcher process as its
        # x-switchboard-budget metadata: nothing left of it refuses the message there.
        spent = a2a.SendMessageRequest(
            tenant=tenant,
            message=a2a.Message(
                message_id=str(uuid.uuid4()), role=a2a.ROLE_USER, parts=[a2a.Part(text="x")]
            ),
        )
        spent.message.metadata.update({BUDGET: {"cost_micros": 0}})
        error = await refused(
            stub(channel).SendMessage(spent, metadata=owner.md, timeout=CALL_DEADLINE_S),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
        assert reason(error) == "ERROR_REASON_BUDGET_EXHAUSTED"
