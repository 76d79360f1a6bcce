"""Runs that use tools, end to end with real parts: the llm handler against the local
OpenAI-compatible server (tests/fakes/openai_server.py: the hosted API cannot be
reached here), the reference MCP server from npm (server-everything) registered as an
integration, and an assistant enabling its tools.

What the issue asks to see: a model answer that calls ``get-sum`` (the reference
server's add), the hub calling the server, the final answer holding the sum and the
updates showing the call; cancel during a slow MCP tool (the server sees
``notifications/cancelled``); the tool messages in the next run's context. Calls that
wait for a person are test_approvals.py's, on the helpers here.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc import aio

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2, events_pb2_grpc
from switchboard.api.handler.v1 import handler_pb2 as hpb
from switchboard.api.integration.v1 import integration_pb2 as ipb
from switchboard.mesh import create_server
from switchboard.platform.rpc.server import SwitchboardServer
from tests.conftest import CALL_DEADLINE_S, make_settings
from tests.e2e.toolexpert import ToolExpert
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.infra.mcpeverything import EverythingServer
from tests.infra.mcpserver import McpTestServer
from tests.infra.webhookreceiver import until as eventually
from tests.kits.contextkit import (
    Stub,
    World,
    all_messages,
    context_stub,
    create_conversation,
    ctx_world,
    refused,
)
from tests.kits.dispatchkit import Stub as DStub
from tests.kits.dispatchkit import (
    Watched,
    cancel,
    dispatcher_stub,
    read_until,
    watch_all,
)
from tests.kits.integrationkit import create, integration_stub

pytestmark = pytest.mark.service

SUM = "ev__get-sum"
SLOW = "ev__trigger-long-running-operation"
IMAGE = "ev__get-tiny-image"


@pytest.fixture(scope="module")
def everything() -> Iterator[EverythingServer]:
    with EverythingServer() as server:
        yield server


@dataclass
class Tools:
    channel: aio.Channel
    server: SwitchboardServer
    fake: FakeOpenAI
    stub: Stub
    dstub: DStub
    world: World
    conversation: str
    assistant: str
    integration: str


def _settings(fake: FakeOpenAI, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "llm_base_url": fake.url,
        "llm_model": "m-1",
        "llm_max_retries": 0,
        "llm_prices": json.dumps({"m-1": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}),
        "egress_allow_loopback": True,
        "integration_probe_interval_s": 0,
    }
    values.update(overrides)
    return values


async def _prepare(
    server: SwitchboardServer,
    channel: aio.Channel,
    fake: FakeOpenAI,
    everything: EverythingServer,
    *,
    approval: tuple[str, ...] = (),
    enabled: tuple[str, ...] = ("get-sum", "trigger-long-running-operation"),
) -> Tools:
    """A workspace with the reference MCP server as integration ``ev`` and an
    assistant ``calc`` enabling ``enabled`` of its tools (``approval`` need a person)."""
    stub = context_stub(channel)
    world = await ctx_world(server, stub)
    conversation = (await create_conversation(stub, world.editor, world.name)).name
    made = await create(
        integration_stub(channel),
        world.owner,
        world.name,
        ipb.Integration(kind=ipb.INTEGRATION_KIND_MCP_SERVER, endpoint=everything.url),
        integration_id="ev",
    )
    created = await dispatcher_stub(channel).CreateAssistant(
        pb.CreateAssistantRequest(
            parent=world.name,
            assistant_id="calc",
            assistant=pb.Assistant(
                display_name="Calculator",
                instructions="You add numbers with the tool.",
                tools=[
                    pb.AssistantTools(
                        integration=made.name,
                        tools=list(enabled),
                        approval_required_tools=list(approval),
                    )
                ],
            ),
        ),
        metadata=world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    return Tools(
        channel,
        server,
        fake,
        stub,
        dispatcher_stub(channel),
        world,
        conversation,
        created.assistant.name,
        made.name,
    )


@asynccontextmanager
async def tool_mesh(
    everything: EverythingServer,
    *,
    approval: tuple[str, ...] = (),
    enabled: tuple[str, ...] = ("get-sum", "trigger-long-running-operation"),
    **overrides: Any,
) -> AsyncIterator[Tools]:
    async with FakeOpenAI() as fake:
        server, _ = await create_server(make_settings(**_settings(fake, **overrides)))
        await server.start()
        try:
            async with aio.insecure_channel(server.address) as channel:
                yield await _prepare(
                    server, channel, fake, everything, approval=approval, enabled=enabled
                )
        finally:
            await server.shutdown(grace=0)


def integration_stub_for(tools: Tools) -> Any:
    return integration_stub(tools.channel)


def ask(tools: Tools, text: str, **fields: Any) -> pb.SendMessageRequest:
    fields.setdefault("assistant", tools.assistant)
    request = pb.SendMessageRequest(
        conversation=tools.conversation,
        message=cpb.Message(parts=[cpb.ContentPart(text=text)]),
        **fields,
    )
    return request


def tool_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in body["messages"] if m.get("role") == "tool"]


def answer_with_tool_output(body: dict[str, Any]) -> Reply:
    """The model's second answer: what the tool said, quoted."""
    outputs = [m["content"] for m in tool_messages(body)]
    return Reply.text(f"The tool said: {' | '.join(outputs)}", usage=(200, 20))


