"""A caller's channel option replaces the default of the same name, in the server's
outbound channels and in the Python client: gRPC takes an option's first value, so
one placed after a default would be silently ignored."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from grpc import aio

from switchboard.client import channel_options
from switchboard.platform.rpc.outbound.channels import CHANNEL_OPTIONS, over_defaults
from tests.conftest import CALL_DEADLINE_S

pytestmark = pytest.mark.unit

_LIMIT = "grpc.max_receive_message_length"


async def _answer_of_1000_bytes(options: list[tuple[str, Any]]) -> grpc.StatusCode:
    class Handler(grpc.GenericRpcHandler):  # type: ignore[type-arg]
        def service(self, details: grpc.HandlerCallDetails) -> Any:
            return grpc.unary_unary_rpc_method_handler(lambda request, context: b"x" * 1000)

    server = aio.server()
    server.add_generic_rpc_handlers([Handler()])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            raw: Any = channel  # bytes in and out: no (de)serializers
            try:
                await raw.unary_unary("/t.T/M")(b"", timeout=CALL_DEADLINE_S)
            except aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK
    finally:
        await server.stop(0)


async def test_grpc_takes_an_options_first_value() -> None:
    # The reason both merges put the caller's options first.
    assert await _answer_of_1000_bytes([(_LIMIT, 10), (_LIMIT, 100_000)]) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert await _answer_of_1000_bytes([(_LIMIT, 100_000), (_LIMIT, 10)]) == grpc.StatusCode.OK


def _first(options: list[tuple[str, Any]] | tuple[tuple[str, Any], ...], name: str) -> Any:
    return next(value for key, value in options if key == name)


def test_an_outbound_channels_option_replaces_the_default() -> None:
    assert _first(CHANNEL_OPTIONS, "grpc.max_reconnect_backoff_ms") != 100
    merged = over_defaults([("grpc.max_reconnect_backoff_ms", 100)], CHANNEL_OPTIONS)
    assert _first(merged, "grpc.max_reconnect_backoff_ms") == 100
    assert [key for key, _ in merged].count("grpc.max_reconnect_backoff_ms") == 1
    # The defaults the caller did not name are all kept.
    assert {key for key, _ in CHANNEL_OPTIONS} <= {key for key, _ in merged}


def test_a_client_option_replaces_the_clients_default() -> None:
    defaults = channel_options()
    assert _first(defaults, "grpc.max_reconnect_backoff_ms") != 100
    merged = channel_options(options=[("grpc.max_reconnect_backoff_ms", 100), (_LIMIT, 10)])
    assert _first(merged, "grpc.max_reconnect_backoff_ms") == 100
    assert _first(merged, _LIMIT) == 10
    assert [key for key, _ in merged].count("grpc.max_reconnect_backoff_ms") == 1
    assert {key for key, _ in defaults} <= {key for key, _ in merged}
