"""A2A's names for the errors its front door raises (``ErrorInfo`` domain ``a2a-protocol.org``).

A2A clients tell errors apart by an ``ErrorInfo`` in A2A's domain (the official
SDKs raise ``TaskNotFoundError``, ``TaskNotCancelableError`` ... from its
reason); Switchboard's clients by ours. So every error the A2A servicer raises
carries both (``platform/errors.ForeignReason``): ours says what went wrong in
Switchboard's terms where it was raised, A2A's is chosen here from the kind of
error and the method, in the A2A specification's table (section "Error
handling": its gRPC codes are the ones Switchboard's errors already have).
"""

from __future__ import annotations

from typing import Final

from switchboard.platform.errors import (
    FailedPrecondition,
    FieldViolation,
    ForeignReason,
    InvalidArgument,
    NotFound,
    SwitchboardError,
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


def check_version(value: str) -> None:
    if value.strip() and value.strip() not in VERSIONS:
        error = FailedPrecondition(
            f"A2A version {value.strip()[:16]!r} is not served; this agent speaks A2A 1.0",
            metadata={"supported": "1.0"},
        )
        error.foreign = VERSION_NOT_SUPPORTED
        raise error


def content_refused(violations: list[FieldViolation]) -> InvalidArgument:
    """A message with parts of a kind the agent does not take (only text is)."""
    first = violations[0]
    error = InvalidArgument(f"{first.field} {first.description}", violations)
    error.foreign = CONTENT_TYPE_NOT_SUPPORTED
    return error


def tagged(error: SwitchboardError, method: str, *, names_task: bool) -> SwitchboardError:
    """``error`` with A2A's reason for it, when A2A has one (the same object).

    ``names_task``: the request names an existing task (GetTask, a message on a
    task ...), so a NOT_FOUND is about that task.
    """
    if error.foreign is not None:
        return error
    if isinstance(error, InvalidArgument):
        error.foreign = INVALID_PARAMS
    elif isinstance(error, NotFound) and names_task:
        error.foreign = TASK_NOT_FOUND
    elif isinstance(error, FailedPrecondition) and names_task:
        # A task that ended cannot be cancelled, subscribed to or continued.
        error.foreign = TASK_NOT_CANCELABLE if method == "CancelTask" else UNSUPPORTED_OPERATION
    return error
