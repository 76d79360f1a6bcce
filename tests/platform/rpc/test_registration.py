"""Registration follows the descriptor: every method of every contract gets the
handler type its streaming flags declare, and pre-serialized methods send bytes."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf.descriptor import ServiceDescriptor

from switchboard.mesh import SERVICES
from switchboard.platform.rpc import registration

pytestmark = pytest.mark.unit


def _methods() -> list[tuple[ServiceDescriptor, Any]]:
    return [(service, method) for service, _, _ in SERVICES.values() for method in service.methods]


@pytest.mark.parametrize(
    ("service", "method"), _methods(), ids=lambda v: getattr(v, "full_name", "")
)
def test_each_method_gets_the_handler_its_descriptor_declares(
    service: ServiceDescriptor, method: Any
) -> None:
    handler = registration._handler(method, lambda *_: None, raw=False)
    assert handler.request_streaming is method.client_streaming
    assert handler.response_streaming is method.server_streaming
    request = handler.request_deserializer(b"")
    assert request.DESCRIPTOR is method.input_type


def test_every_contract_has_a_streaming_rpc_registered_as_streaming() -> None:
    """The case that went wrong: a streaming RPC in a service whose table was unary-only."""
    streaming = [m.full_name for _, m in _methods() if m.server_streaming]
    assert "switchboard.api.integration.v1.IntegrationService.WatchIntegrations" in streaming
    assert "switchboard.api.events.v1.EventService.Stream" in streaming


def test_preserialized_methods_send_their_bytes_as_they_are() -> None:
    service, preserialized, _ = SERVICES["events"]
    method = service.methods_by_name["Subscribe"]
    assert "Subscribe" in preserialized
    handler = registration._handler(method, lambda *_: None, raw=True)
    assert handler.response_serializer(b"\x0a\x00") == b"\x0a\x00"


def test_a_preserialized_name_that_is_not_a_method_is_refused() -> None:
    service, _, _ = SERVICES["context"]
    with pytest.raises(ValueError, match="no methods"):
        registration.register(None, service, object(), preserialized={"NoSuchMethod"})  # type: ignore[arg-type]
