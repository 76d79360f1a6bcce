"""Runs taken back and forth between live replicas (issue 67): every admitted run
starts or ends.

Two replicas on one PostgreSQL and one Redis, each running few runs at once, so
most of their runs wait in the replica's in-memory queue. A replica's lease is
lost by pausing its renewals (the process goes on: its runs keep running and
its queue keeps its tickets, as in an overloaded process that missed its
renewals), until the other replica has taken its runs over; then its renewals
go on and the other one is paused, so runs move back to a replica that still
holds them from before. Everything else is real: servers, PostgreSQL, Redis.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import grpc
import pytest
from grpc import aio
from sqlalchemy import select

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.runs.core.store import ACTIVE, TERMINAL
from switchboard.dispatcher.service import Dispatcher
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.store.models import DispatcherLeaseRow, RunRow
from tests.conftest import built
from tests.dispatcher.budgets.test_service import (
    ANSWER,
    _settings,
    add_budget,
    answer,
    daily,
    paused,
    window,
)
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.infra.redis import RedisServer
from tests.kits import dispatchkit
from tests.kits.contextkit import Caller, context_stub, create_conversation, ctx_world
from tests.kits.dispatchkit import (
    Renewals,
    cancel,
    dispatcher_stub,
    finished,
    request,
    send,
    start_replicas,
)
from tests.kits.dispatchkit import Stub as DStub

pytestmark = [pytest.mark.service, pytest.mark.timeout(240)]

LEASE_S: Final = 1.0
#: How long a wait for the system to move on may take before the test fails.
SETTLE_S: Final = 60.0
CONVERSATIONS: Final = 6
#: Messages each conversation sends before the takeovers, and during each round.
FIRST: Final = 3
PER_ROUND: Final = 1
ROUNDS: Final = 6
#: One model call's cost, as the model server reports it (no prompt tokens, ANSWER out).
COST: Final = 2 * ANSWER


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    await dispatchkit.eventually(check, what, timeout_s=SETTLE_S)


async def _replicas(
    tmp_path: Path, database_url: str, redis_url: str, **more: Any
) -> tuple[SwitchboardServer, SwitchboardServer]:
    return await start_replicas(
        tmp_path,
        database_url,
        redis_url,
        dispatcher_recovery="resume",
        dispatcher_lease_s=LEASE_S,
        dispatcher_max_running=2,
        dispatcher_max_running_per_workspace=2,
        dispatcher_max_messages_per_minute_per_user=100_000,
        dispatcher_max_messages_per_minute_per_workspace=100_000,
        dispatcher_max_active_runs_per_workspace=10_000,
        context_max_writes_per_minute=100_000,
        **more,
    )


async def _workers(server: SwitchboardServer) -> dict[str, tuple[str, pb.RunState.ValueType]]:
    """Every run's owner and stored state."""
    async with server.shared.database.readers() as db:
        rows = await db.execute(select(RunRow.id, RunRow.worker, RunRow.state))
        return {row[0]: (row[1], pb.RunState.ValueType(row[2])) for row in rows}


async def _leased(server: SwitchboardServer, instance: str) -> bool:
    async with server.shared.database.readers() as db:
        found = await db.scalar(
            select(DispatcherLeaseRow.instance).where(DispatcherLeaseRow.instance == instance)
        )
        return found is not None


async def test_runs_moved_back_and_forth_between_live_replicas_all_end(
    tmp_path: Path, postgres_url: str, redis_server: RedisServer
) -> None:
    """Each conversation's first message is a model run that pauses at its budget's
    cap; the next ones are echo runs, queued behind it on whichever replica
    admitted them, and more come at each round. The replicas take each other's
    runs over, back and forth; then the paused runs are cancelled (through either
    replica: their owner ends them), and every admitted run must end."""
    async with FakeOpenAI() as fake:
        fake.default = answer()
        a, b = await _replicas(
            tmp_path,
            postgres_url,
            redis_server.url,
            dispatcher_approval_timeout_s=600.0,
            **_settings(fake),
        )
        try:
            async with (
                aio.insecure_channel(a.address) as on_a,
                aio.insecure_channel(b.address) as on_b,
            ):
                await _move_back_and_forth(a, b, [dispatcher_stub(on_a), dispatcher_stub(on_b)])
        finally:
            await a.shutdown(grace=0)
            await b.shutdown(grace=0)
    assert not fake.requests  # every model run paused before its call


