"""A voice session: ``DispatcherService.Talk``'s frames in, transcripts and run updates out.

``Talks`` opens a stream: its first frame starts a session (checked settings,
the conversation held, a stored row) or resumes one, within the process's
limits. Each session then runs four actors over one stream:

- the **intake** (``intake.py``) reads the client's frames into turns, and
  barge-in;
- the **worker** (``worker.py``) transcribes each turn, sends it as a message
  and stores it;
- the **relay** (``outbound.py``) sends each turn's transcript and its run's
  updates, numbered, in order;
- the **writer** (``outbound.py``, the generator the servicer reads) takes the
  frames from one bounded queue, drops speech stopped since, beats the heart
  and ends an idle session.

What they hand each other (the backlog of turns, the client's side, how the
session ends) is ``flow.py``; ``_Session`` starts them together, stops them
together and stores how the stream ended.

Resume (``TalkResume``) rebuilds the numbered frames after the client's last one
from the stored turns and the runs' updates, which any replica can read (the
shared event log), and continues live.

The session holds its conversation for WRITE through an access grant
(``platform/security/accesswatch.py``): a lost credential or lost access ends
the stream with the unary call's status, and nothing produced after the change
goes out.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Final

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.assistants.catalog import Assistants
from switchboard.dispatcher.ports.context import ContextPort
from switchboard.dispatcher.ports.peers import Via
from switchboard.dispatcher.runs.intake.speech import configured
from switchboard.dispatcher.talk import mapping
from switchboard.dispatcher.talk.flow import (
    Actions,
    Backlog,
    Client,
    Errands,
    Outcome,
    Owed,
    idle_error,
)
from switchboard.dispatcher.talk.intake import Intake
from switchboard.dispatcher.talk.outbound import Floor, Outbox, Relay, Writer
from switchboard.dispatcher.talk.store import SessionRecord, VoiceStore
from switchboard.dispatcher.talk.turns import THRESHOLDS, Judge
from switchboard.dispatcher.talk.worker import Transcriber, Worker
from switchboard.dispatcher.voice.speaker import Speech
from switchboard.platform.audio import pcm
from switchboard.platform.errors import (
    FieldViolation,
    InvalidArgument,
    NotFound,
    QuotaExceeded,
    SessionEnded,
    SpeechNotConfigured,
    SwitchboardError,
    Violations,
)
from switchboard.platform.security.accesswatch import AccessWatch, Grant, Hold
from switchboard.platform.security.policy import Permission, Principal
from switchboard.platform.values import names, timefields
from switchboard.platform.values.resources import ConversationName, VoiceSessionName

DEFAULT_INPUT_RATE: Final = 16_000
DEFAULT_OUTPUT_RATE: Final = 24_000
DEFAULT_SILENCE_MS: Final = 700
MIN_SILENCE_MS: Final = 200
MAX_SILENCE_MS: Final = 5_000
_POLICIES: Final = frozenset(
    {
        pb.CONCURRENCY_POLICY_UNSPECIFIED,
        pb.CONCURRENCY_POLICY_ENQUEUE,
        pb.CONCURRENCY_POLICY_REJECT,
        pb.CONCURRENCY_POLICY_INTERRUPT,
    }
)
_DETECTIONS: Final = frozenset(
    {pb.TURN_DETECTION_UNSPECIFIED, pb.TURN_DETECTION_CLIENT, pb.TURN_DETECTION_SERVER_VAD}
)
TURN_DETECTORS: Final = frozenset(
    {pb.TURN_DETECTOR_UNSPECIFIED, pb.TURN_DETECTOR_SILENCE, pb.TURN_DETECTOR_SMART_TURN}
)
TURN_EAGERNESSES: Final = frozenset({pb.TURN_EAGERNESS_UNSPECIFIED, *THRESHOLDS})
_ENCODINGS: Final = frozenset({pb.AUDIO_ENCODING_UNSPECIFIED, pb.AUDIO_ENCODING_PCM16})
_CONTEXT_TIMEOUT_S: Final = 10.0


@dataclass(frozen=True)
class TalkLimits:
    """The voice settings a session reads (``SWITCHBOARD_VOICE_*``)."""

    max_turn_s: float = 60.0
    max_frame_bytes: int = 64 * 1024
    idle_timeout_s: float = 30.0
    resume_window_s: float = 120.0
    max_sessions: int = 200
    max_sessions_per_user: int = 4
    heartbeat_s: float = 15.0


class Talks:
    """Opens voice sessions, each under its own access grant, within the process's limits."""

    def __init__(
        self,
        *,
        actions: Actions,
        assistants: Assistants,
        context: ContextPort,
        store: VoiceStore,
        access: AccessWatch,
        speech: Callable[[], Speech | None],
        limits: TalkLimits,
        judge: Judge | None = None,
    ) -> None:
        self._actions = actions
        self.judge = judge
        self._assistants = assistants
        self._context = context
        self._store = store
        self._access = access
        self._speech = speech
        self.limits = limits
        self._open = 0
        self._by_user: dict[str, int] = {}

    @property
    def open_sessions(self) -> int:
        return self._open

    async def talk(
        self, principal: Principal, requests: AsyncIterator[pb.TalkRequest], via: Via
    ) -> AsyncGenerator[pb.TalkResponse, None]:
        grant = self._access.open(principal)
        try:
            # A stream whose credential is already gone does not start.
            await grant.verify()
            frames = aiter(requests)
            first = await self._first(frames)
            kind = first.WhichOneof("frame")
            if kind == "start":
                session, hello = await self._start(grant, first.start, via)
            elif kind == "resume":
                session, hello = await self._resume(grant, first.resume, via)
            else:
                raise InvalidArgument(
                    "the first frame must be start or resume",
                    [FieldViolation("frame", "the first frame must be start or resume")],
                )
            try:
                yield hello
                async for frame in session.run(frames):
                    yield frame
            finally:
                self._release(principal)
        finally:
            grant.close()

    async def check(self, principal: Principal, first: pb.TalkRequest) -> pb.VoiceSession | None:
        """Refuses now, with the status the stream would end with, a first frame that
        could not open a session: its fields, the caller's access, the conversation,
        the assistant's voice, the process's and the user's limits. Nothing is stored
        or held. For a resume: the session's stored settings (a start has none yet).

        WebRTC's signalling (``webrtc/peers.py``) asks this before answering an offer,
        since its session starts only once the peer connects."""
        grant = self._access.open(principal)
        try:
            await grant.verify()
            kind = first.WhichOneof("frame")
            if kind == "start":
                opening = await self._open_start(grant, first.start)
                stored = None
            elif kind == "resume":
                opening, _ = await self._open_resume(grant, first.resume)
                stored = opening.settings
            else:
                raise InvalidArgument(
                    "the first frame must be start or resume",
                    [FieldViolation("frame", "the first frame must be start or resume")],
                )
            opening.hold.release()
            refusal = self._refusal(principal)
            if refusal is not None:
                raise refusal
            return stored
        finally:
            grant.close()

    async def _first(self, frames: AsyncIterator[pb.TalkRequest]) -> pb.TalkRequest:
        idle = self.limits.idle_timeout_s
        try:
            async with asyncio.timeout(idle):
                return await anext(frames)
        except StopAsyncIteration:
            raise InvalidArgument(
                "the stream ended before its first frame",
                [FieldViolation("frame", "the first frame must be start or resume")],
            ) from None
        except TimeoutError:
            raise idle_error(idle) from None

    # -- limits --------------------------------------------------------------------------

    def _refusal(self, principal: Principal) -> QuotaExceeded | None:
        """Why ``principal`` may not open one more session now (None: it may)."""
        if self._open >= self.limits.max_sessions:
            return QuotaExceeded(
                f"this server holds at most {self.limits.max_sessions} voice sessions at once",
                subject="voice/sessions",
            )
        if self._by_user.get(principal.user_id, 0) >= self.limits.max_sessions_per_user:
            return QuotaExceeded(
                f"a user may hold at most {self.limits.max_sessions_per_user} voice sessions "
                "at once",
                subject=f"voice/sessions/{principal.user_name}",
            )
        return None

    def _claim(self, principal: Principal) -> None:
        refusal = self._refusal(principal)
        if refusal is not None:
            raise refusal
        self._open += 1
        self._by_user[principal.user_id] = self._by_user.get(principal.user_id, 0) + 1

    def _release(self, principal: Principal) -> None:
        self._open -= 1
        left = self._by_user.get(principal.user_id, 1) - 1
        if left > 0:
            self._by_user[principal.user_id] = left
        else:
            self._by_user.pop(principal.user_id, None)

    # -- start and resume ------------------------------------------------------------------

    async def _open_start(self, grant: Grant, start: pb.TalkStart) -> _Opening:
        """A start's checks, in the order a client's mistakes are most useful told."""
        conversation = ConversationName.parse(start.conversation, "start.conversation")
        waker = _Waker()
        hold = await grant.hold(
            ((start.conversation, "start.conversation"),), Permission.WRITE, waker
        )
        settings = _start_settings(start)
        # NOT_FOUND for a conversation that does not exist (or was deleted).
        await self._context.conversation(
            grant.principal, start.conversation, timeout_s=_CONTEXT_TIMEOUT_S
        )
        assistant = await self._assistants.resolve(
            conversation.workspace, start.assistant, "start.assistant"
        )
        if assistant is None:
            raise SpeechNotConfigured(
                "the workspace has no default assistant; name an assistant with voice settings "
                "(start.assistant)"
            )
        # Pinned by the start, else by the caller's API key: the whole session (its
        # voice settings and every turn's run) answers with that revision.
        pinned = start.assistant_revision or grant.principal.pinned(assistant.name)
        if pinned:
            assistant = await self._assistants.resolve_revision(
                conversation.workspace,
                assistant.name,
                pinned,
                "start.assistant_revision" if start.assistant_revision else "start.assistant",
            )
            settings.assistant_revision = pinned
        if not assistant.HasField("voice"):
            raise SpeechNotConfigured(
                f"{assistant.name} has no voice settings",
                metadata={"assistant": assistant.name},
            )
        speech = configured(self._speech())
        _turn_settings(settings, start, assistant.voice, self.judge)
        return _Opening(hold, waker, settings, assistant, speech)

    async def _start(
        self, grant: Grant, start: pb.TalkStart, via: Via
    ) -> tuple[_Session, pb.TalkResponse]:
        principal = grant.principal
        opening = await self._open_start(grant, start)
        conversation = ConversationName.parse(start.conversation, "start.conversation")
        settings, assistant = opening.settings, opening.assistant
        self._claim(principal)
        try:
            session_id = names.new_id()
            created = names.now()
            expire_at = created + dt.timedelta(seconds=self.limits.resume_window_s)
            settings.name = str(
                VoiceSessionName(conversation.workspace, conversation.conversation, session_id)
            )
            settings.assistant = assistant.name
            settings.create_time.FromDatetime(created)
            record = SessionRecord(
                id=session_id,
                workspace_id=conversation.workspace,
                conversation_id=conversation.conversation,
                creator=principal.user_name,
                data=settings.SerializeToString(deterministic=True),
                turn_count=0,
                created_at=created,
                expire_at=expire_at,
                ended_at=None,
            )
            await self._store.create(record)
        except BaseException:
            self._release(principal)
            raise
        session = _Session(
            talks=self,
            grant=grant,
            hold=opening.hold,
            waker=opening.waker,
            via=via,
            record=record,
            settings=settings,
            speech=opening.speech,
            voice=assistant.voice,
            turns_taken=0,
            owed=[],
        )
        return session, pb.TalkResponse(session=mapping.session(record, 0, expire_at))

    async def _open_resume(
        self, grant: Grant, resume: pb.TalkResume
    ) -> tuple[_Opening, SessionRecord]:
        """A resume's checks: the request's fields, then whose session it is, then the
        rest (access to the conversation, not ended, the position)."""
        principal = grant.principal
        name = VoiceSessionName.parse(resume.session, "resume.session")
        if resume.after_sequence < 0:
            raise InvalidArgument(
                "resume.after_sequence must not be negative",
                [FieldViolation("resume.after_sequence", "must not be negative")],
            )
        record = await self._store.get(name.workspace, name.conversation, name.session)
        # Someone else's session is as good as absent, before anything about it or its
        # conversation is told: no refusal may say that it exists, is carried or ended.
        if record is None or record.creator != principal.user_name:
            raise NotFound(f"{resume.session} not found")
        waker = _Waker()
        hold = await grant.hold(((str(name.parent), "resume.session"),), Permission.WRITE, waker)
        if record.ended_at is not None or record.expire_at <= names.now():
            raise SessionEnded(f"{resume.session} has ended; start a new session")
        after_turn, _ = mapping.position(resume.after_sequence)
        if after_turn > record.turn_count:
            raise InvalidArgument(
                "resume.after_sequence is past the session's last turn",
                [
                    FieldViolation(
                        "resume.after_sequence",
                        f"must be at most the last frame's (turn {record.turn_count})",
                    )
                ],
            )
        settings = pb.VoiceSession.FromString(record.data)
        assistant = (
            await self._assistants.resolve_revision(
                name.workspace, settings.assistant, settings.assistant_revision, "assistant"
            )
            if settings.assistant_revision
            else await self._assistants.resolve(name.workspace, settings.assistant, "assistant")
        )
        if assistant is None or not assistant.HasField("voice"):
            raise SpeechNotConfigured(
                f"{settings.assistant} has no voice settings any more",
                metadata={"assistant": settings.assistant},
            )
        speech = configured(self._speech())
        return _Opening(hold, waker, settings, assistant, speech), record

    async def _resume(
        self, grant: Grant, resume: pb.TalkResume, via: Via
    ) -> tuple[_Session, pb.TalkResponse]:
        principal = grant.principal
        opening, record = await self._open_resume(grant, resume)
        name = VoiceSessionName.parse(resume.session, "resume.session")
        after_turn, after_position = mapping.position(resume.after_sequence)
        owed: list[Owed] = []
        for turn in await self._store.turns(name.session, max(after_turn, 1)):
            if turn.turn == after_turn:
                # Its transcript was seen (position 0 is the transcript): the run after it.
                owed.append(Owed(turn.turn, None, turn.run, after_position))
            else:
                owed.append(Owed(turn.turn, mapping.transcript(turn), turn.run, 0))
        self._claim(principal)
        expire_at = names.now() + dt.timedelta(seconds=self.limits.resume_window_s)
        session = _Session(
            talks=self,
            grant=grant,
            hold=opening.hold,
            waker=opening.waker,
            via=via,
            record=record,
            settings=opening.settings,
            speech=opening.speech,
            voice=opening.assistant.voice,
            turns_taken=record.turn_count,
            owed=owed,
        )
        return session, pb.TalkResponse(
            session=mapping.session(record, record.turn_count, expire_at)
        )

    # -- what sessions call ----------------------------------------------------------------

    @property
    def actions(self) -> Actions:
        return self._actions

    @property
    def store(self) -> VoiceStore:
        return self._store

    def expiry(self) -> dt.datetime:
        return names.now() + dt.timedelta(seconds=self.limits.resume_window_s)


