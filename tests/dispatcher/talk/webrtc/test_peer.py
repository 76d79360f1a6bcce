"""What a WebRTC peer puts on the page's ``talk`` channel (``TalkPeer._deliver``): the
session's frames in order, a run's text deltas that come close together as one merged
delta (as WatchRun's ``merge_deltas``: the text joined, ``first_sequence`` .. ``sequence``,
numbered as the last), and nothing held back past a frame that follows it or the window."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.handler.v1 import handler_pb2
from switchboard.dispatcher.talk.webrtc.peer import (
    DELTA_WINDOW_S,
    MAX_MERGED_DELTA_CHARS,
    PeerOptions,
    TalkPeer,
)

pytestmark = pytest.mark.unit

RUN = "workspaces/w/conversations/c/runs/r1"
OTHER = "workspaces/w/conversations/c/runs/r2"


@dataclass
class Channel:
    """The page's side of the data channel, as the peer sees it."""

    readyState: str = "open"  # noqa: N815 - aiortc's name
    bufferedAmount: int = 0  # noqa: N815
    sent: list[dict[str, Any]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def send(self, text: str) -> None:
        self.sent.append(json.loads(text))
        self.arrived.set()


def delta(sequence: int, run: str, run_sequence: int, text: str) -> pb.TalkResponse:
    return pb.TalkResponse(
        sequence=sequence,
        update=pb.RunUpdate(run=run, sequence=run_sequence, delta=handler_pb2.TextDelta(text=text)),
    )


async def peer_with(channel: Channel) -> TalkPeer:
    def talk(requests: object) -> object:
        raise AssertionError("not asked here")

    peer = TalkPeer(talk, pb.TalkRequest(start=pb.TalkStart()), PeerOptions())  # type: ignore[arg-type]
    peer._channel = channel  # type: ignore[assignment]
    peer._started = True
    return peer


async def test_a_runs_close_deltas_go_as_one_in_order() -> None:
    channel = Channel()
    peer = await peer_with(channel)
    try:
        peer._deliver(delta(10, RUN, 3, "Hello"))
        peer._deliver(delta(11, RUN, 4, " there"))
        peer._deliver(delta(12, RUN, 5, ","))
        assert channel.sent == []  # held for the window
        peer._deliver(delta(13, OTHER, 1, "Other"))  # another run's: the first goes now
        ended = pb.TalkResponse(
            sequence=14,
            update=pb.RunUpdate(
                run=OTHER,
                sequence=2,
                state_change=pb.RunStateChange(run=pb.Run(name=OTHER)),
            ),
        )
        peer._deliver(ended)  # a frame that follows: what was held goes before it
        assert [m["sequence"] for m in channel.sent] == ["12", "13", "14"]
        merged = channel.sent[0]["update"]
        assert merged["delta"]["text"] == "Hello there,"
        assert (merged["firstSequence"], merged["sequence"]) == ("3", "5")
        alone = channel.sent[1]["update"]
        assert alone["delta"]["text"] == "Other"
        assert "firstSequence" not in alone
    finally:
        await peer.close()


async def test_a_held_delta_goes_when_its_window_ends() -> None:
    channel = Channel()
    peer = await peer_with(channel)
    try:
        peer._deliver(delta(20, RUN, 7, "late"))
        async with asyncio.timeout(DELTA_WINDOW_S + 5):
            await channel.arrived.wait()
        assert channel.sent == [
            {"sequence": "20", "update": {"run": RUN, "sequence": "7", "delta": {"text": "late"}}}
        ]
    finally:
        await peer.close()


async def test_a_merged_delta_is_bounded() -> None:
    channel = Channel()
    peer = await peer_with(channel)
    try:
        word = "x" * 1024
        count = MAX_MERGED_DELTA_CHARS // len(word) + 1
        for i in range(count):
            peer._deliver(delta(30 + i, RUN, 1 + i, word))
        peer._release_delta()
        sizes = [len(m["update"]["delta"]["text"]) for m in channel.sent]
        assert sum(sizes) == count * len(word)
        assert max(sizes) <= MAX_MERGED_DELTA_CHARS
        assert len(sizes) == 2
    finally:
        await peer.close()


def speech(sequence: int, run: str, run_sequence: int, ms: int) -> pb.TalkResponse:
    audio = bytes(24_000 * 2 * ms // 1000)  # the session's output: PCM16 at 24 kHz
    return pb.TalkResponse(
        sequence=sequence,
        update=pb.RunUpdate(run=run, sequence=run_sequence, speech=pb.SpeechChunk(audio=audio)),
    )


def ended(
    sequence: int, run: str, run_sequence: int, state: pb.RunState.ValueType
) -> pb.TalkResponse:
    return pb.TalkResponse(
        sequence=sequence,
        update=pb.RunUpdate(
            run=run,
            sequence=run_sequence,
            state_change=pb.RunStateChange(run=pb.Run(name=run, state=state)),
        ),
    )


async def test_a_cancelled_runs_speech_is_dropped_when_its_end_comes() -> None:
    """A run cancelled otherwise than by barge-in (a newer message, CancelRun) says
    nothing more on the track once its end reaches the page; a run that succeeded says
    the rest of its answer."""
    channel = Channel()
    peer = await peer_with(channel)
    try:
        peer._deliver(speech(40, RUN, 1, 400))
        peer._deliver(ended(41, RUN, 2, pb.RUN_STATE_SUCCEEDED))
        first = peer.speech.queued_ms
        assert first >= 390  # (the resampler holds a few samples back)
        peer._deliver(speech(42, OTHER, 1, 600))
        assert peer.speech.queued_ms >= first + 590
        peer._deliver(ended(43, OTHER, 2, pb.RUN_STATE_CANCELLED))
        # The first run's rest, not the cancelled one's.
        assert peer.speech.queued_ms == first
        assert [m["sequence"] for m in channel.sent] == ["40", "41", "42", "43"]
    finally:
        await peer.close()