async def _move_back_and_forth(
    a: SwitchboardServer, b: SwitchboardServer, stubs: list[DStub]
) -> None:
    renewals = {"replica-a": Renewals(a), "replica-b": Renewals(b)}
    async with aio.insecure_channel(a.address) as on_a:
        cstub = context_stub(on_a)
        world = await ctx_world(a, cstub)
        # Less than any model call's prompt: every model run pauses before its call.
        await add_budget(a, world.name, "daily", daily(5))
        built(b, Dispatcher).budgets_changed(world.id)
        conversations = [
            (await create_conversation(cstub, world.editor, world.name)).name
            for _ in range(CONVERSATIONS)
        ]
    paused_runs: list[str] = []
    echoes: list[str] = []
    for c, conversation in enumerate(conversations):
        sent = await send(stubs[c % 2], world.editor, request(conversation, "hello"))
        paused_runs.append(sent.run.name)
        await paused(stubs[c % 2], world.editor, sent.run.name)

    async def send_round(tag: str, count: int) -> None:
        for c, conversation in enumerate(conversations):
            for i in range(count):
                words = " ".join(f"{tag}-{c}-{i}-w{k}" for k in range(3))
                sent = await send(
                    stubs[(c + i) % 2],
                    world.editor,
                    request(conversation, words, handler="handlers/echo", delay_ms=50),
                )
                echoes.append(sent.run.name)

    await send_round("first", FIRST)
    victim, taker = "replica-a", "replica-b"
    for round_ in range(ROUNDS):
        renewals[victim].paused = True

        async def moved(victim: str = victim) -> bool:
            owners = await _workers(a)
            active = [w for w, state in owners.values() if state in ACTIVE]
            return victim not in active and not await _leased(a, victim)

        # The victim's lease lapses and the other replica takes its runs over.
        await eventually(moved, f"round {round_}: {taker} to take {victim}'s runs")
        renewals[victim].paused = False
        await eventually(
            lambda victim=victim: _leased(a, victim),  # type: ignore[misc]
            f"round {round_}: {victim} to renew its lease again",
        )
        await send_round(f"r{round_}", PER_ROUND)
        victim, taker = taker, victim

    answers = {}
    for index, name in enumerate(paused_runs):
        answers[name] = (index % 2, await _cancel(stubs[index % 2], world.editor, name))
    admitted = [*paused_runs, *echoes]

    async def all_ended() -> bool:
        owners = await _workers(a)
        return all(owners[_id(name)][1] in TERMINAL for name in admitted)

    try:
        await eventually(all_ended, "every admitted run to end")
    except AssertionError:
        owners = await _workers(a)
        stuck = {
            name: (owners[_id(name)][0], pb.RunState.Name(owners[_id(name)][1]))
            for name in admitted
            if owners[_id(name)][1] not in TERMINAL
        }
        held = {
            name: [
                (replica, _debug(server, name))
                for replica, server in (("replica-a", a), ("replica-b", b))
                if built(server, Dispatcher).holds(name)
            ]
            for name in stuck
        }
        raise AssertionError(
            f"runs that never ended (owner, state): {stuck}; held live by: {held}; "
            f"cancels answered: {answers}"
        ) from None
    owners = await _workers(a)
    assert {owners[_id(name)][1] for name in paused_runs} == {pb.RUN_STATE_CANCELLED}
    assert {owners[_id(name)][1] for name in echoes} == {pb.RUN_STATE_SUCCEEDED}


