"""Tracing on: streams, cancellation, error statuses and the trace on outbound HTTP.

Spans are kept by the SDK's in-memory exporter (as in test_tracing.py). With
tracing on, EventService's server stream (Subscribe) and bidirectional stream
(Stream) deliver and resume as they do with tracing off; a client that goes
away mid-stream ends the call, and its span, with no error logged by
OpenTelemetry or asyncio; a failing call's span carries its gRPC status code
while the client gets the same rich status as from an untraced server; and
the HTTP requests a call or run causes (an MCP server's, the model's API, a
webhook receiver's) carry a ``traceparent`` naming the client span of the
request.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from grpc import aio
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2, events_pb2_grpc
from switchboard.api.integration.v1 import integration_pb2 as ipb
from switchboard.integration.service import IntegrationHub
from switchboard.mesh import create_server
from switchboard.platform.observe.telemetry import Tracing
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.rpc.status import REQUEST_ID_KEY
from switchboard.platform.security.policy import Role
from tests.conftest import CALL_DEADLINE_S, built, make_settings
from tests.e2e.toolexpert import ToolExpert
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.infra.mcpserver import McpTestServer
from tests.infra.webhookreceiver import running_receiver, until
from tests.kits.authkit import bearer, quick_user, rich_status
from tests.kits.contextkit import append, context_stub, create_conversation, ctx_world
from tests.kits.dispatchkit import dispatcher_stub, finished, request
from tests.kits.eventkit import Commands, Subscriber, ids, member, publish, workspace_event, ws
from tests.kits.integrationkit import (
    create,
    expert,
    integration_stub,
    webhook,
    webhook_secret,
)
from tests.kits.tracekit import Spans, traced_server, watching_alone

pytestmark = pytest.mark.service

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
LLM_KEY = "sk-test-secret-never-logged"
SUBSCRIBE = "/switchboard.api.events.v1.EventService/Subscribe"
STREAM = "/switchboard.api.events.v1.EventService/Stream"
# A small receive window and no BDP probing: the server's sends block after a
# few KiB the client does not read (test_cancelled_streams.py).
TIGHT = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
# What read() returns once a stream has ended (not in the type stubs).
_EOF: Any = getattr(grpc.aio, "EOF")  # noqa: B009
Metadata = tuple[tuple[str, str], ...]


class Trouble(logging.Handler):
    """What OpenTelemetry and asyncio log at WARNING or worse, and each access line."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.bad: list[str] = []
        self.finished: list[logging.LogRecord] = []
        self.finished_changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "rpc finished":
            self.finished.append(record)
            self.finished_changed.set()
        noisy = record.name.startswith(("opentelemetry", "asyncio"))
        if record.levelno >= logging.ERROR or (noisy and record.levelno >= logging.WARNING):
            self.bad.append(f"{record.name}: {record.getMessage()}")

    def ended(self, method: str) -> list[logging.LogRecord]:
        return [r for r in self.finished if getattr(r, "method", "") == method]


@pytest.fixture
def exporter() -> Spans:
    return Spans()


@pytest.fixture
async def mesh(exporter: Spans) -> AsyncIterator[SwitchboardServer]:
    async with traced_server(exporter) as server:
        yield server


@pytest.fixture
async def trouble(mesh: SwitchboardServer) -> AsyncIterator[tuple[Trouble, list[dict[str, Any]]]]:
    """Log records, and the loop's unhandled exceptions, while the test runs."""
    async with watching_alone(Trouble()) as watched:
        yield watched


#: The caller's trace, sent beside the bearer token.
TRACE = (("traceparent", TRACEPARENT),)


def traced(token: str) -> tuple[tuple[str, str], ...]:
    return (*bearer(token), *TRACE)


