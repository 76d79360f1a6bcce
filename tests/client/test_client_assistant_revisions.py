"""switchboard.client against a real in-process server: an assistant's revisions.

Each change of an assistant's configuration is a revision, kept whole: the client lists
them (newest first, page by page), reads an earlier one, sends a message (and pins a
schedule) to one, and rolls back to one, which makes a new revision. Refusals come as the
client's exception classes: a revision not kept, a number out of range, a rollback by a
member who is not an owner, a stale etag.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as dpb
from switchboard.client import (
    Client,
    EtagMismatch,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from switchboard.platform.rpc.server import SwitchboardServer
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

LIST = "/ListAssistantRevisions"
FIRST, SECOND, THIRD = "Answer briefly.", "Answer in French.", "Answer in verse."


@dataclass
class Owner:
    client: Client
    user: str
    workspace: str
    address: str
    wire: Wire
    #: An assistant at revision 3: created with FIRST, then updated to SECOND, to THIRD.
    assistant: dpb.Assistant


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url=database_url)


async def _update_instructions(client: Client, name: str, instructions: str) -> dpb.Assistant:
    # The client has no general UpdateAssistant method: the typed stub reaches it.
    request = dpb.UpdateAssistantRequest(
        assistant=dpb.Assistant(name=name, instructions=instructions)
    )
    request.update_mask.paths.append("instructions")
    response = await client.dispatcher.UpdateAssistant(request)
    return response.assistant


@pytest.fixture
async def owner(settings: Settings) -> AsyncIterator[Owner]:
    server: SwitchboardServer
    wire = Wire()
    async with (
        started(settings) as server,
        Client(server.address, timeout_s=CALL_DEADLINE_S, interceptors=wire.interceptors) as client,
    ):
        registered = await client.register(unique_email("revisions"), PASSWORD)
        workspace = await new_workspace(client, "Revisions")
        created = await client.dispatcher.CreateAssistant(
            dpb.CreateAssistantRequest(
                parent=workspace,
                assistant=dpb.Assistant(
                    display_name="Tried", handler="handlers/echo", instructions=FIRST
                ),
            )
        )
        assert created.assistant.revision == 1
        name = created.assistant.name
        assert (await _update_instructions(client, name, SECOND)).revision == 2
        current = await _update_instructions(client, name, THIRD)
        assert current.revision == 3
        yield Owner(client, registered.user.name, workspace, server.address, wire, current)


async def test_revisions_are_listed_newest_first_page_by_page_and_read(owner: Owner) -> None:
    client, assistant = owner.client, owner.assistant
    revisions = await client.list_assistant_revisions(assistant.name)
    assert [r.revision for r in revisions] == [3, 2, 1]
    assert [r.name for r in revisions] == [f"{assistant.name}/revisions/{n}" for n in (3, 2, 1)]
    assert [r.assistant.instructions for r in revisions] == [THIRD, SECOND, FIRST]
    assert [r.origin for r in revisions] == [
        dpb.ASSISTANT_REVISION_ORIGIN_UPDATED,
        dpb.ASSISTANT_REVISION_ORIGIN_UPDATED,
        dpb.ASSISTANT_REVISION_ORIGIN_CREATED,
    ]
    assert {r.author for r in revisions} == {owner.user}
    times = [r.create_time.ToDatetime() for r in revisions]
    assert times == sorted(times, reverse=True)

    # Two to a page: the client follows the token to the last page.
    before = owner.wire.count(LIST)
    paged = await client.list_assistant_revisions(assistant, page_size=2)
    assert paged == revisions
    assert owner.wire.count(LIST) - before == 2
    # A limit asks for no more than it keeps.
    before = owner.wire.count(LIST)
    assert await client.list_assistant_revisions(assistant, limit=2) == revisions[:2]
    assert owner.wire.count(LIST) - before == 1
    with pytest.raises(ValueError, match="page_size"):
        await client.list_assistant_revisions(assistant, page_size=0)

    # An earlier revision, as it was; it has no etag, since only a rollback changes it.
    first = await client.get_assistant(assistant.name, revision=1)
    assert (first.revision, first.instructions, first.etag) == (1, FIRST, "")
    assert first.display_name == "Tried"
    assert first.update_time == revisions[-1].create_time
    current = await client.get_assistant(assistant.name)
    assert (current.revision, current.instructions) == (3, THIRD)
    assert current.etag == assistant.etag
    assert await client.get_assistant(assistant.name, revision=3) == current

    with pytest.raises(NotFound):
        await client.get_assistant(assistant.name, revision=99)
    with pytest.raises(InvalidArgument) as negative:
        await client.get_assistant(assistant.name, revision=-1)
    assert [v.field for v in negative.value.violations] == ["revision"]
    with pytest.raises(NotFound):
        await client.list_assistant_revisions(f"{owner.workspace}/assistants/nobody")


async def test_a_message_and_a_schedule_pinned_to_a_revision_use_it(owner: Owner) -> None:
    client, assistant = owner.client, owner.assistant
    conversation = await new_conversation(client, owner.workspace)

    pinned = await asyncio.wait_for(
        client.ask(conversation, "try the first", assistant=assistant.name, assistant_revision=1),
        CALL_DEADLINE_S,
    )
    assert pinned.run.state == dpb.RUN_STATE_SUCCEEDED
    assert "try the first" in pinned.text
    assert pinned.run.assistant_revision == 1
    run = await client.get_run(pinned.run)
    assert (run.assistant, run.assistant_revision) == (assistant.name, 1)
    # Unpinned, a message takes the current revision, and the run says which it was.
    plain = await client.send(conversation, "and now", assistant=assistant.name)
    assert (await client.get_run(plain)).assistant_revision == 3

    with pytest.raises(NotFound):
        await client.send(conversation, "x", assistant=assistant.name, assistant_revision=99)
    with pytest.raises(InvalidArgument) as negative:
        await client.send(conversation, "x", assistant=assistant.name, assistant_revision=-1)
    assert [v.field for v in negative.value.violations] == ["assistant_revision"]
    # A revision belongs to an assistant: one without it is refused on that field.
    with pytest.raises(InvalidArgument) as alone:
        await client.send(conversation, "x", handler="echo", assistant_revision=1)
    assert [v.field for v in alone.value.violations] == ["assistant"]

    # Yearly, so that it never fires during the test: only the pin is looked at.
    schedule = await client.create_schedule(
        owner.workspace,
        "report",
        cron="0 9 1 1 *",
        assistant=assistant.name,
        assistant_revision=1,
    )
    assert schedule.assistant_revision == 1
    assert (await client.get_schedule(schedule.name)).assistant_revision == 1
    schedule.assistant_revision = 2
    moved = await client.update_schedule(schedule, ["assistant_revision"])
    assert moved.assistant_revision == 2
    with pytest.raises(NotFound):
        await client.create_schedule(
            owner.workspace, "x", cron="0 9 1 1 *", assistant=assistant.name, assistant_revision=99
        )
    with pytest.raises(InvalidArgument) as unpinned:
        await client.create_schedule(
            owner.workspace, "x", cron="0 9 1 1 *", handler="echo", assistant_revision=1
        )
    assert [v.field for v in unpinned.value.violations] == ["schedule.assistant_revision"]


async def test_a_rollback_is_a_new_revision_that_only_owners_make(owner: Owner) -> None:
    client, assistant = owner.client, owner.assistant
    with pytest.raises(NotFound):
        await client.rollback_assistant(assistant, 99)
    for bad in (-1, 0):
        with pytest.raises(InvalidArgument) as refused:
            await client.rollback_assistant(assistant, bad)
        assert [v.field for v in refused.value.violations] == ["revision"]

    # A member who is not an owner reads the revisions but cannot roll back.
    async with Client(owner.address, timeout_s=CALL_DEADLINE_S) as editor:
        joined = await editor.register(unique_email("editor"), PASSWORD)
        await client.context.AddWorkspaceMember(
            cpb.AddWorkspaceMemberRequest(
                parent=owner.workspace, user=joined.user.name, role=cpb.WORKSPACE_ROLE_EDITOR
            )
        )
        seen = await editor.list_assistant_revisions(assistant.name)
        assert [r.revision for r in seen] == [3, 2, 1]
        with pytest.raises(PermissionDenied):
            await editor.rollback_assistant(assistant.name, 1)
    assert (await client.get_assistant(assistant.name)).revision == 3

    # The assistant passed as itself sends its etag along.
    rolled = await client.rollback_assistant(assistant, 1)
    assert (rolled.revision, rolled.instructions) == (4, FIRST)
    assert rolled.etag != assistant.etag
    newest = (await client.list_assistant_revisions(assistant.name, limit=1))[0]
    assert (newest.revision, newest.origin, newest.restored_revision) == (
        4,
        dpb.ASSISTANT_REVISION_ORIGIN_ROLLED_BACK,
        1,
    )
    assert newest.author == owner.user
    # The revisions between stay as they were.
    assert (await client.get_assistant(assistant.name, revision=3)).instructions == THIRD

    # The version read before the rollback is stale now: nothing changes unseen.
    with pytest.raises(EtagMismatch):
        await client.rollback_assistant(assistant, 2)
    with pytest.raises(EtagMismatch):
        await client.rollback_assistant(assistant.name, 2, etag=assistant.etag)
    # A repeat, when the configuration is already revision 1's, makes none.
    again = await client.rollback_assistant(rolled, 1)
    assert again.revision == 4
    assert [r.revision for r in await client.list_assistant_revisions(assistant.name)] == [
        4,
        3,
        2,
        1,
    ]
