"""The A2A front door's domain: A2A requests become the dispatcher's own requests.

Nothing here runs a model or stores a run: a message goes through the
dispatcher's admission (``Dispatcher.send_message``: the same validation,
content policy, rate limits, idempotency by ``message_id`` and concurrency
policy as ``DispatcherService.SendMessage``), a task is read, listed, watched
and cancelled through the dispatcher's queries, and a new context is a
conversation created through the context service's domain. The access rules
are the same table's: each call authorizes the resource its names map to
(``mapping``) with the permission the matching Switchboard RPC needs, and a
stream keeps its run authorized through an access grant, as ``WatchRun`` does.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol, cast

from a2a.types import a2a_pb2 as a2a
from switchboard.a2a import errors, mapping
from switchboard.a2a.push.configs import PushConfigs
from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.handlers.handed import BUDGET_EXTENSION, HEADER, USAGE_KEY, Handed
from switchboard.platform.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    SwitchboardError,
)
from switchboard.platform.security.accesswatch import AccessWatch
from switchboard.platform.security.policy import Permission, Policy, Principal
from switchboard.platform.values.resources import AssistantName, ConversationName, WorkspaceName

#: The run states a task ends in (A2A's terminal states).
_ENDED: Final = frozenset(
    {
        pb.RUN_STATE_SUCCEEDED,
        pb.RUN_STATE_FAILED,
        pb.RUN_STATE_CANCELLED,
        pb.RUN_STATE_DEADLINE_EXCEEDED,
    }
)
#: Run states a blocking SendMessage returns at (A2A: terminal or interrupted).
_SETTLED: Final = _ENDED | {pb.RUN_STATE_REQUIRES_ACTION}
#: Output modes a client may accept to get the answer (it is plain text).
_TEXT_MODES: Final = frozenset({"text/plain", "text/*", "*/*", "text"})
#: ListTasks' page size when the request names none, and the most (A2A's numbers).
DEFAULT_PAGE: Final = 50
MAX_PAGE: Final = 100
#: How far along its life a task state is: one stream never sends a state of a lower
#: rank after a higher one (a run queued again after a restart stays "working").
_RANK: Final[dict[int, int]] = {
    a2a.TASK_STATE_SUBMITTED: 0,
    a2a.TASK_STATE_WORKING: 1,
    a2a.TASK_STATE_INPUT_REQUIRED: 1,
}
_FINAL_RANK: Final = 2
#: A run update's stream events, each with its task state (None: an answer chunk).
_Events = list[tuple[a2a.StreamResponse, int | None]]
#: An answer's files as A2A parts (inside FrontDoor, ``list`` is a method).
_Parts = list[a2a.Part]
_PUSH_FIELD: Final = "configuration.task_push_notification_config"
#: The media types a card says a message may carry (any other file is stored too).
INPUT_MODES: Final = (
    "text/plain",
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/webp",
    "application/pdf",
    "text/markdown",
    "text/csv",
    "application/json",
    "audio/wav",
    "audio/mpeg",
)


class Runs(Protocol):
    """What the front door needs of the dispatcher (``ports``: in this process or another)."""

    def send_message(
        self, principal: Principal, request: pb.SendMessageRequest, handed: Handed | None = None
    ) -> Awaitable[pb.SendMessageResponse]: ...

    def get_run(self, principal: Principal, name: str) -> Awaitable[pb.Run]: ...

    def list_runs(
        self, principal: Principal, request: pb.ListRunsRequest
    ) -> Awaitable[pb.ListRunsResponse]: ...

    def cancel_run(self, principal: Principal, name: str, reason: str) -> Awaitable[pb.Run]: ...

    def watch(
        self, principal: Principal, name: str, after_sequence: int
    ) -> AsyncIterator[pb.RunUpdate | None]: ...

    def submit_tool_approvals(
        self, principal: Principal, request: pb.SubmitToolApprovalsRequest
    ) -> Awaitable[pb.Run]: ...

    def steer_run(
        self, principal: Principal, request: pb.SteerRunRequest
    ) -> Awaitable[pb.SteerRunResponse]: ...

    def regenerate(
        self, principal: Principal, request: pb.RegenerateMessageRequest
    ) -> Awaitable[pb.RegenerateMessageResponse]: ...

    def assistant(
        self, principal: Principal, name: str, revision: int = 0
    ) -> Awaitable[pb.Assistant]: ...


class Texts(Protocol):
    """What it needs of the context service: new conversations, messages and the
    bytes of an answer's small files."""

    def create_conversation(
        self, principal: Principal, parent: str, request_id: str, title: str
    ) -> Awaitable[str]: ...

    def text(self, principal: Principal, message: str) -> Awaitable[str]: ...

    def message(self, principal: Principal, message: str) -> Awaitable[cpb.Message]: ...

    def read_file(self, principal: Principal, file: str, limit: int) -> Awaitable[bytes]:
        """The whole content of a stored file of at most ``limit`` bytes."""
        ...


