"""Recovery: leases, takeover and reaping.

Runs belong to the instance that admitted them. Each instance renews a lease
in the database; a restarted dispatcher takes its runs back (``recover``), and
so does any other replica once the owner's lease has expired (it died and did
not come back): queued ones are queued again; running ones continue from
their journal (``resume``, the default), fail with RUN_INTERRUPTED (``fail``)
or are queued again (``requeue``), by ``SWITCHBOARD_DISPATCHER_RECOVERY``; a
paused one resumes whatever the policy. A recovered run goes back through the
scheduler (``Admission.admit``) and continues in the next sequence block
(``core/active/live.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

from google.protobuf.message import DecodeError

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher import mapping
from switchboard.dispatcher.budgets.ledger import Amount, LostRecord
from switchboard.dispatcher.runs.core.active.lifecycle import Active
from switchboard.dispatcher.runs.core.active.live import (
    FINISH_TIMEOUT_S,
    Common,
    handler_label,
    next_block,
    queued_again,
)
from switchboard.dispatcher.runs.core.publishing import Publishing
from switchboard.dispatcher.runs.core.records import Charged, Stored
from switchboard.dispatcher.runs.core.store import TERMINAL
from switchboard.dispatcher.tools.journal import cover, unreadable
from switchboard.internal.dispatcher.v1 import job_pb2
from switchboard.platform.errors import (
    HandlerFailed,
    NotFound,
    RunInterrupted,
    RunNotResumable,
    SwitchboardError,
)
from switchboard.platform.observe.metrics import Metrics, run_state_label
from switchboard.platform.security.policy import AuthMethod, Principal, Scope
from switchboard.platform.store.db import log_failure
from switchboard.platform.store.outbox import Staged
from switchboard.platform.values import names

log = logging.getLogger("switchboard.dispatcher")


def read_job(data: bytes) -> tuple[Principal, job_pb2.RunJob]:
    """The stored job, and the principal the run acts for."""
    job = job_pb2.RunJob.FromString(data)
    principal = Principal(
        user_id=job.user_id,
        auth_method=AuthMethod(job.auth_method),
        scopes=frozenset(Scope(s) for s in job.scopes),
        session_id=job.session_id,
        api_key_id=job.api_key_id,
    )
    return principal, job


class Recovery:
    def __init__(
        self,
        *,
        common: Common,
        publishing: Publishing,
        admit: Callable[[Active], None],
        metrics: Metrics | None,
        charge_holds: ChargeHolds | None = None,
        retire: Callable[[Sequence[Active]], list[asyncio.Task[None]]] | None = None,
    ) -> None:
        self._live = common.live
        self._store = common.store
        self._bus = common.bus
        self._router = common.router
        self._feeds = common.feeds
        self._publishing = publishing
        self._limits = common.limits
        #: Back to the scheduler (``Admission.admit``, forced: the run is already stored).
        self._admit = admit
        self._metrics = metrics
        #: Charges the budget holds the lost attempts of runs left, at what they
        #: reserved (``Ledger.charge_lost``); None: no budgets.
        self._charge_holds = charge_holds
        #: Lets go of runs this process holds that another instance took over
        #: (``Execution.retire``); None: nothing to let go of (tests of recovery alone).
        self._retire = retire
        # Where other replicas reach this one (its lease says so); "" until known.
        self._address = ""
        self._leasing: asyncio.Task[None] | None = None
        # Since when every lease renewal succeeded (None: the last one failed).
        self._leased_since: float | None = None
        # Runs taken over or found at start that the database refused to recover yet.
        self._unrecovered: list[tuple[Stored, str]] = []
        # The lease lapsed and the runs taken from this process meanwhile are not
        # let go of yet: it takes no run over until they are.
        self._lapsed = False
        # Tasks of attempts let go of that are still ending: no run is taken over
        # while one may have a write in flight (it could be for a run coming back).
        self._retiring: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self._renew_lease()
        await self.recover()
        self._leasing = asyncio.create_task(self._lease_loop(), name="dispatcher-lease")

    async def stop(self) -> None:
        if self._leasing is not None:
            self._leasing.cancel()
            await asyncio.wait([self._leasing], timeout=FINISH_TIMEOUT_S)

    async def advertise(self, address: str) -> None:
        """Other replicas reach this one at ``address`` (``host:port``) from now on.

        Known once the server is bound, after ``start``: stored in the lease at
        once, so a run this replica recovered at start is reachable before the
        server takes calls.
        """
        self._address = address
        await self._renew_lease()

    async def _renew_lease(self) -> None:
        until = names.now() + dt.timedelta(seconds=self._limits.lease_s)
        held = await self._store.renew_lease(self._limits.instance_id, until, self._address)
        if not held:
            self._lapsed = True
        if self._lapsed:
            await self._let_go_of_lost()
            self._lapsed = False
        if self._leased_since is None:
            self._leased_since = time.monotonic()

    async def _let_go_of_lost(self) -> None:
        """The lease had lapsed: another instance may have taken over runs this
        process still holds (queued, running or paused). Those are let go of
        before anything else, so they neither write for their new owner's run
        nor keep their slots and conversations here; this instance takes no run
        over until their tasks have ended (``RunStore.take_over`` refuses while
        its lease has lapsed). Not awaited here: the renewals go on meanwhile."""
        held = {active.run_id: active for active in self._live.runs.values()}
        if not held or self._retire is None:
            return
        lost = await self._store.foreign(list(held), self._limits.instance_id)
        if lost:
            log.warning(
                "runs this instance held were taken over while its lease had lapsed",
                extra={"count": len(lost)},
            )
            self._retiring.update(self._retire([held[run_id] for run_id in sorted(lost)]))

    async def _lease_loop(self) -> None:
        """Renew this instance's lease; take over the runs of instances whose lease expired."""
        while True:
            await asyncio.sleep(self._limits.lease_s / 3)  # a periodic job, not synchronization
            try:
                await self._renew_lease()
                if self._unrecovered:
                    retry, self._unrecovered = self._unrecovered, []
                    for item, why in retry:
                        await self._recover([item], why)
                # Only after a whole lease of renewals: when the database comes
                # back from an outage, every live instance gets its turn to
                # renew before anyone is judged dead.
                leased_since = self._leased_since
                self._retiring = {task for task in self._retiring if not task.done()}
                if (
                    leased_since is not None
                    and time.monotonic() - leased_since >= self._limits.lease_s
                    and not self._retiring
                ):
                    await self._reap()
            except asyncio.CancelledError:
                raise
            except SwitchboardError:
                self._leased_since = None
                log.warning("dispatcher lease not renewed; retrying")
            except Exception as exc:  # noqa: BLE001 - logged by log_failure
                self._leased_since = None
                log_failure(log, "dispatcher lease loop failed; retrying", exc)

    async def _reap(self) -> None:
        for dead in await self._store.expired_owners(self._limits.instance_id):
            taken = await self._store.take_over(dead, self._limits.instance_id)
            if taken:
                log.warning(
                    "runs taken over from an instance whose lease expired",
                    extra={"instance": dead, "count": len(taken)},
                )
                await self._recover(taken, f"dispatcher {dead} stopped")

    async def recover(self) -> None:
        """Take back the active runs this instance owned before it stopped."""
        stored = await self._store.owned_active(self._limits.instance_id)
        await self._recover(stored, "the dispatcher restarted")

    async def _recover(self, stored: Sequence[Stored], why: str) -> None:
        """Apply the recovery policy to ``stored`` (runs this instance now owns);
        a run the database refuses now is tried again by the lease loop."""
        try:
            await self._recover_now(stored, why)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - logged by log_failure
            # They are this instance's now, whatever failed: none is left behind.
            log_failure(log, "runs not recovered yet; retrying", exc)
            waiting = {item.run.name for item, _ in self._unrecovered}
            self._unrecovered.extend(
                (item, why)
                for item in stored
                if item.run.name not in self._live.runs and item.run.name not in waiting
            )

    async def _recover_now(self, stored: Sequence[Stored], why: str) -> None:
        stored = await self._without_stale(stored, why)
        if self._charge_holds is not None:
            # What their last owner held for steps in flight went with it, and a call
            # in flight may have been billed: charged at what it reserved, never given
            # back for another run to take while it may still be spent. The steps run
            # again (or the runs end) and reserve from what is left. Only runs with no
            # attempt here: a live attempt's holds are its own to settle.
            run_ids = [
                item.run.name.rsplit("/", 1)[-1]
                for item in stored
                if item.run.name not in self._live.runs
            ]
            if run_ids:
                try:
                    charged = await self._charge_holds(
                        run_ids, self._store.charging_lost(self._limits.instance_id)
                    )
                except SwitchboardError:
                    log.warning("budget holds not charged yet; retrying")
                    self._unrecovered.extend((item, why) for item in stored)
                    return
                if charged:
                    log.info("budget holds charged", extra={"runs": len(charged), "why": why})
                    stored = [_with_charge(item, charged) for item in stored]
        for item in stored:
            try:
                await self._recover_one(item, why)
            except SwitchboardError:
                log.warning("run not recovered yet; retrying", extra={"run": item.run.name})
                self._unrecovered.append((item, why))
        if stored:
            log.info("runs recovered", extra={"count": len(stored)})

    async def _without_stale(self, stored: Sequence[Stored], why: str) -> list[Stored]:
        """``stored``, with each run this process still holds an earlier attempt of
        (it had it before another instance took it over, and the attempt has not
        gone yet) read again once that attempt is let go of, or left for the
        lease loop while it lingers: never skipped (it would stay unstarted)."""
        fresh: list[Stored] = []
        stale: dict[str, Active] = {}
        for item in stored:
            earlier = self._live.runs.get(item.run.name)
            if earlier is None:
                fresh.append(item)
            else:
                stale[item.run.name] = earlier
        if not stale:
            return fresh
        if self._retire is not None:
            ending = self._retire(list(stale.values()))
            if ending:
                await asyncio.wait(ending, timeout=FINISH_TIMEOUT_S)
        instance = self._limits.instance_id
        for item in stored:
            earlier = stale.get(item.run.name)
            if earlier is None:
                continue
            if self._live.runs.get(item.run.name) is earlier:
                log.warning("run not recovered yet; retrying", extra={"run": item.run.name})
                self._unrecovered.append((item, why))
                continue
            # Read again: the attempt let go of may have stored more before it went.
            run_id = item.run.name.rsplit("/", 1)[-1]
            try:
                again, owner = await self._store.get_with_owner(
                    item.workspace_id, item.conversation_id, run_id
                )
            except NotFound:
                continue  # purged with its conversation
            except SwitchboardError:
                log.warning("run not recovered yet; retrying", extra={"run": item.run.name})
                self._unrecovered.append((item, why))
                continue
            if owner.instance == instance and again.run.state not in TERMINAL:
                fresh.append(again)
        return fresh

    async def _recover_one(self, item: Stored, why: str) -> None:
        if item.run.name in self._live.runs:
            # Taken over by this process as it stood: the lease loop comes back to it.
            self._unrecovered.append((item, why))
            return
        run = pb.Run()
        run.CopyFrom(item.run)  # a refused attempt is retried from what is stored
        # A new attempt, numbered after anything the last one may have shown.
        run.last_sequence = next_block(run.last_sequence)
        item = Stored(run, item.job, item.workspace_id, item.conversation_id, item.charged)
        if run.state == pb.RUN_STATE_RUNNING and self._limits.recovery == "fail":
            error = RunInterrupted(f"{why} while the run was running")
            await self._fail_unstarted(item, error, why=why, policy="fail")
            return
        try:
            principal, job = read_job(item.job)
        except DecodeError:
            # A job this version cannot read (one stored before runs had tools: its
            # reader is gone, docs/decisions.md): that run fails, the others recover.
            await self._fail_unstarted(
                item,
                RunNotResumable(f"{why}; its stored job cannot be read by this version"),
                why="unreadable job",
            )
            return
        problem = unreadable(job)
        if problem:
            # Never a loop of attempts that cannot work: it ends, saying why.
            await self._fail_unstarted(
                item, RunNotResumable(f"{why}; {problem}"), why="unreadable journal"
            )
            return
        handler = await self._router.find(item.workspace_id, run.handler.removeprefix("handlers/"))
        if handler is None:
            gone = HandlerFailed(f"handler {run.handler} is no longer configured")
            await self._fail_unstarted(item, gone, why="handler gone")
            return
        run_id = run.name.rsplit("/", 1)[-1]
        # A paused run resumes whatever the policy: waiting for a person is a
        # state it was meant to be stored in, and its steps are in its job.
        requeued = run.state in (pb.RUN_STATE_RUNNING, pb.RUN_STATE_REQUIRES_ACTION)
        was, action = run.state, _action(run.state, self._limits.recovery)
        # A running run keeps the deadline it ran under: a crash gives it no new time.
        # (A paused one's deadline stopped with it: it gets its timeout again.)
        kept = (
            run.deadline.ToDatetime(dt.UTC)
            if run.state == pb.RUN_STATE_RUNNING and run.HasField("deadline")
            else None
        )
        if requeued:
            queued_again(run)
            run.last_sequence += 1  # its QUEUED update opens the new block
        # The new block is stored before this attempt shows anything.
        if not await self._store.save(run_id, run, owner=self._limits.instance_id):
            return  # purged, or taken by another instance meanwhile
        # Stamped after what was stored, though this host's clock may run behind.
        feed = self._feeds.open(
            run.name,
            first=run.last_sequence + (0 if requeued else 1),
            not_before_ns=mapping.state_time_ns(run),
            # A watcher from before the block starts from its opening state change:
            # the QUEUED one below, or the run as stored (queued) when none is shown.
            opening=None if requeued else mapping.snapshot(run),
        )
        active = Active(
            run=run,
            run_id=run_id,
            workspace_id=item.workspace_id,
            conversation_id=item.conversation_id,
            principal=principal,
            handler=handler,
            job=job,
            feed=feed,
            # It continues from its journal (a paused one whatever the policy; one
            # queued again at a shutdown has one too).
            recovered=self._limits.recovery if self._limits.recovery != "fail" else "resume",
            # What its earlier attempts were charged: what it reports covers it.
            charged=item.charged,
            deadline_at=kept,
        )
        if requeued:
            self._publishing.state_changed(active)  # the QUEUED update, at run.last_sequence
        self._live.runs[run.name] = active
        log.info(
            "run recovered",
            extra={
                "run": run.name,
                "handler": run.handler,
                "why": why,
                "state": pb.RunState.Name(was),
                "action": action,
            },
        )
        self._admit(active)

    async def _fail_unstarted(self, item: Stored, error: SwitchboardError, **why: str) -> None:
        """End a run recovery does not start, and say why in the log."""
        await self._end_unstarted(item, error)
        log.warning(
            "run failed in recovery",
            extra={"run": item.run.name, "handler": item.run.handler, **why},
        )

    async def _end_unstarted(self, item: Stored, error: SwitchboardError) -> None:
        run = item.run
        run.state = pb.RUN_STATE_FAILED
        run.error.CopyFrom(mapping.error_status(error))
        run.end_time.FromDatetime(names.now())
        run.last_sequence += 1
        # What its earlier attempts' budgets were charged is what it reports.
        charged = item.charged
        cover(run.usage, charged.cost_micros, charged.input_tokens, charged.output_tokens)
        event = mapping.run_event(item.workspace_id, item.conversation_id, mapping.snapshot(run))
        staged: Staged[bool] = Staged(self._bus.outbox, lambda saved: [event] if saved else [])
        run_id = run.name.rsplit("/", 1)[-1]
        await self._store.save(run_id, run, owner=self._limits.instance_id, staged=staged)
        await self._bus.publish_staged(staged.events)
        if self._metrics is not None:
            label = handler_label(self._router, run.handler.removeprefix("handlers/"))
            self._metrics.run_ended(label, run_state_label(pb.RunState.Name(run.state)), None)


#: Charges the holds of runs whose attempts were lost (``Ledger.charge_lost``), each
#: run's charge recorded on it by the callable given: what each run was charged.
ChargeHolds = Callable[[Sequence[str], LostRecord], Awaitable[Mapping[str, Amount]]]


def _with_charge(item: Stored, charged: Mapping[str, Amount]) -> Stored:
    """``item`` with what its lost attempt's holds were just charged added to what
    its earlier attempts were: what its next attempt reports covers it."""
    amount = charged.get(item.run.name.rsplit("/", 1)[-1])
    if amount is None:
        return item
    return dataclasses.replace(
        item,
        charged=item.charged
        + Charged(amount.cost_micros, amount.input_tokens, amount.output_tokens),
    )


def _action(state: int, policy: str) -> str:
    """What recovery does with a run stored in ``state``, as its log line says: a queued
    run is queued again; a running one is requeued under ``requeue`` (a call in flight
    is sent again whatever its tool) and resumed from its journal under ``resume``; a
    paused one is resumed whatever the policy."""
    if state == pb.RUN_STATE_QUEUED:
        return "queued"
    if state == pb.RUN_STATE_RUNNING and policy == "requeue":
        return "requeued"
    return "resumed"
