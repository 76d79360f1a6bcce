"""Error mapping: every domain error class becomes its precise rich status; an
unexpected exception becomes a generic INTERNAL that leaks nothing."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc import aio

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.api.common.v1 import errors_pb2
from switchboard.api.events.v1 import events_pb2, events_pb2_grpc
from switchboard.platform import errors
from switchboard.platform.rpc.interceptors import GENERIC_INTERNAL_MESSAGE
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.settings import Settings
from tests.conftest import CALL_DEADLINE_S
from tests.kits.errorserver import LEAKY_TEXT, RaisingAuth, all_error_classes, start_error_server

pytestmark = pytest.mark.service


@pytest.fixture
async def error_server(settings: Settings) -> AsyncIterator[tuple[SwitchboardServer, RaisingAuth]]:
    server, auth = await start_error_server(settings)
    try:
        yield server, auth
    finally:
        auth.release.set()
        await server.shutdown(grace=0)


@pytest.fixture
async def error_channel(
    error_server: tuple[SwitchboardServer, RaisingAuth],
) -> AsyncIterator[aio.Channel]:
    async with aio.insecure_channel(error_server[0].address) as chan:
        yield chan


def metadata_pairs(metadata: Any) -> list[tuple[str, Any]]:
    """(key, value) pairs of call metadata, whatever container grpc returned."""
    return [(str(item[0]), item[1]) for item in metadata or ()]


def rich_status(error: aio.AioRpcError) -> status_pb2.Status:
    for key, value in metadata_pairs(error.trailing_metadata()):
        if key == "grpc-status-details-bin":
            assert isinstance(value, bytes)
            return status_pb2.Status.FromString(value)
    raise AssertionError("no grpc-status-details-bin trailer")


def detail(status: status_pb2.Status, cls: Any) -> object:
    for packed in status.details:
        if packed.Is(cls.DESCRIPTOR):
            message = cls()
            packed.Unpack(message)
            return message
    return None


def error_info(status: status_pb2.Status) -> error_details_pb2.ErrorInfo:
    info = detail(status, error_details_pb2.ErrorInfo)
    assert isinstance(info, error_details_pb2.ErrorInfo)
    return info


CLASSES = all_error_classes()


def test_every_reason_is_in_the_contract() -> None:
    contract = set(errors_pb2.ErrorReason.keys())
    for cls in CLASSES:
        assert cls.reason in contract, f"{cls.__name__}.reason {cls.reason} not in ErrorReason"


def test_every_contract_reason_has_an_error_class() -> None:
    raised = {cls.reason for cls in CLASSES}
    missing = set(errors_pb2.ErrorReason.keys()) - raised - {"ERROR_REASON_UNSPECIFIED"}
    assert not missing, f"ErrorReason values no error class raises: {sorted(missing)}"


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
async def test_domain_error_maps_to_rich_status(
    error_channel: aio.Channel, cls: type[errors.SwitchboardError]
) -> None:
    stub = auth_pb2_grpc.AuthServiceStub(error_channel)
    with pytest.raises(aio.AioRpcError) as caught:
        await stub.Logout(
            auth_pb2.LogoutRequest(),
            metadata=(("x-test-error", cls.__name__),),
            timeout=CALL_DEADLINE_S,
        )
    err = caught.value
    assert err.code().value[0] == int(cls.code)
    assert err.code() != grpc.StatusCode.UNKNOWN
    status = rich_status(err)
    assert status.code == int(cls.code)
    info = error_info(status)
    assert info.reason == cls.reason
    assert info.domain == errors.ERROR_DOMAIN
    assert len(info.metadata["request_id"]) >= 16
    if cls is errors.InvalidArgument:
        bad = detail(status, error_details_pb2.BadRequest)
        assert isinstance(bad, error_details_pb2.BadRequest)
        assert [v.field for v in bad.field_violations] == ["email", "password"]
    elif cls is errors.RateLimited:
        retry = detail(status, error_details_pb2.RetryInfo)
        assert isinstance(retry, error_details_pb2.RetryInfo)
        assert retry.retry_delay.ToMilliseconds() == 1500
    elif issubclass(cls, errors.QuotaExceeded):
        quota = detail(status, error_details_pb2.QuotaFailure)
        assert isinstance(quota, error_details_pb2.QuotaFailure)
        assert quota.violations[0].subject == "subscriptions_per_principal"
    else:
        assert info.metadata["resource"] == "workspaces/w1"
        assert err.details() == f"{cls.__name__} raised for a test"


async def test_unexpected_exception_is_generic_internal(
    error_channel: aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    stub = auth_pb2_grpc.AuthServiceStub(error_channel)
    caplog.set_level(logging.ERROR, logger="switchboard.errors")
    with pytest.raises(aio.AioRpcError) as caught:
        await stub.Logout(
            auth_pb2.LogoutRequest(),
            metadata=(("x-test-error", "RuntimeError"), ("x-request-id", "req-abc-123")),
            timeout=CALL_DEADLINE_S,
        )
    err = caught.value
    assert err.code() == grpc.StatusCode.INTERNAL
    assert err.details() == GENERIC_INTERNAL_MESSAGE
    status = rich_status(err)
    info = error_info(status)
    assert info.reason == "ERROR_REASON_INTERNAL"
    assert info.metadata["request_id"] == "req-abc-123"
    everything_sent = (
        repr(err.trailing_metadata()) + repr(err.initial_metadata()) + (err.details() or "")
    )
    assert "hunter2" not in everything_sent
    assert "Traceback" not in everything_sent
    # The operator, however, gets the whole story, tied to the request id.
    logged = [r for r in caplog.records if r.name == "switchboard.errors"]
    assert logged, "unexpected exception was not logged"
    assert logged[-1].exc_info is not None
    assert LEAKY_TEXT in str(logged[-1].exc_info[1])


async def test_request_id_echoed_or_generated(error_channel: aio.Channel) -> None:
    stub = auth_pb2_grpc.AuthServiceStub(error_channel)
    call = stub.Logout(
        auth_pb2.LogoutRequest(), metadata=(("x-request-id", "abc-1"),), timeout=CALL_DEADLINE_S
    )
    await call
    assert ("x-request-id", "abc-1") in metadata_pairs(await call.trailing_metadata())
    bad = stub.Logout(
        auth_pb2.LogoutRequest(),
        metadata=(("x-request-id", "no spaces allowed!"),),
        timeout=CALL_DEADLINE_S,
    )
    await bad
    ids = [v for k, v in metadata_pairs(await bad.trailing_metadata()) if k == "x-request-id"]
    assert len(ids) == 1
    assert ids[0] != "no spaces allowed!"
    assert len(str(ids[0])) == 32


async def test_error_midway_through_a_stream(error_channel: aio.Channel) -> None:
    stub = events_pb2_grpc.EventServiceStub(error_channel)
    call = stub.Subscribe(
        events_pb2.SubscribeRequest(),
        metadata=(("x-test-error", "CursorExpired"),),
        timeout=CALL_DEADLINE_S,
    )
    first = await call.read()
    assert isinstance(first, events_pb2.SubscribeResponse)
    assert first.heartbeat.cursor == "1"
    with pytest.raises(aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert error_info(rich_status(caught.value)).reason == "ERROR_REASON_CURSOR_EXPIRED"


async def test_unexpected_exception_in_stream_is_generic_internal(
    error_channel: aio.Channel,
) -> None:
    stub = events_pb2_grpc.EventServiceStub(error_channel)
    call = stub.Subscribe(
        events_pb2.SubscribeRequest(),
        metadata=(("x-test-error", "RuntimeError"),),
        timeout=CALL_DEADLINE_S,
    )
    await call.read()
    with pytest.raises(aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert caught.value.details() == GENERIC_INTERNAL_MESSAGE


def _all_methods() -> list[tuple[str, descriptor_pb2.MethodDescriptorProto]]:
    from switchboard.api.auth.v1 import auth_pb2 as a
    from switchboard.api.context.v1 import context_pb2 as c
    from switchboard.api.dispatcher.v1 import dispatcher_pb2 as d
    from switchboard.api.events.v1 import events_pb2 as e
    from switchboard.api.integration.v1 import integration_pb2 as i

    found = []
    for module in (a, c, d, e, i):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                proto = descriptor_pb2.MethodDescriptorProto()
                method.CopyToProto(proto)
                found.append((f"/{service.full_name}/{method.name}", proto))
    return found


async def _call_raw(
    channel: aio.Channel, path: str, method: descriptor_pb2.MethodDescriptorProto
) -> None:
    """Call any RPC with an empty request, whatever its streaming shape."""
    kind = (method.client_streaming, method.server_streaming)
    # No serializers: requests and responses travel as raw bytes.
    raw: Any = channel
    if kind == (False, False):
        await raw.unary_unary(path)(b"", timeout=CALL_DEADLINE_S)
    elif kind == (False, True):
        async for _ in raw.unary_stream(path)(b"", timeout=CALL_DEADLINE_S):
            pass
    elif kind == (True, False):
        await raw.stream_unary(path)(iter([b""]), timeout=CALL_DEADLINE_S)
    else:
        async for _ in raw.stream_stream(path)(iter([b""]), timeout=CALL_DEADLINE_S):
            pass
