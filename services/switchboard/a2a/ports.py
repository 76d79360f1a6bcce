"""How the A2A front door reaches the dispatcher and the context service.

Two shapes, one interface (``frontdoor.Runs``, ``frontdoor.Texts``):

* local: the services run in this process; their domains take the requests
  directly (the embedded default, as the dispatcher reaches an in-process
  context service, decisions 19);
* remote: they run in other processes (``SWITCHBOARD_DISPATCHER_ADDRESS``,
  ``SWITCHBOARD_CONTEXT_ADDRESS``); the generated stubs carry the same
  requests with an access token minted for the caller's user, session and
  scopes from the shared key ring, so each service authorizes the caller
  itself, exactly as if the A2A client had called it.

Every remote call has a deadline; a watched run's stream ends when nothing,
not even a heartbeat, arrived for ``_FRAME_TIMEOUT_S``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Final

from grpc import aio

from switchboard.a2a import mapping
from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.context.v1 import context_pb2_grpc
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.dispatcher.v1 import dispatcher_pb2_grpc
from switchboard.context.domain import ContextDomain
from switchboard.dispatcher.handlers.handed import HEADER, Handed, header_value
from switchboard.dispatcher.service import Dispatcher
from switchboard.platform.errors import DependencyUnavailable, RequestTooLarge
from switchboard.platform.rpc.outbound.peers import PeerService, TokenIssuer
from switchboard.platform.security.policy import Principal

#: Bound on one unary call to the dispatcher or the context service.
_CALL_TIMEOUT_S: Final = 30.0
#: A watched run sends a heartbeat every SWITCHBOARD_DISPATCHER_HEARTBEAT_S (15 s by default).
_FRAME_TIMEOUT_S: Final = 120.0


class LocalRuns:
    """The dispatcher of this process, through its domain calls."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher

    async def send_message(
        self, principal: Principal, request: pb.SendMessageRequest, handed: Handed | None = None
    ) -> pb.SendMessageResponse:
        return await self._dispatcher.send_message(principal, request, handed)

    async def get_run(self, principal: Principal, name: str) -> pb.Run:
        return await self._dispatcher.get_run(name)

    async def list_runs(
        self, principal: Principal, request: pb.ListRunsRequest
    ) -> pb.ListRunsResponse:
        return await self._dispatcher.list_runs(request)

    async def cancel_run(self, principal: Principal, name: str, reason: str) -> pb.Run:
        return await self._dispatcher.cancel_run(principal, name, reason)

    async def submit_tool_approvals(
        self, principal: Principal, request: pb.SubmitToolApprovalsRequest
    ) -> pb.Run:
        return await self._dispatcher.submit_tool_approvals(principal, request)

    async def steer_run(
        self, principal: Principal, request: pb.SteerRunRequest
    ) -> pb.SteerRunResponse:
        return await self._dispatcher.steer_run(principal, request)

    async def regenerate(
        self, principal: Principal, request: pb.RegenerateMessageRequest
    ) -> pb.RegenerateMessageResponse:
        return await self._dispatcher.regenerate(principal, request)

    def watch(
        self, principal: Principal, name: str, after_sequence: int
    ) -> AsyncIterator[pb.RunUpdate | None]:
        return self._dispatcher.watch(name, after_sequence)

    async def assistant(self, principal: Principal, name: str, revision: int = 0) -> pb.Assistant:
        return await self._dispatcher.assistants.get(name, revision)


class LocalTexts:
    """The context service of this process: new conversations, messages' text."""

    def __init__(self, domain: ContextDomain) -> None:
        self._domain = domain

    async def create_conversation(
        self, principal: Principal, parent: str, request_id: str, title: str
    ) -> str:
        made = await self._domain.conversations.create(
            principal,
            cpb.CreateConversationRequest(
                parent=parent, conversation=cpb.Conversation(title=title), request_id=request_id
            ),
        )
        return made.name

    async def text(self, principal: Principal, message: str) -> str:
        return mapping.text_of(await self._domain.messages.get(message))

    async def message(self, principal: Principal, message: str) -> cpb.Message:
        return await self._domain.messages.get(message)

    async def read_file(self, principal: Principal, file: str, limit: int) -> bytes:
        return await self._domain.files.read_all(file, limit=limit)


