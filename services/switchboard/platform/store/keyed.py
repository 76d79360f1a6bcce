"""The records a workspace keeps by id: one store and one catalog step for all of them.

Budgets, schedules, assistants and integrations are each a table keyed by
``(workspace_id, id)`` with ``version`` (the etag), ``created_at`` and
``updated_at``, and the same things happen to each: a create under an
idempotency key and a per-workspace quota, get, a page with a signed token,
an update or delete of the locked row checked against an etag, and the
change's event staged (``outbox.py``) in the same transaction. ``KeyedStore``
does those on the table a ``Table`` describes; ``Catalog`` does what the
domain does around them (the page token, NOT_FOUND and ALREADY_EXISTS naming
the resource, publishing the staged events).

What differs stays in each resource's own store and domain, in code: the
columns a create inserts and an update changes (``_create``, ``_insert`` and
``_update`` take them as functions), the rows deleted with a resource
(``Table.dependents``), how a list is sorted (``Table.order``), and the
validation a domain runs before any of this (and inside an update, where it
needs the stored row).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, Protocol, TypeVar

from sqlalchemy import ColumnElement, and_, delete, func, or_, select
from sqlalchemy.orm import Session

from switchboard.api.events.v1 import events_pb2
from switchboard.platform.errors import AlreadyExists, NotFound, QuotaExceeded
from switchboard.platform.store import pagination
from switchboard.platform.store.db import Database
from switchboard.platform.store.models import Base, WorkspaceRow
from switchboard.platform.store.outbox import Outbox, Staged, staging
from switchboard.platform.store.storage import (
    Idempotency,
    check_etag,
    claim,
    earlier,
    retrying,
    transaction,
)
from switchboard.platform.values.names import now
from switchboard.platform.values.resources import WorkspaceName


class Stored(Protocol):
    """What every record of a keyed table shows (frozen dataclasses: read-only)."""

    @property
    def workspace_id(self) -> str: ...

    @property
    def id(self) -> str: ...

    @property
    def created_at(self) -> dt.datetime: ...


class Fresh(Protocol):
    """A create's result: False for the replay of an earlier create (nothing written)."""

    @property
    def fresh(self) -> bool: ...


_Row = TypeVar("_Row", bound=Base)
_Record = TypeVar("_Record", bound=Stored)
_After = TypeVar("_After")
_Result = TypeVar("_Result")
_Made = TypeVar("_Made", bound=Fresh)
_Done = TypeVar("_Done")


class IdTaken(Exception):
    """The id is in use in the workspace (``Catalog.created`` tells the client, with the name)."""


@dataclass(frozen=True)
class Created(Generic[_Record]):
    record: _Record
    #: False when a create was the retry of an earlier one (nothing was written).
    fresh: bool = True


class Order(Protocol[_After]):
    """How a table's list is sorted, and what its page token keeps of the last row:
    the token's key is the sort key, so a page starts strictly after the last row seen."""

    @property
    def shape(self) -> tuple[pagination.Part, ...]:
        """The parts of a token's key (``PageTokens.decode`` checks them)."""
        ...

    def after(self, key: list[str | int]) -> _After:
        """The sort key a token's decoded key names."""
        ...

    def key(self, record: Stored) -> list[str | int]:
        """The token key of ``record`` (the last row of a page)."""
        ...

    def where(self, row: Any, after: _After) -> ColumnElement[bool]:
        """The rows of the table ``row`` that sort after ``after``."""
        ...

    def columns(self, row: Any) -> tuple[Any, ...]:
        """The columns of ``row`` the list is sorted by."""
        ...


class ById:
    """By id: budgets, schedules and assistants list in the order of their ids."""

    @property
    def shape(self) -> tuple[pagination.Part, ...]:
        return (pagination.ID,)

    def after(self, key: list[str | int]) -> str:
        (last,) = key
        return str(last)

    def key(self, record: Stored) -> list[str | int]:
        return [record.id]

    def where(self, row: Any, after: str) -> ColumnElement[bool]:
        clause: ColumnElement[bool] = row.id > after
        return clause

    def columns(self, row: Any) -> tuple[Any, ...]:
        return (row.id,)


