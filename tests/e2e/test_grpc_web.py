"""Browsers' path into the mesh: grpc-web through a real Envoy to a real server.

A real `switchboard serve` process sits behind a real Envoy configured by
`switchboard envoy` (grpc_web filter, CORS, HTTP/2 upstream). The client below speaks
grpc-web the way a browser library does, over HTTP/1.1 with httpx: a POST with
``content-type: application/grpc-web+proto`` whose body is one 5-byte-prefixed
message (flag byte, big-endian length); the response body is a sequence of such
frames, data frames (flag 0x00) then one trailer frame (flag 0x80) whose payload
is ``name: value`` lines (grpc-status, grpc-message, grpc-status-details-bin).
A call that fails before any message is a "trailers-only" response: Envoy then
puts the status in the HTTP headers and the body is empty, which is why CORS
must expose those headers to the page.

Every await has a deadline; heartbeats are 0.5 s so idle streams still talk.
"""

from __future__ import annotations

import asyncio
import base64
import struct
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import httpx
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from switchboard.api.auth.v1 import auth_pb2
from switchboard.api.context.v1 import context_pb2
from switchboard.api.dispatcher.v1 import dispatcher_pb2
from switchboard.api.events.v1 import events_pb2
from tests.e2e.envoy import EnvoyProcess
from tests.e2e.procs import ServeProcess
from tests.service.authkit import PASSWORD, unique_email

pytestmark = pytest.mark.e2e

DEADLINE_S: Final = 10.0
HEARTBEAT_S: Final = 0.5
ORIGIN: Final = "http://console.switchboard.test:5173"
CONTENT_TYPE: Final = "application/grpc-web+proto"
_HEADER: Final = struct.Struct(">BI")
_TRAILER_FLAG: Final = 0x80
_COMPRESSED_FLAG: Final = 0x01
_AUTH: Final = "/switchboard.api.auth.v1.AuthService/"
_EVENTS: Final = "/switchboard.api.events.v1.EventService/"
_CONTEXT: Final = "/switchboard.api.context.v1.ContextService/"
_DISPATCHER: Final = "/switchboard.api.dispatcher.v1.DispatcherService/"

M = TypeVar("M", bound=Message)


# -- a grpc-web client ------------------------------------------------------------------


def encode(message: Message) -> bytes:
    payload = message.SerializeToString()
    return _HEADER.pack(0, len(payload)) + payload


def unbase64(value: str) -> bytes:
    """gRPC sends -bin metadata as base64 without padding."""
    return base64.b64decode(value + "=" * (-len(value) % 4))


@dataclass
class WebStatus:
    """How a grpc-web call ended, and where the status was found."""

    code: int
    message: str
    metadata: dict[str, str]
    #: "trailers" (a 0x80 frame in the body) or "headers" (a trailers-only response).
    carried_in: str

    @property
    def details(self) -> status_pb2.Status:
        raw = self.metadata.get("grpc-status-details-bin")
        assert raw, f"no grpc-status-details-bin in {self.metadata}"
        status = status_pb2.Status()
        status.ParseFromString(unbase64(raw))
        return status

    def detail(self, cls: type[M]) -> M:
        for item in self.details.details:
            if item.Is(cls.DESCRIPTOR):
                found = cls()
                item.Unpack(found)
                return found
        raise AssertionError(f"no {cls.DESCRIPTOR.name} in {self.details}")


def _status_from(lines: Mapping[str, str], carried_in: str) -> WebStatus:
    assert "grpc-status" in lines, f"no grpc-status in the {carried_in}: {dict(lines)}"
    return WebStatus(
        code=int(lines["grpc-status"]),
        message=lines.get("grpc-message", ""),
        metadata=dict(lines),
        carried_in=carried_in,
    )


@dataclass
class WebCall:
    """One grpc-web response being read frame by frame as bytes arrive."""

    response: httpx.Response
    chunks: AsyncIterator[bytes]
    buffer: bytearray = field(default_factory=bytearray)
    status: WebStatus | None = None

    async def _fill(self, size: int) -> bool:
        """Read until ``size`` bytes are buffered; False if the body ended first."""
        while len(self.buffer) < size:
            async with asyncio.timeout(DEADLINE_S):
                chunk = await anext(self.chunks, None)
            if chunk is None:
                return False
            self.buffer += chunk
        return True

    async def next_frame(self) -> bytes | None:
        """The next message's bytes, or None once the call ended (``status`` is set)."""
        if self.status is not None:
            return None
        if not await self._fill(_HEADER.size):
            assert not self.buffer, f"the body ended inside a frame header: {bytes(self.buffer)!r}"
            # No trailer frame: a trailers-only response carries the status in its headers.
            self.status = _status_from(self.response.headers, "headers")
            return None
        flags, length = _HEADER.unpack_from(self.buffer)
        assert not flags & _COMPRESSED_FLAG, "compressed frames were not asked for"
        assert await self._fill(_HEADER.size + length), "the body ended inside a frame"
        payload = bytes(self.buffer[_HEADER.size : _HEADER.size + length])
        del self.buffer[: _HEADER.size + length]
        if not flags & _TRAILER_FLAG:
            return payload
        lines: dict[str, str] = {}
        for line in payload.decode("ascii").split("\r\n"):
            if line:
                name, _, value = line.partition(":")
                lines[name.strip().lower()] = value.strip()
        self.status = _status_from(lines, "trailers")
        assert not await self._fill(1), "data after the trailer frame"
        return None

    async def next_message(self, parse: Callable[[bytes], M]) -> M | None:
        payload = await self.next_frame()
        return None if payload is None else parse(payload)

    async def finish(self) -> WebStatus:
        """Read to the end; the call's status (any further message is an error)."""
        payload = await self.next_frame()
        assert payload is None, "a message arrived where the call should end"
        assert self.status is not None
        return self.status


