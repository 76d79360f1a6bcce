"""NaN, Infinity and -Infinity in a client's request are refused before anything runs.

JSON has no such numbers, yet protobuf carries them in a ``Value`` or a ``double``
field. Accepted once (a memory item's metadata ``{"n": NaN}``), one was written as
invalid JSON beside a passage and broke every metadata-filtered search of its
workspace, and blocked a webhook's queue. Now every request of every service whose
type can hold one is checked (``platform/rpc/registration.py``; A2A's servicer
checks its own): INVALID_ARGUMENT with a field violation naming the path to the
number, and nothing stored.

The fields are found by walking the request descriptors of every method the mesh
serves (``switchboard.mesh.SERVICES`` and their companions), not listed by hand: a
field added to a contract tomorrow is covered by the same sweep.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from a2a.types import a2a_pb2 as a2a
from google.protobuf import message_factory, struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from grpc import aio

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as dpb
from switchboard.api.handler.v1 import handler_pb2 as hpb
from switchboard.api.integration.v1 import integration_pb2 as ipb
from switchboard.api.integration.v1 import integration_pb2_grpc
from switchboard.mesh import COMPANIONS, SERVICES
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.security.access import rule_for
from tests.a2a.test_a2a import stub as a2a_stub
from tests.conftest import CALL_DEADLINE_S
from tests.kits.authkit import reasons
from tests.kits.contextkit import (
    World,
    context_stub,
    create_conversation,
    ctx_world,
    refused,
    tap,
    violations,
)
from tests.kits.dispatchkit import dispatcher_stub

pytestmark = pytest.mark.service

NUMBERS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
JSON_TYPES = {"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"}
FLOATS = {FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT}
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@dataclass(frozen=True)
class Target:
    """A place in ``method``'s request that can hold a number: the fields down to it."""

    method: MethodDescriptor
    steps: tuple[FieldDescriptor, ...]

    def __str__(self) -> str:
        path = ".".join(step.name for step in self.steps)
        return f"{self.method.containing_service.name}.{self.method.name}:{path}"


def _targets_in(
    kind: Descriptor, steps: tuple[FieldDescriptor, ...], seen: frozenset[str]
) -> Iterator[tuple[FieldDescriptor, ...]]:
    for field in kind.fields:
        here = (*steps, field)
        if field.type in FLOATS:
            yield here
            continue
        target = field.message_type
        if field.type != FieldDescriptor.TYPE_MESSAGE or target is None:
            continue
        if target.GetOptions().map_entry:
            value = target.fields_by_name["value"]
            if value.type in FLOATS or (
                value.message_type is not None and value.message_type.full_name in JSON_TYPES
            ):
                yield here
            elif value.message_type is not None and value.message_type.full_name not in seen:
                # A map of messages: its value's fields, below one key.
                for inner in _targets_in(
                    value.message_type, (), seen | {value.message_type.full_name}
                ):
                    yield (*here, *inner)
            continue
        if target.full_name in JSON_TYPES:
            yield here
        elif target.full_name not in seen:
            yield from _targets_in(target, here, seen | {target.full_name})


def targets() -> list[Target]:
    """Every place a number can go in every request the mesh serves."""
    services = [descriptor for descriptor, _, _ in SERVICES.values()]
    services += [companion for companions in COMPANIONS.values() for companion in companions]
    found = []
    for service in services:
        for method in service.methods:
            kind = method.input_type
            for steps in _targets_in(kind, (), frozenset({kind.full_name})):
                found.append(Target(method, steps))
    return found


def _plant(kind: Descriptor, steps: tuple[FieldDescriptor, ...], number: float) -> tuple[Any, str]:
    """A ``kind`` request with ``number`` at the end of ``steps``, and the path to it."""
    request = message_factory.GetMessageClass(kind)()
    message: Any = request
    path: list[str] = []
    for index, field in enumerate(steps):
        last = index == len(steps) - 1
        name = field.name
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            container = getattr(message, name)
            path.append(f"{name}.k")
            value = entry.fields_by_name["value"]
            if value.type in FLOATS:
                container["k"] = number
                return request, ".".join(path)
            message = container["k"]
            if last:
                return request, _fill(message, number, path)
            continue
        if field.type in FLOATS:
            if field.is_repeated:
                getattr(message, name).append(number)
                path.append(f"{name}[0]")
            else:
                setattr(message, name, number)
                path.append(name)
            return request, ".".join(path)
        if field.is_repeated:
            message = getattr(message, name).add()
            path.append(f"{name}[0]")
        else:
            message = getattr(message, name)
            message.SetInParent()
            path.append(name)
        if last:
            return request, _fill(message, number, path)
    raise AssertionError(f"no number planted along {[s.name for s in steps]}")


