"""Budgets through DispatcherService, end to end: runs against their budgets in one process
(SQLite unless a test says otherwise) with the local model server
(tests/fakes/openai_server.py) and a price table; ``spending.py`` and ``room.py`` seen from
the service (docs/budgets.md).

Runs against budgets: concurrent runs never charge past a cost cap, a spent budget refuses
messages with the reason and when it resets, a run whose next step does not fit pauses
(REQUIRES_ACTION with a budget action) and goes on when the cap is raised, when an owner
allows the overdraft, or fails (an owner's FAIL, or the approval timeout); a cost cap and a
model without a price refuse the message. A replica that takes a dead one's runs over
releases what they held (two replicas on PostgreSQL and Redis).

Near the cap, budgets a person can use (issue 67): a model call is made with
``max_tokens`` lowered to what its budgets have room for, and says so on the run, in its
usage and in QueryUsage; a run pauses only when not even a useful answer fits, and the
pause and the error say what the call needed and how much of which budget was left. The
local model server's requests show the ``max_tokens`` each call was made with.

Across hops (docs/budgets.md, "Across hops"). The callee side: a run started with
``x-switchboard-budget`` on SendMessage holds it as one more cap (a step it has no room for
ends the run FAILED with BUDGET_EXHAUSTED before the model is asked; nothing left of it
refuses the message; a malformed one is INVALID_ARGUMENT). The caller side: a run whose
handler is a gRPC domain expert hands it what is left of the run's budgets and is charged
what it reports; one whose handler is an A2A agent (here this very deployment's own front
door, reached through a card served over HTTP, in another workspace) hands it the budget
extension, and the agent's run spends within it and reports its usage back, which the
caller's run and budget are charged. tests/dispatcher/budgets/test_budget_hops.py has the same with
separate processes.

A2A callers at a budget's cap: A2A has no error of its own for a spent budget, so a
message refused by one keeps only Switchboard's (RESOURCE_EXHAUSTED, BUDGET_EXHAUSTED, a
QuotaFailure naming the budget, when it resets) as rate limits and quotas do, and its text
names the budget in the caller's terms.

A run with tools against a budget: a cap lowered while the run waits for a person's
approval holds for the run's next model call, which pauses at the cap (the approval's pause
and the budget's follow each other), and goes on when the cap is raised again. Runs on the
reference MCP server (tests/dispatcher/tools/test_tool_runs.py's setting).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from a2a.types import a2a_pb2 as a2a
from a2a.types import a2a_pb2_grpc
from google.rpc import error_details_pb2
from grpc import aio
from sqlalchemy import select, update

from switchboard.a2a.errors import DOMAIN
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.api.integration.v1 import integration_pb2 as ipb
from switchboard.context.text.tokencount import ApproxTokenCounter
from switchboard.dispatcher.budgets import spending
from switchboard.dispatcher.budgets.ledger import Amount, Hold, Ledger
from switchboard.dispatcher.handlers.handed import BUDGET_EXTENSION, HEADER
from switchboard.dispatcher.llm.usage import Tally
from switchboard.dispatcher.service import Dispatcher
from switchboard.mesh import create_server
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.security.credentials.accesstokens import SigningKey, private_key_pem
from switchboard.platform.store.models import BudgetHoldRow, BudgetRow, BudgetWindowRow
from tests.a2a.test_a2a import request as a2a_request
from tests.a2a.test_a2a import running_agent, stub
from tests.conftest import CALL_DEADLINE_S, built, fresh_database_url, make_settings
from tests.dispatcher.tools.test_tool_runs import (
    SUM,
    _decide,
    _paused,
    _send,
    answer_with_tool_output,
    ask,
    tool_mesh,
)
from tests.e2e.expertkit import until_listed
from tests.e2e.toolexpert import ToolExpert
from tests.fakes.openai_server import FakeOpenAI, Received, Reply
from tests.infra.cardserver import card_server
from tests.infra.mcpeverything import EverythingServer
from tests.infra.redis import RedisServer
from tests.kits.authkit import detail, reason, reasons
from tests.kits.contextkit import Caller, World, context_stub, create_conversation, ctx_world, tap
from tests.kits.contextkit import Stub as CStub
from tests.kits.contextkit import violations as fields
from tests.kits.dispatchkit import (
    Renewals,
    cancel,
    dispatcher_stub,
    finished,
    limited,
    read_until,
    reason_of,
    request,
    send,
    start_replicas,
    until,
)
from tests.kits.dispatchkit import Stub as DStub
from tests.kits.integrationkit import create, integration_stub

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
        # fewer (the tests below that lower it), so a step either fits or pauses.
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
        timeout=CALL_DEADLINE_S,
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
            await asyncio.wait_for(waiting.wait(), CALL_DEADLINE_S)
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


# -- near the cap: a model call lowered to what fits -----------------------------------------

#: The server's ``max_tokens`` (SWITCHBOARD_LLM_MAX_OUTPUT_TOKENS's default).
MAX_TOKENS = 1024
#: The fewest answer tokens a call is lowered to (SWITCHBOARD_LLM_MIN_OUTPUT_TOKENS's default).
LEAST = 64


@asynccontextmanager
async def fitted(
    fake: FakeOpenAI, **overrides: Any
) -> AsyncIterator[tuple[SwitchboardServer, CStub, DStub, World]]:
    fake.default = Reply.text("fine thanks")
    async with limited(
        llm_base_url=fake.url,
        llm_model="m-1",
        llm_prices=json.dumps(PRICES),
        llm_max_retries=0,
        **overrides,
    ) as (server, stub, dstub):
        yield server, stub, dstub, await ctx_world(server, stub)


def tokens_cap(total: int) -> pb.Budget:
    return pb.Budget(display_name="Daily", period=pb.BUDGET_PERIOD_DAY, total_token_limit=total)


def prompt_of(received: Received) -> int:
    """The prompt's tokens as the handler counts them for its reservation."""
    body = received.body
    return Tally(ApproxTokenCounter().count).prompt_tokens(body["messages"], body.get("tools"))


