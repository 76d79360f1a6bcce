"""The execution stage as a run's tool runner and budget see it: their ``host``.

A run's tool runner (``tools/runner.py``) and its budget (``budgets/spending.py``)
show updates, pause the run while a person decides (its approvals, a budget's
action) and store the messages of its steps; each run gets a ``Host`` for that,
over this process's ``Hosting``. A pause stops the run's deadline
(``core/clock.py``), stores the run paused with its steps so that a restart
resumes it, and gives its scheduler slot to others; a resume takes both back.

Why a module of its own: the host is the one door through which the tools and
the budgets reach the run's lifecycle, and it needs the scheduler, publishing
and the context service but nothing else of the execution stage; apart, the
door is what they can use and no more.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Awaitable

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.ports.context import ContextPort
from switchboard.dispatcher.runs.core.active.lifecycle import Active
from switchboard.dispatcher.runs.core.active.live import FINISH_TIMEOUT_S
from switchboard.dispatcher.runs.core.clock import RunClock
from switchboard.dispatcher.runs.core.publishing import Publishing
from switchboard.dispatcher.runs.core.scheduler import Scheduler
from switchboard.platform.errors import RunInterrupted, SwitchboardError
from switchboard.platform.values import names

log = logging.getLogger("switchboard.dispatcher")


async def saved_start(active: Active) -> None:
    """Wait for the write of the run's RUNNING state, if one is in flight: the next
    write of its state goes after it."""
    if active.saving is not None:
        try:
            await active.saving
        except SwitchboardError:
            # The final save (retried until it lands) supersedes it.
            log.warning("could not persist the start of a run", extra={"run": active.run.name})


class Hosting:
    """This process's side of its runs' pauses and the messages their steps store."""

    def __init__(
        self, *, publishing: Publishing, scheduler: Scheduler, context: ContextPort
    ) -> None:
        self._publishing = publishing
        self._scheduler = scheduler
        self._context = context

    def host(self, active: Active, clock: RunClock) -> Host:
        """The host of ``active``'s tool runner and budget, pausing its ``clock``."""
        return Host(self, active, clock)

    def emit(self, active: Active, update: pb.RunUpdate) -> None:
        self._publishing.emit(active, update)

    async def pause(self, active: Active) -> None:
        if active.retired:
            raise RunInterrupted("another dispatcher instance took the run over")
        await saved_start(active)
        active.to(pb.RUN_STATE_REQUIRES_ACTION)
        if active.ticket is not None:
            self._scheduler.paused(active.ticket)
        await self._publishing.persist(active, "pause", job=True)

    async def resume(self, active: Active) -> None:
        if active.retired:
            raise RunInterrupted("another dispatcher instance took the run over")
        active.to(pb.RUN_STATE_RUNNING)
        if active.ticket is not None:
            self._scheduler.resumed(active.ticket)
        await self._publishing.persist(active, "resume")

    def append(self, active: Active, request: cpb.AppendMessageRequest) -> Awaitable[cpb.Message]:
        return self._context.append_message(active.principal, request, timeout_s=FINISH_TIMEOUT_S)


class Host:
    """The execution stage, as one run's tool runner sees it."""

    def __init__(self, hosting: Hosting, active: Active, clock: RunClock) -> None:
        self._hosting = hosting
        self._active = active
        self._clock = clock

    def emit(self, update: pb.RunUpdate) -> None:
        self._hosting.emit(self._active, update)

    async def pause(self) -> None:
        self._clock.pause()
        # Not running, so nothing stops it: the approval's expire_time says when it fails.
        self._active.run.ClearField("deadline")
        await self._hosting.pause(self._active)

    async def resume(self) -> None:
        self._clock.resume()
        self._active.run.deadline.FromDatetime(
            names.now() + dt.timedelta(seconds=self._clock.left())
        )
        await self._hosting.resume(self._active)

    def append(self, request: cpb.AppendMessageRequest) -> Awaitable[cpb.Message]:
        return self._hosting.append(self._active, request)