def _fill(value: Message, number: float, path: list[str]) -> str:
    """``number`` inside a JSON value, one level down (``.n`` or ``[0]``); the path."""
    kind = value.DESCRIPTOR.full_name
    if kind == "google.protobuf.Struct":
        value.fields["n"].number_value = number  # type: ignore[attr-defined]
        return ".".join(path) + ".n"
    if kind == "google.protobuf.ListValue":
        value.values.add().number_value = number  # type: ignore[attr-defined]
        return ".".join(path) + "[0]"
    value.struct_value.fields["n"].number_value = number  # type: ignore[attr-defined]
    return ".".join(path) + ".n"


def _path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def _named(method: MethodDescriptor, request: Any, resource: str) -> None:
    """``resource`` in the field the method's access rule reads (authorization runs
    first, and needs a name in a workspace the caller owns)."""
    rule = rule_for(_path(method))
    if rule is None or not rule.resource_field:
        return
    *outer, last = rule.resource_field.split(".")
    holder = request
    for part in outer:
        holder = getattr(holder, part)
    setattr(holder, last, resource)


async def call(channel: aio.Channel, method: MethodDescriptor, request: Message, md: Any) -> None:
    """``request`` to ``method`` (one frame of a client stream), to its first answer."""
    path = _path(method)
    encode = type(request).SerializeToString
    decode = message_factory.GetMessageClass(method.output_type).FromString
    stream: aio.StreamStreamCall[Any, Any] | aio.UnaryStreamCall[Any, Any]
    if method.client_streaming:

        async def frames() -> AsyncIterator[Message]:
            yield request

        stream = channel.stream_stream(path, encode, decode)(
            frames(), metadata=md, timeout=CALL_DEADLINE_S
        )
    elif method.server_streaming:
        stream = channel.unary_stream(path, encode, decode)(
            request, metadata=md, timeout=CALL_DEADLINE_S
        )
    else:
        await channel.unary_unary(path, encode, decode)(
            request, metadata=md, timeout=CALL_DEADLINE_S
        )
        return
    async for _ in stream:
        break


@pytest.fixture
async def world(mesh: SwitchboardServer) -> AsyncIterator[tuple[aio.Channel, World, str]]:
    async with aio.insecure_channel(mesh.address) as channel:
        made = await ctx_world(mesh, context_stub(channel))
        conversation = await create_conversation(context_stub(channel), made.editor, made.name)
        yield channel, made, conversation.name


def test_the_sweep_reaches_every_field_the_issue_names() -> None:
    """The descriptor walk finds the fields of the issue (and so would a new one)."""
    found = {str(target) for target in targets()}
    for expected in [
        "ContextService.AppendMessage:message.parts.data",
        "ContextService.AppendMessage:message.parts.tool_call.arguments",
        "ContextService.CreateMemoryItem:memory_item.metadata",
        "ContextService.UpdateMemoryItem:memory_item.metadata",
        "ContextService.StartUpload:file.metadata",
        "ContextService.UploadFile:header.file.metadata",
        "ContextService.CreateConversation:conversation.metadata",
        "DispatcherService.SendMessage:parameters",
        "DispatcherService.Converse:send_message.message.parts.data",
        "DispatcherService.SteerRun:message.metadata",
        "DispatcherService.CreateAssistant:assistant.model.temperature",
        "DispatcherService.UpdateAssistant:assistant.model.top_p",
        "IntegrationService.CreateIntegration:integration.config",
        "IntegrationService.InvokeTool:arguments",
        "A2AService.SendMessage:message.parts.data",
        "A2AService.SendStreamingMessage:metadata",
    ]:
        assert expected in found, expected


async def test_every_field_refuses_nan_and_both_infinities_naming_the_path(
    mesh: SwitchboardServer, world: tuple[aio.Channel, World, str]
) -> None:
    channel, made, conversation = world
    wrong: list[str] = []
    with tap(mesh) as events:
        for target in targets():
            for label, number in NUMBERS.items():
                request, path = _plant(target.method.input_type, target.steps, number)
                _named(target.method, request, conversation)
                try:
                    await call(channel, target.method, request, made.owner.md)
                except aio.AioRpcError as error:
                    named = violations(error) if error.code() == INVALID else []
                    if error.code() != INVALID or named != [path]:
                        wrong.append(f"{target} {label}: {error.code().name} {named} {path}")
                else:
                    wrong.append(f"{target} {label}: accepted")
        stored = events.take()
    assert wrong == [], "\n".join(wrong)
    assert stored == []


def nan_struct(**values: Any) -> struct_pb2.Struct:
    made = struct_pb2.Struct()
    made.update(values)
    return made


