"""The room a run's caps leave and what fits in it, and what budgets say when a step
does not fit: no I/O (``spending.py`` holds, waits and publishes; this counts and words).

* What a step asks of each cap (``asks``: a total-token cap counts input and output),
  and what of a model call fits what is left (``Call.fit``: ``max_tokens`` lowered as
  far as the least useful answer, and why, in words).
* What a hop holds of what is left (``rest``), and the caps a caller handed to a run
  across a hop with what the run has taken of them (``HandedCaps``).
* What is said: what a step is short of (``shortfall``), the refusal of budgets without
  room (``refusal``), and the BUDGET_ALERT event (``alert_event``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.dispatcher.budgets.ledger import Amount, Applicable, Caps, Full
from switchboard.dispatcher.handlers.handed import HEADER, Handed
from switchboard.platform.errors import BudgetExhausted
from switchboard.platform.values.resources import WorkspaceName
from switchboard.platform.values.wording import counted, noun

#: Who a BUDGET_ALERT no person caused is from.
SYSTEM: Final = events_pb2.Actor(name="system")
#: How each cap is said in a message.
CAP_WORDS: Final = {
    "cost_micros": "micro-units of cost",
    "input_tokens": "input tokens",
    "output_tokens": "output tokens",
    "total_tokens": "total tokens",
}


def asks(ask: Amount) -> dict[str, int]:
    """What ``ask`` takes (or has taken) of each cap (a total-token cap counts input and
    output)."""
    return {
        "cost_micros": ask.cost_micros,
        "input_tokens": ask.input_tokens,
        "output_tokens": ask.output_tokens,
        "total_tokens": ask.input_tokens + ask.output_tokens,
    }


def limits(caps: Caps) -> dict[str, int]:
    """A stored budget's caps by the names rooms use."""
    named = {
        "cost_micros": caps.cost,
        "input_tokens": caps.input_tokens,
        "output_tokens": caps.output_tokens,
        "total_tokens": caps.total_tokens,
    }
    return {name: value for name, value in named.items() if value is not None}


def step_needs(needed: Amount) -> str:
    parts = []
    if needed.input_tokens + needed.output_tokens:
        parts.append(f"{needed.input_tokens + needed.output_tokens:,} tokens")
    if needed.cost_micros or not parts:
        parts.append(f"{needed.cost_micros:,} micro-units of cost")
    return f"the step needs {' and '.join(parts)}"


def shortfall(
    needed: Amount,
    step: str,
    rooms: dict[str, dict[str, int]],
    caps: dict[str, dict[str, int]],
    handed: dict[str, int],
) -> str:
    """``step`` needs ``needed``, and each of ``rooms`` (a budget's, by its name, or the
    handed caps') without room for it: how much of which cap is left, in words.
    ``caps``: each budget's caps (``limits``); ``handed``: the handed caps."""
    needs = asks(needed)
    short: list[str] = []
    for name, room in rooms.items():
        over = [cap for cap, left in room.items() if needs[cap] > left]
        if not over:
            continue
        limit = caps.get(name, handed)
        said = ", ".join(
            f"{room[cap]:,} of its {limit.get(cap, room[cap]):,} {CAP_WORDS[cap]}" for cap in over
        )
        short.append(f"{name} has {said} left")
    return f"{step}: {'; '.join(short)}" if short else step


@dataclass(frozen=True)
class Fit:
    """The answer tokens of a model call that fit now (below its least: no useful
    answer fits), and why fewer than it asked, in words."""

    tokens: int
    note: str = ""


@dataclass(frozen=True)
class Call:
    """A model call as a budget sees it: its prompt, its ``max_tokens``, the least
    answer it goes on with, and its price."""

    prompt: int
    max_tokens: int
    least: int
    cost: Callable[[int, int], int]

    def ask(self, tokens: int) -> Amount:
        return Amount(max(0, self.cost(self.prompt, tokens)), self.prompt, tokens)

    def what(self, tokens: int, *, priced: bool) -> str:
        """What the call needs with ``tokens`` of answer, in words (its cost too when
        ``priced``: a cost cap applies)."""
        needed = self.ask(tokens)
        cost = f", {needed.cost_micros:,} micro-units of cost" if priced else ""
        return (
            f"the model call needs at least {self.prompt + tokens:,} tokens "
            f"({self.prompt:,} of prompt and {tokens:,} of answer{cost})"
        )

    def _tokens_in(self, room: dict[str, int]) -> int:
        """The most answer tokens (up to ``max_tokens``) that fit in ``room``; -1 if
        not even the prompt does."""
        tokens = self.max_tokens
        if "input_tokens" in room and self.prompt > room["input_tokens"]:
            return -1
        if "output_tokens" in room:
            tokens = min(tokens, room["output_tokens"])
        if "total_tokens" in room:
            tokens = min(tokens, room["total_tokens"] - self.prompt)
        if "cost_micros" in room:
            tokens = min(tokens, self._affordable(room["cost_micros"]))
        return max(tokens, -1)

    def _affordable(self, micros: int) -> int:
        """The most answer tokens whose call costs at most ``micros`` (-1: none)."""
        if self.cost(self.prompt, 0) > micros:
            return -1
        low, high = 0, self.max_tokens
        while low < high:
            middle = (low + high + 1) // 2
            if self.cost(self.prompt, middle) <= micros:
                low = middle
            else:
                high = middle - 1
        return low

    def fit(self, rooms: dict[str, dict[str, int]]) -> Fit:
        """What fits in every budget's room (``RunBudget._rooms``), and which budgets
        lowered it."""
        each = {name: self._tokens_in(room) for name, room in rooms.items()}
        tokens = min(each.values(), default=self.max_tokens)
        if tokens >= self.max_tokens or tokens < self.least:
            return Fit(tokens)
        return Fit(
            tokens, self.lowered(tokens, {n: rooms[n] for n, t in each.items() if t == tokens})
        )

    def lowered(self, tokens: int, binding: dict[str, dict[str, int]]) -> str:
        """The note a call lowered to ``tokens`` by the budgets ``binding`` shows."""
        said = "; ".join(
            f"{name} has "
            + ", ".join(f"{left:,} {CAP_WORDS[cap]}" for cap, left in room.items())
            + " left"
            for name, room in binding.items()
        )
        return f"max_tokens lowered from {self.max_tokens:,} to {tokens:,} to fit the budget" + (
            f" ({said})" if said else ""
        )