class GrpcWeb:
    """grpc-web over HTTP/1.1, as a browser sends it (through Envoy's grpc_web filter)."""

    def __init__(self, client: httpx.AsyncClient, token: str = "") -> None:
        self.client = client
        self.token = token

    def headers(self) -> dict[str, str]:
        headers = {
            "content-type": CONTENT_TYPE,
            "accept": CONTENT_TYPE,
            "x-grpc-web": "1",
            "x-user-agent": "grpc-web-python-test/1.0",
            "origin": ORIGIN,
        }
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        return headers

    @asynccontextmanager
    async def call(self, path: str, request: Message) -> AsyncIterator[WebCall]:
        """Start a call; the response body is read lazily, frame by frame."""
        sent = self.client.build_request(
            "POST", path, content=encode(request), headers=self.headers()
        )
        async with asyncio.timeout(DEADLINE_S):
            response = await self.client.send(sent, stream=True)
        try:
            assert response.status_code == 200, response.status_code
            assert response.headers["content-type"].startswith(CONTENT_TYPE)
            assert response.headers["access-control-allow-origin"] == ORIGIN
            yield WebCall(response, response.aiter_raw())
        finally:
            async with asyncio.timeout(DEADLINE_S):
                await response.aclose()

    async def unary(
        self, path: str, request: Message, parse: Callable[[bytes], M]
    ) -> tuple[M | None, WebStatus]:
        async with self.call(path, request) as call:
            message = await call.next_message(parse)
            return message, await call.finish()


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
    with EnvoyProcess(serve.address, allow_origins=(ORIGIN,)) as proxy:
        yield proxy
        assert proxy.terminate() == 0


@pytest.fixture
async def http(envoy: EnvoyProcess) -> AsyncIterator[httpx.AsyncClient]:
    # HTTP/1.1 only (httpx without h2), the way most browsers reach a grpc-web proxy.
    async with httpx.AsyncClient(base_url=envoy.url, timeout=DEADLINE_S, trust_env=False) as client:
        yield client


async def _register(http: httpx.AsyncClient) -> auth_pb2.RegisterResponse:
    request = auth_pb2.RegisterRequest(
        email=unique_email("web"), password=PASSWORD, display_name="Web"
    )
    registered, status = await GrpcWeb(http).unary(
        _AUTH + "Register", request, auth_pb2.RegisterResponse.FromString
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
    async with GrpcWeb(http).call(_AUTH + "Register", request) as call:
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
    async with web.call(_EVENTS + "Subscribe", _subscribe_request(registered.user.name)) as call:
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
            _AUTH + "CreateApiKey",
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
            _AUTH + "Logout", auth_pb2.LogoutRequest(), auth_pb2.LogoutResponse.FromString
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
        _CONTEXT + "CreateWorkspace",
        context_pb2.CreateWorkspaceRequest(workspace=context_pb2.Workspace(display_name="Web")),
        context_pb2.CreateWorkspaceResponse.FromString,
    )
    assert status.code == 0, status
    assert workspace is not None
    created, status = await web.unary(
        _CONTEXT + "CreateConversation",
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
        _DISPATCHER + "SendMessage", send, dispatcher_pb2.SendMessageResponse.FromString
    )
    assert status.code == 0, status
    assert sent is not None
    parse = dispatcher_pb2.WatchRunResponse.FromString
    watch = dispatcher_pb2.WatchRunRequest(name=sent.run.name)
    async with web.call(_DISPATCHER + "WatchRun", watch) as call:
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
            _DISPATCHER + "CancelRun",
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
    async with web.call(_EVENTS + "Subscribe", request) as call:
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
    async with GrpcWeb(http).call(_EVENTS + "Subscribe", _subscribe_request("users/x")) as call:
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
    async with asyncio.timeout(DEADLINE_S):
        answer = await http.options(
            _EVENTS + "Subscribe",
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
    async with asyncio.timeout(DEADLINE_S):
        answer = await http.options(
            _EVENTS + "Subscribe",
            headers={
                "origin": "https://elsewhere.example",
                "access-control-request-method": "POST",
                "access-control-request-headers": "authorization,content-type,x-grpc-web",
            },
        )
    assert "access-control-allow-origin" not in answer.headers
    assert answer.headers["server"] == "envoy"
