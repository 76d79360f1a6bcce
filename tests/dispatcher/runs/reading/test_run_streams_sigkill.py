"""WatchRun across a SIGKILL (issue 67): `switchboard serve` replicas on one PostgreSQL
and one Redis, the run's owner killed and started again as the same replica.

* A run killed during a tool call, resumed (``resume``) and decided COMPLETE: a watch
  from the start on the process that recovered it begins with the attempt's state change
  back to QUEUED and shows each state once, ending once (it sent the run's SUCCEEDED
  first, numbered 2^32 and stamped at the recovery, then the attempt and SUCCEEDED
  again). A process started after the end keeps the same contract. The recovery's log
  line says the run was ``resumed`` (it said ``requeued``).
* A run killed mid-answer and queued again (``requeue``), watched on the other replica
  all along: the new attempt reaches that watcher whole, every delta in its place (a
  delta right before a progress update came over pub/sub after the progress update came
  over the stream, and was passed over: "w13" never came, the stream ended OK), with and
  without merged deltas; on the owner, a watch from the start shows the attempt once.

What every stream must keep is ``test_recovered_watch.assert_watchable`` (beside this file).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import httpx
import pytest
from grpc import aio

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.integration.v1 import integration_pb2 as ipb
from switchboard.dispatcher.runs.core.active.live import SEQUENCE_BLOCK
from switchboard.dispatcher.runs.core.store import TERMINAL
from tests.conftest import CALL_DEADLINE_S
from tests.dispatcher.runs.reading.test_recovered_watch import _trail, assert_watchable
from tests.dispatcher.tools.test_tool_runs import answer_with_tool_output
from tests.e2e.procs import scaled_env
from tests.e2e.replicas import Replica, sign_up
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.infra.mcpcounter import McpCounterServer
from tests.infra.redis import RedisServer
from tests.kits.contextkit import Caller, context_stub, create_conversation, create_workspace
from tests.kits.dispatchkit import read_until, request, until, watch_all
from tests.kits.integrationkit import create, integration_stub

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

#: How long a stream may take to reach what a test waits for.
SETTLE_S: Final = 90.0
ONCE: Final = "once__count_once"
#: Long enough that the killed process's call is still at the tool when it dies.
TOOL_DELAY_S: Final = "20"


@pytest.fixture
def env(tmp_path: Path, postgres_url: str, redis_server: RedisServer) -> dict[str, str]:
    return {
        **scaled_env(tmp_path, postgres_url, redis_server.url),
        # Longer than the test: the killed replica's runs wait for its own restart.
        "SWITCHBOARD_DISPATCHER_LEASE_S": "300",
        "SWITCHBOARD_DISPATCHER_APPROVAL_TIMEOUT_S": "600",
        "PYTHONFAULTHANDLER": "1",
    }


@contextlib.asynccontextmanager
async def replicas(env: dict[str, str], *names: str) -> AsyncIterator[list[Replica]]:
    with contextlib.ExitStack() as stack:
        started = [Replica(name, env, stack) for name in names]
        await asyncio.gather(*(replica.start() for replica in started))
        try:
            yield started
        finally:
            for replica in started:
                await replica.close()


def _channel(replica: Replica) -> aio.Channel:
    assert replica.channel is not None
    return replica.channel


def _address(replica: Replica) -> str:
    assert replica.process is not None
    return replica.process.address


def _recovered(replica: Replica) -> dict[str, Any]:
    """The replica's "run recovered" log line (its process started again)."""
    process = replica.process
    assert process is not None
    # Logged before the process listened, so among what its start read already.
    for entry in process.log:
        if entry.get("message") == "run recovered":
            return entry
    return process.wait_for("run recovered")


async def _until_in_flight(http: httpx.AsyncClient, counter: McpCounterServer) -> None:
    deadline = time.monotonic() + SETTLE_S
    while not (await http.get(counter.stats_url)).json()["in_flight"].get("count_once"):
        assert time.monotonic() < deadline, "the run's count_once call never reached the tool"
        await asyncio.sleep(0.02)  # polling the tool's state, under a deadline


