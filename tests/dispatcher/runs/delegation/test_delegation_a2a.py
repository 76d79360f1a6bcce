"""A delegate whose handler is an A2A agent (docs/delegation.md, "Experts and A2A agents as
children"): the child run is the agent's task. Here the agent is this very deployment's
own front door, in another workspace, reached through a card served over HTTP, as
tests/dispatcher/budgets/test_service.py reaches it. The child's answer names
the agent's task (its ``a2a_task`` part), which is the callee's own run; cancelling the
parent cancels the child, and the child's cancel reaches the agent (CancelTask): the
callee's run ends CANCELLED too."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from a2a.types import a2a_pb2 as a2a
from a2a.types import a2a_pb2_grpc
from google.protobuf import json_format
from grpc import aio

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.integration.v1 import integration_pb2 as ipb
from switchboard.platform.values import structs
from tests.conftest import CALL_DEADLINE_S
from tests.dispatcher.runs.delegation.test_delegation import (
    Desk,
    brain,
    desk,
    tool_outputs,
)
from tests.e2e.expertkit import until_listed
from tests.fakes.openai_server import Reply
from tests.infra.cardserver import card_server
from tests.kits.contextkit import World, ctx_world
from tests.kits.dispatchkit import until, watch_all
from tests.kits.integrationkit import create, integration_stub

pytestmark = [pytest.mark.service, pytest.mark.asyncio]


@asynccontextmanager
async def agent_delegate(d: Desk) -> AsyncIterator[World]:
    """In ``d``'s workspace: an assistant ``agent`` whose handler is an A2A agent (the
    assistant ``remote`` of another workspace, the world yielded, served by this same
    deployment's front door), and ``planner``, which may ask ``agent``."""
    callee = await ctx_world(d.server, d.cstub)
    async with aio.insecure_channel(d.server.address) as channel:
        await d.dstub.CreateAssistant(
            pb.CreateAssistantRequest(
                parent=callee.name,
                assistant_id="remote",
                assistant=pb.Assistant(display_name="Remote", instructions="You are remote."),
            ),
            metadata=callee.owner.md,
            timeout=CALL_DEADLINE_S,
        )
        a2a_stub: Any = a2a_pb2_grpc.A2AServiceStub(channel)  # type: ignore[no-untyped-call]
        card = await a2a_stub.GetExtendedAgentCard(
            a2a.GetExtendedAgentCardRequest(tenant=f"{callee.id}.remote"),
            metadata=callee.viewer.md,
            timeout=CALL_DEADLINE_S,
        )
        async with card_server(card) as card_url:
            await create(
                integration_stub(channel),
                d.world.owner,
                d.world.name,
                ipb.Integration(
                    kind=ipb.INTEGRATION_KIND_A2A_AGENT,
                    display_name="Remote agent",
                    endpoint=card_url,
                    credential=callee.editor.token,
                ),
                integration_id="remote-agent",
            )
            await until_listed(d.dstub, d.world, "handlers/remote-agent", available=True)
            await d.dstub.CreateAssistant(
                pb.CreateAssistantRequest(
                    parent=d.world.name,
                    assistant_id="agent",
                    assistant=pb.Assistant(
                        display_name="Agent",
                        description="Asks the remote agent.",
                        handler="handlers/remote-agent",
                    ),
                ),
                metadata=d.world.owner.md,
                timeout=CALL_DEADLINE_S,
            )
            await d.assistant("planner", "You plan.", ("agent",))
            yield callee


def plan(body: dict[str, Any]) -> Reply:
    done = tool_outputs(body)
    if not done:
        return Reply.tool_calls([("ask_agent", {"input": "hello over there"}, "c-1")])
    return Reply.text(f"they said: {said(done['c-1'])}")


def said(output: str) -> str:
    """The agent's words in a tool output (its answer's data follows, as JSON)."""
    return output.split("\n\n", maxsplit=1)[0]


def task_tie(seen: list[pb.RunUpdate]) -> dict[str, Any]:
    """The ``a2a_task`` data part of the child's answer, as the parent's tool result
    keeps it (``ToolResult.result``'s ``data``)."""
    [result] = [u.tool_result for u in seen if u.HasField("tool_result")]
    listed = structs.plain(result.result.fields["data"])
    assert isinstance(listed, list)
    [tie] = [item["a2a_task"] for item in listed]
    return dict(tie)


async def callee_runs(d: Desk, callee: World) -> list[pb.Run]:
    listed = await d.dstub.ListRuns(
        pb.ListRunsRequest(parent=callee.name), metadata=callee.viewer.md, timeout=CALL_DEADLINE_S
    )
    return list(listed.runs)


