"""SendMessage's ``speech``: the step of admission's checks that turns a recording
into the message's text.

``Listening`` fills speech's slot in admission's checks (``Screening.screen``,
which writes their order once) and is the one place where speech enters a
message's admission: its options' fields are checked with the others, the
server's speech is required once they pass, and after the rate limits and the
choice of the assistant (whose voice settings transcribe) the recording is
transcribed, for the filters to read. What it refuses, it refuses before
anything is stored: the options' fields (INVALID_ARGUMENT naming each), a server or an
assistant without speech (FAILED_PRECONDITION ``SPEECH_NOT_CONFIGURED``), a
recording that is not a WAV or has no words (INVALID_ARGUMENT), an engine that
fails (``SPEECH_UNAVAILABLE``) or refuses (``SPEECH_REFUSED``). What passes
carries the options the run keeps (``Screened.speech``): a run taken over by
another replica still speaks.
"""

from __future__ import annotations

from typing import Final

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.ports.context import ContextPort
from switchboard.dispatcher.runs.core.active.live import FINISH_TIMEOUT_S
from switchboard.dispatcher.voice.speaker import DEFAULT_RATE, Speech
from switchboard.platform.audio import pcm
from switchboard.platform.errors import (
    FieldViolation,
    InvalidArgument,
    NotFound,
    RequestTooLarge,
    SpeechNotConfigured,
)
from switchboard.platform.security.policy import Principal
from switchboard.platform.values.resources import FileName

#: The largest recording transcribed (the hosted transcription API takes 25 MB).
MAX_RECORDING_BYTES: Final = 25 * 1024 * 1024
_ENCODINGS: Final = frozenset({pb.AUDIO_ENCODING_UNSPECIFIED, pb.AUDIO_ENCODING_PCM16})
_PART: Final = "message.parts[0].file"


class Listening:
    """Speech's step in admission's checks (``screening.SpeechStep``)."""

    def __init__(self, speech: Speech | None, context: ContextPort) -> None:
        #: The server's speech (None: ``speech`` is SPEECH_NOT_CONFIGURED).
        self._speech = speech
        self._context = context

    def violations(self, request: pb.SendMessageRequest, workspace_id: str) -> list[FieldViolation]:
        return violations(request, workspace_id)

    def listener(self, request: pb.SendMessageRequest) -> Heard | None:
        if not wanted(request):
            return None
        return Heard(configured(self._speech), self._context)


class Heard:
    """A request's speech, once the server can give it (``screening.Listener``)."""

    def __init__(self, speech: Speech, context: ContextPort) -> None:
        self._speech = speech
        self._context = context

    async def hear(
        self, principal: Principal, request: pb.SendMessageRequest, assistant: pb.Assistant | None
    ) -> tuple[pb.SendMessageRequest, pb.SpeechOptions]:
        settings = voice_of(assistant)
        kept = echoed(request.speech)
        if not request.speech.transcribe:
            return request, kept
        heard = await transcribed(
            request,
            principal=principal,
            context=self._context,
            speech=self._speech,
            settings=settings,
        )
        return heard, kept


def wanted(request: pb.SendMessageRequest) -> bool:
    """Whether the request asks for speech at all (options without ``speak`` or
    ``transcribe`` ask for nothing)."""
    return request.speech.speak or request.speech.transcribe


def violations(request: pb.SendMessageRequest, workspace_id: str) -> list[FieldViolation]:
    """The field checks of ``speech`` (and, to transcribe, of the message's recording)."""
    found: list[FieldViolation] = []
    speech = request.speech
    output = speech.output_format
    if output.encoding not in _ENCODINGS:
        found.append(FieldViolation("speech.output_format.encoding", "must be PCM16 or unset"))
    if output.sample_rate_hz and output.sample_rate_hz not in pcm.RATES:
        rates = ", ".join(str(rate) for rate in sorted(pcm.RATES))
        found.append(
            FieldViolation(
                "speech.output_format.sample_rate_hz", f"must be one of {rates}, or 0 for 24000"
            )
        )
    if speech.transcribe:
        found += _recording(request.message, workspace_id)
    return found


