"""Delegation: an assistant that asks another assistant of its workspace, as a tool.

An assistant's ``delegates`` are offered to its model as tools named
``ask_{assistant id}`` (input: the question). A call is a **child run**: the
delegate answers in a conversation of its own, started through admission like any
message (the same checks, quotas and budgets, as the parent's user), linked to its
parent (``Run.parent``, ``parent_tool_call``, ``depth``), and its final answer is the
call's result. The child is a run: it can be watched, cancelled, resumed after a
crash and charged on its own; the parent's updates name it (``child_run``) when it
starts and when it ends.

* **Bounded before it starts.** A call is refused (an error result for the parent's
  model; no conversation, no run, no model call) when the tree would grow deeper than
  ``max_depth``, when the delegate is already on the line from the tree's root to the
  parent (a cycle: A asks B asks A), or when the tree already started
  ``max_children_per_tree`` children. At most ``max_children_per_run`` children of one
  run go at once; more calls in the same step wait their turn.
* **The parent waits without a slot.** While a parent waits for its children it gives
  its scheduler slot back (as a run waiting for a person does), so parents waiting on
  children cannot fill the workspace's slots and starve the children they wait for.
* **Cancel cascades; the deadline never outlives the parent's.** A parent that ends
  while a child runs (cancelled, past its deadline) cancels the child; a process that
  stops leaves both to be resumed. A child's timeout is what is left of its parent's.
* **Durable by the journal.** A delegate call is journaled like any tool call: a child
  that answered is not asked again after a crash. One in flight is asked again with
  the same request ids, which admission and the context service answer with the
  conversation and run the first attempt made: the parent follows the same child.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from google.protobuf import duration_pb2, struct_pb2
from opentelemetry import trace

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.handler.v1 import handler_pb2 as hpb
from switchboard.dispatcher.assistants.catalog import Assistants
from switchboard.dispatcher.budgets.ledger import Amount
from switchboard.dispatcher.budgets.spending import RunBudget
from switchboard.dispatcher.handlers.handed import Handed
from switchboard.dispatcher.ports.context import ContextPort
from switchboard.dispatcher.runs.core.lifecycle import Active
from switchboard.dispatcher.runs.core.scheduler import Scheduler
from switchboard.dispatcher.runs.core.store import TERMINAL, RunStore
from switchboard.dispatcher.runs.handoffs import Handoffs
from switchboard.dispatcher.tools.runner import (
    BuiltinAnswer,
    BuiltinTool,
    fitted_name,
    string_tool,
)
from switchboard.platform.errors import SwitchboardError
from switchboard.platform.observe.telemetry import tracer
from switchboard.platform.schemas import Compiled, SchemaUnusable, compile_schema
from switchboard.platform.security.policy import Principal
from switchboard.platform.values import structs
from switchboard.platform.values.idempotency import derived_request_id
from switchboard.platform.values.resources import (
    AssistantName,
    HandlerName,
    RunName,
    WorkspaceName,
)
from switchboard.shared.parttext import compact_json

log = logging.getLogger("switchboard.dispatcher.delegation")

#: The tool's one argument, and how long a question may be.
INPUT: Final = "input"
MAX_INPUT_CHARS: Final = 32_000
#: A delegate's tool name: ``ask_`` and its id, within the 64 characters models take.
_PREFIX: Final = "ask_"
#: Bound on each call to the context service a delegate call makes.
_CONTEXT_TIMEOUT_S: Final = 10.0
#: Trees whose children this process counts (the least recently used forgotten).
_MAX_TREES: Final = 10_000
#: A workspace's children started at once (as admission admits a few of a workspace's
#: messages at a time).
_STARTS_PER_WORKSPACE: Final = 4
#: Delegates' input schemas kept compiled (the least recently used forgotten).
_MAX_CHECKERS: Final = 256
#: The least time a child is given (a parent about to time out refuses instead).
_MIN_CHILD_S: Final = 1.0


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


def tool_name(assistant_id: str) -> str:
    """The function name a delegate is offered under (``ask_{id}``, hashed to fit)."""
    return fitted_name(_PREFIX + assistant_id, assistant_id)


def definition(
    delegate: pb.AssistantDelegate, target: pb.Assistant | hpb.HandlerCapabilities
) -> hpb.ToolDefinition:
    """The tool the parent's model is offered for ``delegate`` (``target``: the
    assistant it names, as stored, or the handler, as its capabilities say)."""
    if isinstance(target, pb.Assistant):
        target_id = AssistantName.parse(target.name, "assistant").assistant
        kind = "the assistant"
    else:
        target_id, kind = target.id, "the handler"
    title = target.display_name or target_id
    description = (
        delegate.description or target.description or f"Ask {kind} {title} and get its answer."
    )
    if delegate.HasField("input_schema"):
        name = tool_name(target_id)
        return hpb.ToolDefinition(
            tool=name,
            function_name=name,
            description=description,
            input_schema=delegate.input_schema,
        )
    return string_tool(
        tool_name(target_id),
        description,
        INPUT,
        f"What to ask {title}: the whole question, with what it needs to answer (it does not "
        "see this conversation).",
    )


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
        self._store = store
        self._scheduler = scheduler
        self._assistants = assistants
        self._context = context
        #: A workspace's handler by id (None: delegates naming handlers are not offered).
        self._find_handler = find_handler
        #: Handoffs, offered and made beside the delegates (``handoffs.py``).
        self._handoffs = Handoffs(assistants)
        #: Per workspace, the children being started now (``starting``).
        self._starting: OrderedDict[str, asyncio.Semaphore] = OrderedDict()
        #: Delegates' input schemas' validators, by the schema's JSON.
        self._checkers: OrderedDict[str, Compiled] = OrderedDict()
        #: Places claimed per tree for children not yet stored (``claim``).
        self._claimed: dict[str, int] = {}
        #: Children started per tree (by its root's run id), as far as this process knows.
        self._trees: OrderedDict[str, int] = OrderedDict()
        #: The dispatcher's calls; set by the build once the dispatcher exists.
        self.calls: Calls | None = None
        #: None when tracing is off (decided once, at build time, as the runs' spans are).
        self.tracer = tracer("switchboard.dispatcher")

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
        waiting = _Waiting(self._scheduler, active)
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

    async def claim(self, root: str, *, new: bool = False) -> Claim | None:
        """A place for one more child in the tree rooted at ``root`` (None: it is full),
        taken now, so calls of one step that start at once cannot pass the limit
        together; the claim is settled when the child is stored or the call gives up.
        A tree's runs are admitted by the process that runs its parents, so the count
        is kept here, read from the database once per tree (and again whenever it says
        the tree is full: a takeover may have started children elsewhere). ``new``: the
        asking run is the root, started here and not recovered, so the tree has no
        child yet (no read)."""
        limit = self.limits.max_children_per_tree
        known = self._trees.get(root)
        if known is None and new:
            known = self._keep(root, 0)
        if known is None or known + self._claimed.get(root, 0) >= limit:
            # The root itself is one of the tree's runs.
            known = self._keep(root, await self._store.tree_size(root) - 1)
        self._trees.move_to_end(root)
        claimed = self._claimed.get(root, 0)
        if known + claimed >= limit:
            return None
        self._claimed[root] = claimed + 1
        return Claim(self, root)

    def _keep(self, root: str, count: int) -> int:
        self._trees[root] = count
        while len(self._trees) > _MAX_TREES:
            self._trees.popitem(last=False)
        return count

    def settle(self, root: str, *, started: bool) -> None:
        """A claim on ``root``'s tree ends: its child was stored (``started``), or not."""
        left = self._claimed.get(root, 0) - 1
        if left > 0:
            self._claimed[root] = left
        else:
            self._claimed.pop(root, None)
        if started and root in self._trees:
            self._trees[root] += 1

    async def end_orphans(self, active: Active, emit: Callable[[pb.RunUpdate], None]) -> None:
        """A recovered run ends: children an earlier attempt of it started that are still
        active (a call of that attempt its model did not make again) are cancelled and
        their end shown on its stream, so that no child outlives its parent."""
        if self.closing():
            return  # both are resumed after the restart
        calls = self._calls()
        for child in await self._store.children(active.run_id):
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
            while len(self._starting) > _MAX_TREES:
                self._starting.popitem(last=False)
        self._starting.move_to_end(workspace_id)
        return found

    def _calls(self) -> Calls:
        if self.calls is None:  # pragma: no cover - the build wires it before serving
            raise RuntimeError("delegation is not wired to the dispatcher")
        return self.calls


