"""Phone calls as the API shows them: each one's ``Call`` record, kept as it rings, is
answered and ends, with a CALL_CHANGED event for every change, and the four RPCs.

Whatever carries a call (``talk/sip/``) writes it here (``opened``, ``update``): the
record is the call's history, kept after it ended, and its event is in the log with it
(the transactional outbox), so a console that follows the workspace sees every call
come, be answered and end. ``PlaceCall`` is checked here, then handed to the process's
``Phone`` (the SIP user agent) if it has one. ``EndCall`` hangs up where the call is
carried (SIP, or a carrier's media stream: each a ``Line``): here, or on the replica that
holds it (forwarded, as CancelRun is); a call whose holder stopped is ended on the record
(its line went down with it).

The workspace's call quota (``WorkspaceQuota.max_concurrent_calls`` and
``call_minutes_per_day``) is checked as a call is recorded (``opened``: the store's
transaction), and every ``ENFORCE_S`` the answered calls this process carries in a
workspace whose minutes for today are spent are hung up (``start``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from google.protobuf import struct_pb2

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.dispatcher import mapping
from switchboard.dispatcher.ports.context import ContextPort
from switchboard.dispatcher.ports.peers import Via
from switchboard.dispatcher.talk.phone.store import ENDED, CallQuota, CallRecord, CallStore
from switchboard.platform.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ServerUnavailable,
    SwitchboardError,
)
from switchboard.platform.security.policy import Principal
from switchboard.platform.store import pagination
from switchboard.platform.store.db import Database
from switchboard.platform.store.keyed import Created, Publisher
from switchboard.platform.store.outbox import Staged
from switchboard.platform.store.storage import Idempotency, idempotency
from switchboard.platform.values import timefields
from switchboard.platform.values.names import new_id, now
from switchboard.platform.values.resources import AssistantName, CallName, UserName, WorkspaceName

log = logging.getLogger("switchboard.dispatcher.talk.phone")

ANSWERED: Final = int(pb.CALL_STATE_ANSWERED)
MAX_OPENING_CHARS: Final = 16_000
DEFAULT_RING_S: Final = 30.0
MIN_RING_S: Final = 5.0
MAX_RING_S: Final = 120.0
#: Calls of stopped holders ended per pass (``end_orphans``).
ORPHANS_PER_PASS: Final = 100
#: How often the minutes' quota is held against the live calls, and how often (in
#: those passes) the calls of stopped holders are looked for (their lease outlives them).
ENFORCE_S: Final = 10.0
ORPHANS_EVERY: Final = 6
#: Answered calls of this process looked at per pass.
LIVE_PER_PASS: Final = 1000
SPENT: Final = "the workspace's call minutes for today are spent"
#: A workspace's call quota, read when a call is recorded (``WorkspaceQuota``).
QuotaOf = Callable[[str], Awaitable[CallQuota]]
_E164_DIGITS: Final = range(8, 16)


@dataclass(frozen=True)
class Order:
    """A call to place, checked (PlaceCall's request, or a schedule's tick)."""

    workspace_id: str
    trunk: str
    to_number: str
    assistant: AssistantName
    opening: str
    ring_timeout_s: float
    user_id: str
    key: Idempotency | None = None
    schedule: str = ""


@dataclass
class _Turn:
    """A call's writes, one at a time: the lock and how many hold or wait for it."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


@dataclass(frozen=True)
class Opened:
    """A call recorded: ``fresh`` False for the retry of an earlier PlaceCall (its call)."""

    call: pb.Call
    fresh: bool = True


class Line(Protocol):
    """What carries some of this process's calls (SIP's, the media streams')."""

    def end(self, call_id: str, why: str) -> bool:
        """Hang up a call this process carries; False if it carries no such call."""
        ...


class Phone(Line, Protocol):
    """What places calls too (``talk/sip/calls.py``)."""

    async def place(self, order: Order) -> pb.Call:
        """Place the call; it is recorded DIALING before the INVITE goes out."""
        ...


class EndPeer(Protocol):
    """EndCall on the replica at ``address`` (``ports/peers.py``)."""

    async def end_call(self, address: str, via: Via, request: pb.EndCallRequest) -> pb.Call: ...


