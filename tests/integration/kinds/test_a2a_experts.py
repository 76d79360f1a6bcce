"""A2A agents as domain experts: an agent built with the official SDK's server side
(tests/e2e/a2aagent.py) as a real process, registered at runtime as an integration of kind
INTEGRATION_KIND_A2A_AGENT with its Agent Card URL, answering Switchboard runs.

Over gRPC (what the card offers first) and JSON-RPC (an agent that offers nothing else):
text streamed as deltas, input-required as an answer the next message continues, a
cancelled run cancelling the remote task, a dropped stream resumed with SubscribeToTask,
an agent killed and restarted mid-run failing the run precisely, and the egress policy
refusing a card URL or a card's interface on a refused address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from a2a.types import a2a_pb2 as a2a
from a2a.types import a2a_pb2_grpc
from google.protobuf import json_format
from grpc import aio

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.handler.v1 import handler_pb2
from switchboard.api.integration.v1 import integration_pb2 as ipb
from switchboard.integration.kinds.a2a import TOOL_NAME, A2AAgent, A2AAgentConnector
from switchboard.platform.errors import DestinationBlocked
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.security.egress import EgressPolicy
from switchboard.platform.values.idempotency import call_key, handler_key
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.a2aproc import A2AAgentProcess
from tests.e2e.expertkit import (
    istub_fixture,
    listed,
    served_fixture,
    until_listed,
    world_fixture,
)
from tests.e2e.procs import ServeProcess, scaled_env, shared_secrets
from tests.infra.redis import RedisServer
from tests.infra.tcprelay import TcpRelay
from tests.kits.authkit import register as register_user
from tests.kits.contextkit import (
    Caller,
    World,
    context_stub,
    create_conversation,
    create_workspace,
    ctx_world,
)
from tests.kits.contextkit import Stub as CStub
from tests.kits.dispatchkit import Stub as DStub
from tests.kits.dispatchkit import (
    cancel,
    dispatcher_stub,
    limited,
    reason_of,
    request,
    send,
    until,
    watch_all,
)
from tests.kits.integrationkit import Stub as IStub
from tests.kits.integrationkit import create, integration_stub

pytestmark = pytest.mark.e2e

TOKEN = "a2a-agent-token-0123456789"
LOOPBACK = EgressPolicy(allow_loopback=True)
RUN_WAIT_S = 30.0


def a2a_agent(card_url: str, **fields: object) -> ipb.Integration:
    fields.setdefault("display_name", "A2A agent")
    return ipb.Integration(
        kind=ipb.INTEGRATION_KIND_A2A_AGENT,
        endpoint=card_url,
        **fields,  # type: ignore[arg-type]
    )


served, istub, world = served_fixture, istub_fixture, world_fixture


@pytest.fixture
def agent() -> Iterator[A2AAgentProcess]:
    with A2AAgentProcess(token=TOKEN) as process:
        yield process


async def _registered(
    istub: IStub, world: World, dstub: DStub, card_url: str, integration_id: str
) -> str:
    await create(
        istub,
        world.owner,
        world.name,
        a2a_agent(card_url, credential=TOKEN),
        integration_id=integration_id,
    )
    handler = f"handlers/{integration_id}"
    await until_listed(dstub, world, handler, available=True)
    return handler


def _task_of(result: handler_pb2.HandleResult) -> dict[str, str]:
    for part in result.parts:
        if part.WhichOneof("part") == "data" and "a2a_task" in part.data.fields:
            found = json_format.MessageToDict(part.data)["a2a_task"]
            assert isinstance(found, dict)
            return {str(k): str(v) for k, v in found.items()}
    raise AssertionError(f"no a2a_task part in {result}")


def _result(seen_updates: list[pb.RunUpdate]) -> handler_pb2.HandleResult:
    found = [u.result for u in seen_updates if u.WhichOneof("update") == "result"]
    assert found, "the run sent no result"
    return found[-1]


# -- routed runs ----------------------------------------------------------------------------


async def test_an_agent_registered_at_runtime_answers_runs_and_asks_for_input(
    served: tuple[SwitchboardServer, CStub, DStub],
    istub: IStub,
    world: World,
    agent: A2AAgentProcess,
) -> None:
    _, cstub, dstub = served
    conversation = (await create_conversation(cstub, world.editor, world.name)).name
    handler = await _registered(istub, world, dstub, agent.card_url, "helper")
    found = (await listed(dstub, world))[handler]
    # Described by its card; a workspace's expert names its integration.
    assert found.capabilities.display_name == "Test agent"
    assert found.kind == pb.HANDLER_KIND_REMOTE
    assert found.integration == f"{world.name}/integrations/helper"
    assert list(found.capabilities.topics) == ["test", "chat"]

    sent = await send(dstub, world.editor, request(conversation, "hello there", handler=handler))
    seen = await watch_all(dstub, world.editor, sent.run.name)
    assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error.message
    assert seen.text == "you said hello there"
    # The agent's working message is progress; its text came as deltas (two chunks).
    stages = [u.progress.stage for u in seen.updates if u.WhichOneof("update") == "progress"]
    assert stages == ["thinking"]
    result = _result(seen.updates)
    assert result.parts[0].text == "you said hello there"
    assert result.finish_reason == "stop"
    first = _task_of(result)
    assert first["state"] == "completed"
    # The credential reached the agent (it rejects a message without it).
    line = await agent.wait_for_line(lambda text: text.endswith("hello there"))
    assert line.split()[2] == first["context"]
    # The message id is the run's idempotency key, the same on every attempt.
    assert f"message {first['task']} {handler_key(sent.run.name)}" in agent.lines()

    # Input-required: the run's answer is the question; the next message answers it.
    sent = await send(dstub, world.editor, request(conversation, "ask", handler=handler))
    seen = await watch_all(dstub, world.editor, sent.run.name)
    assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error.message
    assert seen.text == "What is your name?"
    asked = _result(seen.updates)
    assert asked.finish_reason == "input_required"
    waiting = _task_of(asked)
    assert waiting["state"] == "input-required"
    # One conversation, one A2A context.
    assert waiting["context"] == first["context"]

    sent = await send(dstub, world.editor, request(conversation, "Ada", handler=handler))
    seen = await watch_all(dstub, world.editor, sent.run.name)
    assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error.message
    assert seen.text == "hello Ada"
    answered = _task_of(_result(seen.updates))
    assert answered == {**waiting, "state": "completed"}  # the same task, continued
    # Continued under the continuing run's own key.
    assert f"message {answered['task']} {handler_key(sent.run.name)}" in agent.lines()

    # A failed task fails the run with the agent's reason.
    sent = await send(dstub, world.editor, request(conversation, "fail", handler=handler))
    seen = await watch_all(dstub, world.editor, sent.run.name)
    assert seen.final.state == pb.RUN_STATE_FAILED
    assert seen.final.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert reason_of(seen.final) == "ERROR_REASON_HANDLER_FAILED"
    assert seen.final.error.message.endswith("failed the task: cannot do that")


async def test_an_agent_that_offers_only_json_rpc_is_reached_over_json_rpc(
    served: tuple[SwitchboardServer, CStub, DStub], istub: IStub, world: World
) -> None:
    _, cstub, dstub = served
    with A2AAgentProcess(token=TOKEN, jsonrpc_only=True) as agent:
        assert agent.grpc_port == 0
        conversation = (await create_conversation(cstub, world.editor, world.name)).name
        handler = await _registered(istub, world, dstub, agent.card_url, "jsonrpc")
        sent = await send(dstub, world.editor, request(conversation, "over http", handler=handler))
        seen = await watch_all(dstub, world.editor, sent.run.name)
        assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error.message
        assert seen.text == "you said over http"


async def test_cancelling_the_run_cancels_the_remote_task(
    served: tuple[SwitchboardServer, CStub, DStub],
    istub: IStub,
    world: World,
    agent: A2AAgentProcess,
) -> None:
    _, cstub, dstub = served
    conversation = (await create_conversation(cstub, world.editor, world.name)).name
    handler = await _registered(istub, world, dstub, agent.card_url, "cancellable")
    sent = await send(dstub, world.editor, request(conversation, "hold", handler=handler))
    call, _ = await until(dstub, world.editor, sent.run.name, "delta")
    call.cancel()
    held = await agent.wait_for_line(lambda text: text.startswith("holding "))
    task_id = held.split()[1]

    await cancel(dstub, world.editor, sent.run.name, "enough")
    seen = await watch_all(dstub, world.editor, sent.run.name)
    assert seen.final.state == pb.RUN_STATE_CANCELLED
    # The run ended after its handler told the agent: the task is cancelled there.
    assert f"cancel {task_id}" in agent.lines()
    async with aio.insecure_channel(f"127.0.0.1:{agent.grpc_port}") as channel:
        stub = a2a_pb2_grpc.A2AServiceStub(channel)  # type: ignore[no-untyped-call]
        task = await stub.GetTask(a2a.GetTaskRequest(id=task_id), timeout=CALL_DEADLINE_S)
    assert task.status.state == a2a.TASK_STATE_CANCELED


async def test_a_dropped_stream_is_resumed_with_subscribe_to_task(
    served: tuple[SwitchboardServer, CStub, DStub], istub: IStub, world: World
) -> None:
    """The gRPC interface the card names is a relay the test cuts mid-answer: the handler
    resubscribes, and the answer is whole, nothing repeated."""
    _, cstub, dstub = served
    with TcpRelay() as relay:
        advertised = f"127.0.0.1:{relay.port}"
        with A2AAgentProcess(token=TOKEN, advertise_grpc=advertised) as agent:
            relay.retarget(agent.grpc_port)
            conversation = (await create_conversation(cstub, world.editor, world.name)).name
            handler = await _registered(istub, world, dstub, agent.card_url, "resumable")
            sent = await send(dstub, world.editor, request(conversation, "hold", handler=handler))
            call, _ = await until(dstub, world.editor, sent.run.name, "delta")
            call.cancel()
            held = await agent.wait_for_line(lambda text: text.startswith("holding "))
            task_id = held.split()[1]

            assert relay.cut() >= 1
            await agent.wait_for_line(lambda text: text == f"subscribe {task_id}")
            await agent.release()
            seen = await watch_all(dstub, world.editor, sent.run.name)
            assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error.message
            assert seen.text == "first half second half"
            assert _result(seen.updates).parts[0].text == "first half second half"
            assert [line for line in agent.lines() if line.startswith("cancel ")] == []


async def test_an_agent_killed_and_restarted_mid_run_fails_the_run_precisely(
    served: tuple[SwitchboardServer, CStub, DStub],
    istub: IStub,
    world: World,
    agent: A2AAgentProcess,
) -> None:
    """The agent keeps its tasks in memory: once back, it no longer knows the task, and the
    run fails saying so (as soon as the resubscription is answered, never at its deadline)."""
    _, cstub, dstub = served
    conversation = (await create_conversation(cstub, world.editor, world.name)).name
    handler = await _registered(istub, world, dstub, agent.card_url, "fragile")
    sent = await send(dstub, world.editor, request(conversation, "hold", handler=handler))
    call, _ = await until(dstub, world.editor, sent.run.name, "delta")
    call.cancel()
    await agent.wait_for_line(lambda text: text.startswith("holding "))

    started = time.monotonic()
    with agent.restart():
        async with asyncio.timeout(RUN_WAIT_S):
            seen = await watch_all(dstub, world.editor, sent.run.name)
    assert seen.final.state == pb.RUN_STATE_FAILED
    assert reason_of(seen.final) == "ERROR_REASON_HANDLER_FAILED"
    assert seen.final.error.message.endswith("no longer knows the task")
    assert seen.text == "first half"
    assert time.monotonic() - started < RUN_WAIT_S


# -- the egress policy ----------------------------------------------------------------------


async def test_a_card_url_on_a_refused_address_is_refused_at_registration() -> None:
    async with limited() as (server, cstub, _):  # loopback not allowed here
        world = await ctx_world(server, cstub)
        async with aio.insecure_channel(server.address) as channel:
            with pytest.raises(aio.AioRpcError) as caught:
                await create(
                    integration_stub(channel),
                    world.owner,
                    world.name,
                    a2a_agent("https://127.0.0.1:8443/.well-known/agent-card.json"),
                )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not an allowed destination" in (caught.value.details() or "")


async def test_a_card_naming_a_refused_interface_is_not_followed(
    agent: A2AAgentProcess,
) -> None:
    """The card's host is allowed, the gRPC address it names is not: nothing is dialled."""
    with A2AAgentProcess(advertise_grpc=f"127.0.0.2:{agent.grpc_port}") as pointing:
        only_card_host = EgressPolicy(allow_cidrs=(ipaddress.ip_network("127.0.0.1/32"),))
        client = A2AAgent(pointing.card_url, only_card_host, allow_plain_http=True)
        try:
            with pytest.raises(DestinationBlocked):
                await client.probe(CALL_DEADLINE_S)
        finally:
            await client.close()


