"""The UDP ports a peer's media may use (``SWITCHBOARD_WEBRTC_PORTS``, issue 72).

A firewall in front of the server has to let each browser's media reach the port
its peer bound, so an operator opens one range and the peers bind only within it:

- ``PortRange.parse("40000-40099")`` reads the setting ("" is ``None``: the
  operating system picks any free port, as before);
- ``confine(pc, ports)``, called once the offer is set and before the answer's
  ``setLocalDescription``, makes every host candidate of that peer bind a port of
  the range: starting at a random port of it (so peers spread over it) and taking
  the next free one, per local address. A peer takes one port per address.
- When every port of the range is taken on every address (and no TURN relay
  served a candidate instead), the answer would carry no candidate and the page
  could never connect, so ``setLocalDescription`` raises ``PortsExhausted``
  (RESOURCE_EXHAUSTED); the caller closes the peer and lets it propagate.

aioice (under aiortc) binds each host candidate with ``local_addr=(address, 0)``
and has no range option, so ``confine`` replaces ``get_component_candidates`` on
that peer's ICE connections only (an instance attribute: other peers of the process
are untouched) with one that binds the host sockets itself and hands the rest
(TURN) back to aioice's own method; the server-reflexive query runs on the
confined sockets through aioice's ``server_reflexive_candidate``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import ipaddress
import logging
import re
import secrets
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from switchboard.platform.errors import PortsExhausted

# aioice and aiortc are imported where a peer's candidates are gathered: the process
# reads its port range at start, and serving no browser's voice it never loads them.
if TYPE_CHECKING:
    from aioice import Candidate
    from aioice.ice import Connection, StunProtocol
    from aiortc import RTCPeerConnection

    _Gather = Callable[[int, list[str], int], Awaitable[list[Candidate]]]

log = logging.getLogger("switchboard.dispatcher.talk.webrtc")

#: The lowest port a range may start at: below it are the privileged ports.
LOWEST: Final = 1024
HIGHEST: Final = 65535
_RANGE: Final = re.compile(r"\s*(\d{1,5})\s*-\s*(\d{1,5})\s*")


@dataclass(frozen=True)
class PortRange:
    """UDP ports ``low`` through ``high``, both included."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if not LOWEST <= self.low <= self.high <= HIGHEST:
            raise ValueError(
                f"the WebRTC port range {self.low}-{self.high} must lie within "
                f"{LOWEST}-{HIGHEST} and start at or below its end"
            )

    def __len__(self) -> int:
        return self.high - self.low + 1

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.low <= port <= self.high

    def __str__(self) -> str:
        return f"{self.low}-{self.high}"

    @classmethod
    def parse(cls, text: str) -> PortRange | None:
        """The range a setting names (``"40000-40099"``); ``None`` for "" (any port).
        ValueError saying what is wrong for anything else."""
        if not text.strip():
            return None
        matched = _RANGE.fullmatch(text)
        if matched is None:
            raise ValueError(
                f"the WebRTC port range {text!r} is not two ports joined by a hyphen "
                "(like 40000-40099), nor empty (any port)"
            )
        return cls(int(matched[1]), int(matched[2]))


def confine(pc: RTCPeerConnection, ports: PortRange) -> None:
    """Make ``pc``'s host candidates bind ports of ``ports`` (see the module doc).

    Call it after ``setRemoteDescription(offer)`` (which creates the peer's ICE
    transports) and before ``setLocalDescription`` (which gathers); RuntimeError
    otherwise, since a peer it cannot confine would bind any port unnoticed."""
    transports = [t.receiver.transport for t in pc.getTransceivers()]
    if pc.sctp is not None:
        transports.append(pc.sctp.transport)
    # Bundled media share one transport: confine each ICE connection once.
    gatherers = {id(t.transport.iceGatherer): t.transport.iceGatherer for t in transports}
    if not gatherers:
        raise RuntimeError("confine() needs the remote offer set first: the peer has no transport")
    for gatherer in gatherers.values():
        connection = gatherer._connection
        if gatherer.state != "new" or "get_component_candidates" in vars(connection):
            raise RuntimeError("confine() comes once, before setLocalDescription gathers")
        # This connection's own attribute, found before the class's method: aioice
        # itself, and every other peer, stay as they are.
        connection.get_component_candidates = functools.partial(  # type: ignore[method-assign]
            _gather, connection, connection.get_component_candidates, ports
        )


