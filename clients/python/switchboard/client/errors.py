"""One exception hierarchy for everything a Switchboard deployment answers.

Every error the mesh returns is a ``google.rpc.Status`` in the
``grpc-status-details-bin`` trailer, with an ``ErrorInfo`` whose reason names a
``switchboard.api.common.v1.ErrorReason`` (docs/contracts.md). The class is
chosen by that reason, never by the message text; a status without our
``ErrorInfo`` (a proxy, a transport failure, a foreign server) gets the
generic class of its code.

Every class derives from ``grpc.aio.AioRpcError``, so code written against raw
stubs (``except grpc.RpcError``, ``error.code()``) keeps working, while new code
catches ``NotFound`` or ``RateLimited`` and reads the details as attributes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc import aio

from switchboard.api.common.v1 import errors_pb2

DOMAIN: Final = "switchboard.dev"
STATUS_DETAILS_KEY: Final = "grpc-status-details-bin"

_Reason = errors_pb2.ErrorReason
_CODES: Final[dict[int, grpc.StatusCode]] = {code.value[0]: code for code in grpc.StatusCode}


@dataclass(frozen=True)
class FieldViolation:
    """One invalid request field (``google.rpc.BadRequest``): its path and what is wrong."""

    field: str
    description: str


@dataclass(frozen=True)
class QuotaViolation:
    """One limit that was hit (``google.rpc.QuotaFailure``)."""

    subject: str
    description: str


class SwitchboardError(aio.AioRpcError):
    """Root of every error this client raises.

    ``reason`` is the ``ErrorReason`` name the server sent (empty when it sent
    none), ``metadata`` the ``ErrorInfo`` metadata without the request id, which
    is ``request_id``. ``violations``, ``retry_delay_s`` and ``quota_violations``
    carry the ``BadRequest``, ``RetryInfo`` and ``QuotaFailure`` details.
    """

    #: The code this class stands for when raised by the client itself.
    CODE: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    #: The ``ErrorReason`` this class stands for (0: it is the class of a code).
    REASON: ClassVar[errors_pb2.ErrorReason.ValueType] = _Reason.ERROR_REASON_UNSPECIFIED

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        request_id: str = "",
        violations: Iterable[FieldViolation] = (),
        retry_delay_s: float | None = None,
        quota_violations: Iterable[QuotaViolation] = (),
        status: status_pb2.Status | None = None,
        initial_metadata: aio.Metadata | None = None,
        trailing_metadata: aio.Metadata | None = None,
        debug_error_string: str | None = None,
    ) -> None:
        super().__init__(
            code or self.CODE,
            initial_metadata if initial_metadata is not None else aio.Metadata(),
            trailing_metadata if trailing_metadata is not None else aio.Metadata(),
            details=message,
            debug_error_string=debug_error_string,
        )
        self.message = message
        self.reason = reason or (
            _Reason.Name(self.REASON) if self.REASON != _Reason.ERROR_REASON_UNSPECIFIED else ""
        )
        self.domain = domain
        self.metadata: dict[str, str] = dict(metadata or {})
        self.request_id = request_id
        self.violations = tuple(violations)
        self.retry_delay_s = retry_delay_s
        self.quota_violations = tuple(quota_violations)
        self.status = status

    def __str__(self) -> str:
        reason = f" {self.reason}" if self.reason else ""
        request = f" (request {self.request_id})" if self.request_id else ""
        return f"{self.code().name}{reason}: {self.message}{request}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self!s})"


# -- by code ------------------------------------------------------------------------------


class Cancelled(SwitchboardError):
    """CANCELLED: the server, or something between, cancelled the call or the run."""

    CODE = grpc.StatusCode.CANCELLED


class Unknown(SwitchboardError):
    """UNKNOWN: never sent by a Switchboard server; a proxy or the transport said it."""

    CODE = grpc.StatusCode.UNKNOWN


class InvalidArgument(SwitchboardError):
    """INVALID_ARGUMENT: ``violations`` lists every offending field."""

    CODE = grpc.StatusCode.INVALID_ARGUMENT
    REASON = _Reason.ERROR_REASON_INVALID_ARGUMENT


class DeadlineExceeded(SwitchboardError):
    """DEADLINE_EXCEEDED: the call's deadline (or the operation's) passed."""

    CODE = grpc.StatusCode.DEADLINE_EXCEEDED
    REASON = _Reason.ERROR_REASON_DEADLINE_EXCEEDED


class NotFound(SwitchboardError):
    """NOT_FOUND: it does not exist, or the caller may not know that it does."""

    CODE = grpc.StatusCode.NOT_FOUND
    REASON = _Reason.ERROR_REASON_NOT_FOUND


class AlreadyExists(SwitchboardError):
    """ALREADY_EXISTS: an id or an email that is taken."""

    CODE = grpc.StatusCode.ALREADY_EXISTS
    REASON = _Reason.ERROR_REASON_ALREADY_EXISTS


class PermissionDenied(SwitchboardError):
    """PERMISSION_DENIED: authenticated, but the role or scope does not allow it."""

    CODE = grpc.StatusCode.PERMISSION_DENIED
    REASON = _Reason.ERROR_REASON_PERMISSION_DENIED


class ResourceExhausted(SwitchboardError):
    """RESOURCE_EXHAUSTED: a rate, size, count or concurrency limit."""

    CODE = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(SwitchboardError):
    """FAILED_PRECONDITION: the resource is not in a state that allows this."""

    CODE = grpc.StatusCode.FAILED_PRECONDITION
    REASON = _Reason.ERROR_REASON_FAILED_PRECONDITION


class Aborted(SwitchboardError):
    """ABORTED: a concurrency conflict (a stale etag, a busy conversation)."""

    CODE = grpc.StatusCode.ABORTED


class OutOfRange(SwitchboardError):
    """OUT_OF_RANGE: a position past the end of what it reads (``DownloadFile``'s
    ``read_offset`` beyond the file's size: ``violations`` name the field,
    ``metadata["size_bytes"]`` the end); an event cursor outside the log is one of
    its subclasses."""

    CODE = grpc.StatusCode.OUT_OF_RANGE
    REASON = _Reason.ERROR_REASON_OUT_OF_RANGE


class Unimplemented(SwitchboardError):
    """UNIMPLEMENTED: this server does not provide the method (yet)."""

    CODE = grpc.StatusCode.UNIMPLEMENTED
    REASON = _Reason.ERROR_REASON_NOT_IMPLEMENTED


class Internal(SwitchboardError):
    """INTERNAL: a server fault; ``request_id`` finds it in the server's log."""

    CODE = grpc.StatusCode.INTERNAL
    REASON = _Reason.ERROR_REASON_INTERNAL


