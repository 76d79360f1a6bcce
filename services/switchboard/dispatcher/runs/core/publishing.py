"""Publishing: a run's updates to its watchers, and where each of them lives.

Every update is shown at once (the run's feed, for WatchRun and Converse) and
becomes a RUN_UPDATED event, published by one publisher task per run so a
run's events reach subscribers in update order. A state change is stored
first and announced only once stored (``persist``): the feed and the events
never say a run ended while the store says it runs (GetRun, ListRuns, the
REJECT check, recovery).

A token is not an event that must survive: a text delta (or a piece of the
answer's ``speech``) is needed while its run is live, so it goes to the feed
(WatchRun's replay ring) and is *announced* (``EventBus.announce``: this
process's ring and subscribers, and the other processes' over an ephemeral
channel), never to the log. State
changes, progress, tool calls and results are logged; the result carries the
whole answer, so a reader who comes late (ListEvents, a resume from an old
cursor, a restart) reads what was said from it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Final

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.dispatcher import mapping
from switchboard.dispatcher.runs.core.active.lifecycle import Active
from switchboard.dispatcher.runs.core.active.live import FINISH_TIMEOUT_S, Common
from switchboard.dispatcher.runs.core.store import TERMINAL, Around
from switchboard.platform.errors import Conflict, DependencyUnavailable, SwitchboardError
from switchboard.platform.events.eventlog import parse_cursor
from switchboard.platform.resilience.backoff import Backoff
from switchboard.platform.store.outbox import Staged
from switchboard.platform.values import names

log = logging.getLogger("switchboard.dispatcher")

#: Most run updates stored in one event log call (one pipeline on Redis).
_PUBLISH_BATCH: Final = 256


class Publishing:
    def __init__(self, *, common: Common) -> None:
        self._store = common.store
        self._bus = common.bus
        self._live = common.live
        self._instance_id = common.limits.instance_id
        #: Every run's publisher task still running (``close`` waits for them).
        self.publishers: set[asyncio.Task[None]] = set()

    async def drain(self, *, timeout_s: float | None = None) -> None:
        """Wait until every run's publisher has handed its events to the log (or
        ``timeout_s`` passed)."""
        if self.publishers:
            await asyncio.wait(set(self.publishers), timeout=timeout_s)

    def state_changed(self, active: Active) -> None:
        # The snapshot carries its own sequence, so a watcher that reads only
        # the run (GetRun, a late WatchRun) knows where the stream stands.
        active.run.last_sequence = active.feed.last + 1
        update = pb.RunUpdate()
        update.state_change.run.CopyFrom(active.run)
        self.emit(active, update)

    def emit(self, active: Active, update: pb.RunUpdate, *, with_end: bool = False) -> None:
        """Show ``update`` to the run's watchers now and queue its event; ``with_end``:
        its event waits for the run's end and is stored with it (``persist``):
        one log batch fewer per run, and the result's event as durable as the end."""
        active.feed.append(update)
        event = mapping.run_event(active.workspace_id, active.conversation_id, update)
        if with_end:
            active.ending.append(event)
            return
        if (
            not active.outbox
            and not active.held
            and is_token(update)
            and (active.publisher is None or active.publisher.done())
        ):
            # Nothing of the run's waits to be logged: the token goes out now, in order.
            self._bus.announce((event,), after=active.logged)
            return
        active.outbox.append(event)
        if not active.held and (active.publisher is None or active.publisher.done()):
            self._start_publisher(active)

    def release(self, active: Active) -> None:
        """Publish the run's held events (it waits in the queue, or it ended
        before reading its context: its end is stored next, RUNNING never)."""
        if active.held:
            active.held = False
            if active.outbox:
                self._start_publisher(active)

    def _start_publisher(self, active: Active) -> None:
        task = asyncio.get_running_loop().create_task(self._publish(active))
        active.publisher = task
        self.publishers.add(task)
        task.add_done_callback(self.publishers.discard)

    async def _publish(self, active: Active) -> None:
        # One publisher per run: its events reach the log in update order on
        # every backend, while runs publish independently of each other.
        # Everything emitted while the previous batch was being stored goes
        # in the next one: a fast handler costs a few log writes, not one per update.
        # Tokens queued behind a logged update go out once it is logged (announced,
        # not logged): a subscriber sees the run's updates in order on this process.
        outbox = active.outbox
        while outbox:
            if _token(outbox[0]):
                tokens = []
                while outbox and _token(outbox[0]):
                    tokens.append(outbox.popleft())
                self._bus.announce(tokens, after=active.logged)
                continue
            batch: list[events_pb2.Event] = []
            while outbox and len(batch) < _PUBLISH_BATCH and not _token(outbox[0]):
                batch.append(outbox.popleft())
            try:
                await self._log(active, batch)
                # Set once the log took them (not while they wait in the outbox); parsed
                # here once per batch, not once per token.
                active.logged = parse_cursor(batch[-1].cursor) or active.logged
            except SwitchboardError:
                if self._bus.outbox is not None:
                    self._bus.outbox.failed(batch)  # a stored end: the relay publishes it
                log.warning("run updates not published", extra={"run": active.run.name})

    async def _log(self, active: Active, batch: list[events_pb2.Event]) -> None:
        """Log ``batch``, the run's next updates, retrying while the log is unavailable.

        Retried in place, so the run's later updates (its tokens too, on Subscribe)
        wait behind it and the log keeps their order; a retry never logs an event
        twice (a staged one is logged by the transaction that retires its outbox
        row; the local log reads back what a write that failed uncertainly did
        commit). Given up only when this process stops: a state change or result
        was stored with the run, so the outbox relay of the next start logs it;
        progress and tool-call updates were never stored and are lost with the
        process, as the feed that showed them is.
        """
        backoff = Backoff(0.05, 2.0)
        waited = False
        while True:
            try:
                await self._bus.publish_many(batch)
            except DependencyUnavailable:
                if self._live.closing:
                    raise
                if not waited:
                    waited = True
                    log.warning(
                        "the event log is unavailable; retrying the run's updates until it answers",
                        extra={"run": active.run.name, "updates": len(batch)},
                    )
                await backoff.wait()
                continue
            if waited:
                log.info("the run's updates were logged after all", extra={"run": active.run.name})
            return

    async def persist(
        self,
        active: Active,
        what: str,
        *,
        job: bool = False,
        other_job: tuple[str, bytes] | None = None,
        around: Around | None = None,
    ) -> bool | None:
        """Store the run as it now stands, then announce it as a state change.

        Announced only once stored: the feed and the events never say a run
        ended while the store says it runs (GetRun, ListRuns, the REJECT
        check, recovery). A save that fails is retried until the database
        answers; if this process stops first, nothing was announced and the
        next owner applies the recovery policy to what is stored.

        ``other_job``: another run's job stored in the same transaction (``RunStore.save``).
        ``around``: the transaction the save goes in (``RunStore.save``: an end with its
        answer). Returns what ``save_until_stored`` does.
        """
        async with active.persisting:
            return await self._persist_now(active, what, job, other_job, around)

    async def _persist_now(
        self,
        active: Active,
        what: str,
        job: bool,
        other_job: tuple[str, bytes] | None = None,
        around: Around | None = None,
    ) -> bool | None:
        run = active.run
        run.last_sequence = active.feed.last + 1
        # Its event is written with it (the outbox): a crash right after the
        # commit cannot leave a stored end that no watcher ever hears of.
        update = pb.RunUpdate(run=run.name, sequence=run.last_sequence)
        update.time.FromDatetime(names.now())
        update.state_change.run.CopyFrom(run)
        event = mapping.run_event(active.workspace_id, active.conversation_id, update)
        # The end carries the result's event: both in the end's transaction
        # (a crash right after it loses neither), then one log batch for both.
        ended = run.state in TERMINAL
        events = [*active.ending, event] if ended else [event]
        outbox = self._bus.outbox
        # On the embedded log an end's events are logged in its own transaction
        # (``Outbox.inline``): none of its own later to wait for, and no second
        # write. The run's earlier events go first, so the log keeps its order.
        inline = ended and outbox is not None and outbox.inline is not None
        if inline:
            await self._logged_so_far(active)
            inline = not active.outbox and not active.held
        staged: Staged[bool] = Staged(
            outbox, lambda stored: events if stored else [], inline=inline
        )
        data = active.job.SerializeToString() if job else None
        saved = await self.save_until_stored(active, what, staged, data, other_job, around)
        if saved and inline and events[-1].cursor:
            # Logged and delivered with the end: the feed shows it now, numbered and
            # stamped as the log has it (WatchRun and Subscribe tell the same update).
            if not active.feed.append_as_logged(update):
                log.warning(
                    "a run's end was logged before an update the feed took meanwhile",
                    extra={"run": run.name, "what": what},
                )
            active.logged = parse_cursor(events[-1].cursor) or active.logged
            active.ending.clear()
        elif saved:
            planned = update.sequence
            active.feed.append(update)
            # The feed stamps it as it takes it, after whatever it took while this
            # was stored; the event says the same (stamps never go backwards).
            event.run_updated.update.time.CopyFrom(update.time)
            if update.sequence != planned:
                # An interactive expert streamed while this was stored: the
                # feed numbered it after those updates; the event says the same.
                event.run_updated.update.sequence = update.sequence
            if outbox is not None:
                outbox.publishing(events)
            active.outbox.extend(events)
            active.ending.clear()
            if active.publisher is None or active.publisher.done():
                self._start_publisher(active)
        elif saved is False:
            log.warning(
                "a run was taken over by another instance; its end here is not announced",
                extra={"run": run.name, "what": what},
            )
        return saved

    async def _logged_so_far(self, active: Active) -> None:
        """Wait until the run's publisher has logged everything emitted so far."""
        while (publisher := active.publisher) is not None and not publisher.done():
            await asyncio.wait((publisher,))

    async def save_until_stored(
        self,
        active: Active,
        what: str,
        staged: Staged[bool] | None,
        job: bytes | None = None,
        other_job: tuple[str, bytes] | None = None,
        around: Around | None = None,
    ) -> bool | None:
        """True once saved, False if another instance owns it now, None if stopping first.
        An outage of ``around``'s write is retried with the save; its refusal is raised."""
        backoff = Backoff(0.05, 2.0)
        began = time.monotonic()
        warned = False
        while True:
            try:
                async with asyncio.timeout(FINISH_TIMEOUT_S):
                    return await self._store.save(
                        active.run_id,
                        active.run,
                        owner=self._instance_id,
                        staged=staged,
                        job=job,
                        other_job=other_job,
                        around=around,
                    )
            except (DependencyUnavailable, Conflict, TimeoutError):
                if self._live.closing and time.monotonic() - began >= FINISH_TIMEOUT_S:
                    log.warning(
                        "a run could not be stored before stopping; its next owner recovers it",
                        extra={"run": active.run.name, "what": what},
                    )
                    return None
                if not warned:
                    warned = True
                    log.warning(
                        "could not store a run; retrying until the database answers",
                        extra={"run": active.run.name, "what": what},
                    )
            await backoff.wait()


def is_token(update: pb.RunUpdate) -> bool:
    """A run's text delta or speech: announced, not logged. Speech is audio a listener
    needs now or never; the stored answer says what was spoken (docs/voice.md)."""
    # Deltas first and by HasField: this runs for every update of every run.
    return update.HasField("delta") or update.HasField("speech")


def _token(event: events_pb2.Event) -> bool:
    return is_token(event.run_updated.update)
