"""The llm handler inside the dispatcher, against the local fake of the
OpenAI Chat Completions protocol (tests/fakes/openai_server.py): the hosted
API cannot be reached from these machines. The handler's retries, fallback
and breaker are covered in tests/dispatcher/llm/test_llm.py; this checks the wiring:
settings, routing by default, the context sent, the answer stored, usage
and cost on the run, fallback between providers, and that cancelling the run
closes the HTTP response.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.platform.rpc.server import SwitchboardServer
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.kits.contextkit import (
    Stub,
    all_messages,
    create_conversation,
    ctx_world,
)
from tests.kits.dispatchkit import Stub as DStub
from tests.kits.dispatchkit import cancel, limited, reason_of, request, send, until, watch_all

pytestmark = pytest.mark.service

KEY = "sk-test-secret-never-logged"


@asynccontextmanager
async def llm_mesh(
    primary: FakeOpenAI, backup: FakeOpenAI | None = None
) -> AsyncIterator[tuple[SwitchboardServer, Stub, DStub]]:
    fallbacks = []
    if backup is not None:
        fallbacks.append({"name": "backup", "base_url": backup.url, "api_key": "", "model": "b-1"})
    async with limited(
        llm_base_url=primary.url,
        llm_api_key=KEY,
        llm_model="a-1",
        llm_fallbacks=json.dumps(fallbacks),
        llm_prices=json.dumps(
            {
                "a-1": {"input_per_mtok": 1.0, "output_per_mtok": 2.0},
                "b-1": {"input_per_mtok": 10.0, "output_per_mtok": 20.0},
            }
        ),
        llm_max_retries=1,
    ) as started:
        yield started


async def test_the_llm_answers_by_default_with_usage_and_cost() -> None:
    async with FakeOpenAI(api_key=KEY) as fake:
        gate = asyncio.Event()
        fake.script(
            Reply.text("Paris is the capital.", usage=(1000, 500), hold_after_chunks=1, hold=gate)
        )
        async with llm_mesh(fake) as (server, stub, dstub):
            world = await ctx_world(server, stub)
            conversation = (await create_conversation(stub, world.editor, world.name)).name
            sent = await send(dstub, world.editor, request(conversation, "Capital of France?"))
            # The first chunk reaches watchers while the model is still answering.
            call, early = await until(dstub, world.editor, sent.run.name, "delta")
            call.cancel()
            assert early[-1].delta.text == "Paris"
            gate.set()
            seen = await watch_all(dstub, world.editor, sent.run.name)
            messages = await all_messages(stub, world.editor, conversation)

    run = seen.final
    assert run.handler == "handlers/llm"
    assert run.state == pb.RUN_STATE_SUCCEEDED
    assert seen.text == "Paris is the capital."
    assert next(u.delta.text for u in seen.updates if u.WhichOneof("update") == "delta") == "Paris"
    assert (run.usage.input_tokens, run.usage.output_tokens) == (1000, 500)
    assert not run.usage.estimated
    assert run.usage.model == "primary/a-1"
    assert abs(run.usage.estimated_cost_usd - (1000 * 1.0 + 500 * 2.0) / 1e6) < 1e-12
    # The context window went to the provider: the question is the last user turn.
    body = fake.requests[0].body
    assert body["model"] == "a-1"
    assert body["stream"] is True
    assert body["messages"][-1] == {"role": "user", "content": "Capital of France?"}
    assert messages[-1].role == cpb.MESSAGE_ROLE_ASSISTANT
    assert messages[-1].parts[0].text == "Paris is the capital."


async def test_a_failing_provider_falls_back_to_the_next() -> None:
    async with FakeOpenAI(api_key=KEY) as primary, FakeOpenAI() as backup:
        primary.script(Reply.error(503), Reply.error(503))
        backup.script(Reply.text("from the backup", usage=(10, 3)))
        async with llm_mesh(primary, backup) as (server, stub, dstub):
            world = await ctx_world(server, stub)
            conversation = (await create_conversation(stub, world.editor, world.name)).name
            sent = await send(dstub, world.editor, request(conversation, "anyone there?"))
            seen = await watch_all(dstub, world.editor, sent.run.name)
    assert seen.final.state == pb.RUN_STATE_SUCCEEDED
    assert seen.text == "from the backup"
    assert seen.final.usage.model == "backup/b-1"
    assert len(primary.requests) == 2  # the first try and one retry


async def test_all_providers_failing_fails_the_run_without_leaking_the_key() -> None:
    async with FakeOpenAI(api_key=KEY) as primary:
        primary.default = Reply.error(500, message=f"upstream broke; key {KEY}")
        async with llm_mesh(primary) as (server, stub, dstub):
            world = await ctx_world(server, stub)
            conversation = (await create_conversation(stub, world.editor, world.name)).name
            sent = await send(dstub, world.editor, request(conversation, "hello"))
            seen = await watch_all(dstub, world.editor, sent.run.name)
    run = seen.final
    assert run.state == pb.RUN_STATE_FAILED
    assert reason_of(run) == "ERROR_REASON_HANDLER_FAILED"
    assert KEY not in run.error.message
    assert "all LLM providers failed" in run.error.message


async def test_cancelling_the_run_closes_the_model_stream() -> None:
    async with FakeOpenAI(api_key=KEY) as fake:
        gate = asyncio.Event()
        fake.script(Reply.text("one two three four", hold_after_chunks=1, hold=gate))
        async with llm_mesh(fake) as (server, stub, dstub):
            world = await ctx_world(server, stub)
            conversation = (await create_conversation(stub, world.editor, world.name)).name
            sent = await send(dstub, world.editor, request(conversation, "talk slowly"))
            await until(dstub, world.editor, sent.run.name, "delta")
            run = await cancel(dstub, world.editor, sent.run.name)
            assert run.state == pb.RUN_STATE_CANCELLED
            # The provider saw its response abandoned: the connection was closed.
            await fake.wait_client_closed(1)
            assert fake.client_closed_mid_response == 1
            gate.set()
