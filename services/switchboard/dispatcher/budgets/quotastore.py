"""A workspace's quotas and its active runs: SQL only, plain records out.

The quota is stored as its serialized ``WorkspaceQuota`` (``data``, built and
read by ``quotas.py``; this module never parses it) with a ``version`` for the
etag. A workspace without a row has the server's defaults, at version 0, so an
etag read before the first change still guards it.

Active runs are counted in ``runs`` over ``ix_runs_quota`` (workspace, state,
API key): one indexed count per admitted message, whichever replica holds the
runs.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeVar

from sqlalchemy import case, func, literal, select
from sqlalchemy.orm import Session

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.platform.errors import EtagMismatch, NotFound
from switchboard.platform.store.db import Database
from switchboard.platform.store.models import RunRow, WorkspaceQuotaRow, WorkspaceRow
from switchboard.platform.store.storage import transaction
from switchboard.platform.values.names import etag_version, now
from switchboard.platform.values.resources import WorkspaceName

log = logging.getLogger("switchboard.dispatcher.budgets.quotastore")

_T = TypeVar("_T")
#: What a concurrent-run quota counts: queued and running. A paused run
#: (REQUIRES_ACTION) holds no worker and waits for a person, bounded by the
#: approval timeout; counting it would let pending approvals lock a workspace out.
COUNTED: Final = (pb.RUN_STATE_QUEUED, pb.RUN_STATE_RUNNING)


@dataclass(frozen=True)
class QuotaRecord:
    """A workspace's stored quota; ``data`` is None while it has the defaults."""

    workspace_id: str
    data: bytes | None
    version: int
    updated_at: dt.datetime | None


@dataclass(frozen=True)
class ActiveRuns:
    """Queued and running runs of a workspace, and of those the ones of one API key."""

    workspace: int
    api_key: int


def _record(workspace_id: str, row: WorkspaceQuotaRow | None) -> QuotaRecord:
    if row is None:
        return QuotaRecord(workspace_id, None, 0, None)
    return QuotaRecord(workspace_id, row.data, row.version, row.updated_at)


class QuotaStore:
    def __init__(self, database: Database) -> None:
        self._database = database
        self._sqlite = database.dialect_name == "sqlite"

    async def _run(self, work: Callable[[Session], _T], *, write: bool) -> _T:
        return await transaction(self._database, work, write=write, log=log)

    async def get(self, workspace_id: str) -> QuotaRecord:
        def tx(db: Session) -> QuotaRecord:
            return _record(workspace_id, db.get(WorkspaceQuotaRow, workspace_id))

        return await self._run(tx, write=False)

    async def update(
        self, workspace_id: str, etag: str, edit: Callable[[bytes | None], bytes]
    ) -> QuotaRecord:
        """Replace the quota with ``edit(stored data or None)`` and bump the version.

        EtagMismatch if ``etag`` is set and names another version; NotFound if
        the workspace is gone. The first change inserts the row: the workspace's
        row is locked first on PostgreSQL, so two first changes cannot both
        insert (SQLite serializes writers).
        """

        def tx(db: Session) -> QuotaRecord:
            if not self._sqlite:
                locked = db.execute(
                    select(WorkspaceRow.id).where(WorkspaceRow.id == workspace_id).with_for_update()
                ).first()
                if locked is None:
                    raise NotFound(f"{WorkspaceName(workspace_id)} not found")
            elif db.get(WorkspaceRow, workspace_id) is None:
                raise NotFound(f"{WorkspaceName(workspace_id)} not found")
            row = db.get(WorkspaceQuotaRow, workspace_id, with_for_update=True)
            version = row.version if row is not None else 0
            if etag and etag_version(etag) != version:
                raise EtagMismatch("the quota changed since the etag was read; read it again")
            stamp = now()
            if row is None:
                row = WorkspaceQuotaRow(
                    workspace_id=workspace_id, data=edit(None), updated_at=stamp, version=1
                )
                db.add(row)
            else:
                row.data = edit(row.data)
                row.version += 1
                row.updated_at = stamp
            db.flush()
            return _record(workspace_id, row)

        return await self._run(tx, write=True)

    async def active_runs(self, workspace_id: str, api_key_id: str) -> ActiveRuns:
        """The workspace's queued and running runs, and those started with ``api_key_id``
        (0 for ""): one count over ``ix_runs_quota``."""

        def tx(db: Session) -> ActiveRuns:
            by_key = (
                func.coalesce(func.sum(case((RunRow.api_key_id == api_key_id, 1), else_=0)), 0)
                if api_key_id
                else literal(0)
            )
            total, keyed = db.execute(
                select(func.count(), by_key).where(
                    RunRow.workspace_id == workspace_id, RunRow.state.in_(COUNTED)
                )
            ).one()
            return ActiveRuns(int(total), int(keyed))

        return await self._run(tx, write=False)