class Unavailable(SwitchboardError):
    """UNAVAILABLE: try again later (with backoff, honouring ``retry_delay_s``)."""

    CODE = grpc.StatusCode.UNAVAILABLE
    REASON = _Reason.ERROR_REASON_UNAVAILABLE


class DataLoss(SwitchboardError):
    """DATA_LOSS: never sent by a Switchboard server."""

    CODE = grpc.StatusCode.DATA_LOSS


class Unauthenticated(SwitchboardError):
    """UNAUTHENTICATED: no credential, or one that does not verify."""

    CODE = grpc.StatusCode.UNAUTHENTICATED
    REASON = _Reason.ERROR_REASON_UNAUTHENTICATED


# -- by reason ----------------------------------------------------------------------------


class ContentBlocked(InvalidArgument):
    """The content policy refused the message."""

    REASON = _Reason.ERROR_REASON_CONTENT_BLOCKED


class DestinationBlocked(InvalidArgument):
    """An integration's address is refused by the server's egress policy."""

    REASON = _Reason.ERROR_REASON_DESTINATION_BLOCKED


class TokenExpired(Unauthenticated):
    """The access token expired (the client refreshes and retries by itself)."""

    REASON = _Reason.ERROR_REASON_TOKEN_EXPIRED


class SessionRevoked(Unauthenticated):
    """The session was logged out, revoked, or ended by refresh-token reuse."""

    REASON = _Reason.ERROR_REASON_SESSION_REVOKED


class SignedOut(Unauthenticated):
    """The client has no usable credential any more: sign in again.

    Raised by the client itself when a refresh is refused, when the session was
    revoked, or when the access token expired and no refresh token is left.
    """


class EtagMismatch(Aborted):
    """The etag is stale: read the resource again, then retry."""

    REASON = _Reason.ERROR_REASON_ETAG_MISMATCH


