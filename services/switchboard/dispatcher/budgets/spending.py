"""Spending: what runs do with the budgets that apply to them (the ledger holds the numbers).

* **A message** whose budgets have no room left (used + held reached a cap) is
  refused before anything is stored: ``BudgetExhausted`` with one violation
  per budget and the earliest reset, and a BUDGET_ALERT (MESSAGE_REFUSED). So
  is one routed to a model without a price while a cost cap applies
  (``ModelNotPriced``).
* **A run** reads its budgets once, when it starts (none: it gets no
  ``RunBudget`` and makes no budget statement at all). Its handler reserves
  each step's worst case through ``RunBudget`` (``handlers.StepBudget``) and
  settles what the step used; a threshold a settlement crosses is logged once
  per period (BUDGET_ALERT, THRESHOLD).
* **At the cap** the run pauses like an approval: REQUIRES_ACTION with
  ``required_action.budget``, its deadline stopped, a BUDGET_ALERT
  (RUN_PAUSED). It tries again when a budget of its workspace changes in this
  process (``on_change``, called by the budget catalog) and every
  ``POLL_S`` for changes made through another replica; an owner may allow the
  step past the cap or fail the run (``ResolveBudgetAction``). After the
  approval timeout it fails with BUDGET_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.dispatcher.budgets.ledger import (
    Alert,
    Amount,
    Applicable,
    Full,
    Hold,
    Ledger,
)
from switchboard.platform import names
from switchboard.platform.errors import BudgetExhausted, ModelNotPriced, SwitchboardError
from switchboard.platform.events.bus import EventBus
from switchboard.platform.observe.metrics import Metrics

log = logging.getLogger("switchboard.dispatcher.budgets")

#: How often a run paused at a cap looks again (a cap raised through another replica).
POLL_S: Final = 2.0
SYSTEM: Final = events_pb2.Actor(name="system")


class Pauser(Protocol):
    """The run's pause, as approvals use it (execution's ``_RunHost``)."""

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...


def rfc3339(at: dt.datetime) -> str:
    return at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def refusal(full: Sequence[Full], what: str) -> BudgetExhausted:
    """``BudgetExhausted`` naming each budget of ``full`` and the earliest reset."""
    subjects = [
        (f.budget.name, f"the budget {f.budget.display_name or f.budget.budget_id} has no room")
        for f in full
    ]
    resets = [f.reset for f in full if f.reset is not None]
    metadata = {"reset_time": rfc3339(min(resets))} if resets else {}
    return BudgetExhausted(
        f"{what}: {len(full)} budget(s) that apply have no room left "
        f"({', '.join(f.budget.name for f in full)})",
        subject=full[0].budget.name,
        subjects=subjects,
        metadata=metadata,
    )


def _usage(used: Amount, held: Amount, reset: dt.datetime | None) -> pb.BudgetUsage:
    usage = pb.BudgetUsage(
        cost_micros=used.cost_micros,
        input_tokens=used.input_tokens,
        output_tokens=used.output_tokens,
        reserved_cost_micros=held.cost_micros,
        reserved_input_tokens=held.input_tokens,
        reserved_output_tokens=held.output_tokens,
    )
    if reset is not None:
        usage.reset_time.FromDatetime(reset)
    return usage


def alert_event(
    budget: Applicable,
    kind: events_pb2.BudgetAlertKind.ValueType,
    *,
    actor: events_pb2.Actor = SYSTEM,
    run: str = "",
    percent: int = 0,
    cap: str = "",
    usage: pb.BudgetUsage | None = None,
) -> events_pb2.Event:
    """A BUDGET_ALERT on the budget's workspace."""
    event = events_pb2.Event(
        type=events_pb2.EVENT_TYPE_BUDGET_ALERT,
        actor=actor,
        workspace=f"workspaces/{budget.workspace_id}",
    )
    payload = event.budget_alert
    payload.kind = kind
    payload.budget = budget.name
    payload.percent = percent
    payload.cap = cap
    payload.run = run
    if usage is not None:
        payload.usage.CopyFrom(usage)
    return event


@dataclass(frozen=True)
class Read:
    """The budgets that apply to a run, and the version of its workspace's they were read at."""

    budgets: tuple[Applicable, ...]
    version: int


