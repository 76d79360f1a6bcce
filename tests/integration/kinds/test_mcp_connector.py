"""The MCP connector against real MCP servers.

- ``@modelcontextprotocol/server-everything`` (the reference server, pinned in
  tests/mcp/package.json) over streamable HTTP and, as an operator-configured
  server, over stdio. A preload (tests/mcp/observe.mjs) makes it write each
  ``notifications/cancelled`` it receives to its stderr.
- tests/infra/mcpserver.py, written with the ``mcp`` SDK, for failures: slow,
  erroring, crashing, forgetful and oversized.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from switchboard.integration.kinds.mcp import McpConnector, StdioServer, parse_stdio_servers
from switchboard.integration.ports.connectors import ToolNotFound, Unreachable
from switchboard.platform.errors import DestinationBlocked, InvalidArgument, ResultTooLarge
from switchboard.platform.security.egress import EgressPolicy
from tests.conftest import CALL_DEADLINE_S
from tests.infra.mcpeverything import EVERYTHING_MAIN, EverythingServer
from tests.infra.mcpserver import McpTestServer

pytestmark = pytest.mark.service

LOOPBACK = EgressPolicy(allow_loopback=True)


async def eventually(
    condition: Callable[[], Any], what: str, timeout_s: float = CALL_DEADLINE_S
) -> Any:
    """Poll ``condition`` until it returns something truthy, or fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        await asyncio.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def everything() -> Iterator[EverythingServer]:
    server = EverythingServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
        server._tmp.cleanup()


@pytest.fixture(scope="module")
def sdk_server() -> Iterator[McpTestServer]:
    with McpTestServer() as server:
        yield server


def connector(url: str, **kwargs: Any) -> McpConnector:
    kwargs.setdefault("egress", LOOPBACK)
    kwargs.setdefault("connect_timeout_s", 10.0)
    return McpConnector(url, **kwargs)


@pytest.fixture
async def everything_http(everything: EverythingServer) -> AsyncIterator[McpConnector]:
    mcp = connector(everything.url)
    try:
        yield mcp
    finally:
        await mcp.close()


@pytest.fixture
async def sdk(sdk_server: McpTestServer) -> AsyncIterator[McpConnector]:
    mcp = connector(sdk_server.url)
    try:
        yield mcp
    finally:
        await mcp.close()


async def stats(mcp: McpConnector) -> dict[str, Any]:
    result = await mcp.call_tool("stats", {}, timeout_s=CALL_DEADLINE_S, max_result_bytes=100_000)
    assert result.structured is not None
    return dict(result.structured)


# -- operator settings ---------------------------------------------------------


def test_parse_stdio_servers_reads_the_operator_setting() -> None:
    text = json.dumps(
        {
            "everything": {"command": ["node", "index.js", "stdio"], "env": {"TOKEN": "x"}},
            "local-tools": {"command": ["/usr/bin/tool"], "cwd": "/srv"},
        }
    )
    assert parse_stdio_servers(text) == {
        "everything": StdioServer(command=("node", "index.js", "stdio"), env={"TOKEN": "x"}),
        "local-tools": StdioServer(command=("/usr/bin/tool",), env={}, cwd="/srv"),
    }
    assert parse_stdio_servers("") == {}


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"Bad_Id": {"command": ["x"]}}',
        '{"a": {"command": ["x"]}}',
        '{"ok-id": {"command": []}}',
        '{"ok-id": {"command": "node server.js"}}',
        '{"ok-id": {"command": ["node", ""]}}',
        '{"ok-id": {"command": ["node"], "env": {"K": 1}}}',
        '{"ok-id": {"command": ["node"], "env": []}}',
        '{"ok-id": {"command": ["node"], "cwd": ""}}',
        '{"ok-id": {"command": ["node"], "shell": true}}',
        '{"ok-id": "node"}',
    ],
)
def test_parse_stdio_servers_refuses_malformed_settings(text: str) -> None:
    with pytest.raises(ValueError, match=r"\S"):
        parse_stdio_servers(text)


def test_an_unconfigured_stdio_server_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="not configured"):
        McpConnector("stdio:anything", egress=LOOPBACK, connect_timeout_s=5)


# -- server-everything over streamable HTTP ------------------------------------


async def test_everything_lists_its_tools(everything_http: McpConnector) -> None:
    await everything_http.probe(timeout_s=CALL_DEADLINE_S)
    tools = {
        tool.name: tool for tool in await everything_http.list_tools(timeout_s=CALL_DEADLINE_S)
    }
    assert {"echo", "get-sum", "trigger-long-running-operation"} <= tools.keys()
    # Registered once the client is initialized, and announced with list_changed.
    assert "simulate-research-query" in tools
    assert tools["echo"].title == "Echo Tool"
    assert tools["echo"].input_schema["properties"]["message"]["type"] == "string"
    assert tools["get-sum"].input_schema["required"] == ["a", "b"]


