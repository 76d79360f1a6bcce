"""Budgets across hops with real processes: a caller Switchboard process whose runs call a
gRPC domain expert (tests/e2e/toolexpert.py, reporting a cost in ``HandleResult.usage``
within the ``x-switchboard-budget`` it was handed) and an A2A agent that is a second
Switchboard process (its assistant answers with the local model server and a price table,
so its runs cost something; registered by a card naming its gRPC interface). Both hops
are charged to the caller's runs and its budget, and stop at its cap: the A2A hop handed
less than its model call needs fails (the callee's run ends BUDGET_EXHAUSTED without
asking the model), and once the cap is spent the next message is refused.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any, Final

import grpc
import pytest
from a2a.types import a2a_pb2 as a2a
from a2a.types import a2a_pb2_grpc
from grpc import aio
from sqlalchemy import create_engine, insert, select

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.integration.v1 import integration_pb2 as ipb
from switchboard.dispatcher.handlers.handed import HEADER
from switchboard.platform.store.models import BudgetHoldRow, BudgetRow, BudgetWindowRow
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.expertkit import until_listed
from tests.e2e.procs import ServeProcess, shared_secrets
from tests.e2e.toolexpert import ToolExpert
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.infra.cardserver import card_server
from tests.kits.authkit import reason
from tests.kits.authkit import register as register_user
from tests.kits.contextkit import (
    Caller,
    World,
    context_stub,
    create_conversation,
    create_workspace,
)
from tests.kits.dispatchkit import dispatcher_stub, finished, reason_of, request, send
from tests.kits.integrationkit import create, integration_stub

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

#: Dollars per million tokens: 1 micro-dollar a prompt token, 2 an answer token.
PRICES: Final = {"m-1": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}
ANSWER: Final = 100
#: One answer of the callee's model: 200 micro-dollars (about 215 reserved with its prompt).
MODEL_COST: Final = 2 * ANSWER
#: What the expert reports for a call, within what it was handed.
EXPERT_COST: Final = 300
#: The caller's daily cap: the expert, one answer of the callee, then 100 left.
CAP: Final = EXPERT_COST + MODEL_COST + 100


async def _me(channel: aio.Channel, name: str) -> World:
    signed = await register_user(channel)
    me = Caller(signed.user.name.removeprefix("users/"), signed.tokens.access_token)
    workspace = await create_workspace(context_stub(channel), me, name)
    return World(workspace, me, me, me, me)


def _database(process: ServeProcess) -> str:
    return process.env["SWITCHBOARD_DATABASE_URL"].replace("sqlite+aiosqlite", "sqlite")


def _add_budget(process: ServeProcess, workspace: str) -> None:
    """A daily cost budget on the caller's workspace, written as the budget catalog writes it
    (runs read their budgets when they start)."""
    now = dt.datetime.now(dt.UTC)
    budget = pb.Budget(display_name="Daily", period=pb.BUDGET_PERIOD_DAY, cost_limit_micros=CAP)
    engine = create_engine(_database(process))
    try:
        with engine.begin() as db:
            db.execute(
                insert(BudgetRow).values(
                    workspace_id=workspace.removeprefix("workspaces/"),
                    id="daily",
                    scope_kind="workspace",
                    scope_id="",
                    data=budget.SerializeToString(),
                    created_at=now,
                    updated_at=now,
                )
            )
    finally:
        engine.dispose()


def _ledger(process: ServeProcess) -> tuple[int, int, int]:
    """``(cost used, cost held, hold rows)`` of the caller's budget."""
    engine = create_engine(_database(process))
    try:
        with engine.connect() as db:
            rows = db.execute(select(BudgetWindowRow.cost_used, BudgetWindowRow.cost_held)).all()
            holds = db.execute(select(BudgetHoldRow.id)).all()
    finally:
        engine.dispose()
    return sum(r[0] for r in rows), sum(r[1] for r in rows), len(holds)


