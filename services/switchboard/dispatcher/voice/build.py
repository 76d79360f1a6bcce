"""The speech engine runs speak through, built from its settings (``SWITCHBOARD_VOICE_*``)."""

from __future__ import annotations

from switchboard.dispatcher.voice.settings import VoiceSettings
from switchboard.dispatcher.voice.speaker import Speech
from switchboard.platform.audio.openai import OpenAIAudio
from switchboard.platform.process import Shared
from switchboard.platform.security.egress import EgressPolicy, EgressSettings


def speech(shared: Shared) -> Speech | None:
    """The speech engine at ``SWITCHBOARD_VOICE_URL`` and its defaults; None without one.
    The audio API is the operator's, reached through the egress policy like every
    outbound call (a local server needs ``SWITCHBOARD_EGRESS_ALLOW_LOOPBACK``)."""
    settings = shared.section(VoiceSettings)
    if not settings.voice_url:
        return None
    engine = OpenAIAudio(
        settings.voice_url,
        api_key=settings.voice_api_key.get_secret_value(),
        policy=EgressPolicy.from_settings(shared.section(EgressSettings)),
        timeout_s=settings.voice_timeout_s,
        max_retries=settings.voice_max_retries,
    )
    # Closed after the dispatcher (the stack unwinds in reverse): runs stop speaking first.
    shared.resources.push_async_callback(engine.close)
    return Speech(
        engine=engine,
        transcription_model=settings.voice_transcription_model,
        speech_model=settings.voice_speech_model,
        voice=settings.voice_voice,
        lead_ms=settings.voice_lead_ms,
    )
