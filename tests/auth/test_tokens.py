"""A token is not an event (docs/events.md, "Tokens"): a run's text deltas reach
watchers and subscribers live and on resume while the run is live, exactly once and
in order, on one process (SQLite, PostgreSQL) and across two replicas sharing
PostgreSQL and Redis; the log keeps the run's state changes and its result, which
carries the whole answer, so a late reader (ListEvents) is not misled. A subscriber
that falls behind a run's tokens gets them merged into fewer frames, and one behind its
whole buffer is cut off with a cursor it resumes from exactly: no token dropped silently.

The model is the local fake of the Chat Completions protocol; it holds its answer
after a few chunks until the test lets it go, so "mid-run" is a state, not a moment.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc import aio

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2, events_pb2_grpc
from switchboard.mesh import create_server
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.security.credentials.accesstokens import SigningKey, private_key_pem
from tests.conftest import CALL_DEADLINE_S, make_settings
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.infra.redis import RedisServer
from tests.kits.authkit import detail, reason
from tests.kits.contextkit import Caller, context_stub, create_conversation, ctx_world
from tests.kits.dispatchkit import Stub as DStub
from tests.kits.dispatchkit import dispatcher_stub, finished, request, send, until
from tests.kits.eventkit import Subscriber, delta_text, run_updates, unique

pytestmark = pytest.mark.service

ANSWER = "one two three four five six seven"
HELD_AFTER = 3  # chunks the model sends before it waits for the test


def _model(fake: FakeOpenAI) -> asyncio.Event:
    gate = asyncio.Event()
    fake.script(Reply.text(ANSWER, hold_after_chunks=HELD_AFTER, hold=gate))
    return gate


def _llm(fake: FakeOpenAI, **settings: Any) -> dict[str, Any]:
    return {
        "llm_base_url": fake.url,
        "llm_model": "m-1",
        "llm_max_retries": 0,
        "egress_allow_loopback": True,
        **settings,
    }


@asynccontextmanager
async def _served(**settings: Any) -> AsyncIterator[SwitchboardServer]:
    server, _ = await create_server(make_settings(**settings))
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown(grace=0)


async def _until_text(sub: Subscriber, run: str, text: str) -> None:
    while delta_text(run_updates(sub.events, run)) != text:
        await sub.frame()


async def _until_end(sub: Subscriber, run: str) -> None:
    while not any(
        u.state_change.run.state == pb.RUN_STATE_SUCCEEDED for u in run_updates(sub.events, run)
    ):
        await sub.frame()


def _exactly_once_in_order(updates: Sequence[pb.RunUpdate]) -> None:
    sequences = [u.sequence for u in updates]
    assert sequences == list(range(sequences[0], sequences[0] + len(sequences)))
    assert delta_text(updates) == ANSWER
    result = [u.result for u in updates if u.WhichOneof("update") == "result"]
    assert [r.parts[0].text for r in result] == [ANSWER]


async def _conversation(server: SwitchboardServer, channel: aio.Channel) -> tuple[Caller, str]:
    stub = context_stub(channel)
    world = await ctx_world(server, stub)
    return world.editor, (await create_conversation(stub, world.editor, world.name)).name


def _scope(conversation: str) -> events_pb2.Scope:
    return events_pb2.Scope(conversation=conversation)


def _run_updates(
    channel: aio.Channel, caller: Caller, conversation: str, after_cursor: str = ""
) -> Subscriber:
    """A subscriber to the conversation's run updates (``after_cursor``: a resumed one;
    empty, the proto3 default, is a fresh one)."""
    return Subscriber(
        channel,
        caller.token,
        scopes=[_scope(conversation)],
        types=[events_pb2.EVENT_TYPE_RUN_UPDATED],
        after_cursor=after_cursor,
    )


async def _ask(
    channel: aio.Channel, caller: Caller, conversation: str, text: str = ANSWER
) -> tuple[DStub, str]:
    """The model asked through ``channel``'s dispatcher: the stub and the run's name."""
    dstub = dispatcher_stub(channel)
    sent = await send(dstub, caller, request(conversation, text, handler="handlers/llm"))
    return dstub, sent.run.name


@asynccontextmanager
async def _two_replicas(
    fake: FakeOpenAI, postgres_url: str, redis_server: RedisServer, tmp_path: Path
) -> AsyncIterator[tuple[tuple[aio.Channel, aio.Channel], Caller, str, Subscriber]]:
    """Replicas A and B on one PostgreSQL and Redis (channels to each), a caller's
    conversation, and a live Subscribe on B to that conversation's run updates."""
    key_file = tmp_path / "signing.pem"
    key_file.write_bytes(private_key_pem(SigningKey.generate("k1")))
    shared = _llm(
        fake, database_url=postgres_url, redis_url=redis_server.url, signing_keys=(str(key_file),)
    )
    async with (
        _served(**shared, instance_id="replica-a") as a,
        _served(**shared, instance_id="replica-b") as b,
        aio.insecure_channel(a.address) as channel_a,
        aio.insecure_channel(b.address) as channel_b,
    ):
        caller, conversation = await _conversation(a, channel_a)
        on_b = _run_updates(channel_b, caller, conversation)
        await on_b.live()
        yield (channel_a, channel_b), caller, conversation, on_b