async def _callee_card(channel: aio.Channel, world: World) -> a2a.AgentCard:
    await dispatcher_stub(channel).CreateAssistant(
        pb.CreateAssistantRequest(
            parent=world.name,
            assistant_id="priced",
            assistant=pb.Assistant(display_name="Priced", handler="handlers/llm"),
        ),
        metadata=world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    tenant = f"{world.name.removeprefix('workspaces/')}.priced"
    stub: Any = a2a_pb2_grpc.A2AServiceStub(channel)  # type: ignore[no-untyped-call]
    card: a2a.AgentCard = await stub.GetExtendedAgentCard(
        a2a.GetExtendedAgentCardRequest(tenant=tenant),
        metadata=world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    return card


async def test_both_hops_are_charged_to_the_callers_run_and_stop_at_its_cap(
    tmp_path: Path,
) -> None:
    expert = ToolExpert("spend", interactive=False, cost_micros=EXPERT_COST)
    async with FakeOpenAI() as fake, expert:
        fake.default = Reply.text("fine", usage=(0, ANSWER))
        callee_env = {
            **shared_secrets(tmp_path),
            "SWITCHBOARD_LLM_BASE_URL": fake.url,
            "SWITCHBOARD_LLM_MODEL": "m-1",
            "SWITCHBOARD_LLM_PRICES": json.dumps(PRICES),
            "SWITCHBOARD_LLM_MAX_OUTPUT_TOKENS": str(ANSWER),
            # Each call needs its whole max_tokens (the fake reports ANSWER tokens however
            # few it was asked for): a step fits or pauses, never made with fewer near the cap.
            "SWITCHBOARD_LLM_MIN_OUTPUT_TOKENS": str(ANSWER),
            "SWITCHBOARD_LLM_MAX_RETRIES": "0",
        }
        caller_env = {
            **shared_secrets(tmp_path),
            "SWITCHBOARD_DISPATCHER_REMOTE_HANDLERS": f"spend={expert.address}",
            "SWITCHBOARD_EGRESS_ALLOW_LOOPBACK": "true",
            "SWITCHBOARD_INTEGRATION_PROBE_INTERVAL_S": "3600",
        }
        with (
            ServeProcess(env=callee_env) as callee_process,
            ServeProcess(env=caller_env) as caller_process,
        ):
            async with (
                aio.insecure_channel(callee_process.address) as far,
                aio.insecure_channel(caller_process.address) as near,
            ):
                callee = await _me(far, "Callee")
                card = await _callee_card(far, callee)
                caller = await _me(near, "Caller")
                dstub = dispatcher_stub(near)
                async with card_server(card) as card_url:
                    await create(
                        integration_stub(near),
                        caller.owner,
                        caller.name,
                        ipb.Integration(
                            kind=ipb.INTEGRATION_KIND_A2A_AGENT,
                            display_name="Priced agent",
                            endpoint=card_url,
                            credential=callee.owner.token,
                        ),
                        integration_id="priced",
                    )
                    await until_listed(dstub, caller, "handlers/priced", available=True)
                    _add_budget(caller_process, caller.name)
                    conversation = (
                        await create_conversation(context_stub(near), caller.editor, caller.name)
                    ).name

                    async def run(text: str, handler: str) -> pb.Run:
                        sent = await send(
                            dstub, caller.editor, request(conversation, text, handler=handler)
                        )
                        return await finished(dstub, caller.editor, sent.run.name)

                    to_expert = await run("first", "handlers/spend")
                    to_agent = await run("second", "handlers/priced")
                    short = await run("third", "handlers/priced")
                    last = await run("fourth", "handlers/spend")
                    with pytest.raises(aio.AioRpcError) as refused:
                        await send(
                            dstub,
                            caller.editor,
                            request(conversation, "fifth", handler="handlers/spend"),
                        )
                handed = [
                    (await expert.call(r.name)).metadata.get(HEADER) for r in (to_expert, last)
                ]
                callee_runs = await dispatcher_stub(far).ListRuns(
                    pb.ListRunsRequest(parent=callee.name),
                    metadata=callee.owner.md,
                    timeout=CALL_DEADLINE_S,
                )
            used, held, holds = _ledger(caller_process)

    # The expert was handed all of the cap, then what was left; it honoured both.
    assert handed == [f"cost_micros={CAP}", "cost_micros=100"]
    assert to_expert.state == pb.RUN_STATE_SUCCEEDED, to_expert.error.message
    assert to_expert.usage.cost_micros == EXPERT_COST
    # The A2A hop: the callee's run cost what its model call cost, and so did the caller's.
    assert to_agent.state == pb.RUN_STATE_SUCCEEDED, to_agent.error.message
    assert to_agent.usage.cost_micros == MODEL_COST
    # Handed 100, less than the callee's model call needs: its run failed at the handed
    # cap before asking the model, and the hop with it.
    assert short.state == pb.RUN_STATE_FAILED
    assert "failed the task" in short.error.message
    assert last.state == pb.RUN_STATE_SUCCEEDED, last.error.message
    assert last.usage.cost_micros == 100
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason(refused.value) == "ERROR_REASON_BUDGET_EXHAUSTED"
    # Everything charged is in the caller's budget, never past its cap, nothing left held.
    charged = sum(r.usage.cost_micros for r in (to_expert, to_agent, short, last))
    assert used == charged == CAP
    assert (held, holds) == (0, 0)
    outcomes = sorted(
        (pb.RunState.Name(r.state), reason_of(r), r.usage.cost_micros) for r in callee_runs.runs
    )
    assert outcomes == [
        ("RUN_STATE_FAILED", "ERROR_REASON_BUDGET_EXHAUSTED", 0),
        ("RUN_STATE_SUCCEEDED", "", MODEL_COST),
    ]
    assert len(fake.requests) == 1  # the model answered only the hop that fit
