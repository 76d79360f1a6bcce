"""One browser's Talk session over a WebRTC peer connection (``aiortc``).

A browser cannot hold a bidirectional gRPC stream through grpc-web, so its voice
takes the media path it has: the page's SDP offer comes in, ``TalkPeer.answer``
returns the server's, and then

- the page's microphone track (Opus) is decoded, made mono PCM16 at Talk's input
  rate and fed to the Talk session as its audio frames, so the session's turn
  detection, barge-in, transcription and runs are Talk's own (``session.py``);
- the session's answer speech goes back as one outbound audio track
  (``media.SpeechTrack``), and a ``SPEECH_INTERRUPTED`` event drops what is queued
  for it at once, as a run's cancellation drops that run's;
- every other frame of the session (its ``session``, transcripts, run updates,
  events, errors; speech updates without their audio) goes to the page as JSON on
  the data channel the page opened (``talk``), in order; the page's control frames
  and typed turns come back on it (a ``TalkRequest`` as JSON: ``{"control":
  {"action": "TALK_ACTION_INTERRUPT"}}``, ``{"text": "..."}``). An interrupt that
  names no ``heard_through_sequence`` gets the last speech update the track sent
  whole.

The peer is bounded: an offer without audio, without Opus, or without a data
channel is refused before anything starts; a peer that does not connect and open
its ``talk`` channel within ``connect_timeout_s`` is closed; frames the page sends are at most
``MAX_MESSAGE_BYTES``; the queue of audio towards the session drops (and counts)
frames past ``MAX_PENDING_FRAMES`` rather than grow; a page that stops reading its
channel (``MAX_BUFFERED_BYTES`` unsent) ends the peer rather than lose a frame. The
session starts once the peer connects and the channel opens (a peer that never does
stores nothing); closing the peer ends the session's stream abnormally, so the
session can be resumed (Talk's resume, which sends the numbered frames again); the
session ending closes the peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from google.protobuf import json_format

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.talk.webrtc.ports import PortRange, confine
from switchboard.platform.errors import FieldViolation, InvalidArgument, PortsExhausted

# aiortc (with PyAV's FFmpeg and aioice) and the media bridge over it are imported when
# the first peer is made: a process reads its peer settings at start, and one that never
# carries a browser's voice never loads them.
if TYPE_CHECKING:
    from aiortc import RTCDataChannel, RTCIceServer, RTCRtpReceiver
    from aiortc.mediastreams import MediaStreamTrack

log = logging.getLogger("switchboard.dispatcher.talk.webrtc")

#: The longest SDP offer taken, and the largest data channel message from the page.
MAX_OFFER_BYTES: Final = 64 * 1024
MAX_MESSAGE_BYTES: Final = 64 * 1024
#: Audio frames waiting for the session (20 ms each): 5 s.
MAX_PENDING_FRAMES: Final = 250
#: Frames for the page waiting for its data channel to open, and the bytes its open
#: channel may hold unsent (a page that stops reading): past either the peer ends.
MAX_UNSENT: Final = 1_000
MAX_BUFFERED_BYTES: Final = 4 * 1024 * 1024
#: How long a run's text deltas are held to go to the page as one, and the most text one
#: merged delta holds.
DELTA_WINDOW_S: Final = 0.05
MAX_MERGED_DELTA_CHARS: Final = 16 * 1024
#: Audio frames the server's jitter buffer holds before it hands one on (aiortc's: 4).
PREFETCH_FRAMES: Final = 1
#: The data channel the page opens for the session's frames.
CHANNEL: Final = "talk"
_OPUS: Final = re.compile(r"^a=rtpmap:\d+ opus/48000", re.IGNORECASE | re.MULTILINE)
_AUDIO: Final = re.compile(r"^m=audio [1-9]\d*", re.MULTILINE)
#: A data channel's section (SCTP over DTLS), not rejected (port 0).
_DATA: Final = re.compile(r"^m=application [1-9]\d* \S*SCTP", re.MULTILINE)

#: Talk's stream, bound to its caller: requests in, frames out.
TalkCall = Callable[[AsyncIterator[pb.TalkRequest]], AsyncIterable[pb.TalkResponse]]


def offer_problems(sdp: str) -> list[str]:
    """Why ``sdp`` cannot start a session (empty: it can)."""
    if len(sdp.encode()) > MAX_OFFER_BYTES:
        return [f"is longer than {MAX_OFFER_BYTES // 1024} KiB"]
    if not sdp.startswith("v=0"):
        return ["is not an SDP offer (it must start with v=0)"]
    problems = []
    if not _AUDIO.search(sdp):
        problems.append("offers no audio (a microphone track is needed)")
    elif not _OPUS.search(sdp):
        problems.append("offers no Opus audio (the only codec taken)")
    if not _DATA.search(sdp):
        # Its session could never start: the peer would only hold a place until the
        # connect timeout.
        problems.append(f"offers no data channel (the page's {CHANNEL!r} channel is needed)")
    return problems


@dataclass(frozen=True)
class PeerOptions:
    """How this process's peers connect (``SWITCHBOARD_WEBRTC_*``)."""

    #: STUN and TURN servers handed to ICE (none: host candidates only, as on loopback).
    ice_servers: Sequence[RTCIceServer] = ()
    #: How long a peer may take to connect after its answer.
    connect_timeout_s: float = 15.0
    #: The UDP ports its media sockets bind (None: any the system picks).
    ports: PortRange | None = None
    #: Talk's rates: the audio fed to the session, and the speech it sends back.
    input_rate: int = 16_000
    output_rate: int = 24_000


