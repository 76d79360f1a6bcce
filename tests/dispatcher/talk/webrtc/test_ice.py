"""STUN and TURN for WebRTC talk (``GetIceServers``, ``talk/webrtc/ice.py``) against a real
TURN server (coturn, ``tests/infra/turn.py``) that checks credentials with the secret it
shares with the mesh, as a deployment's does.

The page asks ``GetIceServers`` before its offer and gets the TURN server with a credential
minted for it; coturn gives the page a relay candidate with it (and none with a tampered
one), the server's own peer mints its credential and gets one too, and the session connects.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from aiortc import RTCIceServer, RTCSessionDescription
from grpc import aio

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.settings import Settings
from tests.conftest import CALL_DEADLINE_S
from tests.dispatcher.talk.test_talk import Place, voice_place, voice_settings
from tests.dispatcher.talk.webrtc.test_peers import closed, page, starting
from tests.fakes.audio_server import FakeAudio
from tests.infra.turn import TurnServer, turn_server
from tests.kits.contextkit import refused
from tests.kits.dispatchkit import dispatcher_stub

pytestmark = pytest.mark.service


@pytest.fixture
def turn() -> Iterator[TurnServer]:
    with turn_server() as server:
        yield server


@pytest.fixture
def settings(database_url: str, audio_server: FakeAudio, turn: TurnServer) -> Settings:
    return voice_settings(
        database_url,
        audio_server.url,
        webrtc_ice_servers=json.dumps([{"urls": turn.url}]),
        webrtc_turn_secret=turn.secret,
        webrtc_turn_ttl_s=600,
    )


@pytest.fixture
async def audio_server() -> Any:
    async with FakeAudio() as fake:
        yield fake


@pytest.fixture
async def place(mesh: SwitchboardServer, channel: aio.Channel) -> Place:
    return await voice_place(mesh, channel)


def _relays(sdp: str) -> list[str]:
    return [line for line in sdp.splitlines() if " typ relay" in line]


async def test_the_page_and_the_server_relay_through_turn_with_minted_credentials(
    channel: aio.Channel, place: Place, turn: TurnServer
) -> None:
    stub = dispatcher_stub(channel)
    editor = place.world.editor
    before = time.time()
    given = await stub.GetIceServers(
        pb.GetIceServersRequest(), metadata=editor.md, timeout=CALL_DEADLINE_S
    )
    [server] = given.ice_servers
    assert list(server.urls) == [turn.url]
    # The TURN REST API's credential: the expiry and the caller, signed with the secret.
    expiry, _, user = server.username.partition(":")
    assert before + 600 - 5 <= int(expiry) <= time.time() + 600
    assert int(expiry) == given.expire_time.seconds
    assert user
    assert user != "switchboard"  # the page's own, not the server's
    signed = hmac.new(turn.secret.encode(), server.username.encode(), hashlib.sha1).digest()
    assert server.credential == base64.b64encode(signed).decode()
    # Another user's credential is their own.
    other = await stub.GetIceServers(pb.GetIceServersRequest(), metadata=place.world.owner.md)
    assert other.ice_servers[0].username.partition(":")[2] != user

    # The page gathers with it: coturn grants a relay; a tampered credential gets none.
    tampered = page(
        [
            RTCIceServer(
                urls=[turn.url], username=server.username, credential="AAAA" + server.credential[4:]
            )
        ]
    )
    await tampered.pc.setLocalDescription(await tampered.pc.createOffer())
    assert _relays(tampered.pc.localDescription.sdp) == []
    await closed(tampered)
    opened = page(
        [
            RTCIceServer(
                urls=list(server.urls), username=server.username, credential=server.credential
            )
        ]
    )
    try:
        await opened.pc.setLocalDescription(await opened.pc.createOffer())
        assert _relays(opened.pc.localDescription.sdp)
        connected = await stub.ConnectTalk(
            pb.ConnectTalkRequest(offer=opened.pc.localDescription.sdp, **starting(place)),
            metadata=editor.md,
            timeout=CALL_DEADLINE_S,
        )
        # The server's peer minted its own credential, and coturn granted it a relay too.
        assert _relays(connected.answer)
        await opened.pc.setRemoteDescription(
            RTCSessionDescription(sdp=connected.answer, type="answer")
        )
        session = await opened.until(lambda f: "session" in f)
        assert session["session"]["name"].startswith(place.conversation + "/voiceSessions/")
    finally:
        await closed(opened)


async def test_ice_servers_are_for_callers_who_may_talk(channel: aio.Channel) -> None:
    stub = dispatcher_stub(channel)
    await refused(stub.GetIceServers(pb.GetIceServersRequest()), grpc.StatusCode.UNAUTHENTICATED)
