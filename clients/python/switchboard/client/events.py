"""Following the event log: ``EventService.Subscribe`` resumed from the last cursor.

What is guaranteed (docs/python-client.md, "Resume"): events arrive in log
order; after a break the stream resumes after the cursor of the last event
handed out (or the last heartbeat's), so nothing retained is skipped and no
position is delivered twice; event ids are also remembered for a while, so a
republished event (same id) is not delivered again. A cursor older than the
retained log is never papered over: ``CursorExpired`` is raised.

A follower asks for merged deltas (``SubscribeRequest.merge_deltas``; off with
``merge_deltas=False``): a run's consecutive text deltas delivered together come
as one RUN_UPDATED event, the last one's, whose update covers ``first_sequence``
.. ``sequence``. Since one id then stands for several deltas, a delta is also
dropped when its run's deltas were delivered up to its sequence already (a
resume on another replica sends the deltas after the cursor's event again).
"""

from __future__ import annotations

import re
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from switchboard.api.dispatcher.v1 import dispatcher_pb2
from switchboard.api.events.v1 import events_pb2
from switchboard.client.session import TokenKeeper
from switchboard.client.transport.streams import ResumableStream, StreamPolicy

if TYPE_CHECKING:
    from switchboard.api.events.v1 import events_pb2_grpc

_USER: Final = re.compile(r"users/[^/]+")
_WORKSPACE: Final = re.compile(r"workspaces/[^/]+")
_CONVERSATION: Final = re.compile(r"workspaces/[^/]+/conversations/[^/]+")
#: Event ids remembered per follower, to drop a republished event (and as many
#: runs' last delta sequences).
DEDUPE_WINDOW: Final = 4096
_RUN_UPDATED: Final = events_pb2.EVENT_TYPE_RUN_UPDATED

ScopeLike = str | events_pb2.Scope
TypeLike = int | str


def scope(name: ScopeLike) -> events_pb2.Scope:
    """A ``Scope`` from a resource name: ``users/u``, ``workspaces/w`` or
    ``workspaces/w/conversations/c`` (a ``Scope`` is taken as it is)."""
    if isinstance(name, events_pb2.Scope):
        return name
    if _USER.fullmatch(name):
        return events_pb2.Scope(user=name)
    if _WORKSPACE.fullmatch(name):
        return events_pb2.Scope(workspace=name)
    if _CONVERSATION.fullmatch(name):
        return events_pb2.Scope(conversation=name)
    raise ValueError(f"{name!r} is not a user, workspace or conversation name")


def event_type(value: TypeLike) -> events_pb2.EventType.ValueType:
    """An ``EventType`` from its number or name (``MESSAGE_CREATED`` or ``EVENT_TYPE_...``)."""
    if isinstance(value, int):
        return events_pb2.EventType.ValueType(value)
    name = value if value.startswith("EVENT_TYPE_") else f"EVENT_TYPE_{value}"
    return events_pb2.EventType.Value(name)


@dataclass(frozen=True)
class Delivery:
    """An event and the cursor the follower stands at once it is handed out."""

    event: events_pb2.Event
    cursor: str


