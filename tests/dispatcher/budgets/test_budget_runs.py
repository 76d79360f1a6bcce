"""Runs against budgets, in one process on SQLite with the local model server
(tests/fakes/openai_server.py) and a price table: concurrent runs never charge past a
cost cap, a spent budget refuses messages with the reason and when it resets, a run
whose next step does not fit pauses (REQUIRES_ACTION with a budget action) and goes on
when the cap is raised, when an owner allows the overdraft, or fails (an owner's FAIL,
or the approval timeout); a cost cap and a model without a price refuse the message.
A replica that takes a dead one's runs over releases what they held (two replicas on
PostgreSQL and Redis)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc import aio
from sqlalchemy import select, update

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.dispatcher.budgets import spending
from switchboard.dispatcher.budgets.ledger import Amount, Ledger
from switchboard.dispatcher.service import Dispatcher
from switchboard.mesh import create_server
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.security.credentials.accesstokens import SigningKey, private_key_pem
from switchboard.platform.store.models import BudgetHoldRow, BudgetRow, BudgetWindowRow
from tests.conftest import built, fresh_database_url, make_settings
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.infra.redis import RedisServer
from tests.kits.authkit import detail, reason
from tests.kits.contextkit import (
    TIMEOUT_S,
    Caller,
    context_stub,
    create_conversation,
    ctx_world,
    tap,
)
from tests.kits.contextkit import Stub as CStub
from tests.kits.dispatchkit import (
    Renewals,
    cancel,
    dispatcher_stub,
    finished,
    limited,
    reason_of,
    request,
    send,
    start_replicas,
    until,
)
from tests.kits.dispatchkit import Stub as DStub

pytestmark = pytest.mark.service

#: Dollars per million tokens: 1 micro-dollar a prompt token, 2 an answer token.
PRICES = {"m-1": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}
#: Each answer's tokens (max_tokens is the same): 200 micro-dollars, ~215 reserved with the prompt.
ANSWER = 100


def _settings(fake: FakeOpenAI, **overrides: Any) -> dict[str, Any]:
    return {
        "llm_base_url": fake.url,
        "llm_model": "m-1",
        "llm_prices": json.dumps(PRICES),
        "llm_max_output_tokens": ANSWER,
        # Each call needs its whole max_tokens here: near the cap it is not made with
        # fewer (tests/dispatcher/budgets/test_budget_fit.py), so a step either fits or pauses.
        "llm_min_output_tokens": ANSWER,
        "llm_max_retries": 0,
        **overrides,
    }


@asynccontextmanager
async def mesh(
    fake: FakeOpenAI, **overrides: Any
) -> AsyncIterator[tuple[SwitchboardServer, CStub, DStub]]:
    async with limited(**_settings(fake, **overrides)) as started:
        yield started


async def add_budget(
    server: SwitchboardServer, workspace: str, budget_id: str, budget: pb.Budget
) -> None:
    """A workspace budget, written as the budget catalog writes it, then the catalog's hook."""
    workspace_id = workspace.removeprefix("workspaces/")
    now = dt.datetime.now(dt.UTC)
    async with server.shared.database.sessions() as session:
        session.add(
            BudgetRow(
                workspace_id=workspace_id,
                id=budget_id,
                scope_kind="workspace",
                scope_id="",
                data=budget.SerializeToString(),
                created_at=now,
                updated_at=now,
            )
        )
        await session.commit()
    built(server, Dispatcher).budgets_changed(workspace_id)


async def set_cap(server: SwitchboardServer, workspace: str, budget_id: str, cost: int) -> None:
    """Raise a budget's cost cap as UpdateBudget does, then the catalog's hook."""
    await change_budget(server, workspace, budget_id, cost_limit_micros=cost)


async def change_budget(
    server: SwitchboardServer, workspace: str, budget_id: str, **limits: int
) -> None:
    """Set a budget's caps (``cost_limit_micros=...``, ``total_token_limit=...``) as
    UpdateBudget does, then the catalog's hook."""
    workspace_id = workspace.removeprefix("workspaces/")
    async with server.shared.database.sessions() as session:
        row = await session.get(BudgetRow, (workspace_id, budget_id))
        assert row is not None
        budget = pb.Budget.FromString(row.data)
        for field, value in limits.items():
            setattr(budget, field, value)
        await session.execute(
            update(BudgetRow)
            .where(BudgetRow.workspace_id == workspace_id, BudgetRow.id == budget_id)
            .values(data=budget.SerializeToString())
        )
        await session.commit()
    built(server, Dispatcher).budgets_changed(workspace_id)


