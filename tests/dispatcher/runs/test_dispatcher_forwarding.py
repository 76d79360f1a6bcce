"""Calls for a run reach the replica that runs it, whichever replica they land on.

Two real dispatcher processes (A and B) on one PostgreSQL and one Redis, as
behind Envoy, where a call lands on either. A run always starts on A; the calls
that only its owner can answer (CancelRun, SubmitToolApprovals, and their
Converse frames) go to B, which forwards them to A's advertised address with
the caller's own credential:

- a cancel sent to B ends the run on A, and B answers with the terminal run,
  naming the caller; so does a Converse ``cancel_run`` frame, and a call made
  with an API key (a credential a token minted for the user could not stand for);
- approvals sent to B (unary and a Converse frame) decide the calls A waits on,
  recorded as the caller's; a viewer is refused;
- a forged "forwarded" mark grants nothing: a viewer is refused on either
  replica, and a mark on a call B does not own only stops B from forwarding it
  (UNAVAILABLE, retry), it never loops;
- with A killed (SIGKILL), a cancel on B answers UNAVAILABLE while A's lease
  lasts and until B has taken A's runs over; then it cancels the run.
"""

from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.handler.v1 import handler_pb2 as hpb
from switchboard.api.integration.v1 import integration_pb2 as ipb
from switchboard.dispatcher.ports.peers import FORWARDED_KEY
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.procs import ServeProcess, shared_env
from tests.fakes.openai_server import FakeOpenAI
from tests.infra.mcpserver import McpTestServer
from tests.infra.redis import RedisServer
from tests.kits.authkit import PASSWORD, unique_email
from tests.kits.contextkit import (
    Caller,
    add_member,
    context_stub,
    create_conversation,
    create_workspace,
)
from tests.kits.dispatchkit import (
    Stub,
    cancel,
    careful_assistant,
    dispatcher_stub,
    get_run,
    read_until,
    request,
    script_two_echoes,
    until,
)
from tests.kits.integrationkit import create, integration_stub

pytestmark = pytest.mark.e2e

#: A's lease in the crash test: short, so B takes its runs over within seconds.
LEASE_S = 3.0
#: Bound on the crash test's retries (the lease, a lease-loop round, and slack).
TAKEOVER_WITHIN_S = 30.0


@dataclass
class People:
    owner: Caller
    editor: Caller
    viewer: Caller
    workspace: str
    conversation: str


@pytest.fixture
def env(tmp_path: Path, postgres_url: str, redis_server: RedisServer) -> dict[str, str]:
    return shared_env(tmp_path, postgres_url, redis_server.url)


@pytest.fixture
def front(env: dict[str, str]) -> Iterator[ServeProcess]:
    """Auth, context, events and integrations: everything but the dispatcher."""
    with ServeProcess(
        "--services",
        "auth,context,events,integration",
        env={**env, "SWITCHBOARD_EGRESS_ALLOW_LOOPBACK": "true"},
    ) as process:
        yield process


def replica(env: dict[str, str], name: str, **settings: str) -> ServeProcess:
    return ServeProcess(
        "--services",
        "dispatcher",
        env={**env, "SWITCHBOARD_INSTANCE_ID": name, **settings},
    )


@asynccontextmanager
async def stubs(*processes: ServeProcess) -> AsyncIterator[list[Stub]]:
    async with AsyncExitStack() as stack:
        channels = [
            await stack.enter_async_context(aio.insecure_channel(process.address))
            for process in processes
        ]
        yield [dispatcher_stub(channel) for channel in channels]


async def register(channel: aio.Channel) -> Caller:
    response = await auth_pb2_grpc.AuthServiceStub(channel).Register(
        auth_pb2.RegisterRequest(email=unique_email("fwd"), password=PASSWORD),
        timeout=CALL_DEADLINE_S,
    )
    return Caller(response.user.name.removeprefix("users/"), response.tokens.access_token)


async def people(front: ServeProcess) -> People:
    async with aio.insecure_channel(front.address) as channel:
        owner, editor, viewer = [await register(channel) for _ in range(3)]
        stub = context_stub(channel)
        workspace = (await create_workspace(stub, owner, "Forwarding")).name
        await add_member(stub, owner, workspace, editor, cpb.WORKSPACE_ROLE_EDITOR)
        await add_member(stub, owner, workspace, viewer, cpb.WORKSPACE_ROLE_VIEWER)
        conversation = (await create_conversation(stub, owner, workspace)).name
    return People(owner, editor, viewer, workspace, conversation)


