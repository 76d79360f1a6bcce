"""Registers a servicer's methods from its service descriptor.

Each method gets the handler type its descriptor declares (unary, server
streaming, client streaming, bidirectional), so a streaming RPC added to a
contract can never be registered as unary by a hand-written table. Methods a
servicer answers with bytes it serialized itself (a cached context window,
event batches framed once for every subscriber) are named in
``preserialized``: their responses are sent as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from grpc import aio


def _identity(frame: bytes) -> bytes:
    return frame


def _handler(method: MethodDescriptor, behaviour: Callable[..., Any], raw: bool) -> Any:
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
) -> None:
    """Serve every method of ``service`` with ``servicer``'s method of the same name."""
    unknown = set(preserialized) - {method.name for method in service.methods}
    if unknown:
        raise ValueError(f"{service.full_name} has no methods {sorted(unknown)}")
    handlers = {
        method.name: _handler(method, getattr(servicer, method.name), method.name in preserialized)
        for method in service.methods
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)  # type: ignore[attr-defined]
