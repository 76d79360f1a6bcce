"""The inverse error mapping: what one service raised, another gets back as the same class."""

from __future__ import annotations

import grpc
import pytest
from grpc import aio

from switchboard.platform import errors
from switchboard.platform.errors import (
    CircuitOpen,
    DatabaseUnavailable,
    DependencyUnavailable,
    FieldViolation,
    InvalidArgument,
    OutOfRange,
    QuotaExceeded,
    RateLimited,
    SwitchboardError,
)
from switchboard.platform.rpc.outbound.rpcerrors import from_rpc_error
from switchboard.platform.rpc.status import to_grpc_status

pytestmark = pytest.mark.unit


def _over_the_wire(error: SwitchboardError) -> aio.AioRpcError:
    status = to_grpc_status(error, "req-1")
    return aio.AioRpcError(
        status.code,
        aio.Metadata(),
        aio.Metadata(*status.trailing_metadata),
        details=status.details,
        debug_error_string="",
    )


def _simple_classes() -> list[type[SwitchboardError]]:
    found = []
    for name in dir(errors):
        cls = getattr(errors, name)
        if isinstance(cls, type) and issubclass(cls, SwitchboardError):
            found.append(cls)
    return found


@pytest.mark.parametrize("cls", _simple_classes(), ids=lambda c: c.__name__)
def test_each_error_class_comes_back_as_the_class_of_its_reason(
    cls: type[SwitchboardError],
) -> None:
    if issubclass(cls, RateLimited):
        error: SwitchboardError = cls("slow down", retry_after_s=2.5)
    elif issubclass(cls, QuotaExceeded):
        error = cls("full", subject="widgets per box")
    elif issubclass(cls, InvalidArgument | OutOfRange):
        error = cls("bad", [FieldViolation("a.b", "is wrong")])
    else:
        error = cls("what happened")
    back = from_rpc_error(_over_the_wire(error), peer="the context service")
    assert back.reason == error.reason
    assert back.code == error.code
    assert back.message == error.message
    # The most general class of the reason (a subclass that keeps its parent's
    # reason is a local refinement).
    assert isinstance(error, type(back))
    if isinstance(error, InvalidArgument | OutOfRange):
        assert isinstance(back, InvalidArgument | OutOfRange)
        assert back.violations == error.violations
    if isinstance(error, QuotaExceeded):
        assert isinstance(back, QuotaExceeded)
        assert back.subject == "widgets per box"
    if isinstance(error, RateLimited):
        assert isinstance(back, RateLimited)
        assert back.retry_after_s == 2.5


def test_retry_delays_and_metadata_survive() -> None:
    error = CircuitOpen("open", retry_after_s=7.0, metadata={"integration": "workspaces/w/i"})
    back = from_rpc_error(_over_the_wire(error), peer="the hub")
    assert isinstance(back, CircuitOpen)
    assert back.retry_after_s == 7.0
    assert back.metadata == {"integration": "workspaces/w/i"}
    outage = from_rpc_error(_over_the_wire(DatabaseUnavailable()), peer="the hub")
    assert type(outage) is DependencyUnavailable


def test_a_status_without_our_details_gets_a_message_of_our_own() -> None:
    transport = aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE,
        aio.Metadata(),
        aio.Metadata(),
        details="failed to connect to all addresses; last error: 10.0.0.7:50051 refused",
        debug_error_string="",
    )
    back = from_rpc_error(transport, peer="the context service")
    assert isinstance(back, DependencyUnavailable)
    assert "10.0.0.7" not in back.message
    assert "the context service" in back.message
    denied = aio.AioRpcError(
        grpc.StatusCode.PERMISSION_DENIED,
        aio.Metadata(),
        aio.Metadata(),
        details="x",
        debug_error_string="",
    )
    assert isinstance(from_rpc_error(denied, peer="p"), errors.PermissionDenied)
