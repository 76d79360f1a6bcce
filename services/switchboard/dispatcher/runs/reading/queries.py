"""Queries: reading runs and what a message would use (get, list, watch, describe).

Read-only: a live run is read from this process (``Live``), any other from the
store; WatchRun follows the run's feed here, or the shared event log when the
run lives on another replica or ended long ago. ``describe_conversation`` sits
here because it changes nothing: it answers with admission's own choice of
assistant and handler (``admission.route``) for a message sent now.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import AsyncIterator, Callable
from typing import Final

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.dispatcher import mapping
from switchboard.dispatcher.assistants.catalog import Assistants
from switchboard.dispatcher.llm.handler import LlmHandler
from switchboard.dispatcher.llm.retrieval import search_memory_definition
from switchboard.dispatcher.ports.context import ContextPort
from switchboard.dispatcher.runs.core.active.feed import Feed, merge_deltas
from switchboard.dispatcher.runs.core.active.live import (
    FINISH_TIMEOUT_S,
    SEQUENCE_BLOCK,
    Common,
    next_block,
)
from switchboard.dispatcher.runs.core.publishing import is_token
from switchboard.dispatcher.runs.core.records import Listing, Stored
from switchboard.dispatcher.runs.core.store import TERMINAL
from switchboard.dispatcher.runs.delegation.delegation import Delegation
from switchboard.dispatcher.runs.execution.execution import step_limit
from switchboard.dispatcher.runs.intake.screening import HANDLER, route
from switchboard.dispatcher.tools.port import ToolPort
from switchboard.dispatcher.tools.runner import ToolLimits, offered_tools
from switchboard.platform.errors import DependencyUnavailable, FieldViolation, InvalidArgument
from switchboard.platform.security.policy import Principal
from switchboard.platform.store import pagination
from switchboard.platform.values import timefields
from switchboard.platform.values.resources import (
    AssistantName,
    ConversationName,
    RunName,
    WorkspaceName,
)

#: How long a logged update of another replica's run that came before the token ahead of
#: it (two channels: ``_InOrder``) waits for that token before it goes out anyway, the gap
#: showing: the log is read in order, so only tokens can be missing below it. Only a token
#: lost on the way (pub/sub's at-most-once, over a reconnect) costs the whole wait, once;
#: with 50 ms, a token late behind a busy host's log reader was passed over (issue 84).
_OVERTAKEN_S: Final = 0.5
#: How long a token that came before what is ahead of it waits. What is missing may be a
#: logged update (a tool call, a result, a state change), which does come, over the log,
#: unless its owner died first (then the next attempt's first update ends the wait): on
#: a busy host the log's reader lags pub/sub by seconds, and with 50 ms a watcher was
#: seen to skip a run's tool calls and result (the durable-runs e2e beside four busy loops).
_BEHIND_LOG_S: Final = 5.0


def _listing(request: pb.ListRunsRequest) -> Listing:
    """The runs a ListRuns request selects, or INVALID_ARGUMENT naming the field."""
    conversation = ConversationName.parse_or_none(request.parent)
    workspace = conversation.parent if conversation else WorkspaceName.parse_or_none(request.parent)
    if workspace is None:
        description = "must be workspaces/{w}/conversations/{c} or workspaces/{w}"
        raise InvalidArgument(f"parent {description}", [FieldViolation("parent", description)])
    assistant_id = ""
    if request.assistant:
        assistant = AssistantName.parse_or_none(request.assistant)
        if assistant is None or assistant.workspace != workspace.workspace:
            description = "must be workspaces/{w}/assistants/{a} of the parent's workspace"
            raise InvalidArgument(
                f"assistant {description}", [FieldViolation("assistant", description)]
            )
        assistant_id = assistant.assistant
    parent_id = ""
    if request.parent_run:
        parent_run = RunName.parse_or_none(request.parent_run)
        if parent_run is None or parent_run.workspace != workspace.workspace:
            description = (
                "must be workspaces/{w}/conversations/{c}/runs/{r} of the parent's workspace"
            )
            raise InvalidArgument(
                f"parent_run {description}", [FieldViolation("parent_run", description)]
            )
        parent_id = parent_run.run
    changed_after = None
    if request.HasField("state_changed_after"):
        changed_after = timefields.timestamp(request.state_changed_after, "state_changed_after")
    return Listing(
        workspace_id=workspace.workspace,
        conversation_id=conversation.conversation if conversation else "",
        assistant_id=assistant_id,
        states=sorted(set(request.states)),
        changed_after=changed_after,
        parent_id=parent_id,
    )


class Queries:
    def __init__(
        self,
        *,
        common: Common,
        context: ContextPort,
        assistants: Assistants,
        page_tokens: pagination.PageTokens,
        tools: ToolPort,
        tool_limits: ToolLimits,
        delegation: Delegation | None = None,
    ) -> None:
        self._live = common.live
        self._store = common.store
        #: The delegate tools an assistant offers (DescribeConversation lists them).
        self._delegation = delegation
        self._feeds = common.feeds
        self._bus = common.bus
        self._router = common.router
        self._context = context
        self._assistants = assistants
        self._pages = page_tokens
        self._limits = common.limits
        self._tools = tools
        self._tool_limits = tool_limits
        #: Open WatchRun and Converse watches of this process's runs.
        self.watchers = 0

    async def get_run(self, name: str, *, children: bool = False) -> pb.Run:
        """The run; ``children``: with its children (``Run.children``), as GetRun shows it."""
        target = RunName.parse(name, "name")
        active = self._live.runs.get(name)
        if active is not None:
            run = self._live.current(active.run)
        else:
            run = (await self._stored(target)).run
        if children:
            for stored in await self._store.children(target.run):
                child = self._live.current(stored)
                shown = run.children.add(
                    run=child.name,
                    assistant=child.assistant,
                    tool_call_id=child.parent_tool_call,
                    state=child.state,
                    parent=run.name,
                    handler="" if child.assistant else child.handler,
                )
                shown.usage.CopyFrom(child.usage)
                if child.HasField("error"):
                    shown.error.CopyFrom(child.error)
                if child.state == pb.RUN_STATE_REQUIRES_ACTION:
                    shown.required_action.CopyFrom(child.required_action)
        return run

    async def _stored(self, target: RunName) -> Stored:
        return await self._store.get(target.workspace, target.conversation, target.run)

    async def list_runs(self, request: pb.ListRunsRequest) -> pb.ListRunsResponse:
        listing = _listing(request)
        size = pagination.page_size(request.page_size, default=20, maximum=100)
        token = pagination.fingerprint(
            "runs",
            request.parent,
            list(listing.states),
            listing.assistant_id,
            listing.changed_after.isoformat() if listing.changed_after else "",
            listing.parent_id,
        )
        after: tuple[dt.datetime, str] | None = None
        if request.page_token:
            stamp, last = self._pages.decode(
                request.page_token, token, (pagination.ISO_TIME, pagination.ID)
            )
            after = (dt.datetime.fromisoformat(str(stamp)), str(last))
        rows, total = await self._store.page(listing, after=after, limit=size + 1)
        response = pb.ListRunsResponse(total_size=total)
        for row in rows[:size]:
            response.runs.append(self._live.current(pb.Run.FromString(row.data)))
        if len(rows) > size:
            last_row = rows[size - 1]
            response.next_page_token = self._pages.encode(
                [last_row.created_at.isoformat(), last_row.id], token
            )
        return response

    async def list_handlers(self, request: pb.ListHandlersRequest) -> pb.ListHandlersResponse:
        workspace_id = WorkspaceName.parse(request.parent, "parent").workspace
        size = pagination.page_size(request.page_size, default=50, maximum=100)
        token = pagination.fingerprint("handlers", request.parent)
        after = ""
        if request.page_token:
            after = str(self._pages.decode(request.page_token, token, (pagination.ID,))[0])
        listed = await self._router.listed(workspace_id)
        handlers = [h for h in listed if h.capabilities.id > after]
        response = pb.ListHandlersResponse()
        for handler in handlers[:size]:
            response.handlers.append(mapping.handler(handler))
        if len(handlers) > size:
            response.next_page_token = self._pages.encode(
                [handlers[size - 1].capabilities.id], token
            )
        return response

    async def watch(
        self, name: str, after_sequence: int, *, merge: bool = False
    ) -> AsyncIterator[pb.RunUpdate | None]:
        """The run's updates after ``after_sequence``; ``None`` for a heartbeat.

        ``merge`` (``WatchRunRequest.merge_deltas``): the text deltas ready together
        for this watcher go out as one update (``feed.merged_delta``)."""
        self.watchers += 1
        try:
            async for update in self._watch(name, after_sequence, merge):
                yield update
        finally:
            self.watchers -= 1

    async def _watch(
        self, name: str, after_sequence: int, merge: bool
    ) -> AsyncIterator[pb.RunUpdate | None]:
        target = RunName.parse(name, "name")
        if after_sequence < 0:
            raise InvalidArgument(
                "after_sequence must not be negative",
                [FieldViolation("after_sequence", "must not be negative")],
            )
        feed = self._feeds.get(name)
        if feed is None:
            run = (await self._stored(target)).run
            if run.state in TERMINAL and run.last_sequence > after_sequence:
                missed = await self._missed_end_here(run, str(target.parent), after_sequence)
                for one in merge_deltas(missed) if merge else missed:
                    yield one
                return
            async for update in self._watch_stored(run, after_sequence, merge):
                yield update
            return
        if after_sequence < feed.first - 1:
            # Older updates are not here (a run recovered here: its attempt's block; an
            # endless stream trimmed).
            start = feed.first - 1
            first = await self._opening(target, feed)
            if first is not None:
                yield first
            after_sequence = start
        position, ended = after_sequence, False
        async for update in feed.follow(
            after_sequence, heartbeat_s=self._limits.heartbeat_s, merge=merge
        ):
            if update is not None:
                position = update.sequence
                ended = update.state_change.run.state in TERMINAL
            yield update
        if not ended:
            # The feed closed without an end: another instance took the run over
            # (this one lost its lease). Its end comes from the new owner's events.
            stored = await self._stored(target)
            async for update in self._watch_stored(stored.run, position, merge):
                yield update

    async def _opening(self, target: RunName, feed: Feed) -> pb.RunUpdate | None:
        """What a watcher behind ``feed``'s start gets first: a state change that stands
        where the feed begins (None: the first kept is one), never the run as it stands
        now (an ended run's end, and then its attempt replayed after it: issue 67)."""
        first = feed.opening()
        if first is not None or (feed.updates and feed.updates[0].HasField("state_change")):
            return first
        # Nothing of it known before the feed, which has no state change to start from
        # yet (a recovered run that has shown nothing): the run as it stands.
        active = self._live.runs.get(feed.run)
        if active is not None:
            current = self._live.current(active.run)
        else:
            current = (await self._stored(target)).run
        current.last_sequence = feed.first - 1
        kept = feed.updates[0].time.ToNanoseconds() if feed.updates else None
        return mapping.snapshot(current, not_after_ns=kept)

    async def _watch_stored(
        self, run: pb.Run, after_sequence: int, merge: bool
    ) -> AsyncIterator[pb.RunUpdate | None]:
        """A run without a feed here: finished long ago, or owned by another replica."""
        target = RunName.parse(run.name, "name")
        queue: asyncio.Queue[pb.RunUpdate] = asyncio.Queue(maxsize=10_000)

        def listener(event: events_pb2.Event) -> None:
            if (
                event.type == events_pb2.EVENT_TYPE_RUN_UPDATED
                and event.run_updated.update.run == run.name
            ):
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait(event.run_updated.update)

        unsubscribe = self._bus.listen(listener)
        try:
            position = after_sequence
            if run.last_sequence > position:
                position = run.last_sequence
                yield mapping.snapshot(run)
            if run.state in TERMINAL:
                return
            # Its tokens, those said before this watch included (read back into the ring).
            unfollow = await self._bus.follow((str(target.parent),))
            try:
                async for update in self._follow(target, position, queue, merge):
                    yield update
            finally:
                unfollow()
        finally:
            unsubscribe()

    async def _follow(
        self, target: RunName, position: int, queue: asyncio.Queue[pb.RunUpdate], merge: bool
    ) -> AsyncIterator[pb.RunUpdate | None]:
        """Another replica's live run past ``position``: what this process holds of it,
        then what its listener hears (``queue``), in order, to its end."""
        order = _InOrder(position)
        held = self._held(str(target), str(target.parent), order)
        ready = merge_deltas(held) if merge else held
        while True:
            for one in ready:
                yield one
                if _ends(one):
                    return
            wait = self._limits.heartbeat_s
            if order.early:
                wait = order.left()
                if wait <= 0:
                    ready = _overdue(order, queue, merge)
                    continue
            try:
                async with asyncio.timeout(wait):
                    update = await queue.get()
            except TimeoutError:
                ready = []
                if not order.early:
                    # Idle: did it end without this process hearing of it (its
                    # end published while this one could not read the log)?
                    stored = (await self._stored(target)).run
                    if stored.state in TERMINAL and stored.last_sequence > order.position:
                        ready = [mapping.snapshot(stored)]
                    else:
                        yield None
                continue
            ready = _ready(order, update, queue, merge)

    async def _missed_end_here(
        self, run: pb.Run, conversation: str, after_sequence: int
    ) -> list[pb.RunUpdate]:
        """``_missed_end`` from the ring of a process reading the whole log and following
        the conversation's tokens (it does now, if it did not: the run's logged updates are
        among the newest it loads, and its tokens are read back where they were said)."""
        try:
            unfollow = await self._bus.follow((conversation,))
        except DependencyUnavailable:
            return [mapping.snapshot(run)]  # the log is away: the run as stored
        try:
            return self._missed_end(run, conversation, after_sequence)
        finally:
            unfollow()

    def _missed_end(
        self, run: pb.Run, conversation: str, after_sequence: int
    ) -> list[pb.RunUpdate]:
        """What a watch behind an ended run of another replica gets: the run's updates
        after ``after_sequence`` up to its end when this process still holds them all
        (its ring keeps the logged ones and the tokens heard, speech included), exactly
        what the owner's feed would replay; otherwise the run as stored stands for them."""
        order = _InOrder(after_sequence)
        # The run has ended: what is not held by now will not come.
        held = self._held(run.name, conversation, order) + order.flush()
        if held and held[0].sequence != after_sequence + 1 and not _starts(held[0]):
            # The ring does not reach back to the watcher's place (or the run's start):
            # the run as stored, not a stream with its beginning missing.
            return [mapping.snapshot(run)]
        for index, one in enumerate(held):
            if _ends(one):
                return held[: index + 1]
        return [mapping.snapshot(run)]

    def _held(self, run: str, conversation: str, order: _InOrder) -> list[pb.RunUpdate]:
        """What this process already holds of another replica's ``run`` past ``order``'s
        position, ready to go out: its ring keeps the logged updates and the tokens heard
        from the owner (which no log has), so a watch begun or resumed here mid-run misses
        nothing this process was told. The watch's listener is attached first: what comes
        meanwhile is in its queue too, and ``_InOrder`` passes over a sequence it sent."""
        ready: list[pb.RunUpdate] = []
        for event in self._bus.recent_in(conversation):
            if (
                event.type == events_pb2.EVENT_TYPE_RUN_UPDATED
                and event.run_updated.update.run == run
            ):
                ready += order.take(event.run_updated.update)
        return ready

    async def describe_conversation(
        self, principal: Principal, request: pb.DescribeConversationRequest
    ) -> pb.DescribeConversationResponse:
        workspace_id = ConversationName.parse(request.conversation, "conversation").workspace
        if request.handler and not HANDLER.fullmatch(request.handler):
            raise InvalidArgument(
                "the request is invalid", [FieldViolation("handler", "must be handlers/{id}")]
            )
        # NOT_FOUND for a conversation that is not there (the access rule
        # checked the workspace only).
        await self._context.conversation(
            principal, request.conversation, timeout_s=FINISH_TIMEOUT_S
        )
        assistant, choice = await route(
            self._assistants, self._router, workspace_id, request, cpb.Message(), principal.pinned
        )
        handler = choice.handler
        response = pb.DescribeConversationResponse(
            handler=mapping.handler(handler),
            context_token_budget=(
                (assistant.context_token_budget if assistant is not None else 0)
                or handler.capabilities.max_context_tokens
                or 4000
            ),
        )
        if assistant is not None:
            response.assistant.CopyFrom(assistant)
        definitions, unavailable = await offered_tools(self._tools, principal, assistant)
        if assistant is not None and assistant.retrieval.search_tool:
            definitions.append(search_memory_definition())
        if assistant is not None and self._delegation is not None:
            definitions.extend(await self._delegation.definitions(assistant))
        response.tools.extend(definitions)
        response.unavailable_tools.extend(unavailable)
        if definitions or handler.capabilities.interactive:
            response.max_tool_steps = step_limit(self._tool_limits, assistant)
        if isinstance(handler, LlmHandler):
            response.model = handler.model_label(assistant.model if assistant is not None else None)
        return response


def _ends(update: pb.RunUpdate) -> bool:
    return (
        update.WhichOneof("update") == "state_change" and update.state_change.run.state in TERMINAL
    )


def _starts(update: pb.RunUpdate) -> bool:
    """Whether a stream may begin with ``update`` after a gap: a state change carries the
    whole run as it then stood."""
    return update.HasField("state_change")


def _ready(
    order: _InOrder, update: pb.RunUpdate, queue: asyncio.Queue[pb.RunUpdate], merge: bool
) -> list[pb.RunUpdate]:
    """What may go out now that ``update`` came; with ``merge``, what else has come
    meanwhile too, its deltas ready together merged."""
    ready = order.take(update)
    if not merge:
        return ready
    while not queue.empty():
        ready += order.take(queue.get_nowait())
    return merge_deltas(ready)


def _overdue(
    order: _InOrder, queue: asyncio.Queue[pb.RunUpdate], merge: bool
) -> list[pb.RunUpdate]:
    """What goes out once what waits in ``order`` is due: first what has come meanwhile,
    which may be what they waited for (the time went by while the watcher was slow to read
    what went before, not while the channel was), then what still waits, the gap showing
    (it was before this watch began, or lost on the way)."""
    ready: list[pb.RunUpdate] = []
    while not queue.empty():
        ready += order.take(queue.get_nowait())
    if order.early and order.left() <= 0:
        ready += order.flush()
    return merge_deltas(ready) if merge else ready


class _InOrder:
    """Another replica's run, as this process hears it: its logged updates in log order,
    its tokens (deltas, speech) over their own channel (``EventBus.announce``: Redis
    pub/sub, read by another task than the log's), so either may arrive before the
    update before it: a token before the logged update it follows, or a logged update
    before the token right ahead of it (issue 67: the delta the echo handler yields
    just before a progress update). An update that leaves a gap waits for what comes
    before it. A logged update waits at most ``_OVERTAKEN_S``: the log is read in
    order, so what it waits for can only be a token. A token waits up to
    ``_BEHIND_LOG_S``, as what it waits for may be logged, and that comes; a logged
    update that comes after it ends that wait (everything waits then until the
    earliest ``due``). What never comes (a token lost on the way) then leaves a gap,
    which the sequences show, never a lasting stall. A new attempt's first update (the
    first of a newer block) waits for nothing of the attempt before it."""

    __slots__ = ("_clock", "due", "early", "position")

    def __init__(self, position: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.position = position
        self.early: dict[int, pb.RunUpdate] = {}
        #: When what waits in ``early`` goes out anyway (``clock`` time; 0: nothing waits).
        self.due = 0.0
        self._clock = clock

    def take(self, update: pb.RunUpdate) -> list[pb.RunUpdate]:
        """What may go out now that ``update`` came, in order."""
        sequence = update.sequence
        position = self.position
        if sequence <= position:
            return []
        early = self.early
        if sequence != position + 1 and not _opens_attempt(sequence, position):
            due = self._clock() + (_BEHIND_LOG_S if is_token(update) else _OVERTAKEN_S)
            self.due = min(self.due, due) if early else due
            early[sequence] = update
            return []
        self.position = sequence
        if not early:  # the path of every token of a run heard in order
            return [update]
        # A new attempt opened (``sequence`` is not ``position + 1``): what waited of the
        # old one goes out first, so that sequences only go up.
        ready = [early.pop(s) for s in sorted(early) if s < sequence]
        ready.append(update)
        while (after := early.pop(self.position + 1, None)) is not None:
            ready.append(after)
            self.position = after.sequence
        if not early:
            self.due = 0.0
        return ready

    def left(self) -> float:
        """Seconds until what waits goes out anyway."""
        return self.due - self._clock()

    def flush(self) -> list[pb.RunUpdate]:
        """What waits, in order: what it waited for is not coming."""
        ready = [self.early.pop(s) for s in sorted(self.early)]
        self.due = 0.0
        if ready:
            self.position = ready[-1].sequence
        return ready


def _opens_attempt(sequence: int, position: int) -> bool:
    """Whether ``sequence`` is the first of an attempt after ``position``'s
    (``core/active/live.py``)."""
    return sequence % SEQUENCE_BLOCK == 1 and sequence > next_block(position)