# -- the hub's connector --------------------------------------------------------------------


async def test_the_connector_probes_lists_and_calls_the_agent(agent: A2AAgentProcess) -> None:
    connector = A2AAgentConnector(
        A2AAgent(agent.card_url, LOOPBACK, credential=TOKEN, allow_plain_http=True)
    )
    try:
        await connector.probe(CALL_DEADLINE_S)
        tools = await connector.list_tools(CALL_DEADLINE_S)
        assert [(tool.name, tool.title) for tool in tools] == [(TOOL_NAME, "Test agent")]
        key = call_key("workspaces/w1/runs/r1", "call-1")
        result = await connector.call_tool(
            TOOL_NAME,
            {"input": "a tool call"},
            timeout_s=CALL_DEADLINE_S,
            max_result_bytes=10_000,
            idempotency_key=key,
        )
        assert not result.is_error
        assert result.text == "you said a tool call"
        assert result.structured is not None
        assert result.structured["a2a_task"]["state"] == "completed"
        # The call's idempotency key is the message id.
        task = result.structured["a2a_task"]["task"]
        assert f"message {task} {key}" in agent.lines()
        failed = await connector.call_tool(
            TOOL_NAME, {"input": "fail"}, timeout_s=CALL_DEADLINE_S, max_result_bytes=10_000
        )
        assert failed.is_error
        assert failed.text.endswith("failed the task: cannot do that")
        # Without a key, an id of its own for each call.
        unkeyed = await connector.call_tool(
            TOOL_NAME, {"input": "no key"}, timeout_s=CALL_DEADLINE_S, max_result_bytes=10_000
        )
        assert unkeyed.structured is not None
        task = unkeyed.structured["a2a_task"]["task"]
        (line,) = [line for line in agent.lines() if line.startswith(f"message {task} ")]
        assert line.split()[2] not in {"", key}
    finally:
        await connector.close()
    # Without the credential the agent rejects the message: an error result, not an outage.
    bare = A2AAgentConnector(A2AAgent(agent.card_url, LOOPBACK, allow_plain_http=True))
    try:
        refused = await bare.call_tool(
            TOOL_NAME, {"input": "x"}, timeout_s=CALL_DEADLINE_S, max_result_bytes=10_000
        )
        assert refused.is_error
        assert "rejected the task: no valid token" in refused.text
    finally:
        await bare.close()


