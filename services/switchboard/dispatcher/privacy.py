"""The dispatcher's part of an erasure (docs/privacy.md, ``platform/events/erasure/worker.py``):
the runs a deleted account started (their requests and answers), its schedules (their
message templates), its voice sessions (transcripts), its memory-forming jobs (the
exchanges they carry), the idempotency keys of its requests, its A2A push configs, its
runs' budget holds, and the phone calls that acted as it (their numbers). Usage totals
stay: they hold counts, never words. Idempotent.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from switchboard.platform.events.erasure.store import ErasureRecord, ErasureStore
from switchboard.platform.store.db import Database
from switchboard.platform.store.models import (
    BudgetHoldRow,
    CallRow,
    IdempotencyRow,
    MemoryJobRow,
    PushConfigRow,
    RunRow,
    ScheduleRow,
    VoiceSessionRow,
    VoiceTurnRow,
)
from switchboard.platform.store.storage import transaction
from switchboard.platform.values.resources import UserName

log = logging.getLogger(__name__)

#: Runs removed per transaction.
_BATCH: Final = 500


class DispatcherEraser:
    def __init__(self, database: Database, erasures: ErasureStore) -> None:
        self._database = database
        self._erasures = erasures

    async def __call__(self, erasure: ErasureRecord) -> None:
        if not erasure.user_id:
            return  # a deleted message's redaction: nothing here
        user_name = str(UserName(erasure.user_id))
        within = erasure.workspaces  # a member's words in those workspaces; () everywhere
        while True:
            names = await transaction(
                self._database,
                lambda db: _runs(db, user_name, within),
                write=True,
                log=log,
            )
            await self._erasures.remember(erasure.id, names)
            if len(names) < _BATCH:
                break
        await transaction(
            self._database,
            lambda db: _rest(db, erasure.user_id, user_name, within),
            write=True,
            log=log,
        )


def _runs(db: Session, user_name: str, within: Sequence[str]) -> list[str]:
    query = select(RunRow.id, RunRow.workspace_id, RunRow.conversation_id).where(
        RunRow.creator.in_(_forms(user_name))
    )
    if within:
        query = query.where(RunRow.workspace_id.in_(list(within)))
    rows: Sequence[tuple[str, str, str]] = db.execute(query.limit(_BATCH)).all()
    ids = [row[0] for row in rows]
    if ids:
        db.execute(delete(BudgetHoldRow).where(BudgetHoldRow.run_id.in_(ids)))
        db.execute(delete(RunRow).where(RunRow.id.in_(ids)))
    return [f"workspaces/{w}/conversations/{c}/runs/{r}" for r, w, c in rows]


def _rest(db: Session, user_id: str, user_name: str, within: Sequence[str]) -> None:
    scope = list(within)
    sessions = select(VoiceSessionRow.id).where(VoiceSessionRow.creator.in_(_forms(user_name)))
    schedules = delete(ScheduleRow).where(ScheduleRow.creator.in_(_forms(user_name)))
    jobs = delete(MemoryJobRow).where(MemoryJobRow.user_id == user_id)
    pushes = delete(PushConfigRow).where(PushConfigRow.creator.in_(_forms(user_name)))
    calls = delete(CallRow).where(CallRow.user_id == user_id)
    if scope:
        sessions = sessions.where(VoiceSessionRow.workspace_id.in_(scope))
        schedules = schedules.where(ScheduleRow.workspace_id.in_(scope))
        jobs = jobs.where(MemoryJobRow.workspace_id.in_(scope))
        pushes = pushes.where(PushConfigRow.workspace_id.in_(scope))
        calls = calls.where(CallRow.workspace_id.in_(scope))
    db.execute(delete(VoiceTurnRow).where(VoiceTurnRow.session_id.in_(sessions)))
    db.execute(delete(VoiceSessionRow).where(VoiceSessionRow.id.in_(sessions)))
    db.execute(schedules)
    db.execute(jobs)
    db.execute(pushes)
    db.execute(calls)
    if not scope:
        # Keys are "<user>/<method>/<request_id>" (``platform/store/storage.py``): they
        # name no workspace, so only a whole account's erasure removes them.
        db.execute(delete(IdempotencyRow).where(IdempotencyRow.key.startswith(f"{user_id}/")))


def _forms(user_name: str) -> tuple[str, str]:
    """A creator column holds ``users/{id}`` or the bare id, by table: both match."""
    return user_name, user_name.removeprefix("users/")