async def window(server: SwitchboardServer, budget_id: str) -> tuple[int, int]:
    """``(cost used, cost held)`` of the budget's windows, summed."""
    async with server.shared.database.sessions() as session:
        rows = (
            await session.execute(
                select(BudgetWindowRow.cost_used, BudgetWindowRow.cost_held).where(
                    BudgetWindowRow.budget_id == budget_id
                )
            )
        ).all()
    return sum(row[0] for row in rows), sum(row[1] for row in rows)


async def holds(server: SwitchboardServer) -> int:
    async with server.shared.database.sessions() as session:
        return len((await session.execute(select(BudgetHoldRow.id))).all())


def daily(cost: int, **more: Any) -> pb.Budget:
    return pb.Budget(
        display_name="Daily", period=pb.BUDGET_PERIOD_DAY, cost_limit_micros=cost, **more
    )


async def resolve(
    dstub: DStub, caller: Caller, run: str, decision: pb.BudgetDecision.ValueType
) -> pb.Run:
    response = await dstub.ResolveBudgetAction(
        pb.ResolveBudgetActionRequest(name=run, decision=decision),
        metadata=caller.md,
        timeout=TIMEOUT_S,
    )
    return response.run


async def paused(dstub: DStub, caller: Caller, run: str) -> pb.Run:
    call, seen = await until(dstub, caller, run, "state_change", state=pb.RUN_STATE_REQUIRES_ACTION)
    call.cancel()
    return seen[-1].state_change.run


def _id(workspace: str) -> str:
    return workspace.removeprefix("workspaces/")


def answer() -> Reply:
    return Reply.text("fine", usage=(0, ANSWER))


async def test_concurrent_runs_never_charge_past_a_cost_cap() -> None:
    async with FakeOpenAI() as fake:
        fake.default = answer()
        async with mesh(
            fake,
            dispatcher_approval_timeout_s=1.0,
            dispatcher_max_running_per_workspace=64,
            dispatcher_max_messages_per_minute_per_user=1000,
            dispatcher_max_messages_per_minute_per_workspace=1000,
        ) as (server, stub, dstub):
            world = await ctx_world(server, stub)
            # About ten answers of 200 micro-dollars.
            await add_budget(server, world.name, "daily", daily(2_000))
            conversations = [
                (await create_conversation(stub, world.editor, world.name)).name for _ in range(50)
            ]

            async def one(conversation: str) -> pb.Run | aio.AioRpcError:
                try:
                    sent = await send(dstub, world.editor, request(conversation, "hello"))
                except aio.AioRpcError as refused:
                    return refused
                return await finished(dstub, world.editor, sent.run.name)

            outcomes = await asyncio.gather(*(one(c) for c in conversations))
            used, held = await window(server, "daily")
            assert await holds(server) == 0

    succeeded = [o for o in outcomes if isinstance(o, pb.Run) and o.state == pb.RUN_STATE_SUCCEEDED]
    charged = sum(run.usage.cost_micros for run in succeeded)
    assert charged == used <= 2_000
    assert held == 0
    assert 8 <= len(succeeded) <= 10
    for outcome in outcomes:
        if isinstance(outcome, aio.AioRpcError):
            assert outcome.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert reason(outcome) == "ERROR_REASON_BUDGET_EXHAUSTED"
        elif outcome.state != pb.RUN_STATE_SUCCEEDED:
            # Paused at the cap until the approval timeout.
            assert outcome.state == pb.RUN_STATE_FAILED
            assert reason_of(outcome) == "ERROR_REASON_BUDGET_EXHAUSTED"


