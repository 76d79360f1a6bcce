"""Whether a run's usage was priced is said, not inferred (issue 67 follow-up): the llm
handler against the local model server (tests/fakes/openai_server.py) with a price
table that prices one model at 0 (a free local model) and leaves another out.

A run of the free model costs 0 and is priced; a run of the unpriced one costs 0 and
says how many of its calls went unpriced (``Usage.unpriced_calls``), as its stored
row does and QueryUsage's rows (``UsageRow.unpriced_runs``). A run that mixes a priced
tool (an MCP server registered with a call price) and an unpriced model has a cost
and unpriced calls both; one that fails after an unpriced call still says so.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
from grpc import aio
from sqlalchemy import select

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.handler.v1 import handler_pb2 as hpb
from switchboard.api.integration.v1 import integration_pb2 as ipb
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.store.models import RunRow
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.infra.mcpserver import McpTestServer
from tests.kits.contextkit import World, create_conversation, ctx_world
from tests.kits.dispatchkit import Stub, finished, limited
from tests.kits.integrationkit import create, integration_stub

pytestmark = pytest.mark.service

TIMEOUT_S = 20.0
PAID, FREE, LOCAL = "paid-1", "free-1", "local-1"
#: PAID at 1 and 2 micro-dollars a token, FREE at 0; LOCAL has no price.
PRICES = {
    PAID: {"input_per_mtok": 1.0, "output_per_mtok": 2.0},
    FREE: {"input_per_mtok": 0, "output_per_mtok": 0},
}
#: The MCP test server's echo, as the model calls it, and the integration's call price.
ECHO = "mcp__echo"
TOOL_PRICE = 7


@pytest.fixture(scope="module")
def mcp() -> Iterator[McpTestServer]:
    with McpTestServer() as server:
        yield server


@dataclass(frozen=True)
class Mesh:
    server: SwitchboardServer
    fake: FakeOpenAI
    stub: Stub
    world: World
    conversation: str
    #: An assistant per model, by model.
    assistants: dict[str, str]

    async def run(self, model: str, text: str = "hello") -> pb.Run:
        sent = await self.stub.SendMessage(
            pb.SendMessageRequest(
                conversation=self.conversation,
                assistant=self.assistants[model],
                message=cpb.Message(parts=[cpb.ContentPart(text=text)]),
            ),
            metadata=self.world.editor.md,
            timeout=TIMEOUT_S,
        )
        return await finished(self.stub, self.world.editor, sent.run.name)

    async def rows(self, *group_by: pb.UsageDimension.ValueType) -> list[pb.UsageRow]:
        response = await self.stub.QueryUsage(
            pb.QueryUsageRequest(parent=self.world.name, group_by=group_by),
            metadata=self.world.viewer.md,
            timeout=TIMEOUT_S,
        )
        return list(response.rows)

    async def stored(self) -> dict[str, tuple[int, int]]:
        """Each run's stored ``(cost_micros, unpriced_calls)``, by its id."""
        async with self.server.shared.database.sessions() as db:
            rows = (
                await db.execute(select(RunRow.id, RunRow.cost_micros, RunRow.unpriced_calls))
            ).all()
        return {row.id: (row.cost_micros, row.unpriced_calls) for row in rows}


@asynccontextmanager
async def priced_mesh(database_url: str, mcp: McpTestServer | None = None) -> AsyncIterator[Mesh]:
    """A workspace with an assistant per model (each enabling the MCP server's echo,
    at TOOL_PRICE a call, when ``mcp`` is given)."""
    async with (
        FakeOpenAI() as fake,
        limited(
            database_url=database_url,
            llm_base_url=fake.url,
            llm_model=PAID,
            llm_max_retries=0,
            llm_prices=json.dumps(PRICES),
            egress_allow_loopback=True,
            integration_probe_interval_s=0,
        ) as (server, context, stub),
        aio.insecure_channel(server.address) as channel,
    ):
        world = await ctx_world(server, context)
        tools: list[pb.AssistantTools] = []
        if mcp is not None:
            made = await create(
                integration_stub(channel),
                world.owner,
                world.name,
                ipb.Integration(
                    kind=ipb.INTEGRATION_KIND_MCP_SERVER,
                    endpoint=mcp.url,
                    call_price_micros=TOOL_PRICE,
                ),
                integration_id="mcp",
            )
            tools.append(pb.AssistantTools(integration=made.name, tools=["echo"]))
        assistants = {}
        for model in (PAID, FREE, LOCAL):
            created = await stub.CreateAssistant(
                pb.CreateAssistantRequest(
                    parent=world.name,
                    assistant_id=model,
                    assistant=pb.Assistant(model=hpb.ModelSettings(model=model), tools=tools),
                ),
                metadata=world.owner.md,
                timeout=TIMEOUT_S,
            )
            assistants[model] = created.assistant.name
        conversation = (await create_conversation(context, world.editor, world.name)).name
        yield Mesh(server, fake, stub, world, conversation, assistants)


