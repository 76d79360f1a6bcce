"""The llm's retrieval pieces: the window's options from an assistant's settings,
retrieved results as the model reads them, and the ``search_memory`` arguments."""

from __future__ import annotations

from typing import Any

import pytest

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.handler.v1 import handler_pb2 as hpb
from switchboard.dispatcher.llm.conversation.messages import build_messages
from switchboard.dispatcher.llm.retrieval import _arguments, retrieval_options

pytestmark = pytest.mark.unit


def test_zero_settings_are_the_contract_defaults_within_the_window() -> None:
    assert retrieval_options(pb.RetrievalSettings(enabled=True), 4000) == cpb.RetrievalOptions(
        top_k=5, token_budget=1000
    )
    assert retrieval_options(pb.RetrievalSettings(token_budget=9000), 4000).token_budget == 4000
    given = pb.RetrievalSettings(top_k=7, token_budget=300, mode=cpb.SEARCH_MODE_HYBRID, filter="a")
    assert retrieval_options(given, 4000) == cpb.RetrievalOptions(
        top_k=7, token_budget=300, mode=cpb.SEARCH_MODE_HYBRID, filter="a"
    )


def test_retrieved_results_are_one_system_message_with_numbered_sources() -> None:
    window = cpb.ContextWindow()
    memory = window.included.add(reason=cpb.CONTEXT_ITEM_REASON_RETRIEVED)
    memory.retrieved.memory_item.CopyFrom(
        cpb.MemoryItem(name="workspaces/w/memories/m", kind=cpb.MEMORY_KIND_FACT, content="Ada")
    )
    chunk = window.included.add(reason=cpb.CONTEXT_ITEM_REASON_RETRIEVED)
    chunk.retrieved.document_chunk.CopyFrom(
        cpb.DocumentChunk(
            file="workspaces/w/files/f",
            display_name="report.pdf",
            start_offset=1200,
            end_offset=2700,
            text="the figures",
        )
    )
    said = window.included.add(reason=cpb.CONTEXT_ITEM_REASON_RETRIEVED)
    said.retrieved.message.CopyFrom(
        cpb.Message(
            name="workspaces/w/conversations/c/messages/1",
            role=cpb.MESSAGE_ROLE_USER,
            parts=[cpb.ContentPart(text="it was March")],
        )
    )
    recent = window.included.add(reason=cpb.CONTEXT_ITEM_REASON_RECENT)
    recent.message.CopyFrom(
        cpb.Message(role=cpb.MESSAGE_ROLE_USER, parts=[cpb.ContentPart(text="earlier")])
    )
    request = hpb.HandleRequest(instructions="Be brief.", context=window)
    messages = build_messages(request)
    assert messages[0] == {"role": "system", "content": "Be brief."}
    lines = messages[1]["content"].splitlines()
    assert lines[0].startswith("Retrieved context")
    assert lines[1:] == [
        "[1] memory fact workspaces/w/memories/m: Ada",
        "[2] document report.pdf (chars 1200-2700, workspaces/w/files/f): the figures",
        "[3] message user workspaces/w/conversations/c/messages/1: it was March",
    ]
    assert messages[2] == {"role": "user", "content": "earlier"}


def test_no_retrieved_results_no_retrieved_message() -> None:
    request = hpb.HandleRequest(instructions="Be brief.")
    assert [m["content"] for m in build_messages(request)] == ["Be brief.", ""]


@pytest.mark.parametrize(
    ("arguments", "problem"),
    [
        ({}, "query is required"),
        ({"query": "  "}, "query is required"),
        ({"query": 3}, "query is required"),
        ({"query": "x" * 2001}, "longer than 2,000"),
        ({"query": "x", "mode": "fuzzy"}, "mode must be one of full_text, semantic, hybrid"),
        ({"query": "x", "filter": 7}, "filter must be a string"),
        ({"query": "x", "filter": "k" * 1001}, "filter must be a string"),
        ({"query": "x", "limit": 0}, "limit must be an integer from 1 to 10"),
        ({"query": "x", "limit": 11}, "limit must be an integer from 1 to 10"),
        ({"query": "x", "limit": 2.5}, "limit must be an integer from 1 to 10"),
        ({"query": "x", "limit": True}, "limit must be an integer from 1 to 10"),
        ({"query": "x", "limit": "3"}, "limit must be an integer from 1 to 10"),
        ({"query": "x", "page_token": "t"}, "unknown argument: page_token"),
    ],
)
def test_bad_arguments_say_what_is_wrong(arguments: dict[str, Any], problem: str) -> None:
    request, said = _arguments(arguments)
    assert request is None
    assert problem in said


def test_good_arguments_become_the_request() -> None:
    request, said = _arguments(
        {"query": "trip", "mode": "hybrid", "filter": "kind = fact", "limit": 3.0}
    )
    assert said == ""
    assert request == cpb.SearchContextRequest(
        query="trip", mode=cpb.SEARCH_MODE_HYBRID, filter="kind = fact", page_size=3
    )
    assert _arguments({"query": "trip"})[0] == cpb.SearchContextRequest(query="trip", page_size=5)
