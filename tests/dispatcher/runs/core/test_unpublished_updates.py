"""A run's updates that the event log could not take are retried, never dropped.

Another process holds the SQLite file's write lock (a real outage of the embedded
store, past its busy timeout) while an echo run streams progress. Its progress updates
are shown at once (WatchRun's feed) but cannot be logged; the run's publisher retries
them in place until the lock is gone, and the log then has every one of them, once
and in order, with the run's end after them. Before, each batch that failed was
dropped with "run updates not published": ListEvents, a late Subscribe and webhooks
never saw those updates.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from grpc import aio

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2, events_pb2_grpc
from switchboard.mesh import create_server
from switchboard.platform.rpc.server import SwitchboardServer
from tests.conftest import CALL_DEADLINE_S, make_settings
from tests.kits.contextkit import context_stub, create_conversation, ctx_world
from tests.kits.dispatchkit import dispatcher_stub, request, send
from tests.kits.eventkit import run_updates
from tests.kits.tracekit import watching

pytestmark = pytest.mark.service

#: The store's timeout (and SQLite's busy timeout): short, so the lock is an outage soon.
DB_TIMEOUT_S = 0.3


class Said(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        self.changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self.changed.set()

    async def until(self, text: str) -> None:
        async with asyncio.timeout(CALL_DEADLINE_S):
            while not any(text in message for message in self.messages):
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[SwitchboardServer, Path]]:
    database = tmp_path / "switchboard.db"
    settings = make_settings(
        database_url=f"sqlite+aiosqlite:///{database}", database_timeout_s=DB_TIMEOUT_S
    )
    server, _ = await create_server(settings)
    await server.start()
    try:
        yield server, database
    finally:
        await server.shutdown(grace=0)


async def _listed(channel: aio.Channel, md: Any, conversation: str) -> list[events_pb2.Event]:
    listed: list[events_pb2.Event] = []
    token = ""
    while True:
        page = await events_pb2_grpc.EventServiceStub(channel).ListEvents(
            events_pb2.ListEventsRequest(
                scopes=[events_pb2.Scope(conversation=conversation)],
                page_size=500,
                page_token=token,
            ),
            metadata=md,
            timeout=CALL_DEADLINE_S,
        )
        listed += page.events
        token = page.next_page_token
        if not token:
            return listed


@pytest.fixture
def dispatcher_at_info() -> Iterator[None]:
    """The publisher says at INFO when it caught up."""
    logger = logging.getLogger("switchboard.dispatcher")
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.setLevel(level)


@pytest.mark.usefixtures("dispatcher_at_info")
async def test_progress_that_the_log_could_not_take_lands_later_once_and_in_order(
    served: tuple[SwitchboardServer, Path],
) -> None:
    server, database = served
    async with aio.insecure_channel(server.address) as channel, watching(Said()) as (said, _):
        world = await ctx_world(server, context_stub(channel))
        conversation = await create_conversation(context_stub(channel), world.editor, world.name)
        dstub = dispatcher_stub(channel)
        words = " ".join(f"w{i}" for i in range(320))  # progress every 16 words: 20 of them
        sent = await send(dstub, world.editor, request(conversation.name, words, delay_ms=15))
        watch = dstub.WatchRun(
            pb.WatchRunRequest(name=sent.run.name), metadata=world.editor.md, timeout=60
        )
        watched: list[pb.RunUpdate] = []
        holder: sqlite3.Connection | None = None

        async def next_progress() -> None:
            while True:
                frame: Any = await watch.read()
                if frame.WhichOneof("frame") != "update":
                    continue
                watched.append(frame.update)
                if frame.update.WhichOneof("update") == "progress":
                    return

        try:
            await next_progress()
            # Another process takes the write lock and keeps it past the busy timeout.
            holder = sqlite3.connect(database, isolation_level=None)
            holder.execute("BEGIN IMMEDIATE")
            await said.until("event log write failed")
            for _ in range(2):
                await next_progress()  # shown to the watcher, not yet in the log
        finally:
            if holder is not None:
                holder.execute("ROLLBACK")
                holder.close()
        while watched[-1].state_change.run.state != pb.RUN_STATE_SUCCEEDED:
            frame: Any = await watch.read()
            if frame.WhichOneof("frame") == "update":
                watched.append(frame.update)
        async with asyncio.timeout(CALL_DEADLINE_S):
            while True:  # until the run's end is in the log (it is stored after the retries)
                listed = await _listed(channel, world.editor.md, conversation.name)
                ended = run_updates(listed, sent.run.name)
                if ended and ended[-1].state_change.run.state == pb.RUN_STATE_SUCCEEDED:
                    break
                await asyncio.sleep(0.05)  # polling the log for a condition, with a deadline
    logged = run_updates(listed, sent.run.name)
    progress = [u.sequence for u in watched if u.WhichOneof("update") == "progress"]
    assert len(progress) == 20
    assert [u.sequence for u in logged if u.WhichOneof("update") == "progress"] == progress
    sequences = [u.sequence for u in logged]
    assert sequences == sorted(set(sequences))
    assert logged[-1].state_change.run.state == pb.RUN_STATE_SUCCEEDED
    assert "run updates not published" not in said.messages
    assert "the run's updates were logged after all" in said.messages