@dataclass(frozen=True)
class _Admitted:
    """What a message did: the task's run, the sequence to follow it after, and for a
    steer the message as the task's history holds it."""

    run: pb.Run
    after: int
    steer: a2a.Message | None = None

    @property
    def steers(self) -> list[a2a.Message]:
        return [self.steer] if self.steer is not None else []


@dataclass(frozen=True)
class Interface:
    """Where clients reach this agent (its card's ``supported_interfaces``)."""

    url: str
    binding: str = "GRPC"
    version: str = "1.0"


class FrontDoor:
    """Serving A2A: the A2A methods over a workspace's assistants, each an A2A agent."""

    def __init__(
        self,
        runs: Runs,
        texts: Texts,
        policy: Policy,
        access: AccessWatch,
        interfaces: Callable[[str, str], list[Interface]],
        push: PushConfigs,
    ) -> None:
        self._runs = runs
        self.push = push
        self._texts = texts
        self._policy = policy
        self._access = access
        self._interfaces = interfaces

    # -- the card ---------------------------------------------------------------------------

    async def card(
        self, principal: Principal, tenant: str, forwarded: tuple[str, str] = ("", "")
    ) -> a2a.AgentCard:
        """The assistant's card; ``forwarded``: the scheme and Host the call reached the
        edge with, so that the card names the edge the client came through."""
        assistant_name, revision = str(mapping.agent(tenant)), mapping.pinned(tenant)
        await self._policy.authorize(principal, assistant_name, Permission.READ, "tenant")
        assistant = await self._runs.assistant(principal, assistant_name, revision)
        return card_of(assistant, self._interfaces(*forwarded), revision)

    # -- sending ----------------------------------------------------------------------------

    async def _admit(self, principal: Principal, request: a2a.SendMessageRequest) -> _Admitted:
        """The run the message starts, continues or steers, and the sequence to follow it
        after."""
        agent = mapping.agent(request.tenant)
        message = request.message
        if not request.HasField("message"):
            raise InvalidArgument("message is required", [FieldViolation("message", "is required")])
        _acceptable(request.configuration)
        configuration = request.configuration
        push = (
            configuration.task_push_notification_config
            if configuration.HasField("task_push_notification_config")
            else None
        )
        if push is not None:
            # Refused before the run starts: a malformed or blocked config starts nothing.
            await self.push.validate(push, f"{_PUSH_FIELD}.")
        if message.task_id:
            admitted = await self._continue(principal, agent.parent, request)
        else:
            admitted = await self._start(principal, request, agent)
        if push is not None:
            await self.push.attach(
                principal,
                push,
                admitted.run,
                prefix=f"{_PUSH_FIELD}.",
                default_id=mapping.request_id(message.message_id) if not message.task_id else "",
            )
        return admitted

    async def _start(
        self,
        principal: Principal,
        request: a2a.SendMessageRequest,
        agent: AssistantName,
    ) -> _Admitted:
        """A new task: the message admitted as ``DispatcherService.SendMessage`` admits it."""
        workspace = agent.parent
        message = request.message
        parts = mapping.parts_in(message)
        handed = mapping.handed_in(message)
        request_id = mapping.request_id(message.message_id)
        if message.context_id:
            conversation = mapping.conversation_name(
                workspace, message.context_id, "message.context_id"
            )
        else:
            await self._policy.authorize(principal, str(workspace), Permission.WRITE, "tenant")
            # The message id keys the new conversation too: a retried message lands
            # in the conversation its first attempt made, and is replayed there.
            key = hashlib.sha256(message.message_id.encode()).hexdigest()[:32]
            conversation = await self._texts.create_conversation(
                principal, str(workspace), f"a2a-{key}", mapping.title_of(parts)
            )
        await self._policy.authorize(
            principal, conversation, Permission.WRITE, "message.context_id"
        )
        branching = mapping.branching_in(message, workspace, conversation)
        if branching.regenerate:
            # A new task answers the question the named task answered, beside its answer.
            earlier = await self._runs.get_run(principal, branching.regenerate)
            regenerated = await self._runs.regenerate(
                principal,
                pb.RegenerateMessageRequest(message=earlier.output_message, request_id=request_id),
            )
            return _Admitted(regenerated.run, 0)
        sent = await self._runs.send_message(
            principal,
            pb.SendMessageRequest(
                conversation=conversation,
                message=cpb.Message(parts=parts),
                assistant=str(agent),
                # A pinned tenant answers with its revision (docs/a2a.md, "Pinned agents").
                assistant_revision=mapping.pinned(request.tenant),
                request_id=request_id,
                # The request's metadata is the handler's parameters (docs/a2a.md).
                parameters=request.metadata,
                # An edit of an earlier message of the context (docs/a2a.md, "Branches").
                replaces=branching.replaces,
            ),
            handed,
        )
        return _Admitted(sent.run, 0)

    async def _continue(
        self, principal: Principal, workspace: WorkspaceName, request: a2a.SendMessageRequest
    ) -> _Admitted:
        """A message on a task: on an input-required one, the decisions on its pending
        tool calls (``SubmitToolApprovals``); on a submitted or working one, a steer
        (``SteerRun``: the run takes it before its next model call); on one that ended,
        refused (A2A: a task in a terminal state takes no more messages).
        """
        message = request.message
        name = str(mapping.run_name(workspace, message.task_id, "message.task_id"))
        if message.context_id and message.context_id != mapping.context_id(name):
            # A2A: a context that is not the task's is refused, not ignored.
            description = "is not the context of message.task_id"
            raise InvalidArgument(
                f"message.context_id {description}",
                [FieldViolation("message.context_id", description)],
            )
        await self._policy.authorize(principal, name, Permission.WRITE, "message.task_id")
        current = await self._runs.get_run(principal, name)
        if current.state == pb.RUN_STATE_REQUIRES_ACTION:
            approvals = mapping.approvals_in(message, name)
            run = await self._runs.submit_tool_approvals(principal, approvals)
            return _Admitted(run, run.last_sequence)
        if current.state in _ENDED:
            try:
                parts = _steer_parts(request)
            except InvalidArgument:
                # Whatever the message holds: A2A's UNSUPPORTED_OPERATION for a task that
                # takes no more input (the servicer tags it), not a complaint about it.
                state = a2a.TaskState.Name(mapping.STATES.get(current.state, 0))
                raise FailedPrecondition(
                    f"task {message.task_id} has ended (A2A state {state}): it takes no "
                    "more messages"
                ) from None
            # A well-formed one still goes to SteerRun: a message id sent again after its
            # steer was taken is answered as it was (idempotent); any other is RUN_ENDED,
            # nothing stored (the servicer tags it UNSUPPORTED_OPERATION).
        else:
            parts = _steer_parts(request)
        steered = await self._runs.steer_run(
            principal,
            pb.SteerRunRequest(
                run=name,
                message=cpb.Message(parts=parts),
                request_id=mapping.request_id(message.message_id),
            ),
        )
        # The task as it stood before the steer: a stream of it then shows the steer
        # accepted (and consumed) as the run's updates say.
        steer = mapping.steer_message(name, steered.message, steered.run.name)
        return _Admitted(current, current.last_sequence, steer)

    async def send(
        self, principal: Principal, request: a2a.SendMessageRequest
    ) -> a2a.SendMessageResponse:
        admitted = await self._admit(principal, request)
        run = admitted.run
        if not request.configuration.return_immediately and run.state not in _SETTLED:
            async for update in self._runs.watch(principal, run.name, admitted.after):
                if update is None or update.WhichOneof("update") != "state_change":
                    continue
                run = update.state_change.run
                if run.state in _SETTLED:
                    break
        history = _history_length(request.configuration, "configuration.history_length")
        task = await self._task(principal, run, history=history, steers=admitted.steers)
        return a2a.SendMessageResponse(task=task)

    async def stream(
        self, principal: Principal, request: a2a.SendMessageRequest
    ) -> AsyncIterator[a2a.StreamResponse]:
        admitted = await self._admit(principal, request)
        # The task as admitted (or, for a message id sent again, as it stands now; for a
        # steer, as it stood before it), then what happens next.
        async for response in self._relay(principal, admitted.run, None, admitted.steers):
            yield response

    # -- tasks ------------------------------------------------------------------------------

    async def get(self, principal: Principal, request: a2a.GetTaskRequest) -> a2a.Task:
        name = str(mapping.run_name(mapping.agent(request.tenant).parent, request.id))
        history = _history_length(request, "history_length")
        await self._policy.authorize(principal, name, Permission.READ, "id")
        run = await self._runs.get_run(principal, name)
        return await self._task(principal, run, history=history)

    async def cancel(self, principal: Principal, request: a2a.CancelTaskRequest) -> a2a.Task:
        name = str(mapping.run_name(mapping.agent(request.tenant).parent, request.id))
        await self._policy.authorize(principal, name, Permission.WRITE, "id")
        run = await self._runs.cancel_run(principal, name, "cancelled by an A2A client")
        if run.state in _ENDED and run.state != pb.RUN_STATE_CANCELLED:
            # A2A: a task in a terminal state is not cancelable (cancelling a
            # cancelled one again answers it, as CancelRun does).
            state = a2a.TaskState.Name(mapping.STATES.get(run.state, 0))
            raise FailedPrecondition(f"task {request.id} has ended ({state}): not cancelable")
        return await self._task(principal, run)

    async def list(
        self, principal: Principal, request: a2a.ListTasksRequest
    ) -> a2a.ListTasksResponse:
        """The agent's tasks the caller may read, newest first: in one context, or in
        every context of the agent's workspace; ``total_size`` counts them all."""
        agent = mapping.agent(request.tenant)
        assistant = str(agent)
        await self._policy.authorize(principal, assistant, Permission.READ, "tenant")
        # Not found (to a member too) for an agent that does not exist.
        await self._runs.assistant(principal, assistant)
        size = _page_size(request)
        history = _history_length(request, "history_length") or 0
        empty = a2a.ListTasksResponse(page_size=size)
        parent = str(agent.parent)
        if request.context_id:
            if not mapping.CONTEXT_ID.fullmatch(request.context_id):
                return empty  # no context of this agent has that id, so no task either
            parent = str(ConversationName(agent.workspace, request.context_id))
        listing = pb.ListRunsRequest(
            parent=parent, page_size=size, page_token=request.page_token, assistant=assistant
        )
        if request.status:
            state = mapping.RUN_STATES.get(request.status)
            if state is None:
                return empty  # a state no run of this agent is ever in
            listing.states.append(state)
            if state == pb.RUN_STATE_FAILED:
                listing.states.append(pb.RUN_STATE_DEADLINE_EXCEEDED)
        if request.HasField("status_timestamp_after"):
            # A2A: a status timestamp at or after it; the runs' filter is strictly after.
            at = request.status_timestamp_after
            listing.state_changed_after.FromNanoseconds(max(0, at.ToNanoseconds() - 1000))
        listed = await self._runs.list_runs(principal, listing)
        artifacts = request.include_artifacts if request.HasField("include_artifacts") else False
        return a2a.ListTasksResponse(
            tasks=[
                await self._task(principal, run, history=history, artifacts=artifacts)
                for run in listed.runs
            ],
            next_page_token=listed.next_page_token,
            page_size=size,
            total_size=listed.total_size,
        )

    async def subscribe(
        self,
        principal: Principal,
        request: a2a.SubscribeToTaskRequest,
        after: mapping.Cursor | None,
    ) -> AsyncIterator[a2a.StreamResponse]:
        """The task, then its events; with the resume extension (``after`` set) only
        those after that sequence, also for a task that has ended since."""
        name = str(mapping.run_name(mapping.agent(request.tenant).parent, request.id))
        await self._policy.authorize(principal, name, Permission.READ, "id")
        run = await self._runs.get_run(principal, name)
        if run.state in _ENDED and after is None:
            # A2A: subscribing to a task in a terminal state is an error.
            raise FailedPrecondition(f"task {request.id} has ended; GetTask reads it")
        async for response in self._relay(principal, run, after):
            yield response

    # -- helpers ----------------------------------------------------------------------------

    async def _relay(
        self,
        principal: Principal,
        run: pb.Run,
        after: mapping.Cursor | None,
        steers: Sequence[a2a.Message] = (),
    ) -> AsyncIterator[a2a.StreamResponse]:
        """The task first, then its events until it ends, under an access grant.

        ``after`` None (A2A's SubscribeToTask, a streamed send): the task as ``run``
        stands, its answer so far in the answer artifact, then only what happens
        after it: the first new chunk appends to that answer. ``after`` a cursor (the
        resume extension): the task without its answer, then every event after the
        cursor, the first chunk appending to what the client holds, every state change
        after it as it was (the client asked for the task's history from there). Without
        the extension a state never goes back to an earlier one on the stream.
        """
        grant = self._access.open(principal)
        try:
            hold = await grant.hold(((run.name, "id"),), Permission.READ)
            pending: pb.RunUpdate | None = None
            if after is None:
                # Everything up to the run's sequence is history: read from the start
                # for the answer so far, sent in the snapshot, never again as chunks.
                seen: mapping.Cursor = (run.last_sequence, 1)
                updates = hold.guard(self._runs.watch(principal, run.name, 0))
                so_far, pending = await _history(updates, seen)
                snapshot = await self._snapshot(principal, run, so_far, steers)
                streamed = bool(snapshot.task.artifacts)
            else:
                sequence, part = seen = after
                # Held: the first of update N's events only; its second comes from N.
                watch_after = sequence if part else max(0, sequence - 1)
                updates = hold.guard(self._runs.watch(principal, run.name, watch_after))
                snapshot = a2a.StreamResponse(task=await self._task(principal, run, answer=False))
                # A resumed stream continues an answer its client already holds part of.
                streamed = after != mapping.START
            yield snapshot
            # A resumed stream replays history from its cursor: every event, as it was.
            rank = _rank(snapshot.task.status.state) if after is None else -1
            # The state a steer's status update repeats: the last one the stream sent.
            now: a2a.TaskState = snapshot.task.status.state
            if _rank(now) == _FINAL_RANK:
                now = a2a.TASK_STATE_WORKING  # replayed from a cursor: it was going then
            async for update in _then(pending, updates):
                for event, state in await self._events(principal, update, seen, streamed, now):
                    if state is None:
                        streamed = True
                        yield event
                        continue
                    if after is None and _rank(state) < rank:
                        continue  # never backwards on one stream
                    if after is None:
                        rank = _rank(state)
                    now = cast("a2a.TaskState", state)
                    yield event
                changed = update.state_change.run
                if update.WhichOneof("update") == "state_change" and changed.state in _ENDED:
                    return
        finally:
            grant.close()

    async def _snapshot(
        self, principal: Principal, run: pb.Run, so_far: str, steers: Sequence[a2a.Message]
    ) -> a2a.StreamResponse:
        """The task as a stream starts with it: a succeeded run's whole answer, else the
        answer streamed so far (none: no artifact); a steer sent with the stream in its
        history."""
        task = await self._task(
            principal, run, answer=run.state == pb.RUN_STATE_SUCCEEDED, steers=steers
        )
        if run.state != pb.RUN_STATE_SUCCEEDED and so_far:
            task.artifacts.append(mapping.answer(so_far))
        return a2a.StreamResponse(task=task)

    async def _events(
        self,
        principal: Principal,
        update: pb.RunUpdate,
        after: mapping.Cursor,
        streamed: bool,
        now: a2a.TaskState,
    ) -> _Events:
        """The stream events of one run update after ``after``: each with its task state,
        None for a chunk. ``streamed``: the client holds part of the answer already;
        ``now``: the task's state as the stream last said it."""
        kind = update.WhichOneof("update")
        first: mapping.Cursor = (update.sequence, 0)
        run = update.run
        if kind == "delta" and update.delta.text and first > after:
            return [(mapping.chunk(run, update.delta.text, first, append=streamed), None)]
        if kind == "steer":
            return await self._steered(principal, update, after, now)
        if kind == "child_run":
            # A sub-task is progress, not output: a status update, never an artifact (a
            # client adds every artifact chunk to the answer).
            if first <= after:
                return []
            return [(mapping.child_event(run, update.child_run, now, first), now)]
        if kind != "state_change":
            return []
        changed = update.state_change.run
        events: _Events = []
        status_at = first
        if changed.state == pb.RUN_STATE_SUCCEEDED:
            status_at = (update.sequence, 1)
            if first > after:
                # The answer's last chunk: empty after streamed deltas, else all of it;
                # its files either way.
                text, files = await self._answer(principal, changed)
                chunk = mapping.chunk(
                    run, "" if streamed else text, first, append=streamed, last=True, files=files
                )
                events.append((chunk, None))
        if status_at > after:
            state = mapping.STATES.get(changed.state, a2a.TASK_STATE_UNSPECIFIED)
            events.append((mapping.status_event(changed, status_at), state))
        return events

    async def _steered(
        self,
        principal: Principal,
        update: pb.RunUpdate,
        after: mapping.Cursor,
        now: a2a.TaskState,
    ) -> _Events:
        """A steer's update: a status update in the task's state ``now``. A steer is input,
        not output, so not an artifact (a client adds every chunk of one to the answer).
        One that cut a model call (RESTART_STREAM) first replaces the answer with what was
        streamed before the cut (``append: false``): the cut call's chunks are void."""
        events: _Events = []
        first: mapping.Cursor = (update.sequence, 0)
        status_at = first
        cut = update.steer.discarded_from_sequence
        if cut:
            status_at = (update.sequence, 1)
            if first > after:
                kept = await self._kept(principal, update.run, cut, update.sequence)
                events.append((mapping.chunk(update.run, kept, first, append=False), None))
        if status_at > after:
            events.append((mapping.steer_event(update.run, update.steer, now, status_at), now))
        return events

    async def _kept(self, principal: Principal, run: str, cut: int, upto: int) -> str:
        """The answer streamed before sequence ``cut`` (read up to ``upto``)."""
        parts: list[str] = []
        async for update in self._runs.watch(principal, run, 0):
            if update is None or update.sequence >= upto:
                break
            if update.WhichOneof("update") == "delta" and update.sequence < cut:
                parts.append(update.delta.text)
        return "".join(parts)

    async def _answer(self, principal: Principal, run: pb.Run) -> tuple[str, _Parts]:
        """The answer's text and its files as A2A parts (small ones with their bytes)."""
        if not run.output_message:
            return "", []
        message = await self._texts.message(principal, run.output_message)
        contents: dict[str, bytes] = {}
        for name in mapping.inlined(message):
            try:
                contents[name] = await self._texts.read_file(
                    principal, name, mapping.MAX_INLINE_FILE_BYTES
                )
            except SwitchboardError:
                continue  # deleted meanwhile, or unreadable: named instead
        return mapping.text_of(message), mapping.file_parts(message, contents)

    async def _task(
        self,
        principal: Principal,
        run: pb.Run,
        *,
        history: int | None = None,
        artifacts: bool = True,
        answer: bool = True,
        steers: Sequence[a2a.Message] = (),
    ) -> a2a.Task:
        messages: list[a2a.Message] = []
        if history is None or history > 0:
            question = await self._texts.text(principal, run.input_message)
            messages = [mapping.user_message(run, question)] if question else []
            # A2A: history_length is how many of the most recent messages.
            messages = [*messages, *steers][-history if history else None :]
        text: str | None = None
        files: _Parts = []
        if answer and artifacts and run.state == pb.RUN_STATE_SUCCEEDED:
            text, files = await self._answer(principal, run)
        return mapping.task(run, "", text, files, history=messages)


