"""A2A's names for the errors its front door raises (``ErrorInfo`` domain ``a2a-protocol.org``).

A2A clients tell errors apart by an ``ErrorInfo`` in A2A's domain (the official
SDKs raise ``TaskNotFoundError``, ``TaskNotCancelableError`` ... from its
reason); Switchboard's clients by ours. So every error the A2A servicer raises
carries both (``platform/errors.ForeignReason``): ours says what went wrong in
Switchboard's terms where it was raised, A2A's is chosen here from the kind of
error and the method, in the A2A specification's table (section "Error
handling": its gRPC codes are the ones Switchboard's errors already have).

An A2A caller never sent a ``request_id`` or a ``conversation``: an error the
dispatcher or the context service raised about the request the front door made
for it is put back in the caller's terms (``in_a2a_terms``): its field violations
name the A2A request's fields, its message names tasks, contexts and agents by
their A2A ids, never by Switchboard's resource names.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Final

from switchboard.platform.errors import (
    BudgetExhausted,
    FailedPrecondition,
    FieldViolation,
    ForeignReason,
    InvalidArgument,
    ModelNotPriced,
    NotFound,
    RunEnded,
    SwitchboardError,
    field_root,
)
from switchboard.platform.values.resources import (
    AssistantName,
    BudgetName,
    ConversationName,
    RunName,
    WorkspaceName,
)

DOMAIN: Final = "a2a-protocol.org"
TASK_NOT_FOUND: Final = ForeignReason(DOMAIN, "TASK_NOT_FOUND")
TASK_NOT_CANCELABLE: Final = ForeignReason(DOMAIN, "TASK_NOT_CANCELABLE")
UNSUPPORTED_OPERATION: Final = ForeignReason(DOMAIN, "UNSUPPORTED_OPERATION")
CONTENT_TYPE_NOT_SUPPORTED: Final = ForeignReason(DOMAIN, "CONTENT_TYPE_NOT_SUPPORTED")
VERSION_NOT_SUPPORTED: Final = ForeignReason(DOMAIN, "VERSION_NOT_SUPPORTED")
INVALID_PARAMS: Final = ForeignReason(DOMAIN, "INVALID_PARAMS")

#: The call metadata naming the A2A version a client speaks (A2A: ``A2A-Version``).
VERSION_HEADER: Final = "a2a-version"
#: The versions served: A2A v1 (``lf.a2a.v1``). A client that names none is taken
#: to speak it too: the official SDKs' gRPC transports send no version.
VERSIONS: Final = frozenset({"1.0", "1"})
#: The most of a caller's id an error message repeats.
_ID_SHOWN: Final = 80


def check_version(value: str) -> None:
    if value.strip() and value.strip() not in VERSIONS:
        error = FailedPrecondition(
            f"A2A version {value.strip()[:16]!r} is not served; this agent speaks A2A 1.0",
            metadata={"supported": "1.0"},
        )
        error.foreign = VERSION_NOT_SUPPORTED
        raise error


def content_refused(violations: list[FieldViolation]) -> InvalidArgument:
    """A message with parts of a kind the agent does not take (data parts: it takes
    text and files)."""
    first = violations[0]
    error = InvalidArgument(f"{first.field} {first.description}", violations)
    error.foreign = CONTENT_TYPE_NOT_SUPPORTED
    return error


def task_not_found(task_id: str) -> NotFound:
    """The task a caller named does not exist for it: A2A's TASK_NOT_FOUND, also for an id
    that is not in this agent's format (no task has it)."""
    error = NotFound(f"task {task_id[:_ID_SHOWN]!r} not found")
    error.foreign = TASK_NOT_FOUND
    return error