async def test_everything_echo_and_add(everything_http: McpConnector) -> None:
    echo = await everything_http.call_tool(
        "echo", {"message": "hello"}, timeout_s=CALL_DEADLINE_S, max_result_bytes=10_000
    )
    assert echo.text == "Echo: hello"
    assert not echo.is_error
    total = await everything_http.call_tool(
        "get-sum", {"a": 2, "b": 3}, timeout_s=CALL_DEADLINE_S, max_result_bytes=10_000
    )
    assert total.text == "The sum of 2 and 3 is 5."


async def test_everything_image_comes_back_as_a_file(everything_http: McpConnector) -> None:
    """server-everything's get-tiny-image: text, a PNG, text."""
    result = await everything_http.call_tool(
        "get-tiny-image", {}, timeout_s=CALL_DEADLINE_S, max_result_bytes=100_000
    )
    (image,) = result.files
    assert image.inline_data.startswith(b"\x89PNG\r\n\x1a\n")
    assert (image.mime_type, image.display_name) == ("image/png", "image-1.png")
    assert result.text.splitlines() == [
        "Here's the image you requested:",
        "[image: image-1.png, image/png]",
        "The image above is the MCP logo.",
    ]
    assert not result.is_error
    # The decoded image counts against the result's limit.
    with pytest.raises(ResultTooLarge):
        await everything_http.call_tool(
            "get-tiny-image", {}, timeout_s=CALL_DEADLINE_S, max_result_bytes=len(image.inline_data)
        )


@pytest.mark.parametrize("kind", ["Text", "Blob"])
async def test_everything_embedded_resources_come_back_as_files(
    everything_http: McpConnector, kind: str
) -> None:
    result = await everything_http.call_tool(
        "get-resource-reference",
        {"resourceType": kind, "resourceId": 3},
        timeout_s=CALL_DEADLINE_S,
        max_result_bytes=100_000,
    )
    (found,) = result.files
    assert found.mime_type == "text/plain"
    assert found.display_name == "3.txt"  # the URI's last segment, and the type's extension
    assert found.inline_data.startswith(b"Resource 3: This is a ")
    # A text resource is also text the model reads; a blob is named in the text.
    shown = found.inline_data.decode() if kind == "Text" else "[resource: 3.txt, text/plain]"
    assert shown in result.text


async def test_everything_unknown_tool_is_not_found(everything_http: McpConnector) -> None:
    with pytest.raises(ToolNotFound, match="no-such-tool"):
        await everything_http.call_tool(
            "no-such-tool", {}, timeout_s=CALL_DEADLINE_S, max_result_bytes=1000
        )


async def test_everything_long_running_operation_reports_progress_and_is_cancelled(
    everything: EverythingServer, everything_http: McpConnector
) -> None:
    seen: list[tuple[float, float | None]] = []
    first = asyncio.Event()

    async def progress(value: float, total: float | None, message: str) -> None:
        seen.append((value, total))
        first.set()

    call = asyncio.create_task(
        everything_http.call_tool(
            "trigger-long-running-operation",
            {"duration": 30, "steps": 60},
            timeout_s=60,
            max_result_bytes=10_000,
            progress=progress,
        )
    )
    await asyncio.wait_for(first.wait(), CALL_DEADLINE_S)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert seen[0] == (1.0, 60.0)
    note = await eventually(
        lambda: [line for line in everything.stderr().splitlines() if "observed cancel" in line],
        "server-everything to receive notifications/cancelled",
    )
    assert '"requestId"' in note[-1]


# -- server-everything over stdio (operator-configured) ------------------------