def hexid(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def server_spans(method: str) -> Callable[[list[ReadableSpan]], list[ReadableSpan]]:
    def pick(spans: list[ReadableSpan]) -> list[ReadableSpan]:
        return [s for s in spans if s.kind == SpanKind.SERVER and s.name == method]

    return pick


def status_code(span: ReadableSpan) -> int:
    assert span.attributes is not None
    value = span.attributes["rpc.grpc.status_code"]
    assert isinstance(value, int)
    return value


async def _cleaned_up(handler: Trouble, unhandled: list[dict[str, Any]], method: str) -> None:
    """Until the cancelled call's cleanup ran (its abandoned generator collected).

    grpc leaves a stream's generator at a ``yield`` when the client goes away
    mid-send; Python finalizes it once it is collected, in a task of its own.
    """
    async with asyncio.timeout(CALL_DEADLINE_S):
        while not handler.ended(method) and not unhandled:
            handler.finished_changed.clear()
            gc.collect()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):  # the cadence of collection, not a wait
                    await handler.finished_changed.wait()
    for _ in range(3):  # let a finalizer that failed be collected and reported
        gc.collect()
        await asyncio.sleep(0)


async def _read(call: Any) -> Any:
    async with asyncio.timeout(CALL_DEADLINE_S):
        response = await call.read()
    assert response is not _EOF, "the stream ended"
    return response


# -- server streaming and bidirectional streaming ------------------------------------


async def test_subscribe_delivers_resumes_and_is_one_span_per_call(
    mesh: SwitchboardServer,
    channel: aio.Channel,
    exporter: Spans,
    trouble: tuple[Trouble, list[dict[str, Any]]],
) -> None:
    handler, unhandled = trouble
    _, token = await member(mesh, "alpha", Role.OWNER)
    before = await publish(mesh, [workspace_event("alpha", note=f"b{i}") for i in range(6)])

    # Replay from the start, then live: exactly the published events, in order.
    first = Subscriber(
        channel, token, metadata=TRACE, scopes=[ws("alpha")], after_cursor=before[0].cursor
    )
    await first.until(5)
    live = await publish(mesh, [workspace_event("alpha", note=f"l{i}") for i in range(3)])
    assert ids(await first.until(8)) == ids(before[1:] + live)
    first.cancel()
    assert await first.call.code() == grpc.StatusCode.CANCELLED

    # Resume from a cursor in the middle: the rest, nothing twice.
    again = Subscriber(
        channel, token, metadata=TRACE, scopes=[ws("alpha")], after_cursor=before[3].cursor
    )
    assert ids(await again.until(5)) == ids(before[4:] + live)
    again.cancel()
    assert await again.call.code() == grpc.StatusCode.CANCELLED

    # One server span per call, the caller's trace as parent, ended as cancelled.
    spans = await exporter.wait_for(
        lambda found: x if len(x := server_spans(SUBSCRIBE)(found)) == 2 else [],
        "two Subscribe calls",
    )
    for span in spans:
        assert span.context is not None
        assert span.parent is not None
        assert hexid(span.context.trace_id, 32) == TRACE_ID
        assert hexid(span.parent.span_id, 16) == PARENT_ID
        assert span.attributes is not None
        assert span.attributes["rpc.system"] == "grpc"
        assert span.attributes["rpc.service"] == "switchboard.api.events.v1.EventService"
        assert span.attributes["rpc.method"] == "Subscribe"
        assert status_code(span) == grpc.StatusCode.CANCELLED.value[0]
    await _cleaned_up(handler, unhandled, SUBSCRIBE)
    assert [str(c.get("exception") or c.get("message")) for c in unhandled] == []
    assert handler.bad == []