def kinds(seen: Watched) -> list[str]:
    return [str(u.WhichOneof("update")) for u in seen.updates]


async def _send(tools: Tools, request: pb.SendMessageRequest) -> pb.Run:
    sent = await tools.dstub.SendMessage(
        request, metadata=tools.world.editor.md, timeout=CALL_DEADLINE_S
    )
    return sent.run


async def _paused(tools: Tools, run: str) -> tuple[aio.UnaryStreamCall[Any, Any], pb.Run]:
    """Watch ``run`` until it is REQUIRES_ACTION; the call stays open."""
    call = tools.dstub.WatchRun(
        pb.WatchRunRequest(name=run), metadata=tools.world.viewer.md, timeout=CALL_DEADLINE_S
    )
    seen: list[pb.RunUpdate] = []

    def paused(updates: list[pb.RunUpdate]) -> bool:
        last = updates[-1]
        return (
            last.WhichOneof("update") == "state_change"
            and last.state_change.run.state == pb.RUN_STATE_REQUIRES_ACTION
        )

    await read_until(call, seen, paused)
    return call, seen[-1].state_change.run


async def _decide(tools: Tools, run: str, call_id: str, decision: int, reason: str = "") -> pb.Run:
    response = await tools.dstub.SubmitToolApprovals(
        pb.SubmitToolApprovalsRequest(
            name=run,
            approvals=[
                pb.ToolApproval(
                    tool_call_id=call_id,
                    decision=decision,  # type: ignore[arg-type]
                    reason=reason,
                )
            ],
        ),
        metadata=tools.world.editor.md,
        timeout=CALL_DEADLINE_S,
    )
    return response.run


# -- the loop --------------------------------------------------------------------------------


async def test_the_model_calls_get_sum_through_the_hub_and_answers_with_the_sum(
    everything: EverythingServer,
) -> None:
    async with tool_mesh(everything) as tools:
        tools.fake.script(
            Reply.tool_calls(
                [(SUM, {"a": 2, "b": 3}, "call_1")], content="Let me add.", usage=(100, 10)
            ),
            answer_with_tool_output,
        )
        run = await _send(tools, ask(tools, "What is 2 + 3?"))
        seen = await watch_all(tools.dstub, tools.world.viewer, run.name)

        assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error
        order = [k for k in kinds(seen) if k != "state_change"]
        assert order.index("tool_call") < order.index("tool_result") < order.index("result")
        call = next(u.tool_call for u in seen.updates if u.WhichOneof("update") == "tool_call")
        assert (call.integration, call.tool, call.id) == (tools.integration, "get-sum", "call_1")
        assert dict(call.arguments) == {"a": 2, "b": 3}
        assert call.function_name == SUM
        assert not call.requires_approval
        result = next(
            u.tool_result for u in seen.updates if u.WhichOneof("update") == "tool_result"
        )
        assert result.outcome == hpb.TOOL_OUTCOME_SUCCEEDED
        assert result.tool == f"{tools.integration}/tools/get-sum"
        assert "5" in result.text
        assert result.duration.ToNanoseconds() > 0
        # The answer streamed to watchers holds the step's text and the sum.
        assert "Let me add." in seen.text
        assert "5" in seen.text
        final = seen.final
        assert final.tool_call_count == 1
        # Usage and cost add up over both model calls.
        assert (final.usage.input_tokens, final.usage.output_tokens) == (300, 30)
        assert final.usage.estimated_cost_usd == pytest.approx((300 * 1.0 + 30 * 2.0) / 1e6)

        # The model got the tools, the instructions first, and then its call answered.
        first, second = tools.fake.requests[0].body, tools.fake.requests[1].body
        names = {tool["function"]["name"] for tool in first["tools"]}
        assert names == {SUM, SLOW}
        assert first["messages"][0] == {
            "role": "system",
            "content": "You add numbers with the tool.",
        }
        calls = [m for m in second["messages"] if m.get("tool_calls")]
        assert calls[-1]["tool_calls"][0]["id"] == "call_1"
        answered = tool_messages(second)
        assert answered[-1]["tool_call_id"] == "call_1"
        assert "5" in answered[-1]["content"]