def _debug(server: SwitchboardServer, name: str) -> str:
    active = built(server, Dispatcher)._live.runs[name]
    task = active.task
    return (
        f"{pb.RunState.Name(active.run.state)} retired={active.retired} started={active.started} "
        f"ticket={active.ticket} task={'none' if task is None else task.done()}"
    )


def _id(name: str) -> str:
    return name.rsplit("/", 1)[-1]


async def _cancel(stub: DStub, caller: Caller, name: str) -> str:
    """CancelRun, tried again while it answers UNAVAILABLE (the run is between owners)."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        try:
            return pb.RunState.Name((await cancel(stub, caller, name)).state)
        except aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.1)  # as a client retries, under a deadline


async def test_a_paused_run_taken_over_from_a_live_replica_leaves_its_conversation_there(
    tmp_path: Path, postgres_url: str, redis_server: RedisServer
) -> None:
    """A run paused at its cap (its task waiting, its conversation busy in the
    scheduler) is taken over by another replica and cancelled there: the next
    message of its conversation, admitted by the replica that held it first,
    runs at once, instead of waiting behind a pause that replica no longer owns."""
    async with FakeOpenAI() as fake:
        fake.default = answer()
        a, b = await _replicas(
            tmp_path,
            postgres_url,
            redis_server.url,
            dispatcher_approval_timeout_s=600.0,
            **_settings(fake),
        )
        renewals = Renewals(a)
        try:
            async with (
                aio.insecure_channel(a.address) as on_a,
                aio.insecure_channel(b.address) as on_b,
            ):
                stub, dstub_a, dstub_b = (
                    context_stub(on_a),
                    dispatcher_stub(on_a),
                    dispatcher_stub(on_b),
                )
                world = await ctx_world(a, stub)
                # Less than any model call's prompt: the run pauses before its call.
                await add_budget(a, world.name, "daily", daily(5))
                built(b, Dispatcher).budgets_changed(world.id)
                conversation = (await create_conversation(stub, world.editor, world.name)).name
                first = await send(dstub_a, world.editor, request(conversation, "hello"))
                await paused(dstub_a, world.editor, first.run.name)
                renewals.paused = True

                async def taken() -> bool:
                    owners = await _workers(a)
                    return owners[first.run.name.rsplit("/", 1)[-1]][0] == "replica-b" and built(
                        b, Dispatcher
                    ).holds(first.run.name)

                await eventually(taken, "replica-b to take the paused run over")
                renewals.paused = False
                await eventually(lambda: _leased(a, "replica-a"), "replica-a to renew its lease")
                cancelled = await cancel(dstub_b, world.editor, first.run.name)
                assert cancelled.state == pb.RUN_STATE_CANCELLED
                second = await send(
                    dstub_a,
                    world.editor,
                    request(conversation, "after", handler="handlers/echo"),
                )
                ended = await asyncio.wait_for(
                    finished(dstub_a, world.editor, second.run.name), SETTLE_S
                )
                assert ended.state == pb.RUN_STATE_SUCCEEDED
                assert not built(a, Dispatcher).holds(first.run.name)
        finally:
            await a.shutdown(grace=0)
            await b.shutdown(grace=0)


async def test_a_replica_that_lost_a_run_charges_nothing_more_for_it(
    tmp_path: Path, postgres_url: str, redis_server: RedisServer
) -> None:
    """Replica a's model call is in flight when b takes the run over (a's renewals
    stopped, its process going on) and asks the model again. b charges a's hold at
    what it reserved (the call may be billed: docs/budgets.md, "A call in flight at
    a crash"). Both calls then answer: a's settlement adds nothing more (its hold
    was charged), so the budget's used cost is the run's reported cost: a's
    reservation and b's call."""
    gate = asyncio.Event()
    async with FakeOpenAI() as fake:
        fake.default = Reply.text(
            "one two three", usage=(0, ANSWER), hold_after_chunks=1, hold=gate
        )
        a, b = await _replicas(tmp_path, postgres_url, redis_server.url, **_settings(fake))
        renewals = Renewals(a)
        try:
            async with aio.insecure_channel(b.address) as on_b:
                stub, dstub = context_stub(on_b), dispatcher_stub(on_b)
                world = await ctx_world(b, stub)
                await add_budget(a, world.name, "daily", daily(100 * COST))
                built(b, Dispatcher).budgets_changed(world.id)
                conversation = (await create_conversation(stub, world.editor, world.name)).name
                async with aio.insecure_channel(a.address) as on_a:
                    sent = await send(
                        dispatcher_stub(on_a), world.editor, request(conversation, "hello")
                    )
                await fake.wait_requests(1)
                _, reserved = await window(a, "daily")
                assert reserved >= COST
                renewals.paused = True
                # b takes the run over and asks the model again; both calls wait.
                await fake.wait_requests(2)
                gate.set()
                run = await finished(dstub, world.editor, sent.run.name)

                async def a_let_go() -> bool:
                    return not built(a, Dispatcher).holds(sent.run.name)

                await eventually(a_let_go, "replica a to give the run up")
                used, held = await window(a, "daily")
        finally:
            await a.shutdown(grace=0)
            await b.shutdown(grace=0)

    assert run.state == pb.RUN_STATE_SUCCEEDED
    assert run.usage.cost_micros == reserved + COST
    assert (used, held) == (reserved + COST, 0)


