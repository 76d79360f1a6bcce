"""Embedding calls charged to a workspace's budgets: the context service's
``Charger`` (context/semantic/embedder.py) over the ledger.

The context service embeds memory, messages and documents in the background,
outside any run, so only the budgets that apply to the whole workspace (scope
``workspace``, a period other than "per run") are charged; a budget of one
assistant or one API key has no run of theirs to charge. A request holds its
worst case (its input tokens estimated from the text, and their cost when the
model has a price) in one conditional write, the way a model call does, and is
settled with the tokens the endpoint counted, or released when it failed.

The protocol is structural and speaks plain values: this module imports
nothing of the context service's, nor the context service anything of this;
the composition root plugs it into the context's port (``mesh.connect``,
``context.build.EMBEDDING_CHARGER``).
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.budgets.ledger import Amount, Hold, Ledger
from switchboard.platform.values import names

#: The run id of embedding holds (no run: the window is the budget's period's).
RUN_ID: Final = "embeddings"
#: An embedding hold older than this belongs to a call whose process died between
#: reserving and settling (a call lasts at most its attempts' timeouts and backoff,
#: minutes): charged at what it reserved (the endpoint may have billed it), so a
#: crash neither keeps a budget's room held for ever nor frees room that was spent.
STALE_HOLD_S: Final = 3600.0
#: How often one process looks for such holds (on its next reservation).
_SWEEP_EVERY_S: Final = 600.0


def parse_embedding_prices(text: str) -> dict[str, float]:
    """``{"model": dollars per million input tokens}``; blank text means none."""
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        raise ValueError("embedding prices: not JSON") from None
    if not isinstance(data, dict):
        raise ValueError("embedding prices: expected a JSON object keyed by model")  # noqa: TRY004
    prices: dict[str, float] = {}
    for model, value in data.items():
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not math.isfinite(value)
            or value < 0
        ):
            raise ValueError(
                f"embedding prices: {model!r}: expected dollars per million input tokens"
            )
        prices[model] = float(value)
    return prices


@dataclass(frozen=True)
class _Charge:
    hold: Hold


class LedgerCharger:
    """Holds and settles embedding calls in the workspace's whole-workspace budgets."""

    def __init__(
        self,
        ledger: Ledger,
        prices: Mapping[str, float] | None = None,
        *,
        clock: Callable[[], dt.datetime] = names.now,
    ) -> None:
        self._ledger = ledger
        self._prices = dict(prices or {})
        self._clock = clock
        self._swept: dt.datetime | None = None

    async def release_stale(self) -> Amount:
        """Charge embedding holds older than ``STALE_HOLD_S`` (their process died
        mid-call) at what they reserved; what that came to."""
        self._swept = self._clock()
        charged = await self._ledger.charge_lost(
            [RUN_ID], created_before=self._swept - dt.timedelta(seconds=STALE_HOLD_S)
        )
        return charged.get(RUN_ID, Amount())

    def cost_micros(self, model: str, input_tokens: int) -> int:
        """Micro-dollars, rounded up (a hold never undercounts); 0 for an unpriced model."""
        price = self._prices.get(model)
        if price is None:
            return 0
        return math.ceil(round(input_tokens * price, 6))

    async def reserve(self, workspace_id: str, *, model: str, input_tokens: int) -> object | None:
        budgets = [
            budget
            for budget in await self._ledger.applicable(workspace_id)
            if budget.period != pb.BUDGET_PERIOD_RUN
        ]
        if not budgets:
            return ()
        if self._swept is None or (self._clock() - self._swept).total_seconds() >= _SWEEP_EVERY_S:
            await self.release_stale()
        ask = Amount(self.cost_micros(model, input_tokens), input_tokens, 0)
        held = await self._ledger.reserve(budgets, RUN_ID, ask)
        if isinstance(held, list):
            return None
        return _Charge(held)

    async def settle(self, hold: object, *, model: str, input_tokens: int) -> None:
        if isinstance(hold, _Charge):
            await self._ledger.settle(
                hold.hold, Amount(self.cost_micros(model, input_tokens), input_tokens, 0)
            )

    async def release(self, hold: object) -> None:
        if isinstance(hold, _Charge):
            await self._ledger.release(hold.hold)
