"""What a streamed token costs at the least, in parts: the floors under ``bench/streaming.py``.

    python bench/floors.py          both, printed (about 1 minute)
    python bench/floors.py http     an HTTP client's CPU per streamed chunk: httpx, aiohttp,
                                    and the llm handler's provider client (switchboard)
    python bench/floors.py aiohttp switchboard   some of them
    python bench/floors.py grpc     grpc.aio's server CPU per server-streamed message

``http``: C closed loops each stream one Chat Completions answer of ``TOKENS`` chunks, the
interval apart, from ``bench/streaming.py``'s paced echo model (its own process); each chunk
is read under an ``asyncio.timeout``, as the llm handler reads it. ``switchboard``: the same
answers through the llm handler's provider client (``dispatcher/llm/client.py``) to the text
of each chunk, what Switchboard adds to aiohttp's read on the way from socket to delta (its
figure is per text: the 4 chunks of an answer without text are read too, about 3% more). The
client process's CPU over the measured window / chunks read. ``grpc``: a bare ``grpc.aio``
server (no Switchboard, no protobuf: 40-byte messages) whose server-streaming method writes
``TOKENS`` messages the interval apart; C closed loops read them. The server process's CPU /
messages.
Together they are about what reading a token and writing its frame cannot cost less than
in this runtime (decisions 44).
"""

from __future__ import annotations

import asyncio
import resource
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final

import aiohttp
import grpc
import httpx
from grpc import aio

from switchboard.dispatcher.llm.client import Answer, ProviderClient
from switchboard.dispatcher.llm.config import LlmConfig, Provider

TOKENS: Final = 128
INTERVAL_S: Final = 0.033
CONVERSATIONS: Final = 100
WARMUP_S: Final = 2.0
SECONDS: Final = 8.0
HERE: Final = Path(__file__).resolve()
BODY: Final[dict[str, Any]] = {
    "model": "bench-model",
    "stream": True,
    "messages": [{"role": "user", "content": " ".join(f"w{i}" for i in range(TOKENS))}],
}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _loops(one: Callable[[], Awaitable[int]], seconds: float) -> int:
    """C closed loops of ``one`` for ``seconds``; the items they read."""
    stop = time.monotonic() + seconds
    count = 0

    async def loop() -> None:
        nonlocal count
        while time.monotonic() < stop:
            read = await one()  # not ``count += await one()``: that reads count before the await
            count += read

    await asyncio.gather(*(loop() for _ in range(CONVERSATIONS)))
    return count


async def _chunks(chunks: AsyncIterator[bytes]) -> int:
    """Read ``chunks`` to the end, each under a timeout (as the llm handler read them)."""
    read = 0
    while True:
        async with asyncio.timeout(30):
            chunk = await anext(chunks, None)
        if chunk is None:
            return read
        read += 1


async def _httpx(url: str, seconds: float) -> int:
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def one() -> int:
            async with client.stream("POST", f"{url}/chat/completions", json=BODY) as response:
                return await _chunks(response.aiter_bytes())

        return await _loops(one, seconds)


async def _aiohttp(url: str, seconds: float) -> int:
    connector = aiohttp.TCPConnector(limit=1000)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> int:
            async with session.post(f"{url}/chat/completions", json=BODY) as response:
                return await _chunks(response.content.iter_any())

        return await _loops(one, seconds)


async def _switchboard(url: str, seconds: float) -> int:
    """The llm handler's own path from socket to text: its provider client (aiohttp, one
    timer per response, the events cut from each read, each chunk decoded and checked)."""
    provider = Provider(name="bench", base_url=url, api_key="", model="bench-model")
    client = ProviderClient(
        LlmConfig(providers=(provider,), max_retries=0, max_connections=1000),
        clock=time.monotonic,
        sleep=asyncio.sleep,
        rng=None,
    )
    request = {key: value for key, value in BODY.items() if key != "model"}
    try:

        async def one() -> int:
            texts = client.ask((provider,), request, lambda: 30.0, Answer())
            return len([text async for text in texts])

        return await _loops(one, seconds)
    finally:
        await client.aclose()