def _format(
    given: pb.AudioFormat, has: bool, field: str, default_rate: int, violations: Violations
) -> pb.AudioFormat:
    rate = given.sample_rate_hz if has and given.sample_rate_hz else default_rate
    if has and given.encoding not in _ENCODINGS:
        violations.add(f"{field}.encoding", "must be PCM16 or unset")
    if rate not in pcm.RATES:
        rates = ", ".join(str(r) for r in sorted(pcm.RATES))
        violations.add(f"{field}.sample_rate_hz", f"must be one of {rates}, or 0 for the default")
    return pb.AudioFormat(encoding=pb.AUDIO_ENCODING_PCM16, sample_rate_hz=rate)


def _start_settings(start: pb.TalkStart) -> pb.VoiceSession:
    """The session's settings with their defaults, or INVALID_ARGUMENT naming each bad field."""
    violations = Violations()
    input_format = _format(
        start.input_format,
        start.HasField("input_format"),
        "start.input_format",
        DEFAULT_INPUT_RATE,
        violations,
    )
    output_format = _format(
        start.output_format,
        start.HasField("output_format"),
        "start.output_format",
        DEFAULT_OUTPUT_RATE,
        violations,
    )
    silence_ms = DEFAULT_SILENCE_MS
    if start.HasField("silence"):
        silence_ms = round(timefields.seconds(start.silence, "start.silence") * 1000)
        if not MIN_SILENCE_MS <= silence_ms <= MAX_SILENCE_MS:
            violations.add("start.silence", "must be 200 ms to 5 s")
    if start.turn_detection not in _DETECTIONS:
        violations.add("start.turn_detection", "is not a known detection")
    if start.turn_detector not in TURN_DETECTORS:
        violations.add("start.turn_detector", "is not a known detector")
    if start.turn_eagerness not in TURN_EAGERNESSES:
        violations.add("start.turn_eagerness", "is not a known eagerness")
    if start.concurrency_policy not in _POLICIES:
        violations.add("start.concurrency_policy", "is not a known policy")
    if start.assistant_revision and not names.is_revision(start.assistant_revision):
        violations.add("start.assistant_revision", "must be 0 or a revision number")
    elif start.assistant_revision and not start.assistant:
        violations.add("start.assistant_revision", "pins start.assistant, which must then be set")
    violations.check()
    settings = pb.VoiceSession(
        input_format=input_format,
        output_format=output_format,
        turn_detection=start.turn_detection or pb.TURN_DETECTION_SERVER_VAD,
        concurrency_policy=start.concurrency_policy or pb.CONCURRENCY_POLICY_INTERRUPT,
        partial_transcripts=start.partial_transcripts,
        barge_in=start.barge_in,
    )
    settings.silence.FromMilliseconds(silence_ms)
    return settings