class ByCreation:
    """Oldest first, by (created_at, id): integrations list in the order they were made;
    or newest first (``newest_first``): a workspace's calls."""

    def __init__(self, *, newest_first: bool = False) -> None:
        self._newest_first = newest_first

    @property
    def shape(self) -> tuple[pagination.Part, ...]:
        return (pagination.MICROS, pagination.ID)

    def after(self, key: list[str | int]) -> tuple[dt.datetime, str]:
        stamp, last = key
        return pagination.from_micros(stamp), str(last)

    def key(self, record: Stored) -> list[str | int]:
        return [pagination.micros(record.created_at), record.id]

    def where(self, row: Any, after: tuple[dt.datetime, str]) -> ColumnElement[bool]:
        stamp, last = after
        if self._newest_first:
            return or_(row.created_at < stamp, and_(row.created_at == stamp, row.id < last))
        return or_(row.created_at > stamp, and_(row.created_at == stamp, row.id > last))

    def columns(self, row: Any) -> tuple[Any, ...]:
        if self._newest_first:
            return (row.created_at.desc(), row.id.desc())
        return (row.created_at, row.id)


BY_ID: Final = ById()
BY_CREATION: Final = ByCreation()
NEWEST_FIRST: Final = ByCreation(newest_first=True)


@dataclass(frozen=True)
class Table(Generic[_Row, _Record, _After]):
    """A table of records keyed by ``(workspace_id, id)``, as ``KeyedStore`` uses it."""

    row: type[_Row]
    #: The frozen copy of a row that leaves the store (no ORM row does).
    record: Callable[[_Row], _Record]
    #: "budget" and "budgets": what messages and the quota call one and several.
    noun: str
    plural: str
    order: Order[_After]
    #: Rows deleted with a resource: (model, the column holding the resource's id).
    #: Explicitly, since SQLite enforces a cascade only with foreign keys switched
    #: on, and some (webhook deliveries) have no foreign key to cascade.
    dependents: tuple[tuple[type[Base], str], ...] = ()