def _rank(state: int) -> int:
    return _RANK.get(state, _FINAL_RANK)


async def _history(
    updates: AsyncIterator[pb.RunUpdate | None], seen: mapping.Cursor
) -> tuple[str, pb.RunUpdate | None]:
    """The answer streamed up to ``seen`` (a snapshot's sequence), read from ``updates``
    until they reach it, go quiet (a heartbeat) or end; and the first update past it,
    if that is what came. A model call a steer cut (RESTART_STREAM) streamed nothing of it."""
    parts: list[tuple[int, str]] = []

    def text() -> str:
        return "".join(part for _, part in parts)

    async for update in updates:
        if update is None:
            break
        if (update.sequence, 1) > seen:
            return text(), update
        kind = update.WhichOneof("update")
        if kind == "delta":
            parts.append((update.sequence, update.delta.text))
        elif kind == "steer" and update.steer.discarded_from_sequence:
            cut = update.steer.discarded_from_sequence
            parts = [(sequence, part) for sequence, part in parts if sequence < cut]
        if (update.sequence, 1) == seen:
            break
    return text(), None


async def _then(
    first: pb.RunUpdate | None, updates: AsyncIterator[pb.RunUpdate | None]
) -> AsyncIterator[pb.RunUpdate]:
    """``first`` (if any), then the rest of ``updates``, heartbeats left out."""
    if first is not None:
        yield first
    async for update in updates:
        if update is not None:
            yield update


