"""Domain experts registered at runtime: a Node.js HandlerService expert
(clients/node/expert.mjs) as a real process, added to a workspace as an
integration of kind GRPC_HANDLER while the server runs.

It appears in that workspace's ListHandlers (and no other's), takes routed
messages, becomes unavailable when stopped, answers the first run after it is
restarted, and stops being routable once deleted or disabled. The hub's
client of the same expert (``GrpcExpertConnector``) probes it, lists its one
tool and calls it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2
from grpc import aio

from switchboard.api.context.v1 import context_pb2
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.api.handler.v1 import handler_pb2
from switchboard.api.integration.v1 import integration_pb2
from switchboard.api.integration.v1 import integration_pb2 as ipb
from switchboard.dispatcher.handlers.base import HandleCall, HandlerFailure
from switchboard.dispatcher.handlers.experts import WorkspaceExpert, WorkspaceExperts
from switchboard.dispatcher.service import Dispatcher
from switchboard.integration.directory import ExpertEntry
from switchboard.integration.kinds.experts import GrpcExpertConnector
from switchboard.integration.ports.connectors import ToolNotFound, Unreachable
from switchboard.platform.errors import DestinationBlocked, ResultTooLarge
from switchboard.platform.resilience.breaker import Breakers
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.security.credentials.secretbox import SecretBox
from switchboard.platform.security.egress import EgressPolicy
from switchboard.platform.store.models import IntegrationRow
from tests.conftest import CALL_DEADLINE_S, built
from tests.e2e.expertkit import (
    istub_fixture,
    listed,
    served_fixture,
    until_listed,
    world_fixture,
)
from tests.e2e.expertproc import NodeExpert
from tests.e2e.procs import ServeProcess, scaled_env
from tests.infra.redis import RedisServer
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
from tests.kits.dispatchkit import dispatcher_stub, limited, request, send, watch_all
from tests.kits.integrationkit import Stub as IStub
from tests.kits.integrationkit import create, integration_stub
from tests.kits.integrationkit import expert as expert_integration

pytestmark = pytest.mark.e2e

TOKEN = "expert-token-0123456789"
POLL_S = 0.05
LOOPBACK = EgressPolicy(allow_loopback=True)


# -- registering behind the API's back (rows and events, as the integration service writes
# them): for what CreateIntegration refuses, an operator-level id or a blocked address ----


@dataclass(frozen=True)
class Registered:
    workspace_id: str
    id: str
    endpoint: str

    @property
    def name(self) -> str:
        return f"workspaces/{self.workspace_id}/integrations/{self.id}"


async def _changed(server: SwitchboardServer, expert: Registered, change: int) -> None:
    integration = integration_pb2.Integration(
        name=expert.name,
        kind=integration_pb2.INTEGRATION_KIND_GRPC_HANDLER,
        endpoint=expert.endpoint,
    )
    await server.shared.bus.publish(
        events_pb2.Event(
            type=events_pb2.EVENT_TYPE_INTEGRATION_CHANGED,
            workspace=f"workspaces/{expert.workspace_id}",
            integration_changed=events_pb2.IntegrationChanged(
                change=change,  # type: ignore[arg-type]
                integration=integration,
            ),
        )
    )


async def register(
    server: SwitchboardServer,
    workspace_id: str,
    integration_id: str,
    endpoint: str,
    *,
    credential: str = "",
) -> Registered:
    """Insert the integration row and publish INTEGRATION_CHANGED (CREATED), as a
    row written before the rule, or an address whose DNS changed since, would be."""
    expert = Registered(workspace_id, integration_id, endpoint)
    now = dt.datetime.now(dt.UTC)
    sealed = None
    if credential:
        box = SecretBox(server.shared.settings.effective_secret_key())
        sealed = box.seal(credential, purpose=expert.name)
    row = IntegrationRow(
        workspace_id=workspace_id,
        id=integration_id,
        kind=integration_pb2.INTEGRATION_KIND_GRPC_HANDLER,
        display_name=f"expert {integration_id}",
        endpoint=endpoint,
        call_timeout_ms=0,
        config=b"",
        event_types="",
        credential=sealed,
        disabled=False,
        creator="test",
        created_at=now,
        updated_at=now,
        version=1,
    )
    await server.shared.database.run(lambda db: db.add(row), write=True)
    await _changed(server, expert, events_pb2.CHANGE_KIND_CREATED)
    return expert


# -- reading what the dispatcher says -----------------------------------------------------


async def refused(dstub: DStub, world: World, conversation: str, handler: str) -> grpc.StatusCode:
    with pytest.raises(aio.AioRpcError) as caught:
        await send(dstub, world.editor, request(conversation, "anyone?", handler=handler))
    return caught.value.code()


# -- fixtures -----------------------------------------------------------------------------


served, istub, world = served_fixture, istub_fixture, world_fixture


@pytest.fixture
def expert() -> Iterator[NodeExpert]:
    with NodeExpert("--token", TOKEN) as process:
        yield process


# -- the dispatcher -----------------------------------------------------------------------


async def test_a_node_expert_registered_at_runtime_is_routed_stops_restarts_and_is_removed(
    served: tuple[SwitchboardServer, CStub, DStub],
    istub: IStub,
    world: World,
    expert: NodeExpert,
) -> None:
    server, cstub, dstub = served
    conversation = (await create_conversation(cstub, world.editor, world.name)).name
    name = "handlers/node-expert"
    assert name not in await listed(dstub, world)
    assert await refused(dstub, world, conversation, name) == grpc.StatusCode.INVALID_ARGUMENT

    # Registered through the API, with its credential.
    registered = await create(
        istub,
        world.owner,
        world.name,
        expert_integration(expert.address, credential=TOKEN),
        integration_id="node-expert",
    )
    handler = await until_listed(dstub, world, name, available=True)
    assert handler is not None
    # A workspace's own expert names its integration; the operator's handlers do not.
    assert handler.integration == registered.name
    assert handler.kind == pb.HANDLER_KIND_REMOTE
    assert handler.capabilities.id == "node-expert"
    assert handler.capabilities.display_name == "Node expert translator"
    assert not (await listed(dstub, world))["handlers/echo"].integration
    # Another workspace does not see it.
    other = await create_workspace(cstub, world.owner, "Other")
    assert name not in await listed(dstub, world, other.name)

    # Routed by name (the credential reached it: it refuses calls without one).
    sent = await send(dstub, world.editor, request(conversation, "hello node", handler=name))
    seen = await watch_all(dstub, world.editor, sent.run.name)
    assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error.message
    assert seen.text == "translator heard: hello node"
    assert seen.final.handler == name
    # And by its command prefix, which the expert does not see.
    sent = await send(dstub, world.editor, request(conversation, "/node-expert bonjour"))
    seen = await watch_all(dstub, world.editor, sent.run.name)
    assert seen.final.handler == name
    assert seen.text == "translator heard: bonjour"

    # Stopped: ListHandlers and routing say so.
    port = expert.port
    expert.kill()
    await until_listed(dstub, world, name, available=False)
    assert await refused(dstub, world, conversation, name) == grpc.StatusCode.UNAVAILABLE

    # Restarted on the same port: available again by itself, and the first run succeeds.
    with NodeExpert("--token", TOKEN, port=port):
        await until_listed(dstub, world, name, available=True)
        sent = await send(dstub, world.editor, request(conversation, "back?", handler=name))
        seen = await watch_all(dstub, world.editor, sent.run.name)
        assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error.message
        assert seen.text == "translator heard: back?"

        # Deleted: not listed, and naming it is the caller's mistake again.
        cached = await _expert_of(server, world.id, "node-expert")
        await istub.DeleteIntegration(
            ipb.DeleteIntegrationRequest(name=registered.name),
            metadata=world.owner.md,
            timeout=CALL_DEADLINE_S,
        )
        await until_listed(dstub, world, name, available=None)
        code = await refused(dstub, world, conversation, name)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        # Its channel is closed (no run was using it).
        assert cached.remote is not None
        await _until(lambda: cached.remote is not None and cached.remote.closed)


async def _expert_of(
    server: SwitchboardServer, workspace_id: str, handler_id: str
) -> WorkspaceExpert:
    experts = built(server, Dispatcher).router.experts
    assert experts is not None
    found = (await experts.of(workspace_id))[handler_id]
    assert isinstance(found, WorkspaceExpert)
    return found


async def _until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` (a channel's or a circuit's state: nothing to await)."""
    async with asyncio.timeout(CALL_DEADLINE_S):
        while True:
            if condition():
                return
            await asyncio.sleep(POLL_S)


