"""What a session sends: the relay of each turn, the floor, and the writer.

- the **outbox** is one bounded queue: a slow reader makes the relay wait,
  never memory grow;
- the **relay** sends each turn's final transcript and then its run's updates
  (``watch``), one turn after the other, so the numbered frames go out in
  order: ``turn << 40`` for the transcript, plus the run's update sequence for
  each update (``mapping.sequence``);
- the **floor** knows the run being relayed, which runs were stopped, and the
  last speech of each that went out: barge-in (the intake) stops the run on the
  floor, and its ``speech`` is dropped from then on;
- the **writer** (what the servicer's generator reads) takes frames from the
  outbox. Before each frame it looks again: a run stopped since that frame was
  queued has its ``speech`` dropped there, so barge-in stops the audio at once
  whatever was queued. It sends heartbeats when nothing else goes out and ends
  the session when the client has been idle too long, or when all is said.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Final

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.ports.peers import Via
from switchboard.dispatcher.talk import mapping
from switchboard.dispatcher.talk.flow import (
    Actions,
    Backlog,
    Client,
    Errands,
    Outcome,
    Owed,
    idle_error,
)
from switchboard.platform.errors import InternalError, SwitchboardError
from switchboard.platform.security.accesswatch import Hold
from switchboard.platform.security.policy import Principal

log = logging.getLogger("switchboard.dispatcher.talk")

#: Frames a session may hold for a slow reader before its relay waits.
TALK_BUFFER: Final = 256


class Outbox:
    """The frames waiting for the writer, and its wake-up call."""

    def __init__(self) -> None:
        # None only wakes the writer: it looks at the session again.
        self._queue: asyncio.Queue[pb.TalkResponse | None] = asyncio.Queue(TALK_BUFFER)

    async def put(self, frame: pb.TalkResponse) -> None:
        await self._queue.put(frame)

    def wake(self) -> None:
        # A full queue means the writer is not waiting; it looks before its next read.
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)

    @property
    def empty(self) -> bool:
        return self._queue.empty()

    async def get(self) -> pb.TalkResponse | None:
        return await self._queue.get()


@dataclass(frozen=True)
class OnFloor:
    """The run the relay follows now, and its turn."""

    turn: int
    run: str


class Floor:
    """Barge-in: which run may speak, and what of its speech went out."""

    def __init__(
        self, *, actions: Actions, principal: Principal, via: Via, outbox: Outbox, errands: Errands
    ) -> None:
        self._actions = actions
        self._principal = principal
        self._via = via
        self._outbox = outbox
        self._errands = errands
        #: Runs whose speech stopped (barge-in or interrupt): their ``speech`` is dropped.
        self._stopped: set[str] = set()
        #: The sequence of the last ``speech`` update the writer sent, per run.
        self._spoken: dict[str, int] = {}
        self.current: OnFloor | None = None

    def stopped(self, run: str) -> bool:
        return run in self._stopped

    async def barge_in(self) -> None:
        """The user began to speak: the run on the floor stops if it is speaking."""
        current = self.current
        if current is not None and current.run in self._spoken and not self.stopped(current.run):
            await self._stop(current, 0)

    async def interrupt(self, heard_through: int) -> None:
        """The client's INTERRUPT: the run on the floor stops, speaking or not."""
        current = self.current
        if current is not None and not self.stopped(current.run):
            await self._stop(current, heard_through)

    def passes(self, frame: pb.TalkResponse) -> bool:
        """The writer's last look before the wire: speech of a run stopped since the
        frame was queued never goes out; what does is counted as spoken."""
        if frame.WhichOneof("frame") != "update" or frame.update.WhichOneof("update") != "speech":
            return True
        update = frame.update
        if self.stopped(update.run):
            return False
        self._spoken[update.run] = update.sequence
        return True

    async def _stop(self, current: OnFloor, heard_through: int) -> None:
        """Stop the run's speech now, then cancel it (heard through what the client says
        it heard, else the last speech written)."""
        self._stopped.add(current.run)
        await self._outbox.put(
            mapping.event(pb.TALK_EVENT_KIND_SPEECH_INTERRUPTED, current.turn, current.run)
        )
        heard_turn, heard_position = mapping.position(heard_through)
        if heard_through <= 0 or heard_turn != current.turn:
            heard_position = self._spoken.get(current.run, 0)
        self._errands.spawn(self._cancel(current.run, heard_position))

    async def _cancel(self, run: str, heard_through: int) -> None:
        try:
            await self._actions.cancel_run(
                self._principal,
                run,
                "interrupted in a voice session",
                self._via,
                heard_through_sequence=heard_through,
            )
        except SwitchboardError as exc:
            await self._outbox.put(mapping.error(exc))


