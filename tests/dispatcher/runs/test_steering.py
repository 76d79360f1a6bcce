"""Steering a live run (docs/dispatcher.md, "Steering a live run"), end to end with real
parts: the llm handler against the local OpenAI-compatible server, the reference MCP
server (server-everything) for the tool steps, the whole mesh in process.

What must hold: a steer is taken at the run's next step boundary (the model request of
that step holds it, after the step's tool results), the target's updates say ACCEPTED
then CONSUMED at that step, and the steer's own run ends SUCCEEDED/CONSUMED; several
are taken in order; a steer of a run paused for approval decides nothing; a steer its
target never took answers as a queued run (exactly one answer); SteerRun, SendMessage
with CONCURRENCY_POLICY_STEER and Converse's ``steer_run`` all steer; bad input is
refused precisely with nothing stored.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc import aio

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.mesh import create_server
from switchboard.platform.security.credentials.accesstokens import SigningKey, private_key_pem
from tests.conftest import CALL_DEADLINE_S, fresh_database_url, make_settings
from tests.dispatcher.budgets.test_service import add_budget, daily, window
from tests.dispatcher.tools.test_run_journal import (
    SLOW_ARGS,
    SLOW_CALLS,
    Restartable,
    _sql,
    restarted,
    stopped_mid_call,
)
from tests.dispatcher.tools.test_run_journal import _decide as _decide_unknown
from tests.dispatcher.tools.test_tool_runs import (
    SLOW,
    SUM,
    Tools,
    _decide,
    _paused,
    _prepare,
    _send,
    _settings,
    answer_with_tool_output,
    ask,
    tool_mesh,
)
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.infra.mcpeverything import EverythingServer
from tests.infra.webhookreceiver import until as eventually
from tests.kits.authkit import detail
from tests.kits.contextkit import Caller, all_messages, context_stub, refused, violations
from tests.kits.dispatchkit import get_run, until, watch_all

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def everything() -> Iterator[EverythingServer]:
    with EverythingServer() as server:
        yield server


def _message(text: str) -> cpb.Message:
    return cpb.Message(parts=[cpb.ContentPart(text=text)])


async def _steer(
    tools: Tools, run: str, text: str, *, caller: Caller | None = None, request_id: str = ""
) -> pb.SteerRunResponse:
    response: pb.SteerRunResponse = await tools.dstub.SteerRun(
        pb.SteerRunRequest(run=run, message=_message(text), request_id=request_id),
        metadata=(caller or tools.world.editor).md,
        timeout=CALL_DEADLINE_S,
    )
    return response


def _steers(updates: list[pb.RunUpdate]) -> list[tuple[str, int, int]]:
    """The target's steer updates: (steer run, state, step)."""
    return [
        (u.steer.steer_run, u.steer.state, u.steer.step)
        for u in updates
        if u.WhichOneof("update") == "steer"
    ]


def _tail(body: dict[str, Any], count: int) -> list[dict[str, Any]]:
    return list(body["messages"][-count:])


def _held_tool_call(hold: asyncio.Event) -> Reply:
    """The model's first answer, a call of get-sum, held mid-stream until ``hold``."""
    return Reply.tool_calls(
        [(SUM, {"a": 2, "b": 3}, "call_1")], usage=(100, 10), hold_after_chunks=1, hold=hold
    )


async def _request_count(tools: Tools, count: int) -> None:
    await asyncio.wait_for(tools.fake.wait_requests(count), CALL_DEADLINE_S)


# -- taken at a step boundary -------------------------------------------------------------


