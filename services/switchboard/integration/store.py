"""The integrations table: SQL, idempotency, quotas and etags; plain records out.

No ORM row leaves this module (``IntegrationRecord`` is a frozen copy), and
nothing here builds a resource name for a client or raises a request-field
error: the service does both. Writes stage their events (``platform/store/outbox.py``)
in the same transaction, so every committed change has its INTEGRATION_CHANGED.
What every workspace's keyed records share (the key, the quota, etags, pages,
the delete) is ``platform/store/keyed.py``'s; integrations list oldest first.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from switchboard.platform.store.keyed import BY_CREATION, Created, KeyedStore, Table
from switchboard.platform.store.models import IntegrationRow, WebhookDeliveryRow
from switchboard.platform.store.outbox import Staged, staging
from switchboard.platform.store.storage import Idempotency
from switchboard.platform.values.names import now


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


#: Deliveries are no foreign key's to cascade (a push config's are in the same
#: table, ``models.WebhookDeliveryRow``).
INTEGRATIONS: Final = Table(
    IntegrationRow,
    _record,
    noun="integration",
    plural="integrations",
    order=BY_CREATION,
    dependents=((WebhookDeliveryRow, "integration_id"),),
)


class IntegrationStore(KeyedStore[IntegrationRow, IntegrationRecord, tuple[dt.datetime, str]]):
    table = INTEGRATIONS

    async def create(
        self,
        values: Mapping[str, Any],
        idempotency: Idempotency | None,
        max_per_workspace: int,
        staged: Staged[Created[IntegrationRecord]] | None,
    ) -> Created[IntegrationRecord]:
        """Insert (workspace_id, id, ...), not probed yet, at version 1 (``_create``)."""

        def row() -> IntegrationRow:
            stamp = now()
            return IntegrationRow(
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

        return await self._create(
            values["workspace_id"], values["id"], row, idempotency, max_per_workspace, staged
        )

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
        staged: Staged[IntegrationRecord | None] | None,
    ) -> IntegrationRecord | None:
        """Apply ``changes`` (or what ``changes(current)`` returns) and bump the version;
        None if missing."""

        def change(db: Session, row: IntegrationRow) -> IntegrationRecord:
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
            return self._bumped(db, row)

        return await self._update(workspace_id, integration_id, etag, change, staged)

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
            if (
                row.health == health.health
                and row.failures == health.failures
                and row.last_error == health.last_error
            ):
                # Unchanged: not even the probe time is written (one write per change). A
                # healthy row still holding an old failure (kept by earlier versions) is
                # written once, to clear it.
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
