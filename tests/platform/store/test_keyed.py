"""The keyed-resource store and its catalog steps, on a real table of each backend.

What every workspace's records by id (budgets, schedules, assistants,
integrations) rely on: a create is idempotent under its request key, refused past
the quota or on a taken id, and has one CREATED event; pages follow the table's
order with signed tokens whose keys are the sort key (the tokens the lists have
always issued); an update or delete checks the etag on the locked row, bumps the
version, writes nothing when refused, and takes the resource's dependent rows
along; NOT_FOUND and ALREADY_EXISTS name the resource. The table here is
``budgets``, with ``budget_windows`` (a foreign key's cascade) and
``webhook_deliveries`` (no foreign key) as its dependents, driven through a
store of this file's own, so nothing of the budgets domain is involved.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from switchboard.api.dispatcher.v1 import dispatcher_pb2
from switchboard.api.events.v1 import events_pb2
from switchboard.platform.errors import (
    AlreadyExists,
    EtagMismatch,
    InvalidArgument,
    NotFound,
    QuotaExceeded,
)
from switchboard.platform.events.bus import EventBus
from switchboard.platform.events.eventlog import LocalLog
from switchboard.platform.store import pagination
from switchboard.platform.store.db import Database, open_database
from switchboard.platform.store.keyed import (
    BY_CREATION,
    BY_ID,
    Catalog,
    Created,
    KeyedStore,
    Order,
    Table,
)
from switchboard.platform.store.models import (
    BudgetRow,
    BudgetWindowRow,
    WebhookDeliveryRow,
    WorkspaceRow,
)
from switchboard.platform.store.outbox import Outbox, Staged
from switchboard.platform.store.pagination import PageTokens
from switchboard.platform.store.storage import Idempotency
from switchboard.platform.values.names import etag_of, now
from tests.conftest import TEST_DATABASE_TIMEOUT_S

pytestmark = pytest.mark.unit

_After = TypeVar("_After")

CREATED = events_pb2.CHANGE_KIND_CREATED
UPDATED = events_pb2.CHANGE_KIND_UPDATED
DELETED = events_pb2.CHANGE_KIND_DELETED
SECRET = "keyed-test-secret"


@dataclass(frozen=True)
class Thing:
    workspace_id: str
    id: str
    data: bytes
    created_at: dt.datetime
    updated_at: dt.datetime
    version: int


def _thing(row: BudgetRow) -> Thing:
    return Thing(
        workspace_id=row.workspace_id,
        id=row.id,
        data=row.data,
        created_at=row.created_at,
        updated_at=row.updated_at,
        version=row.version,
    )


def _table(order: Order[_After]) -> Table[BudgetRow, Thing, _After]:
    return Table(
        BudgetRow,
        _thing,
        noun="thing",
        plural="things",
        order=order,
        dependents=((BudgetWindowRow, "budget_id"), (WebhookDeliveryRow, "integration_id")),
    )


class Things(KeyedStore[BudgetRow, Thing, _After]):
    """A resource's store as the four of the product are written."""

    async def create(
        self,
        workspace_id: str,
        thing_id: str,
        data: bytes = b"",
        *,
        created_at: dt.datetime | None = None,
        key: Idempotency | None = None,
        max_per_workspace: int = 3,
        staged: Staged[Created[Thing]] | None = None,
    ) -> Created[Thing]:
        def row() -> BudgetRow:
            stamp = created_at or now()
            return BudgetRow(
                workspace_id=workspace_id,
                id=thing_id,
                scope_kind="workspace",
                scope_id="",
                data=data,
                creator="tester",
                created_at=stamp,
                updated_at=stamp,
                version=1,
            )

        return await self._create(workspace_id, thing_id, row, key, max_per_workspace, staged)

    async def update(
        self,
        workspace_id: str,
        thing_id: str,
        etag: str,
        edit: Callable[[bytes], bytes],
        staged: Staged[Thing | None] | None = None,
    ) -> Thing | None:
        def change(db: Session, row: BudgetRow) -> Thing:
            row.data = edit(row.data)
            return self._bumped(db, row)

        return await self._update(workspace_id, thing_id, etag, change, staged)


class ThingsById(Things[str]):
    table = _table(BY_ID)


class ThingsByCreation(Things[tuple[dt.datetime, str]]):
    table = _table(BY_CREATION)


@dataclass
class Desk:
    database: Database
    bus: EventBus
    #: Every event the bus delivered, in order.
    delivered: list[events_pb2.Event]
    things: Things[str]
    catalog: Catalog[Thing, str]
    workspace_id: str

    def name(self, thing_id: str) -> str:
        return f"workspaces/{self.workspace_id}/things/{thing_id}"

    def changes(self) -> list[tuple[events_pb2.ChangeKind.ValueType, str]]:
        return [
            (event.budget_changed.change, event.budget_changed.budget.name)
            for event in self.delivered
        ]

    async def rows(self, model: Any) -> int:
        def count(db: Session) -> int:
            return int(db.execute(select(func.count()).select_from(model)).scalar_one())

        return await self.database.run(count, write=False)


