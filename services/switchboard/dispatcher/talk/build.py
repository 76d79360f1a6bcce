"""Voice sessions as a process builds them from their settings: a session's limits, the
end-of-turn model, and the WebRTC peers (their options, limits and ICE servers)."""

from __future__ import annotations

from pathlib import Path

from switchboard.dispatcher.talk.session import TalkLimits, Talks
from switchboard.dispatcher.talk.webrtc.ice import IceServers
from switchboard.dispatcher.talk.webrtc.peer import PeerOptions
from switchboard.dispatcher.talk.webrtc.peers import PeerLimits, Peers
from switchboard.dispatcher.talk.webrtc.ports import PortRange
from switchboard.dispatcher.talk.webrtc.settings import WebRtcSettings, ice_servers
from switchboard.dispatcher.voice.settings import VoiceSettings
from switchboard.platform.audio.endpoint import SmartTurn
from switchboard.platform.process import Shared


def talk_limits(settings: VoiceSettings, heartbeat_s: float) -> TalkLimits:
    return TalkLimits(
        max_turn_s=settings.voice_max_turn_s,
        max_frame_bytes=settings.voice_max_frame_bytes,
        idle_timeout_s=settings.voice_idle_timeout_s,
        resume_window_s=settings.voice_resume_window_s,
        max_sessions=settings.voice_max_sessions,
        max_sessions_per_user=settings.voice_max_sessions_per_user,
        heartbeat_s=heartbeat_s,
    )


def peers_of(talks: Talks, settings: WebRtcSettings) -> Peers:
    limits = PeerLimits(
        max_peers=settings.webrtc_max_peers,
        max_peers_per_user=settings.webrtc_max_peers_per_user,
    )
    return Peers(talks, peer_options(settings), limits, ice(settings))


def peer_options(settings: WebRtcSettings) -> PeerOptions:
    return PeerOptions(
        connect_timeout_s=settings.webrtc_connect_timeout_s,
        ports=PortRange.parse(settings.webrtc_ports),
    )


def ice(settings: WebRtcSettings) -> IceServers:
    secret = settings.webrtc_turn_secret.get_secret_value()
    return IceServers.read(
        ice_servers(settings.webrtc_ice_servers.get_secret_value(), minting=bool(secret)),
        turn_secret=secret,
        ttl_s=settings.webrtc_turn_ttl_s,
    )


def smart_turn(shared: Shared) -> SmartTurn | None:
    """The end-of-turn model voice sessions ask (``SWITCHBOARD_VOICE_TURN_MODELS``); none
    without a speech engine (no session starts)."""
    settings = shared.section(VoiceSettings)
    if not settings.voice_url:
        return None
    model = SmartTurn(Path(settings.voice_turn_models))
    shared.resources.callback(model.close)
    return model
