"""QueryUsage: runs answered by the local fake model server (with a price table) and by the
echo handler store their usage with their end; the query sums it by day, assistant and model,
filtered, over whole UTC days, in pages (docs/budgets.md).

Whether a run's usage was priced is said, not inferred (issue 67 follow-up): the llm
handler against the local model server (tests/fakes/openai_server.py) with a price
table that prices one model at 0 (a free local model) and leaves another out.
A run of the free model costs 0 and is priced; a run of the unpriced one costs 0 and
says how many of its calls went unpriced (``Usage.unpriced_calls``), as its stored
row does and QueryUsage's rows (``UsageRow.unpriced_runs``). A run that mixes a priced
tool (an MCP server registered with a call price) and an unpriced model has a cost
and unpriced calls both; one that fails after an unpriced call still says so.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from grpc import aio
from sqlalchemy import select, update

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.handler.v1 import handler_pb2 as hpb
from switchboard.api.integration.v1 import integration_pb2 as ipb
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.store.models import RunRow
from tests.conftest import CALL_DEADLINE_S
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.infra.mcpserver import McpTestServer
from tests.kits.contextkit import Stub as ContextStub
from tests.kits.contextkit import (
    World,
    create_conversation,
    create_workspace,
    ctx_world,
    refused,
    violations,
)
from tests.kits.dispatchkit import Stub, finished, limited, request, send
from tests.kits.integrationkit import create, integration_stub

pytestmark = pytest.mark.service

CODE = grpc.StatusCode
DAY = pb.USAGE_DIMENSION_DAY
ASSISTANT = pb.USAGE_DIMENSION_ASSISTANT
API_KEY = pb.USAGE_DIMENSION_API_KEY
MODEL = pb.USAGE_DIMENSION_MODEL


@dataclass(frozen=True)
class Spent:
    """A mesh whose runs have ended: two through the model with assistant ``helper`` (1,000
    in and 500 out, then 100 in and 50 out, at $1 and $2 per million), one through echo."""

    server: SwitchboardServer
    context: ContextStub
    stub: Stub
    world: World
    helper: str
    runs: list[str]
    #: The UTC day each run ended, as its end_time says.
    days: list[str]

    @property
    def day(self) -> str:
        """The day the runs ended (``same_day`` makes it one day for all)."""
        return self.days[0]

    async def query(self, **fields: Any) -> pb.QueryUsageResponse:
        return await self.stub.QueryUsage(
            pb.QueryUsageRequest(parent=self.world.name, **fields),
            metadata=self.world.viewer.md,
            timeout=CALL_DEADLINE_S,
        )


@asynccontextmanager
async def spent_mesh(database_url: str) -> AsyncIterator[Spent]:
    async with (
        FakeOpenAI() as fake,
        limited(
            database_url=database_url,
            llm_base_url=fake.url,
            llm_model="a-1",
            llm_prices=json.dumps({"a-1": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}),
        ) as (server, context, stub),
    ):
        world = await ctx_world(server, context)
        helper = (
            await stub.CreateAssistant(
                pb.CreateAssistantRequest(
                    parent=world.name, assistant=pb.Assistant(), assistant_id="helper"
                ),
                metadata=world.owner.md,
                timeout=CALL_DEADLINE_S,
            )
        ).assistant.name
        conversation = (await create_conversation(context, world.editor, world.name)).name
        fake.script(Reply.text("One.", usage=(1000, 500)), Reply.text("Two.", usage=(100, 50)))
        messages = []
        for index in range(2):
            message = request(conversation, f"question {index}")
            message.assistant = helper
            messages.append(message)
        messages.append(request(conversation, "three words here", handler="handlers/echo"))
        runs, days = [], []
        for message in messages:
            sent = await send(stub, world.editor, message)
            ended = await finished(stub, world.editor, sent.run.name)
            runs.append(sent.run.name)
            days.append(ended.end_time.ToDatetime(dt.UTC).date().isoformat())
        yield Spent(server, context, stub, world, helper, runs, days)


@pytest.fixture
async def spent(database_url: str) -> AsyncIterator[Spent]:
    async with spent_mesh(database_url) as made:
        yield made


def at(when: dt.datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(when)
    return stamp


def sums(row: pb.UsageRow) -> tuple[int, int, int, int]:
    return (row.run_count, row.input_tokens, row.output_tokens, row.cost_micros)


async def move_run(s: Spent, run: str, day: str) -> None:
    """Store a run as having ended on ``day``, as if it had been run then."""
    run_id = run.rsplit("/", 1)[1]
    async with s.server.shared.database.sessions.begin() as db:
        await db.execute(update(RunRow).where(RunRow.id == run_id).values(usage_day=day))


async def same_day(s: Spent) -> None:
    """The runs as having ended on the first one's day (they did, unless they straddled a
    UTC midnight: then the groups below would split, which is not what is tested)."""
    for run, day in zip(s.runs, s.days, strict=True):
        if day != s.day:
            await move_run(s, run, s.day)


async def test_a_runs_end_stores_its_usage_beside_it(spent: Spent) -> None:
    async with spent.server.shared.database.sessions() as db:
        rows = (
            await db.execute(
                select(
                    RunRow.id,
                    RunRow.model,
                    RunRow.input_tokens,
                    RunRow.output_tokens,
                    RunRow.cost_micros,
                    RunRow.usage_day,
                    RunRow.api_key_id,
                )
            )
        ).all()
    stored = {row.id: tuple(row[1:]) for row in rows}
    first, second, echoed = (run.rsplit("/", 1)[1] for run in spent.runs)
    one, two, three = spent.days
    assert stored[first] == ("primary/a-1", 1000, 500, 2000, one, "")
    assert stored[second] == ("primary/a-1", 100, 50, 200, two, "")
    model, input_tokens, _, cost, day, key = stored[echoed]
    assert (model, input_tokens, cost, day, key) == ("", 3, 0, three, "")


async def test_usage_is_summed_and_grouped_by_assistant_model_and_day(spent: Spent) -> None:
    s = spent
    await same_day(s)
    [total] = (await s.query()).rows
    assert total.run_count == 3
    assert total.cost_micros == 2200
    assert total.input_tokens == 1103
    assert (total.day, total.assistant, total.model, total.api_key) == ("", "", "", "")

    by_assistant = (await s.query(group_by=[ASSISTANT])).rows
    assert [(r.assistant, r.run_count, r.cost_micros) for r in by_assistant] == [
        ("", 1, 0),
        (s.helper, 2, 2200),
    ]
    by_model_and_day = (await s.query(group_by=[MODEL, DAY])).rows
    assert [(r.model, r.day, r.run_count) for r in by_model_and_day] == [
        ("", s.day, 1),
        ("primary/a-1", s.day, 2),
    ]
    # Runs started without an API key group under "".
    [keyless] = (await s.query(group_by=[API_KEY])).rows
    assert (keyless.api_key, keyless.run_count) == ("", 3)
    # One run as started with the editor's key k1 (what admission stores for a key's runs).
    first_id = s.runs[0].rsplit("/", 1)[1]
    async with s.server.shared.database.sessions.begin() as db:
        await db.execute(update(RunRow).where(RunRow.id == first_id).values(api_key_id="k1"))
    key = f"users/{s.world.editor.id}/apiKeys/k1"
    by_key = (await s.query(group_by=[API_KEY])).rows
    assert [(r.api_key, r.run_count, r.cost_micros) for r in by_key] == [
        ("", 2, 200),
        (key, 1, 2000),
    ]
    [keyed] = (await s.query(api_key=key)).rows
    assert sums(keyed) == (1, 1000, 500, 2000)
    # The key's id under another user's name is another key.
    assert (await s.query(api_key=f"users/{s.world.owner.id}/apiKeys/k1")).rows == []

    # Filters.
    [helped] = (await s.query(assistant=s.helper)).rows
    assert sums(helped) == (2, 1100, 550, 2200)
    [priced] = (await s.query(model="primary/a-1", group_by=[DAY])).rows
    assert (priced.day, priced.cost_micros) == (s.day, 2200)
    assert (await s.query(model="other/model")).rows == []
    assert (await s.query(api_key="users/u1/apiKeys/k1")).rows == []
    # Another assistant of the workspace that answered nothing.
    assert (await s.query(assistant=f"{s.world.name}/assistants/idle")).rows == []


async def test_the_range_is_whole_utc_days_and_days_page_in_order(spent: Spent) -> None:
    s = spent
    await same_day(s)
    now = dt.datetime.now(dt.UTC)
    midnight = dt.datetime.combine(dt.date.fromisoformat(s.day), dt.time(), tzinfo=dt.UTC)
    first, second, _ = s.runs
    await move_run(s, first, (midnight - dt.timedelta(days=2)).date().isoformat())
    await move_run(s, second, (midnight - dt.timedelta(days=40)).date().isoformat())

    # The default range: the last 30 days.
    days = (await s.query(group_by=[DAY])).rows
    assert [r.day for r in days] == [(midnight - dt.timedelta(days=2)).date().isoformat(), s.day]
    # A range that ends at today's midnight leaves today out; one that begins late in a
    # day takes that day whole.
    earlier = (
        await s.query(
            group_by=[DAY],
            start_time=at(midnight - dt.timedelta(days=40, hours=-23)),
            end_time=at(midnight),
        )
    ).rows
    assert [r.cost_micros for r in earlier] == [200, 2000]
    future = {
        "start_time": at(now + dt.timedelta(days=1)),
        "end_time": at(now + dt.timedelta(days=2)),
    }
    assert (await s.query(**future)).rows == []

    # Pages of one row, oldest day first, each once.
    seen: list[str] = []
    token = ""
    wide = {"group_by": [DAY], "start_time": at(now - dt.timedelta(days=100))}
    while True:
        page = await s.query(page_size=1, page_token=token, **wide)
        seen.extend(r.day for r in page.rows)
        token = page.next_page_token
        if not token:
            break
        # A token is for the request it came from.
        error = await refused(s.query(page_size=1, page_token=token), CODE.INVALID_ARGUMENT)
        assert violations(error) == ["page_token"]
    assert seen == sorted(seen)
    assert len(seen) == 3
    error = await refused(s.query(page_token="forged"), CODE.INVALID_ARGUMENT)
    assert violations(error) == ["page_token"]


async def test_bad_queries_name_each_bad_field() -> None:
    async with limited() as (server, context, stub):
        world = await ctx_world(server, context)
        other = await create_workspace(context, world.owner, "Other")
        now = dt.datetime.now(dt.UTC)
        cases: list[tuple[dict[str, Any], list[str]]] = [
            ({"group_by": [pb.USAGE_DIMENSION_UNSPECIFIED]}, ["group_by[0]"]),
            ({"group_by": [DAY, MODEL, DAY]}, ["group_by[2]"]),
            ({"group_by": [9]}, ["group_by[0]"]),
            ({"assistant": "assistants/a1"}, ["assistant"]),
            ({"assistant": f"{other.name}/assistants/a1"}, ["assistant"]),
            ({"api_key": "users/u1/keys/k1"}, ["api_key"]),
            ({"model": "m" * 257}, ["model"]),
            ({"start_time": at(now), "end_time": at(now)}, ["end_time"]),
            ({"start_time": at(now), "end_time": at(now - dt.timedelta(days=1))}, ["end_time"]),
            ({"start_time": at(now - dt.timedelta(days=401))}, ["end_time"]),
            ({"end_time": timestamp_pb2.Timestamp(seconds=-(10**15))}, ["end_time"]),
            ({"page_size": -1}, ["page_size"]),
            (
                {"group_by": [0], "api_key": "x", "start_time": at(now + dt.timedelta(days=1))},
                ["group_by[0]", "api_key", "end_time"],
            ),
        ]
        for fields, expected in cases:
            error = await refused(
                stub.QueryUsage(
                    pb.QueryUsageRequest(parent=world.name, **fields),
                    metadata=world.viewer.md,
                    timeout=CALL_DEADLINE_S,
                ),
                CODE.INVALID_ARGUMENT,
            )
            assert violations(error) == expected, fields
        # Another workspace's usage is not found to a member of this one.
        await refused(
            stub.QueryUsage(
                pb.QueryUsageRequest(parent=other.name),
                metadata=world.viewer.md,
                timeout=CALL_DEADLINE_S,
            ),
            CODE.NOT_FOUND,
        )
        # At most 1,000 rows a page: a larger size is capped, not refused.
        page = await stub.QueryUsage(
            pb.QueryUsageRequest(parent=world.name, page_size=5000),
            metadata=world.viewer.md,
            timeout=CALL_DEADLINE_S,
        )
        assert list(page.rows) == []


# -- whether usage was priced ----------------------------------------------------------------

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
            timeout=CALL_DEADLINE_S,
        )
        return await finished(self.stub, self.world.editor, sent.run.name)

    async def rows(self, *group_by: pb.UsageDimension.ValueType) -> list[pb.UsageRow]:
        response = await self.stub.QueryUsage(
            pb.QueryUsageRequest(parent=self.world.name, group_by=group_by),
            metadata=self.world.viewer.md,
            timeout=CALL_DEADLINE_S,
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
                timeout=CALL_DEADLINE_S,
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
            timeout=CALL_DEADLINE_S,
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
