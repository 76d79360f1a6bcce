"""Budgets (DispatcherService): CRUD, roles, etags, validation of every field, the scope's
rules, idempotency, the per-workspace limit, BUDGET_CHANGED events, and each budget's usage
of its current period as the ledger's windows hold it (docs/budgets.md)."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc import aio

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.dispatcher.budgets.resources import periods
from switchboard.dispatcher.budgets.resources.catalog import Budgets
from switchboard.dispatcher.service import Dispatcher
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.store.models import BudgetRow, BudgetWindowRow
from tests.conftest import CALL_DEADLINE_S, built
from tests.kits.authkit import detail, reason
from tests.kits.contextkit import (
    Caller,
    World,
    create_workspace,
    ctx_world,
    refused,
    tap,
    violations,
)
from tests.kits.contextkit import Stub as ContextStub
from tests.kits.dispatchkit import Stub, limited
from tests.kits.eventkit import Subscriber, ws

pytestmark = pytest.mark.service

CODE = grpc.StatusCode
LIMIT = 3
BUDGET_CHANGED = events_pb2.EVENT_TYPE_BUDGET_CHANGED


@dataclass(frozen=True)
class Desk:
    server: SwitchboardServer
    context: ContextStub
    stub: Stub
    world: World

    @property
    def budgets(self) -> Budgets:
        return built(self.server, Dispatcher).budgets


@asynccontextmanager
async def desk_mesh(**overrides: Any) -> AsyncIterator[Desk]:
    async with limited(**overrides) as (server, context, stub):
        world = await ctx_world(server, context)
        made = Desk(server, context, stub, world)
        made.budgets.max_per_workspace = LIMIT
        yield made


@pytest.fixture
async def desk() -> AsyncIterator[Desk]:
    async with desk_mesh() as made:
        yield made


@pytest.fixture
async def any_desk(database_url: str) -> AsyncIterator[Desk]:
    """``desk`` once on SQLite and once on PostgreSQL."""
    async with desk_mesh(database_url=database_url) as made:
        yield made


# -- helpers ----------------------------------------------------------------------------------


def daily(d: Desk, **fields: Any) -> pb.Budget:
    """A budget of the whole workspace: one dollar a day unless ``fields`` say otherwise."""
    values: dict[str, Any] = {
        "display_name": "Daily",
        "scope": d.world.name,
        "period": pb.BUDGET_PERIOD_DAY,
        "cost_limit_micros": 1_000_000,
    }
    values.update(fields)
    return pb.Budget(**values)


async def create(
    d: Desk,
    budget: pb.Budget | None = None,
    *,
    budget_id: str = "",
    request_id: str = "",
    caller: Caller | None = None,
    parent: str = "",
) -> pb.Budget:
    response = await d.stub.CreateBudget(
        pb.CreateBudgetRequest(
            parent=parent or d.world.name,
            budget=budget if budget is not None else daily(d),
            budget_id=budget_id,
            request_id=request_id,
        ),
        metadata=(caller or d.world.owner).md,
        timeout=CALL_DEADLINE_S,
    )
    return response.budget


async def get(d: Desk, name: str, caller: Caller | None = None) -> pb.Budget:
    response = await d.stub.GetBudget(
        pb.GetBudgetRequest(name=name),
        metadata=(caller or d.world.owner).md,
        timeout=CALL_DEADLINE_S,
    )
    return response.budget


async def update(
    d: Desk, budget: pb.Budget, *paths: str, caller: Caller | None = None
) -> pb.Budget:
    response = await d.stub.UpdateBudget(
        pb.UpdateBudgetRequest(budget=budget, update_mask=field_mask_pb2.FieldMask(paths=paths)),
        metadata=(caller or d.world.owner).md,
        timeout=CALL_DEADLINE_S,
    )
    return response.budget


async def delete(d: Desk, name: str, etag: str = "", caller: Caller | None = None) -> None:
    await d.stub.DeleteBudget(
        pb.DeleteBudgetRequest(name=name, etag=etag),
        metadata=(caller or d.world.owner).md,
        timeout=CALL_DEADLINE_S,
    )


async def list_all(d: Desk, caller: Caller | None = None, page_size: int = 0) -> list[pb.Budget]:
    found: list[pb.Budget] = []
    token = ""
    while True:
        page = await d.stub.ListBudgets(
            pb.ListBudgetsRequest(parent=d.world.name, page_size=page_size, page_token=token),
            metadata=(caller or d.world.owner).md,
            timeout=CALL_DEADLINE_S,
        )
        found.extend(page.budgets)
        token = page.next_page_token
        if not token:
            return found


async def assistant(d: Desk, workspace: str, assistant_id: str) -> str:
    response = await d.stub.CreateAssistant(
        pb.CreateAssistantRequest(
            parent=workspace, assistant=pb.Assistant(), assistant_id=assistant_id
        ),
        metadata=d.world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    return response.assistant.name


async def stored_count(d: Desk) -> int:
    async with d.server.shared.database.sessions() as db:
        rows = await db.execute(BudgetRow.__table__.select())
        return len(rows.all())


def changes(events: list[events_pb2.Event]) -> list[tuple[int, str, str, str]]:
    """(change, budget name, etag, event scope) of each BUDGET_CHANGED event."""
    return [
        (
            e.budget_changed.change,
            e.budget_changed.budget.name,
            e.budget_changed.budget.etag,
            e.workspace,
        )
        for e in events
        if e.type == BUDGET_CHANGED
    ]


# -- the lifecycle ----------------------------------------------------------------------------


async def test_an_owner_creates_reads_lists_updates_and_deletes_a_budget(any_desk: Desk) -> None:
    d = any_desk
    with tap(d.server) as events:
        made = await create(
            d,
            daily(
                d,
                display_name="  Team  ",
                time_zone="Asia/Tokyo",
                input_token_limit=50_000,
                alert_thresholds=[80, 50, 100],
                etag='"99"',  # output only: ignored
            ),
            budget_id="team",
        )
        assert made.name == f"{d.world.name}/budgets/team"
        assert made.display_name == "Team"
        assert made.scope == d.world.name
        assert made.etag == '"1"'
        assert made.create_time.seconds > 0
        assert made.update_time == made.create_time
        assert made.cost_limit_micros == 1_000_000
        assert made.input_token_limit == 50_000
        assert not made.HasField("output_token_limit")
        assert list(made.alert_thresholds) == [50, 80, 100]  # ascending
        # A day in Tokyo: it begins at 15:00 UTC.
        assert made.usage.reset_time.ToDatetime(dt.UTC).hour == 15
        assert made.usage.cost_micros == 0

        assert await get(d, made.name, d.world.viewer) == made
        assert [b.name for b in await list_all(d, d.world.editor)] == [made.name]

        raised = await update(
            d,
            pb.Budget(name=made.name, etag=made.etag, cost_limit_micros=5_000_000),
            "cost_limit_micros",
        )
        assert raised.etag == '"2"'
        assert raised.cost_limit_micros == 5_000_000
        assert raised.input_token_limit == 50_000  # outside the mask: kept
        stale = await refused(
            update(d, pb.Budget(name=made.name, etag=made.etag, display_name="x"), "display_name"),
            CODE.ABORTED,
        )
        assert reason(stale) == "ERROR_REASON_ETAG_MISMATCH"
        # A cap in the mask but unset is removed; no etag: the last write wins.
        fewer = await update(d, pb.Budget(name=made.name), "input_token_limit")
        assert fewer.etag == '"3"'
        assert not fewer.HasField("input_token_limit")
        assert fewer.cost_limit_micros == 5_000_000
        assert await get(d, made.name) == fewer

        stale = await refused(delete(d, made.name, raised.etag), CODE.ABORTED)
        assert reason(stale) == "ERROR_REASON_ETAG_MISMATCH"
        await delete(d, made.name, fewer.etag)
        seen = changes(events.take())
    await refused(get(d, made.name), CODE.NOT_FOUND)
    await refused(delete(d, made.name), CODE.NOT_FOUND)
    await refused(update(d, pb.Budget(name=made.name), "display_name"), CODE.NOT_FOUND)
    assert await list_all(d) == []
    # One event per change, in the workspace's scope (only its members see them).
    assert seen == [
        (events_pb2.CHANGE_KIND_CREATED, made.name, '"1"', d.world.name),
        (events_pb2.CHANGE_KIND_UPDATED, made.name, '"2"', d.world.name),
        (events_pb2.CHANGE_KIND_UPDATED, made.name, '"3"', d.world.name),
        (events_pb2.CHANGE_KIND_DELETED, made.name, '"3"', d.world.name),
    ]


async def test_updates_and_deletes_call_on_change_with_the_workspace(desk: Desk) -> None:
    d = desk
    woken: list[str] = []
    d.budgets.on_change = woken.append
    made = await create(d)
    assert woken == []
    await update(d, pb.Budget(name=made.name, cost_limit_micros=2_000_000), "cost_limit_micros")
    await delete(d, made.name)
    assert woken == [d.world.id, d.world.id]


async def test_an_update_without_a_mask_changes_the_fields_it_sets(desk: Desk) -> None:
    made = await create(desk, daily(desk, output_token_limit=10))
    changed = await update(desk, pb.Budget(name=made.name, display_name="Renamed"))
    assert changed.display_name == "Renamed"
    assert changed.output_token_limit == 10
    # An empty display name is the budget's id, as for assistants.
    unnamed = await create(desk, daily(desk, display_name="  "), budget_id="unnamed")
    assert unnamed.display_name == "unnamed"
    # A zero cap in the request is set (and refused), not ignored.
    error = await refused(
        update(desk, pb.Budget(name=made.name, output_token_limit=0)), CODE.INVALID_ARGUMENT
    )
    assert violations(error) == ["budget.output_token_limit"]


async def test_list_pages_by_id_through_every_budget_once(desk: Desk) -> None:
    for budget_id in ("cc", "aa", "bb"):
        await create(desk, budget_id=budget_id)
    seen = await list_all(desk, desk.world.viewer, page_size=2)
    assert [b.name.rsplit("/", 1)[1] for b in seen] == ["aa", "bb", "cc"]
    bad = await refused(
        desk.stub.ListBudgets(
            pb.ListBudgetsRequest(parent=desk.world.name, page_token="forged"),
            metadata=desk.world.owner.md,
            timeout=CALL_DEADLINE_S,
        ),
        CODE.INVALID_ARGUMENT,
    )
    assert violations(bad) == ["page_token"]


# -- authorization ----------------------------------------------------------------------------


def _calls(d: Desk, name: str) -> dict[str, Any]:
    return {
        "CreateBudget": lambda md: d.stub.CreateBudget(
            pb.CreateBudgetRequest(parent=d.world.name, budget=daily(d)),
            metadata=md,
            timeout=CALL_DEADLINE_S,
        ),
        "GetBudget": lambda md: d.stub.GetBudget(
            pb.GetBudgetRequest(name=name), metadata=md, timeout=CALL_DEADLINE_S
        ),
        "ListBudgets": lambda md: d.stub.ListBudgets(
            pb.ListBudgetsRequest(parent=d.world.name), metadata=md, timeout=CALL_DEADLINE_S
        ),
        "UpdateBudget": lambda md: d.stub.UpdateBudget(
            pb.UpdateBudgetRequest(
                budget=pb.Budget(name=name, display_name="x"),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
            ),
            metadata=md,
            timeout=CALL_DEADLINE_S,
        ),
        "QueryUsage": lambda md: d.stub.QueryUsage(
            pb.QueryUsageRequest(parent=d.world.name), metadata=md, timeout=CALL_DEADLINE_S
        ),
        "DeleteBudget": lambda md: d.stub.DeleteBudget(
            pb.DeleteBudgetRequest(name=name), metadata=md, timeout=CALL_DEADLINE_S
        ),
    }


_ALLOWED = {
    "CreateBudget": ("owner",),
    "GetBudget": ("owner", "editor", "viewer"),
    "ListBudgets": ("owner", "editor", "viewer"),
    "UpdateBudget": ("owner",),
    "QueryUsage": ("owner", "editor", "viewer"),
    "DeleteBudget": ("owner",),
}


@pytest.mark.parametrize("role", ["owner", "editor", "viewer", "outsider"])
async def test_owners_manage_members_read_and_outsiders_see_nothing(desk: Desk, role: str) -> None:
    made = await create(desk, budget_id="target")
    caller = getattr(desk.world, role)
    for method, call in _calls(desk, made.name).items():
        try:
            await call(caller.md)
            code = CODE.OK
        except aio.AioRpcError as exc:
            code = exc.code()
        if role == "outsider":
            assert code == CODE.NOT_FOUND, (method, code)
        elif role in _ALLOWED[method]:
            assert code == CODE.OK, (method, code)
        else:
            assert code == CODE.PERMISSION_DENIED, (method, code)
    if role == "owner":
        await refused(get(desk, made.name), CODE.NOT_FOUND)
    else:
        assert (await get(desk, made.name)).display_name == "Daily"


async def test_another_workspaces_budget_is_not_found_to_a_member_of_this_one(desk: Desk) -> None:
    d = desk
    other = await create_workspace(d.context, d.world.editor, "Elsewhere")
    theirs = await create(d, daily(d, scope=other.name), parent=other.name, caller=d.world.editor)
    # The owner of this workspace is no member of the other one.
    await refused(get(d, theirs.name), CODE.NOT_FOUND)
    await refused(delete(d, theirs.name), CODE.NOT_FOUND)
    await refused(
        update(d, pb.Budget(name=theirs.name, display_name="x"), "display_name"),
        CODE.NOT_FOUND,
    )
    await refused(get(d, f"{d.world.name}/budgets/{theirs.name.rsplit('/', 1)[1]}"), CODE.NOT_FOUND)


async def test_members_see_every_change_on_the_workspace_stream(desk: Desk) -> None:
    d = desk
    async with aio.insecure_channel(d.server.address) as channel:
        subscriber = Subscriber(
            channel, d.world.viewer.token, scopes=[ws(d.world.id)], types=[BUDGET_CHANGED]
        )
        try:
            await subscriber.live()
            made = await create(d, budget_id="watched")
            changed = await update(d, pb.Budget(name=made.name, display_name="New"))
            await delete(d, made.name, changed.etag)
            events = await subscriber.until(3)
        finally:
            subscriber.cancel()
    assert [(e.budget_changed.change, e.budget_changed.budget.etag) for e in events] == [
        (events_pb2.CHANGE_KIND_CREATED, '"1"'),
        (events_pb2.CHANGE_KIND_UPDATED, '"2"'),
        (events_pb2.CHANGE_KIND_DELETED, '"2"'),
    ]
    # Events carry the budget, not its usage (that is read when the budget is).
    assert not events[0].budget_changed.budget.HasField("usage")


# -- validation -------------------------------------------------------------------------------


def _bad_cases(w: str) -> list[tuple[dict[str, Any], list[str]]]:
    return [
        ({"cost_limit_micros": 0}, ["budget.cost_limit_micros"]),
        ({"cost_limit_micros": -5}, ["budget.cost_limit_micros"]),
        (
            {"cost_limit_micros": 5, "input_token_limit": -1, "output_token_limit": 0},
            ["budget.input_token_limit", "budget.output_token_limit"],
        ),
        ({"total_token_limit": 0, "cost_limit_micros": 7}, ["budget.total_token_limit"]),
        ({"cost_limit_micros": None}, ["budget"]),
        ({"period": pb.BUDGET_PERIOD_UNSPECIFIED}, ["budget.period"]),
        ({"period": 42}, ["budget.period"]),
        ({"time_zone": "Mars/Olympus_Mons"}, ["budget.time_zone"]),
        ({"time_zone": "../../etc/passwd"}, ["budget.time_zone"]),
        # A directory of the zone database, not a zone (ZoneInfo raised IsADirectoryError).
        ({"time_zone": "Europe"}, ["budget.time_zone"]),
        ({"alert_thresholds": [0]}, ["budget.alert_thresholds[0]"]),
        ({"alert_thresholds": [50, 101]}, ["budget.alert_thresholds[1]"]),
        ({"alert_thresholds": [50, 80, 50]}, ["budget.alert_thresholds[2]"]),
        ({"alert_thresholds": list(range(1, 12))}, ["budget.alert_thresholds"]),
        ({"display_name": "x" * 201}, ["budget.display_name"]),
        ({"scope": ""}, ["budget.scope"]),
        ({"scope": "workspaces/elsewhere"}, ["budget.scope"]),
        ({"scope": "workspaces/elsewhere/assistants/a1"}, ["budget.scope"]),
        ({"scope": f"{w}/assistants/missing"}, ["budget.scope"]),
        ({"scope": "users/u1/apiKeys/Not_A_Key"}, ["budget.scope"]),
        ({"scope": f"{w}/integrations/i1"}, ["budget.scope"]),
        (
            {"period": 0, "time_zone": "Nowhere/City", "cost_limit_micros": -1},
            ["budget.period", "budget.time_zone", "budget.cost_limit_micros"],
        ),
    ]


async def test_a_malformed_budget_names_each_bad_field_and_stores_nothing(
    any_desk: Desk,
) -> None:
    d = any_desk
    with tap(d.server) as events:
        for fields, expected in _bad_cases(d.world.name):
            budget = daily(d)
            for key, value in fields.items():
                if value is None:
                    budget.ClearField(key)  # type: ignore[arg-type]
                elif isinstance(value, list):
                    getattr(budget, key).extend(value)
                else:
                    setattr(budget, key, value)
            error = await refused(create(d, budget), CODE.INVALID_ARGUMENT)
            assert violations(error) == expected, fields
        assert changes(events.take()) == []
    assert await list_all(d) == []
    assert await stored_count(d) == 0


async def test_the_scope_must_be_this_workspace_its_assistant_or_an_api_key(desk: Desk) -> None:
    d = desk
    mine = await assistant(d, d.world.name, "helper")
    other = await create_workspace(d.context, d.world.owner, "Other")
    theirs = await assistant(d, other.name, "theirs")
    error = await refused(create(d, daily(d, scope=theirs)), CODE.INVALID_ARGUMENT)
    assert violations(error) == ["budget.scope"]
    assert "must be an assistant of" in (error.details() or "")
    error = await refused(create(d, daily(d, scope=other.name)), CODE.INVALID_ARGUMENT)
    assert violations(error) == ["budget.scope"]

    on_assistant = await create(d, daily(d, scope=mine), budget_id="on-helper")
    on_key = await create(d, daily(d, scope="users/u1/apiKeys/k1"), budget_id="on-key")
    on_workspace = await create(d, daily(d), budget_id="on-all")
    assert (on_assistant.scope, on_key.scope, on_workspace.scope) == (
        mine,
        "users/u1/apiKeys/k1",
        d.world.name,
    )
    # The columns the ledger finds a run's budgets by.
    async with d.server.shared.database.sessions() as db:
        rows = (await db.execute(BudgetRow.__table__.select())).all()
    assert sorted((r.id, r.scope_kind, r.scope_id) for r in rows) == [
        ("on-all", "workspace", ""),
        ("on-helper", "assistant", "helper"),
        ("on-key", "api_key", "k1"),
    ]
    # The scope cannot change.
    error = await refused(
        update(d, pb.Budget(name=on_key.name, scope=d.world.name), "scope"),
        CODE.INVALID_ARGUMENT,
    )
    assert violations(error) == ["update_mask.paths"]


async def test_bad_updates_are_refused_and_change_nothing(desk: Desk) -> None:
    d = desk
    made = await create(d, budget_id="b1")
    cases: list[tuple[pb.Budget, list[str], list[str]]] = [
        (pb.Budget(period=7), ["period"], ["budget.period"]),  # type: ignore[arg-type]
        (pb.Budget(time_zone="Atlantis/Capital"), ["time_zone"], ["budget.time_zone"]),
        (
            pb.Budget(alert_thresholds=[0, 0]),
            ["alert_thresholds"],
            [
                "budget.alert_thresholds[0]",
                "budget.alert_thresholds[1]",
            ],
        ),
        (pb.Budget(cost_limit_micros=-1), ["cost_limit_micros"], ["budget.cost_limit_micros"]),
        # Removing the only cap leaves none.
        (pb.Budget(), ["cost_limit_micros"], ["budget"]),
        (pb.Budget(), ["usage"], ["update_mask.paths"]),
        (pb.Budget(), ["etag"], ["update_mask.paths"]),
        (pb.Budget(etag="yesterday", display_name="x"), ["display_name"], ["budget.etag"]),
    ]
    for given, paths, fields in cases:
        given.name = made.name
        error = await refused(update(d, given, *paths), CODE.INVALID_ARGUMENT)
        assert violations(error) == fields, (given, paths)
    assert await get(d, made.name) == made
    error = await refused(delete(d, made.name, "W/nope"), CODE.INVALID_ARGUMENT)
    assert violations(error) == ["etag"]
    error = await refused(get(d, "workspaces/x/budgets/Bad"), CODE.INVALID_ARGUMENT)
    assert violations(error) == ["name"]


async def test_malformed_ids_taken_ids_and_the_limit_per_workspace(any_desk: Desk) -> None:
    d = any_desk
    error = await refused(create(d, budget_id="Not_An_Id"), CODE.INVALID_ARGUMENT)
    assert violations(error) == ["budget_id"]
    made = await create(d, budget_id="first")
    taken = await refused(create(d, budget_id="first"), CODE.ALREADY_EXISTS)
    assert made.name in (taken.details() or "")
    for index in range(LIMIT - 1):
        await create(d, budget_id=f"more-{index}")
    full = await refused(create(d), CODE.RESOURCE_EXHAUSTED)
    assert reason(full) == "ERROR_REASON_QUOTA_EXCEEDED"
    [violation] = detail(full, error_details_pb2.QuotaFailure).violations
    assert violation.subject == "budgets per workspace"
    assert len(await list_all(d)) == LIMIT


async def test_concurrent_creates_keep_the_limit(any_desk: Desk) -> None:
    d = any_desk
    results = await asyncio.gather(
        *(create(d, budget_id=f"race-{index}") for index in range(2 * LIMIT)),
        return_exceptions=True,
    )
    made = [r for r in results if isinstance(r, pb.Budget)]
    refusals = [r for r in results if isinstance(r, aio.AioRpcError)]
    assert len(made) == LIMIT
    assert {e.code() for e in refusals} == {CODE.RESOURCE_EXHAUSTED}
    assert len(refusals) == LIMIT
    assert await stored_count(d) == LIMIT


async def test_a_retried_create_returns_the_first_budget_once(desk: Desk) -> None:
    d = desk
    with tap(d.server) as events:
        first = await create(d, request_id="once")
        again = await create(d, request_id="once")
        created = changes(events.take())
    assert again == first
    assert len(created) == 1
    assert len(await list_all(d)) == 1
    error = await refused(
        create(d, daily(d, display_name="Other"), request_id="once"), CODE.INVALID_ARGUMENT
    )
    assert violations(error) == ["request_id"]


# -- usage of the current period ----------------------------------------------------------------


async def put_window(d: Desk, budget: pb.Budget, window: str, **values: int) -> None:
    """A period's row as the ledger leaves it (reservations are the ledger's to test)."""
    _, workspace_id, _, budget_id = budget.name.split("/")
    async with d.server.shared.database.sessions.begin() as db:
        db.add(
            BudgetWindowRow(
                workspace_id=workspace_id,
                budget_id=budget_id,
                window=window,
                created_at=dt.datetime.now(dt.UTC),
                **values,
            )
        )


async def test_a_budget_shows_the_usage_of_its_current_period(any_desk: Desk) -> None:
    d = any_desk
    at = dt.datetime(2026, 11, 26, 10, 0, tzinfo=dt.UTC)  # a Thursday
    d.budgets.clock = lambda: at
    d.budgets.max_per_workspace = 10
    day = await create(d, daily(d, time_zone="Europe/Paris"), budget_id="day")
    week = await create(d, daily(d, period=pb.BUDGET_PERIOD_WEEK), budget_id="week")
    total = await create(d, daily(d, period=pb.BUDGET_PERIOD_TOTAL), budget_id="total")
    per_run = await create(d, daily(d, period=pb.BUDGET_PERIOD_RUN), budget_id="run")
    await put_window(
        d,
        day,
        "d:2026-11-26",
        cost_used=300,
        cost_held=50,
        input_used=10,
        input_held=2,
        output_used=20,
        output_held=4,
    )
    await put_window(d, day, "d:2026-11-25", cost_used=999_999)  # yesterday: not shown
    await put_window(d, week, "w:2026-11-23", cost_used=700)
    await put_window(d, total, periods.TOTAL, output_used=12)

    shown = await get(d, day.name)
    assert shown.usage == pb.BudgetUsage(
        period_start_time=shown.usage.period_start_time,
        reset_time=shown.usage.reset_time,
        cost_micros=300,
        input_tokens=10,
        output_tokens=20,
        reserved_cost_micros=50,
        reserved_input_tokens=2,
        reserved_output_tokens=4,
    )
    # Midnight in Paris is 23:00 UTC in November.
    assert shown.usage.period_start_time.ToDatetime(dt.UTC) == dt.datetime(
        2026, 11, 25, 23, tzinfo=dt.UTC
    )
    assert shown.usage.reset_time.ToDatetime(dt.UTC) == dt.datetime(2026, 11, 26, 23, tzinfo=dt.UTC)
    listed = {b.name: b for b in await list_all(d, d.world.viewer)}
    assert listed[day.name].usage == shown.usage
    assert listed[week.name].usage.cost_micros == 700
    week_start = listed[week.name].usage.period_start_time.ToDatetime(dt.UTC)
    assert week_start == dt.datetime(2026, 11, 23, tzinfo=dt.UTC)  # its Monday
    assert listed[total.name].usage.output_tokens == 12
    assert not listed[total.name].usage.HasField("reset_time")
    assert listed[per_run.name].usage == pb.BudgetUsage()

    # The next day starts empty.
    d.budgets.clock = lambda: at + dt.timedelta(days=1)
    assert (await get(d, day.name)).usage.cost_micros == 0
    # Deleting the budget deletes its windows.
    await delete(d, day.name)
    async with d.server.shared.database.sessions() as db:
        left = (await db.execute(BudgetWindowRow.__table__.select())).all()
    assert sorted(r.budget_id for r in left) == ["total", "week"]