async def test_a_subscriber_resuming_mid_run_gets_every_token_once_and_a_late_reader_the_result(
    database_url: str,
) -> None:
    async with FakeOpenAI() as fake:
        gate = _model(fake)
        async with (
            _served(**_llm(fake, database_url=database_url)) as server,
            aio.insecure_channel(server.address) as channel,
        ):
            caller, conversation = await _conversation(server, channel)
            first = _run_updates(channel, caller, conversation)
            await first.live()
            dstub, run = await _ask(channel, caller, conversation)
            await _until_text(first, run, "one two three")
            first.cancel()
            gate.set()
            await finished(dstub, caller, run)
            again = _run_updates(channel, caller, conversation, after_cursor=first.cursor)
            await _until_end(again, run)
            again.cancel()
            # WatchRun resumed mid-answer: the tokens after the sequence, once.
            middle = run_updates(first.events, run)[-1].sequence
            watched = [
                frame.update
                async for frame in dstub.WatchRun(
                    pb.WatchRunRequest(name=run, after_sequence=middle),
                    metadata=caller.md,
                    timeout=CALL_DEADLINE_S,
                )
                if frame.WhichOneof("frame") == "update"
            ]
            listed = await events_pb2_grpc.EventServiceStub(channel).ListEvents(
                events_pb2.ListEventsRequest(scopes=[_scope(conversation)], page_size=100),
                metadata=caller.md,
                timeout=CALL_DEADLINE_S,
            )
    # On the same process, nothing is sent twice: the ids are all new.
    assert not {e.id for e in first.events} & {e.id for e in again.events}
    _exactly_once_in_order(run_updates([*first.events, *again.events], run))
    assert [u.sequence for u in watched] == list(range(middle + 1, middle + 1 + len(watched)))
    assert delta_text(run_updates(first.events, run)) + delta_text(watched) == ANSWER
    # The log holds what must survive: no token, and the result with the whole answer.
    history = run_updates(listed.events, run)
    kinds = [u.WhichOneof("update") for u in history]
    assert "delta" not in kinds
    assert kinds.count("result") == 1
    assert [u.state_change.run.state for u in history if u.HasField("state_change")] == [
        pb.RUN_STATE_QUEUED,
        pb.RUN_STATE_RUNNING,
        pb.RUN_STATE_SUCCEEDED,
    ]
    assert next(u.result for u in history if u.HasField("result")).parts[0].text == ANSWER


