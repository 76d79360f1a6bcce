"""GetContextWindow and PruneConversation through the real service, on SQLite and PostgreSQL.

A worked example pins down the layout of a window; property tests (Hypothesis)
check its invariants on generated conversations: the budget always holds,
pinned items always appear, order is preserved, pruning twice changes
nothing, and no message is ever lost. Then automatic pruning, and the
embedded window cache: a write followed by a window never returns the old one.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc import aio
from hypothesis import HealthCheck, event, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.context import storebase as store_module
from switchboard.context.domain import ContextDomain
from switchboard.context.windows import builder as windows_module
from switchboard.context.windows import cache as windowcache_module
from switchboard.context.windows.settings import WindowSettings
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.settings import Settings
from tests.conftest import CALL_DEADLINE_S, built, make_settings, started
from tests.kits.authkit import detail
from tests.kits.contextkit import (
    EXPIRED,
    OVER_BUDGET,
    PINNED,
    RECENT,
    RELEVANT,
    SUMMARY,
    Chat,
    add_member,
    all_messages,
    append,
    awaiting_event,
    check_nothing_lost,
    check_window,
    create_conversation,
    expected_kept,
    expire_in_database,
    from_now,
    get_conversation,
    get_memory_item,
    included_messages,
    item_name,
    member_name,
    names,
    new_caller,
    new_chat,
    prune,
    range_of,
    remember,
    summary_created,
    window,
)
from tests.kits.modulekit import module_channel_fixture, module_database_url_fixture

# One server per backend for the module (starting one per test was most of the module's
# time): every test makes a user, workspace and conversation of its own.
pytestmark = [pytest.mark.service, pytest.mark.asyncio(loop_scope="module")]

MAX_WINDOW_TOKENS = 50_000
USER = pb.MESSAGE_ROLE_USER
ASSISTANT = pb.MESSAGE_ROLE_ASSISTANT


@pytest.fixture
def overrides() -> dict[str, Any]:
    """Extra settings; a test changes them with ``@pytest.mark.parametrize("overrides", ...)``."""
    return {}


def window_settings(database_url: str, overrides: dict[str, Any]) -> Settings:
    values: dict[str, Any] = {
        "context_max_window_tokens": MAX_WINDOW_TOKENS,
        # Short summaries, so that generated windows often have room for one.
        "context_summary_tokens": 40,
    }
    values.update(overrides)
    return make_settings(database_url=database_url, **values)


# Every test here runs once on SQLite and once on PostgreSQL.
module_database_url = module_database_url_fixture


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(module_database_url: str) -> AsyncIterator[SwitchboardServer]:
    async with started(window_settings(module_database_url, {})) as server:
        yield server


channel = module_channel_fixture


@pytest_asyncio.fixture(loop_scope="module")
async def own_mesh(
    database_url: str, overrides: dict[str, Any]
) -> AsyncIterator[tuple[SwitchboardServer, aio.Channel]]:
    """A server of the test's own, with its ``overrides``, and a channel to it."""
    async with (
        started(window_settings(database_url, overrides)) as server,
        aio.insecure_channel(server.address) as chan,
    ):
        yield server, chan


def code_of(error: pytest.ExceptionInfo[aio.AioRpcError]) -> grpc.StatusCode:
    return error.value.code()


# -- the worked example -----------------------------------------------------------------


