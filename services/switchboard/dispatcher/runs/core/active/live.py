"""What the dispatcher's stages share: ``Common`` (this process's live runs, the
runs' store and feeds, the bus, the router and the run limits, given to every
stage as one keyword), and the sequence blocks runs number their updates in.

Sequences: each attempt at a run numbers its updates in its own block of
``SEQUENCE_BLOCK``, and a recovered run continues in the block after the one
stored. Its previous owner may have shown or published any number of updates
the store never saw (deltas are not stored), and none of those can be
reached from the stored block: a watcher never sees a sequence twice, and its
closing update is always newer than anything it saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.handlers.base import Handler
from switchboard.dispatcher.handlers.router import Router
from switchboard.dispatcher.runs.core.active.feed import Feeds
from switchboard.dispatcher.runs.core.active.lifecycle import Active
from switchboard.dispatcher.runs.core.store import RunStore
from switchboard.platform.events.bus import EventBus
from switchboard.platform.observe.metrics import WORKSPACE_HANDLER

#: Bound on one bookkeeping call (storing a message, the final save of a run).
FINISH_TIMEOUT_S: Final = 10.0
#: Longest reason (a cancel's, a decision's, a handler's failure) kept.
MAX_REASON_CHARS: Final = 500
#: Sequences of one attempt at a run (see the module docstring).
SEQUENCE_BLOCK: Final = 2**32
#: Updates one attempt may publish; the rest of its block is room for its end.
MAX_UPDATES: Final = SEQUENCE_BLOCK - 64


@dataclass(frozen=True)
class RunLimits:
    """What bounds a run and its admission (input size, message rates, timeouts),
    and how this instance keeps its runs (heartbeat, recovery, lease)."""

    instance_id: str
    max_input_chars: int
    messages_per_minute_per_user: int
    default_timeout_s: float
    max_timeout_s: float
    heartbeat_s: float
    recovery: Literal["resume", "fail", "requeue"]
    #: How long this instance's runs are left alone after it stops renewing its lease.
    lease_s: float = 30.0
    #: SendMessage calls of one workspace admitted at once (``admission.Turns``).
    admitting_per_workspace: int = 64


class Live:
    """The runs this process holds (admitted, running or paused), by name."""

    def __init__(self) -> None:
        self.runs: dict[str, Active] = {}
        #: The process is stopping: no run starts, saves give up after a while.
        self.closing = False

    def current(self, run: pb.Run) -> pb.Run:
        """``run`` as it stands now: the live copy, numbered to its feed, if held here."""
        active = self.runs.get(run.name)
        if active is None:
            return run
        current = pb.Run()
        current.CopyFrom(active.run)
        current.last_sequence = active.feed.last
        return current


@dataclass(frozen=True, kw_only=True)
class Common:
    """The collaborators every stage is built with, in one home: a stage takes
    ``common=`` and its own parts by keyword, so adding a stage, or a
    collaborator they all share, is one edit."""

    live: Live
    store: RunStore
    feeds: Feeds
    bus: EventBus
    router: Router
    limits: RunLimits


def next_block(sequence: int) -> int:
    """The last sequence before the block after ``sequence``'s: a new attempt's start."""
    return (sequence // SEQUENCE_BLOCK + 1) * SEQUENCE_BLOCK


def queued_again(run: pb.Run) -> None:
    """Back to QUEUED, as a run that never started (it will run again)."""
    run.state = pb.RUN_STATE_QUEUED
    run.ClearField("start_time")
    run.ClearField("deadline")


def handler_label(router: Router, handler_id: str, handler: Handler | None = None) -> str:
    """The handler's id as a metric label: the operator's handlers are a bounded
    set; every workspace's own experts are one value (``workspace``)."""
    registered = router.registry.get(handler_id)
    known = registered is handler if handler is not None else bool(registered)
    return handler_id if known else WORKSPACE_HANDLER
