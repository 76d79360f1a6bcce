"""Budgets across hops, in one process on SQLite with the local model server and a price
table (docs/budgets.md, "Across hops").

The callee side: a run started with ``x-switchboard-budget`` on SendMessage holds it as one
more cap (a step it has no room for ends the run FAILED with BUDGET_EXHAUSTED before the model
is asked; nothing left of it refuses the message; a malformed one is INVALID_ARGUMENT). The
caller side: a run whose handler is a gRPC domain expert hands it what is left of the run's
budgets and is charged what it reports; one whose handler is an A2A agent (here this very
deployment's own front door, reached through a card served over HTTP, in another workspace)
hands it the budget extension, and the agent's run spends within it and reports its usage
back, which the caller's run and budget are charged. tests/e2e/test_budget_hops.py has the
same with separate processes.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from a2a.types import a2a_pb2 as a2a
from a2a.types import a2a_pb2_grpc
from google.rpc import error_details_pb2
from grpc import aio

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.integration.v1 import integration_pb2 as ipb
from switchboard.dispatcher.handlers.handed import BUDGET_EXTENSION, HEADER
from tests.dispatcher.budgets.test_budget_runs import (
    ANSWER,
    add_budget,
    answer,
    daily,
    holds,
    mesh,
    window,
)
from tests.e2e.expertkit import until_listed
from tests.e2e.toolexpert import ToolExpert
from tests.fakes.openai_server import FakeOpenAI
from tests.infra.cardserver import card_server
from tests.kits.authkit import detail, reason
from tests.kits.contextkit import (
    TIMEOUT_S,
    Caller,
    World,
    create_conversation,
    ctx_world,
)
from tests.kits.contextkit import violations as fields
from tests.kits.dispatchkit import Stub as DStub
from tests.kits.dispatchkit import dispatcher_stub, finished, reason_of, request, send
from tests.kits.integrationkit import create, integration_stub

pytestmark = pytest.mark.service

#: What one answer of the local model costs (ANSWER output tokens at 2 micro-dollars each).
COST = 2 * ANSWER


async def send_handed(
    dstub: DStub, caller: Caller, req: pb.SendMessageRequest, handed: str
) -> pb.SendMessageResponse:
    return await dstub.SendMessage(req, metadata=(*caller.md, (HEADER, handed)), timeout=TIMEOUT_S)


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
        timeout=TIMEOUT_S,
    )
    tenant = f"{world.name.removeprefix('workspaces/')}.{assistant_id}"
    a2a_stub: Any = a2a_pb2_grpc.A2AServiceStub(channel)  # type: ignore[no-untyped-call]
    card: a2a.AgentCard = await a2a_stub.GetExtendedAgentCard(
        a2a.GetExtendedAgentCardRequest(tenant=tenant), metadata=world.viewer.md, timeout=TIMEOUT_S
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
        pb.ListRunsRequest(parent=world.name), metadata=world.owner.md, timeout=TIMEOUT_S
    )
    return list(listed.runs)
