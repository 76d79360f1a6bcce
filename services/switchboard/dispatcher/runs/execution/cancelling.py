"""Ending runs from outside their task: a cancel, a takeover, the dispatcher's stop.

Cancellation is the task's: ``cancel`` cancels the run's task, which raises
``CancelledError`` inside the handler (a remote handler's gRPC call or the
LLM's HTTP response is closed by that), and the run ends CANCELLED; a run
still queued is withdrawn and ends at once. A speaking run stops speaking
before anything is awaited (``voice/speaking.py``). Runs another instance took
over are let go of (``retire``); ``stop`` cancels every run this process holds,
and each ends by the recovery policy.

Why a module of its own: a wait can drop a cancel (see ``Cancelling._cancel``),
so a cancel is a loop that outlives the call that asked for it; that loop and
its book, and the three ways in which a run is ended from outside, are one
concern the execution stage's way through the handler need not carry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Final

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.runs.core.active.lifecycle import Active
from switchboard.dispatcher.runs.core.active.live import FINISH_TIMEOUT_S, Live
from switchboard.dispatcher.runs.core.publishing import Publishing
from switchboard.dispatcher.runs.core.scheduler import Scheduler
from switchboard.dispatcher.runs.core.store import TERMINAL
from switchboard.dispatcher.runs.execution.finishing import Finishing
from switchboard.dispatcher.voice.speaking import Speaking
from switchboard.platform import background
from switchboard.platform.errors import RunInterrupted, SwitchboardError

log = logging.getLogger("switchboard.dispatcher")

#: How long a cancelled run may go on in its handler before it is cancelled again
#: (a wait inside it dropped the cancel: see ``Cancelling._cancel``).
_RECANCEL_S: Final = 1.0


class Cancelling:
    """The cancels of this process's runs."""

    def __init__(
        self,
        *,
        live: Live,
        scheduler: Scheduler,
        publishing: Publishing,
        finishing: Finishing,
        speaking: Speaking,
    ) -> None:
        self._live = live
        self._scheduler = scheduler
        self._publishing = publishing
        self._finishing = finishing
        self._speaking = speaking
        # Each cancelled run's task, and the loop that cancels it again until it ends
        # (``_cancel``).
        self._cancelling: dict[asyncio.Task[None], asyncio.Task[None]] = {}

    async def cancel(
        self, active: Active, error: SwitchboardError, *, heard_through: int = 0
    ) -> None:
        """End ``active`` with ``error``: withdrawn if still queued, else its task
        is cancelled; returns once the run is recorded (not longer).
        ``heard_through``: the last speech update its listener heard (0: all sent)."""
        if active.run.state in TERMINAL:
            return
        if active.cancel_error is None:
            # Before anything is awaited: not one more chunk of speech goes out.
            self._speaking.halt(active, heard_through)
        if active.ticket is not None and self._scheduler.withdraw(active.ticket):
            active.to(pb.RUN_STATE_CANCELLED)
            active.ticket = None
            await self._finishing.finish(active, error)
            return
        task = active.task
        if task is None or task.done():
            return
        if active.cancel_error is None:
            active.cancel_error = error
        self._cancel(active, task)
        # Wait for the handler to stop and the run to be recorded, not longer:
        # CancelRun answers with the terminal run.
        await asyncio.wait([task], timeout=FINISH_TIMEOUT_S)

    def retire(self, actives: Sequence[Active]) -> list[asyncio.Task[None]]:
        """Let go of runs another instance took over while this one held them (its
        lease lapsed): none starts a write again (journal, charge, state), a queued
        one leaves the queue and a running or paused one's task is cancelled, so
        its slot and its conversation are free for this process's own runs.
        Returns the tasks still ending (a write of theirs may be in flight)."""
        tasks = []
        for active in actives:
            active.retired = True
            if active.ticket is not None and self._scheduler.withdraw(active.ticket):
                active.ticket = None
                self._publishing.release(active)
                self._finishing.let_go(active)
                continue
            task = active.task
            if task is None:
                continue
            if task.done():
                # Its task ended without letting go of it (cut short as it ended):
                # nothing else will, and it would keep its run from coming back here.
                self._finishing.let_go(active)
                continue
            if active.run.state not in TERMINAL:
                if active.cancel_error is None:
                    active.cancel_error = RunInterrupted(
                        "another dispatcher instance took the run over"
                    )
                self._cancel(active, task)
            # else it is ending already: its end finds it retired (or its write
            # refused) and lets go. A cancel would cut that end short, and the
            # attempt would stay here for good, its run never recovered here again.
            tasks.append(task)
        return tasks

    async def stop(self) -> None:
        """Stop every run this process holds; each ends by the recovery policy."""
        tasks: list[asyncio.Task[None]] = list(self._cancelling.values())
        for loop in tasks:
            loop.cancel()
        for active in list(self._live.runs.values()):
            if active.task is not None:
                active.task.cancel()
                tasks.append(active.task)
        if tasks:
            await asyncio.wait(tasks, timeout=FINISH_TIMEOUT_S)

    def _cancel(self, active: Active, task: asyncio.Task[None]) -> None:
        """Cancel the run's task now, and again each ``_RECANCEL_S`` while its run is
        still in its handler. A wait can drop a cancel: on Python 3.11
        ``asyncio.wait_for`` returns what it waited for when that finishes as the
        cancel arrives (a database driver's, say), and a run at a budget's cap or
        waiting for approvals then waits on, its CancelRun answered with the run
        still paused and its conversation's next runs queued behind it for good.
        Once the run's state is final the task is ending (storing its end), and a
        cancel would cut that short. One not started yet sees its ``cancel_error``
        as it starts."""
        if not active.started or active.run.state in TERMINAL:
            return
        task.cancel()
        if task not in self._cancelling:  # else already cancelled again as long as it takes
            self._cancelling[task] = background.spawn(
                self._cancel_again(active, task), name=f"{task.get_name()}-cancel", logger=log
            )

    async def _cancel_again(self, active: Active, task: asyncio.Task[None]) -> None:
        try:
            while not task.done():
                await asyncio.wait([task], timeout=_RECANCEL_S)
                if not task.done() and active.run.state not in TERMINAL:
                    task.cancel()
        finally:
            self._cancelling.pop(task, None)
