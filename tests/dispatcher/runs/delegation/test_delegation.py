"""Delegation (docs/delegation.md): an assistant asks the assistants it lists as
``delegates``, each offered to its model as an ``ask_{id}`` tool whose call is a child
run. End to end: the llm handler against the local OpenAI-compatible server (scripted
per assistant, by the instructions each request carries), the dispatcher and the
context service over a real database.

What the issue asks to see here: a parent with two children running at once, each in a
conversation of its own and linked to the parent; the parent's updates naming them;
ListRuns by parent; a cycle and a depth overflow refused before any model call; a
cancelled parent ending its child; bad delegates refused at configuration."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

import grpc
import pytest
import pytest_asyncio
from google.protobuf import field_mask_pb2, struct_pb2
from grpc import aio

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.handler.v1 import handler_pb2 as hpb
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.values import structs
from switchboard.settings import Settings
from tests.conftest import CALL_DEADLINE_S, make_settings, started
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.kits.contextkit import World, context_stub, create_conversation, ctx_world
from tests.kits.dispatchkit import Stub as DStub
from tests.kits.dispatchkit import dispatcher_stub, read_until, until, watch_all
from tests.kits.modulekit import module_channel_fixture, module_database_url_fixture

pytestmark = [pytest.mark.service, pytest.mark.asyncio(loop_scope="module")]


@dataclass
class Desk:
    server: SwitchboardServer
    fake: FakeOpenAI
    dstub: DStub
    cstub: Any
    world: World
    conversation: str

    async def assistant(
        self, assistant_id: str, instructions: str, delegates: tuple[str, ...] = ()
    ) -> str:
        created = await self.dstub.CreateAssistant(
            pb.CreateAssistantRequest(
                parent=self.world.name,
                assistant_id=assistant_id,
                assistant=pb.Assistant(
                    display_name=assistant_id.title(),
                    description=f"Knows about {assistant_id}.",
                    instructions=instructions,
                    delegates=[
                        pb.AssistantDelegate(assistant=f"{self.world.name}/assistants/{d}")
                        for d in delegates
                    ],
                ),
            ),
            metadata=self.world.owner.md,
            timeout=CALL_DEADLINE_S,
        )
        name: str = created.assistant.name
        return name

    async def hands_over(
        self, assistant: str, target: str, history: pb.HandoffHistory.ValueType
    ) -> None:
        """``assistant`` may hand its conversations to ``target`` (an id), which then
        sees ``history`` of them."""
        await self.dstub.UpdateAssistant(
            pb.UpdateAssistantRequest(
                assistant=pb.Assistant(
                    name=assistant,
                    handoffs=[
                        pb.AssistantHandoff(
                            assistant=f"{self.world.name}/assistants/{target}", history=history
                        )
                    ],
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["handoffs"]),
            ),
            metadata=self.world.owner.md,
            timeout=CALL_DEADLINE_S,
        )

    async def send(self, assistant: str, text: str) -> pb.Run:
        sent = await self.dstub.SendMessage(
            pb.SendMessageRequest(
                conversation=self.conversation,
                assistant=assistant,
                message=cpb.Message(parts=[cpb.ContentPart(text=text)]),
            ),
            metadata=self.world.editor.md,
            timeout=CALL_DEADLINE_S,
        )
        run: pb.Run = sent.run
        return run

    async def children(self, parent: str) -> list[pb.Run]:
        listed = await self.dstub.ListRuns(
            pb.ListRunsRequest(parent=self.world.name, parent_run=parent),
            metadata=self.world.viewer.md,
            timeout=CALL_DEADLINE_S,
        )
        return sorted(listed.runs, key=lambda r: r.parent_tool_call)


def _settings(database_url: str, fake: FakeOpenAI, **settings: Any) -> Settings:
    return make_settings(
        database_url=database_url,
        llm_base_url=fake.url,
        llm_model="m-1",
        llm_max_retries=0,
        egress_allow_loopback=True,
        **settings,
    )


async def _desk(server: SwitchboardServer, channel: aio.Channel, fake: FakeOpenAI) -> Desk:
    """A workspace, users and a conversation of their own on ``server``."""
    cstub = context_stub(channel)
    world = await ctx_world(server, cstub)
    conversation = (await create_conversation(cstub, world.editor, world.name)).name
    return Desk(server, fake, dispatcher_stub(channel), cstub, world, conversation)


@asynccontextmanager
async def desk(database_url: str, **settings: Any) -> AsyncIterator[Desk]:
    """A desk on a server of its own, for a test of a setting."""
    async with (
        FakeOpenAI() as fake,
        started(_settings(database_url, fake, **settings)) as server,
        aio.insecure_channel(server.address) as channel,
    ):
        yield await _desk(server, channel, fake)


# One model and one server per backend for the module (starting a server per test was most
# of the module's time); each test has a workspace, users and a conversation of its own.
@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def model() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as fake:
        yield fake


module_database_url = module_database_url_fixture


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(module_database_url: str, model: FakeOpenAI) -> AsyncIterator[SwitchboardServer]:
    async with started(_settings(module_database_url, model)) as server:
        yield server


channel = module_channel_fixture


@pytest_asyncio.fixture(name="d", loop_scope="module")
async def shared_desk(mesh: SwitchboardServer, channel: aio.Channel, model: FakeOpenAI) -> Desk:
    """A desk of the test's own on the module's server, with the model's script and its
    requests starting empty (tests read requests by their index)."""
    model.reset()
    return await _desk(mesh, channel, model)


def instructions(body: dict[str, Any]) -> str:
    return str(body["messages"][0]["content"])


def tool_outputs(body: dict[str, Any]) -> dict[str, str]:
    return {m["tool_call_id"]: m["content"] for m in body["messages"] if m["role"] == "tool"}


def this_turns_outputs(body: dict[str, Any]) -> list[str]:
    """The tool results after the request's last user message (earlier turns' are history)."""
    messages = body["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    return [m["content"] for m in messages[last:] if m["role"] == "tool"]


def brain(rules: dict[str, Callable[[dict[str, Any]], Reply]]) -> Callable[[dict[str, Any]], Reply]:
    """One scripted reply for any request: the rule of the assistant whose instructions
    the request carries."""
    return lambda body: rules[instructions(body)](body)


async def test_a_parent_asks_two_delegates_at_once_and_answers_with_both(
    d: Desk,
) -> None:
    await d.assistant("pricing", "You price things.")
    await d.assistant("stock", "You count stock.")
    planner = await d.assistant("planner", "You plan.", ("pricing", "stock"))
    # Each child's answer waits until both children asked the model: two children
    # run one after the other would never get there.
    both = asyncio.Event()

    def plan(body: dict[str, Any]) -> Reply:
        done = tool_outputs(body)
        if not done:
            return Reply.tool_calls(
                [
                    ("ask_pricing", {"input": "price of a kayak?"}, "c-price"),
                    ("ask_stock", {"input": "kayaks in stock?"}, "c-stock"),
                ]
            )
        return Reply.text(f"price: {done['c-price']}; stock: {done['c-stock']}")

    d.fake.script(
        *[
            brain(
                {
                    "You plan.": plan,
                    "You price things.": lambda body: Reply(content="400 euros", gate=both),
                    "You count stock.": lambda body: Reply(content="seven kayaks", gate=both),
                }
            )
        ]
        * 4
    )

    async def release() -> None:
        await d.fake.wait_requests(3)
        both.set()

    described = await d.dstub.DescribeConversation(
        pb.DescribeConversationRequest(conversation=d.conversation, assistant=planner),
        metadata=d.world.viewer.md,
        timeout=CALL_DEADLINE_S,
    )
    assert [t.function_name for t in described.tools] == ["ask_pricing", "ask_stock"]
    releasing = asyncio.create_task(release())
    parent = await d.send(planner, "can I buy a kayak?")
    seen = await watch_all(d.dstub, d.world.viewer, parent.name)
    await releasing
    assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error
    assert seen.text == "price: 400 euros; stock: seven kayaks"
    # What the planner's model was offered: one tool per delegate, with its input.
    offered = {t["function"]["name"]: t["function"] for t in d.fake.requests[0].body["tools"]}
    assert set(offered) == {"ask_pricing", "ask_stock"}
    assert offered["ask_pricing"]["description"] == "Knows about pricing."
    assert offered["ask_pricing"]["parameters"]["required"] == ["input"]

    # The children: linked to the parent, each in a conversation of its own.
    children = await d.children(parent.name)
    assert [c.parent_tool_call for c in children] == ["c-price", "c-stock"]
    for child in children:
        assert child.parent == parent.name
        assert child.depth == 1
        assert child.state == pb.RUN_STATE_SUCCEEDED
        assert not child.name.startswith(d.conversation + "/")
    assert len({c.name.rsplit("/runs/", 1)[0] for c in children}) == 2
    assert [c.assistant.rsplit("/", 1)[-1] for c in children] == ["pricing", "stock"]
    # The parent's updates name each child when it starts and when it ends.
    shown = [u.child_run for u in seen.updates if u.WhichOneof("update") == "child_run"]
    assert sorted((c.tool_call_id, c.state) for c in shown if c.state in TERMINAL) == [
        ("c-price", pb.RUN_STATE_SUCCEEDED),
        ("c-stock", pb.RUN_STATE_SUCCEEDED),
    ]
    assert {c.run for c in shown} == {c.name for c in children}
    assert all(c.usage.output_tokens > 0 for c in shown if c.state in TERMINAL)
    # GetRun shows the tree one level at a time.
    got = await d.dstub.GetRun(
        pb.GetRunRequest(name=parent.name), metadata=d.world.viewer.md, timeout=CALL_DEADLINE_S
    )
    assert sorted((c.run, c.tool_call_id, c.state) for c in got.run.children) == [
        (c.name, c.parent_tool_call, pb.RUN_STATE_SUCCEEDED)
        for c in sorted(children, key=lambda c: c.name)
    ]
    assert all(c.usage.output_tokens > 0 for c in got.run.children)
    # A run with no parent has none, and no children of its children.
    assert (parent.parent, parent.depth) == ("", 0)
    assert await d.children(children[0].name) == []


TERMINAL = {
    pb.RUN_STATE_SUCCEEDED,
    pb.RUN_STATE_FAILED,
    pb.RUN_STATE_CANCELLED,
    pb.RUN_STATE_DEADLINE_EXCEEDED,
}


async def test_a_cycle_is_refused_before_any_model_call(d: Desk) -> None:
    """A asks B, B asks A back: B's call is refused (an error result for B's model),
    and A's model is asked nothing more than its own run's steps."""
    first = await d.assistant("alpha", "You are alpha.")
    await d.assistant("beta", "You are beta.", ("alpha",))
    await d.dstub.UpdateAssistant(
        pb.UpdateAssistantRequest(
            assistant=pb.Assistant(
                name=first,
                delegates=[pb.AssistantDelegate(assistant=f"{d.world.name}/assistants/beta")],
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["delegates"]),
        ),
        metadata=d.world.owner.md,
        timeout=CALL_DEADLINE_S,
    )

    def ask(target: str, then: str) -> Callable[[dict[str, Any]], Reply]:
        def reply(body: dict[str, Any]) -> Reply:
            done = tool_outputs(body)
            if not done:
                return Reply.tool_calls([(f"ask_{target}", {"input": "well?"}, "c-1")])
            return Reply.text(f"{then}: {done['c-1']}")

        return reply

    d.fake.script(
        *[brain({"You are alpha.": ask("beta", "alpha"), "You are beta.": ask("alpha", "beta")})]
        * 4
    )
    parent = await d.send(first, "go")
    seen = await watch_all(d.dstub, d.world.viewer, parent.name)
    assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error
    asked = [instructions(r.body) for r in d.fake.requests]
    assert asked == ["You are alpha.", "You are beta.", "You are beta.", "You are alpha."]
    refusal = tool_outputs(d.fake.requests[2].body)["c-1"]
    assert "cycle (alpha -> beta -> alpha)" in refusal
    [child] = await d.children(parent.name)
    assert await d.children(child.name) == []


async def test_a_tree_deeper_than_the_setting_is_refused(database_url: str) -> None:
    async with desk(database_url, dispatcher_max_delegation_depth=1) as d:
        await d.assistant("gamma", "You are gamma.")
        await d.assistant("beta", "You are beta.", ("gamma",))
        first = await d.assistant("alpha", "You are alpha.", ("beta",))

        def ask(target: str) -> Callable[[dict[str, Any]], Reply]:
            def reply(body: dict[str, Any]) -> Reply:
                done = tool_outputs(body)
                if not done:
                    return Reply.tool_calls([(f"ask_{target}", {"input": "deeper?"}, "c-1")])
                return Reply.text(done["c-1"])

            return reply

        d.fake.script(*[brain({"You are alpha.": ask("beta"), "You are beta.": ask("gamma")})] * 4)
        parent = await d.send(first, "go")
        seen = await watch_all(d.dstub, d.world.viewer, parent.name)
        assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error
        assert "You are gamma." not in [instructions(r.body) for r in d.fake.requests]
        assert "at most 1 levels deep" in seen.text


async def test_cancelling_the_parent_cancels_its_child(d: Desk) -> None:
    await d.assistant("slow", "You are slow.")
    first = await d.assistant("boss", "You are the boss.", ("slow",))
    never = asyncio.Event()
    d.fake.script(
        brain(
            {
                "You are the boss.": lambda body: Reply.tool_calls(
                    [("ask_slow", {"input": "take your time"}, "c-1")]
                )
            }
        ),
        brain({"You are slow.": lambda body: Reply(content="later", gate=never)}),
    )
    parent = await d.send(first, "go")
    call, seen = await until(d.dstub, d.world.viewer, parent.name, "child_run")
    call.cancel()
    child = seen[-1].child_run.run
    await d.fake.wait_requests(2)  # the child's model call is under way
    await d.dstub.CancelRun(
        pb.CancelRunRequest(name=parent.name, reason="changed my mind"),
        metadata=d.world.editor.md,
        timeout=CALL_DEADLINE_S,
    )
    ended = await watch_all(d.dstub, d.world.viewer, child)
    assert ended.final.state == pb.RUN_STATE_CANCELLED
    assert "the run that asked it ended" in ended.final.error.message
    finished = await watch_all(d.dstub, d.world.viewer, parent.name)
    assert finished.final.state == pb.RUN_STATE_CANCELLED
    # The parent's stream shows the child end before its own end: a client
    # building the tree from it sees every child it saw start also end.
    shown = [
        (index, u.child_run.state)
        for index, u in enumerate(finished.updates)
        if u.HasField("child_run") and u.child_run.run == child
    ]
    assert shown[-1][1] == pb.RUN_STATE_CANCELLED, shown
    ends = [
        index
        for index, u in enumerate(finished.updates)
        if u.HasField("state_change") and u.state_change.run.state == pb.RUN_STATE_CANCELLED
    ]
    assert shown[-1][0] < ends[0]


async def test_bad_delegates_are_refused_and_nothing_is_stored(d: Desk) -> None:
    await d.assistant("known", "You know.")
    others = await ctx_world(d.server, d.cstub)
    cases = {
        "workspaces/x/assistants/known": "must be an assistant of",
        f"{d.world.name}/assistants/ghost": "names no assistant of this workspace",
        f"{d.world.name}/assistants/me": "an assistant cannot name itself in its delegates",
        f"{others.name}/assistants/known": "must be an assistant of",
        "not a name": "must be an assistant of",
    }
    for target, expected in cases.items():
        with pytest.raises(aio.AioRpcError) as refused:
            await d.dstub.CreateAssistant(
                pb.CreateAssistantRequest(
                    parent=d.world.name,
                    assistant_id="me",
                    assistant=pb.Assistant(
                        display_name="Me", delegates=[pb.AssistantDelegate(assistant=target)]
                    ),
                ),
                metadata=d.world.owner.md,
                timeout=CALL_DEADLINE_S,
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, target
        assert expected in (refused.value.details() or ""), (target, refused.value.details())
    listed = await d.dstub.ListAssistants(
        pb.ListAssistantsRequest(parent=d.world.name),
        metadata=d.world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    assert [a.name.rsplit("/", 1)[-1] for a in listed.assistants] == ["known"]
    with pytest.raises(aio.AioRpcError) as refused:
        await d.dstub.ListRuns(
            pb.ListRunsRequest(parent=d.world.name, parent_run="runs/nope"),
            metadata=d.world.viewer.md,
            timeout=CALL_DEADLINE_S,
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_handoff_and_a_hand_back_route_the_conversation(d: Desk) -> None:
    """Triage hands the conversation to billing: the next message, naming no assistant,
    goes to billing, which hands it back; the one after goes to triage again. A message
    that names an assistant goes to it whoever holds the conversation."""
    triage = await d.assistant("triage", "You are triage.")
    billing = await d.assistant("billing", "You are billing.")
    for name, target in ((triage, "billing"), (billing, "triage")):
        await d.dstub.UpdateAssistant(
            pb.UpdateAssistantRequest(
                assistant=pb.Assistant(
                    name=name,
                    handoffs=[pb.AssistantHandoff(assistant=f"{d.world.name}/assistants/{target}")],
                    workspace_default=name == triage,
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["handoffs", "workspace_default"]),
            ),
            metadata=d.world.owner.md,
            timeout=CALL_DEADLINE_S,
        )

    def hand(target: str, reason: str) -> Callable[[dict[str, Any]], Reply]:
        def reply(body: dict[str, Any]) -> Reply:
            if not this_turns_outputs(body):
                return Reply.tool_calls([(f"transfer_to_{target}", {"reason": reason}, "h-1")])
            return Reply.text(f"{target} takes over")

        return reply

    d.fake.script(
        brain({"You are triage.": hand("billing", "a refund question")}),
        brain({"You are triage.": hand("billing", "a refund question")}),
        brain({"You are billing.": hand("triage", "not about money")}),
        brain({"You are billing.": hand("triage", "not about money")}),
        brain({"You are triage.": lambda body: Reply.text("triage here")}),
        brain({"You are billing.": lambda body: Reply.text("billing, named")}),
    )
    first = await d.send("", "I want a refund")
    seen = await watch_all(d.dstub, d.world.viewer, first.name)
    assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error
    assert first.assistant == triage
    [handoff] = [u.handoff for u in seen.updates if u.WhichOneof("update") == "handoff"]
    assert (handoff.from_assistant, handoff.to_assistant, handoff.reason) == (
        triage,
        billing,
        "a refund question",
    )
    offered = [t["function"]["name"] for t in d.fake.requests[0].body["tools"]]
    assert offered == ["transfer_to_billing"]

    second = await d.send("", "it was order 42")
    assert second.assistant == billing
    assert "handed over to" in second.routing_reason
    ended = await watch_all(d.dstub, d.world.viewer, second.name)
    assert ended.final.state == pb.RUN_STATE_SUCCEEDED, ended.final.error
    # Billing's model saw the conversation so far, the handoff included.
    history = d.fake.requests[2].body["messages"]
    assert any(m.get("content") == "I want a refund" for m in history)
    assert any(
        call["function"]["name"] == "transfer_to_billing"
        for m in history
        for call in m.get("tool_calls") or []
    )

    third = await d.send("", "thanks")
    assert third.assistant == triage
    assert (await watch_all(d.dstub, d.world.viewer, third.name)).text == "triage here"
    # Named, billing answers, and the conversation stays with triage.
    named = await d.send(billing, "one more thing")
    assert (await watch_all(d.dstub, d.world.viewer, named.name)).text == "billing, named"
    d.fake.script(brain({"You are triage.": lambda body: Reply.text("still triage")}))
    after = await d.send("", "bye")
    assert after.assistant == triage
    assert (await watch_all(d.dstub, d.world.viewer, after.name)).text == "still triage"


async def test_a_cap_of_the_parents_assistant_pauses_the_child_and_the_parent_shows_why(
    d: Desk,
) -> None:
    """A child is charged to its ancestors' assistants' budgets too: a cap on the
    planner's budget, with room left but less than the child's step asks, pauses the
    child; the parent's stream shows the child paused and which budget it waits for;
    raising the cap lets the child, then the parent, finish."""
    await d.assistant("pricing", "You price things.")
    planner = await d.assistant("planner", "You plan.", ("pricing",))
    gate = asyncio.Event()

    def plan(body: dict[str, Any]) -> Reply:
        if not tool_outputs(body):
            called = Reply.tool_calls([("ask_pricing", {"input": "price?"}, "c-1")])
            return dataclasses.replace(called, gate=gate)
        return Reply.text(f"priced: {tool_outputs(body)['c-1']}")

    rules = {"You plan.": plan, "You price things.": lambda body: Reply.text("400 euros")}
    d.fake.script(*[brain(rules)] * 3)
    parent = await d.send(planner, "what does a kayak cost?")
    await d.fake.wait_requests(1)
    # Made after the planner's step took its room: only the child's step meets it.
    created = await d.dstub.CreateBudget(
        pb.CreateBudgetRequest(
            parent=d.world.name,
            budget_id="planner-tokens",
            budget=pb.Budget(
                display_name="Planner",
                scope=planner,
                period=pb.BUDGET_PERIOD_DAY,
                total_token_limit=5,
            ),
        ),
        metadata=d.world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    gate.set()

    def child_paused(seen: list[pb.RunUpdate]) -> bool:
        return any(
            u.child_run.state == pb.RUN_STATE_REQUIRES_ACTION
            for u in seen
            if u.WhichOneof("update") == "child_run"
        )

    call, seen = await until(d.dstub, d.world.viewer, parent.name, "child_run")
    await read_until(call, seen, child_paused)
    call.cancel()
    assert child_paused(seen), "the parent's stream ended without its child pausing"
    [waiting] = [
        u.child_run
        for u in seen
        if u.WhichOneof("update") == "child_run"
        and u.child_run.state == pb.RUN_STATE_REQUIRES_ACTION
    ]
    assert list(waiting.required_action.budget.budgets) == [created.budget.name]
    # Not the child's model: it waits for room before its first call.
    assert [instructions(r.body) for r in d.fake.requests] == ["You plan."]

    await d.dstub.UpdateBudget(
        pb.UpdateBudgetRequest(
            budget=pb.Budget(name=created.budget.name, total_token_limit=1_000_000),
            update_mask=field_mask_pb2.FieldMask(paths=["total_token_limit"]),
        ),
        metadata=d.world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    finished = await watch_all(d.dstub, d.world.viewer, parent.name)
    assert finished.final.state == pb.RUN_STATE_SUCCEEDED, finished.final.error
    assert finished.text == "priced: 400 euros"
    shown = [u.child_run.state for u in finished.updates if u.HasField("child_run")]
    assert shown[-2:] == [pb.RUN_STATE_RUNNING, pb.RUN_STATE_SUCCEEDED]
    # The child's tokens count on the planner's budget.
    budget = await d.dstub.GetBudget(
        pb.GetBudgetRequest(name=created.budget.name),
        metadata=d.world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    [child] = await d.children(parent.name)
    assert budget.budget.usage.output_tokens >= child.usage.output_tokens > 0


async def test_a_cancelled_child_is_an_error_result_for_its_parent(d: Desk) -> None:
    await d.assistant("slow", "You are slow.")
    first = await d.assistant("boss", "You are the boss.", ("slow",))
    never = asyncio.Event()

    def boss(body: dict[str, Any]) -> Reply:
        done = tool_outputs(body)
        if not done:
            return Reply.tool_calls([("ask_slow", {"input": "take your time"}, "c-1")])
        return Reply.text(f"without slow: {done['c-1']}")

    d.fake.script(
        brain({"You are the boss.": boss}),
        brain({"You are slow.": lambda body: Reply(content="later", gate=never)}),
        brain({"You are the boss.": boss}),
    )
    parent = await d.send(first, "go")
    call, seen = await until(d.dstub, d.world.viewer, parent.name, "child_run")
    call.cancel()
    child = seen[-1].child_run.run
    await d.fake.wait_requests(2)
    await d.dstub.CancelRun(
        pb.CancelRunRequest(name=child, reason="not needed"),
        metadata=d.world.editor.md,
        timeout=CALL_DEADLINE_S,
    )
    finished = await watch_all(d.dstub, d.world.viewer, parent.name)
    assert finished.final.state == pb.RUN_STATE_SUCCEEDED, finished.final.error
    # The result names the state the child ended in, then why.
    assert finished.text.startswith("without slow: slow did not answer (it ended cancelled: ")
    assert "not needed" in finished.text


async def test_a_handoff_since_the_handoff_shows_the_holder_only_what_came_from_it(
    d: Desk,
) -> None:
    """``history: HANDOFF_HISTORY_SINCE_HANDOFF``: billing, holding the conversation, is
    asked with the handoff's step (its reason) and the messages after it, not what the
    person said to triage before."""
    triage = await d.assistant("triage", "You are triage.")
    await d.assistant("billing", "You are billing.")
    await d.hands_over(triage, "billing", pb.HANDOFF_HISTORY_SINCE_HANDOFF)

    def hand(body: dict[str, Any]) -> Reply:
        if not this_turns_outputs(body):
            return Reply.tool_calls(
                [("transfer_to_billing", {"reason": "a refund question"}, "h-1")]
            )
        return Reply.text("billing takes over")

    d.fake.script(
        brain({"You are triage.": hand}),
        brain({"You are triage.": hand}),
        brain({"You are billing.": lambda body: Reply.text("refund noted")}),
    )
    first = await d.send(triage, "my secret account note, then: I want a refund")
    assert (await watch_all(d.dstub, d.world.viewer, first.name)).final.state == (
        pb.RUN_STATE_SUCCEEDED
    )
    second = await d.send("", "it was order 42")
    seen = await watch_all(d.dstub, d.world.viewer, second.name)
    assert seen.text == "refund noted"
    history = d.fake.requests[2].body["messages"]
    said = [str(m.get("content")) for m in history]
    assert not any("secret account note" in text for text in said)
    assert said[-1] == "it was order 42"
    assert any("a refund question" in text for text in said), said


async def test_a_grandchilds_pause_shows_on_the_roots_stream_naming_who_asked_it(
    d: Desk,
) -> None:
    """A tree of three runs (alpha asks beta asks gamma): the root's stream names the
    grandchild too (started, paused for a budget's room, going on, ended), each update
    naming the run that asked it, so a person watching the root sees what the tree
    waits for; raising the cap lets the tree finish."""
    gamma = await d.assistant("gamma", "You are gamma.")
    await d.assistant("beta", "You are beta.", ("gamma",))
    alpha = await d.assistant("alpha", "You are alpha.", ("beta",))
    capped = await d.dstub.CreateBudget(
        pb.CreateBudgetRequest(
            parent=d.world.name,
            budget_id="gamma-tokens",
            budget=pb.Budget(
                display_name="Gamma",
                scope=gamma,
                period=pb.BUDGET_PERIOD_DAY,
                total_token_limit=5,
            ),
        ),
        metadata=d.world.owner.md,
        timeout=CALL_DEADLINE_S,
    )

    def ask(target: str) -> Callable[[dict[str, Any]], Reply]:
        def reply(body: dict[str, Any]) -> Reply:
            done = tool_outputs(body)
            if not done:
                return Reply.tool_calls([(f"ask_{target}", {"input": "and you?"}, "c-1")])
            return Reply.text(f"{target} said {done['c-1']}")

        return reply

    rules = {
        "You are alpha.": ask("beta"),
        "You are beta.": ask("gamma"),
        "You are gamma.": lambda body: Reply.text("fine"),
    }
    d.fake.script(*[brain(rules)] * 5)
    root = await d.send(alpha, "how are you all?")

    def grandchild_paused(seen: list[pb.RunUpdate]) -> bool:
        return any(
            u.child_run.state == pb.RUN_STATE_REQUIRES_ACTION and u.child_run.assistant == gamma
            for u in seen
            if u.WhichOneof("update") == "child_run"
        )

    call, seen = await until(d.dstub, d.world.viewer, root.name, "child_run")
    await read_until(call, seen, grandchild_paused)
    call.cancel()
    assert grandchild_paused(seen), "the root's stream ended without its grandchild pausing"
    [middle] = await d.children(root.name)
    [grandchild] = await d.children(middle.name)
    [waiting] = [
        u.child_run
        for u in seen
        if u.WhichOneof("update") == "child_run"
        and u.child_run.state == pb.RUN_STATE_REQUIRES_ACTION
    ]
    assert waiting.run == grandchild.name
    assert waiting.parent == middle.name
    assert waiting.tool_call_id == grandchild.parent_tool_call
    assert list(waiting.required_action.budget.budgets) == [capped.budget.name]

    await d.dstub.UpdateBudget(
        pb.UpdateBudgetRequest(
            budget=pb.Budget(name=capped.budget.name, total_token_limit=1_000_000),
            update_mask=field_mask_pb2.FieldMask(paths=["total_token_limit"]),
        ),
        metadata=d.world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    finished = await watch_all(d.dstub, d.world.viewer, root.name)
    assert finished.final.state == pb.RUN_STATE_SUCCEEDED, finished.final.error
    assert finished.text == "beta said gamma said fine"
    shown = [
        (u.child_run.run, u.child_run.parent, u.child_run.state)
        for u in finished.updates
        if u.HasField("child_run")
    ]
    assert shown[0][:2] == (middle.name, root.name)
    below = [(parent, state) for run, parent, state in shown if run == grandchild.name]
    assert {parent for parent, _ in below} == {middle.name}
    assert [state for _, state in below][-2:] == [pb.RUN_STATE_RUNNING, pb.RUN_STATE_SUCCEEDED]
    assert shown[-1] == (middle.name, root.name, pb.RUN_STATE_SUCCEEDED)


async def test_a_handoff_with_a_summary_shows_the_holder_the_summary_not_the_history(
    d: Desk,
) -> None:
    """``history: HANDOFF_HISTORY_SUMMARY``: the handoff tool asks for a ``summary``
    too; a call without one is refused (an error result, nothing handed over), and the
    holder is asked with the summary and what came after, not what came before."""
    triage = await d.assistant("triage", "You are triage.")
    await d.assistant("billing", "You are billing.")
    await d.hands_over(triage, "billing", pb.HANDOFF_HISTORY_SUMMARY)
    offered: list[dict[str, Any]] = []

    def hand(body: dict[str, Any]) -> Reply:
        outputs = this_turns_outputs(body)
        if not outputs:
            offered.extend(body["tools"])
            return Reply.tool_calls([("transfer_to_billing", {"reason": "refund"}, "h-1")])
        if len(outputs) == 1:
            summary = "Ana wants a refund of order 42, paid by card."
            return Reply.tool_calls(
                [("transfer_to_billing", {"reason": "refund", "summary": summary}, "h-2")]
            )
        return Reply.text("billing takes over")

    d.fake.script(
        *[brain({"You are triage.": hand})] * 3,
        brain({"You are billing.": lambda body: Reply.text("refund noted")}),
    )
    first = await d.send(triage, "my secret account note, then: I want a refund")
    seen = await watch_all(d.dstub, d.world.viewer, first.name)
    assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error
    [tool] = [t for t in offered if t["function"]["name"] == "transfer_to_billing"]
    assert tool["function"]["parameters"]["required"] == ["reason", "summary"]
    refused = this_turns_outputs(d.fake.requests[1].body)
    assert "needs 'summary'" in refused[0]
    # Only the second call handed over.
    assert [u.handoff.reason for u in seen.updates if u.HasField("handoff")] == ["refund"]

    second = await d.send("", "is it done?")
    answered = await watch_all(d.dstub, d.world.viewer, second.name)
    assert answered.text == "refund noted"
    said = [str(m.get("content")) for m in d.fake.requests[3].body["messages"]]
    assert not any("secret account note" in text for text in said), said
    assert any("Ana wants a refund of order 42" in text for text in said), said
    assert said[-1] == "is it done?"


async def test_a_delegate_naming_a_handler_asks_it_directly(d: Desk) -> None:
    """``AssistantDelegate.handler``: the handler is offered as ``ask_{id}`` (its own
    description when the delegate gives none) and answers as a child run with no
    assistant, named on the parent's stream by its handler."""
    created = await d.dstub.CreateAssistant(
        pb.CreateAssistantRequest(
            parent=d.world.name,
            assistant_id="asker",
            assistant=pb.Assistant(
                display_name="Asker",
                instructions="You ask echo.",
                delegates=[pb.AssistantDelegate(handler="handlers/echo")],
            ),
        ),
        metadata=d.world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    offered: list[dict[str, Any]] = []

    def ask(body: dict[str, Any]) -> Reply:
        done = tool_outputs(body)
        if not done:
            offered.extend(body["tools"])
            return Reply.tool_calls([("ask_echo", {"input": "ping pong"}, "c-1")])
        return Reply.text(f"echo said: {done['c-1'].split(chr(10))[0]}")

    d.fake.script(*[brain({"You ask echo.": ask})] * 2)
    parent = await d.send(created.assistant.name, "try echo")
    seen = await watch_all(d.dstub, d.world.viewer, parent.name)
    assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error
    assert seen.text == "echo said: ping pong"
    [tool] = [t["function"] for t in offered if t["function"]["name"] == "ask_echo"]
    assert tool["description"].startswith("Repeats the message back")
    [child] = await d.children(parent.name)
    assert (child.handler, child.assistant, child.parent_tool_call) == (
        "handlers/echo",
        "",
        "c-1",
    )
    shown = [u.child_run for u in seen.updates if u.HasField("child_run")]
    assert {(c.handler, c.assistant, c.parent) for c in shown} == {
        ("handlers/echo", "", parent.name)
    }
    got = await d.dstub.GetRun(
        pb.GetRunRequest(name=parent.name), metadata=d.world.viewer.md, timeout=CALL_DEADLINE_S
    )
    assert [(c.run, c.handler) for c in got.run.children] == [(child.name, "handlers/echo")]


async def test_bad_handler_delegates_are_refused_naming_the_field(d: Desk) -> None:
    known = await d.assistant("known", "You know.")
    echo_assistant = await d.assistant("echo", "You are an assistant named echo.")
    cases: list[tuple[list[pb.AssistantDelegate], str, str]] = [
        (
            [pb.AssistantDelegate(handler="handlers/ghost")],
            "assistant.delegates[0].handler",
            "names no handler of this workspace",
        ),
        (
            [pb.AssistantDelegate(handler="ghost")],
            "assistant.delegates[0].handler",
            "must be handlers/{handler}",
        ),
        (
            [pb.AssistantDelegate(handler="handlers/echo", assistant=known)],
            "assistant.delegates[0].assistant",
            "name an assistant or a handler, not both",
        ),
        (
            [pb.AssistantDelegate(handler="handlers/echo")] * 2,
            "assistant.delegates[1].handler",
            "is named twice",
        ),
        (
            [
                pb.AssistantDelegate(handler="handlers/echo"),
                pb.AssistantDelegate(assistant=echo_assistant),
            ],
            "assistant.delegates[1]",
            "each offered as ask_echo",
        ),
    ]
    for delegates, field, expected in cases:
        with pytest.raises(aio.AioRpcError) as refused:
            await d.dstub.CreateAssistant(
                pb.CreateAssistantRequest(
                    parent=d.world.name,
                    assistant_id="me",
                    assistant=pb.Assistant(display_name="Me", delegates=delegates),
                ),
                metadata=d.world.owner.md,
                timeout=CALL_DEADLINE_S,
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        details = refused.value.details() or ""
        assert expected in details, (field, details)
        assert field in details, (field, details)
    listed = await d.dstub.ListAssistants(
        pb.ListAssistantsRequest(parent=d.world.name),
        metadata=d.world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    assert sorted(a.name.rsplit("/", 1)[-1] for a in listed.assistants) == ["echo", "known"]


async def test_a_budget_handed_to_the_parent_is_handed_down_to_its_children(
    d: Desk,
) -> None:
    """A parent sent with ``x-switchboard-budget`` hands its children what is left of
    it: two children asked at once go one at a time, each handed (and holding) what the
    parent's step and the earlier child left, and the parent's next step has what all
    of them left (each model call's ``max_tokens`` shows it)."""
    await d.assistant("beta", "You are beta.")
    await d.assistant("gamma", "You are gamma.")
    alpha = await d.assistant("alpha", "You are alpha.", ("beta", "gamma"))

    def plan(body: dict[str, Any]) -> Reply:
        done = tool_outputs(body)
        if not done:
            called = Reply.tool_calls(
                [("ask_beta", {"input": "b?"}, "c-1"), ("ask_gamma", {"input": "g?"}, "c-2")]
            )
            return dataclasses.replace(called, usage=(10, 30))
        return Reply(content=f"{done['c-1']} and {done['c-2']}", usage=(10, 5))

    rules = {
        "You are alpha.": plan,
        "You are beta.": lambda body: Reply(content="b!", usage=(7, 40)),
        "You are gamma.": lambda body: Reply(content="g!", usage=(7, 50)),
    }
    d.fake.script(*[brain(rules)] * 4)
    sent = await d.dstub.SendMessage(
        pb.SendMessageRequest(
            conversation=d.conversation,
            assistant=alpha,
            message=cpb.Message(parts=[cpb.ContentPart(text="ask both")]),
        ),
        metadata=(*d.world.editor.md, ("x-switchboard-budget", "output_tokens=300")),
        timeout=CALL_DEADLINE_S,
    )
    seen = await watch_all(d.dstub, d.world.viewer, sent.run.name)
    assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error
    assert seen.text == "b! and g!"

    def limit(body: dict[str, Any]) -> int:
        given: int = body.get("max_completion_tokens", body.get("max_tokens", 0))
        return given

    asked = [(instructions(r.body), limit(r.body)) for r in d.fake.requests]
    assert asked[0] == ("You are alpha.", 300)
    # The children, one at a time: the first is handed 300 - 30, the second what the
    # first left of that.
    first, second = asked[1], asked[2]
    assert first[1] == 270, asked
    used_first = 40 if first[0] == "You are beta." else 50
    assert second[1] == 270 - used_first, asked
    assert {first[0], second[0]} == {"You are beta.", "You are gamma."}
    assert asked[3] == ("You are alpha.", 300 - 30 - 40 - 50)


async def test_a_child_is_not_started_when_nothing_is_left_of_the_handed_budget(
    d: Desk,
) -> None:
    await d.assistant("beta", "You are beta.")
    alpha = await d.assistant("alpha", "You are alpha.", ("beta",))
    called = Reply.tool_calls([("ask_beta", {"input": "b?"}, "c-1")])
    d.fake.script(
        brain({"You are alpha.": lambda body: dataclasses.replace(called, usage=(5, 200))})
    )
    sent = await d.dstub.SendMessage(
        pb.SendMessageRequest(
            conversation=d.conversation,
            assistant=alpha,
            message=cpb.Message(parts=[cpb.ContentPart(text="ask beta")]),
        ),
        metadata=(*d.world.editor.md, ("x-switchboard-budget", "output_tokens=200")),
        timeout=CALL_DEADLINE_S,
    )
    seen = await watch_all(d.dstub, d.world.viewer, sent.run.name)
    # Its own next step has no room either: the run ends there, and no child started.
    assert seen.final.state == pb.RUN_STATE_FAILED
    assert "handed over" in seen.final.error.message
    assert await d.children(sent.run.name) == []
    assert [instructions(r.body) for r in d.fake.requests] == ["You are alpha."]
    results = [u.tool_result for u in seen.updates if u.HasField("tool_result")]
    [result] = results
    assert result.outcome == hpb.TOOL_OUTCOME_ERROR
    assert result.text.startswith("Refused: nothing is left of the budget handed"), result


QUOTE_SCHEMA: Final = {
    "type": "object",
    "properties": {
        "item": {"type": "string", "minLength": 1},
        "quantity": {"type": "integer", "minimum": 1},
    },
    "required": ["item", "quantity"],
    "additionalProperties": False,
}


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    found = struct_pb2.Struct()
    found.update(value)
    return found


async def test_a_delegates_input_schema_is_offered_checked_and_sent_as_data(
    d: Desk,
) -> None:
    """``AssistantDelegate.input_schema``: the tool takes that schema; a call whose
    arguments break it is an error result naming each violation, with no child; one that
    keeps it sends the child its arguments as JSON text and as a data part."""
    await d.assistant("pricing", "You price things.")
    created = await d.dstub.CreateAssistant(
        pb.CreateAssistantRequest(
            parent=d.world.name,
            assistant_id="planner",
            assistant=pb.Assistant(
                display_name="Planner",
                instructions="You plan.",
                delegates=[
                    pb.AssistantDelegate(
                        assistant=f"{d.world.name}/assistants/pricing",
                        input_schema=struct(QUOTE_SCHEMA),
                    )
                ],
            ),
        ),
        metadata=d.world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    offered: list[dict[str, Any]] = []

    def plan(body: dict[str, Any]) -> Reply:
        outputs = this_turns_outputs(body)
        if not outputs:
            offered.extend(body["tools"])
            return Reply.tool_calls([("ask_pricing", {"item": "kayak", "quantity": 0}, "c-1")])
        if len(outputs) == 1:
            return Reply.tool_calls([("ask_pricing", {"item": "kayak", "quantity": 2}, "c-2")])
        return Reply.text(f"priced: {outputs[-1]}")

    rules = {"You plan.": plan, "You price things.": lambda body: Reply.text("800 euros")}
    d.fake.script(*[brain(rules)] * 4)
    parent = await d.send(created.assistant.name, "two kayaks?")
    seen = await watch_all(d.dstub, d.world.viewer, parent.name)
    assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error
    assert seen.text == "priced: 800 euros"
    [tool] = [t["function"] for t in offered if t["function"]["name"] == "ask_pricing"]
    assert tool["parameters"] == QUOTE_SCHEMA
    refused = this_turns_outputs(d.fake.requests[1].body)[0]
    assert refused.startswith("The arguments break the delegate's input schema")
    assert "arguments.quantity" in refused
    # One child: the call that kept the schema.
    [child] = await d.children(parent.name)
    assert child.parent_tool_call == "c-2"
    asked = await d.cstub.GetMessage(
        cpb.GetMessageRequest(name=child.input_message),
        metadata=d.world.viewer.md,
        timeout=CALL_DEADLINE_S,
    )
    parts = [p.WhichOneof("part") for p in asked.message.parts]
    assert parts == ["text", "data"]
    # Its conversation names the run that asked (the console lists it apart).
    made = await d.cstub.GetConversation(
        cpb.GetConversationRequest(name=child.name.rsplit("/runs/", 1)[0]),
        metadata=d.world.viewer.md,
        timeout=CALL_DEADLINE_S,
    )
    assert structs.plain_struct(made.conversation.metadata) == {
        "delegated_by": parent.name,
        "tool_call": "c-2",
    }
    assert json.loads(asked.message.parts[0].text) == {"item": "kayak", "quantity": 2}
    assert structs.plain_struct(asked.message.parts[1].data) == {"item": "kayak", "quantity": 2}


async def test_bad_input_schemas_are_refused_naming_the_field(d: Desk) -> None:
    known = await d.assistant("known", "You know.")
    cases: dict[str, dict[str, Any]] = {
        "must be the schema of an object": {"type": "string"},
        "is not a schema that can be applied": {"type": "object", "minProperties": "x"},
        "remote $ref": {"type": "object", "properties": {"a": {"$ref": "https://x.test/s"}}},
        "larger than 16 KiB": {"type": "object", "description": "x" * 17_000},
    }
    for expected, schema in cases.items():
        with pytest.raises(aio.AioRpcError) as refused:
            await d.dstub.CreateAssistant(
                pb.CreateAssistantRequest(
                    parent=d.world.name,
                    assistant_id="me",
                    assistant=pb.Assistant(
                        display_name="Me",
                        delegates=[
                            pb.AssistantDelegate(assistant=known, input_schema=struct(schema))
                        ],
                    ),
                ),
                metadata=d.world.owner.md,
                timeout=CALL_DEADLINE_S,
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, expected
        details = refused.value.details() or ""
        assert expected in details, (expected, details)
        assert "assistant.delegates[0].input_schema" in details, details


async def test_calls_made_at_once_do_not_pass_the_trees_limit_together(database_url: str) -> None:
    """``max_children_per_tree`` 2 and three delegate calls in one step, which start at
    once: two children, and the third call refused before anything is stored (each call
    takes its place in the tree when it is checked, not when its child is stored)."""
    async with desk(database_url, dispatcher_max_children_per_tree=2) as d:
        await d.assistant("beta", "You are beta.")
        alpha = await d.assistant("alpha", "You are alpha.", ("beta",))

        def plan(body: dict[str, Any]) -> Reply:
            done = tool_outputs(body)
            if not done:
                return Reply.tool_calls(
                    [("ask_beta", {"input": f"q{i}"}, f"c-{i}") for i in range(1, 4)]
                )
            return Reply.text(" | ".join(done[f"c-{i}"] for i in range(1, 4)))

        rules = {"You are alpha.": plan, "You are beta.": lambda body: Reply.text("a")}
        d.fake.script(*[brain(rules)] * 5)
        parent = await d.send(alpha, "three questions")
        seen = await watch_all(d.dstub, d.world.viewer, parent.name)
        assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error
        answers = seen.text.split(" | ")
        assert answers.count("a") == 2, answers
        [refused] = [a for a in answers if a != "a"]
        assert "already started 2 delegate runs" in refused
        assert len(await d.children(parent.name)) == 2
