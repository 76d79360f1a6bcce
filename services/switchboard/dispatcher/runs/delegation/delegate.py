"""One delegate call: a child run started through admission, followed to its answer,
its place in the tree claimed first and its parent's slot given back while it runs."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable, Sequence
from typing import Final, Protocol

from google.protobuf import duration_pb2, struct_pb2
from opentelemetry import trace

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.handler.v1 import handler_pb2 as hpb
from switchboard.dispatcher.budgets.ledger import Amount
from switchboard.dispatcher.budgets.spending import RunBudget
from switchboard.dispatcher.handlers.handed import Handed
from switchboard.dispatcher.ports.context import ContextPort
from switchboard.dispatcher.runs.core.active.lifecycle import Active
from switchboard.dispatcher.runs.core.store import TERMINAL, RunStore
from switchboard.dispatcher.runs.delegation.limits import Calls, DelegationLimits, Parent, Target
from switchboard.dispatcher.runs.delegation.offer import INPUT, MAX_INPUT_CHARS
from switchboard.dispatcher.runs.delegation.trees import Claim, Trees
from switchboard.dispatcher.runs.delegation.waiting import Waiting
from switchboard.dispatcher.tools.runner import BuiltinAnswer
from switchboard.platform.schemas import Compiled, SchemaUnusable
from switchboard.platform.security.policy import Principal
from switchboard.platform.values import structs
from switchboard.platform.values.idempotency import derived_request_id
from switchboard.platform.values.resources import AssistantName, RunName
from switchboard.shared.parttext import compact_json

log = logging.getLogger("switchboard.dispatcher.delegation")

#: Bound on each call to the context service a delegate call makes.
_CONTEXT_TIMEOUT_S: Final = 10.0
#: The least time a child is given (a parent about to time out refuses instead).
_MIN_CHILD_S: Final = 1.0


class Delegating(Protocol):
    """What a delegate call uses of the process's delegation (``delegation.Delegation``)."""

    @property
    def limits(self) -> DelegationLimits: ...

    @property
    def trees(self) -> Trees: ...

    @property
    def store(self) -> RunStore: ...

    @property
    def context(self) -> ContextPort: ...

    @property
    def tracer(self) -> trace.Tracer | None: ...

    @property
    def closing(self) -> Callable[[], bool]: ...

    async def checker(self, schema: struct_pb2.Struct) -> Compiled: ...

    def starting(self, workspace_id: str) -> asyncio.Semaphore: ...

    def wired(self) -> Calls: ...


class Delegate:
    """One delegate of one run, as a built-in tool (``tools.runner.BuiltinTool``)."""

    def __init__(
        self,
        delegation: Delegating,
        active: Active,
        target: Target,
        emit: Callable[[pb.RunUpdate], None],
        waiting: Waiting,
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
        claim = await self._delegation.trees.claim(parent.root, new=new)
        # A call asked again after a crash finds its own child among them.
        if claim is None and not await self._started(call_id):
            return (
                f"Refused: this tree of runs already started {limits.max_children_per_tree} "
                "delegate runs, its limit."
            )
        return claim

    async def _started(self, call_id: str) -> bool:
        children = await self._delegation.store.children(self._active.run_id)
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
        calls = delegation.wired()
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
            stored = await delegation.context.message(
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
        calls = delegation.wired()
        active = self._active
        conversation = await delegation.context.create_conversation(
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
