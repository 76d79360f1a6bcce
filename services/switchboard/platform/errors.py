"""The one root exception of the mesh and its typed subclasses.

Domain code raises these; it never imports grpc. One interceptor
(``switchboard.platform.rpc.interceptors``) maps each to a ``google.rpc.Status``
with an ``ErrorInfo`` (reason from ``switchboard.api.common.v1.ErrorReason``)
and, where relevant, ``BadRequest``, ``RetryInfo`` or ``QuotaFailure`` details.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

ERROR_DOMAIN = "switchboard.dev"


@dataclass(frozen=True)
class ForeignReason:
    """The reason a protocol that is not ours names an error by (A2A's ``TASK_NOT_FOUND``).

    A front door for another protocol's clients (``switchboard/a2a``) tags the
    errors it raises with it, so those clients' SDKs recognize them; the status
    carries it as a second ``ErrorInfo`` in that protocol's domain, next to ours.
    """

    domain: str
    reason: str


class Code(enum.IntEnum):
    """Canonical status codes (google.rpc.Code), without depending on grpc."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


@dataclass(frozen=True)
class FieldViolation:
    """One invalid field: its path (``workspace.display_name``) and what is wrong."""

    field: str
    description: str


_FIELD_ROOT: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def field_root(path: str) -> str:
    """The request's own field a violation's ``path`` starts with (``message`` of
    ``message.parts[0].data``); "" when it names none."""
    root = _FIELD_ROOT.match(path)
    return root[0] if root else ""


class SwitchboardError(Exception):
    """Root of every error a client may see. Its message is shown to the client."""

    code: Code = Code.INTERNAL
    reason: str = "ERROR_REASON_INTERNAL"
    #: The same error in another protocol's words, when a front door for it raised it.
    foreign: ForeignReason | None = None

    def __init__(self, message: str, *, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})


class FieldError(SwitchboardError):
    """An error about fields of the request, which it names: its ``violations`` go out
    as the status's ``BadRequest`` (InvalidArgument, OutOfRange)."""

    def __init__(
        self,
        message: str,
        violations: Sequence[FieldViolation] = (),
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, metadata=metadata)
        self.violations = tuple(violations)


class InvalidArgument(FieldError):
    """The request is malformed; lists every offending field."""

    code = Code.INVALID_ARGUMENT
    reason = "ERROR_REASON_INVALID_ARGUMENT"


class Violations:
    """Collects every invalid field of a request, then raises once (``check``)."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.items.append(FieldViolation(field, description))

    def check(self) -> None:
        if self.items:
            first = self.items[0]
            raise InvalidArgument(f"{first.field} {first.description}", self.items)


class Unauthenticated(SwitchboardError):
    """No credentials, or credentials that do not verify."""

    code = Code.UNAUTHENTICATED
    reason = "ERROR_REASON_UNAUTHENTICATED"


class TokenExpired(Unauthenticated):
    """The access token has expired."""

    reason = "ERROR_REASON_TOKEN_EXPIRED"


class SessionRevoked(Unauthenticated):
    """The session behind the credentials was revoked."""

    reason = "ERROR_REASON_SESSION_REVOKED"


class PermissionDenied(SwitchboardError):
    """Authenticated, but not allowed to do this."""

    code = Code.PERMISSION_DENIED
    reason = "ERROR_REASON_PERMISSION_DENIED"


class NotFound(SwitchboardError):
    """The resource does not exist or the caller may not know it exists."""

    code = Code.NOT_FOUND
    reason = "ERROR_REASON_NOT_FOUND"


class AlreadyExists(SwitchboardError):
    """A resource with this identity exists."""

    code = Code.ALREADY_EXISTS
    reason = "ERROR_REASON_ALREADY_EXISTS"


class Conflict(AlreadyExists):
    """A unique key was taken by a concurrent writer; retrying may succeed."""


class EtagMismatch(SwitchboardError):
    """Optimistic concurrency failed: the caller's etag is stale."""

    code = Code.ABORTED
    reason = "ERROR_REASON_ETAG_MISMATCH"


class FailedPrecondition(SwitchboardError):
    """The resource is not in a state that allows the action."""

    code = Code.FAILED_PRECONDITION
    reason = "ERROR_REASON_FAILED_PRECONDITION"


class RateLimited(SwitchboardError):
    """Too many requests; retry after ``retry_after_s``."""

    code = Code.RESOURCE_EXHAUSTED
    reason = "ERROR_REASON_RATE_LIMITED"

    def __init__(
        self, message: str, *, retry_after_s: float, metadata: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message, metadata=metadata)
        self.retry_after_s = retry_after_s


class QuotaExceeded(SwitchboardError):
    """A size, count or concurrency limit was hit; ``subject`` names the limit
    (``subjects`` several, each with what is wrong: one QuotaFailure violation
    each). With ``retry_after_s`` the status carries RetryInfo too."""

    code = Code.RESOURCE_EXHAUSTED
    reason = "ERROR_REASON_QUOTA_EXCEEDED"

    def __init__(
        self,
        message: str,
        *,
        subject: str,
        subjects: Sequence[tuple[str, str]] = (),
        retry_after_s: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, metadata=metadata)
        self.subject = subject
        self.subjects = tuple(subjects) or ((subject, message),)
        self.retry_after_s = retry_after_s