def _children_running(marker: str) -> list[int]:
    """Our child processes whose command line holds ``marker`` (zombies included)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == os.getpid() and marker in cmdline:
            found.append(int(entry.name))
    return found


async def test_everything_over_stdio() -> None:
    marker = f"stdio-{uuid.uuid4().hex}"
    changes: list[int] = []
    server = StdioServer(
        command=("node", str(EVERYTHING_MAIN), "stdio", marker), env={"NODE_NO_WARNINGS": "1"}
    )
    mcp = McpConnector(
        "stdio:everything",
        egress=EgressPolicy(),
        connect_timeout_s=CALL_DEADLINE_S,
        stdio=server,
        on_tools_changed=lambda: changes.append(1),
    )
    try:
        names = {tool.name for tool in await mcp.list_tools(timeout_s=CALL_DEADLINE_S)}
        assert {"echo", "get-sum"} <= names
        result = await mcp.call_tool(
            "echo", {"message": "over stdio"}, timeout_s=CALL_DEADLINE_S, max_result_bytes=1000
        )
        assert result.text == "Echo: over stdio"
        # Over stdio the list_changed sent after initialization always arrives.
        await eventually(lambda: changes, "notifications/tools/list_changed over stdio")
        children = _children_running(marker)
        assert len(children) == 1
    finally:
        await mcp.close()
    # Closed, and reaped: a zombie would still have its /proc entry.
    assert _children_running(marker) == []


# -- the SDK-written server: failures ---------------------------------------------


async def test_tools_list_is_paginated_and_cached_until_list_changed(
    sdk_server: McpTestServer,
) -> None:
    changes: list[int] = []
    mcp = connector(sdk_server.url, on_tools_changed=lambda: changes.append(1))
    try:
        tools = await mcp.list_tools(timeout_s=CALL_DEADLINE_S)
        names = [tool.name for tool in tools]
        # Three tools a page: the listing took four pages.
        assert len(names) == len(set(names)) >= 10
        assert {"echo", "slow", "filler3", "stats"} <= set(names)
        assert next(t for t in tools if t.name == "slow").title == "Slow tool"
        before = (await stats(mcp))["list_calls"]
        await mcp.list_tools(timeout_s=CALL_DEADLINE_S)
        assert (await stats(mcp))["list_calls"] == before

        # The notification arrives on the standalone GET stream: wait until it is open.
        await eventually_async(lambda: _get_stream_open(mcp), "the GET stream")
        name = f"added-{uuid.uuid4().hex[:8]}"
        await mcp.call_tool(
            "add_tool", {"name": name}, timeout_s=CALL_DEADLINE_S, max_result_bytes=1000
        )
        await eventually(lambda: changes, "notifications/tools/list_changed")
        names_after = {tool.name for tool in await mcp.list_tools(timeout_s=CALL_DEADLINE_S)}
        assert name in names_after
        # The new tool is callable without a listing of the caller's own.
        result = await mcp.call_tool(name, {}, timeout_s=CALL_DEADLINE_S, max_result_bytes=1000)
        assert result.text == name
    finally:
        await mcp.close()


async def eventually_async(condition: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + CALL_DEADLINE_S
    while time.monotonic() < deadline:
        value = await condition()
        if value:
            return value
        await asyncio.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


async def _get_stream_open(mcp: McpConnector) -> bool:
    return int((await stats(mcp))["get_streams"]) >= 1


async def test_a_timeout_cancels_the_call_on_the_server(sdk: McpConnector) -> None:
    tag = uuid.uuid4().hex
    steps: list[str] = []

    async def progress(value: float, total: float | None, message: str) -> None:
        steps.append(message)

    # A session and a tool list first, so the deadline falls while the tool runs.
    await sdk.list_tools(timeout_s=CALL_DEADLINE_S)
    with pytest.raises(TimeoutError):
        await sdk.call_tool(
            "slow",
            {"seconds": 60, "tag": tag},
            timeout_s=3.0,
            max_result_bytes=1000,
            progress=progress,
        )
    assert steps[0] == "step 1"
    await eventually_async(
        lambda: _cancelled(sdk, tag), "the server to see notifications/cancelled"
    )
    # The session is still good.
    assert (
        await sdk.call_tool(
            "echo", {"message": "after"}, timeout_s=CALL_DEADLINE_S, max_result_bytes=1000
        )
    ).text == "after"


async def _cancelled(mcp: McpConnector, tag: str) -> bool:
    return tag in (await stats(mcp))["cancelled"]


async def test_an_erroring_tool_is_a_tool_error(sdk: McpConnector) -> None:
    result = await sdk.call_tool("fail", {}, timeout_s=CALL_DEADLINE_S, max_result_bytes=1000)
    assert result.is_error
    assert result.text == "it broke"


async def test_structured_content_is_kept(sdk: McpConnector) -> None:
    result = await sdk.call_tool(
        "echo", {"message": "hi"}, timeout_s=CALL_DEADLINE_S, max_result_bytes=1000
    )
    assert result.structured == {"echo": "hi"}
    assert result.text == "hi"


async def test_oversized_results_are_refused(sdk: McpConnector) -> None:
    # Just over the limit: the result is read, then refused.
    with pytest.raises(ResultTooLarge):
        await sdk.call_tool("big", {"size": 1500}, timeout_s=CALL_DEADLINE_S, max_result_bytes=1024)
    # Far over: the response is cut off while it arrives.
    with pytest.raises(ResultTooLarge):
        await sdk.call_tool(
            "big", {"size": 2_000_000}, timeout_s=CALL_DEADLINE_S, max_result_bytes=1024
        )
    fits = await sdk.call_tool(
        "big", {"size": 1000}, timeout_s=CALL_DEADLINE_S, max_result_bytes=1024
    )
    assert fits.text == "x" * 1000


async def test_audio_and_links_come_back_as_files_or_notes(sdk: McpConnector) -> None:
    audio = await sdk.call_tool(
        "media", {"kind": "audio"}, timeout_s=CALL_DEADLINE_S, max_result_bytes=10_000
    )
    (found,) = audio.files
    assert (found.mime_type, found.display_name) == ("audio/wav", "audio-1.wav")
    assert found.inline_data.startswith(b"RIFF")
    assert audio.text == "[audio: audio-1.wav, audio/wav]"
    # A link names something the server holds: nothing is read, nothing stored.
    link = await sdk.call_tool(
        "media", {"kind": "link"}, timeout_s=CALL_DEADLINE_S, max_result_bytes=10_000
    )
    assert link.files == ()
    assert link.text == "[resource_link content]\nlinked"


async def test_image_content_that_is_not_base64_is_a_malformed_answer(sdk: McpConnector) -> None:
    with pytest.raises(Unreachable, match="image content that is not base64"):
        await sdk.call_tool(
            "media", {"kind": "bad-image"}, timeout_s=CALL_DEADLINE_S, max_result_bytes=10_000
        )


async def test_unknown_tool_is_not_found(sdk: McpConnector) -> None:
    with pytest.raises(ToolNotFound):
        await sdk.call_tool("nope", {}, timeout_s=CALL_DEADLINE_S, max_result_bytes=1000)


async def test_headers_reach_the_server(sdk_server: McpTestServer) -> None:
    mcp = connector(sdk_server.url, headers={"Authorization": "Bearer s3cret-token"})
    try:
        assert (await stats(mcp))["authorization"] == "Bearer s3cret-token"
    finally:
        await mcp.close()


async def test_a_forgotten_session_is_replaced_without_an_error(sdk: McpConnector) -> None:
    first = await stats(sdk)
    await sdk.call_tool("forget_sessions", {}, timeout_s=CALL_DEADLINE_S, max_result_bytes=1000)
    # The server answers the old session id with 404: a new session, and the call runs.
    result = await sdk.call_tool(
        "echo", {"message": "again"}, timeout_s=CALL_DEADLINE_S, max_result_bytes=1000
    )
    assert result.text == "again"
    assert (await stats(sdk))["initializes"] == first["initializes"] + 1


async def test_a_dropped_connection_then_a_restarted_server() -> None:
    with McpTestServer() as server:
        mcp = connector(server.url, headers={"Authorization": "Bearer s3cret-token"})
        try:
            assert (
                await mcp.call_tool(
                    "echo", {"message": "1"}, timeout_s=CALL_DEADLINE_S, max_result_bytes=100
                )
            ).text == "1"
            # The server dies mid-call: the call may have run, so it is not repeated.
            with pytest.raises(Unreachable) as caught:
                await mcp.call_tool("crash", {}, timeout_s=CALL_DEADLINE_S, max_result_bytes=100)
            message = str(caught.value)
            assert f"127.0.0.1:{server.port}" in message
            assert "s3cret" not in message
            assert "/mcp" not in message
            assert server.proc is not None
            server.proc.wait(timeout=CALL_DEADLINE_S)
            # Down: the next call cannot connect.
            with pytest.raises(Unreachable, match="refused"):
                await mcp.probe(timeout_s=CALL_DEADLINE_S)
            # Back on the same port: the next call opens a new session by itself.
            server.start()
            result = await mcp.call_tool(
                "echo", {"message": "2"}, timeout_s=CALL_DEADLINE_S, max_result_bytes=100
            )
            assert result.text == "2"
            # Killed while idle and restarted: still no error for the caller.
            server.kill()
            server.start()
            result = await mcp.call_tool(
                "echo", {"message": "3"}, timeout_s=CALL_DEADLINE_S, max_result_bytes=100
            )
            assert result.text == "3"
        finally:
            await mcp.close()


async def test_close_is_idempotent_and_final(sdk_server: McpTestServer) -> None:
    mcp = connector(sdk_server.url)
    await mcp.probe(timeout_s=CALL_DEADLINE_S)
    await mcp.close()
    await mcp.close()
    with pytest.raises(Unreachable, match="closed"):
        await mcp.probe(timeout_s=CALL_DEADLINE_S)


# -- egress --------------------------------------------------------------------


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
async def test_loopback_is_refused_unless_allowed(sdk_server: McpTestServer, host: str) -> None:
    mcp = McpConnector(
        f"http://{host}:{sdk_server.port}/mcp",
        egress=EgressPolicy(),
        connect_timeout_s=CALL_DEADLINE_S,
    )
    try:
        with pytest.raises(DestinationBlocked):
            await mcp.probe(timeout_s=CALL_DEADLINE_S)
        with pytest.raises(DestinationBlocked):
            await mcp.call_tool(
                "echo", {"message": "x"}, timeout_s=CALL_DEADLINE_S, max_result_bytes=100
            )
    finally:
        await mcp.close()
