"""The event service's two open streams, Subscribe and Stream, held to the caller's access.

``Subscribe`` is one subscription; ``Stream`` is the bidirectional form, many
subscriptions added and removed by frames on one stream. Both keep their
access through a grant (``platform/security/accesswatch.py``): a lost
credential ends the stream with that status, and lost access to a
subscription's scopes ends that subscription (``subscriptions.py``). Each open
subscription counts against the user's quota in this process, and each Stream
against its own.

They yield pre-serialized frames (``bytes``): an event is serialized once when
it enters the process, and a batch for any subscriber is a concatenation of
those bytes (``eventlog.batch_payload``). The servicer writes them out as they
are; clients see the ordinary ``SubscribeResponse`` / ``StreamResponse``
messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any, Final

from google.protobuf.timestamp_pb2 import Timestamp

from switchboard.api.events.v1 import events_pb2
from switchboard.events.subscriptions import (
    Limits,
    Quotas,
    Spec,
    Subscription,
    Waker,
    parse_spec,
)
from switchboard.platform import background
from switchboard.platform.errors import (
    FieldViolation,
    InvalidArgument,
    QuotaExceeded,
    SwitchboardError,
)
from switchboard.platform.events.bus import EventBus
from switchboard.platform.events.eventlog import (
    Logged,
    batch_payload,
    format_cursor,
    length_delimited,
    parse_cursor,
)
from switchboard.platform.security.accesswatch import AccessWatch, Grant
from switchboard.platform.security.policy import Permission, Principal
from switchboard.platform.values import names
from switchboard.platform.values.names import now

log = logging.getLogger("switchboard.events")

#: Unsent control frames (pongs, added/ended) a Stream may pile up.
MAX_CONTROL_BACKLOG: Final = 1_000
_SUBSCRIPTION_ID_RE: Final = names.CLIENT_LABEL


def _now() -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(now())
    return stamp


def _subscribe_batch(items: Sequence[Logged]) -> bytes:
    if len(items) == 1:
        return items[0].frame()
    return length_delimited(1, batch_payload(items))


def _subscribe_heartbeat(cursor: str) -> bytes:
    return events_pb2.SubscribeResponse(
        heartbeat=events_pb2.Heartbeat(time=_now(), cursor=cursor)
    ).SerializeToString()


def _stream_frame(**frame: Any) -> bytes:
    return events_pb2.StreamResponse(**frame).SerializeToString()


def _stream_events(subscription_id: str, items: Sequence[Logged]) -> bytes:
    inner = length_delimited(1, subscription_id.encode()) + length_delimited(
        2, batch_payload(items)
    )
    return length_delimited(1, inner)


def _ended(subscription_id: str, error: SwitchboardError | None, resume: str) -> bytes:
    return _stream_frame(
        ended=events_pb2.SubscriptionEnded(
            subscription_id=subscription_id,
            code=int(error.code) if error else 0,
            message=error.message if error else "removed",
            resume_cursor=resume,
        )
    )


class Streams:
    """Opens Subscribe and Stream sessions over the process's bus, each under its own grant.

    One per process: its ``Quotas`` count every open subscription of each user here.
    """

    def __init__(self, *, bus: EventBus, access: AccessWatch, limits: Limits) -> None:
        self._bus = bus
        self._access = access
        self._limits = limits
        self._quotas = Quotas(limits.per_principal)

    # -- Subscribe -----------------------------------------------------------------

    async def subscribe(
        self, principal: Principal, request: events_pb2.SubscribeRequest
    ) -> AsyncGenerator[bytes, None]:
        """Subscribe's frames: a heartbeat once registered, then batches and heartbeats."""
        spec = parse_spec(
            request.scopes,
            request.after_cursor,
            request.types,
            self._limits,
            merge_deltas=request.merge_deltas,
        )
        grant = self._access.open(principal)
        try:
            # Closed here, not left to the collector: the quota and the hold go with the call.
            frames = self._subscribe(grant, spec)
            async with contextlib.aclosing(frames):
                async for frame in frames:
                    yield frame
        finally:
            grant.close()

    async def _subscribe(self, grant: Grant, spec: Spec) -> AsyncGenerator[bytes, None]:
        principal = grant.principal
        waker = Waker()
        subscription = Subscription(self._bus, principal, spec, self._limits, waker)
        hold = await grant.hold(spec.names(), Permission.READ, subscription.recheck)
        try:
            self._quotas.acquire(principal)
        except BaseException:
            hold.release()
            raise
        try:
            await subscription.open(hold)
            # First frame: the subscription is registered, and delivery starts after this cursor.
            yield _subscribe_heartbeat(format_cursor(subscription.sent))
            heartbeat_s = self._limits.heartbeat_s
            loop = asyncio.get_running_loop()
            last_frame = loop.time()
            while True:
                batch = await subscription.next_batch()
                if batch:
                    yield _subscribe_batch(batch)
                    last_frame = loop.time()
                    if subscription.sent_batch():
                        continue
                else:
                    subscription.idle()
                wait_s = heartbeat_s - (loop.time() - last_frame)
                if wait_s > 0 and await waker.wait(wait_s):
                    continue
                if loop.time() - last_frame >= heartbeat_s:
                    yield _subscribe_heartbeat(subscription.caught_up())
                    last_frame = loop.time()
        finally:
            subscription.close()
            self._quotas.release(principal)

    # -- Stream ----------------------------------------------------------------------

    async def stream(
        self, principal: Principal, requests: AsyncIterator[events_pb2.StreamRequest]
    ) -> AsyncGenerator[bytes, None]:
        """Stream's frames for the command frames ``requests``, read as they arrive."""
        grant = self._access.open(principal)
        try:
            # A stream whose credential is already gone does not start.
            await grant.verify()
            session = _StreamSession(self._bus, grant, self._quotas, self._limits)
            # Spawned: a failure read() does not map is logged, not left unread.
            reader = background.spawn(
                session.read(requests), name="events-stream-reader", logger=log
            )
            try:
                frames = session.frames()
                async with contextlib.aclosing(frames):
                    async for frame in frames:
                        yield frame
            finally:
                reader.cancel()
                session.close()
        finally:
            grant.close()


