"""Durable runs (docs/dispatcher.md, "Durable runs"): a run's journal, and what a run
resumed from it does with a tool call that was in flight when its replica stopped.

Real parts: the llm handler against the local OpenAI-compatible server, the reference
MCP server (server-everything) whose slow tool is in flight at the stop, and the
replica restarted on the same database with the recovery policy ``resume`` (the
default). What must hold: the model is not asked again for a step it made, a call
that was sent is never sent again silently (a person decides RETRY, COMPLETE or
FAIL_RUN), the answer and the usage are the run's whole, and a journal that cannot
be continued ends the run with RUN_NOT_RESUMABLE instead of looping.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from grpc import aio
from sqlalchemy import create_engine, text

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.integration.v1 import integration_pb2 as ipb
from switchboard.internal.dispatcher.v1 import job_pb2
from switchboard.mesh import create_server
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.security.credentials.accesstokens import SigningKey, private_key_pem
from tests.conftest import CALL_DEADLINE_S, fresh_database_url, make_settings
from tests.dispatcher.budgets.test_service import add_budget, daily, window
from tests.dispatcher.tools.test_tool_runs import (
    SLOW,
    Tools,
    _paused,
    _prepare,
    _send,
    _settings,
    answer_with_tool_output,
    ask,
)
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.infra.mcpeverything import EverythingServer
from tests.infra.mcpserver import McpTestServer
from tests.infra.webhookreceiver import until as eventually
from tests.kits.dispatchkit import dispatcher_stub, get_run, reason_of, watch_all
from tests.kits.integrationkit import integration_stub

pytestmark = pytest.mark.service

SLOW_CALLS = "observed call trigger-long-running-operation"
#: The slow tool's arguments: long enough to be in flight at the stop, short enough
#: that a retry finishes quickly.
SLOW_ARGS = {"duration": 3, "steps": 3}


@pytest.fixture(scope="module")
def everything() -> Iterator[EverythingServer]:
    with EverythingServer() as server:
        yield server


@dataclass
class Restartable:
    """A replica on its own database, stopped while its run's tool call is in flight."""

    common: dict[str, Any]
    fake: FakeOpenAI
    tools: Tools
    run: str
    #: The slow tool's calls at the server before the run.
    calls_before: int


@asynccontextmanager
async def stopped_mid_call(
    everything: EverythingServer,
    tmp_path: Path,
    *,
    before: Callable[[Tools], Awaitable[None]] | None = None,
    during: Callable[[Tools], Awaitable[None]] | None = None,
    **overrides: Any,
) -> AsyncIterator[Restartable]:
    """A run whose model called the slow tool, its replica stopped while the call
    was at the MCP server; the model's next answer quotes the tool's output."""
    key_file = tmp_path / "k1.pem"
    key_file.write_bytes(private_key_pem(SigningKey.generate("k1")))
    async with FakeOpenAI() as fake:
        common = _settings(
            fake,
            database_url=fresh_database_url(),
            instance_id="journal-replica",
            signing_keys=(str(key_file),),
            **overrides,
        )
        fake.script(
            Reply.tool_calls([(SLOW, SLOW_ARGS, "slow_1")], usage=(100, 10)),
            answer_with_tool_output,
        )
        calls_before = everything.stderr().count(SLOW_CALLS)
        server, _ = await create_server(make_settings(**common))
        await server.start()
        async with aio.insecure_channel(server.address) as channel:
            tools = await _prepare(server, channel, fake, everything)
            if before is not None:
                await before(tools)
            run = await _send(tools, ask(tools, "Take your time", timeout={"seconds": 60}))
            await eventually(
                lambda: everything.stderr().count(SLOW_CALLS) > calls_before,
                "the slow tool's call at the MCP server",
            )
            if during is not None:
                await during(tools)
        await server.shutdown(grace=0)
        yield Restartable(common, fake, tools, run.name, calls_before)


@asynccontextmanager
async def restarted(stopped: Restartable) -> AsyncIterator[SwitchboardServer]:
    again, _ = await create_server(make_settings(**stopped.common))
    await again.start()
    try:
        async with aio.insecure_channel(again.address) as channel:
            stopped.tools.channel = channel
            stopped.tools.dstub = dispatcher_stub(channel)
            yield again
    finally:
        await again.shutdown(grace=0)


async def _decide(
    tools: Tools, run: str, decision: int, *, result_text: str = "", reason: str = ""
) -> pb.Run:
    response = await tools.dstub.SubmitToolApprovals(
        pb.SubmitToolApprovalsRequest(
            name=run,
            approvals=[
                pb.ToolApproval(
                    tool_call_id="slow_1",
                    decision=decision,  # type: ignore[arg-type]
                    result_text=result_text,
                    reason=reason,
                )
            ],
        ),
        metadata=tools.world.editor.md,
        timeout=CALL_DEADLINE_S,
    )
    return response.run


