"""Conversion of domain errors to ``google.rpc.Status`` (grpc-free except for the code)."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from switchboard.platform.errors import (
    ERROR_DOMAIN,
    CircuitOpen,
    DependencyUnavailable,
    FieldError,
    QuotaExceeded,
    RateLimited,
    SwitchboardError,
)

STATUS_DETAILS_KEY = "grpc-status-details-bin"
REQUEST_ID_KEY = "x-request-id"

_GRPC_CODES = {code.value[0]: code for code in grpc.StatusCode}


@dataclass(frozen=True)
class RpcStatus(grpc.Status):
    """A concrete ``grpc.Status`` for ``ServicerContext.abort_with_status``."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def to_status_proto(error: SwitchboardError, request_id: str) -> status_pb2.Status:
    """The rich status for an error: ErrorInfo always, plus kind-specific details."""
    metadata = dict(error.metadata)
    if request_id:
        metadata["request_id"] = request_id
    details = [
        _pack(
            error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=metadata)
        )
    ]
    if error.foreign is not None:
        # First: some SDKs of that protocol read only the first ErrorInfo; ours
        # find theirs by domain wherever it is.
        foreign = error_details_pb2.ErrorInfo(
            reason=error.foreign.reason, domain=error.foreign.domain, metadata=metadata
        )
        details.insert(0, _pack(foreign))
    if isinstance(error, FieldError) and error.violations:
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=v.field, description=v.description
                        )
                        for v in error.violations
                    ]
                )
            )
        )
    retry_after_s: float | None = getattr(error, "retry_after_s", None)
    if retry_after_s is not None and isinstance(
        error, RateLimited | DependencyUnavailable | CircuitOpen | QuotaExceeded
    ):
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(max(1, round(retry_after_s * 1000)))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    if isinstance(error, QuotaExceeded):
        details.append(
            _pack(
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(
                            subject=subject, description=description
                        )
                        for subject, description in error.subjects
                    ]
                )
            )
        )
    return status_pb2.Status(code=int(error.code), message=error.message, details=details)


def to_grpc_status(error: SwitchboardError, request_id: str) -> RpcStatus:
    """The status to abort a call with, details encoded in the standard trailer."""
    proto = to_status_proto(error, request_id)
    trailing: list[tuple[str, str | bytes]] = [(STATUS_DETAILS_KEY, proto.SerializeToString())]
    if request_id:
        trailing.append((REQUEST_ID_KEY, request_id))
    return RpcStatus(
        code=_GRPC_CODES.get(proto.code, grpc.StatusCode.INTERNAL),
        details=proto.message,
        trailing_metadata=tuple(trailing),
    )