async def test_a_spent_budget_refuses_messages_with_when_it_resets() -> None:
    async with FakeOpenAI() as fake:
        fake.default = answer()
        async with mesh(fake) as (server, stub, dstub):
            world = await ctx_world(server, stub)
            await add_budget(server, world.name, "daily", daily(10_000))
            conversation = (await create_conversation(stub, world.editor, world.name)).name
            with tap(server) as events:
                sent = await send(dstub, world.editor, request(conversation, "hello"))
                run = await finished(dstub, world.editor, sent.run.name)
                assert run.state == pb.RUN_STATE_SUCCEEDED
                await set_cap(server, world.name, "daily", 200)
                with pytest.raises(aio.AioRpcError) as caught:
                    await send(dstub, world.editor, request(conversation, "again"))
                seen = events.take()

    error = caught.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason(error) == "ERROR_REASON_BUDGET_EXHAUSTED"
    quota = detail(error, error_details_pb2.QuotaFailure)
    assert [v.subject for v in quota.violations] == [f"{world.name}/budgets/daily"]
    info = detail(error, error_details_pb2.ErrorInfo)
    tomorrow = dt.datetime.now(dt.UTC).date() + dt.timedelta(days=1)
    assert info.metadata["reset_time"] in {
        f"{tomorrow.isoformat()}T00:00:00Z",
        f"{(tomorrow + dt.timedelta(days=1)).isoformat()}T00:00:00Z",  # midnight passed
    }
    alerts = [e.budget_alert for e in seen if e.type == events_pb2.EVENT_TYPE_BUDGET_ALERT]
    assert [a.kind for a in alerts] == [events_pb2.BUDGET_ALERT_KIND_MESSAGE_REFUSED]
    assert all(e.workspace == world.name for e in seen if e.HasField("budget_alert"))


async def test_thresholds_are_logged_once_as_usage_reaches_them() -> None:
    async with FakeOpenAI() as fake:
        fake.default = answer()
        async with mesh(fake) as (server, stub, dstub):
            world = await ctx_world(server, stub)
            await add_budget(server, world.name, "daily", daily(1_000, alert_thresholds=[30, 50]))
            conversation = (await create_conversation(stub, world.editor, world.name)).name
            with tap(server) as events:
                for text in ("one", "two", "three"):
                    sent = await send(dstub, world.editor, request(conversation, text))
                    await finished(dstub, world.editor, sent.run.name)
                seen = events.take()
    alerts = [e.budget_alert for e in seen if e.type == events_pb2.EVENT_TYPE_BUDGET_ALERT]
    # 200, 400 (30 reached), 600 (50 reached): each once.
    assert [(a.kind, a.percent, a.cap) for a in alerts] == [
        (events_pb2.BUDGET_ALERT_KIND_THRESHOLD, 30, "cost"),
        (events_pb2.BUDGET_ALERT_KIND_THRESHOLD, 50, "cost"),
    ]
    assert alerts[1].usage.cost_micros == 600


async def test_a_run_paused_at_its_cap_goes_on_when_the_cap_is_raised() -> None:
    async with FakeOpenAI() as fake:
        fake.default = answer()
        async with mesh(fake) as (server, stub, dstub):
            world = await ctx_world(server, stub)
            await add_budget(server, world.name, "daily", daily(150))
            conversation = (await create_conversation(stub, world.editor, world.name)).name
            with tap(server) as events:
                sent = await send(dstub, world.editor, request(conversation, "hello"))
                waiting = await paused(dstub, world.editor, sent.run.name)
                alerts = [e.budget_alert for e in events.take() if e.HasField("budget_alert")]
            assert not fake.requests  # nothing was asked of the model
            await set_cap(server, world.name, "daily", 10_000)
            run = await finished(dstub, world.editor, sent.run.name)
            used, held = await window(server, "daily")

    action = waiting.required_action
    assert action.budget.budgets == [f"{world.name}/budgets/daily"]
    assert action.budget.output_tokens == ANSWER
    assert action.budget.cost_micros > 2 * ANSWER
    assert action.HasField("expire_time")
    assert not waiting.HasField("deadline")
    assert [(a.kind, a.run) for a in alerts] == [
        (events_pb2.BUDGET_ALERT_KIND_RUN_PAUSED, sent.run.name)
    ]
    assert run.state == pb.RUN_STATE_SUCCEEDED
    assert run.usage.cost_micros == used == 2 * ANSWER
    assert held == 0


async def test_a_run_paused_at_its_cap_fails_after_the_approval_timeout() -> None:
    async with FakeOpenAI() as fake:
        fake.default = answer()
        async with mesh(fake, dispatcher_approval_timeout_s=0.3) as (server, stub, dstub):
            world = await ctx_world(server, stub)
            await add_budget(server, world.name, "daily", daily(150))
            conversation = (await create_conversation(stub, world.editor, world.name)).name
            sent = await send(dstub, world.editor, request(conversation, "hello"))
            run = await finished(dstub, world.editor, sent.run.name)
    assert run.state == pb.RUN_STATE_FAILED
    assert reason_of(run) == "ERROR_REASON_BUDGET_EXHAUSTED"
    assert "longer than 0.3 s" in run.error.message
    assert not fake.requests


