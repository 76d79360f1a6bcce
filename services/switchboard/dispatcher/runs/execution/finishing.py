"""A run's end in this process: stored (with its answer, where it waits), announced,
and the run let go of; or, when the dispatcher stops, left to the restart.

``finish`` is every run's last step, however it ended (its task's end, a cancel
of a queued run): the end is stored in the transaction that stores its answer
(``core/answers.py``; a refused answer fails the run saying why), its feed
closes, it leaves this process's live runs and its end is logged and measured.
A run another instance took over (``Active.retired``) stores nothing of this
attempt: it is let go of. A run running or paused when the dispatcher stops is
stored to be taken up again after the restart (``requeue_at_shutdown``,
``leave_paused``).

Why a module of its own: the end is where a run's writes, its answer, its usage
and this process's books of live runs meet, and each of the ways a run can end
(its task, a cancel, a takeover, a stop) comes through here; apart from the
execution stage's way through the handler, each reads on its own.
"""

from __future__ import annotations

import logging
import time

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher import mapping
from switchboard.dispatcher.ports.context import ContextPort
from switchboard.dispatcher.runs.core.active.lifecycle import Active
from switchboard.dispatcher.runs.core.active.live import Common, handler_label, queued_again
from switchboard.dispatcher.runs.core.answers import Renamed, answering
from switchboard.dispatcher.runs.core.publishing import Publishing
from switchboard.dispatcher.runs.core.steers import SteerBook
from switchboard.dispatcher.runs.execution.charges import Charges
from switchboard.dispatcher.runs.execution.hosting import saved_start
from switchboard.platform.errors import SwitchboardError
from switchboard.platform.observe.metrics import Metrics, run_state_label
from switchboard.platform.values import names

log = logging.getLogger("switchboard.dispatcher")


class Finishing:
    """The ends of this process's runs."""

    def __init__(
        self,
        *,
        common: Common,
        publishing: Publishing,
        context: ContextPort,
        charges: Charges,
        metrics: Metrics | None,
        steers: SteerBook | None,
    ) -> None:
        self._live = common.live
        self._store = common.store
        self._feeds = common.feeds
        self._router = common.router
        self._publishing = publishing
        self._context = context
        self._charges = charges
        self._metrics = metrics
        self._steers = steers

    async def finish(self, active: Active, error: SwitchboardError | None) -> None:
        """The run's end: stored, announced, and its place given back."""
        run = active.run
        self._publishing.release(active)
        if self._steers is not None:
            # Steers it did not take run as queued runs; its watchers hear so first.
            self._steers.target_ended(active)
        await saved_start(active)
        if active.retired:
            # Its new owner runs or ends it: nothing of this attempt is stored or shown.
            self.let_go(active)
            return
        if error is not None:
            run.error.CopyFrom(mapping.error_status(error))
        run.end_time.FromDatetime(names.now())
        # No result carries what a failed or cancelled run spent: its charges do, so
        # the run (and QueryUsage) says what its budgets were charged.
        self._charges.cover(run.usage, active)
        if active.journal is not None:
            # Charges say nothing of prices: the journal counts the unpriced calls.
            run.usage.unpriced_calls = max(run.usage.unpriced_calls, active.journal.unpriced_calls)
        if await self._persist_end(active) is False:
            active.retired = True  # another instance's: a call on it goes there
        self._feeds.close(active.feed)
        self._forget(active)
        self._ended(active, error)

    def let_go(self, active: Active) -> None:
        """``active`` leaves this process to its new owner (another instance)."""
        self._feeds.close(active.feed)
        self._forget(active)
        log.info("run given up to its new owner", extra={"run": active.run.name})

    async def requeue_at_shutdown(self, active: Active) -> None:
        """Stopping while it runs: stored QUEUED again, for the restart to run."""
        self._publishing.release(active)
        await saved_start(active)
        run = active.run
        active.to(pb.RUN_STATE_QUEUED)
        queued_again(run)
        await self._publishing.persist(active, "requeue")
        log.info("run requeued at shutdown", extra={"run": run.name, "handler": run.handler})

    async def leave_paused(self, active: Active) -> None:
        """Stopping while it waits for approvals: it stays stored as it is."""
        self._publishing.release(active)
        await saved_start(active)
        self._feeds.close(active.feed)
        self._forget(active)

    async def _persist_end(self, active: Active) -> bool | None:
        """The end stored (with the answer, where it waits), then announced."""
        around = answering(active, self._context, self._store)
        try:
            return await self._publishing.persist(active, "end", around=around)
        except Renamed as renamed:
            active.run.output_message = renamed.name
            return await self._publishing.persist(active, "end")
        except SwitchboardError as refused:
            if around is None:
                raise
            return await self._answer_refused(active, refused)
        finally:
            active.answer = None

    async def _answer_refused(self, active: Active, refused: SwitchboardError) -> bool | None:
        """The context service refused the answer (its conversation went away, a limit
        of its own): the run fails saying why, as it did when the answer was stored
        before the end. Its watchers saw the result; its end says it was not kept."""
        log.warning(
            "a run's answer was refused; the run fails",
            extra={"run": active.run.name, "error": type(refused).__name__},
        )
        run = active.run
        # Set, not moved (``Active.to``): its end was not stored, so SUCCEEDED never was.
        run.state = pb.RUN_STATE_FAILED
        run.ClearField("output_message")
        run.error.CopyFrom(mapping.error_status(refused))
        active.ending.clear()  # the result's event: the log never says it
        return await self._publishing.persist(active, "end")

    def _forget(self, active: Active) -> None:
        """``active`` leaves this process's live runs (if it still stands for its run)."""
        if self._live.runs.get(active.run.name) is active:
            del self._live.runs[active.run.name]

    def _ended(self, active: Active, error: SwitchboardError | None) -> None:
        """Log and measure a run's end: state, handler, duration, usage."""
        run = active.run
        state = pb.RunState.Name(run.state)
        duration = time.monotonic() - active.started_at if active.started_at else None
        if self._metrics is not None:
            label = handler_label(self._router, active.handler.capabilities.id, active.handler)
            self._metrics.run_ended(label, run_state_label(state), duration)
        usage = run.usage
        if self._metrics is not None:
            self._metrics.spend(usage.model, usage.cost_micros)
        log.info(
            "run ended",
            extra={
                "run": run.name,
                "handler": run.handler,
                "state": state,
                "reason": error.reason if error is not None else "",
                "duration_ms": None if duration is None else round(duration * 1000, 3),
                "input_tokens": usage.input_tokens,
                "output_tokens": usage.output_tokens,
                "cost_usd": usage.estimated_cost_usd,
                "model": usage.model,
            },
        )