def changed(kind: events_pb2.ChangeKind.ValueType, thing: Thing) -> list[events_pb2.Event]:
    return [
        events_pb2.Event(
            type=events_pb2.EVENT_TYPE_BUDGET_CHANGED,
            workspace=f"workspaces/{thing.workspace_id}",
            budget_changed=events_pb2.BudgetChanged(
                change=kind,
                budget=dispatcher_pb2.Budget(
                    name=f"workspaces/{thing.workspace_id}/things/{thing.id}"
                ),
            ),
        )
    ]


async def _workspace(database: Database, workspace_id: str) -> None:
    def add(db: Session) -> None:
        stamp = now()
        db.add(WorkspaceRow(id=workspace_id, created_at=stamp, updated_at=stamp, version=1))

    await database.run(add, write=True)


@pytest.fixture
async def desk(database_url: str) -> AsyncIterator[Desk]:
    database = await open_database(database_url, timeout_s=TEST_DATABASE_TIMEOUT_S, migrate=True)
    outbox = Outbox(database)
    local = LocalLog(database, retention=1000, retention_s=3600, memory=100, outbox=outbox)
    bus = EventBus(local, memory=100, outbox=outbox)
    delivered: list[events_pb2.Event] = []
    bus.listen(delivered.append)
    await bus.start()
    await _workspace(database, "w1")
    await _workspace(database, "w2")
    things = ThingsById(database)
    try:
        yield Desk(database, bus, delivered, things, Catalog(things, bus, PageTokens(SECRET)), "w1")
    finally:
        await bus.close()
        await database.close()


async def create(
    d: Desk, thing_id: str, *, key: Idempotency | None = None, max_per_workspace: int = 3
) -> Created[Thing]:
    return await d.catalog.created(
        d.name(thing_id),
        key,
        lambda made: changed(CREATED, made.record),
        lambda staged: d.things.create(
            d.workspace_id, thing_id, key=key, max_per_workspace=max_per_workspace, staged=staged
        ),
    )


async def test_a_create_retried_with_its_key_answers_with_the_first_and_logs_one_event(
    desk: Desk,
) -> None:
    key = Idempotency(key="u1/CreateThing/r1", fingerprint="f1")
    first = await create(desk, "a", key=key)
    again = await create(desk, "a", key=key)
    assert first.fresh
    assert not again.fresh
    assert again.record == first.record
    assert first.record.version == 1
    assert await desk.things.get("w1", "a") == first.record
    assert await desk.things.replayed(key) == first.record
    assert desk.changes() == [(CREATED, desk.name("a"))]
    # The same key for another request is the caller's mistake.
    with pytest.raises(InvalidArgument) as reused:
        await desk.things.replayed(Idempotency(key=key.key, fingerprint="f2"))
    assert [v.field for v in reused.value.violations] == ["request_id"]
    assert await desk.things.delete("w1", "a", "", None) is not None
    with pytest.raises(NotFound, match="the thing this request created was deleted"):
        await create(desk, "a", key=key)
    assert await desk.things.replayed(Idempotency(key="u1/CreateThing/r9", fingerprint="")) is None


async def test_a_create_is_refused_on_a_taken_id_and_past_the_quota_writing_nothing(
    desk: Desk,
) -> None:
    await create(desk, "a")
    with pytest.raises(AlreadyExists) as taken:
        await create(desk, "a")
    assert taken.value.message == "workspaces/w1/things/a already exists"
    await create(desk, "b")
    with pytest.raises(QuotaExceeded) as full:
        await create(desk, "c", max_per_workspace=2)
    assert full.value.message == "a workspace may hold at most 2 things"
    # The quota is per workspace.
    await desk.things.create("w2", "c", max_per_workspace=2)
    assert desk.changes() == [(CREATED, desk.name("a")), (CREATED, desk.name("b"))]
    assert await desk.rows(BudgetRow) == 3


async def test_pages_by_id_carry_the_last_id_in_a_signed_token_of_the_request(
    desk: Desk,
) -> None:
    for thing_id in ("d", "b", "e", "a", "c"):
        await desk.things.create("w1", thing_id, max_per_workspace=10)
    await desk.things.create("w2", "z")
    seen: list[str] = []
    token = ""
    tokens: list[str] = []
    while True:
        records, token = await desk.catalog.listed("workspaces/w1", 2, token, default=50)
        seen.extend(record.id for record in records)
        if not token:
            break
        tokens.append(token)
    assert seen == ["a", "b", "c", "d", "e"]
    # The token the lists have always issued: the last id, for this list of this workspace.
    fingerprint = pagination.fingerprint("things", "w1")
    assert tokens == [PageTokens(SECRET).encode([last], fingerprint) for last in ("b", "d")]
    everything, last = await desk.catalog.listed("workspaces/w1", 0, "", default=50)
    assert [record.id for record in everything] == seen
    assert last == ""
    with pytest.raises(InvalidArgument) as elsewhere:
        await desk.catalog.listed("workspaces/w2", 2, tokens[0], default=50)
    assert [v.field for v in elsewhere.value.violations] == ["page_token"]
    with pytest.raises(InvalidArgument) as negative:
        await desk.catalog.listed("workspaces/w1", -1, "", default=50)
    assert [v.field for v in negative.value.violations] == ["page_size"]
    with pytest.raises(InvalidArgument) as malformed:
        await desk.catalog.listed("w1", 2, "", default=50)
    assert [v.field for v in malformed.value.violations] == ["parent"]


