"""Whose address a call is: the peer, or behind a trusted proxy, from x-forwarded-for."""

from __future__ import annotations

import ipaddress

import pytest

from switchboard.mesh import check_settings
from switchboard.platform.config import ConfigError
from switchboard.platform.rpc.clientaddr import (
    MAX_FORWARDED_CHARS,
    MAX_FORWARDED_ENTRIES,
    MAX_TRUSTED_NETWORKS,
    TrustedProxies,
    client_address,
    forwarded_values,
    parse_forwarded,
    parse_peer,
    peer_address,
)
from switchboard.settings import load_settings

pytestmark = pytest.mark.unit

ENVOY = "ipv4:10.0.0.5:41234"
TRUSTED = TrustedProxies.parse(("10.0.0.0/24", "fd00:e::/64"))
NOBODY = TrustedProxies.parse(())


# -- peers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:1.2.3.4:5", "1.2.3.4"),
        ("ipv6:[::1]:5", "::1"),
        # What grpc's C core actually writes for IPv6.
        ("ipv6:%5B2001:db8::7%5D:55916", "2001:db8::7"),
        ("ipv6:[fe80::1%25eth0]:5", "fe80::1"),
        # A dual-stack socket's IPv4 client is that IPv4 client.
        ("ipv6:[::ffff:192.0.2.9]:5", "192.0.2.9"),
        ("ipv6:%5B::ffff:192.0.2.9%5D:5", "192.0.2.9"),
    ],
)
def test_peer_strings_name_their_address(peer: str, address: str) -> None:
    assert str(parse_peer(peer)) == address
    assert peer_address(peer) == address


@pytest.mark.parametrize(
    "peer", ["unix:", "unix:/run/sb.sock", "", "ipv4:nonsense:5", "ipv6:::1:5"]
)
def test_other_peers_have_no_ip_and_count_as_themselves(peer: str) -> None:
    assert parse_peer(peer) is None
    assert peer_address(peer) == (peer or "unknown")
    assert client_address(peer, ["198.51.100.1"], TRUSTED) == (peer or "unknown")


# -- entries ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "address"),
    [
        ("198.51.100.1", "198.51.100.1"),
        ("  198.51.100.1\t", "198.51.100.1"),
        ("198.51.100.1:8080", "198.51.100.1"),
        ("2001:db8::1", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("::ffff:198.51.100.1", "198.51.100.1"),
        ("[::ffff:198.51.100.1]:1", "198.51.100.1"),
        ("[fe80::1%eth0]:1", "fe80::1"),
    ],
)
def test_forwarded_entries_in_every_shape_proxies_write(entry: str, address: str) -> None:
    assert str(parse_forwarded(entry)) == address


@pytest.mark.parametrize(
    "entry",
    [
        "",
        "unknown",
        "_hidden",
        "198.51.100",
        "198.51.100.1:",
        "198.51.100.1:http",
        "01.2.3.4",
        "[2001:db8::1",
        "[198.51.100.1]x",
        "2001:db8::1]:443",
        "for=198.51.100.1",
        "198.51.100.1%eth0",
        "example.com",
        "1" * 100,
    ],
)
def test_garbage_entries_are_not_addresses(entry: str) -> None:
    assert parse_forwarded(entry) is None


def test_forwarded_values_reads_only_the_header_as_text() -> None:
    metadata: list[tuple[str, str | bytes]] = [
        ("authorization", "Bearer x"),
        ("x-forwarded-for", "1.1.1.1"),
        ("x-forwarded-for-bin", b"\x01"),
        ("x-forwarded-for", "2.2.2.2"),
    ]
    assert forwarded_values(metadata) == ["1.1.1.1", "2.2.2.2"]
    assert forwarded_values(None) == []


# -- the trust rules --------------------------------------------------------------------


def test_without_a_header_the_trusted_peer_is_the_address() -> None:
    assert client_address(ENVOY, [], TRUSTED) == "10.0.0.5"
    assert client_address(ENVOY, [""], TRUSTED) == "10.0.0.5"