async def test_a_cancel_that_a_wait_drops_still_ends_a_run_paused_at_its_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The paused run's wait drops the first cancel, as ``asyncio.wait_for`` does on
    Python 3.11 when what it waits for finishes as the cancel arrives. CancelRun
    still ends the run, and the conversation's next message runs (the run used to
    stay paused, answered as such, with the next runs queued behind it)."""
    real = spending._first
    waiting = asyncio.Event()
    dropped: list[BaseException] = []

    async def first(*waits: Any, timeout_s: float) -> None:
        waiting.set()
        try:
            # As long as it takes: the cancel can only arrive here.
            await real(*waits, timeout_s=3600.0)
        except asyncio.CancelledError as cancelled:
            if dropped:
                raise
            dropped.append(cancelled)  # dropped: the run waits on

    monkeypatch.setattr(spending, "_first", first)
    async with FakeOpenAI() as fake:
        fake.default = answer()
        async with mesh(fake) as (server, stub, dstub):
            world = await ctx_world(server, stub)
            await add_budget(server, world.name, "daily", daily(150))
            conversation = (await create_conversation(stub, world.editor, world.name)).name
            sent = await send(dstub, world.editor, request(conversation, "hello"))
            await paused(dstub, world.editor, sent.run.name)
            await asyncio.wait_for(waiting.wait(), TIMEOUT_S)
            cancelled = await cancel(dstub, world.editor, sent.run.name)
            after = await send(
                dstub, world.editor, request(conversation, "next", handler="handlers/echo")
            )
            ended = await finished(dstub, world.editor, after.run.name)
    assert dropped, "the wait never saw the cancel"
    assert cancelled.state == pb.RUN_STATE_CANCELLED
    assert ended.state == pb.RUN_STATE_SUCCEEDED
    assert not fake.requests


async def test_an_owner_allows_the_overdraft_or_fails_the_run() -> None:
    async with FakeOpenAI() as fake:
        fake.default = answer()
        async with mesh(fake) as (server, stub, dstub):
            world = await ctx_world(server, stub)
            await add_budget(server, world.name, "daily", daily(150))
            conversation = (await create_conversation(stub, world.editor, world.name)).name
            first = await send(dstub, world.editor, request(conversation, "hello"))
            await paused(dstub, world.editor, first.run.name)
            # Spending past a cap is an owner's decision.
            with pytest.raises(aio.AioRpcError) as denied:
                await resolve(dstub, world.editor, first.run.name, pb.BUDGET_DECISION_FAIL)
            with pytest.raises(aio.AioRpcError) as unknown:
                await resolve(dstub, world.owner, first.run.name, pb.BUDGET_DECISION_UNSPECIFIED)
            decided = await resolve(
                dstub, world.owner, first.run.name, pb.BUDGET_DECISION_ALLOW_OVERDRAFT
            )
            allowed = await finished(dstub, world.editor, first.run.name)
            with pytest.raises(aio.AioRpcError) as not_paused:
                await resolve(dstub, world.owner, first.run.name, pb.BUDGET_DECISION_FAIL)
            # Over the cap now: a new message is refused, so raise it a little for a second run.
            await set_cap(server, world.name, "daily", 300)
            second = await send(dstub, world.editor, request(conversation, "more"))
            await paused(dstub, world.editor, second.run.name)
            await resolve(dstub, world.owner, second.run.name, pb.BUDGET_DECISION_FAIL)
            failed = await finished(dstub, world.editor, second.run.name)

    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not_paused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert decided.required_action.budget.decision == pb.BUDGET_DECISION_ALLOW_OVERDRAFT
    assert decided.required_action.budget.decided_by == world.owner.name
    assert allowed.state == pb.RUN_STATE_SUCCEEDED
    assert allowed.usage.cost_micros == 2 * ANSWER
    assert failed.state == pb.RUN_STATE_FAILED
    assert reason_of(failed) == "ERROR_REASON_BUDGET_EXHAUSTED"
    assert world.owner.name in failed.error.message


async def test_a_cost_cap_refuses_a_model_without_a_price() -> None:
    async with FakeOpenAI() as fake:
        fake.default = answer()
        async with mesh(fake, llm_prices="{}") as (server, stub, dstub):
            world = await ctx_world(server, stub)
            await add_budget(server, world.name, "daily", daily(1_000))
            conversation = (await create_conversation(stub, world.editor, world.name)).name
            with pytest.raises(aio.AioRpcError) as caught:
                await send(dstub, world.editor, request(conversation, "hello"))
            # Token caps need no price.
            await add_budget(
                server,
                world.name,
                "tokens",
                pb.Budget(period=pb.BUDGET_PERIOD_TOTAL, output_token_limit=10_000),
            )
            async with server.shared.database.sessions() as session:
                row = await session.get(BudgetRow, (_id(world.name), "daily"))
                await session.delete(row)
                await session.commit()
            built(server, Dispatcher).budgets_changed(_id(world.name))
            sent = await send(dstub, world.editor, request(conversation, "hello"))
            run = await finished(dstub, world.editor, sent.run.name)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason(caught.value) == "ERROR_REASON_MODEL_NOT_PRICED"
    assert run.state == pb.RUN_STATE_SUCCEEDED
    assert run.usage.cost_micros == 0


async def test_a_dead_replicas_holds_are_charged_when_its_runs_are_taken_over(
    tmp_path: Path, postgres_url: str, redis_server: RedisServer
) -> None:
    gate = asyncio.Event()
    async with FakeOpenAI() as fake:
        fake.script(Reply.text("one two three", usage=(0, ANSWER), hold_after_chunks=1, hold=gate))
        fake.default = answer()
        a, b = await start_replicas(
            tmp_path,
            postgres_url,
            redis_server.url,
            dispatcher_recovery="fail",
            dispatcher_lease_s=1.0,
            **_settings(fake),
        )
        try:
            async with aio.insecure_channel(a.address) as on_a:
                stub, dstub = context_stub(on_a), dispatcher_stub(on_a)
                world = await ctx_world(a, stub)
                await add_budget(a, world.name, "daily", daily(10_000))
                conversation = (await create_conversation(stub, world.editor, world.name)).name
                sent = await send(dstub, world.editor, request(conversation, "hello"))
                call, _ = await until(dstub, world.editor, sent.run.name, "delta")
                call.cancel()
                assert await holds(a) == 1  # the model call in flight holds its worst case
                ledger = Ledger(b.shared.database)
                (budget,) = await ledger.applicable(_id(world.name))
                window_key = ledger.window_of(budget, "")
                held = await ledger.window(budget, window_key)
                assert held is not None
                assert held[0] == Amount()
                reserved = held[1]
                assert reserved.output_tokens > 0
                # Replica a "dies": its lease lapses and b takes its run over.
                Renewals(a).paused = True
                async with aio.insecure_channel(b.address) as on_b:
                    run = await finished(dispatcher_stub(on_b), world.editor, sent.run.name)
                assert run.state == pb.RUN_STATE_FAILED
                assert await holds(b) == 0
                # The call in flight may have been billed: charged at what it reserved,
                # and the failed run reports it.
                assert await ledger.window(budget, window_key) == (reserved, Amount())
                assert run.usage.cost_micros == reserved.cost_micros
                # The lost attempt, let go on, adds nothing when its call ends.
                gate.set()
                await fake.wait_requests(1)
                assert await ledger.window(budget, window_key) == (reserved, Amount())
        finally:
            await a.shutdown(grace=0)
            await b.shutdown(grace=0)


async def test_a_run_paused_at_its_cap_survives_a_restart_of_its_replica(tmp_path: Path) -> None:
    key_file = tmp_path / "k1.pem"
    key_file.write_bytes(private_key_pem(SigningKey.generate("k1")))
    async with FakeOpenAI() as fake:
        fake.default = answer()
        common = _settings(
            fake,
            database_url=fresh_database_url(),
            instance_id="budget-replica",
            signing_keys=(str(key_file),),
        )
        server, _ = await create_server(make_settings(**common))
        await server.start()
        async with aio.insecure_channel(server.address) as channel:
            stub, dstub = context_stub(channel), dispatcher_stub(channel)
            world = await ctx_world(server, stub)
            await add_budget(server, world.name, "daily", daily(150))
            conversation = (await create_conversation(stub, world.editor, world.name)).name
            sent = await send(dstub, world.editor, request(conversation, "hello"))
            before = await paused(dstub, world.editor, sent.run.name)
        await server.shutdown(grace=0)

        again, _ = await create_server(make_settings(**common))
        await again.start()
        try:
            async with aio.insecure_channel(again.address) as channel:
                dstub = dispatcher_stub(channel)
                after = await paused(dstub, world.editor, sent.run.name)
                await set_cap(again, world.name, "daily", 10_000)
                run = await finished(dstub, world.editor, sent.run.name)
        finally:
            await again.shutdown(grace=0)
    # The pause kept its deadline across the restart.
    assert after.required_action.expire_time == before.required_action.expire_time
    assert run.state == pb.RUN_STATE_SUCCEEDED
    assert len(fake.requests) == 1