async def test_worked_example(mesh: SwitchboardServer, channel: aio.Channel) -> None:
    c = await new_chat(mesh, channel)
    # Another member's own pinned memory is theirs, never in this caller's window.
    other = await new_caller(mesh)
    await add_member(c.stub, c.caller, c.workspace, other, pb.WORKSPACE_ROLE_EDITOR)
    theirs = await remember(
        c.stub, other, other.name, "Someone else likes long essays.", pinned=True
    )

    pinned = [
        await remember(
            c.stub, c.caller, c.conversation, "Project codename is Bluebird.", pinned=True
        ),
        await remember(
            c.stub,
            c.caller,
            c.workspace,
            "Answer in British English.",
            pinned=True,
            kind=pb.MEMORY_KIND_NOTE,
        ),
        await remember(
            c.stub,
            c.caller,
            c.caller.name,
            "Keep answers short.",
            pinned=True,
            kind=pb.MEMORY_KIND_PREFERENCE,
        ),
    ]
    giraffe = await remember(c.stub, c.caller, c.workspace, "Giraffe enclosure closes at noon.")
    volcano = await remember(c.stub, c.caller, c.conversation, "Volcanoes erupt rarely.")

    conversation = [
        (USER, "Tell me about the zoo opening hours and the aquarium schedule."),
        (ASSISTANT, "The zoo opens early every morning and stays open late in summer."),
        (USER, "Which animals can children feed at the petting area?"),
        (ASSISTANT, "Children can feed goats and sheep under supervision."),
        (USER, "Are there guided tours for school groups on weekdays?"),
        (ASSISTANT, "Yes, guided tours run on weekdays for school groups."),
        (USER, "When does the giraffe enclosure close?"),
        # The newest message is not the user's: relevance follows the latest
        # *user* message, so the volcano note must not be retrieved.
        (ASSISTANT, "Let me check; volcanoes erupt rarely, by the way."),
    ]
    m = [
        await append(c.stub, c.caller, c.conversation, text, role=role)
        for role, text in conversation
    ]

    pruned = await prune(c.stub, c.caller, c.conversation, keep_last_messages=6)
    assert pruned.pruned_message_count == 2
    assert pruned.kept_message_count == 6
    summary = pruned.summary
    assert summary.kind == pb.MEMORY_KIND_SUMMARY
    assert summary.name.startswith(c.conversation + "/memories/")
    assert range_of(summary) == (m[0].sequence, m[1].sequence)

    # Room for the pinned items, the relevant one, the summary and the three
    # newest messages; m[4] misses by one token, so m[2] and m[3] are omitted.
    pinned_tokens = sum(p.token_count for p in pinned)
    newest = m[5].token_count + m[6].token_count + m[7].token_count
    fits = pinned_tokens + giraffe.token_count + summary.token_count + newest
    budget = fits + m[4].token_count - 1
    # Relevant memories may use at most a quarter of the budget (so the
    # example really is about order and the budget, not about that cap).
    assert giraffe.token_count <= budget // 4

    win = await window(c.stub, c.caller, c.conversation, budget)
    assert [i.reason for i in win.included] == [PINNED] * 3 + [RELEVANT, SUMMARY] + [RECENT] * 3
    assert sorted(names(win.included, PINNED)) == sorted(p.name for p in pinned)
    assert names(win.included, RELEVANT) == [giraffe.name]
    assert names(win.included, SUMMARY) == [summary.name]
    assert [x.name for x in included_messages(win)] == [m[5].name, m[6].name, m[7].name]
    assert [x.sequence for x in included_messages(win)] == sorted(
        x.sequence for x in included_messages(win)
    )
    assert [(item_name(i), i.reason) for i in win.excluded] == [(m[4].name, OVER_BUDGET)]
    assert win.omitted_messages == 2
    assert win.total_tokens == fits
    assert win.total_tokens == sum(i.token_count for i in win.included)
    assert win.total_tokens <= win.token_budget == budget
    assert win.tokenizer == mesh.shared.section(WindowSettings).context_tokenizer
    assert win.conversation == c.conversation
    assert (
        win.conversation_version
        == (await get_conversation(c.stub, c.caller, c.conversation)).version
    )
    listed = names(win.included) + names(win.excluded)
    assert theirs.name not in listed
    assert volcano.name not in listed
    included = {item_name(i): i for i in win.included}
    assert included[summary.name].memory_item.content == summary.content
    assert included[m[7].name].message.parts[0].text == conversation[7][1]
    live = await all_messages(c.stub, c.caller, c.conversation)
    assert [x.name for x in live] == [x.name for x in m[2:]]
    check_window(win, budget=budget, live=live, pinned=[p.name for p in pinned])

    # An explicit query replaces the latest user message for retrieval.
    asked = await window(c.stub, c.caller, c.conversation, budget, query="volcanoes erupt")
    assert names(asked.included, RELEVANT) == [volcano.name]
    assert giraffe.name not in names(asked.included) + names(asked.excluded)
    check_window(asked, budget=budget, live=live, pinned=[p.name for p in pinned])


