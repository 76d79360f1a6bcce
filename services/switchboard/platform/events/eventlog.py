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
  every process sees the same order. Appends go through a small Lua script that
  also remembers the event id for ``dedupe_window_s``, so a publish retried
  after an uncertain failure (a timeout while Redis was stopped) lands once.

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
master of its slot: its keys and token channel carry the stream's hash tag, tokens
go over sharded pub/sub, and every append is followed by ``WAIT 1`` so that an
append is acknowledged (given its cursor) only once a replica holds it; short of
that it is held and appended again, so a failover loses nothing acknowledged.

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
from collections import deque
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Final, Literal, Protocol

from google.protobuf.message import DecodeError
from redis.asyncio import RedisCluster
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterPubSub
from redis.exceptions import NoScriptError, RedisClusterException, RedisError
from sqlalchemy import delete, func, insert, select
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
ORIGIN: Final[Position] = (0, 0)
LogState = Literal["ok", "degraded"]

_CURSOR_RE: Final = re.compile(r"([0-9]{1,20})-([0-9]{1,20})(?:-([0-9]{1,20}))?")
_MAX_U64: Final = 2**64 - 1
_REDIS_FAILURES: Final = (RedisError, RedisClusterException, OSError, TimeoutError)
_DB_FAILURES: Final = (SQLAlchemyError, OSError, TimeoutError)
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

    async def last_position(self) -> Position:
        """The newest position in the log (asking storage, not this process's view)."""
        ...

    def on_state_change(self, callback: Callable[[LogState], None]) -> None: ...

    def carry_tokens(self, heard: Carry | None) -> Carry | None:
        """How tokens reach the other processes sharing this log: the function that
        sends them (``heard`` is called with theirs; None: this process does not
        listen), or None for one process."""
        ...

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
        async with self._bounded(), self._database.readers() as session:
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
            async with self._bounded(), self._database.readers() as session:
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

    def _bounded(self) -> Any:
        return asyncio.timeout(self._database.timeout_s)

    def carry_tokens(self, heard: Carry | None) -> Carry | None:
        return None  # one process: nobody else to tell

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
# KEYS: stream, dedupe key, horizon key. ARGV: dedupe ms, retention, data, step.
_APPEND_SCRIPT: Final = (
    _TRIM_THROUGH
    + """
if not redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[1]) then
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
  return false
end
local id = redis.call('XADD', KEYS[1], '*', 'e', ARGV[3])
local excess = redis.call('XLEN', KEYS[1]) - tonumber(ARGV[2])
if excess >= tonumber(ARGV[4]) then
  local oldest = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', excess)
  trim_through(KEYS[1], KEYS[3], oldest[#oldest][1])
end
return id
"""
)

