"""Delegation under SIGKILL (issue 71, docs/delegation.md "After a crash"): two
`switchboard serve` replicas on one PostgreSQL and one Redis (lease 2 s, recovery
``resume``), the llm handler on the local model server (tests/fakes/openai_server.py,
in this process) scripted per assistant by the instructions each request carries.

A planner asks two delegates in one step: ``pricing`` answers at once, ``stock``'s
model call is held by the fake. Once the pricing child's answer is in the parent's
journal and the stock child's model call is in flight, the replica that owns the
parent is killed with SIGKILL. The other replica takes the tree over, and then:

* the pricing assistant's model was asked once (its answer came from the journal);
* the parent followed the same stock child (ListRuns by parent: the two children
  seen before the kill, no third), which was itself resumed and answered;
* the parent's answer, as streamed and as stored, is the answer of an uninterrupted
  run of the same script, sent first on the same replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pytest
from grpc import aio
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.runs.core.active.live import SEQUENCE_BLOCK
from switchboard.dispatcher.runs.core.store import TERMINAL
from switchboard.internal.dispatcher.v1 import job_pb2
from switchboard.platform.store.models import RunRow
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.procs import scaled_env
from tests.e2e.replicas import Replica, sign_up, taken_over
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.infra.redis import RedisServer
from tests.kits.contextkit import Caller, context_stub, create_conversation, create_workspace
from tests.kits.dispatchkit import Stub, eventually, read_until, watch_all

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

#: How long the system may take to reach what the test waits for (a takeover, a run's end).
SETTLE_S: Final = 60.0
LEASE_S: Final = "2"
REPLICAS: Final = ("delegation-1", "delegation-2")
PLANNER: Final = "You plan."
PRICING: Final = "You price things."
STOCK: Final = "You count stock."
PRICE_CALL: Final = "c-price"
STOCK_CALL: Final = "c-stock"
EXPECTED: Final = "price: 400 euros; stock: seven kayaks"


def instructions(body: dict[str, Any]) -> str:
    return str(body["messages"][0]["content"])


def tool_outputs(body: dict[str, Any]) -> dict[str, str]:
    return {m["tool_call_id"]: m["content"] for m in body["messages"] if m["role"] == "tool"}


@dataclass
class Model:
    """The scripted model: each request answered by the rule of the assistant whose
    instructions it carries. While ``hold`` is set to an event, the stock assistant's
    answer waits for it (or for its client to go away)."""

    hold: asyncio.Event | None = None
    asked: list[str] = field(default_factory=list)
    #: Seconds the planner's first answer (its delegate calls) takes to begin.
    planner_s: float = 0.0

    def __call__(self, body: dict[str, Any]) -> Reply:
        who = instructions(body)
        self.asked.append(who)
        if who == PLANNER:
            done = tool_outputs(body)
            if not done:
                calls = Reply.tool_calls(
                    [
                        ("ask_pricing", {"input": "price of a kayak?"}, PRICE_CALL),
                        ("ask_stock", {"input": "kayaks in stock?"}, STOCK_CALL),
                    ]
                )
                return dataclasses.replace(calls, first_byte_after_s=self.planner_s)
            return Reply.text(f"price: {done[PRICE_CALL]}; stock: {done[STOCK_CALL]}")
        if who == PRICING:
            return Reply.text("400 euros")
        if who == STOCK:
            return Reply(content="seven kayaks", gate=self.hold)
        raise AssertionError(f"a request with unknown instructions: {who!r}")

    def count(self, who: str, since: int = 0) -> int:
        return self.asked[since:].count(who)


@pytest.fixture
def env(tmp_path: Path, postgres_url: str, redis_server: RedisServer) -> dict[str, str]:
    return {
        **scaled_env(tmp_path, postgres_url, redis_server.url),
        "SWITCHBOARD_LLM_MODEL": "m-1",
        "SWITCHBOARD_LLM_MAX_RETRIES": "0",
        "SWITCHBOARD_DISPATCHER_RECOVERY": "resume",
        "SWITCHBOARD_DISPATCHER_LEASE_S": LEASE_S,
        "PYTHONFAULTHANDLER": "1",
    }


@contextlib.asynccontextmanager
async def replicas(env: dict[str, str]) -> AsyncIterator[list[Replica]]:
    with contextlib.ExitStack() as stack:
        started = [Replica(name, env, stack) for name in REPLICAS]
        await asyncio.gather(*(replica.start() for replica in started))
        try:
            yield started
        finally:
            for replica in started:
                await replica.close()


def _channel(replica: Replica) -> aio.Channel:
    assert replica.channel is not None
    return replica.channel


def run_id(name: str) -> str:
    return name.rsplit("/", 1)[-1]


async def stored(database: AsyncEngine, name: str) -> tuple[job_pb2.RunJob, str]:
    """The run's journal as stored, and the instance that holds it."""
    async with database.connect() as db:
        row = (
            await db.execute(select(RunRow.job, RunRow.worker).where(RunRow.id == run_id(name)))
        ).one()
    return job_pb2.RunJob.FromString(row[0]), str(row[1])


