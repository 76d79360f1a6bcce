"""Priced tool calls charged to a run's budgets, end to end with real parts: the llm
handler against the local model server (tests/fakes/openai_server.py) with a price
table, the reference MCP server (server-everything) registered as an integration
whose owner set its prices with UpdateIntegration, an assistant enabling its tools,
and a workspace cost budget made with CreateBudget.

What docs/budgets.md promises: a call the tool answered costs its price (the tool's
own, else the integration's), added to the run's ``usage.cost_micros`` and settled in
the budget, even when the tool reports an error; a call that never reached the tool
(refused by the hub) costs nothing; a
budget without room for the price pauses the run at the cap before the call (the
server never sees it), and raising the cap lets the call run and be charged.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from google.protobuf import field_mask_pb2
from grpc import aio

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.handler.v1 import handler_pb2 as hpb
from switchboard.api.integration.v1 import integration_pb2 as ipb
from switchboard.mesh import create_server
from switchboard.platform.rpc.server import SwitchboardServer
from tests.conftest import CALL_DEADLINE_S, make_settings
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.infra.mcpeverything import EverythingServer
from tests.infra.mcpserver import McpTestServer
from tests.kits.contextkit import World, context_stub, create_conversation, ctx_world
from tests.kits.dispatchkit import Stub as DStub
from tests.kits.dispatchkit import Watched, dispatcher_stub, until, watch_all
from tests.kits.integrationkit import create, integration_stub

pytestmark = pytest.mark.service

SUM = "ev__get-sum"
ECHO = "ev__echo"
#: get-sum's own price; any other tool of the integration costs DEFAULT.
SUM_PRICE = 1_000
DEFAULT = 7
#: The model's answers: usage (input, output) at 1 and 2 micro-dollars a token.
FIRST, SECOND = (100, 10), (200, 20)
MODEL_COST = (100 * 1 + 10 * 2) + (200 * 1 + 20 * 2)


@pytest.fixture(scope="module")
def everything() -> Iterator[EverythingServer]:
    with EverythingServer() as server:
        yield server


@dataclass
class Priced:
    channel: aio.Channel
    server: SwitchboardServer
    fake: FakeOpenAI
    dstub: DStub
    world: World
    conversation: str
    assistant: str
    integration: str


@asynccontextmanager
async def priced_mesh(everything: EverythingServer) -> AsyncIterator[Priced]:
    """A workspace with server-everything as integration ``ev`` (get-sum at
    SUM_PRICE, its other tools at DEFAULT) and an assistant enabling get-sum and echo."""
    async with FakeOpenAI() as fake:
        settings = make_settings(
            llm_base_url=fake.url,
            llm_model="m-1",
            llm_max_retries=0,
            llm_max_output_tokens=100,
            llm_prices=json.dumps({"m-1": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}),
            egress_allow_loopback=True,
            integration_probe_interval_s=0,
        )
        server, _ = await create_server(settings)
        await server.start()
        try:
            async with aio.insecure_channel(server.address) as channel:
                stub = context_stub(channel)
                world = await ctx_world(server, stub)
                istub = integration_stub(channel)
                made = await create(
                    istub,
                    world.owner,
                    world.name,
                    ipb.Integration(kind=ipb.INTEGRATION_KIND_MCP_SERVER, endpoint=everything.url),
                    integration_id="ev",
                )
                # Priced after it was registered, as an owner would: the runs read
                # what the update stored.
                await istub.UpdateIntegration(
                    ipb.UpdateIntegrationRequest(
                        integration=ipb.Integration(
                            name=made.name,
                            call_price_micros=DEFAULT,
                            tool_call_price_micros={"get-sum": SUM_PRICE},
                        ),
                        update_mask=field_mask_pb2.FieldMask(
                            paths=["call_price_micros", "tool_call_price_micros"]
                        ),
                    ),
                    metadata=world.owner.md,
                    timeout=CALL_DEADLINE_S,
                )
                dstub = dispatcher_stub(channel)
                assistant = await dstub.CreateAssistant(
                    pb.CreateAssistantRequest(
                        parent=world.name,
                        assistant_id="calc",
                        assistant=pb.Assistant(
                            display_name="Calculator",
                            tools=[
                                pb.AssistantTools(integration=made.name, tools=["get-sum", "echo"])
                            ],
                        ),
                    ),
                    metadata=world.owner.md,
                    timeout=CALL_DEADLINE_S,
                )
                conversation = await create_conversation(stub, world.editor, world.name)
                yield Priced(
                    channel,
                    server,
                    fake,
                    dstub,
                    world,
                    conversation.name,
                    assistant.assistant.name,
                    made.name,
                )
        finally:
            await server.shutdown(grace=0)


async def budget(priced: Priced, cost: int) -> pb.Budget:
    response = await priced.dstub.CreateBudget(
        pb.CreateBudgetRequest(
            parent=priced.world.name,
            budget_id="daily",
            budget=pb.Budget(
                display_name="Daily",
                scope=priced.world.name,
                period=pb.BUDGET_PERIOD_DAY,
                cost_limit_micros=cost,
            ),
        ),
        metadata=priced.world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    return response.budget


async def usage(priced: Priced, name: str) -> pb.BudgetUsage:
    response = await priced.dstub.GetBudget(
        pb.GetBudgetRequest(name=name), metadata=priced.world.viewer.md, timeout=CALL_DEADLINE_S
    )
    return response.budget.usage


async def send(priced: Priced, text: str) -> pb.Run:
    sent = await priced.dstub.SendMessage(
        pb.SendMessageRequest(
            conversation=priced.conversation,
            assistant=priced.assistant,
            message=cpb.Message(parts=[cpb.ContentPart(text=text)]),
        ),
        metadata=priced.world.editor.md,
        timeout=CALL_DEADLINE_S,
    )
    return sent.run


def calls_seen(everything: EverythingServer, tool: str) -> int:
    """``tools/call`` requests for ``tool`` the server received (tests/mcp/observe.mjs)."""
    return sum(
        1 for line in everything.stderr().splitlines() if line.startswith(f"observed call {tool} ")
    )


def results(seen: Watched) -> dict[str, hpb.ToolResult]:
    return {
        u.tool_result.id: u.tool_result
        for u in seen.updates
        if u.WhichOneof("update") == "tool_result"
    }


def answer(body: dict[str, Any]) -> Reply:
    return Reply.text("Done.", usage=SECOND)


async def test_a_priced_call_is_charged_to_the_run_and_its_budget(
    everything: EverythingServer,
) -> None:
    async with priced_mesh(everything) as priced:
        made = await budget(priced, 1_000_000)
        before = calls_seen(everything, "get-sum"), calls_seen(everything, "echo")
        priced.fake.script(
            Reply.tool_calls(
                [
                    (SUM, {"a": 2, "b": 3}, "call_sum"),
                    (ECHO, {"message": "hi"}, "call_echo"),
                    # Not the tool's schema: the hub refuses it before the server sees it.
                    (SUM, {"a": "two"}, "call_bad"),
                ],
                usage=FIRST,
            ),
            answer,
        )
        run = await send(priced, "What is 2 + 3?")
        seen = await watch_all(priced.dstub, priced.world.viewer, run.name)
        spent = await usage(priced, made.name)
        after = calls_seen(everything, "get-sum"), calls_seen(everything, "echo")

    final = seen.final
    assert final.state == pb.RUN_STATE_SUCCEEDED, final.error
    outcomes = {call: result.outcome for call, result in results(seen).items()}
    assert outcomes == {
        "call_sum": hpb.TOOL_OUTCOME_SUCCEEDED,
        "call_echo": hpb.TOOL_OUTCOME_SUCCEEDED,
        "call_bad": hpb.TOOL_OUTCOME_FAILED,
    }
    assert (after[0] - before[0], after[1] - before[1]) == (1, 1)
    # get-sum at its own price, echo at the integration's; the refused call is free.
    assert final.usage.cost_micros == MODEL_COST + SUM_PRICE + DEFAULT
    assert final.usage.estimated_cost_usd == pytest.approx(final.usage.cost_micros / 1e6)
    assert spent.cost_micros == final.usage.cost_micros
    assert spent.reserved_cost_micros == 0


async def test_a_budget_without_room_for_the_price_pauses_before_the_call(
    everything: EverythingServer,
) -> None:
    async with priced_mesh(everything) as priced:
        # Room for the model's calls (each reserves about 300), not for get-sum's price.
        made = await budget(priced, SUM_PRICE)
        before = calls_seen(everything, "get-sum")
        priced.fake.script(
            Reply.tool_calls([(SUM, {"a": 2, "b": 3}, "call_sum")], usage=FIRST), answer
        )
        run = await send(priced, "What is 2 + 3?")
        call, updates = await until(
            priced.dstub,
            priced.world.viewer,
            run.name,
            "state_change",
            state=pb.RUN_STATE_REQUIRES_ACTION,
        )
        call.cancel()
        waiting = updates[-1].state_change.run
        # Paused at the cap: the call was shown, not made; the budget holds nothing.
        assert calls_seen(everything, "get-sum") == before
        assert not [u for u in updates if u.WhichOneof("update") == "tool_result"]
        assert len(priced.fake.requests) == 1
        held = await usage(priced, made.name)
        assert (held.cost_micros, held.reserved_cost_micros) == (120, 0)

        # An owner raises the cap: the call is made and charged.
        raised = await priced.dstub.UpdateBudget(
            pb.UpdateBudgetRequest(
                budget=pb.Budget(name=made.name, cost_limit_micros=1_000_000),
                update_mask=field_mask_pb2.FieldMask(paths=["cost_limit_micros"]),
            ),
            metadata=priced.world.owner.md,
            timeout=CALL_DEADLINE_S,
        )
        assert raised.budget.cost_limit_micros == 1_000_000
        seen = await watch_all(priced.dstub, priced.world.viewer, run.name)
        spent = await usage(priced, made.name)
        made_calls = calls_seen(everything, "get-sum") - before

    action = waiting.required_action
    assert action.budget.budgets == [made.name]
    assert (action.budget.cost_micros, action.budget.input_tokens) == (SUM_PRICE, 0)
    assert action.budget.output_tokens == 0
    assert not action.tool_calls
    final = seen.final
    assert final.state == pb.RUN_STATE_SUCCEEDED, final.error
    assert results(seen)["call_sum"].outcome == hpb.TOOL_OUTCOME_SUCCEEDED
    assert made_calls == 1
    assert final.usage.cost_micros == MODEL_COST + SUM_PRICE
    assert spent.cost_micros == final.usage.cost_micros
    assert spent.reserved_cost_micros == 0


async def test_a_run_cancelled_at_the_cap_reports_what_it_was_charged(
    everything: EverythingServer,
) -> None:
    async with priced_mesh(everything) as priced:
        made = await budget(priced, SUM_PRICE)
        priced.fake.script(
            Reply.tool_calls([(SUM, {"a": 2, "b": 3}, "call_sum")], usage=FIRST), answer
        )
        run = await send(priced, "What is 2 + 3?")
        call, _ = await until(
            priced.dstub,
            priced.world.viewer,
            run.name,
            "state_change",
            state=pb.RUN_STATE_REQUIRES_ACTION,
        )
        call.cancel()
        cancelled = await priced.dstub.CancelRun(
            pb.CancelRunRequest(name=run.name),
            metadata=priced.world.editor.md,
            timeout=CALL_DEADLINE_S,
        )
        spent = await usage(priced, made.name)

    # No result carries its usage: the run still says what its budget was charged
    # (the first model call), and nothing is left held.
    assert cancelled.run.state == pb.RUN_STATE_CANCELLED
    assert cancelled.run.usage.cost_micros == spent.cost_micros == 100 * 1 + 10 * 2
    assert (cancelled.run.usage.input_tokens, cancelled.run.usage.output_tokens) == FIRST
    assert spent.reserved_cost_micros == 0


async def test_a_call_the_tool_answered_with_an_error_is_charged(
    everything: EverythingServer,
) -> None:
    with McpTestServer() as failing:
        async with priced_mesh(everything) as priced:
            made = await budget(priced, 1_000_000)
            integration = await create(
                integration_stub(priced.channel),
                priced.world.owner,
                priced.world.name,
                ipb.Integration(
                    kind=ipb.INTEGRATION_KIND_MCP_SERVER,
                    endpoint=failing.url,
                    call_price_micros=30,
                ),
                integration_id="fl",
            )
            assistant = await priced.dstub.CreateAssistant(
                pb.CreateAssistantRequest(
                    parent=priced.world.name,
                    assistant=pb.Assistant(
                        tools=[pb.AssistantTools(integration=integration.name, tools=["fail"])]
                    ),
                ),
                metadata=priced.world.owner.md,
                timeout=CALL_DEADLINE_S,
            )
            priced.assistant = assistant.assistant.name
            priced.fake.script(
                Reply.tool_calls([("fl__fail", {}, "call_fail")], usage=FIRST), answer
            )
            run = await send(priced, "Try it.")
            seen = await watch_all(priced.dstub, priced.world.viewer, run.name)
            spent = await usage(priced, made.name)

    final = seen.final
    assert final.state == pb.RUN_STATE_SUCCEEDED, final.error
    assert results(seen)["call_fail"].outcome == hpb.TOOL_OUTCOME_ERROR
    assert final.usage.cost_micros == MODEL_COST + 30
    assert spent.cost_micros == final.usage.cost_micros
    assert spent.reserved_cost_micros == 0
