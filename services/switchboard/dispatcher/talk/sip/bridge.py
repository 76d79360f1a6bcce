"""One phone call bridged into one Talk session.

The session starts once the call's media is up, with PCM16 both ways at the call's own
rate (8 kHz for PCMU and PCMA, 16 kHz for G.722), so nothing is resampled in Python: the
caller's 20 ms frames go to Talk as its audio, and Talk's speech goes to the call's
``Playout``, which PJSIP's clock drains. Turn detection, barge-in, transcripts and runs are
Talk's own (``session.py``): when the caller speaks over the answer, Talk's
``SPEECH_INTERRUPTED`` drops what is queued for the call at once, as a run cancelled
otherwise does.

Keys pressed (RFC 4733 or SIP INFO) are gathered and sent to the session as one typed
turn, ``[keys pressed: 1 2 #]``, after a pause (``SWITCHBOARD_SIP_DTMF_PAUSE_S``) or at
once on ``#``: a message the assistant reads like any other (docs/telephony.md).

A call placed (``PlaceCall``) has an opening message: sent as the session's first typed
turn once the call is answered, so the assistant speaks first, answering it.

The caller hanging up ends the session (``END_SESSION``); the session ending (its idle
timeout, an error, the assistant's end) hangs the call up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Final

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.runs.core.store import TERMINAL
from switchboard.dispatcher.talk.sip.pjsip import Playout

log = logging.getLogger("switchboard.dispatcher.talk.sip")

#: Audio frames waiting for the session (20 ms each): 5 s; past it frames are dropped.
MAX_PENDING_FRAMES: Final = 250
#: Keys one message holds at most.
MAX_KEYS: Final = 64
#: How long a hang-up or transfer after speech waits for the speech to play out at most.
MAX_AFTER_SPEECH_S: Final = 30.0
DRAIN_POLL_S: Final = 0.02

#: Talk's stream, bound to the call's principal: requests in, frames out.
TalkCall = Callable[[AsyncIterator[pb.TalkRequest]], AsyncGenerator[pb.TalkResponse, None]]


class CallBridge:
    """See the module doc. The registry (``calls.py``) feeds it the engine's reports."""

    def __init__(
        self,
        talk: TalkCall,
        first: pb.TalkRequest,
        *,
        hang_up: Callable[[], None],
        dtmf_pause_s: float,
        opening: str = "",
        on_session: Callable[[str], None] | None = None,
    ) -> None:
        self._talk = talk
        self._first = first
        self._hang_up = hang_up
        self._dtmf_pause_s = dtmf_pause_s
        self._opening = opening
        self._on_session = on_session
        self._requests: asyncio.Queue[pb.TalkRequest | None] = asyncio.Queue()
        self._pending = 0
        self._keys: list[str] = []
        self._keys_timer: asyncio.TimerHandle | None = None
        self._playout: Playout | None = None
        self._task: asyncio.Task[None] | None = None
        self._ending = False
        #: The session's name once its first frame said it.
        self.session = ""
        #: Why the bridge ended ("" while it runs or when the session ended well).
        self.outcome = ""
        self.ended = asyncio.Event()
        self.dropped_frames = 0
        self._after: Callable[[], None] | None = None
        self._waiting: asyncio.Task[None] | None = None

    @property
    def live(self) -> bool:
        return self._task is not None and not self._ending and not self.ended.is_set()

    def after_speech(self, action: Callable[[], None]) -> None:
        """Do ``action`` once the run now answering has ended and its speech has played
        out (the assistant's ``end_call`` and ``transfer_call``); the last one asked wins."""
        self._after = action

    def _run_ended(self) -> None:
        action, self._after = self._after, None
        if action is not None and self._waiting is None:
            self._waiting = asyncio.get_running_loop().create_task(
                self._when_played(action), name="sip-after-speech"
            )

    async def _when_played(self, action: Callable[[], None]) -> None:
        playout = self._playout
        try:
            async with asyncio.timeout(MAX_AFTER_SPEECH_S):
                # PJSIP's clock drains it in real time, on its thread; nothing signals
                # the end to the loop, so it waits as long as what is queued lasts.
                while playout is not None and playout.queued_bytes and self.live:  # noqa: ASYNC110
                    await asyncio.sleep(max(DRAIN_POLL_S, playout.queued_bytes / playout.rate / 2))
        except TimeoutError:
            log.info("a call's speech did not play out in time; acting anyway")
        finally:
            self._waiting = None
        if self.live:
            action()

    def begin(self, playout: Playout) -> None:
        """The call's media is up: the session starts at the call's rate."""
        if self._task is not None:
            return
        self._playout = playout
        start = self._first.start
        for fmt in (start.input_format, start.output_format):
            fmt.encoding = pb.AUDIO_ENCODING_PCM16
            fmt.sample_rate_hz = playout.rate
        self._requests.put_nowait(self._first)
        if self._opening:
            self._requests.put_nowait(pb.TalkRequest(text=self._opening))
        self._task = asyncio.get_running_loop().create_task(self._relay(), name="sip-call")

    def audio(self, pcm: bytes) -> None:
        if self._task is None or self._ending:
            return
        if self._pending >= MAX_PENDING_FRAMES:
            self.dropped_frames += 1
            return
        self._pending += 1
        self._requests.put_nowait(pb.TalkRequest(audio=pb.AudioChunk(data=pcm)))

    def key(self, digit: str) -> None:
        if self._task is None or self._ending or len(self._keys) >= MAX_KEYS:
            return
        self._keys.append(digit)
        if self._keys_timer is not None:
            self._keys_timer.cancel()
        if digit == "#":
            self._send_keys()
        else:
            self._keys_timer = asyncio.get_running_loop().call_later(
                self._dtmf_pause_s, self._send_keys
            )

    def hung_up(self, why: str) -> None:
        """The caller hung up (or the call failed): the session ends."""
        if not self.outcome:
            self.outcome = why
        self._send_keys()
        if self._task is None:
            self.ended.set()
            return
        if not self._ending:
            self._ending = True
            self._requests.put_nowait(
                pb.TalkRequest(control=pb.TalkControl(action=pb.TALK_ACTION_END_SESSION))
            )

    async def close(self) -> None:
        """The process stops: the session's stream ends as a dropped one does."""
        self._requests.put_nowait(None)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.ended.set()

    def _send_keys(self) -> None:
        if self._keys_timer is not None:
            self._keys_timer.cancel()
            self._keys_timer = None
        if not self._keys or self._ending:
            self._keys.clear()
            return
        text = f"[keys pressed: {' '.join(self._keys)}]"
        self._keys.clear()
        self._requests.put_nowait(pb.TalkRequest(text=text))

    async def _requests_out(self) -> AsyncIterator[pb.TalkRequest]:
        while (request := await self._requests.get()) is not None:
            if request.WhichOneof("frame") == "audio":
                self._pending -= 1
            yield request
            if request.WhichOneof("frame") == "control" and self._ending:
                # END_SESSION went: Talk answers with its end, and takes nothing more.
                await asyncio.Event().wait()

    async def _relay(self) -> None:
        try:
            async for frame in self._talk(self._requests_out()):
                self._deliver(frame)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the session's end: the call ends with it
            self.outcome = self.outcome or _said(exc)
            log.info("a call's session ended: %s", self.outcome, extra={"session": self.session})
        finally:
            self.ended.set()
        if not self._ending:
            self._ending = True
            self._hang_up()

    def _deliver(self, frame: pb.TalkResponse) -> None:
        kind = frame.WhichOneof("frame")
        playout = self._playout
        if kind == "session" and not self.session:
            self.session = frame.session.name
            if self._on_session is not None:
                self._on_session(self.session)
        elif kind == "update" and frame.update.WhichOneof("update") == "speech":
            if playout is not None and not playout.push(frame.update.speech.audio):
                log.warning("a call's answer audio overflowed its queue")
        elif kind == "event" and frame.event.kind == pb.TALK_EVENT_KIND_SPEECH_INTERRUPTED:
            if playout is not None:
                playout.clear()
        elif kind == "update" and frame.update.WhichOneof("update") == "state_change":
            state = frame.update.state_change.run.state
            if state == pb.RUN_STATE_CANCELLED and playout is not None:
                playout.clear()
            if state in TERMINAL:
                self._run_ended()


def _said(exc: BaseException) -> str:
    message = getattr(exc, "message", "")
    return str(message)[:300] if message else type(exc).__name__
