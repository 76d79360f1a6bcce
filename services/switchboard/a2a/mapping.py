"""A2A names and messages to and from Switchboard's: an agent is an assistant, a task
a run, a context a conversation (docs/a2a.md has the whole table).

A2A's HTTP binding puts ``tenant`` and a task's ``id`` in one path segment each
(``/{tenant}/tasks/{id}``), so neither may hold a ``/``:

- ``tenant`` is ``{workspace}.{assistant}``: the agent; ``{workspace}.{assistant}@{n}``
  is the same agent pinned at its revision ``n`` (docs/assistants.md, "Revisions");
- a ``context_id`` is the conversation's id in that workspace;
- a task ``id`` is ``{conversation}.{run}``.

Ids never hold a ``.`` (``names.ID``), so each splits one way. Each maps to a
resource name (``platform/values/resources.py``), and the name is what the policy
authorizes.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Final

from google.protobuf import struct_pb2, timestamp_pb2
from google.rpc import code_pb2

from a2a.types import a2a_pb2 as a2a
from switchboard.a2a import errors
from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.handlers.handed import (
    BUDGET_EXTENSION,
    USAGE_KEY,
    Handed,
    parse_extension,
    usage_value,
)
from switchboard.platform.errors import FieldViolation, InvalidArgument, Violations
from switchboard.platform.values import names, structs
from switchboard.platform.values.resources import (
    AssistantName,
    ConversationName,
    MessageName,
    RunName,
    WorkspaceName,
)
from switchboard.platform.values.wording import counted, noun

_ID: Final = names.ID
TENANT: Final = re.compile(
    rf"(?P<workspace>{_ID})\.(?P<assistant>{_ID})(?:@(?P<revision>[1-9][0-9]{{0,9}}))?"
)
TASK_ID: Final = re.compile(rf"(?P<conversation>{_ID})\.(?P<run>{_ID})")
CONTEXT_ID: Final = re.compile(_ID)
#: The artifact a run's answer streams into.
ANSWER_ARTIFACT: Final = "answer"
#: Metadata key carrying the run's sequence on streamed events (the resume extension).
SEQUENCE_KEY: Final = "switchboard.sequence"
#: Where a streamed event stands: the run update's sequence, and which of the update's
#: events it is. One update makes one event, except the one that ends a run well: the
#: answer's last chunk, then the final status, ``(N, 0)`` and ``(N, 1)``, written ``N``
#: and ``N.1``. Strictly increasing within a task, so "everything after the last one
#: held" is exact even between those two.
Cursor = tuple[int, int]
#: Nothing held yet: every update (run sequences start at 1).
START: Final[Cursor] = (0, 1)
_CURSOR: Final = re.compile(r"([0-9]{1,18})(\.1)?")
#: The resume extension (docs/a2a.md, "Resuming a stream"): a client that names it in
#: ``a2a-extensions`` and sends the last sequence it saw in ``AFTER_HEADER`` on
#: SubscribeToTask gets every event after that one, once, also for a task that ended.
RESUME_EXTENSION: Final = "https://switchboard.dev/a2a/extensions/resume/v1"
EXTENSIONS_HEADER: Final = "a2a-extensions"
AFTER_HEADER: Final = "switchboard-after-sequence"

STATES: Final = {
    pb.RUN_STATE_QUEUED: a2a.TASK_STATE_SUBMITTED,
    pb.RUN_STATE_RUNNING: a2a.TASK_STATE_WORKING,
    pb.RUN_STATE_REQUIRES_ACTION: a2a.TASK_STATE_INPUT_REQUIRED,
    pb.RUN_STATE_SUCCEEDED: a2a.TASK_STATE_COMPLETED,
    pb.RUN_STATE_FAILED: a2a.TASK_STATE_FAILED,
    pb.RUN_STATE_CANCELLED: a2a.TASK_STATE_CANCELED,
    # A run stopped at its deadline failed, as far as A2A can say.
    pb.RUN_STATE_DEADLINE_EXCEEDED: a2a.TASK_STATE_FAILED,
}
#: What ListTasks' ``status`` filter asks the run store for (failed: with the runs
#: stopped at their deadline, ``agents.list``).
RUN_STATES: Final = {
    task: run for run, task in STATES.items() if run != pb.RUN_STATE_DEADLINE_EXCEEDED
}


def _required(value: str, field: str) -> None:
    if not value:
        raise InvalidArgument(f"{field} is required", [FieldViolation(field, "is required")])


def agent(tenant: str) -> AssistantName:
    """The assistant ``tenant`` names (its workspace: ``.parent``), or INVALID_ARGUMENT.

    An empty tenant has been given the deployment's root agent, if it names one,
    before this (``servicer``)."""
    if not tenant:
        description = (
            "is required: name the agent as {workspace}.{assistant}, as its card's "
            "interface does (this deployment serves no agent without a tenant)"
        )
        raise InvalidArgument(f"tenant {description}", [FieldViolation("tenant", description)])
    found = _tenant(tenant)
    return AssistantName(found["workspace"], found["assistant"])


def pinned(tenant: str) -> int:
    """The revision ``tenant`` pins its agent at (``…@{n}``); 0 for none."""
    revision = _tenant(tenant)["revision"]
    return int(revision) if revision else 0


def _tenant(tenant: str) -> re.Match[str]:
    found = TENANT.fullmatch(tenant)
    if found is None or (found["revision"] and not names.is_revision(int(found["revision"]))):
        description = (
            "must be {workspace}.{assistant}, or {workspace}.{assistant}@{revision}, as "
            "the agent's card names it"
        )
        raise InvalidArgument(f"tenant {description}", [FieldViolation("tenant", description)])
    return found


def tenant_of(assistant: str, revision: int = 0) -> str:
    """The tenant of ``workspaces/{w}/assistants/{a}`` (pinned at ``revision`` if not 0)."""
    found = AssistantName.parse_or_none(assistant)
    if found is None:  # pragma: no cover - assistants' names come from the store
        raise ValueError(assistant)
    pin = f"@{revision}" if revision else ""
    return f"{found.workspace}.{found.assistant}{pin}"


def run_name(workspace: WorkspaceName, task_id: str, field: str = "id") -> RunName:
    """The run a task id names in ``workspace``; INVALID_ARGUMENT naming ``field`` when
    it is missing, TASK_NOT_FOUND when it is not this agent's kind of id (A2A: a task
    id that names no task is not found, whatever it looks like)."""
    _required(task_id, field)
    found = TASK_ID.fullmatch(task_id)
    if found is None:
        raise errors.task_not_found(task_id)
    return RunName(workspace.workspace, found["conversation"], found["run"])


#: The longest message id taken (A2A sets none; the id only keys a send's idempotency).
MAX_MESSAGE_ID: Final = 256
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")


def request_id(message_id: str, field: str = "message.message_id") -> str:
    """The dispatcher's ``request_id`` for an A2A message id: the id itself when it is
    one (1-64 letters, digits, '-' or '_': a UUID is), else a digest of it, so any id a
    client makes (A2A does not say what they look like) keys the send the same way.
    INVALID_ARGUMENT for none, one over ``MAX_MESSAGE_ID`` characters, or one with
    control characters."""
    if names.REQUEST_ID.fullmatch(message_id):
        return message_id
    if not message_id or len(message_id) > MAX_MESSAGE_ID or _CONTROL.search(message_id):
        description = f"must be 1-{MAX_MESSAGE_ID} characters, none a control character"
        raise InvalidArgument(f"{field} {description}", [FieldViolation(field, description)])
    return "a2a-" + hashlib.sha256(message_id.encode()).hexdigest()[:40]


def conversation_name(workspace: WorkspaceName, context_id: str, field: str) -> str:
    if not CONTEXT_ID.fullmatch(context_id):
        description = "is not a context id of this agent"
        raise InvalidArgument(f"{field} {description}", [FieldViolation(field, description)])
    return str(ConversationName(workspace.workspace, context_id))


def task_id(run: str) -> str:
    found = RunName.parse_or_none(run)
    if found is None:  # pragma: no cover - runs' names come from the dispatcher
        raise ValueError(run)
    return f"{found.conversation}.{found.run}"


def context_id(run: str) -> str:
    found = RunName.parse_or_none(run)
    if found is None:  # pragma: no cover
        raise ValueError(run)
    return found.conversation


def handed_in(message: a2a.Message, field: str = "message") -> Handed | None:
    """The budget a caller handed over in the message's metadata (the budget extension),
    if any; a malformed one is INVALID_ARGUMENT (A2A's invalid params)."""
    if BUDGET_EXTENSION not in message.metadata.fields:
        return None
    value = structs.message_dict(message.metadata.fields[BUDGET_EXTENSION])
    return parse_extension(value, f"{field}.metadata[{BUDGET_EXTENSION!r}]")


#: Characters of a part's ``filename`` kept as the file's display name.
MAX_FILENAME_CHARS: Final = 255
_SCHEMES: Final = ("http://", "https://")


def parts_in(message: a2a.Message, field: str = "message") -> list[cpb.ContentPart]:
    """The Switchboard content of an A2A user message, in order: text parts as text,
    file parts as file references the context service stores on append (``raw``
    bytes as ``inline_data``, a ``url`` fetched through its egress policy), each
    with the part's ``media_type`` and ``filename``. ``data`` parts are refused."""
    violations = Violations()
    if message.role not in (a2a.ROLE_USER, a2a.ROLE_UNSPECIFIED):
        violations.add(f"{field}.role", "must be ROLE_USER: the client speaks for the user")
    if not message.parts:
        violations.add(f"{field}.parts", "is required")
    parts: list[cpb.ContentPart] = []
    refused = False
    for index, part in enumerate(message.parts):
        at = f"{field}.parts[{index}]"
        kind = part.WhichOneof("content")
        if kind == "text":
            parts.append(cpb.ContentPart(text=part.text))
        elif kind == "raw":
            if not part.raw:
                violations.add(f"{at}.raw", "must not be empty")
                continue
            parts.append(cpb.ContentPart(file=_file(part, inline_data=part.raw)))
        elif kind == "url":
            if not part.url.lower().startswith(_SCHEMES):
                violations.add(f"{at}.url", "must be an http(s) URL")
                continue
            parts.append(cpb.ContentPart(file=_file(part, uri=part.url)))
        else:
            violations.add(at, "data parts are not accepted: text and files only (docs/a2a.md)")
            refused = True
    if refused:
        raise errors.content_refused(violations.items)
    violations.check()
    return parts


#: The most of a first message a new conversation's title takes.
MAX_TITLE_CHARS: Final = 80
_SPACE: Final = re.compile(r"\s+")


def title_of(parts: list[cpb.ContentPart]) -> str:
    """A new conversation's title, from the message that starts it: its text on one line,
    cut at a word within ``MAX_TITLE_CHARS``; for files alone, their names. Every
    conversation an A2A client started was titled "A2A", so a list of them told none apart."""
    text = _SPACE.sub(" ", " ".join(p.text for p in parts if p.WhichOneof("part") == "text"))
    text = text.strip()
    if not text:
        files = [p.file.display_name or p.file.mime_type for p in parts if p.HasField("file")]
        text = f"Files: {', '.join(f for f in files if f)}" if any(files) else ""
    if len(text) > MAX_TITLE_CHARS:
        cut = text[: MAX_TITLE_CHARS - 1]
        # At a word, unless the first word alone is that long.
        cut = cut.rsplit(" ", 1)[0] if " " in cut else cut
        text = f"{cut.rstrip(' ,;:.')}…"
    return text or "A2A message"


def _file(part: a2a.Part, **content: Any) -> cpb.FileReference:
    return cpb.FileReference(
        mime_type=part.media_type,
        display_name=part.filename[:MAX_FILENAME_CHARS],
        **content,
    )


def text_of(message: cpb.Message) -> str:
    return "".join(part.text for part in message.parts if part.WhichOneof("part") == "text")


def user_message(run: pb.Run, text: str) -> a2a.Message:
    return a2a.Message(
        message_id=run.input_message.rsplit("/", 1)[-1],
        context_id=context_id(run.name),
        task_id=task_id(run.name),
        role=a2a.ROLE_USER,
        parts=[a2a.Part(text=text)],
    )


#: Where a steer's message (history) and status events say which run took the message
#: as its own task when the steered task ended first (docs/a2a.md, "Steering a working task").
STEER_KEY: Final = "switchboard.steer"
#: A message's metadata keys that branch its context (docs/a2a.md, "Branches"): an edit of
#: an earlier message (its messageId), or a new answer to what a task answered (its id).
REPLACES_KEY: Final = "switchboard.replaces"
REGENERATE_KEY: Final = "switchboard.regenerate"


@dataclass(frozen=True)
class Branching:
    """What a message's metadata asks of its context's branches: ``replaces`` the name of
    the message it edits, ``regenerate`` the run (task) to answer again; "" for none."""

    replaces: str = ""
    regenerate: str = ""


def branching_in(message: a2a.Message, workspace: WorkspaceName, conversation: str) -> Branching:
    """The edit or regeneration ``message`` asks for, checked: a message id or task id
    of the message's own context (INVALID_ARGUMENT naming the metadata key otherwise)."""
    fields = message.metadata.fields
    if REPLACES_KEY not in fields and REGENERATE_KEY not in fields:
        return Branching()
    asked = [key for key in (REPLACES_KEY, REGENERATE_KEY) if key in fields]
    if len(asked) > 1 or not message.context_id:
        text = "needs message.context_id, and only one of them may be set"
        violations = [FieldViolation(f"message.metadata[{key!r}]", text) for key in asked]
        raise InvalidArgument(violations[0].field + " " + text, violations)
    key = asked[0]
    field = f"message.metadata[{key!r}]"
    value = fields[key]
    text = value.string_value if value.WhichOneof("kind") == "string_value" else ""
    if key == REPLACES_KEY:
        name = MessageName.parse_or_none(f"{conversation}/messages/{text}")
        if not text or name is None:
            raise InvalidArgument(
                f"{field} must be the messageId of a message of this context",
                [FieldViolation(field, "must be the messageId of a message of this context")],
            )
        return Branching(replaces=str(name))
    found = TASK_ID.fullmatch(text)
    if found is None or found["conversation"] != message.context_id:
        raise InvalidArgument(
            f"{field} must be the id of a task of this context",
            [FieldViolation(field, "must be the id of a task of this context")],
        )
    return Branching(
        regenerate=str(RunName(workspace.workspace, found["conversation"], found["run"]))
    )


_STEER_STATES: Final = {
    pb.STEER_STATE_ACCEPTED: "accepted",
    pb.STEER_STATE_CONSUMED: "consumed",
    pb.STEER_STATE_REQUEUED: "requeued",
}


def steer_message(target: str, message: cpb.Message, steer_run: str) -> a2a.Message:
    """A steer as the steered task's history holds it: the user's message on that task,
    its ``metadata["switchboard.steer"]`` naming the steer's own task (which answers it
    if the steered task ends before taking it)."""
    found = a2a.Message(
        message_id=message.name.rsplit("/", 1)[-1],
        context_id=context_id(target),
        task_id=task_id(target),
        role=a2a.ROLE_USER,
        parts=[a2a.Part(text=text_of(message))],
    )
    found.metadata.update({STEER_KEY: {"task_id": task_id(steer_run)}})
    return found


def child_event(
    parent: str, child: pb.ChildRun, state: a2a.TaskState, cursor: Cursor
) -> a2a.StreamResponse:
    """A sub-task of ``parent`` (a delegate's child run) started, paused or ended, as a
    status update that keeps the parent task's ``state``: its message (role agent) says
    which assistant was asked and how it stands, in a text part and a data part
    ``{"subtask": {...}}`` naming the child's own task (docs/a2a.md, "Sub-tasks")."""
    what = pb.RunState.Name(child.state).removeprefix("RUN_STATE_").lower()
    asked = (child.assistant or child.handler).rsplit("/", 1)[-1]
    child_task = task_id(child.run)
    text = f"Sub-task {child_task}: asked {asked}, {what}."
    if child.HasField("error") and child.error.message:
        text = f"Sub-task {child_task}: asked {asked}, {what} ({child.error.message})."
    details: dict[str, Any] = {
        "task_id": child_task,
        "context_id": context_id(child.run),
        "assistant": child.assistant,
        "tool_call_id": child.tool_call_id,
        "state": what,
    }
    if child.handler:
        details["handler"] = child.handler
    if child.parent and child.parent != parent:
        # A grandchild or further down: the sub-task that asked it.
        details["parent_task_id"] = task_id(child.parent)
    if child.HasField("usage"):
        details["output_tokens"] = child.usage.output_tokens
    data = struct_pb2.Value()
    data.struct_value.update({"subtask": details})
    status_ = a2a.TaskStatus(
        state=state,
        message=a2a.Message(
            message_id=f"{task_id(parent)}.subtask.{child_task}.{what}",
            context_id=context_id(parent),
            task_id=task_id(parent),
            role=a2a.ROLE_AGENT,
            parts=[a2a.Part(text=text), a2a.Part(data=data, media_type="application/json")],
        ),
    )
    return a2a.StreamResponse(
        status_update=a2a.TaskStatusUpdateEvent(
            task_id=task_id(parent),
            context_id=context_id(parent),
            status=status_,
            metadata=sequenced(cursor),
        )
    )


def steer_event(
    target: str, steer: pb.SteerUpdate, state: a2a.TaskState, cursor: Cursor
) -> a2a.StreamResponse:
    """A steer of ``target`` accepted, consumed or requeued, as a status update that keeps
    the task's ``state``: its message (role agent) says what became of the steer in a text
    part and a data part ``{"steer": {...}}``."""
    what = _STEER_STATES.get(steer.state, "unspecified")
    steer_task = task_id(steer.steer_run) if steer.steer_run else ""
    message_id = steer.message.rsplit("/", 1)[-1]
    if steer.state == pb.STEER_STATE_CONSUMED:
        text = f"Steer {message_id} consumed: the model read it before step {steer.step}."
    elif steer.state == pb.STEER_STATE_REQUEUED:
        text = (
            f"Steer {message_id} requeued: the task ended before taking it; "
            f"task {steer_task} answers it."
        )
    else:
        text = f"Steer {message_id} accepted: the task takes it before its next model call."
    details: dict[str, Any] = {"message_id": message_id, "state": what, "task_id": steer_task}
    if steer.state == pb.STEER_STATE_CONSUMED:
        details["step"] = steer.step
    if steer.discarded_from_sequence:
        details["discarded_from_sequence"] = str(steer.discarded_from_sequence)
    data = struct_pb2.Value()
    data.struct_value.update({"steer": details})
    status_ = a2a.TaskStatus(
        state=state,
        message=a2a.Message(
            message_id=f"{task_id(target)}.steer.{message_id}.{what}",
            context_id=context_id(target),
            task_id=task_id(target),
            role=a2a.ROLE_AGENT,
            parts=[a2a.Part(text=text), a2a.Part(data=data, media_type="application/json")],
        ),
    )
    return a2a.StreamResponse(
        status_update=a2a.TaskStatusUpdateEvent(
            task_id=task_id(target),
            context_id=context_id(target),
            status=status_,
            metadata=sequenced(cursor),
        )
    )


def status_time(run: pb.Run) -> timestamp_pb2.Timestamp:
    """When the task's status last changed: the run's end, else its start, else its creation."""
    if run.HasField("end_time"):
        return run.end_time
    return run.start_time if run.HasField("start_time") else run.create_time


def status(run: pb.Run) -> a2a.TaskStatus:
    """The task's status: its state, when it last changed, and why for a failed run."""
    found = a2a.TaskStatus(state=STATES.get(run.state, a2a.TASK_STATE_UNSPECIFIED))
    found.timestamp.CopyFrom(status_time(run))
    if run.state == pb.RUN_STATE_REQUIRES_ACTION:
        if run.required_action.HasField("budget"):
            found.message.CopyFrom(budget_request(run))
        else:
            found.message.CopyFrom(approval_request(run))
    elif (
        run.state in (pb.RUN_STATE_FAILED, pb.RUN_STATE_CANCELLED, pb.RUN_STATE_DEADLINE_EXCEEDED)
        and run.error.code
    ):
        found.message.CopyFrom(
            a2a.Message(
                message_id=f"{task_id(run.name)}.status",
                context_id=context_id(run.name),
                task_id=task_id(run.name),
                role=a2a.ROLE_AGENT,
                parts=[a2a.Part(text=f"{code_pb2.Code.Name(run.error.code)}: {run.error.message}")],
            )
        )
    return found


#: A file of the answer at most this large goes in the artifact as its bytes (``raw``)...
MAX_INLINE_FILE_BYTES: Final = 1024 * 1024
#: ... while the answer's inlined files stay within this, all together; any other file
#: is named (``file_reference``).
MAX_INLINE_FILES_BYTES: Final = 4 * 1024 * 1024
#: The data part that names a stored file instead of carrying it.
FILE_REFERENCE_KEY: Final = "file_reference"


def inlined(message: cpb.Message) -> list[str]:
    """The stored files of ``message`` whose bytes go in its artifact, in order: each
    within ``MAX_INLINE_FILE_BYTES``, all within ``MAX_INLINE_FILES_BYTES``."""
    chosen: list[str] = []
    total = 0
    for part in message.parts:
        found = part.file if part.WhichOneof("part") == "file" else None
        if found is None or not found.file or not 0 < found.size_bytes <= MAX_INLINE_FILE_BYTES:
            continue
        if total + found.size_bytes > MAX_INLINE_FILES_BYTES:
            break
        total += found.size_bytes
        chosen.append(found.file)
    return chosen


def file_parts(message: cpb.Message, contents: dict[str, bytes]) -> list[a2a.Part]:
    """A2A file parts of ``message``'s files: the bytes (``raw``) of those in
    ``contents``, a URL a file came from and was not stored from, and a data part
    ``{"file_reference": {...}}`` naming any other stored file (read it with the
    context service's DownloadFile; A2A has no URL for it)."""
    parts: list[a2a.Part] = []
    for part in message.parts:
        if part.WhichOneof("part") != "file":
            continue
        found = part.file
        kind, name = found.mime_type, found.display_name
        if found.file in contents:
            parts.append(a2a.Part(raw=contents[found.file], media_type=kind, filename=name))
        elif found.inline_data:
            parts.append(a2a.Part(raw=found.inline_data, media_type=kind, filename=name))
        elif found.file:
            data = struct_pb2.Value()
            data.struct_value.update(
                {
                    FILE_REFERENCE_KEY: {
                        "name": found.file,
                        "media_type": kind,
                        "size_bytes": found.size_bytes,
                        "filename": name,
                    }
                }
            )
            parts.append(a2a.Part(data=data, media_type="application/json", filename=name))
        elif found.uri:
            parts.append(a2a.Part(url=found.uri, media_type=kind, filename=name))
    return parts


def answer(text: str, files: list[a2a.Part] | None = None) -> a2a.Artifact:
    """The run's answer (or a chunk of it) as the task's one artifact: its text, then
    its files."""
    return a2a.Artifact(
        artifact_id=ANSWER_ARTIFACT, name="answer", parts=[a2a.Part(text=text), *(files or [])]
    )


def chunk(
    run: str,
    text: str,
    cursor: Cursor,
    *,
    append: bool,
    last: bool = False,
    files: list[a2a.Part] | None = None,
) -> a2a.StreamResponse:
    """A streamed piece of ``run``'s answer, with its cursor (the last one with the
    answer's files)."""
    return a2a.StreamResponse(
        artifact_update=a2a.TaskArtifactUpdateEvent(
            task_id=task_id(run),
            context_id=context_id(run),
            artifact=answer(text, files),
            append=append,
            last_chunk=last,
            metadata=sequenced(cursor),
        )
    )


def status_event(run: pb.Run, cursor: Cursor) -> a2a.StreamResponse:
    """A streamed state change of ``run``, with its cursor (and, once it ended, its usage)."""
    event = a2a.StreamResponse(
        status_update=a2a.TaskStatusUpdateEvent(
            task_id=task_id(run.name),
            context_id=context_id(run.name),
            status=status(run),
            metadata=sequenced(cursor),
        )
    )
    with_usage(event.status_update.metadata, run)
    return event


def task(
    run: pb.Run,
    question: str,
    answer_text: str | None,
    files: list[a2a.Part] | None = None,
    *,
    history: list[a2a.Message] | None = None,
) -> a2a.Task:
    """The task of ``run``; ``answer_text`` None while it has no answer yet; ``history``
    (when given) instead of the question alone."""
    found = a2a.Task(
        id=task_id(run.name),
        context_id=context_id(run.name),
        status=status(run),
        history=history
        if history is not None
        else [user_message(run, question)]
        if question
        else [],
    )
    if answer_text is not None:
        found.artifacts.append(answer(answer_text, files))
    found.metadata.update({"run": run.name, "assistant": run.assistant})
    with_usage(found.metadata, run)
    return found


def with_usage(metadata: struct_pb2.Struct, run: pb.Run) -> None:
    """An ended run's usage in ``metadata["usage"]`` (docs/a2a.md, "Budgets across
    hops"): what a caller that handed this run a budget charges to its own run."""
    usage = run.usage
    ended = run.state in (
        pb.RUN_STATE_SUCCEEDED,
        pb.RUN_STATE_FAILED,
        pb.RUN_STATE_CANCELLED,
        pb.RUN_STATE_DEADLINE_EXCEEDED,
    )
    if ended and (usage.cost_micros or usage.input_tokens or usage.output_tokens):
        value: dict[str, int] = usage_value(
            usage.cost_micros, usage.input_tokens, usage.output_tokens
        )
        if usage.unpriced_calls:
            # The caller's run says its cost leaves these out (Usage.unpriced_calls).
            value["unpriced_calls"] = usage.unpriced_calls
        metadata.update({USAGE_KEY: value})


def cursor_text(cursor: Cursor) -> str:
    sequence, part = cursor
    return f"{sequence}.{part}" if part else str(sequence)


def parse_cursor(text: str) -> Cursor | None:
    """``N`` or ``N.1`` (``cursor_text``), else None."""
    found = _CURSOR.fullmatch(text)
    if found is None:
        return None
    return int(found[1]), 1 if found[2] else 0


def sequenced(cursor: Cursor) -> struct_pb2.Struct:
    found = struct_pb2.Struct()
    found.update({SEQUENCE_KEY: cursor_text(cursor)})
    return found


#: What a client answers an input-required task with (docs/a2a.md, "Approvals").
APPROVALS_KEY: Final = "approvals"
DECISIONS: Final = {
    "approve": pb.TOOL_APPROVAL_DECISION_APPROVE,
    "deny": pb.TOOL_APPROVAL_DECISION_DENY,
    # For a call whose outcome a crash left unknown (docs/dispatcher.md, "Durable runs").
    "retry": pb.TOOL_APPROVAL_DECISION_RETRY,
    "complete": pb.TOOL_APPROVAL_DECISION_COMPLETE,
    "fail_run": pb.TOOL_APPROVAL_DECISION_FAIL_RUN,
}
MAX_REASON_CHARS: Final = 1000


def budget_request(run: pb.Run) -> a2a.Message:
    """An input-required task that waits for room in its budgets: what it asks, and
    that an owner of the agent's workspace decides (not the caller's reply)."""
    action = run.required_action
    budget = action.budget
    data = struct_pb2.Value()
    data.struct_value.update(
        {
            "budget_action": {
                "budgets": [errors.a2a_text(name) for name in budget.budgets],
                "cost_micros": budget.cost_micros,
                "input_tokens": budget.input_tokens,
                "output_tokens": budget.output_tokens,
                "expire_time": action.expire_time.ToJsonString(),
            }
        }
    )
    return a2a.Message(
        message_id=f"{task_id(run.name)}.budget",
        context_id=context_id(run.name),
        task_id=task_id(run.name),
        role=a2a.ROLE_AGENT,
        parts=[
            a2a.Part(
                text=(
                    "The task's next step does not fit in its budgets. It goes on when an "
                    "owner of the agent's workspace raises a cap or allows the step, and "
                    "fails with BUDGET_EXHAUSTED at expire_time otherwise."
                )
            ),
            a2a.Part(data=data, media_type="application/json"),
        ],
    )


def approval_request(run: pb.Run) -> a2a.Message:
    """An input-required task's status message: the calls waiting for a decision."""
    pending: list[Any] = [
        {
            "tool_call_id": waiting.call.id,
            "tool": f"{waiting.call.integration}/tools/{waiting.call.tool}",
            # A model's or an expert's arguments: any NaN stored before they were
            # refused is null here, so the task and its push body can be written.
            "arguments": structs.message_dict(waiting.call.arguments),
            "outcome_unknown": waiting.outcome_unknown,
        }
        for waiting in run.required_action.tool_calls
        if waiting.decision == pb.TOOL_APPROVAL_DECISION_UNSPECIFIED
    ]
    data = struct_pb2.Value()
    data.struct_value.update({"pending_tool_calls": pending})
    return a2a.Message(
        message_id=f"{task_id(run.name)}.approval",
        context_id=context_id(run.name),
        task_id=task_id(run.name),
        role=a2a.ROLE_AGENT,
        parts=[
            a2a.Part(
                text=(
                    f"{counted(len(pending), 'tool call')} "
                    f"{noun(len(pending), 'waits', 'wait')} for a person's decision. "
                    "Reply on this "
                    'task with a data part {"approvals": [{"tool_call_id": ..., "decision": '
                    '"approve" or "deny", "reason": ...}]}; a call with "outcome_unknown" '
                    'was in flight when the server stopped: decide it "retry", "fail_run" '
                    'or "complete" with "result_text", what it returned.'
                )
            ),
            a2a.Part(data=data, media_type="application/json"),
        ],
    )


def approvals_in(message: a2a.Message, run: str) -> pb.SubmitToolApprovalsRequest:
    """The decisions a message on an input-required task carries, or INVALID_ARGUMENT."""
    field = "message.parts"
    found = [
        (index, part)
        for index, part in enumerate(message.parts)
        if part.WhichOneof("content") == "data"
    ]
    if len(found) != 1 or found[0][1].data.WhichOneof("kind") != "struct_value":
        description = 'must hold one data part, {"approvals": [...]}, to continue a task'
        raise InvalidArgument(f"{field} {description}", [FieldViolation(field, description)])
    index, part = found[0]
    given = structs.message_dict(part.data.struct_value).get(APPROVALS_KEY)
    where = f"{field}[{index}].data.{APPROVALS_KEY}"
    if not isinstance(given, list) or not given:
        description = "must be a non-empty list of decisions"
        raise InvalidArgument(f"{where} {description}", [FieldViolation(where, description)])
    request = pb.SubmitToolApprovalsRequest(name=run)
    violations = Violations()
    for position, item in enumerate(given):
        at = f"{where}[{position}]"
        if not isinstance(item, dict):
            violations.add(at, "must be an object")
            continue
        call_id, decision, reason, result_text = (
            item.get("tool_call_id"),
            item.get("decision"),
            item.get("reason", ""),
            item.get("result_text", ""),
        )
        if not isinstance(call_id, str) or not call_id:
            violations.add(f"{at}.tool_call_id", "is required")
        if not isinstance(decision, str) or decision.lower() not in DECISIONS:
            violations.add(
                f"{at}.decision",
                'must be "approve" or "deny" ("retry", "complete" or "fail_run" for a call '
                "whose outcome is unknown)",
            )
        if not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS:
            violations.add(f"{at}.reason", f"must be text of at most {MAX_REASON_CHARS} characters")
        if not isinstance(result_text, str):
            violations.add(f"{at}.result_text", "must be text")
        if violations.items:
            continue
        request.approvals.add(
            tool_call_id=str(call_id),
            decision=DECISIONS[str(decision).lower()],
            reason=str(reason),
            result_text=str(result_text),
        )
    violations.check()
    return request
