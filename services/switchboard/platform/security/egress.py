"""Egress policy: every outbound call to an address a user gave goes through here (SSRF).

An integration's endpoint is typed by a workspace owner, yet the server calls
it from inside the operator's network. Without a policy anyone who may create
an integration could make the server fetch its cloud metadata credentials
(169.254.169.254), talk to the Redis next to it, or scan the private network.

The rules (``EgressPolicy.check_ip``), in order:

1. An address inside an ``allow_cidrs`` entry is allowed. Cloud metadata
   addresses are the exception: only an entry naming exactly that host
   (``169.254.169.254/32``) allows one; a wider network never does.
2. Always refused: cloud metadata (``METADATA_ADDRESSES``), unspecified
   (``0.0.0.0/8``, ``::``), multicast, broadcast, reserved and
   documentation ranges, IPv6 discard-only, Teredo and IETF protocol
   assignments (``2001::/23``), and anything outside a unicast range.
3. Loopback (``127.0.0.0/8``, ``::1``): refused unless ``allow_loopback``.
4. Private networks: RFC 1918, CGNAT ``100.64.0.0/10``, link-local
   ``169.254.0.0/16`` and ``fe80::/10``, unique-local ``fc00::/7``, site-local
   ``fec0::/10``, benchmarking ``198.18.0.0/15`` and ``2001:2::/48``, local-use
   NAT64 ``64:ff9b:1::/48``: refused unless ``allow_private``.

IPv6 forms that carry an IPv4 address are judged by that address as well:
IPv4-mapped (``::ffff:127.0.0.1``), IPv4-translated (``::ffff:0:a.b.c.d``),
IPv4-compatible (``::a.b.c.d``), 6to4 (``2002:AABB:CCDD::/48``) and
well-known NAT64 (``64:ff9b::a.b.c.d``). Either form being refused refuses
the address; either form inside an ``allow_cidrs`` entry allows it.

**No DNS rebinding.** A name is resolved once per connection, every address it
resolves to is checked (one refused address refuses the name), and the
connection goes to a checked address, never to the name again:
``http_client`` swaps httpx's network backend for one that resolves and checks
at connect time, dials the checked IP, and leaves the ``Host`` header, TLS SNI
and certificate verification on the name the user gave; ``grpc_target`` turns
an endpoint into an ``ipv4:``/``ipv6:`` target of checked IPs with the
original authority and TLS name as channel options. A gRPC channel built
from it never resolves again: rebuild it (a new ``grpc_target``) to follow a
DNS change, for example when the connector reconnects after failures.

Redirects are never followed (a redirect is a new user-given address) and
proxies from the environment are ignored (a proxy would do the connecting,
unchecked).

Errors name at most the host the user gave, never a resolved address: that
would map the internal network for whoever created the integration. For an IP
literal (or ``localhost``), which tells nothing the caller did not know, the
error names the rule that refused it and the setting that allows it; for a
name it lists the settings without saying which rule its addresses broke
(the server's log says, for the operator).
``DestinationBlocked`` is INVALID_ARGUMENT; ``ResolutionFailed`` (the name does
not resolve, or DNS timed out) is UNAVAILABLE. Its metadata ``resolution`` says
which (``no_such_host``: the DNS answered that the name does not exist;
``lookup_failed``: the lookup itself failed or timed out, which may be the
resolver's trouble and says nothing of the name), so that a caller fetching a
resource its client named can answer the first as that client's input
(``no_such_host()``), as the files fetcher does.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
import socket
import ssl
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import httpcore
import httpx
from pydantic import Field

from switchboard.platform.config import CommaSeparated, ConfigError, Section
from switchboard.platform.errors import (
    DestinationBlocked,
    FieldViolation,
    InvalidArgument,
    ResolutionFailed,
)
from switchboard.platform.observe.telemetry import instrument_http

__all__ = [
    "METADATA_ADDRESSES",
    "EgressPolicy",
    "EgressSettings",
    "GrpcEndpoint",
    "HttpEndpoint",
    "ResolutionFailed",
    "check_host",
    "grpc_target",
    "http_client",
    "no_such_host",
    "parse_grpc_endpoint",
    "parse_http_endpoint",
    "resolve_checked",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Longest URL accepted for an HTTP endpoint (and gRPC target).
MAX_URL_LENGTH: Final = 2048
#: Most addresses one name may resolve to that are tried in turn on connect;
#: the rest are still checked (any refused one refuses the name).
MAX_CONNECT_ADDRESSES: Final = 8

#: Instance metadata services (AWS EC2 and ECS, EKS pod identity, GCP, Azure,
#: DigitalOcean, Oracle: 169.254.169.254; Alibaba: 100.100.100.200; Azure's
#: WireServer: 168.63.129.16, a public address only reachable from its VMs).
METADATA_ADDRESSES: Final[frozenset[IPAddress]] = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",
        "169.254.170.2",
        "169.254.170.23",
        "100.100.100.200",
        "168.63.129.16",
        "fd00:ec2::254",
        "fd00:ec2::23",
    )
)


def _nets(*cidrs: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


_UNSPECIFIED: Final = _nets("0.0.0.0/8", "::/128")
_LOOPBACK: Final = _nets("127.0.0.0/8", "::1/128")
_PRIVATE: Final = _nets(
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "198.18.0.0/15",
    "fc00::/7",
    "fe80::/10",
    "fec0::/10",
    "2001:2::/48",
    "64:ff9b:1::/48",
)
_ALWAYS: Final = _nets(
    # IETF protocol assignments (DS-Lite, NAT64 discovery, ...).
    "192.0.0.0/24",
    # Documentation.
    "192.0.2.0/24",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "2001:db8::/32",
    "3fff::/20",
    # Deprecated 6to4 relay anycast.
    "192.88.99.0/24",
    # Multicast, reserved ("class E", which holds the limited broadcast).
    "224.0.0.0/4",
    "240.0.0.0/4",
    "ff00::/8",
    # Discard-only; Teredo, ORCHID and other protocol assignments.
    "100::/64",
    "2001::/23",
)
_MAPPED: Final = ipaddress.ip_network("::ffff:0:0/96")
_TRANSLATED: Final = ipaddress.ip_network("::ffff:0:0:0/96")
_COMPATIBLE: Final = ipaddress.ip_network("::/96")
_NAT64: Final = ipaddress.ip_network("64:ff9b::/96")
_SIX_TO_FOUR: Final = ipaddress.ip_network("2002::/16")
_GLOBAL_UNICAST_V6: Final = ipaddress.ip_network("2000::/3")

log = logging.getLogger("switchboard.egress")

#: Why an http:// endpoint is refused where https is required, and what allows it.
PLAIN_HTTP_REFUSED: Final = (
    "must be an https URL: plain http is accepted only where the operator lets integrations "
    "reach loopback or private addresses (SWITCHBOARD_EGRESS_ALLOW_LOOPBACK or "
    "SWITCHBOARD_EGRESS_ALLOW_PRIVATE)"
)

_BLOCKED_MESSAGE: Final = "the destination address is not allowed by the egress policy"


def _forms(ip: IPAddress) -> list[IPAddress]:
    """The address and the IPv4 address it embeds, if any."""
    if isinstance(ip, ipaddress.IPv4Address):
        return [ip]
    v4: ipaddress.IPv4Address | None = None
    if ip in _MAPPED or ip in _TRANSLATED or ip in _NAT64:
        v4 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    elif ip in _COMPATIBLE and int(ip) > 1:
        # ``::`` and ``::1`` are in ::/96 too, but are v6 addresses of their own.
        v4 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    elif ip in _SIX_TO_FOUR:
        v4 = ip.sixtofour
    return [ip] if v4 is None else [ip, v4]


def _category(ip: IPAddress) -> str | None:
    """Which rule refuses this single form: "always", "loopback", "private" or None."""
    if ip in METADATA_ADDRESSES or any(ip in n for n in (*_UNSPECIFIED, *_ALWAYS)):
        return "always"
    if isinstance(ip, ipaddress.IPv6Address) and (
        ip not in _GLOBAL_UNICAST_V6
        and not any(
            ip in n for n in (*_LOOPBACK, *_PRIVATE, _MAPPED, _TRANSLATED, _COMPATIBLE, _NAT64)
        )
    ):
        # Unallocated or reserved space outside 2000::/3 (and the ranges named here).
        return "always"
    if any(ip in n for n in _LOOPBACK):
        return "loopback"
    if any(ip in n for n in _PRIVATE):
        return "private"
    return None


def _as_ip(ip: str | IPAddress) -> IPAddress:
    if isinstance(ip, str):
        text = ip.strip("[]")
        # A scope (fe80::1%eth0) does not change which network the address is in.
        return ipaddress.ip_address(text.split("%", 1)[0])
    return ip


class EgressSettings(Section):
    """Where outbound calls may go: read by the integration hub, by the dispatcher for a
    workspace's experts and by the A2A front door for push notifications, so it is a
    section of the platform's, beside the policy it configures."""

    egress_allow_loopback: bool = Field(
        default=False,
        description="let integrations reach loopback addresses (dev mode and tests)",
    )
    egress_allow_private: bool = Field(
        default=False,
        description="let integrations reach private, unique-local and link-local networks "
        "(never cloud metadata addresses)",
    )
    egress_allow_cidrs: CommaSeparated = Field(
        default=(),
        description="comma-separated networks integrations may reach despite the two settings "
        "above",
    )


