"""The egress policy: the address matrix, endpoint parsing, and the checked clients
against real local servers (HTTP, HTTPS with a certificate for ``localhost``, gRPC)."""

from __future__ import annotations

import http.server
import ipaddress
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from switchboard.platform.config import ConfigError
from switchboard.platform.errors import DestinationBlocked, InvalidArgument
from switchboard.platform.security.egress import (
    EgressPolicy,
    EgressSettings,
    GrpcEndpoint,
    HttpEndpoint,
    ResolutionFailed,
    check_host,
    grpc_target,
    http_client,
    parse_grpc_endpoint,
    parse_http_endpoint,
    resolve_checked,
)
from tests.conftest import CALL_DEADLINE_S
from tests.kits.certs import self_signed

pytestmark = pytest.mark.unit

STRICT = EgressPolicy()


def make_settings(**overrides: object) -> EgressSettings:
    # Only the egress section matters.
    return EgressSettings(**overrides)  # type: ignore[arg-type]


LOOPBACK = EgressPolicy(allow_loopback=True)
PRIVATE = EgressPolicy(allow_private=True)
OPEN = EgressPolicy(allow_loopback=True, allow_private=True)

# address, allowed by STRICT, by LOOPBACK, by PRIVATE, by OPEN
MATRIX = [
    # Public addresses.
    ("8.8.8.8", True, True, True, True),
    ("1.1.1.1", True, True, True, True),
    ("2606:4700:4700::1111", True, True, True, True),
    ("::ffff:8.8.8.8", True, True, True, True),
    ("2002:0808:0808::1", True, True, True, True),
    ("64:ff9b::808:808", True, True, True, True),
    # Unspecified: never.
    ("0.0.0.0", False, False, False, False),
    ("0.1.2.3", False, False, False, False),
    ("::", False, False, False, False),
    ("::ffff:0.0.0.0", False, False, False, False),
    # Loopback, in every spelling.
    ("127.0.0.1", False, True, False, True),
    ("127.255.255.254", False, True, False, True),
    ("::1", False, True, False, True),
    ("::ffff:127.0.0.1", False, True, False, True),
    ("::ffff:7f00:1", False, True, False, True),
    ("::ffff:0:127.0.0.1", False, True, False, True),
    ("::127.0.0.1", False, True, False, True),
    ("2002:7f00:0001::", False, True, False, True),
    ("64:ff9b::127.0.0.1", False, True, False, True),
    # Private, CGNAT, link-local, unique-local, benchmarking.
    ("10.0.0.1", False, False, True, True),
    ("172.16.5.4", False, False, True, True),
    ("172.31.255.255", False, False, True, True),
    ("192.168.1.1", False, False, True, True),
    ("100.64.0.1", False, False, True, True),
    ("169.254.1.1", False, False, True, True),
    ("198.18.0.1", False, False, True, True),
    ("fc00::1", False, False, True, True),
    ("fd12:3456::1", False, False, True, True),
    ("fe80::1", False, False, True, True),
    ("fe80::1%eth0", False, False, True, True),
    ("fec0::1", False, False, True, True),
    ("::ffff:10.0.0.1", False, False, True, True),
    ("::ffff:192.168.0.1", False, False, True, True),
    ("2002:c0a8:0101::", False, False, True, True),
    ("64:ff9b::10.1.2.3", False, False, True, True),
    ("64:ff9b:1::1", False, False, True, True),
    # Just outside the private ranges.
    ("172.32.0.1", True, True, True, True),
    ("100.128.0.1", True, True, True, True),
    ("11.0.0.1", True, True, True, True),
    # Cloud metadata: never, whatever the flags.
    ("169.254.169.254", False, False, False, False),
    ("169.254.170.2", False, False, False, False),
    ("169.254.170.23", False, False, False, False),
    ("100.100.100.200", False, False, False, False),
    ("168.63.129.16", False, False, False, False),
    ("fd00:ec2::254", False, False, False, False),
    ("::ffff:169.254.169.254", False, False, False, False),
    ("::ffff:a9fe:a9fe", False, False, False, False),
    ("2002:a9fe:a9fe::", False, False, False, False),
    ("64:ff9b::169.254.169.254", False, False, False, False),
    # Multicast, broadcast, reserved, documentation, protocol assignments.
    ("224.0.0.1", False, False, False, False),
    ("239.255.255.250", False, False, False, False),
    ("255.255.255.255", False, False, False, False),
    ("240.0.0.1", False, False, False, False),
    ("192.0.2.1", False, False, False, False),
    ("198.51.100.7", False, False, False, False),
    ("203.0.113.9", False, False, False, False),
    ("192.0.0.170", False, False, False, False),
    ("192.88.99.1", False, False, False, False),
    ("ff02::1", False, False, False, False),
    ("2001:db8::1", False, False, False, False),
    ("3fff::1", False, False, False, False),
    ("100::1", False, False, False, False),
    ("2001::1", False, False, False, False),
    ("4000::1", False, False, False, False),
    ("::ffff:224.0.0.1", False, False, False, False),
]