class _WithHistory(Protocol):
    history_length: int

    def HasField(self, field_name: str) -> bool: ...


def _history_length(request: _WithHistory, field: str) -> int | None:
    """How many messages of history a task is answered with: None when not asked (all of
    it), else the number; a negative one is INVALID_PARAMS."""
    if not request.HasField("history_length"):
        return None
    if request.history_length < 0:
        description = "must not be negative"
        raise InvalidArgument(f"{field} {description}", [FieldViolation(field, description)])
    return request.history_length


def _page_size(request: a2a.ListTasksRequest) -> int:
    """ListTasks' page size: A2A's default when unset, else 1-100 (INVALID_PARAMS)."""
    if not request.HasField("page_size"):
        return DEFAULT_PAGE
    if not 1 <= request.page_size <= MAX_PAGE:
        description = f"must be between 1 and {MAX_PAGE}"
        raise InvalidArgument(
            f"page_size {description}", [FieldViolation("page_size", description)]
        )
    return request.page_size


def _steer_parts(request: a2a.SendMessageRequest) -> list[cpb.ContentPart]:
    """A steer's content (text and files, as a new message's), or INVALID_ARGUMENT for what
    a steer cannot take: the run keeps its own parameters and budgets."""
    parts = mapping.parts_in(request.message)
    if request.metadata.fields:
        description = (
            "must be empty on a message to a working task: it steers the task, which "
            "keeps its parameters"
        )
        raise InvalidArgument(f"metadata {description}", [FieldViolation("metadata", description)])
    if BUDGET_EXTENSION in request.message.metadata.fields:
        field = f"message.metadata[{BUDGET_EXTENSION!r}]"
        description = "is not taken by a message to a working task: it spends the task's budgets"
        raise InvalidArgument(f"{field} {description}", [FieldViolation(field, description)])
    return parts


