"""Which queued run starts next: limits, fairness and one run per conversation.

Pure asyncio bookkeeping, no I/O. Rules:

* at most ``max_running`` runs execute at once, and at most
  ``max_running_per_workspace`` of one workspace;
* a conversation runs one run at a time, in the order its runs were queued
  (a later message's answer must not overtake an earlier one's);
* workspaces take turns: the next run comes from the waiting workspace that
  started a run least recently, so one busy workspace cannot starve the
  others however many runs it queues;
* the queue is bounded globally and per workspace; ``admit`` refuses past
  either bound with ``QueueFull`` (RESOURCE_EXHAUSTED).

After every transition ``on_change`` hears which conversations' lines changed
(a run joined, left, started, paused or resumed), so what each queued run waits
behind is said while it waits (``runs/core/waiting.py``), not found out later.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from switchboard.platform.errors import QueueFull


@dataclass(eq=False)
class Ticket:
    """A run's place in the scheduler."""

    run_id: str
    workspace: str
    conversation: str
    #: Called (synchronously) when the run may start; returns the run's task, whose
    #: end gives the slot back (None: it did not start, the process is stopping).
    start: Callable[[Ticket], asyncio.Task[None] | None] = field(repr=False)
    queued: bool = True


@dataclass(frozen=True)
class CapacityLimits:
    """How many runs may run and wait, in the process and per workspace."""

    max_running: int
    max_running_per_workspace: int
    max_queued: int
    max_queued_per_workspace: int


