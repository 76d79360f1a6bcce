"""switchboard.client against a real in-process server: conversation branches.

The client edits a message (a new version on a new branch, answered there), regenerates
an answer (a new sibling answer from a new run), reads a branch with each message's
versions, switches between them by a sibling and by number, and deletes a message with
the answers below it. Refusals come as the client's exception classes. A regenerate is
keyed, so the one retried after a dropped answer starts one run (the wire shows it
sent once with its key).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from switchboard.client import Client, EtagMismatch, FailedPrecondition, InvalidArgument
from switchboard.settings import Settings
from tests.client.test_clientkit import (
    PASSWORD,
    Wire,
    new_conversation,
    new_workspace,
    unique_email,
)
from tests.conftest import CALL_DEADLINE_S, make_settings, started

pytestmark = pytest.mark.service


@dataclass
class Person:
    client: Client
    conversation: str
    wire: Wire


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url=database_url)


@pytest.fixture
async def person(settings: Settings) -> AsyncIterator[Person]:
    wire = Wire()
    async with (
        started(settings) as server,
        Client(server.address, timeout_s=CALL_DEADLINE_S, interceptors=wire.interceptors) as client,
    ):
        await client.register(unique_email("branches"), PASSWORD)
        workspace = await new_workspace(client, "Branches")
        yield Person(client, await new_conversation(client, workspace), wire)


async def test_edit_regenerate_switch_and_delete(person: Person) -> None:
    client, conversation = person.client, person.conversation
    first = await client.ask(conversation, "plan a trip", handler="echo")
    question = first.run.input_message
    edited = await client.edit(question, "plan a short trip", handler="echo")
    assert edited.branch == 2
    async with client.watch(edited) as watch:
        answer = await watch.answer()
    shown = await client.messages(conversation)
    assert next(m.parts[0].text for m in shown) == "plan a short trip"
    assert list(shown[0].siblings) == [question, edited.input_message]
    assert shown[0].sibling_position == 2
    assert shown[1].name == answer.run.output_message

    redone = await client.regenerate(answer.run.output_message)
    assert redone.branch == 3
    async with client.watch(redone) as watch:
        again = await watch.answer()
    latest = await client.messages(conversation)
    assert list(latest[1].siblings) == [answer.run.output_message, again.run.output_message]
    # Keyed: the regenerate went out once, with its request id.
    sent = [s for s in person.wire.sent if s.method.endswith("/RegenerateMessage")]
    assert len(sent) == 1

    # Back to the first version by its sibling, then to branch 2 by number.
    back = await client.switch_branch(conversation, message=question)
    assert back.active_branch == 1
    assert next(m.name for m in await client.messages(conversation)) == question
    two = await client.switch_branch(conversation, branch=2, etag=back.etag)
    assert two.active_branch == 2
    with pytest.raises(EtagMismatch):
        await client.switch_branch(conversation, branch=1, etag=back.etag)
    with pytest.raises(InvalidArgument) as both:
        await client.switch_branch(conversation, branch=1, message=question)
    assert [v.field for v in both.value.violations] == ["branch", "message"]

    # A branch from the first answer, then delete the question with what follows it.
    _, number = await client.create_branch(conversation, after=first.run.output_message)
    assert number == 4
    assert [m.name for m in await client.messages(conversation)] == [
        question,
        first.run.output_message,
    ]
    deleted = await client.delete_message(question, with_later=True)
    assert deleted == [question, first.run.output_message]
    assert await client.messages(conversation) == []
    assert len(await client.messages(conversation, branch=2)) == 2
    with pytest.raises(FailedPrecondition):
        await client.regenerate(edited.input_message)
