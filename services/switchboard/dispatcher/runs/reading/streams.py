"""The dispatcher's two open streams, WatchRun and Converse, held to the caller's
access as it changes.

``Converse`` multiplexes SendMessage, SteerRun, CancelRun, SubmitToolApprovals
and WatchRun on one stream.
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

The servicer only converts: it hands the request frames in and writes out the
frames these give back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Final, Protocol

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.ports.peers import Via
from switchboard.platform import background
from switchboard.platform.errors import (
    FieldViolation,
    InvalidArgument,
    QuotaExceeded,
    SwitchboardError,
)
from switchboard.platform.observe.logging import request_id_var
from switchboard.platform.rpc.status import to_status_proto
from switchboard.platform.security.accesswatch import AccessWatch, Grant, Hold
from switchboard.platform.security.policy import Permission, Principal
from switchboard.platform.values.names import now

log = logging.getLogger("switchboard.dispatcher")

#: Frames a Converse stream may hold for a slow reader before its relays wait.
CONVERSE_BUFFER: Final = 1_000
#: Runs one Converse stream may relay at once.
CONVERSE_MAX_RELAYS: Final = 32
_CLIENT_ID_MAX: Final = 64


class Actions(Protocol):
    """What a stream's actions call: the dispatcher's own calls (``service.Dispatcher``)."""

    async def send_message(
        self, principal: Principal, request: pb.SendMessageRequest, *, via: Via
    ) -> pb.SendMessageResponse: ...

    async def steer_run(
        self, principal: Principal, request: pb.SteerRunRequest, via: Via
    ) -> pb.SteerRunResponse: ...

    async def get_run(self, name: str) -> pb.Run: ...

    def watch(
        self, name: str, after_sequence: int, *, merge: bool = False
    ) -> AsyncIterator[pb.RunUpdate | None]: ...

    async def submit_tool_approvals(
        self, principal: Principal, request: pb.SubmitToolApprovalsRequest, via: Via
    ) -> pb.Run: ...

    async def cancel_run(
        self,
        principal: Principal,
        name: str,
        reason: str,
        via: Via,
        *,
        heard_through_sequence: int = 0,
    ) -> pb.Run: ...


def _heartbeat() -> pb.Heartbeat:
    beat = pb.Heartbeat()
    beat.time.FromDatetime(now())
    return beat


def _error_frame(exc: SwitchboardError, client_request_id: str = "") -> pb.ConverseResponse:
    # The interceptor's request id, as in every other error (the task copied its context).
    return pb.ConverseResponse(
        client_request_id=client_request_id, error=to_status_proto(exc, request_id_var.get())
    )


class Streams:
    """Opens WatchRun and Converse streams for a principal, each under its own grant."""

    def __init__(self, *, actions: Actions, access: AccessWatch, heartbeat_s: float) -> None:
        self._actions = actions
        self._access = access
        self._heartbeat_s = heartbeat_s

    async def watch_run(
        self, principal: Principal, name: str, after_sequence: int, *, merge: bool = False
    ) -> AsyncGenerator[pb.WatchRunResponse, None]:
        """``merge``: ``WatchRunRequest.merge_deltas``."""
        grant = self._access.open(principal)
        try:
            hold = await grant.hold(((name, "name"),), Permission.READ)
            updates = self._actions.watch(name, after_sequence, merge=merge)
            async for update in hold.guard(updates):
                if update is None:
                    yield pb.WatchRunResponse(heartbeat=_heartbeat())
                else:
                    yield pb.WatchRunResponse(update=update)
        finally:
            grant.close()

    async def converse(
        self, principal: Principal, requests: AsyncIterator[pb.ConverseRequest], via: Via
    ) -> AsyncGenerator[pb.ConverseResponse, None]:
        """``via``: how the stream reached this replica, for its forwarded actions."""
        grant = self._access.open(principal)
        try:
            # A stream whose credential is already gone does not start.
            await grant.verify()
            session = _Converse(self._actions, grant, via)
            reader = asyncio.get_running_loop().create_task(session.read(requests))
            try:
                while True:
                    frame = await session.next_frame(self._heartbeat_s)
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
    def __init__(self, actions: Actions, grant: Grant, via: Via) -> None:
        self._actions = actions
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
                sent = await self._actions.send_message(self._principal, send, via=self._via)
                await self._out.put(
                    pb.ConverseResponse(client_request_id=client_id, message_sent=sent)
                )
                started = sent.run.name
                self._relay(await self._hold(started, "message_sent.run.name"), started, 0)
            elif action == "steer_run":
                await self._steer(client_id, request.steer_run)
            elif action == "cancel_run":
                cancel = request.cancel_run
                await self._grant.authorize(cancel.name, Permission.WRITE, "cancel_run.name")
                run = await self._actions.cancel_run(
                    self._principal,
                    cancel.name,
                    cancel.reason,
                    self._via,
                    heard_through_sequence=cancel.heard_through_sequence,
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
                run = await self._actions.submit_tool_approvals(
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
                    await self._actions.get_run(watch.name)  # NOT_FOUND now, not in the relay
                except BaseException:
                    hold.release()
                    raise
                self._relay(hold, watch.name, watch.after_sequence, merge=watch.merge_deltas)
            else:
                raise InvalidArgument(
                    "the frame has no action", [FieldViolation("action", "is required")]
                )
        except SwitchboardError as exc:
            if self._grant.error is not None:
                return  # the credential is gone: the stream ends with its status
            await self._out.put(_error_frame(exc, client_id))

    async def _steer(self, client_id: str, steer: pb.SteerRunRequest) -> None:
        """Steer a run; the steer's own run is relayed (consumed: it ends at once;
        requeued: its answer follows)."""
        await self._grant.authorize(steer.run, Permission.WRITE, "steer_run.run")
        self._room()
        steered = await self._actions.steer_run(self._principal, steer, self._via)
        await self._out.put(pb.ConverseResponse(client_request_id=client_id, run_steered=steered))
        started = steered.run.name
        self._relay(await self._hold(started, "run_steered.run.name"), started, 0)

    def _room(self) -> None:
        if len(self._relays) >= CONVERSE_MAX_RELAYS:
            raise QuotaExceeded(
                f"at most {CONVERSE_MAX_RELAYS} runs relayed at once on one stream",
                subject="converse/relays",
            )

    async def _hold(self, run: str, field: str) -> Hold:
        """Read access to ``run``, kept for as long as it is relayed."""
        return await self._grant.hold(((run, field),), Permission.READ)

    def _relay(self, hold: Hold, run: str, after: int, *, merge: bool = False) -> None:
        if run in self._relays:
            hold.release()
            return
        # Spawned: what _follow does not map is logged, not left unread in the task.
        task = background.spawn(
            self._follow(hold, run, after, merge), name="converse-relay", logger=log
        )
        self._relays[run] = task

    async def _follow(self, hold: Hold, run: str, after: int, merge: bool) -> None:
        try:
            async for update in hold.guard(self._actions.watch(run, after, merge=merge)):
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
