"""How the dispatcher reaches the context service: through its contract only.

The dispatcher stores messages, reads context windows and reads the files a
window names (an image for a vision model) with the context service's own
request and response messages (``AppendMessageRequest``,
``GetContextWindowRequest``, ``DownloadFileRequest``); memory forming
(``memory/``) reads a workspace's memory policy and searches, lists, creates
and retires memory items as a run's creator. Two adapters carry them:

* ``LocalContext``: the context service runs in this process (the embedded
  default). The request goes straight to its domain object: the same
  validation, limits, events and cache as over gRPC, without a loopback
  call per message (decisions 19).
* ``RemoteContext``: the context service is another process (the mesh
  shape). The generated stub carries the request with an access token the
  dispatcher mints for the run's user and session from the shared key ring,
  so the context service authorizes the user itself, and the call's
  deadline is the run's.

A message that starts a write of the dispatcher's (a run's row) is appended with
``append_message_with``: in this process the write goes in the message's own
transaction (one commit for both, and neither without the other); across
processes it follows the stored message in a transaction of its own, as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from grpc import aio
from sqlalchemy.orm import Session

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.context.v1 import context_pb2_grpc
from switchboard.platform.errors import RequestTooLarge
from switchboard.platform.rpc.outbound.peers import PeerService, TokenIssuer
from switchboard.platform.security.policy import Principal, Role

_T = TypeVar("_T")


@dataclass(frozen=True)
class Started(Generic[_T]):
    """A write that a stored message starts: ``within`` the message's transaction
    where the context service shares this process's database, else ``alone``, in a
    transaction of its own once the message is stored. Both get the stored message."""

    within: Callable[[Session, cpb.Message], _T]
    alone: Callable[[cpb.Message], Awaitable[_T]]


class _Messages(Protocol):
    def append(
        self, principal: Principal, /, request: cpb.AppendMessageRequest
    ) -> Awaitable[cpb.Message]: ...

    def append_with(
        self,
        principal: Principal,
        /,
        request: cpb.AppendMessageRequest,
        after: Callable[[Session, cpb.Message], _T],
        *,
        message_id: str = "",
    ) -> Awaitable[tuple[cpb.Message, _T]]: ...

    def get(self, name: str) -> Awaitable[cpb.Message]: ...


class _Windows(Protocol):
    def window(
        self, principal: Principal, request: cpb.GetContextWindowRequest
    ) -> Awaitable[bytes]: ...


class _Conversations(Protocol):
    def get(self, name: str) -> Awaitable[cpb.Conversation]: ...

    def create(
        self, principal: Principal, request: cpb.CreateConversationRequest
    ) -> Awaitable[cpb.Conversation]: ...


class _Search(Protocol):
    def search_context(
        self, request: cpb.SearchContextRequest
    ) -> Awaitable[cpb.SearchContextResponse]: ...


class _Files(Protocol):
    def read_all(self, name: str, *, limit: int) -> Awaitable[bytes]: ...


class _Workspaces(Protocol):
    def get(self, role: Role | None, name: str) -> Awaitable[cpb.Workspace]: ...


class _Memory(Protocol):
    def create(
        self, principal: Principal, request: cpb.CreateMemoryItemRequest
    ) -> Awaitable[cpb.MemoryItem]: ...

    def get(self, name: str) -> Awaitable[cpb.MemoryItem]: ...

    def update(
        self, principal: Principal, request: cpb.UpdateMemoryItemRequest
    ) -> Awaitable[cpb.MemoryItem]: ...

    def list(
        self, request: cpb.ListMemoryItemsRequest
    ) -> Awaitable[cpb.ListMemoryItemsResponse]: ...

    def search(
        self, request: cpb.SearchMemoryItemsRequest
    ) -> Awaitable[cpb.SearchMemoryItemsResponse]: ...


class _Branches(Protocol):
    def create(
        self, principal: Principal, /, request: cpb.CreateBranchRequest
    ) -> Awaitable[cpb.CreateBranchResponse]: ...


class ContextDomain(Protocol):
    """What ``LocalContext`` needs of the context service's domain (``context/domain.py``)."""

    @property
    def messages(self) -> _Messages: ...

    @property
    def windows(self) -> _Windows: ...

    @property
    def conversations(self) -> _Conversations: ...

    @property
    def files(self) -> _Files: ...

    @property
    def search(self) -> _Search: ...

    @property
    def workspaces(self) -> _Workspaces: ...

    @property
    def memory(self) -> _Memory: ...

    @property
    def branches(self) -> _Branches: ...


