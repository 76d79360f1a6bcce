"""Helpers for IntegrationService tests: a stub, builders, a mesh that may reach loopback."""

from __future__ import annotations

import base64
import dataclasses
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeAlias

from google.protobuf import duration_pb2, field_mask_pb2
from grpc import aio

from switchboard.api.integration.v1 import integration_pb2 as ipb
from switchboard.api.integration.v1 import integration_pb2_grpc
from switchboard.integration.store import IntegrationRecord
from switchboard.mesh import create_server
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.values.names import now
from tests.conftest import CALL_DEADLINE_S, make_settings
from tests.kits.contextkit import Caller, World, context_stub, ctx_world

Stub: TypeAlias = "integration_pb2_grpc.IntegrationServiceAsyncStub"


def integration_stub(channel: aio.Channel) -> Stub:
    return integration_pb2_grpc.IntegrationServiceStub(channel)


def webhook_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


def expert(endpoint: str = "127.0.0.1:1", **fields: Any) -> ipb.Integration:
    fields.setdefault("display_name", "Expert")
    return ipb.Integration(kind=ipb.INTEGRATION_KIND_GRPC_HANDLER, endpoint=endpoint, **fields)


def integration_record(**changes: Any) -> IntegrationRecord:
    """An integration as the store hands it out: a gRPC expert ``w/i`` never probed,
    with ``changes``."""
    stamp = now()
    made = IntegrationRecord(
        workspace_id="w",
        id="i",
        kind=ipb.INTEGRATION_KIND_GRPC_HANDLER,
        display_name="I",
        endpoint="127.0.0.1:50051",
        call_timeout_ms=0,
        config=b"",
        event_types=(),
        credential=None,
        previous_credential=None,
        previous_until=None,
        disabled=False,
        creator="users/u",
        created_at=stamp,
        updated_at=stamp,
        version=1,
        health=0,
        health_since=None,
        last_probe_at=None,
        last_error=b"",
        failures=0,
    )
    return dataclasses.replace(made, **changes)


def mcp(endpoint: str = "http://127.0.0.1:1/mcp", **fields: Any) -> ipb.Integration:
    return ipb.Integration(kind=ipb.INTEGRATION_KIND_MCP_SERVER, endpoint=endpoint, **fields)


async def update_integration(
    stub: Stub, world: World, integration: ipb.Integration, *paths: str
) -> ipb.Integration:
    """UpdateIntegration by the workspace's owner, changing ``paths``."""
    response = await stub.UpdateIntegration(
        ipb.UpdateIntegrationRequest(
            integration=integration, update_mask=field_mask_pb2.FieldMask(paths=list(paths))
        ),
        metadata=world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    return response.integration


async def list_integrations(stub: Stub, world: World) -> list[ipb.Integration]:
    """The workspace's integrations, as a viewer lists them (one page)."""
    page = await stub.ListIntegrations(
        ipb.ListIntegrationsRequest(parent=world.name),
        metadata=world.viewer.md,
        timeout=CALL_DEADLINE_S,
    )
    return list(page.integrations)


@asynccontextmanager
async def hub_world(database_url: str) -> AsyncIterator[tuple[SwitchboardServer, Stub, World]]:
    """A server on ``database_url``, an integration stub and a workspace with its members."""
    async with hub_mesh(database_url=database_url) as (server, channel):
        world = await ctx_world(server, context_stub(channel))
        yield server, integration_stub(channel), world


def webhook(endpoint: str = "http://127.0.0.1:1/hook", **fields: Any) -> ipb.Integration:
    fields.setdefault("credential", webhook_secret())
    return ipb.Integration(kind=ipb.INTEGRATION_KIND_WEBHOOK, endpoint=endpoint, **fields)


def seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


async def create(
    stub: Stub,
    caller: Caller,
    parent: str,
    integration: ipb.Integration,
    *,
    integration_id: str = "",
    request_id: str = "",
) -> ipb.Integration:
    response = await stub.CreateIntegration(
        ipb.CreateIntegrationRequest(
            parent=parent,
            integration=integration,
            integration_id=integration_id,
            request_id=request_id,
        ),
        metadata=caller.md,
        timeout=CALL_DEADLINE_S,
    )
    return response.integration


@asynccontextmanager
async def hub_mesh(**overrides: Any) -> AsyncIterator[tuple[SwitchboardServer, aio.Channel]]:
    """A mesh whose integrations may reach loopback; probes only when a test asks."""
    values: dict[str, Any] = {
        "egress_allow_loopback": True,
        "integration_probe_interval_s": 0,
    }
    values.update(overrides)
    server, _ = await create_server(make_settings(**values))
    await server.start()
    try:
        async with aio.insecure_channel(server.address) as channel:
            yield server, channel
    finally:
        await server.shutdown(grace=0)


@dataclass(frozen=True)
class McpHub:
    """A mesh with a populated workspace and one MCP integration in it."""

    stub: Stub
    world: World
    integration: str
    channel: aio.Channel


@asynccontextmanager
async def mcp_hub(endpoint: str, credential: str = "", **overrides: Any) -> AsyncIterator[McpHub]:
    """``hub_mesh`` with a world whose owner registered the MCP server at ``endpoint``
    as ``integrations/mcp`` (so a model calls its tools ``mcp__<tool>``)."""
    async with hub_mesh(**overrides) as (server, channel):
        world = await ctx_world(server, context_stub(channel))
        stub = integration_stub(channel)
        made = await create(
            stub,
            world.owner,
            world.name,
            ipb.Integration(
                kind=ipb.INTEGRATION_KIND_MCP_SERVER,
                endpoint=endpoint,
                display_name="MCP",
                credential=credential,
            ),
            integration_id="mcp",
        )
        yield McpHub(stub, world, made.name, channel)
