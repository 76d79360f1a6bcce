"""Registers a servicer's methods from its service descriptor.

Each method gets the handler type its descriptor declares (unary, server
streaming, client streaming, bidirectional), so a streaming RPC added to a
contract can never be registered as unary by a hand-written table. Methods a
servicer answers with bytes it serialized itself (a cached context window,
event batches framed once for every subscriber) are named in
``preserialized``: their responses are sent as they are.

A request that can carry JSON values (``google.protobuf.Struct``, ``Value``,
``ListValue``) is measured before its method sees it: at most
``jsonbounds.MAX_DEPTH`` JSON levels, or INVALID_ARGUMENT naming the field.
protobuf alone lets a client send about 32 levels, which the server then
embeds deeper (a message in its event, in a subscriber's batch): past the 100
message levels every decoder stops at, one client's message would break
every subscriber of its workspace.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import (
    FieldDescriptor,
    MethodDescriptor,
    ServiceDescriptor,
)
from google.protobuf.message import Message
from grpc import aio

from switchboard.platform.errors import FieldViolation, InvalidArgument
from switchboard.platform.jsonbounds import MAX_DEPTH, JsonRejected, carries_json, check_message


def _identity(frame: bytes) -> bytes:
    return frame


def check_depth(request: Message) -> None:
    """INVALID_ARGUMENT naming the first top-level field whose JSON values nest too deep."""
    try:
        check_message(request)
    except JsonRejected:
        field = next(
            (
                described.name
                for described, value in request.ListFields()
                if described.type == FieldDescriptor.TYPE_MESSAGE and _too_deep(value, described)
            ),
            "",
        )
        reason = f"its JSON values nest deeper than {MAX_DEPTH} levels"
        raise InvalidArgument(
            f"{field or 'the request'}: {reason}", [FieldViolation(field or "request", reason)]
        ) from None


def _too_deep(value: Any, field: FieldDescriptor) -> bool:
    kind = field.message_type
    is_map = kind is not None and kind.GetOptions().map_entry
    items = value.values() if is_map else value if field.is_repeated else [value]
    for item in items:
        if not isinstance(item, Message):
            continue
        try:
            check_message(item)
        except JsonRejected:
            return True
    return False


def _checked(method: MethodDescriptor, behaviour: Callable[..., Any]) -> Callable[..., Any]:
    """``behaviour``, its requests' JSON depth checked first (see the module doc)."""
    if not carries_json(method.input_type):
        return behaviour
    if method.client_streaming:

        async def frames(requests: AsyncIterator[Message]) -> AsyncIterator[Message]:
            async for request in requests:
                check_depth(request)
                yield request

        def streamed(requests: AsyncIterator[Message], context: Any) -> Any:
            return behaviour(frames(requests), context)

        return streamed
    if method.server_streaming:

        async def server_stream(request: Message, context: Any) -> AsyncIterator[Any]:
            check_depth(request)
            async for response in behaviour(request, context):
                yield response

        return server_stream

    async def unary(request: Message, context: Any) -> Any:
        check_depth(request)
        return await behaviour(request, context)

    return unary


def _handler(
    method: MethodDescriptor,
    behaviour: Callable[..., Any],
    raw: bool,
    check_json_depth: bool = True,
) -> Any:
    if check_json_depth:
        behaviour = _checked(method, behaviour)
    request: Any = message_factory.GetMessageClass(method.input_type)
    response: Any = message_factory.GetMessageClass(method.output_type)
    serializer = _identity if raw else response.SerializeToString
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(method.client_streaming, method.server_streaming)]
    return make(behaviour, request_deserializer=request.FromString, response_serializer=serializer)


def register(
    server: aio.Server,
    service: ServiceDescriptor,
    servicer: object,
    *,
    preserialized: Collection[str] = (),
    check_json_depth: bool = True,
) -> None:
    """Serve every method of ``service`` with ``servicer``'s method of the same name."""
    unknown = set(preserialized) - {method.name for method in service.methods}
    if unknown:
        raise ValueError(f"{service.full_name} has no methods {sorted(unknown)}")
    handlers = {
        method.name: _handler(
            method,
            getattr(servicer, method.name),
            method.name in preserialized,
            check_json_depth,
        )
        for method in service.methods
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)  # type: ignore[attr-defined]
