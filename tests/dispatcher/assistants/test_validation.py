"""What an assistant may hold (``dispatcher/assistants/validation.py``), through
CreateAssistant: each bad field named, the tools' integrations looked up in the
same workspace."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import pytest

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.handler.v1 import handler_pb2 as hpb
from tests.dispatcher.assistants.test_assistants import (
    Desk,
    create,
    desk_mesh,
    list_all,
    mcp_server,
)
from tests.kits.contextkit import context_stub, create_workspace, refused, violations

pytestmark = pytest.mark.service

CODE = grpc.StatusCode


@pytest.fixture
async def desk() -> AsyncIterator[Desk]:
    async with desk_mesh() as made:
        yield made


@pytest.mark.parametrize(
    ("assistant", "fields"),
    [
        (pb.Assistant(handler="handlers/nope"), ["assistant.handler"]),
        (pb.Assistant(handler="echo"), ["assistant.handler"]),
        (pb.Assistant(display_name="x" * 201), ["assistant.display_name"]),
        (pb.Assistant(description="x" * 2001), ["assistant.description"]),
        (pb.Assistant(instructions="x" * 32_001), ["assistant.instructions"]),
        (pb.Assistant(model=hpb.ModelSettings(temperature=2.5)), ["assistant.model.temperature"]),
        (pb.Assistant(model=hpb.ModelSettings(temperature=-0.1)), ["assistant.model.temperature"]),
        (
            pb.Assistant(model=hpb.ModelSettings(temperature=float("nan"))),
            ["assistant.model.temperature"],
        ),
        (pb.Assistant(model=hpb.ModelSettings(top_p=1.5)), ["assistant.model.top_p"]),
        (pb.Assistant(model=hpb.ModelSettings(provider="other")), ["assistant.model.provider"]),
        (
            pb.Assistant(model=hpb.ModelSettings(max_output_tokens=1_000_000)),
            ["assistant.model.max_output_tokens"],
        ),
        (pb.Assistant(context_token_budget=99), ["assistant.context_token_budget"]),
        (pb.Assistant(context_token_budget=1_000_001), ["assistant.context_token_budget"]),
        (pb.Assistant(max_tool_steps=33), ["assistant.max_tool_steps"]),
        (pb.Assistant(max_tool_steps=-1), ["assistant.max_tool_steps"]),
        (pb.Assistant(tools=[pb.AssistantTools()]), ["assistant.tools[0].integration"]),
        (
            pb.Assistant(tools=[pb.AssistantTools(integration="integrations/x")]),
            ["assistant.tools[0].integration"],
        ),
        (
            pb.Assistant(
                tools=[
                    pb.AssistantTools(integration=f"workspaces/w{i}/integrations/i")
                    for i in range(33)
                ]
            ),
            ["assistant.tools"],
        ),
        (pb.Assistant(retrieval=pb.RetrievalSettings(top_k=21)), ["assistant.retrieval.top_k"]),
        (pb.Assistant(retrieval=pb.RetrievalSettings(top_k=-1)), ["assistant.retrieval.top_k"]),
        (
            pb.Assistant(retrieval=pb.RetrievalSettings(token_budget=32_001)),
            ["assistant.retrieval.token_budget"],
        ),
        (
            pb.Assistant(retrieval=pb.RetrievalSettings(mode=cast(Any, 9))),
            ["assistant.retrieval.mode"],
        ),
        (
            pb.Assistant(retrieval=pb.RetrievalSettings(filter="kind = fact" + " " * 1000)),
            ["assistant.retrieval.filter"],
        ),
        (
            pb.Assistant(retrieval=pb.RetrievalSettings(filter="colour = blue")),
            ["assistant.retrieval.filter"],
        ),
        (
            pb.Assistant(retrieval=pb.RetrievalSettings(filter="create_time = soon")),
            ["assistant.retrieval.filter"],
        ),
        (
            pb.Assistant(model=hpb.ModelSettings(top_p=2), max_tool_steps=99, handler="x"),
            ["assistant.max_tool_steps", "assistant.model.top_p", "assistant.handler"],
        ),
    ],
)
async def test_a_malformed_assistant_names_each_bad_field(
    desk: Desk, assistant: pb.Assistant, fields: list[str]
) -> None:
    error = await refused(create(desk, assistant), CODE.INVALID_ARGUMENT)
    assert violations(error) == fields
    assert await list_all(desk) == []


async def test_tools_must_name_existing_integrations_of_the_same_workspace(desk: Desk) -> None:
    d = desk
    mine = await mcp_server(d, d.world.name, "mine")
    other = await create_workspace(context_stub(d.channel), d.world.owner, "Other")
    theirs = await mcp_server(d, other.name, "theirs")
    entry = pb.AssistantTools
    cases: list[tuple[list[pb.AssistantTools], list[str]]] = [
        (
            [entry(integration=f"{d.world.name}/integrations/missing")],
            ["assistant.tools[0].integration"],
        ),
        ([entry(integration=theirs)], ["assistant.tools[0].integration"]),
        (
            [entry(integration=mine), entry(integration=mine)],
            ["assistant.tools[1].integration"],
        ),
        ([entry(integration=mine, tools=["has space"])], ["assistant.tools[0].tools[0]"]),
        ([entry(integration=mine, tools=["a", "a"])], ["assistant.tools[0].tools[1]"]),
        (
            [entry(integration=mine, tools=[f"t{i}" for i in range(129)])],
            ["assistant.tools[0].tools"],
        ),
        (
            [entry(integration=mine, tools=["find"], approval_required_tools=["find", "open"])],
            ["assistant.tools[0].approval_required_tools[1]"],
        ),
    ]
    for tools, fields in cases:
        error = await refused(create(d, pb.Assistant(tools=tools)), CODE.INVALID_ARGUMENT)
        assert violations(error) == fields, tools
    # Approval without a tool list: every tool of the integration is enabled.
    made = await create(
        d, pb.Assistant(tools=[entry(integration=mine, approval_required_tools=["anything"])])
    )
    assert made.tools[0].integration == mine