async def test_the_first_run_right_after_a_restart_succeeds(
    served: tuple[SwitchboardServer, CStub, DStub], world: World, expert: NodeExpert
) -> None:
    """No poll in between: the channel still holds the dead connection (or is idle),
    and the run connects again or retries its UNAVAILABLE once."""
    server, cstub, dstub = served
    conversation = (await create_conversation(cstub, world.editor, world.name)).name
    await register(server, world.id, "quick", expert.address, credential=TOKEN)
    await until_listed(dstub, world, "handlers/quick", available=True)
    ask = request(conversation, "one", handler="handlers/quick")
    first = await watch_all(dstub, world.editor, (await send(dstub, world.editor, ask)).run.name)
    assert first.final.state == pb.RUN_STATE_SUCCEEDED

    port = expert.port
    expert.kill()
    with NodeExpert("--token", TOKEN, port=port):
        ask = request(conversation, "two", handler="handlers/quick")
        sent = await send(dstub, world.editor, ask)
        seen = await watch_all(dstub, world.editor, sent.run.name)
        assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error.message
        assert seen.text == "translator heard: two"


async def _set_disabled(istub: IStub, world: World, name: str, disabled: bool) -> None:
    await istub.UpdateIntegration(
        ipb.UpdateIntegrationRequest(
            integration=ipb.Integration(name=name, disabled=disabled),
            update_mask=field_mask_pb2.FieldMask(paths=["disabled"]),
        ),
        metadata=world.owner.md,
        timeout=CALL_DEADLINE_S,
    )


