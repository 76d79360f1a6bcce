"""An Agent Card served over plain HTTP, for an A2A agent whose own card is not (a
Switchboard process reached without its edge: its card comes from GetExtendedAgentCard
and names the process's gRPC interface and tenant)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from a2a.types import a2a_pb2 as a2a
from google.protobuf import json_format


@contextlib.asynccontextmanager
async def card_server(card: a2a.AgentCard) -> AsyncIterator[str]:
    """``card`` as JSON at every path of an HTTP server on a free loopback port; its URL."""
    body = json_format.MessageToJson(card).encode()

    async def answer_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer_one, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/.well-known/agent-card.json"
    finally:
        server.close()
        await server.wait_closed()
