"""A run's lifecycle: its states, the transitions between them, and what a live run holds.

::

    QUEUED ──start──▶ RUNNING ──succeed──▶ SUCCEEDED
      │ └─────────consume (a steer)─────────▲
      │  ▲               │  ▲
      │  └──requeue──────┤  └──resume──┐
      │                  └──pause──▶ REQUIRES_ACTION
      │                  │                 │
      └──────────────────┴─────────────────┴──▶ FAILED / CANCELLED / DEADLINE_EXCEEDED

* ``start``: the scheduler gave it a slot; RUNNING is shown at once and stored
  once the run has read its context (``Execution._begin``: the writes waited
  for the reads on the path to the first delta).
* ``pause``: tool calls wait for a person (``tools/approvals.py``); stored with the
  job's steps before it is shown, so a restart resumes it; the scheduler gives
  its slot to others.
* ``resume``: every call decided; stored and shown.
* ``consume``: a steer's run (``steering.py``) whose target took its message at
  a step boundary: SUCCEEDED without starting, stored in the transaction that
  journals it in the target's job.
* ``requeue``: the dispatcher stopped while it ran (recovery policy
  ``resume`` or ``requeue``), or it is recovered after a restart: it
  continues from its journal (``tools/journal.py``).
* the terminal states are stored before they are shown, with their event
  (the outbox), and nothing follows them.

``Run.state`` is changed only through ``Active.to``, which refuses a transition
the diagram does not have: a bug shows as an error in the log and a failed
run, not as a run that says RUNNING after it ended.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import deque
from dataclasses import dataclass, field
from typing import Final

from google.protobuf import struct_pb2

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.dispatcher import mapping
from switchboard.dispatcher.budgets.spending import Read, RunBudget
from switchboard.dispatcher.handlers.base import Handler
from switchboard.dispatcher.runs.core.active.feed import Feed
from switchboard.dispatcher.runs.core.records import Charged
from switchboard.dispatcher.runs.core.scheduler import Ticket
from switchboard.dispatcher.tools.journal import Journal
from switchboard.dispatcher.tools.runner import RunTools
from switchboard.dispatcher.voice.speaker import Speaker
from switchboard.internal.dispatcher.v1 import job_pb2
from switchboard.platform.errors import SwitchboardError
from switchboard.platform.security.policy import Principal

_QUEUED = pb.RUN_STATE_QUEUED
_RUNNING = pb.RUN_STATE_RUNNING
_PAUSED = pb.RUN_STATE_REQUIRES_ACTION
_ENDS = (pb.RUN_STATE_FAILED, pb.RUN_STATE_CANCELLED, pb.RUN_STATE_DEADLINE_EXCEEDED)

#: Each state's possible next states.
TRANSITIONS: Final[dict[int, frozenset[int]]] = {
    # SUCCEEDED straight from QUEUED: a steer's run its target consumed
    # (``steering.py``); its answer is the target's.
    _QUEUED: frozenset({_RUNNING, pb.RUN_STATE_SUCCEEDED, *_ENDS}),
    _RUNNING: frozenset({pb.RUN_STATE_SUCCEEDED, _PAUSED, _QUEUED, *_ENDS}),
    _PAUSED: frozenset({_RUNNING, _QUEUED, *_ENDS}),
}


class IllegalTransition(RuntimeError):
    """A transition the lifecycle does not have: a bug in the dispatcher."""


@dataclass(eq=False)
class Active:
    """A run this process owns: queued, running or paused."""

    run: pb.Run
    run_id: str
    workspace_id: str
    conversation_id: str
    principal: Principal
    handler: Handler
    #: What a restart needs: the input, the assistant, the steps so far.
    job: job_pb2.RunJob
    feed: Feed
    ticket: Ticket | None = None
    task: asyncio.Task[None] | None = None
    #: Why it is being cancelled (set before the task is cancelled).
    cancel_error: SwitchboardError | None = None
    #: Whether its task began (a task cancelled before that never runs its code).
    started: bool = False
    #: The write of its RUNNING state, awaited before the next one.
    saving: asyncio.Future[bool] | None = None
    #: RUNNING is not yet stored and its events wait in the outbox (see ``Execution._begin``).
    held: bool = False
    #: Events waiting for this run's publisher, in order.
    outbox: deque[events_pb2.Event] = field(default_factory=deque)
    #: Events that go out with the run's end (its result): written in the
    #: transaction that stores the end, and published in one batch with it.
    ending: list[events_pb2.Event] = field(default_factory=list)
    #: Its answer, stored with its end in one transaction (``runs/execution/finishing.py``), and the
    #: id the answer's message gets; None once stored, or stored on its own.
    answer: tuple[cpb.AppendMessageRequest, str] | None = None
    publisher: asyncio.Task[None] | None = None
    #: The position of its last logged event (its tokens are filed after it; () until one).
    logged: tuple[int, ...] = ()
    #: Its tool runner, while it executes with tools.
    tools: RunTools | None = None
    #: Its speech, while it speaks its answer (``SendMessageRequest.speech.speak``).
    speaker: Speaker | None = None
    #: A cancel's ``heard_through_sequence``: the last speech update its listener heard.
    heard_through: int = 0
    #: Its budgets' reservations, while it executes with budgets that apply.
    budget: RunBudget | None = None
    #: The budgets that apply to it, when admission read them (None: read at its start).
    budgets: Read | None = None
    #: Serializes stored state changes (a pause, decisions, the end), whose
    #: sequences are taken before their write and shown after it.
    persisting: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: ``time.monotonic()`` when the scheduler admitted it, and when it started
    #: (0.0: not yet): its queue wait and its duration, for logs and metrics.
    queued_at: float = 0.0
    started_at: float = 0.0
    #: How a recovered run continues from its journal (``recovery.py``): "" for a
    #: run that was not interrupted, else the recovery policy that applies
    #: ("resume" or "requeue"; a paused run recovered under "fail" resumes).
    recovered: str = ""
    #: Its journal, while a handler outside the process runs it (``tools/journal.py``).
    journal: Journal | None = None
    #: What its budgets were charged: every earlier attempt's settlements (stored
    #: on its row, read when it was recovered), then this attempt's once its
    #: budget is closed. What it reports covers it (``Execution``).
    charged: Charged = field(default_factory=Charged)
    #: Another instance took it over while this process held it (``Execution.retire``):
    #: it writes nothing more and leaves this process.
    retired: bool = False
    #: The deadline an earlier attempt ran under (wall clock), kept by a recovered
    #: run: a crash gives it no new time, and its delegate calls hand down the same.
    deadline_at: dt.datetime | None = None

    @property
    def conversation(self) -> str:
        return mapping.conversation_name(self.workspace_id, self.conversation_id)

    @property
    def message(self) -> cpb.Message:
        return self.job.message

    @property
    def parameters(self) -> struct_pb2.Struct:
        return self.job.parameters

    @property
    def timeout_s(self) -> float:
        return self.job.timeout_seconds

    def begin_deadline(self, now: dt.datetime) -> float:
        """Set the run's deadline as it starts (the one an earlier attempt ran under,
        when it was recovered); returns the time it has from ``now``."""
        allowed = self.time_left_s(now)
        self.run.deadline.FromDatetime(self.deadline_at or now + dt.timedelta(seconds=allowed))
        return allowed

    def time_left_s(self, now: dt.datetime) -> float:
        """The time this attempt has: its whole timeout, or what is left of the
        deadline an earlier attempt ran under (a little at least: the deadline then
        ends it at once, as DEADLINE_EXCEEDED)."""
        if self.deadline_at is None:
            return self.timeout_s
        return max(0.001, min(self.timeout_s, (self.deadline_at - now).total_seconds()))

    @property
    def assistant(self) -> pb.Assistant | None:
        return self.job.assistant if self.job.HasField("assistant") else None

    def to(self, state: pb.RunState.ValueType) -> None:
        """Move the run to ``state``, if the lifecycle has that transition."""
        current = self.run.state
        if state not in TRANSITIONS.get(current, frozenset()):
            raise IllegalTransition(
                f"run {self.run.name}: {pb.RunState.Name(current)} -> {pb.RunState.Name(state)}"
            )
        self.run.state = state
        if state != pb.RUN_STATE_QUEUED:
            # It waits behind nothing any more (``waiting.py``): it started or ended.
            self.run.ClearField("queued_behind")
