"""The process's delegation: the tools a run's assistant offers for its delegates and
handoffs, the built-in tools that run them, and a recovered run's orphans ended."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from google.protobuf import struct_pb2

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.handler.v1 import handler_pb2 as hpb
from switchboard.dispatcher.assistants.catalog import Assistants
from switchboard.dispatcher.ports.context import ContextPort
from switchboard.dispatcher.runs.core.active.lifecycle import Active
from switchboard.dispatcher.runs.core.scheduler import Scheduler
from switchboard.dispatcher.runs.core.store import TERMINAL, RunStore
from switchboard.dispatcher.runs.delegation.delegate import Delegate, child_update
from switchboard.dispatcher.runs.delegation.handoffs import Handoffs
from switchboard.dispatcher.runs.delegation.limits import (
    Calls,
    DelegationLimits,
    FindHandler,
    Target,
)
from switchboard.dispatcher.runs.delegation.offer import definition, tool_name
from switchboard.dispatcher.runs.delegation.trees import MAX_TREES, Trees
from switchboard.dispatcher.runs.delegation.waiting import Waiting
from switchboard.dispatcher.tools.runner import BuiltinTool
from switchboard.platform.errors import SwitchboardError
from switchboard.platform.observe.telemetry import tracer
from switchboard.platform.schemas import Compiled, compile_schema
from switchboard.platform.values import structs
from switchboard.platform.values.resources import AssistantName, HandlerName
from switchboard.shared.parttext import compact_json

log = logging.getLogger("switchboard.dispatcher.delegation")

#: A workspace's children started at once (as admission admits a few of a workspace's
#: messages at a time).
_STARTS_PER_WORKSPACE: Final = 4
#: Delegates' input schemas kept compiled (the least recently used forgotten).
_MAX_CHECKERS: Final = 256


@dataclass(frozen=True)
class Offer:
    """What delegation adds to a run's read (``Delegation.offer``)."""

    definitions: Sequence[hpb.ToolDefinition] = ()
    #: When the history the run's model sees begins (a handoff's); None: all of it.
    since: dt.datetime | None = None


#: Nothing to add (no assistant, or no delegation).
NO_OFFER: Final = Offer()


