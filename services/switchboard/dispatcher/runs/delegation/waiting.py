"""A parent's scheduler slot while its children run."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from switchboard.dispatcher.runs.core.active.lifecycle import Active
from switchboard.dispatcher.runs.core.scheduler import Scheduler


@dataclass
class Waiting:
    """A parent's slot while its children run: given back when the first starts
    waiting, taken back (past the limits, as a resumed run does) when the last ends."""

    scheduler: Scheduler
    active: Active
    count: int = 0
    #: Children under a budget the run's caller handed over go one at a time, each
    #: handed (and holding) what is left of it.
    handing: asyncio.Lock = field(default_factory=asyncio.Lock)

    def enter(self) -> None:
        self.count += 1
        ticket = self.active.ticket
        if self.count == 1 and ticket is not None:
            self.scheduler.paused(ticket)

    def leave(self) -> None:
        self.count -= 1
        ticket = self.active.ticket
        if self.count == 0 and ticket is not None:
            self.scheduler.resumed(ticket)
