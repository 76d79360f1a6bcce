"""Watching a run: ``DispatcherService.WatchRun`` resumed after the last sequence seen.

A run's updates are numbered; a watch that breaks reopens with
``after_sequence`` = the last sequence delivered, so nothing is missed and no
update is delivered twice (the server starts with a snapshot when the older
updates are gone, e.g. after a restart). The watch ends after the update that
puts the run in a terminal state.

It asks for merged deltas (``WatchRunRequest.merge_deltas``; ``merge_deltas=False``
turns that off): a watch that is behind gets the text deltas ready together as one
update covering ``first_sequence`` .. ``sequence``. Resume is unchanged (after the
last sequence), and ``missing`` tells whether sequences were skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import grpc

from switchboard.api.dispatcher.v1 import dispatcher_pb2
from switchboard.client.errors import (
    Cancelled,
    DeadlineExceeded,
    RunFailed,
    SwitchboardError,
    Unavailable,
    Unknown,
    from_status,
)
from switchboard.client.session import TokenKeeper
from switchboard.client.transport.streams import ResumableStream, StreamPolicy

if TYPE_CHECKING:
    from switchboard.api.dispatcher.v1 import dispatcher_pb2_grpc

TERMINAL: Final = frozenset(
    {
        dispatcher_pb2.RUN_STATE_SUCCEEDED,
        dispatcher_pb2.RUN_STATE_FAILED,
        dispatcher_pb2.RUN_STATE_CANCELLED,
        dispatcher_pb2.RUN_STATE_DEADLINE_EXCEEDED,
    }
)


def is_terminal(update: dispatcher_pb2.RunUpdate) -> bool:
    return (
        update.WhichOneof("update") == "state_change" and update.state_change.run.state in TERMINAL
    )


@dataclass(frozen=True)
class Answer:
    """A finished run and its answer text."""

    run: dispatcher_pb2.Run
    text: str


#: Each attempt at a run numbers its updates in its own block of 2^32 sequences.
ATTEMPT_BITS: Final = 32


def first_sequence(update: dispatcher_pb2.RunUpdate) -> int:
    """The first sequence ``update`` covers: a merged delta's ``first_sequence``, else
    its own ``sequence`` (the last it covers)."""
    return update.first_sequence or update.sequence


def missing(last: int, update: dispatcher_pb2.RunUpdate) -> int:
    """How many sequences are missing between ``last`` (the last seen; 0 for none)
    and ``update``: 0 when it follows (merged or not), when it opens a newer attempt's
    block (a recovered run numbers on from there), and for a state change, which
    carries the whole run (a snapshot standing for the updates no longer kept)."""
    first = first_sequence(update)
    if first <= last + 1 or update.WhichOneof("update") == "state_change":
        return 0
    if first >> ATTEMPT_BITS > last >> ATTEMPT_BITS:
        return 0
    return first - last - 1


class AnswerBuilder:
    """Assembles a run's answer from its updates (pure, no I/O).

    The final ``result`` carries the whole answer and wins; until it comes, the
    deltas joined. A run recovered with ``resume`` (the default recovery policy)
    continues where it was, from its journal, numbering its updates in the next
    block of 2^32 sequences as before; one recovered with ``requeue`` runs again
    from the start, in the next block too, and its new attempt opens with a state
    change back to QUEUED, but a watcher that resumed after a restart may get the
    run as it then stands instead (docs/dispatcher.md, Restarts). Either way the
    deltas of an earlier attempt are dropped at the first update of a newer block
    (a resumed run's final ``result`` still carries its whole answer), and at a
    QUEUED state change.
    """

    def __init__(self) -> None:
        self._deltas: list[str] = []
        self._result: str | None = None
        self._block = 0
        self.run: dispatcher_pb2.Run | None = None

    def add(self, update: dispatcher_pb2.RunUpdate) -> None:
        block = update.sequence >> ATTEMPT_BITS
        if block > self._block:
            self._block = block
            self._deltas.clear()
            self._result = None
        kind = update.WhichOneof("update")
        if kind == "delta":
            self._deltas.append(update.delta.text)
        elif kind == "result":
            self._result = "".join(part.text for part in update.result.parts)
        elif kind == "state_change":
            self.run = update.state_change.run
            if self.run.state == dispatcher_pb2.RUN_STATE_QUEUED:
                self._deltas.clear()
                self._result = None

    @property
    def text(self) -> str:
        return self._result if self._result is not None else "".join(self._deltas)


def run_error(run: dispatcher_pb2.Run) -> SwitchboardError:
    """Why ``run`` ended without an answer, as a typed error (from ``Run.error``)."""
    if run.HasField("error") and run.error.code:
        return from_status(run.error)
    state = dispatcher_pb2.RunState.Name(run.state)
    if run.state == dispatcher_pb2.RUN_STATE_CANCELLED:
        return Cancelled(f"the run ended {state}", code=grpc.StatusCode.CANCELLED)
    if run.state == dispatcher_pb2.RUN_STATE_DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"the run ended {state}")
    return Unknown(f"the run ended {state}")


class RunWatch(ResumableStream[dispatcher_pb2.RunUpdate, dispatcher_pb2.RunUpdate]):
    """A run's updates in order, ending after its terminal state change.

    ``last_sequence`` is the last update handed out (resume there with
    ``after_sequence``); ``run`` the run as its latest state change showed it;
    ``missed`` the sequences that never came (``missing``: a delta of another
    replica's run lost on the way; 0 otherwise). ``merge_deltas`` asks the server
    for the deltas ready together as one update (``first_sequence``).
    """

    def __init__(
        self,
        stub: dispatcher_pb2_grpc.DispatcherServiceAsyncStub,
        keeper: TokenKeeper,
        name: str,
        *,
        after_sequence: int = 0,
        policy: StreamPolicy | None = None,
        call_timeout_s: float = 30.0,
        merge_deltas: bool = True,
    ) -> None:
        super().__init__(keeper, policy or StreamPolicy(), "run")
        if after_sequence < 0:
            raise ValueError("after_sequence must not be negative")
        self._stub = stub
        self.name = name
        self.last_sequence = after_sequence
        self.run: dispatcher_pb2.Run | None = None
        self.missed = 0
        self._call_timeout_s = call_timeout_s
        self._merge = merge_deltas

    def _start(self, metadata: tuple[tuple[str, str], ...]) -> Any:
        request = dispatcher_pb2.WatchRunRequest(
            name=self.name, after_sequence=self.last_sequence, merge_deltas=self._merge
        )
        return self._stub.WatchRun(request, metadata=metadata)

    def _accept(self, frame: dispatcher_pb2.WatchRunResponse) -> None:
        if frame.WhichOneof("frame") != "update":
            return
        update = frame.update
        # A sequence at or before the position was delivered already.
        newest = self._pending[-1].sequence if self._pending else self.last_sequence
        if update.sequence > newest:
            self._pending.append(update)

    def _delivered(self, item: dispatcher_pb2.RunUpdate) -> dispatcher_pb2.RunUpdate:
        self.missed += missing(self.last_sequence, item)
        self.last_sequence = item.sequence
        if item.WhichOneof("update") == "state_change":
            self.run = item.state_change.run
        if is_terminal(item):
            self._finished = True
            self._drop()
        return item

    async def _ended_cleanly(self) -> None:
        # The server ends a watch with OK only after the terminal update, which
        # this watch would have delivered; if it has not, the run may have ended
        # where this process could not see it: ask, rather than reopen blindly.
        try:
            got = await self._stub.GetRun(
                dispatcher_pb2.GetRunRequest(name=self.name), timeout=self._call_timeout_s
            )
        except SwitchboardError as error:
            self._schedule(error)
            return
        if got.run.state in TERMINAL and got.run.last_sequence <= self.last_sequence:
            self.run = got.run
            self._finished = True
            return
        self._schedule(Unavailable("the run stream ended before the run did"))

    async def answer(self) -> Answer:
        """Read the run to its end; its answer, or ``RunFailed`` if it has none."""
        builder = AnswerBuilder()
        async for update in self:
            builder.add(update)
        run = self.run if self.run is not None else builder.run
        if run is None:
            raise Unavailable(f"{self.name} ended without a state")
        if run.state != dispatcher_pb2.RUN_STATE_SUCCEEDED:
            raise RunFailed(run, run_error(run))
        return Answer(run=run, text=builder.text)
