"""A run's speech around its relay: the answer spoken as the handler writes it.

A run asked to speak (``SendMessageRequest.speech.speak``) gets a speaker
(``speaker.py``) before its handler is called; ``Speaking.around`` wraps the
relay of the handler's frames the way ``runs/durable.py`` wraps the handler's
step, and hands the relay the speaker's ``feed`` for each piece of text. An
answer journaled before a crash is spoken too (``replayed``); the answer is
stored once it has been spoken (``spoken``), and a run cancelled while it
speaks stops at once (``halt``) and stores what its listener heard
(``unwind``).

Why a module of its own: speech touches a run in those five places, and kept
beside the execution stage's other steps it made that stage read as if every
run spoke. Here the stage calls one collaborator, and a run that does not
speak passes through it untouched. It knows a run only by what it needs of it
(``SpeakingRun``): the run pipeline sits above ``voice/``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.handler.v1 import handler_pb2
from switchboard.dispatcher.voice.speaker import Speaker, Speech
from switchboard.internal.dispatcher.v1 import job_pb2
from switchboard.platform.errors import SwitchboardError

log = logging.getLogger("switchboard.dispatcher")

#: Publishes one of the run's updates.
Emit = Callable[[pb.RunUpdate], None]
#: Stores a message in the run's conversation (as the run's user, within the end's time).
Append = Callable[[cpb.AppendMessageRequest], Awaitable[cpb.Message]]
#: The relay of the handler's frames: given the speaker's ``feed`` (None: the run does
#: not speak), returns the handler's result.
Relay = Callable[[Callable[[str], None] | None], Awaitable[handler_pb2.HandleResult]]


class SpeakingRun(Protocol):
    """What speech needs of a live run (``runs/core/active/lifecycle.py``'s ``Active``)."""

    #: Its speech, while it speaks its answer.
    speaker: Speaker | None
    #: A cancel's ``heard_through_sequence``: the last speech update its listener heard.
    heard_through: int

    @property
    def run(self) -> pb.Run: ...

    @property
    def run_id(self) -> str: ...

    @property
    def job(self) -> job_pb2.RunJob: ...

    @property
    def assistant(self) -> pb.Assistant | None: ...

    @property
    def conversation(self) -> str: ...


class Speaking:
    """The server's speech (None: no engine; a run asked to speak answers in text),
    around each run's relay."""

    def __init__(self, speech: Speech | None, *, max_reason_chars: int) -> None:
        self._speech = speech
        #: The longest reason a progress update says speech stopped for.
        self._max_reason_chars = max_reason_chars

    async def around(self, run: SpeakingRun, emit: Emit, relay: Relay) -> handler_pb2.HandleResult:
        """``relay``, with the run speaking its answer as it is written if it asked to."""
        self._start(run, emit)
        speaker = run.speaker
        return await relay(speaker.feed if speaker is not None else None)

    def replayed(self, run: SpeakingRun, emit: Emit, result: handler_pb2.HandleResult) -> None:
        """An answer journaled before a crash, shown again (this attempt's watchers
        start over) and spoken if the run speaks; it is stored as the run's message
        with the first attempt's request id."""
        text = "".join(part.text for part in result.parts if part.HasField("text"))
        self._start(run, emit)
        if text:
            update = pb.RunUpdate()
            update.delta.text = text
            emit(update)
            if run.speaker is not None:
                run.speaker.feed(text)

    async def spoken(
        self, run: SpeakingRun, result: handler_pb2.HandleResult, answer: cpb.Message
    ) -> None:
        """Wait until the answer is all spoken (under the deadline); its metadata then
        says what was. Nothing to wait for when the run does not speak."""
        speaker = run.speaker
        if speaker is None:
            return
        if not speaker.text:
            # A handler that sent its answer whole, with no deltas: spoken whole.
            speaker.feed("".join(p.text for p in result.parts if p.HasField("text")))
        speaker.finish()
        await speaker.wait()
        answer.metadata.CopyFrom(speaker.record(interrupted=False)[1])

    @staticmethod
    def halt(run: SpeakingRun, heard_through: int) -> None:
        """A cancel, before anything is awaited: not one more chunk of speech goes out.
        ``heard_through``: the last speech update its listener heard (0: all sent)."""
        if run.speaker is not None:
            run.heard_through = heard_through
            run.speaker.halt()

    async def unwind(self, run: SpeakingRun, append: Append) -> None:
        """The run's task is done with its speech: a cancelled run stores what its
        listener heard (``append``), and the speaker stops."""
        speaker = run.speaker
        if speaker is None:
            return
        if run.run.state == pb.RUN_STATE_CANCELLED:
            await self._store_heard(run, append)
        await speaker.stop()
        run.speaker = None

    def _start(self, run: SpeakingRun, emit: Emit) -> None:
        """The run speaks its answer as it is written (``speaker.py``), if it asked to."""
        if not run.job.speech.speak:
            return
        speech = self._speech
        if speech is None:
            # Admitted where an engine is set up, run where none is (a takeover).
            log.warning(
                "a run asked to speak on a replica without a speech engine; it answers in text",
                extra={"run": run.run.name},
            )
            return
        assistant = run.assistant
        voiced = assistant is not None and assistant.HasField("voice")
        settings = assistant.voice if voiced and assistant is not None else None
        voice = speech.speaking(settings, run.job.speech.output_format.sample_rate_hz)
        max_chars = self._max_reason_chars

        def spoken(update: pb.RunUpdate) -> int:
            emit(update)
            return update.sequence

        def failed(why: str) -> None:
            update = pb.RunUpdate()
            update.progress.stage = f"speech stopped: {why}"[:max_chars]
            update.progress.fraction = -1
            emit(update)

        run.speaker = Speaker(voice, spoken, failed)

    @staticmethod
    async def _store_heard(run: SpeakingRun, append: Append) -> None:
        """A speaking run cancelled (or superseded): its speech stopped at once
        (``halt``), and the text its listener heard is stored as its answer, the
        rest marked unspoken."""
        speaker = run.speaker
        if speaker is None:
            return
        await speaker.stop()
        if not speaker.text.strip():
            return
        text, metadata = speaker.record(interrupted=True, through=run.heard_through)
        answer = cpb.Message(
            role=cpb.MESSAGE_ROLE_ASSISTANT,
            author=run.run.handler,
            parts=[cpb.ContentPart(text=text)],
            run=run.run.name,
        )
        answer.metadata.CopyFrom(metadata)
        try:
            output = await append(
                cpb.AppendMessageRequest(
                    parent=run.conversation,
                    message=answer,
                    request_id=f"run-{run.run_id}",
                    branch=run.run.branch,
                )
            )
        except SwitchboardError as exc:
            log.warning(
                "the heard part of a cancelled run's answer was not stored",
                extra={"run": run.run.name, "error": type(exc).__name__},
            )
            return
        run.run.output_message = output.name