@dataclass(frozen=True)
class EgressPolicy:
    """Which destinations outbound calls may reach; see the module doc for the rules."""

    allow_loopback: bool = False
    allow_private: bool = False
    allow_cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def from_settings(cls, settings: EgressSettings) -> EgressPolicy:
        """The policy the operator configured (``SWITCHBOARD_EGRESS_*``)."""
        networks: list[IPNetwork] = []
        for position, entry in enumerate(settings.egress_allow_cidrs, start=1):
            try:
                networks.append(ipaddress.ip_network(entry))
            except ValueError:
                raise ConfigError(
                    f"SWITCHBOARD_EGRESS_ALLOW_CIDRS: entry {position} ({entry!r}) is not a "
                    "network; expected addresses or networks such as 10.1.0.0/16,fd00:1::/64 "
                    "(no host bits set after the prefix)"
                ) from None
        return cls(
            allow_loopback=settings.egress_allow_loopback,
            allow_private=settings.egress_allow_private,
            allow_cidrs=tuple(networks),
        )

    def allows(self, ip: str | IPAddress) -> bool:
        """Whether ``ip`` may be connected to (``check_ip`` without the exception)."""
        return self.refusal(ip) is None

    def refusal(self, ip: str | IPAddress) -> str | None:
        """The rule that refuses ``ip`` ("always", "loopback" or "private"), or None."""
        address = _as_ip(ip)
        forms = _forms(address)
        for form in forms:
            for network in self.allow_cidrs:
                if form.version != network.version or form not in network:
                    continue
                if form not in METADATA_ADDRESSES:
                    return None
                # Metadata: only an entry naming exactly this host.
                if network.num_addresses == 1:
                    return None
        for form in forms:
            category = _category(form)
            if category == "always":
                return category
            if category == "loopback" and not self.allow_loopback:
                return category
            if category == "private" and not self.allow_private:
                return category
        return None

    def check_ip(self, ip: str | IPAddress) -> None:
        """Raise ``DestinationBlocked`` unless ``ip`` may be connected to.

        A string that is not an IP address raises ``InvalidArgument``.
        """
        try:
            allowed = self.allows(ip)
        except ValueError:
            raise InvalidArgument("not an IP address") from None
        if not allowed:
            raise DestinationBlocked(_BLOCKED_MESSAGE)