class BudgetExhausted(QuotaExceeded):
    """A budget that applies has no room: one QuotaFailure violation per budget
    (its name), metadata ``reset_time`` when the earliest of them resets."""

    reason = "ERROR_REASON_BUDGET_EXHAUSTED"


class PortsExhausted(QuotaExceeded):
    """Every port of a configured range is in use (the WebRTC media ports): a peer
    answered now would have no candidate to be reached at."""


class ModelNotPriced(FailedPrecondition):
    """A cost budget applies and the model has no price: its cost cannot be reserved."""

    reason = "ERROR_REASON_MODEL_NOT_PRICED"


class UploadOffsetMismatch(FailedPrecondition):
    """An upload step's offset is not the committed size; metadata ``committed_size``
    says where the client continues."""

    reason = "ERROR_REASON_UPLOAD_OFFSET_MISMATCH"


class UploadExpired(FailedPrecondition):
    """A resumable upload was abandoned past its expiry and discarded."""

    reason = "ERROR_REASON_UPLOAD_EXPIRED"


class ChecksumMismatch(InvalidArgument):
    """The bytes received do not have the SHA-256 the client gave; nothing is stored."""

    reason = "ERROR_REASON_CHECKSUM_MISMATCH"


class MediaTypeMismatch(InvalidArgument):
    """The content's sniffed media type contradicts the declared one; metadata
    ``detected_media_type``."""

    reason = "ERROR_REASON_MEDIA_TYPE_MISMATCH"


class ModalityUnsupported(FailedPrecondition):
    """The model cannot take a kind of content the window holds (an image for a
    model without vision); metadata ``media_type`` and ``model``."""

    reason = "ERROR_REASON_MODALITY_UNSUPPORTED"


class SpeechNotConfigured(FailedPrecondition):
    """Speech was asked of an assistant without ``voice`` settings, or of a server
    without an audio endpoint; metadata ``assistant`` when it is the assistant's."""

    reason = "ERROR_REASON_SPEECH_NOT_CONFIGURED"


class SessionEnded(FailedPrecondition):
    """A voice session has ended or is past its resume window."""

    reason = "ERROR_REASON_SESSION_ENDED"


class SpeechRefused(FailedPrecondition):
    """The speech recognition or synthesis endpoint refused the request (the audio,
    the model or the voice); retrying it as it is will not help."""

    reason = "ERROR_REASON_SPEECH_REFUSED"


class RequestTooLarge(SwitchboardError):
    """A field or message exceeds a documented size limit."""

    code = Code.RESOURCE_EXHAUSTED
    reason = "ERROR_REASON_REQUEST_TOO_LARGE"


class SubscriberTooSlow(SwitchboardError):
    """A subscriber overflowed its buffer; metadata names the cursor to resume from."""

    code = Code.RESOURCE_EXHAUSTED
    reason = "ERROR_REASON_SUBSCRIBER_TOO_SLOW"


class CircuitOpen(SwitchboardError):
    """A remote integration's circuit breaker is open; a trial call is allowed
    after ``retry_after_s`` (sent as RetryInfo)."""

    code = Code.UNAVAILABLE
    reason = "ERROR_REASON_CIRCUIT_OPEN"

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float = 1.0,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, metadata=metadata)
        self.retry_after_s = retry_after_s


class DestinationBlocked(InvalidArgument):
    """An outbound address the egress policy refuses (SSRF): loopback, private,
    link-local or metadata addresses, unless the operator allows them."""

    reason = "ERROR_REASON_DESTINATION_BLOCKED"


class ResultTooLarge(SwitchboardError):
    """A tool's result exceeded the size limit; none of it is returned."""

    code = Code.RESOURCE_EXHAUSTED
    reason = "ERROR_REASON_RESULT_TOO_LARGE"


class RunCancelled(SwitchboardError):
    """The run was cancelled before it completed."""

    code = Code.CANCELLED
    reason = "ERROR_REASON_RUN_CANCELLED"


class OutOfRange(FieldError):
    """A position or count past the end of what it reads (a download's ``read_offset``
    beyond the file's size): the request is well formed, the thing is shorter (AIP-193).
    Like InvalidArgument it names the field (``BadRequest``)."""

    code = Code.OUT_OF_RANGE
    reason = "ERROR_REASON_OUT_OF_RANGE"


class CursorExpired(SwitchboardError):
    """An event cursor is older than retention; metadata names the oldest cursor."""

    code = Code.OUT_OF_RANGE
    reason = "ERROR_REASON_CURSOR_EXPIRED"


class CursorAhead(SwitchboardError):
    """An event cursor is ahead of the log (another deployment's, or the log was reset):
    nothing was lost, so it is not CURSOR_EXPIRED; metadata names both ends."""

    code = Code.OUT_OF_RANGE
    reason = "ERROR_REASON_CURSOR_AHEAD"


