"""switchboard.client and run trees (docs/delegation.md): a parent's watch names its
children (``RunWatch.children``, ``child_of``), ``children`` lists them with their links,
``tree`` walks a tree of three levels, and a child named by its parent is followed with
the same ``watch``. Against a real in-process server whose llm handler talks to the
local OpenAI-compatible server, scripted per assistant by the instructions each request
carries (as tests/dispatcher/runs/delegation/test_delegation.py does)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.client import (
    Child,
    Client,
    NotFound,
    PermissionDenied,
    RunFailed,
    RunWatch,
    SwitchboardError,
    child_of,
)
from tests.client.test_clientkit import PASSWORD, new_conversation, new_workspace, unique_email
from tests.conftest import make_settings, started
from tests.fakes.openai_server import FakeOpenAI, Reply

pytestmark = pytest.mark.service

DEADLINE_S = 60.0

Rule = Callable[[dict[str, Any]], Reply]


def _instructions(body: dict[str, Any]) -> str:
    return str(body["messages"][0]["content"])


def _tool_outputs(body: dict[str, Any]) -> dict[str, str]:
    return {m["tool_call_id"]: m["content"] for m in body["messages"] if m["role"] == "tool"}


def _asks(*calls: tuple[str, str, str], then: Callable[[dict[str, str]], str]) -> Rule:
    """A model that makes ``calls`` (function, input, call id) first, then answers
    with ``then`` of the tools' outputs by call id."""

    def rule(body: dict[str, Any]) -> Reply:
        done = _tool_outputs(body)
        if not done:
            return Reply.tool_calls([(name, {"input": text}, cid) for name, text, cid in calls])
        return Reply.text(then(done))

    return rule


@dataclass
class Desk:
    client: Client
    workspace: str
    conversation: str
    rules: dict[str, Rule]

    async def assistant(
        self, assistant_id: str, rule: Rule, delegates: tuple[str, ...] = ()
    ) -> str:
        instructions = f"You are {assistant_id}."
        self.rules[instructions] = rule
        created = await self.client.dispatcher.CreateAssistant(
            pb.CreateAssistantRequest(
                parent=self.workspace,
                assistant_id=assistant_id,
                assistant=pb.Assistant(
                    display_name=assistant_id.title(),
                    instructions=instructions,
                    delegates=[
                        pb.AssistantDelegate(assistant=f"{self.workspace}/assistants/{d}")
                        for d in delegates
                    ],
                ),
            )
        )
        name: str = created.assistant.name
        return name


@asynccontextmanager
async def desk() -> AsyncIterator[Desk]:
    rules: dict[str, Rule] = {}
    async with FakeOpenAI(default=lambda body: rules[_instructions(body)](body)) as fake:
        settings = make_settings(
            llm_base_url=fake.url,
            llm_model="m-1",
            llm_max_retries=0,
            egress_allow_loopback=True,
        )
        async with started(settings) as server, Client(server.address) as client:
            await client.register(unique_email("children"), PASSWORD)
            workspace = await new_workspace(client)
            conversation = await new_conversation(client, workspace)
            yield Desk(client, workspace, conversation, rules)


async def _updates(watch: RunWatch) -> list[pb.RunUpdate]:
    async with watch:
        return [update async for update in watch]