async def test_pages_by_creation_are_oldest_first_and_exact_across_equal_times(
    desk: Desk,
) -> None:
    things = ThingsByCreation(desk.database)
    catalog = Catalog(things, desk.bus, PageTokens(SECRET))
    early = dt.datetime(2026, 1, 2, 3, 4, 5, 600_007, tzinfo=dt.UTC)
    late = early + dt.timedelta(microseconds=1)
    for thing_id, when in (("b", early), ("z", late), ("a", early), ("c", early), ("y", late)):
        await things.create("w1", thing_id, created_at=when, max_per_workspace=10)
    seen: list[str] = []
    token = ""
    while True:
        records, token = await catalog.listed("workspaces/w1", 2, token, default=20)
        seen.extend(record.id for record in records)
        if not token:
            break
        if seen == ["a", "b"]:
            # The key is the creation time (microseconds) and the id.
            fingerprint = pagination.fingerprint("things", "w1")
            assert token == PageTokens(SECRET).encode([pagination.micros(early), "b"], fingerprint)
    assert seen == ["a", "b", "c", "y", "z"]


async def test_an_update_checks_the_etag_on_the_row_and_bumps_its_version(desk: Desk) -> None:
    made = (await create(desk, "a")).record

    async def update(etag: str, edit: Callable[[bytes], bytes], thing_id: str = "a") -> Thing:
        return await desk.catalog.changed(
            desk.name(thing_id),
            lambda done: changed(UPDATED, done),
            lambda staged: desk.things.update("w1", thing_id, etag, edit, staged),
        )

    updated = await update(etag_of(1), lambda data: data + b"1")
    assert (updated.data, updated.version) == (b"1", 2)
    assert updated.updated_at >= made.updated_at
    assert updated.created_at == made.created_at
    with pytest.raises(EtagMismatch, match="the thing changed since the etag was read"):
        await update(etag_of(1), lambda data: data + b"stale")
    # No etag: whatever version it is.
    assert (await update("", lambda data: data + b"2")).version == 3

    def refuse(data: bytes) -> bytes:
        raise InvalidArgument("refused inside the transaction")

    with pytest.raises(InvalidArgument, match="refused inside"):
        await update(etag_of(3), refuse)
    with pytest.raises(NotFound) as missing:
        await update("", lambda data: data, thing_id="nothing")
    assert missing.value.message == "workspaces/w1/things/nothing not found"
    stored = await desk.things.get("w1", "a")
    assert stored is not None
    assert (stored.data, stored.version) == (b"12", 3)
    assert desk.changes() == [(CREATED, desk.name("a"))] + [(UPDATED, desk.name("a"))] * 2


async def test_a_delete_checks_the_etag_and_takes_its_dependent_rows(desk: Desk) -> None:
    await create(desk, "a")
    await create(desk, "b")

    def dependents(db: Session) -> None:
        stamp = now()
        for seq, thing_id in enumerate(("a", "b")):
            db.add(
                BudgetWindowRow(
                    workspace_id="w1", budget_id=thing_id, window="total", created_at=stamp
                )
            )
            db.add(
                WebhookDeliveryRow(
                    id=f"delivery-{thing_id}",
                    workspace_id="w1",
                    integration_id=thing_id,
                    seq=seq,
                    event_id=f"event-{thing_id}",
                    event_type="BUDGET_CHANGED",
                    data=b"",
                    state=1,
                    created_at=stamp,
                )
            )

    await desk.database.run(dependents, write=True)

    async def delete(thing_id: str, etag: str) -> Thing:
        return await desk.catalog.changed(
            desk.name(thing_id),
            lambda done: changed(DELETED, done),
            lambda staged: desk.things.delete("w1", thing_id, etag, staged),
        )

    with pytest.raises(EtagMismatch):
        await delete("a", etag_of(2))
    assert await desk.rows(BudgetWindowRow) == await desk.rows(WebhookDeliveryRow) == 2
    deleted = await delete("a", etag_of(1))
    assert (deleted.id, deleted.version) == ("a", 1)
    assert await desk.things.get("w1", "a") is None
    # b's stay.
    assert await desk.rows(BudgetWindowRow) == await desk.rows(WebhookDeliveryRow) == 1
    with pytest.raises(NotFound) as again:
        await delete("a", "")
    assert again.value.message == "workspaces/w1/things/a not found"
    with pytest.raises(NotFound):
        await desk.catalog.found(desk.name("a"), "w1", "a")
    assert (await desk.catalog.found(desk.name("b"), "w1", "b")).id == "b"
    assert desk.changes() == [
        (CREATED, desk.name("a")),
        (CREATED, desk.name("b")),
        (DELETED, desk.name("a")),
    ]