class Delegation:
    """The process's delegation: the tools a run's assistant offers for its delegates,
    and the built-in tools that run them (see the module doc)."""

    def __init__(
        self,
        *,
        limits: DelegationLimits,
        store: RunStore,
        scheduler: Scheduler,
        assistants: Assistants,
        context: ContextPort,
        closing: Callable[[], bool] = lambda: False,
        find_handler: FindHandler | None = None,
    ) -> None:
        self.limits = limits
        #: Whether this process is stopping (its runs are left to be resumed).
        self.closing = closing
        self.store = store
        self._scheduler = scheduler
        self._assistants = assistants
        self.context = context
        #: A workspace's handler by id (None: delegates naming handlers are not offered).
        self._find_handler = find_handler
        #: Handoffs, offered and made beside the delegates (``handoffs.py``).
        self._handoffs = Handoffs(assistants)
        #: Per workspace, the children being started now (``starting``).
        self._starting: OrderedDict[str, asyncio.Semaphore] = OrderedDict()
        #: Delegates' input schemas' validators, by the schema's JSON.
        self._checkers: OrderedDict[str, Compiled] = OrderedDict()
        #: Each tree's children, claimed before each starts (``trees.py``).
        self.trees = Trees(store, limits.max_children_per_tree)
        #: The dispatcher's calls; set by the build once the dispatcher exists.
        self.calls: Calls | None = None
        #: None when tracing is off (decided once, at build time, as the runs' spans are).
        self.tracer = tracer("switchboard.dispatcher")

    async def offer(self, active: Active) -> Offer:
        """What delegation adds to ``active``'s read before its handler: the tools of its
        assistant's delegates and handoffs, and where the history its model sees begins
        (``history_since``)."""
        assistant = active.assistant
        if assistant is None:
            return NO_OFFER
        return Offer(await self.definitions(assistant), await self.history_since(active))

    async def definitions(self, assistant: pb.Assistant) -> list[hpb.ToolDefinition]:
        """The delegate and handoff tools of ``assistant`` (an assistant deleted since is
        left out)."""
        return [*await self._delegates(assistant), *await self._handoffs.definitions(assistant)]

    async def _delegates(self, assistant: pb.Assistant) -> list[hpb.ToolDefinition]:
        if not assistant.delegates:
            return []
        workspace = AssistantName.parse(assistant.name, "assistant").workspace
        found: list[hpb.ToolDefinition] = []
        for delegate in assistant.delegates:
            target: pb.Assistant | hpb.HandlerCapabilities | None = None
            try:
                if not delegate.handler:
                    target = await self._assistants.resolve(workspace, delegate.assistant)
                elif self._find_handler is not None:
                    named = HandlerName.parse_or_none(delegate.handler)
                    if named is not None:
                        target = await self._find_handler(workspace, named.handler)
            except SwitchboardError:
                continue
            if target is not None:
                found.append(definition(delegate, target))
        return found

    async def history_since(self, active: Active) -> dt.datetime | None:
        """When the history ``active``'s model sees begins: the handoff, when the run
        answers for the conversation's holder and the handoff said the holder sees only
        what came from it on (``HANDOFF_HISTORY_SINCE_HANDOFF``); None: all of it."""
        assistant = active.assistant
        if assistant is None:
            return None
        holder = await self._assistants.holder(active.workspace_id, active.conversation_id)
        if (
            holder is None
            or not holder.since_handoff
            or holder.assistant_id != AssistantName.parse(assistant.name, "assistant").assistant
        ):
            return None
        return holder.since

    def builtins(
        self,
        active: Active,
        emit: Callable[[pb.RunUpdate], None],
        definitions: Sequence[hpb.ToolDefinition],
    ) -> dict[str, BuiltinTool]:
        """The built-in tools of one run (an attempt): one per delegate and handoff offered."""
        found: dict[str, BuiltinTool] = {}
        found.update(self._handoffs.builtins(active, emit, definitions))
        found.update(self._asking(active, emit, definitions))
        return found

    def _asking(
        self,
        active: Active,
        emit: Callable[[pb.RunUpdate], None],
        definitions: Sequence[hpb.ToolDefinition],
    ) -> dict[str, Delegate]:
        assistant = active.assistant
        if assistant is None or not assistant.delegates:
            return {}
        offered = {d.tool for d in definitions}
        waiting = Waiting(self._scheduler, active)
        slots = asyncio.Semaphore(self.limits.max_children_per_run)
        found: dict[str, Delegate] = {}
        for delegate in assistant.delegates:
            target = Target.of(delegate, active.workspace_id)
            if target is None:
                continue
            name = tool_name(target.id)
            if name in offered:
                schema = delegate.input_schema if delegate.HasField("input_schema") else None
                found[name] = Delegate(self, active, target, emit, waiting, slots, name, schema)
        return found

    async def end_orphans(self, active: Active, emit: Callable[[pb.RunUpdate], None]) -> None:
        """A recovered run ends: children an earlier attempt of it started that are still
        active (a call of that attempt its model did not make again) are cancelled and
        their end shown on its stream, so that no child outlives its parent."""
        if self.closing():
            return  # both are resumed after the restart
        calls = self.wired()
        for child in await self.store.children(active.run_id):
            if child.state in TERMINAL:
                continue
            try:
                ended = await calls.cancel_run(
                    active.principal, child.name, "the run that asked it ended"
                )
            except SwitchboardError:
                log.warning("a child of an ended run was not cancelled", extra={"run": child.name})
                continue
            emit(
                child_update(
                    ended,
                    parent=active.run.name,
                    call_id=ended.parent_tool_call,
                    assistant=ended.assistant,
                    handler="" if ended.assistant else ended.handler,
                )
            )

    async def checker(self, schema: struct_pb2.Struct) -> Compiled:
        """``schema``'s validator, compiled once (off the loop) and kept for the next
        calls of any run whose delegate gives the same schema."""
        key = compact_json(schema)
        found = self._checkers.get(key)
        if found is None:
            found = await asyncio.to_thread(compile_schema, structs.plain_struct(schema))
            self._checkers[key] = found
            while len(self._checkers) > _MAX_CHECKERS:
                self._checkers.popitem(last=False)
        self._checkers.move_to_end(key)
        return found

    def starting(self, workspace_id: str) -> asyncio.Semaphore:
        """The bound on a workspace's children being started at once (their conversation
        and their admission, each a write): a hundred parents asking ten each must not
        queue a thousand writes ahead of other workspaces' messages (bench/delegation.py)."""
        found = self._starting.get(workspace_id)
        if found is None:
            found = self._starting[workspace_id] = asyncio.Semaphore(_STARTS_PER_WORKSPACE)
            while len(self._starting) > MAX_TREES:
                self._starting.popitem(last=False)
        self._starting.move_to_end(workspace_id)
        return found

    def wired(self) -> Calls:
        if self.calls is None:  # pragma: no cover - the build wires it before serving
            raise RuntimeError("delegation is not wired to the dispatcher")
        return self.calls
