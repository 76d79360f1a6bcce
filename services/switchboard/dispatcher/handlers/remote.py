"""Remote domain experts: any service implementing ``HandlerService``.

The dispatcher is the client. ``Handle`` is called with the run's remaining
time as the gRPC deadline, so the expert sees the deadline
(``context.time_remaining()``); cancelling the run cancels the task reading
the stream, and the ``finally`` here cancels the call itself, which the
expert sees as its own call being cancelled (HTTP/2 RST_STREAM).

An expert whose capabilities say ``interactive`` is called on
``HandleInteractive`` instead, with the same deadline, metadata, retry and
cancellation: its ``tool_call`` frames are requests, run through the run's
``ToolRunner`` (approvals included) while the expert keeps streaming, and
each result is written back as a ``tool_result`` frame. The runner shows the
calls and results as run updates, so those frames are not relayed. A run
that may call no tools answers every request FAILED.

Every call of a run (each attempt of the retry below, on either RPC) carries
the run's idempotency key, ``handler_key(run)``, in the ``idempotency-key``
metadata (``platform/values/idempotency.py``), so an expert can tell a run sent again
(after a crash, another replica's takeover) from a new one.

A run with a budget holds what is left of it for the call and names it in the
``x-switchboard-budget`` metadata; the result's ``usage`` is what the run is
charged (``hops.py``, docs/budgets.md "Across hops").

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
import contextlib
import functools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import Message
from grpc import aio

from switchboard.api.dispatcher.v1 import dispatcher_pb2
from switchboard.api.handler.v1 import handler_pb2, handler_pb2_grpc
from switchboard.dispatcher.handlers.base import (
    Frame,
    HandleCall,
    HandlerFailure,
    ToolRunner,
    capabilities,
)
from switchboard.dispatcher.handlers.handed import HEADER, header_value
from switchboard.dispatcher.handlers.hops import Hop
from switchboard.platform import background
from switchboard.platform.errors import FailedPrecondition, QuotaExceeded, SwitchboardError
from switchboard.platform.rpc.outbound.channels import (
    DOWN,
    READY,
    ChannelOptions,
    connected,
    expert_channel,
)
from switchboard.platform.rpc.status import to_status_proto
from switchboard.platform.values import idempotency, jsonbounds
from switchboard.platform.values.jsonbounds import JsonRejected

log = logging.getLogger("switchboard.dispatcher.handlers.remote")

#: How long a remote stays unavailable after a failed call, unless the channel
#: is connected again sooner (an expert that restarted).
RETRY_AFTER_S = 5.0

#: Tool calls of one interactive call that may run at once; more are answered FAILED.
MAX_TOOL_CALLS_IN_FLIGHT = 16
#: How long a closing call waits for its cancelled tool calls to end.
TOOL_CANCEL_GRACE_S = 5.0


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
            asyncio.get_running_loop()
        except RuntimeError:  # asked outside the event loop: the next call refreshes
            return
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = background.spawn(
                self.refresh(), name=f"remote-refresh-{self._capabilities.id}", logger=log
            )

    async def refresh(self) -> bool:
        """Ask the expert what it can do; False (and unavailable for a while) if it cannot say."""
        try:
            response = await self._stub.GetCapabilities(
                handler_pb2.GetCapabilitiesRequest(),
                timeout=self._timeout_s,
                metadata=self._metadata,
            )
        except aio.AioRpcError as exc:
            # The code in the text too: where only messages are kept (a test's
            # captured log), an outage and a refusal must still be told apart.
            log.warning(
                "remote handler unreachable (%s)",
                exc.code().name,
                extra={"handler": self._capabilities.id, "code": exc.code().name},
            )
            self._failed(exc.code())
            return False
        except Exception:
            # A bug, or what the expert's answer did to the client: not known to
            # work, so unavailable for a while, and the log says why.
            log.error(
                "remote handler could not be asked for its capabilities",
                exc_info=True,
                extra={"handler": self._capabilities.id},
            )
            self._failed(grpc.StatusCode.INTERNAL)
            return False
        refusal = _UNDECODABLE if response is None else _refusal(response)
        if refusal is not None:
            log.warning(
                "remote handler's capabilities refused",
                extra={"handler": self._capabilities.id, "reason": refusal},
            )
            self._failed(grpc.StatusCode.INTERNAL)  # it answered, but not usably
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
        # The run's budget goes with the call (``hops.py``): what is left of it is
        # held for the expert and named in ``x-switchboard-budget``; its result's
        # usage is charged.
        hop = Hop(call.budget, hold=not self._capabilities.interactive)
        try:
            handed = await hop.start()
            metadata = self._metadata
            if call.request.run:
                key = idempotency.handler_key(call.request.run)
                metadata = (*metadata, (idempotency.METADATA, key))
            if handed:
                metadata = (*metadata, (HEADER, header_value(handed)))
            frames = self._attempts(call, metadata)
            async with contextlib.aclosing(frames):
                async for frame in frames:
                    if frame.WhichOneof("frame") == "result":
                        await hop.settle(frame.result)
                    yield frame
        finally:
            await hop.close()

    async def _attempts(
        self, call: HandleCall, metadata: tuple[tuple[str, str], ...]
    ) -> AsyncGenerator[Frame, None]:
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
            progress = _Attempt()
            frames = (
                self._interactive(call, remaining, progress, metadata)
                if self._capabilities.interactive
                else self._streamed(call, remaining, progress, metadata)
            )
            try:
                # Closing the frames on the way out (cancellation included)
                # cancels the call: RST_STREAM tells the expert to stop.
                async with contextlib.aclosing(frames):
                    async for frame in frames:
                        yield frame
                        if frame.WhichOneof("frame") == "result":
                            return
            except aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise TimeoutError from None
                if code == grpc.StatusCode.UNAVAILABLE and not progress.answered and attempt == 0:
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
            raise HandlerFailure(
                f"remote handler {self._capabilities.id!r} ended its stream without a result"
            )

    async def _streamed(
        self,
        call: HandleCall,
        remaining: float,
        progress: _Attempt,
        metadata: tuple[tuple[str, str], ...],
    ) -> AsyncGenerator[Frame, None]:
        """``Handle``: every frame is relayed, tool calls as reports of what it did."""
        stream = self._stub.Handle(call.request, timeout=remaining, metadata=metadata)
        try:
            async for frame in stream:
                progress.answered = True
                yield self._check(frame)
        finally:
            stream.cancel()

    async def _interactive(
        self,
        call: HandleCall,
        remaining: float,
        progress: _Attempt,
        metadata: tuple[tuple[str, str], ...],
    ) -> AsyncGenerator[Frame, None]:
        """``HandleInteractive``: tool calls are run for the expert, not relayed.

        The run's tool runner shows each call and result as run updates
        itself. Ends (without raising) when the expert ends its stream; an
        exception of the runner (cancellation, the deadline, an expired
        approval) ends it with that exception.
        """
        stream = self._stub.HandleInteractive(None, timeout=remaining, metadata=metadata)
        tools = _ToolCalls(stream, call.tools, self._capabilities.id)
        read: asyncio.Task[object] | None = None
        try:
            # InvalidStateError: the call is already over, and reading it says how.
            with contextlib.suppress(asyncio.InvalidStateError):
                await tools.send(handler_pb2.HandleInteractiveRequest(start=call.request))
            # A run that continues after a restart may have a step whose calls
            # were not all answered: they are resolved now, as one step again.
            if call.request.steps:
                last = call.request.steps[-1]
                pending = list(last.calls[len(last.results) :])
                if pending:
                    await tools.request(pending)
            while True:
                read = asyncio.ensure_future(stream.read())
                await asyncio.wait((read, tools.failed), return_when=asyncio.FIRST_COMPLETED)
                tools.raise_failure()
                response = read.result()
                read = None
                if isinstance(response, handler_pb2.HandleInteractiveResponse):
                    frame = self._check(response.frame)
                elif response is None:
                    frame = self._check(None)  # undecodable: raises
                else:
                    return  # EOF: the expert ended its stream
                progress.answered = True
                if frame.WhichOneof("frame") == "tool_call":
                    await tools.request([frame.tool_call])
                    continue
                yield frame
        finally:
            stream.cancel()
            if read is not None:
                _discard(read)
            await tools.close()

    def _unreachable(self, code: grpc.StatusCode) -> None:
        self._failed(code)
        self._refresh_soon()

    def _check(self, frame: Frame | None) -> Frame:
        """``frame``, or HandlerFailure (counted: it answered outside the contract).

        grpc's client hands over ``None`` for a message it could not decode
        (logging why): not the message, or nested deeper than protobuf's
        decoder allows (100 levels). A Struct that did decode may still nest
        deeper than JSON from outside may (``jsonbounds``), and would make run
        updates and events that clients cannot decode."""
        refusal = _UNDECODABLE if frame is None else _refusal(frame)
        if refusal is not None or frame is None:
            raise HandlerFailure(
                f"remote handler {self._capabilities.id!r} answered with a message {refusal}",
                retryable=True,
            )
        return frame


@dataclass
class _Attempt:
    #: Whether the expert sent anything on this attempt's call (then it is not retried).
    answered: bool = False


_NO_TOOLS = "this run may not call tools"
_TOO_MANY = "too many tool calls in flight"

ToolStream = aio.StreamStreamCall[
    handler_pb2.HandleInteractiveRequest, handler_pb2.HandleInteractiveResponse
]


#: Why a message grpc could not decode is refused (see ``RemoteHandler._check``).
_UNDECODABLE = "that cannot be decoded (not the message, or nested deeper than protobuf allows)"


def _refusal(message: Message) -> str | None:
    """Why a message from the expert cannot be used, or None if it can."""
    try:
        jsonbounds.check_message(message)
    except JsonRejected as rejected:
        return str(rejected)
    return None


def _discard(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and consume its outcome, so nothing logs it as never retrieved."""
    task.cancel()
    task.add_done_callback(lambda done: done.cancelled() or done.exception())