async def test_stream_adds_replays_pongs_and_half_closes_cleanly(
    mesh: SwitchboardServer,
    channel: aio.Channel,
    exporter: Spans,
    trouble: tuple[Trouble, list[dict[str, Any]]],
) -> None:
    handler, unhandled = trouble
    _, token = await member(mesh, "alpha", Role.OWNER)
    history = await publish(mesh, [workspace_event("alpha", note=f"h{i}") for i in range(4)])
    commands = Commands()
    call = events_pb2_grpc.EventServiceStub(channel).Stream(
        commands.__aiter__(), metadata=traced(token)
    )
    # Resume after the first event: the other three replayed, then live.
    commands.send(
        add=events_pb2.AddSubscription(
            subscription_id="s", scopes=[ws("alpha")], after_cursor=history[0].cursor
        )
    )
    assert (await _read(call)).added.subscription_id == "s"
    got: list[events_pb2.Event] = []
    while len(got) < 3:
        frame = await _read(call)
        if frame.WhichOneof("frame") == "events":
            got.extend(frame.events.batch.events)
    assert ids(got) == ids(history[1:])
    commands.send(ping=events_pb2.Ping(nonce="n-1"))
    while (frame := await _read(call)).WhichOneof("frame") != "pong":
        pass
    assert frame.pong.nonce == "n-1"
    (live,) = await publish(mesh, [workspace_event("alpha", note="live")])
    while (frame := await _read(call)).WhichOneof("frame") != "events":
        pass
    assert ids(frame.events.batch.events) == [live.id]
    commands.close()
    async with asyncio.timeout(CALL_DEADLINE_S):
        last: Any
        while (last := await call.read()) is not _EOF:
            assert last.WhichOneof("frame") == "heartbeat", last
    assert await call.code() == grpc.StatusCode.OK

    (span,) = await exporter.wait_for(server_spans(STREAM), "the Stream call")
    assert span.context is not None
    assert hexid(span.context.trace_id, 32) == TRACE_ID
    assert status_code(span) == 0
    assert [str(c.get("exception") or c.get("message")) for c in unhandled] == []
    assert handler.bad == []


async def _open_subscribe(mesh: SwitchboardServer, channel: aio.Channel, token: str) -> Any:
    call = events_pb2_grpc.EventServiceStub(channel).Subscribe(
        events_pb2.SubscribeRequest(scopes=[ws("flood")]), metadata=traced(token)
    )
    assert (await _read(call)).WhichOneof("frame") == "heartbeat"  # registered
    return call


async def _open_stream(mesh: SwitchboardServer, channel: aio.Channel, token: str) -> Any:
    async def requests() -> AsyncIterator[events_pb2.StreamRequest]:
        yield events_pb2.StreamRequest(
            add=events_pb2.AddSubscription(subscription_id="s", scopes=[ws("flood")])
        )
        await asyncio.Event().wait()  # keep the stream open

    call = events_pb2_grpc.EventServiceStub(channel).Stream(requests(), metadata=traced(token))
    assert (await _read(call)).added.subscription_id == "s"
    return call


OPENERS = {SUBSCRIBE: _open_subscribe, STREAM: _open_stream}


@pytest.mark.parametrize("method", sorted(OPENERS))
async def test_a_client_cancelling_mid_send_ends_the_call_and_span_cleanly(
    method: str,
    mesh: SwitchboardServer,
    exporter: Spans,
    trouble: tuple[Trouble, list[dict[str, Any]]],
) -> None:
    handler, unhandled = trouble
    _, token = await member(mesh, "flood", Role.OWNER)
    async with aio.insecure_channel(mesh.address, options=TIGHT) as tight:
        call = await OPENERS[method](mesh, tight, token)
        # Far more than the client's window: the server is stuck sending.
        await publish(mesh, [workspace_event("flood", note="x" * 2000) for _ in range(400)])
        handler.finished.clear()
        call.cancel()
        (span,) = await exporter.wait_for(server_spans(method), f"the {method} call")
        await _cleaned_up(handler, unhandled, method)
    assert status_code(span) == grpc.StatusCode.CANCELLED.value[0]
    assert span.context is not None
    assert hexid(span.context.trace_id, 32) == TRACE_ID
    assert len(handler.ended(method)) == 1
    assert [str(c.get("exception") or c.get("message")) for c in unhandled] == []
    assert handler.bad == []
    # The server goes on serving streams, traced as before.
    async with aio.insecure_channel(mesh.address) as channel:
        follow = events_pb2_grpc.EventServiceStub(channel).Subscribe(
            events_pb2.SubscribeRequest(scopes=[ws("flood")]), metadata=traced(token)
        )
        assert (await _read(follow)).WhichOneof("frame") == "heartbeat"
        (event,) = await publish(mesh, [workspace_event("flood", note="after")])
        frame = await _read(follow)
        assert ids(frame.batch.events) == [event.id]
        follow.cancel()
    assert handler.bad == []


# -- error statuses --------------------------------------------------------------------


@pytest.fixture
async def plain() -> AsyncIterator[SwitchboardServer]:
    """A server without tracing (built before the traced one, so none of it is traced)."""
    server, _port = await create_server(make_settings())
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown(grace=0)


