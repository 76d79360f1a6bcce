"""Tool call prices on integrations (docs/integration.md "Prices"): stored with the
integration, returned by Get, List and Watch and in its events, set on create and
changed by UpdateIntegration's mask; every bad price or key named as a field
violation with nothing stored. Each test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from grpc import aio
from sqlalchemy import select

from switchboard.api.events.v1 import events_pb2
from switchboard.api.integration.v1 import integration_pb2 as ipb
from switchboard.integration.service import MAX_CALL_PRICE_MICROS, MAX_TOOL_PRICES
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.store.models import IntegrationRow
from tests.conftest import CALL_DEADLINE_S
from tests.kits.contextkit import World, context_stub, ctx_world, refused, tap, violations
from tests.kits.integrationkit import (
    Stub,
    create,
    expert,
    hub_mesh,
    integration_stub,
    list_integrations,
    mcp,
    update_integration,
    webhook,
)
from tests.kits.modulekit import module_database_url_fixture

# One server per backend for the module (starting one per test was most of the module's
# time); each test prices integrations of a workspace of its own, and reads back that
# workspace's rows.
pytestmark = [pytest.mark.service, pytest.mark.asyncio(loop_scope="module")]

CODE = grpc.StatusCode
PRICES = "integration.tool_call_price_micros"


module_database_url = module_database_url_fixture


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def hub_server(
    module_database_url: str,
) -> AsyncIterator[tuple[SwitchboardServer, aio.Channel]]:
    async with hub_mesh(database_url=module_database_url) as served:
        yield served


@pytest_asyncio.fixture(loop_scope="module")
async def hub(
    hub_server: tuple[SwitchboardServer, aio.Channel],
) -> tuple[SwitchboardServer, Stub, World]:
    """The module's server, an integration stub to it, and a workspace of this test's own."""
    server, channel = hub_server
    world = await ctx_world(server, context_stub(channel))
    return server, integration_stub(channel), world


async def _stored(server: SwitchboardServer, world: World | None) -> list[tuple[str, int, str]]:
    """The integrations' rows of ``world``'s workspace (None: of every workspace)."""
    query = select(
        IntegrationRow.id, IntegrationRow.call_price_micros, IntegrationRow.tool_call_prices
    ).order_by(IntegrationRow.workspace_id, IntegrationRow.id)
    if world is not None:
        query = query.where(IntegrationRow.workspace_id == world.id)
    async with server.shared.database.readers() as session:
        rows = await session.execute(query)
        return [(row[0], row[1], row[2]) for row in rows]


async def test_prices_are_stored_returned_listed_changed_and_announced(
    hub: tuple[SwitchboardServer, Stub, World],
) -> None:
    server, stub, world = hub
    tools = {"get-sum": 10_000, "echo": 0, "with~20space": 7, "x" * 128: MAX_CALL_PRICE_MICROS}
    with tap(server) as events:
        made = await create(
            stub,
            world.owner,
            world.name,
            mcp(call_price_micros=2_500, tool_call_price_micros=tools),
            integration_id="priced",
        )
        assert made.call_price_micros == 2_500
        assert dict(made.tool_call_price_micros) == tools
        got = await stub.GetIntegration(
            ipb.GetIntegrationRequest(name=made.name),
            metadata=world.viewer.md,
            timeout=CALL_DEADLINE_S,
        )
        assert got.integration == made
        assert await list_integrations(stub, world) == [made]
        # The default alone: the per-tool prices stay.
        cheaper = await update_integration(
            stub,
            world,
            ipb.Integration(name=made.name, etag=made.etag, call_price_micros=1),
            "call_price_micros",
        )
        assert cheaper.call_price_micros == 1
        assert dict(cheaper.tool_call_price_micros) == tools
        # The map is replaced whole; the default stays.
        replaced = await update_integration(
            stub,
            world,
            ipb.Integration(name=made.name, tool_call_price_micros={"get-sum": 3}),
            "tool_call_price_micros",
        )
        assert (replaced.call_price_micros, dict(replaced.tool_call_price_micros)) == (
            1,
            {"get-sum": 3},
        )
        # No mask: the fields the request sets.
        unmasked = await update_integration(
            stub, world, ipb.Integration(name=made.name, tool_call_price_micros={"echo": 9})
        )
        assert (unmasked.call_price_micros, dict(unmasked.tool_call_price_micros)) == (
            1,
            {"echo": 9},
        )
        # Free again: both in the mask and empty.
        free = await update_integration(
            stub,
            world,
            ipb.Integration(name=made.name),
            "call_price_micros",
            "tool_call_price_micros",
        )
        assert (free.call_price_micros, dict(free.tool_call_price_micros)) == (0, {})
        announced = [
            (
                e.integration_changed.integration.call_price_micros,
                dict(e.integration_changed.integration.tool_call_price_micros),
            )
            for e in events.take()
            # Another test's events may reach the module's bus late (the outbox).
            if e.type == events_pb2.EVENT_TYPE_INTEGRATION_CHANGED
            and e.integration_changed.integration.name == made.name
        ]
    assert announced == [
        (2_500, tools),
        (1, tools),
        (1, {"get-sum": 3}),
        (1, {"echo": 9}),
        (0, {}),
    ]
    assert await _stored(server, world) == [("priced", 0, "")]


async def test_an_integration_without_prices_is_free_and_an_expert_may_be_priced(
    hub: tuple[SwitchboardServer, Stub, World],
) -> None:
    server, stub, world = hub
    free = await create(stub, world.owner, world.name, mcp(), integration_id="free")
    priced = await create(
        stub,
        world.owner,
        world.name,
        expert(call_price_micros=40, tool_call_price_micros={"handle": 50}),
        integration_id="sage",
    )
    assert (free.call_price_micros, dict(free.tool_call_price_micros)) == (0, {})
    assert (priced.call_price_micros, dict(priced.tool_call_price_micros)) == (40, {"handle": 50})
    assert await list_integrations(stub, world) == [free, priced]
    assert await _stored(server, world) == [("free", 0, ""), ("sage", 40, '{"handle":50}')]


async def test_the_contract_s_most_tool_prices_are_accepted(
    hub: tuple[SwitchboardServer, Stub, World],
) -> None:
    _, stub, world = hub
    tools = {f"tool-{i}": i for i in range(MAX_TOOL_PRICES)}
    made = await create(stub, world.owner, world.name, mcp(tool_call_price_micros=tools))
    assert dict(made.tool_call_price_micros) == tools


_KEY_RULE = "must be a tool's segment as ListTools names it"


@pytest.mark.parametrize(
    ("integration", "fields"),
    [
        (mcp(call_price_micros=-1), ["integration.call_price_micros"]),
        (mcp(call_price_micros=MAX_CALL_PRICE_MICROS + 1), ["integration.call_price_micros"]),
        (mcp(tool_call_price_micros={"echo": -5}), [f"{PRICES}[echo]"]),
        (
            mcp(tool_call_price_micros={"echo": MAX_CALL_PRICE_MICROS + 1}),
            [f"{PRICES}[echo]"],
        ),
        (
            mcp(tool_call_price_micros={f"t{i}": 1 for i in range(MAX_TOOL_PRICES + 1)}),
            [PRICES],
        ),
        # Keys that are no segment ListTools writes: empty, over 128 bytes, a byte
        # that must be escaped, an escape of a byte that must not be, lower-case hex.
        (mcp(tool_call_price_micros={"": 1}), [f"{PRICES}[]"]),
        (mcp(tool_call_price_micros={"x" * 129: 1}), [f"{PRICES}[{'x' * 129}]"]),
        (mcp(tool_call_price_micros={"a/b": 1}), [f"{PRICES}[a/b]"]),
        (mcp(tool_call_price_micros={"with space": 1}), [f"{PRICES}[with space]"]),
        (mcp(tool_call_price_micros={"ünï": 1}), [f"{PRICES}[ünï]"]),
        (mcp(tool_call_price_micros={"~41": 1}), [f"{PRICES}[~41]"]),
        (mcp(tool_call_price_micros={"a~2fb": 1}), [f"{PRICES}[a~2fb]"]),
        # A key too long to quote is cut in the path.
        (mcp(tool_call_price_micros={"y" * 1000: 1}), [f"{PRICES}[{'y' * 160}...]"]),
        # Webhook tools are not priced.
        (webhook(call_price_micros=1), ["integration.call_price_micros"]),
        (webhook(tool_call_price_micros={"echo": 1}), [PRICES]),
        # Every bad one at once, keys in order.
        (
            mcp(
                call_price_micros=-1,
                tool_call_price_micros={"ok": 1, "b": -1, "a b": 1, "c": MAX_CALL_PRICE_MICROS + 1},
            ),
            ["integration.call_price_micros", f"{PRICES}[a b]", f"{PRICES}[b]", f"{PRICES}[c]"],
        ),
    ],
)
async def test_bad_prices_are_named_and_nothing_is_stored(
    hub: tuple[SwitchboardServer, Stub, World], integration: ipb.Integration, fields: list[str]
) -> None:
    server, stub, world = hub
    # Nothing else writes integrations while a test of the module runs (no probes).
    before = await _stored(server, None)
    error = await refused(create(stub, world.owner, world.name, integration), CODE.INVALID_ARGUMENT)
    assert violations(error) == fields
    assert await list_integrations(stub, world) == []
    assert await _stored(server, world) == []
    assert await _stored(server, None) == before


async def test_a_bad_price_in_an_update_changes_nothing(
    hub: tuple[SwitchboardServer, Stub, World],
) -> None:
    server, stub, world = hub
    made = await create(
        stub,
        world.owner,
        world.name,
        mcp(call_price_micros=5, tool_call_price_micros={"echo": 6}),
        integration_id="priced",
    )
    hook = await create(stub, world.owner, world.name, webhook(), integration_id="hook")
    cases: list[tuple[ipb.Integration, tuple[str, ...], list[str]]] = [
        (
            ipb.Integration(name=made.name, call_price_micros=-1, display_name="Renamed"),
            ("call_price_micros", "display_name"),
            ["integration.call_price_micros"],
        ),
        (
            ipb.Integration(name=made.name, tool_call_price_micros={"a/b": 1, "echo": -1}),
            ("tool_call_price_micros",),
            [f"{PRICES}[a/b]", f"{PRICES}[echo]"],
        ),
        (
            ipb.Integration(
                name=made.name,
                tool_call_price_micros={f"t{i}": 1 for i in range(MAX_TOOL_PRICES + 1)},
            ),
            (),
            [PRICES],
        ),
        (
            ipb.Integration(name=hook.name, call_price_micros=3),
            ("call_price_micros",),
            ["integration.call_price_micros"],
        ),
    ]
    with tap(server) as events:
        for integration, paths, fields in cases:
            error = await refused(
                update_integration(stub, world, integration, *paths), CODE.INVALID_ARGUMENT
            )
            assert violations(error) == fields, paths
        # Only a change would say so: on PostgreSQL the creations' own events reach the
        # bus through the outbox, and may do so after the tap was attached.
        assert not [
            e
            for e in events.take()
            if e.type == events_pb2.EVENT_TYPE_INTEGRATION_CHANGED
            and e.integration_changed.change != events_pb2.CHANGE_KIND_CREATED
            # Another test's events may reach the module's bus late (the outbox).
            and e.integration_changed.integration.name in (made.name, hook.name)
        ]
    assert await list_integrations(stub, world) == [made, hook]
    assert await _stored(server, world) == [("hook", 0, ""), ("priced", 5, '{"echo":6}')]
