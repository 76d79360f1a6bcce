"""Where a spoken turn begins and ends: WebRTC's voice-activity detector with hysteresis,
and the audio of the turn being spoken.

The detector (``webrtcvad``, decisions.md entry 51) classifies 20 ms frames as
speech or not; it takes 8, 16, 32 or 48 kHz, so 24 kHz input is resampled to
16 kHz for it (``platform/audio/pcm.py``). One voiced frame is not speech: a
click or a breath would start a turn. Speech begins when most of the last
``ONSET_FRAMES`` frames are voiced, and ends when the frames of the last
``silence`` hold almost no voice, so a short pause inside a sentence does not
end the turn. Within speech, ``PAUSE_MS`` of unvoiced frames is a pause: the
moment the end-of-turn model (``platform/audio/endpoint.py``) is asked whether
the speaker has finished, long before the silence would end the turn (the
intake, ``intake.py``, asks it and cuts the turn when it says so).

``TurnAudio`` keeps the turn's PCM, and before a turn a little of what came
just before it (``PRE_ROLL_MS``): the detector needs a few frames to be sure,
and the first syllable is in them.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Final, Protocol

import webrtcvad

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.platform.audio import pcm

FRAME_MS: Final = 20
#: Frames that decide speech has begun, and how many of them must be voiced.
ONSET_FRAMES: Final = 5
ONSET_VOICED: Final = 4
#: Silence ends a turn when at most this share of its frames were voiced.
OFFSET_VOICED_SHARE: Final = 0.1
#: Audio kept from before a turn begins (the detector's own delay, and a little more).
PRE_ROLL_MS: Final = 300
#: Unvoiced frames within speech that make a pause, when the end-of-turn model is asked.
PAUSE_MS: Final = 200
#: 0 (least) to 3 (most) aggressive in calling a frame not speech.
AGGRESSIVENESS: Final = 2
#: The model's probability that the speaker finished which ends a turn, by eagerness:
#: MEDIUM is Pipecat's own default; BENCHMARKS.md ("Turn detection") measures each.
THRESHOLDS: Final = {
    pb.TURN_EAGERNESS_LOW: 0.7,
    pb.TURN_EAGERNESS_MEDIUM: 0.5,
    pb.TURN_EAGERNESS_HIGH: 0.3,
}
_DETECTOR_RATES: Final = frozenset({8_000, 16_000, 32_000, 48_000})
_DETECTOR_RATE: Final = 16_000


class Judge(Protocol):
    """The end-of-turn model (``platform/audio/endpoint.SmartTurn``)."""

    @property
    def available(self) -> bool: ...

    async def probability(self, audio: bytes, rate: int) -> float | None:
        """The probability that the speaker of ``audio`` has finished (None: no model)."""
        ...


class Heard(enum.Enum):
    """What a frame changed."""

    #: Speech began.
    START = "start"
    #: Speech paused (``PAUSE_MS`` unvoiced); it may go on, or the silence end it.
    PAUSE = "pause"
    #: The silence after speech passed: speech ended.
    STOP = "stop"


class Detector:
    """Speech onset and offset in a stream of mono PCM16 at ``rate``."""

    def __init__(self, rate: int, silence_ms: int, pause_ms: int = PAUSE_MS) -> None:
        self._vad = webrtcvad.Vad(AGGRESSIVENESS)
        self._rate = rate
        self._vad_rate = rate if rate in _DETECTOR_RATES else _DETECTOR_RATE
        self._frame_bytes = pcm.byte_count(FRAME_MS, rate)
        self._rest = b""
        self._onset: deque[bool] = deque(maxlen=ONSET_FRAMES)
        self._silence_frames = max(1, silence_ms // FRAME_MS)
        self._recent: deque[bool] = deque(maxlen=self._silence_frames)
        self._allowed_voiced = int(self._silence_frames * OFFSET_VOICED_SHARE)
        self._pause_frames = max(1, pause_ms // FRAME_MS)
        #: Unvoiced frames in a row, within speech.
        self._quiet = 0
        #: Whether speech is going on now.
        self.speaking = False

    def feed(self, data: bytes) -> list[bool]:
        """The changes ``data`` brought, in order: True when speech began, False when
        it ended (usually none, rarely more than one)."""
        return [heard is Heard.START for heard in self.hear(data) if heard is not Heard.PAUSE]

    def hear(self, data: bytes) -> list[Heard]:
        """What ``data`` changed, in order (usually nothing, rarely more than one)."""
        changes: list[Heard] = []
        buffered = self._rest + data
        whole = len(buffered) - len(buffered) % self._frame_bytes
        for start in range(0, whole, self._frame_bytes):
            frame = buffered[start : start + self._frame_bytes]
            if self._vad_rate != self._rate:
                frame = pcm.resample(frame, self._rate, self._vad_rate)
            voiced = self._vad.is_speech(frame, self._vad_rate)
            change = self._step(voiced)
            if change is not None:
                changes.append(change)
        self._rest = buffered[whole:]
        return changes

    def cut(self) -> None:
        """The turn ended before the silence did (the model's decision): what follows
        is heard as before any speech, its onset a new turn."""
        self.speaking = False
        self._recent.clear()
        self._onset.clear()
        self._quiet = 0

    def _step(self, voiced: bool) -> Heard | None:
        if not self.speaking:
            self._onset.append(voiced)
            if sum(self._onset) >= ONSET_VOICED:
                self.speaking = True
                self._onset.clear()
                self._recent.clear()
                self._quiet = 0
                return Heard.START
            return None
        self._recent.append(voiced)
        if len(self._recent) == self._silence_frames and sum(self._recent) <= self._allowed_voiced:
            self.speaking = False
            self._recent.clear()
            self._quiet = 0
            return Heard.STOP
        self._quiet = 0 if voiced else self._quiet + 1
        # Once per pause: a voiced frame starts counting again.
        return Heard.PAUSE if self._quiet == self._pause_frames else None


class TurnAudio:
    """The audio of the turn being spoken, and the moment before one."""

    def __init__(self, rate: int, max_turn_ms: int) -> None:
        self.rate = rate
        self._max_bytes = pcm.byte_count(max_turn_ms, rate)
        self._pre_roll_bytes = pcm.byte_count(PRE_ROLL_MS, rate)
        self._pre_roll: deque[bytes] = deque()
        self._pre_roll_size = 0
        self._turn: bytearray | None = None

    @property
    def open(self) -> bool:
        return self._turn is not None

    @property
    def ms(self) -> int:
        """Audio in the open turn, in milliseconds (0 when none is open)."""
        return pcm.duration_ms(len(self._turn), self.rate) if self._turn is not None else 0

    @property
    def full(self) -> bool:
        """The open turn reached the longest a turn may be."""
        return self._turn is not None and len(self._turn) >= self._max_bytes

    def begin(self, *, pre_roll: bool) -> None:
        """Open a turn (with what came just before it, for a detected one)."""
        if self._turn is not None:
            return
        self._turn = bytearray(b"".join(self._pre_roll) if pre_roll else b"")
        self._pre_roll.clear()
        self._pre_roll_size = 0

    def add(self, data: bytes) -> None:
        if self._turn is not None:
            room = self._max_bytes - len(self._turn)
            self._turn += data[: max(0, room)]
            return
        self._pre_roll.append(data)
        self._pre_roll_size += len(data)
        while self._pre_roll and self._pre_roll_size - len(self._pre_roll[0]) >= (
            self._pre_roll_bytes
        ):
            self._pre_roll_size -= len(self._pre_roll.popleft())

    def audio(self) -> bytes:
        """The open turn's audio so far."""
        return bytes(self._turn) if self._turn is not None else b""

    def end(self) -> bytes | None:
        """Close the open turn: its audio (None if none was open)."""
        turn, self._turn = self._turn, None
        return bytes(turn) if turn is not None else None