async def _refused(tools: Tools, run: str, decision: int, **fields: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _decide(tools, run, decision, **fields)
    return refused.value


async def test_a_call_in_flight_at_a_restart_waits_for_a_person_who_completes_it(
    everything: EverythingServer, tmp_path: Path
) -> None:
    async with stopped_mid_call(everything, tmp_path) as stopped, restarted(stopped):
        tools, run = stopped.tools, stopped.run
        call, paused = await _paused(tools, run)
        call.cancel()
        (pending,) = paused.required_action.tool_calls
        assert pending.call.id == "slow_1"
        assert pending.outcome_unknown
        assert pending.decision == pb.TOOL_APPROVAL_DECISION_UNSPECIFIED
        # An approval does not decide whether a call took effect, nor the reverse.
        wrong = await _refused(tools, run, pb.TOOL_APPROVAL_DECISION_APPROVE)
        assert wrong.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "RETRY, COMPLETE or FAIL_RUN" in (wrong.details() or "")
        empty = await _refused(tools, run, pb.TOOL_APPROVAL_DECISION_COMPLETE)
        assert empty.code() == grpc.StatusCode.INVALID_ARGUMENT
        decided = await _decide(
            tools, run, pb.TOOL_APPROVAL_DECISION_COMPLETE, result_text="it finished: 3 steps"
        )
        assert decided.required_action.tool_calls[0].result_text == "it finished: 3 steps"
        seen = await watch_all(tools.dstub, tools.world.editor, run)
        assert seen.final.state == pb.RUN_STATE_SUCCEEDED
        assert seen.text == "The tool said: it finished: 3 steps"
        # Neither the model nor the tool was asked again for what the journal holds.
        assert len(stopped.fake.requests) == 2
        assert everything.stderr().count(SLOW_CALLS) == stopped.calls_before + 1
        # The run's usage is both model calls', across the two attempts.
        stored = await get_run(tools.dstub, tools.world.editor, run)
        assert (stored.usage.input_tokens, stored.usage.output_tokens) == (300, 30)


async def test_a_run_stopped_again_while_it_waits_asks_the_same_question(
    everything: EverythingServer, tmp_path: Path
) -> None:
    async with stopped_mid_call(everything, tmp_path) as stopped:
        tools, run = stopped.tools, stopped.run
        async with restarted(stopped):
            call, first = await _paused(tools, run)
            call.cancel()
        # A second takeover: the same call, still undecided, nothing sent again.
        async with restarted(stopped):
            call, second = await _paused(tools, run)
            call.cancel()
            assert second.last_sequence > first.last_sequence
            (pending,) = second.required_action.tool_calls
            assert pending.outcome_unknown
            assert pending.decision == pb.TOOL_APPROVAL_DECISION_UNSPECIFIED
            await _decide(tools, run, pb.TOOL_APPROVAL_DECISION_COMPLETE, result_text="ok")
            seen = await watch_all(tools.dstub, tools.world.editor, run)
            assert seen.final.state == pb.RUN_STATE_SUCCEEDED
        assert len(stopped.fake.requests) == 2
        assert everything.stderr().count(SLOW_CALLS) == stopped.calls_before + 1


async def test_retry_sends_the_call_again_and_fail_run_ends_the_run(
    everything: EverythingServer, tmp_path: Path
) -> None:
    async with stopped_mid_call(everything, tmp_path) as stopped, restarted(stopped):
        tools, run = stopped.tools, stopped.run
        call, _ = await _paused(tools, run)
        call.cancel()
        await _decide(tools, run, pb.TOOL_APPROVAL_DECISION_RETRY)
        seen = await watch_all(tools.dstub, tools.world.editor, run)
        assert seen.final.state == pb.RUN_STATE_SUCCEEDED
        assert everything.stderr().count(SLOW_CALLS) == stopped.calls_before + 2
        assert len(stopped.fake.requests) == 2

    async with stopped_mid_call(everything, tmp_path) as stopped, restarted(stopped):
        tools, run = stopped.tools, stopped.run
        call, _ = await _paused(tools, run)
        call.cancel()
        await _decide(tools, run, pb.TOOL_APPROVAL_DECISION_FAIL_RUN, reason="unsure")
        seen = await watch_all(tools.dstub, tools.world.editor, run)
        assert seen.final.state == pb.RUN_STATE_FAILED
        assert reason_of(seen.final) == "ERROR_REASON_TOOL_OUTCOME_UNKNOWN"
        assert everything.stderr().count(SLOW_CALLS) == stopped.calls_before + 1
        assert len(stopped.fake.requests) == 1


async def test_a_retry_safe_tool_in_flight_is_sent_again_without_asking(
    everything: EverythingServer, tmp_path: Path
) -> None:
    async def safe(tools: Tools) -> None:
        # Marked safe by its owner before the run (changed while a call is in flight,
        # the integration's connection is renewed, which ends the call).
        await integration_stub(tools.channel).UpdateIntegration(
            ipb.UpdateIntegrationRequest(
                integration=ipb.Integration(name=tools.integration, retry_safe=True),
                update_mask=field_mask_pb2.FieldMask(paths=["retry_safe"]),
            ),
            metadata=tools.world.owner.md,
            timeout=CALL_DEADLINE_S,
        )

    async with (
        stopped_mid_call(everything, tmp_path, before=safe) as stopped,
        restarted(stopped),
    ):
        tools = stopped.tools
        seen = await watch_all(tools.dstub, tools.world.editor, stopped.run)
        assert seen.final.state == pb.RUN_STATE_SUCCEEDED
        assert pb.RUN_STATE_REQUIRES_ACTION not in [
            u.state_change.run.state for u in seen.updates if u.HasField("state_change")
        ]
        assert everything.stderr().count(SLOW_CALLS) == stopped.calls_before + 2
        assert len(stopped.fake.requests) == 2


def _sql(database: str, statement: str, **values: Any) -> Any:
    """Run ``statement`` on the replica's database while it is stopped."""
    engine = create_engine(database.replace("+aiosqlite", "").replace("+asyncpg", "+psycopg"))
    try:
        with engine.begin() as db:
            found = db.execute(text(statement), values)
            return found.scalar_one() if found.returns_rows else None
    finally:
        engine.dispose()


def _rewrite_job(url: str, run: str, change: Callable[[job_pb2.RunJob], None]) -> None:
    run_id = run.rsplit("/", 1)[-1]
    job = job_pb2.RunJob.FromString(_sql(url, "SELECT job FROM runs WHERE id = :id", id=run_id))
    change(job)
    _sql(url, "UPDATE runs SET job = :job WHERE id = :id", job=job.SerializeToString(), id=run_id)


async def test_a_journal_this_release_cannot_read_ends_the_run_precisely(
    everything: EverythingServer, tmp_path: Path
) -> None:
    async with stopped_mid_call(everything, tmp_path) as stopped:

        def newer(job: job_pb2.RunJob) -> None:
            assert job.journal_version == 1
            assert list(job.step_records[0].sent) == ["slow_1"]
            job.journal_version = 99

        _rewrite_job(stopped.common["database_url"], stopped.run, newer)
        async with restarted(stopped):
            tools = stopped.tools
            seen = await watch_all(tools.dstub, tools.world.editor, stopped.run)
            assert seen.final.state == pb.RUN_STATE_FAILED
            assert reason_of(seen.final) == "ERROR_REASON_RUN_NOT_RESUMABLE"
            assert "format version 99" in seen.final.error.message
            assert len(stopped.fake.requests) == 1


async def test_a_tool_gone_from_its_integration_ends_the_run_precisely(
    everything: EverythingServer, tmp_path: Path
) -> None:
    with McpTestServer() as other:
        async with stopped_mid_call(everything, tmp_path) as stopped:
            # Between the attempts the integration moved to a server without the slow
            # tool (written as UpdateIntegration writes it: a new version).
            _sql(
                stopped.common["database_url"],
                "UPDATE integrations SET endpoint = :url, version = version + 1 WHERE id = 'ev'",
                url=other.url,
            )
            async with restarted(stopped):
                tools = stopped.tools
                seen = await watch_all(tools.dstub, tools.world.editor, stopped.run)
                assert seen.final.state == pb.RUN_STATE_FAILED
                assert reason_of(seen.final) == "ERROR_REASON_RUN_NOT_RESUMABLE"
                assert "no longer offered" in seen.final.error.message
                assert len(stopped.fake.requests) == 1


async def test_a_journaled_step_is_charged_to_the_budget_once(
    everything: EverythingServer, tmp_path: Path
) -> None:
    async def budgeted(tools: Tools) -> None:
        await add_budget(tools.server, tools.world.name, "daily", daily(1_000_000))

    async with (
        stopped_mid_call(everything, tmp_path, before=budgeted) as stopped,
        restarted(stopped) as again,
    ):
        tools, run = stopped.tools, stopped.run
        call, _ = await _paused(tools, run)
        call.cancel()
        await _decide(tools, run, pb.TOOL_APPROVAL_DECISION_COMPLETE, result_text="done")
        seen = await watch_all(tools.dstub, tools.world.editor, run)
        assert seen.final.state == pb.RUN_STATE_SUCCEEDED
        # Prices 1 and 2 per million tokens: 100 in + 10 out, then 200 in + 20 out.
        assert seen.final.usage.cost_micros == 120 + 240
        used, held = await window(again, "daily")
        assert (used, held) == (360, 0)