class ContextPort(Protocol):
    #: Whether ``append_message_with`` runs its write in the message's own transaction
    #: (the context service is this process's, on its database).
    shares_transactions: bool

    async def append_message(
        self, principal: Principal, request: cpb.AppendMessageRequest, *, timeout_s: float
    ) -> cpb.Message: ...

    async def append_message_with(
        self,
        principal: Principal,
        request: cpb.AppendMessageRequest,
        started: Started[_T],
        *,
        timeout_s: float,
        message_id: str = "",
    ) -> tuple[cpb.Message, _T]:
        """The stored message and what ``started`` wrote with it. ``message_id``: the new
        message's id, chosen by the caller (where transactions are shared; else, and
        when the request id was seen before, the stored message's name says its own)."""
        ...

    async def window(
        self, principal: Principal, request: cpb.GetContextWindowRequest, *, timeout_s: float
    ) -> cpb.ContextWindow: ...

    async def conversation(
        self, principal: Principal, name: str, *, timeout_s: float
    ) -> cpb.Conversation: ...

    async def message(self, principal: Principal, name: str, *, timeout_s: float) -> cpb.Message:
        """A stored message (a delegate run's answer, read by the run that asked)."""
        ...

    async def create_branch(
        self, principal: Principal, request: cpb.CreateBranchRequest, *, timeout_s: float
    ) -> cpb.CreateBranchResponse:
        """A new active branch (a regenerated answer's, ending at the message answered)."""
        ...

    async def create_conversation(
        self, principal: Principal, request: cpb.CreateConversationRequest, *, timeout_s: float
    ) -> cpb.Conversation:
        """A new conversation (a schedule's), made as ``principal``; idempotent on the
        request's ``request_id``."""
        ...

    async def search(
        self, principal: Principal, request: cpb.SearchContextRequest, *, timeout_s: float
    ) -> cpb.SearchContextResponse:
        """SearchContext as ``principal`` (the ``search_memory`` tool, in the run's
        conversation, which the run's user was authorized to write)."""
        ...

    async def download(
        self, principal: Principal, name: str, *, limit: int, timeout_s: float
    ) -> bytes:
        """A stored file's whole content; RequestTooLarge beyond ``limit`` bytes,
        NotFound for a file that is gone."""
        ...

    async def workspace(
        self, principal: Principal, name: str, *, timeout_s: float
    ) -> cpb.Workspace:
        """A workspace as its member ``principal`` reads it (memory forming reads its
        ``memory_policy``)."""
        ...

    async def create_memory(
        self, principal: Principal, request: cpb.CreateMemoryItemRequest, *, timeout_s: float
    ) -> cpb.MemoryItem:
        """CreateMemoryItem as ``principal``: ALREADY_EXISTS for a ``memory_item_id``
        taken (memory forming applies its decisions idempotently by it)."""
        ...

    async def get_memory(
        self, principal: Principal, name: str, *, timeout_s: float
    ) -> cpb.MemoryItem: ...

    async def update_memory(
        self, principal: Principal, request: cpb.UpdateMemoryItemRequest, *, timeout_s: float
    ) -> cpb.MemoryItem:
        """UpdateMemoryItem as ``principal`` (memory forming retires items with it)."""
        ...

    async def list_memory(
        self, principal: Principal, request: cpb.ListMemoryItemsRequest, *, timeout_s: float
    ) -> cpb.ListMemoryItemsResponse: ...

    async def search_memory(
        self, principal: Principal, request: cpb.SearchMemoryItemsRequest, *, timeout_s: float
    ) -> cpb.SearchMemoryItemsResponse: ...


