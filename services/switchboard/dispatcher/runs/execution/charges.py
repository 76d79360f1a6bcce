"""A run's budgets as the execution stage sees them: read, opened, charged, closed.

The budgets that apply to a run are admission's read when nothing changed here
since, else read again at its start (``admitted``, ``read``); its budget opens
around its handler's step with the record of each settlement in the run's row
(``open``), closes when its task is done with it (``close``), and what its
budgets were charged, every attempt's, is the least the run reports as its
usage (``cover``).

Why a module of its own: the charges are a run's money, threaded through its
read, its handler's step, its unwinding and its end; gathered here, the
execution stage says when, and this module says how (``budgets/spending.py``
is the budgets' side).
"""

from __future__ import annotations

import asyncio

from switchboard.api.handler.v1 import handler_pb2
from switchboard.dispatcher.budgets.ledger import Record
from switchboard.dispatcher.budgets.spending import Read, Spending
from switchboard.dispatcher.handlers.handed import Handed
from switchboard.dispatcher.runs.core.active.lifecycle import Active
from switchboard.dispatcher.runs.core.active.live import RunLimits
from switchboard.dispatcher.runs.core.records import Charged
from switchboard.dispatcher.runs.core.store import RunStore
from switchboard.dispatcher.runs.execution.hosting import Host
from switchboard.dispatcher.tools.journal import cover
from switchboard.internal.dispatcher.v1 import job_pb2


class Charges:
    """The budgets of this process's runs (no ``spending``: no budgets here)."""

    def __init__(self, *, spending: Spending | None, store: RunStore, limits: RunLimits) -> None:
        self._spending = spending
        self._store = store
        self._limits = limits

    @property
    def enabled(self) -> bool:
        """Whether budgets apply here at all."""
        return self._spending is not None

    def admitted(self, active: Active) -> Read | None:
        """Admission's read of the run's budgets if no budget of its workspace changed
        here since (None: there is none, or it must be read again)."""
        admitted = active.budgets
        if (
            self._spending is not None
            and admitted is not None
            and self._spending.fresh(admitted, active.workspace_id)
        ):
            return admitted
        return None

    async def read(self, active: Active) -> Read | None:
        """The budgets that apply to the run, read at its start (a recovered run, or
        one whose workspace's budgets changed since admission)."""
        if self._spending is None:
            return None
        return await self._spending.read(
            active.workspace_id,
            active.run.assistant,
            active.principal.api_key_id,
            active.job.lineage,
        )

    def open(self, active: Active, budgets: Read | None, host: Host) -> None:
        """The run's budget for its handler's step (``active.budget``), when budgets
        were read for it: its reservations pause the run through ``host``."""
        if budgets is None or self._spending is None:
            return
        active.budget = self._spending.run_budget(
            budgets,
            active.run,
            active.workspace_id,
            active.principal.api_key_id,
            host,
            _handed(active.job),
            record=self._record(active),
            ancestors=active.job.lineage,
        )

    async def close(self, active: Active) -> None:
        """The run's task is done with its budget: holds of steps that did not settle
        (cancelled, failed) go back, and what it was charged stays on the run."""
        budget = active.budget
        if budget is not None:
            await asyncio.shield(budget.close())
            active.charged = self.charged(active)
            active.budget = None

    def charged(self, active: Active) -> Charged:
        """What the run's budgets were charged so far, every attempt's."""
        budget = active.budget
        if budget is None:
            return active.charged
        spent = budget.charged
        return active.charged + Charged(spent.cost_micros, spent.input_tokens, spent.output_tokens)

    def cover(self, usage: handler_pb2.Usage, active: Active) -> handler_pb2.Usage:
        """``usage``, raised to at least what the run's budgets were charged."""
        charged = self.charged(active)
        return cover(usage, charged.cost_micros, charged.input_tokens, charged.output_tokens)

    def _record(self, active: Active) -> Record:
        """The run's record of each settlement of its budgets, in the settlement's
        transaction (``RunStore.charging``): refused once another instance owns it."""
        return self._store.charging(
            active.run_id, self._limits.instance_id, given_up=lambda: active.retired
        )


def _handed(job: job_pb2.RunJob) -> Handed | None:
    """The budget the run's caller handed over, as its job keeps it (None: none)."""
    if not job.HasField("handed_budget"):
        return None
    stored = job.handed_budget
    return (
        Handed(
            **{
                name: getattr(stored, name)
                for name in ("cost_micros", "input_tokens", "output_tokens", "total_tokens")
                if stored.HasField(name)
            }
        )
        or None
    )
