"""A delegating assistant served as an A2A agent shows its sub-tasks (docs/a2a.md,
"Sub-tasks"): each child run a delegate call starts is a status update of the parent
task, in the task's state (WORKING), whose message names the child's own task, the
assistant asked and how it stands (a text part and a data part ``{"subtask": ...}``);
never an artifact, which a client would add to the answer. Driven by the official
``a2a-sdk`` client over gRPC against a real server, the local model server scripted per
assistant as in tests/dispatcher/runs/delegation/test_delegation.py."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from a2a.types import a2a_pb2 as a2a
from google.protobuf import json_format
from grpc import aio

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as dpb
from tests.a2a.test_a2a import stub
from tests.a2a.test_a2a_steer_service import _client
from tests.conftest import CALL_DEADLINE_S
from tests.dispatcher.runs.delegation.test_delegation import (
    brain,
    desk,
    tool_outputs,
)
from tests.fakes.openai_server import Reply

pytestmark = [pytest.mark.service, pytest.mark.asyncio]


def _subtask(event: a2a.StreamResponse) -> dict[str, Any] | None:
    """The ``subtask`` data of a sub-task's status update, None for any other event."""
    if not event.HasField("status_update"):
        return None
    for part in event.status_update.status.message.parts:
        if part.HasField("data"):
            found = json_format.MessageToDict(part.data)
            if isinstance(found, dict) and "subtask" in found:
                subtask: dict[str, Any] = found["subtask"]
                return subtask
    return None


async def test_a_delegating_agents_task_streams_its_subtasks_as_status_updates(
    database_url: str,
) -> None:
    async with desk(database_url) as d:
        await d.assistant("pricing", "You price things.")
        await d.assistant("planner", "You plan.", ("pricing",))

        def plan(body: dict[str, Any]) -> Reply:
            done = tool_outputs(body)
            if not done:
                return Reply.tool_calls([("ask_pricing", {"input": "price?"}, "c-1")])
            return Reply.text(f"priced: {done['c-1']}")

        rules = {"You plan.": plan, "You price things.": lambda body: Reply.text("400 euros")}
        d.fake.script(*[brain(rules)] * 3)
        async with aio.insecure_channel(d.server.address) as channel:
            card = await stub(channel).GetExtendedAgentCard(
                a2a.GetExtendedAgentCardRequest(
                    tenant=d.world.name.removeprefix("workspaces/") + ".planner"
                ),
                metadata=d.world.editor.md,
                timeout=CALL_DEADLINE_S,
            )
        client = _client(card, d.world.editor)
        try:
            sent = a2a.SendMessageRequest(
                message=a2a.Message(
                    message_id=str(uuid.uuid4()),
                    role=a2a.ROLE_USER,
                    parts=[a2a.Part(text="what does a kayak cost?")],
                )
            )
            events = [event async for event in client.send_message(sent)]
        finally:
            await client.close()

        subtasks = [(e, found) for e in events if (found := _subtask(e)) is not None]
        assert [found["state"] for _, found in subtasks][-1] == "succeeded"
        assert {found["state"] for _, found in subtasks} <= {"queued", "running", "succeeded"}
        child_task = subtasks[0][1]["task_id"]
        assert {found["task_id"] for _, found in subtasks} == {child_task}
        assert all(found["tool_call_id"] == "c-1" for _, found in subtasks)
        assert all(found["assistant"].endswith("/assistants/pricing") for _, found in subtasks)
        # The parent task's own status (it keeps working), its own ids.
        parent_task = events[-1].status_update.task_id
        assert child_task != parent_task
        assert all(
            e.status_update.status.state == a2a.TASK_STATE_WORKING
            and e.status_update.task_id == parent_task
            for e, _ in subtasks
        )
        assert events[-1].status_update.status.state == a2a.TASK_STATE_COMPLETED
        # The answer is only the parent's: no sub-task is an artifact.
        chunks = [e.artifact_update for e in events if e.HasField("artifact_update")]
        assert "".join(p.text for c in chunks for p in c.artifact.parts) == "priced: 400 euros"
        # The child is a run (a task) of its own, named by the sub-task's ids.
        listed = await d.dstub.ListRuns(
            dpb.ListRunsRequest(
                parent=d.world.name, assistant=f"{d.world.name}/assistants/pricing"
            ),
            metadata=d.world.viewer.md,
            timeout=CALL_DEADLINE_S,
        )
        [child] = listed.runs
        parts = child.name.split("/")
        assert child_task == f"{parts[3]}.{parts[5]}"
        above = child.parent.split("/")
        assert parent_task == f"{above[3]}.{above[5]}"