async def test_a_steer_is_consumed_between_two_tool_steps(everything: EverythingServer) -> None:
    async with tool_mesh(everything) as tools:
        hold = asyncio.Event()
        tools.fake.script(_held_tool_call(hold), answer_with_tool_output)
        run = await _send(tools, ask(tools, "What is 2 + 3?"))
        await _request_count(tools, 1)  # the model is writing step 1

        steered = await _steer(tools, run.name, "Actually, say it in French.")
        assert steered.run.state == pb.RUN_STATE_QUEUED
        assert steered.run.steer.target == run.name
        assert steered.run.steer.state == pb.STEER_STATE_ACCEPTED
        assert steered.run.concurrency_policy == pb.CONCURRENCY_POLICY_STEER
        assert steered.run.assistant == tools.assistant
        assert steered.message.role == cpb.MESSAGE_ROLE_USER
        hold.set()

        seen = await watch_all(tools.dstub, tools.world.viewer, run.name)
        assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error
        # Step 2's request: the tool exchange, then the steer, last.
        body = tools.fake.requests[1].body
        tool_result, steer = _tail(body, 2)
        assert tool_result["role"] == "tool"
        assert steer == {"role": "user", "content": "Actually, say it in French."}
        assert len(tools.fake.requests) == 2
        assert _steers(seen.updates) == [
            (steered.run.name, pb.STEER_STATE_ACCEPTED, 0),
            (steered.run.name, pb.STEER_STATE_CONSUMED, 2),
        ]
        mine = await get_run(tools.dstub, tools.world.viewer, steered.run.name)
        assert mine.state == pb.RUN_STATE_SUCCEEDED
        assert mine.steer.state == pb.STEER_STATE_CONSUMED
        assert mine.steer.step == 2
        assert mine.steer.HasField("decide_time")
        assert not mine.output_message  # its answer is the target's
        # One answer in the conversation, the target's.
        messages = await all_messages(tools.stub, tools.world.viewer, tools.conversation)
        answers = [m for m in messages if m.role == cpb.MESSAGE_ROLE_ASSISTANT and m.run]
        assert [m.run for m in answers if not any(p.HasField("tool_call") for p in m.parts)] == [
            run.name
        ]


async def test_three_steers_are_consumed_in_order_via_steer_run_and_send_message(
    everything: EverythingServer,
) -> None:
    async with tool_mesh(everything) as tools:
        hold = asyncio.Event()
        tools.fake.script(_held_tool_call(hold), answer_with_tool_output)
        run = await _send(tools, ask(tools, "What is 2 + 3?"))
        await _request_count(tools, 1)

        first = await _steer(tools, run.name, "one")
        second = await tools.dstub.SendMessage(
            pb.SendMessageRequest(
                conversation=tools.conversation,
                message=_message("two"),
                concurrency_policy=pb.CONCURRENCY_POLICY_STEER,
            ),
            metadata=tools.world.editor.md,
            timeout=CALL_DEADLINE_S,
        )
        third = await _steer(tools, run.name, "three")
        assert second.run.steer.target == run.name
        assert second.run.steer.state == pb.STEER_STATE_ACCEPTED
        hold.set()

        seen = await watch_all(tools.dstub, tools.world.viewer, run.name)
        assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error
        body = tools.fake.requests[1].body
        assert [m["content"] for m in _tail(body, 3)] == ["one", "two", "three"]
        assert _tail(body, 4)[0]["role"] == "tool"
        names = [first.run.name, second.run.name, third.run.name]
        assert [s for s in _steers(seen.updates) if s[1] == pb.STEER_STATE_CONSUMED] == [
            (name, pb.STEER_STATE_CONSUMED, 2) for name in names
        ]
        for name in names:
            steer = await get_run(tools.dstub, tools.world.viewer, name)
            assert steer.state == pb.RUN_STATE_SUCCEEDED
            assert steer.steer.state == pb.STEER_STATE_CONSUMED
        assert len(tools.fake.requests) == 2


async def test_a_steer_of_a_run_paused_for_approval_decides_nothing(
    everything: EverythingServer,
) -> None:
    async with tool_mesh(everything, approval=("get-sum",)) as tools:
        tools.fake.script(
            Reply.tool_calls([(SUM, {"a": 2, "b": 3}, "call_1")], usage=(100, 10)),
            answer_with_tool_output,
        )
        run = await _send(tools, ask(tools, "What is 2 + 3?"))
        call, paused = await _paused(tools, run.name)
        call.cancel()

        steered = await _steer(tools, run.name, "and add one more")
        assert steered.run.steer.state == pb.STEER_STATE_ACCEPTED
        still = await get_run(tools.dstub, tools.world.viewer, run.name)
        assert still.state == pb.RUN_STATE_REQUIRES_ACTION
        pending = still.required_action.tool_calls
        assert [p.decision for p in pending] == [pb.TOOL_APPROVAL_DECISION_UNSPECIFIED]
        assert len(tools.fake.requests) == 1  # nothing asked of the model meanwhile

        await _decide(
            tools,
            run.name,
            paused.required_action.tool_calls[0].call.id,
            pb.TOOL_APPROVAL_DECISION_APPROVE,
        )
        seen = await watch_all(tools.dstub, tools.world.viewer, run.name)
        assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error
        tool_result, steer = _tail(tools.fake.requests[1].body, 2)
        assert tool_result["role"] == "tool"
        assert "5" in tool_result["content"]
        assert steer == {"role": "user", "content": "and add one more"}
        mine = await get_run(tools.dstub, tools.world.viewer, steered.run.name)
        assert (mine.steer.state, mine.steer.step) == (pb.STEER_STATE_CONSUMED, 2)