def _turn_settings(
    settings: pb.VoiceSession,
    start: pb.TalkStart,
    voice: pb.VoiceSettings,
    judge: Judge | None,
) -> None:
    """SERVER_VAD's detector and eagerness: the start's, else the assistant's, else
    SILENCE (SMART_TURN at MEDIUM when asked); SILENCE where this server has no model
    (the session's settings say what it got, rather than the stream failing over a
    missing file). SILENCE is the default because on the labelled set we can measure
    (eSpeak NG's speech, BENCHMARKS.md "Turn detection") the model ends turns sooner
    but cuts more phrases paused mid-way than the silence does: decisions.md entry 60."""
    if settings.turn_detection != pb.TURN_DETECTION_SERVER_VAD:
        return
    detector = start.turn_detector or voice.turn_detector or pb.TURN_DETECTOR_SILENCE
    if detector == pb.TURN_DETECTOR_SMART_TURN and (judge is None or not judge.available):
        detector = pb.TURN_DETECTOR_SILENCE
    settings.turn_detector = detector
    if detector == pb.TURN_DETECTOR_SMART_TURN:
        settings.turn_eagerness = (
            start.turn_eagerness or voice.turn_eagerness or pb.TURN_EAGERNESS_MEDIUM
        )


@dataclass(frozen=True)
class _Opening:
    """What a start's or a resume's checks found: the conversation held, the session's
    settings, its assistant and the speech engines."""

    hold: Hold
    waker: _Waker
    settings: pb.VoiceSession
    assistant: pb.Assistant
    speech: Speech


