"""The integration hub's part of an erasure (docs/privacy.md,
``platform/events/erasure/worker.py``): webhook deliveries not sent yet or kept after sending
whose event names the erased person or what their erasure removed are deleted (a
delivery is a copy of an event). Runs after the context and dispatcher parts, whose
removed names it reads. Idempotent.
"""

from __future__ import annotations

import logging
from typing import Final

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from switchboard.api.events.v1 import events_pb2
from switchboard.platform.events.erasure.redaction import Redaction
from switchboard.platform.events.erasure.store import ErasureRecord, ErasureStore
from switchboard.platform.store.db import Database
from switchboard.platform.store.models import WebhookDeliveryRow
from switchboard.platform.store.storage import transaction

log = logging.getLogger(__name__)

_BATCH: Final = 500


class IntegrationEraser:
    def __init__(self, database: Database, erasures: ErasureStore) -> None:
        self._database = database
        self._erasures = erasures

    async def __call__(self, erasure: ErasureRecord) -> None:
        redaction = Redaction(
            erasure.user_id, await self._erasures.names(erasure.id), erasure.workspaces
        )
        after = ""
        while True:

            def work(db: Session, after: str = after) -> str | None:
                query = select(WebhookDeliveryRow.id, WebhookDeliveryRow.data).where(
                    WebhookDeliveryRow.id > after
                )
                if erasure.workspaces:
                    query = query.where(
                        WebhookDeliveryRow.workspace_id.in_(list(erasure.workspaces))
                    )
                rows = db.execute(query.order_by(WebhookDeliveryRow.id).limit(_BATCH)).all()
                doomed = [delivery for delivery, data in rows if _names(redaction, data)]
                if doomed:
                    db.execute(delete(WebhookDeliveryRow).where(WebhookDeliveryRow.id.in_(doomed)))
                return rows[-1][0] if len(rows) == _BATCH else None

            last = await transaction(self._database, work, write=True, log=log)
            if last is None:
                return
            after = last


def _names(redaction: Redaction, data: bytes) -> bool:
    try:
        event = events_pb2.Event.FromString(data)
    except Exception:  # noqa: BLE001 - not an event: judged by its bytes alone
        event = events_pb2.Event()
    return redaction.concerns(event, data)
