"""switchboard.client.errors: a failed call's status and details become one typed error.

The statuses are built two ways: by hand (every detail kind the contract names),
and by the server's own encoder (``platform/rpc/status.py``) for every error class
the server has, so the client reads exactly what the server writes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc import aio

from switchboard.api.common.v1 import errors_pb2
from switchboard.api.dispatcher.v1 import dispatcher_pb2
from switchboard.client import errors
from switchboard.client.errors import from_rpc_error, from_status
from switchboard.client.runs import run_error
from switchboard.platform import errors as server_errors
from switchboard.platform.rpc.status import to_grpc_status
from tests.kits.errorserver import all_error_classes, build_error

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def _failed_call(
    code: grpc.StatusCode, message: str, status: status_pb2.Status | bytes | None
) -> aio.AioRpcError:
    trailing = aio.Metadata(("x-request-id", "req-7"))
    if status is not None:
        raw = status if isinstance(status, bytes) else status.SerializeToString()
        trailing.add("grpc-status-details-bin", raw)
    return aio.AioRpcError(code, aio.Metadata(), trailing, details=message, debug_error_string="")


def _status(code: grpc.StatusCode, message: str, *details: object) -> status_pb2.Status:
    return status_pb2.Status(
        code=code.value[0], message=message, details=[_pack(d) for d in details]
    )


def _info(reason: str, domain: str = errors.DOMAIN, **metadata: str) -> object:
    return error_details_pb2.ErrorInfo(reason=reason, domain=domain, metadata=metadata)


def test_every_detail_kind_the_contract_names_is_read() -> None:
    status = _status(
        grpc.StatusCode.INVALID_ARGUMENT,
        "conversation is required",
        _info("ERROR_REASON_INVALID_ARGUMENT", request_id="req-7", hint="x"),
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field="conversation", description="is required"
                ),
                error_details_pb2.BadRequest.FieldViolation(
                    field="message.parts", description="must not be empty"
                ),
            ]
        ),
        error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(seconds=2, nanos=500_000_000)
        ),
        error_details_pb2.QuotaFailure(
            violations=[
                error_details_pb2.QuotaFailure.Violation(subject="runs", description="too many")
            ]
        ),
    )
    error = from_rpc_error(
        _failed_call(grpc.StatusCode.INVALID_ARGUMENT, "conversation is required", status)
    )
    assert type(error) is errors.InvalidArgument
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "ERROR_REASON_INVALID_ARGUMENT"
    assert error.domain == "switchboard.dev"
    assert error.request_id == "req-7"
    assert error.metadata == {"hint": "x"}
    assert error.violations == (
        errors.FieldViolation("conversation", "is required"),
        errors.FieldViolation("message.parts", "must not be empty"),
    )
    assert error.retry_delay_s == 2.5
    assert error.quota_violations == (errors.QuotaViolation("runs", "too many"),)
    assert error.message == "conversation is required"
    assert error.status == status
    # Still the AioRpcError that raw-stub code expects.
    assert isinstance(error, aio.AioRpcError)
    assert isinstance(error, grpc.RpcError)
    assert error.details() == "conversation is required"
    trailers: Any = error.trailing_metadata()
    assert ("x-request-id", "req-7") in list(trailers)
    assert "ERROR_REASON_INVALID_ARGUMENT" in str(error)
    assert "req-7" in str(error)


@pytest.mark.parametrize("cls", all_error_classes(), ids=lambda c: c.__name__)
def test_each_server_error_comes_back_as_the_class_of_its_reason(
    cls: type[server_errors.SwitchboardError],
) -> None:
    sent = build_error(cls.__name__)
    assert isinstance(sent, server_errors.SwitchboardError)
    wire = to_grpc_status(sent, "req-9")
    error = from_rpc_error(
        aio.AioRpcError(
            wire.code,
            aio.Metadata(),
            aio.Metadata(*wire.trailing_metadata),
            details=wire.details,
            debug_error_string="",
        )
    )
    assert error.reason == sent.reason
    assert errors_pb2.ErrorReason.Name(type(error).REASON) == sent.reason
    assert error.code() == wire.code
    assert error.request_id == "req-9"
    assert error.message == sent.message
    if isinstance(sent, server_errors.InvalidArgument):
        assert isinstance(error, errors.InvalidArgument)
        assert [(v.field, v.description) for v in error.violations] == [
            (v.field, v.description) for v in sent.violations
        ]
    if isinstance(sent, server_errors.RateLimited):
        assert isinstance(error, errors.RateLimited)
        assert error.retry_delay_s == sent.retry_after_s
    if isinstance(sent, server_errors.QuotaExceeded):
        assert isinstance(error, errors.QuotaExceeded)
        assert [v.subject for v in error.quota_violations] == [sent.subject]


def _contract_table() -> dict[str, str]:
    """docs/contracts.md: each ErrorReason's gRPC code."""
    text = (ROOT / "docs" / "contracts.md").read_text()
    table: dict[str, str] = {}
    for reasons, code in re.findall(r"^\| (`[A-Z_].*?) \| `([A-Z_]+)` \|$", text, re.MULTILINE):
        for reason in re.findall(r"`([A-Z_]+)`", reasons):
            table[f"ERROR_REASON_{reason}"] = code
    return table


