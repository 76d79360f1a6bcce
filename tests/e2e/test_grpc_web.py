"""Browsers' path into the mesh: grpc-web through a real Envoy to a real server.

A real `switchboard serve` process sits behind a real Envoy configured by
`switchboard envoy` (grpc_web filter, CORS, HTTP/2 upstream). The client
(tests/e2e/grpcweb.py) speaks grpc-web the way a browser library does, over
HTTP/1.1 with httpx. A call that fails before any message is a "trailers-only"
response: Envoy then puts the status in the HTTP headers and the body is empty,
which is why CORS must expose those headers to the page.

Every await has a deadline; heartbeats are 0.5 s so idle streams still talk.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any, Final

import httpx
import pytest
from google.rpc import error_details_pb2

from switchboard.api.auth.v1 import auth_pb2
from switchboard.api.context.v1 import context_pb2
from switchboard.api.dispatcher.v1 import dispatcher_pb2
from switchboard.api.events.v1 import events_pb2
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.envoy import EnvoyProcess, fronting
from tests.e2e.grpcweb import AUTH, CONTEXT, DISPATCHER, EVENTS, ORIGIN, GrpcWeb
from tests.e2e.procs import ServeProcess
from tests.kits.authkit import PASSWORD, unique_email

pytestmark = pytest.mark.e2e

HEARTBEAT_S: Final = 0.5


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def serve() -> Iterator[ServeProcess]:
    env = {
        "SWITCHBOARD_EVENTS_HEARTBEAT_S": str(HEARTBEAT_S),
        "SWITCHBOARD_DISPATCHER_HEARTBEAT_S": str(HEARTBEAT_S),
    }
    with ServeProcess("--dev", env=env) as process:
        yield process


@pytest.fixture(scope="module")
def envoy(serve: ServeProcess) -> Iterator[EnvoyProcess]:
    yield from fronting(serve.address, allow_origins=(ORIGIN,))


@pytest.fixture
async def http(envoy: EnvoyProcess) -> AsyncIterator[httpx.AsyncClient]:
    # HTTP/1.1 only (httpx without h2), the way most browsers reach a grpc-web proxy.
    async with httpx.AsyncClient(
        base_url=envoy.url, timeout=CALL_DEADLINE_S, trust_env=False
    ) as client:
        yield client


async def _register(http: httpx.AsyncClient) -> auth_pb2.RegisterResponse:
    request = auth_pb2.RegisterRequest(
        email=unique_email("web"), password=PASSWORD, display_name="Web"
    )
    registered, status = await GrpcWeb(http).unary(
        AUTH + "Register", request, auth_pb2.RegisterResponse.FromString
    )
    assert status.code == 0, status
    assert registered is not None
    return registered


def _subscribe_request(user: str) -> events_pb2.SubscribeRequest:
    return events_pb2.SubscribeRequest(scopes=[events_pb2.Scope(user=user)])


def _frame_kind(frame: events_pb2.SubscribeResponse | None) -> str:
    assert frame is not None, "the stream ended"
    return frame.WhichOneof("frame") or ""


# -- tests ------------------------------------------------------------------------------


async def test_unary_register_through_grpc_web(http: httpx.AsyncClient) -> None:
    request = auth_pb2.RegisterRequest(
        email=unique_email("web"), password=PASSWORD, display_name="Web"
    )
    async with GrpcWeb(http).call(AUTH + "Register", request) as call:
        assert call.response.http_version == "HTTP/1.1"
        assert call.response.headers["server"] == "envoy"
        registered = await call.next_message(auth_pb2.RegisterResponse.FromString)
        status = await call.finish()
    assert registered is not None
    assert registered.user.name.startswith("users/")
    assert registered.tokens.access_token.startswith("eyJ")
    # A successful call ends with a trailer frame in the body: status 0 and the request id.
    assert (status.code, status.carried_in) == (0, "trailers")
    assert status.metadata["x-request-id"]


async def test_subscribe_streams_heartbeats_and_events_through_envoy(
    http: httpx.AsyncClient,
) -> None:
    registered = await _register(http)
    web = GrpcWeb(http, registered.tokens.access_token)
    parse = events_pb2.SubscribeResponse.FromString
    async with web.call(EVENTS + "Subscribe", _subscribe_request(registered.user.name)) as call:
        # First frame: a heartbeat meaning "the subscription is live".
        first = await call.next_message(parse)
        assert _frame_kind(first) == "heartbeat"
        # Idle: more heartbeats arrive, each on its own, while the response stays open.
        second = await call.next_message(parse)
        assert _frame_kind(second) == "heartbeat"
        assert second is not None
        assert first is not None
        assert second.heartbeat.time.ToNanoseconds() > first.heartbeat.time.ToNanoseconds()

        # Something happens to the user: it arrives on the open response.
        created, status = await web.unary(
            AUTH + "CreateApiKey",
            auth_pb2.CreateApiKeyRequest(display_name="web", scopes=["read"]),
            auth_pb2.CreateApiKeyResponse.FromString,
        )
        assert status.code == 0, status
        assert created is not None
        events: list[events_pb2.Event] = []
        while not events:
            frame = await call.next_message(parse)
            if _frame_kind(frame) == "batch":
                assert frame is not None
                events.extend(frame.batch.events)
        assert call.status is None, "the response ended; it was buffered, not streamed"
        [event] = events
        assert event.type == events_pb2.EVENT_TYPE_SECURITY
        assert event.security.kind == events_pb2.SECURITY_EVENT_KIND_API_KEY_CREATED
        assert event.security.api_key == created.api_key.name
        assert event.user == registered.user.name
        # Still live after the event.
        assert _frame_kind(await call.next_message(parse)) == "heartbeat"

        # Signing out ends the subscription mid-stream: the status arrives in a trailer frame.
        _, status = await web.unary(
            AUTH + "Logout", auth_pb2.LogoutRequest(), auth_pb2.LogoutResponse.FromString
        )
        assert status.code == 0, status
        revoked: list[events_pb2.Event] = []
        while (frame := await call.next_message(parse)) is not None:
            if _frame_kind(frame) == "batch":
                revoked.extend(frame.batch.events)
        ended = await call.finish()
    # The user may see its own sign-out; then its subscription is over.
    assert [e.security.kind for e in revoked] in (
        [],
        [events_pb2.SECURITY_EVENT_KIND_SESSION_REVOKED],
    )
    assert (ended.code, ended.carried_in) == (16, "trailers"), ended
    assert ended.message
    assert ended.details.code == 16
    assert ended.detail(error_details_pb2.ErrorInfo).reason


async def test_a_browser_sends_watches_and_cancels_a_run_through_envoy(
    http: httpx.AsyncClient,
) -> None:
    """What a browser can do without upward streaming: unary SendMessage and CancelRun,
    and the run's updates on one server stream (WatchRun), live, through Envoy."""
    registered = await _register(http)
    web = GrpcWeb(http, registered.tokens.access_token)
    workspace, status = await web.unary(
        CONTEXT + "CreateWorkspace",
        context_pb2.CreateWorkspaceRequest(workspace=context_pb2.Workspace(display_name="Web")),
        context_pb2.CreateWorkspaceResponse.FromString,
    )
    assert status.code == 0, status
    assert workspace is not None
    created, status = await web.unary(
        CONTEXT + "CreateConversation",
        context_pb2.CreateConversationRequest(parent=workspace.workspace.name),
        context_pb2.CreateConversationResponse.FromString,
    )
    assert status.code == 0, status
    assert created is not None
    send = dispatcher_pb2.SendMessageRequest(
        conversation=created.conversation.name,
        message=context_pb2.Message(parts=[context_pb2.ContentPart(text="from the browser")]),
    )
    send.parameters.update({"delay_ms": 60_000})
    sent, status = await web.unary(
        DISPATCHER + "SendMessage", send, dispatcher_pb2.SendMessageResponse.FromString
    )
    assert status.code == 0, status
    assert sent is not None
    parse = dispatcher_pb2.WatchRunResponse.FromString
    watch = dispatcher_pb2.WatchRunRequest(name=sent.run.name)
    async with web.call(DISPATCHER + "WatchRun", watch) as call:
        kinds: list[str] = []
        while "delta" not in kinds:
            frame = await call.next_message(parse)
            assert frame is not None, "the stream ended before the first delta"
            if frame.WhichOneof("frame") == "update":
                kinds.append(str(frame.update.WhichOneof("update")))
        assert call.status is None, "the response ended; it was buffered, not streamed"
        # Idle while the handler waits: heartbeats keep the response open.
        frame = await call.next_message(parse)
        assert frame is not None
        assert frame.WhichOneof("frame") == "heartbeat"

        cancelled, status = await web.unary(
            DISPATCHER + "CancelRun",
            dispatcher_pb2.CancelRunRequest(name=sent.run.name),
            dispatcher_pb2.CancelRunResponse.FromString,
        )
        assert status.code == 0, status
        assert cancelled is not None
        assert cancelled.run.state == dispatcher_pb2.RUN_STATE_CANCELLED
        last = None
        while (frame := await call.next_message(parse)) is not None:
            if frame.WhichOneof("frame") == "update":
                last = frame.update
        ended = await call.finish()
    assert ended.code == 0, ended
    assert last is not None
    assert last.state_change.run.state == dispatcher_pb2.RUN_STATE_CANCELLED