async def test_an_a2a_agent_answers_as_a_child_and_its_task_is_named(database_url: str) -> None:
    async with (
        desk(database_url, integration_probe_interval_s=0) as d,
        agent_delegate(d) as callee,
    ):
        rules = {"You plan.": plan, "You are remote.": lambda body: Reply.text("hi back")}
        d.fake.script(*[brain(rules)] * 3)
        parent = await d.send(f"{d.world.name}/assistants/planner", "say hello to them")
        seen = await watch_all(d.dstub, d.world.viewer, parent.name)
        assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error
        assert seen.text == "they said: hi back"
        [child] = await d.children(parent.name)
        assert child.handler == "handlers/remote-agent"
        # The child's answer names the agent's task: the callee's own run.
        answer = await d.cstub.GetMessage(
            cpb.GetMessageRequest(name=child.output_message),
            metadata=d.world.viewer.md,
            timeout=CALL_DEADLINE_S,
        )
        [tie] = [
            json_format.MessageToDict(p.data)["a2a_task"]
            for p in answer.message.parts
            if p.WhichOneof("part") == "data"
        ]
        [remote] = await callee_runs(d, callee)
        conversation, run = remote.name.split("/")[3], remote.name.split("/")[5]
        assert tie["task"] == f"{conversation}.{run}"
        assert tie["state"] == "completed"


async def test_cancelling_the_parent_reaches_the_agents_task(database_url: str) -> None:
    async with (
        desk(database_url, integration_probe_interval_s=0) as d,
        agent_delegate(d) as callee,
    ):
        never = asyncio.Event()
        d.fake.script(
            brain({"You plan.": plan}),
            brain({"You are remote.": lambda body: Reply(content="later", gate=never)}),
        )
        parent = await d.send(f"{d.world.name}/assistants/planner", "say hello to them")
        call, seen = await until(d.dstub, d.world.viewer, parent.name, "child_run")
        call.cancel()
        child = seen[-1].child_run.run
        await d.fake.wait_requests(2)  # the callee's model call is under way
        [remote] = await callee_runs(d, callee)
        await d.dstub.CancelRun(
            pb.CancelRunRequest(name=parent.name, reason="never mind"),
            metadata=d.world.editor.md,
            timeout=CALL_DEADLINE_S,
        )
        assert (await watch_all(d.dstub, d.world.viewer, child)).final.state == (
            pb.RUN_STATE_CANCELLED
        )
        ended = await watch_all(d.dstub, callee.viewer, remote.name)
        assert ended.final.state == pb.RUN_STATE_CANCELLED


async def test_a_delegate_naming_the_agents_handler_asks_it_without_an_assistant(
    database_url: str,
) -> None:
    """The same agent named directly (``AssistantDelegate.handler``): the child run is
    the agent's task with no assistant of this workspace in between."""
    async with (
        desk(database_url, integration_probe_interval_s=0) as d,
        agent_delegate(d) as callee,
    ):
        await d.dstub.CreateAssistant(
            pb.CreateAssistantRequest(
                parent=d.world.name,
                assistant_id="direct",
                assistant=pb.Assistant(
                    display_name="Direct",
                    instructions="You ask directly.",
                    delegates=[pb.AssistantDelegate(handler="handlers/remote-agent")],
                ),
            ),
            metadata=d.world.owner.md,
            timeout=CALL_DEADLINE_S,
        )

        def ask(body: dict[str, Any]) -> Reply:
            done = tool_outputs(body)
            if not done:
                return Reply.tool_calls([("ask_remote-agent", {"input": "hello"}, "c-1")])
            assert '"a2a_task"' in done["c-1"]  # the model reads the answer's data too
            return Reply.text(f"they said: {said(done['c-1'])}")

        rules = {"You ask directly.": ask, "You are remote.": lambda body: Reply.text("hi back")}
        d.fake.script(*[brain(rules)] * 3)
        parent = await d.send(f"{d.world.name}/assistants/direct", "say hello to them")
        seen = await watch_all(d.dstub, d.world.viewer, parent.name)
        assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error
        assert seen.text == "they said: hi back"
        [child] = await d.children(parent.name)
        assert (child.handler, child.assistant) == ("handlers/remote-agent", "")
        [remote] = await callee_runs(d, callee)
        assert remote.state == pb.RUN_STATE_SUCCEEDED
        conversation, run = remote.name.split("/")[3], remote.name.split("/")[5]
        assert task_tie(seen.updates)["task"] == f"{conversation}.{run}"
