"""Context windows and pruning in the domain, without gRPC: what fits, is cached, is folded."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator

import pytest

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.context.common import Limits
from switchboard.platform.errors import FailedPrecondition, FieldViolation, InvalidArgument
from switchboard.platform.security.policy import Principal
from tests.kits.contextdomainkit import Kit, open_domain

pytestmark = pytest.mark.unit

# No automatic pruning unless a test asks for it.
LIMITS = Limits(auto_prune_messages=0)


@pytest.fixture
async def kit(tmp_path: pathlib.Path) -> AsyncIterator[Kit]:
    async with open_domain(tmp_path, LIMITS) as opened:
        yield opened


async def window(kit: Kit, caller: Principal, conversation: str, budget: int) -> pb.ContextWindow:
    request = pb.GetContextWindowRequest(conversation=conversation, token_budget=budget)
    served = await kit.domain.windows.window(caller, request)
    return pb.GetContextWindowResponse.FromString(served).window


async def conversation_of(kit: Kit, count: int) -> tuple[Principal, str, list[pb.Message]]:
    caller = await kit.user()
    conversation = (await kit.conversation(caller)).name
    said = [await kit.say(caller, conversation, f"Message number {i}.") for i in range(count)]
    return caller, conversation, said


async def test_a_window_holds_the_newest_messages_that_fit_its_budget(kit: Kit) -> None:
    caller, conversation, said = await conversation_of(kit, 4)
    budget = said[-1].token_count + said[-2].token_count
    built = await window(kit, caller, conversation, budget)
    assert [item.message.name for item in built.included] == [m.name for m in said[-2:]]
    assert built.total_tokens == budget
    assert [(i.message.name, i.reason) for i in built.excluded] == [
        (said[1].name, pb.CONTEXT_ITEM_REASON_OVER_BUDGET)
    ]
    assert built.omitted_messages == 1


async def test_pinned_memory_over_the_budget_fails_naming_what_it_needs(kit: Kit) -> None:
    caller, conversation, _ = await conversation_of(kit, 1)
    pin = await kit.domain.memory.create(
        caller,
        pb.CreateMemoryItemRequest(
            parent=conversation,
            memory_item=pb.MemoryItem(
                kind=pb.MEMORY_KIND_FACT, content="The door code is 1234 " * 5, pinned=True
            ),
        ),
    )
    with pytest.raises(FailedPrecondition) as raised:
        await window(kit, caller, conversation, pin.token_count - 1)
    assert raised.value.metadata == {"pinned_tokens": str(pin.token_count)}
    built = await window(kit, caller, conversation, pin.token_count)
    assert [item.memory_item.name for item in built.included] == [pin.name]


async def test_a_window_is_served_from_the_cache_until_the_conversation_changes(kit: Kit) -> None:
    caller, conversation, _ = await conversation_of(kit, 2)
    cache = kit.domain.windows.cache
    first = await window(kit, caller, conversation, 500)
    hits = cache.hits
    assert await window(kit, caller, conversation, 500) == first
    assert cache.hits == hits + 1
    newest = await kit.say(caller, conversation, "One more.")
    after = await window(kit, caller, conversation, 500)
    assert after.conversation_version > first.conversation_version
    assert after.included[-1].message.name == newest.name


async def test_a_window_read_again_and_again_follows_every_write(kit: Kit) -> None:
    # A miss reads the versions with the rows; a window served from the cache is
    # then asked for by its versions first: both must see each write at once.
    caller, conversation, _ = await conversation_of(kit, 1)
    cache = kit.domain.windows.cache
    for turn in range(3):
        newest = await kit.say(caller, conversation, f"Turn {turn}.")
        built = await window(kit, caller, conversation, 500)
        assert built.included[-1].message.name == newest.name
        hits = cache.hits
        assert await window(kit, caller, conversation, 500) == built
        assert await window(kit, caller, conversation, 500) == built
        assert cache.hits == hits + 2


async def test_a_window_budget_must_be_positive_and_bounded(kit: Kit) -> None:
    caller, conversation, _ = await conversation_of(kit, 1)
    for budget, description in ((0, "must be positive"), (2_000_000, "must be at most 1000000")):
        with pytest.raises(InvalidArgument) as raised:
            await window(kit, caller, conversation, budget)
        assert raised.value.violations == (FieldViolation("token_budget", description),)


async def test_pruning_folds_the_oldest_messages_into_a_summary(kit: Kit) -> None:
    caller, conversation, _ = await conversation_of(kit, 5)
    request = pb.PruneConversationRequest(conversation=conversation, keep_last_messages=2)
    planned = await kit.domain.pruning.prune(
        caller,
        pb.PruneConversationRequest(
            conversation=conversation, keep_last_messages=2, validate_only=True
        ),
    )
    assert (planned.pruned_message_count, planned.kept_message_count) == (3, 2)
    assert not planned.HasField("summary")

    pruned = await kit.domain.pruning.prune(caller, request)
    assert (pruned.pruned_message_count, pruned.kept_message_count) == (3, 2)
    assert pruned.summary.kind == pb.MEMORY_KIND_SUMMARY
    assert pruned.summary.name.startswith(f"{conversation}/memories/")
    history = await kit.domain.messages.list(
        pb.ListMessagesRequest(parent=conversation, show_archived=True)
    )
    assert [(m.archived, m.summary) for m in history.messages] == [
        (True, pruned.summary.name)
    ] * 3 + [(False, "")] * 2
    # What is kept is within the limits: pruning again folds nothing.
    again = await kit.domain.pruning.prune(caller, request)
    assert (again.pruned_message_count, again.kept_message_count) == (0, 2)


async def test_a_prune_needs_a_limit(kit: Kit) -> None:
    caller, conversation, _ = await conversation_of(kit, 1)
    with pytest.raises(InvalidArgument) as raised:
        await kit.domain.pruning.prune(
            caller, pb.PruneConversationRequest(conversation=conversation)
        )
    assert raised.value.violations == (
        FieldViolation("keep_last_messages", "or max_tokens is required"),
    )


async def test_a_conversation_over_its_limit_is_pruned_by_the_system(
    tmp_path: pathlib.Path,
) -> None:
    async with open_domain(tmp_path, Limits(auto_prune_messages=4)) as kit:
        _, conversation, said = await conversation_of(kit, 5)
        summarized = await kit.event_where(
            lambda e: (
                e.type == events_pb2.EVENT_TYPE_MEMORY_CHANGED
                and e.memory_changed.memory_item.kind == pb.MEMORY_KIND_SUMMARY
            )
        )
        assert summarized.actor.name == "system"
        live = await kit.domain.messages.list(pb.ListMessagesRequest(parent=conversation))
        # Down to 75% of the maximum (hysteresis), the newest kept.
        assert [m.name for m in live.messages] == [m.name for m in said[-3:]]
