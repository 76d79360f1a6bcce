"""An MCP server written with the `mcp` SDK, for the connector's failure tests.

Run as a process: ``python -m tests.infra.mcpserver PORT`` serves streamable
HTTP on ``http://127.0.0.1:PORT/mcp`` (``PORT`` 0 picks a free one) and prints
``listening on <port>`` once it accepts connections. ``McpTestServer`` starts
and stops it from a test.

Tools (listed three per page, so every listing takes several pages):

- ``echo(message)``: the message as text and as ``{"echo": message}``.
- ``slow(seconds, tag)``: reports progress four times over ``seconds``; its
  ``tag`` is recorded as it arrives (``stats().started``, once per call) and a
  cancellation under it (``stats().cancelled``).
- ``fail()``: a tool error (``isError``).
- ``big(size)``: ``size`` characters of text.
- ``media(kind)``: ``audio`` (a WAV, base64), ``bad-image`` (image content that
  is not base64) or ``link`` (a resource link).
- ``crash()``: the process kills itself mid-call (the connection drops).
- ``add_tool(name)``: adds a tool and sends ``notifications/tools/list_changed``
  on the session's standalone (GET) stream.
- ``forget_sessions()``: the server forgets every session (their ids answer
  404 from then on), as a restarted server would.
- ``stats()``: what the server saw: ``cancelled`` tags, ``get_streams`` and
  ``initializes`` (POSTs without a session id), ``list_calls``, the last
  ``authorization`` and ``traceparent`` headers (a POST's), and
  ``idempotency_keys``: each call's tool and the idempotency key in its
  ``_meta`` ("" for none), in order, ``stats`` calls left out.
- ``filler1`` .. ``filler4``: more tools, for pagination.
- extra tools from ``McpTestServer(extra_tools=...)`` (the environment variable
  ``MCP_TEST_SERVER_TOOLS``: a JSON list of ``{"name", "input_schema"}``):
  each answers with its name as text and its arguments as structured content.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Self

import anyio
import mcp_types as types
import uvicorn
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import NotificationOptions, Server
from mcp.server.models import InitializationOptions
from mcp.shared.exceptions import MCPError
from starlette.types import ASGIApp, Receive, Scope, Send

from switchboard.platform.values.idempotency import MCP_META
from tests.infra import processlogs

PAGE_SIZE = 3
ROOT = Path(__file__).resolve().parents[2]

_OBJECT: dict[str, Any] = {"type": "object"}
STATIC_TOOLS: list[types.Tool] = [
    types.Tool(
        name="echo",
        description="Echoes the message.",
        input_schema={
            "type": "object",
            "properties": {"message": {"type": "string"}},
            "required": ["message"],
        },
    ),
    types.Tool(
        name="slow",
        title="Slow tool",
        description="Takes its time and reports progress.",
        input_schema={
            "type": "object",
            "properties": {"seconds": {"type": "number"}, "tag": {"type": "string"}},
            "required": ["seconds", "tag"],
        },
    ),
    types.Tool(name="fail", description="Always reports a tool error.", input_schema=_OBJECT),
    types.Tool(
        name="big",
        description="Answers with many characters.",
        input_schema={"type": "object", "properties": {"size": {"type": "integer"}}},
    ),
    types.Tool(name="crash", description="Kills the server mid-call.", input_schema=_OBJECT),
    types.Tool(
        name="media",
        description="Answers with audio, a broken image or a resource link.",
        input_schema={"type": "object", "properties": {"kind": {"type": "string"}}},
    ),
    types.Tool(
        name="add_tool",
        description="Adds a tool and announces the change.",
        input_schema={"type": "object", "properties": {"name": {"type": "string"}}},
    ),
    types.Tool(name="forget_sessions", description="Forgets every session.", input_schema=_OBJECT),
    types.Tool(
        name="stats",
        description="What the server saw.",
        input_schema=_OBJECT,
        output_schema={"type": "object"},
    ),
    *(
        types.Tool(name=f"filler{i}", description="Pads the list.", input_schema=_OBJECT)
        for i in range(1, 4)
    ),
]


def _extra_tools() -> list[types.Tool]:
    given = json.loads(os.environ.get("MCP_TEST_SERVER_TOOLS", "[]"))
    return [
        types.Tool(name=tool["name"], description="Configured.", input_schema=tool["input_schema"])
        for tool in given
    ]


class _State:
    def __init__(self) -> None:
        self.cancelled: list[str] = []
        #: Tags of the ``slow`` calls that reached the server, in arrival order (a call sent
        #: again, with the same tag, is there twice).
        self.started: list[str] = []
        self.extra = _extra_tools()
        self.dynamic: list[str] = []
        self.get_streams = 0
        self.initializes = 0
        self.list_calls = 0
        self.authorization = ""
        self.traceparent = ""
        self.idempotency_keys: list[list[str]] = []
        self.server: Server[Any] | None = None

    def tools(self) -> list[types.Tool]:
        extra = [
            types.Tool(name=name, description="Added at runtime.", input_schema=_OBJECT)
            for name in self.dynamic
        ]
        return [*STATIC_TOOLS, *self.extra, *extra]


STATE = _State()


def _text(text: str) -> list[types.ContentBlock]:
    return [types.TextContent(type="text", text=text)]


#: A WAV header and a few silent samples (16-bit mono, 8 kHz).
WAV = (
    b"RIFF"
    + (44).to_bytes(4, "little")
    + b"WAVEfmt "
    + (16).to_bytes(4, "little")
    + (1).to_bytes(2, "little")
    + (1).to_bytes(2, "little")
    + (8000).to_bytes(4, "little")
    + (16000).to_bytes(4, "little")
    + (2).to_bytes(2, "little")
    + (16).to_bytes(2, "little")
    + b"data"
    + (8).to_bytes(4, "little")
    + bytes(8)
)


def _media(kind: str) -> list[types.ContentBlock]:
    if kind == "audio":
        data = base64.b64encode(WAV).decode()
        return [types.AudioContent(type="audio", data=data, mime_type="audio/wav")]
    if kind == "bad-image":
        return [types.ImageContent(type="image", data="not base64!", mime_type="image/png")]
    return [
        types.ResourceLink(type="resource_link", name="notes", uri="file:///notes.txt"),
        types.TextContent(type="text", text="linked"),
    ]


async def list_tools(
    ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
) -> types.ListToolsResult:
    STATE.list_calls += 1
    tools = STATE.tools()
    start = int(params.cursor) if params is not None and params.cursor else 0
    end = start + PAGE_SIZE
    return types.ListToolsResult(
        tools=tools[start:end], next_cursor=str(end) if end < len(tools) else None
    )


async def call_tool(  # noqa: PLR0912 - one branch per tool
    ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
) -> types.CallToolResult:
    args = params.arguments or {}
    name = params.name
    if name != "stats":
        meta: dict[str, Any] = dict(params.meta or {})
        STATE.idempotency_keys.append([name, str(meta.get(MCP_META, ""))])
    if name not in {tool.name for tool in STATE.tools()}:
        raise MCPError(code=types.INVALID_PARAMS, message=f"Unknown tool: {name}")
    if name in {tool.name for tool in STATE.extra}:
        return types.CallToolResult(content=_text(name), structured_content=dict(args))
    if name == "echo":
        message = str(args["message"])
        return types.CallToolResult(content=_text(message), structured_content={"echo": message})
    if name == "slow":
        tag = str(args["tag"])
        STATE.started.append(tag)
        steps = 4
        try:
            for step in range(1, steps + 1):
                await ctx.session.report_progress(step, steps, f"step {step}")
                await anyio.sleep(float(args["seconds"]) / steps)
        except anyio.get_cancelled_exc_class():
            STATE.cancelled.append(tag)
            raise
        return types.CallToolResult(content=_text(f"slow {tag} done"))
    if name == "fail":
        return types.CallToolResult(content=_text("it broke"), is_error=True)
    if name == "big":
        return types.CallToolResult(content=_text("x" * int(args.get("size", 0))))
    if name == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if name == "media":
        return types.CallToolResult(content=_media(str(args.get("kind", ""))))
    if name == "add_tool":
        STATE.dynamic.append(str(args["name"]))
        await ctx.session.send_tool_list_changed()
        return types.CallToolResult(content=_text("added"))
    if name == "forget_sessions":
        assert STATE.server is not None
        # The transports keep running; only their ids are no longer known.
        STATE.server.session_manager._server_instances.clear()
        return types.CallToolResult(content=_text("forgotten"))
    if name == "stats":
        stats = {
            "cancelled": STATE.cancelled,
            "started": STATE.started,
            "get_streams": STATE.get_streams,
            "initializes": STATE.initializes,
            "list_calls": STATE.list_calls,
            "authorization": STATE.authorization,
            "traceparent": STATE.traceparent,
            "idempotency_keys": STATE.idempotency_keys,
        }
        return types.CallToolResult(content=_text("stats"), structured_content=stats)
    return types.CallToolResult(content=_text(name))


class _Observe:
    """Counts standalone (GET) streams and new sessions, and keeps the last
    Authorization and traceparent headers: what the tests check the client sent."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            if scope["method"] == "GET":
                STATE.get_streams += 1
            elif scope["method"] == "POST":
                if b"mcp-session-id" not in headers:
                    STATE.initializes += 1
                STATE.authorization = headers.get(b"authorization", b"").decode()
                STATE.traceparent = headers.get(b"traceparent", b"").decode()
        await self._app(scope, receive, send)


