"""Branches over A2A (docs/a2a.md, "Branches"): a message whose metadata names an earlier
message of its context (``switchboard.replaces``) is an edit of it, answered on a new
branch; one naming a task of the context (``switchboard.regenerate``) starts a task that
answers that task's question again beside its answer. The native API sees the same
branches; malformed keys are refused naming them."""

from __future__ import annotations

import grpc
import pytest
from a2a.types import a2a_pb2 as a2a

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as dpb
from tests.a2a.test_a2a import Agent, agent, message, stub
from tests.conftest import CALL_DEADLINE_S
from tests.kits.contextkit import context_stub, refused, violations
from tests.kits.dispatchkit import dispatcher_stub

pytestmark = pytest.mark.service

__all__ = ["agent"]


def asking(text: str, tenant: str, context_id: str = "", **metadata: str) -> a2a.SendMessageRequest:
    sent = message(text, context_id=context_id)
    if metadata:
        sent.metadata.update({f"switchboard.{key}": value for key, value in metadata.items()})
    return a2a.SendMessageRequest(tenant=tenant, message=sent)


async def test_edits_and_regenerated_answers_over_a2a(agent: Agent) -> None:
    world = agent.world
    async with grpc.aio.insecure_channel(agent.server.address) as channel:
        a2a_stub, runs, texts = stub(channel), dispatcher_stub(channel), context_stub(channel)

        async def send(request: a2a.SendMessageRequest) -> a2a.Task:
            response = await a2a_stub.SendMessage(
                request, metadata=world.editor.md, timeout=CALL_DEADLINE_S
            )
            task: a2a.Task = response.task
            assert task.status.state == a2a.TASK_STATE_COMPLETED
            return task

        async def run_of(task: a2a.Task) -> dpb.Run:
            found = await runs.GetRun(
                dpb.GetRunRequest(name=str(task.metadata["run"])),
                metadata=world.editor.md,
                timeout=CALL_DEADLINE_S,
            )
            return found.run

        first = await send(asking("first try", agent.tenant))
        context = first.context_id
        asked = await run_of(first)
        question_id = asked.input_message.rsplit("/", 1)[-1]
        assert first.history[0].message_id == question_id

        edited = await send(asking("second try", agent.tenant, context, replaces=question_id))
        assert edited.context_id == context
        edit_run = await run_of(edited)
        assert edit_run.branch == 2
        listed = await texts.ListMessages(
            cpb.ListMessagesRequest(parent=edit_run.name.rsplit("/runs/", 1)[0]),
            metadata=world.editor.md,
            timeout=CALL_DEADLINE_S,
        )
        assert list(listed.messages[0].siblings) == [asked.input_message, edit_run.input_message]

        again = await send(asking("again", agent.tenant, context, regenerate=edited.id))
        again_run = await run_of(again)
        assert again_run.branch == 3
        assert again_run.input_message == edit_run.input_message
        answers = await texts.ListMessages(
            cpb.ListMessagesRequest(parent=edit_run.name.rsplit("/runs/", 1)[0]),
            metadata=world.editor.md,
            timeout=CALL_DEADLINE_S,
        )
        assert list(answers.messages[1].siblings) == [
            edit_run.output_message,
            again_run.output_message,
        ]

        # Refused, naming the key: no context, both keys, another context's task, junk.
        for request, fields in (
            (
                asking("x", agent.tenant, replaces=question_id),
                ["message.metadata['switchboard.replaces']"],
            ),
            (
                asking("x", agent.tenant, context, replaces=question_id, regenerate=edited.id),
                [
                    "message.metadata['switchboard.replaces']",
                    "message.metadata['switchboard.regenerate']",
                ],
            ),
            (
                asking("x", agent.tenant, context, regenerate="other.task"),
                ["message.metadata['switchboard.regenerate']"],
            ),
            (
                asking("x", agent.tenant, context, replaces="no/such/id"),
                ["message.metadata['switchboard.replaces']"],
            ),
        ):
            error = await refused(
                a2a_stub.SendMessage(request, metadata=world.editor.md, timeout=CALL_DEADLINE_S),
                grpc.StatusCode.INVALID_ARGUMENT,
            )
            assert violations(error) == fields
        # An edit of another person's message is theirs to make.
        await refused(
            a2a_stub.SendMessage(
                asking("mine", agent.tenant, context, replaces=question_id),
                metadata=world.owner.md,
                timeout=CALL_DEADLINE_S,
            ),
            grpc.StatusCode.PERMISSION_DENIED,
        )