@pytest.mark.parametrize(("address", "strict", "loopback", "private", "both"), MATRIX)
def test_address_matrix(
    address: str, strict: bool, loopback: bool, private: bool, both: bool
) -> None:
    for policy, expected in ((STRICT, strict), (LOOPBACK, loopback), (PRIVATE, private)):
        assert policy.allows(address) is expected, (policy, address)
    assert OPEN.allows(address) is both
    if not strict:
        with pytest.raises(DestinationBlocked) as caught:
            STRICT.check_ip(address)
        # Nothing about the address or which rule refused it.
        assert caught.value.message == (
            "the destination address is not allowed by the egress policy"
        )
    else:
        STRICT.check_ip(ipaddress.ip_address(address))


def test_allow_cidrs_allow_matching_addresses_in_every_form() -> None:
    policy = EgressPolicy(allow_cidrs=(ipaddress.ip_network("10.1.0.0/16"),))
    assert policy.allows("10.1.2.3")
    assert policy.allows("::ffff:10.1.2.3")
    assert not policy.allows("10.2.0.1")
    assert not policy.allows("127.0.0.1")
    v6 = EgressPolicy(allow_cidrs=(ipaddress.ip_network("fd00:1::/64"),))
    assert v6.allows("fd00:1::5")
    assert not v6.allows("fd00:2::5")


def test_metadata_needs_an_entry_naming_exactly_that_host() -> None:
    wide = EgressPolicy(
        allow_private=True,
        allow_cidrs=tuple(
            ipaddress.ip_network(n) for n in ("169.254.0.0/16", "0.0.0.0/0", "fd00::/8")
        ),
    )
    assert wide.allows("169.254.1.1")
    assert not wide.allows("169.254.169.254")
    assert not wide.allows("fd00:ec2::254")
    exact = EgressPolicy(allow_cidrs=(ipaddress.ip_network("169.254.169.254/32"),))
    assert exact.allows("169.254.169.254")
    assert exact.allows("::ffff:169.254.169.254")
    assert not exact.allows("169.254.170.2")


def test_check_ip_refuses_text_that_is_no_address() -> None:
    with pytest.raises(InvalidArgument):
        STRICT.check_ip("localhost")


def test_policy_from_settings() -> None:
    settings = make_settings(
        egress_allow_loopback=True, egress_allow_cidrs=("10.0.0.0/8", "fd00:1::/64", "192.0.2.7")
    )
    policy = EgressPolicy.from_settings(settings)
    assert policy.allow_loopback
    assert not policy.allow_private
    assert policy.allow_cidrs == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("fd00:1::/64"),
        ipaddress.ip_network("192.0.2.7/32"),
    )
    assert EgressPolicy.from_settings(make_settings()) == STRICT


@pytest.mark.parametrize("entry", ["10.0.0.1/8", "not-a-network", "10.0.0.0/33"])
def test_policy_from_settings_names_the_variable(entry: str) -> None:
    with pytest.raises(ConfigError, match="SWITCHBOARD_EGRESS_ALLOW_CIDRS: entry 2"):
        EgressPolicy.from_settings(make_settings(egress_allow_cidrs=("10.0.0.0/8", entry)))