class Relay:
    """Each owed turn's transcript, then its run's updates, one turn after the other."""

    def __init__(
        self,
        *,
        actions: Actions,
        hold: Hold,
        backlog: Backlog,
        floor: Floor,
        outbox: Outbox,
        outcome: Outcome,
    ) -> None:
        self._actions = actions
        self._hold = hold
        self._backlog = backlog
        self._floor = floor
        self._outbox = outbox
        self._outcome = outcome

    async def run(self) -> None:
        while True:
            owed = await self._backlog.owed.get()
            try:
                await self._follow(owed)
            except SwitchboardError as exc:
                if not self._outcome.access_lost:
                    await self._outbox.put(mapping.error(exc))
            except Exception:
                log.exception("a voice session's relay failed")
                self._outcome.fail(InternalError("relaying the run failed on the server"))
                return
            finally:
                self._floor.current = None
                self._backlog.settle()

    async def _follow(self, owed: Owed) -> None:
        if owed.transcript is not None:
            await self._outbox.put(
                pb.TalkResponse(sequence=mapping.sequence(owed.turn), transcript=owed.transcript)
            )
        self._floor.current = OnFloor(owed.turn, owed.run)
        async for update in self._hold.guard(self._actions.watch(owed.run, owed.after)):
            if update is None:
                continue  # the session has its own heartbeat
            if update.WhichOneof("update") == "speech" and self._floor.stopped(owed.run):
                continue
            await self._outbox.put(
                pb.TalkResponse(
                    sequence=mapping.sequence(owed.turn, update.sequence), update=update
                )
            )


class Writer:
    """The next frame for the wire: from the outbox, or a heartbeat; None when the
    session is over; the session's ending error raised."""

    def __init__(
        self,
        *,
        outbox: Outbox,
        floor: Floor,
        client: Client,
        backlog: Backlog,
        outcome: Outcome,
        heartbeat_s: float,
        idle_timeout_s: float,
    ) -> None:
        self._outbox = outbox
        self._floor = floor
        self._client = client
        self._backlog = backlog
        self._outcome = outcome
        self._heartbeat_s = heartbeat_s
        self._idle_timeout_s = idle_timeout_s

    async def next(self) -> pb.TalkResponse | None:
        last_out = time.monotonic()
        while True:
            self._outcome.check()
            if self._done():
                return None
            wait = self._heartbeat_s - (time.monotonic() - last_out)
            idle = self._idle_for()
            if idle is not None:
                if idle <= 0:
                    error = idle_error(self._idle_timeout_s)
                    self._outcome.fail(error)
                    raise error
                wait = min(wait, idle)
            if wait <= 0:
                return mapping.heartbeat()
            try:
                async with asyncio.timeout(wait):
                    frame = await self._outbox.get()
            except TimeoutError:
                continue
            self._outcome.check()
            if frame is None or not self._floor.passes(frame):
                continue
            return frame

    def _done(self) -> bool:
        """Everything owed went out, and the client will send nothing more."""
        return (
            (not self._client.reading or self._client.ending)
            and self._backlog.drained
            and self._outbox.empty
        )

    def _idle_for(self) -> float | None:
        """Seconds until the session is idle (None while something is going on)."""
        if self._backlog.busy or not self._client.reading:
            return None
        since = max(self._client.last_frame, self._backlog.settled_at)
        return since + self._idle_timeout_s - time.monotonic()
