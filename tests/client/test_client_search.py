"""switchboard.client against a real in-process server: search by mode with a filter
(SearchContext, SearchMemoryItems) and a workspace's semantic index, through the
client's own methods. No embeddings endpoint: semantic requests fall back, and say so."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.client import Client, InvalidArgument
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.settings import Settings
from tests.client.test_clientkit import PASSWORD, new_conversation, new_workspace, unique_email
from tests.conftest import make_settings, started

pytestmark = pytest.mark.service


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url=database_url)


@pytest.fixture
async def signed_in(settings: Settings) -> AsyncIterator[tuple[Client, str]]:
    server: SwitchboardServer
    async with started(settings) as server, Client(server.address) as client:
        await client.register(unique_email("search"), PASSWORD)
        yield client, await new_workspace(client)


async def remember(client: Client, parent: str, content: str, kind: int) -> cpb.MemoryItem:
    response = await client.context.CreateMemoryItem(
        cpb.CreateMemoryItemRequest(
            parent=parent,
            memory_item=cpb.MemoryItem(content=content, kind=kind),  # type: ignore[arg-type]
        )
    )
    return response.memory_item


async def test_search_context_by_mode_and_filter_says_where_results_came_from(
    signed_in: tuple[Client, str],
) -> None:
    client, workspace = signed_in
    fact = await remember(
        client, workspace, "the boat is moored at pier nine", cpb.MEMORY_KIND_FACT
    )
    await remember(client, workspace, "prefers the boat over the train", cpb.MEMORY_KIND_PREFERENCE)
    conversation = await new_conversation(client, workspace)

    found = await client.search_context(
        conversation, "boat", mode=cpb.SEARCH_MODE_FULL_TEXT, filter="kind = fact"
    )
    assert found.mode == cpb.SEARCH_MODE_FULL_TEXT
    assert [r.memory_item.name for r in found.results] == [fact.name]
    assert found.results[0].WhichOneof("source") == "memory_item"
    assert found.results[0].scores.full_text_rank == 1

    both = await client.search_context(workspace, "boat", mode=cpb.SEARCH_MODE_FULL_TEXT)
    assert len(both.results) == 2
    assert both.results[0].score >= both.results[1].score

    # Semantic without an endpoint: full-text, with the reason.
    fallen = await client.search_context(workspace, "boat", mode=cpb.SEARCH_MODE_SEMANTIC)
    assert fallen.mode == cpb.SEARCH_MODE_FULL_TEXT
    assert fallen.fallback_reason == cpb.SEARCH_FALLBACK_REASON_NOT_CONFIGURED
    assert fallen.fallback_detail

    memory = await client.search_memory(
        workspace, "boat", mode=cpb.SEARCH_MODE_FULL_TEXT, filter="kind = preference"
    )
    assert [r.memory_item.content for r in memory.results] == ["prefers the boat over the train"]

    with pytest.raises(InvalidArgument) as bad:
        await client.search_context(workspace, "boat", filter="colour = blue")
    assert [v.field for v in bad.value.violations] == ["filter"]


async def test_the_semantic_index_is_read_and_changed(signed_in: tuple[Client, str]) -> None:
    client, workspace = signed_in
    index = await client.get_semantic_index(workspace)
    assert index.name == f"{workspace}/semanticIndex"
    assert not index.index_messages
    changed = await client.update_semantic_index(
        cpb.SemanticIndex(name=index.name, index_messages=True), ["index_messages"]
    )
    assert changed.index_messages
    assert (await client.get_semantic_index(workspace)).index_messages
    with pytest.raises(InvalidArgument):
        await client.update_semantic_index(
            cpb.SemanticIndex(name=index.name, dimensions=-1), ["dimensions"]
        )
