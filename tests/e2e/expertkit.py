"""What the tests of experts and A2A agents registered at run time share: a server whose
prober waits to be asked, its integration stub and workspace, what its dispatcher lists,
(two processes scaled out: ``procs.scaled_env``).

A test module binds the fixtures under the names its tests take:
    served, istub, world = served_fixture, istub_fixture, world_fixture
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from grpc import aio

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.platform.rpc.server import SwitchboardServer
from tests.conftest import CALL_DEADLINE_S
from tests.kits.contextkit import Stub as CStub
from tests.kits.contextkit import World, ctx_world
from tests.kits.dispatchkit import Stub as DStub
from tests.kits.dispatchkit import limited
from tests.kits.integrationkit import Stub as IStub
from tests.kits.integrationkit import integration_stub

POLL_S = 0.05

Served = tuple[SwitchboardServer, CStub, DStub]


@pytest.fixture
async def served_fixture() -> AsyncIterator[Served]:
    # Probes only when a test asks: these tests watch routing, not the prober.
    async with limited(egress_allow_loopback=True, integration_probe_interval_s=0) as found:
        yield found


@pytest.fixture
async def istub_fixture(served: Served) -> AsyncIterator[IStub]:
    async with aio.insecure_channel(served[0].address) as channel:
        yield integration_stub(channel)


@pytest.fixture
async def world_fixture(served: Served) -> World:
    server, cstub, _ = served
    return await ctx_world(server, cstub)


async def listed(dstub: DStub, world: World, workspace: str = "") -> dict[str, pb.Handler]:
    response = await dstub.ListHandlers(
        pb.ListHandlersRequest(parent=workspace or world.name, page_size=100),
        metadata=world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    return {h.name: h for h in response.handlers}


async def until_listed(
    dstub: DStub, world: World, name: str, *, available: bool | None
) -> pb.Handler | None:
    """Poll ListHandlers until ``name`` is listed with ``available`` (None: until it is
    not listed). Another process's channel and the event relay change it: nothing to await."""
    async with asyncio.timeout(CALL_DEADLINE_S):
        while True:
            found = (await listed(dstub, world)).get(name)
            if available is None and found is None:
                return None
            if found is not None and found.available == available:
                return found
            await asyncio.sleep(POLL_S)