Failing = Callable[[aio.Channel, str, Metadata], Awaitable[Any]]


async def _invalid_argument(channel: aio.Channel, token: str, md: Metadata) -> Any:
    return await context_stub(channel).CreateWorkspace(
        cpb.CreateWorkspaceRequest(workspace=cpb.Workspace(display_name="")),
        metadata=(*bearer(token), *md),
        timeout=CALL_DEADLINE_S,
    )


async def _not_found(channel: aio.Channel, token: str, md: Metadata) -> Any:
    return await context_stub(channel).GetWorkspace(
        cpb.GetWorkspaceRequest(name="workspaces/nope"),
        metadata=(*bearer(token), *md),
        timeout=CALL_DEADLINE_S,
    )


async def _unauthenticated(channel: aio.Channel, token: str, md: Metadata) -> Any:
    return await context_stub(channel).GetWorkspace(
        cpb.GetWorkspaceRequest(name="workspaces/nope"), metadata=md, timeout=CALL_DEADLINE_S
    )


async def _not_found_on_a_stream(channel: aio.Channel, token: str, md: Metadata) -> Any:
    call = events_pb2_grpc.EventServiceStub(channel).Subscribe(
        events_pb2.SubscribeRequest(scopes=[ws("nobody-s")]), metadata=(*bearer(token), *md)
    )
    return await _read(call)


FAILING: dict[str, tuple[Failing, grpc.StatusCode, str]] = {
    "invalid-argument": (
        _invalid_argument,
        grpc.StatusCode.INVALID_ARGUMENT,
        "/switchboard.api.context.v1.ContextService/CreateWorkspace",
    ),
    "not-found": (
        _not_found,
        grpc.StatusCode.NOT_FOUND,
        "/switchboard.api.context.v1.ContextService/GetWorkspace",
    ),
    "unauthenticated": (
        _unauthenticated,
        grpc.StatusCode.UNAUTHENTICATED,
        "/switchboard.api.context.v1.ContextService/GetWorkspace",
    ),
    "not-found-stream": (_not_found_on_a_stream, grpc.StatusCode.NOT_FOUND, SUBSCRIBE),
}


@pytest.mark.parametrize("case", sorted(FAILING))
async def test_a_failing_call_keeps_its_rich_status_and_its_span_the_code(
    case: str,
    plain: SwitchboardServer,
    mesh: SwitchboardServer,
    exporter: Spans,
    trouble: tuple[Trouble, list[dict[str, Any]]],
) -> None:
    handler, unhandled = trouble
    call, code, method = FAILING[case]
    errors: list[aio.AioRpcError] = []
    for server in (plain, mesh):
        _, token = await quick_user(server)
        async with aio.insecure_channel(server.address) as channel:
            with pytest.raises(aio.AioRpcError) as caught:
                # The same request id: the rich statuses may then be compared whole.
                await call(
                    channel, token, ((REQUEST_ID_KEY, f"req-{case}"), ("traceparent", TRACEPARENT))
                )
        errors.append(caught.value)
    untraced, traced_error = errors
    assert traced_error.code() == untraced.code() == code
    assert traced_error.details() == untraced.details()
    assert rich_status(traced_error) == rich_status(untraced)
    assert rich_status(traced_error).code == code.value[0]
    trailers: Any = traced_error.trailing_metadata() or ()
    assert dict(trailers)[REQUEST_ID_KEY] == f"req-{case}"
    (span,) = await exporter.wait_for(server_spans(method), f"the {method} call")
    assert span.context is not None
    assert hexid(span.context.trace_id, 32) == TRACE_ID
    assert status_code(span) == code.value[0]
    # A client's fault is not the server's error (OpenTelemetry's gRPC conventions).
    assert span.status.status_code == StatusCode.UNSET
    assert [str(c.get("exception") or c.get("message")) for c in unhandled] == []
    assert handler.bad == []


# -- the trace on outbound HTTP --------------------------------------------------------


