"""The media port range of the server's WebRTC peers (``talk/webrtc/ports.py``):
real ``aiortc`` peers on this machine's addresses (aioice leaves out 127.0.0.1), the
server's side confined to a range found free when the test runs, the page's side as
aiortc makes it. A confined peer connects on ports of its range only (its STUN
candidates too), peers share the range one port each and skip ports in use, a full
range refuses the next peer with RESOURCE_EXHAUSTED, and ``parse`` reads the setting."""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from aioice import Connection, stun
from aioice.ice import get_host_addresses
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription

from switchboard.dispatcher.talk.webrtc.ports import PortRange, confine
from switchboard.platform.errors import Code, PortsExhausted
from tests.conftest import CALL_DEADLINE_S

pytestmark = pytest.mark.unit

#: Below Linux's ephemeral ports (32768 on): nothing binding port 0 takes them meanwhile.
_SEARCH = (20_000, 32_000)
_CANDIDATE = re.compile(r"^a=candidate:\S+ \d+ udp \d+ (\S+) (\d+) typ (\w+)", re.MULTILINE)
#: aioice's own class method, to show that confining a peer leaves it alone.
_ORIGINAL = Connection.get_component_candidates


def addresses() -> list[str]:
    """The addresses aioice gathers host candidates on here."""
    found = get_host_addresses(use_ipv4=True, use_ipv6=True)
    assert found, "no address but loopback: aioice would gather no host candidate"
    return found


def occupy(ports: range) -> list[socket.socket]:
    """UDP sockets holding each of ``ports`` on every address (OSError if one is taken)."""
    held: list[socket.socket] = []
    try:
        for address in addresses():
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            for port in ports:
                sock = socket.socket(family, socket.SOCK_DGRAM)
                held.append(sock)
                sock.bind((address, port))
    except OSError:
        for sock in held:
            sock.close()
        raise
    return held


def free_range(size: int) -> PortRange:
    """``size`` consecutive ports free on every address now."""
    for _ in range(200):
        low = _SEARCH[0] + secrets.randbelow(_SEARCH[1] - _SEARCH[0])
        with contextlib.suppress(OSError):
            for sock in occupy(range(low, low + size)):
                sock.close()
            return PortRange(low, low + size - 1)
    raise AssertionError(f"no {size} consecutive free ports in {_SEARCH}")


@contextlib.contextmanager
def held(ports: range) -> Iterator[None]:
    socks = occupy(ports)
    try:
        yield
    finally:
        for sock in socks:
            sock.close()


def candidates(sdp: str) -> list[tuple[str, int, str]]:
    """The (address, port, type) of each candidate a description carries (bundled
    media repeat the same ones under each of their sections)."""
    return [(m[1], int(m[2]), m[3]) for m in _CANDIDATE.finditer(sdp)]


def peer(**config: Any) -> RTCPeerConnection:
    # No ICE servers unless given: aiortc's default is a public STUN server.
    return RTCPeerConnection(RTCConfiguration(iceServers=config.get("ice_servers", [])))


async def page_offer(pages: list[RTCPeerConnection]) -> RTCSessionDescription:
    """A browser's kind of offer (audio both ways and a data channel, bundled)."""
    page = peer()
    pages.append(page)
    page.addTransceiver("audio")
    page.createDataChannel("talk")
    await page.setLocalDescription(await page.createOffer())
    return page.localDescription


async def answered(
    offer: RTCSessionDescription, ports: PortRange, servers: list[RTCPeerConnection], **config: Any
) -> RTCPeerConnection:
    """The server's side, as ``TalkPeer.answer`` does it, confined to ``ports``."""
    server = peer(**config)
    servers.append(server)
    await server.setRemoteDescription(offer)
    confine(server, ports)
    await server.setLocalDescription(await server.createAnswer())
    return server


def ports_of(pc: RTCPeerConnection) -> set[tuple[str, int]]:
    return {(a, p) for a, p, kind in candidates(pc.localDescription.sdp) if kind == "host"}


async def connected(pc: RTCPeerConnection) -> None:
    changed = asyncio.Event()
    pc.on("connectionstatechange", changed.set)
    try:
        async with asyncio.timeout(CALL_DEADLINE_S):
            while pc.connectionState != "connected":
                assert pc.connectionState not in ("failed", "closed"), pc.connectionState
                changed.clear()
                await changed.wait()
    except TimeoutError:
        raise AssertionError(
            f"not connected in {CALL_DEADLINE_S:g} s: still {pc.connectionState}"
        ) from None


def ice_connections(pc: RTCPeerConnection) -> list[Connection]:
    transports = {id(t.receiver.transport): t.receiver.transport for t in pc.getTransceivers()}
    if pc.sctp is not None:
        transports[id(pc.sctp.transport)] = pc.sctp.transport
    return [t.transport.iceGatherer._connection for t in transports.values()]


async def close_all(*pcs: list[RTCPeerConnection]) -> None:
    for group in pcs:
        for pc in group:
            await pc.close()