def forged(caller: Caller) -> tuple[tuple[str, str], ...]:
    """A client's call that claims to come from another replica."""
    return (*caller.md, (FORWARDED_KEY, "1"))


def logged(process: ServeProcess) -> list[dict[str, Any]]:
    """Every log line of a process that has ended."""
    entries = list(process.log)
    while True:
        try:
            entry = process.lines.get(timeout=CALL_DEADLINE_S)
        except queue.Empty:
            return entries
        if entry is None:
            return entries
        entries.append(entry)


async def code_of(call: Any) -> grpc.StatusCode:
    try:
        await call
    except aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def slow_run(on_a: Stub, caller: Caller, conversation: str) -> str:
    sent = await on_a.SendMessage(
        request(conversation, "slow words here", delay_ms=60_000),
        metadata=caller.md,
        timeout=CALL_DEADLINE_S,
    )
    await until(on_a, caller, sent.run.name, "delta")
    return sent.run.name


async def test_cancels_sent_to_another_replica_end_the_run_where_it_runs(
    front: ServeProcess, env: dict[str, str]
) -> None:
    who = await people(front)
    with replica(env, "replica-a") as a, replica(env, "replica-b") as b:
        async with stubs(a, b) as (on_a, on_b):
            run = await slow_run(on_a, who.editor, who.conversation)

            # The mark grants nothing: the viewer is refused by B and by the owner.
            for stub in (on_b, on_a):
                refused = stub.CancelRun(
                    pb.CancelRunRequest(name=run),
                    metadata=forged(who.viewer),
                    timeout=CALL_DEADLINE_S,
                )
                assert await code_of(refused) == grpc.StatusCode.PERMISSION_DENIED
            # On a replica that does not own the run, it only stops the forwarding.
            marked = on_b.CancelRun(
                pb.CancelRunRequest(name=run), metadata=forged(who.editor), timeout=CALL_DEADLINE_S
            )
            assert await code_of(marked) == grpc.StatusCode.UNAVAILABLE
            assert (await get_run(on_b, who.editor, run)).state == pb.RUN_STATE_RUNNING

            # Sent to B: the owner cancels it, knows who did, and B answers with the end.
            watch, _ = await until(on_b, who.viewer, run, "state_change")
            call_b = on_b.CancelRun(
                pb.CancelRunRequest(name=run, reason="changed my mind"),
                metadata=who.editor.md,
                timeout=CALL_DEADLINE_S,
            )
            cancelled = (await call_b).run
            request_id = dict(await call_b.trailing_metadata() or ())["x-request-id"]
            assert cancelled.state == pb.RUN_STATE_CANCELLED
            assert cancelled.error.message == f"changed my mind (by {who.editor.name})"
            seen: list[pb.RunUpdate] = []
            await read_until(
                watch, seen, lambda seen: seen[-1].state_change.run.state == pb.RUN_STATE_CANCELLED
            )
            assert (await get_run(on_a, who.editor, run)).state == pb.RUN_STATE_CANCELLED
            # Cancelling it again returns it unchanged.
            again = await cancel(on_b, who.editor, run)
            assert (again.state, again.error.message) == (
                cancelled.state,
                cancelled.error.message,
            )

            # A Converse frame on B, for a run on A.
            second = await slow_run(on_a, who.editor, who.conversation)
            call = on_b.Converse(
                iter(
                    [
                        pb.ConverseRequest(
                            client_request_id="c", cancel_run=pb.CancelRunRequest(name=second)
                        )
                    ]
                ),
                metadata=who.editor.md,
                timeout=CALL_DEADLINE_S,
            )
            frames = [f async for f in call if f.WhichOneof("frame") != "heartbeat"]
            assert [f.client_request_id for f in frames] == ["c"], frames
            assert frames[0].run_cancelled.run.state == pb.RUN_STATE_CANCELLED
            assert frames[0].run_cancelled.run.error.message == f"cancelled (by {who.editor.name})"

            # An API key: the owner authenticates the key itself (it has no session
            # a token minted for the user could name).
            async with aio.insecure_channel(front.address) as channel:
                key = await auth_pb2_grpc.AuthServiceStub(channel).CreateApiKey(
                    auth_pb2.CreateApiKeyRequest(display_name="bot", scopes=["read", "write"]),
                    metadata=who.editor.md,
                    timeout=CALL_DEADLINE_S,
                )
            third = await slow_run(on_a, who.editor, who.conversation)
            by_key = await on_b.CancelRun(
                pb.CancelRunRequest(name=third),
                metadata=(("authorization", f"Bearer {key.secret}"),),
                timeout=CALL_DEADLINE_S,
            )
            assert by_key.run.state == pb.RUN_STATE_CANCELLED
            assert by_key.run.error.message.endswith(f"(by {who.editor.name})")
    # The owner's own interceptor (authentication, the access rule) took the call B
    # forwarded, under the same request id.
    on_owner = [
        e
        for e in logged(a)
        if e.get("request_id") == request_id and str(e.get("method")).endswith("/CancelRun")
    ]
    assert [e["code"] for e in on_owner] == ["OK"], on_owner