def _recording(message: cpb.Message, workspace_id: str) -> list[FieldViolation]:
    """The checks of a message whose recording is to be transcribed."""
    found: list[FieldViolation] = []
    parts = message.parts
    if len(parts) != 1 or parts[0].WhichOneof("part") != "file":
        found.append(
            FieldViolation(
                "message.parts",
                "with speech.transcribe, must be exactly one file part: the recording (WAV)",
            )
        )
        return found
    reference = parts[0].file
    if reference.inline_data:
        if reference.file or reference.uri:
            found.append(FieldViolation(_PART, "needs exactly one of file or inline_data"))
        if not reference.mime_type.startswith("audio/"):
            found.append(FieldViolation(f"{_PART}.mime_type", "must be an audio type (audio/wav)"))
        if len(reference.inline_data) > MAX_RECORDING_BYTES:
            found.append(
                FieldViolation(
                    f"{_PART}.inline_data", f"is larger than {MAX_RECORDING_BYTES} bytes"
                )
            )
    elif reference.file:
        named = FileName.parse_or_none(reference.file)
        if named is None:
            found.append(FieldViolation(f"{_PART}.file", "must be workspaces/{w}/files/{f}"))
        elif named.workspace != workspace_id:
            found.append(
                FieldViolation(f"{_PART}.file", "must be a file of the conversation's workspace")
            )
        if reference.mime_type and not reference.mime_type.startswith("audio/"):
            found.append(FieldViolation(f"{_PART}.mime_type", "must be an audio type (audio/wav)"))
    else:
        found.append(
            FieldViolation(_PART, "needs the recording: a stored file, or inline_data (WAV)")
        )
    return found


def configured(speech: Speech | None) -> Speech:
    """The server's speech, or SPEECH_NOT_CONFIGURED."""
    if speech is None:
        raise SpeechNotConfigured(
            "this server has no speech engine (SWITCHBOARD_VOICE_URL is not set)"
        )
    return speech


def voice_of(assistant: pb.Assistant | None) -> pb.VoiceSettings:
    """The run's assistant's speech settings, or SPEECH_NOT_CONFIGURED."""
    if assistant is None:
        raise SpeechNotConfigured(
            "speech needs an assistant with voice settings, and this message has none: name "
            "one in `assistant`, or give the workspace a default assistant"
        )
    if not assistant.HasField("voice"):
        raise SpeechNotConfigured(
            f"{assistant.name} has no voice settings (UpdateAssistant, field `voice`)",
            metadata={"assistant": assistant.name},
        )
    return assistant.voice


def echoed(options: pb.SpeechOptions) -> pb.SpeechOptions:
    """The options as the run keeps them: the output format's defaults filled in."""
    kept = pb.SpeechOptions()
    kept.CopyFrom(options)
    kept.output_format.encoding = pb.AUDIO_ENCODING_PCM16
    kept.output_format.sample_rate_hz = options.output_format.sample_rate_hz or DEFAULT_RATE
    return kept


async def transcribed(
    request: pb.SendMessageRequest,
    *,
    principal: Principal,
    context: ContextPort,
    speech: Speech,
    settings: pb.VoiceSettings,
) -> pb.SendMessageRequest:
    """``request`` with its recording's transcript as a text part before the recording.
    Nothing is stored here: the message is stored by admission as usual, afterwards."""
    part = request.message.parts[0]
    reference = part.file
    if reference.inline_data:
        data = reference.inline_data
    else:
        try:
            data = await context.download(
                principal, reference.file, limit=MAX_RECORDING_BYTES, timeout_s=FINISH_TIMEOUT_S
            )
        except NotFound:
            raise NotFound(f"{_PART}: {reference.file} not found") from None
        except RequestTooLarge:
            raise RequestTooLarge(
                f"{_PART}: the recording is larger than {MAX_RECORDING_BYTES} bytes"
            ) from None
    try:
        samples, _ = pcm.from_wav(data)
    except pcm.NotPcm as exc:
        raise InvalidArgument(
            "the recording is not a WAV of 16-bit PCM",
            [FieldViolation(_PART, f"must be a WAV of 16-bit PCM, mono or stereo ({exc})")],
        ) from None
    if not samples:
        raise InvalidArgument("the recording is empty", [FieldViolation(_PART, "holds no audio")])
    model, language = speech.transcribing(settings)
    text = await speech.engine.transcribe(
        data, media_type="audio/wav", filename="recording.wav", model=model, language=language
    )
    text = text.strip()
    if not text:
        raise InvalidArgument(
            "no words were heard in the recording",
            [FieldViolation("message.parts", "the recording has no words the engine recognized")],
        )
    spoken = pb.SendMessageRequest()
    spoken.CopyFrom(request)
    recording = cpb.ContentPart()
    recording.CopyFrom(part)
    spoken.message.ClearField("parts")
    spoken.message.parts.extend([cpb.ContentPart(text=text), recording])
    return spoken