async def test_a_steer_the_run_never_takes_runs_as_a_queued_run_and_answers_once(
    everything: EverythingServer,
) -> None:
    async with tool_mesh(everything) as tools:
        hold = asyncio.Event()
        tools.fake.script(
            # The final answer is being written: no step boundary is left.
            Reply.text("The answer is five.", hold_after_chunks=1, hold=hold),
            Reply.text("In French: cinq."),
        )
        run = await _send(tools, ask(tools, "What is 2 + 3?"))
        await _request_count(tools, 1)
        steered = await _steer(tools, run.name, "Say it in French.")
        hold.set()

        seen = await watch_all(tools.dstub, tools.world.viewer, run.name)
        assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error
        assert _steers(seen.updates) == [
            (steered.run.name, pb.STEER_STATE_ACCEPTED, 0),
            (steered.run.name, pb.STEER_STATE_REQUEUED, 0),
        ]
        # Told before the target's end.
        kinds = [u.WhichOneof("update") for u in seen.updates]
        assert kinds.index("steer") < len(kinds) - 1

        mine = await watch_all(tools.dstub, tools.world.viewer, steered.run.name)
        assert mine.final.state == pb.RUN_STATE_SUCCEEDED, mine.final.error
        assert mine.final.steer.state == pb.STEER_STATE_REQUEUED
        assert mine.text == "In French: cinq."
        # Its own request: the steer is the new message, after the target's answer.
        assert _tail(tools.fake.requests[1].body, 1) == [
            {"role": "user", "content": "Say it in French."}
        ]
        assert len(tools.fake.requests) == 2
        messages = await all_messages(tools.stub, tools.world.viewer, tools.conversation)
        answers = [m.run for m in messages if m.role == cpb.MESSAGE_ROLE_ASSISTANT]
        assert answers == [run.name, steered.run.name]  # exactly one answer each


async def test_a_steer_of_a_cancelled_run_is_never_lost(everything: EverythingServer) -> None:
    async with tool_mesh(everything) as tools:
        hold = asyncio.Event()
        tools.fake.script(_held_tool_call(hold), Reply.text("Answered the steer."))
        run = await _send(tools, ask(tools, "What is 2 + 3?"))
        await _request_count(tools, 1)
        steered = await _steer(tools, run.name, "Never mind the sum; say hello.")
        await tools.dstub.CancelRun(
            pb.CancelRunRequest(name=run.name),
            metadata=tools.world.editor.md,
            timeout=CALL_DEADLINE_S,
        )
        mine = await watch_all(tools.dstub, tools.world.viewer, steered.run.name)
        assert mine.final.state == pb.RUN_STATE_SUCCEEDED, mine.final.error
        assert mine.final.steer.state == pb.STEER_STATE_REQUEUED
        assert mine.text == "Answered the steer."
        hold.set()