async def test_disabling_an_expert_stops_routing_until_it_is_enabled(
    served: tuple[SwitchboardServer, CStub, DStub],
    istub: IStub,
    world: World,
    expert: NodeExpert,
) -> None:
    _, cstub, dstub = served
    conversation = (await create_conversation(cstub, world.editor, world.name)).name
    registered = await create(
        istub,
        world.owner,
        world.name,
        expert_integration(expert.address, credential=TOKEN),
        integration_id="switchable",
    )
    await until_listed(dstub, world, "handlers/switchable", available=True)

    await _set_disabled(istub, world, registered.name, True)
    found = await until_listed(dstub, world, "handlers/switchable", available=False)
    assert found is not None
    assert "disabled" in found.capabilities.description
    code = await refused(dstub, world, conversation, "handlers/switchable")
    assert code == grpc.StatusCode.UNAVAILABLE

    await _set_disabled(istub, world, registered.name, False)
    await until_listed(dstub, world, "handlers/switchable", available=True)
    sent = await send(
        dstub, world.editor, request(conversation, "on", handler="handlers/switchable")
    )
    assert (await watch_all(dstub, world.editor, sent.run.name)).text == "translator heard: on"


async def test_an_operator_handler_id_is_never_shadowed_by_a_workspace_expert(
    served: tuple[SwitchboardServer, CStub, DStub], world: World, expert: NodeExpert
) -> None:
    server, cstub, dstub = served
    conversation = (await create_conversation(cstub, world.editor, world.name)).name
    await register(server, world.id, "echo", expert.address, credential=TOKEN)
    await register(server, world.id, "after-echo", expert.address, credential=TOKEN)
    # Listed once the event is in; "echo" is the built-in, once.
    await until_listed(dstub, world, "handlers/after-echo", available=True)
    handlers = await listed(dstub, world)
    assert handlers["handlers/echo"].kind == pb.HANDLER_KIND_BUILTIN
    assert not handlers["handlers/echo"].integration
    sent = await send(dstub, world.editor, request(conversation, "who", handler="handlers/echo"))
    seen = await watch_all(dstub, world.editor, sent.run.name)
    assert seen.text.startswith("who\n\n(answered by handlers/echo")