async def test_a_memory_item_a_message_and_a_file_with_nan_are_refused_and_not_stored(
    mesh: SwitchboardServer, world: tuple[aio.Channel, World, str]
) -> None:
    """The issue's case: each of these was accepted; each is refused naming the key, and
    the same request with finite numbers is stored (so nothing else refused it)."""
    channel, made, conversation = world
    stub = context_stub(channel)
    bad = nan_struct(n=math.nan, big=math.inf, topic="x")
    good = nan_struct(n=1.5, big=1e300, topic="x")

    def memory(meta: struct_pb2.Struct) -> cpb.CreateMemoryItemRequest:
        item = cpb.MemoryItem(kind=cpb.MEMORY_KIND_FACT, content="heron", metadata=meta)
        return cpb.CreateMemoryItemRequest(parent=made.name, memory_item=item)

    def message(meta: struct_pb2.Struct) -> cpb.AppendMessageRequest:
        parts = [cpb.ContentPart(text="see"), cpb.ContentPart(data=meta)]
        return cpb.AppendMessageRequest(
            parent=conversation, message=cpb.Message(role=cpb.MESSAGE_ROLE_USER, parts=parts)
        )

    def upload(meta: struct_pb2.Struct) -> cpb.StartUploadRequest:
        file = cpb.File(display_name="a.txt", media_type="text/plain", size_bytes=3, metadata=meta)
        return cpb.StartUploadRequest(parent=made.name, file=file)

    error = await refused(
        stub.CreateMemoryItem(memory(bad), metadata=made.editor.md, timeout=CALL_DEADLINE_S),
        INVALID,
    )
    # The first key in order: "big" (Infinity) before "n" (NaN).
    assert violations(error) == ["memory_item.metadata.big"]
    error = await refused(
        stub.AppendMessage(message(bad), metadata=made.editor.md, timeout=CALL_DEADLINE_S), INVALID
    )
    assert violations(error) == ["message.parts[1].data.big"]
    error = await refused(
        stub.StartUpload(upload(bad), metadata=made.editor.md, timeout=CALL_DEADLINE_S), INVALID
    )
    assert violations(error) == ["file.metadata.big"]
    listed = await stub.ListMemoryItems(
        cpb.ListMemoryItemsRequest(parent=made.name),
        metadata=made.editor.md,
        timeout=CALL_DEADLINE_S,
    )
    assert list(listed.memory_items) == []
    messages = await stub.ListMessages(
        cpb.ListMessagesRequest(parent=conversation),
        metadata=made.editor.md,
        timeout=CALL_DEADLINE_S,
    )
    assert list(messages.messages) == []
    # Finite: the same requests are served.
    await stub.CreateMemoryItem(memory(good), metadata=made.editor.md, timeout=CALL_DEADLINE_S)
    await stub.AppendMessage(message(good), metadata=made.editor.md, timeout=CALL_DEADLINE_S)
    await stub.StartUpload(upload(good), metadata=made.editor.md, timeout=CALL_DEADLINE_S)


async def test_a_nan_deep_in_a_list_and_a_quoted_key_are_named_exactly(
    world: tuple[aio.Channel, World, str],
) -> None:
    channel, made, conversation = world
    stub = dispatcher_stub(channel)
    request = dpb.SendMessageRequest(
        conversation=conversation,
        message=cpb.Message(role=cpb.MESSAGE_ROLE_USER, parts=[cpb.ContentPart(text="hi")]),
    )
    request.parameters.update({"a": [1, {"b c": [2, -math.inf]}]})
    error = await refused(
        stub.SendMessage(request, metadata=made.editor.md, timeout=CALL_DEADLINE_S), INVALID
    )
    assert violations(error) == ['parameters.a[1]["b c"][1]']


async def test_an_assistant_and_an_integration_with_nan_are_refused(
    world: tuple[aio.Channel, World, str],
) -> None:
    channel, made, _ = world
    assistant = dpb.Assistant(display_name="A", model=hpb.ModelSettings(temperature=math.nan))
    error = await refused(
        dispatcher_stub(channel).CreateAssistant(
            dpb.CreateAssistantRequest(parent=made.name, assistant=assistant),
            metadata=made.owner.md,
            timeout=CALL_DEADLINE_S,
        ),
        INVALID,
    )
    assert violations(error) == ["assistant.model.temperature"]
    integration = ipb.Integration(display_name="hook", config=nan_struct(limit=math.inf))
    error = await refused(
        integration_pb2_grpc.IntegrationServiceStub(channel).CreateIntegration(
            ipb.CreateIntegrationRequest(parent=made.name, integration=integration),
            metadata=made.owner.md,
            timeout=CALL_DEADLINE_S,
        ),
        INVALID,
    )
    assert violations(error) == ["integration.config.limit"]


async def test_an_a2a_caller_gets_invalid_params_in_its_own_terms(
    world: tuple[aio.Channel, World, str],
) -> None:
    channel, made, _ = world
    request = a2a.SendMessageRequest(
        tenant=f"{made.id}.nobody",
        message=a2a.Message(message_id="m1", role=a2a.ROLE_USER, parts=[a2a.Part(text="hi")]),
    )
    request.message.parts.add().data.struct_value.update({"rows": [1, math.nan]})
    error = await refused(
        a2a_stub(channel).SendMessage(request, metadata=made.editor.md, timeout=CALL_DEADLINE_S),
        INVALID,
    )
    assert violations(error) == ["message.parts[1].data.rows[1]"]
    assert reasons(error)[0] == ("a2a-protocol.org", "INVALID_PARAMS")