async def test_restart_stream_cuts_the_model_call_and_asks_again_with_the_steer(
    everything: EverythingServer,
) -> None:
    async with tool_mesh(everything) as tools:
        never = asyncio.Event()
        tools.fake.script(
            Reply.text("The sum is five and I will go on", hold_after_chunks=3, hold=never),
            Reply.text("Cinq.", usage=(50, 2)),
        )
        await add_budget(tools.server, tools.world.name, "daily", daily(10_000_000))
        run = await _send(
            tools, ask(tools, "What is 2 + 3?", steer_mode=pb.STEER_MODE_RESTART_STREAM)
        )
        assert run.steer_mode == pb.STEER_MODE_RESTART_STREAM
        call, _ = await until(tools.dstub, tools.world.viewer, run.name, "delta")
        call.cancel()
        steered = await _steer(tools, run.name, "In French, please.")

        seen = await watch_all(tools.dstub, tools.world.viewer, run.name)
        assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error
        (consumed,) = [u for u in seen.updates if u.steer.state == pb.STEER_STATE_CONSUMED]
        assert consumed.steer.steer_run == steered.run.name
        assert consumed.steer.step == 1
        void = [
            u.delta.text
            for u in seen.updates
            if u.WhichOneof("update") == "delta"
            and consumed.steer.discarded_from_sequence <= u.sequence < consumed.sequence
        ]
        assert "".join(void) == "The sum is"
        after = [
            u.delta.text
            for u in seen.updates
            if u.WhichOneof("update") == "delta" and u.sequence > consumed.sequence
        ]
        assert "".join(after) == "Cinq."
        assert seen.final.usage.input_tokens > 50  # the cut call is charged too
        # Its reservation settled: the budget holds nothing, and was charged both calls.
        used, held = await window(tools.server, "daily")
        assert held == 0
        assert used == seen.final.usage.cost_micros > 0
        assert _tail(tools.fake.requests[1].body, 2) == [
            {"role": "user", "content": "What is 2 + 3?"},
            {"role": "user", "content": "In French, please."},
        ]
        await asyncio.wait_for(tools.fake.wait_client_closed(1), CALL_DEADLINE_S)
        messages = await all_messages(tools.stub, tools.world.viewer, tools.conversation)
        answers = [m for m in messages if m.role == cpb.MESSAGE_ROLE_ASSISTANT]
        assert [m.parts[0].text for m in answers] == ["Cinq."]


