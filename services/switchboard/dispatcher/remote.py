"""Remote domain experts: any service implementing ``HandlerService``.

The dispatcher is the client. ``Handle`` is called with the run's remaining
time as the gRPC deadline, so the expert sees the deadline
(``context.time_remaining()``); cancelling the run cancels the task reading
the stream, and the ``finally`` here cancels the call itself, which the
expert sees as its own call being cancelled (HTTP/2 RST_STREAM).

Until the integration hub registers experts, they are configured statically
(``SWITCHBOARD_DISPATCHER_REMOTE_HANDLERS=id=host:port,...``). Availability
comes from ``GetCapabilities``: refreshed at start and after failures.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc
from grpc import aio

from switchboard.api.dispatcher.v1 import dispatcher_pb2
from switchboard.api.handler.v1 import handler_pb2, handler_pb2_grpc
from switchboard.dispatcher.handlers import Frame, HandleCall, HandlerFailure, capabilities

log = logging.getLogger("switchboard.dispatcher.remote")

#: How long a remote stays unavailable after a failed call before it is tried again.
RETRY_AFTER_S = 5.0


def parse_remotes(text: str) -> list[tuple[str, str]]:
    """``id=host:port,...`` as (id, address) pairs; ValueError if malformed."""
    found: list[tuple[str, str]] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        handler_id, sep, address = item.partition("=")
        host, colon, port = address.strip().rpartition(":")
        if not sep or not colon or not host or not port.isdigit():
            raise ValueError(f"remote handler {item!r}: expected id=host:port")
        found.append((handler_id.strip(), address.strip()))
    return found


class RemoteHandler:
    kind = dispatcher_pb2.HANDLER_KIND_REMOTE

    def __init__(self, handler_id: str, address: str, *, timeout_s: float) -> None:
        self.address = address
        self._timeout_s = timeout_s
        self._channel = aio.insecure_channel(address)
        self._stub = handler_pb2_grpc.HandlerServiceStub(self._channel)
        # Until GetCapabilities answers, the id and address are all we know.
        self._capabilities = capabilities(
            handler_id, handler_id, f"remote handler at {address}", max_context_tokens=4000
        )
        self._down_until = 0.0
        self._refreshing: asyncio.Task[bool] | None = None

    @property
    def capabilities(self) -> handler_pb2.HandlerCapabilities:
        return self._capabilities

    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    async def refresh(self) -> bool:
        """Ask the expert what it can do; False (and unavailable for a while) if it cannot say."""
        try:
            response = await self._stub.GetCapabilities(
                handler_pb2.GetCapabilitiesRequest(), timeout=self._timeout_s
            )
        except aio.AioRpcError as exc:
            log.warning(
                "remote handler unreachable",
                extra={"handler": self._capabilities.id, "code": exc.code().name},
            )
            self._down_until = time.monotonic() + RETRY_AFTER_S
            return False
        found = response.capabilities
        # The configured id is the routing key; the expert describes the rest.
        handler_id = self._capabilities.id
        self._capabilities = handler_pb2.HandlerCapabilities()
        self._capabilities.CopyFrom(found)
        self._capabilities.id = handler_id
        if self._capabilities.max_context_tokens <= 0:
            self._capabilities.max_context_tokens = 4000
        self._down_until = 0.0
        return True

    async def close(self) -> None:
        await self._channel.close(grace=None)

    async def handle(self, call: HandleCall) -> AsyncIterator[Frame]:
        remaining = call.remaining()
        if remaining <= 0:
            raise TimeoutError
        stream = self._stub.Handle(call.request, timeout=remaining)
        got_result = False
        try:
            async for frame in stream:
                if frame.WhichOneof("frame") == "result":
                    got_result = True
                yield frame
                if got_result:
                    break
        except aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TimeoutError from None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED):
                self._down_until = time.monotonic() + RETRY_AFTER_S
                if self._refreshing is None or self._refreshing.done():
                    self._refreshing = asyncio.get_running_loop().create_task(self.refresh())
            raise HandlerFailure(
                f"remote handler {self._capabilities.id!r} failed: "
                f"{code.name}: {(exc.details() or '')[:200]}",
                retryable=code == grpc.StatusCode.UNAVAILABLE,
            ) from None
        finally:
            # Reached on cancellation too: RST_STREAM tells the expert to stop.
            stream.cancel()
        if not got_result:
            raise HandlerFailure(
                f"remote handler {self._capabilities.id!r} ended its stream without a result"
            )