async def test_an_attempt_ending_as_its_run_is_taken_over_leaves_its_replica(
    tmp_path: Path, postgres_url: str, redis_server: RedisServer
) -> None:
    """Replica a's run has answered and a is storing its end when b takes the run
    over (a's renewals stopped, its process going on). When a's renewals go on, a
    gives its attempt up without cutting its end short: the end's write, refused,
    lets the attempt go. (Cancelled in that write, the attempt stayed in a for
    good, and a run taken back by a later could never be recovered there.)"""
    a, b = await _replicas(tmp_path, postgres_url, redis_server.url)
    renewals = Renewals(a)
    dispatcher = built(a, Dispatcher)
    store = dispatcher._store
    real = store.save
    ending, gate = asyncio.Event(), asyncio.Event()

    async def save(run_id: str, run: pb.Run, **kwargs: Any) -> Any:
        if run.state == pb.RUN_STATE_SUCCEEDED and not gate.is_set():
            ending.set()
            await gate.wait()  # a's end waits while the run changes hands
        return await real(run_id, run, **kwargs)

    store.save = save  # type: ignore[method-assign]
    try:
        async with (
            aio.insecure_channel(a.address) as on_a,
            aio.insecure_channel(b.address) as on_b,
        ):
            cstub = context_stub(on_a)
            world = await ctx_world(a, cstub)
            conversation = (await create_conversation(cstub, world.editor, world.name)).name
            sent = await send(
                dispatcher_stub(on_a),
                world.editor,
                request(conversation, "hello", handler="handlers/echo"),
            )
            name = sent.run.name
            await asyncio.wait_for(ending.wait(), SETTLE_S)
            renewals.paused = True

            async def taken() -> bool:
                return (await _workers(a))[_id(name)][0] == "replica-b"

            await eventually(taken, "replica-b to take the run over")
            renewals.paused = False

            async def given_up() -> bool:
                active = dispatcher._live.runs.get(name)
                return active is None or active.retired

            await eventually(given_up, "replica-a to give its attempt up")
            gate.set()

            async def let_go() -> bool:
                return not dispatcher.holds(name)

            await eventually(let_go, "replica-a to let its attempt go")
            ended = await asyncio.wait_for(
                finished(dispatcher_stub(on_b), world.editor, name), SETTLE_S
            )
            assert ended.state == pb.RUN_STATE_SUCCEEDED
            assert (await _workers(a))[_id(name)] == ("replica-b", pb.RUN_STATE_SUCCEEDED)
    finally:
        await a.shutdown(grace=0)
        await b.shutdown(grace=0)