class ConversationBusy(Aborted):
    """The conversation has an active run and the message's policy is REJECT."""

    REASON = _Reason.ERROR_REASON_CONVERSATION_BUSY


class RunInterrupted(Aborted):
    """The run was running when its dispatcher stopped (recovery policy ``fail``)."""

    REASON = _Reason.ERROR_REASON_RUN_INTERRUPTED


class ToolOutcomeUnknown(Aborted):
    """A person failed the run at a tool call whose outcome a crash left unknown
    (``SubmitToolApprovals`` with ``FAIL_RUN``)."""

    REASON = _Reason.ERROR_REASON_TOOL_OUTCOME_UNKNOWN


class RateLimited(ResourceExhausted):
    """A rate limit; ``retry_delay_s`` says when to try again."""

    REASON = _Reason.ERROR_REASON_RATE_LIMITED


class QuotaExceeded(ResourceExhausted):
    """A size, count or concurrency quota; ``quota_violations`` names it."""

    REASON = _Reason.ERROR_REASON_QUOTA_EXCEEDED


class BudgetExhausted(QuotaExceeded):
    """RESOURCE_EXHAUSTED ``BUDGET_EXHAUSTED``: a budget has no room;
    ``quota_violations`` name the budgets, ``metadata["reset_time"]`` when the
    earliest resets."""

    REASON = _Reason.ERROR_REASON_BUDGET_EXHAUSTED


class ModelNotPriced(FailedPrecondition):
    """FAILED_PRECONDITION ``MODEL_NOT_PRICED``: a cost budget applies and the
    model has no price."""

    REASON = _Reason.ERROR_REASON_MODEL_NOT_PRICED


class UploadOffsetMismatch(FailedPrecondition):
    """FAILED_PRECONDITION ``UPLOAD_OFFSET_MISMATCH``: an upload step's offset is
    not the committed size; ``metadata["committed_size"]`` says where to continue."""

    REASON = _Reason.ERROR_REASON_UPLOAD_OFFSET_MISMATCH


class UploadExpired(FailedPrecondition):
    """FAILED_PRECONDITION ``UPLOAD_EXPIRED``: the upload was abandoned past its
    expiry and discarded; start again."""

    REASON = _Reason.ERROR_REASON_UPLOAD_EXPIRED


class ChecksumMismatch(InvalidArgument):
    """INVALID_ARGUMENT ``CHECKSUM_MISMATCH``: the bytes sent do not have the
    SHA-256 given; nothing was stored."""

    REASON = _Reason.ERROR_REASON_CHECKSUM_MISMATCH


class MediaTypeMismatch(InvalidArgument):
    """INVALID_ARGUMENT ``MEDIA_TYPE_MISMATCH``: the content contradicts the
    declared media type; ``metadata["detected_media_type"]`` says what it is."""

    REASON = _Reason.ERROR_REASON_MEDIA_TYPE_MISMATCH


class ModalityUnsupported(FailedPrecondition):
    """FAILED_PRECONDITION ``MODALITY_UNSUPPORTED``: the model cannot take a kind
    of content in the window (an image for a model without vision)."""

    REASON = _Reason.ERROR_REASON_MODALITY_UNSUPPORTED


class SpeechNotConfigured(FailedPrecondition):
    """FAILED_PRECONDITION ``SPEECH_NOT_CONFIGURED``: the assistant has no ``voice``
    settings, or the server no audio endpoint."""

    REASON = _Reason.ERROR_REASON_SPEECH_NOT_CONFIGURED


class SpeechRefused(FailedPrecondition):
    """FAILED_PRECONDITION ``SPEECH_REFUSED``: the speech endpoint refused the
    request (the audio, the model or the voice)."""

    REASON = _Reason.ERROR_REASON_SPEECH_REFUSED


class RunNotResumable(FailedPrecondition):
    """FAILED_PRECONDITION ``RUN_NOT_RESUMABLE``: a run taken over after a crash
    could not continue from its journal (written by a release this one cannot read,
    a tool a call was in flight to is gone, or its remote handler changed); the
    message says which. The run is not started again."""

    REASON = _Reason.ERROR_REASON_RUN_NOT_RESUMABLE


class RunEnded(FailedPrecondition):
    """FAILED_PRECONDITION ``RUN_ENDED``: the run named has ended, so it cannot be
    steered (``SteerRun``); nothing was stored. Send the message as a new one."""

    REASON = _Reason.ERROR_REASON_RUN_ENDED


