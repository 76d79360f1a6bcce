"""One logical server stream over as many calls as it takes.

A resumable stream (``Follower``, ``RunWatch``) knows its position (a cursor,
a sequence) and reopens its call after that position whenever the call
breaks: UNAVAILABLE (a restart, a dropped connection, a proxy), a server that
cancelled it on shutdown, a transport error, or silence longer than
``idle_timeout_s`` (the server sends heartbeats, so silence means a dead
connection). Reopening waits a capped exponential backoff with jitter, never
less than a ``RetryInfo`` asks. An access token that expired on an open
stream is renewed once and the stream reopened at once.

A frame is read only when everything received before it has been handed
out, so the position resumed from is always the last item delivered: nothing
is skipped, and with the position filter nothing is delivered twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import grpc
from grpc import aio

from switchboard.client.backoff import Backoff
from switchboard.client.errors import (
    DOMAIN,
    SignedOut,
    SubscriberTooSlow,
    SwitchboardError,
    Unauthenticated,
    Unavailable,
    from_rpc_error,
)
from switchboard.client.session import TokenKeeper

log = logging.getLogger("switchboard.client")

#: What ``read()`` returns once a stream has ended (absent from the type stubs).
EOF: Any = getattr(aio, "EOF")  # noqa: B009

Queued = TypeVar("Queued")
Out = TypeVar("Out")


@dataclass(frozen=True)
class StreamPolicy:
    """How resumable streams wait and give up."""

    backoff: Backoff = field(default_factory=Backoff)
    #: No frame for this long (heartbeats are 15 s apart by default): the
    #: connection is taken as dead and the stream reopened.
    idle_timeout_s: float = 45.0
    #: Give up (raise the last error) after failing this long without a frame;
    #: None: keep trying as long as the application iterates.
    give_up_after_s: float | None = None

    def __post_init__(self) -> None:
        if self.idle_timeout_s <= 0:
            raise ValueError("idle_timeout_s must be positive")


def resumable(error: SwitchboardError) -> bool:
    """Whether a stream that ended with ``error`` may be reopened after its position.

    Transport-level failures (no ErrorInfo from the server) of any code are: a
    proxy or a broken connection produced them, not a decision about this
    stream. Of the server's own answers, only UNAVAILABLE, SUBSCRIBER_TOO_SLOW
    (nothing is lost) and those that carry a ``RetryInfo`` are.
    """
    code = error.code()
    if code == grpc.StatusCode.UNAVAILABLE or isinstance(error, SubscriberTooSlow):
        return True
    if error.retry_delay_s is not None and code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return True
    if error.domain == DOMAIN:
        return False
    return code in (
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    )


class ResumableStream(ABC, Generic[Queued, Out]):
    """An async iterator over a server stream that resumes by itself.

    Frames become ``Queued`` items; each is turned into what the application
    gets (``Out``) when it is handed out, which is when the position moves.
    """

    def __init__(self, keeper: TokenKeeper, policy: StreamPolicy, what: str) -> None:
        self._keeper = keeper
        self._policy = policy
        self._what = what
        self._call: Any = None
        self._pending: deque[Queued] = deque()
        self._finished = False
        self._closed = False
        self._failures = 0
        self._failing_since: float | None = None
        self._reauthenticated = False
        self._delay_s = 0.0
        self._used = ""
        #: Calls opened after the first (each break reopened).
        self.resumes = 0
        self._opened = 0
        #: The error that broke the stream last (resumed from, or raised).
        self.last_error: SwitchboardError | None = None

    # -- what each stream defines -------------------------------------------------------

    @abstractmethod
    def _start(self, metadata: tuple[tuple[str, str], ...]) -> Any:
        """Open the call from the current position."""

    @abstractmethod
    def _accept(self, frame: Any) -> None:
        """Take one frame: queue its items (``self._pending``), note heartbeats."""

    @abstractmethod
    def _delivered(self, item: Queued) -> Out:
        """``item`` is being handed to the application: move the position past it."""

    async def _ended_cleanly(self) -> None:
        """The call ended with OK before the stream was finished: reopen it."""
        self._schedule(Unavailable(f"the {self._what} stream ended early"))

    # -- iteration ----------------------------------------------------------------------

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Out:
        while True:
            if self._pending:
                return self._delivered(self._pending.popleft())
            if self._finished or self._closed:
                raise StopAsyncIteration
            await self._step()

    async def _step(self) -> None:
        """Open the call if needed and read one frame, or handle why none came."""
        try:
            if self._call is None:
                await self._open()
            async with asyncio.timeout(self._policy.idle_timeout_s):
                frame = await self._call.read()
        except TimeoutError:
            self._drop()
            self._schedule(
                Unavailable(
                    f"no frame on the {self._what} stream for "
                    f"{self._policy.idle_timeout_s:g} s (not even a heartbeat)"
                )
            )
            return
        except SwitchboardError as error:
            self._drop()
            await self._failed(error)
            return
        except aio.AioRpcError as raw:
            self._drop()
            await self._failed(from_rpc_error(raw))
            return
        except BaseException:
            # Cancelled (the application's task) or worse: the call must not outlive it.
            self._drop()
            raise
        if frame is EOF:
            self._drop()
            await self._ended_cleanly()
            return
        self._progress()
        self._accept(frame)

    async def _open(self) -> None:
        if self._delay_s > 0:
            delay, self._delay_s = self._delay_s, 0.0
            await asyncio.sleep(delay)
        # The bearer is chosen here, not by the interceptor, so a refusal names
        # exactly the token this call presented.
        self._used = await self._keeper.bearer()
        metadata = (("authorization", f"Bearer {self._used}"),) if self._used else ()
        self._call = self._start(metadata)
        if self._opened:
            self.resumes += 1
        self._opened += 1

    def _drop(self) -> None:
        call, self._call = self._call, None
        if call is not None:
            call.cancel()

    def _progress(self) -> None:
        self._failures = 0
        self._failing_since = None
        self._reauthenticated = False

    def _schedule(self, error: SwitchboardError) -> None:
        """Reopen after a backoff, unless it has been failing for too long."""
        self.last_error = error
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        give_up = self._policy.give_up_after_s
        if give_up is not None and now - self._failing_since >= give_up:
            self._closed = True
            raise error
        self._delay_s = self._policy.backoff.delay(self._failures, at_least_s=error.retry_delay_s)
        self._failures += 1
        log.info("%s stream broke (%s); resuming in %.2f s", self._what, error, self._delay_s)

    async def _failed(self, error: SwitchboardError) -> None:
        self.last_error = error
        if isinstance(error, SignedOut):
            self._closed = True
            raise error
        if isinstance(error, Unauthenticated) and self._used and self._keeper.kind == "session":
            if self._reauthenticated:
                self._closed = True
                raise await self._keeper.refused_again(self._used, error)
            # A stream ends when its access token expires: renew it (or take
            # the one another call renewed meanwhile) and reopen at once.
            self._reauthenticated = True
            try:
                await self._keeper.rejected(self._used, error)
            except SignedOut:
                self._closed = True
                raise
            except SwitchboardError as renewing:
                self._schedule(renewing)
            return
        if resumable(error):
            self._schedule(error)
            return
        self._closed = True
        raise error

    # -- closing ------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop: the call is cancelled, iteration ends."""
        self._closed = True
        self._drop()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