async def send_with(
    dstub: DStub, world: World, conversation: str, text: str, handed: str = ""
) -> pb.SendMessageResponse:
    metadata = (*world.editor.md, (HEADER, handed)) if handed else world.editor.md
    return await dstub.SendMessage(
        request(conversation, text), metadata=metadata, timeout=CALL_DEADLINE_S
    )


async def query_usage(dstub: DStub, world: World) -> pb.QueryUsageResponse:
    return await dstub.QueryUsage(
        pb.QueryUsageRequest(
            parent=world.name, end_time=_tomorrow(), group_by=[pb.USAGE_DIMENSION_MODEL]
        ),
        metadata=world.viewer.md,
        timeout=CALL_DEADLINE_S,
    )


def _tomorrow() -> Any:
    from google.protobuf import timestamp_pb2

    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(dt.datetime.now(dt.UTC) + dt.timedelta(days=1))
    return stamp


@pytest.mark.parametrize("where", ["stored", "handed"])
async def test_hello_under_a_500_token_day_is_answered_in_what_is_left(where: str) -> None:
    async with FakeOpenAI() as fake, fitted(fake) as (server, stub, dstub, world):
        conversation = (await create_conversation(stub, world.editor, world.name)).name
        if where == "stored":
            await add_budget(server, world.name, "daily", tokens_cap(500))
            sent = await send_with(dstub, world, conversation, "hello")
            cap = f"{world.name}/budgets/daily"
        else:
            sent = await send_with(dstub, world, conversation, "hello", "total_tokens=500")
            cap = HEADER
        run = await finished(dstub, world.editor, sent.run.name)
        [asked] = fake.requests
        rows = await query_usage(dstub, world)

    assert run.state == pb.RUN_STATE_SUCCEEDED, run.error.message
    prompt = prompt_of(asked)
    # The call's prompt and 1,024 answer tokens did not fit in 500: it was made with
    # what did (a useful answer's worth), not paused.
    assert asked.body["max_tokens"] == 500 - prompt
    assert LEAST <= 500 - prompt < MAX_TOKENS
    assert run.progress.stage == (
        f"max_tokens lowered from 1,024 to {500 - prompt} to fit the budget "
        f"({cap} has 500 total tokens left)"
    )
    assert run.usage.budget_lowered_calls == 1
    assert run.usage.lowest_max_tokens == 500 - prompt
    assert [(r.model, r.run_count, r.budget_lowered_runs) for r in rows.rows] == [
        ("primary/m-1", 1, 1)
    ]


