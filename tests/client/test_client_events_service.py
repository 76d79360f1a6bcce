"""switchboard.client against a real in-process server: following events from a cursor."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator

import pytest

from switchboard.api.events.v1 import events_pb2
from switchboard.client import Client, CursorAhead, NotFound
from switchboard.platform.rpc.server import SwitchboardServer
from tests.client.test_clientkit import (
    PASSWORD,
    append,
    new_conversation,
    new_workspace,
    text_of,
    unique_email,
)

pytestmark = pytest.mark.service

DEADLINE_S = 30.0


@pytest.fixture
async def client(mesh: SwitchboardServer) -> AsyncIterator[Client]:
    async with Client(mesh.address) as signed_in:
        await signed_in.register(unique_email("events"), PASSWORD)
        yield signed_in


async def _take(follower: AsyncIterator[events_pb2.Event], n: int) -> list[events_pb2.Event]:
    return [await asyncio.wait_for(anext(follower), DEADLINE_S) for _ in range(n)]


async def test_a_follower_replays_from_its_cursor_then_goes_on_live(client: Client) -> None:
    workspace = await new_workspace(client)
    conversation = await new_conversation(client, workspace)
    async with client.follow([workspace], types=["MESSAGE_CREATED"]) as first:
        start = await asyncio.wait_for(first.ready(), DEADLINE_S)
        assert start  # the subscription's first heartbeat names where it stands
        early = [await append(client, conversation, f"early {i}") for i in range(5)]
        got = await _take(first, 3)
        assert [e.message_created.message.name for e in got] == [m.name for m in early[:3]]
        # Stop after three; another follower continues exactly there.
        kept = first.cursor

    async with client.follow(
        [workspace], after_cursor=kept, types=[events_pb2.EVENT_TYPE_MESSAGE_CREATED]
    ) as second:
        replayed = await _take(second, 2)
        live_messages = [await append(client, conversation, f"live {i}") for i in range(3)]
        live = await _take(second, 3)
    names = [e.message_created.message.name for e in replayed + live]
    assert names == [m.name for m in early[3:] + live_messages]
    assert [text_of(e.message_created.message) for e in live] == ["live 0", "live 1", "live 2"]
    assert all(e.type == events_pb2.EVENT_TYPE_MESSAGE_CREATED for e in replayed + live)
    assert second.resumes == 0
    assert second.duplicates == 0


async def test_types_and_scopes_filter_what_is_followed(client: Client) -> None:
    workspace = await new_workspace(client)
    watched = await new_conversation(client, workspace, "watched")
    async with client.follow([watched]) as follower:
        await asyncio.wait_for(follower.ready(), DEADLINE_S)
        other = await new_conversation(client, workspace, "not watched")
        await append(client, other, "elsewhere")
        mine = await append(client, watched, "here")
        event = await asyncio.wait_for(anext(follower), DEADLINE_S)
    assert event.type == events_pb2.EVENT_TYPE_MESSAGE_CREATED
    assert event.message_created.message.name == mine.name
    assert event.conversation == watched


async def test_a_cursor_from_another_log_is_never_papered_over(client: Client) -> None:
    workspace = await new_workspace(client)
    follower = client.follow([workspace], after_cursor="999999999-0")
    with pytest.raises(CursorAhead) as ahead:
        await asyncio.wait_for(anext(follower), DEADLINE_S)
    assert ahead.value.oldest_cursor
    assert ahead.value.head_cursor
    assert follower.resumes == 0


async def test_a_scope_the_caller_cannot_read_ends_the_follower(
    client: Client, mesh: SwitchboardServer
) -> None:
    async with Client(mesh.address) as stranger:
        await stranger.register(unique_email("stranger"), PASSWORD)
        theirs = await new_workspace(stranger)
    follower = client.follow([theirs])
    with pytest.raises(NotFound):
        await asyncio.wait_for(anext(follower), DEADLINE_S)
    assert [e async for e in follower] == []


class _Finished(logging.Handler):
    """The server's access lines ("rpc finished") of one method, as they are logged."""

    def __init__(self, method: str) -> None:
        super().__init__(logging.INFO)
        self.method = method
        self.codes: list[str] = []
        self.logged = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "rpc finished" and getattr(record, "method", "") == self.method:
            self.codes.append(str(getattr(record, "code", "")))
            self.logged.set()


@pytest.fixture
def subscribe_log() -> Iterator[_Finished]:
    handler = _Finished("/switchboard.api.events.v1.EventService/Subscribe")
    access = logging.getLogger("switchboard.access")
    level = access.level
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        access.removeHandler(handler)
        access.setLevel(level)


async def test_cancelling_the_reader_ends_the_subscription_and_it_can_go_on(
    client: Client, subscribe_log: _Finished
) -> None:
    conversation = await new_conversation(client, await new_workspace(client))
    follower = client.follow([conversation], types=["MESSAGE_CREATED"])
    await asyncio.wait_for(follower.ready(), DEADLINE_S)
    first = await append(client, conversation, "first")
    assert (await _take(follower, 1))[0].message_created.message.name == first.name

    waiting = asyncio.ensure_future(anext(follower))
    await asyncio.sleep(0)  # one loop step: the task runs up to its read (FIFO)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    # The server saw its Subscribe end: the call did not outlive the task.
    await asyncio.wait_for(subscribe_log.logged.wait(), DEADLINE_S)
    assert subscribe_log.codes == ["CANCELLED"]

    # Published while nobody read: delivered when reading resumes, from the cursor.
    missed = await append(client, conversation, "while away")
    later = await _take(follower, 1)
    assert [e.message_created.message.name for e in later] == [missed.name]
    assert follower.resumes == 1
    await follower.aclose()
