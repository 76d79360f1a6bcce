"""The forming feeder's consumer: finished runs become forming jobs, written in the
transaction that moves the cursor past them (``platform/events/feeder.py``), so no
exchange is lost and none is taken twice, whichever replica feeds.

A run's exchange is formed when the run SUCCEEDED, a user started it, and the policy
that applies to it forms memory: the run's assistant's ``memory_policy`` unless its
mode is UNSPECIFIED, else its workspace's (``Workspace.memory_policy``, read through
the context port, kept ``ttl_s`` and dropped on the workspace's WORKSPACE_CHANGED).
A delegated child run has its own assistant, so it forms only under that
assistant's policy, never its parent's. The policy, as it was then, travels in the
job: a later change of it does not change what an exchange already taken forms.

A policy that forms after each run makes one job per run (``run:{run}``), due at
once; one with ``idle_minutes`` makes one per conversation and user, pushed back by
each later run of theirs, which joins it.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as dpb
from switchboard.api.events.v1 import events_pb2
from switchboard.api.handler.v1 import handler_pb2
from switchboard.dispatcher.memory.plans.plan import Exchange, Turn, form_job_id
from switchboard.dispatcher.memory.store import JobStore, NewTurn
from switchboard.dispatcher.ports.context import ContextPort
from switchboard.platform.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from switchboard.platform.events.eventlog import Logged
from switchboard.platform.events.feedstore import Work
from switchboard.platform.security.policy import Principal
from switchboard.platform.values import memorypolicy
from switchboard.platform.values.names import now
from switchboard.platform.values.resources import RunName, UserName, WorkspaceName

log = logging.getLogger("switchboard.dispatcher.memory")

_RUN: Final = events_pb2.EVENT_TYPE_RUN_UPDATED
_WORKSPACE: Final = events_pb2.EVENT_TYPE_WORKSPACE_CHANGED
#: Workspaces whose policy is kept at most.
MAX_CACHED: Final = 10_000

#: An assistant by name, or None when there is none (deleted since).
FindAssistant = Callable[[str], Awaitable[dpb.Assistant | None]]


def finished(event: events_pb2.Event) -> dpb.Run | None:
    """The run a RUN_UPDATED says SUCCEEDED, if it does and a user started it."""
    if event.type != _RUN or event.run_updated.update.WhichOneof("update") != "state_change":
        return None
    run = event.run_updated.update.state_change.run
    if run.state != dpb.RUN_STATE_SUCCEEDED or UserName.parse_or_none(run.creator) is None:
        return None
    return run


@dataclass(frozen=True)
class Resolved:
    """The policy that applies to a run, and whose it is."""

    policy: cpb.MemoryPolicy
    source: str
    effective: memorypolicy.Effective
    #: The assistant's model settings (the forming model's default).
    model: handler_pb2.ModelSettings


class Policies:
    """Which policy applies to a run: its assistant's, else its workspace's."""

    def __init__(
        self,
        context: ContextPort,
        assistant: FindAssistant,
        *,
        timeout_s: float,
        ttl_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._context = context
        self._assistant = assistant
        self._timeout_s = timeout_s
        self._ttl_s = ttl_s
        self._clock = clock
        self._workspaces: dict[str, tuple[float, cpb.MemoryPolicy]] = {}

    def drop(self, workspace_id: str) -> None:
        self._workspaces.pop(workspace_id, None)

    async def _workspace(self, workspace_id: str, user_id: str) -> cpb.MemoryPolicy:
        kept = self._workspaces.get(workspace_id)
        if kept is not None and kept[0] > self._clock():
            return kept[1]
        workspace = await self._context.workspace(
            Principal.acting_for(user_id),
            str(WorkspaceName(workspace_id)),
            timeout_s=self._timeout_s,
        )
        if len(self._workspaces) >= MAX_CACHED:
            self._workspaces.clear()
        self._workspaces[workspace_id] = (self._clock() + self._ttl_s, workspace.memory_policy)
        return workspace.memory_policy

    async def of(self, run: dpb.Run, workspace_id: str, user_id: str) -> Resolved:
        assistant = await self._assistant(run.assistant) if run.assistant else None
        own = assistant.memory_policy if assistant is not None else None
        workspace = None
        if own is None or own.mode == cpb.MEMORY_FORMING_MODE_UNSPECIFIED:
            workspace = await self._workspace(workspace_id, user_id)
        policy, source = memorypolicy.applies(own, workspace)
        model = assistant.model if assistant is not None else handler_pb2.ModelSettings()
        return Resolved(policy, source, memorypolicy.effective(policy), model)


class MemoryFeed:
    """The feeder's consumer (``LogConsumer``)."""

    def __init__(
        self,
        store: JobStore,
        policies: Policies,
        *,
        wake: Callable[[], None],
        clock: Callable[[], dt.datetime] = now,
    ) -> None:
        self._store = store
        self._policies = policies
        self._wake = wake
        self._clock = clock

    def wakes(self, event: events_pb2.Event) -> bool:
        return finished(event) is not None

    async def taken(self) -> None:
        return None

    async def renewed(self) -> None:
        return None

    def gap(self) -> Work | None:
        # The exchanges lost with the log are not formed (nothing else says which).
        return None

    def written(self, count: int) -> None:
        self._wake()

    async def taking(self, items: Sequence[Logged]) -> Work | None:
        turns: list[NewTurn] = []
        for item in items:
            event = item.event
            if event.type == _WORKSPACE:
                workspace = WorkspaceName.parse_or_none(event.workspace)
                if workspace is not None:
                    self._policies.drop(workspace.workspace)
                continue
            run = finished(event)
            if run is not None:
                new = await self._turn(run, event)
                if new is not None:
                    turns.append(new)
        return self._store.feeding(turns) if turns else None

    async def _turn(self, run: dpb.Run, event: events_pb2.Event) -> NewTurn | None:
        name = RunName.parse_or_none(run.name)
        user = UserName.parse_or_none(run.creator)
        if name is None or user is None:
            return None
        try:
            # Any other failure fails the round, which is read again: the cursor does
            # not move past an exchange whose policy was not read.
            resolved = await self._policies.of(run, name.workspace, user.user)
        except (NotFound, PermissionDenied, FailedPrecondition, InvalidArgument):
            # The workspace or assistant is gone (or never was), or the person is no
            # longer in it: nothing is formed, and the feed goes on.
            return None
        if not resolved.effective.on:
            return None
        when = run.end_time.ToDatetime(dt.UTC) if run.HasField("end_time") else self._clock()
        turn = Turn(run.name, run.input_message, run.output_message, when)
        idle = resolved.effective.idle_minutes
        exchange = Exchange(
            turns=(turn,),
            assistant=run.assistant,
            user_id=user.user,
            source=resolved.source,
            policy=resolved.policy.SerializeToString(deterministic=True),
            model=resolved.model.SerializeToString(deterministic=True),
        )
        conversation = str(name.parent)
        return NewTurn(
            job_id=form_job_id(run.name, conversation, user.user, idle),
            workspace_id=name.workspace,
            conversation=conversation,
            exchange=exchange,
            turn=turn,
            not_before=self._clock() + dt.timedelta(minutes=idle),
            merge=idle > 0,
        )


__all__ = ["FindAssistant", "MemoryFeed", "Policies", "Resolved", "finished"]