def message(record: CallRecord, at: dt.datetime | None = None) -> pb.Call:
    """The ``Call`` a record shows; a live call's duration so far."""
    call = pb.Call.FromString(record.data)
    call.name = str(CallName(record.workspace_id, record.id))
    call.state = record.state  # type: ignore[assignment]
    if record.state == ANSWERED and call.HasField("answer_time"):
        answered = call.answer_time.ToDatetime(dt.UTC)
        call.duration.FromTimedelta(max(dt.timedelta(0), (at or now()) - answered))
    return call


def changed_event(call: pb.Call, change: events_pb2.ChangeKind.ValueType) -> events_pb2.Event:
    name = CallName.parse(call.name, "name")
    event = events_pb2.Event(
        type=events_pb2.EVENT_TYPE_CALL_CHANGED,
        workspace=mapping.workspace_name(name.workspace),
        conversation=call.conversation,
        call_changed=events_pb2.CallChanged(change=change, call=call),
    )
    if call.user:
        event.actor.name = call.user
    return event


class CallBook:
    """See the module doc. ``phone`` is set once SIP has started (``talk/sip/build.py``),
    and each other line added to ``lines`` once it has (``talk/streams/build.py``)."""

    def __init__(
        self,
        database: Database,
        bus: Publisher,
        pages: pagination.PageTokens,
        *,
        instance_id: str,
        peers: EndPeer,
        quota: QuotaOf | None = None,
    ) -> None:
        self._store = CallStore(database)
        self._quota = quota
        self._task: asyncio.Task[None] | None = None
        self._bus = bus
        self._pages = pages
        self._peers = peers
        self.instance_id = instance_id
        self.phone: Phone | None = None
        self.lines: list[Line] = []
        #: One write at a time per call, in the order they were asked.
        self._locks: dict[str, _Turn] = {}

    # -- what carries a call writes ---------------------------------------------------------

    async def opened(
        self, call: pb.Call, *, workspace_id: str, user_id: str, key: Idempotency | None = None
    ) -> Opened:
        """Record a new call (its ``name`` is made here); with ``key``, the retry of an
        earlier PlaceCall gets that one's call instead (``fresh`` False)."""
        stamp = now()
        call_id = new_id()
        call.name = str(CallName(workspace_id, call_id))
        call.create_time.FromDatetime(stamp)
        record = CallRecord(
            workspace_id=workspace_id,
            id=call_id,
            state=int(call.state),
            holder=self.instance_id,
            user_id=user_id,
            assistant_id=AssistantName.parse(call.assistant, "assistant").assistant,
            data=_stored(call),
            created_at=stamp,
            updated_at=stamp,
        )
        staged: Staged[Created[CallRecord]] = Staged(
            self._bus.outbox,
            lambda made: (
                [changed_event(message(made.record), events_pb2.CHANGE_KIND_CREATED)]
                if made.fresh
                else None
            ),
            key=key.key if key else "",
        )
        quota = await self._quota(workspace_id) if self._quota is not None else None
        made = await self._store.add(record, key, staged, quota)
        await self._bus.publish_staged(staged.events)
        return Opened(message(made.record), fresh=made.fresh)

    async def update(self, name: str, edit: Callable[[pb.Call], None]) -> pb.Call | None:
        """``edit`` the call as stored (its ``state`` too); None if it ended already."""
        parsed = CallName.parse(name, "name")
        turn = self._locks.setdefault(name, _Turn())
        turn.users += 1
        try:
            async with turn.lock:
                return await self._write(parsed, edit)
        finally:
            # Kept while anyone waits on it: a new lock meanwhile would let two write.
            turn.users -= 1
            if not turn.users:
                del self._locks[name]

    async def _write(self, name: CallName, edit: Callable[[pb.Call], None]) -> pb.Call | None:
        def change(state: int, data: bytes) -> tuple[int, bytes, int] | None:
            call = pb.Call.FromString(data)
            call.state = state  # type: ignore[assignment]
            before = call.SerializeToString(deterministic=True)
            edit(call)
            if call.state == ENDED:
                _settle(call)
            if call.SerializeToString(deterministic=True) == before:
                return None
            seconds = round(call.duration.ToTimedelta().total_seconds())
            return int(call.state), _stored(call), seconds

        staged: Staged[CallRecord | None] = Staged(
            self._bus.outbox,
            lambda done: (
                []
                if done is None
                else [changed_event(message(done), events_pb2.CHANGE_KIND_UPDATED)]
            ),
        )
        done = await self._store.change(name.workspace, name.call, change, staged)
        await self._bus.publish_staged(staged.events)
        return None if done is None else message(done)

    # -- the quota and the take-over, now and then ----------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="calls-watch")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    @property
    def _lines(self) -> list[Line]:
        return [*self.lines, *([self.phone] if self.phone is not None else [])]

    async def _watch(self) -> None:
        passes = 0
        while True:
            try:
                if self._lines:
                    await self.enforce_minutes()
                    if passes % ORPHANS_EVERY == 0:
                        await self.end_orphans()
            except SwitchboardError as exc:
                # The database away: the next pass tries again.
                log.info("the calls could not be looked at now: %s", exc.message)
            passes += 1
            await asyncio.sleep(ENFORCE_S)

    async def enforce_minutes(self) -> int:
        """Hang up the answered calls this process carries in workspaces whose call
        minutes for today are spent; how many."""
        if self._quota is None:
            return 0
        by_workspace: dict[str, list[CallRecord]] = {}
        for record in await self._store.live_answered(self.instance_id, LIVE_PER_PASS):
            by_workspace.setdefault(record.workspace_id, []).append(record)
        ended = 0
        for workspace_id, held in by_workspace.items():
            quota = await self._quota(workspace_id)
            if not quota.call_minutes_per_day:
                continue
            if await self._store.seconds_today(workspace_id) < quota.call_minutes_per_day * 60:
                continue
            for record in held:
                ended += any(line.end(record.id, SPENT) for line in self._lines)
        if ended:
            log.info("%d calls were hung up: their workspaces' call minutes are spent", ended)
        return ended

    async def end_orphans(self) -> int:
        """End the calls whose holder stopped (their lines went down with it)."""
        ended = 0
        for record in await self._store.orphans(self.instance_id, ORPHANS_PER_PASS):
            done = await self.update(
                str(CallName(record.workspace_id, record.id)),
                lambda call: _end(call, 0, "the server carrying it stopped"),
            )
            ended += done is not None
        if ended:
            log.info("%d calls of stopped servers were ended", ended)
        return ended

    # -- the RPCs ---------------------------------------------------------------------------

    async def get(self, name: str) -> pb.Call:
        parsed = CallName.parse(name, "name")
        record = await self._store.get(parsed.workspace, parsed.call)
        if record is None:
            raise NotFound(f"{name} not found")
        return message(record)

    async def list(self, request: pb.ListCallsRequest) -> pb.ListCallsResponse:
        workspace_id = WorkspaceName.parse(request.parent, "parent").workspace
        size = pagination.page_size(request.page_size, default=50, maximum=100)
        order = self._store.table.order
        fingerprint = pagination.fingerprint("calls", workspace_id, request.live_only)
        after = None
        if request.page_token:
            after = order.after(self._pages.decode(request.page_token, fingerprint, order.shape))
        records = await self._store.listed(
            workspace_id, after, size + 1, live_only=request.live_only
        )
        token = ""
        if len(records) > size:
            token = self._pages.encode(order.key(records[size - 1]), fingerprint)
        stamp = now()
        return pb.ListCallsResponse(
            calls=[message(r, stamp) for r in records[:size]], next_page_token=token
        )

    async def end(self, user_name: str, name: str, via: Via) -> pb.Call:
        parsed = CallName.parse(name, "name")
        found = await self._store.with_holder(parsed.workspace, parsed.call)
        if found is None:
            raise NotFound(f"{name} not found")
        record, holder = found
        if record.state == ENDED:
            return message(record)
        why = f"ended by {user_name}"
        if record.holder == self.instance_id:
            if any(line.end(parsed.call, why) for line in self._lines):
                return message(record)
            # Recorded as live, carried by nothing here (its carrier gave up on it).
            return await self._ended_now(name, record, why)
        if not holder.live:
            return await self._ended_now(name, record, "the server carrying it stopped")
        if via.forwarded or not holder.address:
            raise ServerUnavailable("the server carrying this call cannot be reached; try again")
        return await self._peers.end_call(holder.address, via, pb.EndCallRequest(name=name))

    async def _ended_now(self, name: str, record: CallRecord, why: str) -> pb.Call:
        done = await self.update(name, lambda call: _end(call, 0, why))
        if done is not None:
            return done
        return await self.get(name)  # it ended meanwhile

    async def place(
        self, user_id: str, request: pb.PlaceCallRequest, *, schedule: str = ""
    ) -> pb.Call:
        order = checked_order(request, user_id=user_id, schedule=schedule)
        if order.key is not None:
            earlier = await self._store.replayed(order.key)
            if earlier is not None:
                return message(earlier)
        phone = self.phone
        if phone is None:
            raise FailedPrecondition(
                "this server places no phone calls: SWITCHBOARD_SIP_LISTEN is not set"
            )
        return await phone.place(order)

    async def place_for(self, user_id: str, request: pb.PlaceCallRequest, schedule: str) -> pb.Call:
        """A schedule's tick placing its call, as the schedule's creator."""
        return await self.place(user_id, request, schedule=schedule)


