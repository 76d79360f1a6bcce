"""switchboard.client against a real in-process server: memory as a person keeps it.

Facts with time: an item that supersedes another retires it at its own ``valid_time``;
lists take what is true now, what was retired, everything, or what was true at a time;
an item's history holds each version of it and of the items it replaced; a correction
is keyed by the item's etag; retiring keeps the record, forgetting removes it. An
assistant's and a workspace's memory policy are set through the client. Most of it is
seeded with the client's own ``remember`` (CreateMemoryItem), as an application does; the
last test has an assistant form memory from a conversation (scripted as the forming tests
script the model: tests/dispatcher/memory/memorykit.py) and follows its decisions.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from google.protobuf import duration_pb2

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as dpb
from switchboard.api.events.v1 import events_pb2 as epb
from switchboard.client import (
    AlreadyExists,
    Client,
    EtagMismatch,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.settings import Settings
from tests.client.test_clientkit import PASSWORD, new_conversation, new_workspace, unique_email
from tests.conftest import CALL_DEADLINE_S, make_settings, started
from tests.dispatcher.memory.memorykit import Model, fact
from tests.fakes.openai_server import FakeOpenAI

pytestmark = pytest.mark.service

JANUARY = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
MARCH = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
JUNE = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
JULY = dt.datetime(2026, 7, 1, tzinfo=dt.UTC)


@dataclass
class Person:
    client: Client
    user: str
    workspace: str
    address: str


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url=database_url)


@pytest.fixture
async def person(settings: Settings) -> AsyncIterator[Person]:
    server: SwitchboardServer
    async with (
        started(settings) as server,
        Client(server.address, timeout_s=CALL_DEADLINE_S) as client,
    ):
        registered = await client.register(unique_email("memory"), PASSWORD)
        workspace = await new_workspace(client, "Memory")
        yield Person(client, registered.user.name, workspace, server.address)


def _names(items: list[cpb.MemoryItem]) -> list[str]:
    return [item.name for item in items]


async def test_a_superseding_fact_retires_the_old_one_at_its_valid_time(person: Person) -> None:
    client, user = person.client, person.user
    paris = await client.remember(
        user, "lives in Paris", valid_time=JANUARY, memory_item_id="home-paris"
    )
    assert paris.name == f"{user}/memories/home-paris"
    assert paris.valid_time.ToDatetime(dt.UTC) == JANUARY
    assert not paris.HasField("invalid_time")
    assert paris.version == 1
    assert paris.workspace == ""  # written by a person: it follows the user everywhere

    berlin = await client.remember(user, "lives in Berlin", supersedes=paris.name, valid_time=JUNE)
    assert berlin.supersedes == paris.name
    assert not berlin.HasField("invalid_time")

    assert _names(await client.list_memory(user)) == [berlin.name]
    retired = await client.list_memory(user, validity="retired")
    assert _names(retired) == [paris.name]
    assert retired[0].superseded_by == berlin.name
    assert retired[0].invalid_time.ToDatetime(dt.UTC) == JUNE
    assert retired[0].invalid_reason == "superseded"
    # Newest first.
    assert _names(await client.list_memory(user, validity=cpb.MEMORY_VALIDITY_ALL)) == [
        berlin.name,
        paris.name,
    ]

    # As things stood at a time: valid_time at or before it, invalid_time after it.
    assert _names(await client.list_memory(user, valid_at=MARCH)) == [paris.name]
    assert _names(await client.list_memory(user, valid_at=JULY)) == [berlin.name]
    assert await client.list_memory(user, valid_at=JANUARY - dt.timedelta(days=1)) == []
    # valid_at wins over validity.
    assert _names(await client.list_memory(user, valid_at=MARCH, validity="retired")) == [
        paris.name
    ]

    # An item already retired cannot be superseded again; a repeated id is applied once.
    with pytest.raises(FailedPrecondition):
        await client.remember(user, "lives in Rome", supersedes=paris.name)
    # Nor made current again while a newer item replaces it.
    with pytest.raises(FailedPrecondition):
        await client.restore_memory(paris.name)
    with pytest.raises(AlreadyExists):
        await client.remember(user, "lives in Paris", memory_item_id="home-paris")
    assert len(await client.list_memory(user, validity="all")) == 2


async def test_history_has_every_version_of_an_item_and_of_those_it_replaced(
    person: Person,
) -> None:
    client, user = person.client, person.user
    paris = await client.remember(user, "lives in Paris", kind="fact", valid_time=JANUARY)
    berlin = await client.remember(user, "lives in Berlin", supersedes=paris.name)

    corrected = await client.correct_memory(berlin, "lives in Berlin, Kreuzberg")
    assert corrected.content == "lives in Berlin, Kreuzberg"
    assert corrected.version == 2
    assert corrected.etag != berlin.etag
    # The version read before the correction is stale: nothing is overwritten unseen.
    with pytest.raises(EtagMismatch):
        await client.correct_memory(berlin, "lives in Hamburg")
    with pytest.raises(EtagMismatch):
        await client.correct_memory(berlin.name, "lives in Hamburg", etag=berlin.etag)

    plain = await client.get_memory(berlin.name)
    assert plain.memory_item.content == "lives in Berlin, Kreuzberg"
    assert list(plain.history) == []

    got = await client.get_memory(corrected, history=True)
    versions = [(v.memory_item, v.version, v.change, v.content) for v in got.history]
    assert sorted(versions) == sorted(
        [
            (paris.name, 1, cpb.MEMORY_CHANGE_CREATED, "lives in Paris"),
            (paris.name, 2, cpb.MEMORY_CHANGE_RETIRED, "lives in Paris"),
            (berlin.name, 1, cpb.MEMORY_CHANGE_CREATED, "lives in Berlin"),
            (berlin.name, 2, cpb.MEMORY_CHANGE_EDITED, "lives in Berlin, Kreuzberg"),
        ]
    )
    times = [v.change_time.ToDatetime(dt.UTC) for v in got.history]
    assert times == sorted(times), "history is not oldest first"
    assert versions[-1] == (berlin.name, 2, cpb.MEMORY_CHANGE_EDITED, "lives in Berlin, Kreuzberg")
    retirement = next(v for v in got.history if v.change == cpb.MEMORY_CHANGE_RETIRED)
    assert retirement.invalid_reason == "superseded"
    assert retirement.HasField("invalid_time")
    assert retirement.valid_time.ToDatetime(dt.UTC) == JANUARY
    assert {v.editor for v in got.history} == {user}

    # Forgetting an older item leaves the newer one, current, without the pointer.
    rome = await client.remember(user, "lives in Rome", supersedes=corrected.name)
    await client.forget_memory(corrected)
    kept = (await client.get_memory(rome, history=True)).memory_item
    assert kept.supersedes == ""
    assert _names(await client.list_memory(user, validity="all")) == [rome.name]
    # Forgetting the newest forgets its whole history: the items it replaced too.
    madrid = await client.remember(user, "lives in Madrid", supersedes=rome.name)
    await client.forget_memory(madrid)
    for gone in (madrid.name, rome.name, paris.name, berlin.name):
        with pytest.raises(NotFound):
            await client.get_memory(gone)
    assert await client.list_memory(user, validity="all") == []


async def test_retiring_keeps_the_record_and_forgetting_removes_it(person: Person) -> None:
    client, workspace = person.client, person.workspace
    note = await client.remember(workspace, "the office closes at six", kind="note")
    other = await client.remember(workspace, "the coffee machine is on floor two")

    retired = await client.retire_memory(note, reason="it closes at seven now")
    assert retired.HasField("invalid_time")
    assert retired.invalid_reason == "it closes at seven now"
    assert retired.invalid_time.ToDatetime(dt.UTC) <= dt.datetime.now(dt.UTC)
    assert _names(await client.list_memory(workspace)) == [other.name]
    assert _names(await client.list_memory(workspace, validity="retired")) == [note.name]

    restored = await client.restore_memory(retired)
    assert not restored.HasField("invalid_time")
    assert restored.invalid_reason == ""
    assert set(_names(await client.list_memory(workspace))) == {note.name, other.name}

    # A retirement in the future is refused: retiring says what is no longer true.
    with pytest.raises(InvalidArgument) as future:
        await client.retire_memory(restored, at=dt.datetime.now(dt.UTC) + dt.timedelta(days=3))
    assert [v.field for v in future.value.violations] == ["memory_item.invalid_time"]

    await client.forget_memory(restored)
    with pytest.raises(NotFound):
        await client.get_memory(note.name, history=True)
    assert _names(await client.list_memory(workspace, validity="all")) == [other.name]
    with pytest.raises(NotFound):
        await client.forget_memory(note.name)


async def test_a_users_memory_is_theirs_alone_and_lists_by_workspace(person: Person) -> None:
    client, user, workspace = person.client, person.user, person.workspace
    written = await client.remember(user, "prefers tea", kind="preference")
    # What a person wrote follows them into every workspace's view of their memory.
    assert _names(await client.list_memory(user, workspace=workspace)) == [written.name]
    assert _names(await client.list_memory(user, kinds=["preference"])) == [written.name]
    assert await client.list_memory(user, kinds=[cpb.MEMORY_KIND_PLAN]) == []

    # An item formed in a workspace (as the forming worker writes it, marked with the
    # workspace) shows only in that workspace's view; what people wrote, in every one.
    elsewhere = await new_workspace(client, "Elsewhere")
    formed = await client.context.CreateMemoryItem(
        cpb.CreateMemoryItemRequest(
            parent=user,
            memory_item=cpb.MemoryItem(
                kind=cpb.MEMORY_KIND_PLAN, content="flies to Lisbon in May", workspace=elsewhere
            ),
        )
    )
    assert formed.memory_item.workspace == elsewhere
    assert _names(await client.list_memory(user, workspace=workspace)) == [written.name]
    assert _names(await client.list_memory(user, workspace=elsewhere)) == [
        formed.memory_item.name,
        written.name,
    ]
    assert set(_names(await client.list_memory(user))) == {formed.memory_item.name, written.name}
    lisbon = cpb.SEARCH_MODE_FULL_TEXT
    found = await client.search_memory(user, "Lisbon", mode=lisbon, workspace=elsewhere)
    assert [r.memory_item.name for r in found.results] == [formed.memory_item.name]
    found = await client.search_memory(user, "Lisbon", mode=lisbon, workspace=workspace)
    assert list(found.results) == []
    # Search takes current items only.
    await client.retire_memory(formed.memory_item, reason="trip cancelled")
    found = await client.search_memory(user, "Lisbon", mode=lisbon, workspace=elsewhere)
    assert list(found.results) == []
    with pytest.raises(InvalidArgument) as misplaced:
        await client.list_memory(workspace, workspace=elsewhere)
    assert [v.field for v in misplaced.value.violations] == ["workspace"]

    async with Client(person.address, timeout_s=CALL_DEADLINE_S) as stranger:
        await stranger.register(unique_email("stranger"), PASSWORD)
        with pytest.raises((NotFound, PermissionDenied)):
            await stranger.list_memory(user)
        with pytest.raises((NotFound, PermissionDenied)):
            await stranger.get_memory(written.name)
        with pytest.raises((NotFound, PermissionDenied)):
            await stranger.forget_memory(written.name)
    assert _names(await client.list_memory(user)) == [written.name]


PLANS = cpb.MemoryCategoryRule(category=cpb.MEMORY_CATEGORY_PLANS)


def _policy(
    *,
    idle_minutes: int = 30,
    max_candidates: int = 3,
    categories: list[cpb.MemoryCategoryRule] | None = None,
) -> cpb.MemoryPolicy:
    month = duration_pb2.Duration(seconds=30 * 86400)
    kept = [cpb.MemoryCategoryRule(category=cpb.MEMORY_CATEGORY_PREFERENCES, ttl=month), PLANS]
    return cpb.MemoryPolicy(
        mode=cpb.MEMORY_FORMING_MODE_USER_AND_WORKSPACE,
        idle_minutes=idle_minutes,
        categories=kept if categories is None else categories,
        max_candidates=max_candidates,
        max_items=50,
    )


async def test_memory_policies_are_set_on_a_workspace_and_an_assistant(person: Person) -> None:
    client, workspace = person.client, person.workspace
    policy = _policy()
    changed = await client.set_workspace_memory_policy(workspace, policy)
    assert changed.memory_policy == policy
    read = await client.context.GetWorkspace(cpb.GetWorkspaceRequest(name=workspace))
    assert read.workspace.memory_policy == policy

    created = await client.dispatcher.CreateAssistant(
        dpb.CreateAssistantRequest(
            parent=workspace,
            assistant=dpb.Assistant(display_name="Keeper", handler="handlers/echo"),
        )
    )
    assistant = created.assistant.name
    off = cpb.MemoryPolicy(mode=cpb.MEMORY_FORMING_MODE_OFF)
    updated = await client.set_assistant_memory_policy(assistant, off, etag=created.assistant.etag)
    assert updated.memory_policy == off
    assert updated.display_name == "Keeper"  # only the policy changed
    got = await client.dispatcher.GetAssistant(dpb.GetAssistantRequest(name=assistant))
    assert got.assistant.memory_policy == off
    # A stale etag is refused, as for any update.
    with pytest.raises(EtagMismatch):
        await client.set_assistant_memory_policy(assistant, policy, etag=created.assistant.etag)

    inherit = await client.set_assistant_memory_policy(assistant, None)
    assert inherit.memory_policy.mode == cpb.MEMORY_FORMING_MODE_UNSPECIFIED

    twice = [PLANS, PLANS]
    brief = [
        cpb.MemoryCategoryRule(
            category=cpb.MEMORY_CATEGORY_PLANS, ttl=duration_pb2.Duration(seconds=30)
        )
    ]
    for bad, field in [
        (_policy(idle_minutes=5000), "idle_minutes"),
        (_policy(max_candidates=21), "max_candidates"),
        (_policy(categories=twice), "categories"),
        (_policy(categories=brief), "categories"),
    ]:
        with pytest.raises(InvalidArgument) as refused:
            await client.set_assistant_memory_policy(assistant, bad)
        fields = [v.field for v in refused.value.violations]
        assert any(f.startswith("assistant.memory_policy.") and field in f for f in fields), fields
        with pytest.raises(InvalidArgument):
            await client.set_workspace_memory_policy(workspace, bad)
    # Nothing changed by the refusals.
    got = await client.dispatcher.GetAssistant(dpb.GetAssistantRequest(name=assistant))
    assert got.assistant.memory_policy.mode == cpb.MEMORY_FORMING_MODE_UNSPECIFIED
    read = await client.context.GetWorkspace(cpb.GetWorkspaceRequest(name=workspace))
    assert read.workspace.memory_policy == policy

    cleared = await client.set_workspace_memory_policy(workspace, None)
    assert not cleared.HasField("memory_policy") or cleared.memory_policy == cpb.MemoryPolicy()


async def test_bad_arguments_are_refused_before_anything_is_sent(person: Person) -> None:
    client, user = person.client, person.user
    with pytest.raises(ValueError, match="current, retired or all"):
        await client.list_memory(user, validity="sometimes")
    with pytest.raises(ValueError, match="time zone"):
        await client.list_memory(user, valid_at=dt.datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="not a memory kind"):
        await client.remember(user, "x", kind="rumour")


@pytest.fixture
async def forming(database_url: str) -> AsyncIterator[tuple[Person, Model]]:
    """A server that forms memory with the scripted model (tests/fakes/openai_server.py,
    scripted as the forming tests script it), and a person signed in to it."""
    script = Model()
    async with FakeOpenAI(default=script) as fake:
        settings = make_settings(
            database_url=database_url,
            llm_base_url=fake.url,
            llm_model="m-1",
            llm_max_retries=0,
            memory_forming=True,
            memory_poll_s=0.2,
            memory_consolidate_delay_s=3600.0,
        )
        async with (
            started(settings) as server,
            Client(server.address, timeout_s=CALL_DEADLINE_S) as client,
        ):
            registered = await client.register(unique_email("forming"), PASSWORD)
            workspace = await new_workspace(client, "Forming")
            yield Person(client, registered.user.name, workspace, server.address), script


async def _decision(follower: AsyncIterator[epb.Event]) -> epb.Event:
    return await asyncio.wait_for(anext(follower), CALL_DEADLINE_S)


async def test_what_an_assistant_forms_is_followed_listed_and_forgotten(
    forming: tuple[Person, Model],
) -> None:
    """The issue's story through the client: a fact told is remembered with its source,
    a change retires it, and forgetting removes both; each decision is followed as it
    is made (a user's decisions come on the user's scope)."""
    person, script = forming
    client, user, workspace = person.client, person.user, person.workspace
    script.facts["I live in Paris."] = [[fact("Lives in Paris.")]]
    script.facts["I moved to Berlin."] = [[fact("Lives in Berlin.")]]
    script.decisions["Lives in Berlin."] = ("update", "Lives in Paris.")
    created = await client.dispatcher.CreateAssistant(
        dpb.CreateAssistantRequest(parent=workspace, assistant=dpb.Assistant(display_name="Keeper"))
    )
    keeper = created.assistant.name
    await client.set_assistant_memory_policy(
        keeper, cpb.MemoryPolicy(mode=cpb.MEMORY_FORMING_MODE_USER)
    )
    conversation = await new_conversation(client, workspace)

    async with client.follow([user, workspace], types=["MEMORY_DECIDED"]) as decisions:
        await asyncio.wait_for(decisions.ready(), CALL_DEADLINE_S)
        told = await client.ask(conversation, "I live in Paris.", assistant=keeper)
        added = await _decision(decisions)
        moved = await client.ask(conversation, "I moved to Berlin.", assistant=keeper)
        updated = await _decision(decisions)

    assert added.type == epb.EVENT_TYPE_MEMORY_DECIDED
    assert added.memory_decided.action == epb.MEMORY_DECISION_ACTION_ADD
    assert added.memory_decided.run == told.run.name
    assert added.memory_decided.assistant == keeper
    assert updated.memory_decided.action == epb.MEMORY_DECISION_ACTION_UPDATE
    assert updated.memory_decided.replaces == added.memory_decided.memory_item
    assert updated.memory_decided.run == moved.run.name

    [berlin] = await client.list_memory(user, workspace=workspace)
    assert berlin.name == updated.memory_decided.memory_item
    assert berlin.content == "Lives in Berlin."
    assert berlin.workspace == workspace  # formed here: only this workspace uses it
    assert berlin.formation.assistant == keeper
    assert berlin.formation.run == moved.run.name
    assert list(berlin.source_messages) == [moved.run.input_message, moved.run.output_message]
    [paris] = await client.list_memory(user, workspace=workspace, validity="retired")
    assert paris.name == added.memory_decided.memory_item
    assert paris.superseded_by == berlin.name
    # Formed in this workspace: another workspace's view of the user has none of it.
    elsewhere = await new_workspace(client, "Elsewhere")
    assert await client.list_memory(user, workspace=elsewhere, validity="all") == []

    got = await client.get_memory(berlin, history=True)
    assert {v.memory_item for v in got.history} == {paris.name, berlin.name}
    assert {v.editor for v in got.history if v.change == cpb.MEMORY_CHANGE_CREATED} == {keeper}

    await client.forget_memory(berlin)
    assert await client.list_memory(user, validity="all") == []