def _refused(tool_call: handler_pb2.ToolCall, error: SwitchboardError) -> handler_pb2.ToolResult:
    return handler_pb2.ToolResult(
        id=tool_call.id,
        outcome=handler_pb2.TOOL_OUTCOME_FAILED,
        text=error.message,
        error=to_status_proto(error, ""),
    )


class _ToolCalls:
    """The tool calls an interactive expert has in flight on one call.

    Each request of the expert runs in its own task, so several run at once
    and each is answered as soon as it is done. Answers are written one at a
    time (gRPC allows one outstanding write per call) under ``_writing``.
    """

    def __init__(self, stream: ToolStream, runner: ToolRunner | None, handler_id: str) -> None:
        self._stream = stream
        self._runner = runner
        self._handler_id = handler_id
        self._writing = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight = 0
        self._closing = False
        self._error: BaseException | None = None
        #: Done when a call's runner raised (the run is over); its exception is ``_error``.
        self.failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def send(self, request: handler_pb2.HandleInteractiveRequest) -> None:
        async with self._writing:
            await self._stream.write(request)

    async def request(self, calls: list[handler_pb2.ToolCall]) -> None:
        """Start running ``calls`` (made together), or refuse them at once.

        A refusal is written here, not from a task: an expert flooding the
        call with requests is slowed down to the pace of its own answers.
        """
        if self._runner is None:
            await self._refuse(calls, FailedPrecondition(_NO_TOOLS))
            return
        if self._in_flight + len(calls) > MAX_TOOL_CALLS_IN_FLIGHT:
            await self._refuse(calls, QuotaExceeded(_TOO_MANY, subject="tool calls in flight"))
            return
        task = asyncio.create_task(self._run(self._runner, calls))
        self._tasks.add(task)
        self._in_flight += len(calls)
        task.add_done_callback(functools.partial(self._done, len(calls)))

    async def _refuse(self, calls: list[handler_pb2.ToolCall], error: SwitchboardError) -> None:
        for tool_call in calls:
            await self.send(
                handler_pb2.HandleInteractiveRequest(tool_result=_refused(tool_call, error))
            )

    async def _run(self, runner: ToolRunner, calls: list[handler_pb2.ToolCall]) -> None:
        results = await runner.run(calls)
        if len(results) != len(calls):
            raise RuntimeError(
                f"tool runner returned {len(results)} results for {len(calls)} calls"
            )
        for result in results:
            try:
                await self.send(handler_pb2.HandleInteractiveRequest(tool_result=result))
            except (aio.AioRpcError, asyncio.InvalidStateError):
                # The call is over; how it ended is what the reader reports.
                log.debug("tool result not delivered", extra={"handler": self._handler_id})
                return

    def _done(self, count: int, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._in_flight -= count
        if task.cancelled():
            error: BaseException | None = None if self._closing else asyncio.CancelledError()
        else:
            error = task.exception()  # consumed here in every case
        if error is not None and not self._closing and not self.failed.done():
            self._error = error
            self.failed.set_result(None)

    def raise_failure(self) -> None:
        """Raise what a runner raised, if one did."""
        if self._error is not None:
            raise self._error

    async def close(self) -> None:
        """Cancel the calls still running and wait (a little) for them to end."""
        self._closing = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=TOOL_CANCEL_GRACE_S)