async def test_a_run_killed_mid_call_and_completed_replays_once_from_its_queued_change(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MCP_COUNTER_DELAY_S", TOOL_DELAY_S)
    with McpCounterServer() as counter:
        async with (
            FakeOpenAI() as fake,
            httpx.AsyncClient() as http,
            replicas(
                {
                    **env,
                    "SWITCHBOARD_LLM_BASE_URL": fake.url,
                    "SWITCHBOARD_LLM_MODEL": "m-1",
                    "SWITCHBOARD_DISPATCHER_RECOVERY": "resume",
                },
                "streams-owner",
            ) as (owner,),
        ):
            fake.script(
                Reply.tool_calls([(ONCE, {"text": "x"}, "call_1")]), answer_with_tool_output
            )
            caller = await sign_up(_address(owner), "streams")
            workspace = (await create_workspace(context_stub(_channel(owner)), caller, "S")).name
            conversation = (
                await create_conversation(context_stub(_channel(owner)), caller, workspace)
            ).name
            once = await create(
                integration_stub(_channel(owner)),
                caller,
                workspace,
                ipb.Integration(kind=ipb.INTEGRATION_KIND_MCP_SERVER, endpoint=counter.url),
                integration_id="once",
            )
            assistant = await owner.stub.CreateAssistant(
                pb.CreateAssistantRequest(
                    parent=workspace,
                    assistant=pb.Assistant(
                        display_name="Once",
                        tools=[pb.AssistantTools(integration=once.name, tools=["count_once"])],
                    ),
                ),
                metadata=caller.md,
                timeout=CALL_DEADLINE_S,
            )
            sent = request(conversation, "count once")
            sent.assistant = assistant.assistant.name
            run = (
                await owner.stub.SendMessage(sent, metadata=caller.md, timeout=CALL_DEADLINE_S)
            ).run.name
            await _until_in_flight(http, counter)
            owner.kill()  # during the tool call: the run is stored RUNNING, its call in flight
            await owner.start()
            line = _recovered(owner)
            assert (line["state"], line["action"]) == ("RUN_STATE_RUNNING", "resumed")
            call, _ = await until(
                owner.stub, caller, run, "state_change", state=pb.RUN_STATE_REQUIRES_ACTION
            )
            call.cancel()
            await owner.stub.SubmitToolApprovals(
                pb.SubmitToolApprovalsRequest(
                    name=run,
                    approvals=[
                        pb.ToolApproval(
                            tool_call_id="call_1",
                            decision=pb.TOOL_APPROVAL_DECISION_COMPLETE,
                            result_text="it counted",
                        )
                    ],
                ),
                metadata=caller.md,
                timeout=CALL_DEADLINE_S,
            )
            live = await watch_all(owner.stub, caller, run)
            ended = await watch_all(owner.stub, caller, run)
            for seen in (live, ended):
                assert_watchable(seen)
                assert seen.sequences[0] == SEQUENCE_BLOCK + 1, _trail(seen.updates)
                assert seen.states == [
                    pb.RUN_STATE_QUEUED,
                    pb.RUN_STATE_RUNNING,
                    pb.RUN_STATE_REQUIRES_ACTION,
                    pb.RUN_STATE_RUNNING,
                    pb.RUN_STATE_SUCCEEDED,
                ], _trail(seen.updates)
                assert seen.text == "The tool said: it counted"
            # A process started after the end: from what it holds, or the run as stored.
            await owner.stop()
            await owner.start()
            fresh = await watch_all(owner.stub, caller, run)
            assert_watchable(fresh)
            assert fresh.final.state == pb.RUN_STATE_SUCCEEDED
            assert fresh.final.output_message == ended.final.output_message


async def _stored_text(replica: Replica, caller: Caller, run: pb.Run) -> str:
    message = (
        await context_stub(_channel(replica)).GetMessage(
            cpb.GetMessageRequest(name=run.output_message),
            metadata=caller.md,
            timeout=CALL_DEADLINE_S,
        )
    ).message
    return "".join(part.text for part in message.parts)


def _last_attempt(seen: list[pb.RunUpdate]) -> list[pb.RunUpdate]:
    """The updates of the newest block a watcher saw (the attempt that answered)."""
    block = seen[-1].sequence // SEQUENCE_BLOCK
    return [u for u in seen if u.sequence // SEQUENCE_BLOCK == block]


def _covered(update: pb.RunUpdate) -> tuple[int, int]:
    return update.first_sequence or update.sequence, update.sequence


def _ended(seen: list[pb.RunUpdate]) -> bool:
    return seen[-1].state_change.run.state in TERMINAL


async def test_a_follower_relays_every_token_of_an_attempt_requeued_after_a_kill(
    env: dict[str, str],
) -> None:
    async with replicas(
        {**env, "SWITCHBOARD_DISPATCHER_RECOVERY": "requeue"}, "streams-owner", "streams-follower"
    ) as (owner, follower):
        caller = await sign_up(_address(owner), "streams")
        contexts = context_stub(_channel(owner))
        workspace = (await create_workspace(contexts, caller, "S")).name
        conversation = (await create_conversation(contexts, caller, workspace)).name
        # A progress update after every 16 words, each right behind a delta: ten places
        # per attempt where the delta before a logged update may come second.
        words = " ".join(f"w{i}" for i in range(160))
        sent = await owner.stub.SendMessage(
            request(conversation, words, delay_ms=20), metadata=caller.md, timeout=CALL_DEADLINE_S
        )
        name = sent.run.name
        watches: dict[bool, tuple[aio.UnaryStreamCall[Any, Any], list[pb.RunUpdate]]] = {}
        for merge in (False, True):
            call = follower.stub.WatchRun(
                pb.WatchRunRequest(name=name, merge_deltas=merge),
                metadata=caller.md,
                timeout=SETTLE_S,
            )
            watches[merge] = (call, [])
        plain, seen = watches[False]
        await read_until(plain, seen, lambda seen: sum(u.HasField("delta") for u in seen) >= 20)
        owner.kill()  # mid-answer
        await owner.start()
        assert _recovered(owner)["action"] == "requeued"
        for call, updates in watches.values():
            await read_until(call, updates, _ended)
        end = watches[False][1][-1].state_change.run
        assert end.state == pb.RUN_STATE_SUCCEEDED
        answer = await _stored_text(follower, caller, end)
        for merge, (_, updates) in watches.items():
            attempt = _last_attempt(updates)
            assert attempt[0].state_change.run.state == pb.RUN_STATE_QUEUED
            assert attempt[0].sequence == SEQUENCE_BLOCK + 1
            covered = [_covered(u) for u in attempt]
            gaps = [(a, b) for a, b in itertools.pairwise(covered) if b[0] != a[1] + 1]
            assert gaps == [], (merge, gaps, _trail(attempt))
            text = "".join(u.delta.text for u in attempt if u.HasField("delta"))
            assert text == answer, merge
            (result,) = [u.result for u in attempt if u.HasField("result")]
            assert "".join(p.text for p in result.parts) == answer
        # On the owner, a watch from the start: the attempt once, from its QUEUED change.
        again = await watch_all(owner.stub, caller, name)
        assert_watchable(again)
        assert again.states == [
            pb.RUN_STATE_QUEUED,
            pb.RUN_STATE_RUNNING,
            pb.RUN_STATE_SUCCEEDED,
        ], _trail(again.updates)
        assert again.text == answer