def test_every_reason_of_the_contract_has_a_class_with_the_contract_code() -> None:
    table = _contract_table()
    assert len(table) >= 27, "the table in docs/contracts.md was not found"
    for reason in errors_pb2.ErrorReason.keys():  # noqa: SIM118 - an enum wrapper
        if reason == "ERROR_REASON_UNSPECIFIED":
            continue
        cls = errors.error_class(grpc.StatusCode.UNKNOWN, reason, errors.DOMAIN)
        assert errors_pb2.ErrorReason.Name(cls.REASON) == reason, reason
        assert reason in table, f"{reason} is missing from the table in docs/contracts.md"
        assert cls.CODE.name == table[reason], reason


def test_the_class_of_a_code_answers_for_a_status_without_our_details() -> None:
    for code, cls in [
        (grpc.StatusCode.UNAVAILABLE, errors.Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceeded),
        (grpc.StatusCode.CANCELLED, errors.Cancelled),
        (grpc.StatusCode.UNKNOWN, errors.Unknown),
        (grpc.StatusCode.INTERNAL, errors.Internal),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ResourceExhausted),
        (grpc.StatusCode.ABORTED, errors.Aborted),
    ]:
        error = from_rpc_error(_failed_call(code, "upstream connect error", None))
        assert type(error) is cls
        assert error.code() == code
        assert error.domain == ""  # not the server's decision: a proxy or the transport
        assert error.request_id == ""
        assert error.message == "upstream connect error"


def test_a_foreign_domain_or_an_unknown_reason_falls_back_to_the_code() -> None:
    foreign = _status(
        grpc.StatusCode.NOT_FOUND, "no", _info("ERROR_REASON_CURSOR_EXPIRED", "example.com")
    )
    error = from_rpc_error(_failed_call(grpc.StatusCode.NOT_FOUND, "no", foreign))
    assert type(error) is errors.NotFound
    assert error.domain == "example.com"
    newer = _status(grpc.StatusCode.ABORTED, "later", _info("ERROR_REASON_FROM_THE_FUTURE"))
    error = from_rpc_error(_failed_call(grpc.StatusCode.ABORTED, "later", newer))
    assert type(error) is errors.Aborted
    assert error.reason == "ERROR_REASON_FROM_THE_FUTURE"


def test_undecodable_details_do_not_hide_the_code() -> None:
    error = from_rpc_error(_failed_call(grpc.StatusCode.PERMISSION_DENIED, "no", b"\xff\xff"))
    assert type(error) is errors.PermissionDenied
    assert error.status is not None
    assert not error.status.details


def test_cursor_expired_names_the_oldest_cursor() -> None:
    status = _status(
        grpc.StatusCode.OUT_OF_RANGE,
        "too old",
        _info("ERROR_REASON_CURSOR_EXPIRED", oldest_cursor="42-0", request_id="r"),
    )
    error = from_rpc_error(_failed_call(grpc.StatusCode.OUT_OF_RANGE, "too old", status))
    assert isinstance(error, errors.CursorExpired)
    assert error.oldest_cursor == "42-0"


def test_a_runs_error_is_typed_without_a_call() -> None:
    run = dispatcher_pb2.Run(
        name="workspaces/w/conversations/c/runs/r", state=dispatcher_pb2.RUN_STATE_FAILED
    )
    run.error.CopyFrom(
        _status(
            grpc.StatusCode.ABORTED,
            "the dispatcher restarted while the run was running",
            _info("ERROR_REASON_RUN_INTERRUPTED"),
        )
    )
    error = from_status(run.error)
    assert type(error) is errors.RunInterrupted
    assert error.code() == grpc.StatusCode.ABORTED
    failed = errors.RunFailed(run, run_error(run))
    assert failed.run is run
    assert isinstance(failed.cause, errors.RunInterrupted)
    assert failed.reason == "ERROR_REASON_RUN_INTERRUPTED"
    assert failed.code() == grpc.StatusCode.ABORTED
    cancelled = dispatcher_pb2.Run(state=dispatcher_pb2.RUN_STATE_CANCELLED)
    assert isinstance(run_error(cancelled), errors.Cancelled)


def test_a_typed_error_is_returned_as_it_is() -> None:
    error = errors.SignedOut("sign in again")
    assert from_rpc_error(error) is error
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert isinstance(error, errors.Unauthenticated)