def rest(room: dict[str, int]) -> Amount:
    """What a hop holds of ``room``: all of it, with input and output tokens
    together within a total cap (the hop settles what it used, however split)."""
    inp, out, total = (room.get(k) for k in ("input_tokens", "output_tokens", "total_tokens"))
    if total is not None:
        if inp is None and out is None:
            inp, out = total, 0
        elif out is None:
            inp = min(inp or 0, total)
            out = total - inp
        elif inp is None:
            out = min(out, total)
            inp = total - out
        else:
            out = min(out, total)
            inp = min(inp, total - out)
    return Amount(room.get("cost_micros", 0), inp or 0, out or 0)


class HandedCaps:
    """The caps a caller handed to a run across a hop (None: none were), and what the
    run's steps hold and used of them: in memory (one run, one process). No owner can
    raise them: a step they have no room for ends the run (``refusal``)."""

    def __init__(self, caps: Handed | None) -> None:
        self.caps = caps
        self.taken = Amount()

    def left(self) -> dict[str, int]:
        """What is left of each handed cap (none handed: nothing)."""
        if self.caps is None:
            return {}
        spent = asks(self.taken)
        return {name: max(0, cap - spent[name]) for name, cap in self.caps.capped().items()}

    def holds(self, ask: Amount) -> bool:
        """Whether ``ask`` fits in what is left of the handed caps."""
        left = self.left()
        needs = asks(ask)
        return all(needs[name] <= room for name, room in left.items())

    def refusal(self, ask: Amount) -> BudgetExhausted | None:
        """What ends a run whose step asks more than is left of a handed cap (None: it fits)."""
        left = self.left()
        if not left:
            return None
        needs = asks(ask)
        over = sorted(name for name, room in left.items() if needs[name] > room)
        if not over:
            return None
        detail = ", ".join(f"{name} {left[name]} left, {needs[name]} asked" for name in over)
        return BudgetExhausted(
            f"the step needs more than is left of the budget the run's caller handed "
            f"over ({detail})",
            subject=HEADER,
            subjects=[(f"{HEADER}.{name}", f"{left[name]} left") for name in over],
        )

    def take(self, ask: Amount) -> None:
        """A step of the run holds ``ask``."""
        if self.caps is not None:
            self.taken = self.taken + ask

    def settle(self, held: Amount, actual: Amount) -> None:
        """What held ``held`` used ``actual``: the rest is free again."""
        if self.caps is None:
            return
        taken = self.taken
        self.taken = Amount(
            max(0, taken.cost_micros - held.cost_micros + actual.cost_micros),
            max(0, taken.input_tokens - held.input_tokens + actual.input_tokens),
            max(0, taken.output_tokens - held.output_tokens + actual.output_tokens),
        )

    def hand_down(self) -> tuple[Amount, Handed] | None:
        """All that is left, taken whole to hand to a child run, and the caps it is
        (None: none were handed)."""
        if self.caps is None:
            return None
        left = self.left()
        held = rest(left)
        self.taken = self.taken + held
        return held, Handed(**left)


def rfc3339(at: dt.datetime) -> str:
    return at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def refusal(full: Sequence[Full], what: str, detail: str = "") -> BudgetExhausted:
    """``BudgetExhausted`` naming each budget of ``full`` and the earliest reset;
    ``detail`` says what the step needed and what was left."""
    subjects = [
        (f.budget.name, f"the budget {f.budget.display_name or f.budget.budget_id} has no room")
        for f in full
    ]
    resets = [f.reset for f in full if f.reset is not None]
    metadata = {"reset_time": rfc3339(min(resets))} if resets else {}
    verb = noun(len(full), "applies has", "apply have")
    return BudgetExhausted(
        f"{what}: {counted(len(full), 'budget')} that {verb} no room left "
        f"({', '.join(f.budget.name for f in full)})" + (f"; {detail}" if detail else ""),
        subject=full[0].budget.name,
        subjects=subjects,
        metadata=metadata,
    )


def alert_usage(used: Amount, held: Amount, reset: dt.datetime | None) -> pb.BudgetUsage:
    """What a threshold's BUDGET_ALERT says the budget's period used and holds, and when
    it resets."""
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
        workspace=str(WorkspaceName(budget.workspace_id)),
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