async def test_two_replicas_carry_tokens_live_and_resume_exactly_once(
    postgres_url: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Replicas A (owns the run) and B on one PostgreSQL and Redis: a Subscribe on B
    sees A's tokens live; resumed on B it gets the rest once; resumed on A (another
    replica) it gets every token, those it had again with the same ids. A WatchRun
    begun on B mid-answer gets the whole answer: the tokens B heard before it, then live."""
    async with FakeOpenAI() as fake:
        gate = _model(fake)
        async with _two_replicas(fake, postgres_url, redis_server, tmp_path) as (
            (channel_a, channel_b),
            caller,
            conversation,
            on_b,
        ):
            dstub, run = await _ask(channel_a, caller, conversation)
            await _until_text(on_b, run, "one two three")
            on_b.cancel()
            # WatchRun on B, which does not own the run: the run as stored, the tokens B
            # has heard since (its ring), then live.
            watch: Any = dispatcher_stub(channel_b).WatchRun(
                pb.WatchRunRequest(name=run), metadata=caller.md, timeout=CALL_DEADLINE_S
            )
            frame: Any = await watch.read()
            watched: list[pb.RunUpdate] = [frame.update]
            gate.set()
            while watched[-1].state_change.run.state != pb.RUN_STATE_SUCCEEDED:
                frame = await watch.read()
                if frame.WhichOneof("frame") == "update":
                    watched.append(frame.update)
            watch.cancel()
            await finished(dstub, caller, run)
            resumed: dict[str, Subscriber] = {}
            for name, channel in (("same", channel_b), ("other", channel_a)):
                sub = _run_updates(channel, caller, conversation, after_cursor=on_b.cursor)
                await _until_end(sub, run)
                sub.cancel()
                resumed[name] = sub
    assert watched[0].state_change.run.state in (pb.RUN_STATE_QUEUED, pb.RUN_STATE_RUNNING)
    assert watched[-1].state_change.run.state == pb.RUN_STATE_SUCCEEDED
    sequences = [u.sequence for u in watched]
    assert sequences == sorted(set(sequences))
    # The run as stored (B's snapshot) is stamped when it was stored, not when B was
    # asked: stamps within a run never go backwards, whichever replica sends them.
    stamps = [u.time.ToNanoseconds() for u in watched]
    assert stamps == sorted(stamps), [(u.sequence, u.time.ToJsonString()) for u in watched]
    assert delta_text(watched) == ANSWER
    assert not {e.id for e in on_b.events} & {e.id for e in resumed["same"].events}
    _exactly_once_in_order(run_updates([*on_b.events, *resumed["same"].events], run))
    _exactly_once_in_order(run_updates(unique([*on_b.events, *resumed["other"].events]), run))


# -- slow subscribers ---------------------------------------------------------------------

#: A long answer of wide words: its tokens fill a stalled client's flow-control window
#: (about 64 KiB here) many times over, yet fit in one stored message (256 KiB).
WIDE = " ".join(f"w{i:03d}" + "x" * 1_500 for i in range(100))
#: A stalled client's channel: no BDP probing, so its receive window stays small and
#: the server's writes to it stop soon.
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]


def _paced(fake: FakeOpenAI) -> None:
    # Paced so that each token is a delta of its own (ready-together chunks would be
    # merged into one before they are events): the model's pace, not synchronization.
    fake.script(dataclasses.replace(Reply.text(WIDE), interval_s=0.004))


def _answered(updates: Sequence[pb.RunUpdate], answer: str) -> None:
    """Every update once, in order, the tokens joined to ``answer``, one result saying it."""
    sequences = [u.sequence for u in updates]
    assert sequences == list(range(1, len(sequences) + 1))
    assert delta_text(updates) == answer
    assert [u.result.parts[0].text for u in updates if u.HasField("result")] == [answer]


@asynccontextmanager
async def _stalled_through_a_run(
    database_url: str, **settings: Any
) -> AsyncIterator[tuple[aio.Channel, Caller, str, Subscriber, str]]:
    """A subscriber whose client reads nothing while a run of ``WIDE`` streams to its end:
    a channel to the server, the caller, the conversation, the subscriber, the run."""
    async with FakeOpenAI() as fake:
        _paced(fake)
        async with (
            _served(**_llm(fake, database_url=database_url, **settings)) as server,
            aio.insecure_channel(server.address) as channel,
            aio.insecure_channel(server.address, options=SMALL_WINDOW) as stalled,
        ):
            caller, conversation = await _conversation(server, channel)
            kinds = [events_pb2.EVENT_TYPE_RUN_UPDATED]
            slow = Subscriber(stalled, caller.token, scopes=[_scope(conversation)], types=kinds)
            await slow.live()
            dstub, run = await _ask(channel, caller, conversation, "go on")
            await finished(dstub, caller, run)
            yield channel, caller, conversation, slow, run


async def test_a_subscriber_that_falls_behind_a_run_gets_its_tokens_in_fewer_fuller_frames(
    database_url: str,
) -> None:
    async with _stalled_through_a_run(database_url) as (_, _, _, slow, run):
        heartbeats = len(slow.heartbeats)
        await _until_end(slow, run)
        slow.cancel()
    updates = run_updates(slow.events, run)
    deltas = [u for u in updates if u.HasField("delta")]
    _answered(updates, WIDE)
    # Tokens that queued while the client stalled went out together: fewer frames than
    # tokens, and some frame carried many.
    frames = slow.frames - heartbeats
    assert len(deltas) >= 50
    assert slow.batches < len(deltas)
    assert frames < len(updates)


async def test_a_subscriber_behind_its_whole_buffer_of_tokens_is_cut_off_and_resumes_exactly(
    database_url: str,
) -> None:
    async with _stalled_through_a_run(database_url, events_subscriber_buffer=10) as (
        channel,
        caller,
        conversation,
        slow,
        run,
    ):
        error = await slow.error()
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert reason(error) == "ERROR_REASON_SUBSCRIBER_TOO_SLOW"
        resume = detail(error, error_details_pb2.ErrorInfo).metadata["resume_cursor"]
        assert resume == (slow.events[-1].cursor if slow.events else slow.cursor)
        # The tokens it had no room for are in the process's ring: resumed from the
        # cursor, it gets each of them once (the run is over by now).
        again = _run_updates(channel, caller, conversation, after_cursor=resume)
        await _until_end(again, run)
        again.cancel()
    delivered = [*slow.events, *again.events]
    assert len({e.id for e in delivered}) == len(delivered)
    assert delta_text(run_updates(slow.events, run)) != WIDE
    _answered(run_updates(delivered, run), WIDE)


async def test_a_watch_resumed_on_the_replica_without_the_run_gets_the_tokens_made_meanwhile(
    postgres_url: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    """A WatchRun client that lost its stream (after RUNNING) while A, the run's replica,
    streamed three tokens, resumes on B (where Envoy sent it): B heard those tokens (its
    ring), so it sends them, then the rest, once, in order; before, B followed only what
    came after the resume, and the client's answer lacked the words made while it was away."""
    async with FakeOpenAI() as fake:
        first_byte, rest = asyncio.Event(), asyncio.Event()
        fake.script(Reply(content=ANSWER, gate=first_byte, hold_after_chunks=HELD_AFTER, hold=rest))
        async with _two_replicas(fake, postgres_url, redis_server, tmp_path) as (
            (channel_a, channel_b),
            caller,
            conversation,
            on_b,
        ):
            dstub, run = await _ask(channel_a, caller, conversation)
            await fake.wait_requests(1)
            # The client watched on A up to RUNNING, then lost its stream.
            lost, before = await until(
                dstub, caller, run, "state_change", state=pb.RUN_STATE_RUNNING
            )
            lost.cancel()
            first_byte.set()
            await _until_text(on_b, run, "one two three")  # B has heard them
            on_b.cancel()
            watch: Any = dispatcher_stub(channel_b).WatchRun(
                pb.WatchRunRequest(name=run, after_sequence=before[-1].sequence),
                metadata=caller.md,
                timeout=CALL_DEADLINE_S,
            )
            rest.set()
            resumed = [f.update async for f in watch if f.WhichOneof("frame") == "update"]
    sequences = [u.sequence for u in resumed]
    assert sequences == list(range(before[-1].sequence + 1, before[-1].sequence + 1 + len(resumed)))
    assert delta_text(resumed) == ANSWER
    assert [r.parts[0].text for r in (u.result for u in resumed if u.HasField("result"))] == [
        ANSWER
    ]
    assert resumed[-1].state_change.run.state == pb.RUN_STATE_SUCCEEDED