@asynccontextmanager
async def traced_mesh(
    exporter: Spans, **overrides: Any
) -> AsyncIterator[tuple[SwitchboardServer, aio.Channel]]:
    tracing = Tracing.to_exporter(exporter, service_name="switchboard-test")
    server, _port = await create_server(make_settings(**overrides), tracing=tracing)
    await server.start()
    try:
        async with aio.insecure_channel(server.address) as channel:
            yield server, channel
    finally:
        await server.shutdown(grace=0)


def with_trace(md: Metadata) -> Metadata:
    return (*md, ("traceparent", TRACEPARENT))


def parse_traceparent(value: str) -> tuple[str, str]:
    """(trace id, parent span id) of a W3C ``traceparent``."""
    version, trace_id, span_id, flags = value.split("-")
    assert (version, len(trace_id), len(span_id), len(flags)) == ("00", 32, 16, 2), value
    return trace_id, span_id


def the_span(spans: list[ReadableSpan], span_id: str) -> ReadableSpan:
    found = [s for s in spans if s.context is not None and hexid(s.context.span_id, 16) == span_id]
    assert len(found) == 1, f"no span {span_id}"
    return found[0]


def ancestors(spans: list[ReadableSpan], span: ReadableSpan) -> list[str]:
    """The names of ``span``'s recorded ancestors, nearest first."""
    by_id = {s.context.span_id: s for s in spans if s.context is not None}
    names: list[str] = []
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        names.append(span.name)
    return names


def client_span(
    exporter: Spans, span_id: str
) -> Callable[[list[ReadableSpan]], list[ReadableSpan]]:
    def pick(spans: list[ReadableSpan]) -> list[ReadableSpan]:
        return [
            s
            for s in spans
            if s.kind == SpanKind.CLIENT
            and s.context is not None
            and hexid(s.context.span_id, 16) == span_id
        ]

    return pick


async def test_the_llm_handlers_request_carries_the_runs_trace(exporter: Spans) -> None:
    async with FakeOpenAI(api_key=LLM_KEY) as fake:
        fake.script(Reply.text("a traced answer", usage=(10, 3)))
        async with traced_mesh(
            exporter, llm_base_url=fake.url, llm_api_key=LLM_KEY, llm_model="a-1"
        ) as (server, channel):
            stub, dstub = context_stub(channel), dispatcher_stub(channel)
            world = await ctx_world(server, stub)
            conversation = await create_conversation(stub, world.editor, world.name)
            sent = await dstub.SendMessage(
                request(conversation.name, "Capital of France?"),
                metadata=with_trace(world.editor.md),
                timeout=CALL_DEADLINE_S,
            )
            final = await finished(dstub, world.editor, sent.run.name)
    assert final.state == pb.RUN_STATE_SUCCEEDED
    assert final.handler == "handlers/llm"
    (received,) = fake.requests
    trace_id, parent_id = parse_traceparent(received.headers["traceparent"])
    assert trace_id == TRACE_ID == final.trace_id
    (client,) = await exporter.wait_for(client_span(exporter, parent_id), "the llm's HTTP span")
    assert client.attributes is not None
    assert client.attributes.get("http.method", client.attributes.get("http.request.method")) == (
        "POST"
    )
    spans = list(exporter.get_finished_spans())
    # The request is the run's, and the run SendMessage's.
    assert "run llm" in ancestors(spans, client)
    assert ancestors(spans, client)[-1].endswith("/SendMessage")


@pytest.fixture(scope="module")
def mcp_server() -> Iterator[McpTestServer]:
    with McpTestServer() as server:
        yield server


async def test_an_mcp_tool_call_carries_the_calls_trace(
    exporter: Spans, mcp_server: McpTestServer
) -> None:
    async with traced_mesh(
        exporter, egress_allow_loopback=True, integration_probe_interval_s=0
    ) as (server, channel):
        stub = integration_stub(channel)
        world = await ctx_world(server, context_stub(channel))
        made = await create(
            stub,
            world.owner,
            world.name,
            ipb.Integration(
                kind=ipb.INTEGRATION_KIND_MCP_SERVER, endpoint=mcp_server.url, display_name="SDK"
            ),
            integration_id="sdk",
        )
        answer = await stub.InvokeTool(
            # ``stats`` answers with the traceparent of the POST that carried the call.
            ipb.InvokeToolRequest(name=f"{made.name}/tools/stats"),
            metadata=with_trace(world.editor.md),
            timeout=CALL_DEADLINE_S,
        )
    trace_id, parent_id = parse_traceparent(answer.result.fields["traceparent"].string_value)
    assert trace_id == TRACE_ID
    (client,) = await exporter.wait_for(client_span(exporter, parent_id), "the MCP POST's span")
    spans = list(exporter.get_finished_spans())
    assert ancestors(spans, client)[-1].endswith("/InvokeTool")
    invoke = only_server(spans, "InvokeTool")
    assert invoke.parent is not None
    assert hexid(invoke.parent.span_id, 16) == PARENT_ID


