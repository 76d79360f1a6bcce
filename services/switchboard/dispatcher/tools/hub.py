"""A run's calls sent to the integration hub: priced, held against its budgets, answered.

A call's price is its integration's ``tool_call_price_micros`` for the tool, else
its ``call_price_micros``; it is held in the run's budgets before the call (which
may pause the run at a cap, or end it) and owed only when the tool answered, even
with an error result: one that never reached it (refused, unreachable, timed out,
cancelled) costs nothing. Every attempt at a call carries the same idempotency
key (``idempotency.call_key``), and every failure is a result the model reads,
never an exception.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Protocol

from google.rpc import code_pb2

from switchboard.api.handler.v1 import handler_pb2 as hpb
from switchboard.api.integration.v1 import integration_pb2 as ipb
from switchboard.dispatcher.tools.port import ToolPort
from switchboard.dispatcher.tools.results import MAX_ERROR_CHARS, cut, status
from switchboard.internal.dispatcher.v1 import job_pb2
from switchboard.platform.errors import CircuitOpen, SwitchboardError
from switchboard.platform.security.policy import Principal
from switchboard.platform.values import idempotency, structs

log = logging.getLogger("switchboard.dispatcher.tools")


class CallBudget(Protocol):
    """The run's budgets, as a priced call reserves its price in them
    (``budgets/spending.py``; the handlers' ``StepBudget``, seen from here)."""

    async def reserve(self, cost_micros: int, input_tokens: int, output_tokens: int) -> str: ...

    async def settle(
        self, hold: str, cost_micros: int, input_tokens: int, output_tokens: int
    ) -> None: ...

    async def release(self, hold: str) -> None: ...


class HubCalls:
    """One run's calls of its integrations' tools."""

    def __init__(
        self,
        port: ToolPort,
        *,
        principal: Principal,
        run: str,
        deadline: Callable[[], float],
        max_result_chars: int,
        record: Callable[[str], job_pb2.StepRecord],
        budget: CallBudget | None = None,
    ) -> None:
        self._port = port
        self._principal = principal
        self._run = run
        self._remaining = deadline
        self._max_result_chars = max_result_chars
        #: The journal's record of the step holding a call (by the call's id).
        self._record = record
        self._budget = budget
        #: The integrations this run called, by name (read once per run: prices, retry safety).
        self.integrations: dict[str, ipb.Integration | None] = {}
        #: What the run's priced tool calls cost (added to its usage at its end).
        self.spent_micros = 0

    async def integration(self, call: hpb.ToolCall) -> ipb.Integration | None:
        """``call``'s integration as the hub describes it (None: it cannot be read)."""
        integration = call.integration
        if integration not in self.integrations:
            try:
                self.integrations[integration] = await self._port.integration(
                    self._principal, integration
                )
            except SwitchboardError:
                # The call itself fails the same way, and a failed call costs nothing.
                self.integrations[integration] = None
        return self.integrations[integration]

    async def _price(self, call: hpb.ToolCall) -> int:
        """The price of one call of ``call``'s tool: its integration's
        ``tool_call_price_micros`` for it, else its ``call_price_micros``."""
        found = await self.integration(call)
        if found is None:
            return 0
        return found.tool_call_price_micros.get(call.tool, found.call_price_micros)

    async def invoke(self, call: hpb.ToolCall, tool: str, result: hpb.ToolResult) -> None:
        """Send ``call`` to ``tool`` and fill ``result`` with its answer or failure."""
        price = await self._price(call)
        hold = ""
        if price and self._budget is not None:
            # May pause the run at a cap, or end it (BudgetExhausted).
            hold = await self._budget.reserve(price, 0, 0)
        answered = False
        try:
            answered = await self._call(call, tool, result)
        finally:
            # A call the tool answered (even with an error result) owes its
            # price; one that never reached it (refused, unreachable, timed
            # out, cancelled) costs nothing.
            if answered:
                self.spent_micros += price
                if price:
                    # The step's share of the run's usage, kept for a later attempt.
                    usage = self._record(call.id).usage
                    usage.cost_micros += price
                    usage.estimated_cost_usd = usage.cost_micros / 1e6
            if hold and self._budget is not None:
                if answered:
                    await self._budget.settle(hold, price, 0, 0)
                else:
                    await asyncio.shield(self._budget.release(hold))

    async def _call(self, call: hpb.ToolCall, tool: str, result: hpb.ToolResult) -> bool:
        """Invoke the tool; whether it answered."""
        started = time.monotonic()
        # The same key on every attempt at this call (docs/integration.md).
        request = ipb.InvokeToolRequest(
            name=tool, idempotency_key=idempotency.call_key(self._run, call.id)
        )
        request.arguments.CopyFrom(call.arguments)
        answered = False
        try:
            response = await self._port.invoke(
                self._principal, request, deadline_s=self._remaining(), run=self._run
            )
        except CircuitOpen as exc:
            result.outcome = hpb.TOOL_OUTCOME_FAILED
            result.error.CopyFrom(status(int(exc.code), exc.message))
            result.text = (
                "The tool is unavailable now (its integration keeps failing); "
                f"retry in about {exc.retry_after_s or 30:.0f} s or answer without it."
            )
        except SwitchboardError as exc:
            result.outcome = hpb.TOOL_OUTCOME_FAILED
            result.error.CopyFrom(status(int(exc.code), exc.message))
            result.text = f"The tool call failed: {exc.message[:MAX_ERROR_CHARS]}"
        except Exception:  # the run goes on; the model hears of a failure, the log of why
            log.exception("tool call failed unexpectedly", extra={"tool": tool})
            result.outcome = hpb.TOOL_OUTCOME_FAILED
            result.error.CopyFrom(status(code_pb2.INTERNAL, "the tool call failed"))
            result.text = "The tool call failed."
        else:
            answered = True
            result.outcome = (
                hpb.TOOL_OUTCOME_ERROR if response.is_error else hpb.TOOL_OUTCOME_SUCCEEDED
            )
            if response.HasField("result"):
                result.result.CopyFrom(response.result)
            result.files.extend(response.files)
            text = response.text
            if not text and response.HasField("result"):
                text = json.dumps(structs.message_dict(response.result), sort_keys=True)
            result.text = cut(text, self._max_result_chars)
        result.duration.FromNanoseconds(int((time.monotonic() - started) * 1e9))
        return answered
