"""An assistant's retrieval in runs, end to end: the llm handler against the local
OpenAI-compatible server, the context service's window retrieval and SearchContext
over a real database (full-text: no embeddings endpoint is configured, so a semantic
request falls back, and the run still answers).

What the issue asks to see: the top matches of the incoming message put in the
model's context with their sources, and the ``search_memory`` tool the model calls
itself, with bad arguments answered to the model rather than failing the run.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from grpc import aio

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.context.domain import ContextDomain
from switchboard.mesh import create_server
from switchboard.platform.rpc.server import SwitchboardServer
from tests.conftest import CALL_DEADLINE_S, built, make_settings
from tests.context.semantic.retrieval.test_search import add_document
from tests.fakes.embeddings_server import FakeEmbeddings
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.kits.contextkit import (
    Stub,
    World,
    all_messages,
    append,
    context_stub,
    create_conversation,
    ctx_world,
    remember,
)
from tests.kits.dispatchkit import Stub as DStub
from tests.kits.dispatchkit import dispatcher_stub, watch_all
from tests.kits.semantickit import get_index, set_index, settled

pytestmark = pytest.mark.service

MODEL = "sb-concept-384"


@dataclass
class Desk:
    server: SwitchboardServer
    fake: FakeOpenAI
    stub: Stub
    dstub: DStub
    world: World
    conversation: str
    assistant: str


@asynccontextmanager
async def desk(
    database_url: str, retrieval: pb.RetrievalSettings, embeddings: str = ""
) -> AsyncIterator[Desk]:
    """A workspace with a document about a glacier trip, a conversation, and an
    assistant ``finder`` with ``retrieval``; ``embeddings``: the embeddings endpoint."""
    async with FakeOpenAI() as fake:
        settings = make_settings(
            database_url=database_url,
            llm_base_url=fake.url,
            llm_model="m-1",
            llm_max_retries=0,
            egress_allow_loopback=True,
            context_embeddings_url=embeddings,
            context_embeddings_attempts=1,
            context_semantic_poll_s=0.2,
        )
        server, _ = await create_server(settings)
        await server.start()
        try:
            async with aio.insecure_channel(server.address) as channel:
                stub = context_stub(channel)
                world = await ctx_world(server, stub)
                conversation = (await create_conversation(stub, world.editor, world.name)).name
                await add_document(
                    server,
                    world.id,
                    "glacier",
                    ["weather notes: sunny", "glacier packing list: crampons and an ice axe"],
                )
                await remember(stub, world.owner, world.name, "The team lead is Ada")
                await append(stub, world.editor, conversation, "hello there")
                dstub = dispatcher_stub(channel)
                created = await dstub.CreateAssistant(
                    pb.CreateAssistantRequest(
                        parent=world.name,
                        assistant_id="finder",
                        assistant=pb.Assistant(
                            display_name="Finder",
                            instructions="Answer from what you find.",
                            retrieval=retrieval,
                        ),
                    ),
                    metadata=world.owner.md,
                    timeout=CALL_DEADLINE_S,
                )
                yield Desk(server, fake, stub, dstub, world, conversation, created.assistant.name)
        finally:
            await server.shutdown(grace=0)


async def run(d: Desk, text: str) -> pb.Run:
    sent = await d.dstub.SendMessage(
        pb.SendMessageRequest(
            conversation=d.conversation,
            assistant=d.assistant,
            message=cpb.Message(parts=[cpb.ContentPart(text=text)]),
        ),
        metadata=d.world.editor.md,
        timeout=CALL_DEADLINE_S,
    )
    seen = await watch_all(d.dstub, d.world.viewer, sent.run.name)
    assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error
    return seen.final


async def ready(d: Desk, domain: ContextDomain) -> None:
    """Every item indexed: the indexer settled and GetSemanticIndex says READY."""
    async with asyncio.timeout(30.0):
        while True:
            await settled(domain)
            index = await get_index(d.stub, d.world.viewer, d.world.name)
            if index.state == cpb.SEMANTIC_INDEX_STATE_READY:
                return
            await asyncio.sleep(0.05)  # not yet: polling a stored state, under a deadline


def system_texts(body: dict[str, Any]) -> list[str]:
    return [m["content"] for m in body["messages"] if m["role"] == "system"]


async def test_retrieved_passages_reach_the_model_with_their_sources(database_url: str) -> None:
    # SEMANTIC without an endpoint falls back to full-text: retrieval still runs.
    retrieval = pb.RetrievalSettings(enabled=True, top_k=3, mode=cpb.SEARCH_MODE_SEMANTIC)
    async with desk(database_url, retrieval) as d:
        d.fake.script(Reply.text("Crampons.", usage=(50, 5)))
        await run(d, "what is on the glacier packing list?")
        body = d.fake.requests[0].body
        messages = body["messages"]
        assert messages[0] == {"role": "system", "content": "Answer from what you find."}
        retrieved = next(t for t in system_texts(body) if t.startswith("Retrieved context"))
        file = f"{d.world.name}/files/glacier"
        assert (
            f"[1] document glacier.txt (chars 21-66, {file}): "
            "glacier packing list: crampons and an ice axe"
        ) in retrieved
        assert "weather notes" not in retrieved  # no word of the question
        # Before the conversation's messages, the new one last.
        position = messages.index({"role": "system", "content": retrieved})
        hello = next(i for i, m in enumerate(messages) if m.get("content") == "hello there")
        assert position < hello
        assert messages[-1]["content"] == "what is on the glacier packing list?"


async def test_without_retrieval_the_model_gets_no_retrieved_context(database_url: str) -> None:
    async with desk(database_url, pb.RetrievalSettings(search_tool=False)) as d:
        d.fake.script(Reply.text("Hi.", usage=(50, 5)))
        await run(d, "what is on the glacier packing list?")
        body = d.fake.requests[0].body
        assert not any(t.startswith("Retrieved context") for t in system_texts(body))
        assert "tools" not in body


async def test_the_model_searches_memory_itself_and_bad_arguments_are_tool_errors(
    database_url: str,
) -> None:
    async with desk(database_url, pb.RetrievalSettings(search_tool=True)) as d:
        described = await d.dstub.DescribeConversation(
            pb.DescribeConversationRequest(conversation=d.conversation, assistant=d.assistant),
            metadata=d.world.viewer.md,
            timeout=CALL_DEADLINE_S,
        )
        assert [t.function_name for t in described.tools] == ["search_memory"]
        assert not described.tools[0].requires_approval

        def answer(body: dict[str, Any]) -> Reply:
            outputs = [m["content"] for m in body["messages"] if m.get("role") == "tool"]
            return Reply.text(" | ".join(outputs), usage=(100, 10))

        d.fake.script(
            Reply.tool_calls(
                [
                    ("search_memory", {"query": "team lead", "mode": "full_text"}, "good"),
                    ("search_memory", {"query": "packing", "limit": 50}, "limit"),
                    ("search_memory", {"query": "packing", "filter": "colour = blue"}, "filter"),
                ],
                usage=(100, 10),
            ),
            answer,
        )
        final = await run(d, "who leads the team?")
        first = d.fake.requests[0].body
        offered = [tool["function"] for tool in first["tools"]]
        assert [f["name"] for f in offered] == ["search_memory"]
        assert offered[0]["parameters"]["required"] == ["query"]
        assert final.tool_call_count == 3

        second = d.fake.requests[1].body
        results = {
            m["tool_call_id"]: m["content"] for m in second["messages"] if m["role"] == "tool"
        }
        found = json.loads(results["good"])
        assert found["mode"] == "full_text"
        # The memory fact, and the run's own question: a message of the conversation is
        # found by its words as soon as it is stored (the tool searches both).
        by_text = {r["text"]: r for r in found["results"]}
        assert set(by_text) == {"The team lead is Ada", "who leads the team?"}
        assert by_text["The team lead is Ada"]["source"].startswith(
            f"memory fact {d.world.name}/memories/"
        )
        assert by_text["who leads the team?"]["source"].startswith("message ")
        assert "limit must be an integer from 1 to 10" in results["limit"]
        assert "The search was refused: filter" in results["filter"]
        assert "colour" in results["filter"]

        # Stored like any tool's steps (the next run's window holds them); a built-in's
        # result names no tool resource.
        stored = await all_messages(d.stub, d.world.viewer, d.conversation)
        outcomes = {
            part.tool_result.id: (part.tool_result.outcome, part.tool_result.tool)
            for message in stored
            for part in message.parts
            if part.HasField("tool_result")
        }
        assert outcomes == {
            "good": ("succeeded", ""),
            "limit": ("error", ""),
            "filter": ("error", ""),
        }


async def test_semantic_retrieval_finds_a_paraphrase_for_the_model(database_url: str) -> None:
    """With the local embeddings server: the note shares no word with the question, and
    the model still gets it, retrieved by meaning."""
    retrieval = pb.RetrievalSettings(enabled=True, top_k=2, mode=cpb.SEARCH_MODE_SEMANTIC)
    async with FakeEmbeddings() as embeddings, desk(database_url, retrieval, embeddings.url) as d:
        domain = built(d.server, ContextDomain)
        await set_index(d.stub, d.world.owner, d.world.name, embedding_model=MODEL, dimensions=64)
        tea = await remember(
            d.stub, d.world.editor, d.world.name, "The user prefers tea over coffee"
        )
        await ready(d, domain)
        d.fake.script(Reply.text("Tea.", usage=(50, 5)))
        await run(d, "What drink does the customer like?")
        retrieved = next(
            t for t in system_texts(d.fake.requests[0].body) if t.startswith("Retrieved context")
        )
        assert f"[1] memory fact {tea.name}: The user prefers tea over coffee" in retrieved