def journaled_results(job: job_pb2.RunJob) -> dict[str, str]:
    """Tool call id -> result text of every result the journal holds (finished steps'
    and a step's results that came in before the step ended)."""
    found = {r.id: r.text for step in job.steps for r in step.results}
    found.update({r.id: r.text for record in job.step_records for r in record.results})
    return found


async def children(stub: Stub, caller: Caller, workspace: str, parent: str) -> dict[str, pb.Run]:
    """The parent's children as ListRuns gives them, by the tool call that started each."""
    listed = await stub.ListRuns(
        pb.ListRunsRequest(parent=workspace, parent_run=parent, page_size=100),
        metadata=caller.md,
        timeout=CALL_DEADLINE_S,
    )
    found = {run.parent_tool_call: run for run in listed.runs}
    assert len(found) == len(listed.runs), listed.runs
    return found


async def create_assistant(
    stub: Stub,
    caller: Caller,
    workspace: str,
    assistant_id: str,
    instructions: str,
    delegates: tuple[str, ...] = (),
) -> str:
    created = await stub.CreateAssistant(
        pb.CreateAssistantRequest(
            parent=workspace,
            assistant_id=assistant_id,
            assistant=pb.Assistant(
                display_name=assistant_id.title(),
                instructions=instructions,
                delegates=[
                    pb.AssistantDelegate(assistant=f"{workspace}/assistants/{d}") for d in delegates
                ],
            ),
        ),
        metadata=caller.md,
        timeout=CALL_DEADLINE_S,
    )
    return str(created.assistant.name)


async def answer_of(replica: Replica, caller: Caller, run: pb.Run) -> str:
    """The text of the run's stored answer."""
    got = await context_stub(_channel(replica)).GetMessage(
        cpb.GetMessageRequest(name=run.output_message), metadata=caller.md, timeout=CALL_DEADLINE_S
    )
    return "".join(part.text for part in got.message.parts)