class KeyedStore(Generic[_Row, _Record, _After]):
    """A resource's store: get, page, delete, and the frames of a create and an update.

    A resource's store subclasses it, sets ``table`` and writes what differs:
    its ``create`` calls ``_create`` with the row it adds (``_insert`` where it
    writes more than the row), its ``update`` calls ``_update`` with the change
    it makes to the locked row.
    """

    #: Set by each subclass: the table it keeps.
    table: Table[_Row, _Record, _After]

    def __init__(self, database: Database) -> None:
        self._database = database
        self._sqlite = database.dialect_name == "sqlite"
        # The subclass's module's logger: "switchboard.dispatcher.budgets.resources.store" ...
        self._log = logging.getLogger(type(self).__module__)

    async def _run(self, work: Callable[[Session], _Result], *, write: bool) -> _Result:
        return await transaction(self._database, work, write=write, log=self._log)

    def _lock_workspace(self, db: Session, workspace_id: str) -> None:
        """Serialize the workspace's creates (and whatever else takes this first) on
        PostgreSQL, so a count or a flag read under it holds; SQLite serializes writers.

        Taken before any row of the table: every writer that takes both takes them
        in this order, so two of them cannot deadlock.
        """
        if not self._sqlite:
            db.execute(
                select(WorkspaceRow.id).where(WorkspaceRow.id == workspace_id).with_for_update()
            )

    def _earlier(self, db: Session, resource: str) -> _Record:
        """The record an earlier create with the same key made ("{workspace}/{id}")."""
        workspace_id, _, resource_id = resource.partition("/")
        row = db.get(self.table.row, (workspace_id, resource_id))
        if row is None:
            raise NotFound(f"the {self.table.noun} this request created was deleted")
        return self.table.record(row)

    def _added(self, db: Session, row: _Row) -> _Record:
        """Add ``row`` (a create's ``insert``) and return it as a record."""
        db.add(row)
        db.flush()
        return self.table.record(row)

    def _bumped(self, db: Session, row: _Row, stamp: dt.datetime | None = None) -> _Record:
        """``row`` (an update's ``change``) as its next version, changed at ``stamp`` (now)."""
        changed: Any = row
        changed.version += 1
        changed.updated_at = stamp if stamp is not None else now()
        db.flush()
        return self.table.record(row)

    async def _insert(
        self,
        workspace_id: str,
        resource_id: str,
        insert: Callable[[Session], _Result],
        replay: Callable[[_Record], _Result],
        *,
        idempotency: Idempotency | None,
        max_per_workspace: int,
        staged: Staged[_Result] | None,
    ) -> _Result:
        """A create: ``insert(db)`` adds the row (``_added``) once the key, the quota and
        the id allow it. For the retry of an earlier create with the same key,
        ``replay`` of its record as it now stands (NotFound if it was deleted since);
        IdTaken if the id is in use, QuotaExceeded past ``max_per_workspace``."""
        table = self.table
        rows: Any = table.row

        def tx(db: Session) -> _Result:
            first = claim(db, idempotency, f"{workspace_id}/{resource_id}")
            if first is not None:
                return replay(self._earlier(db, first))
            self._lock_workspace(db, workspace_id)
            count = db.execute(
                select(func.count()).select_from(rows).where(rows.workspace_id == workspace_id)
            ).scalar_one()
            if count >= max_per_workspace:
                raise QuotaExceeded(
                    f"a workspace may hold at most {max_per_workspace} {table.plural}",
                    subject=f"{table.plural} per workspace",
                )
            if db.get(rows, (workspace_id, resource_id)) is not None:
                raise IdTaken(resource_id)
            return insert(db)

        async def run() -> _Result:
            return await self._run(staging(staged, tx), write=True)

        return await retrying(run)

    async def _create(
        self,
        workspace_id: str,
        resource_id: str,
        row: Callable[[], _Row],
        idempotency: Idempotency | None,
        max_per_workspace: int,
        staged: Staged[Created[_Record]] | None,
    ) -> Created[_Record]:
        """``_insert`` of the row ``row()`` builds (in the transaction), as ``Created``."""
        return await self._insert(
            workspace_id,
            resource_id,
            lambda db: Created(self._added(db, row())),
            lambda earlier: Created(earlier, fresh=False),
            idempotency=idempotency,
            max_per_workspace=max_per_workspace,
            staged=staged,
        )

    async def replayed(self, key: Idempotency) -> _Record | None:
        """The record an earlier create with this key made, if the key is still kept
        (INVALID_ARGUMENT if it was used for a different request; NotFound if that
        record was deleted since)."""

        def tx(db: Session) -> _Record | None:
            found = earlier(db, key)
            return self._earlier(db, found) if found is not None else None

        return await self._run(tx, write=False)

    async def get(self, workspace_id: str, resource_id: str) -> _Record | None:
        def tx(db: Session) -> _Record | None:
            row = db.get(self.table.row, (workspace_id, resource_id))
            return self.table.record(row) if row is not None else None

        return await self._run(tx, write=False)

    async def page(self, workspace_id: str, after: _After | None, limit: int) -> list[_Record]:
        """The workspace's records in the table's order, after ``after`` (exclusive),
        at most ``limit``."""
        table = self.table
        rows: Any = table.row

        def tx(db: Session) -> list[_Record]:
            query = select(rows).where(rows.workspace_id == workspace_id)
            if after is not None:
                query = query.where(table.order.where(rows, after))
            query = query.order_by(*table.order.columns(rows)).limit(limit)
            return [table.record(row) for row in db.execute(query).scalars()]

        return await self._run(tx, write=False)

    async def _update(
        self,
        workspace_id: str,
        resource_id: str,
        etag: str,
        change: Callable[[Session, _Row], _Result],
        staged: Staged[_Result | None] | None,
        *,
        lock_workspace: bool = False,
    ) -> _Result | None:
        """An update: ``change(db, row)`` on the locked row once the etag matches, which
        changes it and returns what ``_bumped`` makes of it; None if it does not exist.
        ``change`` may raise to refuse the result: nothing is written."""

        def tx(db: Session) -> _Result | None:
            if lock_workspace:
                self._lock_workspace(db, workspace_id)
            row = db.get(self.table.row, (workspace_id, resource_id), with_for_update=True)
            if row is None:
                return None
            versioned: Any = row
            check_etag(etag, versioned.version, self.table.noun)
            return change(db, row)

        return await self._run(staging(staged, tx), write=True)

    async def delete(
        self,
        workspace_id: str,
        resource_id: str,
        etag: str,
        staged: Staged[_Record | None] | None,
    ) -> _Record | None:
        """Delete the record and its dependents; the record as it was, or None if it
        does not exist."""
        table = self.table
        rows: Any = table.row

        def tx(db: Session) -> _Record | None:
            row = db.get(rows, (workspace_id, resource_id), with_for_update=True)
            if row is None:
                return None
            check_etag(etag, row.version, table.noun)
            record = table.record(row)
            for model, column in table.dependents:
                dependent: Any = model
                db.execute(
                    delete(model)
                    .where(
                        dependent.workspace_id == workspace_id,
                        getattr(dependent, column) == resource_id,
                    )
                    .execution_options(synchronize_session=False)
                )
            db.execute(
                delete(rows).where(rows.workspace_id == workspace_id, rows.id == resource_id)
            )
            return record

        return await self._run(staging(staged, tx), write=True)


