"""Forming's model calls: one structured answer through the ``llm`` handler's provider
client (its chain, retries and circuit breakers), charged to the workspace's budgets.

The model is the policy's (``provider``, ``model``), else the assistant's
``ModelSettings``, else the configured chain's first; the rest of the chain is the
fallback, as for a run. A call asks for ``response_format: json_schema`` (strict)
and reads the answer whole (the client streams it; nobody watches it).

Forming runs outside any run, so, like the context service's embeddings
(``budgets/embeddings.py``), it is charged only to the budgets that apply to the
whole workspace (scope workspace, a period other than "per run"), under its own
run id ``memory``: a call holds its worst case (the prompt estimated, the whole
``max_tokens``, at the chain's highest price) in one conditional write and is
settled with what the provider counted. A budget without room raises
``BudgetFull``: forming pauses, the runs do not (they hold their own room).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as dpb
from switchboard.api.handler.v1 import handler_pb2
from switchboard.dispatcher.budgets.ledger import Amount, Hold, Ledger
from switchboard.dispatcher.handlers.base import HandlerFailure
from switchboard.dispatcher.llm.client import Answer
from switchboard.dispatcher.llm.config import Provider
from switchboard.dispatcher.llm.handler import LlmHandler
from switchboard.dispatcher.llm.usage import estimate_tokens
from switchboard.dispatcher.memory.plans.schema import response_format
from switchboard.platform.values import names

#: The run id of forming's holds in the ledger.
RUN_ID: Final = "memory"
#: A hold older than this belongs to a call whose process died: charged at what it held.
STALE_HOLD_S: Final = 3600.0
_SWEEP_EVERY_S: Final = 600.0


class BudgetFull(Exception):
    """A whole-workspace budget has no room for the call: forming pauses."""


class ModelUnavailable(Exception):
    """No model can be asked (none configured, the provider named is not, or every
    provider failed); ``retryable`` when a later attempt may succeed."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class Answered:
    text: str
    #: ``provider/model`` that answered.
    model: str


class FormingModel:
    """Asks the ``llm`` handler's providers for structured answers, charged."""

    def __init__(
        self,
        handler: LlmHandler | None,
        ledger: Ledger | None,
        *,
        max_tokens: int,
        timeout_s: float,
        clock: Callable[[], dt.datetime] = names.now,
    ) -> None:
        self._handler = handler
        self._ledger = ledger
        self._max_tokens = max_tokens
        self._timeout_s = timeout_s
        self._clock = clock
        self._swept: dt.datetime | None = None

    def chain(
        self, policy: cpb.MemoryPolicy, model: handler_pb2.ModelSettings
    ) -> tuple[Provider, ...]:
        """The providers to ask, in order (``ModelUnavailable`` if none can be)."""
        if self._handler is None:
            raise ModelUnavailable("no language model is configured", retryable=False)
        providers = list(self._handler.config.providers)
        provider = policy.provider or model.provider
        chosen = policy.model or ("" if policy.provider else model.model)
        if provider:
            known = [p.name for p in providers]
            if provider not in known:
                raise ModelUnavailable(
                    f"the model provider {provider[:100]!r} is not configured", retryable=False
                )
            providers.insert(0, providers.pop(known.index(provider)))
        if chosen:
            providers[0] = replace(providers[0], model=chosen)
        return tuple(providers)

    async def ask(
        self,
        workspace_id: str,
        chain: tuple[Provider, ...],
        messages: Sequence[dict[str, Any]],
        name: str,
        schema: dict[str, Any],
    ) -> Answered:
        """One structured answer; ``BudgetFull`` or ``ModelUnavailable``."""
        handler = self._handler
        if handler is None:
            raise ModelUnavailable("no language model is configured", retryable=False)
        body: dict[str, Any] = {
            "messages": list(messages),
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": self._max_tokens,
            "temperature": 0,
            "response_format": response_format(name, schema),
        }
        prompt = estimate_tokens(json.dumps(body["messages"]))
        prices = [price for p in chain if (price := handler.config.price_of(p)) is not None]
        worst = max((p.cost_micros(prompt, self._max_tokens) for p in prices), default=0)
        hold = await self._reserve(workspace_id, Amount(worst, prompt, self._max_tokens))
        deadline = time.monotonic() + self._timeout_s
        answer = Answer()
        pieces: list[str] = []
        try:
            # The handler's own client: one connection pool and one breaker per provider
            # for runs and forming (LlmHandler.client, asked of the lead).
            texts = handler.client.ask(chain, body, lambda: deadline - time.monotonic(), answer)
            async with contextlib.aclosing(texts):
                async for text in texts:
                    pieces.append(text)
        except HandlerFailure as exc:
            await self._settle(hold, Amount())
            raise ModelUnavailable(exc.message, retryable=exc.retryable) from None
        except BaseException:
            await self._settle(hold, Amount())
            raise
        provider = answer.provider or chain[0]
        text = "".join(pieces)
        used_in, used_out = answer.outcome.usage or (prompt, estimate_tokens(text))
        price = handler.config.price_of(provider)
        cost = price.cost_micros(used_in, used_out) if price is not None else 0
        await self._settle(hold, Amount(cost, used_in, used_out))
        return Answered(text, provider.label)

    async def _reserve(self, workspace_id: str, ask: Amount) -> Hold | None:
        if self._ledger is None:
            return None
        budgets = [
            budget
            for budget in await self._ledger.applicable(workspace_id)
            if budget.period != dpb.BUDGET_PERIOD_RUN
        ]
        if not budgets:
            return None
        if self._swept is None or (self._clock() - self._swept).total_seconds() >= _SWEEP_EVERY_S:
            self._swept = self._clock()
            await self._ledger.charge_lost(
                [RUN_ID], created_before=self._swept - dt.timedelta(seconds=STALE_HOLD_S)
            )
        held = await self._ledger.reserve(budgets, RUN_ID, ask)
        if isinstance(held, list):
            raise BudgetFull(
                ", ".join(full.budget.name for full in held) or "a budget is at its cap"
            )
        return held

    async def _settle(self, hold: Hold | None, used: Amount) -> None:
        if hold is not None and self._ledger is not None:
            await self._ledger.settle(hold, used)


__all__ = ["RUN_ID", "Answered", "BudgetFull", "FormingModel", "ModelUnavailable"]