async def test_an_expert_at_a_blocked_address_is_listed_unavailable() -> None:
    async with limited() as (server, cstub, dstub):  # loopback not allowed here
        world = await ctx_world(server, cstub)
        conversation = (await create_conversation(cstub, world.editor, world.name)).name
        await register(server, world.id, "inside", "127.0.0.1:9")
        found = await until_listed(dstub, world, "handlers/inside", available=False)
        assert found is not None
        assert "not an allowed destination" in found.capabilities.description
        assert "127.0.0.1" in found.capabilities.description  # the endpoint as given
        code = await refused(dstub, world, conversation, "handlers/inside")
        assert code == grpc.StatusCode.UNAVAILABLE


async def test_an_open_circuit_makes_the_expert_unavailable_and_a_success_closes_it(
    expert: NodeExpert,
) -> None:
    """WorkspaceExperts with the hub's Breakers: a failed run opens the circuit
    (one failure here), the router sees it unavailable, the trial closes it."""
    port = expert.port
    entry = ExpertEntry(
        id="breaking",
        display_name="",
        endpoint=expert.address,
        timeout_s=0,
        credential=TOKEN,
        disabled=False,
    )

    async def read(workspace_id: str) -> Sequence[ExpertEntry]:
        return [entry]

    breakers = Breakers(failures=1, reset_s=0.2)
    experts = WorkspaceExperts(
        read, LOOPBACK, timeout_s=CALL_DEADLINE_S, reserved=lambda _: False, breakers=breakers
    )
    try:
        found = (await experts.of("w1"))["breaking"]
        assert found.available()
        expert.kill()
        with pytest.raises(HandlerFailure):
            async for _ in found.handle(_call("down")):
                pass
        assert breakers.state("workspaces/w1/integrations/breaking").state == "open"
        assert not found.available()
        with NodeExpert("--token", TOKEN, port=port):
            # After the cool-down the trial goes, and its success closes the circuit.
            await _until(found.available)
            frames = [frame async for frame in found.handle(_call("up"))]
            assert frames[-1].result.parts[0].text == "translator heard: up"
            assert breakers.state("workspaces/w1/integrations/breaking").state == "closed"
    finally:
        await experts.close()
        await breakers.close()
    assert isinstance(found, WorkspaceExpert)
    assert found.remote is not None
    assert found.remote.closed


def _call(text: str) -> HandleCall:
    message = context_pb2.Message(parts=[context_pb2.ContentPart(text=text)])
    return HandleCall(
        request=handler_pb2.HandleRequest(message=message),
        deadline=time.monotonic() + CALL_DEADLINE_S,
    )


# -- the hub's connector ------------------------------------------------------------------


async def test_the_connector_probes_lists_and_calls_the_expert(expert: NodeExpert) -> None:
    connector = GrpcExpertConnector(expert.address, LOOPBACK, credential=TOKEN)
    try:
        await connector.probe(CALL_DEADLINE_S)
        tools = await connector.list_tools(CALL_DEADLINE_S)
        assert [tool.name for tool in tools] == ["translator"]
        assert tools[0].title == "Node expert translator"
        assert tools[0].input_schema == {
            "type": "object",
            "properties": {
                "input": {"type": "string"},
                "parameters": {"type": "object", "properties": {"shout": {"type": "boolean"}}},
            },
            "required": ["input"],
        }
        progress: list[tuple[float, float | None, str]] = []

        async def report(done: float, total: float | None, message: str) -> None:
            progress.append((done, total, message))

        result = await connector.call_tool(
            "translator",
            {"input": "quiet please", "parameters": {"shout": True}},
            timeout_s=CALL_DEADLINE_S,
            max_result_bytes=10_000,
            progress=report,
        )
        assert not result.is_error
        assert result.text == "TRANSLATOR HEARD: QUIET PLEASE"
        assert result.structured is not None
        assert result.structured["finish_reason"] == "stop"
        assert progress == [(0.5, 1.0, "answering")]

        failed = await connector.call_tool(
            "translator",
            {"input": "x", "parameters": {"fail": "no can do"}},
            timeout_s=CALL_DEADLINE_S,
            max_result_bytes=10_000,
        )
        assert failed.is_error
        assert failed.text == "FAILED_PRECONDITION: no can do"
        with pytest.raises(ToolNotFound):
            await connector.call_tool(
                "other", {"input": "x"}, timeout_s=CALL_DEADLINE_S, max_result_bytes=100
            )
        with pytest.raises(ResultTooLarge):
            await connector.call_tool(
                "translator", {"input": "y" * 200}, timeout_s=CALL_DEADLINE_S, max_result_bytes=100
            )
    finally:
        await connector.close()


