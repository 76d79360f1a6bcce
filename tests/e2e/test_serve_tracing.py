"""`switchboard serve` with tracing on, exporting to a real OTLP receiver.

One process, configured only by OTEL_* variables: a SendMessage with the
caller's traceparent yields its server span (the caller's span as parent)
and the run's span as its child, in the trace the run reports; the default
service name says which process it is. Health keeps answering with tracing
on, to grpc-health-probe and to a Watch, and is never traced.
"""

from __future__ import annotations

import asyncio
import subprocess

import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.procs import ServeProcess, tool
from tests.infra.otlp import OtlpReceiver, Span
from tests.kits.authkit import register, user_id
from tests.kits.contextkit import Caller, context_stub
from tests.kits.dispatchkit import dispatcher_stub, request, watch_all

pytestmark = pytest.mark.e2e

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TIMEOUT_S = 30.0


def probe(address: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            tool("grpc-health-probe"),
            f"-addr={address}",
            f"-connect-timeout={CALL_DEADLINE_S:g}s",
            f"-rpc-timeout={CALL_DEADLINE_S:g}s",
        ],
        capture_output=True,
        text=True,
        timeout=CALL_DEADLINE_S * 3,
        check=False,
    )


async def test_a_run_is_one_trace_exported_over_otlp_and_health_still_answers() -> None:
    with (
        OtlpReceiver() as otlp,
        ServeProcess(env={**otlp.env(), "SWITCHBOARD_DEV_MODE": "true"}) as server,
    ):
        async with aio.insecure_channel(server.address) as channel:
            # Health with tracing on: the probe, Check and a Watch.
            done = await asyncio.to_thread(probe, server.address)
            assert done.returncode == 0, done.stdout + done.stderr
            assert "status: SERVING" in done.stdout + done.stderr
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S)
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()

            signed = await register(channel)
            md = (("authorization", f"Bearer {signed.tokens.access_token}"),)
            traced = (*md, ("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"))
            stub, dstub = context_stub(channel), dispatcher_stub(channel)
            workspace = (
                await stub.CreateWorkspace(
                    cpb.CreateWorkspaceRequest(workspace=cpb.Workspace(display_name="T")),
                    metadata=md,
                    timeout=TIMEOUT_S,
                )
            ).workspace
            conversation = (
                await stub.CreateConversation(
                    cpb.CreateConversationRequest(
                        parent=workspace.name, conversation=cpb.Conversation(title="t")
                    ),
                    metadata=md,
                    timeout=TIMEOUT_S,
                )
            ).conversation
            sent = await dstub.SendMessage(
                request(conversation.name, "traced over otlp", handler="echo"),
                metadata=traced,
                timeout=TIMEOUT_S,
            )
            assert sent.run.trace_id == TRACE_ID

            caller = Caller(user_id(signed.user.name), signed.tokens.access_token)
            seen = await watch_all(dstub, caller, sent.run.name)
            assert seen.final.state == pb.RUN_STATE_SUCCEEDED

        def complete(spans: list[Span]) -> bool:
            names = {s.name for s in spans}
            return "run echo" in names and any(n.endswith("/SendMessage") for n in names)

        spans = await asyncio.to_thread(otlp.wait_for_trace, TRACE_ID, complete)
        send = next(s for s in spans if s.name.endswith("/SendMessage"))
        assert send.kind == "SERVER"
        assert send.parent_span_id == PARENT_ID
        assert send.service == "switchboard"  # the all-in-one process's default name
        run = next(s for s in spans if s.name == "run echo")
        assert run.parent_span_id == send.span_id
        assert any(s.parent_span_id == run.span_id for s in spans), otlp.tree(TRACE_ID)
        assert server.terminate() == 0
    assert not [s for s in otlp.spans if "grpc.health" in s.name]
