"""Registers a servicer's methods from its service descriptor.

Each method gets the handler type its descriptor declares (unary, server
streaming, client streaming, bidirectional), so a streaming RPC added to a
contract can never be registered as unary by a hand-written table. Methods a
servicer answers with bytes it serialized itself (a cached context window,
event batches framed once for every subscriber) are named in
``preserialized``: their responses are sent as they are.

A request that can carry JSON values (``google.protobuf.Struct``, ``Value``,
``ListValue``) or floats is checked before its method sees it
(``check_json``), or INVALID_ARGUMENT naming the field:

* at most ``jsonbounds.MAX_DEPTH`` JSON levels. protobuf alone lets a client
  send about 32 levels, which the server then embeds deeper (a message in its
  event, in a subscriber's batch): past the 100 message levels every decoder
  stops at, one client's message would break every subscriber of its
  workspace.
* every number finite: no NaN, infinity or minus infinity in a ``Value`` or a
  ``double``/``float`` field. JSON has none of them, and what is stored is
  written as JSON later (a passage's metadata that search filters with SQL's
  JSON functions, a webhook's body): one editor's NaN would break every
  filtered search of a workspace and block a webhook's queue.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Collection
from typing import Any, Final

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import (
    MethodDescriptor,
    ServiceDescriptor,
)
from google.protobuf.message import Message
from grpc import aio

from switchboard.platform.errors import FieldViolation, InvalidArgument, field_root
from switchboard.platform.values.jsonbounds import (
    MAX_DEPTH,
    JsonRejected,
    check_message,
    checks,
    locate,
)


def _identity(frame: bytes) -> bytes:
    return frame


#: The violation's description of a number that is not finite.
NOT_FINITE: Final = "must be a finite number (JSON has no NaN or infinity)"


def check_json(request: Message) -> None:
    """INVALID_ARGUMENT if the request's JSON values nest too deep (naming the top-level
    field that holds them) or a number in it is not finite (naming the path to it:
    ``memory_item.metadata.n``, ``message.parts[0].data.big``)."""
    try:
        check_message(request)
    except JsonRejected:
        found = locate(request)
        if found is None:  # pragma: no cover - locate walks what check_message walked
            raise
        path, rejected = found
        if rejected.problem == "number":
            raise InvalidArgument(
                f"{path} {NOT_FINITE}", [FieldViolation(path, NOT_FINITE)]
            ) from None
        # The top-level field: the path to where it passed the limit is as deep as the limit.
        name = field_root(path)
        reason = f"its JSON values nest deeper than {MAX_DEPTH} levels"
        raise InvalidArgument(
            f"{name or 'the request'}: {reason}", [FieldViolation(name or "request", reason)]
        ) from None


def _checked(method: MethodDescriptor, behaviour: Callable[..., Any]) -> Callable[..., Any]:
    """``behaviour``, its requests' JSON values and numbers checked first (see the module
    doc)."""
    if not checks(method.input_type):
        return behaviour
    if method.client_streaming:

        async def frames(requests: AsyncIterator[Message]) -> AsyncIterator[Message]:
            async for request in requests:
                check_json(request)
                yield request

        def streamed(requests: AsyncIterator[Message], context: Any) -> Any:
            return behaviour(frames(requests), context)

        return streamed
    if method.server_streaming:

        async def server_stream(request: Message, context: Any) -> AsyncIterator[Any]:
            check_json(request)
            async for response in behaviour(request, context):
                yield response

        return server_stream

    async def unary(request: Message, context: Any) -> Any:
        check_json(request)
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