class RemoteRuns:
    """DispatcherService in another process."""

    def __init__(self, address: str, tokens: TokenIssuer) -> None:
        self._peer = PeerService(address, tokens, "the dispatcher")
        self._stub = dispatcher_pb2_grpc.DispatcherServiceStub(self._peer.channel)

    async def close(self) -> None:
        await self._peer.close()

    async def send_message(
        self, principal: Principal, request: pb.SendMessageRequest, handed: Handed | None = None
    ) -> pb.SendMessageResponse:
        # A handed budget goes as the dispatcher's contract takes it: its metadata key.
        extra = ((HEADER, header_value(handed)),) if handed else ()
        return await self._peer.call(
            self._stub.SendMessage, request, principal, _CALL_TIMEOUT_S, extra
        )

    async def get_run(self, principal: Principal, name: str) -> pb.Run:
        request = pb.GetRunRequest(name=name)
        return (await self._peer.call(self._stub.GetRun, request, principal, _CALL_TIMEOUT_S)).run

    async def regenerate(
        self, principal: Principal, request: pb.RegenerateMessageRequest
    ) -> pb.RegenerateMessageResponse:
        return await self._peer.call(
            self._stub.RegenerateMessage, request, principal, _CALL_TIMEOUT_S
        )

    async def list_runs(
        self, principal: Principal, request: pb.ListRunsRequest
    ) -> pb.ListRunsResponse:
        return await self._peer.call(self._stub.ListRuns, request, principal, _CALL_TIMEOUT_S)

    async def cancel_run(self, principal: Principal, name: str, reason: str) -> pb.Run:
        request = pb.CancelRunRequest(name=name, reason=reason)
        cancelled = await self._peer.call(self._stub.CancelRun, request, principal, _CALL_TIMEOUT_S)
        return cancelled.run

    async def submit_tool_approvals(
        self, principal: Principal, request: pb.SubmitToolApprovalsRequest
    ) -> pb.Run:
        decided = await self._peer.call(
            self._stub.SubmitToolApprovals, request, principal, _CALL_TIMEOUT_S
        )
        return decided.run

    async def steer_run(
        self, principal: Principal, request: pb.SteerRunRequest
    ) -> pb.SteerRunResponse:
        return await self._peer.call(self._stub.SteerRun, request, principal, _CALL_TIMEOUT_S)

    async def assistant(self, principal: Principal, name: str, revision: int = 0) -> pb.Assistant:
        request = pb.GetAssistantRequest(name=name, revision=revision)
        found = await self._peer.call(self._stub.GetAssistant, request, principal, _CALL_TIMEOUT_S)
        return found.assistant

    async def watch(
        self, principal: Principal, name: str, after_sequence: int
    ) -> AsyncIterator[pb.RunUpdate | None]:
        call = self._stub.WatchRun(
            pb.WatchRunRequest(name=name, after_sequence=after_sequence),
            metadata=self._peer.metadata(principal),
        )
        frames = call.__aiter__()
        try:
            while True:
                try:
                    async with asyncio.timeout(_FRAME_TIMEOUT_S):
                        frame = await anext(frames)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise DependencyUnavailable(
                        "the dispatcher stopped sending the run's updates; subscribe again"
                    ) from None
                except aio.AioRpcError as exc:
                    raise self._peer.error(exc) from None
                yield frame.update if frame.WhichOneof("frame") == "update" else None
        finally:
            call.cancel()


class RemoteTexts:
    """ContextService in another process."""

    def __init__(self, address: str, tokens: TokenIssuer) -> None:
        self._peer = PeerService(address, tokens, "the context service")
        self._stub = context_pb2_grpc.ContextServiceStub(self._peer.channel)

    async def close(self) -> None:
        await self._peer.close()

    async def create_conversation(
        self, principal: Principal, parent: str, request_id: str, title: str
    ) -> str:
        request = cpb.CreateConversationRequest(
            parent=parent, conversation=cpb.Conversation(title=title), request_id=request_id
        )
        made = await self._peer.call(
            self._stub.CreateConversation, request, principal, _CALL_TIMEOUT_S
        )
        return made.conversation.name

    async def text(self, principal: Principal, message: str) -> str:
        return mapping.text_of(await self.message(principal, message))

    async def message(self, principal: Principal, message: str) -> cpb.Message:
        request = cpb.GetMessageRequest(name=message)
        found = await self._peer.call(self._stub.GetMessage, request, principal, _CALL_TIMEOUT_S)
        return found.message

    async def read_file(self, principal: Principal, file: str, limit: int) -> bytes:
        """DownloadFile's frames, refused past ``limit`` bytes."""
        call = self._stub.DownloadFile(
            cpb.DownloadFileRequest(name=file, read_limit=limit + 1),
            metadata=self._peer.metadata(principal),
            timeout=_CALL_TIMEOUT_S,
        )
        content = bytearray()
        try:
            async for frame in call:
                content += frame.data
                if len(content) > limit:
                    raise RequestTooLarge(f"{file} is larger than {limit} bytes")
        except aio.AioRpcError as exc:
            raise self._peer.error(exc) from None
        finally:
            call.cancel()
        return bytes(content)