# Trimming by age. KEYS: stream, horizon key. ARGV: the oldest id to keep.
_AGE_TRIM_SCRIPT: Final = (
    _TRIM_THROUGH
    + """
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


#: A channel message, plain or sharded, as text or bytes.
_MESSAGE_TYPES: Final = ("message", b"message", "smessage", b"smessage")


async def _next_message(pubsub: PubSub | ClusterPubSub) -> Any:
    if isinstance(pubsub, ClusterPubSub):
        if not pubsub.node_pubsub_mapping:
            # The node dropped the subscription (its slot moved): subscribe anew.
            raise ConnectionError("the token subscription was dropped")
        return await pubsub.get_sharded_message(ignore_subscribe_messages=True, timeout=_BLOCK_S)
    return await pubsub.get_message(ignore_subscribe_messages=True, timeout=_BLOCK_S)


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
        # None until the newest entries were loaded (Redis may be away at start).
        self._last_id: Position | None = ORIGIN
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
        # Tokens: pub/sub on their own connection (a subscribed connection does nothing else).
        self._token_client = binary_client(
            redis_url, timeout_s=timeout_s, max_connections=1, socket_timeout_s=_BLOCK_S + timeout_s
        )
        self._token_channel = f"{key}:tokens"
        # Tells this process's own token messages from the others' (it hears them too).
        self._origin = secrets.token_bytes(8)
        self._token_queue: list[events_pb2.Event] = []
        self._token_sender: asyncio.Task[None] | None = None
        self._heard: Carry = _nobody
        self._append = self._client.register_script(_APPEND_SCRIPT)
        # WAIT's own bound, inside the append's (2 x timeout_s on a cluster).
        self._wait_ms = max(1, int(self._timeout_s * 1000))
        self._age_trim = self._client.register_script(_AGE_TRIM_SCRIPT)
        self._horizon_key = f"{key}:horizon"
        # Trim in steps of about 1% of retention: one XRANGE + XTRIM per step.
        self._trim_step = max(1, retention // 100)

    @property
    def state(self) -> LogState:
        return "degraded" if self._down_since is not None else "ok"

    def on_state_change(self, callback: Callable[[LogState], None]) -> None:
        self._callbacks.append(callback)

    @property
    def held(self) -> int:
        return len(self._outbox)

    async def start(self, deliver: Deliver, ring: Ring) -> Position:
        """Preload the newest entries; an unreachable Redis starts degraded, not failed."""
        self._deliver = deliver
        self._ring = ring
        try:
            await self._preload()
        except _REDIS_FAILURES as exc:
            self._mark_down(exc)
            ring.reset([], ORIGIN, known=False)
            self._last_id = None
        self._tasks.append(asyncio.create_task(self._read_loop(), name="eventlog-reader"))
        self._tasks.append(asyncio.create_task(self._trim_loop(), name="eventlog-trim"))
        return ring.head()

    async def _preload(self) -> None:
        async with asyncio.timeout(self._timeout_s * 4):
            entries: Any = await self._client.xrevrange(self._key, count=self._memory + 1)
            self._horizon = await self._fetch_horizon()
        self._mark_up()
        logged = _entries(reversed(entries or ()))
        floor = self._horizon
        if len(logged) > self._memory:
            floor = max(floor, logged[0].position)
            logged = logged[1:]
        if self._ring is not None:
            self._ring.reset(logged, floor)
        self._last_id = logged[-1].position if logged else floor

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
        return [self._key, f"{self._key}:id:{event.id}", self._horizon_key]

    def _append_args(self, event: events_pb2.Event) -> list[Any]:
        return [self._dedupe_ms, self._retention, event.SerializeToString(), self._trim_step]

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
                last_id = self._last_id
                if last_id is None:
                    await self._preload()
                    continue
                async with asyncio.timeout(_BLOCK_S + self._timeout_s * 2):
                    if self._down_since is not None:
                        last_id = await self._check_gap(last_id)
                    reply: Any = await self._reader_client.xread(
                        {self._key: format_cursor(last_id)},
                        count=_REDIS_PAGE,
                        block=int(_BLOCK_S * 1000),
                    )
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
            for _key, entries in reply or ():
                last = _last_id(entries)
                if last is not None:
                    self._last_id = last
                logged = _entries(entries)
                if logged:
                    try:
                        self._deliver(logged)
                    except Exception as exc:  # noqa: BLE001 - one delivery, not the reader
                        self._notes.failed("delivering logged events failed", exc)
            self._notes.succeeded()

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
                    await self._age_trim(keys=[self._key, self._horizon_key], args=[min_id])
            except _REDIS_FAILURES:
                continue  # Redis away: the next round trims
            except Exception as exc:  # noqa: BLE001 - trimming goes on
                self._notes.failed("event log trim failed", exc)

    # -- tokens ------------------------------------------------------------------

    def carry_tokens(self, heard: Carry | None) -> Carry | None:
        """Tokens cross processes over Redis pub/sub (``<key>:tokens``), not the stream.

        Pub/sub keeps nothing: a process that is not listening at that moment
        (restarting, Redis away) does not hear them, and the run's result,
        which is logged, carries its whole text. One sender task per process
        keeps a process's tokens in the order it announced them. A process that
        serves no stream of runs (``heard`` None) does not listen: it would decode
        every token of every run only to drop it.
        """
        if heard is not None:
            self._heard = heard
            self._tasks.append(asyncio.create_task(self._hear_loop(), name="eventlog-tokens"))
        return self._relay

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
            batch = events_pb2.EventBatch(events=self._token_queue)
            self._token_queue = []
            try:
                async with asyncio.timeout(self._timeout_s):
                    payload = self._origin + batch.SerializeToString()
                    if isinstance(self._client, RedisCluster):
                        # Sharded: only the master of the log's slot (and its replica)
                        # carries them, not every node over the cluster bus.
                        await self._client.spublish(self._token_channel, payload)
                    else:
                        await self._client.publish(self._token_channel, payload)
            except _REDIS_FAILURES as exc:
                log.warning(
                    "tokens not carried to other processes",
                    extra={"tokens": len(batch.events), "error": type(exc).__name__},
                )
            except Exception as exc:  # noqa: BLE001 - live only: these go, the next ones follow
                self._notes.failed("tokens not carried to other processes", exc)

    async def _hear_loop(self) -> None:
        backoff = Backoff()
        while not self._closed:
            client = self._token_client
            pubsub: PubSub | ClusterPubSub = client.pubsub()
            try:
                async with asyncio.timeout(self._timeout_s * 4):
                    if isinstance(client, RedisCluster) and isinstance(pubsub, ClusterPubSub):
                        # The slot's master now (after a failover, the promoted replica).
                        await client.nodes_manager.initialize()
                        await pubsub.ssubscribe(self._token_channel)
                    else:
                        await pubsub.subscribe(self._token_channel)
                while not self._closed:
                    async with asyncio.timeout(_BLOCK_S + self._timeout_s * 2):
                        message: Any = await _next_message(pubsub)
                    backoff.reset()
                    if message is None or message.get("type") not in _MESSAGE_TYPES:
                        continue
                    data: bytes = message["data"]
                    if data[:8] == self._origin:
                        continue
                    try:
                        heard = events_pb2.EventBatch.FromString(data[8:]).events
                        self._heard(heard)
                    except Exception as exc:  # noqa: BLE001 - one message, not the listener
                        self._notes.failed("tokens heard from another process were dropped", exc)
            except _REDIS_FAILURES:
                await backoff.wait()
            except Exception as exc:  # noqa: BLE001 - the listener goes on whatever a round meets
                self._notes.failed("listening for other processes' tokens failed", exc)
                await backoff.wait()
            finally:
                with contextlib.suppress(*_REDIS_FAILURES):
                    await pubsub.aclose()

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
