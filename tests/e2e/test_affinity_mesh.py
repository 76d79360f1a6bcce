"""Affinity at the edge: two whole-run ``switchboard serve`` processes (every service in
each) on one PostgreSQL and one Redis, a real Envoy in front (the mesh shape that
``switchboard mesh --processes`` runs), whose clusters hash the ``switchboard-affinity``
header (docs/operations.md, "Affinity at the edge").

- Through the Python client, which sets the header from each request: every call of a
  conversation (SendMessage, the WatchRun of its run, GetRun, a CancelRun) lands on one
  process, the one that runs the conversation's runs, for each of several conversations.
- Correctness never depends on it: for each call kind (unary SendMessage and CancelRun,
  server-streaming WatchRun, bidirectional Converse), a call without the header, and one
  whose header sends it to the process that does not run the conversation's runs, is
  served in full: its run completes with the whole answer, the watch sees every update
  once and in order, the cancel reaches the run's owner.

Where a call landed: the process whose ``rpc finished`` line has the call's request id;
where a run runs: the process that logged ``run started`` for it.
"""

from __future__ import annotations

from typing import Any, Final

import pytest
from grpc import aio

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.client import Client
from tests.e2e.affinity import handled_by, keys_to, served_by, steer
from tests.e2e.test_tokens_mesh import REPLICAS, Mesh, a_conversation, env, running_mesh
from tests.kits.authkit import PASSWORD, unique_email
from tests.kits.contextkit import Caller
from tests.kits.dispatchkit import dispatcher_stub, request

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

__all__ = ["env"]  # the fixture, shared with test_tokens_mesh.py

ECHO: Final = "handlers/echo"
TEXT: Final = "one two three four"
CALL_TIMEOUT_S: Final = 30.0
#: A run still running when it is cancelled: the first word at once, the next after this.
SLOW_MS: Final = 10_000
TERMINAL: Final = {
    pb.RUN_STATE_SUCCEEDED,
    pb.RUN_STATE_FAILED,
    pb.RUN_STATE_CANCELLED,
    pb.RUN_STATE_DEADLINE_EXCEEDED,
}


def ended(update: pb.RunUpdate) -> bool:
    return update.WhichOneof("update") == "state_change" and (
        update.state_change.run.state in TERMINAL
    )


def text_of(updates: list[pb.RunUpdate]) -> str:
    return "".join(u.delta.text for u in updates if u.WhichOneof("update") == "delta")


def final_state(updates: list[pb.RunUpdate]) -> int:
    assert updates
    assert ended(updates[-1]), updates
    return updates[-1].state_change.run.state


async def watched(stub: Any, metadata: Any, run: str) -> tuple[list[pb.RunUpdate], Any]:
    """Every update of ``run`` (a WatchRun read to its end) and the finished call."""
    call = stub.WatchRun(pb.WatchRunRequest(name=run), metadata=metadata, timeout=60)
    seen = [frame.update async for frame in call if frame.WhichOneof("frame") == "update"]
    return seen, call


def whole(updates: list[pb.RunUpdate]) -> None:
    """Every update once, in order, to a successful end with the whole answer."""
    sequences = [u.sequence for u in updates]
    assert sequences == list(range(sequences[0], sequences[0] + len(sequences))), sequences
    assert final_state(updates) == pb.RUN_STATE_SUCCEEDED
    assert text_of(updates).startswith(TEXT), text_of(updates)


async def test_a_conversations_calls_through_the_python_client_land_on_one_process(
    env: dict[str, str],
) -> None:
    async with running_mesh(env) as mesh, Client(mesh.edge) as client:
        await client.register(unique_email("affinity"), PASSWORD)
        workspace = (
            await client.context.CreateWorkspace(
                cpb.CreateWorkspaceRequest(workspace=cpb.Workspace(display_name="Affinity"))
            )
        ).workspace.name
        homes: dict[str, str] = {}
        for n in range(4):
            conversation = (
                await client.context.CreateConversation(
                    cpb.CreateConversationRequest(
                        parent=workspace, conversation=cpb.Conversation(title=f"c{n}")
                    )
                )
            ).conversation.name
            landed: list[str] = []
            sent = client.dispatcher.SendMessage(request(conversation, TEXT, handler=ECHO))
            run = (await sent).run.name
            landed.append(await served_by(mesh.logs, sent))
            updates, watch = await watched(client.dispatcher, (), run)
            whole(updates)
            landed.append(await served_by(mesh.logs, watch))
            got = client.dispatcher.GetRun(pb.GetRunRequest(name=run))
            await got
            landed.append(await served_by(mesh.logs, got))
            slow = (
                await client.dispatcher.SendMessage(
                    request(conversation, TEXT, handler=ECHO, delay_ms=SLOW_MS)
                )
            ).run.name
            cancelled = client.dispatcher.CancelRun(pb.CancelRunRequest(name=slow))
            await cancelled
            landed.append(await served_by(mesh.logs, cancelled))
            owners = {await mesh.logs.owner(run), await mesh.logs.owner(slow)}
            assert len(owners) == 1, (conversation, owners)
            assert set(landed) == owners, (conversation, landed, owners)
            homes[conversation] = landed[0]
        print(f"conversations' processes: {homes}")