# ---------------------------------------------------------------------------
# Endpoint parsing


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://mcp.example.com/mcp", HttpEndpoint("https", "mcp.example.com", 443, "/mcp")),
        ("HTTP://Example.COM", HttpEndpoint("http", "example.com", 80, "/")),
        ("http://example.com:8080/a?b=c", HttpEndpoint("http", "example.com", 8080, "/a?b=c")),
        ("https://[2001:4860::8888]:8443/x", HttpEndpoint("https", "2001:4860::8888", 8443, "/x")),
        ("https://10.0.0.1/", HttpEndpoint("https", "10.0.0.1", 443, "/")),
        ("https://bücher.example/", HttpEndpoint("https", "xn--bcher-kva.example", 443, "/")),
        ("https://example.com./", HttpEndpoint("https", "example.com.", 443, "/")),
    ],
)
def test_parse_http_endpoint(url: str, expected: HttpEndpoint) -> None:
    assert parse_http_endpoint(url, "integration.endpoint") == expected


def test_http_endpoint_url_is_normalized() -> None:
    assert parse_http_endpoint("HTTPS://Example.com:443/a", "f").url == "https://example.com/a"
    assert parse_http_endpoint("http://[::1]:81", "f").url == "http://[::1]:81/"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("ftp://example.com/", "http:// or https://"),
        ("example.com/mcp", "http:// or https://"),
        ("file:///etc/passwd", "http:// or https://"),
        ("https://user:pw@example.com/", "user name or password"),
        ("https://@example.com/", "user name or password"),
        ("https:///path", "has no host"),
        ("https://example.com:99999/", "not a valid URL"),
        ("https://example.com:x/", "not a valid URL"),
        ("https://example.com:0/", "port 0"),
        ("https://[::1/", "not a valid URL"),
        ("https://[fe80::1%25eth0]/", "zone index"),
        ("https://exa mple.com/", "spaces"),
        ("https://example.com/\n", "control"),
        ("https://example.com\\@evil/", "backslash"),
        ("https://under_score.example/", "invalid host name"),
        ("https://-bad.example/", "invalid host name"),
        ("https://" + "a" * 64 + ".example/", "invalid host name"),
        ("https://example.com/#frag", "fragment"),
        ("https://example.com/" + "a" * 2048, "longer than 2048"),
    ],
)
def test_parse_http_endpoint_refuses(url: str, problem: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_http_endpoint(url, "integration.endpoint")
    assert not isinstance(caught.value, DestinationBlocked)
    [violation] = caught.value.violations
    assert violation.field == "integration.endpoint"
    assert problem in violation.description


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("expert.internal:50051", GrpcEndpoint("expert.internal", 50051, tls=False)),
        ("[::1]:50051", GrpcEndpoint("::1", 50051, tls=False)),
        ("10.0.0.1:9000", GrpcEndpoint("10.0.0.1", 9000, tls=False)),
        ("grpcs://expert.example.com", GrpcEndpoint("expert.example.com", 443, tls=True)),
        ("https://Expert.example.com:8443", GrpcEndpoint("expert.example.com", 8443, tls=True)),
        ("grpc://expert:7000/", GrpcEndpoint("expert", 7000, tls=False)),
        ("http://expert", GrpcEndpoint("expert", 80, tls=False)),
    ],
)
def test_parse_grpc_endpoint(target: str, expected: GrpcEndpoint) -> None:
    assert parse_grpc_endpoint(target, "integration.endpoint") == expected


def test_grpc_authority() -> None:
    assert GrpcEndpoint("::1", 5).authority == "[::1]:5"
    assert GrpcEndpoint("expert", 5).authority == "expert:5"