class SessionEnded(FailedPrecondition):
    """FAILED_PRECONDITION ``SESSION_ENDED``: the voice session has ended or is past
    its resume window; start a new one."""

    REASON = _Reason.ERROR_REASON_SESSION_ENDED


class QueueFull(QuotaExceeded):
    """The run queue (global or the workspace's) is full."""

    REASON = _Reason.ERROR_REASON_QUEUE_FULL


class RequestTooLarge(ResourceExhausted):
    """The request, or a field of it, is larger than the server accepts."""

    REASON = _Reason.ERROR_REASON_REQUEST_TOO_LARGE


class ResultTooLarge(ResourceExhausted):
    """A tool's result was over the size limit."""

    REASON = _Reason.ERROR_REASON_RESULT_TOO_LARGE


class SubscriberTooSlow(ResourceExhausted):
    """An event stream fell behind its buffer (``follow`` resumes by itself)."""

    REASON = _Reason.ERROR_REASON_SUBSCRIBER_TOO_SLOW


class CursorExpired(OutOfRange):
    """The cursor is older than the retained log, or not of this log.

    ``oldest_cursor`` is where the retained log starts: resuming after it skips
    what was trimmed, so the application decides what the gap means.
    """

    REASON = _Reason.ERROR_REASON_CURSOR_EXPIRED

    @property
    def oldest_cursor(self) -> str:
        return self.metadata.get("oldest_cursor", "")


class CursorAhead(OutOfRange):
    """The cursor is ahead of the log: another deployment's, or the log was reset.

    Nothing was trimmed; the cursor means nothing here. ``head_cursor`` is the
    newest position (resume after it for what comes next), ``oldest_cursor``
    the oldest retained one (resume after it for everything kept).
    """

    REASON = _Reason.ERROR_REASON_CURSOR_AHEAD

    @property
    def head_cursor(self) -> str:
        return self.metadata.get("head_cursor", "")

    @property
    def oldest_cursor(self) -> str:
        return self.metadata.get("oldest_cursor", "")


class DependencyUnavailable(Unavailable):
    """A dependency of the server (database, cache, remote handler) is away."""

    REASON = _Reason.ERROR_REASON_DEPENDENCY_UNAVAILABLE


class SpeechUnavailable(Unavailable):
    """UNAVAILABLE ``SPEECH_UNAVAILABLE``: the speech recognition or synthesis
    endpoint is down or failing; retry."""

    REASON = _Reason.ERROR_REASON_SPEECH_UNAVAILABLE


class SessionIdle(DeadlineExceeded):
    """DEADLINE_EXCEEDED ``SESSION_IDLE``: the voice session sent nothing for too
    long; resume it within its window."""

    REASON = _Reason.ERROR_REASON_SESSION_IDLE


class CircuitOpen(Unavailable):
    """An integration's circuit breaker is open."""

    REASON = _Reason.ERROR_REASON_CIRCUIT_OPEN


class HandlerFailed(Unavailable):
    """The handler failed (the message says what it reported)."""

    REASON = _Reason.ERROR_REASON_HANDLER_FAILED


class RunCancelled(Cancelled):
    """The run was cancelled."""

    REASON = _Reason.ERROR_REASON_RUN_CANCELLED


class RunSuperseded(RunCancelled):
    """A newer message interrupted the run (policy INTERRUPT)."""

    REASON = _Reason.ERROR_REASON_RUN_SUPERSEDED


class ApprovalExpired(DeadlineExceeded):
    """The run waited for a tool approval longer than the approval timeout."""

    REASON = _Reason.ERROR_REASON_APPROVAL_EXPIRED


class RunFailed(SwitchboardError):
    """A run ended without an answer (FAILED, CANCELLED, DEADLINE_EXCEEDED).

    Not a failed call: the run's own ``Run.error`` becomes this error's code,
    reason and details, and ``run`` is the run as it ended. ``cause`` is the
    same status as the class its reason names (``RunInterrupted``, ...).
    """

    def __init__(self, run: Any, cause: SwitchboardError) -> None:
        super().__init__(
            cause.message or f"the run ended {run.state}",
            code=cause.code(),
            reason=cause.reason,
            domain=cause.domain,
            metadata=cause.metadata,
            request_id=cause.request_id,
            violations=cause.violations,
            retry_delay_s=cause.retry_delay_s,
            quota_violations=cause.quota_violations,
            status=cause.status,
        )
        self.run = run
        self.cause = cause


