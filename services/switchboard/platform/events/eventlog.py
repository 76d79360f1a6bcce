"""The event log: one total order of every event, with two backends.

Every event gets a *position* in the log, rendered to clients as an opaque
cursor (``"<major>-<minor>"``). Positions only grow, so "resume after cursor
c" means exactly "every event whose position is greater than c".

* ``LocalLog`` (embedded default, one process): positions are a sequence
  number. A group-commit writer stores each batch in the database *before* any
  subscriber sees it, so a cursor a client holds is never reused after a
  restart, and a restart does not lose recent history.
* ``RedisLog`` (scaled out): one Redis Stream is the log; positions are stream
  entry ids. Each process runs one ``XREAD BLOCK`` reader and fans out what it
  reads, so an event published through process A reaches subscribers on B, and
  every process sees the same order. It reads the whole log only while something
  on it needs every event (``tail``: a subscriber, a watch of another process's
  run, a leased feeder), else the control stream: the events of ``CONTROL_TYPES``,
  which every process's caches hear, appended there too under the same id.
  Appends go through a small Lua script that also remembers the event id for
  ``dedupe_window_s``, so a publish retried after an uncertain failure (a
  timeout while Redis was stopped) lands once.

**When Redis is unreachable** a process keeps serving: publishing never blocks
the publisher; events go to an in-memory outbox (bounded) and are appended to
the stream, in publish order, as soon as Redis answers again. They reach
subscribers only once they are in the stream, with a real position: delayed,
never lost while the process lives, never duplicated, never reordered for one
publisher. Replays within the process's in-memory window keep working during
the outage; older replays answer UNAVAILABLE. The outbox lives in memory: if
the process dies during an outage, its unflushed events are lost (documented in
docs/operations.md). Redis itself must persist the stream (``appendonly yes``
with ``appendfsync always``) for an acknowledged event to survive a Redis crash.

**On a Redis Cluster** (``redis+cluster://``) the log is still one stream, on the
master of its slot: its keys and token streams carry the stream's hash tag, and
every append is followed by ``WAIT 1`` so that an append is acknowledged (given
its cursor) only once a replica holds it; short of that it is held and appended
again, so a failover loses nothing acknowledged.

Both backends keep the newest events in memory (``Ring``) for fast replay, and
answer older replays from storage. Trimming is by count and by age; the
*horizon* is the newest trimmed position, and a cursor below it is OUT_OF_RANGE
because events after it are gone.

This module does not import grpc.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import datetime as dt
import itertools
import logging
import re
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Sequence
from functools import partial
from typing import Any, Final, Literal, Protocol

from google.protobuf.message import DecodeError
from redis.asyncio import RedisCluster
from redis.exceptions import NoScriptError, RedisClusterException, RedisError
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from switchboard.api.events.v1 import events_pb2
from switchboard.platform.background import FailureNotes, cancel_all
from switchboard.platform.cache import binary_client, hash_tag, is_cluster, redacted_url
from switchboard.platform.errors import DependencyUnavailable
from switchboard.platform.observe import telemetry
from switchboard.platform.resilience.backoff import Backoff
from switchboard.platform.store.db import Database, Group, after_commit, group_of, log_failure
from switchboard.platform.store.models import EventLogRow, EventLogStateRow, table_of
from switchboard.platform.store.outbox import Outbox, stamp
from switchboard.platform.store.prepared import Prepared
from switchboard.platform.values import names

log = logging.getLogger("switchboard.eventlog")
_UNREADABLE = FailureNotes(log)

#: ``(major, minor)`` of a logged event; ``(major, minor, k)`` of a token (``Logged.token``):
#: the k-th this process delivered after the logged position ``(major, minor)``, so it sorts
#: between that event and the next. ``k`` begins with the process's epoch (``TOKEN_EPOCH``).
Position = tuple[int, ...]
#: A stream's name or an entry id, as redis-py's stream commands type them.
_Key = bytes | str | memoryview
ORIGIN: Final[Position] = (0, 0)
LogState = Literal["ok", "degraded"]

_CURSOR_RE: Final = re.compile(r"([0-9]{1,20})-([0-9]{1,20})(?:-([0-9]{1,20}))?")
_MAX_U64: Final = 2**64 - 1
_REDIS_FAILURES: Final = (RedisError, RedisClusterException, OSError, TimeoutError)
_DB_FAILURES: Final = (SQLAlchemyError, OSError, TimeoutError)
#: Entries read per round while redacting (an erasure).
_REDACT_BATCH: Final = 500
#: Events written to the database in one transaction.
_WRITE_BATCH: Final = 1000
#: How often the retention trim runs, in events and in seconds.
_TRIM_EVERY_EVENTS: Final = 1000
_TRIM_EVERY_S: Final = 30.0
#: Every batch's insert, on the driver (``platform/store/prepared.py``): compiled once.
_INSERT_EVENTS: Final = Prepared(
    insert(table_of(EventLogRow)), columns=("seq", "data", "created_at"), name="event_log.insert"
)
#: ``Group.notes`` key: this group read back what a failed one may have committed.
_READ_BACK: Final = "eventlog.read_back"
#: ``Group.notes`` key: the first position a work of this group took.
_FIRST: Final = "eventlog.first"
#: Ids of events a readback found, kept for a publisher that logs them again.
_RECOVERED_MAX: Final = 10_000
#: Entries per XREAD / XRANGE / flush round trip.
_REDIS_PAGE: Final = 1000
#: How long one XREAD blocks server-side; the socket timeout adds the command timeout.
_BLOCK_S: Final = 2.0
#: Tokens waiting to be carried to the other processes before the oldest are given up.
_TOKEN_BACKLOG: Final = 100_000
#: Token batches a conversation's token stream keeps (about: ``MAXLEN ~``), so that a
#: process that begins to follow it mid-run reads what was said before.
_TOKEN_KEEP: Final = 1000
#: ... and the stream of every conversation's tokens, written while a process follows it.
_TOKEN_KEEP_ALL: Final = 10_000
#: A token stream nobody wrote to for this long is gone (Redis expires it).
_TOKEN_TTL_MS: Final = 600_000
#: How long one read of the followed token streams blocks: a conversation followed since
#: joins the next read (what it said meanwhile was read back when it was followed).
_TOKEN_BLOCK_S: Final = 0.25
#: How long a process goes on reading a conversation's tokens once nothing on it follows
#: the conversation: a client that resumes here soon finds them held.
TOKEN_LINGER_S: Final = 30.0
#: While a process follows every conversation's tokens, it says so this often (the key
#: that makes senders write the all-conversations stream lives three times as long).
_ALL_WANTED_EVERY_S: Final = 10.0
#: Token event ids remembered per process: a batch read twice (from a conversation's
#: stream and the all-conversations stream, or read back when followed again) is heard once.
_TOKEN_IDS: Final = 50_000
#: ``follow_tokens``' name for every conversation (a workspace or user is followed so).
EVERY_CONVERSATION: Final = ""
#: Events every process hears, whatever it serves: what they change is cached in every
#: process (sessions and API keys, roles, assistants, integrations and experts) or
#: changes who may see an open stream. On Redis they also go on the control stream,
#: which a process that does not read the whole log reads instead (``RedisLog.tail``).
CONTROL_TYPES: Final = frozenset(
    {
        events_pb2.EVENT_TYPE_WORKSPACE_CHANGED,
        events_pb2.EVENT_TYPE_MEMBER_CHANGED,
        events_pb2.EVENT_TYPE_INTEGRATION_CHANGED,
        events_pb2.EVENT_TYPE_SECURITY,
        events_pb2.EVENT_TYPE_ASSISTANT_CHANGED,
    }
)
#: How long one read of the control stream blocks: a process that begins to read the
#: whole log stops reading it within this.
_CONTROL_BLOCK_S: Final = 0.1
#: At least this long a subscriber waits for its process to begin reading the whole log
#: (Redis away, or a cluster's failover) before it is told to retry.
_TAIL_START_S: Final = 10.0
#: How long a process goes on reading the whole log once nothing on it needs it.
TAIL_LINGER_S: Final = 30.0


def format_cursor(position: Position) -> str:
    return "-".join(str(part) for part in position)


def parse_cursor(text: str) -> Position | None:
    """The position a cursor denotes, or None if it is not one."""
    match = _CURSOR_RE.fullmatch(text)
    if match is None:
        return None
    parts = tuple(int(group) for group in match.groups() if group is not None)
    if any(part > _MAX_U64 for part in parts):
        return None
    return parts


def logged_part(position: Position) -> Position:
    """The logged position at or before ``position`` (a token's is the event before it)."""
    return position[:2]


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def length_delimited(field_number: int, payload: bytes) -> bytes:
    """One protobuf length-delimited field (a message, bytes or string), on the wire."""
    return _varint(field_number << 3 | 2) + _varint(len(payload)) + payload


class Logged:
    """One event as this process holds it: parsed once and serialized once.

    ``item`` is the event already framed as an element of ``EventBatch.events``,
    so a batch for any number of subscribers is a byte concatenation.
    """

    __slots__ = (
        "_frame",
        "conversation",
        "cursor",
        "data",
        "event",
        "item",
        "position",
        "token",
        "type",
        "user",
        "workspace",
    )

    def __init__(self, position: Position, event: events_pb2.Event) -> None:
        self.position = position
        #: Not in the log: a run's text delta, delivered live and kept in the ring only.
        self.token = len(position) > 2
        self.cursor = format_cursor(position)
        event.cursor = self.cursor
        self.event = event
        self.type = event.type
        self.user = event.user
        self.workspace = event.workspace
        self.conversation = event.conversation
        self.data = event.SerializeToString()
        self.item = length_delimited(1, self.data)
        self._frame: bytes | None = None

    @classmethod
    def parse(cls, position: Position, data: bytes) -> Logged:
        return cls(position, events_pb2.Event.FromString(data))

    def frame(self) -> bytes:
        """``SubscribeResponse{batch: {events: [this], cursor}}``, built once for everyone."""
        if self._frame is None:
            self._frame = length_delimited(1, self.batch_alone())
        return self._frame

    def batch_alone(self) -> bytes:
        return self.item + length_delimited(2, self.cursor.encode())


def batch_payload(items: Sequence[Logged]) -> bytes:
    """``EventBatch`` wire bytes for ``items`` (in log order), resuming after the last."""
    if len(items) == 1:
        return items[0].batch_alone()
    parts = [item.item for item in items]
    parts.append(length_delimited(2, items[-1].cursor.encode()))
    return b"".join(parts)


class Ring:
    """The newest events, contiguous: it holds every logged event after ``floor``."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._items: list[Logged] = []
        self._positions: list[Position] = []
        self.floor: Position = ORIGIN
        self.known = True

    def reset(self, items: Sequence[Logged], floor: Position, *, known: bool = True) -> None:
        """Replace the contents; ``known=False`` means "the log's state is unknown yet"
        (Redis unreachable at start): nothing is served from memory until it is."""
        self._items = list(items)
        self._positions = [item.position for item in items]
        self.floor = floor
        self.known = known

    def head(self) -> Position:
        """The newest position held, or the floor when empty."""
        return self._positions[-1] if self._positions else self.floor

    def append(self, items: Sequence[Logged]) -> None:
        self._items.extend(items)
        self._positions.extend(item.position for item in items)
        # Trim in chunks so appends stay amortized O(1).
        excess = len(self._items) - self._capacity
        if excess >= max(1, self._capacity // 4):
            self.floor = self._positions[excess - 1]
            del self._items[:excess]
            del self._positions[:excess]

    def merge(self, items: Sequence[Logged]) -> None:
        """Add ``items`` (each past ``floor`` and not after ``head()``, none held yet)
        where their positions fall among what is held."""
        merged = sorted([*self._items, *items], key=lambda item: item.position)
        self._items = merged
        self._positions = [item.position for item in merged]
        self.append(())

    def covers(self, after: Position) -> bool:
        return self.known and after >= self.floor

    def after(
        self, after: Position, upto: Position, limit: int, *, tokens: bool = True
    ) -> list[Logged]:
        """Held items with ``after < position <= upto``, at most ``limit``; without
        ``tokens``, the logged ones only (as the log itself would answer)."""
        start = bisect.bisect_right(self._positions, after)
        end = bisect.bisect_right(self._positions, upto, lo=start)
        if tokens:
            return self._items[start : min(end, start + limit)]
        found: list[Logged] = []
        for item in itertools.islice(self._items, start, end):
            if not item.token:
                found.append(item)
                if len(found) == limit:
                    break
        return found

    def items(self) -> list[Logged]:
        return list(self._items)

    def redact(self, redaction: Redactor) -> int:
        """Replace the held events ``redaction`` matches (an erasure: docs/privacy.md)."""
        changed = 0
        for i, item in enumerate(self._items):
            replacement = redaction.match(item.event, item.data)
            if replacement is not None:
                self._items[i] = Logged(item.position, replacement)
                changed += 1
        return changed


class Redactor(Protocol):
    """What an erasure redacts (``platform/events/erasure/redaction.py``): the event to
    store instead of ``event`` (whose bytes are ``data``), or None to keep it."""

    def match(
        self, event: events_pb2.Event, data: bytes | None = None
    ) -> events_pb2.Event | None: ...


Deliver = Callable[[Sequence[Logged]], None]
#: Tokens handed between processes (``LogBackend.carry_tokens``).
Carry = Callable[[Sequence[events_pb2.Event]], None]


class LogBackend(Protocol):
    @property
    def state(self) -> LogState: ...

    async def start(self, deliver: Deliver, ring: Ring) -> Position:
        """Load the newest events into ``ring``; return the head. ``deliver`` gets new ones."""
        ...

    async def append(self, event: events_pb2.Event) -> events_pb2.Event:
        """Add ``event`` (stamped) to the log; returns it, with its cursor once it has one."""
        ...

    async def append_many(self, events: Sequence[events_pb2.Event]) -> None:
        """Add ``events`` (stamped) to the log in this order, adjacent to each other."""
        ...

    async def read(self, after: Position, upto: Position, limit: int) -> list[Logged]:
        """Stored events with ``after < position <= upto``, oldest first."""
        ...

    async def horizon(self) -> Position:
        """The newest trimmed position: cursors below it are out of range."""
        ...

    async def redact(self, redaction: Redactor) -> int:
        """Redact the stored events ``redaction`` matches (an erasure); how many."""
        ...

    async def last_position(self) -> Position:
        """The newest position in the log (asking storage, not this process's view)."""
        ...

    def on_state_change(self, callback: Callable[[LogState], None]) -> None: ...

    def carry_tokens(self, heard: Carry | None) -> Carry | None:
        """How tokens reach the other processes sharing this log: the function that
        sends them (``heard`` is called with the conversations' this process follows;
        None: this process never listens), or None for one process."""
        ...

    async def follow_tokens(self, conversation: str) -> list[events_pb2.Event]:
        """Hear the other processes' tokens of ``conversation`` (``EVERY_CONVERSATION``:
        all) until as many ``unfollow_tokens``; returns those said before that this
        process had not heard (as many as are kept), oldest first."""
        ...

    def unfollow_tokens(self, conversation: str) -> None: ...

    @property
    def tailing(self) -> bool:
        """Whether this process reads (and its ring holds) the whole log now."""
        ...

    async def tail(self) -> None:
        """Read the whole log until as many ``untail``: a subscriber, a watcher of another
        process's run or a leased feeder needs it. Returns once the ring holds the
        newest events and every event after them will be delivered."""
        ...

    def untail(self) -> None: ...

    @property
    def held(self) -> int:
        """Events held in memory while the log is unreachable (its outbox)."""
        ...

    async def close(self) -> None: ...


# ---------------------------------------------------------------------------------
# Embedded: the database is the log.


class LocalLog:
    """The one-process log: a group-commit writer into the database, then delivery."""

    def __init__(
        self,
        database: Database,
        *,
        retention: int,
        retention_s: int,
        memory: int,
        outbox: Outbox | None = None,
    ) -> None:
        self._database = database
        self._outbox = outbox
        self._retention = retention
        self._retention_s = retention_s
        self._memory = memory
        self._pending: list[tuple[events_pb2.Event, asyncio.Future[events_pb2.Event]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._deliver: Deliver = _nowhere
        #: The newest position delivered.
        self._head = 0
        #: The newest position given to a row, committed or not (``_write_rows``): never
        #: given twice in this process, so a position is never reused; one rolled back
        #: is a gap nobody saw.
        self._allocated = 0
        self._horizon = 0
        self._since_trim = 0
        self._last_trim = time.monotonic()
        self._closed = False
        #: A write failed without saying whether it committed (a timeout, a connection
        #: lost at COMMIT): the next write first reads what the log holds past the head
        #: this process knows, so it neither reuses a position nor logs an event twice.
        self._uncertain = False
        #: Event id -> cursor of the events such a readback found: a publisher that
        #: retries them learns their cursor and does not log them twice.
        self._recovered: dict[str, str] = {}
        if database.group_commit:
            # A failed group may have committed (its thread outlived the wait): the
            # next write reads back what it did, whoever's write it was.
            database.on_group_failure(self._group_failed)
            if outbox is not None:
                # A change's events go to the log in the change's own transaction.
                outbox.inline = self

    @property
    def state(self) -> LogState:
        return "ok"

    def on_state_change(self, callback: Callable[[LogState], None]) -> None:
        return None  # the database is not optional: it never degrades to memory

    @property
    def held(self) -> int:
        return 0  # nothing waits in memory: a write that fails fails its publisher

    async def start(self, deliver: Deliver, ring: Ring) -> Position:
        self._deliver = deliver
        async with self._bounded(3), self._database.readers() as session:
            horizon = await session.scalar(
                select(EventLogStateRow.horizon).where(EventLogStateRow.id == 1)
            )
            head = await session.scalar(select(func.max(EventLogRow.seq)))
            rows = (
                await session.execute(
                    select(EventLogRow.seq, EventLogRow.data)
                    .order_by(EventLogRow.seq.desc())
                    .limit(self._memory + 1)
                )
            ).all()
        self._horizon = int(horizon or 0)
        self._head = max(int(head or 0), self._horizon)
        self._allocated = self._head
        rows = list(reversed(rows))
        floor = (self._horizon, 0)
        if len(rows) > self._memory:
            floor = (max(self._horizon, rows[0].seq), 0)
            rows = rows[1:]
        ring.reset([Logged.parse((row.seq, 0), row.data) for row in rows], floor)
        return self._head, 0

    async def append(self, event: events_pb2.Event) -> events_pb2.Event:
        if self._closed:
            raise DependencyUnavailable("the event log is closed")
        (future,) = self._enqueue([event])
        # Shielded: a publisher that gives up waiting does not unpublish; the
        # writer still stores and delivers the event.
        return await asyncio.shield(future)

    async def append_many(self, events: Sequence[events_pb2.Event]) -> None:
        if self._closed:
            raise DependencyUnavailable("the event log is closed")
        # Queued together, so the writer usually stores them in one insert and commit.
        await asyncio.shield(asyncio.gather(*self._enqueue(events)))

    def _enqueue(
        self, events: Sequence[events_pb2.Event]
    ) -> list[asyncio.Future[events_pb2.Event]]:
        """Queue ``events`` for the writer (started if idle); a future for each."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[events_pb2.Event]] = []
        for event in events:
            future: asyncio.Future[events_pb2.Event] = loop.create_future()
            self._pending.append((event, future))
            futures.append(future)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(
                self._write_loop(),
                name="eventlog-writer",
                # It writes for every publisher: its transactions are not the
                # trace of the call that happened to start it.
                context=None if telemetry.installed() is None else telemetry.untraced(),
            )
        return futures

    def log_in(self, session: Session, events: Sequence[events_pb2.Event]) -> bool:
        """Log ``events`` (stamped) in ``session``'s transaction, the change's own:
        delivered once it committed, never if it rolls back (``Group``).

        False, with nothing done, outside a group commit (PostgreSQL, in-memory
        SQLite) or once closed: the caller stages them in the outbox instead.
        """
        group = group_of(session)
        if group is None or self._closed:
            return False
        for event in events:
            stamp(event)
        logged = self._write_rows(session, group, events, names.now())
        if logged:
            after_commit(session, partial(self._landed, logged))
        return True

    def _group_failed(self) -> None:
        self._uncertain = True

    def _landed(self, logged: list[Logged]) -> None:
        """Committed: deliver (on the loop, in commit order, before the writers resume)."""
        self._head = logged[-1].position[0]
        self._deliver(logged)

    def _write_rows(
        self, session: Session, group: Group, events: Sequence[events_pb2.Event], now: dt.datetime
    ) -> list[Logged]:
        """Give ``events`` the next positions and insert them, in a group commit's work.

        Positions are given in the order the works run, and one group commits at
        a time in that order (SQLite has one writer, and the group holds the write
        lock from its first statement to its COMMIT): position order is commit
        order, and the group's callbacks deliver in it.
        """
        # Begun before a position is taken: the write lock is held from here on.
        connection = session.connection()
        if self._uncertain and _READ_BACK not in group.notes:
            group.notes[_READ_BACK] = True
            # Below the positions an earlier work of this group took: those are this
            # transaction's own, delivered by their work.
            landed = self._landed_after(session, before=group.notes.get(_FIRST))
            if landed:
                self._allocated = max(self._allocated, landed[-1].position[0])
                recovered = self._recovered
                for item in landed:
                    recovered[item.event.id] = item.cursor
                while len(recovered) > _RECOVERED_MAX:
                    del recovered[next(iter(recovered))]
            # The group's, not this work's: delivered even if this work rolls back, and
            # first: what it found lies below every position this group took.
            group.after.insert(0, partial(self._read_back, landed))
        recovered = self._recovered
        if recovered:
            # A write retried after it failed uncertainly: what it did commit stays
            # where it was logged, and its writer learns the cursor.
            kept = []
            for event in events:
                cursor = recovered.pop(event.id, None)
                if cursor is None:
                    kept.append(event)
                else:
                    event.cursor = cursor
            events = kept
        if not events:
            return []
        first = self._allocated + 1
        group.notes.setdefault(_FIRST, first)
        logged = [Logged((first + i, 0), event) for i, event in enumerate(events)]
        self._allocated = logged[-1].position[0]
        _INSERT_EVENTS.execute_many(
            connection,
            [{"seq": item.position[0], "data": item.data, "created_at": now} for item in logged],
        )
        self._since_trim += len(logged)
        if self._trim_due():
            self._since_trim = 0
            self._last_trim = time.monotonic()
            cut = self._trim(session, self._allocated, now)
            if cut is not None:
                after_commit(session, partial(self._trimmed, cut))
        return logged

    def _read_back(self, landed: list[Logged]) -> None:
        self._uncertain = False
        if landed:
            self._landed(landed)

    def _trimmed(self, horizon: int) -> None:
        self._horizon = max(self._horizon, horizon)

    def _trim_due(self) -> bool:
        return (
            self._since_trim >= _TRIM_EVERY_EVENTS
            or time.monotonic() - self._last_trim >= _TRIM_EVERY_S
        )

    async def _write_loop(self) -> None:
        while self._pending:
            batch = self._pending[:_WRITE_BATCH]
            del self._pending[:_WRITE_BATCH]
            now = names.now()
            try:
                logged, delivered = await self._store([event for event, _ in batch], now)
            except _DB_FAILURES as exc:
                if not self._database.group_commit:
                    # (In a group commit, the database said so when the group failed.)
                    self._uncertain = True
                log.error("event log write failed", extra={"error": type(exc).__name__})  # noqa: TRY400 - no stack for an outage
                for _, future in batch:
                    if not future.done():
                        future.set_exception(
                            DependencyUnavailable("the event log is unavailable; retry")
                        )
                continue
            if logged and not delivered:
                self._head = logged[-1].position[0]
                self._deliver(logged)
            # An event left out was logged before (an outbox event published twice).
            for event, future in batch:
                if not future.done():
                    future.set_result(event)

    async def _store(
        self, events: list[events_pb2.Event], now: dt.datetime
    ) -> tuple[list[Logged], bool]:
        """Store ``events`` in one transaction; the ones stored, with their positions,
        and whether the group commit delivered them already."""
        outbox = self._outbox
        retired: list[str] = []
        logged: list[Logged] = []
        grouped = False
        if not self._database.group_commit:
            self._since_trim += len(events)  # in a group commit, ``_write_rows`` counts
        trim = self._trim_due()
        uncertain = self._uncertain

        def write(session: Session) -> int | None:
            nonlocal grouped
            kept: Sequence[events_pb2.Event] = events
            group = group_of(session)
            landed: list[Logged] = []
            if group is None and uncertain:
                # What an earlier write that failed uncertainly did commit: delivered
                # now (nobody heard of it), and not logged again if it is here again.
                # (In a group commit ``_write_rows`` reads back, whoever's write it was.)
                landed, kept = self._read_back_here(session, events)
            if outbox is not None:
                # In the same transaction: an outbox event is logged only by the
                # transaction that deletes its row, so exactly once, however many
                # publishers (a request, its retries, a relay) race to log it.
                kept, retired[:] = outbox.retire_in(session, kept)
            if group is not None:
                grouped = True
                logged[:] = self._write_rows(session, group, kept, now)
                if logged:
                    after_commit(session, partial(self._landed, list(logged)))
                return None
            first = max(self._allocated, landed[-1].position[0] if landed else 0) + 1
            logged[:] = [*landed, *(Logged((first + i, 0), e) for i, e in enumerate(kept))]
            if len(logged) == len(landed):
                return None
            self._allocated = logged[-1].position[0]
            rows = [
                {"seq": i.position[0], "data": i.data, "created_at": now}
                for i in logged[len(landed) :]
            ]
            _INSERT_EVENTS.execute_many(session, rows)
            return self._trim(session, logged[-1].position[0], now) if trim else None

        # No timer of its own around the write: the database gives up on work that
        # it has itself spent too long on (``Database.run``), never on a write that
        # merely waited its turn behind others or for a busy event loop.
        horizon = await self._database.run(write, write=True)
        if not grouped:
            self._uncertain = False
            if horizon is not None:
                # Only once the trim is committed.
                self._horizon = horizon
            if trim:
                self._since_trim = 0
                self._last_trim = time.monotonic()
        if outbox is not None and retired:
            outbox.retired(retired)
        return logged, grouped

    def _read_back_here(
        self, session: Session, events: Sequence[events_pb2.Event]
    ) -> tuple[list[Logged], list[events_pb2.Event]]:
        """(What the log holds past the head, the ``events`` not among it)."""
        landed = self._landed_after(session)
        if not landed:
            return [], list(events)
        cursors = {item.event.id: item.cursor for item in landed}
        kept = []
        for event in events:
            if event.id in cursors:
                event.cursor = cursors[event.id]  # its publisher's, as logged
            else:
                kept.append(event)
        return landed, kept

    def _landed_after(self, session: Session, *, before: int | None = None) -> list[Logged]:
        """The events stored past this process's head (in ``session``): an earlier
        write's, which failed in a way that did not say whether it committed."""
        query = select(EventLogRow.seq, EventLogRow.data).where(EventLogRow.seq > self._head)
        if before is not None:
            query = query.where(EventLogRow.seq < before)
        rows = session.execute(query.order_by(EventLogRow.seq)).all()
        return [Logged.parse((row.seq, 0), row.data) for row in rows]

    def _trim(self, session: Session, head: int, now: dt.datetime) -> int | None:
        """Trim in ``session``; the new horizon, or None if nothing was trimmed."""
        cut = head - self._retention
        too_old = session.scalar(
            select(func.max(EventLogRow.seq)).where(
                EventLogRow.created_at < now - dt.timedelta(seconds=self._retention_s)
            )
        )
        cut = max(cut, int(too_old or 0))
        if cut <= self._horizon:
            return None
        session.execute(delete(EventLogRow).where(EventLogRow.seq <= cut))
        state = session.get(EventLogStateRow, 1)
        if state is None:
            session.add(EventLogStateRow(id=1, horizon=cut))
        else:
            state.horizon = cut
        return cut

    async def read(self, after: Position, upto: Position, limit: int) -> list[Logged]:
        try:
            async with self._bounded(1), self._database.readers() as session:
                rows = (
                    await session.execute(
                        select(EventLogRow.seq, EventLogRow.data)
                        .where(EventLogRow.seq > after[0], EventLogRow.seq <= upto[0])
                        .order_by(EventLogRow.seq)
                        .limit(limit)
                    )
                ).all()
        except _DB_FAILURES as exc:
            log_failure(log, "event log read failed", exc)
            raise DependencyUnavailable("the event log is unavailable; retry") from None
        return [Logged.parse((row.seq, 0), row.data) for row in rows]

    async def horizon(self) -> Position:
        return self._horizon, 0

    async def last_position(self) -> Position:
        return self._head, 0

    async def redact(self, redaction: Redactor) -> int:
        """Rewrite, in place, the rows whose events ``redaction`` matches: a redacted
        event keeps its sequence, so every cursor holds."""
        changed = 0
        after = -1
        while True:

            def work(session: Session, after: int = after) -> tuple[int, int | None]:
                rows = session.execute(
                    select(EventLogRow.seq, EventLogRow.data)
                    .where(EventLogRow.seq > after)
                    .order_by(EventLogRow.seq)
                    .limit(_REDACT_BATCH)
                ).all()
                done = 0
                for seq, data in rows:
                    replacement = redaction.match(events_pb2.Event.FromString(data), data)
                    if replacement is not None:
                        session.execute(
                            update(EventLogRow)
                            .where(EventLogRow.seq == seq)
                            .values(data=replacement.SerializeToString())
                        )
                        done += 1
                return done, (rows[-1][0] if len(rows) == _REDACT_BATCH else None)

            try:
                done, last = await self._database.run(work, write=True)
            except _DB_FAILURES as exc:
                log_failure(log, "event log redaction failed", exc)
                raise DependencyUnavailable("the event log is unavailable; retry") from None
            changed += done
            if last is None:
                return changed
            after = last

    @contextlib.asynccontextmanager
    async def _bounded(self, statements: int) -> AsyncIterator[None]:
        """A whole read's bound: as long as its parts (a pooled connection, then each
        statement) may each take by the database's own bounds. One ``timeout_s`` for
        the whole failed the start of a log on a saturated host (a CI run's setup)
        while no part had overrun its own."""
        bound = self._database.timeout_s * (statements + 1)
        scope = asyncio.timeout(bound)
        try:
            async with scope:
                yield
        except TimeoutError:
            if scope.expired():
                raise TimeoutError(
                    f"the event log's database did not answer within {bound:g}s"
                ) from None
            raise

    def carry_tokens(self, heard: Carry | None) -> Carry | None:
        return None  # one process: nobody else to tell

    async def follow_tokens(self, conversation: str) -> list[events_pb2.Event]:
        return []  # one process: every token is its own

    def unfollow_tokens(self, conversation: str) -> None:
        return None

    @property
    def tailing(self) -> bool:
        return True  # one process: it writes, and so delivers, every event

    async def tail(self) -> None:
        return None

    def untail(self) -> None:
        return None

    async def close(self) -> None:
        self._closed = True
        writer = self._writer
        if writer is not None and not writer.done():
            # Let the writer store what was already accepted.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(writer), self._database.timeout_s * 2)


def _nowhere(items: Sequence[Logged]) -> None:
    return None


def _nobody(events: Sequence[events_pb2.Event]) -> None:
    return None


# ---------------------------------------------------------------------------------
# Scaled out: one Redis Stream is the log.

# Shared by both scripts: drop every entry up to and including ``cut`` and
# record it as the horizon (Redis's own trimming does not record what it
# dropped: ``max-deleted-entry-id`` only follows XDEL).
_TRIM_THROUGH: Final = """
local function newer(a, b)
  local ams, aseq = string.match(a, '(%d+)-(%d+)')
  local bms, bseq = string.match(b, '(%d+)-(%d+)')
  if tonumber(ams) ~= tonumber(bms) then return tonumber(ams) > tonumber(bms) end
  return tonumber(aseq) > tonumber(bseq)
end
local function trim_through(stream, horizon_key, cut)
  local ms, seq = string.match(cut, '(%d+)-(%d+)')
  redis.call('XTRIM', stream, 'MINID', ms .. '-' .. (tonumber(seq) + 1))
  local previous = redis.call('GET', horizon_key)
  if (not previous) or newer(cut, previous) then
    redis.call('SET', horizon_key, cut)
  end
end
"""

# Append once per event id: SET NX remembers the id for the dedupe window, and
# only a first sighting is added. Atomic, so a retry racing the original cannot
# slip between the check and the add. Trimming by count happens here too, in
# steps of ARGV[4] entries, so the horizon is always exact.
# A sighting again still writes (the dedupe key's expiry): on a cluster the WAIT
# after a retry then covers the master's stream up to now, the original append
# included, not only a connection that wrote nothing.
# An event of ``CONTROL_TYPES`` (ARGV[5] '1') goes on the control stream too, under the
# same id, so a process that reads it instead of the log knows where in the log it is.
# KEYS: stream, dedupe key, horizon key, control stream. ARGV: dedupe ms, retention,
# data, step, control.
_APPEND_SCRIPT: Final = (
    _TRIM_THROUGH
    + """
if not redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[1]) then
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
  return false
end
local id = redis.call('XADD', KEYS[1], '*', 'e', ARGV[3])
if ARGV[5] == '1' then
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[2], id, 'e', ARGV[3])
end
local excess = redis.call('XLEN', KEYS[1]) - tonumber(ARGV[2])
if excess >= tonumber(ARGV[4]) then
  local oldest = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', excess)
  trim_through(KEYS[1], KEYS[3], oldest[#oldest][1])
end
return id
"""
)

# Trimming by age. KEYS: stream, horizon key, control stream. ARGV: the oldest id to keep.
_AGE_TRIM_SCRIPT: Final = (
    _TRIM_THROUGH
    + """
redis.call('XTRIM', KEYS[3], 'MINID', ARGV[1])
local expired = redis.call('XREVRANGE', KEYS[1], '(' .. ARGV[1], '-', 'COUNT', 1)
if #expired == 0 then
  return 0
end
trim_through(KEYS[1], KEYS[2], expired[1][1])
return 1
"""
)


class NotReplicatedError(RedisError):
    """On a cluster, no replica acknowledged an append in time (``WAIT``)."""


# Tokens: each conversation's batches on a stream of its own, kept short and expiring, so a
# process reads only the conversations it follows, and one that begins to follow mid-run
# reads back what was said. While some process follows every conversation (a workspace's
# or a user's subscriber: ``KEYS[2]`` exists), the batches go on the all-conversations
# stream too. One script, one round trip, per batch a sender carries.
# KEYS: the all-conversations stream, its wanted key, then one stream per conversation.
# ARGV: ttl ms, keep, keep all, origin, then each conversation's batch (an EventBatch's
# bytes: their concatenation is the whole batch).
_TOKENS_SCRIPT: Final = """
for i = 3, #KEYS do
  redis.call('XADD', KEYS[i], 'MAXLEN', '~', ARGV[2], '*', 'o', ARGV[4], 'b', ARGV[i + 2])
  redis.call('PEXPIRE', KEYS[i], ARGV[1])
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  local whole = table.concat(ARGV, '', 5)
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'o', ARGV[4], 'b', whole)
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return #KEYS - 2
"""


def _entries(entries: Any) -> list[Logged]:
    """Stream entries ``[(id, {b"e": data}), ...]`` as logged events.

    An entry that is not one of ours (no event, or bytes that do not decode: written
    by something else with access to the stream) is skipped and said once: it must
    not stop the reader, which every subscriber of this process depends on.
    """
    logged: list[Logged] = []
    for entry_id, fields in entries or ():
        try:
            logged.append(Logged.parse(_position(entry_id), fields[b"e"]))
        except (DecodeError, KeyError, TypeError, ValueError) as exc:
            _UNREADABLE.failed("an event log entry that is not an event was skipped", exc)
    return logged


def _streams(reads: dict[str, str]) -> dict[_Key, int | _Key]:
    """``reads`` as redis-py's XREAD types its streams."""
    return {stream: after for stream, after in reads.items()}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _last_id(entries: Any) -> Position | None:
    """The id of the last of ``entries`` (read or skipped): where the next read starts."""
    last = None
    for entry_id, _ in entries or ():
        last = entry_id
    return None if last is None else _position(last)


def _position(entry_id: Any) -> Position:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    major, _, minor = text.partition("-")
    return int(major), int(minor or 0)


class RedisLog:
    """The shared log on a Redis Stream; see the module docstring."""

    def __init__(
        self,
        redis_url: str,
        *,
        key: str,
        timeout_s: float,
        retention: int,
        retention_s: int,
        memory: int,
        outbox_limit: int,
        dedupe_window_s: int,
        outbox: Outbox | None = None,
    ) -> None:
        self._target = redacted_url(redis_url)
        # The database outbox (events staged with their change), not ``_outbox``.
        self._staged = outbox
        #: On a cluster every key and channel of the log shares the stream's hash tag
        #: (the configured name in braces): one slot, so the append script and its
        #: dedupe key, the horizon and the pipelines all run on one master.
        self._cluster = is_cluster(redis_url)
        key = hash_tag(key) if self._cluster else key
        self._key = key
        self._timeout_s = timeout_s
        self._retention = retention
        self._retention_s = retention_s
        self._memory = memory
        self._outbox_limit = outbox_limit
        self._dedupe_ms = dedupe_window_s * 1000
        self._outbox: deque[events_pb2.Event] = deque()
        self._deliver: Deliver = _nowhere
        self._ring: Ring | None = None
        # The last entry read of the whole log (None: not reading it; see ``tail``).
        self._last_id: Position | None = None
        self._horizon: Position = ORIGIN
        self._down_since: float | None = None
        self._callbacks: list[Callable[[LogState], None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False
        #: Unforeseen failures of the background loops, each cause logged once.
        self._notes = FailureNotes(log)
        self._client = binary_client(redis_url, timeout_s=timeout_s, max_connections=32)
        # XREAD BLOCK holds its connection; its socket may wait for the block too.
        self._reader_client = binary_client(
            redis_url, timeout_s=timeout_s, max_connections=1, socket_timeout_s=_BLOCK_S + timeout_s
        )
        # Tokens: the followed streams' blocking read holds a connection of its own.
        self._token_client = binary_client(
            redis_url,
            timeout_s=timeout_s,
            max_connections=1,
            socket_timeout_s=_TOKEN_BLOCK_S + timeout_s,
        )
        self._init_tokens(key)
        self._append = self._client.register_script(_APPEND_SCRIPT)
        # WAIT's own bound, inside the append's (2 x timeout_s on a cluster).
        self._wait_ms = max(1, int(self._timeout_s * 1000))
        self._age_trim = self._client.register_script(_AGE_TRIM_SCRIPT)
        self._horizon_key = f"{key}:horizon"
        self._control_key = f"{key}:control"
        #: Whether the reader reads the whole log (else the control stream), how many
        #: need it to, and until when it goes on once none does.
        self._tailing = False
        self._tails = 0
        self._tail_until = 0.0
        self.tail_linger_s = TAIL_LINGER_S
        #: Resolved once the reader reads the whole log (``tail``).
        self._tail_started: asyncio.Future[None] | None = None
        #: The newest position the control stream was read to (None: not known yet).
        self._control_last: Position | None = None
        # Trim in steps of about 1% of retention: one XRANGE + XTRIM per step.
        self._trim_step = max(1, retention // 100)

    def _init_tokens(self, key: str) -> None:
        """The tokens' side of ``__init__`` (``carry_tokens``)."""
        self._tokens_key = f"{key}:tokens"
        self._all_wanted_key = f"{key}:tokens:every"
        # Tells this process's own token batches from the others' (it may follow its own).
        self._origin = secrets.token_bytes(8)
        self._token_queue: list[events_pb2.Event] = []
        self._token_sender: asyncio.Task[None] | None = None
        self._send_tokens_script = self._client.register_script(_TOKENS_SCRIPT)
        self._heard: Carry = _nobody
        self._hearing = False
        self.token_linger_s = TOKEN_LINGER_S
        #: Conversations followed (``EVERY_CONVERSATION``: all), and by how many.
        self._follows: dict[str, int] = {}
        #: Conversations no longer followed, still read until then (monotonic time).
        self._lingering: dict[str, float] = {}
        #: The read-back of a conversation being followed anew (a second follower waits on it).
        self._backfills: dict[str, asyncio.Future[None]] = {}
        #: Each token stream's last entry read (the next read starts after it).
        self._token_last: OrderedDict[str, str] = OrderedDict()
        #: Token event ids heard lately: a batch read twice is heard once.
        self._token_ids: OrderedDict[str, None] = OrderedDict()
        self._follows_changed = asyncio.Event()
        self._all_said_at = 0.0

    @property
    def state(self) -> LogState:
        return "degraded" if self._down_since is not None else "ok"

    def on_state_change(self, callback: Callable[[LogState], None]) -> None:
        self._callbacks.append(callback)

    @property
    def held(self) -> int:
        return len(self._outbox)

    async def start(self, deliver: Deliver, ring: Ring) -> Position:
        """Start reading the control stream from the log's head (the whole log is read
        once something needs it: ``tail``); an unreachable Redis starts degraded, not failed."""
        self._deliver = deliver
        self._ring = ring
        ring.reset([], ORIGIN, known=False)
        try:
            await self._find_head()
        except _REDIS_FAILURES as exc:
            self._mark_down(exc)
        self._tasks.append(asyncio.create_task(self._read_loop(), name="eventlog-reader"))
        self._tasks.append(asyncio.create_task(self._trim_loop(), name="eventlog-trim"))
        return ring.head()

    async def _find_head(self) -> None:
        """Where the control stream is read from: the log's newest entry now."""
        async with asyncio.timeout(self._timeout_s * 4):
            newest: Any = await self._client.xrevrange(self._key, count=1)
            self._horizon = await self._fetch_horizon()
        self._mark_up()
        head = max(_position(newest[0][0]) if newest else ORIGIN, self._horizon)
        self._control_last = head
        if self._ring is not None and not self._tailing:
            self._ring.reset([], head, known=False)

    # -- the whole log, or its control events ----------------------------------------

    @property
    def tailing(self) -> bool:
        return self._tailing

    async def tail(self) -> None:
        if self._closed:
            raise DependencyUnavailable("the event log is closed")
        self._tails += 1
        if self._tailing:
            return
        started = self._tail_started
        if started is None or started.done():
            # The reader begins in its next round (its reads of the control stream are
            # short), so the ring and the reads that follow are one reader's, in order.
            started = self._tail_started = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(max(self._timeout_s * 4, _TAIL_START_S)):
                await asyncio.shield(started)
        except TimeoutError:
            self.untail()
            raise DependencyUnavailable("the event log is unavailable; retry") from None
        except BaseException:
            self.untail()
            raise

    def untail(self) -> None:
        self._tails = max(0, self._tails - 1)
        if not self._tails:
            self._tail_until = time.monotonic() + self.tail_linger_s

    async def _preload(self) -> None:
        """Begin to read the whole log: the newest entries into the ring, then every entry
        after them. The control events between what the control stream was read to and
        there are delivered first, so no listener misses one and none hears one twice."""
        async with asyncio.timeout(self._timeout_s * 4):
            entries: Any = await self._client.xrevrange(self._key, count=self._memory + 1)
            self._horizon = await self._fetch_horizon()
            head = max(_position(entries[0][0]) if entries else ORIGIN, self._horizon)
            after = self._control_last
            missed: Any = None
            if after is not None and head > after:
                missed = await self._client.xrange(
                    self._control_key, min=f"({format_cursor(after)}", max=format_cursor(head)
                )
        self._mark_up()
        self._hand_logged(_entries(missed))
        logged = _entries(reversed(entries or ()))
        floor = self._horizon
        if len(logged) > self._memory:
            floor = max(floor, logged[0].position)
            logged = logged[1:]
        if self._ring is not None:
            self._ring.reset(logged, floor)
        self._last_id = head
        self._tailing = True

    async def _start_tailing(self) -> None:
        await self._preload()
        started = self._tail_started
        if started is not None and not started.done():
            started.set_result(None)

    def _stop_tailing(self) -> None:
        """Nothing here has needed the whole log for a while: the control stream from here."""
        self._tailing = False
        self._control_last = self._last_id
        self._last_id = None
        if self._ring is not None:
            self._ring.reset([], self._control_last or ORIGIN, known=False)

    # -- appending ---------------------------------------------------------------

    async def append(self, event: events_pb2.Event) -> events_pb2.Event:
        await self.append_many([event])
        return event

    async def append_many(self, events: Sequence[events_pb2.Event]) -> None:
        if self._closed:
            raise DependencyUnavailable("the event log is closed")
        if self._outbox or self._down_since is not None:
            for event in events:
                self._hold(event)
            return
        try:
            # On a cluster the append also waits (WAIT, up to timeout_s) for a replica.
            async with asyncio.timeout(self._timeout_s * (2 if self._cluster else 1)):
                if len(events) == 1 and not self._cluster:  # no pipeline for one command
                    entry_ids = [await self._append_one(events[0])]
                else:
                    entry_ids = await self._append_pipelined(events)
        except _REDIS_FAILURES as exc:
            # Maybe they landed (a timeout says nothing); the dedupe keys make the retry safe.
            self._mark_down(exc)
            for event in events:
                self._hold(event)
            return
        self._mark_up()
        for event, entry_id in zip(events, entry_ids, strict=True):
            if entry_id is not None:
                event.cursor = format_cursor(_position(entry_id))
        if self._staged is not None:
            self._staged.landed(events)

    async def _append_pipelined(self, events: Sequence[events_pb2.Event]) -> list[Any]:
        """Append ``events`` in one round trip on one connection (Redis runs them in order).

        By the script's digest, not through the script object: redis-py asks Redis
        whether a pipeline's scripts exist (SCRIPT EXISTS) before every pipeline that
        names one, a second round trip per append. A Redis that lost the script
        (restarted, flushed) answers NOSCRIPT: it is loaded and the appends sent
        again, which their dedupe keys make safe (those that landed are not logged twice).
        """
        try:
            return await self._evalsha_all(events)
        except NoScriptError:
            await self._client.script_load(_APPEND_SCRIPT)
            return await self._evalsha_all(events)

    async def _evalsha_all(self, events: Sequence[events_pb2.Event]) -> list[Any]:
        async with self._client.pipeline(transaction=False) as pipe:
            for event in events:
                keys = self._append_keys(event)
                # The command, not ``pipe.evalsha``: a cluster pipeline refuses that
                # method, and routes the command by its first key like any other.
                pipe.execute_command(
                    "EVALSHA", self._append.sha, len(keys), *keys, *self._append_args(event)
                )
            if isinstance(self._client, RedisCluster):
                # Replication is asynchronous: a master that dies before its replica
                # has an append loses it in the failover. WAIT on the same connection
                # (the node of the stream's slot: the pipeline sends each node's
                # commands on one connection, in order) answers once a replica holds
                # every write before it. Short of one, the appends count as failed:
                # the outbox holds them and appends them again (the dedupe keys make
                # that safe), so no publisher is told of an unreplicated append.
                node = self._client.get_node_from_key(self._key)
                pipe.execute_command("WAIT", 1, self._wait_ms, target_nodes=node)
            entry_ids: list[Any] = await pipe.execute()
        if isinstance(self._client, RedisCluster):
            replicas = entry_ids.pop()
            if not isinstance(replicas, int) or replicas < 1:
                raise NotReplicatedError(
                    f"no replica acknowledged the appends within {self._wait_ms} ms"
                )
        return entry_ids

    def _append_keys(self, event: events_pb2.Event) -> list[str]:
        return [self._key, f"{self._key}:id:{event.id}", self._horizon_key, self._control_key]

    def _append_args(self, event: events_pb2.Event) -> list[Any]:
        control = "1" if event.type in CONTROL_TYPES else "0"
        return [
            self._dedupe_ms,
            self._retention,
            event.SerializeToString(),
            self._trim_step,
            control,
        ]

    async def _append_one(self, event: events_pb2.Event) -> Any:
        return await self._append(keys=self._append_keys(event), args=self._append_args(event))

    def _hold(self, event: events_pb2.Event) -> None:
        if len(self._outbox) >= self._outbox_limit:
            raise DependencyUnavailable(
                "the event log is unavailable and this process's outbox is full; retry later"
            )
        self._outbox.append(event)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop(), name="eventlog-flush")

    async def _flush_loop(self) -> None:
        backoff = Backoff()
        while self._outbox and not self._closed:
            batch = [self._outbox[i] for i in range(min(len(self._outbox), _REDIS_PAGE // 10))]
            try:
                async with asyncio.timeout(self._timeout_s * 4):
                    await self._append_pipelined(batch)
            except _REDIS_FAILURES as exc:
                self._mark_down(exc)
                await backoff.wait()
                continue
            except Exception as exc:  # noqa: BLE001 - the outbox is flushed on, not dropped
                self._notes.failed("event outbox flush failed", exc)
                await backoff.wait()
                continue
            backoff.reset()
            for _ in batch:
                self._outbox.popleft()
            if self._staged is not None:
                self._staged.landed(batch)
            log.info("event outbox flushed", extra={"events": len(batch)})
        if not self._outbox:
            self._mark_up()

    # -- reading -----------------------------------------------------------------

    async def _read_loop(self) -> None:
        backoff = Backoff()
        while not self._closed:
            try:
                if not self._tailing:
                    if self._tails:
                        await self._start_tailing()
                    else:
                        await self._read_control()
                elif self._tails or time.monotonic() < self._tail_until:
                    await self._read_log()
                else:
                    self._stop_tailing()
                    continue
            except _REDIS_FAILURES as exc:
                self._mark_down(exc)
                await backoff.wait()
                continue
            except Exception as exc:  # noqa: BLE001 - the reader goes on whatever a round meets
                self._notes.failed("event log read round failed", exc)
                await backoff.wait()
                continue
            backoff.reset()
            if not self._outbox:
                self._mark_up()
            self._notes.succeeded()

    async def _read_log(self) -> None:
        last_id = self._last_id
        if last_id is None:
            await self._preload()
            return
        async with asyncio.timeout(_BLOCK_S + self._timeout_s * 2):
            if self._down_since is not None:
                last_id = await self._check_gap(last_id)
            reply: Any = await self._reader_client.xread(
                {self._key: format_cursor(last_id)},
                count=_REDIS_PAGE,
                block=int(_BLOCK_S * 1000),
            )
        if not self._tailing:
            return  # stopped meanwhile (a check of the gap)
        for _key, entries in reply or ():
            last = _last_id(entries)
            if last is not None:
                self._last_id = last
            self._hand_logged(_entries(entries))

    async def _read_control(self) -> None:
        """The control stream's new entries, while nothing here needs the whole log."""
        after = self._control_last
        if after is None:
            await self._find_head()
            return
        async with asyncio.timeout(_CONTROL_BLOCK_S + self._timeout_s * 2):
            reply: Any = await self._reader_client.xread(
                {self._control_key: format_cursor(after)},
                count=_REDIS_PAGE,
                block=int(_CONTROL_BLOCK_S * 1000),
            )
        for _key, entries in reply or ():
            last = _last_id(entries)
            if last is not None:
                self._control_last = last
            self._hand_logged(_entries(entries))

    def _hand_logged(self, logged: list[Logged]) -> None:
        if logged:
            try:
                self._deliver(logged)
            except Exception as exc:  # noqa: BLE001 - one delivery, not the reader
                self._notes.failed("delivering logged events failed", exc)

    async def _check_gap(self, last_id: Position) -> Position:
        """After an outage: were entries we never read trimmed meanwhile?"""
        horizon = await self._fetch_horizon()
        self._horizon = max(self._horizon, horizon)
        if horizon <= last_id:
            return last_id
        log.error(
            "event log entries were trimmed while this process could not read them",
            extra={"last_read": format_cursor(last_id), "horizon": format_cursor(horizon)},
        )
        self._last_id = horizon
        if self._ring is not None:
            self._ring.reset([], horizon)
        return horizon

    async def _fetch_horizon(self) -> Position:
        horizon: Any = await self._client.get(self._horizon_key)
        return _position(horizon) if horizon else ORIGIN

    async def _trim_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(_TRIM_EVERY_S)  # a periodic job, not synchronization
            min_id = f"{int((time.time() - self._retention_s) * 1000)}-0"
            try:
                async with asyncio.timeout(self._timeout_s * 4):
                    await self._age_trim(
                        keys=[self._key, self._horizon_key, self._control_key], args=[min_id]
                    )
            except _REDIS_FAILURES:
                continue  # Redis away: the next round trims
            except Exception as exc:  # noqa: BLE001 - trimming goes on
                self._notes.failed("event log trim failed", exc)

    # -- tokens ------------------------------------------------------------------

    def carry_tokens(self, heard: Carry | None) -> Carry | None:
        """Tokens cross processes over short Redis streams, one per conversation
        (``<key>:tokens:<conversation>``, ``_TOKENS_SCRIPT``), not the log.

        A process reads only the conversations it follows (``follow_tokens``: a
        subscriber's or a watcher of another process's run), so no process decodes the
        tokens of conversations nobody on it follows. The streams keep the last
        ``_TOKEN_KEEP`` batches of a conversation for ``_TOKEN_TTL_MS``: a process that
        begins to follow mid-run reads back what was said. Past that they are gone, and
        the run's result, which is logged, carries its whole text. One sender task per
        process keeps a process's tokens in the order it announced them. A process that
        serves no stream of runs (``heard`` None) never reads them.
        """
        if heard is not None:
            self._heard = heard
            self._hearing = True
            self._tasks.append(asyncio.create_task(self._tokens_loop(), name="eventlog-tokens"))
        return self._relay

    def _token_stream(self, conversation: str) -> str:
        if conversation == EVERY_CONVERSATION:
            return self._tokens_key
        return f"{self._tokens_key}:{conversation}"

    async def follow_tokens(self, conversation: str) -> list[events_pb2.Event]:
        """Follow ``conversation``'s tokens (see the protocol); the other processes' ones
        said before it that this process had not heard (``[]`` if it was following it, or
        every conversation, already): read back from its stream, oldest first."""
        if not self._hearing or self._closed:
            return []
        count = self._follows.get(conversation, 0)
        self._follows[conversation] = count + 1
        if count:
            pending = self._backfills.get(conversation)
            if pending is not None:
                try:
                    # Its first follower files what is read back (before this one resumes).
                    await asyncio.shield(pending)
                except BaseException:
                    self.unfollow_tokens(conversation)
                    raise
            return []
        heard_already = self._lingering.pop(conversation, None) is not None or (
            conversation != EVERY_CONVERSATION
            and (EVERY_CONVERSATION in self._follows or EVERY_CONVERSATION in self._lingering)
        )
        self._follows_changed.set()
        if heard_already:
            return []
        self._backfills[conversation] = asyncio.get_running_loop().create_future()
        try:
            return await self._read_back(conversation)
        except BaseException:
            self.unfollow_tokens(conversation)
            raise
        finally:
            self._backfills.pop(conversation).set_result(None)
            self._follows_changed.set()  # the reader reads it from here on

    async def _read_back(self, conversation: str) -> list[events_pb2.Event]:
        """Where reading ``conversation``'s stream starts, and what it holds before that."""
        stream = self._token_stream(conversation)
        try:
            async with asyncio.timeout(self._timeout_s * 2):
                if conversation == EVERY_CONVERSATION:
                    # Written only while someone follows it: what it holds is old news.
                    await self._say_all_wanted()
                    newest: Any = await self._client.xrevrange(stream, count=1)
                    self._token_last[stream] = _text(newest[0][0]) if newest else "0-0"
                    return []
                after = self._token_last.get(stream)
                entries: Any = await self._client.xrange(
                    stream, min=f"({after}" if after else "-", count=_TOKEN_KEEP
                )
        except _REDIS_FAILURES as exc:
            # The reader starts from what it knows (or the start) and catches up.
            log.warning(
                "tokens said before a conversation was followed not read back",
                extra={"error": type(exc).__name__},
            )
            return []
        return self._took(stream, entries)

    def unfollow_tokens(self, conversation: str) -> None:
        count = self._follows.get(conversation, 0)
        if count > 1:
            self._follows[conversation] = count - 1
            return
        if count == 1:
            del self._follows[conversation]
            self._lingering[conversation] = time.monotonic() + self.token_linger_s
            self._follows_changed.set()

    def _token_reads(self) -> dict[str, str]:
        """The token streams to read now, each with where its read starts."""
        lingering = self._lingering
        if lingering:
            now = time.monotonic()
            for conversation in [c for c, until in lingering.items() if until <= now]:
                del lingering[conversation]
        if EVERY_CONVERSATION in self._follows or EVERY_CONVERSATION in lingering:
            followed: Sequence[str] = (EVERY_CONVERSATION,)
        else:
            followed = [*self._follows, *lingering]
        reads: dict[str, str] = {}
        for conversation in followed:
            if conversation in self._backfills:
                continue  # read from where its read-back ends
            stream = self._token_stream(conversation)
            reads[stream] = self._token_last.get(stream, "0-0")
        return reads

    def _took(self, stream: str, entries: Any) -> list[events_pb2.Event]:
        """The other processes' tokens in ``entries`` of ``stream``, each heard once."""
        heard: list[events_pb2.Event] = []
        ids = self._token_ids
        last = None
        for entry_id, fields in entries or ():
            last = entry_id
            try:
                if fields[b"o"] == self._origin:
                    continue
                events = events_pb2.EventBatch.FromString(fields[b"b"]).events
            except (DecodeError, KeyError, TypeError, ValueError) as exc:
                _UNREADABLE.failed("a token stream entry that is not a batch was skipped", exc)
                continue
            for event in events:
                if event.id in ids:
                    continue
                ids[event.id] = None
                heard.append(event)
        if last is not None:
            self._token_last[stream] = _text(last)
            self._token_last.move_to_end(stream)
        while len(ids) > _TOKEN_IDS:
            ids.popitem(last=False)
        while len(self._token_last) > _TOKEN_IDS // 10:
            self._token_last.popitem(last=False)
        return heard

    async def _say_all_wanted(self) -> None:
        self._all_said_at = time.monotonic()
        await self._client.set(self._all_wanted_key, b"1", px=int(_ALL_WANTED_EVERY_S * 3000))

    def _relay(self, events: Sequence[events_pb2.Event]) -> None:
        if self._closed:
            return
        queue = self._token_queue
        if len(queue) >= _TOKEN_BACKLOG:
            # Redis is slower than the runs (or away): live-only, so the oldest go.
            log.warning("tokens not carried to other processes", extra={"tokens": len(queue)})
            queue.clear()
        queue.extend(events)
        if self._token_sender is None or self._token_sender.done():
            self._token_sender = asyncio.create_task(self._send_tokens(), name="eventlog-relay")

    async def _send_tokens(self) -> None:
        while self._token_queue and not self._closed:
            queued, self._token_queue = self._token_queue, []
            by_conversation: dict[str, list[events_pb2.Event]] = {}
            for event in queued:
                by_conversation.setdefault(event.conversation, []).append(event)
            keys = [self._tokens_key, self._all_wanted_key]
            batches = []
            for conversation, events in by_conversation.items():
                # (A token of no conversation, were there one: the all-conversations stream.)
                keys.append(self._token_stream(conversation))
                batches.append(events_pb2.EventBatch(events=events).SerializeToString())
            try:
                async with asyncio.timeout(self._timeout_s):
                    await self._send_tokens_script(
                        keys=keys,
                        args=[_TOKEN_TTL_MS, _TOKEN_KEEP, _TOKEN_KEEP_ALL, self._origin, *batches],
                    )
            except _REDIS_FAILURES as exc:
                log.warning(
                    "tokens not carried to other processes",
                    extra={"tokens": len(queued), "error": type(exc).__name__},
                )
            except Exception as exc:  # noqa: BLE001 - live only: these go, the next ones follow
                self._notes.failed("tokens not carried to other processes", exc)

    async def _tokens_loop(self) -> None:
        """Read the followed conversations' token streams (all of them in one blocking
        read), hand the other processes' tokens to ``heard``."""
        backoff = Backoff()
        every = False
        reading: dict[str, str] = {}
        while not self._closed:
            reads = self._token_reads()
            if not reads:
                self._follows_changed.clear()
                await self._follows_changed.wait()
                continue
            try:
                async with asyncio.timeout(_TOKEN_BLOCK_S + self._timeout_s * 2):
                    if (self._tokens_key in reads) != every:
                        await self._switch(reading, reads)
                        every = not every
                        continue
                    if (
                        self._tokens_key in reads
                        and time.monotonic() - self._all_said_at >= _ALL_WANTED_EVERY_S
                    ):
                        await self._say_all_wanted()
                    reply: Any = await self._token_client.xread(
                        _streams(reads), count=_REDIS_PAGE, block=int(_TOKEN_BLOCK_S * 1000)
                    )
            except _REDIS_FAILURES:
                await backoff.wait()
                continue
            except Exception as exc:  # noqa: BLE001 - the reader goes on whatever a round meets
                self._notes.failed("reading other processes' tokens failed", exc)
                await backoff.wait()
                continue
            backoff.reset()
            reading = reads
            self._hand(reply)

    def _hand(self, reply: Any) -> None:
        for stream, entries in reply or ():
            heard = self._took(_text(stream), entries)
            if heard:
                try:
                    self._heard(heard)
                except Exception as exc:  # noqa: BLE001 - one batch, not the reader
                    self._notes.failed("tokens heard from another process were dropped", exc)

    async def _switch(self, reading: dict[str, str], reads: dict[str, str]) -> None:
        """From each conversation's stream to the all-conversations stream, or back: the
        streams read next start where they end now, then the streams left are read to
        their end (what the two both hold is heard once), so nothing said in between
        is missed and nothing old is heard again."""
        entering = [stream for stream in reads if stream not in reading]
        if entering:
            async with self._client.pipeline(transaction=False) as pipe:
                for stream in entering:
                    pipe.xrevrange(stream, count=1)
                newest: list[Any] = await pipe.execute()
            for stream, found in zip(entering, newest, strict=True):
                self._token_last[stream] = _text(found[0][0]) if found else "0-0"
        left = {
            stream: self._token_last.get(stream, start)
            for stream, start in reading.items()
            if stream not in reads
        }
        if left:
            self._hand(await self._client.xread(_streams(left), count=_TOKEN_KEEP_ALL))

    async def read(self, after: Position, upto: Position, limit: int) -> list[Logged]:
        try:
            async with asyncio.timeout(self._timeout_s * 4):
                entries: Any = await self._client.xrange(
                    self._key, min=f"({format_cursor(after)}", max=format_cursor(upto), count=limit
                )
        except _REDIS_FAILURES:
            raise DependencyUnavailable(
                "the event log is unavailable for this replay; retry, or resume from a newer cursor"
            ) from None
        return _entries(entries)

    async def redact(self, redaction: Redactor) -> int:
        """Remove the entries whose events ``redaction`` matches, from the log and the
        control stream (XDEL: a stream entry cannot be rewritten; later ids, and so
        every cursor, are unchanged, and a reader passes over the gap), and the token
        streams of their conversations (a run's live text, kept minutes)."""
        removed = 0
        conversations: set[str] = set()
        start = "-"
        try:
            while True:
                async with asyncio.timeout(self._timeout_s * 10):
                    entries: Any = await self._client.xrange(
                        self._key, min=start, max="+", count=_REDACT_BATCH
                    )
                doomed = []
                for entry_id, fields in entries or ():
                    data = fields.get(b"e") if isinstance(fields, dict) else None
                    if data is None:
                        continue
                    try:
                        event = events_pb2.Event.FromString(data)
                    except DecodeError:
                        continue
                    security = event.type == events_pb2.EVENT_TYPE_SECURITY
                    if not security and redaction.match(event, data) is not None:
                        doomed.append(entry_id)
                        if event.conversation:
                            conversations.add(event.conversation)
                if doomed:
                    async with asyncio.timeout(self._timeout_s * 10):
                        removed += int(await self._client.xdel(self._key, *doomed))
                        await self._client.xdel(self._control_key, *doomed)
                if len(entries or ()) < _REDACT_BATCH:
                    break
                last = _position(entries[-1][0])
                start = f"({last[0]}-{last[1]}"
            for conversation in conversations:
                async with asyncio.timeout(self._timeout_s):
                    await self._client.delete(self._token_stream(conversation))
        except _REDIS_FAILURES as exc:
            log_failure(log, "event log redaction failed", exc)
            raise DependencyUnavailable("the event log is unavailable; retry") from None
        return removed

    async def horizon(self) -> Position:
        try:
            async with asyncio.timeout(self._timeout_s):
                self._horizon = max(self._horizon, await self._fetch_horizon())
        except _REDIS_FAILURES:
            pass  # the last known horizon only ever understates: replays then fail loudly
        return self._horizon

    async def last_position(self) -> Position:
        try:
            async with asyncio.timeout(self._timeout_s):
                entries: Any = await self._client.xrevrange(self._key, count=1)
        except _REDIS_FAILURES:
            raise DependencyUnavailable("the event log is unavailable; retry") from None
        return _position(entries[0][0]) if entries else self._horizon

    # -- state -------------------------------------------------------------------

    def _mark_down(self, exc: BaseException) -> None:
        if self._down_since is not None:
            return
        self._down_since = time.monotonic()
        log.warning(
            "event log degraded: Redis unreachable; publishing to the outbox",
            extra={"redis": self._target, "error": type(exc).__name__},
        )
        self._notify("degraded")

    def _mark_up(self) -> None:
        if self._down_since is None:
            return
        outage_s = time.monotonic() - self._down_since
        self._down_since = None
        log.info(
            "event log recovered: Redis reachable again",
            extra={"redis": self._target, "outage_s": round(outage_s, 3)},
        )
        self._notify("ok")

    def _notify(self, state: LogState) -> None:
        for callback in self._callbacks:
            try:
                callback(state)
            except Exception:
                log.exception("event log state callback failed")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._tail_started is not None and not self._tail_started.done():
            self._tail_started.set_exception(DependencyUnavailable("the event log is closed"))
            self._tail_started.exception()  # told to whoever waits; nobody else to tell
        if self._outbox:
            log.warning("closing with unflushed events", extra={"events": len(self._outbox)})
        tasks = [
            *self._tasks,
            *([self._flusher] if self._flusher else []),
            *([self._token_sender] if self._token_sender else []),
        ]
        await cancel_all(tasks)
        for client in (self._client, self._reader_client, self._token_client):
            with contextlib.suppress(*_REDIS_FAILURES):
                async with asyncio.timeout(self._timeout_s):
                    await client.aclose()