async def test_the_connector_without_the_credential_is_refused(expert: NodeExpert) -> None:
    connector = GrpcExpertConnector(expert.address, LOOPBACK)
    try:
        with pytest.raises(Unreachable, match="UNAUTHENTICATED"):
            await connector.list_tools(CALL_DEADLINE_S)
    finally:
        await connector.close()


async def test_the_connector_probe_follows_the_expert_down_and_up(expert: NodeExpert) -> None:
    connector = GrpcExpertConnector(expert.address, LOOPBACK, credential=TOKEN)
    try:
        await connector.probe(CALL_DEADLINE_S)
        port = expert.port
        expert.kill()
        with pytest.raises(Unreachable):
            await connector.probe(CALL_DEADLINE_S)
        # Back: the very next probe answers (a fresh channel, no reconnect backoff).
        with NodeExpert("--token", TOKEN, port=port):
            await connector.probe(CALL_DEADLINE_S)
            result = await connector.call_tool(
                "translator", {"input": "again"}, timeout_s=CALL_DEADLINE_S, max_result_bytes=10_000
            )
            assert result.text == "translator heard: again"
    finally:
        await connector.close()


async def test_an_expert_without_the_health_service_is_probed_by_its_capabilities() -> None:
    with NodeExpert("--no-health") as bare:
        connector = GrpcExpertConnector(bare.address, LOOPBACK)
        try:
            await connector.probe(CALL_DEADLINE_S)
        finally:
            await connector.close()


async def test_the_connector_refuses_a_blocked_destination(expert: NodeExpert) -> None:
    connector = GrpcExpertConnector(expert.address, EgressPolicy(), credential=TOKEN)
    try:
        with pytest.raises(DestinationBlocked):
            await connector.probe(CALL_DEADLINE_S)
    finally:
        await connector.close()


# -- another process ----------------------------------------------------------------------


@pytest.fixture
def pair(
    tmp_path: Path, redis_server: RedisServer, postgres_url: str
) -> Iterator[tuple[ServeProcess, ServeProcess]]:
    """Two servers sharing PostgreSQL, Redis (the event log) and their secrets."""
    env = scaled_env(tmp_path, postgres_url, redis_server.url)
    with ServeProcess(env=env) as a, ServeProcess(env=env) as b:
        yield a, b


async def test_an_expert_registered_through_one_process_is_routed_by_another(
    pair: tuple[ServeProcess, ServeProcess], expert: NodeExpert
) -> None:
    """B's dispatcher learns of A's CreateIntegration and DeleteIntegration from the
    shared event log, although it had already read (and cached) the workspace's experts."""
    a, b = pair
    async with aio.insecure_channel(a.address) as ca, aio.insecure_channel(b.address) as cb:
        signed = await register_user(ca)
        me = Caller(signed.user.name.removeprefix("users/"), signed.tokens.access_token)
        workspace = await create_workspace(context_stub(ca), me, "Across")
        world = World(workspace, me, me, me, me)  # one user in every role
        conversation = (await create_conversation(context_stub(ca), me, workspace.name)).name
        istub, dstub = integration_stub(ca), dispatcher_stub(cb)
        assert "handlers/far" not in await listed(dstub, world)  # B has read them now

        registered = await create(
            istub,
            me,
            workspace.name,
            expert_integration(expert.address, credential=TOKEN),
            integration_id="far",
        )
        await until_listed(dstub, world, "handlers/far", available=True)
        sent = await send(dstub, me, request(conversation, "from afar", handler="handlers/far"))
        seen = await watch_all(dstub, me, sent.run.name)
        assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error.message
        assert seen.text == "translator heard: from afar"

        await istub.DeleteIntegration(
            ipb.DeleteIntegrationRequest(name=registered.name),
            metadata=me.md,
            timeout=CALL_DEADLINE_S,
        )
        await until_listed(dstub, world, "handlers/far", available=None)
        code = await refused(dstub, world, conversation, "handlers/far")
        assert code == grpc.StatusCode.INVALID_ARGUMENT
