"""Assistant revisions (docs/assistants.md, "Revisions"): each change of a configuration is
kept whole and numbered, read with GetAssistant, listed newest first, rolled back as a new
revision; runs record the revision they used, and a message or a schedule may pin one."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.dispatcher.assistants.store import AssistantStore
from tests.conftest import CALL_DEADLINE_S
from tests.dispatcher.assistants.test_assistants import Desk, create, desk_mesh, get, update
from tests.infra.clock import FakeClock
from tests.kits import schedulekit
from tests.kits.contextkit import context_stub, create_conversation, refused, tap, violations
from tests.kits.dispatchkit import finished, get_run, request, send

pytestmark = pytest.mark.service

CODE = grpc.StatusCode
ORIGIN = pb.AssistantRevisionOrigin


@pytest.fixture
async def desk() -> Any:
    async with desk_mesh() as made:
        yield made


@pytest.fixture
async def any_desk(database_url: str) -> Any:
    """On SQLite and on PostgreSQL (the revision is written in the update's transaction)."""
    async with desk_mesh(database_url=database_url) as made:
        yield made


async def revisions(
    d: Desk, name: str, caller: Any = None, *, page_size: int = 0
) -> list[pb.AssistantRevision]:
    """Every kept revision, newest first, read page by page."""
    found: list[pb.AssistantRevision] = []
    token = ""
    while True:
        page = await d.stub.ListAssistantRevisions(
            pb.ListAssistantRevisionsRequest(parent=name, page_size=page_size, page_token=token),
            metadata=(caller or d.world.owner).md,
            timeout=CALL_DEADLINE_S,
        )
        found.extend(page.revisions)
        token = page.next_page_token
        if not token:
            return found


async def at(d: Desk, name: str, revision: int, caller: Any = None) -> pb.Assistant:
    response = await d.stub.GetAssistant(
        pb.GetAssistantRequest(name=name, revision=revision),
        metadata=(caller or d.world.owner).md,
        timeout=CALL_DEADLINE_S,
    )
    return response.assistant


async def rollback(
    d: Desk, name: str, revision: int, etag: str = "", caller: Any = None
) -> pb.Assistant:
    response = await d.stub.RollbackAssistant(
        pb.RollbackAssistantRequest(name=name, revision=revision, etag=etag),
        metadata=(caller or d.world.owner).md,
        timeout=CALL_DEADLINE_S,
    )
    return response.assistant


def instructed(name: str, text: str, etag: str = "") -> pb.Assistant:
    return pb.Assistant(name=name, instructions=text, etag=etag)


async def three(d: Desk) -> pb.Assistant:
    """An assistant at revision 3: instructions "one", then "two", then "three"."""
    made = await create(d, pb.Assistant(display_name="Helper", instructions="one"))
    await update(d, instructed(made.name, "two"), "instructions")
    return await update(d, instructed(made.name, "three"), "instructions")


async def two_revisions(d: Desk, **fields: Any) -> pb.Assistant:
    """An assistant answering with the echo handler at revision 1 and with the model
    (never reached on this desk) at revision 2."""
    made = await create(d, pb.Assistant(display_name="Echo", handler="handlers/echo", **fields))
    return await update(d, pb.Assistant(name=made.name, handler="handlers/llm"), "handler")


async def test_every_change_of_configuration_is_a_revision_kept_whole(any_desk: Desk) -> None:
    d = any_desk
    made = await create(d, pb.Assistant(display_name="Helper", instructions="one"))
    assert made.revision == 1
    second = await update(d, instructed(made.name, "two"), "instructions")
    assert second.revision == 2
    # The workspace's default is its routing choice, not the assistant's configuration:
    # the etag moves, the revision does not.
    flagged = await update(
        d, pb.Assistant(name=made.name, workspace_default=True), "workspace_default"
    )
    assert (flagged.revision, flagged.etag != second.etag) == (2, True)
    # An update that changes nothing makes no revision.
    same = await update(d, instructed(made.name, "two"), "instructions")
    assert same.revision == 2
    third = await update(d, instructed(made.name, "three"), "instructions")
    assert third.revision == 3

    kept = await revisions(d, made.name, page_size=2)
    assert [r.revision for r in kept] == [3, 2, 1]
    assert [r.origin for r in kept] == [ORIGIN.Value("ASSISTANT_REVISION_ORIGIN_UPDATED")] * 2 + [
        ORIGIN.Value("ASSISTANT_REVISION_ORIGIN_CREATED")
    ]
    assert [r.assistant.instructions for r in kept] == ["three", "two", "one"]
    assert {r.author for r in kept} == {d.world.owner.name}
    assert [r.name for r in kept] == [f"{made.name}/revisions/{n}" for n in (3, 2, 1)]
    assert kept[0].assistant == await get(d, made.name)
    assert kept[2].create_time.ToDatetime() <= kept[0].create_time.ToDatetime()

    first = await at(d, made.name, 1)
    assert (first.revision, first.instructions, first.etag) == (1, "one", "")
    assert (first.display_name, first.name) == ("Helper", made.name)
    assert first.update_time == kept[2].create_time
    # Revision 0 and the current revision's number both read the current assistant.
    assert await at(d, made.name, 3) == await at(d, made.name, 0) == third


async def test_a_rollback_is_a_new_revision_and_a_repeat_changes_nothing(desk: Desk) -> None:
    d = desk
    current = await three(d)
    stale = current.etag
    with tap(d.server) as events:
        rolled = await rollback(d, current.name, 1, current.etag)
        seen = events.take()
    assert (rolled.revision, rolled.instructions, rolled.display_name) == (4, "one", "Helper")
    assert rolled.etag != current.etag
    newest = (await revisions(d, current.name))[0]
    assert newest.origin == ORIGIN.Value("ASSISTANT_REVISION_ORIGIN_ROLLED_BACK")
    assert (newest.revision, newest.restored_revision) == (4, 1)
    # Its event carries the new revision, and the resolve cache follows it.
    [event] = [e for e in seen if e.type == events_pb2.EVENT_TYPE_ASSISTANT_CHANGED]
    assert event.assistant_changed.change == events_pb2.CHANGE_KIND_UPDATED
    assert event.assistant_changed.assistant.revision == 4
    assert (await d.assistants.resolve(d.world.id, current.name)) == rolled
    # The same rollback again: the configuration already is revision 1's, so
    # nothing changes, not even the etag, and nothing is announced.
    with tap(d.server) as events:
        again = await rollback(d, current.name, 1)
        assert events.take() == []
    assert (again.revision, again.etag) == (4, rolled.etag)
    # The etag it was read with is stale now.
    await refused(rollback(d, current.name, 2, stale), CODE.ABORTED)
    # Rolling forward is a rollback too.
    forward = await rollback(d, current.name, 3, rolled.etag)
    assert (forward.revision, forward.instructions) == (5, "three")


async def test_a_run_records_its_revision_and_a_message_may_pin_an_earlier_one(
    desk: Desk,
) -> None:
    d = desk
    # Revision 1 answers with the echo handler; revision 2 with the model, which this
    # desk's provider never answers: what a pinned run uses is its own revision's.
    made = await two_revisions(d)
    assert made.revision == 2
    conversation = (
        await create_conversation(context_stub(d.channel), d.world.editor, d.world.name)
    ).name

    pinned = request(conversation, "pinned words")
    pinned.assistant, pinned.assistant_revision = made.name, 1
    sent = await send(d.stub, d.world.editor, pinned)
    assert (sent.run.assistant, sent.run.assistant_revision) == (made.name, 1)
    assert sent.run.handler == "handlers/echo"
    ran = await finished(d.stub, d.world.editor, sent.run.name)
    assert ran.state == pb.RUN_STATE_SUCCEEDED
    assert "pinned words" in ran.output_message or ran.output_message
    assert (await get_run(d.stub, d.world.editor, sent.run.name)).assistant_revision == 1

    current = request(conversation, "current words")
    current.assistant = made.name
    later = await send(d.stub, d.world.editor, current)
    assert (later.run.assistant_revision, later.run.handler) == (2, "handlers/llm")


async def test_bad_revisions_are_refused_precisely(desk: Desk) -> None:
    d = desk
    current = await three(d)
    name = current.name
    error = await refused(at(d, name, -1), CODE.INVALID_ARGUMENT)
    assert violations(error) == ["revision"]
    error = await refused(rollback(d, name, 0), CODE.INVALID_ARGUMENT)
    assert violations(error) == ["revision"]
    error = await refused(rollback(d, name, 2**40), CODE.INVALID_ARGUMENT)
    assert violations(error) == ["revision"]
    await refused(at(d, name, 99), CODE.NOT_FOUND)
    await refused(rollback(d, name, 99), CODE.NOT_FOUND)
    await refused(rollback(d, f"{d.world.name}/assistants/nobody", 1), CODE.NOT_FOUND)
    error = await refused(
        d.stub.ListAssistantRevisions(
            pb.ListAssistantRevisionsRequest(parent=name, page_size=-1),
            metadata=d.world.owner.md,
            timeout=CALL_DEADLINE_S,
        ),
        CODE.INVALID_ARGUMENT,
    )
    assert violations(error) == ["page_size"]
    error = await refused(
        d.stub.ListAssistantRevisions(
            pb.ListAssistantRevisionsRequest(parent=name, page_token="forged"),
            metadata=d.world.owner.md,
            timeout=CALL_DEADLINE_S,
        ),
        CODE.INVALID_ARGUMENT,
    )
    assert violations(error) == ["page_token"]
    error = await refused(
        d.stub.ListAssistantRevisions(
            pb.ListAssistantRevisionsRequest(parent="not-a-name"),
            metadata=d.world.owner.md,
            timeout=CALL_DEADLINE_S,
        ),
        CODE.INVALID_ARGUMENT,
    )
    conversation = (
        await create_conversation(context_stub(d.channel), d.world.editor, d.world.name)
    ).name
    unnamed = request(conversation, "no assistant")
    unnamed.assistant_revision = 1
    error = await refused(send(d.stub, d.world.editor, unnamed), CODE.INVALID_ARGUMENT)
    assert violations(error) == ["assistant"]
    missing = request(conversation, "no such revision")
    missing.assistant, missing.assistant_revision = name, 99
    await refused(send(d.stub, d.world.editor, missing), CODE.NOT_FOUND)


async def test_members_read_history_owners_roll_back_strangers_see_nothing(desk: Desk) -> None:
    d = desk
    current = await three(d)
    for member in (d.world.editor, d.world.viewer):
        assert [r.revision for r in await revisions(d, current.name, member)] == [3, 2, 1]
        assert (await at(d, current.name, 1, member)).instructions == "one"
        await refused(rollback(d, current.name, 1, caller=member), CODE.PERMISSION_DENIED)
    stranger = d.world.outsider
    await refused(revisions(d, current.name, stranger), CODE.NOT_FOUND)
    await refused(at(d, current.name, 1, stranger), CODE.NOT_FOUND)
    await refused(rollback(d, current.name, 1, caller=stranger), CODE.NOT_FOUND)
    assert (await get(d, current.name)).revision == 3


async def test_a_revision_that_no_longer_holds_is_not_rolled_back_to(desk: Desk) -> None:
    d = desk
    helper = await create(d, pb.Assistant(display_name="Helper"))
    asking = await create(
        d,
        pb.Assistant(display_name="Asker", delegates=[pb.AssistantDelegate(assistant=helper.name)]),
    )
    alone = await update(d, pb.Assistant(name=asking.name), "delegates")
    assert (alone.revision, list(alone.delegates)) == (2, [])
    await d.stub.DeleteAssistant(
        pb.DeleteAssistantRequest(name=helper.name),
        metadata=d.world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    await refused(rollback(d, asking.name, 1), CODE.FAILED_PRECONDITION)
    assert (await get(d, asking.name)).revision == 2


async def test_the_oldest_revisions_beyond_the_kept_count_are_dropped() -> None:
    async with desk_mesh(dispatcher_max_assistant_revisions=3) as d:
        made = await create(d, pb.Assistant(display_name="Helper", instructions="v1"))
        for n in range(2, 6):
            await update(d, instructed(made.name, f"v{n}"), "instructions")
        assert [r.revision for r in await revisions(d, made.name)] == [5, 4, 3]
        await refused(at(d, made.name, 2), CODE.NOT_FOUND)
        await refused(rollback(d, made.name, 1), CODE.NOT_FOUND)
        assert (await rollback(d, made.name, 3)).revision == 6
        store = AssistantStore(d.server.shared.database)
        assert await store.revision_count(d.world.id, made.name.rsplit("/", 1)[-1]) == 3
        # Deleting the assistant deletes its revisions.
        await d.stub.DeleteAssistant(
            pb.DeleteAssistantRequest(name=made.name),
            metadata=d.world.owner.md,
            timeout=CALL_DEADLINE_S,
        )
        assert await store.revision_count(d.world.id, made.name.rsplit("/", 1)[-1]) == 0


async def test_a_schedule_pins_a_revision_that_must_be_kept(desk: Desk) -> None:
    d = desk
    current = await three(d)
    sdesk = schedulekit.Desk(d.server, d.channel, d.stub, d.world)
    schedule = schedulekit.every(60)
    schedule.assistant, schedule.assistant_revision = current.name, 1
    made = await schedulekit.create(sdesk, schedule)
    assert made.assistant_revision == 1
    schedule.assistant_revision = 99
    await refused(schedulekit.create(sdesk, schedule), CODE.NOT_FOUND)
    unnamed = schedulekit.every(60)
    unnamed.assistant_revision = 1
    error = await refused(schedulekit.create(sdesk, unnamed), CODE.INVALID_ARGUMENT)
    assert violations(error) == ["schedule.assistant_revision"]
    moved = await schedulekit.update(
        sdesk, pb.Schedule(name=made.name, assistant_revision=2), "assistant_revision"
    )
    assert moved.assistant_revision == 2


async def test_a_pinned_schedule_fires_with_its_revision() -> None:
    async with desk_mesh(schedules_min_interval_s=1.0) as d:
        await _fires_pinned(d)


async def _fires_pinned(d: Desk) -> None:
    made = await two_revisions(d)
    sdesk = schedulekit.Desk(d.server, d.channel, d.stub, d.world)
    clock = FakeClock(schedulekit.at(schedulekit.DAY))
    schedulekit.on(sdesk, clock)
    schedule = schedulekit.every(1)
    schedule.assistant, schedule.assistant_revision = made.name, 1
    pinned = await schedulekit.create(sdesk, schedule)
    firing = schedulekit.loop(sdesk, clock, "replica-a")
    clock.advance(1)
    await firing.run_once()
    [fired] = await schedulekit.firings(sdesk, pinned.name)
    assert fired.outcome == pb.FIRING_OUTCOME_STARTED, fired
    run = await get_run(d.stub, d.world.owner, fired.run)
    assert (run.assistant, run.assistant_revision, run.handler) == (
        made.name,
        1,
        "handlers/echo",
    )


async def test_a_page_of_large_revisions_stays_within_its_byte_budget(desk: Desk) -> None:
    d = desk
    # 30,000 four-byte characters: about 117 KiB of instructions per revision.
    big = "\U0001d11e" * 29_999
    made = await create(d, pb.Assistant(display_name="Large", instructions=big + "0"))
    for n in range(1, 12):
        await update(d, instructed(made.name, big + str(n)), "instructions")
    page = await d.stub.ListAssistantRevisions(
        pb.ListAssistantRevisionsRequest(parent=made.name, page_size=50),
        metadata=d.world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    assert 1 <= len(page.revisions) < 12
    assert page.next_page_token
    assert page.ByteSize() < 2 * 1024 * 1024
    every = await revisions(d, made.name, page_size=50)
    assert [r.revision for r in every] == list(range(12, 0, -1))


async def test_two_rollbacks_at_once_with_one_etag_answer_each_precisely(any_desk: Desk) -> None:
    d = any_desk
    current = await three(d)
    answers = await asyncio.gather(
        rollback(d, current.name, 1, current.etag),
        rollback(d, current.name, 2, current.etag),
        return_exceptions=True,
    )
    won = [a for a in answers if isinstance(a, pb.Assistant)]
    lost = [a for a in answers if not isinstance(a, pb.Assistant)]
    assert len(won) == 1, answers
    assert [e.code() for e in lost if isinstance(e, grpc.aio.AioRpcError)] == [CODE.ABORTED]
    assert won[0].revision == 4
    kept = await revisions(d, current.name)
    assert [r.revision for r in kept] == [4, 3, 2, 1]
    assert kept[0].restored_revision in (1, 2)
    assert kept[0].assistant.instructions == won[0].instructions
