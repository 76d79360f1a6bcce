"""A run's budget across a hop to another agent (docs/budgets.md, "Across hops").

A remote expert (``remote.py``) or an A2A agent (``remote_a2a.py``) is given
what is left of the run's budgets, and the run holds that much while the hop
runs, so no other run of the same budgets can spend it meanwhile. When the
hop answers, the hold is settled with the usage the callee reported in its
result (``HandleResult.usage``, which becomes the run's usage); a hop that
fails releases it (what the callee spent then is its word, which it did not
give).
"""

from __future__ import annotations

from switchboard.api.handler.v1 import handler_pb2
from switchboard.dispatcher.handlers.base import StepBudget
from switchboard.dispatcher.handlers.handed import Handed


class Hop:
    """One hop's hold: ``start`` before the call, ``settle`` with its result, ``close`` after."""

    def __init__(self, budget: StepBudget | None, *, hold: bool = True) -> None:
        """``hold`` False: hand over what is left but hold none of it, for a callee
        that has the run call tools meanwhile (an interactive expert): their prices
        are reserved from the same budgets as they run, which a hold of everything
        would leave no room for."""
        self._budget = budget
        self._holds = hold
        self._hold = ""

    async def start(self) -> Handed | None:
        """Hold what is left and say what to hand over (None: the run has no budget)."""
        if self._budget is None:
            return None
        self._hold, handed = await self._budget.reserve_rest(hold=self._holds)
        return handed

    async def settle(self, result: handler_pb2.HandleResult) -> None:
        """Charge the run what the callee reported (its cost in micro-units, or
        its estimate in dollars when it gave no micro-units)."""
        usage = result.usage
        if not usage.cost_micros and usage.estimated_cost_usd > 0:
            usage.cost_micros = round(usage.estimated_cost_usd * 1e6)
        if usage.cost_micros and not usage.estimated_cost_usd:
            usage.estimated_cost_usd = usage.cost_micros / 1e6
        hold, self._hold = self._hold, ""
        if self._budget is not None and hold:
            await self._budget.settle(
                hold,
                max(0, usage.cost_micros),
                max(0, usage.input_tokens),
                max(0, usage.output_tokens),
            )

    async def close(self) -> None:
        """Release the hold if the hop never settled (it failed, or was cancelled)."""
        hold, self._hold = self._hold, ""
        if self._budget is not None and hold:
            await self._budget.release(hold)
