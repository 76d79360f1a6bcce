"""One leased follower of the event log, for every background task that turns events
into rows of its own: the webhook engine's deliveries, the semantic indexer's jobs,
memory forming's jobs.

One replica at a time feeds: the one holding the lease in the consumer's cursor
table (``feedstore.py``), renewed every third of ``lease_s`` and taken over by
another replica once it lapses (a holder that gives it up at close hands it over at
once). A round reads the log after the cursor, at most ``batch`` events, and asks
the consumer what they make; what it writes and the cursor's move commit in one
transaction (compare-and-set on the holder and the old cursor), so an event is
taken once whichever replica reads it and whoever crashes when. A batch that
concerns the consumer not at all makes no transaction: the cursor moves on in
memory and is stored with the next batch that writes, or the lease's renewal.

The feeder wakes on the live events the consumer asks for (``EventBus.listen``)
and catches up every ``poll_s`` (a third of the lease at most, so a waiting replica
looks as often as the holder renews). A new deployment starts where the log's head was
when its feeding replica started (not when it first took the lease: a process that reads
only the log's control events reads the rest once it holds it, and what was published
meanwhile is fed too). A
cursor outside the retained log (the feeder was away longer than the retention)
moves to the log's horizon with a warning, writing what the consumer does instead
(``LogConsumer.gap``).

This module does not import grpc.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from switchboard.api.events.v1 import events_pb2
from switchboard.platform.background import cancel_within
from switchboard.platform.errors import CursorAhead, CursorExpired
from switchboard.platform.events.bus import EventBus
from switchboard.platform.events.eventlog import (
    Logged,
    Position,
    format_cursor,
    logged_part,
    parse_cursor,
)
from switchboard.platform.events.feedstore import FeedStore, Work
from switchboard.platform.resilience.backoff import Backoff
from switchboard.platform.store.db import Database, log_failure
from switchboard.platform.values.names import now

#: Bound on a close: stopping the round, then giving the lease up.
CLOSE_TIMEOUT_S: Final = 5.0
#: A replica that does not hold the lease is woken by events at most this often: each
#: time it tries to take the lease, which is a write, and usually held.
_TAKE_AGAIN_S: Final = 1.0


class LogConsumer(Protocol):
    """What a feeder hands the events it reads to."""

    def wakes(self, event: events_pb2.Event) -> bool:
        """Whether a live event starts a round now (the others wait for the next poll)."""
        ...

    async def taken(self) -> None:
        """The lease was just taken over (not renewed); before this replica feeds. If
        it raises, the replica does not feed, and the next round tries again."""
        ...

    async def renewed(self) -> None:
        """The lease was taken or renewed (about every third of the lease)."""
        ...

    async def taking(self, items: Sequence[Logged]) -> Work | None:
        """What ``items`` make, written in the transaction that moves the cursor past
        them; None: nothing concerns the consumer (no transaction)."""
        ...

    def gap(self) -> Work | None:
        """What is written instead of the events lost between the cursor and the log's
        horizon (None: nothing; they are passed over)."""
        ...

    def written(self, count: int) -> None:
        """``count`` rows were committed with the cursor (wake what works on them)."""
        ...


@dataclass(frozen=True)
class FeedSettings:
    #: The task's name, and the subject of the log lines.
    name: str
    lease_s: float
    poll_s: float
    #: Events read from the log per round.
    batch: int
    #: Logged when the cursor is outside the retained log: what that means here.
    gap_warning: str


class LeasedFeeder:
    """Follows the log for ``consumer`` while this replica holds the lease in ``table``.

    ``start()`` runs it; ``close()`` stops it and gives the lease up
    (``release=False``: as a crash, left to expire).
    """

    def __init__(
        self,
        database: Database,
        bus: EventBus,
        table: Any,
        consumer: LogConsumer,
        settings: FeedSettings,
        *,
        instance_id: str,
        log: logging.Logger,
    ) -> None:
        self.store = FeedStore(database, table, log=log)
        self._bus = bus
        self._consumer = consumer
        self.settings = settings
        self._me = instance_id
        self._log = log
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._unlisten: Callable[[], None] | None = None
        #: Whether this replica fed last (it holds the lease, as far as it knows).
        self.feeding = False
        #: How far this replica has fed (ahead of the stored cursor while the events
        #: read since made nothing: no transaction for them) and the stored cursor.
        self._cursor: str | None = None
        self._stored: str | None = None
        self._renew_at = 0.0
        self._untail: Callable[[], None] | None = None
        #: When this replica last tried to take the lease (monotonic).
        self._tried_at = -_TAKE_AGAIN_S
        #: Where a new deployment's cursor starts: the log's head at ``start`` (before
        #: it, a round driven by hand starts at the head then).
        self._origin: Position | None = None

    @property
    def fed(self) -> str | None:
        """How far this replica has fed the log, if it holds the lease."""
        return self._cursor if self.feeding else None

    def lease_until(self) -> dt.datetime:
        """When a lease taken or renewed now ends."""
        return now() + dt.timedelta(seconds=self.settings.lease_s)

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        self._origin = logged_part(self._bus.head)
        self._unlisten = self._bus.listen(self._on_event)
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=self.settings.name)

    async def close(self, *, release: bool = True) -> None:
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None
        task, self._task = self._task, None
        # Cancelled until it ends (``cancel_all``): a feeder that lives on after its
        # close keeps renewing a lease no other replica can then take.
        if task is not None and await cancel_within([task], CLOSE_TIMEOUT_S):
            self._log.warning("%s did not stop at close", self.settings.name)
        if release and self.feeding:
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await self.store.release_lease(self._me)
            except Exception as exc:  # noqa: BLE001 - the lease expires by itself
                log_failure(self._log, f"{self.settings.name} lease not released at close", exc)
        self._lost()

    def _on_event(self, event: events_pb2.Event) -> None:
        # Another replica woken tries to take the lease (a write): at most once a
        # second, not once per event, since it is usually held.
        if self._consumer.wakes(event) and (
            self.feeding or time.monotonic() - self._tried_at >= _TAKE_AGAIN_S
        ):
            self._wake.set()

    # -- rounds ----------------------------------------------------------------------

    async def _loop(self) -> None:
        backoff = Backoff(0.1, self.settings.poll_s * 5)
        while True:
            try:
                more = await self.feed_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - an outage or a bug must not stop it
                log_failure(self._log, f"{self.settings.name} round failed", exc)
                # The round may have committed: the cursor is read again with the lease.
                self._cursor = self._stored = None
                await backoff.wait()
                continue
            backoff.reset()
            if more:
                continue
            # A holder renews its lease well before it runs out; the others look
            # again as often, so one takes over soon after it lapses.
            wait_s = min(self.settings.poll_s, self.settings.lease_s / 3)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._wake.wait()
            self._wake.clear()

    async def feed_once(self) -> bool:
        """One round; True if there may be more to read at once."""
        if (
            not self.feeding or self._cursor is None or time.monotonic() >= self._renew_at
        ) and not await self._hold():
            return False
        cursor, stored = self._cursor, self._stored
        if cursor is None or stored is None:
            return False
        position = parse_cursor(cursor)
        if position is None:
            # First run of the deployment (or an unreadable cursor): from the head this
            # replica started at on.
            origin = logged_part(self._bus.head) if self._origin is None else self._origin
            return await self._advance(stored, format_cursor(origin), None)
        try:
            await self._bus.check_cursor(position)
        except (CursorExpired, CursorAhead):
            horizon = await self._bus.horizon()
            self._log.warning(
                self.settings.gap_warning,
                extra={"cursor": cursor, "resume_after": format_cursor(horizon)},
            )
            return await self._advance(stored, format_cursor(horizon), self._consumer.gap())
        upto = logged_part(self._bus.head)
        if position >= upto:
            return False
        items = await self._bus.read(position, upto, self.settings.batch)
        if not items:
            return False
        work = await self._consumer.taking(items)
        if work is None:
            self._cursor = items[-1].cursor
        else:
            await self._advance(stored, items[-1].cursor, work)
        return len(items) == self.settings.batch

    async def _hold(self) -> bool:
        """Take or renew the lease; whether this replica holds it."""
        stored, fed = self._stored, self._cursor
        if self.feeding and stored is not None and fed is not None and fed != stored:
            # Renewing the lease stores how far the passed-over events went.
            if not await self._advance(stored, fed, None):
                return False
        else:
            self._tried_at = time.monotonic()
            taken = await self.store.take_lease(self._me, self.lease_until())
            if taken is None:
                self._lost()
                return False
            if not self.feeding:
                # The holder reads the whole log (a process without one reads only its
                # control events) while it holds the lease.
                if self._untail is None:
                    self._untail = await self._bus.tail()
                await self._consumer.taken()
            self.feeding = True
            self._leased(taken)
        await self._consumer.renewed()
        return True

    async def _advance(self, old: str, new: str, work: Work | None) -> bool:
        made = await self.store.advance(self._me, old, new, self.lease_until(), work)
        if made is None:
            self._lost()  # another replica took over meanwhile
            return False
        self._leased(new)
        if made:
            self._consumer.written(made)
        return True

    def _leased(self, cursor: str) -> None:
        """The lease was taken or renewed with ``cursor`` as the stored one."""
        self._cursor = self._stored = cursor
        # Renewed well before it runs out; between renewals the cursor is taken
        # from memory (the compare-and-set catches a takeover).
        self._renew_at = time.monotonic() + self.settings.lease_s / 3

    def _lost(self) -> None:
        self.feeding = False
        self._cursor = self._stored = None
        if self._untail is not None:
            self._untail()
            self._untail = None


__all__ = ["FeedSettings", "LeasedFeeder", "LogConsumer"]
