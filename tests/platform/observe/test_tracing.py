"""Tracing on, in one process, spans kept by the SDK's in-memory exporter.

The server makes a span per call with the caller's trace context as parent,
the dispatcher's channel to the context service a client span whose context
reaches the server, and a run a span of its own, a child of the SendMessage
call, whose trace id the run carries. Health (Check and Watch), streams,
cancellation and error statuses behave as with tracing off, and log lines
carry the trace and span ids.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, Tracer

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.ports.context import RemoteContext
from switchboard.platform.observe.logging import JsonFormatter
from switchboard.platform.observe.telemetry import installed
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.rpc.status import REQUEST_ID_KEY
from switchboard.platform.security.policy import AuthMethod, Principal, Scope
from tests.conftest import CALL_DEADLINE_S
from tests.kits.authkit import code_of
from tests.kits.contextkit import Caller, context_stub, create_conversation, ctx_world
from tests.kits.dispatchkit import cancel as cancel_run
from tests.kits.dispatchkit import (
    dispatcher_stub,
    finished,
    get_run,
    request,
    until,
)
from tests.kits.tracekit import Spans, traced_server

pytestmark = pytest.mark.service

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
SLOW = 60_000  # ms between echoed words: the run lasts until it is cancelled


@pytest.fixture
def exporter() -> Spans:
    return Spans()


@pytest.fixture
async def mesh(exporter: InMemorySpanExporter) -> AsyncIterator[SwitchboardServer]:
    async with traced_server(exporter) as server:
        yield server


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    """Every log line written meanwhile, as the server writes it (JSON)."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def traced(metadata: tuple[tuple[str, str], ...] = ()) -> tuple[tuple[str, str], ...]:
    return (*metadata, ("traceparent", TRACEPARENT))