async def test_the_probe_follows_the_agent_down_and_up(agent: A2AAgentProcess) -> None:
    client = A2AAgent(agent.card_url, LOOPBACK, allow_plain_http=True)
    try:
        await client.probe(CALL_DEADLINE_S)
        agent.kill()
        with pytest.raises(Exception, match=r"unreachable|could not be read"):
            await client.probe(CALL_DEADLINE_S)
        with A2AAgentProcess(port=agent.port, grpc_port=agent.grpc_port):
            await client.probe(CALL_DEADLINE_S)
    finally:
        await client.close()


# -- `switchboard serve` --------------------------------------------------------------------


async def test_switchboard_serve_routes_a_run_to_an_agent_registered_through_its_api(
    tmp_path: Path, agent: A2AAgentProcess
) -> None:
    env = {
        **shared_secrets(tmp_path),
        "SWITCHBOARD_EGRESS_ALLOW_LOOPBACK": "true",
        "SWITCHBOARD_INTEGRATION_PROBE_INTERVAL_S": "3600",
    }
    with ServeProcess(env=env) as served:
        async with aio.insecure_channel(served.address) as channel:
            signed = await register_user(channel)
            me = Caller(signed.user.name.removeprefix("users/"), signed.tokens.access_token)
            workspace = await create_workspace(context_stub(channel), me, "Agents")
            world = World(workspace, me, me, me, me)
            made = await create_conversation(context_stub(channel), me, workspace.name)
            conversation = made.name
            dstub = dispatcher_stub(channel)
            handler = await _registered(
                integration_stub(channel), world, dstub, agent.card_url, "served"
            )
            sent = await send(dstub, me, request(conversation, "/served from serve"))
            seen = await watch_all(dstub, me, sent.run.name)
            assert seen.final.handler == handler
            assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error.message
            assert seen.text == "you said from serve"


