"""Traces nest (issue 71, "Seeing it"): a delegation tree is one trace, and each child
run's span sits under the span of the parent's tool call that asked it.

A traced all-in-one server (spans to the SDK's in-memory exporter, as in
tests/platform/observe/), the llm handler on the local OpenAI-compatible server scripted
per assistant: the planner asks pricing, and pricing asks stock, so the nesting is shown
at two levels. The client's SendMessage carries a ``traceparent``: every run of the tree,
and every model request, is in that trace."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from grpc import aio
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.mesh import create_server
from switchboard.platform.observe.telemetry import Tracing
from switchboard.platform.rpc.server import SwitchboardServer
from tests.conftest import make_settings
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.kits.contextkit import World, context_stub, create_conversation, ctx_world
from tests.kits.dispatchkit import Stub as DStub
from tests.kits.dispatchkit import dispatcher_stub, watch_all
from tests.kits.tracekit import Spans

pytestmark = [pytest.mark.service, pytest.mark.asyncio]

TIMEOUT_S = 30.0
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"


def hexid(value: int, width: int) -> str:
    return format(value, f"0{width}x")


@asynccontextmanager
async def traced(
    exporter: Spans, fake: FakeOpenAI
) -> AsyncIterator[tuple[SwitchboardServer, aio.Channel]]:
    tracing = Tracing.to_exporter(exporter, service_name="switchboard-test")
    server, _port = await create_server(
        make_settings(
            llm_base_url=fake.url,
            llm_model="m-1",
            llm_max_retries=0,
            egress_allow_loopback=True,
        ),
        tracing=tracing,
    )
    await server.start()
    try:
        async with aio.insecure_channel(server.address) as channel:
            yield server, channel
    finally:
        await server.shutdown(grace=0)


async def assistant(
    dstub: DStub, world: World, assistant_id: str, instructions: str, *delegates: str
) -> str:
    created = await dstub.CreateAssistant(
        pb.CreateAssistantRequest(
            parent=world.name,
            assistant_id=assistant_id,
            assistant=pb.Assistant(
                display_name=assistant_id.title(),
                instructions=instructions,
                delegates=[
                    pb.AssistantDelegate(assistant=f"{world.name}/assistants/{d}")
                    for d in delegates
                ],
            ),
        ),
        metadata=world.owner.md,
        timeout=TIMEOUT_S,
    )
    name: str = created.assistant.name
    return name


def asks(target: str, call_id: str) -> Callable[[dict[str, Any]], Reply]:
    """A model that asks ``target`` once, then answers with what it said."""

    def reply(body: dict[str, Any]) -> Reply:
        said = [m["content"] for m in body["messages"] if m["role"] == "tool"]
        if not said:
            return Reply.tool_calls([(f"ask_{target}", {"input": "well?"}, call_id)])
        return Reply.text(f"{target} says {said[0]}")

    return reply


def run_span(name: str) -> Callable[[list[ReadableSpan]], list[ReadableSpan]]:
    """The execution span of the run ``name``."""

    def pick(spans: list[ReadableSpan]) -> list[ReadableSpan]:
        return [
            s
            for s in spans
            if s.name.startswith("run ") and (s.attributes or {}).get("switchboard.run") == name
        ]

    return pick


def parent_of(spans: list[ReadableSpan], span: ReadableSpan) -> ReadableSpan:
    assert span.parent is not None, f"{span.name} has no parent"
    found = [s for s in spans if s.context is not None and s.context.span_id == span.parent.span_id]
    assert len(found) == 1, f"the parent of {span.name} was not recorded"
    return found[0]


async def test_a_child_runs_spans_are_under_the_parents_tool_call() -> None:
    exporter = Spans()
    async with FakeOpenAI() as fake:
        rules: dict[str, Callable[[dict[str, Any]], Reply]] = {
            "You plan.": asks("pricing", "c-price"),
            "You price things.": asks("stock", "c-stock"),
            "You count stock.": lambda body: Reply.text("seven kayaks"),
        }

        def brain(body: dict[str, Any]) -> Reply:
            """The rule of the assistant whose instructions the request carries."""
            return rules[str(body["messages"][0]["content"])](body)

        fake.script(*[brain] * 5)
        async with traced(exporter, fake) as (server, channel):
            cstub, dstub = context_stub(channel), dispatcher_stub(channel)
            world = await ctx_world(server, cstub)
            conversation = (await create_conversation(cstub, world.editor, world.name)).name
            await assistant(dstub, world, "stock", "You count stock.")
            await assistant(dstub, world, "pricing", "You price things.", "stock")
            planner = await assistant(dstub, world, "planner", "You plan.", "pricing")
            sent = await dstub.SendMessage(
                pb.SendMessageRequest(
                    conversation=conversation,
                    assistant=planner,
                    message=cpb.Message(parts=[cpb.ContentPart(text="a kayak?")]),
                ),
                metadata=(*world.editor.md, ("traceparent", TRACEPARENT)),
                timeout=TIMEOUT_S,
            )
            seen = await watch_all(dstub, world.viewer, sent.run.name)
            assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error
            assert seen.text == "pricing says stock says seven kayaks"
            tree = [seen.final]
            for _ in range(2):
                listed = await dstub.ListRuns(
                    pb.ListRunsRequest(parent=world.name, parent_run=tree[-1].name),
                    metadata=world.viewer.md,
                    timeout=TIMEOUT_S,
                )
                (asked_run,) = listed.runs
                tree.append(asked_run)
            # Each run's span ends with its run; the root's last.
            await exporter.wait_for(run_span(tree[0].name), "the planner's run span")

    # One trace: the caller's, through every level of the tree.
    assert [r.trace_id for r in tree] == [TRACE_ID] * 3
    spans = list(exporter.get_finished_spans())
    runs = [run_span(r.name)(spans) for r in tree]
    assert [len(found) for found in runs] == [1, 1, 1], "one execution span per run"
    root, child, grandchild = (found[0] for found in runs)
    assert {hexid(s.context.trace_id, 32) for s in (root, child, grandchild) if s.context} == {
        TRACE_ID
    }
    assert parent_of(spans, root).name.endswith("/SendMessage")
    # Each child's run span is the child of the span of the tool call that asked it,
    # and that span is the child of the asking run's own span.
    for asking, asked, run, call_id, tool in (
        (root, child, tree[1], "c-price", "ask_pricing"),
        (child, grandchild, tree[2], "c-stock", "ask_stock"),
    ):
        call = parent_of(spans, asked)
        assert call.name == f"tool {tool}"
        assert call.kind == SpanKind.INTERNAL
        assert dict(call.attributes or {}) == {
            "switchboard.tool": tool,
            "switchboard.tool_call": call_id,
            "switchboard.child_run": run.name,
        }
        assert parent_of(spans, call) is asking
        assert run.parent_tool_call == call_id
        # The tool call's span lasts while its child runs: it ends once the child has.
        assert call.end_time is not None
        assert asked.end_time is not None
        assert call.end_time >= asked.end_time
    # Every model request is the child of its own run's span, at any depth.
    by_instructions = {
        "You plan.": root,
        "You price things.": child,
        "You count stock.": grandchild,
    }
    for request in fake.requests:
        trace_id, parent_span = request.headers["traceparent"].split("-")[1:3]
        http = [
            s
            for s in spans
            if s.context is not None and hexid(s.context.span_id, 16) == parent_span
        ]
        assert trace_id == TRACE_ID
        assert len(http) == 1
        owner = by_instructions[str(request.body["messages"][0]["content"])]
        assert parent_of(spans, http[0]) is owner
