"""The one publisher of events, and the fan-out to this process's subscribers.

Every service hands its ``Event`` envelopes to ``EventBus.publish``; the bus
stamps them (id, time) and appends them to the log (``platform/events/eventlog.py``).
Whatever the backend, events come back to the bus in log order through one
``_deliver`` call, which appends them to the in-memory ring and pushes each to
the subscribers whose scopes it matches. Delivery is synchronous and never
waits on a subscriber: a push appends to the subscriber's own bounded queue,
so one slow subscriber cannot delay the others.

Pushing is cheap; what costs is each subscriber's writer sending a frame (in
gRPC's code, most of it), and those writers share the event loop with every
RPC. So the fan-out decides when a writer runs (decision 34):

* A subscriber reached through a name few follow (at most ``PROMPT_FANOUT``: a
  conversation's own watchers) is woken at once.
* The subscribers of a large fan-out (a busy conversation's thousand watchers,
  a broadcast to a workspace) are woken ``WAKE_CHUNK`` per loop callback, in the
  order their events came, and only while fewer than ``IN_FLIGHT`` of them are
  sending. So a small conversation's event, a write's next step and gRPC's
  completions wait behind a few frames, never behind the whole fan-out.
* While unary calls are being served and the loop's thread has been busy more
  than ``BUSY_SHARE`` of the time, the large fan-outs wait (up to
  ``MAX_DEFER_S``): the callers go first.

A woken subscriber sends everything queued for it as one frame and then waits
for its next turn, so while it waits its events collect: under load the frames
per second stop growing with the event rate, and the cost per delivery falls.

Events that change who may see what (a membership or workspace change, a
revoked session or key) also tell every subscriber watching that workspace or
user to re-check its access, in log order, before it sends anything later.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Final, Protocol

from switchboard.api.events.v1 import events_pb2
from switchboard.platform.errors import CursorAhead, CursorExpired, SwitchboardError
from switchboard.platform.events.eventlog import (
    EVERY_CONVERSATION,
    Carry,
    LogBackend,
    Logged,
    LogState,
    Position,
    Redactor,
    Ring,
    format_cursor,
    logged_part,
    parse_cursor,
)
from switchboard.platform.events.logspans import traced
from switchboard.platform.resilience.inflight import CALLS
from switchboard.platform.store.outbox import Outbox, stamp

if TYPE_CHECKING:
    from switchboard.platform.observe.metrics import Metrics

log = logging.getLogger("switchboard.bus")

Listener = Callable[[events_pb2.Event], None]
#: Told ``(workspace or user name, only this member's "users/u" or "")`` when an
#: event changes who may see that workspace or user (``platform/security/accesswatch.py``).
AccessListener = Callable[[str, str], None]

#: A name followed by at most this many subscribers wakes them as it pushes.
PROMPT_FANOUT: Final = 32
#: Subscribers of a larger fan-out woken per loop callback...
WAKE_CHUNK: Final = 8
#: ... while fewer than this many of them are sending (woken, and their frame not yet
#: handed to gRPC).
IN_FLIGHT: Final = 128
#: While unary calls are being served and the loop's thread was busier than this
#: share of the time, a large fan-out waits for room...
BUSY_SHARE: Final = 0.6
#: ... looking again after this long...
BUSY_PAUSE_S: Final = 0.005
#: ... but never longer than this at a time.
MAX_DEFER_S: Final = 0.2
#: The window the loop's busy share is measured over.
SHARE_WINDOW_S: Final = 0.02
#: Tokens a process delivers are numbered from a random epoch (``k`` in a token's
#: position): a process knows its own tokens' cursors from another process's.
TOKEN_EPOCH_BITS: Final = 40
#: Longest a token heard from another process waits for the logged event it follows
#: (``EventBus.heard``): that event is normally a Redis read behind, a millisecond or two.
EARLY_TOKEN_WAIT_S: Final = 0.05


def _followed(name: str) -> str:
    """What following ``name``'s tokens follows: a conversation, or every conversation
    (a workspace's or a user's events span conversations)."""
    parts = name.split("/")
    if len(parts) == 4 and parts[0] == "workspaces" and parts[2] == "conversations":
        return name
    return EVERY_CONVERSATION


def _base(cursor: str) -> Position:
    """The logged position a token's cursor (or a logged event's) names; () if none."""
    position = parse_cursor(cursor) if cursor else None
    return logged_part(position) if position else ()


class LoopShare:
    """The share of wall time the calling thread (the event loop's) spent on the CPU,
    over the last ``SHARE_WINDOW_S`` or so: how much room the loop has left."""

    def __init__(self) -> None:
        self._wall = time.monotonic()
        self._cpu = time.thread_time()
        self.share = 0.0

    def over(self, share: float) -> bool:
        wall = time.monotonic()
        if wall - self._wall >= SHARE_WINDOW_S:
            cpu = time.thread_time()
            self.share = (cpu - self._cpu) / (wall - self._wall)
            self._wall, self._cpu = wall, cpu
        return self.share > share


# A renamed workspace changes nobody's access; a deleted one (or an unspecified change) may.
_ACCESS_CHANGES: Final = frozenset(
    {events_pb2.CHANGE_KIND_DELETED, events_pb2.CHANGE_KIND_UNSPECIFIED}
)
_ACCESS_SECURITY_KINDS: Final = frozenset(
    {
        events_pb2.SECURITY_EVENT_KIND_SESSION_REVOKED,
        events_pb2.SECURITY_EVENT_KIND_REFRESH_REUSE_DETECTED,
        events_pb2.SECURITY_EVENT_KIND_API_KEY_REVOKED,
    }
)


class Sink(Protocol):
    """A subscriber as the fan-out sees it."""

    #: Resource names it follows (``users/u``, ``workspaces/w``, ``workspaces/w/conversations/c``).
    keys: tuple[str, ...]
    #: Workspaces and users whose access changes must make it re-check.
    watches: tuple[str, ...]
    #: The user it acts for (``users/u``): a membership change of someone else passes it by.
    owner: str

    def push(self, item: Logged) -> bool:
        """Queue ``item`` (it matched one of ``keys``); whether its writer must be woken.
        Must not block or raise."""
        ...

    def wake(self) -> None:
        """Let its writer send what is queued."""
        ...

    def recheck(self) -> None:
        """Re-check access before sending anything queued after this point (and wake)."""
        ...


class Fanout:
    """Index of this process's sinks by the names they follow."""

    def __init__(self) -> None:
        self._by_key: dict[str, dict[Sink, None]] = {}
        self._by_watch: dict[str, dict[Sink, None]] = {}
        self._sinks: dict[Sink, None] = {}
        #: Sinks of a large fan-out waiting for their turn, oldest first.
        self._later: OrderedDict[Sink, None] = OrderedDict()
        #: Sinks the pump woke whose writer has not said it is done with its turn.
        self._flight: dict[Sink, int] = {}
        self._pumping = False
        #: Since when the large fan-outs have waited for a busy loop (None: not waiting).
        self._deferred_at: float | None = None
        self._busy = LoopShare()
        self.count = 0
        # Called at the same point in log order as the sinks' recheck().
        self.access_listeners: list[AccessListener] = []

    def attach(self, sink: Sink) -> None:
        for key in sink.keys:
            self._by_key.setdefault(key, {})[sink] = None
        for name in sink.watches:
            self._by_watch.setdefault(name, {})[sink] = None
        self._sinks[sink] = None
        self.count += 1

    def detach(self, sink: Sink) -> None:
        for index, names in ((self._by_key, sink.keys), (self._by_watch, sink.watches)):
            for name in names:
                sinks = index.get(name)
                if sinks is None:
                    continue
                sinks.pop(sink, None)
                if not sinks:
                    del index[name]
        self._sinks.pop(sink, None)
        self._later.pop(sink, None)
        self.sent(sink)
        self.count -= 1

    def backlogs(self) -> Iterator[int]:
        """Each attached sink's queued items not yet sent (``backlog``; 0 if it has none)."""
        for sink in self._sinks:
            yield getattr(sink, "backlog", 0)

    def deliver(self, items: Sequence[Logged]) -> None:
        by_key, later = self._by_key, self._later
        prompt: list[Sink] = []
        for item in items:
            for key in (item.user, item.workspace, item.conversation):
                if key and (sinks := by_key.get(key)):
                    if len(sinks) <= PROMPT_FANOUT:
                        prompt.extend(sink for sink in sinks if sink.push(item))
                    else:
                        for sink in sinks:
                            if sink.push(item):
                                later[sink] = None
            watched, only = self._watched(item)
            if watched:
                self._access_changed(watched, only)
        for sink in prompt:
            later.pop(sink, None)
            sink.wake()
        if later:
            self._pump()

    def _access_changed(self, watched: str, only: str) -> None:
        if watchers := self._by_watch.get(watched):
            for sink in watchers:
                if not only or sink.owner == only:
                    sink.recheck()
        for listener in self.access_listeners:
            listener(watched, only)

    def wake_later(self, sink: Sink) -> None:
        """Wake ``sink`` in its turn with the large fan-outs (it has more queued than
        one frame took)."""
        self._later[sink] = None
        self._pump()

    def sent(self, sink: Sink) -> None:
        """``sink``'s writer is done with its turn: its frame went out (gRPC took it),
        or it had nothing to send."""
        # Refilled a chunk at a time: one loop callback per WAKE_CHUNK sinks, not per sink.
        flight = self._flight
        if flight.pop(sink, 0) and self._later and len(flight) <= IN_FLIGHT - WAKE_CHUNK:
            self._pump()

    def _pump(self) -> None:
        if not self._pumping and len(self._flight) < IN_FLIGHT:
            self._pumping = True
            asyncio.get_running_loop().call_soon(self._wake_chunk)

    def _wake_chunk(self) -> None:
        later, flight = self._later, self._flight
        if later and CALLS.unary and self._busy.over(BUSY_SHARE):
            now = time.monotonic()
            if self._deferred_at is None:
                self._deferred_at = now
            if now - self._deferred_at < MAX_DEFER_S:
                # Callers are waiting and the loop is busy: they go first. The waiting
                # subscribers' events collect meanwhile and go out in fuller frames.
                asyncio.get_running_loop().call_later(BUSY_PAUSE_S, self._wake_chunk)
                return
        self._deferred_at = None
        for _ in range(min(WAKE_CHUNK, len(later), IN_FLIGHT - len(flight))):
            sink = later.popitem(last=False)[0]
            flight[sink] = 1
            sink.wake()
        self._pumping = False
        if later:
            self._pump()

    @staticmethod
    def _watched(item: Logged) -> tuple[str, str]:
        """(the workspace or user whose watchers re-check, and only this user's, if set)."""
        event = item.event
        if item.type == events_pb2.EVENT_TYPE_MEMBER_CHANGED:
            # Only the member concerned (all of them if the publisher did not say who).
            return item.workspace, event.member_changed.member.user
        if item.type == events_pb2.EVENT_TYPE_WORKSPACE_CHANGED:
            if event.workspace_changed.change in _ACCESS_CHANGES:
                return item.workspace, ""
            return "", ""
        if (
            item.type == events_pb2.EVENT_TYPE_SECURITY
            and event.security.kind in _ACCESS_SECURITY_KINDS
        ):
            return item.user, ""
        return "", ""


class EventBus:
    """Publisher, in-memory ring and fan-out over one log backend."""

    def __init__(
        self,
        backend: LogBackend,
        *,
        memory: int,
        outbox: Outbox | None = None,
        metrics: Metrics | None = None,
        hear_tokens: bool = True,
    ) -> None:
        """``hear_tokens``: whether other processes' tokens reach this one (a process
        that serves no WatchRun, Subscribe or A2A stream has no use for them)."""
        self._hear_tokens = hear_tokens
        # Its appends are spans when tracing is on (``platform/events/logspans.py``).
        self._backend = traced(backend)
        self.outbox = outbox
        #: ``switchboard_event_append_seconds`` (None: not recorded).
        self._append_seconds = metrics.event_append if metrics is not None else None
        self.ring = Ring(memory)
        self.fanout = Fanout()
        self._listeners: list[Listener] = []
        self._started = False
        #: This process's token numbering: ``epoch << TOKEN_EPOCH_BITS`` plus a count.
        self.token_epoch = secrets.randbelow(2**20) + 1
        self._tokens = self.token_epoch << TOKEN_EPOCH_BITS
        #: Sends tokens to the other processes sharing the log (None: one process).
        self.relay: Carry | None = None
        #: Tokens waiting for the logged event they follow (``_file``): that event's
        #: position, when to stop waiting, the tokens, and whether they are this process's.
        self._early: deque[tuple[Position, float, Sequence[events_pb2.Event], bool]] = deque()
        self._early_timer: asyncio.TimerHandle | None = None
        self._publishing: list[Callable[[Sequence[events_pb2.Event]], Awaitable[None]]] = []

    async def start(self) -> None:
        await self._backend.start(self._deliver_logged, self.ring)
        self.relay = self._backend.carry_tokens(self.heard if self._hear_tokens else None)
        self._started = True
        if self.outbox is not None:
            self.outbox.start(self._backend.append_many)

    async def redact(self, redaction: Redactor) -> int:
        """Redact the log and this process's window of it for an erasure
        (``platform/events/erasure/redaction.py``); how many stored events changed."""
        if self.outbox is not None:
            await self.outbox.redact(redaction.match)
        changed = await self._backend.redact(redaction)
        self.ring.redact(redaction)
        return changed

    async def close(self) -> None:
        if self._early_timer is not None:
            self._early_timer.cancel()
        await self._backend.close()
        if self.outbox is not None:
            await self.outbox.close()

    @property
    def state(self) -> LogState:
        return self._backend.state

    def on_state_change(self, callback: Callable[[LogState], None]) -> None:
        self._backend.on_state_change(callback)

    @property
    def held(self) -> int:
        """Events held in memory because the log is unreachable (Redis away)."""
        return self._backend.held

    @property
    def head(self) -> Position:
        """The newest position this process has delivered."""
        return self.ring.head()

    # -- publishing ----------------------------------------------------------------

    def on_publishing(self, hook: Callable[[Sequence[events_pb2.Event]], Awaitable[None]]) -> None:
        """Await ``hook(events)`` before this process appends events it publishes (their
        write has committed): what this process caches about what they change is dropped
        before the call that made the change returns (``CachedMemberships``)."""
        self._publishing.append(hook)

    async def _before_publishing(self, events: Sequence[events_pb2.Event]) -> None:
        for hook in self._publishing:
            try:
                await hook(events)
            except Exception:  # the events go out whatever a hook met; each keeps its own
                log.exception("a publishing hook failed")

    async def publish(self, event: events_pb2.Event) -> events_pb2.Event:
        """Stamp ``event`` (id, time) and append it to the log; returns the envelope.

        The cursor is set when the backend knows it at return (always on the
        embedded log; on Redis unless the event waits in the outbox).
        """
        stamp(event)
        if self._publishing:
            await self._before_publishing((event,))
        if self._append_seconds is None:
            return await self._backend.append(event)
        started = time.perf_counter()
        try:
            return await self._backend.append(event)
        finally:
            self._append_seconds.observe(time.perf_counter() - started)

    async def publish_many(self, events: Sequence[events_pb2.Event]) -> None:
        """``publish`` for several events, stored in this order and next to each other.

        One call instead of one per event: a run's updates reach the embedded
        log in one batch (one row insert, one commit) and Redis in one round trip.
        """
        for event in events:
            stamp(event)
        if self._publishing:
            await self._before_publishing(events)
        await self._append_many(events)

    async def _append_many(self, events: Sequence[events_pb2.Event]) -> None:
        if self._append_seconds is None:
            await self._backend.append_many(events)
            return
        started = time.perf_counter()
        try:
            await self._backend.append_many(events)
        finally:
            self._append_seconds.observe(time.perf_counter() - started)

    async def publish_staged(self, events: Sequence[events_pb2.Event]) -> None:
        """Publish events a write staged in its transaction (``platform/store/outbox.py``).

        Never raises: the write is committed, and an event the log did not
        take now is published by the outbox relay later. Events that have their
        cursor were logged in the write's own transaction, and delivered: passed by.
        """
        if self._publishing:
            # All of them, even those logged already in the write's own transaction.
            await self._before_publishing(events)
        events = [event for event in events if not event.cursor]
        outbox = self.outbox
        if outbox is not None:
            # Already being published here (a retry racing its first attempt).
            events = [event for event in events if event.id not in outbox.pending]
            outbox.publishing(events)
        if not events:
            return
        try:
            await self._append_many(events)
        except SwitchboardError:
            if outbox is None:
                raise
            outbox.failed(events)
            log.warning("staged events not published now; the outbox relay will")

    def announce(self, events: Sequence[events_pb2.Event], *, after: Position = ()) -> None:
        """Deliver ``events`` (a run's text deltas) now, without logging them.

        Tokens are needed while their run is live: they go to this process's ring
        (a resume within it replays them), its subscribers and listeners, and to
        the other processes sharing the log (``relay``), never to storage.
        ``after`` is the position of the run's last logged event: on Redis this process
        reads its own appends back, so that event may not be in its ring yet, and the
        tokens wait for it as heard ones do (``heard``). Synchronous: a run's publisher
        calls it once its earlier updates are logged.
        """
        for event in events:
            stamp(event)
        self._file(logged_part(after), events, own=True)

    async def follow(self, names: Iterable[str]) -> Callable[[], None]:
        """Hear the other processes' tokens of the conversations ``names`` name (a
        workspace or a user: of every conversation) until the function returned is
        called. A subscriber or a watcher of another process's run follows what it
        shows: no process hears the tokens of conversations nothing on it follows.

        A conversation followed anew is read back first (the tokens said before that this
        process had not heard, as many as Redis keeps): they are filed in the ring where
        they were said, so a replay or a watch begun now finds them, and no subscriber
        already past that point is sent them.
        """
        untail = await self.tail()
        if self.relay is None or not self._hear_tokens:
            return untail
        followed: list[str] = []
        try:
            for conversation in dict.fromkeys(_followed(name) for name in names):
                said = await self._backend.follow_tokens(conversation)
                followed.append(conversation)
                if said:
                    self._said_before(said)
        except BaseException:
            for conversation in followed:
                self._backend.unfollow_tokens(conversation)
            untail()
            raise

        def unfollow() -> None:
            while followed:
                self._backend.unfollow_tokens(followed.pop())
            untail()

        return unfollow

    async def tail(self) -> Callable[[], None]:
        """Read the whole log until the function returned is called: what serves a
        subscriber, follows another process's run, or feeds a leased feeder needs every
        event, in the ring and delivered. A process that needs none reads only the control
        events (``CONTROL_TYPES``, which every process's caches and open streams hear),
        so its cost does not grow with the events of conversations it does not serve.
        UNAVAILABLE if the log cannot be reached to begin."""
        await self._backend.tail()
        done = False

        def untail() -> None:
            nonlocal done
            if not done:
                done = True
                self._backend.untail()

        return untail

    async def newest(self) -> Position:
        """The newest logged position: this process's head while it reads the whole log,
        else the log's own (asking storage)."""
        if self._backend.tailing:
            return self.head
        return await self._backend.last_position()

    def _said_before(self, events: Sequence[events_pb2.Event]) -> None:
        """File tokens read back when their conversation was followed: after the logged
        event each was said after, where that is held (one older than the ring is gone
        with it); one after the head waits for its event like a token heard live."""
        ring = self.ring
        head, floor = logged_part(ring.head()), logged_part(ring.floor)
        filed: list[Logged] = []
        for event in events:
            base = _base(event.cursor)
            if not base or base < floor:
                continue
            if base > head:
                self.heard([event])
                continue
            self._tokens += 1
            filed.append(Logged((*base, self._tokens), event))
        if filed:
            ring.merge(filed)

    def heard(self, events: Sequence[events_pb2.Event]) -> None:
        """Tokens another process announced: delivered here as if announced here.

        They travel apart from the log (pub/sub), so they may arrive before the logged
        event their sender filed them after (their cursor says which).
        """
        if events:
            self._file(_base(events[0].cursor), events, own=False)

    def _file(self, base: Position, events: Sequence[events_pb2.Event], *, own: bool) -> None:
        """File tokens after ``base``, the logged event they follow. Filed before it, they
        would sit ahead of it in the ring, and a subscriber resuming from a cursor at or
        after it would never be sent them. So they wait for it (in order, behind any tokens
        already waiting), at most ``EARLY_TOKEN_WAIT_S``: a token is never held back
        longer than that for an event that may not come."""
        if not self._backend.tailing:
            # Nothing here follows the log, so nothing here shows a token: they go to the
            # processes that do, numbered after the event they follow.
            if own and self.relay is not None:
                for event in events:
                    self._tokens += 1
                    event.cursor = format_cursor((*base, self._tokens))
                self.relay(events)
            return
        if not self._early and base <= logged_part(self.ring.head()):
            self._deliver_tokens(events, own)
            return
        until = asyncio.get_running_loop().time() + EARLY_TOKEN_WAIT_S
        self._early.append((base, until, events, own))
        self._release_early()

    def _deliver_tokens(self, events: Sequence[events_pb2.Event], own: bool) -> None:
        self._announce(events)
        if own and self.relay is not None:
            # After filing: each event's cursor now names the logged event it follows.
            self.relay(events)

    def _deliver_logged(self, items: Sequence[Logged]) -> None:
        """The log's events, with the early tokens each was waited for right after it."""
        start = 0
        while self._early and start < len(items):
            base = self._early[0][0]
            cut = start
            while cut < len(items) and items[cut].position <= base:
                cut += 1
            if cut == len(items):
                break
            # items[cut] lies past what the first waiting tokens wait for: they go before it.
            if cut > start:
                self._deliver(items[start:cut])
            start = cut
            self._release_early(reached=base)
        if start < len(items):
            self._deliver(items[start:] if start else items)
        if self._early:
            self._release_early()

    def _release_early(self, reached: Position = ()) -> None:
        """Announce the waiting tokens, oldest first, whose event is here (or ``reached``
        is past it) or whose wait is over."""
        if self._early_timer is not None:
            self._early_timer.cancel()
            self._early_timer = None
        loop = asyncio.get_running_loop()
        head = max(logged_part(self.ring.head()), reached)
        while self._early:
            base, until, events, own = self._early[0]
            if base > head and until > loop.time():
                self._early_timer = loop.call_at(until, self._release_early)
                return
            self._early.popleft()
            self._deliver_tokens(events, own)

    def _announce(self, events: Sequence[events_pb2.Event]) -> None:
        base = logged_part(self.ring.head())
        items = []
        for event in events:
            self._tokens += 1
            items.append(Logged((*base, self._tokens), event))
        self._deliver(items)

    def own_token(self, position: Position) -> bool:
        """Whether ``position`` is a token this process delivered (in its epoch)."""
        return len(position) > 2 and position[2] >> TOKEN_EPOCH_BITS == self.token_epoch

    def _deliver(self, items: Sequence[Logged]) -> None:
        """Hand ``items`` to the ring, the subscribers and the listeners."""
        self.ring.append(items)
        self.fanout.deliver(items)
        for listener in list(self._listeners):
            for item in items:
                try:
                    listener(item.event)
                except Exception:  # a broken listener must not break delivery
                    log.exception("event listener failed")

    def listen(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` with every event delivered from now on; returns an unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def recent(self) -> list[events_pb2.Event]:
        """The events in the in-memory window, oldest first."""
        return [item.event for item in self.ring.items()]

    def recent_in(self, conversation: str) -> list[events_pb2.Event]:
        """The events of one conversation in the in-memory window, tokens included
        (announced or heard), oldest first."""
        return [item.event for item in self.ring.items() if item.conversation == conversation]

    # -- replay --------------------------------------------------------------------

    async def check_cursor(self, after: Position) -> None:
        """Raise OUT_OF_RANGE unless every event after ``after`` is still retained."""
        after = logged_part(after)
        horizon = await self._backend.horizon()
        oldest = format_cursor(horizon)
        if after < horizon:
            raise CursorExpired(
                f"the cursor is older than the retained log; resume after {oldest} "
                "(events in between are gone)",
                metadata={"oldest_cursor": oldest},
            )
        if after > logged_part(self.head) and after > await self._backend.last_position():
            raise CursorAhead(
                f"the cursor is ahead of the log (it comes from another deployment, or the "
                f"log was reset); resume after {format_cursor(self.head)}, or without a cursor",
                metadata={"oldest_cursor": oldest, "head_cursor": format_cursor(self.head)},
            )

    async def horizon(self) -> Position:
        """The oldest cursor a reader may resume after (everything newer is retained)."""
        return await self._backend.horizon()

    async def read(
        self, after: Position, upto: Position, limit: int, *, tokens: bool = False
    ) -> list[Logged]:
        """Logged events with ``after < position <= upto``, oldest first, at most ``limit``;
        with ``tokens``, the tokens this process still holds among them too (a live
        subscriber's replay; a token older than the ring is gone)."""
        if self.ring.covers(after):
            return self.ring.after(after, upto, limit, tokens=tokens)
        return await self._backend.read(logged_part(after), logged_part(upto), limit)
