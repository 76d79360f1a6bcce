"""A grpc-web client for tests, speaking it the way a browser library does.

Over HTTP/1.1 (or HTTP/2 when the httpx client has it on) with httpx: a POST
with ``content-type: application/grpc-web+proto`` whose body is one
5-byte-prefixed message (flag byte, big-endian length); the response body is a
sequence of such frames, data frames (flag 0x00) then one trailer frame (flag
0x80) whose payload is ``name: value`` lines (grpc-status, grpc-message,
grpc-status-details-bin). A call that fails before any message is a
"trailers-only" response: the status is in the HTTP headers and the body is
empty. Every await has a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import struct
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Final, TypeVar

import httpx
from google.protobuf.message import Message
from google.rpc import status_pb2

from tests.conftest import CALL_DEADLINE_S

ORIGIN: Final = "http://console.switchboard.test:5173"
CONTENT_TYPE: Final = "application/grpc-web+proto"
_HEADER: Final = struct.Struct(">BI")
_TRAILER_FLAG: Final = 0x80
_COMPRESSED_FLAG: Final = 0x01
AUTH: Final = "/switchboard.api.auth.v1.AuthService/"
EVENTS: Final = "/switchboard.api.events.v1.EventService/"
CONTEXT: Final = "/switchboard.api.context.v1.ContextService/"
DISPATCHER: Final = "/switchboard.api.dispatcher.v1.DispatcherService/"

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
            async with asyncio.timeout(CALL_DEADLINE_S):
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
        async with asyncio.timeout(CALL_DEADLINE_S):
            response = await self.client.send(sent, stream=True)
        try:
            assert response.status_code == 200, response.status_code
            assert response.headers["content-type"].startswith(CONTENT_TYPE)
            assert response.headers["access-control-allow-origin"] == ORIGIN
            yield WebCall(response, response.aiter_raw())
        finally:
            async with asyncio.timeout(CALL_DEADLINE_S):
                await response.aclose()

    async def unary(
        self, path: str, request: Message, parse: Callable[[bytes], M]
    ) -> tuple[M | None, WebStatus]:
        async with self.call(path, request) as call:
            message = await call.next_message(parse)
            return message, await call.finish()
