"""Spending: what runs do with the budgets that apply to them (the ledger holds the numbers;
``room.py`` counts what fits and words what does not).

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
* **Near the cap** a model call whose prompt and ``max_tokens`` no longer fit
  is made with ``max_tokens`` lowered to what fits (``RunBudget.reserve_call``),
  as long as that is at least the useful answer it was given as a minimum
  (``SWITCHBOARD_LLM_MIN_OUTPUT_TOKENS``); the handler says so on the run.
* **At the cap** the run pauses like an approval: REQUIRES_ACTION with
  ``required_action.budget`` (what the step needs at least, and in words how
  much of which budget is left), its deadline stopped, a BUDGET_ALERT
  (RUN_PAUSED). It tries again when a budget of its workspace changes in this
  process (``on_change``, called by the budget catalog) and every
  ``POLL_S`` for changes made through another replica; an owner may allow the
  step past the cap or fail the run (``ResolveBudgetAction``). After the
  approval timeout it fails with BUDGET_EXHAUSTED.
* **Across hops** (``handed.py``): a step that calls another agent reserves
  what is left of every cap (``RunBudget.reserve_rest``) and hands that over;
  a run started with a budget handed to it holds that as one more cap, in
  memory. A handed cap has no owner to raise it: a step it has no room for
  ends the run with BUDGET_EXHAUSTED, without pausing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
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
    Record,
)
from switchboard.dispatcher.budgets.room import (
    Call,
    HandedCaps,
    alert_event,
    alert_usage,
    limits,
    refusal,
    rest,
    shortfall,
    step_needs,
)
from switchboard.dispatcher.handlers.base import CallHold
from switchboard.dispatcher.handlers.handed import HEADER, Handed
from switchboard.platform.errors import (
    BudgetExhausted,
    ModelNotPriced,
    RunInterrupted,
    SwitchboardError,
)
from switchboard.platform.events.bus import EventBus
from switchboard.platform.observe.metrics import Metrics
from switchboard.platform.values import names

log = logging.getLogger("switchboard.dispatcher.budgets")

#: How often a run paused at a cap looks again (a cap raised through another replica).
POLL_S: Final = 2.0
#: How long the budgets read for a message stand for the next messages of the same
#: workspace, assistant and key: a budget created, changed or deleted through another
#: replica applies to new runs here within this time.
READ_TTL_S: Final = 1.0
#: Reads kept; past it they are all dropped.
MAX_READS: Final = 10_000
#: Times a hop reads what is left and loses it to another run before it waits like any step.
REST_ATTEMPTS: Final = 4


class Pauser(Protocol):
    """The run's pause, as approvals use it (execution's ``_RunHost``)."""

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...


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
        #: Budgets read lately, by (workspace, assistant, API key id): when, and what.
        self._reads: dict[tuple[str, str, str, tuple[str, ...]], tuple[float, Read]] = {}

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

    async def read(
        self, workspace_id: str, assistant: str, api_key_id: str, ancestors: Sequence[str] = ()
    ) -> Read:
        """``applicable``, with the version of the workspace's budgets it read.

        Kept ``READ_TTL_S`` for the next message of the same workspace, assistant
        and key (a read per message was a statement on every message's path, and
        most workspaces have no budget at all); a change made here drops it at
        once (the version), one made through another replica is seen within
        ``READ_TTL_S``. What a reservation takes is still decided by the
        database; a paused run reads its budgets afresh.
        """
        version = self.version(workspace_id)
        key = (workspace_id, assistant, api_key_id, tuple(ancestors))
        now = time.monotonic()
        cached = self._reads.get(key)
        if cached is not None and cached[1].version == version and now - cached[0] < READ_TTL_S:
            return cached[1]
        read = Read(await self.applicable(workspace_id, assistant, api_key_id, ancestors), version)
        if len(self._reads) >= MAX_READS:
            self._reads.clear()
        self._reads[key] = (now, read)
        return read

    def fresh(self, read: Read, workspace_id: str) -> bool:
        """Whether no budget of ``workspace_id`` changed here since ``read``."""
        return read.version == self.version(workspace_id)

    async def applicable(
        self, workspace_id: str, assistant: str, api_key_id: str, ancestors: Sequence[str] = ()
    ) -> tuple[Applicable, ...]:
        """The budgets of a run of ``assistant`` (its name, or "") started with
        ``api_key_id`` (or ""). ``ancestors``: for a delegate's run, the assistants (ids)
        of the runs above it, whose budgets it is charged to as well: a parent's caps
        hold its whole tree (docs/delegation.md)."""
        assistant_id = assistant.rsplit("/", 1)[-1] if assistant else ""
        key = api_key_id.rsplit("/", 1)[-1]
        above = sorted(set(ancestors) - {assistant_id})
        # One read for the run's assistant and those above it, in the ledger's lock
        # order (by id) and within its bound.
        return await self.ledger.applicable(workspace_id, assistant_id, key, above)

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
                    usage=alert_usage(alert.used, alert.held, reset),
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
        handed: Handed | None = None,
        record: Record | None = None,
        ancestors: Sequence[str] = (),
    ) -> RunBudget | None:
        """The run's budget (None when no budget applies and none was handed to
        it: nothing to reserve). ``record``: the run's record of each settlement,
        in its transaction (``Ledger.settle``)."""
        if not read.budgets and not handed:
            return None

        def reload() -> Awaitable[tuple[Applicable, ...]]:
            return self.applicable(workspace_id, run.assistant, api_key_id, ancestors)

        return RunBudget(
            self,
            read.budgets,
            run=run,
            workspace_id=workspace_id,
            host=host,
            reload=reload,
            version=read.version,
            handed=handed or None,
            record=record,
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
        handed: Handed | None = None,
        record: Record | None = None,
    ) -> None:
        self._spending = spending
        self._record = record
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
        #: The caps a caller handed to this run (None: it was not called across a hop),
        #: and what its steps used and hold of them (in memory: one run, one process).
        self._handed = HandedCaps(handed)
        #: What the run's settled steps used: its charge, which a run that does not
        #: succeed (no result to carry its usage) still reports (execution's ``_unwind``).
        self.charged = Amount()

    @property
    def handed(self) -> Handed | None:
        """The caps a caller handed to this run (None: it was not called across a hop)."""
        return self._handed.caps

    @property
    def caps_cost(self) -> bool:
        return any(b.caps.cost is not None for b in self.budgets) or (
            self.handed is not None and self.handed.cost_micros is not None
        )

    async def reserve(self, cost_micros: int, input_tokens: int, output_tokens: int) -> str:
        ask = Amount(max(0, cost_micros), max(0, input_tokens), max(0, output_tokens))
        self._check_handed(ask)
        await self._current()
        outcome = await self._hold(ask)
        if isinstance(outcome, Hold):
            self._spending.reserved("reserved")
            return self._keep(outcome)
        self._spending.reserved("refused")
        async with self._pausing:
            return self._keep(await self._paused(ask, outcome))

    async def reserve_call(
        self,
        prompt_tokens: int,
        max_tokens: int,
        min_tokens: int,
        cost: Callable[[int, int], int],
    ) -> CallHold:
        """Hold a model call (``handlers.StepBudget.reserve_call``): all it asks when
        that fits (one statement, as ``reserve``); else, with the room read, its prompt
        and as many answer tokens as fit, down to ``min_tokens`` (a useful answer);
        else the run pauses there as at any cap, and goes on with what fits then."""
        prompt = max(0, prompt_tokens)
        least = max(1, min(min_tokens, max_tokens))
        call = Call(prompt, max_tokens, least, cost)
        whole = call.ask(max_tokens)
        await self._current()
        if self._handed.holds(whole):
            outcome = await self._hold(whole)
            if isinstance(outcome, Hold):
                self._spending.reserved("reserved")
                return CallHold(self._keep(outcome), max_tokens)
        for _ in range(REST_ATTEMPTS):
            fit = call.fit(await self._rooms())
            if fit.tokens < least:
                break
            fitted = await self._hold(call.ask(fit.tokens))
            if isinstance(fitted, Hold):
                self._spending.reserved("reserved")
                return CallHold(self._keep(fitted), fit.tokens, fit.note)
            # Another run took some of the room meanwhile: read it again.
        # Not even a useful answer fits (or other runs keep taking the room first).
        needed = call.ask(least)
        self._check_handed(needed)
        outcome = await self._hold(needed)
        if isinstance(outcome, Hold):
            self._spending.reserved("reserved")
            note = call.lowered(least, {}) if least < max_tokens else ""
            return CallHold(self._keep(outcome), least, note)
        self._spending.reserved("refused")
        notes: dict[int, str] = {}

        async def attempt(overdraft: bool) -> Hold | list[Full]:
            if overdraft:
                # An owner let the call past the cap: all it asked, within a handed cap.
                handed = call.fit({HEADER: self._handed.left()} if self.handed else {})
                ask = call.ask(max(least, handed.tokens))
                self._check_handed(ask)
                return await self._hold(ask, overdraft=True)
            fit = call.fit(await self._rooms())
            tokens = max(least, fit.tokens)
            ask = call.ask(tokens)
            self._check_handed(ask)
            notes[tokens] = fit.note
            return await self._hold(ask)

        async with self._pausing:
            hold = await self._paused(
                whole,
                outcome,
                attempt=attempt,
                needed=needed,
                least=least,
                step=call.what(least, priced=self.caps_cost),
            )
        tokens = hold.amount.output_tokens
        return CallHold(
            self._keep(hold), tokens, notes.get(tokens, "") if tokens < max_tokens else ""
        )

    async def reserve_rest(self, *, hold: bool = True) -> tuple[str, Handed]:
        """Hold what is left of every cap, for a hop: the hold's id and the caps
        to hand over. Nothing left of a stored budget: the run pauses as at any
        cap (and goes on once there is room); of a handed one: BudgetExhausted.
        ``hold`` False: hold nothing (a hop whose callee has the run make priced
        calls meanwhile, which reserve as they go); the id settles what it reports."""
        races = 0
        while True:
            await self._current()
            room = await self._ledger.room(self.budgets, self._run_id) if self.budgets else {}
            for name, left in self._handed.left().items():
                room[name] = min(room.get(name, left), left)
            empty = {name for name, left in room.items() if left <= 0}
            if empty:
                # One unit of what has no room cannot fit: the step waits there (until
                # there is room, an owner decides, or the timeout) or ends.
                needs_tokens = bool(empty & {"input_tokens", "total_tokens"})
                waited = await self.reserve(
                    1 if "cost_micros" in empty else 0,
                    1 if needs_tokens else 0,
                    1 if "output_tokens" in empty else 0,
                )
                await self.release(waited)
                continue
            ask = rest(room) if hold else Amount()
            if races >= REST_ATTEMPTS:
                # Runs of the same budgets keep taking room first: wait like any step.
                return await self.reserve(
                    ask.cost_micros, ask.input_tokens, ask.output_tokens
                ), Handed(**room)
            outcome = await self._hold(ask)
            if isinstance(outcome, Hold):
                self._spending.reserved("reserved")
                return self._keep(outcome), Handed(**room)
            races += 1  # another run took some of it meanwhile: read again

    async def settle(
        self, hold: str, cost_micros: int, input_tokens: int, output_tokens: int
    ) -> None:
        kept = self._holds.pop(hold, None)
        if kept is None:
            return
        actual = Amount(cost_micros, input_tokens, output_tokens)
        if kept.windows:
            try:
                settled = await self._ledger.settle(kept, actual, record=self._record)
            except BaseException:
                self._holds[hold] = kept  # released when the run ends
                raise
            if settled.refused:
                # Another instance took the run over: its charges are that one's now.
                self._holds[hold] = kept
                raise RunInterrupted("another dispatcher instance took the run over")
            if settled.charged_before:
                # Its hold was charged whole when this attempt was taken for lost, and
                # that is what the run's row and the budgets count: so does its report.
                actual = kept.amount
        self.charged = self.charged + actual
        self._handed.settle(kept.amount, actual)
        if not kept.windows:
            return
        # What the hold kept beyond what was used is free again: runs paused here look.
        self._spending.wake(self._workspace_id)
        if settled.alerts:
            await self._spending.alerts(settled.alerts)

    async def release(self, hold: str) -> None:
        kept = self._holds.pop(hold, None)
        if kept is not None:
            self._handed.settle(kept.amount, Amount())
            if kept.windows:
                await self._ledger.release(kept)
                self._spending.wake(self._workspace_id)

    # -- the caps a caller handed over -----------------------------------------------------

    def hand_down(self) -> tuple[Amount, Handed] | None:
        """What is left of the caps the run's caller handed over, to hand to a child run
        (``runs/delegation/``), held whole until ``handed_back``: no step of this run
        spends it meanwhile. None: no caps were handed to this run."""
        return self._handed.hand_down()

    def handed_back(self, held: Amount, used: Amount) -> None:
        """A child handed ``held`` (``hand_down``) ended having used ``used``: that much
        is spent of the handed caps, the rest is free again."""
        self._handed.settle(held, used)

    async def _rooms(self) -> dict[str, dict[str, int]]:
        """What is left of each cap, per budget (its name) and of the handed caps
        (``HEADER``): read, not held."""
        rooms: dict[str, dict[str, int]] = {}
        for budget in self.budgets:
            rooms[budget.name] = await self._ledger.room((budget,), self._run_id)
        if self.handed is not None:
            rooms[HEADER] = self._handed.left()
        return rooms

    async def _shortfall(self, needed: Amount, step: str) -> str:
        """``step`` needs ``needed``, and each budget (or handed cap) without room for it:
        how much of which cap is left, in words."""
        caps = {budget.name: limits(budget.caps) for budget in self.budgets}
        handed = (self.handed or Handed()).capped()
        return shortfall(needed, step, await self._rooms(), caps, handed)

    def _check_handed(self, ask: Amount) -> None:
        """A step with no room in a handed cap ends the run: no one here can raise it."""
        refused = self._handed.refusal(ask)
        if refused is not None:
            self._spending.reserved("refused")
            self._spending.refused(BudgetExhausted.reason)
            raise refused

    async def _hold(self, ask: Amount, *, overdraft: bool = False) -> Hold | list[Full]:
        """Hold ``ask`` in the stored budgets and the handed caps (checked before)."""
        if self.budgets:
            outcome = await self._ledger.reserve(
                self.budgets, self._run_id, ask, overdraft=overdraft
            )
        else:
            outcome = Hold(names.new_id(), self._run_id, ask, ())
        if isinstance(outcome, Hold):
            self._handed.take(ask)
        return outcome

    async def close(self) -> None:
        """The run ended: holds its steps did not settle (cancelled, failed) go back."""
        holds, self._holds = [h for h in self._holds.values() if h.windows], {}
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

    async def _paused(
        self,
        ask: Amount,
        full: list[Full],
        *,
        attempt: Callable[[bool], Awaitable[Hold | list[Full]]] | None = None,
        needed: Amount | None = None,
        least: int = 0,
        step: str = "",
    ) -> Hold:
        """Wait at the cap until the step fits, an owner decides, or the timeout.

        ``ask`` is what the step asks, ``needed`` what it goes on with at least
        (``least`` answer tokens of a model call), ``attempt(overdraft)`` one try
        at holding it (``ask`` itself unless given)."""
        if attempt is None:

            async def attempt(overdraft: bool) -> Hold | list[Full]:
                return await self._hold(ask, overdraft=overdraft)

        needed = needed or ask
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
        budget.min_output_tokens = least
        budget.description = await self._shortfall(needed, step or step_needs(needed))
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
                        raise refusal(
                            full,
                            f"the run was failed at its cap by {budget.decided_by}",
                            budget.description,
                        )
                    # Taken before the attempt, so a change during it is not missed.
                    changed = self._spending.changed(self._workspace_id)
                    decided = self._decided
                    overdraft = decision == pb.BUDGET_DECISION_ALLOW_OVERDRAFT
                    if attempts:
                        self._version = self._spending.version(self._workspace_id)
                        self.budgets = await self._reload()
                    attempts += 1
                    outcome = await attempt(overdraft)
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
                budget.description,
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
        # Waited for, not awaited: awaiting a cancelled one raises CancelledError,
        # and suppressing that would swallow a cancel of this task too (the run's
        # CancelRun, issue 67), which then went on waiting at its cap.
        await asyncio.wait(tasks)