def _acceptable(configuration: a2a.SendMessageConfiguration) -> None:
    """Refuse what a send asks for that this agent cannot give, rather than ignore it."""
    modes = configuration.accepted_output_modes
    if modes and not any(mode.split(";")[0].strip() in _TEXT_MODES for mode in modes):
        description = "must include text/plain: the answer is text (docs/a2a.md)"
        error = InvalidArgument(
            f"configuration.accepted_output_modes {description}",
            [FieldViolation("configuration.accepted_output_modes", description)],
        )
        error.foreign = errors.CONTENT_TYPE_NOT_SUPPORTED
        raise error


def card_of(
    assistant: pb.Assistant, interfaces: list[Interface], revision: int = 0
) -> a2a.AgentCard:
    """One assistant's Agent Card: its interfaces, its skills, the schemes it accepts;
    ``revision``: the revision its tenant pins (0: none, the current one answers)."""
    tenant = mapping.tenant_of(assistant.name, revision)
    skill = a2a.AgentSkill(
        id="answer",
        name=assistant.display_name or "answer",
        description=(assistant.description or assistant.display_name or "Answers")[:1000],
        tags=sorted({binding.integration.rsplit("/", 1)[-1] for binding in assistant.tools})
        or ["assistant"],
    )
    return agent_card(
        name=assistant.display_name or assistant.name,
        description=assistant.description or f"Switchboard assistant {assistant.name}",
        interfaces=[
            a2a.AgentInterface(
                url=interface.url,
                protocol_binding=interface.binding,
                tenant=tenant,
                protocol_version=interface.version,
            )
            for interface in interfaces
        ],
        skill=skill,
    )