async def test_a_cost_cap_lowers_max_tokens_to_what_it_can_pay_for() -> None:
    async with FakeOpenAI() as fake, fitted(fake) as (server, stub, dstub, world):
        conversation = (await create_conversation(stub, world.editor, world.name)).name
        budget = pb.Budget(display_name="Daily", period=pb.BUDGET_PERIOD_DAY, cost_limit_micros=500)
        await add_budget(server, world.name, "daily", budget)
        sent = await send_with(dstub, world, conversation, "hello")
        run = await finished(dstub, world.editor, sent.run.name)
        [asked] = fake.requests
    assert run.state == pb.RUN_STATE_SUCCEEDED, run.error.message
    prompt = prompt_of(asked)
    # 1 micro-dollar a prompt token, 2 an answer token: what 500 pays for.
    assert asked.body["max_tokens"] == (500 - prompt) // 2
    assert f"{world.name}/budgets/daily has 500 micro-units of cost left" in run.progress.stage


async def test_a_call_is_made_whole_when_it_fits() -> None:
    async with FakeOpenAI() as fake, fitted(fake) as (server, stub, dstub, world):
        conversation = (await create_conversation(stub, world.editor, world.name)).name
        await add_budget(server, world.name, "daily", tokens_cap(100_000))
        sent = await send_with(dstub, world, conversation, "hello")
        run = await finished(dstub, world.editor, sent.run.name)
        [asked] = fake.requests
        rows = await query_usage(dstub, world)
    assert run.state == pb.RUN_STATE_SUCCEEDED
    assert asked.body["max_tokens"] == MAX_TOKENS
    assert not run.HasField("progress")
    assert run.usage.budget_lowered_calls == 0
    assert [r.budget_lowered_runs for r in rows.rows] == [0]


async def test_no_room_for_a_useful_answer_pauses_saying_what_the_call_needs() -> None:
    async with (
        FakeOpenAI() as fake,
        fitted(fake, dispatcher_approval_timeout_s=5.0) as (server, stub, dstub, world),
    ):
        conversation = (await create_conversation(stub, world.editor, world.name)).name
        await add_budget(server, world.name, "daily", tokens_cap(50))
        name = f"{world.name}/budgets/daily"
        sent = await send_with(dstub, world, conversation, "hello")
        waiting = await paused(dstub, world.editor, sent.run.name)
        assert not fake.requests  # nothing was asked of the model
        action = waiting.required_action.budget
        prompt = action.input_tokens
        # Room for the prompt and some answer, but less than a useful one.
        assert prompt + 1 <= 50 < prompt + LEAST
        # Raised a little: the call goes on with what fits then.
        await change_budget(server, world.name, "daily", total_token_limit=400)
        run = await finished(dstub, world.editor, sent.run.name)
        [asked] = fake.requests

    assert list(action.budgets) == [name]
    assert (action.output_tokens, action.min_output_tokens) == (MAX_TOKENS, LEAST)
    assert action.description == (
        f"the model call needs at least {prompt + LEAST} tokens ({prompt} of prompt and "
        f"{LEAST} of answer): {name} has 50 of its 50 total tokens left"
    )
    assert run.state == pb.RUN_STATE_SUCCEEDED, run.error.message
    assert asked.body["max_tokens"] == 400 - prompt
    assert run.progress.stage.startswith(f"max_tokens lowered from 1,024 to {400 - prompt} ")
    assert run.usage.budget_lowered_calls == 1


