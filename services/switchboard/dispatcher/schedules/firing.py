"""The firing loop: each schedule's ticks claimed once in the database, then sent as
ordinary messages through admission (docs/schedules.md).

One loop per dispatcher replica, started and stopped with the dispatcher. Each
pass:

1. finds the schedules due (ACTIVE, next tick at or before now) and **claims**
   each tick in one transaction: the firing row inserted (its primary key is
   (schedule, tick)) and the schedule's next tick moved on, conditional on the
   tick it read. Two replicas never both claim a tick: one update matches
   nothing, or one insert fails. One claim takes **every** tick due (up to
   ``MAX_TICKS_PER_CLAIM``; the next pass comes at once for the rest), so a
   loop that fell behind catches up in one pass, not a tick a poll. A tick
   found due more than the grace after its time is *missed*: SKIP records it
   (at most the latest ``MAX_RECORDED_MISSED``) SKIPPED; RUN_ONCE fires the
   latest missed tick once (``catch_up``) and records the others SKIPPED. The
   ticks due within the grace fire as usual, whatever the policy;
2. sends each claimed tick through admission (``Admission.send_message``) as
   the schedule's creator, re-authorized for WRITE first, with a request id
   derived from the schedule and the tick, and records the outcome on the
   firing (STARTED with its run, SKIPPED, FAILED with the status) with its
   SCHEDULE_FIRED event. A SHARED conversation's ticks are sent in order, one
   after another; PER_RUN ticks (each its own conversation) side by side;
3. now and then, replays the ticks this replica claimed and did not settle
   (it restarted, or the database was away), and takes over those claimed by
   a replica whose dispatcher lease expired: replayed with the same request
   id, so admission answers with the run the first attempt made, if it made
   one: a tick never runs twice.

The loop survives a database outage (logged once, retried with backoff) and
never waits on the network without a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final

from google.protobuf import struct_pb2

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher import mapping
from switchboard.dispatcher.ports.context import ContextPort
from switchboard.dispatcher.schedules import mapping as schedule_mapping
from switchboard.dispatcher.schedules import times
from switchboard.dispatcher.schedules.catalog import derived_id, render
from switchboard.dispatcher.schedules.store import (
    CLAIMED,
    FiringRecord,
    NewFiring,
    ScheduleRecord,
    ScheduleStore,
)
from switchboard.platform import background
from switchboard.platform.errors import (
    Conflict,
    ConversationBusy,
    DependencyUnavailable,
    FailedPrecondition,
    SwitchboardError,
)
from switchboard.platform.events.bus import EventBus
from switchboard.platform.resilience.backoff import IdlePoll
from switchboard.platform.security.policy import Permission, Policy, Principal
from switchboard.platform.store.outbox import Staged

log = logging.getLogger("switchboard.dispatcher.schedules")

#: Missed ticks recorded per claim (SKIPPED, or SKIPPED and the one RUN_ONCE fires);
#: a longer gap is said in the oldest one's error.
MAX_RECORDED_MISSED: Final = 5
#: Ticks due within the grace that one claim takes (a cron every second with a grace
#: of 60 s has up to 61); the rest are claimed by the next pass, which comes at once.
MAX_TICKS_PER_CLAIM: Final = 100
#: The resolution of ticks (microseconds): the latest tick that counts as missed is
#: this much before ``now - grace``.
_TICK: Final = dt.timedelta(microseconds=1)
#: Schedules claimed, and leftover claims replayed, per pass.
BATCH: Final = 100
#: Claimed ticks sent at once.
CONCURRENT_SENDS: Final = 8
#: The longest wait for one tick's start (authorization, conversation, admission).
SEND_TIMEOUT_S: Final = 30.0
#: The longest wait between passes after failures (the database away).
MAX_BACKOFF_S: Final = 30.0
#: How often leftover and orphaned claims are looked for, at most.
MAX_SCAN_S: Final = 10.0

Send = Callable[[Principal, pb.SendMessageRequest, str], Awaitable[pb.SendMessageResponse]]
#: PlaceCall as a user (by id), for a schedule (its name): a tick of a schedule that calls.
Place = Callable[[str, pb.PlaceCallRequest, str], Awaitable[pb.Call]]
#: The tick's message metadata that says where a schedule that calls calls.
CALL_TRUNK: Final = "call_trunk"
CALL_TO: Final = "call_to"


@dataclass(frozen=True)
class FiringSettings:
    instance_id: str
    #: Seconds between passes at most (``SWITCHBOARD_SCHEDULES_POLL_S``).
    poll_s: float = 1.0
    #: A tick older than this when claimed is missed (``SWITCHBOARD_SCHEDULES_MISSED_GRACE_S``).
    grace_s: float = 60.0
    #: The dispatcher's lease: claims of a replica whose lease expired are taken over.
    lease_s: float = 30.0


class _Later(Exception):
    """The tick cannot be started now (a dependency is away): it stays CLAIMED and is
    replayed on a later pass."""


class Firing:
    def __init__(
        self,
        *,
        store: ScheduleStore,
        bus: EventBus,
        context: ContextPort,
        policy: Policy,
        send: Send,
        settings: FiringSettings,
        place: Place | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._bus = bus
        self._context = context
        self._policy = policy
        self._send = send
        self._place = place
        self.settings = settings
        #: Seconds since the epoch: what "now" is for ticks (tests move it).
        self.clock = clock
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        #: The wait between passes while nothing is due (``poll_s``, stretched while idle).
        self._idle = IdlePoll(self.settings.poll_s)
        #: Ticks being sent by this process: (workspace, schedule, tick).
        self._sending: set[tuple[str, str, int]] = set()
        #: The lines being sent, by conversation (SHARED) or tick (PER_RUN): the ticks
        #: each has yet to send. A tick claimed for a line under way joins it.
        self._lines: dict[tuple[str, ...], list[FiringRecord]] = {}
        self._scanned_at: float | None = None
        self._gate = asyncio.Semaphore(CONCURRENT_SENDS)
        #: The loop's sends under way: a pass claims the next ticks without waiting
        #: for the last pass's runs to start (a slow start must not make ticks late).
        self._sends: set[asyncio.Task[None]] = set()

    # -- the process ------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="schedule-firing")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=SEND_TIMEOUT_S)
            self._task = None
        # A send cut here leaves its tick CLAIMED: replayed (same request id) after
        # the restart, or taken over once this replica's lease expires.
        sends = list(self._sends)
        for send in sends:
            send.cancel()
        if sends:
            await asyncio.wait(sends, timeout=SEND_TIMEOUT_S)

    def wake(self) -> None:
        """A schedule changed here: look again now rather than at the next poll."""
        self._wake.set()

    async def _loop(self) -> None:
        failing = False
        backoff = self.settings.poll_s
        while True:
            try:
                wait = await self.run_once(wait=False)
                if failing:
                    log.info("schedules fire again")
                failing = False
                backoff = self.settings.poll_s
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # logged once per outage, then retried
                if not failing:
                    log.warning(
                        "schedules cannot fire now (%s); retrying with backoff",
                        type(exc).__name__,
                        exc_info=not isinstance(exc, SwitchboardError),
                    )
                failing = True
                wait = backoff
                backoff = min(backoff * 2, MAX_BACKOFF_S)
            await self._sleep(wait)

    async def _sleep(self, seconds: float) -> None:
        # A periodic job's wait, cut short by ``wake``: not synchronization.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(seconds, 0.0)):
                await self._wake.wait()
                self._idle.reset()
        self._wake.clear()

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock(), dt.UTC)

    # -- one pass -------------------------------------------------------------------------

    async def run_once(self, *, wait: bool = True) -> float:
        """Claim and send what is due (and, now and then, leftover claims); returns the
        seconds until the next pass is wanted. ``wait``: until the sends are done (the
        loop's own passes do not wait; a test's do)."""
        started = time.monotonic()
        scan_every = min(max(self.settings.lease_s / 3, 1.0), MAX_SCAN_S)
        if self._scanned_at is None or started - self._scanned_at >= scan_every:
            await self.replay_claimed(wait=wait)
            self._scanned_at = started
        now_us = times.to_us(self._now())
        due, next_us = await self._store.due(now_us, BATCH)
        claimed: list[FiringRecord] = []
        for record in due:
            try:
                claimed.extend(await self.claim(record))
            except SwitchboardError:
                raise  # the database away: the whole pass is retried with backoff
            except Exception:
                # One schedule this version cannot fire must not stop the others.
                log.exception(
                    "schedule tick not claimed",
                    extra={
                        "schedule": schedule_mapping.schedule_name(record.workspace_id, record.id)
                    },
                )
        await self._send_all(claimed, wait=wait)
        if len(due) == BATCH:
            return 0.0
        if due:
            next_us = await self._store.next_due()  # the claims moved the ticks on
        # Schedules changed here wake the loop; the looks between are for other
        # processes' changes (their own loops fire them), less often while none are due.
        longest = self._idle.after(found=bool(due))
        if next_us is None:
            return longest
        return min(max((next_us - times.to_us(self._now())) / 1e6, 0.0), longest)

    async def replay_claimed(self, *, wait: bool = True) -> int:
        """Send again the ticks this replica claimed and did not settle, and take over
        those of replicas whose lease expired; returns how many were sent (``wait``: as
        ``run_once``)."""
        own = [
            firing
            for firing in await self._store.claimed_by(self.settings.instance_id, BATCH)
            if _key(firing) not in self._sending
        ]
        taken = await self._store.take_over(self.settings.instance_id, BATCH)
        if taken:
            log.warning(
                "schedule ticks taken over from replicas whose lease expired",
                extra={"count": len(taken), "from": sorted({f.claimer for f in taken})},
            )
        await self._send_all([*own, *taken], wait=wait)
        return len(own) + len(taken)

    # -- the claim ------------------------------------------------------------------------

    async def claim(self, record: ScheduleRecord) -> list[FiringRecord]:
        """Claim every due tick of ``record`` (at most ``MAX_TICKS_PER_CLAIM`` within the
        grace) and record the ticks it missed; the claimed ticks to send, oldest first
        (none if another replica claimed them first, or all were skipped)."""
        if record.next_fire_us is None:
            return []
        settings = pb.Schedule.FromString(record.data)
        cadence = schedule_mapping.cadence(settings)
        tick = times.from_us(record.next_fire_us)
        now = self._now()
        grace = dt.timedelta(seconds=self.settings.grace_s)
        # Missed: found due more than the grace after its time (docs/schedules.md).
        missed: list[dt.datetime] = []
        more = False
        on_time: dt.datetime | None = tick
        if now - tick > grace:
            missed, more = cadence.missed(tick, now - grace - _TICK, MAX_RECORDED_MISSED)
            on_time = cadence.after(missed[-1])
        due: list[dt.datetime] = []
        while on_time is not None and on_time <= now and len(due) < MAX_TICKS_PER_CLAIM:
            due.append(on_time)
            on_time = cadence.after(on_time)
        if not missed and not due:
            return []  # not due yet (the clock went back since the schedule was read)
        skipped = missed
        # (tick, catch_up) of each tick to send.
        sends = [(at, False) for at in due]
        if missed and settings.missed_tick_policy == pb.MISSED_TICK_POLICY_RUN_ONCE:
            skipped = missed[:-1]
            sends.insert(0, (missed[-1], True))
        last = due[-1] if due else missed[-1]
        following = cadence.after(last)
        rows = [self._skipped(at, now, more and i == 0) for i, at in enumerate(skipped)]
        fired: list[FiringRecord] = []
        for at, catch_up in sends:
            request, title = self._request(record, settings, at)
            new = NewFiring(
                fire_us=times.to_us(at),
                outcome=CLAIMED,
                catch_up=catch_up,
                request=request.SerializeToString(deterministic=True),
                title=title,
            )
            rows.append(new)
            fired.append(
                FiringRecord(
                    workspace_id=record.workspace_id,
                    schedule_id=record.id,
                    fire_us=new.fire_us,
                    claim_time=now,
                    claimer=self.settings.instance_id,
                    outcome=CLAIMED,
                    catch_up=new.catch_up,
                    run="",
                    error=b"",
                    request=new.request,
                    title=title,
                    creator=record.creator,
                )
            )
        events = [
            schedule_mapping.fired_event(
                FiringRecord(
                    workspace_id=record.workspace_id,
                    schedule_id=record.id,
                    fire_us=row.fire_us,
                    claim_time=now,
                    claimer=self.settings.instance_id,
                    outcome=row.outcome,
                    catch_up=False,
                    run="",
                    error=row.error,
                    request=b"",
                    title="",
                    creator=record.creator,
                )
            )
            for row in rows
            if row.outcome != CLAIMED
        ]
        staged: Staged[bool] = Staged(self._bus.outbox, lambda won: events if won else [])
        try:
            won = await self._store.claim(
                record,
                next_fire_us=times.to_us(following) if following is not None else None,
                last_fire_us=times.to_us(last),
                firings=rows,
                claimer=self.settings.instance_id,
                staged=staged,
            )
        except Conflict:
            won = False  # another replica inserted the same tick first
        if not won:
            return []
        await self._bus.publish_staged(staged.events)
        if skipped:
            log.warning(
                "schedule ticks missed",
                extra={
                    "schedule": schedule_mapping.schedule_name(record.workspace_id, record.id),
                    "recorded": len(skipped),
                    "more": more,
                    "policy": pb.MissedTickPolicy.Name(settings.missed_tick_policy),
                },
            )
        return fired

    def _skipped(self, tick: dt.datetime, now: dt.datetime, more_before: bool) -> NewFiring:
        late = round((now - tick).total_seconds(), 1)
        why = (
            f"missed: found due {late:g} s after its time, more than "
            f"SWITCHBOARD_SCHEDULES_MISSED_GRACE_S ({self.settings.grace_s:g} s): no replica "
            "could fire it in time"
        )
        if more_before:
            why += (
                f"; earlier ticks were missed too (the latest {MAX_RECORDED_MISSED} are recorded)"
            )
        status = mapping.error_status(FailedPrecondition(why))
        return NewFiring(
            fire_us=times.to_us(tick),
            outcome=int(pb.FIRING_OUTCOME_SKIPPED),
            error=status.SerializeToString(),
        )

    @staticmethod
    def _request(
        record: ScheduleRecord, settings: pb.Schedule, tick: dt.datetime
    ) -> tuple[pb.SendMessageRequest, str]:
        """The message a tick sends, fixed at its claim (a replay sends the same bytes),
        and for PER_RUN the title of the conversation it makes."""
        cadence = schedule_mapping.cadence(settings)
        local = tick.astimezone(cadence.tz)
        name = schedule_mapping.schedule_name(record.workspace_id, record.id)
        metadata = struct_pb2.Struct()
        metadata.update({"schedule": name, "fire_time": local.isoformat()})
        if settings.HasField("call"):
            # Fixed at the claim with the rest: a replay calls where the tick did.
            metadata.update({CALL_TRUNK: settings.call.trunk, CALL_TO: settings.call.to_number})
        request = pb.SendMessageRequest(
            message=cpb.Message(
                parts=[
                    cpb.ContentPart(
                        text=render(settings.message_template, local, settings.display_name)
                    )
                ],
                metadata=metadata,
            ),
            assistant=settings.assistant,
            assistant_revision=settings.assistant_revision,
            handler=settings.handler,
            request_id=derived_id(record.uid, times.to_us(tick)),
            concurrency_policy=settings.concurrency_policy,
        )
        if settings.HasField("timeout"):
            request.timeout.CopyFrom(settings.timeout)
        title = ""
        if record.conversation_id:
            request.conversation = mapping.conversation_name(
                record.workspace_id, record.conversation_id
            )
        else:
            title = f"{settings.display_name} · {local.isoformat()}"[:200]
        return request, title

    # -- sending --------------------------------------------------------------------------

    async def _send_all(self, firings: Sequence[FiringRecord], *, wait: bool) -> None:
        # A SHARED conversation's ticks go one after another, oldest first: sent side by
        # side, a later tick's message could be stored (and answered) before an earlier
        # one's, and under REJECT find the conversation busy with its own backlog. That
        # holds across passes too: a tick claimed while its conversation's line is still
        # sending joins that line, not a line of its own beside it.
        # PER_RUN ticks (a title for a conversation of their own) have no order to keep.
        lines: dict[tuple[str, ...], list[FiringRecord]] = {}
        for firing in sorted(firings, key=lambda f: f.fire_us):
            if _key(firing) in self._sending:
                continue
            order: tuple[str, ...] = (
                (firing.workspace_id, firing.schedule_id, str(firing.fire_us))
                if firing.title
                else (firing.workspace_id, firing.schedule_id)
            )
            lines.setdefault(order, []).append(firing)
        started: list[Awaitable[None]] = []
        for order, line in lines.items():
            self._sending.update(_key(firing) for firing in line)
            pending = self._lines.get(order)
            if pending is not None:
                pending.extend(line)  # the line under way sends them next, oldest first
                continue
            self._lines[order] = pending = list(line)
            if wait:
                started.append(self._fire(order, pending))
                continue
            background.spawn(
                self._fire_later(order, pending),
                name=f"schedule-tick-{line[0].schedule_id}",
                logger=log,
                keep=self._sends,
            )
        if started:
            await asyncio.gather(*started)

    async def _fire_later(self, order: tuple[str, ...], pending: list[FiringRecord]) -> None:
        """``_fire`` off the loop's pass: a failure leaves the ticks CLAIMED, and the
        next scan replays them (the pass's own failures are the loop's backoff)."""
        schedule = pending[0].schedule_id
        try:
            await self._fire(order, pending)
        except SwitchboardError as error:
            log.info(
                "schedule ticks left claimed; replayed later",
                extra={"schedule": schedule, "reason": error.reason},
            )

    async def _fire(self, order: tuple[str, ...], pending: list[FiringRecord]) -> None:
        """Send the line's ticks, oldest first, until none is left (a later pass may add
        some); the first that cannot be started now stops the line (the rest stay
        CLAIMED for the next scan, still in order)."""
        try:
            while pending:
                firing = min(pending, key=lambda f: f.fire_us)
                pending.remove(firing)
                try:
                    if not await self._fire_one(firing):
                        return
                finally:
                    self._sending.discard(_key(firing))
        finally:
            self._sending.difference_update(_key(firing) for firing in pending)
            pending.clear()
            if self._lines.get(order) is pending:
                del self._lines[order]

    async def _fire_one(self, firing: FiringRecord) -> bool:
        """Start one tick and record its outcome; False if it stays CLAIMED (later)."""
        async with self._gate:
            try:
                outcome, run, error = await self._start(firing)
            except _Later as later:
                log.info(
                    "schedule tick not started yet; retrying",
                    extra={"schedule": firing.schedule_id, "why": str(later)},
                )
                return False
            staged: Staged[FiringRecord | None] = Staged(
                self._bus.outbox,
                lambda done: [schedule_mapping.fired_event(done)] if done else [],
            )
            await self._store.settle(firing, outcome=outcome, run=run, error=error, staged=staged)
            await self._bus.publish_staged(staged.events)
        return True

    async def _start(self, firing: FiringRecord) -> tuple[int, str, bytes]:
        """Start the tick's run: (outcome, run, error status)."""
        # Its runs act as its creator (their right to write is checked at each tick).
        principal = Principal.acting_for(firing.creator)
        request = pb.SendMessageRequest.FromString(firing.request)
        workspace = mapping.workspace_name(firing.workspace_id)
        schedule = schedule_mapping.schedule_name(firing.workspace_id, firing.schedule_id)
        metadata = request.message.metadata.fields
        try:
            async with asyncio.timeout(SEND_TIMEOUT_S):
                # Its runs act as its creator, who must still be able to write here.
                await self._policy.authorize(principal, workspace, Permission.WRITE, "schedule")
                if CALL_TO in metadata:
                    call = await self._call(firing, request, workspace, schedule)
                    return int(pb.FIRING_OUTCOME_STARTED), call.name, b""
                if not request.conversation:
                    made = await self._context.create_conversation(
                        principal,
                        cpb.CreateConversationRequest(
                            parent=workspace,
                            conversation=cpb.Conversation(title=firing.title),
                            request_id=derived_id("conversation", request.request_id),
                        ),
                        timeout_s=SEND_TIMEOUT_S,
                    )
                    request.conversation = made.name
                response = await self._send(principal, request, schedule)
        except TimeoutError:
            raise _Later("timed out") from None
        except ConversationBusy as busy:
            return int(pb.FIRING_OUTCOME_SKIPPED), "", _status(busy)
        except DependencyUnavailable as away:
            raise _Later(type(away).__name__) from None
        except SwitchboardError as refused:
            return int(pb.FIRING_OUTCOME_FAILED), "", _status(refused)
        return int(pb.FIRING_OUTCOME_STARTED), response.run.name, b""

    async def _call(
        self, firing: FiringRecord, request: pb.SendMessageRequest, workspace: str, schedule: str
    ) -> pb.Call:
        """A tick of a schedule that calls: PlaceCall as its creator, the rendered message
        its opening (the call makes its own conversation); the tick's request id makes a
        replay return the first call, never place a second."""
        if self._place is None:
            raise FailedPrecondition("this server places no phone calls")
        fields = request.message.metadata.fields
        opening = "".join(part.text for part in request.message.parts)
        return await self._place(
            firing.creator,
            pb.PlaceCallRequest(
                parent=workspace,
                trunk=fields[CALL_TRUNK].string_value,
                to_number=fields[CALL_TO].string_value,
                assistant=request.assistant,
                opening_message=opening,
                request_id=request.request_id,
            ),
            schedule,
        )


def _status(error: SwitchboardError) -> bytes:
    status: bytes = mapping.error_status(error).SerializeToString()
    return status


def _key(firing: FiringRecord) -> tuple[str, str, int]:
    return (firing.workspace_id, firing.schedule_id, firing.fire_us)