class Spending:
    """The process's side of budgets: which apply, refusals, alerts, wake-ups."""

    def __init__(
        self,
        ledger: Ledger,
        bus: EventBus,
        *,
        approval_timeout_s: float,
        metrics: Metrics | None = None,
        poll_s: float = POLL_S,
    ) -> None:
        self.ledger = ledger
        self._bus = bus
        self._metrics = metrics
        self.approval_timeout_s = approval_timeout_s
        self.poll_s = poll_s
        #: Set (and replaced) when a budget of the workspace changes: paused runs look again.
        self._changed: dict[str, asyncio.Event] = {}
        #: Counts each workspace's budget changes seen here: a run whose budgets were
        #: read before the last one reads them again before its next reservation.
        self._versions: dict[str, int] = {}

    # -- the catalog's hook ----------------------------------------------------------------

    def on_change(self, workspace_id: str) -> None:
        """A budget of ``workspace_id`` was created, updated or deleted."""
        self._versions[workspace_id] = self._versions.get(workspace_id, 0) + 1
        self.wake(workspace_id)

    def wake(self, workspace_id: str) -> None:
        """Room may have been freed in ``workspace_id``'s budgets: paused runs look again."""
        event = self._changed.pop(workspace_id, None)
        if event is not None:
            event.set()

    def version(self, workspace_id: str) -> int:
        return self._versions.get(workspace_id, 0)

    def changed(self, workspace_id: str) -> asyncio.Event:
        event = self._changed.get(workspace_id)
        if event is None:
            event = self._changed[workspace_id] = asyncio.Event()
        return event

    # -- which apply -----------------------------------------------------------------------

    async def read(self, workspace_id: str, assistant: str, api_key_id: str) -> Read:
        """``applicable``, with the version of the workspace's budgets it read."""
        version = self.version(workspace_id)
        return Read(await self.applicable(workspace_id, assistant, api_key_id), version)

    def fresh(self, read: Read, workspace_id: str) -> bool:
        """Whether no budget of ``workspace_id`` changed here since ``read``."""
        return read.version == self.version(workspace_id)

    async def applicable(
        self, workspace_id: str, assistant: str, api_key_id: str
    ) -> tuple[Applicable, ...]:
        """The budgets of a run of ``assistant`` (its name, or "") started with
        ``api_key_id`` (or "")."""
        assistant_id = assistant.rsplit("/", 1)[-1] if assistant else ""
        return await self.ledger.applicable(
            workspace_id, assistant_id, api_key_id.rsplit("/", 1)[-1]
        )

    # -- admission -------------------------------------------------------------------------

    async def admit(
        self,
        budgets: Sequence[Applicable],
        *,
        actor: events_pb2.Actor,
        priced: bool | None,
    ) -> None:
        """Refuse a message its budgets have no room for, or that a cost cap
        cannot price (``priced`` False: routed to a model without a price)."""
        if not budgets:
            return
        if priced is False and any(b.caps.cost is not None for b in budgets):
            self.refused(ModelNotPriced.reason)
            raise ModelNotPriced(
                "a cost budget applies and the model the message is routed to has no price "
                "(SWITCHBOARD_LLM_PRICES)"
            )
        full = await self.ledger.full(budgets)
        if not full:
            return
        self.refused(BudgetExhausted.reason)
        for item in full:
            await self.publish(
                alert_event(item.budget, events_pb2.BUDGET_ALERT_KIND_MESSAGE_REFUSED, actor=actor)
            )
        raise refusal(full, "the message was refused")

    # -- events and metrics ----------------------------------------------------------------

    async def publish(self, event: events_pb2.Event) -> None:
        try:
            await self._bus.publish(event)
        except SwitchboardError:
            log.warning("budget alert not published", extra={"budget": event.budget_alert.budget})

    async def alerts(self, alerts: Sequence[Alert]) -> None:
        for alert in alerts:
            reset = self.ledger.reset_of(alert.budget)
            await self.publish(
                alert_event(
                    alert.budget,
                    events_pb2.BUDGET_ALERT_KIND_THRESHOLD,
                    percent=alert.percent,
                    cap=alert.cap,
                    usage=_usage(alert.used, alert.held, reset),
                )
            )

    def reserved(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.budget_reservation(outcome)

    def refused(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.budget_refusal(reason.removeprefix("ERROR_REASON_").lower())

    # -- runs ------------------------------------------------------------------------------

    def run_budget(
        self,
        read: Read,
        run: pb.Run,
        workspace_id: str,
        api_key_id: str,
        host: Pauser,
    ) -> RunBudget | None:
        """The run's budget (None when no budget applies: nothing to reserve)."""
        if not read.budgets:
            return None

        def reload() -> Awaitable[tuple[Applicable, ...]]:
            return self.applicable(workspace_id, run.assistant, api_key_id)

        return RunBudget(
            self,
            read.budgets,
            run=run,
            workspace_id=workspace_id,
            host=host,
            reload=reload,
            version=read.version,
        )


class RunBudget:
    """One run's reservations (``handlers.StepBudget``)."""

    def __init__(
        self,
        spending: Spending,
        budgets: tuple[Applicable, ...],
        *,
        run: pb.Run,
        workspace_id: str,
        host: Pauser,
        reload: Callable[[], Awaitable[tuple[Applicable, ...]]],
        version: int,
    ) -> None:
        self._spending = spending
        #: The workspace's budget version ``budgets`` were read at (``Spending.version``).
        self._version = version
        #: The budgets that apply now (a paused run reads them again: a cap may have changed).
        self._reload = reload
        self._ledger = spending.ledger
        self.budgets = budgets
        self._run = run
        self._run_id = run.name.rsplit("/", 1)[-1]
        self._workspace_id = workspace_id
        self._host = host
        self._holds: dict[str, Hold] = {}
        #: Set (and replaced) when an owner decides: the paused step looks again.
        self._decided = asyncio.Event()
        #: One paused step at a time (concurrent tool calls of a step wait in turn).
        self._pausing = asyncio.Lock()

    @property
    def caps_cost(self) -> bool:
        return any(b.caps.cost is not None for b in self.budgets)

    async def reserve(self, cost_micros: int, input_tokens: int, output_tokens: int) -> str:
        ask = Amount(max(0, cost_micros), max(0, input_tokens), max(0, output_tokens))
        await self._current()
        outcome = await self._ledger.reserve(self.budgets, self._run_id, ask)
        if isinstance(outcome, Hold):
            self._spending.reserved("reserved")
            return self._keep(outcome)
        self._spending.reserved("refused")
        async with self._pausing:
            return self._keep(await self._paused(ask, outcome))

    async def settle(
        self, hold: str, cost_micros: int, input_tokens: int, output_tokens: int
    ) -> None:
        kept = self._holds.pop(hold, None)
        if kept is None:
            return
        settled = await self._ledger.settle(kept, Amount(cost_micros, input_tokens, output_tokens))
        # What the hold kept beyond what was used is free again: runs paused here look.
        self._spending.wake(self._workspace_id)
        if settled.alerts:
            await self._spending.alerts(settled.alerts)

    async def release(self, hold: str) -> None:
        kept = self._holds.pop(hold, None)
        if kept is not None:
            await self._ledger.release(kept)
            self._spending.wake(self._workspace_id)

    async def close(self) -> None:
        """The run ended: holds its steps did not settle (cancelled, failed) go back."""
        holds, self._holds = list(self._holds.values()), {}
        try:
            for hold in holds:
                await self._ledger.release(hold)
        except SwitchboardError:
            # Its hold rows name the run: the next takeover or restart releases them.
            log.warning("budget holds not released", extra={"run": self._run.name})

    def decided(self) -> None:
        """An owner decided the budget action (``ResolveBudgetAction``)."""
        event, self._decided = self._decided, asyncio.Event()
        event.set()

    async def _current(self) -> None:
        """Read the budgets again if one of the workspace changed since they were read."""
        version = self._spending.version(self._workspace_id)
        if version != self._version:
            self._version = version
            self.budgets = await self._reload()

    def _keep(self, hold: Hold) -> str:
        self._holds[hold.id] = hold
        return hold.id

    async def _paused(self, ask: Amount, full: list[Full]) -> Hold:
        """Wait at the cap until the step fits, an owner decides, or the timeout."""
        run = self._run
        action = run.required_action
        now = names.now()
        # A run resumed after a restart keeps the pause it was stored with.
        if not (
            action.HasField("budget")
            and action.budget.decision == pb.BUDGET_DECISION_UNSPECIFIED
            and action.HasField("expire_time")
        ):
            action.Clear()
            action.expire_time.FromDatetime(
                now + dt.timedelta(seconds=self._spending.approval_timeout_s)
            )
        budget = action.budget
        del budget.budgets[:]
        budget.budgets.extend(f.budget.name for f in full)
        budget.cost_micros = ask.cost_micros
        budget.input_tokens = ask.input_tokens
        budget.output_tokens = ask.output_tokens
        wait_s = max(0.0, (action.expire_time.ToDatetime(dt.UTC) - now).total_seconds())
        # Logged before the pause is shown: whoever sees the run paused can find why.
        for item in full:
            await self._spending.publish(
                alert_event(item.budget, events_pb2.BUDGET_ALERT_KIND_RUN_PAUSED, run=run.name)
            )
        if run.state == pb.RUN_STATE_RUNNING:
            await self._host.pause()
        hold: Hold | None = None
        attempts = 0
        try:
            async with asyncio.timeout(wait_s):
                while hold is None:
                    decision = budget.decision
                    if decision == pb.BUDGET_DECISION_FAIL:
                        raise refusal(full, f"the run was failed at its cap by {budget.decided_by}")
                    # Taken before the attempt, so a change during it is not missed.
                    changed = self._spending.changed(self._workspace_id)
                    decided = self._decided
                    overdraft = decision == pb.BUDGET_DECISION_ALLOW_OVERDRAFT
                    if attempts:
                        self._version = self._spending.version(self._workspace_id)
                        self.budgets = await self._reload()
                    attempts += 1
                    outcome = await self._ledger.reserve(
                        self.budgets, self._run_id, ask, overdraft=overdraft
                    )
                    if isinstance(outcome, Hold):
                        hold = outcome
                        self._spending.reserved("overdraft" if overdraft else "reserved")
                        break
                    full = outcome
                    await _first(changed.wait(), decided.wait(), timeout_s=self._spending.poll_s)
        except TimeoutError:
            raise refusal(
                full,
                f"the run waited at its cap longer than {self._spending.approval_timeout_s:g} s",
            ) from None
        if run.state == pb.RUN_STATE_REQUIRES_ACTION:
            await self._host.resume()
        return hold


async def _first(*waits: Coroutine[Any, Any, object], timeout_s: float) -> None:
    """Return when the first of ``waits`` finishes, or after ``timeout_s``."""
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(tasks, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