class TalkPeer:
    """One peer connection bridged into one Talk session (see the module doc)."""

    def __init__(self, talk: TalkCall, first: pb.TalkRequest, settings: PeerOptions) -> None:
        """``first``: Talk's first frame, a ``start`` or a ``resume``."""
        from aiortc import RTCConfiguration, RTCPeerConnection

        from switchboard.dispatcher.talk.webrtc.media import SpeechTrack

        self._talk = talk
        self._first = pb.TalkRequest()
        self._first.CopyFrom(first)
        if self._first.WhichOneof("frame") == "start":
            # The session speaks what this bridge converts: PCM16 both ways. (A resumed
            # session's formats are its own: ``peers.py`` takes only the bridge's.)
            start = self._first.start
            start.input_format.encoding = pb.AUDIO_ENCODING_PCM16
            start.input_format.sample_rate_hz = settings.input_rate
            start.output_format.encoding = pb.AUDIO_ENCODING_PCM16
            start.output_format.sample_rate_hz = settings.output_rate
        self._settings = settings
        self._pc = RTCPeerConnection(RTCConfiguration(iceServers=list(settings.ice_servers)))
        self.speech = SpeechTrack()
        self._requests: asyncio.Queue[pb.TalkRequest | None] = asyncio.Queue()
        self._pending = 0
        #: The page sent END_SESSION: nothing more goes to Talk, which would refuse it.
        self._ending = False
        self._channel: RTCDataChannel | None = None
        self._unsent: list[str] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._connected = asyncio.Event()
        #: A run's text deltas held to go as one (``_hold_delta``).
        self._held: pb.TalkResponse | None = None
        self._held_timer: asyncio.TimerHandle | None = None
        self._opened = asyncio.Event()  # the page's ``talk`` channel
        self._started = False
        self._closing: asyncio.Task[None] | None = None
        #: Set once the bridge has ended, and why ("" for a session that ended well).
        self.ended = asyncio.Event()
        self.outcome = ""
        #: The session's name: the resumed one's, or a new one's once its first frame said it.
        self.session = self._first.resume.session
        #: Audio frames dropped because the session did not keep up.
        self.dropped_frames = 0
        self._pc.on("track", self._on_track)
        self._pc.on("datachannel", self._on_channel)
        self._pc.on("connectionstatechange", self._on_state)

    async def answer(self, offer: str) -> str:
        """The answer to the page's ``offer`` (SDP); the bridge runs from here on.
        INVALID_ARGUMENT naming ``offer`` for one that cannot start a session."""
        from aiortc import RTCSessionDescription

        problems = offer_problems(offer)
        if problems:
            raise InvalidArgument(
                f"offer: {problems[0]}",
                [FieldViolation(field="offer", description=p) for p in problems],
            )
        try:
            await self._pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        except ValueError as exc:
            await self._pc.close()
            raise InvalidArgument(
                "offer: it cannot be negotiated",
                [FieldViolation(field="offer", description=f"cannot be negotiated: {exc}"[:300])],
            ) from None
        for transceiver in self._pc.getTransceivers():
            if transceiver.kind == "audio":
                _prompt_jitter_buffer(transceiver.receiver)
        # Sent on the offer's audio transceiver (aiortc reuses it), both ways.
        self._pc.addTrack(self.speech)
        if self._settings.ports is not None:
            confine(self._pc, self._settings.ports)
        try:
            await self._pc.setLocalDescription(await self._pc.createAnswer())
        except PortsExhausted:
            # The answer would carry no candidate: the page could never connect.
            await self._pc.close()
            raise
        self._spawn(self._deadline(), "talk-webrtc-connect")
        return str(self._pc.localDescription.sdp)

    async def close(self, why: str = "closed") -> None:
        """End the bridge: the peer closes and the session's stream ends (abnormally,
        unless the session ended first), so the session may be resumed. Called again
        (or from the bridge's own tasks), it waits for the same close."""
        if self._closing is None:
            if not self.ended.is_set():
                self.outcome = why
                self.ended.set()
            self._requests.put_nowait(None)
            current = asyncio.current_task()
            for task in self._tasks:
                if task is not current:
                    task.cancel()
            self.speech.stop()
            if self._held_timer is not None:
                self._held_timer.cancel()  # a resume sends what it held again
            # A task of its own: cancelling whoever waits must not cut aiortc's close
            # short (a second close would then wait for it forever).
            self._closing = asyncio.get_running_loop().create_task(
                self._pc.close(), name="talk-webrtc-pc-close"
            )
        await asyncio.shield(self._closing)

    # -- media and channel in ---------------------------------------------------------

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio" and not any(t.get_name() == "talk-webrtc-in" for t in self._tasks):
            self._spawn(self._inbound(track), "talk-webrtc-in")

    async def _inbound(self, track: MediaStreamTrack) -> None:
        from aiortc.mediastreams import MediaStreamError

        from switchboard.dispatcher.talk.webrtc.media import Inbound

        converter = Inbound(self._settings.input_rate)
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return  # the page's track ended (the peer is closing)
            data = converter.feed(frame)  # type: ignore[arg-type]
            if not data or not self._started or self._ending:
                # Before the session's first frame went, audio would be taken for it; after
                # the page ended the session, Talk refuses any frame (the track goes on).
                continue
            if self._pending >= MAX_PENDING_FRAMES:
                self.dropped_frames += 1
                continue
            self._pending += 1
            self._requests.put_nowait(pb.TalkRequest(audio=pb.AudioChunk(data=data)))

    def _on_channel(self, channel: RTCDataChannel) -> None:
        if channel.label != CHANNEL or self._channel is not None:
            channel.close()
            return
        self._channel = channel
        channel.on("message", self._on_message)
        channel.on("open", self._flush)
        if channel.readyState == "open":
            self._flush()

    def _on_message(self, message: str | bytes) -> None:
        text = message.decode(errors="replace") if isinstance(message, bytes) else message
        if len(text) > MAX_MESSAGE_BYTES:
            self._say_error("a data channel message is longer than 64 KiB: ignored")
            return
        request = pb.TalkRequest()
        try:
            json_format.Parse(text, request)
        except json_format.ParseError:
            self._say_error("a data channel message is not a TalkRequest as JSON: ignored")
            return
        kind = request.WhichOneof("frame")
        if not self._started:
            self._say_error("the session has not started yet: wait for its session frame")
            return
        if kind not in ("control", "text"):
            self._say_error(f"only control and text frames go on the data channel, not {kind}")
            return
        if self._ending:
            self._say_error("the session is ending (END_SESSION): ignored")
            return
        control = request.control
        if kind == "control" and control.action == pb.TALK_ACTION_END_SESSION:
            self._ending = True
        if (
            kind == "control"
            and control.action == pb.TALK_ACTION_INTERRUPT
            and not control.heard_through_sequence
        ):
            # What the page heard is what the track sent whole, not what Talk sent it.
            control.heard_through_sequence = self.speech.heard_through
        self._requests.put_nowait(request)

    def _on_state(self) -> None:
        state = self._pc.connectionState
        if state == "connected" and not self._connected.is_set():
            self._connected.set()
            self._begin()
        elif state in ("failed", "closed") and not self.ended.is_set():
            self._spawn(self.close(f"the peer connection {state}"), "talk-webrtc-close")

    # -- the session ------------------------------------------------------------------

    async def _requests_out(self) -> AsyncIterator[pb.TalkRequest]:
        while (request := await self._requests.get()) is not None:
            if request.WhichOneof("frame") == "audio":
                self._pending -= 1
            yield request

    async def _relay(self) -> None:
        """The session's frames: speech to the track, the rest to the data channel."""
        why = ""
        try:
            frames = self._talk(self._requests_out())
            async for frame in frames:
                self._deliver(frame)
            self._release_delta()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the session's end, told to the page
            self._release_delta()
            why = _said(exc)
            self._send({"error": {"message": why}})
        await self.close(why)

    def _deliver(self, frame: pb.TalkResponse) -> None:
        kind = frame.WhichOneof("frame")
        if kind == "update" and frame.update.WhichOneof("update") == "delta":
            self._hold_delta(frame)
            return
        self._release_delta()  # what came before goes first
        if kind == "session" and not self.session:
            self.session = frame.session.name
        if kind == "update" and frame.update.WhichOneof("update") == "speech":
            speech = frame.update.speech
            pushed = self.speech.push(
                frame.sequence, speech.audio, self._settings.output_rate, frame.update.run
            )
            if not pushed:
                self._say_error("the answer's speech is longer than the track may queue")
            shown = pb.TalkResponse()
            shown.CopyFrom(frame)
            shown.update.speech.ClearField("audio")  # it went on the track
            self._send(json_format.MessageToDict(shown))
            return
        if kind == "event" and frame.event.kind == pb.TALK_EVENT_KIND_SPEECH_INTERRUPTED:
            self.speech.clear()
        if (
            kind == "update"
            and frame.update.WhichOneof("update") == "state_change"
            and frame.update.state_change.run.state == pb.RUN_STATE_CANCELLED
        ):
            # A run cancelled otherwise than by barge-in (a newer message, CancelRun) says
            # nothing more once its end reached the page: its queued speech goes with it.
            self.speech.clear(frame.update.run)
        if kind == "heartbeat":
            return
        self._send(json_format.MessageToDict(frame))

    def _hold_delta(self, frame: pb.TalkResponse) -> None:
        """A model writes a delta per word: each its own message would cost a JSON
        encoding and an SCTP message (with its acknowledgement) per word per page. So a
        run's deltas that come within ``DELTA_WINDOW_S`` go as one, merged as WatchRun's
        ``merge_deltas`` merges them: the text joined, ``first_sequence`` ..
        ``sequence`` the updates it holds, the frame numbered as the last (a resume
        after it is exact)."""
        held = self._held
        if (
            held is not None
            and held.update.run == frame.update.run
            and len(held.update.delta.text) < MAX_MERGED_DELTA_CHARS
        ):
            if not held.update.first_sequence:
                held.update.first_sequence = held.update.sequence
            held.update.delta.text += frame.update.delta.text
            held.update.sequence = frame.update.sequence
            held.update.time.CopyFrom(frame.update.time)
            held.sequence = frame.sequence
            return
        self._release_delta()
        self._held = pb.TalkResponse()
        self._held.CopyFrom(frame)
        self._held_timer = asyncio.get_running_loop().call_later(
            DELTA_WINDOW_S, self._release_delta
        )

    def _release_delta(self) -> None:
        held, self._held = self._held, None
        if self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None
        if held is not None:
            self._send(json_format.MessageToDict(held))

    async def _deadline(self) -> None:
        try:
            async with asyncio.timeout(self._settings.connect_timeout_s):
                await self._connected.wait()
                await self._opened.wait()
        except TimeoutError:
            if self._connected.is_set():
                self.outcome = f"the page opened no {CHANNEL!r} data channel in time"
            else:
                self.outcome = "the peer did not connect in time"
            await self.close(self.outcome)

    # -- helpers ----------------------------------------------------------------------

    def _send(self, value: dict[str, Any]) -> None:
        if self.ended.is_set():
            return
        text = json.dumps(value, separators=(",", ":"))
        channel = self._channel
        if channel is None or channel.readyState != "open":
            if len(self._unsent) < MAX_UNSENT:
                self._unsent.append(text)
            else:
                # Never a frame silently dropped: the peer ends, and a resume sends the
                # numbered frames again from where the page got to.
                self._end_soon("the page's data channel did not take the session's frames")
            return
        if channel.bufferedAmount > MAX_BUFFERED_BYTES:
            self._end_soon("the page is not reading its data channel")
            return
        channel.send(text)

    def _end_soon(self, why: str) -> None:
        if not self.ended.is_set():
            self.outcome = why
            self.ended.set()
            self._spawn(self.close(why), "talk-webrtc-close")

    def _begin(self) -> None:
        """The session starts once media can flow and its frames have a way to the page:
        a peer that never connects, or never opens its ``talk`` channel, stores nothing."""
        if self._connected.is_set() and self._opened.is_set() and not self._started:
            self._started = True
            self._requests.put_nowait(self._first)
            self._spawn(self._relay(), "talk-webrtc-relay")

    def _flush(self) -> None:
        channel = self._channel
        if channel is None or channel.readyState != "open":
            return
        self._opened.set()
        self._begin()
        unsent, self._unsent = self._unsent, []
        for text in unsent:
            channel.send(text)

    def _say_error(self, message: str) -> None:
        self._send({"error": {"message": message}})

    def _spawn(self, work: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.append(task)
        task.add_done_callback(_heard)


def _prompt_jitter_buffer(receiver: RTCRtpReceiver) -> None:
    """aiortc hands an audio packet on only once 4 later ones have come: 80 ms added to
    every turn's end (BENCHMARKS.md, "Voice over WebRTC"), for reordering a browser's
    packets seldom need. One later packet is enough to know a frame is whole; a lost
    packet still holds the buffer as before (until its 16 slots overflow). aiortc has no
    setting for it, so its private buffer is replaced before any packet came (aiortc is
    pinned, and tests/dispatcher/talk/webrtc/test_peers.py checks the buffer is this one)."""
    from aiortc.jitterbuffer import JitterBuffer

    name = "_RTCRtpReceiver__jitter_buffer"
    if isinstance(getattr(receiver, name, None), JitterBuffer):
        setattr(receiver, name, JitterBuffer(capacity=16, prefetch=PREFETCH_FRAMES))


def _heard(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("a WebRTC talk task failed", exc_info=task.exception())


def _said(exc: BaseException) -> str:
    """What the page is told of the session's end: the status's words, never a trace."""
    details = getattr(exc, "details", None)
    if callable(details):
        with contextlib.suppress(Exception):
            return str(details() or "the session ended")[:500]
    message = getattr(exc, "message", "")
    return str(message)[:500] if message else "the session ended"