@dataclass
class Claim:
    """One child's place in its tree (``Delegation.claim``), settled once."""

    delegation: Delegation
    root: str
    done: bool = False

    def settle(self, *, started: bool) -> None:
        if not self.done:
            self.done = True
            self.delegation.settle(self.root, started=started)


@dataclass
class _Waiting:
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


class Delegate:
    """One delegate of one run, as a built-in tool (``tools.runner.BuiltinTool``)."""

    def __init__(
        self,
        delegation: Delegation,
        active: Active,
        target: Target,
        emit: Callable[[pb.RunUpdate], None],
        waiting: _Waiting,
        slots: asyncio.Semaphore,
        name: str,
        schema: struct_pb2.Struct | None = None,
    ) -> None:
        self._delegation = delegation
        #: The delegate's input schema (None: the one ``input`` string).
        self._schema = schema
        self._active = active
        self._target = target
        self._emit = emit
        self._waiting = waiting
        self._slots = slots
        self._name = name

    @property
    def definition(self) -> hpb.ToolDefinition:
        return hpb.ToolDefinition(tool=self._name, function_name=self._name)

    async def run(
        self,
        principal: Principal,
        arguments: struct_pb2.Struct,
        *,
        timeout_s: float,
        call_id: str = "",
    ) -> tuple[bool, str] | BuiltinAnswer:
        spans = self._delegation.tracer
        if spans is None:
            return await self._call(principal, arguments, timeout_s, call_id)
        # The call's own span, current while the child is admitted: admission stores it
        # as the child's traceparent, so the child's run (and its own children) nest
        # under the parent's tool call in the parent's trace (docs/observability.md).
        with spans.start_as_current_span(
            f"tool {self._name}",
            attributes={"switchboard.tool": self._name, "switchboard.tool_call": call_id},
        ):
            return await self._call(principal, arguments, timeout_s, call_id)

    async def _call(
        self, principal: Principal, arguments: struct_pb2.Struct, timeout_s: float, call_id: str
    ) -> tuple[bool, str] | BuiltinAnswer:
        text = await self._question(arguments)
        if isinstance(text, str):
            return False, text
        parent = self._parent(call_id)
        refused = await self._refused(parent, call_id)
        if isinstance(refused, str):
            return False, refused
        try:
            if timeout_s < _MIN_CHILD_S:
                return False, "The run has no time left to ask another assistant."
            async with self._slots:
                budget = self._active.budget
                if budget is None or budget.handed is None:
                    answer, _ = await self._ask(principal, parent, text, timeout_s, refused)
                    return answer
                async with self._waiting.handing:
                    return await self._handing(budget, principal, parent, text, timeout_s, refused)
        finally:
            if refused is not None:
                refused.settle(started=False)  # a no-op once the child was stored

    async def _question(self, arguments: struct_pb2.Struct) -> list[cpb.ContentPart] | str:
        """The child's message, from the call's arguments; or why they are refused."""
        if self._schema is None:
            question = arguments.fields.get(INPUT)
            if question is None or question.WhichOneof("kind") != "string_value":
                return f"The call needs {INPUT!r}: the question, as a string."
            text = question.string_value.strip()
            if not text:
                return f"{INPUT!r} is empty: write the question."
            if len(text) > MAX_INPUT_CHARS:
                return f"{INPUT!r} is longer than {MAX_INPUT_CHARS:,} characters."
            return [cpb.ContentPart(text=text)]
        written = compact_json(arguments)
        if len(written) > MAX_INPUT_CHARS:
            return f"The arguments are longer than {MAX_INPUT_CHARS:,} characters as JSON."
        checker = await self._delegation.checker(self._schema)
        try:
            broken = await asyncio.to_thread(checker.violations, structs.plain_struct(arguments))
        except SchemaUnusable as exc:
            return f"The delegate's input schema cannot be applied: {exc.reason}."
        if broken:
            said = "; ".join(f"{path}: {why}" for path, why in broken)
            return (
                f"The arguments break the delegate's input schema ({said}). "
                "Fix them and call again."
            )
        # The arguments as JSON text (what a model reads) and as data (what code reads).
        return [cpb.ContentPart(text=written), cpb.ContentPart(data=arguments)]

    async def _handing(
        self,
        budget: RunBudget,
        principal: Principal,
        parent: Parent,
        text: list[cpb.ContentPart],
        timeout_s: float,
        claim: Claim | None,
    ) -> tuple[bool, str] | BuiltinAnswer:
        """The child, under a budget the run's caller handed over: it is handed what is
        left of it (held until it ends), and what it used is spent of it."""
        given = budget.hand_down()
        if given is None:  # pragma: no cover - checked by the caller
            answer, _ = await self._ask(principal, parent, text, timeout_s, claim)
            return answer
        held, handed = given
        used = Amount()
        try:
            if handed.empty():
                return False, (
                    "Refused: nothing is left of the budget handed to this run "
                    f"({', '.join(f'{k} {v}' for k, v in handed.capped().items())})."
                )
            answer, usage = await self._ask(principal, parent, text, timeout_s, claim, handed)
            if usage is not None:
                cost = usage.cost_micros or round(usage.estimated_cost_usd * 1e6)
                used = Amount(max(0, cost), max(0, usage.input_tokens), max(0, usage.output_tokens))
            return answer
        finally:
            budget.handed_back(held, used)

    def _parent(self, call_id: str) -> Parent:
        active = self._active
        own = active.assistant
        lineage = tuple(active.job.lineage)
        if own is not None:
            lineage += (AssistantName.parse(own.name, "assistant").assistant,)
        return Parent(
            run=RunName.parse(active.run.name, "run"),
            tool_call=call_id,
            depth=active.run.depth + 1,
            root=active.job.tree_root or active.run_id,
            lineage=lineage,
            deadline=(
                active.run.deadline.ToDatetime(dt.UTC) if active.run.HasField("deadline") else None
            ),
        )

    async def _refused(self, parent: Parent, call_id: str) -> str | Claim | None:
        """Why the call may not start a child; else its place in the tree (None: a
        recovered call that follows the child it started before). Checked before
        anything is stored or any model is called."""
        limits = self._delegation.limits
        target = self._target.id
        # A handler asked directly is a leaf here: it asks no assistant of this tree.
        if not self._target.handler and target in parent.lineage:
            path = " -> ".join((*parent.lineage, target))
            return (
                f"Refused: asking {target} would make a cycle ({path}); an assistant "
                "already asking cannot be asked again down the same line."
            )
        if parent.depth > limits.max_depth:
            return (
                f"Refused: delegation is at most {limits.max_depth} levels deep, and this "
                f"run is already at level {parent.depth - 1}."
            )
        # A root not recovered has started no child before its first call here.
        new = parent.depth == 1 and not self._active.recovered
        claim = await self._delegation.claim(parent.root, new=new)
        # A call asked again after a crash finds its own child among them.
        if claim is None and not await self._started(call_id):
            return (
                f"Refused: this tree of runs already started {limits.max_children_per_tree} "
                "delegate runs, its limit."
            )
        return claim

    async def _started(self, call_id: str) -> bool:
        children = await self._delegation._store.children(self._active.run_id)
        return any(child.parent_tool_call == call_id for child in children)

    async def _ask(
        self,
        principal: Principal,
        parent: Parent,
        text: list[cpb.ContentPart],
        timeout_s: float,
        claim: Claim | None,
        handed: Handed | None = None,
    ) -> tuple[tuple[bool, str] | BuiltinAnswer, hpb.Usage | None]:
        """The child's answer (the tool's result) and what it used (None: it did not
        start)."""
        delegation = self._delegation
        calls = delegation._calls()
        active = self._active
        key = f"{active.run_id}/{parent.tool_call}"
        async with delegation.starting(active.workspace_id):
            sent = await self._start(principal, parent, text, timeout_s, key, handed)
        child = sent.run
        if claim is not None:
            claim.settle(started=True)
        # The tool call's span when tracing is on (a no-op otherwise).
        trace.get_current_span().set_attribute("switchboard.child_run", child.name)
        self._show(child, parent.tool_call)
        self._waiting.enter()
        try:
            ended, said = await self._ended(calls, child.name, parent.tool_call)
        except BaseException:
            # The parent ended under it (cancelled, past its deadline): the child must
            # not run on with nobody to read its answer. A process that is stopping
            # leaves both to be resumed: the parent follows the same child then.
            if not delegation.closing():
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._end_child(calls, principal, child.name, parent))
            raise
        finally:
            self._waiting.leave()
        self._show(ended, parent.tool_call)
        if ended.state != pb.RUN_STATE_SUCCEEDED:
            return (False, f"{self._target.id} did not answer ({_ended_as(ended)})."), ended.usage
        if said is None:
            # Its answer went by before this watch began (a child that ended before a
            # crash of its parent's process): read as stored.
            stored = await delegation._context.message(
                principal, ended.output_message, timeout_s=_CONTEXT_TIMEOUT_S
            )
            said = list(stored.parts)
        return answered(said), ended.usage

    async def _end_child(
        self, calls: Calls, principal: Principal, name: str, parent: Parent
    ) -> None:
        """Cancel the child of a parent that ends, and show its end on the parent's
        stream before the parent's own end: a client building the tree from the
        root's stream sees every child it saw start also end."""
        ended = await calls.cancel_run(principal, name, "the run that asked it ended")
        if ended.state not in TERMINAL:
            # Its owner is another replica that answered before the end was stored.
            ended = await calls.get_run(name)
        if ended.state in TERMINAL:
            self._show(ended, parent.tool_call)

    async def _start(
        self,
        principal: Principal,
        parent: Parent,
        text: list[cpb.ContentPart],
        timeout_s: float,
        key: str,
        handed: Handed | None,
    ) -> pb.SendMessageResponse:
        """The child's conversation, then its message through admission (each idempotent
        on ``key``: a call sent again after a crash gets the same child)."""
        delegation = self._delegation
        calls = delegation._calls()
        active = self._active
        conversation = await delegation._context.create_conversation(
            principal,
            cpb.CreateConversationRequest(
                parent=str(self._target.parent),
                conversation=cpb.Conversation(
                    title=f"{self._target.id}, asked by run {active.run_id}"[:200],
                    # Which run asked (the console lists such conversations apart).
                    metadata=_delegated(active.run.name, parent.tool_call),
                ),
                request_id=derived_request_id("delegate", "conversation", key),
            ),
            timeout_s=min(_CONTEXT_TIMEOUT_S, timeout_s),
        )
        request = pb.SendMessageRequest(
            conversation=conversation.name,
            message=cpb.Message(role=cpb.MESSAGE_ROLE_USER, parts=text),
            assistant="" if self._target.handler else str(self._target),
            handler=str(self._target) if self._target.handler else "",
            request_id=derived_request_id("delegate", "message", key),
        )
        if parent.deadline is None:
            # No wall-clock deadline to hand down: what is left, as a duration.
            request.timeout.CopyFrom(duration_pb2.Duration(seconds=max(1, int(timeout_s))))
        return await calls.send_message(principal, request, handed, parent=parent)

    async def _ended(
        self, calls: Calls, name: str, call_id: str
    ) -> tuple[pb.Run, list[cpb.ContentPart] | None]:
        """The child as its end shows it, and its answer as its result update said it
        (None: the watch began after it). A pause on the way (approvals, a
        budget's room) shows on the parent, and so does the child going on after it: the
        parent is where a person sees what its tree waits for."""
        paused = False
        said: list[cpb.ContentPart] | None = None
        async for update in calls.watch(name, 0):
            if update is None:
                continue
            if update.HasField("result"):
                said = list(update.result.parts)
                continue
            if update.HasField("child_run"):
                # A grandchild (or further down): its start, pause and end go up the
                # tree as they are, naming the run that asked it, so the root's stream
                # shows the whole tree and a person decides its pauses there.
                forwarded = pb.RunUpdate()
                forwarded.child_run.CopyFrom(update.child_run)
                self._emit(forwarded)
                continue
            if not update.HasField("state_change"):
                continue
            child = update.state_change.run
            if child.state in TERMINAL:
                return child, said
            if child.state == pb.RUN_STATE_REQUIRES_ACTION or paused:
                paused = child.state == pb.RUN_STATE_REQUIRES_ACTION
                self._show(child, call_id)
        # The watch closed without the end (a watch can; a run always ends): as stored.
        return await calls.get_run(name), None

    def _show(self, child: pb.Run, call_id: str) -> None:
        handler = str(self._target) if self._target.handler else ""
        self._emit(
            child_update(
                child,
                parent=self._active.run.name,
                call_id=call_id,
                assistant="" if handler else child.assistant or str(self._target),
                handler=handler,
            )
        )


