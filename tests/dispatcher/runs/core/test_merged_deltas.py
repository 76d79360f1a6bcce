"""Merged deltas (docs/dispatcher.md, "WatchRun"; docs/events.md, "Merged deltas"): a
watcher or subscriber that asked for them gets the text deltas that are ready for it
together as one update naming the range it covers (``first_sequence`` .. ``sequence``),
so one that is behind takes fewer frames; the text, the order and exact resume are
those of the deltas one by one, and without the flag nothing changes.

A run that finished before the watch begins is the watcher that is behind: its
updates are all ready at once. The echo handler's ``delay_ms`` makes each word its
own delta, as a paced model does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest
from grpc import aio

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2, events_pb2_grpc
from switchboard.dispatcher.runs.core.store import TERMINAL
from switchboard.platform.events.deltas import MAX_MERGED_CHARS
from switchboard.settings import Settings
from tests.conftest import CALL_DEADLINE_S, make_settings
from tests.kits.authkit import bearer
from tests.kits.contextkit import Caller, World, create_conversation, stub_fixture, world_fixture
from tests.kits.contextkit import Stub as CStub
from tests.kits.dispatchkit import Stub as DStub
from tests.kits.dispatchkit import Watched, dispatcher_stub, request, send, watch_all
from tests.kits.eventkit import Commands, Subscriber, run_updates

pytestmark = pytest.mark.service

WORDS = " ".join(f"w{i}" for i in range(12))


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url=database_url, instance_id="test-merged-deltas")


stub, world = stub_fixture, world_fixture


@pytest.fixture
def dstub(channel: aio.Channel) -> DStub:
    return dispatcher_stub(channel)


@pytest.fixture
async def conversation(stub: CStub, world: World) -> str:
    return (await create_conversation(stub, world.editor, world.name)).name


async def _watch(
    dstub: DStub, caller: Caller, run: str, after: int = 0, *, merge: bool = True
) -> list[pb.RunUpdate]:
    call = dstub.WatchRun(
        pb.WatchRunRequest(name=run, after_sequence=after, merge_deltas=merge),
        metadata=caller.md,
        timeout=CALL_DEADLINE_S,
    )
    return [frame.update async for frame in call if frame.WhichOneof("frame") == "update"]


def _first(update: pb.RunUpdate) -> int:
    return update.first_sequence or update.sequence


def _gapless(updates: Sequence[pb.RunUpdate], after: int) -> None:
    """Each update covers the sequences right after the one before it."""
    position = after
    for update in updates:
        assert _first(update) == position + 1, (position, update)
        assert update.sequence >= _first(update)
        position = update.sequence


def _deltas(updates: Sequence[pb.RunUpdate]) -> list[pb.RunUpdate]:
    return [u for u in updates if u.WhichOneof("update") == "delta"]


def _text(updates: Sequence[pb.RunUpdate]) -> str:
    return "".join(u.delta.text for u in _deltas(updates))


async def _paced_run(dstub: DStub, world: World, conversation: str, text: str = WORDS) -> Watched:
    """A finished run whose words were each their own delta (watched one by one)."""
    sent = await send(dstub, world.editor, request(conversation, text, delay_ms=1))
    whole = await watch_all(dstub, world.editor, sent.run.name)
    assert whole.final.state == pb.RUN_STATE_SUCCEEDED
    assert len(_deltas(whole.updates)) >= len(text.split())
    return whole


async def test_a_watcher_behind_gets_the_ready_deltas_as_one_update(
    dstub: DStub, world: World, conversation: str
) -> None:
    whole = await _paced_run(dstub, world, conversation)
    run = whole.final.name

    merged = await _watch(dstub, world.viewer, run)

    assert len(merged) < len(whole.updates)
    assert _text(merged) == whole.text
    _gapless(merged, 0)
    assert merged[-1].sequence == whole.updates[-1].sequence
    # Every non-delta update is the one the watcher would get one by one, unchanged.
    assert [u for u in merged if not u.HasField("delta")] == [
        u for u in whole.updates if not u.HasField("delta")
    ]
    (joined,) = [u for u in merged if u.first_sequence]
    covered = [u for u in whole.updates if joined.first_sequence <= u.sequence <= joined.sequence]
    assert all(u.HasField("delta") for u in covered)
    assert joined.delta.text == "".join(u.delta.text for u in covered)
    assert joined.time == covered[-1].time
    assert joined.run == run


async def test_without_the_flag_every_delta_is_its_own_update_as_before(
    dstub: DStub, world: World, conversation: str
) -> None:
    whole = await _paced_run(dstub, world, conversation)

    again = await _watch(dstub, world.viewer, whole.final.name, merge=False)

    assert [u.SerializeToString() for u in again] == [u.SerializeToString() for u in whole.updates]
    assert not any(u.first_sequence for u in again)
    assert [u.sequence for u in again] == list(range(1, len(again) + 1))


async def test_a_resume_after_any_sequence_continues_exactly(
    dstub: DStub, world: World, conversation: str
) -> None:
    whole = await _paced_run(dstub, world, conversation)
    run = whole.final.name
    merged = await _watch(dstub, world.editor, run)

    # After the last sequence of each merged frame (all a client knows), and after
    # any sequence at all (one seen one by one before): the rest, without a gap.
    for after in range(whole.updates[-1].sequence + 1):
        rest = await _watch(dstub, world.editor, run, after)
        _gapless(rest, after)
        seen_before = whole.updates[:after]
        assert _text([*seen_before, *rest]) == whole.text
    for frame in merged:
        rest = await _watch(dstub, world.editor, run, frame.sequence)
        assert rest == merged[merged.index(frame) + 1 :]


async def test_a_merged_delta_stops_growing_at_its_bound(
    dstub: DStub, world: World, conversation: str
) -> None:
    word = "x" * 3000
    whole = await _paced_run(dstub, world, conversation, " ".join([word] * 8))

    merged = await _watch(dstub, world.editor, whole.final.name)

    assert _text(merged) == whole.text
    _gapless(merged, 0)
    assert all(len(u.delta.text) <= MAX_MERGED_CHARS for u in _deltas(merged))
    assert 1 < len(_deltas(merged)) < len(_deltas(whole.updates))


async def test_converse_watch_run_merges_when_asked(
    dstub: DStub, world: World, conversation: str
) -> None:
    whole = await _paced_run(dstub, world, conversation)
    run = whole.final.name
    outgoing: asyncio.Queue[pb.ConverseRequest | None] = asyncio.Queue()

    async def requests() -> AsyncIterator[pb.ConverseRequest]:
        while (item := await outgoing.get()) is not None:
            yield item

    call = dstub.Converse(requests(), metadata=world.editor.md, timeout=CALL_DEADLINE_S)
    await outgoing.put(
        pb.ConverseRequest(watch_run=pb.WatchRunRequest(name=run, merge_deltas=True))
    )
    relayed: list[pb.RunUpdate] = []
    async for frame in call:
        if frame.WhichOneof("frame") == "update":
            relayed.append(frame.update)
            if frame.update.state_change.run.state in TERMINAL:
                break
    await outgoing.put(None)

    assert relayed == await _watch(dstub, world.editor, run)
    assert len(relayed) < len(whole.updates)


# -- Subscribe ------------------------------------------------------------------------


async def _subscribed(
    channel: aio.Channel, caller: Caller, conversation: str, after: str, *, merge: bool
) -> Subscriber:
    return Subscriber(
        channel,
        caller.token,
        scopes=[events_pb2.Scope(conversation=conversation)],
        types=[events_pb2.EVENT_TYPE_RUN_UPDATED],
        after_cursor=after,
        merge_deltas=merge,
    )


async def _to_the_end(sub: Subscriber, run: str) -> list[pb.RunUpdate]:
    while not any(u.state_change.run.state in TERMINAL for u in run_updates(sub.events, run)):
        await sub.frame()
    sub.cancel()
    return run_updates(sub.events, run)


async def _paced_run_after_a_cursor(
    channel: aio.Channel, dstub: DStub, world: World, conversation: str
) -> tuple[str, Watched]:
    """The conversation's live cursor, then a paced run made after it (watched whole)."""
    before = await _subscribed(channel, world.editor, conversation, "", merge=False)
    start = await before.live()
    before.cancel()
    return start, await _paced_run(dstub, world, conversation)


