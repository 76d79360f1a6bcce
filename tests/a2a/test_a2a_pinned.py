"""An A2A agent pinned at an assistant's revision (``{workspace}.{assistant}@{n}``): its
card shows that revision and its tenant, and its tasks answer with that revision while
the unpinned agent follows the current one (docs/a2a.md, "Pinned agents")."""

from __future__ import annotations

import grpc
import pytest
from a2a.types import a2a_pb2 as a2a
from google.protobuf import field_mask_pb2

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as dpb
from tests.a2a.test_a2a import Agent, agent, request, stub
from tests.conftest import CALL_DEADLINE_S
from tests.kits.contextkit import refused, violations
from tests.kits.dispatchkit import dispatcher_stub

pytestmark = pytest.mark.service

__all__ = ["agent"]


async def test_a_pinned_agent_keeps_its_revision_while_the_assistant_changes(
    agent: Agent,
) -> None:
    world = agent.world
    assistant = f"{world.name}/assistants/echoer"
    pinned = f"{agent.tenant}@1"
    async with grpc.aio.insecure_channel(agent.server.address) as channel:
        dispatcher = dispatcher_stub(channel)
        await dispatcher.UpdateAssistant(
            dpb.UpdateAssistantRequest(
                assistant=dpb.Assistant(name=assistant, display_name="Echoer 2"),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
            ),
            metadata=world.owner.md,
            timeout=CALL_DEADLINE_S,
        )
        a2a_stub = stub(channel)
        card = await a2a_stub.GetExtendedAgentCard(
            a2a.GetExtendedAgentCardRequest(tenant=pinned),
            metadata=world.viewer.md,
            timeout=CALL_DEADLINE_S,
        )
        assert card.name == "Echoer"
        assert {i.tenant for i in card.supported_interfaces} == {pinned}
        current = await a2a_stub.GetExtendedAgentCard(
            a2a.GetExtendedAgentCardRequest(tenant=agent.tenant),
            metadata=world.viewer.md,
            timeout=CALL_DEADLINE_S,
        )
        assert current.name == "Echoer 2"

        answered = await a2a_stub.SendMessage(
            request("pinned hello", pinned), metadata=world.editor.md, timeout=CALL_DEADLINE_S
        )
        assert answered.task.status.state == a2a.TASK_STATE_COMPLETED
        run = (
            await dispatcher.GetRun(
                dpb.GetRunRequest(name=answered.task.metadata["run"]),
                metadata=world.editor.md,
                timeout=CALL_DEADLINE_S,
            )
        ).run
        assert (run.assistant, run.assistant_revision) == (assistant, 1)
        followed = await a2a_stub.SendMessage(
            request("current hello", agent.tenant),
            metadata=world.editor.md,
            timeout=CALL_DEADLINE_S,
        )
        latest = (
            await dispatcher.GetRun(
                dpb.GetRunRequest(name=followed.task.metadata["run"]),
                metadata=world.editor.md,
                timeout=CALL_DEADLINE_S,
            )
        ).run
        assert latest.assistant_revision == 2

        # A revision the assistant does not keep, and a malformed pin.
        await refused(
            a2a_stub.GetExtendedAgentCard(
                a2a.GetExtendedAgentCardRequest(tenant=f"{agent.tenant}@9"),
                metadata=world.viewer.md,
                timeout=CALL_DEADLINE_S,
            ),
            grpc.StatusCode.NOT_FOUND,
        )
        for bad in (f"{agent.tenant}@0", f"{agent.tenant}@x", f"{agent.tenant}@99999999999"):
            error = await refused(
                a2a_stub.GetExtendedAgentCard(
                    a2a.GetExtendedAgentCardRequest(tenant=bad),
                    metadata=world.viewer.md,
                    timeout=CALL_DEADLINE_S,
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
            )
            assert violations(error) == ["tenant"]
