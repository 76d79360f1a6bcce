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

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import grpc

from switchboard.api.dispatcher.v1 import dispatcher_pb2
from switchboard.api.handler.v1 import handler_pb2
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
    from google.rpc import status_pb2

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
        elif kind == "queued_behind" and self.run is not None:
            _note_queued(self.run, update)

    @property
    def text(self) -> str:
        return self._result if self._result is not None else "".join(self._deltas)


@dataclass(frozen=True)
class Child:
    """A child run as its parent's updates name it (``RunUpdate.child_run``): a
    delegate's answer to one of the parent's tool calls (docs/delegation.md).

    The parent's updates name each child when it starts (``state`` QUEUED or
    RUNNING), when it pauses and goes on, and when it ends (its terminal state, with
    ``usage``, and ``error`` when it did not succeed). A child's own children (and
    theirs) are named on the same stream, ``parent`` saying which run asked each.
    Follow one with ``Client.watch(child)``.
    """

    #: The child, ``workspaces/{w}/conversations/{c}/runs/{r}`` (a conversation of its own).
    run: str
    #: The assistant that answers, ``workspaces/{w}/assistants/{a}``.
    assistant: str
    #: The parent's tool call it answers (``ToolCall.id``).
    tool_call_id: str
    #: Its state when the parent's update was made.
    state: dispatcher_pb2.RunState.ValueType
    #: What it spent; None until it ended.
    usage: handler_pb2.Usage | None
    #: Why it did not succeed, as a typed error; None otherwise.
    error: SwitchboardError | None
    #: The parent's update that named it (its ``sequence``).
    sequence: int
    #: The run that asked it: the run watched, or one of its descendants.
    parent: str = ""
    #: The handler that answers (``handlers/{h}``) when the delegate names a handler;
    #: ``assistant`` is empty then.
    handler: str = ""

    @property
    def ended(self) -> bool:
        return self.state in TERMINAL

    @property
    def name(self) -> str:
        """The child run's name (so a ``Child`` goes wherever a run's name does)."""
        return self.run


def child_of(update: dispatcher_pb2.RunUpdate) -> Child | None:
    """The child run ``update`` names, if it is a ``child_run`` update; else None."""
    if update.WhichOneof("update") != "child_run":
        return None
    child = update.child_run
    error: SwitchboardError | None = None
    if child.state in TERMINAL and child.state != dispatcher_pb2.RUN_STATE_SUCCEEDED:
        error = _ended_without_answer(child.state, child.error if child.HasField("error") else None)
    return Child(
        run=child.run,
        assistant=child.assistant,
        tool_call_id=child.tool_call_id,
        state=child.state,
        usage=child.usage if child.HasField("usage") else None,
        error=error,
        sequence=update.sequence,
        parent=child.parent,
        handler=child.handler,
    )


@dataclass(frozen=True)
class RunTree:
    """A run and, below it, the runs its delegate tool calls started (``Client.tree``)."""

    run: dispatcher_pb2.Run
    #: Its child runs, each with its own, newest first (as ``ListRuns`` orders them).
    children: list[RunTree] = field(default_factory=list)

    def walk(self) -> list[dispatcher_pb2.Run]:
        """Every run of the tree, each before its children."""
        found = [self.run]
        for child in self.children:
            found += child.walk()
        return found


def run_error(run: dispatcher_pb2.Run) -> SwitchboardError:
    """Why ``run`` ended without an answer, as a typed error (from ``Run.error``)."""
    return _ended_without_answer(run.state, run.error if run.HasField("error") else None)


def _ended_without_answer(
    state: dispatcher_pb2.RunState.ValueType, error: status_pb2.Status | None
) -> SwitchboardError:
    if error is not None and error.code:
        return from_status(error)
    named = dispatcher_pb2.RunState.Name(state)
    if state == dispatcher_pb2.RUN_STATE_CANCELLED:
        return Cancelled(f"the run ended {named}", code=grpc.StatusCode.CANCELLED)
    if state == dispatcher_pb2.RUN_STATE_DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"the run ended {named}")
    return Unknown(f"the run ended {named}")


class RunWatch(ResumableStream[dispatcher_pb2.RunUpdate, dispatcher_pb2.RunUpdate]):
    """A run's updates in order, ending after its terminal state change.

    ``last_sequence`` is the last update handed out (resume there with
    ``after_sequence``); ``run`` the run as its latest state change showed it;
    ``missed`` the sequences that never came (``missing``: a delta of another
    replica's run lost on the way; 0 otherwise). ``merge_deltas`` asks the server
    for the deltas ready together as one update (``first_sequence``). ``children``
    holds each child run the updates named so far (``child_of``), by name, in the
    order they started, as its latest update showed it.
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
        self.children: dict[str, Child] = {}
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
        kind = item.WhichOneof("update")
        if kind == "state_change":
            self.run = item.state_change.run
        elif kind == "queued_behind" and self.run is not None:
            _note_queued(self.run, item)
        elif kind == "child_run":
            child = child_of(item)
            if child is not None:
                self.children[child.run] = child
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


def _note_queued(run: dispatcher_pb2.Run, update: dispatcher_pb2.RunUpdate) -> None:
    """A ``queued_behind`` update changes what the queued run waits behind (empty:
    nothing now): the run as last seen says it, as GetRun would."""
    if update.queued_behind.ByteSize():
        run.queued_behind.CopyFrom(update.queued_behind)
    else:
        run.ClearField("queued_behind")