def tagged(error: SwitchboardError, method: str, *, names_task: bool) -> SwitchboardError:
    """``error`` with A2A's reason for it, when A2A has one (the same object).

    ``names_task``: the request names an existing task (GetTask, a message on a
    task ...), so a NOT_FOUND is about that task. A NOT_FOUND about the agent or a
    context is ``INVALID_PARAMS``: A2A has no error for them, and without a reason
    of A2A's an HTTP+JSON client reads a 404 as "no such method".
    """
    if error.foreign is not None:
        return error
    if isinstance(error, InvalidArgument):
        error.foreign = INVALID_PARAMS
    elif isinstance(error, NotFound):
        error.foreign = TASK_NOT_FOUND if names_task else INVALID_PARAMS
    elif isinstance(error, RunEnded) and names_task:
        # A steer of a task that ended meanwhile (SteerRun): A2A's terminal-task refusal.
        error.foreign = UNSUPPORTED_OPERATION
    elif isinstance(error, FailedPrecondition) and names_task and not _about_spending(error):
        # A task that ended cannot be cancelled, subscribed to or continued.
        error.foreign = TASK_NOT_CANCELABLE if method == "CancelTask" else UNSUPPORTED_OPERATION
    return error


def _about_spending(error: SwitchboardError) -> bool:
    """A budget's refusal (RESOURCE_EXHAUSTED, BUDGET_EXHAUSTED) or an unpriced model under
    a cost cap (FAILED_PRECONDITION, MODEL_NOT_PRICED): A2A has no error of its own for
    either, so they keep only Switchboard's reason, as rate limits and quotas do; neither
    says anything about the task's state."""
    return isinstance(error, (BudgetExhausted, ModelNotPriced))


#: A file part's field as the front door filled it in (``mapping.parts_in``: one A2A
#: part, one Switchboard part), and the A2A part's field it came from.
_FILE_PART: Final = re.compile(r"(message\.parts\[\d+\])\.file(?:\.([a-z_]+))?")
_PART_FIELDS: Final = {
    "uri": "url",
    "inline_data": "raw",
    "mime_type": "media_type",
    "display_name": "filename",
}


def a2a_text(text: str) -> str:
    """``text`` with Switchboard's resource names (found wherever they stand in it)
    replaced by what A2A calls them: a run first, so that it is not read as its
    conversation, and a workspace last."""
    text = RunName.replace_in(text, lambda run: f"task {run.conversation}.{run.run}")
    text = ConversationName.replace_in(text, lambda found: f"context {found.conversation}")
    text = AssistantName.replace_in(
        text, lambda found: f"agent {found.workspace}.{found.assistant}"
    )
    text = BudgetName.replace_in(
        text, lambda found: f"budget {found.budget} of the agent's workspace {found.workspace}"
    )
    return WorkspaceName.replace_in(text, lambda found: f"the agent's workspace {found.workspace}")


def a2a_field(field: str, renames: Mapping[str, str], fields: Collection[str]) -> str:
    """``field`` as the A2A request names it: a Switchboard field the front door filled
    in from the caller's (``renames``: its root to the A2A path it came from) is named
    by that; a field of the A2A request (``fields``: its roots, and the call metadata
    the caller sent) stays; anything else the caller never sent is the request itself
    (""). A message's file part (``message.parts[1].file.uri``) is named by the A2A
    part's field it was made from (``message.parts[1].url``)."""
    part = _FILE_PART.fullmatch(field)
    if part is not None and "message" in fields:
        # A file part's field (a URL that cannot be fetched): the A2A part's.
        inner = _PART_FIELDS.get(part[2] or "")
        return f"{part[1]}.{inner}" if inner else part[1]
    head = field_root(field)
    if head in renames:
        target = renames[head]
        return target + field[len(head) :] if target else ""
    if field in fields or head in fields:
        return field
    return ""


def in_a2a_terms(
    error: SwitchboardError, renames: Mapping[str, str], fields: Collection[str]
) -> SwitchboardError:
    """``error`` as an A2A caller must read it: violations on the A2A request's fields,
    A2A's ids in the message. The same object unless a violation had to be renamed."""
    if isinstance(error, InvalidArgument) and error.violations:
        violations = [
            FieldViolation(a2a_field(v.field, renames, fields), a2a_text(v.description))
            for v in error.violations
        ]
        if violations != list(error.violations):
            first = violations[0]
            message = f"{first.field} {first.description}" if first.field else first.description
            # Of the same class: Switchboard's reason (DESTINATION_BLOCKED...) stays.
            renamed = type(error)(message, violations, metadata=error.metadata)
            renamed.foreign = error.foreign
            return renamed
    error.message = a2a_text(error.message)
    error.args = (error.message,)
    return error