def checked_order(request: pb.PlaceCallRequest, *, user_id: str, schedule: str = "") -> Order:
    """PlaceCall's request as an ``Order``; INVALID_ARGUMENT naming every wrong field."""
    workspace = WorkspaceName.parse(request.parent, "parent")
    violations: list[FieldViolation] = []
    if not request.trunk or len(request.trunk) > 63:
        violations.append(FieldViolation("trunk", "name one of the server's SIP trunks"))
    if not is_e164(request.to_number):
        violations.append(
            FieldViolation("to_number", "an E.164 number is needed: '+' and 8 to 15 digits")
        )
    assistant: AssistantName | None = None
    try:
        assistant = AssistantName.parse(request.assistant, "assistant")
    except InvalidArgument as exc:
        violations.extend(exc.violations)
    else:
        if assistant.workspace != workspace.workspace:
            violations.append(FieldViolation("assistant", "must be in the parent workspace"))
    opening = request.opening_message
    if not opening.strip() or len(opening) > MAX_OPENING_CHARS:
        violations.append(
            FieldViolation("opening_message", f"1 to {MAX_OPENING_CHARS} characters are needed")
        )
    ring_s = DEFAULT_RING_S
    if request.HasField("ring_timeout"):
        # OUT_OF_RANGE for a Duration no Duration can be (timefields).
        ring_s = timefields.seconds(request.ring_timeout, "ring_timeout")
        if not MIN_RING_S <= ring_s <= MAX_RING_S:
            violations.append(
                FieldViolation(
                    "ring_timeout", f"from {MIN_RING_S:.0f} s to {MAX_RING_S:.0f} s, if set"
                )
            )
    key = None
    try:
        key = idempotency(user_id, "PlaceCall", request)
    except InvalidArgument as exc:
        violations.extend(exc.violations)
    if violations or assistant is None:
        raise InvalidArgument("the call cannot be placed as asked", violations)
    return Order(
        workspace_id=workspace.workspace,
        trunk=request.trunk,
        to_number=request.to_number,
        assistant=assistant,
        opening=opening,
        ring_timeout_s=ring_s,
        user_id=user_id,
        key=key,
        schedule=schedule,
    )