async def _gather(
    connection: Connection,
    original: _Gather,
    ports: PortRange,
    component: int,
    addresses: list[str],
    wait_s: int = 5,
) -> list[Candidate]:
    """aioice's ``get_component_candidates``, its host sockets bound within ``ports``."""
    from aioice import Candidate
    from aioice.candidate import candidate_foundation, candidate_priority
    from aioice.ice import StunProtocol

    loop = asyncio.get_running_loop()
    hosts: list[StunProtocol] = []
    full: list[str] = []
    for address in addresses:
        sock = await _bound(address, ports)
        if sock is None:
            full.append(address)
            continue
        if isinstance(sock, OSError):
            log.info("WebRTC: could not bind %s: %s", address, sock)
            continue
        try:
            _, protocol = await loop.create_datagram_endpoint(
                lambda: StunProtocol(connection), sock=sock
            )
        except OSError as exc:
            sock.close()
            log.info("WebRTC: could not use %s: %s", address, exc)
            continue
        host, port = sock.getsockname()[:2]
        protocol.local_candidate = Candidate(
            foundation=candidate_foundation("host", "udp", host),
            component=component,
            transport="udp",
            priority=candidate_priority(component, "host"),
            host=host,
            port=port,
            type="host",
        )
        hosts.append(protocol)
        # aioice pairs the remote candidates with these and closes them with the peer
        # (here at once: a gathering cancelled later leaves no socket open).
        connection._protocols.append(protocol)

    # aioice's own method, given no address, does the rest: the TURN relay.
    relayed, reflexive = await asyncio.gather(
        original(component, [], wait_s), _reflexive(connection, hosts, wait_s)
    )
    candidates = [p.local_candidate for p in hosts] + reflexive + relayed
    if full and not candidates:
        log.warning("WebRTC: every port of %s is in use on %s", ports, ", ".join(full))
        raise PortsExhausted(
            f"all {len(ports)} WebRTC media ports (UDP {ports}) are in use: "
            "try again when a voice session ends",
            subject="webrtc media ports",
        )
    if full:
        log.warning(
            "WebRTC: every port of %s is in use on %s: a peer has no candidate there",
            ports,
            ", ".join(full),
        )
    return candidates


async def _bound(address: str, ports: PortRange) -> socket.socket | OSError | None:
    """``_bind`` off the loop: a nearly full range costs up to one bind() per port
    (about 0.1 s for 64 000). Cancelled, the socket it binds is closed, not leaked."""
    binding = asyncio.ensure_future(asyncio.to_thread(_bind, address, ports))
    try:
        return await asyncio.shield(binding)
    except asyncio.CancelledError:
        binding.add_done_callback(_close_bound)
        raise


def _close_bound(binding: asyncio.Future[socket.socket | OSError | None]) -> None:
    if binding.cancelled() or binding.exception() is not None:
        return
    if isinstance(sock := binding.result(), socket.socket):
        sock.close()


def _bind(address: str, ports: PortRange) -> socket.socket | OSError | None:
    """A UDP socket bound to ``address`` at a free port of ``ports``: the first free
    one from a random port on; ``None`` when all are in use, or why it cannot bind."""
    from aioice.turn import UDP_SOCKET_BUFFER_SIZE

    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_DGRAM)
    except OSError as exc:
        return exc
    # No SO_REUSEADDR: for UDP it would let two peers share a port.
    start = secrets.randbelow(len(ports))
    for step in range(len(ports)):
        port = ports.low + (start + step) % len(ports)
        try:
            sock.bind((address, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                continue
            sock.close()
            return exc
        sock.setblocking(False)
        # As aioice sizes its own: a tuning, so a kernel that refuses it is no failure.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_SOCKET_BUFFER_SIZE)
        return sock
    sock.close()
    return None


async def _reflexive(
    connection: Connection, hosts: list[StunProtocol], wait_s: int
) -> list[Candidate]:
    """The STUN server's view of the IPv4 host sockets (as aioice asks it)."""
    from aioice.ice import server_reflexive_candidate

    stun = connection.stun_server
    if stun is None:
        return []
    tasks = [
        asyncio.create_task(server_reflexive_candidate(p, stun))
        for p in hosts
        if ipaddress.ip_address(p.local_candidate.host).version == 4
    ]
    if not tasks:
        return []
    try:
        done, _ = await asyncio.wait(tasks, timeout=wait_s)
    finally:
        for task in tasks:
            task.cancel()
    # A STUN server that fails or does not answer leaves the host candidates alone.
    return [t.result()[0] for t in done if t.exception() is None]