def test_behind_a_trusted_proxy_the_forwarded_client_is_the_address() -> None:
    assert client_address(ENVOY, ["198.51.100.1"], TRUSTED) == "198.51.100.1"


def test_spoofed_entries_left_of_the_proxys_own_are_ignored() -> None:
    # The client sent "203.0.113.66, 10.0.0.9"; Envoy appended what it saw.
    header = ["203.0.113.66, 10.0.0.9,198.51.100.1"]
    assert client_address(ENVOY, header, TRUSTED) == "198.51.100.1"


def test_a_chain_of_trusted_proxies_is_walked_past() -> None:
    # client -> 10.0.0.7 (a trusted proxy) -> 10.0.0.8 -> peer 10.0.0.5.
    header = ["203.0.113.66,198.51.100.1, 10.0.0.7", "10.0.0.8"]
    assert client_address(ENVOY, header, TRUSTED) == "198.51.100.1"


def test_when_every_entry_is_trusted_the_leftmost_is_the_client() -> None:
    assert client_address(ENVOY, ["10.0.0.1, 10.0.0.2,10.0.0.3"], TRUSTED) == "10.0.0.1"


def test_several_header_values_are_one_list_in_order() -> None:
    assert client_address(ENVOY, ["203.0.113.66", "198.51.100.1"], TRUSTED) == "198.51.100.1"
    assert client_address(ENVOY, ["198.51.100.1", "10.0.0.9"], TRUSTED) == "198.51.100.1"


def test_ipv6_clients_and_proxies() -> None:
    peer = "ipv6:%5Bfd00:e::5%5D:41234"
    assert client_address(peer, ["2001:db8::1"], TRUSTED) == "2001:db8::1"
    assert client_address(peer, ["[2001:db8::2]:5000"], TRUSTED) == "2001:db8::2"
    assert client_address(peer, ["2001:db8::3, [fd00:e::9]"], TRUSTED) == "2001:db8::3"
    # An IPv4 client of a dual-stack proxy.
    assert client_address(peer, ["::ffff:198.51.100.1"], TRUSTED) == "198.51.100.1"
    # Envoy on a dual-stack socket: its IPv4-mapped address is its IPv4 address.
    assert client_address("ipv6:[::ffff:10.0.0.5]:1", ["198.51.100.1"], TRUSTED) == ("198.51.100.1")


@pytest.mark.parametrize(
    "header",
    [
        "198.51.100.1, unknown, 10.0.0.9",
        "198.51.100.1, , 10.0.0.9",
        "198.51.100.1,not an address,10.0.0.9",
    ],
)
def test_a_garbage_entry_stops_the_walk_at_the_hop_that_forwarded_it(header: str) -> None:
    # Nothing at or left of the garbage can be believed; 10.0.0.9 is the last known hop.
    assert client_address(ENVOY, [header], TRUSTED) == "10.0.0.9"


def test_garbage_where_the_client_should_be_leaves_the_proxy() -> None:
    assert client_address(ENVOY, ["garbage"], TRUSTED) == "10.0.0.5"
    assert client_address(ENVOY, ["198.51.100.1:99999999"], TRUSTED) == "10.0.0.5"


def test_an_untrusted_peer_is_the_address_whatever_its_header_says() -> None:
    peer = "ipv4:203.0.113.66:5"
    assert client_address(peer, ["198.51.100.1"], TRUSTED) == "203.0.113.66"
    assert client_address(peer, ["10.0.0.1"], TRUSTED) == "203.0.113.66"


def test_with_no_trusted_proxies_the_header_is_ignored() -> None:
    assert not NOBODY
    assert client_address(ENVOY, ["198.51.100.1"], NOBODY) == "10.0.0.5"
    assert client_address("ipv4:127.0.0.1:5", ["198.51.100.1"], NOBODY) == "127.0.0.1"


def test_an_oversized_header_is_read_only_from_the_right() -> None:
    # A client pads the header; Envoy appends the truth after the padding.
    padding = ",".join(["10.0.0.1"] * 2000)
    assert len(padding) > MAX_FORWARDED_CHARS
    assert client_address(ENVOY, [padding + ",198.51.100.1"], TRUSTED) == "198.51.100.1"
    assert client_address(ENVOY, [padding, "198.51.100.1"], TRUSTED) == "198.51.100.1"


