"""What a benchmark creates through the RPCs before it measures: an account, workspaces,
conversations, integrations."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Final

from grpc import aio

from bench.harness import bearer, gather_limited
from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.api.context.v1 import context_pb2, context_pb2_grpc
from switchboard.api.integration.v1 import integration_pb2, integration_pb2_grpc

#: Every benchmark account's password (bench/target.py's account, whose email is BENCH_EMAIL).
PASSWORD: Final = "measured many times 123"  # noqa: S105 - a throwaway benchmark account
BENCH_EMAIL: Final = "bench@example.com"


@dataclass(frozen=True)
class Account:
    token: str
    user: str  # users/{id}

    @property
    def metadata(self) -> tuple[tuple[str, str]]:
        return bearer(self.token)


async def register(channel: aio.Channel, email: str) -> Account:
    auth = auth_pb2_grpc.AuthServiceStub(channel)
    response = await auth.Register(
        auth_pb2.RegisterRequest(email=email, password=PASSWORD, display_name="Bench"),
        timeout=60,
    )
    return Account(token=response.tokens.access_token, user=response.user.name)


async def create_workspace(
    channel: aio.Channel, account: Account, workspace_id: str, display_name: str = ""
) -> str:
    """The workspace's name (``display_name``: its id unless given)."""
    stub = context_pb2_grpc.ContextServiceStub(channel)
    response = await stub.CreateWorkspace(
        context_pb2.CreateWorkspaceRequest(
            workspace=context_pb2.Workspace(display_name=display_name or workspace_id),
            workspace_id=workspace_id,
        ),
        metadata=account.metadata,
        timeout=30,
    )
    return response.workspace.name


async def create_conversations(
    channel: aio.Channel, account: Account, parents: list[str], title: str = "Conversation {}"
) -> list[str]:
    """A conversation in each of ``parents`` (workspaces), titled ``title.format(index)``."""
    stub = context_pb2_grpc.ContextServiceStub(channel)

    async def one(index: int, parent: str) -> str:
        response = await stub.CreateConversation(
            context_pb2.CreateConversationRequest(
                parent=parent, conversation=context_pb2.Conversation(title=title.format(index))
            ),
            metadata=account.metadata,
            timeout=30,
        )
        return response.conversation.name

    return await gather_limited(
        [functools.partial(one, index, parent) for index, parent in enumerate(parents)]
    )


async def create_integration(
    channel: aio.Channel, account: Account, workspace: str, integration_id: str, **fields: Any
) -> str:
    stub = integration_pb2_grpc.IntegrationServiceStub(channel)
    response = await stub.CreateIntegration(
        integration_pb2.CreateIntegrationRequest(
            parent=workspace,
            integration_id=integration_id,
            integration=integration_pb2.Integration(**fields),
        ),
        metadata=account.metadata,
        timeout=30,
    )
    return response.integration.name