async def test_every_call_kind_is_served_without_the_header_and_on_the_other_process(
    env: dict[str, str],
) -> None:
    async with running_mesh(env) as mesh, aio.insecure_channel(mesh.edge) as channel:
        keys = await keys_to(channel, mesh.logs, REPLICAS)
        caller, conversation = await a_conversation(channel)
        stub = dispatcher_stub(channel)
        home, away = await _placed(mesh, stub, caller, conversation, keys)
        # The calls that do not go where the conversation's runs live: none chosen, or
        # the other process by its key.
        elsewhere = {"no header": caller.md, "the other process": (*caller.md, *steer(keys[away]))}
        at_home = (*caller.md, *steer(conversation))
        for how, metadata in elsewhere.items():
            # Unary: a send is accepted where it lands, and its run runs there in full.
            sent = stub.SendMessage(
                request(conversation, TEXT, handler=ECHO), metadata=metadata, timeout=30
            )
            run = (await sent).run.name
            updates, _ = await watched(stub, at_home, run)
            whole(updates)
            if how == "the other process":
                assert await served_by(mesh.logs, sent) == away
                assert await mesh.logs.owner(run) == away

            # Server streaming: a watch of a run that runs at home, followed from elsewhere.
            run = (
                await stub.SendMessage(
                    request(conversation, TEXT, handler=ECHO, delay_ms=50),
                    metadata=at_home,
                    timeout=CALL_TIMEOUT_S,
                )
            ).run.name
            updates, watch = await watched(stub, metadata, run)
            whole(updates)
            assert await mesh.logs.owner(run) == home
            if how == "the other process":
                assert await served_by(mesh.logs, watch) == away

            # Unary, to another process than the run's: the cancel is forwarded to it.
            slow = (
                await stub.SendMessage(
                    request(conversation, TEXT, handler=ECHO, delay_ms=SLOW_MS),
                    metadata=at_home,
                    timeout=CALL_TIMEOUT_S,
                )
            ).run.name
            cancel = stub.CancelRun(pb.CancelRunRequest(name=slow), metadata=metadata, timeout=30)
            await cancel
            updates, _ = await watched(stub, at_home, slow)
            assert final_state(updates) == pb.RUN_STATE_CANCELLED
            assert await mesh.logs.owner(slow) == home
            if how == "the other process":
                # Landed on the other process, which forwarded it to the run's (the same id).
                assert set(await handled_by(mesh.logs, cancel, 2)) == {away, home}

            # Bidirectional: a send on Converse runs where the stream landed, relayed whole.
            converse = stub.Converse(None, metadata=metadata, timeout=60)
            await converse.write(
                pb.ConverseRequest(
                    client_request_id="c1",
                    send_message=request(conversation, TEXT, handler=ECHO),
                )
            )
            await converse.done_writing()
            frames = [frame async for frame in converse]
            [answer] = [f.message_sent for f in frames if f.WhichOneof("frame") == "message_sent"]
            whole([f.update for f in frames if f.WhichOneof("frame") == "update"])
            if how == "the other process":
                assert await served_by(mesh.logs, converse) == away
                assert await mesh.logs.owner(answer.run.name) == away


async def _placed(
    mesh: Mesh, stub: Any, caller: Caller, conversation: str, keys: dict[str, str]
) -> tuple[str, str]:
    """The process the conversation's own header sends it to (home), and the other one."""
    sent = stub.SendMessage(
        request(conversation, TEXT, handler=ECHO),
        metadata=(*caller.md, *steer(conversation)),
        timeout=CALL_TIMEOUT_S,
    )
    run = (await sent).run.name
    home = await served_by(mesh.logs, sent)
    assert await mesh.logs.owner(run) == home
    [away] = set(REPLICAS) - {home}
    assert set(keys) == set(REPLICAS)
    whole((await watched(stub, caller.md, run))[0])
    return home, away