async def test_a_parents_watch_names_each_child_and_children_lists_them() -> None:
    async with desk() as d:
        await d.assistant("pricing", lambda body: Reply.text("400 euros"))
        await d.assistant("stock", lambda body: Reply.text("seven kayaks"))
        planner = await d.assistant(
            "planner",
            _asks(
                ("ask_pricing", "price of a kayak?", "c-price"),
                ("ask_stock", "kayaks in stock?", "c-stock"),
                then=lambda done: f"price: {done['c-price']}; stock: {done['c-stock']}",
            ),
            ("pricing", "stock"),
        )
        parent = await d.client.send(d.conversation, "can I buy a kayak?", assistant=planner)
        watch = d.client.watch(parent)
        updates = await asyncio.wait_for(_updates(watch), DEADLINE_S)
        assert watch.run is not None
        assert watch.run.state == pb.RUN_STATE_SUCCEEDED, watch.run.error

        # Each child is named twice on the parent's stream: when it starts, when it ends.
        named = [c for c in map(child_of, updates) if c is not None]
        assert len(named) == 4
        assert all(isinstance(c, Child) for c in named)
        for call_id in ("c-price", "c-stock"):
            mine = [c for c in named if c.tool_call_id == call_id]
            assert [c.ended for c in mine] == [False, True]
            assert mine[0].run == mine[1].run
            assert mine[0].usage is None
            assert mine[1].usage is not None
            assert mine[1].usage.output_tokens > 0
            assert mine[1].state == pb.RUN_STATE_SUCCEEDED
            assert mine[1].error is None
        assert [u.sequence for u in updates if u.HasField("child_run")] == [
            c.sequence for c in named
        ]
        # The watch keeps each child as its latest update showed it.
        assert {c.tool_call_id: c.state for c in watch.children.values()} == {
            "c-price": pb.RUN_STATE_SUCCEEDED,
            "c-stock": pb.RUN_STATE_SUCCEEDED,
        }
        by_call = {c.tool_call_id: c for c in watch.children.values()}
        assert by_call["c-price"].assistant == f"{d.workspace}/assistants/pricing"

        # ListRuns by parent: the same runs, linked to the parent, one level down.
        children = await d.client.children(parent)
        assert {c.name for c in children} == set(watch.children)
        for child in children:
            assert child.parent == parent.name
            assert child.depth == 1
            assert child.parent_tool_call == watch.children[child.name].tool_call_id
            assert not child.name.startswith(d.conversation + "/")
        # A child named on the parent's stream is followed with the same watch.
        answer = await asyncio.wait_for(d.client.watch(by_call["c-price"]).answer(), DEADLINE_S)
        assert answer.text == "400 euros"
        assert answer.run.parent == parent.name
        fetched = await d.client.get_run(by_call["c-stock"])
        assert (fetched.parent, fetched.parent_tool_call) == (parent.name, "c-stock")
        # A child of nothing has none.
        assert await d.client.children(by_call["c-stock"]) == []


async def test_tree_walks_a_parent_its_child_and_its_grandchild() -> None:
    async with desk() as d:
        await d.assistant("leaf", lambda body: Reply.text("the leaf's answer"))
        await d.assistant(
            "middle",
            _asks(("ask_leaf", "down you go", "c-leaf"), then=lambda done: done["c-leaf"]),
            ("leaf",),
        )
        top = await d.assistant(
            "top",
            _asks(("ask_middle", "ask below", "c-middle"), then=lambda done: done["c-middle"]),
            ("middle",),
        )
        answer = await asyncio.wait_for(d.client.ask(d.conversation, "go", assistant=top), 90.0)
        assert answer.text == "the leaf's answer"

        tree = await d.client.tree(answer.run.name)
        runs = tree.walk()
        assert [r.depth for r in runs] == [0, 1, 2]
        assert [r.assistant.rsplit("/", 1)[-1] for r in runs] == ["top", "middle", "leaf"]
        assert [r.parent for r in runs] == ["", runs[0].name, runs[1].name]
        assert [r.parent_tool_call for r in runs] == ["", "c-middle", "c-leaf"]
        assert all(r.state == pb.RUN_STATE_SUCCEEDED for r in runs)
        assert tree.children[0].children[0].children == []


async def test_a_child_that_failed_is_named_with_its_error() -> None:
    async with desk() as d:
        await d.assistant("broken", lambda body: Reply.error(400, message="no such model"))
        asker = await d.assistant(
            "asker",
            _asks(
                ("ask_broken", "help?", "c-broken"),
                then=lambda done: f"it said: {done['c-broken']}",
            ),
            ("broken",),
        )
        parent = await d.client.send(d.conversation, "try it", assistant=asker)
        watch = d.client.watch(parent)
        await asyncio.wait_for(_updates(watch), DEADLINE_S)
        assert watch.run is not None
        assert watch.run.state == pb.RUN_STATE_SUCCEEDED

        (child,) = watch.children.values()
        assert child.state == pb.RUN_STATE_FAILED
        assert isinstance(child.error, SwitchboardError)
        assert child.error.code() != grpc.StatusCode.OK
        # The same error as the child run's own, read from its watch.
        with pytest.raises(RunFailed) as failed:
            await asyncio.wait_for(d.client.watch(child).answer(), DEADLINE_S)
        assert failed.value.code() == child.error.code()
        assert failed.value.reason == child.error.reason


async def test_children_refuses_what_is_not_a_run_and_maps_the_servers_answers() -> None:
    async with desk() as d:
        shapes = ("", "runs/r", d.conversation, f"{d.conversation}/runs/", "workspaces/w/x/c/y/r")
        for bad in shapes:
            with pytest.raises(ValueError, match="is not a run's name"):
                await d.client.children(bad)
        # A workspace the caller cannot read: the server's answer, typed.
        with pytest.raises((NotFound, PermissionDenied)):
            await d.client.children("workspaces/someone-else/conversations/c/runs/r")