async def test_approvals_sent_to_another_replica_reach_the_paused_run(
    front: ServeProcess, env: dict[str, str]
) -> None:
    who = await people(front)
    with McpTestServer() as mcp:
        async with FakeOpenAI() as fake:
            llm = {
                "SWITCHBOARD_LLM_BASE_URL": fake.url,
                "SWITCHBOARD_LLM_MODEL": "m-1",
                "SWITCHBOARD_LLM_MAX_RETRIES": "0",
                "SWITCHBOARD_EGRESS_ALLOW_LOOPBACK": "true",
                "SWITCHBOARD_INTEGRATION_PROBE_INTERVAL_S": "3600",
            }
            with replica(env, "replica-a", **llm) as a, replica(env, "replica-b", **llm) as b:
                async with (
                    stubs(a, b) as (on_a, on_b),
                    aio.insecure_channel(front.address) as channel,
                ):
                    made = await create(
                        integration_stub(channel),
                        who.owner,
                        who.workspace,
                        ipb.Integration(kind=ipb.INTEGRATION_KIND_MCP_SERVER, endpoint=mcp.url),
                        integration_id="mcp",
                    )
                    assistant = await on_a.CreateAssistant(
                        pb.CreateAssistantRequest(
                            parent=who.workspace,
                            assistant_id="careful",
                            assistant=careful_assistant(made.name),
                        ),
                        metadata=who.owner.md,
                        timeout=CALL_DEADLINE_S,
                    )
                    script_two_echoes(fake)
                    sent = await on_a.SendMessage(
                        pb.SendMessageRequest(
                            conversation=who.conversation,
                            message=cpb.Message(parts=[cpb.ContentPart(text="echo twice")]),
                            assistant=assistant.assistant.name,
                        ),
                        metadata=who.editor.md,
                        timeout=CALL_DEADLINE_S,
                    )
                    run = sent.run.name
                    watch, _ = await until(
                        on_b, who.viewer, run, "state_change", state=pb.RUN_STATE_REQUIRES_ACTION
                    )

                    def approval(
                        call_id: str, decision: pb.ToolApprovalDecision.ValueType, reason: str
                    ) -> pb.SubmitToolApprovalsRequest:
                        return pb.SubmitToolApprovalsRequest(
                            name=run,
                            approvals=[
                                pb.ToolApproval(
                                    tool_call_id=call_id, decision=decision, reason=reason
                                )
                            ],
                        )

                    # A viewer may not decide, through B either.
                    refused = on_b.SubmitToolApprovals(
                        (approval("c1", pb.TOOL_APPROVAL_DECISION_APPROVE, "")),
                        metadata=who.viewer.md,
                        timeout=CALL_DEADLINE_S,
                    )
                    assert await code_of(refused) == grpc.StatusCode.PERMISSION_DENIED

                    # The first decision, unary on B: the owner records it as the editor's.
                    first = await on_b.SubmitToolApprovals(
                        (approval("c1", pb.TOOL_APPROVAL_DECISION_APPROVE, "fine")),
                        metadata=who.editor.md,
                        timeout=CALL_DEADLINE_S,
                    )
                    assert first.run.state == pb.RUN_STATE_REQUIRES_ACTION
                    decided = {p.call.id: p for p in first.run.required_action.tool_calls}
                    assert decided["c1"].decided_by == who.editor.name
                    assert decided["c1"].reason == "fine"
                    assert decided["c2"].decision == pb.TOOL_APPROVAL_DECISION_UNSPECIFIED
                    # The opposite decision is the owner's refusal, mapped back as it was.
                    opposite = on_b.SubmitToolApprovals(
                        (approval("c1", pb.TOOL_APPROVAL_DECISION_DENY, "")),
                        metadata=who.editor.md,
                        timeout=CALL_DEADLINE_S,
                    )
                    assert await code_of(opposite) == grpc.StatusCode.FAILED_PRECONDITION

                    # The last decision, as a Converse frame on B: the run goes on, on A.
                    call = on_b.Converse(
                        iter(
                            [
                                pb.ConverseRequest(
                                    client_request_id="d",
                                    submit_tool_approvals=approval(
                                        "c2", pb.TOOL_APPROVAL_DECISION_DENY, "not that one"
                                    ),
                                )
                            ]
                        ),
                        metadata=who.owner.md,
                        timeout=CALL_DEADLINE_S,
                    )
                    frames = [f async for f in call if f.WhichOneof("frame") != "heartbeat"]
                    assert [f.client_request_id for f in frames] == ["d"], frames
                    resumed = frames[0].tool_approvals_submitted.run
                    assert resumed.state == pb.RUN_STATE_RUNNING
                    c2 = {p.call.id: p for p in resumed.required_action.tool_calls}["c2"]
                    assert (c2.decision, c2.decided_by) == (
                        pb.TOOL_APPROVAL_DECISION_DENY,
                        who.owner.name,
                    )

                    seen: list[pb.RunUpdate] = []
                    await read_until(
                        watch,
                        seen,
                        lambda seen: seen[-1].state_change.run.state == pb.RUN_STATE_SUCCEEDED,
                    )
                    outcomes = {
                        u.tool_result.id: u.tool_result.outcome
                        for u in seen
                        if u.WhichOneof("update") == "tool_result"
                    }
                    assert outcomes == {
                        "c1": hpb.TOOL_OUTCOME_SUCCEEDED,
                        "c2": hpb.TOOL_OUTCOME_DENIED,
                    }
                    answered = {
                        m["tool_call_id"]: m["content"]
                        for m in fake.requests[1].body["messages"]
                        if m.get("role") == "tool"
                    }
                    assert "one" in answered["c1"]
                    assert "not that one" in answered["c2"]


