"""A2A callers at a budget's cap: A2A has no error of its own for a spent budget, so a
message refused by one keeps only Switchboard's (RESOURCE_EXHAUSTED, BUDGET_EXHAUSTED,
a QuotaFailure naming the budget, when it resets) as rate limits and quotas do, and
its text names the budget in the caller's terms."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc import aio

from switchboard.a2a.errors import DOMAIN
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.budgets.ledger import Amount, Hold, Ledger
from switchboard.platform.store.models import BudgetRow
from tests.a2a.test_a2a import request, running_agent, stub
from tests.kits.authkit import detail, reasons
from tests.kits.contextkit import TIMEOUT_S

pytestmark = pytest.mark.service


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
                    request("hello", agent.tenant), metadata=world.editor.md, timeout=TIMEOUT_S
                )
    error = caught.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    found = reasons(error)
    assert [reason for _, reason in found] == ["ERROR_REASON_BUDGET_EXHAUSTED"]
    assert all(domain != DOMAIN for domain, _ in found)
    quota = detail(error, error_details_pb2.QuotaFailure)
    assert [v.subject for v in quota.violations] == [f"{world.name}/budgets/daily"]
    assert f"budget daily of the agent's workspace {workspace_id}" in (error.details() or "")