# -- mapping ------------------------------------------------------------------------------


def _classes(root: type[SwitchboardError]) -> Iterable[type[SwitchboardError]]:
    yield root
    for sub in root.__subclasses__():
        yield from _classes(sub)


def _by_reason() -> dict[errors_pb2.ErrorReason.ValueType, type[SwitchboardError]]:
    found: dict[errors_pb2.ErrorReason.ValueType, type[SwitchboardError]] = {}
    for cls in _classes(SwitchboardError):
        if cls.REASON != _Reason.ERROR_REASON_UNSPECIFIED:
            found.setdefault(cls.REASON, cls)
    return found


_BY_REASON: Final = _by_reason()
#: The class of a bare code: the direct subclasses of the root, one per code.
_BY_CODE: Final[dict[grpc.StatusCode, type[SwitchboardError]]] = {
    cls.CODE: cls for cls in SwitchboardError.__subclasses__() if cls is not RunFailed
}


def error_class(code: grpc.StatusCode, reason: str, domain: str) -> type[SwitchboardError]:
    """The class for a status: by its reason when it is one of ours, else by its code."""
    if domain == DOMAIN:
        try:
            found = _BY_REASON.get(_Reason.Value(reason))
        except ValueError:
            found = None  # a reason newer than this client: its code still says enough
        if found is not None:
            return found
    return _BY_CODE.get(code, Unknown)


def rich_status(trailing_metadata: Iterable[tuple[str, Any]] | None) -> status_pb2.Status | None:
    """The ``google.rpc.Status`` in a call's trailers, if there is a readable one."""
    for key, value in trailing_metadata or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except DecodeError:
                return None
    return None


def from_status(
    status: status_pb2.Status,
    *,
    code: grpc.StatusCode | None = None,
    message: str | None = None,
    initial_metadata: aio.Metadata | None = None,
    trailing_metadata: aio.Metadata | None = None,
    debug_error_string: str | None = None,
) -> SwitchboardError:
    """The typed error a ``google.rpc.Status`` stands for (a call's, or a ``Run.error``)."""
    info = error_details_pb2.ErrorInfo()
    violations: list[FieldViolation] = []
    quotas: list[QuotaViolation] = []
    retry_delay_s: float | None = None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            found = error_details_pb2.ErrorInfo()
            detail.Unpack(found)
            # Ours wins over another protocol's (A2A errors carry both); a foreign
            # server's only one is kept so its domain and reason stay readable.
            if found.domain == DOMAIN or info.domain != DOMAIN:
                info = found
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_delay_s = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
        elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            quota = error_details_pb2.QuotaFailure()
            detail.Unpack(quota)
            quotas += [QuotaViolation(v.subject, v.description) for v in quota.violations]
    resolved = code if code is not None else _CODES.get(status.code, grpc.StatusCode.UNKNOWN)
    cls = error_class(resolved, info.reason, info.domain)
    metadata = dict(info.metadata)
    request_id = metadata.pop("request_id", "")
    return cls(
        status.message if message is None else message,
        code=resolved,
        reason=info.reason,
        domain=info.domain,
        metadata=metadata,
        request_id=request_id,
        violations=violations,
        retry_delay_s=retry_delay_s,
        quota_violations=quotas,
        status=status,
        initial_metadata=initial_metadata,
        trailing_metadata=trailing_metadata,
        debug_error_string=debug_error_string,
    )


def from_rpc_error(error: grpc.RpcError) -> SwitchboardError:
    """A failed call (``grpc.aio.AioRpcError``) as the typed error its status names."""
    if isinstance(error, SwitchboardError):
        return error
    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    message = ""
    initial: Any = None
    trailing: Any = None
    debug: str | None = None
    if isinstance(error, aio.AioRpcError):
        code, message = error.code(), error.details() or ""
        initial, trailing = error.initial_metadata(), error.trailing_metadata()
        debug = error.debug_error_string()
    status = rich_status(trailing)
    if status is None:
        status = status_pb2.Status(code=code.value[0], message=message)
    return from_status(
        status,
        code=code,
        message=message,
        initial_metadata=initial,
        trailing_metadata=trailing,
        debug_error_string=debug,
    )
