"""A client's JSON values are measured before any method sees them.

protobuf lets a request carry a ``Struct`` about 32 JSON levels deep; the server
then embeds it deeper (a message in its MESSAGE_CREATED event, in a subscriber's
batch), past the 100 message levels every decoder stops at, so one client's message
would have broken every subscriber of its workspace. Now more than
``jsonbounds.MAX_DEPTH`` levels is INVALID_ARGUMENT naming the field, on unary,
server-streaming and bidirectional methods alike; at the limit it is served, and a
subscriber decodes the event that carries it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from grpc import aio

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as dpb
from switchboard.api.events.v1 import events_pb2
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.values.jsonbounds import MAX_DEPTH
from tests.conftest import CALL_DEADLINE_S
from tests.kits.contextkit import append, context_stub, create_conversation, ctx_world, violations
from tests.kits.dispatchkit import dispatcher_stub
from tests.kits.eventkit import Subscriber

pytestmark = pytest.mark.service


def nested(levels: int) -> struct_pb2.Struct:
    """A Struct ``levels`` JSON levels deep: {"a": {"a": ... {"leaf": 1}}}."""
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(levels - 1):
        value = {"a": value}
    made = struct_pb2.Struct()
    made.update(value)
    return made


def with_data(levels: int) -> cpb.Message:
    return cpb.Message(
        role=cpb.MESSAGE_ROLE_USER,
        parts=[cpb.ContentPart(text="see data"), cpb.ContentPart(data=nested(levels))],
    )


@pytest.fixture
async def world(mesh: SwitchboardServer) -> AsyncIterator[tuple[aio.Channel, Any, str]]:
    async with aio.insecure_channel(mesh.address) as channel:
        made = await ctx_world(mesh, context_stub(channel))
        conversation = await create_conversation(context_stub(channel), made.editor, made.name)
        yield channel, made, conversation.name


async def test_a_message_too_deep_is_refused_naming_the_field(
    world: tuple[aio.Channel, Any, str],
) -> None:
    channel, made, conversation = world
    with pytest.raises(aio.AioRpcError) as refused:
        await append(
            context_stub(channel), made.editor, conversation, message=with_data(MAX_DEPTH + 6)
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(refused.value) == ["message"]


async def test_at_the_limit_it_is_stored_and_a_subscriber_decodes_its_event(
    world: tuple[aio.Channel, Any, str],
) -> None:
    channel, made, conversation = world
    subscriber = Subscriber(
        channel,
        made.editor.token,
        scopes=[events_pb2.Scope(conversation=conversation)],
        types=[events_pb2.EVENT_TYPE_MESSAGE_CREATED],
    )
    await subscriber.live()
    stored = await append(
        context_stub(channel), made.editor, conversation, message=with_data(MAX_DEPTH)
    )
    (event,) = await subscriber.until(1)
    assert event.message_created.message.name == stored.name
    assert event.message_created.message.parts[1].data == nested(MAX_DEPTH)
    subscriber.cancel()


async def test_a_run_request_too_deep_is_refused_on_unary_and_bidirectional_calls(
    world: tuple[aio.Channel, Any, str],
) -> None:
    channel, made, conversation = world
    stub = dispatcher_stub(channel)
    deep = dpb.SendMessageRequest(conversation=conversation, message=with_data(1))
    deep.parameters.CopyFrom(nested(MAX_DEPTH + 1))
    with pytest.raises(aio.AioRpcError) as refused:
        await stub.SendMessage(deep, metadata=made.editor.md, timeout=CALL_DEADLINE_S)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(refused.value) == ["parameters"]

    async def frames() -> AsyncIterator[dpb.ConverseRequest]:
        yield dpb.ConverseRequest(send_message=deep)

    call = stub.Converse(frames(), metadata=made.editor.md, timeout=CALL_DEADLINE_S)
    with pytest.raises(aio.AioRpcError) as ended:
        async for _ in call:
            pass
    assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(ended.value) == ["send_message"]


def test_why_protobuf_alone_is_not_enough() -> None:
    """At 32 levels a request still decodes, but the event that carries it to a
    subscriber does not: this is what the limit keeps out."""
    request = cpb.AppendMessageRequest(message=with_data(32))
    assert cpb.AppendMessageRequest.FromString(request.SerializeToString()) == request
    batch = events_pb2.SubscribeResponse()
    batch.batch.events.add().message_created.message.CopyFrom(with_data(32))
    with pytest.raises(DecodeError):
        events_pb2.SubscribeResponse.FromString(batch.SerializeToString())