class Publisher(Protocol):
    """What ``Catalog`` needs of the event bus (``platform/events/bus.py``, a layer up)."""

    @property
    def outbox(self) -> Outbox | None: ...

    async def publish_staged(self, events: Sequence[events_pb2.Event]) -> None: ...


class Catalog(Generic[_Record, _After]):
    """The steps a resource's domain takes around its ``KeyedStore``.

    The domain parses names and validates what a request asks for; these steps
    turn the store's answers into the contract's: a page and its token, NOT_FOUND
    and ALREADY_EXISTS naming the resource, and the change's events staged in
    the write's transaction and published once it committed.
    """

    def __init__(
        self,
        store: KeyedStore[Any, _Record, _After],
        bus: Publisher,
        page_tokens: pagination.PageTokens,
    ) -> None:
        self._store = store
        self._bus = bus
        self._pages = page_tokens

    async def listed(
        self, parent: str, page_size: int, page_token: str, *, default: int
    ) -> tuple[list[_Record], str]:
        """A page of the records of the workspace ``parent`` names (AIP-158: ``page_size``
        0 is ``default``, at most 100) and the token of the next page ("" after the last)."""
        workspace_id = WorkspaceName.parse(parent, "parent").workspace
        size = pagination.page_size(page_size, default=default, maximum=100)
        plural, order = self._store.table.plural, self._store.table.order
        fingerprint = pagination.fingerprint(plural, workspace_id)
        after = None
        if page_token:
            after = order.after(self._pages.decode(page_token, fingerprint, order.shape))
        records = await self._store.page(workspace_id, after, size + 1)
        token = ""
        if len(records) > size:
            token = self._pages.encode(order.key(records[size - 1]), fingerprint)
        return records[:size], token

    async def found(self, name: str, workspace_id: str, resource_id: str) -> _Record:
        """The record ``name`` names, or NOT_FOUND."""
        record = await self._store.get(workspace_id, resource_id)
        if record is None:
            raise NotFound(f"{name} not found")
        return record

    async def created(
        self,
        name: str,
        key: Idempotency | None,
        events: Callable[[_Made], Sequence[events_pb2.Event]],
        write: Callable[[Staged[_Made]], Awaitable[_Made]],
    ) -> _Made:
        """``write`` a create with its ``events``, published once it committed (for the
        replay of an earlier create, those of that one still unpublished); ALREADY_EXISTS
        naming ``name`` if its id is taken."""
        staged: Staged[_Made] = Staged(
            self._bus.outbox,
            lambda made: events(made) if made.fresh else None,
            key=key.key if key else "",
        )
        try:
            made = await write(staged)
        except IdTaken:
            raise AlreadyExists(f"{name} already exists") from None
        await self._bus.publish_staged(staged.events)
        return made

    async def changed(
        self,
        name: str,
        events: Callable[[_Done], Sequence[events_pb2.Event]],
        write: Callable[[Staged[_Done | None]], Awaitable[_Done | None]],
    ) -> _Done:
        """``write`` an update or a delete with its ``events``, published once it
        committed; NOT_FOUND naming ``name`` if ``write`` found nothing (None)."""
        staged: Staged[_Done | None] = Staged(
            self._bus.outbox, lambda done: events(done) if done is not None else []
        )
        done = await write(staged)
        if done is None:
            raise NotFound(f"{name} not found")
        await self._bus.publish_staged(staged.events)
        return done
