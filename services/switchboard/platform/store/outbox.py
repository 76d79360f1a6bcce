"""The transactional outbox: every committed change has its event, whatever crashes.

On the embedded log in a group commit (a SQLite file: ``Outbox.inline``), a
change's events go straight into the log in the change's own transaction
(``LocalLog.log_in``) and are delivered once it committed: no outbox row, and no
second transaction to log the event and delete the row. Everywhere else (Redis,
PostgreSQL):

A store writes the events of a change into ``event_outbox`` in the change's own
transaction (``Staged``); after the commit the service publishes them
(``EventBus.publish_staged``), and a row is deleted once its event is in the
log: by the embedded log in the transaction that stores the event (exactly
once), by the Redis log after the stream has it (``landed``; gathered for up to
``GATHER_S``, so that one transaction deletes the rows of many changes). A row that stays
(the process died between commit and publish, or the log was away and the
process died with events in its memory) is published by the relay of any
process sharing the database once it is ``GRACE_S`` old, with the same event id:
Redis's dedupe window, and the embedded log storing an outbox event only in
the transaction that deletes its row, make that land once.

A retried request (the same ``request_id``) whose first attempt committed
publishes its leftover rows at once (``Staged`` with a key): the client that
gets the replayed answer can rely on the event existing.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Final, Generic, Protocol, TypeVar

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from switchboard.api.events.v1 import events_pb2
from switchboard.platform.background import cancel_all
from switchboard.platform.errors import SwitchboardError
from switchboard.platform.resilience.backoff import IdlePoll
from switchboard.platform.store.db import Database, log_failure
from switchboard.platform.store.models import EventOutboxRow, table_of
from switchboard.platform.values.names import new_id, now, stamp_now

log = logging.getLogger("switchboard.outbox")

_T = TypeVar("_T")
Publish = Callable[[Sequence[events_pb2.Event]], Awaitable[None]]


class InlineLog(Protocol):
    """A log that takes a change's events in the change's own transaction."""

    def log_in(self, session: Session, events: Sequence[events_pb2.Event]) -> bool:
        """Log ``events`` in ``session``'s transaction; False if it cannot (stage them)."""
        ...


#: A row this old was not published by the process that wrote it (normally milliseconds).
GRACE_S: Final = 5.0
#: How often the relay looks for such rows (stretched up to four times while it finds none).
RELAY_EVERY_S: Final = 1.0
#: Rows one relay round or one delete handles.
_BATCH: Final = 200
#: How long landed rows are gathered before one transaction deletes them (sooner once a
#: batch is full): a delete per landing would be a write transaction per change.
GATHER_S: Final = 0.25

_ROWS: Final = table_of(EventOutboxRow)
_INSERT: Final = _ROWS.insert()
_DELETE: Final = _ROWS.delete().where(_ROWS.c.id.in_(bindparam("ids", expanding=True)))
_DELETE_RETURNING: Final = _DELETE.returning(_ROWS.c.id)
_BY_KEY: Final = select(_ROWS.c.data).where(_ROWS.c.key == bindparam("key"))
_STALE: Final = (
    select(_ROWS.c.id, _ROWS.c.data)
    .where(_ROWS.c.created_at < bindparam("before"))
    .order_by(_ROWS.c.created_at)
    .limit(bindparam("limit"))
)


def stamp(event: events_pb2.Event) -> None:
    """Give ``event`` its id and time unless it has them (the id identifies it in the log)."""
    if not event.id:
        event.id = new_id()
    if not event.HasField("time"):
        stamp_now(event.time)


