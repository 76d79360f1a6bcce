"""What a session's actors hand each other, and what they all may decide.

The intake (``intake.py``) hears turns, the worker (``worker.py``) takes them,
the relay and the writer (``outbound.py``) send them out. Between them:

- the **backlog**: turns said and waiting for the worker (``said``), then
  taken and owed by the relay (``owed``), each counted from the moment it is
  said until the relay has queued its last frame (a session with turns in it
  is never idle, and does not end before they are out);
- the **client**: whether it still sends, asked to end, and when it last did;
- the **outcome**: the first error that ends the session, or access lost
  (the grant's credential, the hold's conversation);
- the **errands**: short tasks any actor starts (a partial transcript, a
  cancel, an error frame said from code that cannot wait), cancelled with the
  session.

The backlog and the outcome wake the writer when they change what it decides
on (the intake does, for the client's side). ``Actions`` are the dispatcher's
calls the actors make.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.ports.peers import Via
from switchboard.platform import background
from switchboard.platform.errors import (
    FailedPrecondition,
    InvalidArgument,
    SessionIdle,
    SwitchboardError,
)
from switchboard.platform.security.accesswatch import Grant, Hold
from switchboard.platform.security.policy import Principal

log = logging.getLogger("switchboard.dispatcher.talk")

#: Turns said and waiting for the worker; one more is an error frame (the user
#: talks faster than the engines answer).
MAX_PENDING_TURNS: Final = 4


class Actions(Protocol):
    """What a session calls: the dispatcher's own calls (``service.Dispatcher``)."""

    async def send_message(
        self, principal: Principal, request: pb.SendMessageRequest
    ) -> pb.SendMessageResponse: ...

    def watch(self, name: str, after_sequence: int) -> AsyncIterator[pb.RunUpdate | None]: ...

    async def cancel_run(
        self,
        principal: Principal,
        name: str,
        reason: str,
        via: Via,
        *,
        heard_through_sequence: int = 0,
    ) -> pb.Run: ...


@dataclass(frozen=True)
class Said:
    """A turn the user finished: spoken (``audio``) or typed (``text``); a spoken one
    says why it ended and the end-of-turn model's last probability (0: not asked)."""

    audio: bytes | None = None
    text: str = ""
    end_reason: pb.TurnEndReason.ValueType = pb.TURN_END_REASON_UNSPECIFIED
    end_confidence: float = 0.0
    #: The turn's partial transcript still being made when it ended: the worker
    #: cancels it once the final transcript is known, so it never comes after it.
    partial: asyncio.Task[None] | None = None


@dataclass(frozen=True)
class Owed:
    """A turn's frames to relay: its final transcript (None when the client saw it),
    then its run's updates after ``after``."""

    turn: int
    transcript: pb.Transcript | None
    run: str
    after: int


class Backlog:
    """The turns between the intake and the relay's last frame."""

    def __init__(self, turns_taken: int, owed: list[Owed], wake: Callable[[], None]) -> None:
        #: Said and waiting for the worker; None after the intake's last frame.
        self.said: asyncio.Queue[Said | None] = asyncio.Queue()
        #: Taken (stored, its run started) and waiting for the relay.
        self.owed: asyncio.Queue[Owed] = asyncio.Queue()
        for item in owed:
            self.owed.put_nowait(item)
        self.turns_taken = turns_taken
        self._open = len(owed)
        self._wake = wake
        #: When the last open turn went out (the idle clock starts again there).
        self.settled_at = time.monotonic()

    @property
    def busy(self) -> bool:
        return self._open > 0

    @property
    def drained(self) -> bool:
        """No turn open, and the worker has read everything the intake queued."""
        return not self._open and self.said.empty()

    @property
    def next_turn(self) -> int:
        """The number the turn being said will have once taken."""
        return self.turns_taken + self.said.qsize() + 1

    def queue(self, turn: Said) -> bool:
        """Queue a turn for the worker; False when too many wait already."""
        if self.said.qsize() >= MAX_PENDING_TURNS:
            return False
        self._open += 1
        self.said.put_nowait(turn)
        return True

    def close(self) -> None:
        self.said.put_nowait(None)

    def taken(self, owed: Owed) -> None:
        """The worker stored the turn: the relay owes its frames."""
        self.turns_taken = owed.turn
        self.owed.put_nowait(owed)

    def settle(self) -> None:
        """One turn is out (or dropped)."""
        self._open -= 1
        if not self._open:
            self.settled_at = time.monotonic()
        self._wake()


@dataclass
class Client:
    """The client's side as the intake saw it, which the writer reads."""

    #: The stream still brings frames.
    reading: bool = True
    #: END_SESSION came: what is owed goes out, then the session ends for good.
    ending: bool = False
    last_frame: float = field(default_factory=time.monotonic)


class Outcome:
    """How the session ends, once something decided it."""

    def __init__(self, grant: Grant, hold: Hold, wake: Callable[[], None]) -> None:
        self._grant = grant
        self._hold = hold
        self._wake = wake
        #: The first error that ends the session (a bad frame, idleness, a fault of ours).
        self.error: SwitchboardError | None = None

    def fail(self, error: SwitchboardError) -> None:
        if self.error is None:
            self.error = error
        self._wake()

    @property
    def stops_intake(self) -> bool:
        # A lost hold stops the intake through the writer, which ends the stream.
        return self._grant.error is not None or self.error is not None

    @property
    def access_lost(self) -> bool:
        return self._grant.error is not None or self._hold.error is not None

    def check(self) -> None:
        """Raise what ends the session, if anything does yet."""
        error = self._grant.error or self._hold.error
        if error is not None:
            raise error
        if self.error is not None:
            raise self.error

    @property
    def ends_for_good(self) -> bool:
        # A client's bad frame ends the session for good; idleness and lost access do not.
        return isinstance(self.error, InvalidArgument | FailedPrecondition)


class Errands:
    """The session's short tasks: cancelled with it."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, work: Awaitable[None]) -> asyncio.Task[None]:
        async def run() -> None:
            await work

        task = background.spawn(run(), name="talk-task", logger=log)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def running(self) -> list[asyncio.Task[None]]:
        return list(self._tasks)


def idle_error(seconds: float) -> SessionIdle:
    return SessionIdle(
        f"the voice session sent nothing for {seconds:g} s; resume it within its window",
        metadata={"idle_seconds": f"{seconds:g}"},
    )