class CursorTracker:
    """The position of a follower in the log, from the frames it received.

    Pure: no I/O. ``accept`` turns a frame into the events to hand out, each with
    the cursor to move to when it is handed out (``delivered``): the event's own,
    or for the last of a batch the batch's, which also covers events of other
    scopes or types that were not sent. A heartbeat moves the cursor at once.
    """

    def __init__(self, after_cursor: str = "", dedupe_window: int = DEDUPE_WINDOW) -> None:
        self.cursor = after_cursor
        self._window = dedupe_window
        self._ids: set[str] = set()
        self._order: deque[str] = deque()
        #: Each run's last delta sequence handed on, oldest run first.
        self._deltas: OrderedDict[str, int] = OrderedDict()
        #: Events dropped because their id was delivered already.
        self.duplicates = 0

    def accept(self, frame: events_pb2.SubscribeResponse) -> list[Delivery]:
        kind = frame.WhichOneof("frame")
        if kind == "heartbeat":
            if frame.heartbeat.cursor:
                self.cursor = frame.heartbeat.cursor
            return []
        if kind != "batch":
            return []
        batch = frame.batch
        fresh = [event for event in batch.events if self._first_time(event)]
        if not fresh:
            if batch.cursor:
                self.cursor = batch.cursor
            return []
        deliveries = [Delivery(event, event.cursor or self.cursor) for event in fresh[:-1]]
        last = fresh[-1]
        deliveries.append(Delivery(last, batch.cursor or last.cursor or self.cursor))
        return deliveries

    def delivered(self, delivery: Delivery) -> None:
        self.cursor = delivery.cursor

    def _first_time(self, event: events_pb2.Event) -> bool:
        update = event.run_updated.update
        if event.type == _RUN_UPDATED and update.HasField("delta") and not self._new_delta(update):
            self.duplicates += 1
            return False
        if not event.id:
            return True
        if event.id in self._ids:
            self.duplicates += 1
            return False
        self._ids.add(event.id)
        self._order.append(event.id)
        if len(self._order) > self._window:
            self._ids.discard(self._order.popleft())
        return True

    def _new_delta(self, update: dispatcher_pb2.RunUpdate) -> bool:
        """A run's deltas come in order among themselves (one channel): one at or
        before the last handed on was delivered already, alone or merged."""
        runs = self._deltas
        if update.sequence <= runs.get(update.run, 0):
            return False
        runs[update.run] = update.sequence
        runs.move_to_end(update.run)
        if len(runs) > self._window:
            runs.popitem(last=False)
        return True


class Follower(ResumableStream[Delivery, events_pb2.Event]):
    """Events of some scopes, as an async iterator that survives broken streams.

    ``cursor`` is where the follower stands: after the last event it handed out
    (or the last heartbeat). Persist it, and pass it as ``after_cursor`` next
    time, to continue exactly there.
    """

    def __init__(
        self,
        stub: events_pb2_grpc.EventServiceAsyncStub,
        keeper: TokenKeeper,
        scopes: Iterable[ScopeLike],
        *,
        after_cursor: str = "",
        types: Iterable[TypeLike] = (),
        policy: StreamPolicy | None = None,
        merge_deltas: bool = True,
    ) -> None:
        super().__init__(keeper, policy or StreamPolicy(), "event")
        self._stub = stub
        self._scopes = [scope(s) for s in scopes]
        if not self._scopes:
            raise ValueError("follow at least one scope")
        self._types = [event_type(t) for t in types]
        self._tracker = CursorTracker(after_cursor)
        self._live = False
        self._merge = merge_deltas

    @property
    def cursor(self) -> str:
        return self._tracker.cursor

    @property
    def duplicates(self) -> int:
        """Republished events (an id seen before) that were not delivered again."""
        return self._tracker.duplicates

    def _start(self, metadata: tuple[tuple[str, str], ...]) -> Any:
        self._live = False
        request = events_pb2.SubscribeRequest(
            scopes=self._scopes,
            after_cursor=self._tracker.cursor,
            types=self._types,
            merge_deltas=self._merge,
        )
        return self._stub.Subscribe(request, metadata=metadata)

    def _accept(self, frame: events_pb2.SubscribeResponse) -> None:
        if frame.WhichOneof("frame") == "heartbeat":
            self._live = True
        self._pending.extend(self._tracker.accept(frame))

    def _delivered(self, item: Delivery) -> events_pb2.Event:
        self._tracker.delivered(item)
        return item.event

    async def ready(self) -> str:
        """Wait until the current stream is subscribed (its first heartbeat came);
        the cursor then. Events published from now on will be delivered."""
        while not (self._live and self._call is not None):
            if self._closed:
                raise RuntimeError("the follower is closed")
            if self._pending:
                return self.cursor  # events already received: it is subscribed
            await self._step()
        return self.cursor