async def test_subscribe_merges_a_runs_deltas_and_resumes_exactly_by_cursor(
    channel: aio.Channel, dstub: DStub, world: World, conversation: str
) -> None:
    start, whole = await _paced_run_after_a_cursor(channel, dstub, world, conversation)
    run = whole.final.name

    plain_sub = await _subscribed(channel, world.editor, conversation, start, merge=False)
    plain = await _to_the_end(plain_sub, run)
    merged_sub = await _subscribed(channel, world.editor, conversation, start, merge=True)
    merged = await _to_the_end(merged_sub, run)

    # One by one without the flag, exactly as WatchRun has them.
    assert plain == whole.updates
    assert len(merged) < len(plain)
    assert _text(merged) == whole.text
    _gapless(merged, 0)
    # A merged event is its last delta's: that one's id and cursor.
    by_sequence = {e.run_updated.update.sequence: e for e in plain_sub.events}
    for event in merged_sub.events:
        one = by_sequence[event.run_updated.update.sequence]
        assert (event.id, event.cursor) == (one.id, one.cursor)
    # Resumed from any event's cursor (a batch's is its last one's): the rest, exactly.
    for index, event in enumerate(merged_sub.events[:-1]):
        resumed = await _subscribed(channel, world.editor, conversation, event.cursor, merge=True)
        rest = await _to_the_end(resumed, run)
        assert rest == merged[index + 1 :]


async def test_a_stream_subscription_merges_when_added_with_the_flag(
    channel: aio.Channel, dstub: DStub, world: World, conversation: str
) -> None:
    start, whole = await _paced_run_after_a_cursor(channel, dstub, world, conversation)
    run = whole.final.name
    subscribed = await _subscribed(channel, world.editor, conversation, start, merge=True)
    expected = await _to_the_end(subscribed, run)

    commands = Commands()
    call = events_pb2_grpc.EventServiceStub(channel).Stream(
        commands.__aiter__(), metadata=bearer(world.editor.token)
    )
    for sid, merge in (("merged", True), ("plain", False)):
        commands.send(
            add=events_pb2.AddSubscription(
                subscription_id=sid,
                scopes=[events_pb2.Scope(conversation=conversation)],
                types=[events_pb2.EVENT_TYPE_RUN_UPDATED],
                after_cursor=start,
                merge_deltas=merge,
            )
        )
    got: dict[str, list[events_pb2.Event]] = {"merged": [], "plain": []}

    def ended(sid: str) -> bool:
        return any(u.state_change.run.state in TERMINAL for u in run_updates(got[sid], run))

    async with asyncio.timeout(CALL_DEADLINE_S):
        async for frame in call:
            if frame.WhichOneof("frame") == "events":
                got[frame.events.subscription_id].extend(frame.events.batch.events)
            if ended("merged") and ended("plain"):
                break
    commands.close()
    call.cancel()

    assert run_updates(got["merged"], run) == expected
    assert run_updates(got["plain"], run) == whole.updates
