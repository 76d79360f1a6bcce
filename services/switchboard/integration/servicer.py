"""Transport for IntegrationService: converts proto to domain calls and nothing else.

``WatchIntegrations`` keeps its workspace authorized through an access grant
(``platform/security/accesswatch.py``), held by the hub (``IntegrationHub.watch_held``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from grpc import aio

from switchboard.api.integration.v1 import integration_pb2 as pb
from switchboard.api.integration.v1 import integration_pb2_grpc
from switchboard.integration.service import IntegrationHub
from switchboard.platform.security.accesswatch import AccessWatch
from switchboard.platform.security.authn import current_principal

SERVICE = pb.DESCRIPTOR.services_by_name["IntegrationService"]

Context = aio.ServicerContext[Any, Any]


class IntegrationServiceServicer(integration_pb2_grpc.IntegrationServiceServicer):
    def __init__(self, hub: IntegrationHub, access: AccessWatch) -> None:
        self._hub = hub
        self._access = access

    async def CreateIntegration(
        self, request: pb.CreateIntegrationRequest, context: Context
    ) -> pb.CreateIntegrationResponse:
        integration = await self._hub.create(current_principal(), request)
        return pb.CreateIntegrationResponse(integration=integration)

    async def GetIntegration(
        self, request: pb.GetIntegrationRequest, context: Context
    ) -> pb.GetIntegrationResponse:
        return pb.GetIntegrationResponse(integration=await self._hub.get(request.name))

    async def ListIntegrations(
        self, request: pb.ListIntegrationsRequest, context: Context
    ) -> pb.ListIntegrationsResponse:
        return await self._hub.list_integrations(request)

    async def UpdateIntegration(
        self, request: pb.UpdateIntegrationRequest, context: Context
    ) -> pb.UpdateIntegrationResponse:
        integration = await self._hub.update(current_principal(), request)
        return pb.UpdateIntegrationResponse(integration=integration)

    async def DeleteIntegration(
        self, request: pb.DeleteIntegrationRequest, context: Context
    ) -> pb.DeleteIntegrationResponse:
        await self._hub.delete(current_principal(), request.name, request.etag)
        return pb.DeleteIntegrationResponse()

    async def WatchIntegrations(
        self, request: pb.WatchIntegrationsRequest, context: Context
    ) -> AsyncIterator[pb.WatchIntegrationsResponse]:
        frames = self._hub.watch_held(self._access, current_principal(), request.parent)
        # Closed with this call, not left to the collector: its grant closes now.
        async with contextlib.aclosing(frames):
            async for frame in frames:
                yield frame

    async def ListTools(
        self, request: pb.ListToolsRequest, context: Context
    ) -> pb.ListToolsResponse:
        return await self._hub.list_tools(request)

    async def InvokeTool(
        self, request: pb.InvokeToolRequest, context: Context
    ) -> pb.InvokeToolResponse:
        return await self._hub.invoke_tool(
            current_principal(), request, deadline_s=context.time_remaining()
        )

    async def ListWebhookDeliveries(
        self, request: pb.ListWebhookDeliveriesRequest, context: Context
    ) -> pb.ListWebhookDeliveriesResponse:
        return await self._hub.list_deliveries(request)

    async def RedeliverWebhook(
        self, request: pb.RedeliverWebhookRequest, context: Context
    ) -> pb.RedeliverWebhookResponse:
        return pb.RedeliverWebhookResponse(delivery=await self._hub.redeliver(request.name))