class _Server(Server[Any]):
    def create_initialization_options(
        self,
        notification_options: NotificationOptions | None = None,
        experimental_capabilities: dict[str, dict[str, Any]] | None = None,
        extensions: dict[str, dict[str, Any]] | None = None,
    ) -> InitializationOptions:
        # Advertise tools.listChanged: add_tool announces its change.
        return super().create_initialization_options(
            notification_options or NotificationOptions(tools_changed=True),
            experimental_capabilities,
            extensions,
        )


def main(port: int) -> None:
    server = _Server("switchboard-test", on_list_tools=list_tools, on_call_tool=call_tool)
    STATE.server = server
    app = server.streamable_http_app(host="127.0.0.1")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # A restart binds the port its predecessor left in TIME_WAIT.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    config = uvicorn.Config(_Observe(app), log_level="warning", lifespan="on")
    _Announcing(config).run(sockets=[sock])


class _Announcing(uvicorn.Server):
    """Says which port it serves once it accepts connections."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        assert sockets is not None
        print(f"listening on {sockets[0].getsockname()[1]}", flush=True)


class McpTestServer:
    """``python -m tests.infra.mcpserver`` in a subprocess, restartable on its port."""

    #: A bound on a hang, never a speed check (as tests/conftest.py's CALL_DEADLINE_S; run
    #: with ``python -m``, this module does not import conftest).
    START_TIMEOUT_S = 60.0
    #: The server's module (``python -m``); a sibling server names its own.
    MODULE = "tests.infra.mcpserver"

    def __init__(self, extra_tools: list[dict[str, Any]] | None = None) -> None:
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None
        self._extra_tools = extra_tools or []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def start(self) -> None:
        """Start the server (again, on the same port, after the first start)."""
        self.kill()
        # Its stderr (uvicorn's warnings, a traceback) is kept if the test fails.
        with processlogs.log_file(self.MODULE.rsplit(".", 1)[-1]).open("wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.MODULE, str(self.port)],
                cwd=ROOT,
                env={**os.environ, "MCP_TEST_SERVER_TOOLS": json.dumps(self._extra_tools)},
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        assert self.proc.stdout is not None
        # readline blocks until the line or EOF; the timeout kills a hung start.
        deadline = time.monotonic() + self.START_TIMEOUT_S
        line = ""
        while not line and time.monotonic() < deadline and self.proc.poll() is None:
            line = self.proc.stdout.readline()
        match = re.fullmatch(r"listening on (\d+)\n", line)
        if match is None:
            self.kill()
            raise RuntimeError(f"the MCP test server did not start: {line!r}")
        self.port = int(match.group(1))

    def kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=self.START_TIMEOUT_S)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


if __name__ == "__main__":
    main(int(sys.argv[1]))
