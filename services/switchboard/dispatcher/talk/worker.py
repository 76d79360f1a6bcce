"""What a session does with a turn: transcribe it, send it, store it.

The **worker** takes the turns said in order (the backlog, ``flow.py``):
transcribes the turn's audio (``voice/ports.SpeechEngine``, through the
**transcriber**, which the intake's partial transcripts share), then sends the
user message through the dispatcher's own SendMessage (the transcript, the
recording as a file, asked to speak its answer), stores the turn
(``store.py``) and hands its run to the relay (``outbound.py``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from typing import Final

from google.protobuf import struct_pb2

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.talk import mapping
from switchboard.dispatcher.talk.flow import Actions, Backlog, Outcome, Owed, Said
from switchboard.dispatcher.talk.outbound import Outbox
from switchboard.dispatcher.talk.store import SessionRecord, TurnRecord, VoiceStore
from switchboard.dispatcher.voice.speaker import Speech
from switchboard.platform.audio import pcm
from switchboard.platform.errors import InternalError, SwitchboardError
from switchboard.platform.security.accesswatch import Hold
from switchboard.platform.security.policy import Principal
from switchboard.platform.values import names

log = logging.getLogger("switchboard.dispatcher.talk")

#: Recordings are stored at most at the recognizer's rate: a minute of speech
#: stays under the context service's inline file limit.
RECORDING_MAX_RATE: Final = 16_000


class Transcriber:
    """The session's audio, at its input ``rate``, into words with the assistant's
    transcription model and language."""

    def __init__(self, speech: Speech, voice: pb.VoiceSettings, rate: int) -> None:
        self._speech = speech
        self._voice = voice
        self.rate = rate

    async def transcribe(self, audio: bytes, turn: int, *, wrapped: bool = False) -> str:
        """The words of ``audio`` (PCM, or a WAV already when ``wrapped``)."""
        wav = audio if wrapped else pcm.to_wav(audio, self.rate)
        model, language = self._speech.transcribing(self._voice)
        text = await self._speech.engine.transcribe(
            wav, media_type="audio/wav", filename=f"turn-{turn}.wav", model=model, language=language
        )
        return text.strip()


class Worker:
    """The turns said, one at a time: each a stored message, a run and a turn row."""

    def __init__(
        self,
        *,
        actions: Actions,
        store: VoiceStore,
        expiry: Callable[[], dt.datetime],
        principal: Principal,
        hold: Hold,
        record: SessionRecord,
        settings: pb.VoiceSession,
        transcriber: Transcriber,
        backlog: Backlog,
        outbox: Outbox,
        outcome: Outcome,
    ) -> None:
        self._actions = actions
        self._store = store
        self._expiry = expiry
        self._principal = principal
        self._hold = hold
        self._record = record
        self._settings = settings
        self._transcriber = transcriber
        self._backlog = backlog
        self._outbox = outbox
        self._outcome = outcome

    async def run(self) -> None:
        while True:
            said = await self._backlog.said.get()
            if said is None:
                return
            relayed = False
            try:
                relayed = await self._take(said)
            except SwitchboardError as exc:
                # The turn is dropped; the session goes on.
                await self._outbox.put(mapping.error(exc))
            except Exception:
                # A fault of ours: said as INTERNAL, and the session ends (never hangs).
                log.exception("a voice session's turn failed")
                self._outcome.fail(InternalError("the turn failed on the server"))
                return
            finally:
                if said.partial is not None:
                    said.partial.cancel()
                if not relayed:
                    self._backlog.settle()

    async def _take(self, said: Said) -> bool:
        """Store one turn and start its run; whether it was handed to the relay."""
        turn = self._backlog.turns_taken + 1
        parts: list[cpb.ContentPart] = []
        audio_ms = 0
        if said.audio is not None:
            rate = self._transcriber.rate
            audio_ms = pcm.duration_ms(len(said.audio), rate)
            recording_rate = min(rate, RECORDING_MAX_RATE)
            wav = pcm.to_wav(pcm.resample(said.audio, rate, recording_rate), recording_rate)
            text = await self._transcriber.transcribe(wav, turn, wrapped=True)
            if said.partial is not None:
                # The final transcript is known: a partial not said by now never is.
                said.partial.cancel()
            if not text:
                await self._outbox.put(mapping.event(pb.TALK_EVENT_KIND_TURN_EMPTY, turn))
                return False
            parts = [
                cpb.ContentPart(text=text),
                cpb.ContentPart(
                    file=cpb.FileReference(
                        inline_data=wav, mime_type="audio/wav", display_name=f"turn-{turn}.wav"
                    )
                ),
            ]
        else:
            text = said.text
            parts = [cpb.ContentPart(text=text)]
        voice: dict[str, str | float] = {
            "session": self._settings.name,
            "turn": turn,
            "audio_ms": audio_ms,
        }
        if said.end_reason != pb.TURN_END_REASON_UNSPECIFIED:
            # How the turn was judged over, kept with it (the event that said so is not).
            voice["end_reason"] = pb.TurnEndReason.Name(said.end_reason).removeprefix(
                "TURN_END_REASON_"
            )
            voice["end_confidence"] = round(said.end_confidence, 3)
        metadata = struct_pb2.Struct()
        metadata.update({"voice": voice})
        request = pb.SendMessageRequest(
            conversation=str(mapping.conversation_name(self._record)),
            message=cpb.Message(role=cpb.MESSAGE_ROLE_USER, parts=parts, metadata=metadata),
            assistant=self._settings.assistant,
            assistant_revision=self._settings.assistant_revision,
            concurrency_policy=self._settings.concurrency_policy,
            speech=pb.SpeechOptions(speak=True, output_format=self._settings.output_format),
        )
        await self._hold.confirm()
        # The message and its turn row are stored together as far as this stream goes: a
        # drop that cancelled the worker between the two would leave a message the
        # session does not count, and the client's resend would store it twice. So the
        # pair finishes even when the stream is gone, and a replay of the same turn of
        # the same session (two streams at once) is the same request.
        request.request_id = f"talk-{self._record.id}-{turn}"
        work = asyncio.ensure_future(self._store_turn(request, turn, text, audio_ms))
        work.add_done_callback(_observed)
        stored = await asyncio.shield(work)
        self._backlog.taken(Owed(turn, mapping.transcript(stored), stored.run, 0))
        return True

    async def _store_turn(
        self, request: pb.SendMessageRequest, turn: int, text: str, audio_ms: int
    ) -> TurnRecord:
        sent = await self._actions.send_message(self._principal, request)
        recording = next(
            (part.file.file for part in sent.message.parts if part.WhichOneof("part") == "file"),
            "",
        )
        stored = TurnRecord(
            session_id=self._record.id,
            turn=turn,
            message=sent.message.name,
            run=sent.run.name,
            recording=recording,
            transcript=text,
            audio_ms=audio_ms,
            created_at=names.now(),
        )
        await self._store.add_turn(stored, self._expiry())
        return stored


def _observed(task: asyncio.Future[TurnRecord]) -> None:
    """Reads the outcome of a turn's storing whose stream went away meanwhile, so a
    failure nobody waits for any more is not reported as never retrieved."""
    if not task.cancelled():
        task.exception()
