"""What delegation is bounded by, what a child run keeps of its parent, whom a delegate
asks, and the dispatcher's calls delegation makes."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.handler.v1 import handler_pb2 as hpb
from switchboard.dispatcher.handlers.handed import Handed
from switchboard.platform.security.policy import Principal
from switchboard.platform.values.resources import (
    AssistantName,
    HandlerName,
    RunName,
    WorkspaceName,
)


@dataclass(frozen=True)
class DelegationLimits:
    max_depth: int = 3
    max_children_per_run: int = 4
    max_children_per_tree: int = 32


@dataclass(frozen=True)
class Parent:
    """What a child run keeps of its parent (admission marks the run and job with it)."""

    run: RunName
    tool_call: str
    #: The child's depth: its parent's + 1.
    depth: int
    #: The run id of the tree's root.
    root: str
    #: The assistants from the root down to the parent's, in order.
    lineage: tuple[str, ...]
    #: When the parent must have finished (wall clock; None: no deadline known): the
    #: child's time is what is left of it at its admission. An absolute time, so the
    #: call sent again after a crash is the same request, whenever it is sent.
    deadline: dt.datetime | None = None


#: A handler of a workspace, as its capabilities say (None: the workspace has none of
#: that id): what a delegate naming a handler is offered as.
FindHandler = Callable[[str, str], Awaitable[hpb.HandlerCapabilities | None]]


@dataclass(frozen=True)
class Target:
    """Whom a delegate asks: an assistant of the workspace, or (``handler``) a handler
    asked directly (a domain expert, an A2A agent), whose child run has no assistant."""

    workspace: str
    id: str
    handler: bool = False

    def __str__(self) -> str:
        if self.handler:
            return str(HandlerName(self.id))
        return str(AssistantName(self.workspace, self.id))

    @property
    def parent(self) -> WorkspaceName:
        return WorkspaceName(self.workspace)

    @staticmethod
    def of(delegate: pb.AssistantDelegate, workspace: str) -> Target | None:
        """The target ``delegate`` names (None: a name that does not parse, as stored
        before a check that refuses it now)."""
        if delegate.handler:
            handler = HandlerName.parse_or_none(delegate.handler)
            return Target(workspace, handler.handler, handler=True) if handler else None
        named = AssistantName.parse_or_none(delegate.assistant)
        return Target(named.workspace, named.assistant) if named else None


class Calls(Protocol):
    """What delegation calls: the dispatcher's own calls (wired once it is built)."""

    async def send_message(
        self,
        principal: Principal,
        request: pb.SendMessageRequest,
        handed: Handed | None = None,
        *,
        parent: Parent,
    ) -> pb.SendMessageResponse: ...

    def watch(self, name: str, after_sequence: int) -> AsyncIterator[pb.RunUpdate | None]: ...

    async def get_run(self, name: str) -> pb.Run: ...

    async def cancel_run(self, principal: Principal, name: str, reason: str) -> pb.Run: ...
