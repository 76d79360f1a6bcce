"""Transport for DispatcherService: converts proto to domain calls and nothing else.

``Converse`` multiplexes SendMessage, CancelRun, SubmitToolApprovals and
WatchRun on one stream.
Each action is authorized like the unary RPC it stands for, at the moment it
arrives (the access rule is ``per_item``); an action that fails answers with
an ``error`` frame and the stream stays open. Its output is one bounded queue:
when a client stops reading, the relays of its runs wait rather than grow the
queue without end.

Both streams keep their access through a grant (``platform/security/accesswatch.py``).
A lost credential (logged out, session or API key revoked, token expired) ends
the stream with that status. Lost access to a relayed run (removed from its
workspace, workspace deleted) ends WatchRun with that status, and ends a
Converse relay with an ``error`` frame naming the run while the stream goes on.
Nothing a run produces after the change is relayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Final

from grpc import aio

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.dispatcher.v1 import dispatcher_pb2_grpc
from switchboard.dispatcher.ports.peers import FORWARDED_KEY, Via
from switchboard.dispatcher.service import Dispatcher
from switchboard.platform import background
from switchboard.platform.errors import (
    FieldViolation,
    InvalidArgument,
    QuotaExceeded,
    SwitchboardError,
)
from switchboard.platform.names import now
from switchboard.platform.observe.logging import request_id_var
from switchboard.platform.rpc.status import to_status_proto
from switchboard.platform.security.accesswatch import AccessWatch, Grant, Hold
from switchboard.platform.security.authn import bearer_credential, current_principal
from switchboard.platform.security.policy import Permission

SERVICE = pb.DESCRIPTOR.services_by_name["DispatcherService"]

Context = aio.ServicerContext[object, object]

log = logging.getLogger("switchboard.dispatcher")

#: Frames a Converse stream may hold for a slow reader before its relays wait.
CONVERSE_BUFFER: Final = 1_000
#: Runs one Converse stream may relay at once.
CONVERSE_MAX_RELAYS: Final = 32
_CLIENT_ID_MAX: Final = 64


def _heartbeat() -> pb.Heartbeat:
    beat = pb.Heartbeat()
    beat.time.FromDatetime(now())
    return beat


def _via(context: Context, *, deadline: bool = True) -> Via:
    """How a call reached this replica, for one the owner of a run must answer.

    The credential is the caller's, already authenticated here (the owner checks
    it again); the forwarded mark only stops this call from being forwarded on.
    """
    metadata = context.invocation_metadata() or ()
    remaining = context.time_remaining() if deadline else None
    return Via(
        credential=bearer_credential(metadata) or "",
        forwarded=any(key == FORWARDED_KEY for key, _ in metadata),
        timeout_s=remaining,
    )


def _error_frame(exc: SwitchboardError, client_request_id: str = "") -> pb.ConverseResponse:
    # The interceptor's request id, as in every other error (the task copied its context).
    return pb.ConverseResponse(
        client_request_id=client_request_id, error=to_status_proto(exc, request_id_var.get())
    )


class DispatcherServiceServicer(dispatcher_pb2_grpc.DispatcherServiceServicer):
    def __init__(self, dispatcher: Dispatcher, access: AccessWatch) -> None:
        self._dispatcher = dispatcher
        self._access = access

    async def SendMessage(
        self, request: pb.SendMessageRequest, context: Context
    ) -> pb.SendMessageResponse:
        return await self._dispatcher.send_message(current_principal(), request)

    async def GetRun(self, request: pb.GetRunRequest, context: Context) -> pb.GetRunResponse:
        return pb.GetRunResponse(run=await self._dispatcher.get_run(request.name))

    async def ListRuns(self, request: pb.ListRunsRequest, context: Context) -> pb.ListRunsResponse:
        return await self._dispatcher.list_runs(request)

    async def CancelRun(
        self, request: pb.CancelRunRequest, context: Context
    ) -> pb.CancelRunResponse:
        run = await self._dispatcher.cancel_run(
            current_principal(), request.name, request.reason, _via(context)
        )
        return pb.CancelRunResponse(run=run)

    async def WatchRun(
        self, request: pb.WatchRunRequest, context: Context
    ) -> AsyncIterator[pb.WatchRunResponse]:
        grant = self._access.open(current_principal())
        try:
            hold = await grant.hold(((request.name, "name"),), Permission.READ)
            updates = self._dispatcher.watch(request.name, request.after_sequence)
            async for update in hold.guard(updates):
                if update is None:
                    yield pb.WatchRunResponse(heartbeat=_heartbeat())
                else:
                    yield pb.WatchRunResponse(update=update)
        finally:
            grant.close()

    async def ListHandlers(
        self, request: pb.ListHandlersRequest, context: Context
    ) -> pb.ListHandlersResponse:
        return await self._dispatcher.list_handlers(request)

    async def SubmitToolApprovals(
        self, request: pb.SubmitToolApprovalsRequest, context: Context
    ) -> pb.SubmitToolApprovalsResponse:
        run = await self._dispatcher.submit_tool_approvals(
            current_principal(), request, _via(context)
        )
        return pb.SubmitToolApprovalsResponse(run=run)

    async def CreateAssistant(
        self, request: pb.CreateAssistantRequest, context: Context
    ) -> pb.CreateAssistantResponse:
        assistant = await self._dispatcher.assistants.create(current_principal(), request)
        return pb.CreateAssistantResponse(assistant=assistant)

    async def GetAssistant(
        self, request: pb.GetAssistantRequest, context: Context
    ) -> pb.GetAssistantResponse:
        return pb.GetAssistantResponse(
            assistant=await self._dispatcher.assistants.get(request.name)
        )

    async def ListAssistants(
        self, request: pb.ListAssistantsRequest, context: Context
    ) -> pb.ListAssistantsResponse:
        return await self._dispatcher.assistants.list_assistants(request)

    async def UpdateAssistant(
        self, request: pb.UpdateAssistantRequest, context: Context
    ) -> pb.UpdateAssistantResponse:
        assistant = await self._dispatcher.assistants.update(current_principal(), request)
        return pb.UpdateAssistantResponse(assistant=assistant)

    async def DeleteAssistant(
        self, request: pb.DeleteAssistantRequest, context: Context
    ) -> pb.DeleteAssistantResponse:
        await self._dispatcher.assistants.delete(current_principal(), request.name, request.etag)
        return pb.DeleteAssistantResponse()

    async def DescribeConversation(
        self, request: pb.DescribeConversationRequest, context: Context
    ) -> pb.DescribeConversationResponse:
        return await self._dispatcher.describe_conversation(current_principal(), request)

    async def Converse(
        self, request_iterator: AsyncIterator[pb.ConverseRequest], context: Context
    ) -> AsyncIterator[pb.ConverseResponse]:
        grant = self._access.open(current_principal())
        try:
            # A stream whose credential is already gone does not start.
            await grant.verify()
            # The stream's deadline is not an action's: each forwarded action gets its own.
            session = _Converse(self._dispatcher, grant, _via(context, deadline=False))
            reader = asyncio.get_running_loop().create_task(session.read(request_iterator))
            try:
                while True:
                    frame = await session.next_frame(self._dispatcher.limits.heartbeat_s)
                    if frame is None:
                        return
                    yield frame
            finally:
                reader.cancel()
                await session.close()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
        finally:
            grant.close()


class _Converse:
    def __init__(self, dispatcher: Dispatcher, grant: Grant, via: Via) -> None:
        self._dispatcher = dispatcher
        self._grant = grant
        self._via = via
        self._principal = grant.principal
        # None wakes the writer to look again: half-closed, or the credential lost.
        self._out: asyncio.Queue[pb.ConverseResponse | None] = asyncio.Queue(CONVERSE_BUFFER)
        self._relays: dict[str, asyncio.Task[None]] = {}
        self._reading = True
        grant.on_change(self._access_changed)

    def _access_changed(self) -> None:
        if self._grant.error is not None:
            # A full queue means the writer is not waiting; it looks before its next read.
            with contextlib.suppress(asyncio.QueueFull):
                self._out.put_nowait(None)

    async def next_frame(self, heartbeat_s: float) -> pb.ConverseResponse | None:
        while True:
            self._unless_lost()
            try:
                async with asyncio.timeout(heartbeat_s):
                    frame = await self._out.get()
            except TimeoutError:
                return pb.ConverseResponse(heartbeat=_heartbeat())
            self._unless_lost()
            if frame is not None:
                return frame
            # The client half-closed: end once every relayed run has ended.
            if not self._reading and not self._relays:
                return None

    def _unless_lost(self) -> None:
        # Nothing queued after the credential was lost goes out: the stream ends
        # with its status.
        error = self._grant.error
        if error is not None:
            raise error

    async def read(self, requests: AsyncIterator[pb.ConverseRequest]) -> None:
        try:
            async for request in requests:
                await self._action(request)
                if self._grant.error is not None:
                    break
        finally:
            self._reading = False
            await self._out.put(None)

    async def close(self) -> None:
        for task in self._relays.values():
            task.cancel()
        if self._relays:
            await asyncio.wait(list(self._relays.values()))

    async def _action(self, request: pb.ConverseRequest) -> None:
        client_id = request.client_request_id[:_CLIENT_ID_MAX]
        action = request.WhichOneof("action")
        try:
            if len(request.client_request_id) > _CLIENT_ID_MAX:
                raise InvalidArgument(
                    "client_request_id is too long",
                    [FieldViolation("client_request_id", f"at most {_CLIENT_ID_MAX} characters")],
                )
            if action == "send_message":
                send = request.send_message
                await self._grant.authorize(
                    send.conversation, Permission.WRITE, "send_message.conversation"
                )
                self._room()
                sent = await self._dispatcher.send_message(self._principal, send)
                await self._out.put(
                    pb.ConverseResponse(client_request_id=client_id, message_sent=sent)
                )
                started = sent.run.name
                self._relay(await self._hold(started, "message_sent.run.name"), started, 0)
            elif action == "cancel_run":
                cancel = request.cancel_run
                await self._grant.authorize(cancel.name, Permission.WRITE, "cancel_run.name")
                run = await self._dispatcher.cancel_run(
                    self._principal, cancel.name, cancel.reason, self._via
                )
                await self._out.put(
                    pb.ConverseResponse(
                        client_request_id=client_id, run_cancelled=pb.CancelRunResponse(run=run)
                    )
                )
            elif action == "submit_tool_approvals":
                approvals = request.submit_tool_approvals
                await self._grant.authorize(
                    approvals.name, Permission.WRITE, "submit_tool_approvals.name"
                )
                run = await self._dispatcher.submit_tool_approvals(
                    self._principal, approvals, self._via
                )
                await self._out.put(
                    pb.ConverseResponse(
                        client_request_id=client_id,
                        tool_approvals_submitted=pb.SubmitToolApprovalsResponse(run=run),
                    )
                )
            elif action == "watch_run":
                watch = request.watch_run
                hold = await self._hold(watch.name, "watch_run.name")
                try:
                    self._room()
                    await self._dispatcher.get_run(watch.name)  # NOT_FOUND now, not in the relay
                except BaseException:
                    hold.release()
                    raise
                self._relay(hold, watch.name, watch.after_sequence)
            else:
                raise InvalidArgument(
                    "the frame has no action", [FieldViolation("action", "is required")]
                )
        except SwitchboardError as exc:
            if self._grant.error is not None:
                return  # the credential is gone: the stream ends with its status
            await self._out.put(_error_frame(exc, client_id))

    def _room(self) -> None:
        if len(self._relays) >= CONVERSE_MAX_RELAYS:
            raise QuotaExceeded(
                f"at most {CONVERSE_MAX_RELAYS} runs relayed at once on one stream",
                subject="converse/relays",
            )

    async def _hold(self, run: str, field: str) -> Hold:
        """Read access to ``run``, kept for as long as it is relayed."""
        return await self._grant.hold(((run, field),), Permission.READ)

    def _relay(self, hold: Hold, run: str, after: int) -> None:
        if run in self._relays:
            hold.release()
            return
        # Spawned: what _follow does not map is logged, not left unread in the task.
        task = background.spawn(self._follow(hold, run, after), name="converse-relay", logger=log)
        self._relays[run] = task

    async def _follow(self, hold: Hold, run: str, after: int) -> None:
        try:
            async for update in hold.guard(self._dispatcher.watch(run, after)):
                if update is not None:  # the stream has its own heartbeat
                    await self._out.put(pb.ConverseResponse(update=update))
        except SwitchboardError as exc:
            # A lost run ends its relay with an error naming it; a lost credential
            # ends the whole stream (the writer raises it).
            if self._grant.error is None:
                await self._out.put(_error_frame(exc))
        finally:
            hold.release()
            self._relays.pop(run, None)
            if not self._reading and not self._relays:
                # Wake the writer so a half-closed stream can end.
                with contextlib.suppress(asyncio.QueueFull):
                    self._out.put_nowait(None)
