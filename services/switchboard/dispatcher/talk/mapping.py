"""A voice session's names and messages, built from its stored records.

The session decides; this spells it as the contract shows it: the session's
conversation, its ``VoiceSession`` (the stored settings with the count and the resume
window as they stand), a stored turn's final ``Transcript`` (what a resume
replays), the frames' numbering and the error frame.
"""

from __future__ import annotations

import datetime as dt
from typing import Final

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.talk.store import SessionRecord, TurnRecord
from switchboard.platform.errors import SwitchboardError
from switchboard.platform.observe.logging import request_id_var
from switchboard.platform.rpc.status import to_status_proto
from switchboard.platform.values.names import now
from switchboard.platform.values.resources import ConversationName

#: A turn's frames are numbered ``turn << TURN_SHIFT`` plus its run's update sequence.
TURN_SHIFT: Final = 40
POSITION_MASK: Final = (1 << TURN_SHIFT) - 1


def conversation_name(record: SessionRecord) -> ConversationName:
    return ConversationName(record.workspace_id, record.conversation_id)


def sequence(turn: int, position: int = 0) -> int:
    """The session sequence of a turn's frame: its final transcript at 0, its run's
    updates at their own sequence."""
    return (turn << TURN_SHIFT) + position


def position(session_sequence: int) -> tuple[int, int]:
    """``(turn, position in the turn)`` of a session sequence."""
    return session_sequence >> TURN_SHIFT, session_sequence & POSITION_MASK


def session(record: SessionRecord, turn_count: int, expire_at: dt.datetime) -> pb.VoiceSession:
    message = pb.VoiceSession.FromString(record.data)
    message.turn_count = turn_count
    message.expire_time.FromDatetime(expire_at)
    return message


def transcript(turn: TurnRecord) -> pb.Transcript:
    """The final transcript of a stored turn, as it went out when the turn was taken."""
    return pb.Transcript(
        turn=turn.turn,
        text=turn.transcript,
        final=True,
        message=turn.message,
        run=turn.run,
        recording=turn.recording,
        audio_ms=turn.audio_ms,
    )


def event(kind: pb.TalkEventKind.ValueType, turn: int, run: str = "") -> pb.TalkResponse:
    return pb.TalkResponse(event=pb.TalkEvent(kind=kind, turn=turn, run=run))


def error(exc: SwitchboardError) -> pb.TalkResponse:
    # The interceptor's request id, as in every other error (the tasks copied its context).
    return pb.TalkResponse(error=to_status_proto(exc, request_id_var.get()))


def heartbeat() -> pb.TalkResponse:
    beat = pb.Heartbeat()
    beat.time.FromDatetime(now())
    return pb.TalkResponse(heartbeat=beat)