async def test_expired_memories_are_listed_as_expired_and_never_included(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    c = await new_chat(mesh, channel)
    live_pin = await remember(
        c.stub, c.caller, c.conversation, "The launch is planned for spring.", pinned=True
    )
    stale_pin = await remember(
        c.stub,
        c.caller,
        c.workspace,
        "Use the old staging cluster.",
        pinned=True,
        expire_time=from_now(hours=1),
    )
    stale_note = await remember(
        c.stub,
        c.caller,
        c.workspace,
        "Giraffe feeding moved indoors.",
        expire_time=from_now(hours=1),
    )
    fresh_note = await remember(c.stub, c.caller, c.workspace, "Giraffe feeding happens at noon.")
    # Written before any window of this conversation exists (see expire_in_database).
    await expire_in_database(mesh, stale_pin.name)
    await expire_in_database(mesh, stale_note.name)
    question = await append(c.stub, c.caller, c.conversation, "When is giraffe feeding?")

    win = await window(c.stub, c.caller, c.conversation, 1000)
    check_window(
        win,
        budget=1000,
        live=[question],
        pinned=[live_pin.name],
        expired=[stale_pin.name],
    )
    assert names(win.excluded, EXPIRED) in ([stale_pin.name], [stale_pin.name, stale_note.name])
    assert names(win.included, RELEVANT) == [fresh_note.name]
    assert stale_note.name not in names(win.included)

    # The expired pinned item does not count against the budget either: a
    # budget too small for both pinned items together is enough for the live one.
    tight = live_pin.token_count + stale_pin.token_count - 1
    assert tight >= live_pin.token_count
    small = await window(c.stub, c.caller, c.conversation, tight)
    assert names(small.included, PINNED) == [live_pin.name]
    assert stale_pin.name in names(small.excluded, EXPIRED)
    assert small.total_tokens <= tight


async def test_pinned_memories_over_the_budget_fail_loudly(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    c = await new_chat(mesh, channel)
    first = await remember(
        c.stub, c.caller, c.conversation, "Always cite the internal wiki.", pinned=True
    )
    second = await remember(
        c.stub, c.caller, c.caller.name, "Prefers metric units in every answer.", pinned=True
    )
    await append(c.stub, c.caller, c.conversation, "Hello there")
    needed = first.token_count + second.token_count

    with pytest.raises(aio.AioRpcError) as error:
        await window(c.stub, c.caller, c.conversation, needed - 1)
    assert code_of(error) == grpc.StatusCode.FAILED_PRECONDITION

    # Exactly enough: both pinned, nothing else fits.
    win = await window(c.stub, c.caller, c.conversation, needed)
    assert sorted(names(win.included)) == sorted([first.name, second.name])
    assert win.total_tokens == needed


# -- validation and access ----------------------------------------------------------------


@pytest.mark.parametrize("budget", [0, -1, MAX_WINDOW_TOKENS + 1])
async def test_token_budget_out_of_range_is_invalid(
    mesh: SwitchboardServer, channel: aio.Channel, budget: int
) -> None:
    c = await new_chat(mesh, channel)
    with pytest.raises(aio.AioRpcError) as error:
        await window(c.stub, c.caller, c.conversation, budget)
    assert code_of(error) == grpc.StatusCode.INVALID_ARGUMENT
    bad: error_details_pb2.BadRequest = detail(error.value, error_details_pb2.BadRequest)
    assert [v.field for v in bad.field_violations] == ["token_budget"]


async def test_a_query_over_the_limit_is_invalid(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    c = await new_chat(mesh, channel)
    limit = int(built(mesh, ContextDomain).limits.max_query_chars)
    with pytest.raises(aio.AioRpcError) as error:
        await window(c.stub, c.caller, c.conversation, 100, query="q" * (limit + 1))
    assert code_of(error) == grpc.StatusCode.INVALID_ARGUMENT
    bad: error_details_pb2.BadRequest = detail(error.value, error_details_pb2.BadRequest)
    assert [v.field for v in bad.field_violations] == ["query"]


async def test_the_largest_budget_is_accepted(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    c = await new_chat(mesh, channel)
    await append(c.stub, c.caller, c.conversation, "hello")
    win = await window(c.stub, c.caller, c.conversation, MAX_WINDOW_TOKENS)
    assert win.token_budget == MAX_WINDOW_TOKENS
    assert len(win.included) == 1


async def test_unknown_conversations_are_not_found(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    c = await new_chat(mesh, channel)
    with pytest.raises(aio.AioRpcError) as error:
        await window(c.stub, c.caller, f"{c.workspace}/conversations/nope", 100)
    assert code_of(error) == grpc.StatusCode.NOT_FOUND

    # A real conversation named under another workspace of the same caller.
    elsewhere = await c.stub.CreateWorkspace(
        pb.CreateWorkspaceRequest(workspace=pb.Workspace(display_name="Elsewhere")),
        metadata=c.caller.md,
        timeout=CALL_DEADLINE_S,
    )
    conversation_id = c.conversation.rsplit("/", 1)[1]
    wrong = f"{elsewhere.workspace.name}/conversations/{conversation_id}"
    for call in (
        window(c.stub, c.caller, wrong, 100),
        prune(c.stub, c.caller, wrong, keep_last_messages=1),
    ):
        with pytest.raises(aio.AioRpcError) as error:
            await call
        assert code_of(error) == grpc.StatusCode.NOT_FOUND


async def test_non_members_get_not_found(mesh: SwitchboardServer, channel: aio.Channel) -> None:
    c = await new_chat(mesh, channel)
    await append(c.stub, c.caller, c.conversation, "private matters")
    stranger = await new_caller(mesh)
    with pytest.raises(aio.AioRpcError) as error:
        await window(c.stub, stranger, c.conversation, 100)
    assert code_of(error) == grpc.StatusCode.NOT_FOUND
    with pytest.raises(aio.AioRpcError) as error:
        await prune(c.stub, stranger, c.conversation, keep_last_messages=1)
    assert code_of(error) == grpc.StatusCode.NOT_FOUND


async def test_viewers_read_windows_but_cannot_prune(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    c = await new_chat(mesh, channel)
    viewer = await new_caller(mesh)
    await add_member(c.stub, c.caller, c.workspace, viewer, pb.WORKSPACE_ROLE_VIEWER)
    owners = await remember(c.stub, c.caller, c.caller.name, "The owner likes tables.", pinned=True)
    viewers = await remember(c.stub, viewer, viewer.name, "The viewer likes lists.", pinned=True)
    for text in ("one", "two", "three"):
        await append(c.stub, c.caller, c.conversation, text)

    win = await window(c.stub, viewer, c.conversation, 1000)
    # The user scope in a window is the caller's own.
    assert names(win.included, PINNED) == [viewers.name]
    assert owners.name not in names(win.included) + names(win.excluded)
    assert len(included_messages(win)) == 3

    with pytest.raises(aio.AioRpcError) as error:
        await prune(c.stub, viewer, c.conversation, keep_last_messages=1)
    assert code_of(error) == grpc.StatusCode.PERMISSION_DENIED
    assert len(await all_messages(c.stub, c.caller, c.conversation)) == 3


async def test_an_archived_conversation_is_read_only_for_pruning(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    c = await new_chat(mesh, channel)
    for text in ("one", "two", "three"):
        await append(c.stub, c.caller, c.conversation, text)
    await c.stub.UpdateConversation(
        pb.UpdateConversationRequest(
            conversation=pb.Conversation(name=c.conversation, archived=True),
            update_mask=field_mask_pb2.FieldMask(paths=["archived"]),
        ),
        metadata=c.caller.md,
        timeout=CALL_DEADLINE_S,
    )
    before = await all_messages(c.stub, c.caller, c.conversation, show_archived=True)
    version = (await get_conversation(c.stub, c.caller, c.conversation)).version
    # Its window can still be read.
    assert len(included_messages(await window(c.stub, c.caller, c.conversation, 1000))) == 3
    # "Archived conversations are read-only": pruning would archive messages
    # and add a summary to it, so it is refused like an append.
    with pytest.raises(aio.AioRpcError) as error:
        await prune(c.stub, c.caller, c.conversation, keep_last_messages=1)
    assert code_of(error) == grpc.StatusCode.FAILED_PRECONDITION
    assert await all_messages(c.stub, c.caller, c.conversation, show_archived=True) == before
    assert (await get_conversation(c.stub, c.caller, c.conversation)).version == version


async def test_a_deleted_conversation_has_no_window_even_when_one_was_cached(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    c = await new_chat(mesh, channel)
    await append(c.stub, c.caller, c.conversation, "soon gone")
    win = await window(c.stub, c.caller, c.conversation, 1000)
    assert await window(c.stub, c.caller, c.conversation, 1000) == win
    await c.stub.DeleteConversation(
        pb.DeleteConversationRequest(name=c.conversation),
        metadata=c.caller.md,
        timeout=CALL_DEADLINE_S,
    )
    for call in (
        window(c.stub, c.caller, c.conversation, 1000),
        prune(c.stub, c.caller, c.conversation, keep_last_messages=1),
    ):
        with pytest.raises(aio.AioRpcError) as error:
            await call
        assert code_of(error) == grpc.StatusCode.NOT_FOUND
    await c.stub.UndeleteConversation(
        pb.UndeleteConversationRequest(name=c.conversation),
        metadata=c.caller.md,
        timeout=CALL_DEADLINE_S,
    )
    restored = await window(c.stub, c.caller, c.conversation, 1000)
    assert [m.name for m in included_messages(restored)] == [m.name for m in included_messages(win)]
    assert restored.conversation_version > win.conversation_version


async def test_a_removed_member_loses_the_window_even_when_one_was_cached(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    c = await new_chat(mesh, channel)
    member = await new_caller(mesh)
    await add_member(c.stub, c.caller, c.workspace, member, pb.WORKSPACE_ROLE_EDITOR)
    await append(c.stub, c.caller, c.conversation, "shared for now")
    win = await window(c.stub, member, c.conversation, 1000)
    assert await window(c.stub, member, c.conversation, 1000) == win
    await c.stub.RemoveWorkspaceMember(
        pb.RemoveWorkspaceMemberRequest(name=member_name(c.workspace, member)),
        metadata=c.caller.md,
        timeout=CALL_DEADLINE_S,
    )
    with pytest.raises(aio.AioRpcError) as error:
        await window(c.stub, member, c.conversation, 1000)
    assert code_of(error) == grpc.StatusCode.NOT_FOUND


async def test_prune_requires_a_limit(mesh: SwitchboardServer, channel: aio.Channel) -> None:
    c = await new_chat(mesh, channel)
    await append(c.stub, c.caller, c.conversation, "hello")
    for keep, tokens in ((0, 0), (-1, 0), (0, -5)):
        with pytest.raises(aio.AioRpcError) as error:
            await prune(
                c.stub, c.caller, c.conversation, keep_last_messages=keep, max_tokens=tokens
            )
        assert code_of(error) == grpc.StatusCode.INVALID_ARGUMENT


# -- properties -----------------------------------------------------------------------------

_WORDS = (
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "harbor",
    "lantern",
    "meadow",
    "orchard",
    "quartz",
    "river",
    "summit",
    "tundra",
    "violet",
    "willow",
    "zephyr",
    "extraordinarily",
    "x",
    "42",
    "ok",
    "?",
)


def _texts(max_words: int) -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(_WORDS), min_size=1, max_size=max_words).map(" ".join)


_MESSAGES = st.lists(
    st.tuples(st.sampled_from([USER, ASSISTANT]), _texts(40)), min_size=1, max_size=12
)
# (scope, content, pinned, expired)
_MEMORIES = st.lists(
    st.tuples(
        st.sampled_from(["conversation", "workspace", "user"]),
        _texts(10),
        st.booleans(),
        st.booleans(),
    ),
    max_size=4,
)
# (keep_last_messages, max_tokens): one or both set (0 means no limit).
_LIMITS = st.one_of(
    st.tuples(st.integers(1, 8), st.just(0)),
    st.tuples(st.just(0), st.integers(1, 250)),
    st.tuples(st.integers(1, 8), st.integers(1, 250)),
)


# pytest-asyncio runs every Hypothesis example of an async test as a coroutine on
# the test's event loop, so all examples share the test's own mesh (on the module's
# server they took half as long again, not looked into) (hence the suppressed
# health check; each example builds its own user,
# workspace and conversation, so they stay independent). Few examples: each
# costs a few dozen RPCs. database=None: nothing is written to .hypothesis/.
@hypothesis_settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    texts=_MESSAGES,
    memories=_MEMORIES,
    budget=st.one_of(st.integers(1, 40), st.integers(41, 500)),
    query=st.one_of(st.just(""), _texts(4)),
    first_limits=_LIMITS,
    second_limits=_LIMITS,
)
async def test_window_and_pruning_properties(
    own_mesh: tuple[SwitchboardServer, aio.Channel],
    texts: list[tuple[pb.MessageRole.ValueType, str]],
    memories: list[tuple[str, str, bool, bool]],
    budget: int,
    query: str,
    first_limits: tuple[int, int],
    second_limits: tuple[int, int],
) -> None:
    # Every example gets its own user, workspace and conversation: independent data.
    mesh, channel = own_mesh
    c = await new_chat(mesh, channel)
    appended = [
        await append(c.stub, c.caller, c.conversation, text, role=role) for role, text in texts
    ]
    parents = {"conversation": c.conversation, "workspace": c.workspace, "user": c.caller.name}
    pinned: list[pb.MemoryItem] = []
    expired_pinned: list[str] = []
    expired: list[str] = []
    for scope, content, is_pinned, is_expired in memories:
        item = await remember(
            c.stub,
            c.caller,
            parents[scope],
            content,
            pinned=is_pinned,
            expire_time=from_now(hours=1) if is_expired else None,
        )
        if is_expired:
            # Before the first window of this conversation (see expire_in_database).
            await expire_in_database(mesh, item.name)
            expired.append(item.name)
            if is_pinned:
                expired_pinned.append(item.name)
        elif is_pinned:
            pinned.append(item)
    pinned_names = [p.name for p in pinned]
    pinned_tokens = sum(p.token_count for p in pinned)

    async def check(live: list[pb.Message]) -> pb.ContextWindow | None:
        if pinned_tokens > budget:
            event("pinned over budget")
            with pytest.raises(aio.AioRpcError) as error:
                await window(c.stub, c.caller, c.conversation, budget, query)
            assert code_of(error) == grpc.StatusCode.FAILED_PRECONDITION
            return None
        win = await window(c.stub, c.caller, c.conversation, budget, query)
        event(f"window cut messages: {win.omitted_messages > 0 or len(win.excluded) > 0}")
        check_window(win, budget=budget, live=live, pinned=pinned_names, expired=expired_pinned)
        assert not set(expired) & set(names(win.included))
        assert (
            win.conversation_version
            == (await get_conversation(c.stub, c.caller, c.conversation)).version
        )
        # Served again (from the cache): the very same window.
        assert await window(c.stub, c.caller, c.conversation, budget, query) == win
        return win

    live = await all_messages(c.stub, c.caller, c.conversation)
    assert [m.name for m in live] == [m.name for m in appended]
    await check(live)

    # Two prunes with (possibly) different limits, then the second again.
    latest_summary: pb.MemoryItem | None = None
    for keep_last, max_tokens in (first_limits, second_limits):
        before = await all_messages(c.stub, c.caller, c.conversation)
        kept = expected_kept([m.token_count for m in before], keep_last, max_tokens)
        version = (await get_conversation(c.stub, c.caller, c.conversation)).version
        dry = await prune(
            c.stub,
            c.caller,
            c.conversation,
            keep_last_messages=keep_last,
            max_tokens=max_tokens,
            dry_run=True,
        )
        assert (dry.pruned_message_count, dry.kept_message_count) == (len(before) - kept, kept)
        assert not dry.HasField("summary")
        assert await all_messages(c.stub, c.caller, c.conversation) == before
        assert (await get_conversation(c.stub, c.caller, c.conversation)).version == version
        done = await prune(
            c.stub, c.caller, c.conversation, keep_last_messages=keep_last, max_tokens=max_tokens
        )
        assert (done.pruned_message_count, done.kept_message_count) == (
            len(before) - kept,
            kept,
        )
        assert done.HasField("summary") == (done.pruned_message_count > 0)
        event(f"pruned: {done.pruned_message_count > 0}")
        if done.pruned_message_count:
            latest_summary = done.summary
        assert [m.name for m in await all_messages(c.stub, c.caller, c.conversation)] == [
            m.name for m in before[len(before) - kept :]
        ]

    everything = await all_messages(c.stub, c.caller, c.conversation, show_archived=True)
    version = (await get_conversation(c.stub, c.caller, c.conversation)).version
    again = await prune(
        c.stub,
        c.caller,
        c.conversation,
        keep_last_messages=second_limits[0],
        max_tokens=second_limits[1],
    )
    assert again.pruned_message_count == 0
    assert not again.HasField("summary")
    assert await all_messages(c.stub, c.caller, c.conversation, show_archived=True) == everything
    assert (await get_conversation(c.stub, c.caller, c.conversation)).version == version

    # No message is lost: each is live, or archived under a summary covering it.
    everything = await check_nothing_lost(c, appended)
    live = [m for m in everything if not m.archived]
    assert (await get_conversation(c.stub, c.caller, c.conversation)).message_count == len(live)
    archived = [m for m in everything if m.archived]
    if latest_summary is None:
        assert archived == []
    else:
        # The newest summary covers everything archived so far.
        assert range_of(latest_summary) == (archived[0].sequence, archived[-1].sequence)
        assert archived[-1].summary == latest_summary.name

    win = await check(live)
    if win is None or latest_summary is None:
        return
    summaries = [
        i
        for i in (*win.included, *win.excluded)
        if i.HasField("memory_item") and i.memory_item.kind == pb.MEMORY_KIND_SUMMARY
    ]
    # Only the latest summary is ever considered, once; included exactly when it fits
    # after the pinned and relevant items.
    assert [item_name(i) for i in summaries] == [latest_summary.name]
    before_summary = sum(i.token_count for i in win.included if i.reason in (PINNED, RELEVANT))
    fits = before_summary + latest_summary.token_count <= budget
    assert summaries[0].reason == (SUMMARY if fits else OVER_BUDGET)
    event(f"summary {'included' if fits else 'over budget'}")


async def test_concurrent_appends_prunes_and_windows_keep_every_invariant(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    c = await new_chat(mesh, channel)
    pin = await remember(c.stub, c.caller, c.workspace, "Pinned during the storm.", pinned=True)
    first = [
        await append(c.stub, c.caller, c.conversation, f"warm up message {i}") for i in range(6)
    ]
    budget = 120

    async def a_window() -> pb.ContextWindow:
        return await window(c.stub, c.caller, c.conversation, budget)

    results = await asyncio.gather(
        *(append(c.stub, c.caller, c.conversation, f"concurrent message {i}") for i in range(12)),
        *(prune(c.stub, c.caller, c.conversation, keep_last_messages=k) for k in (4, 3, 5, 2)),
        *(a_window() for _ in range(6)),
    )
    appended = first + sorted(
        (r for r in results if isinstance(r, pb.Message)), key=lambda m: m.sequence
    )
    assert [m.sequence for m in appended] == list(range(1, 19))
    for win in (r for r in results if isinstance(r, pb.ContextWindow)):
        # Each window is consistent in itself: built from one snapshot.
        assert names(win.included, PINNED) == [pin.name]
        assert win.total_tokens == sum(i.token_count for i in win.included) <= budget
        shown = [m.sequence for m in included_messages(win)]
        # Live messages are a suffix of the conversation, so the newest of them
        # have consecutive sequence numbers.
        assert shown == list(range(shown[0], shown[0] + len(shown)))
    everything = await check_nothing_lost(c, appended)
    live = [m for m in everything if not m.archived]
    check_window(
        await window(c.stub, c.caller, c.conversation, budget),
        budget=budget,
        live=live,
        pinned=[pin.name],
    )
    summaries = {m.summary for m in everything if m.archived}
    for name in summaries:
        assert (await get_memory_item(c.stub, c.caller, name)).kind == pb.MEMORY_KIND_SUMMARY


async def test_long_conversations_are_windowed_across_pages(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    # More live messages than the store loads in one page (256).
    c = await new_chat(mesh, channel)
    sent: list[pb.Message] = []
    for batch in range(0, 300, 20):  # a few at a time: the server bounds concurrent streams
        sent += await asyncio.gather(
            *(
                append(c.stub, c.caller, c.conversation, f"note {i}")
                for i in range(batch, batch + 20)
            )
        )
    live = await all_messages(c.stub, c.caller, c.conversation)
    assert sorted(m.name for m in live) == sorted(m.name for m in sent)
    everything = sum(m.token_count for m in live)

    whole = await window(c.stub, c.caller, c.conversation, everything)
    assert len(included_messages(whole)) == 300
    check_window(whole, budget=everything, live=live, pinned=[])

    # Room for all but the oldest five: one is cut, four are omitted.
    budget = everything - sum(m.token_count for m in live[:5])
    cut = await window(c.stub, c.caller, c.conversation, budget)
    assert [m.name for m in included_messages(cut)] == [m.name for m in live[5:]]
    assert names(cut.excluded) == [live[4].name]
    assert cut.omitted_messages == 4
    check_window(cut, budget=budget, live=live, pinned=[])


# -- automatic pruning ------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [{"context_auto_prune_messages": 20}])
async def test_automatic_pruning_keeps_three_quarters_and_loses_nothing(
    own_mesh: tuple[SwitchboardServer, aio.Channel],
) -> None:
    mesh, channel = own_mesh
    c = await new_chat(mesh, channel)
    appended = [
        await append(c.stub, c.caller, c.conversation, f"message number {i}") for i in range(1, 21)
    ]
    # 20 live messages is the maximum, not over it: nothing is pruned.
    assert len(await all_messages(c.stub, c.caller, c.conversation)) == 20

    async with awaiting_event(mesh, summary_created(c.conversation)) as created:
        appended.append(await append(c.stub, c.caller, c.conversation, "message number 21"))
        event = await asyncio.wait_for(created, CALL_DEADLINE_S)
    first = event.memory_changed.memory_item
    # The service pruned on its own: the event does not name the user who appended.
    assert event.actor.name == "system"
    assert not event.actor.credential
    # The summary is published after the archive committed: pruning is done.
    live = await all_messages(c.stub, c.caller, c.conversation)
    assert len(live) == 15  # 75% of 20
    assert [m.name for m in live] == [m.name for m in appended[6:]]
    assert range_of(first) == (appended[0].sequence, appended[5].sequence)
    assert (await get_conversation(c.stub, c.caller, c.conversation)).message_count == 15
    await check_nothing_lost(c, appended)

    # Hysteresis: up to the maximum again without pruning, then over it once more.
    appended += [
        await append(c.stub, c.caller, c.conversation, f"message number {i}") for i in range(22, 27)
    ]
    assert len(await all_messages(c.stub, c.caller, c.conversation)) == 20
    async with awaiting_event(mesh, summary_created(c.conversation)) as created:
        appended.append(await append(c.stub, c.caller, c.conversation, "message number 27"))
        event = await asyncio.wait_for(created, CALL_DEADLINE_S)
    second = event.memory_changed.memory_item
    live = await all_messages(c.stub, c.caller, c.conversation)
    assert [m.name for m in live] == [m.name for m in appended[12:]]
    # The rolling summary covers everything archived, the first batch included.
    assert range_of(second) == (appended[0].sequence, appended[11].sequence)
    everything = await check_nothing_lost(c, appended)
    assert {m.summary for m in everything[:6]} == {first.name}
    assert {m.summary for m in everything[6:12]} == {second.name}
    win = await window(c.stub, c.caller, c.conversation, 10_000)
    assert names(win.included, SUMMARY) == [second.name]
    assert first.name not in names(win.included) + names(win.excluded)
    check_window(win, budget=10_000, live=live, pinned=[])


# -- the embedded window cache ------------------------------------------------------------------


async def cached(mesh: SwitchboardServer, c: Chat, budget: int) -> pb.ContextWindow:
    """The window, read twice: the second read is served from the cache."""
    win = await window(c.stub, c.caller, c.conversation, budget)
    hits = int(built(mesh, ContextDomain).windows.cache.hits)
    assert await window(c.stub, c.caller, c.conversation, budget) == win
    assert int(built(mesh, ContextDomain).windows.cache.hits) == hits + 1
    return win


async def test_a_write_is_always_seen_by_the_next_window(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    c = await new_chat(mesh, channel)
    budget = 5000
    first = await append(c.stub, c.caller, c.conversation, "Where are the harbor lanterns?")
    old = await cached(mesh, c, budget)

    # A message.
    second = await append(
        c.stub, c.caller, c.conversation, "They hang along the river.", role=ASSISTANT
    )
    win = await cached(mesh, c, budget)
    assert [m.name for m in included_messages(win)] == [first.name, second.name]
    assert win.conversation_version > old.conversation_version

    # Memory in each scope a window reads: conversation, workspace, the caller's.
    added: list[pb.MemoryItem] = []
    for parent in (c.conversation, c.workspace, c.caller.name):
        before = await cached(mesh, c, budget)
        item = await remember(c.stub, c.caller, parent, f"Pinned fact for {parent}.", pinned=True)
        added.append(item)
        win = await cached(mesh, c, budget)
        assert item.name in names(win.included, PINNED), parent
        assert win != before

    # Updating and unpinning memory.
    for item in added:
        await cached(mesh, c, budget)
        updated = (
            await c.stub.UpdateMemoryItem(
                pb.UpdateMemoryItemRequest(
                    memory_item=pb.MemoryItem(name=item.name, content="Harbor lanterns are red."),
                    update_mask=field_mask_pb2.FieldMask(paths=["content"]),
                ),
                metadata=c.caller.md,
                timeout=CALL_DEADLINE_S,
            )
        ).memory_item
        win = await cached(mesh, c, budget)
        shown = {item_name(i): i for i in win.included}
        assert shown[item.name].memory_item.content == "Harbor lanterns are red."
        assert shown[item.name].token_count == updated.token_count

        await c.stub.UpdateMemoryItem(
            pb.UpdateMemoryItemRequest(
                memory_item=pb.MemoryItem(name=item.name, pinned=False),
                update_mask=field_mask_pb2.FieldMask(paths=["pinned"]),
            ),
            metadata=c.caller.md,
            timeout=CALL_DEADLINE_S,
        )
        win = await cached(mesh, c, budget)
        assert item.name not in names(win.included, PINNED)

    # Deleting memory.
    for item in added:
        await cached(mesh, c, budget)
        await c.stub.DeleteMemoryItem(
            pb.DeleteMemoryItemRequest(name=item.name),
            metadata=c.caller.md,
            timeout=CALL_DEADLINE_S,
        )
        win = await cached(mesh, c, budget)
        assert item.name not in names(win.included) + names(win.excluded)

    # Pruning.
    await cached(mesh, c, budget)
    done = await prune(c.stub, c.caller, c.conversation, keep_last_messages=1)
    win = await cached(mesh, c, budget)
    assert names(win.included, SUMMARY) == [done.summary.name]
    assert [m.name for m in included_messages(win)] == [second.name]


async def test_windows_of_other_conversations_and_callers_are_never_mixed_up(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    c = await new_chat(mesh, channel)
    await append(c.stub, c.caller, c.conversation, "first conversation")
    other = await create_conversation(c.stub, c.caller, c.workspace, "t")
    await append(c.stub, c.caller, other.name, "second conversation")
    editor = await new_caller(mesh)
    await add_member(c.stub, c.caller, c.workspace, editor, pb.WORKSPACE_ROLE_EDITOR)
    mine = await remember(c.stub, c.caller, c.caller.name, "Only mine.", pinned=True)
    await remember(
        c.stub, c.caller, other.name, "Pinned in the second conversation only.", pinned=True
    )

    own = await window(c.stub, c.caller, c.conversation, 500)
    theirs = await window(c.stub, editor, c.conversation, 500)
    elsewhere = await window(c.stub, c.caller, other.name, 500)
    assert names(own.included, PINNED) == [mine.name]
    assert names(theirs.included, PINNED) == []
    assert [m.parts[0].text for m in included_messages(elsewhere)] == ["second conversation"]
    assert [m.parts[0].text for m in included_messages(own)] == ["first conversation"]
    # And each again, now from the cache.
    assert await window(c.stub, editor, c.conversation, 500) == theirs
    assert await window(c.stub, c.caller, other.name, 500) == elsewhere
    # A memory of the editor's own changes only the editor's window.
    theirs_item = await remember(c.stub, editor, editor.name, "Only theirs.", pinned=True)
    assert names((await window(c.stub, editor, c.conversation, 500)).included, PINNED) == [
        theirs_item.name
    ]
    assert await window(c.stub, c.caller, c.conversation, 500) == own


async def test_a_window_ages_when_a_memory_item_in_it_expires(
    mesh: SwitchboardServer, channel: aio.Channel, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = await new_chat(mesh, channel)
    soon = from_now(minutes=30)
    pin = await remember(
        c.stub, c.caller, c.conversation, "Temporary door code 1234.", pinned=True, expire_time=soon
    )
    note = await remember(
        c.stub, c.caller, c.workspace, "Giraffe feeding at noon.", expire_time=soon
    )
    await append(c.stub, c.caller, c.conversation, "When is giraffe feeding?")
    before = await window(c.stub, c.caller, c.conversation, 1000)
    assert await window(c.stub, c.caller, c.conversation, 1000) == before  # cached
    assert names(before.included, PINNED) == [pin.name]
    assert names(before.included, RELEVANT) == [note.name]

    # An hour passes without any write (the clocks the service reads move on;
    # no sleeping): the cached window must not outlive the items in it.
    later = dt.timedelta(hours=1)
    monkeypatch.setattr(store_module, "now", lambda: dt.datetime.now(dt.UTC) + later)
    monkeypatch.setattr(windows_module, "now", lambda: dt.datetime.now(dt.UTC) + later)
    monkeypatch.setattr(
        windowcache_module,
        "time",
        SimpleNamespace(time=lambda: time.time() + later.total_seconds(), monotonic=time.monotonic),
    )
    after = await window(c.stub, c.caller, c.conversation, 1000)
    assert after.conversation_version == before.conversation_version
    assert names(after.excluded, EXPIRED) == [pin.name]
    assert names(after.included, PINNED) == []
    assert note.name not in names(after.included)