def test_a_cut_entry_at_the_bound_is_not_read_as_an_address() -> None:
    # 909 entries put the cut 3 characters into the first one, leaving
    # "1:db8::ab:1", which would parse as an address by itself.
    header = "2001:db8::ab:1," + ",".join(["10.0.0.1"] * 909)
    assert header[len(header) - MAX_FORWARDED_CHARS :].startswith("1:db8::ab:1,")
    everyone = TrustedProxies.parse(("10.0.0.0/24", "::/0"))
    # Trusted all the way: the leftmost whole entry within the bound.
    assert client_address(ENVOY, [header], everyone) == "10.0.0.1"


def test_a_long_chain_of_trusted_hops_stops_at_the_entry_bound() -> None:
    chain = [f"10.0.0.{n + 1}" for n in range(MAX_FORWARDED_ENTRIES + 1)]
    assert client_address(ENVOY, [",".join(chain)], TRUSTED) == chain[1]


# -- the setting ------------------------------------------------------------------------


def test_trusted_networks_by_address_or_cidr() -> None:
    trusted = TrustedProxies.parse(
        ("127.0.0.1", " 10.1.0.0/16", "2001:db8::/32", "::ffff:172.16.0.0/108")
    )
    for inside in ("127.0.0.1", "10.1.255.1", "2001:db8:1::1", "172.16.3.4"):
        assert ipaddress.ip_address(inside) in trusted
    for outside in ("127.0.0.2", "10.2.0.1", "2001:db9::1", "172.32.0.1", "::1"):
        assert ipaddress.ip_address(outside) not in trusted
    assert "127.0.0.1" not in trusted  # only addresses, never text


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (("10.0.0.0/8", "envoy"), "SWITCHBOARD_TRUSTED_PROXIES (item 2): 'envoy' is not an IP"),
        (
            ("10.0.0.1/8",),
            "(item 1): '10.0.0.1/8' has host bits set (the network would be 10.0.0.0/8)",
        ),
        (("10.0.0.0/33",), "(item 1): '10.0.0.0/33' is not an IP address or a CIDR network"),
        (("1.2.3.4:80",), "(item 1): '1.2.3.4:80' is not"),
    ],
)
def test_a_bad_entry_is_a_config_error_naming_it(entries: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        TrustedProxies.parse(entries)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_every_bad_entry_is_named_on_one_line_and_long_ones_are_cut() -> None:
    with pytest.raises(ConfigError) as caught:
        TrustedProxies.parse(("x", "10.0.0.0/8", "y\nz" + "q" * 500))
    text = str(caught.value)
    assert "(item 1): 'x'" in text
    assert "(item 3): 'y\\nz" in text
    assert "\n" not in text
    assert len(text) < 400


def test_too_many_networks_is_a_config_error() -> None:
    entries = tuple(f"10.{n // 256}.{n % 256}.0/24" for n in range(MAX_TRUSTED_NETWORKS + 1))
    with pytest.raises(ConfigError, match="at most 256"):
        TrustedProxies.parse(entries)


def test_the_start_refuses_a_bad_trusted_proxies_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWITCHBOARD_TRUSTED_PROXIES", "127.0.0.1/32, 10.0.0.0/x")
    settings = load_settings(dev_mode=True)
    assert settings.auth.trusted_proxies == ("127.0.0.1/32", "10.0.0.0/x")
    with pytest.raises(ConfigError) as caught:
        check_settings(settings)
    assert str(caught.value) == (
        "SWITCHBOARD_TRUSTED_PROXIES (item 2): '10.0.0.0/x' is not an IP address or a CIDR "
        "network (like 10.0.0.0/8)"
    )
    monkeypatch.setenv("SWITCHBOARD_TRUSTED_PROXIES", "127.0.0.1/32,10.0.0.0/8")
    check_settings(load_settings(dev_mode=True))