async def test_a_run_failed_at_its_cap_says_what_the_call_needed() -> None:
    async with (
        FakeOpenAI() as fake,
        fitted(fake, dispatcher_approval_timeout_s=0.3) as (server, stub, dstub, world),
    ):
        conversation = (await create_conversation(stub, world.editor, world.name)).name
        await add_budget(server, world.name, "daily", tokens_cap(50))
        sent = await send_with(dstub, world, conversation, "hello")
        run = await finished(dstub, world.editor, sent.run.name)
        assert not fake.requests
        # A handed cap has no owner to raise it: the run ends at once, saying so.
        handed = await send_with(
            dstub,
            world,
            (await create_conversation(stub, world.editor, world.name)).name,
            "hello",
            "total_tokens=50",
        )
        short = await finished(dstub, world.editor, handed.run.name)

    assert run.state == pb.RUN_STATE_FAILED
    assert reason_of(run) == "ERROR_REASON_BUDGET_EXHAUSTED"
    message = run.error.message
    assert message.startswith(
        "the run waited at its cap longer than 0.3 s: 1 budget that applies has no room left "
        f"({world.name}/budgets/daily); the model call needs at least "
    ), message
    assert f"{world.name}/budgets/daily has 50 of its 50 total tokens left" in message
    assert short.state == pb.RUN_STATE_FAILED
    assert reason_of(short) == "ERROR_REASON_BUDGET_EXHAUSTED"
    assert "total_tokens 50 left" in short.error.message


# -- across hops -----------------------------------------------------------------------------

#: What one answer of the local model costs (ANSWER output tokens at 2 micro-dollars each).
COST = 2 * ANSWER


async def send_handed(
    dstub: DStub, caller: Caller, req: pb.SendMessageRequest, handed: str
) -> pb.SendMessageResponse:
    return await dstub.SendMessage(
        req, metadata=(*caller.md, (HEADER, handed)), timeout=CALL_DEADLINE_S
    )


# -- the callee: a budget handed to SendMessage ----------------------------------------------


async def test_a_handed_budget_caps_the_run_it_starts() -> None:
    async with FakeOpenAI() as fake:
        fake.default = answer()
        async with mesh(fake) as (server, stub, dstub):
            world = await ctx_world(server, stub)
            conversation = (await create_conversation(stub, world.editor, world.name)).name
            # Room for the step (about 215 reserved), spent within it.
            sent = await send_handed(
                dstub, world.editor, request(conversation, "hello"), "cost_micros=1000"
            )
            done = await finished(dstub, world.editor, sent.run.name)
            asked = len(fake.requests)
            # Less than the step needs: no owner can raise a handed cap, so the run ends.
            short = await send_handed(
                dstub, world.editor, request(conversation, "again"), f"cost_micros={COST}"
            )
            failed = await finished(dstub, world.editor, short.run.name)
            assert len(fake.requests) == asked  # the model was not asked
            # A token cap is handed as well as a cost cap.
            tokens = await send_handed(
                dstub, world.editor, request(conversation, "tokens"), "output_tokens=10"
            )
            also_failed = await finished(dstub, world.editor, tokens.run.name)
            assert await holds(server) == 0

    assert done.state == pb.RUN_STATE_SUCCEEDED, done.error.message
    assert done.usage.cost_micros == COST
    assert failed.state == pb.RUN_STATE_FAILED
    assert reason_of(failed) == "ERROR_REASON_BUDGET_EXHAUSTED"
    assert "handed over" in failed.error.message
    assert also_failed.state == pb.RUN_STATE_FAILED
    assert reason_of(also_failed) == "ERROR_REASON_BUDGET_EXHAUSTED"