class Scheduler:
    def __init__(self, *, limits: CapacityLimits) -> None:
        self.limits = limits
        # workspace -> conversation -> that conversation's queued tickets, FIFO.
        self._queued: dict[str, OrderedDict[str, deque[Ticket]]] = {}
        # When each workspace last started a run (a counter, not a clock).
        self._last_start: dict[str, int] = {}
        self._starts = 0
        self._queued_count = 0
        self._queued_by_workspace: dict[str, int] = {}
        self._running: dict[str, Ticket] = {}
        self._running_by_workspace: dict[str, int] = {}
        self._running_conversations: set[str] = set()
        # Paused runs (waiting for a person): their conversation stays busy,
        # their worker slot is free for others.
        self._paused: dict[str, Ticket] = {}
        # conversation -> the ticket holding it (running or paused).
        self._holders: dict[str, Ticket] = {}
        #: Told (workspace, conversation) after a transition changed that line.
        self.on_change: Callable[[str, str], None] | None = None
        self._touched: dict[tuple[str, str], None] = {}

    # -- counts -------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return self._queued_count

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        """Paused runs: waiting for a person (REQUIRES_ACTION), holding no slot."""
        return len(self._paused)

    def active_in(self, conversation: str) -> list[str]:
        """Tickets' ``run_id`` of the conversation, running or queued, oldest first."""
        found = [
            t.run_id
            for t in (*self._running.values(), *self._paused.values())
            if t.conversation == conversation
        ]
        for conversations in self._queued.values():
            tickets = conversations.get(conversation)
            if tickets:
                found.extend(t.run_id for t in tickets)
        return found

    def line(self, workspace: str, conversation: str) -> tuple[Ticket | None, list[Ticket]]:
        """The ticket holding the conversation (running or paused; None if none) and
        its queued tickets, in the order they start."""
        conversations = self._queued.get(workspace)
        tickets = conversations.get(conversation) if conversations else None
        return self._holders.get(conversation), list(tickets or ())

    # -- transitions ----------------------------------------------------------------

    def check_room(self, workspace: str) -> None:
        """QueueFull unless one more run of ``workspace`` may wait."""
        if self._queued_count >= self.limits.max_queued:
            raise QueueFull(
                f"the dispatcher has {self._queued_count} runs waiting, its limit; retry later",
                subject="dispatcher_max_queued",
            )
        if self._queued_by_workspace.get(workspace, 0) >= self.limits.max_queued_per_workspace:
            raise QueueFull(
                "this workspace has too many runs waiting; retry later",
                subject="dispatcher_max_queued_per_workspace",
            )

    def admit(self, ticket: Ticket, *, force: bool = False) -> None:
        """Queue ``ticket`` (QueueFull if a bound is hit, unless ``force``) and start what can."""
        ws = ticket.workspace
        if not force:
            self.check_room(ws)
        conversations = self._queued.get(ws)
        if conversations is None:
            conversations = self._queued[ws] = OrderedDict()
        conversations.setdefault(ticket.conversation, deque()).append(ticket)
        self._queued_count += 1
        self._queued_by_workspace[ws] = self._queued_by_workspace.get(ws, 0) + 1
        self._touch(ticket)
        self._pump()
        self._notify()

    def withdraw(self, ticket: Ticket) -> bool:
        """Remove a queued ticket (cancelled before it started); False if not queued."""
        if not ticket.queued:
            return False
        conversations = self._queued.get(ticket.workspace)
        tickets = conversations.get(ticket.conversation) if conversations else None
        if conversations is None or tickets is None or ticket not in tickets:
            return False
        tickets.remove(ticket)
        self._dequeued(ticket, conversations, tickets)
        ticket.queued = False
        self._touch(ticket)
        self._pump()
        self._notify()
        return True

    def paused(self, ticket: Ticket) -> None:
        """A running ticket waits for a person: its slot goes to the next run, while its
        conversation stays busy (its later messages still wait for it)."""
        if not _take(self._running, ticket):
            return
        self._paused[ticket.run_id] = ticket
        self._release_slot(ticket.workspace)
        self._touch(ticket)
        self._pump()
        self._notify()

    def resumed(self, ticket: Ticket) -> None:
        """A paused ticket runs again. It takes its slot back even past the limits:
        it is already under way, and making it queue behind new runs would let a
        person's approval wait on strangers' work."""
        if not _take(self._paused, ticket):
            return
        self._running[ticket.run_id] = ticket
        ws = ticket.workspace
        self._running_by_workspace[ws] = self._running_by_workspace.get(ws, 0) + 1
        self._touch(ticket)
        self._notify()

    def finished(self, ticket: Ticket) -> None:
        """A running (or paused) ticket ended; start what can start now.

        Called when the run's task ends (``_start``): the scheduler watches
        its own slots, so execution never calls back up to give one back.
        """
        if _take(self._paused, ticket):
            self._let_go(ticket)
            self._pump()
            self._notify()
            return
        if not _take(self._running, ticket):
            return
        self._release_slot(ticket.workspace)
        self._let_go(ticket)
        self._pump()
        self._notify()

    def _let_go(self, ticket: Ticket) -> None:
        """The conversation ``ticket`` held is free for its next run."""
        self._running_conversations.discard(ticket.conversation)
        if self._holders.get(ticket.conversation) is ticket:
            del self._holders[ticket.conversation]
        self._touch(ticket)

    def _touch(self, ticket: Ticket) -> None:
        self._touched[ticket.workspace, ticket.conversation] = None

    def _notify(self) -> None:
        """Tell ``on_change`` of the lines this transition changed."""
        touched, self._touched = self._touched, {}
        if self.on_change is not None:
            for workspace, conversation in touched:
                self.on_change(workspace, conversation)

    def _release_slot(self, ws: str) -> None:
        left = self._running_by_workspace[ws] - 1
        if left:
            self._running_by_workspace[ws] = left
        else:
            del self._running_by_workspace[ws]
            if ws not in self._queued:  # idle: forget it, so the map stays bounded
                self._last_start.pop(ws, None)

    def _dequeued(
        self,
        ticket: Ticket,
        conversations: OrderedDict[str, deque[Ticket]],
        tickets: deque[Ticket],
    ) -> None:
        ws = ticket.workspace
        if not tickets:
            del conversations[ticket.conversation]
        if not conversations:
            del self._queued[ws]
        self._queued_count -= 1
        left = self._queued_by_workspace[ws] - 1
        if left:
            self._queued_by_workspace[ws] = left
        else:
            del self._queued_by_workspace[ws]

    def _pump(self) -> None:
        limits = self.limits
        while len(self._running) < limits.max_running and self._queued:
            # Least recently served first; ties keep arrival order (dicts are ordered).
            for ws in sorted(self._queued, key=lambda w: self._last_start.get(w, -1)):
                if self._running_by_workspace.get(ws, 0) >= limits.max_running_per_workspace:
                    continue
                ticket = self._next_in(ws)
                if ticket is not None:
                    self._start(ticket)
                    break
            else:
                return

    def _next_in(self, ws: str) -> Ticket | None:
        conversations = self._queued[ws]
        for conversation, tickets in conversations.items():
            if conversation in self._running_conversations:
                continue
            ticket = tickets.popleft()
            self._dequeued(ticket, conversations, tickets)
            return ticket
        return None

    def _start(self, ticket: Ticket) -> None:
        self._starts += 1
        self._last_start[ticket.workspace] = self._starts
        ticket.queued = False
        self._running[ticket.run_id] = ticket
        ws = ticket.workspace
        self._running_by_workspace[ws] = self._running_by_workspace.get(ws, 0) + 1
        self._running_conversations.add(ticket.conversation)
        self._holders[ticket.conversation] = ticket
        self._touch(ticket)
        task = ticket.start(ticket)
        if task is not None:
            task.add_done_callback(lambda _task: self.finished(ticket))


def _take(tickets: dict[str, Ticket], ticket: Ticket) -> bool:
    """Remove ``ticket`` from ``tickets`` if it is the one held for its run (a later
    attempt at the same run, recovered here, has a ticket of its own)."""
    if tickets.get(ticket.run_id) is not ticket:
        return False
    del tickets[ticket.run_id]
    return True
