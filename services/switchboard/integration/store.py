"""The integrations table: SQL, idempotency, quotas and etags; plain records out.

No ORM row leaves this module (``IntegrationRecord`` is a frozen copy), and
nothing here builds a resource name for a client or raises a request-field
error: the service does both. Writes stage their events (``platform/store/outbox.py``)
in the same transaction, so every committed change has its INTEGRATION_CHANGED.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.orm import Session

from switchboard.platform.errors import AlreadyExists, NotFound, QuotaExceeded
from switchboard.platform.store.db import Database
from switchboard.platform.store.models import IntegrationRow, WebhookDeliveryRow, WorkspaceRow
from switchboard.platform.store.outbox import Staged, staging
from switchboard.platform.store.storage import Idempotency, check_etag, claim, retrying, transaction
from switchboard.platform.values.names import now

log = logging.getLogger("switchboard.integration.store")

_T = TypeVar("_T")


@dataclass(frozen=True)
class IntegrationRecord:
    """One integration as stored. ``credential`` is sealed (never plaintext here)."""

    workspace_id: str
    id: str
    kind: int
    display_name: str
    endpoint: str
    call_timeout_ms: int
    config: bytes
    event_types: tuple[str, ...]
    credential: bytes | None
    previous_credential: bytes | None
    previous_until: dt.datetime | None
    disabled: bool
    creator: str
    created_at: dt.datetime
    updated_at: dt.datetime
    version: int
    health: int
    health_since: dt.datetime | None
    last_probe_at: dt.datetime | None
    last_error: bytes
    failures: int
    #: A tool call's price (micro-units) unless ``tool_call_prices`` names the tool.
    call_price_micros: int = 0
    #: ``(segment, price)`` by segment, sorted: the per-tool overrides.
    tool_call_prices: tuple[tuple[str, int], ...] = ()
    #: Every tool may be sent again after a crash left a call in flight.
    retry_safe: bool = False
    #: Segments of single tools that may (as given, no duplicates).
    retry_safe_tools: tuple[str, ...] = ()


@dataclass(frozen=True)
class Health:
    """A probe's verdict, as the prober writes it."""

    health: int
    last_error: bytes
    failures: int
    probed_at: dt.datetime


def _record(row: IntegrationRow) -> IntegrationRecord:
    return IntegrationRecord(
        workspace_id=row.workspace_id,
        id=row.id,
        kind=row.kind,
        display_name=row.display_name,
        endpoint=row.endpoint,
        call_timeout_ms=row.call_timeout_ms,
        config=row.config,
        event_types=tuple(row.event_types.split()),
        credential=row.credential,
        previous_credential=row.previous_credential,
        previous_until=row.previous_until,
        disabled=row.disabled,
        creator=row.creator,
        created_at=row.created_at,
        updated_at=row.updated_at,
        version=row.version,
        health=row.health,
        health_since=row.health_since,
        last_probe_at=row.last_probe_at,
        last_error=row.last_error,
        failures=row.failures,
        call_price_micros=row.call_price_micros,
        tool_call_prices=_prices(row.tool_call_prices),
        retry_safe=row.retry_safe,
        retry_safe_tools=tuple(row.retry_safe_tools.split()),
    )


def _prices(text: str) -> tuple[tuple[str, int], ...]:
    """The stored JSON object of per-tool prices, as sorted pairs."""
    if not text:
        return ()
    data = json.loads(text)
    return tuple(sorted((str(tool), int(price)) for tool, price in data.items()))


