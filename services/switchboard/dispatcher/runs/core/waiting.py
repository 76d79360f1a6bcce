"""What a queued run waits behind (``Run.queued_behind``), said while it waits.

A conversation answers its messages one at a time, in order (``scheduler.py``), so a
message sent while an earlier run of its conversation goes (running, or waiting for
a person's approval for up to the approval timeout) is QUEUED behind it. Without a
word that looks like a stuck run. The scheduler tells ``QueueNotes`` whenever a
conversation's line changes (a run joined, left, started, paused or resumed); each
queued run of that line then gets the run it waits for, that run's state, why in
words, how many go before it and, while that run waits for a person, until when.

A changed note is shown at once to GetRun on this process (the live run), then
stored, so GetRun on any replica reads it, and announced as a
``RunUpdate.queued_behind`` (not a state change: the state did not change), so
WatchRun and Subscribe hear it. The store keeps a note only while the run is stored
QUEUED (``RunStore.save_queued``): one written late never takes a run that started
back. A run loses its note when it leaves QUEUED (``Active.to``).

This module does not import grpc.
"""

from __future__ import annotations

import asyncio
import logging

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.runs.core.active.lifecycle import Active
from switchboard.dispatcher.runs.core.active.live import Common
from switchboard.dispatcher.runs.core.publishing import Publishing
from switchboard.dispatcher.runs.core.scheduler import Scheduler, Ticket
from switchboard.platform import background
from switchboard.platform.errors import SwitchboardError
from switchboard.platform.values.wording import counted

log = logging.getLogger("switchboard.dispatcher")

_QUEUED = pb.RUN_STATE_QUEUED
_WAITING = pb.RUN_STATE_REQUIRES_ACTION


def note(ahead_of: Active, ahead: int, *, holds: bool) -> pb.QueuedBehind:
    """What a queued run says of ``ahead_of``, the run it waits for: the one holding
    its conversation (``holds``), else the first queued before it."""
    run = ahead_of.run
    behind = pb.QueuedBehind(run=run.name, state=run.state, ahead=ahead)
    if run.state == _WAITING:
        action = run.required_action
        if action.HasField("budget"):
            behind.reason = "waiting for an owner's decision on a budget without room"
        else:
            undecided = sum(
                1
                for call in action.tool_calls
                if call.decision == pb.TOOL_APPROVAL_DECISION_UNSPECIFIED
            )
            behind.reason = f"waiting for a person's approval of {counted(undecided, 'tool call')}"
        if action.HasField("expire_time"):
            behind.expire_time.CopyFrom(action.expire_time)
    elif holds:
        behind.reason = "answering an earlier message of the conversation"
    else:
        behind.reason = "queued before it, waiting for room to run"
    return behind


class QueueNotes:
    """The scheduler's ``on_change``: keeps each queued run's ``queued_behind`` current."""

    def __init__(self, *, common: Common, scheduler: Scheduler, publishing: Publishing) -> None:
        self._live = common.live
        self._store = common.store
        self._instance_id = common.limits.instance_id
        self._scheduler = scheduler
        self._publishing = publishing
        #: Runs with a note being stored: True when it changed again meanwhile.
        self._dirty: dict[str, bool] = {}
        self._writes: set[asyncio.Task[None]] = set()
        scheduler.on_change = self.changed

    def changed(self, workspace: str, conversation: str) -> None:
        holder, queued = self._scheduler.line(workspace, conversation)
        first = self._active(holder)
        holds = first is not None
        for index, ticket in enumerate(queued):
            active = self._active(ticket)
            if active is None or active.run.state != _QUEUED:
                continue
            if first is None:
                # Nothing holds the conversation: the first in line waits for room
                # (the dispatcher's capacity), not for a run of its conversation.
                first = active
                self._set(active, None)
                continue
            self._set(active, note(first, index + 1 if holds else index, holds=holds))

    def _active(self, ticket: Ticket | None) -> Active | None:
        if ticket is None:
            return None
        active = self._live.runs.get(ticket.run_id)
        return active if active is not None and active.ticket is ticket else None

    def _set(self, active: Active, behind: pb.QueuedBehind | None) -> None:
        run = active.run
        if behind is None:
            if not run.HasField("queued_behind"):
                return
            run.ClearField("queued_behind")
        else:
            if run.HasField("queued_behind") and run.queued_behind == behind:
                return
            run.queued_behind.CopyFrom(behind)
        name = run.name
        if name in self._dirty:
            self._dirty[name] = True  # the write under way stores it again
            return
        self._dirty[name] = True
        background.spawn(
            self._write(active),
            name=f"queued-behind-{active.run_id}",
            logger=log,
            keep=self._writes,
        )

    async def _write(self, active: Active) -> None:
        name = active.run.name
        try:
            while self._dirty.get(name):
                self._dirty[name] = False
                await self._store_note(active)
        finally:
            self._dirty.pop(name, None)

    async def _store_note(self, active: Active) -> None:
        """Store the run's note and announce it, while it is still queued here."""
        async with active.persisting:
            run = active.run
            if run.state != _QUEUED or active.retired or active.started:
                return
            # The stored run says where its stream stands: at the note's update.
            run.last_sequence = active.feed.last + 1
            try:
                saved = await self._store.save_queued(active.run_id, run, owner=self._instance_id)
            except SwitchboardError as exc:
                # A note is not the run's state: the live run shows it (GetRun here)
                # and the next change stores it again; nothing waits on it.
                log.warning(
                    "what a queued run waits behind was not stored",
                    extra={"run": run.name, "error": str(exc)},
                )
                saved = True
            if saved and run.state == _QUEUED:
                update = pb.RunUpdate()
                update.queued_behind.CopyFrom(run.queued_behind)
                self._publishing.emit(active, update)