def child_update(
    child: pb.Run, *, parent: str, call_id: str, assistant: str, handler: str
) -> pb.RunUpdate:
    """The ``child_run`` update that shows ``child`` as its parent's call ``call_id``
    started it: its state, its usage and error once ended, its action while paused."""
    update = pb.RunUpdate()
    shown = update.child_run
    shown.run = child.name
    if handler:
        shown.handler = handler
    else:
        shown.assistant = assistant
    shown.tool_call_id = call_id
    shown.parent = parent
    shown.state = child.state
    if child.state in TERMINAL:
        shown.usage.CopyFrom(child.usage)
        if child.HasField("error"):
            shown.error.CopyFrom(child.error)
    elif child.state == pb.RUN_STATE_REQUIRES_ACTION:
        shown.required_action.CopyFrom(child.required_action)
    return update


def _ended_as(child: pb.Run) -> str:
    """How a child that did not succeed ended, in the parent's tool result: its state
    always (a model reading "not needed" alone cannot tell a cancel from a failure),
    then its error's message."""
    state = pb.RunState.Name(child.state).removeprefix("RUN_STATE_").lower().replace("_", " ")
    message = child.error.message
    return f"it ended {state}: {message}" if message else f"it ended {state}"


#: The conversation metadata key naming the run whose delegate call made it.
DELEGATED_BY: Final = "delegated_by"


def _delegated(run: str, tool_call: str) -> struct_pb2.Struct:
    found = struct_pb2.Struct()
    found.update({DELEGATED_BY: run, "tool_call": tool_call})
    return found


def answered(parts: Sequence[cpb.ContentPart]) -> tuple[bool, str] | BuiltinAnswer:
    """A child's answer as its parent's tool result: its text; its data parts as the
    result's structured output (``{"data": [...]}``) and, as JSON, after the text (the
    model reads the text); its files as the result's files."""
    text = "".join(part.text for part in parts if part.WhichOneof("part") == "text")
    data = [part.data for part in parts if part.WhichOneof("part") == "data"]
    files = tuple(part.file for part in parts if part.WhichOneof("part") == "file")
    if not data and not files:
        return True, text or "(an empty answer)"
    result: struct_pb2.Struct | None = None
    if data:
        result = struct_pb2.Struct()
        listed = result.get_or_create_list("data")
        for item in data:
            listed.add_struct().CopyFrom(item)
        written = compact_json(result)
        text = f"{text}\n\n{written}" if text else written
    return BuiltinAnswer(True, text, result, files)