def _columns(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with the per-tool prices (a mapping) as their column's JSON text,
    and the retry-safe tools (segments) as theirs, space-separated."""
    columns = dict(values)
    if "retry_safe_tools" in columns:
        columns["retry_safe_tools"] = " ".join(columns["retry_safe_tools"])
    if "tool_call_prices" in columns:
        prices = dict(columns["tool_call_prices"])
        columns["tool_call_prices"] = (
            json.dumps(prices, sort_keys=True, separators=(",", ":")) if prices else ""
        )
    return columns


#: Columns an update may set (the service decides which from the update mask).
MUTABLE = frozenset(
    {
        "display_name",
        "endpoint",
        "call_timeout_ms",
        "config",
        "event_types",
        "credential",
        "previous_credential",
        "previous_until",
        "disabled",
        "call_price_micros",
        "tool_call_prices",
        "retry_safe",
        "retry_safe_tools",
    }
)


class IntegrationStore:
    def __init__(self, database: Database) -> None:
        self._database = database
        self._sqlite = database.dialect_name == "sqlite"

    async def _run(self, work: Callable[[Session], _T], *, write: bool) -> _T:
        return await transaction(self._database, work, write=write, log=log)

    async def create(
        self,
        values: Mapping[str, Any],
        idempotency: Idempotency | None,
        max_per_workspace: int,
        staged: Staged[tuple[IntegrationRecord, bool]] | None,
    ) -> tuple[IntegrationRecord, bool]:
        """Insert (workspace_id, id, ...); (record, False) for a retry of an earlier create."""
        workspace_id, integration_id = values["workspace_id"], values["id"]

        def tx(db: Session) -> tuple[IntegrationRecord, bool]:
            earlier = claim(db, idempotency, f"{workspace_id}/{integration_id}")
            if earlier is not None:
                found_ws, _, found_id = earlier.partition("/")
                row = db.get(IntegrationRow, (found_ws, found_id))
                if row is None:
                    raise NotFound("the integration this request created was deleted")
                return _record(row), False
            # Serializes creates in one workspace on PostgreSQL, so the quota
            # holds under concurrency (SQLite writers are serialized already).
            if not self._sqlite:
                db.execute(
                    select(WorkspaceRow.id).where(WorkspaceRow.id == workspace_id).with_for_update()
                )
            count = db.execute(
                select(func.count())
                .select_from(IntegrationRow)
                .where(IntegrationRow.workspace_id == workspace_id)
            ).scalar_one()
            if count >= max_per_workspace:
                raise QuotaExceeded(
                    f"a workspace may hold at most {max_per_workspace} integrations",
                    subject="integrations per workspace",
                )
            if db.get(IntegrationRow, (workspace_id, integration_id)) is not None:
                raise AlreadyExists(
                    f"workspaces/{workspace_id}/integrations/{integration_id} already exists"
                )
            stamp = now()
            row = IntegrationRow(
                **_columns(values),
                created_at=stamp,
                updated_at=stamp,
                version=1,
                health=0,
                health_since=stamp,
                last_probe_at=None,
                last_error=b"",
                failures=0,
            )
            db.add(row)
            db.flush()
            return _record(row), True

        async def run() -> tuple[IntegrationRecord, bool]:
            return await self._run(staging(staged, tx), write=True)

        return await retrying(run)

    async def get(self, workspace_id: str, integration_id: str) -> IntegrationRecord | None:
        def tx(db: Session) -> IntegrationRecord | None:
            row = db.get(IntegrationRow, (workspace_id, integration_id))
            return _record(row) if row is not None else None

        return await self._run(tx, write=False)

    async def page(
        self, workspace_id: str, after: tuple[dt.datetime, str] | None, limit: int
    ) -> list[IntegrationRecord]:
        """Oldest first, keyset-paged by (created_at, id)."""

        def tx(db: Session) -> list[IntegrationRecord]:
            query = select(IntegrationRow).where(IntegrationRow.workspace_id == workspace_id)
            if after is not None:
                stamp, last = after
                query = query.where(
                    or_(
                        IntegrationRow.created_at > stamp,
                        and_(IntegrationRow.created_at == stamp, IntegrationRow.id > last),
                    )
                )
            query = query.order_by(IntegrationRow.created_at, IntegrationRow.id).limit(limit)
            return [_record(row) for row in db.execute(query).scalars()]

        return await self._run(tx, write=False)

    async def active(self, kinds: Sequence[int] = ()) -> list[IntegrationRecord]:
        """Every enabled integration (of ``kinds``, if given), for the prober and the feeders."""

        def tx(db: Session) -> list[IntegrationRecord]:
            query = select(IntegrationRow).where(IntegrationRow.disabled.is_(False))
            if kinds:
                query = query.where(IntegrationRow.kind.in_(list(kinds)))
            return [_record(row) for row in db.execute(query).scalars()]

        return await self._run(tx, write=False)

    async def update(
        self,
        workspace_id: str,
        integration_id: str,
        etag: str,
        changes: Mapping[str, Any] | Callable[[IntegrationRecord], Mapping[str, Any]],
        staged: Staged[IntegrationRecord] | None,
    ) -> IntegrationRecord:
        """Apply ``changes`` (or what ``changes(current)`` returns) and bump the version."""

        def tx(db: Session) -> IntegrationRecord:
            row = db.get(IntegrationRow, (workspace_id, integration_id), with_for_update=True)
            if row is None:
                raise NotFound(f"workspaces/{workspace_id}/integrations/{integration_id} not found")
            check_etag(etag, row.version, "integration")
            values = changes(_record(row)) if callable(changes) else changes
            unknown = set(values) - MUTABLE
            if unknown:
                raise ValueError(f"not updatable: {sorted(unknown)}")
            for key, value in _columns(values).items():
                setattr(row, key, value)
            if "endpoint" in values or "disabled" in values:
                # A new address (or a re-enabled one) has not been probed yet.
                row.health = 0
                row.health_since = now()
                row.failures = 0
                row.last_error = b""
            row.version += 1
            row.updated_at = now()
            db.flush()
            return _record(row)

        return await self._run(staging(staged, tx), write=True)

    async def delete(
        self,
        workspace_id: str,
        integration_id: str,
        etag: str,
        staged: Staged[IntegrationRecord] | None,
    ) -> IntegrationRecord:
        def tx(db: Session) -> IntegrationRecord:
            row = db.get(IntegrationRow, (workspace_id, integration_id), with_for_update=True)
            if row is None:
                raise NotFound(f"workspaces/{workspace_id}/integrations/{integration_id} not found")
            check_etag(etag, row.version, "integration")
            record = _record(row)
            # Deliveries are no foreign key's to cascade (a push config's are in
            # the same table, models.WebhookDeliveryRow).
            db.execute(
                delete(WebhookDeliveryRow)
                .where(
                    WebhookDeliveryRow.workspace_id == workspace_id,
                    WebhookDeliveryRow.integration_id == integration_id,
                )
                .execution_options(synchronize_session=False)
            )
            db.execute(
                delete(IntegrationRow).where(
                    IntegrationRow.workspace_id == workspace_id,
                    IntegrationRow.id == integration_id,
                )
            )
            return record

        return await self._run(staging(staged, tx), write=True)

    async def record_health(
        self,
        workspace_id: str,
        integration_id: str,
        version: int,
        health: Health,
        staged: Staged[IntegrationRecord | None] | None,
    ) -> IntegrationRecord | None:
        """Store a probe's verdict if the health changed; None if nothing changed.

        Only for the ``version`` probed: a probe of an address the owner has
        since changed says nothing about the new one. The etag does not change:
        status is not configuration.
        """

        def tx(db: Session) -> IntegrationRecord | None:
            row = db.get(IntegrationRow, (workspace_id, integration_id))
            if row is None or row.version != version:
                return None
            if row.health == health.health and row.failures == health.failures:
                # Unchanged: not even the probe time is written (one write per change).
                return None
            if row.health != health.health:
                row.health_since = health.probed_at
            row.health = health.health
            row.failures = health.failures
            row.last_error = health.last_error
            row.last_probe_at = health.probed_at
            db.flush()
            return _record(row)

        return await self._run(staging(staged, tx), write=True)

    async def disable(
        self,
        workspace_id: str,
        integration_id: str,
        last_error: bytes,
        staged: Staged[IntegrationRecord | None] | None,
    ) -> IntegrationRecord | None:
        """Disable an integration on the server's own decision (a webhook failing for long)."""

        def tx(db: Session) -> IntegrationRecord | None:
            result = db.execute(
                update(IntegrationRow)
                .where(
                    IntegrationRow.workspace_id == workspace_id,
                    IntegrationRow.id == integration_id,
                    IntegrationRow.disabled.is_(False),
                )
                .values(
                    disabled=True,
                    version=IntegrationRow.version + 1,
                    updated_at=now(),
                    last_error=last_error,
                )
            )
            if not getattr(result, "rowcount", 0):
                return None
            row = db.get(IntegrationRow, (workspace_id, integration_id), populate_existing=True)
            return _record(row) if row is not None else None

        return await self._run(staging(staged, tx), write=True)
