"""Server reflection lists and describes every service, over v1 and v1alpha."""

from __future__ import annotations

import pytest
from google.protobuf import descriptor_pb2
from grpc import aio
from grpc_reflection.v1alpha import reflection_pb2

from tests.conftest import CALL_DEADLINE_S
from tests.platform.rpc.test_health import SERVED

pytestmark = pytest.mark.service

EXPECTED = {
    *SERVED,
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
}


def _reflection_call(
    channel: aio.Channel, version: str
) -> aio.StreamStreamMultiCallable[
    reflection_pb2.ServerReflectionRequest, reflection_pb2.ServerReflectionResponse
]:
    # v1 and v1alpha are the same messages on the wire, so one pair of classes serves both.
    return channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )


async def _ask(
    channel: aio.Channel, version: str, request: reflection_pb2.ServerReflectionRequest
) -> reflection_pb2.ServerReflectionResponse:
    call = _reflection_call(channel, version)(iter([request]), timeout=CALL_DEADLINE_S)
    async for reply in call:
        return reply
    raise AssertionError("reflection stream ended without a reply")


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_lists_every_service(channel: aio.Channel, version: str) -> None:
    reply = await _ask(channel, version, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in reply.list_services_response.service}
    assert names == EXPECTED


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
@pytest.mark.parametrize("service", sorted(EXPECTED))
async def test_describes_every_service(channel: aio.Channel, version: str, service: str) -> None:
    reply = await _ask(
        channel, version, reflection_pb2.ServerReflectionRequest(file_containing_symbol=service)
    )
    assert reply.WhichOneof("message_response") == "file_descriptor_response"
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in reply.file_descriptor_response.file_descriptor_proto
    ]
    package, _, short = service.rpartition(".")
    declaring = [f for f in files if f.package == package]
    assert declaring, f"no file for package {package}"
    assert short in {s.name for f in declaring for s in f.service}


async def test_unknown_symbol_is_an_error_response(channel: aio.Channel) -> None:
    reply = await _ask(
        channel, "v1", reflection_pb2.ServerReflectionRequest(file_containing_symbol="no.Such")
    )
    assert reply.WhichOneof("message_response") == "error_response"