class _Waker:
    """The hold's listener, made before the session it wakes: a lost conversation
    ends the session at once, not at its next frame."""

    def __init__(self) -> None:
        self.wake: Callable[[], None] | None = None

    def __call__(self) -> None:
        if self.wake is not None:
            self.wake()


class _Session:
    """One stream's actors, started together and stopped together: the intake
    (``intake.py``), the worker (``worker.py``), the relay and the writer
    (``outbound.py``), over what they share (``flow.py``)."""

    def __init__(
        self,
        *,
        talks: Talks,
        grant: Grant,
        hold: Hold,
        waker: _Waker,
        via: Via,
        record: SessionRecord,
        settings: pb.VoiceSession,
        speech: Speech,
        voice: pb.VoiceSettings,
        turns_taken: int,
        owed: list[Owed],
    ) -> None:
        limits = talks.limits
        outbox = Outbox()
        client = Client()
        backlog = Backlog(turns_taken, owed, outbox.wake)
        outcome = Outcome(grant, hold, outbox.wake)
        errands = Errands()
        floor = Floor(
            actions=talks.actions,
            principal=grant.principal,
            via=via,
            outbox=outbox,
            errands=errands,
        )
        transcriber = Transcriber(speech, voice, settings.input_format.sample_rate_hz)
        self._intake = Intake(
            settings=settings,
            max_turn_s=limits.max_turn_s,
            max_frame_bytes=limits.max_frame_bytes,
            transcriber=transcriber,
            client=client,
            backlog=backlog,
            floor=floor,
            outbox=outbox,
            outcome=outcome,
            errands=errands,
            judge=talks.judge,
        )
        self._worker = Worker(
            actions=talks.actions,
            store=talks.store,
            expiry=talks.expiry,
            principal=grant.principal,
            hold=hold,
            record=record,
            settings=settings,
            transcriber=transcriber,
            backlog=backlog,
            outbox=outbox,
            outcome=outcome,
        )
        self._relay = Relay(
            actions=talks.actions,
            hold=hold,
            backlog=backlog,
            floor=floor,
            outbox=outbox,
            outcome=outcome,
        )
        self._writer = Writer(
            outbox=outbox,
            floor=floor,
            client=client,
            backlog=backlog,
            outcome=outcome,
            heartbeat_s=limits.heartbeat_s,
            idle_timeout_s=limits.idle_timeout_s,
        )
        self._client = client
        self._outcome = outcome
        self._errands = errands
        self._talks = talks
        self._record = record
        grant.on_change(outbox.wake)
        waker.wake = outbox.wake

    async def run(
        self, frames: AsyncIterator[pb.TalkRequest]
    ) -> AsyncGenerator[pb.TalkResponse, None]:
        loop = asyncio.get_running_loop()
        actors = [
            loop.create_task(self._intake.run(frames), name="talk-reader"),
            loop.create_task(self._worker.run(), name="talk-worker"),
            loop.create_task(self._relay.run(), name="talk-relay"),
        ]
        finished = False
        try:
            while True:
                frame = await self._writer.next()
                if frame is None:
                    finished = True
                    return
                yield frame
        finally:
            stopping = [*actors, *self._errands.running()]
            for task in stopping:
                task.cancel()
            await asyncio.wait(stopping)
            await self._close(ended=finished and self._client.ending)

    async def _close(self, *, ended: bool) -> None:
        """Store how the stream ended: over for good, or resumable for the window."""
        with contextlib.suppress(SwitchboardError):
            if ended or self._outcome.ends_for_good:
                await self._talks.store.end(self._record.id, names.now())
            else:
                await self._talks.store.touch(self._record.id, self._talks.expiry())
