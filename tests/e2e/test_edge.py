"""The edge as Envoy loaded it, and what it does for browsers and for many open streams.

A real `switchboard serve` behind a real Envoy configured by `switchboard envoy`
with both listeners: plain (h2c and grpc-web over HTTP/1.1) and TLS with ALPN
h2,http/1.1 (a `switchboard dev-cert` certificate). The configuration is read
back from Envoy's admin ``/config_dump``: what Envoy runs, not our text.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import grpc
import httpx
import pytest
from grpc import aio

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.api.context.v1 import context_pb2, context_pb2_grpc
from switchboard.api.events.v1 import events_pb2, events_pb2_grpc
from switchboard.deploy.edge.envoy import ALPN, API, PLAIN_LISTENER, TLS_LISTENER, safe_to_retry
from switchboard.settings import FIELDS
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.envoy import EnvoyProcess, fronting
from tests.e2e.grpcweb import AUTH, EVENTS, ORIGIN, GrpcWeb, WebCall
from tests.e2e.procs import ServeProcess
from tests.kits.authkit import PASSWORD, unique_email

pytestmark = pytest.mark.e2e

HEARTBEAT_S: Final = 0.5
#: More open streams than Envoy's default circuit breaker (1,024 requests per cluster).
MANY_STREAMS: Final = 1_100
#: Chromium opens at most 6 HTTP/1.1 connections per origin; over HTTP/2 it needs one.
BROWSER_STREAMS: Final = 12
STREAMS_PER_CHANNEL: Final = 500
Parse = Callable[[bytes], events_pb2.SubscribeResponse]


@pytest.fixture(scope="module")
def serve() -> Iterator[ServeProcess]:
    env = {
        "SWITCHBOARD_EVENTS_HEARTBEAT_S": str(HEARTBEAT_S),
        "SWITCHBOARD_DISPATCHER_HEARTBEAT_S": str(HEARTBEAT_S),
        # One user holds all the test's streams: lift the per-principal limit for that.
        "SWITCHBOARD_EVENTS_MAX_SUBSCRIPTIONS_PER_PRINCIPAL": str(2 * MANY_STREAMS),
    }
    with ServeProcess("--dev", env=env) as process:
        yield process


@pytest.fixture(scope="module")
def envoy(serve: ServeProcess) -> Iterator[EnvoyProcess]:
    yield from fronting(serve.address, allow_origins=(ORIGIN,), tls=True)


def _of_type(dump: dict[str, Any], suffix: str) -> dict[str, Any]:
    [config] = [c for c in dump["configs"] if c["@type"].endswith(suffix)]
    result: dict[str, Any] = config
    return result


def _manager(listener: dict[str, Any]) -> dict[str, Any]:
    [chain] = listener["filter_chains"]
    [hcm] = chain["filters"]
    assert hcm["name"] == "envoy.filters.network.http_connection_manager"
    manager: dict[str, Any] = hcm["typed_config"]
    return manager


def _route_for(routes: list[dict[str, Any]], path: str) -> dict[str, Any]:
    """The route Envoy picks for ``path``: the first whose match fits, like Envoy."""
    for route in routes:
        match = route["match"]
        if match.get("path") == path or ("prefix" in match and path.startswith(match["prefix"])):
            return route
    raise AssertionError(f"no route for {path}")


def _seconds(duration: str) -> float:
    return float(duration.removesuffix("s"))


def test_envoy_runs_the_generated_configuration(envoy: EnvoyProcess) -> None:
    dump = envoy.config_dump()
    listeners = {
        item["listener"]["name"]: item["listener"]
        for item in _of_type(dump, "ListenersConfigDump")["static_listeners"]
    }
    assert set(listeners) == {PLAIN_LISTENER, TLS_LISTENER}

    # Browsers get HTTP/2 on the TLS listener: ALPN offers h2 first.
    [tls_chain] = listeners[TLS_LISTENER]["filter_chains"]
    tls = tls_chain["transport_socket"]["typed_config"]["common_tls_context"]
    assert tls["alpn_protocols"] == list(ALPN) == ["h2", "http/1.1"]
    assert "transport_socket" not in listeners[PLAIN_LISTENER]["filter_chains"][0]

    defaults = FIELDS
    for listener in listeners.values():
        manager = _manager(listener)
        # The client address comes from the connection Envoy sees, never from the client.
        assert manager["use_remote_address"] is True
        assert manager.get("xff_num_trusted_hops", 0) == 0
        heartbeat = defaults["events_heartbeat_s"].default
        assert _seconds(manager["stream_idle_timeout"]) > heartbeat
        assert manager["max_request_headers_kb"] == defaults["max_metadata_bytes"].default // 1024
        assert [f["name"] for f in manager["http_filters"]] == [
            "envoy.filters.http.grpc_web",
            "envoy.filters.http.cors",
            # A2A's HTTP+JSON binding and the public Agent Card (tests/a2a/test_a2a_http.py);
            # the Lua filter puts every error of an HTTP+JSON request in A2A's {"error": ...}
            # shape, the buffer holds an HTTP+JSON body to the servers' message limit
            # (tests/a2a/test_a2a_conformance.py; every route turns it off).
            "envoy.filters.http.lua",
            "envoy.filters.http.buffer",
            "envoy.filters.http.grpc_json_transcoder",
            "envoy.filters.http.router",
        ]
        [host] = manager["route_config"]["virtual_hosts"]
        cors = host["typed_per_filter_config"]["envoy.filters.http.cors"]
        exposed = {h.strip() for h in cors["expose_headers"].split(",")}
        assert {"grpc-status", "grpc-message", "grpc-status-details-bin"} <= exposed
        _check_routes(host)

    clusters = {
        item["cluster"]["name"]: item["cluster"]
        for item in _of_type(dump, "ClustersConfigDump")["static_clusters"]
    }
    assert set(clusters) == {"switchboard", "switchboard_streams"}
    per_replica = defaults["max_concurrent_rpcs"].default
    limits = {
        name: cluster["circuit_breakers"]["thresholds"][0]["max_requests"]
        for name, cluster in clusters.items()
    }
    # Streams have their own breaker, sized for thousands; together they fit the server's limit.
    assert limits["switchboard_streams"] >= 5_000
    assert limits["switchboard"] + limits["switchboard_streams"] <= per_replica
    for cluster in clusters.values():
        [check] = cluster["health_checks"]
        assert check["grpc_health_check"].get("service_name", "") == ""
        outlier = cluster["outlier_detection"]
        assert outlier["split_external_local_origin_errors"] is True
        assert outlier["enforcing_consecutive_5xx"] == 0

    bootstrap = _of_type(dump, "BootstrapConfigDump")["bootstrap"]
    assert bootstrap["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    [monitor] = bootstrap["overload_manager"]["resource_monitors"]
    assert monitor["name"] == "envoy.resource_monitors.global_downstream_max_connections"
    assert int(monitor["typed_config"]["max_active_downstream_connections"]) > MANY_STREAMS


def _check_routes(host: dict[str, Any]) -> None:
    routes = host["routes"]
    checked = 0
    for service in API.values():
        for method in service.methods:
            route = _route_for(routes, f"/{service.full_name}/{method.name}")["route"]
            # A route's own policy, else the virtual host's.
            retried_on = set(route.get("retry_policy", host["retry_policy"])["retry_on"].split(","))
            # Requests that never reached a server are always sent again ...
            assert {"connect-failure", "refused-stream"} <= retried_on
            if method.client_streaming or method.server_streaming:
                assert route["cluster"] == "switchboard_streams", method.full_name
                assert route["timeout"] == "0s"
                assert "unavailable" not in retried_on
            else:
                assert route["cluster"] == "switchboard", method.full_name
                assert _seconds(route["timeout"]) > 0
                # ... but after UNAVAILABLE only where the contract says repeating is safe.
                assert ("unavailable" in retried_on) == safe_to_retry(method), method.full_name
            # A client's grpc-timeout is honoured, uncapped.
            assert route["max_stream_duration"]["grpc_timeout_header_max"] == "0s"
            checked += 1
    assert checked == sum(len(s.methods) for s in API.values())


@pytest.fixture
async def h2_web(envoy: EnvoyProcess) -> AsyncIterator[httpx.AsyncClient]:
    """A browser-like client on the TLS listener: HTTP/2 when ALPN offers it."""
    trust = ssl.create_default_context(cafile=str(envoy.cert_file))
    async with httpx.AsyncClient(
        base_url=envoy.tls_url,
        http1=True,
        http2=True,
        verify=trust,
        timeout=CALL_DEADLINE_S,
        trust_env=False,
    ) as client:
        yield client


async def _web_register(web: GrpcWeb) -> auth_pb2.RegisterResponse:
    request = auth_pb2.RegisterRequest(email=unique_email("edge"), password=PASSWORD)
    registered, status = await web.unary(
        AUTH + "Register", request, auth_pb2.RegisterResponse.FromString
    )
    assert status.code == 0, status
    assert registered is not None
    return registered


async def test_a_browser_keeps_many_streams_and_unary_calls_on_one_http2_connection(
    envoy: EnvoyProcess, h2_web: httpx.AsyncClient
) -> None:
    registered = await _web_register(GrpcWeb(h2_web))
    web = GrpcWeb(h2_web, registered.tokens.access_token)
    request = events_pb2.SubscribeRequest(scopes=[events_pb2.Scope(user=registered.user.name)])
    parse = events_pb2.SubscribeResponse.FromString
    async with contextlib.AsyncExitStack() as stack:
        calls = [
            await stack.enter_async_context(web.call(EVENTS + "Subscribe", request))
            for _ in range(BROWSER_STREAMS)
        ]
        for call in calls:
            assert call.response.http_version == "HTTP/2"
            first = await call.next_message(parse)
            assert first is not None
            assert first.WhichOneof("frame") == "heartbeat"
        # Over HTTP/1.1 a browser would now have no connection left for this call.
        created, status = await web.unary(
            AUTH + "CreateApiKey",
            auth_pb2.CreateApiKeyRequest(display_name="edge", scopes=["read"]),
            auth_pb2.CreateApiKeyResponse.FromString,
        )
        assert status.code == 0, status
        assert created is not None
        # ... and every open stream sees what that call did.
        for call in calls:
            event = await _next_event(call, parse)
            assert event.security.kind == events_pb2.SECURITY_EVENT_KIND_API_KEY_CREATED
        active = envoy.stats(f"http.{TLS_LISTENER}.downstream_cx_http2_active")
        assert active[f"http.{TLS_LISTENER}.downstream_cx_http2_active"] == 1


async def _next_event(call: WebCall, parse: Parse) -> events_pb2.Event:
    while True:
        frame = await call.next_message(parse)
        assert frame is not None, "the stream ended"
        if frame.WhichOneof("frame") == "batch":
            [event] = frame.batch.events
            return event


async def test_native_grpc_over_tls_negotiates_http2(envoy: EnvoyProcess) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=envoy.cert_file.read_bytes())
    async with aio.secure_channel(f"localhost:{envoy.tls_port}", credentials) as channel:
        jwks = await auth_pb2_grpc.AuthServiceStub(channel).GetJwks(
            auth_pb2.GetJwksRequest(), timeout=CALL_DEADLINE_S
        )
    assert jwks.jwks_json


async def _native_register(channel: aio.Channel) -> auth_pb2.RegisterResponse:
    stub = auth_pb2_grpc.AuthServiceStub(channel)
    request = auth_pb2.RegisterRequest(email=unique_email("edge"), password=PASSWORD)
    response: auth_pb2.RegisterResponse = await stub.Register(request, timeout=CALL_DEADLINE_S)
    return response


_Stream: TypeAlias = aio.UnaryStreamCall[events_pb2.SubscribeRequest, events_pb2.SubscribeResponse]


@dataclass(frozen=True)
class _Subscribed:
    """Separate connections through the edge, one user, and a Subscribe per slot, each
    past its first heartbeat."""

    channels: list[aio.Channel]
    streams: list[_Stream]
    metadata: tuple[tuple[str, str], ...]


@contextlib.asynccontextmanager
async def _subscribed(
    target: str, streams: int, per_channel: int, ready_s: float
) -> AsyncIterator[_Subscribed]:
    # Separate connections (a channel's subchannels are shared unless asked otherwise).
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [
        aio.insecure_channel(target, options=options) for _ in range(-(-streams // per_channel))
    ]
    opened: list[_Stream] = []
    try:
        registered = await _native_register(channels[0])
        metadata = (("authorization", f"Bearer {registered.tokens.access_token}"),)
        request = events_pb2.SubscribeRequest(scopes=[events_pb2.Scope(user=registered.user.name)])
        opened.extend(
            events_pb2_grpc.EventServiceStub(channels[i // per_channel]).Subscribe(
                request, metadata=metadata
            )
            for i in range(streams)
        )
        async with asyncio.timeout(ready_s):
            firsts = await asyncio.gather(*(stream.read() for stream in opened))
        assert all(
            isinstance(f, events_pb2.SubscribeResponse) and f.WhichOneof("frame") == "heartbeat"
            for f in firsts
        )
        yield _Subscribed(channels, opened, metadata)
    finally:
        for stream in opened:
            stream.cancel()
        for channel in channels:
            await channel.close(None)


async def test_more_open_streams_than_envoys_default_breaker_leave_room_for_calls(
    envoy: EnvoyProcess,
) -> None:
    """Each open Subscribe holds one upstream request for its whole life. Past Envoy's
    default of 1,024 per cluster the next call would get HTTP 503; the streams'
    own breaker is sized for thousands and unary calls have theirs."""
    target = f"127.0.0.1:{envoy.port}"
    async with _subscribed(target, MANY_STREAMS, STREAMS_PER_CHANNEL, 60) as opened:
        # Every stream is open at once; unary calls still go through.
        context = context_pb2_grpc.ContextServiceStub(opened.channels[-1])
        created = await context.CreateWorkspace(
            context_pb2.CreateWorkspaceRequest(
                workspace=context_pb2.Workspace(display_name="Busy")
            ),
            metadata=opened.metadata,
            timeout=CALL_DEADLINE_S,
        )
        assert created.workspace.name
        stats = envoy.stats("cluster.switchboard")
        assert stats["cluster.switchboard_streams.upstream_rq_active"] >= MANY_STREAMS
        for name in ("switchboard", "switchboard_streams"):
            assert stats[f"cluster.{name}.upstream_rq_pending_overflow"] == 0
            assert stats[f"cluster.{name}.upstream_cx_overflow"] == 0


#: Connections spread over two workers by the kernel's hash: all on one has odds of 2**-23.
SPREAD_CONNECTIONS: Final = 24


async def test_an_envoy_with_two_workers_as_deployed_serves_streams_and_calls_on_both(
    serve: ServeProcess,
) -> None:
    """deploy/ runs Envoy with ``--concurrency 2``: each worker has its own connections
    and upstream pools. A stream on either worker sees what a call on the other did."""
    with EnvoyProcess(serve.address, concurrency=2) as proxy:
        target = f"127.0.0.1:{proxy.port}"
        async with _subscribed(target, SPREAD_CONNECTIONS, 1, CALL_DEADLINE_S) as opened:
            by_worker: dict[str, int] = {}
            for name, value in proxy.stats("listener.").items():
                if ".worker_" in name and name.endswith(".downstream_cx_active"):
                    worker = name.split(".worker_")[1].split(".")[0]
                    by_worker[worker] = by_worker.get(worker, 0) + value
            assert sorted(by_worker) == ["0", "1"]
            assert all(active > 0 for active in by_worker.values()), by_worker
            assert sum(by_worker.values()) == SPREAD_CONNECTIONS
            created = await auth_pb2_grpc.AuthServiceStub(opened.channels[-1]).CreateApiKey(
                auth_pb2.CreateApiKeyRequest(display_name="workers", scopes=["read"]),
                metadata=opened.metadata,
                timeout=CALL_DEADLINE_S,
            )
            assert created.api_key.name
            async with asyncio.timeout(CALL_DEADLINE_S):
                seen = await asyncio.gather(*(_next_native_event(s) for s in opened.streams))
            assert {event.security.kind for event in seen} == {
                events_pb2.SECURITY_EVENT_KIND_API_KEY_CREATED
            }
        assert proxy.terminate() == 0


async def _next_native_event(stream: _Stream) -> events_pb2.Event:
    while True:
        frame = await stream.read()
        assert isinstance(frame, events_pb2.SubscribeResponse), "the stream ended"
        if frame.WhichOneof("frame") == "batch":
            [event] = frame.batch.events
            return event


async def test_messages_up_to_the_servers_limit_pass_and_larger_get_its_status(
    envoy: EnvoyProcess,
) -> None:
    limit = FIELDS["max_receive_message_bytes"].default
    async with aio.insecure_channel(
        f"127.0.0.1:{envoy.port}",
        options=[("grpc.max_send_message_length", 2 * limit)],
    ) as channel:
        registered = await _native_register(channel)
        metadata = (("authorization", f"Bearer {registered.tokens.access_token}"),)
        context = context_pb2_grpc.ContextServiceStub(channel)

        def workspace(size: int) -> context_pb2.CreateWorkspaceRequest:
            return context_pb2.CreateWorkspaceRequest(
                workspace=context_pb2.Workspace(display_name="x" * size)
            )

        # Just under the limit: Envoy forwards it and the server judges the content.
        with pytest.raises(aio.AioRpcError) as under:
            await context.CreateWorkspace(
                workspace(limit - 1024), metadata=metadata, timeout=CALL_DEADLINE_S
            )
        assert under.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # Over it: the server's own answer, not a proxy error.
        with pytest.raises(aio.AioRpcError) as over:
            await context.CreateWorkspace(
                workspace(limit + 1024), metadata=metadata, timeout=CALL_DEADLINE_S
            )
        assert over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