class LocalContext:
    shares_transactions = True

    def __init__(self, domain: ContextDomain) -> None:
        self._domain = domain

    async def append_message(
        self, principal: Principal, request: cpb.AppendMessageRequest, *, timeout_s: float
    ) -> cpb.Message:
        return await self._domain.messages.append(principal, request)

    async def append_message_with(
        self,
        principal: Principal,
        request: cpb.AppendMessageRequest,
        started: Started[_T],
        *,
        timeout_s: float,
        message_id: str = "",
    ) -> tuple[cpb.Message, _T]:
        return await self._domain.messages.append_with(
            principal, request, started.within, message_id=message_id
        )

    async def window(
        self, principal: Principal, request: cpb.GetContextWindowRequest, *, timeout_s: float
    ) -> cpb.ContextWindow:
        serialized = await self._domain.windows.window(principal, request)
        return cpb.GetContextWindowResponse.FromString(serialized).window

    async def conversation(
        self, principal: Principal, name: str, *, timeout_s: float
    ) -> cpb.Conversation:
        return await self._domain.conversations.get(name)

    async def message(self, principal: Principal, name: str, *, timeout_s: float) -> cpb.Message:
        async with asyncio.timeout(timeout_s):
            return await self._domain.messages.get(name)

    async def create_branch(
        self, principal: Principal, request: cpb.CreateBranchRequest, *, timeout_s: float
    ) -> cpb.CreateBranchResponse:
        async with asyncio.timeout(timeout_s):
            return await self._domain.branches.create(principal, request)

    async def create_conversation(
        self, principal: Principal, request: cpb.CreateConversationRequest, *, timeout_s: float
    ) -> cpb.Conversation:
        async with asyncio.timeout(timeout_s):
            return await self._domain.conversations.create(principal, request)

    async def search(
        self, principal: Principal, request: cpb.SearchContextRequest, *, timeout_s: float
    ) -> cpb.SearchContextResponse:
        # The parent is the run's conversation, which the run's user was authorized
        # to write when the run began (as for the window).
        async with asyncio.timeout(timeout_s):
            return await self._domain.search.search_context(request)

    async def download(
        self, principal: Principal, name: str, *, limit: int, timeout_s: float
    ) -> bytes:
        # The name comes from the run's window, which the user was authorized to
        # read; in this process the domain reads the blob without a loopback call.
        async with asyncio.timeout(timeout_s):
            return await self._domain.files.read_all(name, limit=limit)

    # Memory forming acts as a run's creator on the run's own workspace and the
    # creator's own scope; its worker authorizes them again before each round
    # (``memory/worker.py``), so in this process the domain is called directly.

    async def workspace(
        self, principal: Principal, name: str, *, timeout_s: float
    ) -> cpb.Workspace:
        async with asyncio.timeout(timeout_s):
            return await self._domain.workspaces.get(None, name)

    async def create_memory(
        self, principal: Principal, request: cpb.CreateMemoryItemRequest, *, timeout_s: float
    ) -> cpb.MemoryItem:
        async with asyncio.timeout(timeout_s):
            return await self._domain.memory.create(principal, request)

    async def get_memory(
        self, principal: Principal, name: str, *, timeout_s: float
    ) -> cpb.MemoryItem:
        async with asyncio.timeout(timeout_s):
            return await self._domain.memory.get(name)

    async def update_memory(
        self, principal: Principal, request: cpb.UpdateMemoryItemRequest, *, timeout_s: float
    ) -> cpb.MemoryItem:
        async with asyncio.timeout(timeout_s):
            return await self._domain.memory.update(principal, request)

    async def list_memory(
        self, principal: Principal, request: cpb.ListMemoryItemsRequest, *, timeout_s: float
    ) -> cpb.ListMemoryItemsResponse:
        async with asyncio.timeout(timeout_s):
            return await self._domain.memory.list(request)

    async def search_memory(
        self, principal: Principal, request: cpb.SearchMemoryItemsRequest, *, timeout_s: float
    ) -> cpb.SearchMemoryItemsResponse:
        async with asyncio.timeout(timeout_s):
            return await self._domain.memory.search(request)


