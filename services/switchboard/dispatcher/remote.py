"""Remote domain experts: any service implementing ``HandlerService``.

The dispatcher is the client. ``Handle`` is called with the run's remaining
time as the gRPC deadline, so the expert sees the deadline
(``context.time_remaining()``); cancelling the run cancels the task reading
the stream, and the ``finally`` here cancels the call itself, which the
expert sees as its own call being cancelled (HTTP/2 RST_STREAM).

Operator-level experts are configured statically
(``SWITCHBOARD_DISPATCHER_REMOTE_HANDLERS=id=host:port,...``); a workspace's
own experts are integrations of the hub, built into the same class by
``experts.py`` (an egress-checked target and the credential). What an expert
can do comes from ``GetCapabilities``: asked at start and after it comes back.
Whether it is available comes from the channel itself: an expert the channel
cannot reach (TRANSIENT_FAILURE) is unavailable, one it is connected to is
available, so ListHandlers and routing tell the truth after a restart, and a
run never starts on a channel that is still waiting out its reconnect backoff.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence

import grpc
from grpc import aio

from switchboard.api.dispatcher.v1 import dispatcher_pb2
from switchboard.api.handler.v1 import handler_pb2, handler_pb2_grpc
from switchboard.dispatcher.handlers import Frame, HandleCall, HandlerFailure, capabilities
from switchboard.platform.channels import DOWN, READY, ChannelOptions, connected, expert_channel

log = logging.getLogger("switchboard.dispatcher.remote")

#: How long a remote stays unavailable after a failed call, unless the channel
#: is connected again sooner (an expert that restarted).
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

    def __init__(
        self,
        handler_id: str,
        address: str,
        *,
        timeout_s: float,
        channel_options: ChannelOptions = (),
        metadata: Sequence[tuple[str, str]] = (),
        shown_as: str = "",
        tls: bool = False,
    ) -> None:
        """``address`` is the target dialled; ``channel_options`` and ``metadata``
        (sent with every call: an expert's credential) come from the hub for a
        workspace's experts; ``shown_as`` is the address shown until the
        expert describes itself (the endpoint, not the checked IP); ``tls``
        verifies the expert's certificate against the system's roots."""
        self.address = address
        self._timeout_s = timeout_s
        self._metadata = tuple(metadata)
        self._channel = expert_channel(address, channel_options, tls=tls)
        self._stub = handler_pb2_grpc.HandlerServiceStub(self._channel)
        # Until GetCapabilities answers, the id and address are all we know.
        self._capabilities = capabilities(
            handler_id,
            handler_id,
            f"remote handler at {shown_as or address}",
            max_context_tokens=4000,
        )
        # After a call could not reach it: unavailable until then, or until connected again.
        self._down_until = 0.0
        # After it answered that it does not serve HandlerService: unavailable until then.
        self._broken_until = 0.0
        self._refreshing: asyncio.Task[bool] | None = None
        self._closed = False

    @property
    def capabilities(self) -> handler_pb2.HandlerCapabilities:
        return self._capabilities

    def available(self) -> bool:
        """Whether a run sent now can reach the expert, as far as the channel knows."""
        now = time.monotonic()
        if now < self._broken_until:
            return False
        # Asking with try_to_connect starts a connection on an idle channel,
        # so the next answer is about the expert as it is now.
        state = self._channel.get_state(try_to_connect=True)
        if state in DOWN:
            return False
        if state == READY and self._down_until:
            # Connected again after a failure: the expert restarted. Its
            # capabilities may have changed with it.
            self._down_until = 0.0
            self._refresh_soon()
        return now >= self._down_until

    def _refresh_soon(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # asked outside the event loop: the next call refreshes
            return
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = loop.create_task(self.refresh())

    async def refresh(self) -> bool:
        """Ask the expert what it can do; False (and unavailable for a while) if it cannot say."""
        try:
            response = await self._stub.GetCapabilities(
                handler_pb2.GetCapabilitiesRequest(),
                timeout=self._timeout_s,
                metadata=self._metadata,
            )
        except aio.AioRpcError as exc:
            log.warning(
                "remote handler unreachable",
                extra={"handler": self._capabilities.id, "code": exc.code().name},
            )
            self._failed(exc.code())
            return False
        found = response.capabilities
        # The configured id is the routing key; the expert describes the rest.
        handler_id = self._capabilities.id
        self._capabilities = handler_pb2.HandlerCapabilities()
        self._capabilities.CopyFrom(found)
        self._capabilities.id = handler_id
        if self._capabilities.max_context_tokens <= 0:
            self._capabilities.max_context_tokens = 4000
        self._down_until = self._broken_until = 0.0
        return True

    def _failed(self, code: grpc.StatusCode) -> None:
        until = time.monotonic() + RETRY_AFTER_S
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            self._down_until = until  # unreachable: over as soon as the channel connects
        else:
            self._broken_until = until  # it answered, but not as a HandlerService

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        self._closed = True
        if self._refreshing is not None:
            self._refreshing.cancel()
        await self._channel.close(grace=None)

    async def handle(self, call: HandleCall) -> AsyncIterator[Frame]:
        # One retry, for a call that failed UNAVAILABLE before the expert
        # answered anything: the connection looked alive but was gone (the
        # expert restarted). UNAVAILABLE is gRPC's code for "safe to retry".
        for attempt in range(2):
            remaining = call.remaining()
            if remaining <= 0:
                raise TimeoutError
            if not await connected(self._channel, min(remaining, self._timeout_s)):
                self._unreachable(grpc.StatusCode.UNAVAILABLE)
                raise HandlerFailure(
                    f"remote handler {self._capabilities.id!r} is unreachable", retryable=True
                )
            remaining = call.remaining()  # connecting took some of it
            if remaining <= 0:
                raise TimeoutError
            answered = False
            stream = self._stub.Handle(call.request, timeout=remaining, metadata=self._metadata)
            try:
                async for frame in stream:
                    answered = True
                    yield frame
                    if frame.WhichOneof("frame") == "result":
                        return
            except aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise TimeoutError from None
                if code == grpc.StatusCode.UNAVAILABLE and not answered and attempt == 0:
                    log.info(
                        "remote handler connection lost before it answered; retrying once",
                        extra={"handler": self._capabilities.id},
                    )
                    continue
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED):
                    self._unreachable(code)
                raise HandlerFailure(
                    f"remote handler {self._capabilities.id!r} failed: "
                    f"{code.name}: {(exc.details() or '')[:200]}",
                    retryable=code == grpc.StatusCode.UNAVAILABLE,
                ) from None
            finally:
                # Reached on cancellation too: RST_STREAM tells the expert to stop.
                stream.cancel()
            raise HandlerFailure(
                f"remote handler {self._capabilities.id!r} ended its stream without a result"
            )

    def _unreachable(self, code: grpc.StatusCode) -> None:
        self._failed(code)
        self._refresh_soon()