def is_e164(number: str) -> bool:
    digits = number[1:]
    return (
        number.startswith("+")
        and digits.isascii()
        and digits.isdigit()
        and len(digits) in _E164_DIGITS
        and not digits.startswith("0")
    )


async def call_conversation(
    context: ContextPort,
    principal: Principal,
    workspace: str,
    title: str,
    facts: dict[str, Any],
    *,
    timeout_s: float,
) -> str:
    """A new conversation for a call, titled ``title``, its metadata ``facts`` (the
    channel, the numbers): its transcript, as the user the call acts as."""
    metadata = struct_pb2.Struct()
    metadata.update(facts)
    made = await context.create_conversation(
        principal,
        cpb.CreateConversationRequest(
            parent=workspace,
            conversation=cpb.Conversation(title=title[:200], metadata=metadata),
            # Made once per call, never sent again: any fresh id.
            request_id=f"call-{uuid.uuid4().hex}",
        ),
        timeout_s=timeout_s,
    )
    return made.name


def new_call(
    *,
    direction: pb.CallDirection.ValueType,
    state: pb.CallState.ValueType,
    trunk: str,
    from_number: str,
    to_number: str,
    assistant: str,
    conversation: str,
    user_id: str,
    opening: str = "",
    schedule: str = "",
    caller_known: bool = False,
    channel: str = "sip",
    tls: bool = False,
) -> pb.Call:
    """A call as its carrier first records it (``opened`` names it); one recorded
    ANSWERED (a media stream's, answered by the carrier) from now."""
    call = pb.Call(
        direction=direction,
        state=state,
        channel=channel,
        trunk=trunk,
        from_number=from_number,
        to_number=to_number,
        assistant=assistant,
        conversation=conversation,
        opening_message=opening,
        user=str(UserName(user_id)),
        schedule=schedule,
        caller_known=caller_known,
        tls=tls,
    )
    if state == pb.CALL_STATE_ANSWERED:
        call.answer_time.FromDatetime(now())
    return call