class DependencyUnavailable(SwitchboardError):
    """A dependency is down; the caller should retry with backoff."""

    code = Code.UNAVAILABLE
    reason = "ERROR_REASON_DEPENDENCY_UNAVAILABLE"
    #: The first retry delay suggested to clients (RetryInfo).
    retry_after_s: float = 1.0


class DatabaseUnavailable(DependencyUnavailable):
    """The database cannot do this now (down, restarting, locked, overloaded).

    Raised for what ``switchboard.platform.store.db.is_outage`` recognises.
    """

    def __init__(
        self,
        message: str = "the database is unavailable; retry",
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, metadata=metadata)


class ResolutionFailed(DependencyUnavailable):
    """An outbound host name did not resolve (unknown name, DNS failure or timeout).

    Raised by ``switchboard.platform.security.egress``; names only the host the user gave.
    """


class SecretUnreadable(FailedPrecondition):
    """A sealed credential does not open (``platform.security.credentials.secretbox``): the
    server secret changed or the stored value is damaged. Never carries the content."""

    def __init__(
        self,
        message: str = (
            "a stored credential cannot be read (the server secret changed or the stored "
            "value is damaged); set the credential again"
        ),
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, metadata=metadata)


class ServerUnavailable(SwitchboardError):
    """This server is shutting down or not ready."""

    code = Code.UNAVAILABLE
    reason = "ERROR_REASON_UNAVAILABLE"


class DeadlineExceeded(SwitchboardError):
    """The operation ran out of time."""

    code = Code.DEADLINE_EXCEEDED
    reason = "ERROR_REASON_DEADLINE_EXCEEDED"


class SessionIdle(DeadlineExceeded):
    """A voice session sent nothing for longer than its idle limit; metadata
    ``idle_seconds``."""

    reason = "ERROR_REASON_SESSION_IDLE"


class SpeechUnavailable(DependencyUnavailable):
    """The speech recognition or synthesis endpoint is down or failing; retry."""

    reason = "ERROR_REASON_SPEECH_UNAVAILABLE"


class NotImplementedYet(SwitchboardError):
    """The RPC is in the contract but not served by this version."""

    code = Code.UNIMPLEMENTED
    reason = "ERROR_REASON_NOT_IMPLEMENTED"


class InternalError(SwitchboardError):
    """A fault the client cannot fix; the message must stay generic."""

    code = Code.INTERNAL
    reason = "ERROR_REASON_INTERNAL"


class ConversationBusy(SwitchboardError):
    """The conversation has an active run and the request's policy is REJECT.

    ABORTED: a concurrency conflict the client resolves by retrying later
    (AIP-193), not a state it must change first.
    """

    code = Code.ABORTED
    reason = "ERROR_REASON_CONVERSATION_BUSY"


class ContentBlocked(InvalidArgument):
    """The content policy refused the message; violations name the parts, never the text."""

    reason = "ERROR_REASON_CONTENT_BLOCKED"


class QueueFull(QuotaExceeded):
    """The run queue (global or a workspace's) is full."""

    reason = "ERROR_REASON_QUEUE_FULL"


class RunInterrupted(SwitchboardError):
    """The run was running when its dispatcher stopped (restart policy ``fail``)."""

    code = Code.ABORTED
    reason = "ERROR_REASON_RUN_INTERRUPTED"


class RunNotResumable(SwitchboardError):
    """A run taken over after a crash cannot continue from its journal (an
    unreadable journal, a tool gone, its remote handler changed)."""

    code = Code.FAILED_PRECONDITION
    reason = "ERROR_REASON_RUN_NOT_RESUMABLE"


class RunEnded(SwitchboardError):
    """The run a steer names has ended: nothing was stored; send a new message."""

    code = Code.FAILED_PRECONDITION
    reason = "ERROR_REASON_RUN_ENDED"


class ToolOutcomeUnknown(SwitchboardError):
    """A person failed the run at a tool call whose outcome a crash left unknown."""

    code = Code.ABORTED
    reason = "ERROR_REASON_TOOL_OUTCOME_UNKNOWN"


class RunSuperseded(RunCancelled):
    """A newer message in the conversation interrupted the run (policy INTERRUPT)."""

    reason = "ERROR_REASON_RUN_SUPERSEDED"


class ApprovalExpired(SwitchboardError):
    """A run's tool calls waited for a decision longer than the approval timeout.

    DEADLINE_EXCEEDED: the wait had a limit and reached it; the run is FAILED
    (not DEADLINE_EXCEEDED, which is the run's own deadline).
    """

    code = Code.DEADLINE_EXCEEDED
    reason = "ERROR_REASON_APPROVAL_EXPIRED"


class HandlerFailed(SwitchboardError):
    """The handler reported a failure; the message is the handler's own, secret-free."""

    code = Code.UNAVAILABLE
    reason = "ERROR_REASON_HANDLER_FAILED"
