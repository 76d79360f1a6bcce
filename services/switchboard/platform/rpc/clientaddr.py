"""The client's address: the connection's peer, or behind a trusted proxy, x-forwarded-for.

Envoy (``use_remote_address: true, xff_num_trusted_hops: 0``) appends the
address of the connection it accepted to whatever ``x-forwarded-for`` the
client sent. Only the entries appended by proxies we trust are facts; anything
left of them may be forged. So the address is found by walking from the right:
the direct peer first, then the header's entries, skipping proxies we trust,
and the first address that is not a trusted proxy is the client. A peer that is
not a trusted proxy is the client itself, and its header means nothing.

No grpc here: the transport hands over the peer string and the header values.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from switchboard.platform.config import ConfigError

#: The setting whose text ``TrustedProxies.parse`` reads (named in its errors).
SETTING: Final = "SWITCHBOARD_TRUSTED_PROXIES"
#: The header (gRPC metadata key) proxies append the client's address to.
FORWARDED_FOR: Final = "x-forwarded-for"
#: Of x-forwarded-for only this many characters, from the right, are read: the
#: entries that matter were appended last, and a client may send kilobytes.
MAX_FORWARDED_CHARS: Final = 8 * 1024
#: And at most this many entries: a chain of trusted proxies is a few hops.
MAX_FORWARDED_ENTRIES: Final = 64
#: Networks in SWITCHBOARD_TRUSTED_PROXIES; each is checked per hop of each sign-in.
MAX_TRUSTED_NETWORKS: Final = 256
#: The longest entry that can be an address: bracketed IPv6 with a zone and a port.
_MAX_ENTRY_CHARS: Final = 64
#: Bad entries quoted in a ConfigError are cut to this length.
_MAX_QUOTED_CHARS: Final = 64
#: What a peer that names no address (empty) is counted as.
UNKNOWN: Final = "unknown"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# gRPC writes "ipv4:1.2.3.4:5" and "ipv6:[::1]:5", the brackets percent-encoded
# by the C core ("ipv6:%5B::1%5D:5").
_PEER: Final = re.compile(r"(ipv4|ipv6):(.+):[0-9]{1,5}")
_BRACKETED: Final = re.compile(r"\[([^\[\]]+)\](?::[0-9]{1,5})?")
_IPV4_PORT: Final = re.compile(r"([0-9.]+):[0-9]{1,5}")


def _ip(text: str) -> IPAddress | None:
    """``text`` as an address: an IPv6 zone dropped, IPv4-mapped IPv6 as IPv4."""
    # A zone (fe80::1%eth0) names an interface of the host that saw the
    # address; it is not part of who the client is.
    host = text.partition("%")[0] if ":" in text else text
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        # A dual-stack socket reports an IPv4 client as ::ffff:a.b.c.d; it is
        # the same client, and the trusted list is written in IPv4.
        return ip.ipv4_mapped
    return ip


def parse_peer(peer: str) -> IPAddress | None:
    """The address of a gRPC peer string; None for a Unix socket or anything else."""
    match = _PEER.fullmatch(peer)
    if match is None:
        return None
    host = urllib.parse.unquote(match.group(2))
    if match.group(1) == "ipv6":
        if not (host.startswith("[") and host.endswith("]")):
            return None
        host = host[1:-1]
    return _ip(host)


def peer_address(peer: str) -> str:
    """The client address a gRPC peer string names: its IP, else the peer itself (``unix:``)."""
    ip = parse_peer(peer)
    if ip is not None:
        return str(ip)
    return peer[:_MAX_ENTRY_CHARS] or UNKNOWN


def parse_forwarded(entry: str) -> IPAddress | None:
    """One x-forwarded-for entry as an address, or None if it is not one.

    Takes ``1.2.3.4``, ``1.2.3.4:80``, ``2001:db8::1``, ``[2001:db8::1]`` and
    ``[2001:db8::1]:80`` (proxies differ), whitespace around it ignored.
    """
    text = entry.strip()
    if not text or len(text) > _MAX_ENTRY_CHARS:
        return None
    if text.startswith("["):
        match = _BRACKETED.fullmatch(text)
        return _ip(match.group(1)) if match else None
    if text.count(":") == 1:
        match = _IPV4_PORT.fullmatch(text)
        return _ip(match.group(1)) if match else None
    return _ip(text)


def forwarded_values(metadata: Iterable[tuple[str, str | bytes]] | None) -> list[str]:
    """The x-forwarded-for values in call metadata, in the order they came."""
    return [
        value for key, value in metadata or () if key == FORWARDED_FOR and isinstance(value, str)
    ]


def _entries(values: Sequence[str]) -> list[str]:
    """The rightmost entries of the header (all its values joined), within the bounds."""
    joined = ",".join(values)
    if len(joined) > MAX_FORWARDED_CHARS:
        cut = len(joined) - MAX_FORWARDED_CHARS
        tail = joined[cut:]
        if joined[cut - 1] != ",":
            # The first piece is the end of an entry cut in two: "2001:db8::1"
            # cut to "b8::1" would still read as an address.
            tail = tail.partition(",")[2]
        joined = tail
    return joined.split(",")[-MAX_FORWARDED_ENTRIES:]


def _quoted(entry: str) -> str:
    return repr(entry[:_MAX_QUOTED_CHARS] + ("..." if len(entry) > _MAX_QUOTED_CHARS else ""))


def _network(entry: str) -> IPNetwork:
    """One entry of the setting as a network; raises ValueError saying what is wrong."""
    try:
        network = ipaddress.ip_network(entry)
    except ValueError:
        try:
            meant = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ValueError("is not an IP address or a CIDR network (like 10.0.0.0/8)") from None
        # Refused, not widened: 10.0.0.1/8 may as well be a typo for 10.0.0.1/32.
        raise ValueError(f"has host bits set (the network would be {meant})") from None
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            # Peers are compared as IPv4 (see _ip), so an IPv4-mapped network is too.
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


@dataclass(frozen=True)
class TrustedProxies:
    """Networks whose peers are proxies: their x-forwarded-for is believed."""

    networks: tuple[IPNetwork, ...] = ()
    # (network address, mask) as integers per IP version: the check runs per
    # hop of every sign-in, and integer masks are much cheaper than ip_network.
    _v4: tuple[tuple[int, int], ...] = field(init=False, repr=False, compare=False)
    _v6: tuple[tuple[int, int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.networks) > MAX_TRUSTED_NETWORKS:
            raise ValueError(f"at most {MAX_TRUSTED_NETWORKS} trusted networks")
        for version, name in ((4, "_v4"), (6, "_v6")):
            masks = tuple(
                (int(n.network_address), int(n.netmask))
                for n in self.networks
                if n.version == version
            )
            object.__setattr__(self, name, masks)

    @classmethod
    def parse(cls, entries: Sequence[str]) -> TrustedProxies:
        """The setting's entries (addresses or CIDR networks) as trusted networks.

        Raises ConfigError, one line naming each bad entry by position and text
        (a network is not a secret), so a typo stops the start.
        """
        if len(entries) > MAX_TRUSTED_NETWORKS:
            raise ConfigError(
                f"{SETTING}: {len(entries)} networks; at most {MAX_TRUSTED_NETWORKS} "
                "(list the proxies' networks, not each proxy)"
            )
        networks: list[IPNetwork] = []
        problems: list[str] = []
        for number, entry in enumerate(entries, start=1):
            try:
                networks.append(_network(entry.strip()))
            except ValueError as exc:
                problems.append(f"{SETTING} (item {number}): {_quoted(entry)} {exc}")
        if problems:
            raise ConfigError("; ".join(problems))
        return cls(tuple(networks))

    def __contains__(self, ip: object) -> bool:
        if isinstance(ip, ipaddress.IPv4Address):
            masks = self._v4
        elif isinstance(ip, ipaddress.IPv6Address):
            masks = self._v6
        else:
            return False
        value = int(ip)
        return any(value & mask == network for network, mask in masks)

    def __bool__(self) -> bool:
        return bool(self.networks)


def client_address(peer: str, forwarded_for: Sequence[str], trusted: TrustedProxies) -> str:
    """The client's address, as sign-in limits and sessions should know it.

    ``peer`` is the gRPC peer string, ``forwarded_for`` the x-forwarded-for
    values of the call. From a peer that is not a trusted proxy, the header is
    ignored. Otherwise the header is walked from the right past trusted
    proxies: the first address that is not one is the client. If every entry
    is a trusted proxy, the leftmost is (the request began inside). An entry
    that is not an address stops the walk at the hop that forwarded it: what it
    says, and anything left of it, cannot be believed.
    """
    direct = parse_peer(peer)
    if direct is None:
        return peer_address(peer)
    if direct not in trusted or not forwarded_for:
        return str(direct)
    found = direct
    for entry in reversed(_entries(forwarded_for)):
        ip = parse_forwarded(entry)
        if ip is None:
            break
        found = ip
        if ip not in trusted:
            break
    return str(found)