async def test_nothing_left_refuses_and_a_malformed_budget_is_invalid() -> None:
    async with FakeOpenAI() as fake:
        fake.default = answer()
        async with mesh(fake) as (server, stub, dstub):
            world = await ctx_world(server, stub)
            conversation = (await create_conversation(stub, world.editor, world.name)).name
            with pytest.raises(aio.AioRpcError) as empty:
                await send_handed(
                    dstub, world.editor, request(conversation, "hi"), "cost_micros=0;input_tokens=9"
                )
            with pytest.raises(aio.AioRpcError) as negative:
                await send_handed(
                    dstub, world.editor, request(conversation, "hi"), "cost_micros=-5"
                )
            with pytest.raises(aio.AioRpcError) as unknown:
                await send_handed(dstub, world.editor, request(conversation, "hi"), "dollars=5")
            assert not fake.requests

    assert empty.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason(empty.value) == "ERROR_REASON_BUDGET_EXHAUSTED"
    quota = detail(empty.value, error_details_pb2.QuotaFailure)
    assert [v.subject for v in quota.violations] == [HEADER]
    assert negative.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fields(negative.value) == [f"{HEADER}.cost_micros"]
    assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fields(unknown.value) == [HEADER]


# -- the caller: a gRPC domain expert --------------------------------------------------------


async def test_a_grpc_expert_is_handed_what_is_left_and_charged_what_it_reports() -> None:
    expert = ToolExpert("spend", interactive=False, cost_micros=300)
    async with (
        FakeOpenAI() as fake,
        expert as ex,
        mesh(fake, dispatcher_remote_handlers=f"spend={ex.address}") as (server, stub, dstub),
    ):
        world = await ctx_world(server, stub)
        # Until its channel connects, an expert is not known to be reachable, and a
        # message naming it is UNAVAILABLE at once (a slow start's capability check).
        await until_listed(dstub, world, "handlers/spend", available=True)
        await add_budget(server, world.name, "daily", daily(1_000))
        conversation = (await create_conversation(stub, world.editor, world.name)).name
        runs = []
        for text in ("one", "two", "three", "four"):
            sent = await send(
                dstub, world.editor, request(conversation, text, handler="handlers/spend")
            )
            runs.append(await finished(dstub, world.editor, sent.run.name))
        handed = [(await ex.call(run.name)).metadata.get(HEADER) for run in runs]
        # All of it spent: the next message is refused before anything is stored.
        with pytest.raises(aio.AioRpcError) as refused:
            await send(dstub, world.editor, request(conversation, "five", handler="handlers/spend"))
        used, held = await window(server, "daily")
        assert await holds(server) == 0

    assert handed == [
        "cost_micros=1000",
        "cost_micros=700",
        "cost_micros=400",
        "cost_micros=100",
    ]
    assert [run.state for run in runs] == [pb.RUN_STATE_SUCCEEDED] * 4
    assert [run.usage.cost_micros for run in runs] == [300, 300, 300, 100]
    assert used == 1_000
    assert held == 0
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason(refused.value) == "ERROR_REASON_BUDGET_EXHAUSTED"


async def test_a_run_without_a_budget_hands_none() -> None:
    expert = ToolExpert("spend", interactive=False, cost_micros=5)
    async with (
        FakeOpenAI() as fake,
        expert as ex,
        mesh(fake, dispatcher_remote_handlers=f"spend={ex.address}") as (server, stub, dstub),
    ):
        world = await ctx_world(server, stub)
        await until_listed(dstub, world, "handlers/spend", available=True)
        conversation = (await create_conversation(stub, world.editor, world.name)).name
        sent = await send(
            dstub, world.editor, request(conversation, "hi", handler="handlers/spend")
        )
        run = await finished(dstub, world.editor, sent.run.name)
        seen = await ex.call(run.name)
    assert HEADER not in seen.metadata
    assert run.usage.cost_micros == 5  # still the run's usage


# -- the caller and the callee: an A2A agent that is a Switchboard deployment ----------------


