"""Servers that answer with JSON (or protobuf Structs) nested deeper than anyone should read.

- ``nested_objects`` / ``nested_lists``: the text of a document that deep, built
  as text (``json.dumps`` would itself recurse).
- ``NestedMcp``: an MCP server over streamable HTTP (JSON responses, no
  sessions) on a port of its own, in threads of its own, whose ``tools/call``
  answers structured content ``call_depth`` deep and whose ``tools/list``
  gives its one tool (``deep``) an input schema ``schema_depth`` deep. Run as
  ``python -m tests.infra.nestedjson --call-depth N --schema-depth M`` it is
  the same server over stdio (one JSON-RPC message a line), for an operator's
  stdio setting: there the SDK's own parser (pydantic) reads the answers.
- ``NestedExpert``: a HandlerService whose ``Handle`` answers one result with a
  data part nested ``depth`` levels; sent as raw bytes, since building such a
  message in Python makes protobuf refuse it before it is sent.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from google.protobuf import struct_pb2
from grpc import aio

from switchboard.api.handler.v1 import handler_pb2

HANDLER_SERVICE = "switchboard.api.handler.v1.HandlerService"


def nested_objects(depth: int, key: str = "a") -> str:
    """``{"a": {"a": ... 1 ...}}``: ``depth`` objects, one inside the other."""
    return f'{{"{key}":' * depth + "1" + "}" * depth


def nested_lists(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


# -- MCP ---------------------------------------------------------------------------------------


def _answer(message: dict[str, Any], call_depth: int, schema_depth: int) -> str | None:
    """The JSON-RPC response to ``message`` (None for a notification)."""
    if "id" not in message:
        return None
    method = message.get("method")
    if method == "initialize":
        version = message.get("params", {}).get("protocolVersion", "2025-06-18")
        result = json.dumps(
            {
                "protocolVersion": version,
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "nested", "version": "1"},
            }
        )
    elif method == "tools/list":
        schema = '{"type": "object"}'
        if schema_depth:
            schema = '{"type": "object", "x": ' + nested_objects(schema_depth - 1) + "}"
        result = '{"tools": [{"name": "deep", "inputSchema": ' + schema + "}]}"
    elif method == "tools/call":
        structured = nested_objects(call_depth) if call_depth else '{"ok": true}'
        content = '{"content": [{"type": "text", "text": "deep"}], "structuredContent": '
        result = content + structured + "}"
    else:  # ping and anything else
        result = "{}"
    return '{"jsonrpc": "2.0", "id": ' + json.dumps(message["id"]) + ', "result": ' + result + "}"


class NestedMcp:
    """See the module doc; ``url`` is its endpoint, ``calls`` the tools/call it answered."""

    def __init__(self, *, call_depth: int = 0, schema_depth: int = 0) -> None:
        self.call_depth = call_depth
        self.schema_depth = schema_depth
        self.calls = 0
        mcp = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                message = json.loads(self.rfile.read(length))
                if message.get("method") == "tools/call":
                    mcp.calls += 1
                answer = _answer(message, mcp.call_depth, mcp.schema_depth)
                if answer is None:
                    self.send_response(202)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                body = answer.encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self.send_response(405)  # no standalone stream
                self.send_header("content-length", "0")
                self.end_headers()

            def do_DELETE(self) -> None:
                self.do_GET()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/mcp"

    def __enter__(self) -> NestedMcp:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def stdio_setting(server_id: str, *, call_depth: int = 0, schema_depth: int = 0) -> str:
    """``SWITCHBOARD_INTEGRATION_MCP_STDIO_SERVERS`` naming this module as ``server_id``."""
    command = [sys.executable, "-m", "tests.infra.nestedjson"]
    command += ["--call-depth", str(call_depth), "--schema-depth", str(schema_depth)]
    return json.dumps({server_id: {"command": command}})


def _serve_stdio(call_depth: int, schema_depth: int) -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        answer = _answer(json.loads(line), call_depth, schema_depth)
        if answer is not None:
            sys.stdout.write(answer + "\n")
            sys.stdout.flush()


# -- a HandlerService ----------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def deep_result(depth: int) -> bytes:
    """A ``HandleResponse`` whose result has one data part ``depth`` levels deep."""
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    data = struct_pb2.Struct()
    data.update(value)
    # HandleResponse.result (4) > HandleResult.parts (1) > ContentPart.data (2)
    return _field(4, _field(1, _field(2, data.SerializeToString())))


class NestedExpert:
    """A HandlerService on a port of its own; ``Handle`` answers ``deep_result(depth)``."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.handled = 0
        self._server = aio.server()
        self.port = 0

    async def _handle(self, request: bytes, context: Any) -> Any:
        self.handled += 1
        yield deep_result(self.depth)

    async def _capabilities(self, request: bytes, context: Any) -> bytes:
        answer = handler_pb2.GetCapabilitiesResponse(
            capabilities=handler_pb2.HandlerCapabilities(id="deep", display_name="Deep")
        )
        return answer.SerializeToString()

    async def __aenter__(self) -> NestedExpert:
        same = {"request_deserializer": lambda b: b, "response_serializer": lambda b: b}
        handlers = {
            "Handle": grpc.unary_stream_rpc_method_handler(self._handle, **same),
            "GetCapabilities": grpc.unary_unary_rpc_method_handler(self._capabilities, **same),
        }
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(HANDLER_SERVICE, handlers),)
        )
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._server.stop(None)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--call-depth", type=int, default=0)
    parser.add_argument("--schema-depth", type=int, default=0)
    arguments = parser.parse_args()
    _serve_stdio(arguments.call_depth, arguments.schema_depth)
