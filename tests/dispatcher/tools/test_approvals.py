"""Tool calls that wait for a person, end to end (``dispatcher/tools/approvals.py``): the
mesh, the reference MCP server and the local OpenAI-compatible server of
``test_tool_runs.py``, with an assistant whose tools need approval.

Approval granted, denied, expired, survived across a restart of the replica; the pause
bounded by the approval timeout, not the run's deadline; cancel while paused; a repeated
decision; a viewer cannot approve, a stranger cannot see the pending calls; a message
queued behind a paused run says what it waits behind; approvals over Converse.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from grpc import aio

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.handler.v1 import handler_pb2 as hpb
from switchboard.dispatcher.runs.core.store import RunStore
from switchboard.mesh import create_server
from switchboard.platform.security.credentials.accesstokens import SigningKey, private_key_pem
from switchboard.platform.values.resources import RunName
from tests.conftest import CALL_DEADLINE_S, fresh_database_url, make_settings
from tests.dispatcher.tools.test_tool_runs import (
    SLOW,
    SUM,
    _decide,
    _paused,
    _prepare,
    _send,
    _settings,
    answer_with_tool_output,
    ask,
    tool_mesh,
    tool_messages,
)
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.infra.mcpeverything import EverythingServer
from tests.kits.contextkit import refused
from tests.kits.dispatchkit import (
    cancel,
    dispatcher_stub,
    get_run,
    read_until,
    reason_of,
    watch_all,
)

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def everything() -> Iterator[EverythingServer]:
    with EverythingServer() as server:
        yield server


async def test_an_approved_call_runs_after_the_pause(everything: EverythingServer) -> None:
    async with tool_mesh(everything, approval=("get-sum",)) as tools:
        tools.fake.script(
            Reply.tool_calls([(SUM, {"a": 4, "b": 5}, "c1")]), answer_with_tool_output
        )
        run = await _send(tools, ask(tools, "4 + 5?"))
        call, paused = await _paused(tools, run.name)
        call.cancel()
        pending = paused.required_action.tool_calls
        assert [p.call.id for p in pending] == ["c1"]
        assert pending[0].call.requires_approval
        assert pending[0].decision == pb.TOOL_APPROVAL_DECISION_UNSPECIFIED
        assert paused.required_action.HasField("expire_time")

        # Who may see and decide: a viewer sees it but cannot approve; a stranger sees nothing.
        viewer_view = await get_run(tools.dstub, tools.world.viewer, run.name)
        assert viewer_view.state == pb.RUN_STATE_REQUIRES_ACTION
        await refused(
            tools.dstub.SubmitToolApprovals(
                pb.SubmitToolApprovalsRequest(
                    name=run.name,
                    approvals=[
                        pb.ToolApproval(
                            tool_call_id="c1", decision=pb.TOOL_APPROVAL_DECISION_APPROVE
                        )
                    ],
                ),
                metadata=tools.world.viewer.md,
                timeout=CALL_DEADLINE_S,
            ),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        await refused(
            get_run(tools.dstub, tools.world.outsider, run.name), grpc.StatusCode.NOT_FOUND
        )
        await refused(
            watch_all(tools.dstub, tools.world.outsider, run.name), grpc.StatusCode.NOT_FOUND
        )

        decided = await _decide(tools, run.name, "c1", pb.TOOL_APPROVAL_DECISION_APPROVE, "ok")
        assert decided.state == pb.RUN_STATE_RUNNING
        assert decided.required_action.tool_calls[0].decided_by == f"users/{tools.world.editor.id}"
        seen = await watch_all(tools.dstub, tools.world.editor, run.name)
        assert seen.final.state == pb.RUN_STATE_SUCCEEDED
        assert "9" in seen.text
        assert pb.RUN_STATE_REQUIRES_ACTION in seen.states
        # Deciding again once it ran is refused precisely.
        await refused(
            _decide(tools, run.name, "c1", pb.TOOL_APPROVAL_DECISION_APPROVE),
            grpc.StatusCode.FAILED_PRECONDITION,
        )


async def test_a_message_queued_behind_a_run_waiting_for_approval_says_what_it_waits_behind(
    everything: EverythingServer,
) -> None:
    """Issue 79: the next message of a conversation whose run waits for a person's
    approval sat QUEUED for up to the approval timeout, and nothing said why. GetRun,
    WatchRun and the stored run (another replica's GetRun) name the run it waits
    behind, its state and why, until it starts."""
    async with tool_mesh(everything, approval=("get-sum",)) as tools:
        tools.fake.script(
            Reply.tool_calls([(SUM, {"a": 4, "b": 5}, "c1")]),
            answer_with_tool_output,
            Reply.text("Nothing after that."),
        )
        first = await _send(tools, ask(tools, "4 + 5?"))
        call, paused = await _paused(tools, first.name)
        call.cancel()

        second = await _send(tools, ask(tools, "and after that?"))
        behind = pb.QueuedBehind(
            run=first.name,
            state=pb.RUN_STATE_REQUIRES_ACTION,
            reason="waiting for a person's approval of 1 tool call",
            ahead=1,
            expire_time=paused.required_action.expire_time,
        )
        assert second.state == pb.RUN_STATE_QUEUED
        assert second.queued_behind == behind
        shown = await get_run(tools.dstub, tools.world.viewer, second.name)
        assert (shown.state, shown.queued_behind) == (pb.RUN_STATE_QUEUED, behind)

        watch = tools.dstub.WatchRun(
            pb.WatchRunRequest(name=second.name),
            metadata=tools.world.viewer.md,
            timeout=CALL_DEADLINE_S,
        )
        seen: list[pb.RunUpdate] = []

        def noted(updates: list[pb.RunUpdate]) -> bool:
            return updates[-1].queued_behind == behind

        await read_until(watch, seen, noted)
        # Announced once stored: a replica that does not hold the run reads it too.
        target = RunName.parse(second.name, "name")
        stored = await RunStore(tools.server.shared.database).get(
            target.workspace, target.conversation, target.run
        )
        assert stored.run.queued_behind == behind

        await _decide(tools, first.name, "c1", pb.TOOL_APPROVAL_DECISION_APPROVE)

        def ended(updates: list[pb.RunUpdate]) -> bool:
            return updates[-1].state_change.run.state == pb.RUN_STATE_SUCCEEDED

        await read_until(watch, seen, ended)
        # Not a state change: the state did not change.
        runs = [u.state_change.run for u in seen if u.WhichOneof("update") == "state_change"]
        assert [run.state for run in runs] == [
            pb.RUN_STATE_QUEUED,
            pb.RUN_STATE_RUNNING,
            pb.RUN_STATE_SUCCEEDED,
        ]
        notes = [u.queued_behind for u in seen if u.WhichOneof("update") == "queued_behind"]
        # Every note named the run ahead (its state as it went), and came before the start.
        assert {n.run for n in notes} == {first.name}
        kinds_seen = [u.WhichOneof("update") for u in seen]
        assert kinds_seen.index("queued_behind") < kinds_seen.index("result")
        # Once it starts it waits behind nothing.
        assert not any(run.HasField("queued_behind") for run in runs[1:])
        assert (await get_run(tools.dstub, tools.world.viewer, first.name)).state == (
            pb.RUN_STATE_SUCCEEDED
        )
        assert not (await get_run(tools.dstub, tools.world.viewer, second.name)).HasField(
            "queued_behind"
        )


async def test_a_denied_call_goes_back_to_the_model_with_the_reason(
    everything: EverythingServer,
) -> None:
    async with tool_mesh(everything, approval=("get-sum",)) as tools:
        tools.fake.script(
            Reply.tool_calls([(SUM, {"a": 4, "b": 5}, "c1")]), answer_with_tool_output
        )
        run = await _send(tools, ask(tools, "4 + 5?"))
        call, _ = await _paused(tools, run.name)
        call.cancel()
        await _decide(tools, run.name, "c1", pb.TOOL_APPROVAL_DECISION_DENY, "not today")
        seen = await watch_all(tools.dstub, tools.world.editor, run.name)
        assert seen.final.state == pb.RUN_STATE_SUCCEEDED
        result = next(
            u.tool_result for u in seen.updates if u.WhichOneof("update") == "tool_result"
        )
        assert result.outcome == hpb.TOOL_OUTCOME_DENIED
        assert "not today" in result.error.message
        told = tool_messages(tools.fake.requests[1].body)[-1]["content"]
        assert "denied" in told
        assert "not today" in told


async def test_an_unanswered_approval_expires_and_the_run_fails_precisely(
    everything: EverythingServer,
) -> None:
    async with tool_mesh(
        everything, approval=("get-sum",), dispatcher_approval_timeout_s=0.3
    ) as tools:
        tools.fake.script(Reply.tool_calls([(SUM, {"a": 1, "b": 2}, "c1")]))
        run = await _send(tools, ask(tools, "1 + 2?"))
        seen = await watch_all(tools.dstub, tools.world.editor, run.name)
        assert pb.RUN_STATE_REQUIRES_ACTION in seen.states
        assert seen.final.state == pb.RUN_STATE_FAILED
        assert reason_of(seen.final) == "ERROR_REASON_APPROVAL_EXPIRED"
        assert seen.final.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        assert len(tools.fake.requests) == 1  # the model was not asked again


async def test_a_pause_is_bounded_by_the_approval_timeout_not_the_run_s_deadline(
    everything: EverythingServer,
) -> None:
    # The run may compute for 2 s; the person has 4 s. The pause outlives the
    # run's deadline, so only a deadline that stops while paused lets the
    # approval timeout end it.
    async with tool_mesh(
        everything, approval=("get-sum",), dispatcher_approval_timeout_s=4.0
    ) as tools:
        tools.fake.script(Reply.tool_calls([(SUM, {"a": 1, "b": 2}, "c1")]))
        request = ask(tools, "1 + 2?")
        request.timeout.FromSeconds(2)
        run = await _send(tools, request)
        call, paused = await _paused(tools, run.name)
        call.cancel()
        waits = paused.required_action.expire_time.ToDatetime() - paused.start_time.ToDatetime()
        assert waits >= dt.timedelta(seconds=4)
        assert not paused.HasField("deadline")  # nothing stops it but the expiry
        seen = await watch_all(tools.dstub, tools.world.editor, run.name)
        assert seen.final.state == pb.RUN_STATE_FAILED
        assert reason_of(seen.final) == "ERROR_REASON_APPROVAL_EXPIRED"


async def test_cancel_while_paused(everything: EverythingServer) -> None:
    async with tool_mesh(everything, approval=("get-sum",)) as tools:
        tools.fake.script(Reply.tool_calls([(SUM, {"a": 1, "b": 2}, "c1")]))
        run = await _send(tools, ask(tools, "1 + 2?"))
        call, _ = await _paused(tools, run.name)
        call.cancel()
        ended = await cancel(tools.dstub, tools.world.editor, run.name, "never mind")
        assert ended.state == pb.RUN_STATE_CANCELLED
        await refused(
            _decide(tools, run.name, "c1", pb.TOOL_APPROVAL_DECISION_APPROVE),
            grpc.StatusCode.FAILED_PRECONDITION,
        )


async def test_a_repeated_decision_is_answered_with_the_run_while_the_run_holds_it(
    everything: EverythingServer,
) -> None:
    # The contract's "a call already decided the same way is accepted again" holds
    # after the last decision too: a client whose reply was lost (its replica was
    # killed after storing the decision) retries and gets the run, not an error.
    async with tool_mesh(everything, approval=("trigger-long-running-operation",)) as tools:
        tools.fake.script(Reply.tool_calls([(SLOW, {"duration": 30, "steps": 30}, "c1")]))
        run = await _send(tools, ask(tools, "Take your time"))
        call, _ = await _paused(tools, run.name)
        call.cancel()
        first = await _decide(tools, run.name, "c1", pb.TOOL_APPROVAL_DECISION_APPROVE)
        assert first.state == pb.RUN_STATE_RUNNING
        # The approved call now runs for 30 s: the run still holds the decision.
        again = await _decide(tools, run.name, "c1", pb.TOOL_APPROVAL_DECISION_APPROVE)
        assert again.state == pb.RUN_STATE_RUNNING
        assert again.required_action.tool_calls[0].decision == pb.TOOL_APPROVAL_DECISION_APPROVE
        assert again.required_action.tool_calls[0].decide_time == (
            first.required_action.tool_calls[0].decide_time
        )
        other = await refused(
            _decide(tools, run.name, "c1", pb.TOOL_APPROVAL_DECISION_DENY),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        assert "already decided the other way" in (other.details() or "")
        await refused(
            _decide(tools, run.name, "c2", pb.TOOL_APPROVAL_DECISION_APPROVE),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        ended = await cancel(tools.dstub, tools.world.editor, run.name)
        assert ended.state == pb.RUN_STATE_CANCELLED
        await refused(
            _decide(tools, run.name, "c1", pb.TOOL_APPROVAL_DECISION_APPROVE),
            grpc.StatusCode.FAILED_PRECONDITION,
        )


async def test_a_paused_run_survives_a_restart_of_its_replica(
    everything: EverythingServer, tmp_path: Path
) -> None:
    key_file = tmp_path / "k1.pem"
    key_file.write_bytes(private_key_pem(SigningKey.generate("k1")))
    async with FakeOpenAI() as fake:
        common = _settings(
            fake,
            database_url=fresh_database_url(),
            instance_id="paused-replica",
            signing_keys=(str(key_file),),
        )
        fake.script(Reply.tool_calls([(SUM, {"a": 40, "b": 2}, "c1")]), answer_with_tool_output)
        server, _ = await create_server(make_settings(**common))
        await server.start()
        async with aio.insecure_channel(server.address) as channel:
            tools = await _prepare(server, channel, fake, everything, approval=("get-sum",))
            world = tools.world
            run = await _send(tools, ask(tools, "40 + 2?", timeout={"seconds": 60}))
            call, paused = await _paused(tools, run.name)
            call.cancel()
        await server.shutdown(grace=0)

        again, _ = await create_server(make_settings(**common))
        await again.start()
        try:
            async with aio.insecure_channel(again.address) as channel:
                tools.dstub = dispatcher_stub(channel)
                stored = await get_run(tools.dstub, world.editor, run.name)
                assert [p.call.id for p in stored.required_action.tool_calls] == ["c1"]
                call, resumed = await _paused(tools, run.name)
                call.cancel()
                assert resumed.last_sequence > paused.last_sequence
                await _decide(tools, run.name, "c1", pb.TOOL_APPROVAL_DECISION_APPROVE)
                seen = await watch_all(tools.dstub, world.editor, run.name)
                assert seen.final.state == pb.RUN_STATE_SUCCEEDED
                assert "42" in seen.text
                # The model was not asked again for the call it had made before the restart.
                assert len(fake.requests) == 2
        finally:
            await again.shutdown(grace=0)


async def test_approvals_over_converse(everything: EverythingServer) -> None:
    async with tool_mesh(everything, approval=("get-sum",)) as tools:
        tools.fake.script(
            Reply.tool_calls([(SUM, {"a": 1, "b": 1}, "c1")]), answer_with_tool_output
        )
        outgoing: asyncio.Queue[pb.ConverseRequest | None] = asyncio.Queue()

        async def frames() -> AsyncIterator[pb.ConverseRequest]:
            while (frame := await outgoing.get()) is not None:
                yield frame

        stream = tools.dstub.Converse(
            frames(), metadata=tools.world.editor.md, timeout=CALL_DEADLINE_S
        )
        await outgoing.put(
            pb.ConverseRequest(client_request_id="s", send_message=ask(tools, "1+1"))
        )
        run = ""
        async for frame in stream:
            kind = frame.WhichOneof("frame")
            if kind == "message_sent":
                run = frame.message_sent.run.name
            elif kind == "update" and frame.update.state_change.run.state == (
                pb.RUN_STATE_REQUIRES_ACTION
            ):
                await outgoing.put(
                    pb.ConverseRequest(
                        client_request_id="a",
                        submit_tool_approvals=pb.SubmitToolApprovalsRequest(
                            name=run,
                            approvals=[
                                pb.ToolApproval(
                                    tool_call_id="c1",
                                    decision=pb.TOOL_APPROVAL_DECISION_APPROVE,
                                )
                            ],
                        ),
                    )
                )
            elif kind == "tool_approvals_submitted":
                assert frame.client_request_id == "a"
            elif kind == "update" and frame.update.state_change.run.state == (
                pb.RUN_STATE_SUCCEEDED
            ):
                break
        await outgoing.put(None)
        final = await get_run(tools.dstub, tools.world.editor, run)
        assert final.state == pb.RUN_STATE_SUCCEEDED
