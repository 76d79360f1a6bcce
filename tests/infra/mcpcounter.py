"""A counting MCP server (the `mcp` SDK) for the durable-run fault test: it honours
idempotency keys the way a tool author is asked to (docs/integration.md,
"Idempotency keys") and says what it saw.

Run as a process: ``python -m tests.infra.mcpcounter PORT`` serves streamable HTTP
on ``http://127.0.0.1:PORT/mcp`` and prints ``listening on <port>``;
``McpCounterServer`` starts it from a test (``McpTestServer``'s life cycle).

Tools, both ``(text)``: ``count_safe`` and ``count_once``. Each call is recorded
under the key in its request's ``_meta["dev.switchboard/idempotency-key"]``
("" when it carries none). The first call with a key does the tool's effect (a
count) and its answer, ``<tool>-ok:<text>``, is kept: a later call with the same
key does nothing and gets the same answer. Every call then takes ``DELAY_S``
(``MCP_COUNTER_DELAY_S``), so a crash of its caller can find it in flight.

``GET /stats`` answers JSON: ``calls`` and ``effects`` (tool -> key -> count),
``answers`` (key -> the text answered) and ``in_flight`` (tool -> the keys of
the calls it is answering now).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections import defaultdict
from typing import Any, Final

import anyio
import mcp_types as types
import uvicorn
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import Server
from mcp.shared.exceptions import MCPError
from starlette.types import ASGIApp, Receive, Scope, Send

from tests.infra.mcpserver import McpTestServer, _Announcing

#: Where the key travels (``switchboard.platform.values.idempotency.MCP_META``).
KEY_META: Final = "dev.switchboard/idempotency-key"
TOOLS: Final = ("count_safe", "count_once")
DELAY_S: Final = float(os.environ.get("MCP_COUNTER_DELAY_S", "0.2"))

_TEXT_INPUT: Final[dict[str, Any]] = {
    "type": "object",
    "properties": {"text": {"type": "string"}},
    "required": ["text"],
}


class _Seen:
    def __init__(self) -> None:
        self.calls: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.effects: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.answers: dict[str, str] = {}
        self.in_flight: dict[str, set[str]] = defaultdict(set)

    def json(self) -> bytes:
        return json.dumps(
            {
                "calls": self.calls,
                "effects": self.effects,
                "answers": self.answers,
                "in_flight": {tool: sorted(keys) for tool, keys in self.in_flight.items()},
            }
        ).encode()


SEEN = _Seen()


async def list_tools(
    ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
) -> types.ListToolsResult:
    return types.ListToolsResult(
        tools=[
            types.Tool(name=name, description="Counts once per key.", input_schema=_TEXT_INPUT)
            for name in TOOLS
        ]
    )


async def call_tool(
    ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
) -> types.CallToolResult:
    if params.name not in TOOLS:
        raise MCPError(code=types.INVALID_PARAMS, message=f"Unknown tool: {params.name}")
    key = str((params.meta or {}).get(KEY_META, ""))
    SEEN.calls[params.name][key] += 1
    answer = SEEN.answers.get(key)
    if answer is None:
        # The effect, once per key; recorded on arrival, as a real effect would be
        # done before the answer is.
        SEEN.effects[params.name][key] += 1
        answer = SEEN.answers[key] = f"{params.name}-ok:{(params.arguments or {}).get('text')}"
    SEEN.in_flight[params.name].add(key)
    try:
        await anyio.sleep(DELAY_S)  # the tool's own time: a caller's crash can find it in flight
    finally:
        SEEN.in_flight[params.name].discard(key)
    return types.CallToolResult(content=[types.TextContent(type="text", text=answer)])


class _Stats:
    """``GET /stats`` beside the MCP endpoint."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/stats":
            body = SEEN.json()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await self._app(scope, receive, send)


def main(port: int) -> None:
    server: Server[Any] = Server(
        "switchboard-counter", on_list_tools=list_tools, on_call_tool=call_tool
    )
    app = server.streamable_http_app(host="127.0.0.1")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    config = uvicorn.Config(_Stats(app), log_level="warning", lifespan="on")
    _Announcing(config).run(sockets=[sock])


class McpCounterServer(McpTestServer):
    """``python -m tests.infra.mcpcounter`` in a subprocess."""

    MODULE = "tests.infra.mcpcounter"

    @property
    def stats_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/stats"


if __name__ == "__main__":
    main(int(sys.argv[1]))