class _StunServer(asyncio.DatagramProtocol):
    """Answers a binding request with the address it came from (no NAT here)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        request = stun.parse_message(data)
        response = stun.Message(
            message_method=stun.Method.BINDING,
            message_class=stun.Class.RESPONSE,
            transaction_id=request.transaction_id,
        )
        response.attributes["XOR-MAPPED-ADDRESS"] = (addr[0], addr[1])
        self.transport.sendto(bytes(response), addr)


@pytest.mark.service
async def test_a_confined_peer_connects_on_ports_of_its_range_only() -> None:
    ports = free_range(4)
    pages: list[RTCPeerConnection] = []
    servers: list[RTCPeerConnection] = []
    try:
        offer = await page_offer(pages)
        server = await answered(offer, ports, servers)
        # One host candidate per address, each on a port of the range.
        hosts = ports_of(server)
        assert {a for a, _ in hosts} == set(addresses()), hosts
        assert all(p in ports for _, p in hosts), (str(ports), hosts)
        await pages[0].setRemoteDescription(server.localDescription)
        await asyncio.gather(connected(server), connected(pages[0]))
        # The pair ICE chose sends from a port of the range.
        [connection] = ice_connections(server)
        chosen = [pair.local_candidate.port for pair in connection._nominated.values()]
        assert chosen, "no pair nominated"
        assert all(p in ports for p in chosen), (str(ports), chosen)
        # The page's peer (made by the same aioice in this process) is not confined.
        assert Connection.get_component_candidates is _ORIGINAL
        for other in ice_connections(pages[0]):
            assert "get_component_candidates" not in vars(other)
    finally:
        await close_all(servers, pages)


@pytest.mark.service
async def test_peers_take_one_port_each_skip_ports_in_use_and_a_full_range_is_refused() -> None:
    ports = free_range(3)
    pages: list[RTCPeerConnection] = []
    servers: list[RTCPeerConnection] = []
    try:
        with held(range(ports.low, ports.low + 1)):
            first = await answered(await page_offer(pages), ports, servers)
            second = await answered(await page_offer(pages), ports, servers)
            taken = ports_of(first) | ports_of(second)
            # Two ports per address, neither of them the one held.
            assert {p for _, p in taken} <= {ports.low + 1, ports.low + 2}, taken
            assert len(taken) == 2 * len(addresses()), taken
            # The range is full on every address: this peer could not be reached.
            with pytest.raises(PortsExhausted) as refused:
                await answered(await page_offer(pages), ports, servers)
            assert refused.value.code is Code.RESOURCE_EXHAUSTED
            assert f"UDP {ports.low}-{ports.high}" in refused.value.message
            assert refused.value.subject == "webrtc media ports"
            # A peer that closes gives its ports back to the next one.
            await first.close()
            again = await answered(await page_offer(pages), ports, servers)
            assert ports_of(again) == ports_of(first), (ports_of(again), ports_of(first))
    finally:
        await close_all(servers, pages)


@pytest.mark.service
async def test_the_stun_candidates_of_a_confined_peer_are_its_confined_sockets() -> None:
    ports = free_range(4)
    v4 = next(a for a in addresses() if ":" not in a)
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        _StunServer, local_addr=(v4, 0)
    )
    stun_port = transport.get_extra_info("sockname")[1]
    pages: list[RTCPeerConnection] = []
    servers: list[RTCPeerConnection] = []
    try:
        server = await answered(
            await page_offer(pages),
            ports,
            servers,
            ice_servers=[RTCIceServer(f"stun:{v4}:{stun_port}")],
        )
        found = candidates(server.localDescription.sdp)
        reflexive = {(a, p) for a, p, kind in found if kind == "srflx"}
        # Asked from the IPv4 host socket, the STUN server saw that socket's port.
        assert reflexive == {(a, p) for a, p in ports_of(server) if a == v4}, found
        assert all(p in ports for _, p in reflexive), (str(ports), found)
    finally:
        transport.close()
        await close_all(servers, pages)


@pytest.mark.service
async def test_confine_refuses_a_peer_it_cannot_confine() -> None:
    ports = free_range(2)
    pages: list[RTCPeerConnection] = []
    servers: list[RTCPeerConnection] = [peer()]
    try:
        with pytest.raises(RuntimeError, match="remote offer set first"):
            confine(servers[0], ports)
        server = await answered(await page_offer(pages), ports, servers)
        with pytest.raises(RuntimeError, match="before setLocalDescription"):
            confine(server, ports)
    finally:
        await close_all(servers, pages)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", None),
        ("  ", None),
        ("40000-40099", PortRange(40000, 40099)),
        (" 1024 - 1024 ", PortRange(1024, 1024)),
        ("60000-65535", PortRange(60000, 65535)),
    ],
)
def test_parse_reads_a_range_or_nothing(text: str, expected: PortRange | None) -> None:
    assert PortRange.parse(text) == expected


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("40000", "not two ports joined by a hyphen"),
        ("40000:40099", "not two ports joined by a hyphen"),
        ("a-b", "not two ports joined by a hyphen"),
        ("-40000", "not two ports joined by a hyphen"),
        ("40000-40099-40100", "not two ports joined by a hyphen"),
        ("40099-40000", "start at or below its end"),
        ("80-90", "must lie within 1024-65535"),
        ("60000-70000", "must lie within 1024-65535"),
        ("0-0", "must lie within 1024-65535"),
    ],
)
def test_parse_refuses_what_is_not_a_range_of_unprivileged_ports(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        PortRange.parse(text)


def test_a_range_knows_its_ports() -> None:
    ports = PortRange(40000, 40002)
    assert len(ports) == 3
    assert 40000 in ports
    assert 40002 in ports
    assert 40003 not in ports
    assert str(ports) == "40000-40002"