def agent_card(
    *, name: str, description: str, interfaces: list[a2a.AgentInterface], skill: a2a.AgentSkill
) -> a2a.AgentCard:
    """What every card says, public or extended: what the protocol offers here and the
    credentials accepted (an access token or an API key, each alone enough)."""
    card = a2a.AgentCard(
        name=name,
        description=description,
        version="1",
        supported_interfaces=interfaces,
        capabilities=a2a.AgentCapabilities(
            streaming=True,
            push_notifications=True,
            extended_agent_card=True,
            extensions=[resume_extension(), budget_extension()],
        ),
        # What a message's parts may hold: text, and files the context service stores
        # (images go to vision models, documents and audio are read as text).
        default_input_modes=list(INPUT_MODES),
        default_output_modes=["text/plain"],
        skills=[skill],
    )
    card.provider.organization = "Switchboard"
    bearer = card.security_schemes["bearer"].http_auth_security_scheme
    bearer.scheme = "Bearer"
    bearer.bearer_format = "JWT"
    bearer.description = "A Switchboard access token (Authorization: Bearer <token>)"
    api_key = card.security_schemes["apiKey"].http_auth_security_scheme
    api_key.scheme = "Bearer"
    api_key.description = "A Switchboard API key (Authorization: Bearer sbk_...)"
    for scheme in ("bearer", "apiKey"):
        card.security_requirements.add().schemes[scheme].SetInParent()
    return card