def answer(call: pb.Call) -> None:
    """An ``update`` edit: the call was answered."""
    if call.state != pb.CALL_STATE_ENDED:
        call.state = pb.CALL_STATE_ANSWERED
        call.answer_time.FromDatetime(now())


def answered_at(at: dt.datetime) -> Callable[[pb.Call], None]:
    """An ``update`` edit: the call was answered at ``at`` (when its carrier said so, not
    when the write ran: its duration and its limits count from there)."""

    def edit(call: pb.Call) -> None:
        if call.state != pb.CALL_STATE_ENDED:
            call.state = pb.CALL_STATE_ANSWERED
            call.answer_time.FromDatetime(at)

    return edit


def secured(call: pb.Call) -> None:
    """An ``update`` edit: the call's audio is SRTP."""
    call.srtp = True


def ringing(call: pb.Call) -> None:
    if call.state == pb.CALL_STATE_DIALING:
        call.state = pb.CALL_STATE_RINGING


def ended(status: int, why: str) -> Callable[[pb.Call], None]:
    """An ``update`` edit: the call ended now (when this is asked, not when the write
    runs) with SIP ``status``, for ``why``."""
    at = now()
    return lambda call: _end(call, status, why, at)


def _end(call: pb.Call, status: int, why: str, at: dt.datetime | None = None) -> None:
    call.state = pb.CALL_STATE_ENDED
    call.sip_status = status
    call.end_reason = why[:300]
    if at is not None:
        call.end_time.FromDatetime(at)


def _settle(call: pb.Call) -> None:
    """An ended call's end time and how long it was answered."""
    if not call.HasField("end_time"):
        call.end_time.FromDatetime(now())
    if call.HasField("answer_time"):
        span = call.end_time.ToDatetime(dt.UTC) - call.answer_time.ToDatetime(dt.UTC)
        call.duration.FromTimedelta(max(dt.timedelta(0), span))


def _stored(call: pb.Call) -> bytes:
    """What the record keeps: the name and state are columns, the duration is read live."""
    kept = pb.Call()
    kept.CopyFrom(call)
    kept.ClearField("name")
    return kept.SerializeToString(deterministic=True)


def said(exc: BaseException) -> str:
    """Why admitting or recording a call failed, for the log: a timeout named, a
    ``SwitchboardError``'s own message, else only the exception's kind (its text may hold
    what a caller sent)."""
    if isinstance(exc, TimeoutError):
        return "admitting it timed out"
    message = getattr(exc, "message", "")
    return str(message)[:300] if message else type(exc).__name__