# A planner slower than a second to make its calls: the resumed parent makes them at
# once, from its journal, so a delegate call that carried the time left on the
# parent's deadline was "a different request" when sent again (issue 79).
@pytest.mark.parametrize("planner_s", [0.0, 1.5], ids=["quick-planner", "slow-planner"])
async def test_a_tree_taken_over_after_sigkill_asks_no_done_child_again(
    env: dict[str, str], postgres_engine: AsyncEngine, planner_s: float
) -> None:
    database = postgres_engine
    model = Model(planner_s=planner_s)
    async with (
        FakeOpenAI(default=model) as fake,
        replicas({**env, "SWITCHBOARD_LLM_BASE_URL": fake.url}) as both,
    ):
        first = both[0]
        assert first.process is not None
        caller = await sign_up(first.process.address, "delegation")
        cstub = context_stub(_channel(first))
        workspace = (await create_workspace(cstub, caller, "Delegation")).name
        await create_assistant(first.stub, caller, workspace, "pricing", PRICING)
        await create_assistant(first.stub, caller, workspace, "stock", STOCK)
        planner = await create_assistant(
            first.stub, caller, workspace, "planner", PLANNER, ("pricing", "stock")
        )

        async def send(text: str) -> pb.Run:
            conversation = (await create_conversation(cstub, caller, workspace)).name
            sent = await first.stub.SendMessage(
                pb.SendMessageRequest(
                    conversation=conversation,
                    assistant=planner,
                    message=cpb.Message(parts=[cpb.ContentPart(text=text)]),
                ),
                metadata=caller.md,
                timeout=CALL_DEADLINE_S,
            )
            return sent.run

        # The uninterrupted run: its answer is the one the crashed tree must give.
        calm = await send("can I buy a kayak?")
        calm_seen = await watch_all(first.stub, caller, calm.name)
        assert calm_seen.final.state == pb.RUN_STATE_SUCCEEDED, calm_seen.final.error
        calm_answer = await answer_of(first, caller, calm_seen.final)
        assert calm_answer == calm_seen.text == EXPECTED
        assert sorted(model.asked) == sorted([PLANNER, PRICING, STOCK, PLANNER])

        # The same script, with the stock child's model call held.
        model.hold = asyncio.Event()
        since = len(model.asked)
        try:
            parent = await send("can I buy a kayak?")

            async def pricing_journaled_and_stock_asked() -> bool:
                job, _ = await stored(database, parent.name)
                return PRICE_CALL in journaled_results(job) and model.count(STOCK, since) == 1

            await eventually(
                pricing_journaled_and_stock_asked,
                "the pricing child's answer in the parent's journal and the stock "
                "child's model call in flight",
                timeout_s=SETTLE_S,
            )
            job, owner_name = await stored(database, parent.name)
            deadline = (
                await first.stub.GetRun(
                    pb.GetRunRequest(name=parent.name), metadata=caller.md, timeout=CALL_DEADLINE_S
                )
            ).run.deadline
            assert deadline.seconds > 0
            assert journaled_results(job)[PRICE_CALL] == "400 euros"
            assert STOCK_CALL not in journaled_results(job)
            before = await children(first.stub, caller, workspace, parent.name)
            assert set(before) == {PRICE_CALL, STOCK_CALL}
            assert before[PRICE_CALL].state == pb.RUN_STATE_SUCCEEDED
            assert before[STOCK_CALL].state in (pb.RUN_STATE_QUEUED, pb.RUN_STATE_RUNNING)
            owner = next(r for r in both if r.name == owner_name)
            survivor = next(r for r in both if r is not owner)
            # Watched on the survivor from before the kill to the end, across the
            # takeover; its first update says the watch is open.
            watch = survivor.stub.WatchRun(
                pb.WatchRunRequest(name=parent.name), metadata=caller.md, timeout=SETTLE_S
            )
            updates: list[pb.RunUpdate] = []
            await read_until(watch, updates, lambda seen: len(seen) >= 1)

            owner.kill()
            # Whichever replica runs the stock child now, its model answers.
            model.hold.set()
            await taken_over(database, owner.name, SETTLE_S)
            await read_until(
                watch, updates, lambda seen: seen[-1].state_change.run.state in TERMINAL
            )
            watch.cancel()
        finally:
            model.hold.set()
        end = updates[-1].state_change.run
        assert end.state == pb.RUN_STATE_SUCCEEDED, end.error
        sequences = [u.sequence for u in updates]
        assert sequences == sorted(set(sequences)), "a sequence was reused or went back"
        assert await answer_of(survivor, caller, end) == calm_answer
        # What the resumed attempt (numbered from SEQUENCE_BLOCK) showed: it followed
        # the stock child again and read the pricing child's answer from its journal,
        # and it streamed the uninterrupted run's answer.
        resumed = [u for u in updates if u.sequence >= SEQUENCE_BLOCK]
        assert "".join(u.delta.text for u in resumed) == calm_answer
        # It ran under the deadline its first attempt had: a crash gives no new time.
        running = [
            u.state_change.run
            for u in resumed
            if u.HasField("state_change") and u.state_change.run.state == pb.RUN_STATE_RUNNING
        ]
        assert running
        assert all(run.deadline == deadline for run in running), (running, deadline)
        followed = {u.child_run.tool_call_id for u in resumed if u.HasField("child_run")}
        assert followed == {STOCK_CALL}
        results = [u.tool_result.id for u in resumed if u.HasField("tool_result")]
        assert results == [STOCK_CALL]

        # The done child was not asked again; the one in flight was asked once more
        # (its first call died with the replica); the planner's first step came
        # from its journal, only its last was asked after the takeover.
        assert model.count(PRICING, since) == 1
        assert model.count(STOCK, since) == 2
        assert model.count(PLANNER, since) == 2

        # The parent followed the same children: no third was started.
        after = await children(survivor.stub, caller, workspace, parent.name)
        assert {call: run.name for call, run in after.items()} == {
            call: run.name for call, run in before.items()
        }
        assert {call: run.state for call, run in after.items()} == {
            PRICE_CALL: pb.RUN_STATE_SUCCEEDED,
            STOCK_CALL: pb.RUN_STATE_SUCCEEDED,
        }
        # The tree was taken over: the parent and the stock child ran again on the
        # survivor (a resumed attempt numbers its updates from SEQUENCE_BLOCK); the
        # pricing child had ended before the kill and was never run again.
        for name in (parent.name, after[STOCK_CALL].name):
            assert (await stored(database, name))[1] == survivor.name, name
        assert end.last_sequence >= SEQUENCE_BLOCK
        assert after[STOCK_CALL].last_sequence >= SEQUENCE_BLOCK
        assert after[PRICE_CALL].last_sequence < SEQUENCE_BLOCK
        assert (await stored(database, after[PRICE_CALL].name))[1] == owner.name