class Outbox:
    """The outbox table of one database, and this process's relay of it."""

    def __init__(
        self, database: Database, *, grace_s: float = GRACE_S, gather_s: float = GATHER_S
    ) -> None:
        self._database = database
        self._grace_s = grace_s
        self._gather_s = gather_s
        #: Set by the embedded log on a group-commit database: events go to the log
        #: in their change's transaction, not to the outbox (see the module docstring).
        self.inline: InlineLog | None = None
        #: Ids this process is publishing; the relay leaves them alone.
        self.pending: set[str] = set()
        self._landed: list[str] = []
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    # -- in a write's transaction -------------------------------------------------------

    def stage(self, db: Session, events: Sequence[events_pb2.Event], key: str = "") -> None:
        """Write ``events`` (stamped now) in ``db``'s transaction."""
        if not events:
            return
        when = now()
        rows = []
        for index, event in enumerate(events):
            stamp(event)
            # A microsecond apart: the relay reads rows by age, so a write's
            # events keep their order if it is the relay that publishes them.
            created = when + dt.timedelta(microseconds=index)
            rows.append(
                {
                    "id": event.id,
                    "data": event.SerializeToString(),
                    "key": key,
                    "created_at": created,
                }
            )
        db.connection().execute(_INSERT, rows)

    async def redact(
        self,
        replace: Callable[[events_pb2.Event, bytes], events_pb2.Event | None],
    ) -> int:
        """Rewrite the waiting rows whose event ``replace`` redacts (an erasure: an event
        the relay has not published yet must not reach the log as it was); how many."""

        def work(db: Session) -> int:
            changed = 0
            for event_id, data in db.execute(select(_ROWS.c.id, _ROWS.c.data)).all():
                redacted = replace(events_pb2.Event.FromString(data), data)
                if redacted is not None:
                    db.execute(
                        _ROWS.update()
                        .where(_ROWS.c.id == event_id)
                        .values(data=redacted.SerializeToString())
                    )
                    changed += 1
            return changed

        return await self._database.run(work, write=True)

    def leftovers(self, db: Session, key: str) -> list[events_pb2.Event]:
        """The unpublished events of the write whose idempotency key is ``key``."""
        return [
            events_pb2.Event.FromString(data)
            for data in db.connection().execute(_BY_KEY, {"key": key}).scalars()
        ]

    def retire_in(
        self, db: Session, events: Sequence[events_pb2.Event]
    ) -> tuple[list[events_pb2.Event], list[str]]:
        """Delete, in ``db``'s transaction, the rows of those of ``events`` staged here.

        Returns the events to log (those staged nowhere, and each staged one
        whose row this transaction deleted, once) and the ids deleted (call
        ``retired`` with them after the commit). A staged event whose row is
        gone was logged already: a retry and its first attempt, or a relay,
        published it too.
        """
        pending = self.pending
        ids = [event.id for event in events if event.id in pending]
        if not ids:
            return list(events), []
        deleted = set(db.connection().execute(_DELETE_RETURNING, {"ids": ids}).scalars())
        gone = deleted.copy()
        kept = []
        for event in events:
            if event.id not in pending:
                kept.append(event)
            elif event.id in gone:
                gone.discard(event.id)  # once, even if it came twice in this batch
                kept.append(event)
        return kept, ids

    def retired(self, ids: Iterable[str]) -> None:
        self.pending.difference_update(ids)

    # -- after the commit ---------------------------------------------------------------

    def publishing(self, events: Sequence[events_pb2.Event]) -> None:
        self.pending.update(event.id for event in events)

    def failed(self, events: Sequence[events_pb2.Event]) -> None:
        """Not published now: the relay publishes them later."""
        self.pending.difference_update(event.id for event in events)

    def landed(self, events: Iterable[events_pb2.Event]) -> None:
        """These events are in the log: delete their rows (batched, in the background)."""
        pending = self.pending
        ids = [event.id for event in events if event.id in pending]
        if ids:
            self._landed.extend(ids)
            self._wake.set()
            if len(self._landed) >= _BATCH:
                self._full.set()

    # -- background ---------------------------------------------------------------------

    def start(self, publish: Publish) -> None:
        self._tasks.append(asyncio.create_task(self._relay(publish), name="outbox-relay"))
        self._tasks.append(asyncio.create_task(self._deleter(), name="outbox-deleter"))

    async def _relay(self, publish: Publish) -> None:
        # Rows are left only by a process that died (or failed to publish): looked for
        # every second while some turn up, less often (up to 4 s) while none do.
        idle = IdlePoll(RELAY_EVERY_S)
        found = 0
        while not self._closed:
            await asyncio.sleep(idle.after(found=found > 0))  # a periodic job
            found = 0
            try:
                found = await self.relay_once(publish)
            except asyncio.CancelledError:
                raise
            except SwitchboardError:
                log.warning("outbox relay failed; retrying later")
            except Exception as exc:  # noqa: BLE001 - logged by log_failure
                log_failure(log, "outbox relay failed; retrying later", exc)

    async def relay_once(self, publish: Publish) -> int:
        """Publish the rows older than the grace period that nobody here is publishing."""
        before = now() - dt.timedelta(seconds=self._grace_s)

        def read(db: Session) -> list[tuple[str, bytes]]:
            rows = db.connection().execute(_STALE, {"before": before, "limit": _BATCH})
            return [(row.id, row.data) for row in rows]

        async with asyncio.timeout(self._database.timeout_s * 2):
            rows = await self._database.run(read, write=False)
        events = [
            events_pb2.Event.FromString(data) for row_id, data in rows if row_id not in self.pending
        ]
        if not events:
            return 0
        log.warning("publishing events left in the outbox", extra={"events": len(events)})
        self.publishing(events)
        try:
            await publish(events)
        except BaseException:
            self.failed(events)
            raise
        return len(events)

    async def _deleter(self) -> None:
        while not self._closed:
            await self._wake.wait()
            # The rows of the changes landing meanwhile go in the same transaction. Their
            # ids stay pending, so the relay leaves them alone; a crash before the delete
            # leaves rows the relay publishes again, which the log's dedupe key drops.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._gather_s):
                    await self._full.wait()
            self._wake.clear()
            self._full.clear()
            while self._landed:
                try:
                    await self._delete_batch()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - logged by log_failure
                    if not isinstance(exc, SwitchboardError):
                        log_failure(log, "outbox rows not deleted; retrying later", exc)
                    # Kept pending, so the relay does not publish them again meanwhile.
                    await asyncio.sleep(RELAY_EVERY_S)  # retry backoff, not synchronization

    async def _delete_batch(self) -> None:
        """Delete the oldest batch of landed rows; they stop being pending once gone."""
        ids = self._landed[:_BATCH]
        await self._delete(ids)
        del self._landed[: len(ids)]
        self.retired(ids)

    async def _delete(self, ids: list[str]) -> None:
        def work(db: Session) -> None:
            db.connection().execute(_DELETE, {"ids": ids})

        async with asyncio.timeout(self._database.timeout_s * 2):
            await self._database.run(work, write=True)

    async def close(self) -> None:
        self._closed = True
        await cancel_all(self._tasks)
        # What the deleter was gathering (a delete it was cancelled in may have committed:
        # deleting again is harmless). Rows left by a failure here are published again by
        # another process's relay, and the log's dedupe key drops them.
        while self._landed:
            try:
                await self._delete_batch()
            except Exception:  # noqa: BLE001 - closing: the relay covers what is left
                break


