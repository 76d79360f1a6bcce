"""A service's part of the erasures of deleted accounts (docs/privacy.md): a loop in
every process that serves the service, claiming erasures whose part is not done
(``platform/events/erasure/store.py``), erasing, then marking the part done.

The loop wakes at once when an account's deletion is delivered (its SECURITY event,
``ACCOUNT_DELETED``, reaches every process through the log) or a member's removal (which
may come with an erasure of their words in that workspace), and otherwise looks now
and then, for a part a crashed process left claimed until its lease ran out. The
erasing function must be idempotent: a part cut short is done again from the start.

This module does not import grpc.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from typing import Final

from switchboard.api.events.v1 import events_pb2
from switchboard.platform.events.bus import EventBus
from switchboard.platform.events.erasure.store import CONTEXT, ErasureRecord, ErasureStore
from switchboard.platform.events.workers import work_rounds
from switchboard.platform.store.db import Database
from switchboard.platform.values.names import now

log = logging.getLogger(__name__)

#: How long a claimed part is this process's; it renews by finishing sooner, and a
#: part longer than this is taken again by another process (erasing is idempotent).
LEASE: Final = dt.timedelta(minutes=5)

#: How soon a part that was not finished (the person's runs still working) is done again.
AGAIN: Final = dt.timedelta(seconds=1)
#: How soon the events part looks again while an erasure waits for the other parts.
WAITING_POLL: Final = dt.timedelta(milliseconds=500)

#: A part's work; False: not finished yet (it is released and done again soon).
Erase = Callable[[ErasureRecord], Awaitable[bool | None]]


class ErasureWorker:
    """Runs ``erase`` for every erasure whose ``part`` is not done."""

    def __init__(
        self,
        part: str,
        store: ErasureStore,
        bus: EventBus,
        erase: Erase,
        *,
        claimer: str,
        poll_s: float = 5.0,
    ) -> None:
        self.part = part
        self._store = store
        self._bus = bus
        self._erase = erase
        self._claimer = claimer
        self._poll_s = poll_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._unlisten: Callable[[], None] | None = None

    def start(self) -> None:
        self._unlisten = self._bus.listen(self._on_event)
        self._task = asyncio.create_task(
            work_rounds(
                self.run_once,
                self._wake,
                poll_s=self._poll_s,
                what=f"erasure ({self.part})",
                log=log,
            ),
            name=f"erasure-{self.part}",
        )

    async def stop(self) -> None:
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=LEASE.total_seconds())
            self._task = None

    def wake(self) -> None:
        self._wake.set()

    def _on_event(self, event: events_pb2.Event) -> None:
        # An account deleted, a member removed (perhaps with an erasure of their words
        # there), a message deleted (its redaction): look now. A look that finds nothing
        # costs one query.
        if (
            event.type == events_pb2.EVENT_TYPE_SECURITY
            and event.security.kind == events_pb2.SECURITY_EVENT_KIND_ACCOUNT_DELETED
        ) or (
            event.type == events_pb2.EVENT_TYPE_MEMBER_CHANGED
            and event.member_changed.change == events_pb2.CHANGE_KIND_DELETED
        ):
            self._wake.set()
        elif event.type == events_pb2.EVENT_TYPE_MESSAGE_DELETED:
            self._wake.set()  # its redaction was written with it

    async def run_once(self) -> tuple[int, dt.datetime | None]:
        """Claim and erase what is due; (how many parts were done, no next time)."""
        done = 0
        again = False
        for erasure in await self._store.claim(self.part, self._claimer, LEASE):
            if await self._erase(erasure) is False:
                await self._store.release(erasure.id, self.part, self._claimer)
                again = True
                continue
            if await self._store.finish(erasure.id, self.part, self._claimer):
                done += 1
                log.info(
                    "erasure part done",
                    extra={"erasure": erasure.id, "part": self.part, "left": len(erasure.pending)},
                )
        if again:
            return done, now() + AGAIN
        if not done and self.part != CONTEXT and await self._store.waiting(self.part):
            # A later part waits for the earlier ones (``erasures._BEFORE``), which other
            # processes may do: look again soon while one waits.
            return 0, now() + WAITING_POLL
        return done, None


def serve_part(
    resources: contextlib.AsyncExitStack,
    database: Database,
    bus: EventBus,
    part: str,
    erase: Erase,
    *,
    claimer: str,
) -> ErasureWorker:
    """Start ``part``'s worker in a process that serves its service; stopped with it."""
    worker = ErasureWorker(part, ErasureStore(database), bus, erase, claimer=claimer)
    worker.start()
    resources.push_async_callback(worker.stop)
    return worker
