"""Speech's section (``SWITCHBOARD_VOICE_*``): the audio API runs speak and Talk listens
through, its defaults, and a voice session's limits."""

from __future__ import annotations

from pydantic import Field, SecretStr

from switchboard.platform.config import MiB, Section


class VoiceSettings(Section):
    """What speech and voice sessions read (``dispatcher/build.py``)."""

    voice_url: str = Field(
        default="",
        description="base URL of an OpenAI-compatible audio API (`/audio/transcriptions`, "
        "`/audio/speech`), for example `https://api.openai.com/v1`; empty: no speech "
        "(`Talk` and `SendMessage.speech` answer `SPEECH_NOT_CONFIGURED`); reached through the "
        "egress policy",
    )
    voice_api_key: SecretStr = Field(
        default=SecretStr(""),
        description="bearer key of the audio API",
    )
    voice_transcription_model: str = Field(
        default="whisper-1",
        max_length=256,
        description="transcription model of assistants whose `voice` names none",
    )
    voice_speech_model: str = Field(
        default="tts-1",
        max_length=256,
        description="speech model of assistants whose `voice` names none",
    )
    voice_voice: str = Field(
        default="alloy",
        max_length=64,
        description="voice of assistants whose `voice` names none",
    )
    voice_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=600,
        description="longest wait for one transcription or one sentence's speech",
    )
    voice_max_retries: int = Field(
        default=2,
        ge=0,
        le=10,
        description="retries of an audio request that failed for a reason worth retrying "
        "(429, 5xx, a dropped connection)",
    )
    voice_max_turn_s: float = Field(
        default=60.0,
        ge=1,
        le=600,
        description="longest user turn in a voice session; a turn reaching it ends there",
    )
    voice_max_frame_bytes: int = Field(
        default=64 * 1024,
        ge=1024,
        le=1 * MiB,
        description="largest audio frame a voice session takes (`INVALID_ARGUMENT` above it)",
    )
    voice_idle_timeout_s: float = Field(
        default=30.0,
        ge=1,
        le=3600,
        description="a voice session that sends nothing this long ends with `DEADLINE_EXCEEDED` "
        "(`SESSION_IDLE`)",
    )
    voice_resume_window_s: float = Field(
        default=120.0,
        ge=1,
        le=86_400,
        description="how long a dropped voice session may be resumed (`TalkResume`)",
    )
    voice_max_sessions: int = Field(
        default=200,
        ge=1,
        le=100_000,
        description="voice sessions open at once in this process (`RESOURCE_EXHAUSTED` above)",
    )
    voice_max_sessions_per_user: int = Field(
        default=4,
        ge=1,
        le=1000,
        description="voice sessions one user may hold open at once in this process",
    )
    voice_lead_ms: int = Field(
        default=400,
        ge=0,
        le=10_000,
        description="how far ahead of playback a run sends its speech: less stops speech sooner "
        "on barge-in, more rides out network jitter",
    )
    voice_turn_models: str = Field(
        default=".tools/models",
        description="the folder of the end-of-turn model (`smart-turn-v3.2-cpu.onnx`, put there "
        "by `make tools`); without it, voice turns end on silence alone",
    )