async def test_error_before_any_message_is_a_trailers_only_response(
    http: httpx.AsyncClient,
) -> None:
    registered = await _register(http)
    web = GrpcWeb(http, registered.tokens.access_token)
    request = _subscribe_request("not-a-user-name")
    async with web.call(EVENTS + "Subscribe", request) as call:
        status = await call.finish()
        exposed = call.response.headers["access-control-expose-headers"]
    assert (status.code, status.carried_in) == (3, "headers"), status
    assert status.message == "invalid subscription"
    assert status.details.code == 3
    assert status.detail(error_details_pb2.ErrorInfo).reason == "ERROR_REASON_INVALID_ARGUMENT"
    violations = status.detail(error_details_pb2.BadRequest).field_violations
    assert [v.field for v in violations] == ["scopes[0].user"]
    # The page can read those headers only because CORS exposes them.
    for name in ("grpc-status", "grpc-message", "grpc-status-details-bin"):
        assert name in _names(exposed)


async def test_unauthenticated_subscribe_fails_with_status(http: httpx.AsyncClient) -> None:
    async with GrpcWeb(http).call(EVENTS + "Subscribe", _subscribe_request("users/x")) as call:
        status = await call.finish()
    assert status.code == 16, status
    assert status.detail(error_details_pb2.ErrorInfo).reason == "ERROR_REASON_UNAUTHENTICATED"