async def test_a_cancel_for_a_killed_replicas_run_is_retried_until_it_is_taken_over(
    front: ServeProcess, env: dict[str, str]
) -> None:
    who = await people(front)
    settings = {
        "SWITCHBOARD_DISPATCHER_LEASE_S": str(LEASE_S),
        # Taken over, the run starts again on B: the cancel then has a run to stop.
        "SWITCHBOARD_DISPATCHER_RECOVERY": "requeue",
    }
    with replica(env, "replica-b", **settings) as b:
        with replica(env, "replica-a", **settings) as a:
            async with stubs(a) as (on_a,):
                run = await slow_run(on_a, who.editor, who.conversation)
            assert a.proc is not None
            a.proc.kill()  # no drain, no shutdown code: a crash
            a.proc.wait()
        async with stubs(b) as (on_b,):
            answers: list[str] = []
            deadline = time.monotonic() + TAKEOVER_WITHIN_S
            while True:
                try:
                    cancelled = await cancel(on_b, who.editor, run)
                    break
                except aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    answers.append(exc.details() or "")
                assert time.monotonic() < deadline, answers
                await asyncio.sleep(0.2)  # a client's retry delay
            assert cancelled.state == pb.RUN_STATE_CANCELLED, cancelled
            assert cancelled.error.message == f"cancelled (by {who.editor.name})"
            # While A's lease lasted, its address answered nothing; then B took the run.
            assert answers, "the first cancel came while A's lease was still live"
            assert "running the run is unavailable" in answers[0]
            assert (await get_run(on_b, who.editor, run)).state == pb.RUN_STATE_CANCELLED
