"""Memory forming in one process: the leased feeder (one replica at a time) and the
workers (every replica), started and closed with the dispatcher.

The feeder (``feed.py``) writes a job per finished exchange with its cursor. The
workers claim due jobs (``store.py``), renew their claims while they work, and for
each exchange job: ask the model for a plan (``forming.py``) unless one is stored,
**store the plan**, apply it (``apply.py``), ask for the workspace's consolidation,
and delete the job. A consolidation job runs ``consolidate.py``.

What can go wrong, and what follows:

* the model's answer breaks its schema twice, or no model can be asked: one
  MEMORY_DECIDED FAILED for the exchange, nothing of it applied, the job deleted;
* a whole-workspace budget is at its cap: MEMORY_DECIDED PAUSED (once), the job
  waits (``paused``) until the workspace's budgets change or
  ``SWITCHBOARD_MEMORY_PAUSED_RETRY_S`` passes; runs go on (forming is never on
  a run's path: it starts from the event log only);
* the model, the context service or the database is away: the job is given back
  with a capped backoff, FAILED after ``SWITCHBOARD_MEMORY_MAX_ATTEMPTS``;
* the process dies: the claim lapses, another worker retakes the job, applies the
  stored plan from where it stopped (each decision idempotent), or asks the model
  again if no plan was stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from switchboard.api.events.v1 import events_pb2
from switchboard.dispatcher.memory.apply import Applier, ClaimLost, outcome_event
from switchboard.dispatcher.memory.consolidate import Consolidator
from switchboard.dispatcher.memory.feed import MemoryFeed, Policies
from switchboard.dispatcher.memory.forming import Former
from switchboard.dispatcher.memory.model import BudgetFull, ModelUnavailable
from switchboard.dispatcher.memory.plans.plan import CONSOLIDATE, PAUSED, Exchange, Plan
from switchboard.dispatcher.memory.plans.schema import Unusable
from switchboard.dispatcher.memory.store import Job, JobStore
from switchboard.platform.background import cancel_within
from switchboard.platform.errors import NotFound, PermissionDenied
from switchboard.platform.events.bus import EventBus
from switchboard.platform.events.feeder import FeedSettings, LeasedFeeder
from switchboard.platform.events.workers import work_rounds
from switchboard.platform.security.policy import Permission, Policy, Principal
from switchboard.platform.store.db import Database, log_failure
from switchboard.platform.store.models import MemoryCursorRow
from switchboard.platform.values.names import now
from switchboard.platform.values.resources import WorkspaceName

log = logging.getLogger("switchboard.dispatcher.memory")

CLOSE_TIMEOUT_S: Final = 5.0
FEED_BATCH: Final = 500
_FAILED: Final = events_pb2.MEMORY_FORMING_OUTCOME_FAILED
_PAUSED: Final = events_pb2.MEMORY_FORMING_OUTCOME_PAUSED


@dataclass(frozen=True)
class FormingLimits:
    poll_s: float = 2.0
    lease_s: float = 15.0
    claim_s: float = 60.0
    max_attempts: int = 5
    paused_retry_s: float = 300.0
    consolidate_delay_s: float = 60.0
    #: Jobs claimed (and worked on side by side) per round.
    batch: int = 4
    backoff_base_s: float = 5.0
    backoff_max_s: float = 600.0


@dataclass(frozen=True)
class Parts:
    """What the workers use."""

    former: Former
    applier: Applier
    consolidator: Consolidator
    policies: Policies
    #: The access policy: a round acts for its person only while they may still write
    #: in the workspace (the Local port does not pass the interceptors' checks).
    access: Policy


class MemoryForming:
    """``start()`` runs the feeder and the workers; ``close()`` stops them and gives the
    lease and the claims back (``release=False``: as a crash)."""

    def __init__(
        self,
        database: Database,
        bus: EventBus,
        parts: Parts,
        limits: FormingLimits,
        *,
        instance_id: str,
        rng: random.Random | None = None,
    ) -> None:
        self.store = JobStore(database)
        self._bus = bus
        self._parts = parts
        self.limits = limits
        self._me = instance_id
        self._rng = rng or random.SystemRandom()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._side: set[asyncio.Task[None]] = set()
        self._held: list[Job] = []
        self._unlisten: Callable[[], None] | None = None
        self.feed = MemoryFeed(self.store, parts.policies, wake=self.wake)
        self.feeder = LeasedFeeder(
            database,
            bus,
            MemoryCursorRow,
            self.feed,
            FeedSettings(
                name="memory feeder",
                lease_s=limits.lease_s,
                poll_s=limits.poll_s,
                batch=FEED_BATCH,
                gap_warning="memory feeder cursor is outside the retained event log; the "
                "exchanges that ended meanwhile are not formed",
            ),
            instance_id=instance_id,
            log=log,
        )

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        await self.feeder.start()
        self._unlisten = self._bus.listen(self._on_event)
        self._tasks = [asyncio.get_running_loop().create_task(self._loop(), name="memory-worker")]

    async def close(self, *, release: bool = True) -> None:
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None
        await self.feeder.close(release=release)
        tasks, self._tasks = [*self._tasks, *self._side], []
        if await cancel_within(tasks, CLOSE_TIMEOUT_S):
            log.warning("memory forming did not stop at close")
        if release and self._held:
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await self.store.release(self._held)
            except Exception as exc:  # noqa: BLE001 - the claims expire by themselves
                log_failure(log, "memory forming claims not released at close", exc)
        self._held = []

    def wake(self) -> None:
        self._wake.set()

    def _on_event(self, event: events_pb2.Event) -> None:
        if event.type != events_pb2.EVENT_TYPE_BUDGET_CHANGED:
            return
        workspace = WorkspaceName.parse_or_none(event.workspace)
        if workspace is not None:
            task = asyncio.get_running_loop().create_task(self._budgets(workspace.workspace))
            self._side.add(task)
            task.add_done_callback(self._side.discard)

    async def _budgets(self, workspace_id: str) -> None:
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S * 6):
                if await self.store.wake_paused(workspace_id):
                    self.wake()
        except Exception as exc:  # noqa: BLE001 - the paused jobs retry on their own
            log_failure(log, "paused memory forming not woken", exc)

    # -- the workers ---------------------------------------------------------------------

    async def _loop(self) -> None:
        # Jobs queued here wake the workers; the looks between are for other
        # processes' jobs, less often while none are found.
        await work_rounds(
            self.work_once,
            self._wake,
            poll_s=self.limits.poll_s,
            what="memory forming",
            log=log,
            failed=self._forget_claims,
        )

    def _forget_claims(self) -> None:
        self._held = []

    async def work_once(self) -> tuple[int, dt.datetime | None]:
        """Claim and do one batch of due jobs: (jobs claimed, when the next falls due)."""
        until = now() + dt.timedelta(seconds=self.limits.claim_s)
        jobs, later = await self.store.claim(self._me, until, self.limits.batch)
        if not jobs:
            return 0, later
        self._held = list(jobs)
        renewing = asyncio.get_running_loop().create_task(self._renew(jobs))
        try:
            outcomes = await asyncio.gather(
                *(self._do(job) for job in jobs), return_exceptions=True
            )
            for job, outcome in zip(jobs, outcomes, strict=True):
                if isinstance(outcome, Exception):
                    # Its claim lapses and it is retaken (an outage while recording it).
                    log_failure(log, f"memory job {job.id} not settled", outcome)
        finally:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewing
            self._held = []
        return len(jobs), later

    async def _renew(self, jobs: Sequence[Job]) -> None:
        while True:
            await asyncio.sleep(self.limits.claim_s / 3)  # a period, not synchronization
            try:
                await self.store.renew(jobs, now() + dt.timedelta(seconds=self.limits.claim_s))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the guarded writes skip lapsed claims
                log_failure(log, "memory job claims not renewed", exc)

    async def _do(self, job: Job) -> None:
        try:
            exchange = Exchange.loads(job.exchange)
        except (ValueError, KeyError, TypeError):
            log.warning("memory job unreadable; dropped", extra={"job": job.id})
            await self.store.drop(job)
            return
        try:
            if job.kind == CONSOLIDATE:
                await self.store.finish(job, await self._parts.consolidator.run(job))
            else:
                await self._form(job, exchange)
        except ClaimLost:
            log.info("memory job taken over by another worker", extra={"job": job.id})
        except Unusable as exc:
            await self._failed(job, exchange, f"the model's answer broke its schema twice ({exc})")
        except ModelUnavailable as exc:
            if exc.retryable:
                await self._later(job, exchange, str(exc))
            else:
                await self._failed(job, exchange, str(exc))
        except BudgetFull as exc:
            if job.state != PAUSED:
                await self._bus.publish(
                    outcome_event(job, exchange, _PAUSED, f"budget at its cap: {exc}")
                )
            when = now() + dt.timedelta(seconds=self.limits.paused_retry_s)
            await self.store.put_back(job, when, f"budget at its cap: {exc}", paused=True)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - an outage (or a bug): retried, then FAILED
            log_failure(log, "memory forming job failed", exc)
            await self._later(job, exchange, type(exc).__name__)

    async def _form(self, job: Job, whole: Exchange) -> None:
        try:
            await self._parts.access.authorize(
                Principal.acting_for(whole.user_id),
                str(WorkspaceName(job.workspace_id)),
                Permission.WRITE,
                "memory",
            )
        except (NotFound, PermissionDenied):
            # Removed from the workspace, or made a viewer, since the run: nothing of
            # the exchange is remembered for them.
            await self._failed(job, whole, "the person may no longer write in the workspace")
            return
        if job.plan:
            plan = Plan.loads(job.plan)
        else:
            decided = await self._parts.former.form(job, whole)
            runs = [turn.run for turn in whole.turns]
            if decided is None:
                await self.store.finish(job, runs)
                return
            plan = decided
            plan.runs = runs
            # Stored before anything is applied: a crash from here on re-applies it.
            if not await self.store.store_plan(job, plan.dumps()):
                raise ClaimLost(job.id)
        # Only the exchanges the plan formed (an idle conversation's may have grown).
        exchange = whole.only(plan.runs) if plan.runs else whole
        await self._parts.applier.apply(job, exchange, plan)
        if any(d.action != "none" for d in plan.decisions):
            users = [
                d.scope.removeprefix("users/")
                for d in plan.decisions
                if d.scope.startswith("users/")
            ]
            await self.store.consolidate(
                job.workspace_id,
                exchange.user_id,
                users,
                now() + dt.timedelta(seconds=self.limits.consolidate_delay_s),
            )
        await self.store.finish(job, [turn.run for turn in exchange.turns])

    async def _failed(self, job: Job, exchange: Exchange, reason: str) -> None:
        log.warning("memory forming failed", extra={"job": job.id, "detail": reason})
        if job.kind == CONSOLIDATE:
            await self.store.drop(job)  # asked for again by the next exchange formed
            return
        await self._bus.publish(outcome_event(job, exchange, _FAILED, reason[:500]))
        await self.store.drop(job)

    async def _later(self, job: Job, exchange: Exchange, reason: str) -> None:
        if job.attempts + 1 >= self.limits.max_attempts:
            await self._failed(job, exchange, reason)
            return
        ceiling = min(
            self.limits.backoff_max_s, self.limits.backoff_base_s * 2 ** min(job.attempts, 30)
        )
        delay = ceiling / 2 + self._rng.uniform(0.0, ceiling / 2)
        await self.store.put_back(job, now() + dt.timedelta(seconds=delay), reason)


__all__ = ["FormingLimits", "MemoryForming", "Parts"]