async def test_a_restart_stream_run_cancelled_while_it_streams_ends_cancelled(
    everything: EverythingServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with tool_mesh(everything) as tools:
        never = asyncio.Event()
        tools.fake.script(Reply.text("one two three four", hold_after_chunks=2, hold=never))
        run = await _send(tools, ask(tools, "count", steer_mode=pb.STEER_MODE_RESTART_STREAM))
        call, _ = await until(tools.dstub, tools.world.viewer, run.name, "delta")
        call.cancel()
        await tools.dstub.CancelRun(
            pb.CancelRunRequest(name=run.name),
            metadata=tools.world.editor.md,
            timeout=CALL_DEADLINE_S,
        )
        seen = await watch_all(tools.dstub, tools.world.viewer, run.name)
        assert seen.final.state == pb.RUN_STATE_CANCELLED
        await asyncio.wait_for(tools.fake.wait_client_closed(1), CALL_DEADLINE_S)
        assert not [r for r in caplog.records if r.levelname == "ERROR"]


# -- Converse ------------------------------------------------------------------------------


async def test_converse_steers_and_relays_the_steer_run(everything: EverythingServer) -> None:
    async with tool_mesh(everything) as tools:
        hold = asyncio.Event()
        tools.fake.script(_held_tool_call(hold), answer_with_tool_output)
        run = await _send(tools, ask(tools, "What is 2 + 3?"))
        await _request_count(tools, 1)

        requests: asyncio.Queue[pb.ConverseRequest | None] = asyncio.Queue()

        async def frames() -> AsyncIterator[pb.ConverseRequest]:
            while (item := await requests.get()) is not None:
                yield item

        stream = tools.dstub.Converse(
            frames(), metadata=tools.world.editor.md, timeout=CALL_DEADLINE_S
        )
        await requests.put(
            pb.ConverseRequest(
                client_request_id="s1",
                steer_run=pb.SteerRunRequest(run=run.name, message=_message("steer me")),
            )
        )
        steered: pb.SteerRunResponse | None = None
        states: list[tuple[int, int]] = []
        async for frame in stream:
            kind = frame.WhichOneof("frame")
            if kind == "run_steered":
                assert frame.client_request_id == "s1"
                steered = frame.run_steered
                hold.set()
                await requests.put(None)  # half-close: ends once the relay has
            elif kind == "update" and frame.update.WhichOneof("update") == "state_change":
                changed = frame.update.state_change.run
                assert steered is not None
                assert frame.update.run == steered.run.name
                states.append((changed.state, changed.steer.state))
            elif kind == "error":
                raise AssertionError(frame.error)
        assert steered is not None
        assert states[0] == (pb.RUN_STATE_QUEUED, pb.STEER_STATE_ACCEPTED)
        assert states[-1] == (pb.RUN_STATE_SUCCEEDED, pb.STEER_STATE_CONSUMED)
        target = await watch_all(tools.dstub, tools.world.viewer, run.name)
        assert target.final.state == pb.RUN_STATE_SUCCEEDED, target.final.error
        await _request_count(tools, 2)
        assert _tail(tools.fake.requests[1].body, 1) == [{"role": "user", "content": "steer me"}]


# -- bad input -----------------------------------------------------------------------------


def _reason(error: aio.AioRpcError) -> str:
    info: error_details_pb2.ErrorInfo = detail(error, error_details_pb2.ErrorInfo)
    return str(info.reason)


async def test_bad_steers_are_refused_precisely_with_nothing_stored(
    everything: EverythingServer,
) -> None:
    async with tool_mesh(everything) as tools:
        tools.fake.script(Reply.text("done"))
        run = await _send(tools, ask(tools, "hello"))
        ended = await watch_all(tools.dstub, tools.world.viewer, run.name)
        assert ended.final.state == pb.RUN_STATE_SUCCEEDED
        before = await all_messages(tools.stub, tools.world.viewer, tools.conversation)
        editor = tools.world.editor.md

        error = await refused(
            tools.dstub.SteerRun(
                pb.SteerRunRequest(run=run.name, message=_message("too late")),
                metadata=editor,
                timeout=CALL_DEADLINE_S,
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        assert _reason(error) == "ERROR_REASON_RUN_ENDED"

        error = await refused(
            tools.dstub.SteerRun(
                pb.SteerRunRequest(run=run.name, message=cpb.Message()),
                metadata=editor,
                timeout=CALL_DEADLINE_S,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert violations(error) == ["message.parts"]
        error = await refused(
            tools.dstub.SteerRun(
                pb.SteerRunRequest(
                    run=run.name,
                    message=cpb.Message(
                        role=cpb.MESSAGE_ROLE_ASSISTANT, parts=[cpb.ContentPart(text="x")]
                    ),
                    request_id="not ok!",
                ),
                metadata=editor,
                timeout=CALL_DEADLINE_S,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert violations(error) == ["message.role", "request_id"]
        for bad in (f"{tools.world.name}/runs/y", f"{run.name}/more"):
            error = await refused(
                tools.dstub.SteerRun(
                    pb.SteerRunRequest(run=bad, message=_message("x")),
                    metadata=editor,
                    timeout=CALL_DEADLINE_S,
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
            )
            assert violations(error) == ["run"]
            # The refusal says what a run's name looks like.
            assert "workspaces/{workspace}/conversations/{conversation}/runs/{run}" in (
                error.details() or ""
            )
        missing = run.name.rsplit("/", 1)[0] + "/nosuchrun"
        await refused(
            tools.dstub.SteerRun(
                pb.SteerRunRequest(run=missing, message=_message("x")),
                metadata=editor,
                timeout=CALL_DEADLINE_S,
            ),
            grpc.StatusCode.NOT_FOUND,
        )
        # Another workspace's run: the outsider is not a member.
        await refused(
            tools.dstub.SteerRun(
                pb.SteerRunRequest(run=run.name, message=_message("x")),
                metadata=tools.world.outsider.md,
                timeout=CALL_DEADLINE_S,
            ),
            grpc.StatusCode.NOT_FOUND,
        )
        # A viewer may not send into the conversation.
        await refused(
            tools.dstub.SteerRun(
                pb.SteerRunRequest(run=run.name, message=_message("x")),
                metadata=tools.world.viewer.md,
                timeout=CALL_DEADLINE_S,
            ),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        error = await refused(
            tools.dstub.SendMessage(
                ask(tools, "x", steer_mode=7),
                metadata=editor,
                timeout=CALL_DEADLINE_S,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert violations(error) == ["steer_mode"]
        after = await all_messages(tools.stub, tools.world.viewer, tools.conversation)
        assert [m.name for m in after] == [m.name for m in before]
        listed = await tools.dstub.ListRuns(
            pb.ListRunsRequest(parent=tools.conversation), metadata=editor, timeout=CALL_DEADLINE_S
        )
        assert [r.name for r in listed.runs] == [run.name]


async def test_a_steer_retried_with_its_request_id_is_one_steer(
    everything: EverythingServer,
) -> None:
    async with tool_mesh(everything) as tools:
        hold = asyncio.Event()
        tools.fake.script(_held_tool_call(hold), answer_with_tool_output)
        run = await _send(tools, ask(tools, "What is 2 + 3?"))
        await _request_count(tools, 1)
        first = await _steer(tools, run.name, "once", request_id="steer-1")
        again = await _steer(tools, run.name, "once", request_id="steer-1")
        assert again.run.name == first.run.name
        assert again.message.name == first.message.name
        hold.set()
        seen = await watch_all(tools.dstub, tools.world.viewer, run.name)
        assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error
        assert [m["content"] for m in _tail(tools.fake.requests[1].body, 1)] == ["once"]
        # Retried after it was consumed (and the target ended): the same steer.
        late = await _steer(tools, run.name, "once", request_id="steer-1")
        assert late.run.name == first.run.name
        assert late.run.steer.state == pb.STEER_STATE_CONSUMED


async def test_a_steer_sent_while_its_target_waits_in_the_queue_is_read_once_at_step_1(
    everything: EverythingServer,
) -> None:
    async with tool_mesh(everything) as tools:
        hold = asyncio.Event()
        tools.fake.script(
            Reply.text("First answer.", hold_after_chunks=1, hold=hold),
            Reply.text("Second answer."),
        )
        first = await _send(tools, ask(tools, "first question"))
        await _request_count(tools, 1)
        second = await _send(tools, ask(tools, "second question"))  # queued behind it
        steered = await _steer(tools, second.name, "about the second: be brief")
        hold.set()

        seen = await watch_all(tools.dstub, tools.world.viewer, second.name)
        assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error
        contents = [m["content"] for m in tools.fake.requests[1].body["messages"]]
        # The window held the steer (stored before it was read): given once, after
        # the run's own message.
        assert contents[-2:] == ["second question", "about the second: be brief"]
        assert contents.count("about the second: be brief") == 1
        assert _steers(seen.updates)[-1] == (steered.run.name, pb.STEER_STATE_CONSUMED, 1)
        assert first.name != second.name


# -- recovery ------------------------------------------------------------------------------


async def test_a_steer_queued_when_the_replica_stopped_is_taken_by_the_resumed_run(
    everything: EverythingServer, tmp_path: Path
) -> None:
    steered: list[pb.SteerRunResponse] = []

    async def steer(tools: Tools) -> None:
        runs = await tools.dstub.ListRuns(
            pb.ListRunsRequest(parent=tools.conversation),
            metadata=tools.world.editor.md,
            timeout=CALL_DEADLINE_S,
        )
        steered.append(await _steer(tools, runs.runs[0].name, "and then stop"))

    async with (
        stopped_mid_call(everything, tmp_path, during=steer) as stopped,
        restarted(stopped),
    ):
        tools, run = stopped.tools, stopped.run
        call, _ = await _paused(tools, run)
        call.cancel()
        await _decide_unknown(tools, run, pb.TOOL_APPROVAL_DECISION_COMPLETE, result_text="done")
        seen = await watch_all(tools.dstub, tools.world.editor, run)
        assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error
        tool_result, steer_message = _tail(stopped.fake.requests[1].body, 2)
        assert tool_result["role"] == "tool"
        assert steer_message == {"role": "user", "content": "and then stop"}
        mine = await get_run(tools.dstub, tools.world.editor, steered[0].run.name)
        assert (mine.state, mine.steer.state, mine.steer.step) == (
            pb.RUN_STATE_SUCCEEDED,
            pb.STEER_STATE_CONSUMED,
            2,
        )
        assert len(stopped.fake.requests) == 2


async def test_a_resumed_run_gives_its_consumed_steer_to_the_model_again(
    everything: EverythingServer, tmp_path: Path
) -> None:
    key_file = tmp_path / "k1.pem"
    key_file.write_bytes(private_key_pem(SigningKey.generate("k1")))
    async with FakeOpenAI() as fake:
        common = _settings(
            fake,
            database_url=fresh_database_url(),
            instance_id="steer-replica",
            signing_keys=(str(key_file),),
        )
        hold = asyncio.Event()
        fake.script(
            _held_tool_call(hold),
            Reply.tool_calls([(SLOW, SLOW_ARGS, "slow_1")], usage=(100, 10)),
            answer_with_tool_output,
        )
        calls_before = everything.stderr().count(SLOW_CALLS)
        server, _ = await create_server(make_settings(**common))
        await server.start()
        async with aio.insecure_channel(server.address) as channel:
            tools = await _prepare(server, channel, fake, everything)
            run = await _send(tools, ask(tools, "Add, then wait", timeout={"seconds": 60}))
            await asyncio.wait_for(fake.wait_requests(1), CALL_DEADLINE_S)
            steered = await _steer(tools, run.name, "wait a little longer")
            hold.set()
            await eventually(
                lambda: everything.stderr().count(SLOW_CALLS) > calls_before,
                "the slow tool's call at the MCP server",
            )
        await server.shutdown(grace=0)
        # As if a crash had come between the target's journal and the steer's end (one
        # transaction makes that impossible; recovery still holds to it): the steer is
        # stored QUEUED/ACCEPTED again while the target's journal holds it.
        steer_id = steered.run.name.rsplit("/", 1)[-1]
        undone = pb.Run.FromString(
            _sql(common["database_url"], "SELECT data FROM runs WHERE id = :id", id=steer_id)
        )
        assert undone.steer.state == pb.STEER_STATE_CONSUMED
        undone.state = pb.RUN_STATE_QUEUED
        undone.steer.state = pb.STEER_STATE_ACCEPTED
        undone.ClearField("end_time")
        _sql(
            common["database_url"],
            "UPDATE runs SET data = :data, state = :state WHERE id = :id",
            data=undone.SerializeToString(),
            state=int(pb.RUN_STATE_QUEUED),
            id=steer_id,
        )
        stopped = Restartable(common, fake, tools, run.name, calls_before)
        async with restarted(stopped):
            call, _ = await _paused(tools, run.name)
            call.cancel()
            await _decide_unknown(
                tools, run.name, pb.TOOL_APPROVAL_DECISION_COMPLETE, result_text="waited"
            )
            seen = await watch_all(tools.dstub, tools.world.editor, run.name)
            assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error
            # Completed as consumed, never run.
            mine = await watch_all(tools.dstub, tools.world.editor, steered.run.name)
            assert pb.RUN_STATE_RUNNING not in mine.states
            assert (mine.final.state, mine.final.steer.state, mine.final.steer.step) == (
                pb.RUN_STATE_SUCCEEDED,
                pb.STEER_STATE_CONSUMED,
                2,
            )
            messages = await all_messages(
                context_stub(tools.channel), tools.world.editor, tools.conversation
            )
            assert [m.run for m in messages if m.role == cpb.MESSAGE_ROLE_ASSISTANT][-1:] == [
                run.name
            ]
        # Three model calls in all: none made again; the third, after the restart,
        # reads the steer where the second did (after step 1's result, before step 2).
        assert len(fake.requests) == 3
        second = fake.requests[1].body["messages"]
        third = fake.requests[2].body["messages"]
        assert second[-2]["role"] == "tool"
        assert second[-1] == {"role": "user", "content": "wait a little longer"}
        contents = [m.get("content") for m in third]
        assert contents.count("wait a little longer") == 1
        # Step 1, stored before the restart, is in the window the resumed run read: it
        # reaches the model once, from the journal, not again from the window.
        assert contents.count("The sum of 2 and 3 is 5.") == 1
        at = contents.index("wait a little longer")
        assert third[at - 1] == {
            "role": "tool",
            "tool_call_id": "call_1",
            "content": "The sum of 2 and 3 is 5.",
        }
        assert third[at + 1]["tool_calls"][0]["id"] == "slow_1"
