"""The ``push_configs`` table: A2A push configs, per-task webhook endpoints.

A push config is an endpoint of the webhook engine (``integration/webhooks/delivery.py``)
like a webhook integration: its deliveries are ``webhook_deliveries`` rows keyed
by its ``endpoint_id``, fed from the event log and sent by the same feeder and
sender. The front door (``configs.py``) writes configs through this store
wherever it runs (every process has the database); the engine delivers them,
and through ``delivery.py`` disables and prunes them. This store owns the SQL
only: ``configs.py`` decides who may do what and what a config means, the
engine what a delivery is.

A config is created in two steps so that the task's status so far goes out
first and nothing later overtakes it: ``create`` stores it (not ``ready``:
the feeder already records the task's changes for it, the sender does not
send them), then ``ready`` records what happened to the task before (its
earlier status changes, as deliveries ordered by the task's own sequence)
and lets the sender start, in one transaction.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

from sqlalchemy import and_, delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from switchboard.api.integration.v1 import integration_pb2
from switchboard.platform.store.db import Database
from switchboard.platform.store.models import PushConfigRow, WebhookDeliveryRow
from switchboard.platform.store.storage import transaction
from switchboard.platform.values.names import new_id, now

log = logging.getLogger("switchboard.a2a.push")

_T = TypeVar("_T")

PENDING: Final = integration_pb2.DELIVERY_STATE_PENDING
#: Push configs' endpoint ids: a ``.`` never appears in an integration id (``names.ID``).
ENDPOINT_PREFIX: Final = "push."


def is_push_endpoint(endpoint_id: str) -> bool:
    return endpoint_id.startswith(ENDPOINT_PREFIX)


@dataclass(frozen=True)
class PushConfig:
    """A stored config, its secrets still sealed."""

    workspace_id: str
    endpoint_id: str
    conversation_id: str
    run_id: str
    config_id: str
    url: str
    token: bytes | None
    auth_scheme: str
    credentials: bytes | None
    created_at: dt.datetime
    ready: bool
    disabled: bool


@dataclass(frozen=True)
class Backfill:
    """A status change of the task from before the config was ready, to deliver first."""

    #: The task's (run's) update sequence: deliveries of one config go out in this order.
    sequence: int
    event_id: str
    data: bytes
    final: bool


def _config(row: PushConfigRow) -> PushConfig:
    return PushConfig(
        workspace_id=row.workspace_id,
        endpoint_id=row.endpoint_id,
        conversation_id=row.conversation_id,
        run_id=row.run_id,
        config_id=row.config_id,
        url=row.url,
        token=row.token,
        auth_scheme=row.auth_scheme,
        credentials=row.credentials,
        created_at=row.created_at,
        ready=row.ready,
        disabled=row.disabled,
    )


def _task(workspace_id: str, conversation_id: str, run_id: str) -> ColumnElement[bool]:
    return and_(
        PushConfigRow.workspace_id == workspace_id,
        PushConfigRow.conversation_id == conversation_id,
        PushConfigRow.run_id == run_id,
    )


class PushStore:
    """The ``push_configs`` table of one database (and its configs' deliveries)."""

    def __init__(self, database: Database) -> None:
        self._database = database
        self._sqlite = database.dialect_name == "sqlite"

    async def _run(self, work: Callable[[Session], _T], *, write: bool) -> _T:
        return await transaction(self._database, work, write=write, log=log)

    @staticmethod
    def new_endpoint_id() -> str:
        return f"{ENDPOINT_PREFIX}{new_id()}"

    async def create(
        self,
        workspace_id: str,
        conversation_id: str,
        run_id: str,
        config_id: str,
        *,
        endpoint_id: str,
        url: str,
        token: bytes | None,
        auth_scheme: str,
        credentials: bytes | None,
        creator: str,
        limit: int,
    ) -> PushConfig | str:
        """Store a config (not ready); the reason as text when it cannot be.

        ``"exists"`` when the task has a config of that id, ``"limit"`` when it
        has ``limit`` already.
        """

        def work(db: Session) -> PushConfig | str:
            task = _task(workspace_id, conversation_id, run_id)
            taken = db.scalar(
                select(PushConfigRow.endpoint_id).where(task, PushConfigRow.config_id == config_id)
            )
            if taken is not None:
                return "exists"
            count = db.scalar(select(func.count()).select_from(PushConfigRow).where(task)) or 0
            if count >= limit:
                return "limit"
            row = PushConfigRow(
                workspace_id=workspace_id,
                endpoint_id=endpoint_id,
                conversation_id=conversation_id,
                run_id=run_id,
                config_id=config_id,
                url=url,
                token=token,
                auth_scheme=auth_scheme,
                credentials=credentials,
                creator=creator,
                created_at=now(),
                ready=False,
                disabled=False,
            )
            db.add(row)
            db.flush()
            return _config(row)

        return await self._run(work, write=True)

    async def ready(self, workspace_id: str, endpoint_id: str, earlier: Sequence[Backfill]) -> bool:
        """Record the task's ``earlier`` changes for the config and let its deliveries go.

        A change the feeder recorded meanwhile is not recorded twice (the
        endpoint's event ids are the task's sequences). False if the config is
        gone (deleted meanwhile).
        """

        def work(db: Session) -> bool:
            row = db.get(PushConfigRow, (workspace_id, endpoint_id), with_for_update=True)
            if row is None:
                return False
            current = now()
            if earlier:
                insert = sqlite_insert if self._sqlite else pg_insert
                db.execute(
                    insert(WebhookDeliveryRow)
                    .values(
                        [
                            {
                                "id": new_id(),
                                "workspace_id": workspace_id,
                                "integration_id": endpoint_id,
                                "seq": item.sequence,
                                "event_id": item.event_id,
                                "event_type": "RUN_UPDATED",
                                "data": item.data,
                                "state": PENDING,
                                "attempts": 0,
                                "last_http_status": 0,
                                "last_error": "",
                                "created_at": current,
                                "next_attempt_at": current,
                                "claimed_by": "",
                            }
                            for item in earlier
                        ]
                    )
                    .on_conflict_do_nothing(
                        index_elements=[
                            WebhookDeliveryRow.workspace_id,
                            WebhookDeliveryRow.integration_id,
                            WebhookDeliveryRow.event_id,
                        ]
                    )
                )
                if any(item.final for item in earlier) and row.ended_at is None:
                    row.ended_at = current
            row.ready = True
            return True

        return await self._run(work, write=True)

    async def get(
        self, workspace_id: str, conversation_id: str, run_id: str, config_id: str
    ) -> PushConfig | None:
        """The task's ready config ``config_id``, if any."""

        def work(db: Session) -> PushConfig | None:
            row = db.scalar(
                select(PushConfigRow).where(
                    _task(workspace_id, conversation_id, run_id),
                    PushConfigRow.config_id == config_id,
                    PushConfigRow.ready.is_(True),
                )
            )
            return _config(row) if row is not None else None

        return await self._run(work, write=False)

    async def page(
        self, workspace_id: str, conversation_id: str, run_id: str, size: int, after: str
    ) -> list[PushConfig]:
        """Up to ``size`` of the task's ready configs, by config id, after ``after``."""

        def work(db: Session) -> list[PushConfig]:
            query = select(PushConfigRow).where(
                _task(workspace_id, conversation_id, run_id), PushConfigRow.ready.is_(True)
            )
            if after:
                query = query.where(PushConfigRow.config_id > after)
            rows = db.scalars(query.order_by(PushConfigRow.config_id).limit(size))
            return [_config(row) for row in rows]

        return await self._run(work, write=False)

    async def delete(
        self, workspace_id: str, conversation_id: str, run_id: str, config_id: str
    ) -> bool:
        """Delete the config and its deliveries (nothing pending goes out); False if none."""

        def work(db: Session) -> bool:
            endpoint = db.scalar(
                select(PushConfigRow.endpoint_id).where(
                    _task(workspace_id, conversation_id, run_id),
                    PushConfigRow.config_id == config_id,
                )
            )
            if endpoint is None:
                return False
            _forget(db, workspace_id, [endpoint])
            return True

        return await self._run(work, write=True)

    async def discard(self, workspace_id: str, endpoint_id: str) -> None:
        """Delete a config whose creation did not complete."""

        def work(db: Session) -> None:
            _forget(db, workspace_id, [endpoint_id])

        await self._run(work, write=True)

    async def disable(self, workspace_id: str, endpoint_id: str) -> None:
        """Stop delivering to a config that kept failing (the engine fails what waits)."""

        def work(db: Session) -> None:
            db.execute(
                update(PushConfigRow)
                .where(
                    PushConfigRow.workspace_id == workspace_id,
                    PushConfigRow.endpoint_id == endpoint_id,
                )
                .values(disabled=True)
            )

        await self._run(work, write=True)

    async def prune(
        self, ended_before: dt.datetime, created_before: dt.datetime, abandoned_before: dt.datetime
    ) -> int:
        """Delete configs (and their deliveries) whose task ended before ``ended_before``,
        created before ``created_before`` whatever their task, or never made ready
        (their creation failed) before ``abandoned_before``."""

        def work(db: Session) -> int:
            rows = db.execute(
                select(PushConfigRow.workspace_id, PushConfigRow.endpoint_id)
                .where(
                    (PushConfigRow.ended_at < ended_before)
                    | (PushConfigRow.created_at < created_before)
                    | (
                        PushConfigRow.ready.is_(False)
                        & (PushConfigRow.created_at < abandoned_before)
                    )
                )
                .limit(500)
            ).all()
            by_workspace: dict[str, list[str]] = {}
            for workspace_id, endpoint_id in rows:
                by_workspace.setdefault(workspace_id, []).append(endpoint_id)
            for workspace_id, endpoints in by_workspace.items():
                _forget(db, workspace_id, endpoints)
            return len(rows)

        return await self._run(work, write=True)


def _forget(db: Session, workspace_id: str, endpoint_ids: Sequence[str]) -> None:
    db.execute(
        delete(WebhookDeliveryRow)
        .where(
            WebhookDeliveryRow.workspace_id == workspace_id,
            WebhookDeliveryRow.integration_id.in_(endpoint_ids),
        )
        .execution_options(synchronize_session=False)
    )
    db.execute(
        delete(PushConfigRow)
        .where(
            PushConfigRow.workspace_id == workspace_id,
            PushConfigRow.endpoint_id.in_(endpoint_ids),
        )
        .execution_options(synchronize_session=False)
    )