def hexid(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def server_spans(exporter: InMemorySpanExporter, method: str) -> list[ReadableSpan]:
    return [
        s
        for s in exporter.get_finished_spans()
        if s.kind == SpanKind.SERVER and s.name.endswith(f"/{method}")
    ]


def only(spans: list[ReadableSpan]) -> ReadableSpan:
    assert len(spans) == 1, [s.name for s in spans]
    return spans[0]


async def test_server_span_has_the_callers_parent_and_the_access_line_its_ids(
    mesh: SwitchboardServer,
    channel: aio.Channel,
    exporter: InMemorySpanExporter,
    logs: io.StringIO,
) -> None:
    caller = Caller(*await _user(mesh))
    stub = context_stub(channel)
    reply = await stub.CreateWorkspace(
        cpb.CreateWorkspaceRequest(workspace=cpb.Workspace(display_name="Traced")),
        metadata=traced(caller.md),
        timeout=CALL_DEADLINE_S,
    )
    assert reply.workspace.name.startswith("workspaces/")
    span = only(server_spans(exporter, "CreateWorkspace"))
    assert span.context is not None
    assert span.parent is not None
    assert hexid(span.context.trace_id, 32) == TRACE_ID
    assert hexid(span.parent.span_id, 16) == PARENT_ID
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == 0
    # The database work of the call is its child (one span per transaction).
    children = [
        s
        for s in exporter.get_finished_spans()
        if s.parent is not None and s.parent.span_id == span.context.span_id
    ]
    assert any(s.name == "db.transaction" for s in children), [s.name for s in children]
    # The access line was written inside the span.
    lines = [json.loads(line) for line in logs.getvalue().splitlines()]
    access = [
        line
        for line in lines
        if line["message"] == "rpc finished" and line["method"].endswith("/CreateWorkspace")
    ]
    assert len(access) == 1
    assert access[0]["trace_id"] == TRACE_ID
    assert access[0]["span_id"] == hexid(span.context.span_id, 16)


async def test_error_statuses_are_unchanged_and_the_span_says_error(
    channel: aio.Channel, exporter: Spans
) -> None:
    stub = context_stub(channel)
    with pytest.raises(aio.AioRpcError) as caught:
        await stub.GetWorkspace(
            cpb.GetWorkspaceRequest(name="workspaces/nope"),
            metadata=traced(),
            timeout=CALL_DEADLINE_S,
        )
    assert code_of(caught.value) == grpc.StatusCode.UNAUTHENTICATED
    assert REQUEST_ID_KEY in str(caught.value.trailing_metadata())
    # The server's span ends after the client has its status: wait for it.
    found = await exporter.wait_for(
        lambda _: server_spans(exporter, "GetWorkspace"), "the GetWorkspace server span"
    )
    span = only(found)
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
    # A client's fault is not the server's error (OpenTelemetry's gRPC conventions).
    assert span.status.status_code == StatusCode.UNSET


async def test_an_unknown_method_is_still_unimplemented(
    channel: aio.Channel, exporter: InMemorySpanExporter
) -> None:
    # A method nobody wrote: grpc's own UNIMPLEMENTED, as with tracing off.
    method = channel.unary_unary(
        "/switchboard.api.context.v1.ContextService/NoSuchMethod",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    with pytest.raises(aio.AioRpcError) as caught:
        await method(b"", metadata=traced(), timeout=CALL_DEADLINE_S)
    assert code_of(caught.value) == grpc.StatusCode.UNIMPLEMENTED


async def test_health_check_and_watch_work_and_are_not_traced(
    mesh: SwitchboardServer, channel: aio.Channel, exporter: InMemorySpanExporter
) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    check = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_DEADLINE_S)
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    watch = stub.Watch(
        health_pb2.HealthCheckRequest(service="switchboard.tracing-test"), timeout=CALL_DEADLINE_S
    )
    first = await watch.read()
    assert first.status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    mesh.report("switchboard.tracing-test", True)
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    mesh.report("switchboard.tracing-test", False)
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    watch.cancel()
    assert not [s for s in exporter.get_finished_spans() if "grpc.health" in s.name]


async def test_a_run_is_a_child_of_send_message_and_carries_its_trace_id(
    mesh: SwitchboardServer,
    channel: aio.Channel,
    exporter: InMemorySpanExporter,
    logs: io.StringIO,
) -> None:
    stub, dstub = context_stub(channel), dispatcher_stub(channel)
    world = await ctx_world(mesh, stub)
    conversation = await create_conversation(stub, world.owner, world.name)
    sent = await dstub.SendMessage(
        request(conversation.name, "hello traced world", handler="echo"),
        metadata=traced(world.owner.md),
        timeout=CALL_DEADLINE_S,
    )
    assert sent.run.trace_id == TRACE_ID
    # Server streaming with tracing on: every update, to the end.
    final = await finished(dstub, world.owner, sent.run.name)
    assert final.state == pb.RUN_STATE_SUCCEEDED
    assert final.trace_id == TRACE_ID
    assert (await get_run(dstub, world.owner, sent.run.name)).trace_id == TRACE_ID

    send = only(server_spans(exporter, "SendMessage"))
    assert send.context is not None
    runs = [s for s in exporter.get_finished_spans() if s.name == "run echo"]
    run = only(runs)
    assert run.context is not None
    assert run.parent is not None
    assert hexid(run.context.trace_id, 32) == TRACE_ID
    assert run.parent.span_id == send.context.span_id
    assert run.attributes is not None
    assert run.attributes["switchboard.run"] == sent.run.name
    assert run.attributes["switchboard.run.state"] == "RUN_STATE_SUCCEEDED"
    # What the run does is its child: its reads and writes, its events.
    under_run = {
        s.name
        for s in exporter.get_finished_spans()
        if s.parent is not None and s.parent.span_id == run.context.span_id
    }
    assert "db.transaction" in under_run
    # The run's own log lines carry its trace.
    lines = [json.loads(line) for line in logs.getvalue().splitlines()]
    mine = [line for line in lines if line.get("run") == sent.run.name]
    assert all(line.get("trace_id") == TRACE_ID for line in mine), mine


async def test_an_untraced_caller_still_gets_a_trace_of_its_own(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    stub, dstub = context_stub(channel), dispatcher_stub(channel)
    world = await ctx_world(mesh, stub)
    conversation = await create_conversation(stub, world.owner, world.name)
    sent = await dstub.SendMessage(
        request(conversation.name, "hi", handler="echo"),
        metadata=world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    assert len(sent.run.trace_id) == 32
    assert sent.run.trace_id != TRACE_ID
    assert int(sent.run.trace_id, 16) != 0


async def test_streams_and_cancellation_behave_as_without_tracing(
    mesh: SwitchboardServer, channel: aio.Channel, exporter: InMemorySpanExporter
) -> None:
    stub, dstub = context_stub(channel), dispatcher_stub(channel)
    world = await ctx_world(mesh, stub)
    conversation = await create_conversation(stub, world.owner, world.name)
    sent = await dstub.SendMessage(
        request(conversation.name, "one two three", handler="echo", delay_ms=SLOW),
        metadata=traced(world.owner.md),
        timeout=CALL_DEADLINE_S,
    )
    # A watcher that goes away mid-stream: the server ends its call, the run goes on.
    call, _seen = await until(dstub, world.owner, sent.run.name, "delta")
    call.cancel()
    assert await call.code() == grpc.StatusCode.CANCELLED
    # Cancelling the run stops it; another watcher sees it end.
    cancelled = await cancel_run(dstub, world.owner, sent.run.name)
    assert cancelled.name == sent.run.name
    final = await finished(dstub, world.owner, sent.run.name)
    assert final.state == pb.RUN_STATE_CANCELLED
    # The run's span ended with it, an error with the cancellation's reason.
    run = only([s for s in exporter.get_finished_spans() if s.name == "run echo"])
    assert run.status.status_code == StatusCode.ERROR
    assert run.attributes is not None
    assert run.attributes["switchboard.run.state"] == "RUN_STATE_CANCELLED"
    watches = server_spans(exporter, "WatchRun")
    assert watches, "WatchRun calls are traced"


async def test_the_context_channel_sends_its_trace_to_the_context_service(
    mesh: SwitchboardServer, channel: aio.Channel, exporter: InMemorySpanExporter
) -> None:
    """The dispatcher's channel to a context service in another process (here the
    same server, reached over the network as the mesh reaches it)."""
    stub = context_stub(channel)
    world = await ctx_world(mesh, stub)
    conversation = await create_conversation(stub, world.owner, world.name)
    remote = RemoteContext(mesh.address, _OwnersToken(world.owner.token))
    principal = Principal(
        user_id=world.owner.id,
        auth_method=AuthMethod.PASSWORD,
        scopes=frozenset({Scope.READ, Scope.WRITE}),
    )
    tracer = mesh_tracer(mesh)
    try:
        with tracer.start_as_current_span("caller") as caller:
            await remote.conversation(principal, conversation.name, timeout_s=CALL_DEADLINE_S)
    finally:
        await remote.close()
    caller_id = caller.get_span_context().span_id
    client = only(
        [
            s
            for s in exporter.get_finished_spans()
            if s.kind == SpanKind.CLIENT and s.name.endswith("/GetConversation")
        ]
    )
    assert client.parent is not None
    assert client.parent.span_id == caller_id
    assert client.context is not None
    server = only(server_spans(exporter, "GetConversation"))
    assert server.parent is not None
    assert server.parent.span_id == client.context.span_id


class _OwnersToken:
    """Issues the signed-in owner's own access token (its session is real)."""

    def __init__(self, token: str) -> None:
        self._token = token

    def issue(self, **_claims: object) -> tuple[str, int]:
        return self._token, 0


def mesh_tracer(mesh: SwitchboardServer) -> Tracer:
    tracing = installed()
    assert tracing is not None
    return tracing.tracer("tests")


async def _user(mesh: SwitchboardServer) -> tuple[str, str]:
    from tests.kits.authkit import quick_user

    return await quick_user(mesh)
