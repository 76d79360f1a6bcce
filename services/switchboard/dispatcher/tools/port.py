"""How the dispatcher reaches tools: through the integration hub's contract only.

The run's tool calls and the tool lists offered to its model are the hub's
own ``ListToolsRequest``/``InvokeToolRequest`` messages, answered by the hub's
domain object in this process (every process builds the hub: decision 27).
Authorization is the run's user's, checked here as the hub's servicer would
check a client (READ to list an integration's tools, WRITE to call one), so a
run can do with tools exactly what its user could do with InvokeTool.
"""

from __future__ import annotations

from typing import Protocol

from switchboard.api.integration.v1 import integration_pb2 as ipb
from switchboard.platform.security.policy import Permission, Policy, Principal

#: Most tools listed from one integration for one run (the hub's page limit).
_PAGE: int = 200
#: Pages read from one integration before the list is cut (1,000 tools).
_MAX_PAGES: int = 5


class ToolHub(Protocol):
    """What ``LocalTools`` needs of the integration hub's domain object."""

    async def get(self, name: str) -> ipb.Integration: ...

    async def list_tools(self, request: ipb.ListToolsRequest) -> ipb.ListToolsResponse: ...

    async def invoke_tool(
        self,
        principal: Principal,
        request: ipb.InvokeToolRequest,
        *,
        deadline_s: float | None = None,
        run: str = "",
    ) -> ipb.InvokeToolResponse: ...


class ToolPort(Protocol):
    async def integration(self, principal: Principal, name: str) -> ipb.Integration: ...

    async def tools(self, principal: Principal, integration: str) -> list[ipb.Tool]: ...

    async def invoke(
        self,
        principal: Principal,
        request: ipb.InvokeToolRequest,
        *,
        deadline_s: float,
        run: str,
    ) -> ipb.InvokeToolResponse: ...


class LocalTools:
    def __init__(self, hub: ToolHub, policy: Policy) -> None:
        self._hub = hub
        self._policy = policy

    async def integration(self, principal: Principal, name: str) -> ipb.Integration:
        await self._policy.authorize(principal, name, Permission.READ, "integration")
        return await self._hub.get(name)

    async def tools(self, principal: Principal, integration: str) -> list[ipb.Tool]:
        """Every tool the integration offers now (the hub caches the list)."""
        await self._policy.authorize(principal, integration, Permission.READ, "integration")
        found: list[ipb.Tool] = []
        token = ""
        for _ in range(_MAX_PAGES):
            page = await self._hub.list_tools(
                ipb.ListToolsRequest(parent=integration, page_size=_PAGE, page_token=token)
            )
            found.extend(page.tools)
            token = page.next_page_token
            if not token:
                break
        return found

    async def invoke(
        self,
        principal: Principal,
        request: ipb.InvokeToolRequest,
        *,
        deadline_s: float,
        run: str,
    ) -> ipb.InvokeToolResponse:
        await self._policy.authorize(principal, request.name, Permission.WRITE, "tool")
        return await self._hub.invoke_tool(principal, request, deadline_s=deadline_s, run=run)