_CLIENTS: Final = {"httpx": _httpx, "aiohttp": _aiohttp, "switchboard": _switchboard}


async def http_client(kind: str, url: str) -> str:
    read = _CLIENTS[kind]
    await read(url, WARMUP_S)
    began, cpu = time.monotonic(), _cpu()
    chunks = await read(url, SECONDS)
    used, wall = _cpu() - cpu, time.monotonic() - began
    return f"| {kind} | {chunks} | {used * 1e6 / max(chunks, 1):.1f} | {used / wall:.2f} |"


def http_floor(kinds: Sequence[str] = tuple(_CLIENTS)) -> list[str]:
    streaming = HERE.parent / "streaming.py"
    interval_ms = str(round(INTERVAL_S * 1000))
    lines = [
        f"HTTP client, {CONVERSATIONS} streams of {TOKENS} chunks {interval_ms} ms apart:",
        "",
        "| client | chunks | client CPU µs/chunk | client cores |",
        "|---|---|---|---|",
    ]
    for kind in kinds:
        model = subprocess.Popen(
            [sys.executable, str(streaming), "model", interval_ms],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert model.stdout is not None
            url = f"http://127.0.0.1:{int(model.stdout.readline())}/v1"
            lines.append(asyncio.run(http_client(kind, url)))
        finally:
            assert model.stdin is not None
            model.stdin.close()
            model.wait(timeout=30)
    return lines


async def grpc_server() -> None:
    """Serve the bare streaming method; print the port, then the CPU used on each stdin line."""

    async def stream(_request: bytes, context: Any) -> None:
        for _ in range(TOKENS):
            await asyncio.sleep(INTERVAL_S)  # the model's pace, as a token arrives
            await context.write(b"x" * 40)

    handler = grpc.method_handlers_generic_handler(
        "floor.Floor", {"Stream": grpc.unary_stream_rpc_method_handler(stream)}
    )
    server = aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    loop = asyncio.get_running_loop()
    while await loop.run_in_executor(None, sys.stdin.readline):
        print(_cpu(), flush=True)
    await server.stop(0)


async def grpc_client(port: int, seconds: float) -> int:
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_stream("/floor.Floor/Stream", None, None)

        async def one() -> int:
            return len([message async for message in call(b"")])

        return await _loops(one, seconds)


def grpc_floor() -> list[str]:
    server = subprocess.Popen(
        [sys.executable, str(HERE), "grpc-server"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdin is not None
    assert server.stdout is not None
    try:
        port = int(server.stdout.readline())

        def used() -> float:
            assert server.stdin is not None
            assert server.stdout is not None
            server.stdin.write("\n")
            server.stdin.flush()
            return float(server.stdout.readline())

        asyncio.run(grpc_client(port, WARMUP_S))
        began, cpu = time.monotonic(), used()
        messages = asyncio.run(grpc_client(port, SECONDS))
        spent, wall = used() - cpu, time.monotonic() - began
    finally:
        server.stdin.close()
        server.wait(timeout=30)
    return [
        f"grpc.aio, {CONVERSATIONS} server streams of {TOKENS} messages "
        f"{round(INTERVAL_S * 1000)} ms apart: {messages} messages, server CPU "
        f"{spent * 1e6 / max(messages, 1):.1f} µs/message, {spent / wall:.2f} cores",
    ]


def main() -> int:
    if sys.argv[1:] == ["grpc-server"]:
        asyncio.run(grpc_server())
        return 0
    which = sys.argv[1:] or ["http", "grpc"]
    lines: list[str] = []
    if "http" in which:
        lines += [*http_floor(), ""]
    elif kinds := [kind for kind in which if kind in _CLIENTS]:
        lines += [*http_floor(kinds), ""]
    if "grpc" in which:
        lines += grpc_floor()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