class Staged(Generic[_T]):
    """The events of one write, built from its result inside its transaction.

    ``build`` returns the events to stage, or None when the write was the
    replay of an earlier request with the same idempotency ``key``: then the
    earlier request's events still in the outbox are published instead.
    """

    def __init__(
        self,
        outbox: Outbox | None,
        build: Callable[[_T], Sequence[events_pb2.Event] | None],
        *,
        key: str = "",
        inline: bool = True,
    ) -> None:
        self._outbox = outbox
        self._build = build
        self._key = key
        #: False: staged in the outbox even where the log could take them now (a
        #: writer that must log them behind events of its own still queued).
        self._inline = inline
        self.events: list[events_pb2.Event] = []

    def write(self, db: Session, result: _T) -> None:
        """Build the events of ``result`` and write them in ``db``'s transaction: to
        the log itself where it can take them (they then have their cursor, and
        ``EventBus.publish_staged`` passes them by), else to the outbox."""
        built = self._build(result)
        outbox = self._outbox
        if built is None:
            # Logged with the first attempt, or left in the outbox by it.
            self.events = outbox.leftovers(db, self._key) if outbox and self._key else []
            return
        self.events = list(built)
        if outbox is not None:
            inline = outbox.inline if self._inline else None
            if inline is None or not self.events or not inline.log_in(db, self.events):
                outbox.stage(db, self.events, self._key)
        else:
            for event in self.events:
                stamp(event)

    def wrap(self, work: Callable[[Session], _T]) -> Callable[[Session], _T]:
        def staged(db: Session) -> _T:
            result = work(db)
            self.write(db, result)
            return result

        return staged


def staging(staged: Staged[_T] | None, work: Callable[[Session], _T]) -> Callable[[Session], _T]:
    """``work`` with ``staged``'s events written in its transaction (``work`` itself if None)."""
    return work if staged is None else staged.wrap(work)
