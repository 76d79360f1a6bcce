"""The inverse of the error interceptor: a status from another service back into our error.

A stub client (the dispatcher calling the context service in the mesh shape,
the hub's own clients) turns a failed call into the same ``SwitchboardError``
class the remote side raised, by the ``ErrorInfo`` reason it sent, never by
matching message text. The details come back too: field violations, the
retry delay, the quota's subject. A status without our ``ErrorInfo`` (a
transport failure, a foreign server) becomes a generic error by its code, with
a message of our own: the peer's text may name internal addresses.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from switchboard.platform import errors
from switchboard.platform.errors import (
    ERROR_DOMAIN,
    Code,
    DependencyUnavailable,
    FieldError,
    FieldViolation,
    QuotaExceeded,
    RateLimited,
    SwitchboardError,
)
from switchboard.platform.rpc.status import STATUS_DETAILS_KEY


def _classes(root: type[SwitchboardError]) -> Iterator[type[SwitchboardError]]:
    yield root
    for sub in root.__subclasses__():
        yield from _classes(sub)


def _by_reason() -> dict[str, type[SwitchboardError]]:
    """Each reason's most general class (subclasses that keep their parent's reason
    refine it locally, e.g. DatabaseUnavailable; the caller sees the parent)."""
    found: dict[str, type[SwitchboardError]] = {}
    for cls in _classes(SwitchboardError):
        found.setdefault(cls.reason, cls)
    return found


_BY_REASON: Final = _by_reason()
#: For statuses without our ErrorInfo: the class a bare code stands for.
_BY_CODE: Final[dict[int, type[SwitchboardError]]] = {
    Code.INVALID_ARGUMENT: errors.InvalidArgument,
    Code.NOT_FOUND: errors.NotFound,
    Code.ALREADY_EXISTS: errors.AlreadyExists,
    Code.PERMISSION_DENIED: errors.PermissionDenied,
    Code.UNAUTHENTICATED: errors.Unauthenticated,
    Code.FAILED_PRECONDITION: errors.FailedPrecondition,
    Code.ABORTED: errors.EtagMismatch,
    Code.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
    Code.UNIMPLEMENTED: errors.NotImplementedYet,
    Code.OUT_OF_RANGE: errors.OutOfRange,
}


def rich_status(error: grpc.RpcError) -> status_pb2.Status | None:
    """The ``google.rpc.Status`` a call's trailers carry, if any."""
    trailing: Any = getattr(error, "trailing_metadata", lambda: None)() or ()
    for key, value in trailing:
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except DecodeError:
                return None
    return None


def _our_info(status: status_pb2.Status | None) -> error_details_pb2.ErrorInfo:
    """Our ErrorInfo (a status may also carry another protocol's: errors.ForeignReason)."""
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            found = error_details_pb2.ErrorInfo()
            detail.Unpack(found)
            if found.domain == ERROR_DOMAIN:
                return found
    return error_details_pb2.ErrorInfo()


def from_rpc_error(error: grpc.RpcError, *, peer: str) -> SwitchboardError:
    """``error`` as the SwitchboardError the peer raised; ``peer`` names it in our own messages."""
    status = rich_status(error)
    info = _our_info(status)
    violations: list[FieldViolation] = []
    retry_after_s: float | None = None
    subject = ""
    subjects: list[tuple[str, str]] = []
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = [FieldViolation(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after_s = retry.retry_delay.ToMilliseconds() / 1000
        elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            quota = error_details_pb2.QuotaFailure()
            detail.Unpack(quota)
            subject = quota.violations[0].subject if quota.violations else ""
            subjects = [(v.subject, v.description) for v in quota.violations]
    cls = _BY_REASON.get(info.reason) if info.domain == ERROR_DOMAIN else None
    code_of: Any = getattr(error, "code", lambda: grpc.StatusCode.UNKNOWN)()
    code = int(code_of.value[0]) if isinstance(code_of, grpc.StatusCode) else Code.UNKNOWN
    if cls is None or status is None:
        fallback = _BY_CODE.get(code)
        if fallback is None:
            return DependencyUnavailable(f"{peer} is unavailable ({Code(code).name.lower()})")
        return fallback(f"{peer} refused the request ({Code(code).name.lower()})")
    message = status.message
    metadata = {k: v for k, v in info.metadata.items() if k != "request_id"}
    made: SwitchboardError
    if issubclass(cls, FieldError):
        made = cls(message, violations, metadata=metadata)
    elif issubclass(cls, RateLimited):
        made = cls(message, retry_after_s=retry_after_s or 1.0, metadata=metadata)
    elif issubclass(cls, QuotaExceeded):
        made = cls(
            message,
            subject=subject,
            subjects=subjects,
            retry_after_s=retry_after_s,
            metadata=metadata,
        )
    else:
        made = cls(message, metadata=metadata)
    if retry_after_s is not None and hasattr(made, "retry_after_s"):
        made.retry_after_s = retry_after_s
    return made
