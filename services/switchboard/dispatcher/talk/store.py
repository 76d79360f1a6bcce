"""The voice_sessions and voice_turns tables (migration 0013): SQL only, plain records out.

A session is its serialized ``VoiceSession`` (``data``, built and read by the
session; never parsed here) beside the columns a resume checks: who started
it, how many turns it stored, until when it may be resumed and whether it
ended. A turn is the stored user message and the run answering it, written once
SendMessage succeeded, so a resume on any replica rebuilds the session's frames
from these rows and the runs' own updates. Both dialects (SQLite and
PostgreSQL) take the same statements.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from switchboard.platform.store.db import Database
from switchboard.platform.store.models import VoiceSessionRow, VoiceTurnRow
from switchboard.platform.store.storage import transaction

log = logging.getLogger("switchboard.dispatcher.talk.store")

_T = TypeVar("_T")


@dataclass(frozen=True)
class SessionRecord:
    """One voice session as stored; ``data`` is its serialized ``VoiceSession``."""

    id: str
    workspace_id: str
    conversation_id: str
    creator: str
    data: bytes
    turn_count: int
    created_at: dt.datetime
    expire_at: dt.datetime
    ended_at: dt.datetime | None


@dataclass(frozen=True)
class TurnRecord:
    """One stored turn: its message, its run, its recording and transcript."""

    session_id: str
    turn: int
    message: str
    run: str
    recording: str
    transcript: str
    audio_ms: int
    created_at: dt.datetime


def _session(row: VoiceSessionRow) -> SessionRecord:
    return SessionRecord(
        id=row.id,
        workspace_id=row.workspace_id,
        conversation_id=row.conversation_id,
        creator=row.creator,
        data=row.data,
        turn_count=row.turn_count,
        created_at=row.created_at,
        expire_at=row.expire_at,
        ended_at=row.ended_at,
    )


def _turn(row: VoiceTurnRow) -> TurnRecord:
    return TurnRecord(
        session_id=row.session_id,
        turn=row.turn,
        message=row.message,
        run=row.run,
        recording=row.recording,
        transcript=row.transcript,
        audio_ms=row.audio_ms,
        created_at=row.created_at,
    )


class VoiceStore:
    def __init__(self, database: Database) -> None:
        self._database = database

    async def _run(self, work: Callable[[Session], _T], *, write: bool) -> _T:
        return await transaction(self._database, work, write=write, log=log)

    async def create(self, record: SessionRecord) -> None:
        def work(db: Session) -> None:
            db.add(
                VoiceSessionRow(
                    id=record.id,
                    workspace_id=record.workspace_id,
                    conversation_id=record.conversation_id,
                    creator=record.creator,
                    data=record.data,
                    turn_count=record.turn_count,
                    created_at=record.created_at,
                    expire_at=record.expire_at,
                    ended_at=record.ended_at,
                )
            )

        await self._run(work, write=True)

    async def get(
        self, workspace_id: str, conversation_id: str, session_id: str
    ) -> SessionRecord | None:
        """The session, if it exists in that conversation."""

        def work(db: Session) -> SessionRecord | None:
            row = db.get(VoiceSessionRow, session_id)
            if row is None or (row.workspace_id, row.conversation_id) != (
                workspace_id,
                conversation_id,
            ):
                return None
            return _session(row)

        return await self._run(work, write=False)

    async def add_turn(self, record: TurnRecord, expire_at: dt.datetime) -> None:
        """Store a turn; the session's count and resume window move on with it."""

        def work(db: Session) -> None:
            db.add(
                VoiceTurnRow(
                    session_id=record.session_id,
                    turn=record.turn,
                    message=record.message,
                    run=record.run,
                    recording=record.recording,
                    transcript=record.transcript,
                    audio_ms=record.audio_ms,
                    created_at=record.created_at,
                )
            )
            db.execute(
                update(VoiceSessionRow)
                .where(VoiceSessionRow.id == record.session_id)
                .values(
                    turn_count=record.turn,
                    expire_at=expire_at,
                )
            )

        await self._run(work, write=True)

    async def turns(self, session_id: str, first: int) -> list[TurnRecord]:
        """The session's turns from ``first`` on, in order."""

        def work(db: Session) -> list[TurnRecord]:
            rows = db.execute(
                select(VoiceTurnRow)
                .where(VoiceTurnRow.session_id == session_id, VoiceTurnRow.turn >= first)
                .order_by(VoiceTurnRow.turn)
            ).scalars()
            return [_turn(row) for row in rows]

        return await self._run(work, write=False)

    async def touch(self, session_id: str, expire_at: dt.datetime) -> None:
        """The resume window starts again (the stream ended)."""

        def work(db: Session) -> None:
            db.execute(
                update(VoiceSessionRow)
                .where(VoiceSessionRow.id == session_id, VoiceSessionRow.ended_at.is_(None))
                .values(expire_at=expire_at)
            )

        await self._run(work, write=True)

    async def end(self, session_id: str, at: dt.datetime) -> None:
        """The session is over: it may not be resumed."""

        def work(db: Session) -> None:
            db.execute(
                update(VoiceSessionRow)
                .where(VoiceSessionRow.id == session_id, VoiceSessionRow.ended_at.is_(None))
                .values(ended_at=at, expire_at=at)
            )

        await self._run(work, write=True)