def resume_extension() -> a2a.AgentExtension:
    """The resume extension as a card declares it (docs/a2a.md)."""
    extension = a2a.AgentExtension(
        uri=mapping.RESUME_EXTENSION,
        description=(
            "Resume a task's stream exactly: every streamed event carries the run's sequence "
            f"in metadata[{mapping.SEQUENCE_KEY!r}]; SubscribeToTask with the header "
            f"{mapping.AFTER_HEADER!r} set to the last one seen continues after it, once each, "
            "also after the task ended."
        ),
        required=False,
    )
    extension.params.update({"metadata_key": mapping.SEQUENCE_KEY, "header": mapping.AFTER_HEADER})
    return extension


def budget_extension() -> a2a.AgentExtension:
    """The budget extension as a card declares it (docs/a2a.md, "Budgets across hops")."""
    extension = a2a.AgentExtension(
        uri=BUDGET_EXTENSION,
        description=(
            "Hand the task a budget: the message's metadata under this URI holds "
            "{cost_micros, input_tokens, output_tokens, total_tokens} (non-negative integers, "
            "only the caps that apply); the run never spends more, and an ended task's "
            f"metadata[{USAGE_KEY!r}] reports input_tokens, output_tokens and cost_micros."
        ),
        required=False,
    )
    extension.params.update({"metadata_key": BUDGET_EXTENSION, "usage_key": USAGE_KEY})
    extension.params.update({"grpc_metadata": HEADER})
    return extension
