"""switchboard.client against a real in-process server: sending messages and
watching runs (the echo handler answers deterministically; ``delay_ms`` makes
it slow)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.client import (
    Client,
    HandlerFailed,
    InvalidArgument,
    NotFound,
    RunEnded,
    RunFailed,
    RunWatch,
)
from switchboard.client.runs import is_terminal
from switchboard.platform.rpc.server import SwitchboardServer
from tests.client.test_clientkit import (
    PASSWORD,
    Wire,
    new_conversation,
    new_workspace,
    unique_email,
)

pytestmark = pytest.mark.service

DEADLINE_S = 30.0
SEND = "/switchboard.api.dispatcher.v1.DispatcherService/SendMessage"


@pytest.fixture
async def signed_in(mesh: SwitchboardServer) -> AsyncIterator[tuple[Client, str, Wire]]:
    wire = Wire()
    async with Client(mesh.address, interceptors=wire.interceptors) as client:
        await client.register(unique_email("runs"), PASSWORD)
        conversation = await new_conversation(client, await new_workspace(client))
        yield client, conversation, wire


async def _all(watch: RunWatch) -> list[pb.RunUpdate]:
    async with watch:
        return [update async for update in watch]


async def test_ask_returns_the_answer_the_updates_carry(
    signed_in: tuple[Client, str, Wire],
) -> None:
    client, conversation, wire = signed_in
    question = "what does the echo say"
    answer = await asyncio.wait_for(client.ask(conversation, question, handler="echo"), DEADLINE_S)
    assert answer.run.state == pb.RUN_STATE_SUCCEEDED
    assert answer.run.handler == "handlers/echo"
    assert answer.text.startswith(question)
    # The same run watched again from the start (replayed): in order, no gap,
    # ending with its terminal state, and its deltas are the answer.
    updates = await asyncio.wait_for(_all(client.watch(answer.run)), DEADLINE_S)
    sequences = [u.sequence for u in updates]
    assert sequences == list(range(1, len(updates) + 1))
    assert is_terminal(updates[-1])
    assert "".join(u.delta.text for u in updates if u.HasField("delta")) == answer.text
    assert updates[-1].state_change.run.last_sequence == sequences[-1]
    # One SendMessage, with an idempotency key of its own.
    assert wire.count(SEND) == 1


async def test_a_watch_resumes_after_the_sequence_it_is_given(
    signed_in: tuple[Client, str, Wire],
) -> None:
    client, conversation, _ = signed_in
    run = await client.send(conversation, "one two three four five six", handler="echo")
    assert run.state in (pb.RUN_STATE_QUEUED, pb.RUN_STATE_RUNNING)
    everything = await asyncio.wait_for(_all(client.watch(run.name)), DEADLINE_S)
    middle = everything[len(everything) // 2].sequence
    rest = await asyncio.wait_for(_all(client.watch(run.name, after_sequence=middle)), DEADLINE_S)
    assert rest == [u for u in everything if u.sequence > middle]
    watch = client.watch(run.name, after_sequence=middle)
    await asyncio.wait_for(_all(watch), DEADLINE_S)
    assert watch.last_sequence == everything[-1].sequence
    assert watch.run is not None
    assert watch.run.state == pb.RUN_STATE_SUCCEEDED
    assert watch.resumes == 0


async def test_a_watch_behind_reads_merged_deltas_and_misses_nothing(
    signed_in: tuple[Client, str, Wire],
) -> None:
    client, conversation, _ = signed_in
    words = " ".join(f"w{i}" for i in range(10))
    run = await client.send(conversation, words, handler="echo", parameters={"delay_ms": 1})
    one_by_one = client.watch(run.name, merge_deltas=False)
    plain = await asyncio.wait_for(_all(one_by_one), DEADLINE_S)
    # The run has ended: a watch now is behind all of it, and is merged by default.
    watch = client.watch(run.name)
    merged = await asyncio.wait_for(_all(watch), DEADLINE_S)
    assert len(merged) < len(plain)
    assert any(u.first_sequence for u in merged)
    assert not any(u.first_sequence for u in plain)
    assert watch.missed == one_by_one.missed == 0
    assert watch.last_sequence == one_by_one.last_sequence == plain[-1].sequence

    def text(updates: list[pb.RunUpdate]) -> str:
        return "".join(u.delta.text for u in updates if u.WhichOneof("update") == "delta")

    assert text(merged) == text(plain)
    async with client.watch(run.name) as again:
        answer = await asyncio.wait_for(again.answer(), DEADLINE_S)
    assert answer.text.startswith(words)


async def test_the_same_request_id_is_one_run(signed_in: tuple[Client, str, Wire]) -> None:
    client, conversation, _ = signed_in
    first = await client.send(conversation, "once", handler="echo", request_id="send-1")
    again = await client.send(conversation, "once", handler="echo", request_id="send-1")
    other = await client.send(conversation, "once", handler="echo")
    assert first.name == again.name
    assert other.name != first.name
    with pytest.raises(InvalidArgument) as reused:
        await client.send(conversation, "something else", handler="echo", request_id="send-1")
    assert reused.value.violations


async def test_a_cancelled_run_ends_the_watch_and_ask_says_why(
    signed_in: tuple[Client, str, Wire],
) -> None:
    client, conversation, _ = signed_in
    slow = " ".join(f"w{i}" for i in range(200))
    run = await client.send(conversation, slow, handler="echo", parameters={"delay_ms": 200})
    async with client.watch(run) as watch:
        async for update in watch:
            if update.HasField("delta"):
                break  # it is running
        ended = await client.cancel(run, reason="enough")
        assert ended.state == pb.RUN_STATE_CANCELLED
        rest = [u async for u in watch]
    assert is_terminal(rest[-1])
    assert rest[-1].state_change.run.state == pb.RUN_STATE_CANCELLED

    # ask() holds the run; its name comes from the conversation's events.
    async with client.follow([conversation], types=["RUN_UPDATED"]) as events:
        await asyncio.wait_for(events.ready(), DEADLINE_S)
        asking = asyncio.ensure_future(
            client.ask(conversation, slow, handler="echo", parameters={"delay_ms": 200})
        )
        # (The first run's last events may still be on their way.)
        started = run.name
        while started == run.name:
            event = await asyncio.wait_for(anext(events), DEADLINE_S)
            started = event.run_updated.update.run
    await client.cancel(started)
    with pytest.raises(RunFailed) as failed:
        await asyncio.wait_for(asking, DEADLINE_S)
    assert failed.value.code() == grpc.StatusCode.CANCELLED
    assert failed.value.reason == "ERROR_REASON_RUN_CANCELLED"
    assert failed.value.run.state == pb.RUN_STATE_CANCELLED


async def test_a_failing_handler_is_a_typed_run_failure(
    signed_in: tuple[Client, str, Wire],
) -> None:
    client, conversation, _ = signed_in
    with pytest.raises(RunFailed) as failed:
        await asyncio.wait_for(
            client.ask(conversation, "fail please", handler="echo", parameters={"fail": "no"}),
            DEADLINE_S,
        )
    assert isinstance(failed.value.cause, HandlerFailed)
    assert failed.value.reason == "ERROR_REASON_HANDLER_FAILED"
    assert failed.value.run.state == pb.RUN_STATE_FAILED


async def test_a_steer_of_a_run_without_step_boundaries_is_requeued_and_answers_itself(
    signed_in: tuple[Client, str, Wire],
) -> None:
    """steer(): the message is stored at once and the steer's own run is ACCEPTED; the
    echo handler has no step boundary, so once its run ends the steer runs on its own and
    answers the message (REQUEUED, never lost). A run that has ended refuses a steer with
    RunEnded, and nothing is stored."""
    client, conversation, wire = signed_in
    slow = " ".join(f"w{i}" for i in range(20))
    target = await client.send(conversation, slow, handler="echo", parameters={"delay_ms": 50})
    steered = await client.steer(target, "and then stop")
    assert steered.run.steer.target == target.name
    assert steered.run.steer.state == pb.STEER_STATE_ACCEPTED
    assert steered.message.parts[0].text == "and then stop"
    assert wire.count("/SteerRun") == 1
    async with client.watch(target) as watch:
        updates = [u async for u in watch]
    assert updates[-1].state_change.run.state == pb.RUN_STATE_SUCCEEDED
    requeued = [u.steer for u in updates if u.HasField("steer")]
    assert [s.state for s in requeued][-1] == pb.STEER_STATE_REQUEUED
    assert requeued[-1].steer_run == steered.run.name
    async with client.watch(steered.run) as watch:
        answer = await asyncio.wait_for(watch.answer(), DEADLINE_S)
    assert answer.text.startswith("and then stop")
    assert answer.run.steer.state == pb.STEER_STATE_REQUEUED

    with pytest.raises(RunEnded) as ended:
        await client.steer(target, "too late")
    assert ended.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    stored = await client.context.ListMessages(cpb.ListMessagesRequest(parent=conversation))
    assert "too late" not in [m.parts[0].text for m in stored.messages if m.parts]


async def test_watching_a_run_that_does_not_exist_is_not_found(
    signed_in: tuple[Client, str, Wire],
) -> None:
    client, conversation, _ = signed_in
    watch = client.watch(f"{conversation}/runs/0123456789abcdef0123456789abcdef")
    with pytest.raises(NotFound):
        await asyncio.wait_for(anext(watch), DEADLINE_S)
    # Ended: iterating again stops at once.
    assert [u async for u in watch] == []


async def test_the_raw_stubs_streams_carry_the_bearer_too(
    signed_in: tuple[Client, str, Wire],
) -> None:
    """Converse (both ways) and Subscribe (server stream) through the typed stubs:
    the client's interceptors attach the credential to every call shape."""
    client, conversation, wire = signed_in
    outgoing: asyncio.Queue[pb.ConverseRequest | None] = asyncio.Queue()

    async def requests() -> AsyncIterator[pb.ConverseRequest]:
        while (item := await outgoing.get()) is not None:
            yield item

    converse = client.dispatcher.Converse(requests())
    outgoing.put_nowait(
        pb.ConverseRequest(
            client_request_id="c1",
            send_message=pb.SendMessageRequest(
                conversation=conversation,
                message=cpb.Message(parts=[cpb.ContentPart(text="over converse")]),
                handler="handlers/echo",
            ),
        )
    )
    try:
        async with asyncio.timeout(DEADLINE_S):
            while True:
                frame: Any = await converse.read()  # a ConverseResponse (or EOF)
                if frame.WhichOneof("frame") == "update" and is_terminal(frame.update):
                    break
        assert frame.update.state_change.run.state == pb.RUN_STATE_SUCCEEDED
    finally:
        outgoing.put_nowait(None)
        converse.cancel()

    subscribe = client.events.Subscribe(
        events_pb2.SubscribeRequest(scopes=[events_pb2.Scope(conversation=conversation)])
    )
    try:
        first: Any = await asyncio.wait_for(subscribe.read(), DEADLINE_S)
        assert first.WhichOneof("frame") == "heartbeat"
    finally:
        subscribe.cancel()
    bearer = f"Bearer {client.tokens.current()}"
    assert [s.authorization for s in wire.of("/Subscribe")] == [bearer]
