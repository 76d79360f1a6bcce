"""The STUN and TURN servers of this deployment, for the server's peers and for pages.

Both ends of a peer connection gather candidates with the same servers: the server's
``RTCPeerConnection`` when it answers, and the page's before it makes its offer (so the page
asks ``GetIceServers`` first). A TURN server needs a username and a credential. Handing every
page one static credential would give it to every user for good, so with a TURN secret
(``SWITCHBOARD_WEBRTC_TURN_SECRET``, shared with the TURN server: coturn's
``use-auth-secret``/``static-auth-secret``) each caller gets its own, valid for a while: the
TURN REST API's scheme (draft-uberti-behave-turn-rest), username ``{expiry}:{user}`` and
credential base64(HMAC-SHA1(secret, username)), which the TURN server checks without asking
anyone. A TURN server listed with its own username and credential keeps them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb

if TYPE_CHECKING:
    from aiortc import RTCIceServer

#: The name the server's own peers mint their TURN credentials for.
SERVER_USER = "switchboard"


@dataclass(frozen=True)
class IceServer:
    """One server, as a browser's ``RTCIceServer``."""

    urls: tuple[str, ...]
    username: str = ""
    credential: str = ""

    @property
    def turn(self) -> bool:
        return any(url.startswith(("turn:", "turns:")) for url in self.urls)


class IceServers:
    """The deployment's servers, with TURN credentials minted per caller when it can."""

    def __init__(
        self,
        servers: Sequence[IceServer],
        *,
        turn_secret: str = "",
        ttl_s: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._servers = tuple(servers)
        self._secret = turn_secret.encode()
        self._ttl_s = ttl_s
        self._clock = clock

    @classmethod
    def read(
        cls, servers: Sequence[Mapping[str, str | list[str]]], *, turn_secret: str, ttl_s: float
    ) -> IceServers:
        """From the settings' list (``settings.ice_servers``, already checked)."""
        return cls(
            [
                IceServer(
                    urls=tuple(server["urls"]),
                    username=str(server.get("username", "")),
                    credential=str(server.get("credential", "")),
                )
                for server in servers
            ],
            turn_secret=turn_secret,
            ttl_s=ttl_s,
        )

    def minted_for(self, user: str) -> tuple[list[IceServer], float | None]:
        """The servers for ``user``, and when their minted credentials expire (Unix
        seconds; None when none was minted)."""
        expiry = int(self._clock() + self._ttl_s)
        minted = False
        out: list[IceServer] = []
        for listed in self._servers:
            if listed.turn and not listed.username and self._secret:
                username = f"{expiry}:{user}"
                digest = hmac.new(self._secret, username.encode(), hashlib.sha1).digest()
                out.append(IceServer(listed.urls, username, base64.b64encode(digest).decode()))
                minted = True
            else:
                out.append(listed)
        return out, float(expiry) if minted else None

    def for_page(self, user: str) -> pb.GetIceServersResponse:
        servers, expiry = self.minted_for(user)
        response = pb.GetIceServersResponse(
            ice_servers=[
                pb.IceServer(urls=s.urls, username=s.username, credential=s.credential)
                for s in servers
            ]
        )
        if expiry is not None:
            response.expire_time.FromSeconds(int(expiry))
        return response

    def for_server(self) -> list[RTCIceServer]:
        """The servers for one of this process's peers (its TURN credential minted now)."""
        # aiortc only once a peer is made: a process that serves no browser's voice
        # never loads it (it brings PyAV's FFmpeg and aioice, a second of CPU at start).
        from aiortc import RTCIceServer

        servers, _ = self.minted_for(SERVER_USER)
        return [
            RTCIceServer(
                urls=list(s.urls), username=s.username or None, credential=s.credential or None
            )
            for s in servers
        ]
