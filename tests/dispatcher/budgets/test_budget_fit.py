"""Budgets a person can use (issue 67): near a cap, a model call is made with
``max_tokens`` lowered to what its budgets have room for, and says so on the run, in its
usage and in QueryUsage; a run pauses only when not even a useful answer fits, and the
pause and the error say what the call needed and how much of which budget was left. Runs
answered by the local model server (tests/fakes/openai_server.py), whose requests show
the ``max_tokens`` each call was made with."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.context.text.tokencount import ApproxTokenCounter
from switchboard.dispatcher.handlers.handed import HEADER
from switchboard.dispatcher.llm.usage import Tally
from switchboard.platform.rpc.server import SwitchboardServer
from tests.dispatcher.budgets.test_budget_runs import add_budget, change_budget, paused
from tests.fakes.openai_server import FakeOpenAI, Received, Reply
from tests.kits.contextkit import TIMEOUT_S, World, create_conversation, ctx_world
from tests.kits.contextkit import Stub as CStub
from tests.kits.dispatchkit import Stub as DStub
from tests.kits.dispatchkit import finished, limited, reason_of, request

pytestmark = pytest.mark.service

#: The server's ``max_tokens`` (SWITCHBOARD_LLM_MAX_OUTPUT_TOKENS's default).
MAX_TOKENS = 1024
#: The fewest answer tokens a call is lowered to (SWITCHBOARD_LLM_MIN_OUTPUT_TOKENS's default).
LEAST = 64
#: Dollars per million tokens: 1 micro-dollar a prompt token, 2 an answer token.
PRICES = {"m-1": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}


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
        request(conversation, text), metadata=metadata, timeout=TIMEOUT_S
    )


async def query_usage(dstub: DStub, world: World) -> pb.QueryUsageResponse:
    return await dstub.QueryUsage(
        pb.QueryUsageRequest(
            parent=world.name, end_time=_tomorrow(), group_by=[pb.USAGE_DIMENSION_MODEL]
        ),
        metadata=world.viewer.md,
        timeout=TIMEOUT_S,
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
