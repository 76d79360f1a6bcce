"""A run's tool calls that wait for a person: approvals, and calls a crash left unknown.

A step with calls that need approval pauses the run (REQUIRES_ACTION, stored with
its steps so a restart resumes it) until every one is decided, the approval
timeout passes (APPROVAL_EXPIRED) or the run is cancelled; its deadline stops
meanwhile (execution's ``_RunClock``). A call that was in flight at a crash and
may not be sent again waits the same way, ``outcome_unknown``, for a person to
RETRY, COMPLETE or FAIL_RUN (``runner.py`` decides which calls those are).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Sequence
from typing import Protocol

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.handler.v1 import handler_pb2 as hpb
from switchboard.platform.errors import ApprovalExpired
from switchboard.platform.values import names
from switchboard.platform.values.wording import counted


class PauseHost(Protocol):
    """What approvals need of the dispatcher for one run."""

    async def pause(self) -> None:
        """REQUIRES_ACTION, stored (with the job) and announced."""
        ...

    async def resume(self) -> None:
        """RUNNING again, stored and announced."""
        ...


def sends(decision: pb.PendingToolCall | None) -> bool:
    """Whether a call so decided (None: no decision needed) is sent to its tool."""
    return decision is None or decision.decision in (
        pb.TOOL_APPROVAL_DECISION_APPROVE,
        pb.TOOL_APPROVAL_DECISION_RETRY,
    )


class Approvals:
    """The decisions one run's tool calls wait for (its ``required_action``)."""

    def __init__(self, host: PauseHost, run: pb.Run, *, timeout_s: float) -> None:
        self._host = host
        self._run = run
        self._timeout_s = timeout_s
        #: Set (and replaced) when a decision is stored: waiting steps look again.
        self._decided = asyncio.Event()

    async def wait(
        self, needs: list[hpb.ToolCall], *, unknown: Sequence[hpb.ToolCall] = ()
    ) -> dict[str, pb.PendingToolCall]:
        """Wait until every call of ``needs`` and ``unknown`` (calls whose outcome a
        crash left unknown) is decided; their decisions by call id.

        Several steps may wait at once (an interactive expert's concurrent
        calls): the run pauses when the first starts waiting and resumes when
        nothing is left undecided.
        """
        action = self._run.required_action
        if unknown:
            # An approval given before they were sent, or a RETRY that may have been
            # sent again, no longer answers the question: did they take effect? A
            # person's COMPLETE or FAIL_RUN still does (a crash came before it acted).
            ids = {call.id for call in unknown}
            kept = [
                p
                for p in action.tool_calls
                if p.call.id not in ids or (p.outcome_unknown and not sends(p))
            ]
            del action.tool_calls[:]
            action.tool_calls.extend(kept)
            needs = [c for c in needs if c.id not in ids] + list(unknown)
        if not needs:
            return {}
        known = {pending.call.id for pending in action.tool_calls}
        fresh = [call for call in needs if call.id not in known]
        unknown_ids = {call.id for call in unknown}
        if fresh:
            if not self._undecided():
                # A new pause; one resumed after a restart keeps its calls and decisions.
                action.Clear()
                # The run's deadline stops while it waits (execution's _RunClock):
                # only the approval timeout bounds the pause.
                wait_s = self._timeout_s
                action.expire_time.FromDatetime(names.now() + dt.timedelta(seconds=wait_s))
            for call in fresh:
                pending = action.tool_calls.add(outcome_unknown=call.id in unknown_ids)
                pending.call.CopyFrom(call)
        ids = {call.id for call in needs}
        if self._undecided(ids):
            if self._run.state == pb.RUN_STATE_RUNNING:
                await self._host.pause()
            try:
                # Its own timeout: the run's deadline (the asyncio.timeout
                # around the whole run) is stopped while the run is paused.
                async with asyncio.timeout(self._timeout_s):
                    while self._undecided(ids):
                        await self._decided.wait()
            except TimeoutError:
                raise ApprovalExpired(
                    f"{counted(self._undecided(ids), 'tool call')} waited for approval longer than "
                    f"{self._timeout_s:g} s"
                ) from None
            if not self._undecided() and self._run.state == pb.RUN_STATE_REQUIRES_ACTION:
                await self._host.resume()
        return {p.call.id: p for p in action.tool_calls if p.call.id in ids}

    def decided(self) -> None:
        """A decision was stored: every waiting step looks again."""
        event, self._decided = self._decided, asyncio.Event()
        event.set()

    def _undecided(self, ids: set[str] | None = None) -> int:
        return sum(
            1
            for pending in self._run.required_action.tool_calls
            if pending.decision == pb.TOOL_APPROVAL_DECISION_UNSPECIFIED
            and (ids is None or pending.call.id in ids)
        )
