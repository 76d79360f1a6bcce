"""Retry-safe integrations and tools (docs/integration.md, "Idempotency keys and
retry-safe tools"): ``retry_safe`` and ``retry_safe_tools`` stored with the
integration, returned by Get, List and in its events, set on create and changed by
UpdateIntegration's mask; every bad entry named as a field violation with nothing
stored. Each test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc import aio
from sqlalchemy import select

from switchboard.api.events.v1 import events_pb2
from switchboard.api.integration.v1 import integration_pb2 as ipb
from switchboard.integration.service import MAX_RETRY_SAFE_TOOLS
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.store.models import IntegrationRow
from tests.conftest import CALL_DEADLINE_S
from tests.kits.authkit import detail
from tests.kits.contextkit import World, refused, tap, violations
from tests.kits.integrationkit import (
    Stub,
    create,
    expert,
    hub_world,
    list_integrations,
    mcp,
    update_integration,
    webhook,
)

pytestmark = pytest.mark.service

CODE = grpc.StatusCode
TOOLS = "integration.retry_safe_tools"
SEGMENT_RULE = "must be a tool's segment as ListTools names it"
DUPLICATE = "names a tool an earlier entry names"


@pytest.fixture
async def hub(database_url: str) -> AsyncIterator[tuple[SwitchboardServer, Stub, World]]:
    async with hub_world(database_url) as found:
        yield found


async def _stored(server: SwitchboardServer) -> list[tuple[str, bool, str]]:
    async with server.shared.database.readers() as session:
        rows = await session.execute(
            select(
                IntegrationRow.id, IntegrationRow.retry_safe, IntegrationRow.retry_safe_tools
            ).order_by(IntegrationRow.id)
        )
        return [(row[0], bool(row[1]), row[2]) for row in rows]


def _said(error: aio.AioRpcError) -> list[tuple[str, str]]:
    bad: error_details_pb2.BadRequest = detail(error, error_details_pb2.BadRequest)
    return [(v.field, v.description) for v in bad.field_violations]


async def test_retry_safety_is_stored_returned_listed_changed_and_announced(
    hub: tuple[SwitchboardServer, Stub, World],
) -> None:
    server, stub, world = hub
    tools = ["charge-card", "with~20space", "x" * 128]
    with tap(server) as events:
        made = await create(
            stub,
            world.owner,
            world.name,
            mcp(retry_safe_tools=tools, call_price_micros=7),
            integration_id="pay",
        )
        assert (made.retry_safe, list(made.retry_safe_tools)) == (False, tools)
        got = await stub.GetIntegration(
            ipb.GetIntegrationRequest(name=made.name),
            metadata=world.viewer.md,
            timeout=CALL_DEADLINE_S,
        )
        assert got.integration == made
        assert await list_integrations(stub, world) == [made]
        # The whole integration: the tools named stay.
        safe = await update_integration(
            stub,
            world,
            ipb.Integration(name=made.name, etag=made.etag, retry_safe=True),
            "retry_safe",
        )
        assert (safe.retry_safe, list(safe.retry_safe_tools)) == (True, tools)
        # The list is replaced whole, in its order; the flag and the price stay.
        replaced = await update_integration(
            stub,
            world,
            ipb.Integration(name=made.name, retry_safe_tools=["refund", "charge-card"]),
            "retry_safe_tools",
        )
        assert (replaced.retry_safe, list(replaced.retry_safe_tools)) == (
            True,
            ["refund", "charge-card"],
        )
        assert replaced.call_price_micros == 7
        # No mask: the fields the request sets.
        unmasked = await update_integration(
            stub, world, ipb.Integration(name=made.name, retry_safe_tools=["echo"])
        )
        assert (unmasked.retry_safe, list(unmasked.retry_safe_tools)) == (True, ["echo"])
        # Not safe again: both in the mask and unset.
        unsafe = await update_integration(
            stub, world, ipb.Integration(name=made.name), "retry_safe", "retry_safe_tools"
        )
        assert (unsafe.retry_safe, list(unsafe.retry_safe_tools)) == (False, [])
        announced = [
            (
                e.integration_changed.integration.retry_safe,
                list(e.integration_changed.integration.retry_safe_tools),
            )
            for e in events.take()
            if e.type == events_pb2.EVENT_TYPE_INTEGRATION_CHANGED
        ]
    assert announced == [
        (False, tools),
        (True, tools),
        (True, ["refund", "charge-card"]),
        (True, ["echo"]),
        (False, []),
    ]
    assert await _stored(server) == [("pay", False, "")]


async def test_every_kind_may_be_retry_safe_and_none_is_by_default(
    hub: tuple[SwitchboardServer, Stub, World],
) -> None:
    server, stub, world = hub
    plain = await create(stub, world.owner, world.name, mcp(), integration_id="plain")
    sage = await create(
        stub, world.owner, world.name, expert(retry_safe=True), integration_id="sage"
    )
    # A webhook may offer tools (declared in its config); its safety is said the same way.
    hook = await create(
        stub,
        world.owner,
        world.name,
        webhook(retry_safe_tools=["notify"]),
        integration_id="hook",
    )
    assert (plain.retry_safe, list(plain.retry_safe_tools)) == (False, [])
    assert (sage.retry_safe, list(sage.retry_safe_tools)) == (True, [])
    assert (hook.retry_safe, list(hook.retry_safe_tools)) == (False, ["notify"])
    assert await list_integrations(stub, world) == [plain, sage, hook]
    assert await _stored(server) == [
        ("hook", False, "notify"),
        ("plain", False, ""),
        ("sage", True, ""),
    ]


async def test_the_contract_s_most_retry_safe_tools_are_accepted(
    hub: tuple[SwitchboardServer, Stub, World],
) -> None:
    _, stub, world = hub
    tools = [f"tool-{i}" for i in range(MAX_RETRY_SAFE_TOOLS)]
    made = await create(stub, world.owner, world.name, mcp(retry_safe_tools=tools))
    assert list(made.retry_safe_tools) == tools


@pytest.mark.parametrize(
    ("tools", "said"),
    [
        (
            [f"t{i}" for i in range(MAX_RETRY_SAFE_TOOLS + 1)],
            [(TOOLS, f"may name at most {MAX_RETRY_SAFE_TOOLS} tools")],
        ),
        # Entries that are no segment ListTools writes: empty, over 128 bytes, a byte
        # that must be escaped, an escape of a byte that must not be, lower-case hex.
        ([""], [(f"{TOOLS}[0]", SEGMENT_RULE)]),
        (["ok", "x" * 129], [(f"{TOOLS}[1]", SEGMENT_RULE)]),
        (["a/b"], [(f"{TOOLS}[0]", SEGMENT_RULE)]),
        (["with space"], [(f"{TOOLS}[0]", SEGMENT_RULE)]),
        (["ünï"], [(f"{TOOLS}[0]", SEGMENT_RULE)]),
        (["~41"], [(f"{TOOLS}[0]", SEGMENT_RULE)]),
        (["a~2fb"], [(f"{TOOLS}[0]", SEGMENT_RULE)]),
        # The same tool twice: the later entry is named.
        (["echo", "refund", "echo"], [(f"{TOOLS}[2]", DUPLICATE)]),
        # Every bad one at once, in order.
        (
            ["a b", "echo", "", "echo"],
            [
                (f"{TOOLS}[0]", SEGMENT_RULE),
                (f"{TOOLS}[2]", SEGMENT_RULE),
                (f"{TOOLS}[3]", DUPLICATE),
            ],
        ),
    ],
)
async def test_bad_retry_safe_tools_are_named_and_nothing_is_stored(
    hub: tuple[SwitchboardServer, Stub, World], tools: list[str], said: list[tuple[str, str]]
) -> None:
    server, stub, world = hub
    error = await refused(
        create(stub, world.owner, world.name, mcp(retry_safe=True, retry_safe_tools=tools)),
        CODE.INVALID_ARGUMENT,
    )
    found = _said(error)
    assert [field for field, _ in found] == [field for field, _ in said]
    for (_, description), (_, expected) in zip(found, said, strict=True):
        assert description.startswith(expected), description
    assert await list_integrations(stub, world) == []
    assert await _stored(server) == []


async def test_a_bad_retry_safe_tool_in_an_update_changes_nothing(
    hub: tuple[SwitchboardServer, Stub, World],
) -> None:
    server, stub, world = hub
    made = await create(
        stub, world.owner, world.name, mcp(retry_safe_tools=["echo"]), integration_id="tools"
    )
    cases: list[tuple[ipb.Integration, tuple[str, ...], list[str]]] = [
        (
            ipb.Integration(
                name=made.name, retry_safe=True, retry_safe_tools=["a/b"], display_name="Renamed"
            ),
            ("retry_safe", "retry_safe_tools", "display_name"),
            [f"{TOOLS}[0]"],
        ),
        (
            ipb.Integration(name=made.name, retry_safe_tools=["echo", "echo"]),
            (),
            [f"{TOOLS}[1]"],
        ),
        (
            ipb.Integration(
                name=made.name,
                retry_safe_tools=[f"t{i}" for i in range(MAX_RETRY_SAFE_TOOLS + 1)],
                call_price_micros=-1,
            ),
            ("retry_safe_tools", "call_price_micros"),
            ["integration.call_price_micros", TOOLS],
        ),
    ]
    with tap(server) as events:
        for integration, paths, fields in cases:
            error = await refused(
                update_integration(stub, world, integration, *paths), CODE.INVALID_ARGUMENT
            )
            assert violations(error) == fields, paths
        assert not [
            e
            for e in events.take()
            if e.type == events_pb2.EVENT_TYPE_INTEGRATION_CHANGED
            and e.integration_changed.change != events_pb2.CHANGE_KIND_CREATED
        ]
    assert await list_integrations(stub, world) == [made]
    assert await _stored(server) == [("tools", False, "echo")]