@pytest.mark.parametrize(
    ("target", "problem"),
    [
        ("expert.internal", "needs a port"),
        ("expert:0", "port 0"),
        ("expert:70000", "not host:port"),
        ("::1:50051", "not host:port"),
        ("dns:///expert:50051", "must be host:port, or a grpcs://"),
        ("unix:///tmp/sock", "must be host:port, or a grpcs://"),
        ("grpcs://expert:443/path", "without a path"),
        ("expert:50051?x=1", "without a path"),
        ("user@expert:50051", "user name"),
        ("exp ert:1", "spaces"),
        (":50051", "has no host"),
        ("a" * 2049, "longer than 2048"),
    ],
)
def test_parse_grpc_endpoint_refuses(target: str, problem: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_grpc_endpoint(target, "integration.endpoint")
    [violation] = caught.value.violations
    assert violation.field == "integration.endpoint"
    assert problem in violation.description


# ---------------------------------------------------------------------------
# Resolution


async def test_resolve_checked_refuses_a_name_resolving_to_loopback() -> None:
    with pytest.raises(DestinationBlocked) as caught:
        await resolve_checked(
            "localhost", 80, STRICT, timeout_s=CALL_DEADLINE_S, field="integration.endpoint"
        )
    # The host the user gave, never the address it resolved to.
    assert "'localhost'" in caught.value.message
    assert "127.0.0.1" not in caught.value.message
    assert [v.field for v in caught.value.violations] == ["integration.endpoint"]
    assert "127.0.0.1" in await resolve_checked(
        "localhost", 80, LOOPBACK, timeout_s=CALL_DEADLINE_S
    )


async def test_resolve_checked_literals_need_no_lookup() -> None:
    assert await resolve_checked("[::1]", 1, LOOPBACK, timeout_s=CALL_DEADLINE_S) == ["::1"]
    assert await resolve_checked("8.8.8.8", 1, STRICT, timeout_s=CALL_DEADLINE_S) == ["8.8.8.8"]
    with pytest.raises(DestinationBlocked):
        await check_host("169.254.169.254", 80, OPEN, timeout_s=CALL_DEADLINE_S)


async def test_an_unknown_name_is_a_resolution_failure() -> None:
    # .invalid never resolves (RFC 6761).
    with pytest.raises(ResolutionFailed) as caught:
        await check_host("no-such-host.invalid", 80, STRICT, timeout_s=5)
    assert caught.value.code.name == "UNAVAILABLE"


# ---------------------------------------------------------------------------
# The HTTP client against a real local server


@dataclass
class _Seen:
    requests: list[tuple[str, str | None]] = field(default_factory=list)


class _Handler(http.server.BaseHTTPRequestHandler):
    seen: _Seen

    def do_GET(self) -> None:
        self.seen.requests.append((self.path, self.headers.get("Host")))
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = (self.headers.get("Host") or "").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class _Server:
    port: int
    seen: _Seen


def _serve(context: ssl.SSLContext | None) -> Iterator[_Server]:
    seen = _Seen()
    handler = type("Handler", (_Handler,), {"seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield _Server(server.server_address[1], seen)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def web() -> Iterator[_Server]:
    yield from _serve(None)


@dataclass
class _Tls:
    server: _Server
    ca_file: Path


@pytest.fixture
def tls_web(tmp_path: Path) -> Iterator[_Tls]:
    """An HTTPS server whose certificate names only ``localhost`` (not 127.0.0.1)."""
    cert_file, key_file = self_signed(tmp_path, "localhost", ca=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    for server in _serve(context):
        yield _Tls(server, cert_file)


async def test_http_client_refuses_a_name_resolving_to_loopback(web: _Server) -> None:
    async with http_client(STRICT, timeout_s=CALL_DEADLINE_S) as client:
        with pytest.raises(DestinationBlocked):
            await client.get(f"http://localhost:{web.port}/")
        with pytest.raises(DestinationBlocked):
            await client.get(f"http://127.0.0.1:{web.port}/")
        with pytest.raises(DestinationBlocked):
            await client.get(f"http://[::ffff:127.0.0.1]:{web.port}/")
    assert web.seen.requests == []


async def test_http_client_reaches_an_allowed_server_and_keeps_the_host(web: _Server) -> None:
    async with http_client(LOOPBACK, timeout_s=CALL_DEADLINE_S, headers={"x-test": "1"}) as client:
        response = await client.get(f"http://localhost:{web.port}/hello")
    assert response.status_code == 200
    # The connection went to the checked IP; the request still names the host.
    assert response.text == f"localhost:{web.port}"
    assert web.seen.requests == [("/hello", f"localhost:{web.port}")]


async def test_http_client_does_not_follow_redirects(web: _Server) -> None:
    async with http_client(OPEN, timeout_s=CALL_DEADLINE_S) as client:
        response = await client.get(f"http://localhost:{web.port}/redirect")
    assert response.status_code == 302
    assert [path for path, _ in web.seen.requests] == ["/redirect"]


async def test_http_client_verifies_tls_against_the_name(tls_web: _Tls) -> None:
    verify = ssl.create_default_context(cafile=str(tls_web.ca_file))
    async with http_client(LOOPBACK, timeout_s=CALL_DEADLINE_S, verify=verify) as client:
        response = await client.get(f"https://localhost:{tls_web.server.port}/tls")
        assert response.text == f"localhost:{tls_web.server.port}"
        # The certificate names localhost only: had the connection been
        # verified against the dialled IP, the first request would have failed.
        with pytest.raises(httpx.ConnectError):
            await client.get(f"https://127.0.0.1:{tls_web.server.port}/tls")


def test_http_client_refuses_arguments_that_bypass_the_policy() -> None:
    for name in ("transport", "follow_redirects", "trust_env", "proxy", "mounts"):
        with pytest.raises(TypeError):
            http_client(STRICT, timeout_s=1, **{name: None})


# ---------------------------------------------------------------------------
# gRPC against a real local server


@pytest.fixture
async def grpc_port() -> AsyncIterator[int]:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


async def test_grpc_target_dials_the_checked_address(grpc_port: int) -> None:
    endpoint = parse_grpc_endpoint(f"localhost:{grpc_port}", "integration.endpoint")
    target, options = await grpc_target(endpoint, LOOPBACK, timeout_s=CALL_DEADLINE_S)
    assert target == f"ipv4:127.0.0.1:{grpc_port}"
    assert ("grpc.default_authority", f"localhost:{grpc_port}") in options
    assert ("grpc.enable_http_proxy", 0) in options
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=CALL_DEADLINE_S
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_grpc_target_refused_without_loopback(grpc_port: int) -> None:
    for text in (f"localhost:{grpc_port}", f"[::1]:{grpc_port}", f"127.0.0.1:{grpc_port}"):
        endpoint = parse_grpc_endpoint(text, "integration.endpoint")
        with pytest.raises(DestinationBlocked) as caught:
            await grpc_target(
                endpoint, STRICT, timeout_s=CALL_DEADLINE_S, field="integration.endpoint"
            )
        assert caught.value.violations[0].field == "integration.endpoint"


async def test_grpc_target_keeps_the_tls_name() -> None:
    endpoint = parse_grpc_endpoint("grpcs://[::1]:8443", "f")
    target, options = await grpc_target(endpoint, LOOPBACK, timeout_s=CALL_DEADLINE_S)
    assert target == "ipv6:[::1]:8443"
    assert ("grpc.ssl_target_name_override", "::1") in options
    assert ("grpc.default_authority", "[::1]:8443") in options


@pytest.mark.parametrize("host", ["2130706433", "0x7f.1", "127.1", "017700000001"])
async def test_odd_spellings_of_loopback_are_refused_after_resolution(host: str) -> None:
    endpoint = parse_http_endpoint(f"http://{host}:8080/", "f")
    with pytest.raises(DestinationBlocked):
        await check_host(endpoint.host, endpoint.port, STRICT, timeout_s=CALL_DEADLINE_S)


async def test_clients_share_one_verifying_context_per_alpn_choice_and_still_verify(
    tls_web: _Tls,
) -> None:
    """Loading the CA bundle per client took most of a server's start: clients of one
    ALPN choice share one context, and it still verifies (the test CA is not in it)."""
    clients = [
        http_client(LOOPBACK, timeout_s=CALL_DEADLINE_S, http2=http2)
        for http2 in (False, False, True)
    ]
    contexts = [client._transport._pool._ssl_context for client in clients]  # type: ignore[attr-defined]
    assert contexts[0] is contexts[1]
    assert contexts[2] is not contexts[0]
    assert all(context.verify_mode == ssl.CERT_REQUIRED for context in contexts)
    own = ssl.create_default_context(cafile=str(tls_web.ca_file))
    with_own = http_client(LOOPBACK, timeout_s=CALL_DEADLINE_S, verify=own)
    assert with_own._transport._pool._ssl_context is own  # type: ignore[attr-defined]
    for client in clients:
        async with client:
            with pytest.raises(httpx.ConnectError):
                await client.get(f"https://localhost:{tls_web.server.port}/tls")
    async with with_own:
        response = await with_own.get(f"https://localhost:{tls_web.server.port}/tls")
    assert response.text == f"localhost:{tls_web.server.port}"