# ---------------------------------------------------------------------------
# Endpoint parsing

#: One DNS label; names are checked in their ASCII (IDNA) form.
_LABEL: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_FORBIDDEN_CHARS: Final = re.compile(r"[\x00-\x20\x7f\\]")


@dataclass(frozen=True)
class HttpEndpoint:
    """An http(s) URL split into what a connection needs."""

    scheme: str
    #: Lower-case name in ASCII (IDNA) form, or an IP address without brackets.
    host: str
    port: int
    #: Path and query, as sent in the request line ("/" when empty).
    path: str

    @property
    def url(self) -> str:
        """The normalized URL (default port left out)."""
        default = 443 if self.scheme == "https" else 80
        port = "" if self.port == default else f":{self.port}"
        return f"{self.scheme}://{_bracketed(self.host)}{port}{self.path}"


@dataclass(frozen=True)
class GrpcEndpoint:
    """A gRPC server address: ``host:port``, plaintext unless ``tls``."""

    host: str
    port: int
    tls: bool = False

    @property
    def authority(self) -> str:
        """``host:port`` as the ``:authority`` header carries it."""
        return f"{_bracketed(self.host)}:{self.port}"


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _host_problem(host: str) -> tuple[str, str | None]:
    """The normalized host, and what is wrong with it (None if nothing)."""
    if not host:
        return host, "has no host"
    if "%" in host:
        return host, "has an invalid IPv6 address (a zone index is not allowed)"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return str(ip), None
    if ":" in host:
        return host, "has an invalid IPv6 address"
    try:
        ascii_host = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return host, "has an invalid host name"
    labels = ascii_host.removesuffix(".").split(".")
    if len(ascii_host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        return host, "has an invalid host name"
    return ascii_host, None


def _invalid(field: str, description: str) -> InvalidArgument:
    return InvalidArgument(
        f"{field} {description}", [FieldViolation(field=field, description=description)]
    )


def parse_http_endpoint(url: str, field: str) -> HttpEndpoint:
    """Parse an http or https URL; ``InvalidArgument`` naming ``field`` if it is not one.

    Userinfo (``user:pass@``) is refused: credentials belong in the
    integration's write-only credential, not in a URL that is shown to readers.
    """
    if len(url) > MAX_URL_LENGTH:
        raise _invalid(field, f"is longer than {MAX_URL_LENGTH} characters")
    if _FORBIDDEN_CHARS.search(url):
        raise _invalid(field, "contains spaces, control characters or backslashes")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise _invalid(field, "is not a valid URL (check the port and brackets)") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise _invalid(field, "must be an http:// or https:// URL")
    if "@" in parts.netloc:
        raise _invalid(field, "must not contain a user name or password")
    if parts.fragment or url.endswith("#"):
        raise _invalid(field, "must not contain a fragment (#...)")
    host, problem = _host_problem(parts.hostname or "")
    if problem is not None:
        raise _invalid(field, problem)
    if port == 0:
        raise _invalid(field, "has port 0")
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    return HttpEndpoint(
        scheme=scheme, host=host, port=port or (443 if scheme == "https" else 80), path=path
    )


#: Schemes a gRPC endpoint may carry, and whether each means TLS.
GRPC_SCHEMES: Final = {"grpcs": True, "https": True, "grpc": False, "http": False}


def parse_grpc_endpoint(target: str, field: str) -> GrpcEndpoint:
    """Parse a gRPC endpoint; ``InvalidArgument`` naming ``field`` if it is not one.

    ``host:port`` and ``[v6]:port`` are plaintext (the usual gRPC target form,
    as for in-cluster experts). ``grpcs://host[:port]`` or ``https://...``
    mean TLS (port 443 by default); ``grpc://`` or ``http://`` say plaintext
    explicitly (port 80 by default). No path, query or user info.
    """
    if len(target) > MAX_URL_LENGTH:
        raise _invalid(field, f"is longer than {MAX_URL_LENGTH} characters")
    if _FORBIDDEN_CHARS.search(target):
        raise _invalid(field, "contains spaces, control characters or backslashes")
    scheme, sep, _ = target.partition("://")
    tls = False
    if sep:
        if scheme.lower() not in GRPC_SCHEMES:
            raise _invalid(
                field, "must be host:port, or a grpcs://, https://, grpc:// or http:// address"
            )
        tls = GRPC_SCHEMES[scheme.lower()]
        text = target
        default_port: int | None = 443 if tls else 80
    else:
        # urlsplit needs a scheme to find the host; this one is only a carrier.
        text = f"grpc://{target}"
        default_port = None
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise _invalid(field, "is not host:port (check the port and brackets)") from None
    if "@" in parts.netloc:
        raise _invalid(field, "must not contain a user name or password")
    if parts.path not in ("", "/") or parts.query or parts.fragment or "?" in target:
        raise _invalid(field, "must be host:port without a path or query")
    host, problem = _host_problem(parts.hostname or "")
    if problem is not None:
        raise _invalid(field, problem)
    if port is None:
        port = default_port
    if port is None:
        raise _invalid(field, "needs a port (host:port)")
    if port == 0:
        raise _invalid(field, "has port 0")
    return GrpcEndpoint(host=host, port=port, tls=tls)


# ---------------------------------------------------------------------------
# Resolution


#: Per rule: what the caller is told about an address it gave literally, and the
#: settings that allow such an address.
_RULES: Final = {
    "loopback": (
        "a loopback address",
        "SWITCHBOARD_EGRESS_ALLOW_LOOPBACK=true (development) or SWITCHBOARD_EGRESS_ALLOW_CIDRS",
    ),
    "private": (
        "a private, link-local or unique-local address",
        "SWITCHBOARD_EGRESS_ALLOW_PRIVATE=true or SWITCHBOARD_EGRESS_ALLOW_CIDRS",
    ),
    "always": (
        "an address the policy always refuses (cloud metadata, unspecified, multicast, "
        "reserved or documentation ranges)",
        "only a SWITCHBOARD_EGRESS_ALLOW_CIDRS entry naming exactly that address",
    ),
}
_ANY_SETTING: Final = (
    "SWITCHBOARD_EGRESS_ALLOW_LOOPBACK, SWITCHBOARD_EGRESS_ALLOW_PRIVATE or "
    "SWITCHBOARD_EGRESS_ALLOW_CIDRS"
)


def _blocked(host: str, field: str, rule: str, *, literal: bool) -> DestinationBlocked:
    """The refusal of ``host``: for a literal address, the rule and its setting; for
    a name, only the settings (which rule would say what the name resolves to)."""
    if literal:
        what, setting = _RULES[rule]
        message = (
            f"{host!r} is not an allowed destination: {what}, refused by the server's egress "
            f"policy; an operator allows it with {setting}"
        )
    else:
        log.info("destination refused by the egress policy", extra={"host": host, "rule": rule})
        message = (
            f"{host!r} is not an allowed destination: it resolves to an address the server's "
            f"egress policy refuses; an operator allows such addresses with {_ANY_SETTING} "
            "(the server's log names the rule)"
        )
    violations = [FieldViolation(field=field, description=message)] if field else []
    return DestinationBlocked(
        f"{field} {message}" if field else message,
        violations,
        metadata={"policy": f"egress.{rule}"} if literal else {"policy": "egress"},
    )


#: ``ResolutionFailed``'s metadata ``resolution``: the name does not exist, or the
#: lookup failed (see the module doc).
NO_SUCH_HOST: Final = "no_such_host"
LOOKUP_FAILED: Final = "lookup_failed"
#: getaddrinfo's answers that the name has no address: an answer about the name.
_NO_SUCH_NAME: Final = frozenset(
    code
    for code in (
        socket.EAI_NONAME,
        getattr(socket, "EAI_NODATA", None),
        getattr(socket, "EAI_ADDRFAMILY", None),
    )
    if code is not None
)


def no_such_host(error: ResolutionFailed) -> bool:
    """Whether the DNS answered that the name does not exist (the name's fault), as
    opposed to a lookup that failed or timed out (maybe the resolver's)."""
    return error.metadata.get("resolution") == NO_SUCH_HOST


def _unresolved(host: str, *, unknown: bool) -> ResolutionFailed:
    if unknown:
        return ResolutionFailed(
            f"{host!r} could not be resolved: there is no such host",
            metadata={"resolution": NO_SUCH_HOST},
        )
    return ResolutionFailed(
        f"{host!r} could not be resolved", metadata={"resolution": LOOKUP_FAILED}
    )


def _is_localhost(host: str) -> bool:
    """``localhost`` and its subdomains: loopback by definition (RFC 6761)."""
    name = host.rstrip(".").lower()
    return name == "localhost" or name.endswith(".localhost")


async def resolve_checked(
    host: str, port: int, policy: EgressPolicy, *, timeout_s: float, field: str = ""
) -> list[str]:
    """Resolve ``host`` and return its addresses if every one is allowed.

    Raises ``DestinationBlocked`` (naming ``field`` if given) when any address
    is refused, ``ResolutionFailed`` when the name does not resolve within
    ``timeout_s``. An IP literal is checked without a lookup.
    """
    try:
        literal: IPAddress | None = _as_ip(host)
    except ValueError:
        literal = None
    if literal is not None:
        rule = policy.refusal(literal)
        if rule is not None:
            raise _blocked(host, field, rule, literal=True)
        return [str(literal)]
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except TimeoutError:
        raise ResolutionFailed(
            f"resolving {host!r} timed out", metadata={"resolution": LOOKUP_FAILED}
        ) from None
    except socket.gaierror as exc:
        raise _unresolved(host, unknown=exc.errno in _NO_SUCH_NAME) from None
    except UnicodeError:
        # A name IDNA cannot encode names nothing.
        raise _unresolved(host, unknown=True) from None
    except OSError:
        raise _unresolved(host, unknown=False) from None
    addresses: list[str] = []
    for _, _, _, _, sockaddr in infos:
        address = sockaddr[0]
        # Only AF_INET and AF_INET6 results carry a text address.
        if isinstance(address, str) and address not in addresses:
            addresses.append(address)
    if not addresses:
        raise _unresolved(host, unknown=True)
    for address in addresses:
        rule = policy.refusal(address)
        if rule is not None:
            raise _blocked(host, field, rule, literal=_is_localhost(host) and rule == "loopback")
    return addresses


async def check_host(
    host: str, port: int, policy: EgressPolicy, *, timeout_s: float, field: str = ""
) -> None:
    """Create-time validation: ``resolve_checked`` without the addresses."""
    await resolve_checked(host, port, policy, timeout_s=timeout_s, field=field)


# ---------------------------------------------------------------------------
# HTTP


class _CheckedBackend(httpcore.AsyncNetworkBackend):
    """Resolves and checks at connect time, then dials the checked IP itself.

    httpcore passes the URL's host here and the same host to ``start_tls``
    afterwards, so SNI and certificate verification stay on the user's name.
    """

    def __init__(self, policy: EgressPolicy, resolve_timeout_s: float) -> None:
        self._policy = policy
        self._resolve_timeout_s = resolve_timeout_s
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's signature
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await resolve_checked(
            host, port, self._policy, timeout_s=self._resolve_timeout_s
        )
        # The connect timeout bounds all attempts together, not each one.
        deadline = None if timeout is None else time.monotonic() + timeout
        error: Exception | None = None
        for address in addresses[:MAX_CONNECT_ADDRESSES]:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            try:
                return await self._inner.connect_tcp(
                    address,
                    port,
                    timeout=remaining,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        if error is None:
            raise httpcore.ConnectTimeout(f"connecting to {host!r} timed out")
        raise error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's signature
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise DestinationBlocked("unix sockets are not an allowed destination")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


@functools.cache
def _verifying_context(http2: bool) -> ssl.SSLContext:
    """The certificate-verifying TLS context of every client of this ALPN choice.

    Loading the CA bundle costs 15-20 ms, and a server makes a client per integration,
    model and webhook engine: built once per process, it took most of a server's start.
    One per ``http2`` because httpcore sets a context's ALPN protocols on each connection
    from that alone, so clients sharing a context never change it under each other.
    """
    return httpx.create_ssl_context(verify=True, trust_env=False)


class _CheckedTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport (exception mapping, streaming) over a checked backend."""

    def __init__(
        self,
        policy: EgressPolicy,
        *,
        resolve_timeout_s: float,
        verify: Any = True,
        cert: Any = None,
        http1: bool = True,
        http2: bool = False,
        limits: httpx.Limits | None = None,
    ) -> None:
        limits = limits or httpx.Limits(max_connections=100, max_keepalive_connections=20)
        if verify is True and cert is None:
            verify = _verifying_context(http2)
        super().__init__(
            verify=verify, cert=cert, trust_env=False, http1=http1, http2=http2, limits=limits
        )
        ssl_context = httpx.create_ssl_context(verify=verify, cert=cert, trust_env=False)
        # httpx builds its pool without a way to pass a network backend, so the
        # pool is replaced by an identical one that has ours (the egress tests
        # fail if this ever stops taking effect).
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=http1,
            http2=http2,
            network_backend=_CheckedBackend(policy, resolve_timeout_s),
        )


#: AsyncClient arguments that would bypass the policy.
_FORBIDDEN_CLIENT_ARGS: Final = frozenset(
    {"transport", "mounts", "proxy", "follow_redirects", "trust_env", "app"}
)


def http_client(
    policy: EgressPolicy,
    *,
    timeout_s: float,
    headers: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` that only connects to addresses ``policy`` allows.

    Every connection resolves and checks its host (DNS bounded by
    ``timeout_s``) and dials the checked address. Redirects are returned, not
    followed; environment proxies and certificate settings are ignored.
    ``verify``, ``cert``, ``http1``, ``http2`` and ``limits`` go to the
    transport, any other keyword to ``httpx.AsyncClient``.
    """
    refused = _FORBIDDEN_CLIENT_ARGS & kwargs.keys()
    if refused:
        raise TypeError(f"http_client does not accept {sorted(refused)}: they bypass the policy")
    transport_args = {
        key: kwargs.pop(key)
        for key in ("verify", "cert", "http1", "http2", "limits")
        if key in kwargs
    }
    kwargs.setdefault("timeout", httpx.Timeout(timeout_s))
    client = httpx.AsyncClient(
        transport=_CheckedTransport(policy, resolve_timeout_s=timeout_s, **transport_args),
        headers=headers,
        follow_redirects=False,
        trust_env=False,
        **kwargs,
    )
    # With tracing on: a client span per request and ``traceparent`` in its headers.
    return instrument_http(client)


# ---------------------------------------------------------------------------
# gRPC


async def grpc_target(
    endpoint: GrpcEndpoint, policy: EgressPolicy, *, timeout_s: float, field: str = ""
) -> tuple[str, list[tuple[str, str | int]]]:
    """A channel target of checked IPs and the options that keep the original name.

    Returns ``("ipv4:10.0.0.1:50051,10.0.0.2:50051", options)``: the target
    dials only checked addresses (one address family: the first resolved
    address's, as a target URI has one scheme), and ``options`` set the
    ``:authority`` to the endpoint's ``host:port``, verify TLS against its
    host, and turn off gRPC's own proxy discovery from the environment.
    """
    addresses = await resolve_checked(
        endpoint.host, endpoint.port, policy, timeout_s=timeout_s, field=field
    )
    first = ipaddress.ip_address(addresses[0])
    same_family = [a for a in addresses if ipaddress.ip_address(a).version == first.version][
        :MAX_CONNECT_ADDRESSES
    ]
    if first.version == 4:
        target = "ipv4:" + ",".join(f"{a}:{endpoint.port}" for a in same_family)
    else:
        target = "ipv6:" + ",".join(f"[{a}]:{endpoint.port}" for a in same_family)
    options: list[tuple[str, str | int]] = [
        ("grpc.default_authority", endpoint.authority),
        ("grpc.enable_http_proxy", 0),
    ]
    if endpoint.tls:
        options.append(("grpc.ssl_target_name_override", endpoint.host))
    return target, options