async def test_tool_messages_are_stored_and_the_next_run_sees_them(
    everything: EverythingServer,
) -> None:
    async with tool_mesh(everything) as tools:
        tools.fake.script(
            Reply.tool_calls([(SUM, {"a": 20, "b": 22}, "call_a")]),
            answer_with_tool_output,
            Reply.text("Still 42."),
        )
        first = await _send(tools, ask(tools, "What is 20 + 22?"))
        assert (await watch_all(tools.dstub, tools.world.editor, first.name)).final.state == (
            pb.RUN_STATE_SUCCEEDED
        )
        messages = await all_messages(tools.stub, tools.world.editor, tools.conversation)
        roles = [m.role for m in messages]
        assert roles == [
            cpb.MESSAGE_ROLE_USER,
            cpb.MESSAGE_ROLE_ASSISTANT,
            cpb.MESSAGE_ROLE_TOOL,
            cpb.MESSAGE_ROLE_ASSISTANT,
        ]
        step, output = messages[1], messages[2]
        assert step.parts[-1].tool_call.id == "call_a"
        assert step.run == first.name
        assert output.parts[0].tool_result.outcome == "succeeded"
        assert "42" in output.parts[0].tool_result.text
        assert output.token_count > 0

        second = await _send(tools, ask(tools, "And again?"))
        await watch_all(tools.dstub, tools.world.editor, second.name)
        history = tools.fake.requests[2].body["messages"]
        with_calls = [m for m in history if m.get("tool_calls")]
        assert with_calls
        assert with_calls[0]["tool_calls"][0]["id"] == "call_a"
        assert any(m.get("tool_call_id") == "call_a" and "42" in m["content"] for m in history)


async def test_an_image_a_tool_returns_reaches_the_model_watchers_and_the_tool_message(
    everything: EverythingServer,
) -> None:
    """server-everything's get-tiny-image: the PNG is a file of the result all the way."""
    async with tool_mesh(everything, enabled=("get-tiny-image",)) as tools:
        tools.fake.script(
            Reply.tool_calls([(IMAGE, {}, "call_img")]),
            answer_with_tool_output,
        )
        run = await _send(tools, ask(tools, "Show me the logo."))
        seen = await watch_all(tools.dstub, tools.world.viewer, run.name)
        assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error

        # Watchers see which file, never its bytes.
        shown = next(u.tool_result for u in seen.updates if u.WhichOneof("update") == "tool_result")
        (file,) = shown.files
        assert (file.display_name, file.mime_type) == ("image-1.png", "image/png")
        assert file.size_bytes > 100
        assert not file.inline_data
        # The model hears of it with the tool's text.
        answered = tool_messages(tools.fake.requests[1].body)[-1]["content"]
        assert "The image above is the MCP logo." in answered
        assert f"image-1.png (image/png, {file.size_bytes} bytes)" in answered

        messages = await all_messages(tools.stub, tools.world.editor, tools.conversation)
        output = next(m for m in messages if m.role == cpb.MESSAGE_ROLE_TOOL)
        (stored,) = output.parts[0].tool_result.files
        assert stored.mime_type == "image/png"
        assert stored.display_name == "image-1.png"
        # Stored as the workspace's file on append (the context service): the
        # message names it and keeps no bytes.
        assert stored.file.startswith(f"{tools.world.name}/files/")
        assert stored.size_bytes == file.size_bytes
        assert not stored.inline_data


