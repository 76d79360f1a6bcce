"""Tool calls and tool results in conversations, through the real service, on
SQLite and PostgreSQL: how they are validated, stored, counted and announced,
and how context windows and pruning keep a call together with its results."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.context.text.tokencount import MESSAGE_OVERHEAD, ApproxTokenCounter
from switchboard.settings import Settings
from switchboard.shared.parttext import render_parts
from tests.conftest import CALL_DEADLINE_S, make_settings
from tests.kits.authkit import reason
from tests.kits.contextkit import (
    OVER_BUDGET,
    RECENT,
    SUMMARY,
    EventTap,
    Stub,
    World,
    all_messages,
    append,
    create_conversation,
    events_fixture,
    get_conversation,
    refused,
    struct,
    stub_fixture,
    text_message,
    violations,
    window,
    world_fixture,
)

pytestmark = [pytest.mark.service, pytest.mark.asyncio]

INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
DENIED = grpc.StatusCode.PERMISSION_DENIED
NOT_FOUND = grpc.StatusCode.NOT_FOUND
USER = pb.MESSAGE_ROLE_USER
ASSISTANT = pb.MESSAGE_ROLE_ASSISTANT
TOOL = pb.MESSAGE_ROLE_TOOL
COUNTER = ApproxTokenCounter()


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url=database_url)


stub, world, events = stub_fixture, world_fixture, events_fixture


def forecast(world: World) -> str:
    return f"{world.name}/integrations/weather/tools/forecast"


def call_part(
    call_id: str, function_name: str = "forecast", tool: str = "", **arguments: Any
) -> pb.ContentPart:
    return pb.ContentPart(
        tool_call=pb.ToolCallContent(
            id=call_id, tool=tool, function_name=function_name, arguments=struct(**arguments)
        )
    )


def result_part(
    call_id: str, text: str = "", outcome: str = "succeeded", tool: str = ""
) -> pb.ContentPart:
    return pb.ContentPart(
        tool_result=pb.ToolResultContent(id=call_id, tool=tool, outcome=outcome, text=text)
    )


def calling(text: str, *calls: pb.ContentPart) -> pb.Message:
    """An assistant message: its text, then its tool calls."""
    return pb.Message(role=ASSISTANT, parts=[pb.ContentPart(text=text), *calls])


def answering(*results: pb.ContentPart) -> pb.Message:
    return pb.Message(role=TOOL, parts=list(results))


def shown(win: pb.ContextWindow) -> list[str]:
    return [i.message.name for i in win.included if i.HasField("message")]


def left_out(win: pb.ContextWindow) -> list[tuple[str, int]]:
    return [(i.message.name, i.reason) for i in win.excluded if i.HasField("message")]


# -- storing, counting, announcing -----------------------------------------------------------


async def test_tool_messages_are_stored_counted_announced_and_windowed(
    stub: Stub, world: World, events: EventTap
) -> None:
    conversation = await create_conversation(stub, world.editor, world.name)
    events.take()
    asked = await append(stub, world.editor, conversation.name, "Weather in Oslo?")
    call = calling(
        "Let me look that up.",
        call_part("call_1", tool=forecast(world), city="Oslo", days=3),
    )
    made = await append(stub, world.editor, conversation.name, message=call)
    answer = answering(
        result_part("call_1", "Sunny, 21 degrees, light wind.", tool=forecast(world))
    )
    answered = await append(stub, world.editor, conversation.name, message=answer)

    # Stored as sent, and counted as rendered: the call with its arguments as
    # compact JSON, the result with its outcome line and its text.
    for request, stored in ((call, made), (answer, answered)):
        assert list(stored.parts) == list(request.parts)
        assert stored.role == request.role
        assert stored.token_count == COUNTER.count(render_parts(request.parts)) + MESSAGE_OVERHEAD
    assert render_parts(made.parts) == (
        'Let me look that up.\n[tool call forecast({"city":"Oslo","days":3})]'
    )
    assert render_parts(answered.parts) == (
        f"[tool result {forecast(world)}: succeeded]\nSunny, 21 degrees, light wind."
    )
    assert (
        made.token_count
        > (
            await append(
                stub, world.editor, conversation.name, message=calling("Let me look that up.")
            )
        ).token_count
    )

    # The count grows with the tool's text.
    longer = await append(
        stub,
        world.editor,
        conversation.name,
        message=answering(result_part("call_1", "Sunny, 21 degrees, light wind. " * 20)),
    )
    assert longer.token_count > answered.token_count + 20

    # Announced like any message, parts and all.
    created = [e for e in events.take() if e.type == events_pb2.EVENT_TYPE_MESSAGE_CREATED]
    assert [e.message_created.message for e in created][:3] == [asked, made, answered]
    listed = await all_messages(stub, world.viewer, conversation.name)
    assert listed[1:3] == [made, answered]

    # A window with room for everything shows every message with its count.
    win = await window(stub, world.viewer, conversation.name, 10_000)
    messages = [i for i in win.included if i.HasField("message")]
    assert [i.message for i in messages] == listed
    assert all(i.reason == RECENT and i.token_count == i.message.token_count for i in messages)
    assert win.total_tokens == sum(m.token_count for m in listed)


# -- the window keeps a call and its results together -------------------------------------


async def test_a_budget_that_would_split_a_call_from_its_results_drops_the_results(
    stub: Stub, world: World
) -> None:
    conversation = await create_conversation(stub, world.editor, world.name)
    name = conversation.name
    m = [
        await append(stub, world.editor, name, "Weather in Oslo and Bergen?"),
        await append(
            stub,
            world.editor,
            name,
            message=calling(
                "Checking both cities now.",
                call_part("call_a", city="Oslo"),
                call_part("call_b", city="Bergen"),
            ),
        ),
        await append(
            stub, world.editor, name, message=answering(result_part("call_a", "Oslo: sunny"))
        ),
        await append(
            stub, world.editor, name, message=answering(result_part("call_b", "Bergen: rain"))
        ),
        await append(
            stub,
            world.editor,
            name,
            message=text_message("Sunny in Oslo, rain in Bergen.", role=ASSISTANT),
        ),
    ]
    cost = [x.token_count for x in m]

    # Room for the call with its results: all four newest.
    whole = sum(cost[1:])
    win = await window(stub, world.viewer, name, whole)
    assert shown(win) == [x.name for x in m[1:]]
    assert win.total_tokens == whole
    assert left_out(win) == [(m[0].name, OVER_BUDGET)]

    # One token short of the call: its results would open the window without
    # it, so they are left out too, newest first, before the call.
    win = await window(stub, world.viewer, name, whole - 1)
    assert shown(win) == [m[4].name]
    assert win.total_tokens == cost[4]
    assert left_out(win) == [
        (m[3].name, OVER_BUDGET),
        (m[2].name, OVER_BUDGET),
        (m[1].name, OVER_BUDGET),
    ]
    assert win.omitted_messages == 1

    # Room for only one result: the same cut.
    win = await window(stub, world.viewer, name, cost[3] + cost[4])
    assert shown(win) == [m[4].name]
    assert left_out(win) == [(m[3].name, OVER_BUDGET), (m[2].name, OVER_BUDGET)]
    assert win.omitted_messages == 2


async def test_a_message_between_a_call_and_its_result_is_cut_with_the_call(
    stub: Stub, world: World
) -> None:
    conversation = await create_conversation(stub, world.editor, world.name)
    name = conversation.name
    call = await append(stub, world.editor, name, message=calling("On it.", call_part("c1")))
    aside = await append(stub, world.editor, name, "Also, take your time.")
    result = await append(stub, world.editor, name, message=answering(result_part("c1", "done")))
    final = await append(stub, world.editor, name, message=text_message("Done.", role=ASSISTANT))
    budget = aside.token_count + result.token_count + final.token_count
    win = await window(stub, world.viewer, name, budget)
    # The call did not fit, so its result goes, and with it everything older.
    assert shown(win) == [final.name]
    assert left_out(win) == [
        (result.name, OVER_BUDGET),
        (aside.name, OVER_BUDGET),
        (call.name, OVER_BUDGET),
    ]
    assert shown(await window(stub, world.viewer, name, budget + call.token_count)) == [
        call.name,
        aside.name,
        result.name,
        final.name,
    ]


async def test_pruning_summarizes_tool_outcomes_briefly_and_windows_skip_orphaned_results(
    stub: Stub, world: World
) -> None:
    conversation = await create_conversation(stub, world.editor, world.name)
    name = conversation.name
    await append(stub, world.editor, name, "Weather in Oslo?")
    await append(
        stub,
        world.editor,
        name,
        message=calling(
            "Checking the forecast.", call_part("c1", tool=forecast(world), city="Zanzibar")
        ),
    )
    result = await append(
        stub,
        world.editor,
        name,
        message=answering(result_part("c1", "Drizzle expected overnight.", tool=forecast(world))),
    )
    final = await append(
        stub, world.editor, name, message=text_message("Sunny in Oslo.", role=ASSISTANT)
    )
    response = await stub.PruneConversation(
        pb.PruneConversationRequest(conversation=name, keep_last_messages=2),
        metadata=world.editor.md,
        timeout=CALL_DEADLINE_S,
    )
    assert (response.pruned_message_count, response.kept_message_count) == (2, 2)
    summary = response.summary.content
    # What happened, not the payloads: no arguments, no tool output.
    assert "assistant: [tool call forecast]" in summary
    assert "Checking the forecast." in summary
    assert "Zanzibar" not in summary
    assert (await get_conversation(stub, world.viewer, name)).message_count == 2

    # The live result whose call was pruned away is never shown on its own.
    win = await window(stub, world.viewer, name, 10_000)
    assert [i.reason for i in win.included] == [SUMMARY, RECENT]
    assert shown(win) == [final.name]
    assert left_out(win) == [(result.name, OVER_BUDGET)]

    # Pruning the result folds its outcome into the summary, briefly.
    response = await stub.PruneConversation(
        pb.PruneConversationRequest(conversation=name, keep_last_messages=1),
        metadata=world.editor.md,
        timeout=CALL_DEADLINE_S,
    )
    assert response.pruned_message_count == 1
    assert f"tool: [tool result {forecast(world)}: succeeded]" in response.summary.content
    assert "Drizzle" not in response.summary.content


# -- validation -----------------------------------------------------------------------------


async def test_tool_parts_are_validated_with_precise_field_paths(
    stub: Stub, world: World, events: EventTap
) -> None:
    conversation = await create_conversation(stub, world.editor, world.name)
    events.take()
    other = f"workspaces/elsewhere-{world.id[:8]}/integrations/weather/tools/forecast"
    cases: list[tuple[pb.Message, list[str]]] = [
        # Calls only in assistant messages, results only in tool messages.
        (
            pb.Message(role=USER, parts=[pb.ContentPart(text="hi"), call_part("c1")]),
            ["message.parts[1].tool_call"],
        ),
        (calling("x", result_part("c1")), ["message.parts[1].tool_result"]),
        (
            pb.Message(role=pb.MESSAGE_ROLE_SYSTEM, parts=[result_part("c1")]),
            ["message.parts[0].tool_result"],
        ),
        (answering(call_part("c1")), ["message.parts[0].tool_call", "message.parts"]),
        (text_message("just text", role=TOOL), ["message.parts"]),
        # Ids.
        (calling("x", call_part("")), ["message.parts[1].tool_call.id"]),
        (calling("x", call_part("has space")), ["message.parts[1].tool_call.id"]),
        (calling("x", call_part("c" * 129)), ["message.parts[1].tool_call.id"]),
        (calling("x", call_part("c/1")), ["message.parts[1].tool_call.id"]),
        (answering(result_part("")), ["message.parts[0].tool_result.id"]),
        (
            calling("x", call_part("c1"), call_part("c1")),
            ["message.parts[2].tool_call.id"],
        ),
        (
            answering(result_part("c1"), result_part("c1")),
            ["message.parts[1].tool_result.id"],
        ),
        # Tools: a tool name in the conversation's workspace.
        (calling("x", call_part("c1", tool=other)), ["message.parts[1].tool_call.tool"]),
        (
            calling("x", call_part("c1", tool=f"{world.name}/integrations/weather")),
            ["message.parts[1].tool_call.tool"],
        ),
        (
            answering(result_part("c1", tool=f"{forecast(world)}\n")),
            ["message.parts[0].tool_result.tool"],
        ),
        (answering(result_part("c1", tool=other)), ["message.parts[0].tool_result.tool"]),
        # Function names.
        (calling("x", call_part("c1", "f" * 65)), ["message.parts[1].tool_call.function_name"]),
        (
            calling("x", call_part("c1", "get.weather")),
            ["message.parts[1].tool_call.function_name"],
        ),
        (calling("x", call_part("c1", "")), ["message.parts[1].tool_call.function_name"]),
        # Outcomes.
        (answering(result_part("c1", outcome="")), ["message.parts[0].tool_result.outcome"]),
        (answering(result_part("c1", outcome="ok")), ["message.parts[0].tool_result.outcome"]),
        # Everything wrong at once, in order.
        (
            pb.Message(
                role=USER,
                parts=[call_part("", ""), result_part("x y", outcome="maybe", tool=other)],
            ),
            [
                "message.parts[0].tool_call",
                "message.parts[0].tool_call.id",
                "message.parts[0].tool_call.function_name",
                "message.parts[1].tool_result",
                "message.parts[1].tool_result.id",
                "message.parts[1].tool_result.tool",
                "message.parts[1].tool_result.outcome",
            ],
        ),
    ]
    for message, fields in cases:
        error = await refused(
            append(stub, world.editor, conversation.name, message=message), INVALID
        )
        assert violations(error) == fields, (message, fields)

    # Arguments are bounded like metadata; text like any message content.
    error = await refused(
        append(
            stub,
            world.editor,
            conversation.name,
            message=calling("x", call_part("c1", blob="b" * 20_000)),
        ),
        EXHAUSTED,
    )
    assert reason(error) == "ERROR_REASON_REQUEST_TOO_LARGE"
    assert "message.parts[1].tool_call.arguments" in (error.details() or "")
    error = await refused(
        append(
            stub,
            world.editor,
            conversation.name,
            message=answering(result_part("c1", "t" * 300_000)),
        ),
        EXHAUSTED,
    )
    assert reason(error) == "ERROR_REASON_REQUEST_TOO_LARGE"

    # Nothing was stored or announced.
    assert (await get_conversation(stub, world.viewer, conversation.name)).message_count == 0
    assert events.take() == []

    # The edges are accepted: a 128-character id of every allowed character, a
    # 64-character function name, a call named by its tool only, every outcome,
    # and other parts next to a result.
    long_id = ("aZ09_.:-" * 16)[:128]
    accepted = [
        calling("x", call_part(long_id, "f" * 64)),
        calling("", call_part("c2", "", tool=forecast(world))),
        answering(result_part(long_id), pb.ContentPart(text="note")),
        *(
            answering(result_part("c2", outcome=outcome))
            for outcome in ("error", "failed", "denied")
        ),
    ]
    for message in accepted:
        stored = await append(stub, world.editor, conversation.name, message=message)
        assert list(stored.parts) == list(message.parts)

    # The existing rules of who may write hold for tool messages too.
    await refused(
        append(stub, world.viewer, conversation.name, message=answering(result_part("c1"))),
        DENIED,
    )
    await refused(
        append(stub, world.outsider, conversation.name, message=calling("x", call_part("c1"))),
        NOT_FOUND,
    )