def only_server(spans: list[ReadableSpan], method: str) -> ReadableSpan:
    found = [s for s in spans if s.kind == SpanKind.SERVER and s.name.endswith(f"/{method}")]
    assert len(found) == 1, [s.name for s in found]
    return found[0]


async def test_a_webhook_delivery_carries_the_trace_of_its_http_span(exporter: Spans) -> None:
    async with (
        running_receiver() as receiver,
        traced_mesh(exporter, egress_allow_loopback=True, integration_probe_interval_s=0) as (
            server,
            channel,
        ),
    ):
        contexts, stub = context_stub(channel), integration_stub(channel)
        world = await ctx_world(server, contexts)
        secret = webhook_secret()
        endpoint = receiver.endpoint("traced", [secret])
        await create(
            stub,
            world.owner,
            world.name,
            webhook(receiver.url("traced"), credential=secret, event_types=["MESSAGE_CREATED"]),
            integration_id="traced-hook",
        )
        conversation = await create_conversation(contexts, world.editor, world.name)
        await append(contexts, world.editor, conversation.name, "deliver me")
        await until(lambda: len(endpoint.accepted) >= 1, "the delivery")
    assert endpoint.bad == []
    (delivered,) = endpoint.accepted
    trace_id, parent_id = parse_traceparent(delivered.headers["traceparent"])
    assert int(trace_id, 16) != 0
    (client,) = await exporter.wait_for(client_span(exporter, parent_id), "the webhook's span")
    assert client.context is not None
    assert hexid(client.context.trace_id, 32) == trace_id
    assert client.attributes is not None
    assert client.attributes.get("http.method", client.attributes.get("http.request.method")) == (
        "POST"
    )
    # Its POST is the child of a root span of its own: a trace per attempt, sampled as
    # any new trace is, never a bare client span.
    (attempt,) = [s for s in exporter.get_finished_spans() if s.name == "webhook delivery"]
    assert attempt.parent is None
    assert client.parent is not None
    assert attempt.context is not None
    assert client.parent.span_id == attempt.context.span_id
    assert attempt.attributes is not None
    assert attempt.attributes["switchboard.webhook.attempt"] == 1


async def test_health_probes_start_no_traces(exporter: Spans, mcp_server: McpTestServer) -> None:
    async with (
        ToolExpert() as calc,
        traced_mesh(exporter, egress_allow_loopback=True, integration_probe_interval_s=0) as (
            server,
            channel,
        ),
    ):
        stub = integration_stub(channel)
        world = await ctx_world(server, context_stub(channel))
        mcp = ipb.Integration(kind=ipb.INTEGRATION_KIND_MCP_SERVER, endpoint=mcp_server.url)
        made = [
            await create(stub, world.owner, world.name, mcp, integration_id="sdk"),
            await create(
                stub, world.owner, world.name, expert(calc.address), integration_id="calc"
            ),
        ]
        exporter.clear()
        await built(server, IntegrationHub).probe_all()  # an MCP ping, the expert's check
        for integration in made:
            got = await stub.GetIntegration(
                ipb.GetIntegrationRequest(name=integration.name),
                metadata=world.viewer.md,
                timeout=CALL_DEADLINE_S,
            )
            assert got.integration.status.health == ipb.HEALTH_STATE_HEALTHY  # it was probed
    # Only the GetIntegration calls above started traces.
    roots = [s.name for s in exporter.get_finished_spans() if s.parent is None]
    assert {name.rsplit("/", 1)[-1] for name in roots} == {"GetIntegration"}, roots