async def test_an_agent_registered_through_one_process_is_routed_by_another(
    tmp_path: Path, redis_server: RedisServer, postgres_url: str, agent: A2AAgentProcess
) -> None:
    """The scaled-out shape's storage: two servers on one PostgreSQL and one Redis event
    log. B's dispatcher learns of the agent A registered from the shared log, routes a
    run to it, and stops when A deletes it."""
    env = scaled_env(tmp_path, postgres_url, redis_server.url)
    with ServeProcess(env=env) as a, ServeProcess(env=env) as b:
        async with aio.insecure_channel(a.address) as ca, aio.insecure_channel(b.address) as cb:
            signed = await register_user(ca)
            me = Caller(signed.user.name.removeprefix("users/"), signed.tokens.access_token)
            workspace = await create_workspace(context_stub(ca), me, "Across")
            world = World(workspace, me, me, me, me)  # one user in every role
            made = await create_conversation(context_stub(ca), me, workspace.name)
            istub, dstub = integration_stub(ca), dispatcher_stub(cb)
            assert "handlers/faraway" not in await listed(dstub, world)  # B has read them
            handler = await _registered(istub, world, dstub, agent.card_url, "faraway")
            sent = await send(dstub, me, request(made.name, "from afar", handler=handler))
            seen = await watch_all(dstub, me, sent.run.name)
            assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error.message
            assert seen.text == "you said from afar"
            await istub.DeleteIntegration(
                ipb.DeleteIntegrationRequest(name=f"{workspace.name}/integrations/faraway"),
                metadata=me.md,
                timeout=CALL_DEADLINE_S,
            )
            await until_listed(dstub, world, handler, available=None)