def run_id(run: pb.Run) -> str:
    return run.name.rsplit("/", 1)[1]


async def test_a_model_priced_at_0_is_priced_and_a_model_without_a_price_is_not(
    database_url: str,
) -> None:
    async with priced_mesh(database_url) as mesh:
        mesh.fake.script(
            *(Reply.text("Fine.", usage=(1000, 500)) for _ in range(3)),
        )
        paid = await mesh.run(PAID)
        free = await mesh.run(FREE)
        local = await mesh.run(LOCAL)
        stored = await mesh.stored()
        by_model = await mesh.rows(pb.USAGE_DIMENSION_MODEL)
        [total] = await mesh.rows()

    for run in (paid, free, local):
        assert run.state == pb.RUN_STATE_SUCCEEDED, run.error
        assert (run.usage.input_tokens, run.usage.output_tokens) == (1000, 500)
    assert (paid.usage.cost_micros, paid.usage.unpriced_calls) == (2000, 0)
    # Both cost nothing; only the one the table lacks is unpriced.
    assert (free.usage.cost_micros, free.usage.unpriced_calls) == (0, 0)
    assert (local.usage.cost_micros, local.usage.unpriced_calls) == (0, 1)
    assert stored[run_id(paid)] == (2000, 0)
    assert stored[run_id(free)] == (0, 0)
    assert stored[run_id(local)] == (0, 1)
    assert [(r.model, r.run_count, r.cost_micros, r.unpriced_runs) for r in by_model] == [
        (f"primary/{FREE}", 1, 0, 0),
        (f"primary/{LOCAL}", 1, 0, 1),
        (f"primary/{PAID}", 1, 2000, 0),
    ]
    assert (total.run_count, total.cost_micros, total.unpriced_runs) == (3, 2000, 1)


async def test_a_run_of_an_unpriced_model_with_a_priced_tool_has_a_cost_and_unpriced_calls(
    database_url: str, mcp: McpTestServer
) -> None:
    """Its cost is the tool's price alone: a cost above 0 does not make it priced."""
    async with priced_mesh(database_url, mcp) as mesh:
        mesh.fake.script(
            Reply.tool_calls([(ECHO, {"message": "hi"}, "call_1")], usage=(100, 10)),
            Reply.text("It said hi.", usage=(200, 20)),
            Reply.tool_calls([(ECHO, {"message": "hi"}, "call_1")], usage=(100, 10)),
            Reply.text("It said hi.", usage=(200, 20)),
        )
        local = await mesh.run(LOCAL)
        free = await mesh.run(FREE)
        by_model = await mesh.rows(pb.USAGE_DIMENSION_MODEL)

    assert local.state == pb.RUN_STATE_SUCCEEDED, local.error
    assert (local.usage.input_tokens, local.usage.output_tokens) == (300, 30)
    assert (local.usage.cost_micros, local.usage.unpriced_calls) == (TOOL_PRICE, 2)
    assert free.state == pb.RUN_STATE_SUCCEEDED, free.error
    assert (free.usage.cost_micros, free.usage.unpriced_calls) == (TOOL_PRICE, 0)
    assert [(r.model, r.cost_micros, r.unpriced_runs) for r in by_model] == [
        (f"primary/{FREE}", TOOL_PRICE, 0),
        (f"primary/{LOCAL}", TOOL_PRICE, 1),
    ]


async def test_a_run_that_fails_after_an_unpriced_call_says_so(
    database_url: str, mcp: McpTestServer
) -> None:
    """No result carries a failed run's usage: its budgets' charges do (tokens and the
    tool's price), and its journal the unpriced call it made before the failure."""
    async with priced_mesh(database_url, mcp) as mesh:
        await mesh.stub.CreateBudget(
            pb.CreateBudgetRequest(
                parent=mesh.world.name,
                budget_id="tokens",
                budget=pb.Budget(
                    scope=mesh.world.name,
                    period=pb.BUDGET_PERIOD_DAY,
                    total_token_limit=1_000_000,
                ),
            ),
            metadata=mesh.world.owner.md,
            timeout=TIMEOUT_S,
        )
        mesh.fake.script(
            Reply.tool_calls([(ECHO, {"message": "hi"}, "call_1")], usage=(100, 10)),
            Reply.error(400, message="the model is gone"),
        )
        local = await mesh.run(LOCAL)
        stored = await mesh.stored()
        [row] = await mesh.rows()

    assert local.state == pb.RUN_STATE_FAILED
    assert (local.usage.input_tokens, local.usage.output_tokens) == (100, 10)
    assert (local.usage.cost_micros, local.usage.unpriced_calls) == (TOOL_PRICE, 1)
    assert stored[run_id(local)] == (TOOL_PRICE, 1)
    assert (row.run_count, row.unpriced_runs) == (1, 1)