class RemoteContext:
    shares_transactions = False

    def __init__(self, address: str, tokens: TokenIssuer) -> None:
        self._peer = PeerService(address, tokens, "the context service")
        self._stub = context_pb2_grpc.ContextServiceStub(self._peer.channel)

    async def close(self) -> None:
        await self._peer.close()

    async def append_message(
        self, principal: Principal, request: cpb.AppendMessageRequest, *, timeout_s: float
    ) -> cpb.Message:
        response = await self._peer.call(self._stub.AppendMessage, request, principal, timeout_s)
        return response.message

    async def append_message_with(
        self,
        principal: Principal,
        request: cpb.AppendMessageRequest,
        started: Started[_T],
        *,
        timeout_s: float,
        message_id: str = "",
    ) -> tuple[cpb.Message, _T]:
        # Another process's transaction cannot take ours: the message first, then ours
        # (a crash between them leaves the message without its run, as a client's
        # AppendMessage alone would).
        message = await self.append_message(principal, request, timeout_s=timeout_s)
        return message, await started.alone(message)

    async def window(
        self, principal: Principal, request: cpb.GetContextWindowRequest, *, timeout_s: float
    ) -> cpb.ContextWindow:
        response = await self._peer.call(self._stub.GetContextWindow, request, principal, timeout_s)
        return response.window

    async def conversation(
        self, principal: Principal, name: str, *, timeout_s: float
    ) -> cpb.Conversation:
        response = await self._peer.call(
            self._stub.GetConversation, cpb.GetConversationRequest(name=name), principal, timeout_s
        )
        return response.conversation

    async def message(self, principal: Principal, name: str, *, timeout_s: float) -> cpb.Message:
        response = await self._peer.call(
            self._stub.GetMessage, cpb.GetMessageRequest(name=name), principal, timeout_s
        )
        return response.message

    async def create_branch(
        self, principal: Principal, request: cpb.CreateBranchRequest, *, timeout_s: float
    ) -> cpb.CreateBranchResponse:
        return await self._peer.call(self._stub.CreateBranch, request, principal, timeout_s)

    async def create_conversation(
        self, principal: Principal, request: cpb.CreateConversationRequest, *, timeout_s: float
    ) -> cpb.Conversation:
        response = await self._peer.call(
            self._stub.CreateConversation, request, principal, timeout_s
        )
        return response.conversation

    async def search(
        self, principal: Principal, request: cpb.SearchContextRequest, *, timeout_s: float
    ) -> cpb.SearchContextResponse:
        return await self._peer.call(self._stub.SearchContext, request, principal, timeout_s)

    async def download(
        self, principal: Principal, name: str, *, limit: int, timeout_s: float
    ) -> bytes:
        # One byte past the limit tells a file over it from one exactly at it,
        # without streaming the rest.
        request = cpb.DownloadFileRequest(name=name, read_limit=limit + 1)
        data = bytearray()
        try:
            async with asyncio.timeout(timeout_s):
                call = self._stub.DownloadFile(
                    request, metadata=self._peer.metadata(principal), timeout=timeout_s
                )
                async for frame in call:
                    data += frame.data
                    if len(data) > limit:
                        call.cancel()
                        raise RequestTooLarge(f"{name} is larger than {limit} bytes")
        except aio.AioRpcError as exc:
            raise self._peer.error(exc) from None
        return bytes(data)

    async def workspace(
        self, principal: Principal, name: str, *, timeout_s: float
    ) -> cpb.Workspace:
        response = await self._peer.call(
            self._stub.GetWorkspace, cpb.GetWorkspaceRequest(name=name), principal, timeout_s
        )
        return response.workspace

    async def create_memory(
        self, principal: Principal, request: cpb.CreateMemoryItemRequest, *, timeout_s: float
    ) -> cpb.MemoryItem:
        response = await self._peer.call(self._stub.CreateMemoryItem, request, principal, timeout_s)
        return response.memory_item

    async def get_memory(
        self, principal: Principal, name: str, *, timeout_s: float
    ) -> cpb.MemoryItem:
        response = await self._peer.call(
            self._stub.GetMemoryItem, cpb.GetMemoryItemRequest(name=name), principal, timeout_s
        )
        return response.memory_item

    async def update_memory(
        self, principal: Principal, request: cpb.UpdateMemoryItemRequest, *, timeout_s: float
    ) -> cpb.MemoryItem:
        response = await self._peer.call(self._stub.UpdateMemoryItem, request, principal, timeout_s)
        return response.memory_item

    async def list_memory(
        self, principal: Principal, request: cpb.ListMemoryItemsRequest, *, timeout_s: float
    ) -> cpb.ListMemoryItemsResponse:
        return await self._peer.call(self._stub.ListMemoryItems, request, principal, timeout_s)

    async def search_memory(
        self, principal: Principal, request: cpb.SearchMemoryItemsRequest, *, timeout_s: float
    ) -> cpb.SearchMemoryItemsResponse:
        return await self._peer.call(self._stub.SearchMemoryItems, request, principal, timeout_s)
