"""Which assistant holds a conversation after a handoff (``conversation_holders``).

A run's ``transfer_to_...`` call (``runs/delegation/handoffs.py``) writes the row; admission
reads it for a message that names no assistant, forces no handler and picks none
itself (``runs/intake/screening.py``'s ``route``), before the workspace's default.
Plain values out; no ORM row leaves this module.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import delete
from sqlalchemy.orm import Session

from switchboard.platform.store.db import Database
from switchboard.platform.store.models import ConversationHolderRow
from switchboard.platform.store.storage import retrying, transaction
from switchboard.platform.values.names import now

log = logging.getLogger("switchboard.dispatcher.assistants.holders")

_T = TypeVar("_T")


@dataclass(frozen=True)
class Holder:
    assistant_id: str
    run_id: str
    reason: str
    #: The holder sees only what came from the handoff (``since``) on.
    since_handoff: bool = False
    #: When the conversation was handed over (set when read).
    since: dt.datetime | None = None


class HolderStore:
    def __init__(self, database: Database) -> None:
        self._database = database

    async def _run(self, work: Callable[[Session], _T], *, write: bool) -> _T:
        return await transaction(self._database, work, write=write, log=log)

    async def get(self, conversation_id: str) -> Holder | None:
        def work(db: Session) -> Holder | None:
            row = db.get(ConversationHolderRow, conversation_id)
            if row is None:
                return None
            return Holder(
                row.assistant_id, row.run_id, row.reason, row.since_handoff, row.updated_at
            )

        return await self._run(work, write=False)

    async def hand_over(self, workspace_id: str, conversation_id: str, holder: Holder) -> None:
        """``holder`` holds the conversation from now on (replacing any other)."""

        def work(db: Session) -> None:
            db.execute(
                delete(ConversationHolderRow).where(
                    ConversationHolderRow.conversation_id == conversation_id
                )
            )
            db.add(
                ConversationHolderRow(
                    conversation_id=conversation_id,
                    workspace_id=workspace_id,
                    assistant_id=holder.assistant_id,
                    run_id=holder.run_id,
                    reason=holder.reason,
                    since_handoff=holder.since_handoff,
                    updated_at=now(),
                )
            )

        await retrying(lambda: self._run(work, write=True))