class _StreamSession:
    """One bidirectional Stream: its subscriptions, control frames and writer.

    The stream's grant holds its credential: once that is lost (logged out,
    revoked, expired) the whole stream ends with that status. Each
    subscription holds its own scopes and ends alone when access to them is lost.
    """

    def __init__(self, bus: EventBus, grant: Grant, quotas: Quotas, limits: Limits) -> None:
        self._bus = bus
        self._grant = grant
        self._quotas = quotas
        self._limits = limits
        self._principal = grant.principal
        self._subscriptions: dict[str, Subscription] = {}
        self._control: deque[bytes] = deque()
        self._waker = Waker()
        self._fatal: SwitchboardError | None = None
        self._client_done = False
        self._again = False
        grant.on_change(self._waker)

    def close(self) -> None:
        for subscription in self._subscriptions.values():
            subscription.close()
            self._quotas.release(self._principal)
        self._subscriptions.clear()

    def _send(self, frame: bytes) -> None:
        if len(self._control) >= MAX_CONTROL_BACKLOG:
            self._fatal = QuotaExceeded(
                "too many unanswered commands; read the stream", subject="stream/controlBacklog"
            )
        else:
            self._control.append(frame)
        self._waker()

    # Reading commands runs in its own task, so a slow authorization or a busy
    # writer never stops the other side.
    async def read(self, requests: AsyncIterator[events_pb2.StreamRequest]) -> None:
        try:
            async for request in requests:
                await self._command(request)
                if self._fatal is not None or self._grant.error is not None:
                    break
        except SwitchboardError as exc:
            self._fatal = exc
        finally:
            self._client_done = True
            self._waker()

    async def _command(self, request: events_pb2.StreamRequest) -> None:
        frame = request.WhichOneof("frame")
        if frame == "add":
            await self._add(request.add)
        elif frame == "remove":
            self._remove(request.remove.subscription_id)
        elif frame == "ack":
            self._ack(request.ack)
        elif frame == "ping":
            if len(request.ping.nonce) > 64:
                raise InvalidArgument(
                    "ping.nonce is too long", [FieldViolation("ping.nonce", "at most 64 chars")]
                )
            self._send(_stream_frame(pong=events_pb2.Pong(nonce=request.ping.nonce, time=_now())))
        else:
            raise InvalidArgument("empty stream frame", [FieldViolation("frame", "is required")])

    async def _add(self, add: events_pb2.AddSubscription) -> None:
        sid = add.subscription_id
        if not _SUBSCRIPTION_ID_RE.fullmatch(sid):
            raise InvalidArgument(
                "add.subscription_id is invalid",
                [FieldViolation("add.subscription_id", "1-64 characters [A-Za-z0-9._:-]")],
            )
        if sid in self._subscriptions:
            raise InvalidArgument(
                "add.subscription_id is already in use on this stream",
                [FieldViolation("add.subscription_id", "is already in use")],
            )
        try:
            spec = parse_spec(
                add.scopes,
                add.after_cursor,
                add.types,
                self._limits,
                "add.",
                merge_deltas=add.merge_deltas,
            )
            subscription = Subscription(self._bus, self._principal, spec, self._limits, self._waker)
            # Authorized like a unary call now: the credential first, then each scope.
            hold = await self._grant.hold(spec.names("add."), Permission.READ, subscription.recheck)
            try:
                self._admit()
            except BaseException:
                hold.release()
                raise
            try:
                await subscription.open(hold)
            except BaseException:
                hold.release()
                self._quotas.release(self._principal)
                raise
        except SwitchboardError as exc:
            if self._grant.error is not None:
                return  # the credential is gone: the whole stream ends with its status
            self._send(_ended(sid, exc, add.after_cursor))
            return
        self._subscriptions[sid] = subscription
        self._send(_stream_frame(added=events_pb2.SubscriptionAdded(subscription_id=sid)))

    def _admit(self) -> None:
        """Count one more subscription against the stream's and the user's limits."""
        if len(self._subscriptions) >= self._limits.per_stream:
            raise QuotaExceeded(
                f"at most {self._limits.per_stream} subscriptions per stream",
                subject="stream/subscriptions",
            )
        self._quotas.acquire(self._principal)

    def _remove(self, sid: str) -> None:
        subscription = self._subscriptions.pop(sid, None)
        if subscription is None:
            raise InvalidArgument(
                "remove.subscription_id names no subscription on this stream",
                [FieldViolation("remove.subscription_id", "is not a live subscription")],
            )
        subscription.close()
        self._quotas.release(self._principal)
        self._send(_ended(sid, None, subscription.resume_cursor))

    def _ack(self, ack: events_pb2.Ack) -> None:
        subscription = self._subscriptions.get(ack.subscription_id)
        position = parse_cursor(ack.cursor)
        if subscription is None or position is None or not subscription.ack(position):
            raise InvalidArgument(
                "ack names no live subscription, or a cursor it was not sent",
                [FieldViolation("ack", "must name a live subscription and a cursor it was sent")],
            )

    def _end(self, sid: str, error: SwitchboardError) -> bytes:
        subscription = self._subscriptions.pop(sid)
        subscription.close()
        self._quotas.release(self._principal)
        return _ended(sid, error, subscription.resume_cursor)

    async def frames(self) -> AsyncGenerator[bytes, None]:
        loop = asyncio.get_running_loop()
        heartbeat_s = self._limits.heartbeat_s
        last_frame = loop.time()
        while True:
            if self._grant.error is not None:
                raise self._grant.error
            if self._fatal is not None:
                raise self._fatal
            sent = False
            async for frame in self._ready_frames():
                yield frame
                sent = True
            if sent:
                last_frame = loop.time()
                if self._again or self._control or self._client_done:
                    continue
            elif self._client_done:
                return
            wait_s = heartbeat_s - (loop.time() - last_frame)
            if wait_s > 0 and await self._waker.wait(wait_s):
                continue
            if loop.time() - last_frame >= heartbeat_s:
                positions = [s.caught_up_position() for s in self._subscriptions.values()]
                cursor = format_cursor(min(positions, default=self._bus.head))
                yield _stream_frame(heartbeat=events_pb2.Heartbeat(time=_now(), cursor=cursor))
                last_frame = loop.time()

    async def _ready_frames(self) -> AsyncIterator[bytes]:
        """The control frames, then one batch of each subscription with work; sets
        ``_again`` if one must go on at once (replay) rather than wait to be woken."""
        self._again = False
        while self._control:
            yield self._control.popleft()
        for sid, subscription in list(self._subscriptions.items()):
            if sid not in self._subscriptions:
                continue
            if not subscription.ready():
                subscription.idle()
                continue
            try:
                batch = await subscription.next_batch()
            except SwitchboardError as exc:
                yield self._end(sid, exc)
                continue
            if batch:
                yield _stream_events(sid, batch)
                self._again = subscription.sent_batch() or self._again
            else:
                subscription.idle()