async def test_a_failing_tool_goes_back_to_the_model_as_a_result_not_a_failed_run(
    everything: EverythingServer,
) -> None:
    async with tool_mesh(everything) as tools:
        tools.fake.script(
            # Arguments the tool's schema refuses, a tool that is not enabled, and
            # arguments that are not JSON: three results, one step, one run that succeeds.
            Reply.tool_calls(
                [
                    (SUM, {"a": "two"}, "bad_args"),
                    ("ev__echo", {"message": "hi"}, "not_enabled"),
                    (SUM, "{not json", "not_json"),
                ]
            ),
            answer_with_tool_output,
        )
        run = await _send(tools, ask(tools, "Break things"))
        seen = await watch_all(tools.dstub, tools.world.editor, run.name)
        assert seen.final.state == pb.RUN_STATE_SUCCEEDED
        results = {
            u.tool_result.id: u.tool_result
            for u in seen.updates
            if u.WhichOneof("update") == "tool_result"
        }
        assert {r.outcome for r in results.values()} == {hpb.TOOL_OUTCOME_FAILED}
        assert results["bad_args"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert results["not_enabled"].error.code == grpc.StatusCode.NOT_FOUND.value[0]
        assert "not a JSON object" in results["not_json"].text
        answered = {m["tool_call_id"] for m in tool_messages(tools.fake.requests[1].body)}
        assert answered == {"bad_args", "not_enabled", "not_json"}


async def test_the_step_limit_ends_with_an_answer_without_tools(
    everything: EverythingServer,
) -> None:
    async with tool_mesh(everything, dispatcher_max_tool_steps=1) as tools:
        tools.fake.script(
            Reply.tool_calls([(SUM, {"a": 1, "b": 1}, "c1")]),
            Reply.text("Two."),
        )
        run = await _send(tools, ask(tools, "1 + 1?"))
        seen = await watch_all(tools.dstub, tools.world.editor, run.name)
        assert seen.final.state == pb.RUN_STATE_SUCCEEDED
        assert "tools" not in tools.fake.requests[1].body or (
            tools.fake.requests[1].body.get("tool_choice") == "none"
        )


async def test_cancel_during_a_slow_mcp_tool_cancels_it_on_the_server(
    everything: EverythingServer,
) -> None:
    async with tool_mesh(everything) as tools:
        tools.fake.script(
            Reply.tool_calls([(SLOW, {"duration": 30, "steps": 30}, "slow_1")]),
        )
        before = everything.stderr().count("observed cancel")
        calls_before = everything.stderr().count("observed call trigger-long-running-operation")
        run = await _send(tools, ask(tools, "Take your time"))
        await eventually(
            lambda: (
                everything.stderr().count("observed call trigger-long-running-operation")
                > calls_before
            ),
            "the slow tool's call at the MCP server",
        )
        ended = await cancel(tools.dstub, tools.world.editor, run.name)
        assert ended.state == pb.RUN_STATE_CANCELLED
        await eventually(
            lambda: everything.stderr().count("observed cancel") > before,
            "notifications/cancelled at the MCP server",
        )


# -- what a conversation will use ------------------------------------------------------------


async def test_describe_conversation_shows_the_assistant_tools_and_approvals(
    everything: EverythingServer,
) -> None:
    async with tool_mesh(everything, approval=("get-sum",)) as tools:
        described = await tools.dstub.DescribeConversation(
            pb.DescribeConversationRequest(
                conversation=tools.conversation, assistant=tools.assistant
            ),
            metadata=tools.world.viewer.md,
            timeout=CALL_DEADLINE_S,
        )
        assert described.assistant.name == tools.assistant
        assert described.handler.name == "handlers/llm"
        by_name = {tool.function_name: tool for tool in described.tools}
        assert set(by_name) == {SUM, SLOW}
        assert by_name[SUM].requires_approval
        assert not by_name[SLOW].requires_approval
        assert by_name[SUM].tool == f"{tools.integration}/tools/get-sum"
        assert described.max_tool_steps > 0
        assert described.model == "primary/m-1"
        await refused(
            tools.dstub.DescribeConversation(
                pb.DescribeConversationRequest(conversation=tools.conversation),
                metadata=tools.world.outsider.md,
                timeout=CALL_DEADLINE_S,
            ),
            grpc.StatusCode.NOT_FOUND,
        )
        await refused(
            tools.dstub.DescribeConversation(
                pb.DescribeConversationRequest(
                    conversation=f"{tools.world.name}/conversations/gone"
                ),
                metadata=tools.world.viewer.md,
                timeout=CALL_DEADLINE_S,
            ),
            grpc.StatusCode.NOT_FOUND,
        )


# -- remote experts ---------------------------------------------------------------------------


async def test_an_interactive_expert_requests_a_tool_and_gets_the_result_on_its_stream(
    everything: EverythingServer,
) -> None:
    async with tool_mesh(everything) as tools, ToolExpert("calc") as expert:
        # No assistant names the expert's tools: it may call any tool of the workspace.
        expert.integration = tools.integration
        istub = integration_stub_for(tools)
        await create(
            istub,
            tools.world.owner,
            tools.world.name,
            ipb.Integration(
                kind=ipb.INTEGRATION_KIND_GRPC_HANDLER, endpoint=f"127.0.0.1:{expert.port}"
            ),
            integration_id="calc",
        )
        request = pb.SendMessageRequest(
            conversation=tools.conversation,
            handler="handlers/calc",
            message=cpb.Message(parts=[cpb.ContentPart(text='call get-sum {"a": 2, "b": 3}')]),
        )
        run = await _send(tools, request)
        seen = await watch_all(tools.dstub, tools.world.editor, run.name)
        assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error
        assert "SUCCEEDED" in seen.text
        assert "5" in seen.text
        result = next(
            u.tool_result for u in seen.updates if u.WhichOneof("update") == "tool_result"
        )
        assert result.tool == f"{tools.integration}/tools/get-sum"
        served = await expert.call(run.name)
        assert served.method == "HandleInteractive"
        assert [r.outcome for r in served.results] == [hpb.TOOL_OUTCOME_SUCCEEDED]


async def test_a_dropped_tool_call_and_then_its_open_circuit_are_told_to_the_model(
    everything: EverythingServer,
) -> None:
    async with tool_mesh(everything, integration_breaker_failures=1) as tools:
        with McpTestServer() as flaky:
            made = await create(
                integration_stub_for(tools),
                tools.world.owner,
                tools.world.name,
                ipb.Integration(kind=ipb.INTEGRATION_KIND_MCP_SERVER, endpoint=flaky.url),
                integration_id="flaky",
            )
            assistant = await tools.dstub.CreateAssistant(
                pb.CreateAssistantRequest(
                    parent=tools.world.name,
                    assistant_id="flaky",
                    assistant=pb.Assistant(
                        tools=[pb.AssistantTools(integration=made.name, tools=["crash", "echo"])]
                    ),
                ),
                metadata=tools.world.owner.md,
                timeout=CALL_DEADLINE_S,
            )
            # The server dies during the first call (the connection drops): one
            # failure opens the circuit, so the model's next call is refused at once.
            tools.fake.script(
                Reply.tool_calls([("flaky__crash", {}, "c1")]),
                Reply.tool_calls([("flaky__echo", {"message": "hi"}, "c2")]),
                answer_with_tool_output,
            )
            run = await _send(tools, ask(tools, "try it", assistant=assistant.assistant.name))
            seen = await watch_all(tools.dstub, tools.world.editor, run.name)
        assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error
        dropped, open_circuit = [
            u.tool_result for u in seen.updates if u.WhichOneof("update") == "tool_result"
        ]
        assert dropped.outcome == open_circuit.outcome == hpb.TOOL_OUTCOME_FAILED
        assert dropped.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert open_circuit.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert "unavailable now" in open_circuit.text
        told = tool_messages(tools.fake.requests[-1].body)
        assert [m["tool_call_id"] for m in told] == ["c1", "c2"]
        assert "unavailable now" in told[-1]["content"]


async def test_tool_calls_and_results_are_run_updated_events(everything: EverythingServer) -> None:
    async with tool_mesh(everything) as tools:
        tools.fake.script(
            Reply.tool_calls([(SUM, {"a": 7, "b": 8}, "c1")]), answer_with_tool_output
        )
        events = events_pb2_grpc.EventServiceStub(tools.channel)
        stream = events.Subscribe(
            events_pb2.SubscribeRequest(
                scopes=[events_pb2.Scope(conversation=tools.conversation)],
                types=[events_pb2.EVENT_TYPE_RUN_UPDATED],
            ),
            metadata=tools.world.viewer.md,
            timeout=CALL_DEADLINE_S,
        )
        await stream.wait_for_connection()
        await _send(tools, ask(tools, "7 + 8?"))
        kinds_seen: list[str] = []
        async for frame in stream:
            updates = [event.run_updated.update for event in frame.batch.events]
            kinds_seen += [str(update.WhichOneof("update")) for update in updates]
            if any(u.state_change.run.state == pb.RUN_STATE_SUCCEEDED for u in updates):
                break
        stream.cancel()
        assert "tool_call" in kinds_seen
        assert kinds_seen.index("tool_call") < kinds_seen.index("tool_result")