async def callee_card(channel: aio.Channel, world: World, assistant_id: str) -> a2a.AgentCard:
    """An assistant of ``world`` that answers with the model, and its (extended) card."""
    await dispatcher_stub(channel).CreateAssistant(
        pb.CreateAssistantRequest(
            parent=world.name,
            assistant_id=assistant_id,
            assistant=pb.Assistant(display_name="Priced", handler="handlers/llm"),
        ),
        metadata=world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    tenant = f"{world.name.removeprefix('workspaces/')}.{assistant_id}"
    a2a_stub: Any = a2a_pb2_grpc.A2AServiceStub(channel)  # type: ignore[no-untyped-call]
    card: a2a.AgentCard = await a2a_stub.GetExtendedAgentCard(
        a2a.GetExtendedAgentCardRequest(tenant=tenant),
        metadata=world.viewer.md,
        timeout=CALL_DEADLINE_S,
    )
    return card


async def test_an_a2a_hop_to_a_switchboard_deployment_spends_within_what_was_handed() -> None:
    async with FakeOpenAI() as fake:
        fake.default = answer()
        async with mesh(fake, egress_allow_loopback=True, integration_probe_interval_s=0) as (
            server,
            stub,
            dstub,
        ):
            channel = aio.insecure_channel(server.address)
            try:
                caller = await ctx_world(server, stub)
                callee = await ctx_world(server, stub)
                card = await callee_card(channel, callee, "priced")
                assert BUDGET_EXTENSION in {e.uri for e in card.capabilities.extensions}
                async with card_server(card) as card_url:
                    await create(
                        integration_stub(channel),
                        caller.owner,
                        caller.name,
                        ipb.Integration(
                            kind=ipb.INTEGRATION_KIND_A2A_AGENT,
                            display_name="Priced agent",
                            endpoint=card_url,
                            credential=callee.editor.token,
                        ),
                        integration_id="priced",
                    )
                    await until_listed(dstub, caller, "handlers/priced", available=True)
                    # Room for two answers of the callee's model, not three.
                    await add_budget(server, caller.name, "daily", daily(COST * 2 + COST // 2))
                    conversation = (
                        await create_conversation(stub, caller.editor, caller.name)
                    ).name
                    runs = []
                    for text in ("one", "two", "three"):
                        sent = await send(
                            dstub,
                            caller.editor,
                            request(conversation, text, handler="handlers/priced"),
                        )
                        runs.append(await finished(dstub, caller.editor, sent.run.name))
                    used, held = await window(server, "daily")
                    left = await holds(server)
                    callee_runs = await _runs_of(dstub, callee)
            finally:
                await channel.close(None)

    one, two, three = runs
    assert one.state == pb.RUN_STATE_SUCCEEDED, one.error.message
    assert two.state == pb.RUN_STATE_SUCCEEDED, two.error.message
    # The callee's own run was charged the model's cost, and the caller's run the same.
    assert one.usage.cost_micros == two.usage.cost_micros == COST
    # Half an answer was left: the callee's step did not fit in what it was handed, so its
    # run failed (nothing spent) and so did the hop.
    assert three.state == pb.RUN_STATE_FAILED
    assert "failed the task" in three.error.message
    assert used == 2 * COST
    assert held == 0
    assert left == 0
    states = sorted(pb.RunState.Name(run.state) for run in callee_runs)
    assert states == ["RUN_STATE_FAILED", "RUN_STATE_SUCCEEDED", "RUN_STATE_SUCCEEDED"]
    [refused] = [run for run in callee_runs if run.state == pb.RUN_STATE_FAILED]
    assert reason_of(refused) == "ERROR_REASON_BUDGET_EXHAUSTED"
    # The model answered only the two that fit.
    assert len(fake.requests) == 2


async def _runs_of(dstub: DStub, world: World) -> list[pb.Run]:
    listed = await dstub.ListRuns(
        pb.ListRunsRequest(parent=world.name), metadata=world.owner.md, timeout=CALL_DEADLINE_S
    )
    return list(listed.runs)


# -- A2A callers at a cap --------------------------------------------------------------------


async def test_a_spent_budget_refuses_an_a2a_message_with_switchboards_reason() -> None:
    async with running_agent() as agent:
        world = agent.world
        workspace_id = world.name.removeprefix("workspaces/")
        now = dt.datetime.now(dt.UTC)
        budget = pb.Budget(display_name="Daily", period=pb.BUDGET_PERIOD_DAY, cost_limit_micros=5)
        database = agent.server.shared.database
        async with database.sessions() as session:
            session.add(
                BudgetRow(
                    workspace_id=workspace_id,
                    id="daily",
                    scope_kind="workspace",
                    scope_id="",
                    data=budget.SerializeToString(),
                    created_at=now,
                    updated_at=now,
                )
            )
            await session.commit()
        ledger = Ledger(database)
        hold = await ledger.reserve(
            await ledger.applicable(workspace_id), "spent", Amount(cost_micros=5)
        )
        assert isinstance(hold, Hold)
        await ledger.settle(hold, Amount(cost_micros=5))
        async with aio.insecure_channel(agent.server.address) as channel:
            with pytest.raises(aio.AioRpcError) as caught:
                await stub(channel).SendMessage(
                    a2a_request("hello", agent.tenant),
                    metadata=world.editor.md,
                    timeout=CALL_DEADLINE_S,
                )
    error = caught.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    found = reasons(error)
    assert [reason for _, reason in found] == ["ERROR_REASON_BUDGET_EXHAUSTED"]
    assert all(domain != DOMAIN for domain, _ in found)
    quota = detail(error, error_details_pb2.QuotaFailure)
    assert [v.subject for v in quota.violations] == [f"{world.name}/budgets/daily"]
    assert f"budget daily of the agent's workspace {workspace_id}" in (error.details() or "")


# -- a run with tools ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def everything() -> Iterator[EverythingServer]:
    with EverythingServer() as server:
        yield server


async def test_a_cap_lowered_during_an_approval_holds_for_the_next_model_call(
    everything: EverythingServer,
) -> None:
    async with tool_mesh(everything, approval=("get-sum",), llm_max_output_tokens=100) as tools:
        tools.fake.script(
            Reply.tool_calls([(SUM, {"a": 40, "b": 2}, "c1")], usage=(10, 10)),
            answer_with_tool_output,
        )
        world = tools.world
        await add_budget(tools.server, world.name, "daily", daily(100_000))
        run = await _send(tools, ask(tools, "40 + 2?"))
        call, _ = await _paused(tools, run.name)
        call.cancel()
        # The first call settled at 10 + 20 micro-dollars; the next asks more than is left.
        await set_cap(tools.server, world.name, "daily", 100)
        await _decide(tools, run.name, "c1", pb.TOOL_APPROVAL_DECISION_APPROVE)
        watch = tools.dstub.WatchRun(
            pb.WatchRunRequest(name=run.name), metadata=world.editor.md, timeout=CALL_DEADLINE_S
        )
        seen: list[pb.RunUpdate] = []
        await read_until(
            watch,
            seen,
            lambda updates: updates[-1].state_change.run.required_action.HasField("budget"),
        )
        watch.cancel()
        at_cap = seen[-1].state_change.run
        await set_cap(tools.server, world.name, "daily", 100_000)
        ended = await finished(tools.dstub, world.editor, run.name)
        used, held = await window(tools.server, "daily")

    assert at_cap.state == pb.RUN_STATE_REQUIRES_ACTION
    assert not at_cap.required_action.tool_calls
    assert at_cap.required_action.budget.output_tokens == 100
    assert ended.state == pb.RUN_STATE_SUCCEEDED
    assert ended.usage.cost_micros == used == 10 + 2 * 10 + 200 + 2 * 20
    assert held == 0