def _names(header: str) -> set[str]:
    return {item.strip().lower() for item in header.split(",") if item.strip()}


PREFLIGHT_HEADERS: Final = (
    "authorization",
    "content-type",
    "x-grpc-web",
    "x-user-agent",
    "x-request-id",
    "grpc-timeout",
)


async def test_cors_preflight_allows_the_grpc_web_headers(http: httpx.AsyncClient) -> None:
    async with asyncio.timeout(CALL_DEADLINE_S):
        answer = await http.options(
            EVENTS + "Subscribe",
            headers={
                "origin": ORIGIN,
                "access-control-request-method": "POST",
                "access-control-request-headers": ",".join(PREFLIGHT_HEADERS),
            },
        )
    assert answer.status_code == 200
    headers: Any = answer.headers
    assert headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in {m.strip() for m in headers["access-control-allow-methods"].split(",")}
    assert _names(headers["access-control-allow-headers"]) >= set(PREFLIGHT_HEADERS)
    assert _names(headers["access-control-expose-headers"]) >= {
        "grpc-status",
        "grpc-message",
        "grpc-status-details-bin",
        "x-request-id",
    }
    assert int(headers["access-control-max-age"]) > 0


async def test_cors_preflight_from_another_origin_gets_no_grant(http: httpx.AsyncClient) -> None:
    async with asyncio.timeout(CALL_DEADLINE_S):
        answer = await http.options(
            EVENTS + "Subscribe",
            headers={
                "origin": "https://elsewhere.example",
                "access-control-request-method": "POST",
                "access-control-request-headers": "authorization,content-type,x-grpc-web",
            },
        )
    assert "access-control-allow-origin" not in answer.headers
    assert answer.headers["server"] == "envoy"
