"""Subscriptions: replay from a cursor, hand over to live delivery, heartbeats, limits.

A subscription attaches to the fan-out and notes the bus head *in the same
synchronous step*, so every event is either at or before that mark (replayed
from the log) or after it (pushed live): no gap and no duplicate at the
hand-over. Live events wait in a bounded per-subscription queue until the
fan-out wakes the writer (at once, or in its turn when many follow the same
name: ``platform/events/bus.py``); the writer then sends everything queued as one
frame and waits for its next turn, so a writer that is behind coalesces. A
queue that overflows ends the subscription with RESOURCE_EXHAUSTED naming the
cursor to resume from, so the client loses nothing.

Access is held through the stream's grant (``platform/security/accesswatch.py``): it
is checked when a subscription opens and again whenever anything says it may
have changed (an event that changes who may see a watched workspace or user,
in log order; a revocation; the credential's expiry; degraded mode; every
``reauthorize_s``). Each such wake queues a marker, and nothing queued after it
is sent before the re-check passed; a failed one ends the subscription with
the status a unary call would get.

A subscription that asked for merged deltas (``merge_deltas``) gets the
consecutive text-delta RUN_UPDATED events of one run in a batch as one event
(``merge_deltas``): its update covers ``first_sequence`` .. ``sequence`` and it
keeps the last one's id and cursor, so the batch's cursor resumes exactly.

This module does not import grpc: ``streams.py`` turns batches into frames.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from switchboard.api.events.v1 import events_pb2
from switchboard.platform.errors import (
    DependencyUnavailable,
    FieldViolation,
    InvalidArgument,
    QuotaExceeded,
    SubscriberTooSlow,
)
from switchboard.platform.events.bus import EventBus
from switchboard.platform.events.deltas import delta_stretch, merge_into
from switchboard.platform.events.eventlog import (
    Logged,
    Position,
    format_cursor,
    logged_part,
    parse_cursor,
)
from switchboard.platform.security.accesswatch import Hold
from switchboard.platform.security.policy import Permission, Policy, Principal
from switchboard.platform.values.resources import ConversationName, UserName, WorkspaceName

#: Events read from the log per replay round trip.
REPLAY_PAGE: Final = 500
#: A coalesced batch stays well under the default 4 MiB message limit.
MAX_BATCH_BYTES: Final = 1024 * 1024
_RUN_UPDATED: Final = events_pb2.EVENT_TYPE_RUN_UPDATED

_SCOPE_KINDS: Final[dict[str, type[UserName | WorkspaceName | ConversationName]]] = {
    "user": UserName,
    "workspace": WorkspaceName,
    "conversation": ConversationName,
}
_KNOWN_TYPES: Final = frozenset(events_pb2.EventType.values()) - {events_pb2.EVENT_TYPE_UNSPECIFIED}


class _Recheck:
    """Queue marker: confirm access before sending anything after it."""


RECHECK: Final = _Recheck()


def _nothing() -> None:
    return None


def _until_recheck(queue: Iterable[Logged | _Recheck]) -> Iterator[Logged]:
    for entry in queue:
        if isinstance(entry, _Recheck):
            return
        yield entry


def _is_delta(item: Logged) -> bool:
    return item.type == _RUN_UPDATED and item.event.run_updated.update.HasField("delta")


def merge_deltas(items: Sequence[Logged]) -> list[Logged]:
    """``items`` (a batch, in log order) with each stretch of text-delta RUN_UPDATED
    events that merge (``platform/events/deltas.py``: one run's, sequences following
    each other) as one event.

    The merged event is the last one's (its id, time and cursor: what comes after it
    in the batch and the batch's own cursor are unchanged) with the run update's text
    theirs joined and ``first_sequence`` the first one's. The events are shared
    with every subscriber: a merge is a new one."""
    if len(items) < 2:
        return list(items)
    updates = [item.event.run_updated.update if _is_delta(item) else None for item in items]
    out: list[Logged] = []
    index = 0
    while index < len(items):
        end = delta_stretch(updates, index)
        out.append(items[index] if end == index + 1 else _merged(items[index:end]))
        index = end
    return out


def _merged(stretch: Sequence[Logged]) -> Logged:
    last = stretch[-1]
    event = events_pb2.Event()
    event.CopyFrom(last.event)
    merge_into(event.run_updated.update, [item.event.run_updated.update for item in stretch])
    return Logged(last.position, event)


def matches(item: Logged, keys: frozenset[str], types: frozenset[int]) -> bool:
    """Whether ``item`` is in one of the scopes ``keys`` and of one of ``types`` (any if empty)."""
    return (item.user in keys or item.workspace in keys or item.conversation in keys) and (
        not types or item.type in types
    )


@dataclass(frozen=True)
class Limits:
    heartbeat_s: float
    reauthorize_s: float
    buffer: int
    max_batch: int
    max_scopes: int
    per_principal: int
    per_stream: int


@dataclass(frozen=True)
class Spec:
    """A validated subscription request."""

    scopes: tuple[tuple[str, str], ...]  # (kind, resource name)
    types: frozenset[int]
    after: Position | None
    #: ``SubscribeRequest.merge_deltas``: consecutive deltas of a run in a batch as one.
    merge_deltas: bool = False

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(name for _, name in self.scopes))

    def names(self, prefix: str = "") -> tuple[tuple[str, str], ...]:
        """(scope name, request field) pairs, as the policy and ``Grant.hold`` take them."""
        return tuple(
            (name, f"{prefix}scopes[{i}].{kind}") for i, (kind, name) in enumerate(self.scopes)
        )


def parse_spec(
    scopes: Sequence[events_pb2.Scope],
    after_cursor: str,
    types: Sequence[int],
    limits: Limits,
    prefix: str = "",
    *,
    merge_deltas: bool = False,
) -> Spec:
    """Validate scopes, cursor and types; InvalidArgument lists every problem."""
    violations: list[FieldViolation] = []
    if not scopes:
        violations.append(FieldViolation(f"{prefix}scopes", "at least one scope is required"))
    elif len(scopes) > limits.max_scopes:
        violations.append(
            FieldViolation(f"{prefix}scopes", f"at most {limits.max_scopes} scopes per request")
        )
    parsed: list[tuple[str, str]] = []
    for i, scope in enumerate(scopes[: limits.max_scopes]):
        kind = scope.WhichOneof("scope")
        path = f"{prefix}scopes[{i}]"
        if kind is None:
            violations.append(FieldViolation(path, "set one of user, workspace, conversation"))
            continue
        name = getattr(scope, kind)
        if _SCOPE_KINDS[kind].parse_or_none(name) is None:
            violations.append(FieldViolation(f"{path}.{kind}", _SCOPE_KINDS[kind].refusal(name)))
            continue
        parsed.append((kind, name))
    after: Position | None = None
    if after_cursor:
        after = parse_cursor(after_cursor)
        if after is None:
            violations.append(
                FieldViolation(f"{prefix}after_cursor", "is not a cursor this server issued")
            )
    if len(types) > len(_KNOWN_TYPES):
        violations.append(FieldViolation(f"{prefix}types", "lists more types than exist"))
    for i, value in enumerate(types[: len(_KNOWN_TYPES)]):
        if value not in _KNOWN_TYPES:
            violations.append(FieldViolation(f"{prefix}types[{i}]", "is not a known event type"))
    if violations:
        raise InvalidArgument("invalid subscription", violations)
    return Spec(tuple(dict.fromkeys(parsed)), frozenset(types), after, merge_deltas)


async def authorize(policy: Policy, principal: Principal, spec: Spec) -> None:
    """Whether ``principal`` may read every scope of ``spec`` now (a one-off read: ListEvents)."""
    for name, field in spec.names():
        await policy.authorize(principal, name, Permission.READ, field)


class Quotas:
    """Live subscriptions per principal in this process."""

    def __init__(self, per_principal: int) -> None:
        self._per_principal = per_principal
        self._counts: dict[str, int] = {}

    def acquire(self, principal: Principal) -> None:
        count = self._counts.get(principal.user_id, 0)
        if count >= self._per_principal:
            raise QuotaExceeded(
                f"at most {self._per_principal} live event subscriptions per user",
                subject=f"{principal.user_name}/eventSubscriptions",
            )
        self._counts[principal.user_id] = count + 1

    def release(self, principal: Principal) -> None:
        count = self._counts.get(principal.user_id, 0) - 1
        if count > 0:
            self._counts[principal.user_id] = count
        else:
            self._counts.pop(principal.user_id, None)


class Subscription:
    """One subscription's state: replay range, live queue, positions sent and acked."""

    def __init__(
        self,
        bus: EventBus,
        principal: Principal,
        spec: Spec,
        limits: Limits,
        wake: Callable[[], None],
    ) -> None:
        self._bus = bus
        self.principal = principal
        self.spec = spec
        self._limits = limits
        self._wake = wake
        self.keys = spec.keys
        # Access changes reach it through its hold (``recheck`` is its listener), not the fan-out.
        self.watches: tuple[str, ...] = ()
        self.owner = principal.user_name
        self._hold: Hold | None = None
        self._key_set = frozenset(self.keys)
        self._types = spec.types
        self._queue: deque[Logged | _Recheck] = deque()
        self._overflowed = False
        self._attached = False
        # Newest position queued or passed over: live pushes at or below it are ignored.
        self._floor: Position = (0, 0)
        # Newest position the client has been sent (events or heartbeat): where it resumes.
        self.sent: Position = (0, 0)
        self.acked: Position | None = None
        self._replay_from: Position | None = None
        self._unfollow: Callable[[], None] = _nothing
        self._replay_upto: Position = (0, 0)
        self._merge = spec.merge_deltas

    # -- lifecycle -----------------------------------------------------------------

    async def open(self, hold: Hold) -> None:
        """Check the cursor, then attach and mark the hand-over point atomically.

        ``hold`` is the access to its scopes, granted with ``recheck`` as its listener.
        """
        self._hold = hold
        after = self.spec.after
        if after is not None and len(after) > 2 and not self._bus.own_token(after):
            # A token another process numbered (a resume on another replica): from the
            # logged event before it; the tokens this process holds after that event are
            # sent again, with their ids (a consumer drops an id it has seen).
            after = logged_part(after)
            # Not merged: the consumer may have had some of them already, one by one
            # or merged there, and drops by sequence only what it can tell apart.
            self._merge = False
        if after is not None:
            await self._bus.check_cursor(after)
        # The whole log, and the other processes' tokens of what it shows (those said
        # before included).
        self._unfollow = await self._bus.follow(self.keys)
        if not self._bus.ring.known:
            # Redis away since this process started: where the live tail is is unknown.
            raise DependencyUnavailable("the event log is not reachable yet; retry")
        # No await between these lines: the mark and the attach are one step.
        mark = self._bus.head
        self._bus.fanout.attach(self)
        self._attached = True
        if after is None or after >= mark:
            # Live tail, or a cursor this process has not delivered yet (another
            # replica got there first): everything after it arrives live.
            start = mark if after is None else after
            self.sent = self._floor = start
        else:
            self.sent = after
            self._floor = mark
            self._replay_from, self._replay_upto = after, mark

    def close(self) -> None:
        if self._attached:
            self._bus.fanout.detach(self)
            self._attached = False
        self._unfollow()
        if self._hold is not None:
            self._hold.release()
        self._queue.clear()

    # -- fan-out side (synchronous, never blocks) ----------------------------------

    def push(self, item: Logged) -> bool:
        if item.position <= self._floor:
            return False  # already queued through another of its scopes, or replayed
        self._floor = item.position
        if self._overflowed or (self._types and item.type not in self._types):
            return False
        if len(self._queue) >= self._limits.buffer:
            self._overflowed = True
            self._queue.clear()
        else:
            self._queue.append(item)
        return True

    def wake(self) -> None:
        self._wake()

    def recheck(self) -> None:
        """Access may have changed: confirm it before sending anything queued after now."""
        if not self._overflowed:
            self._queue.append(RECHECK)
            self._wake()

    # -- writer side -----------------------------------------------------------------

    @property
    def backlog(self) -> int:
        """Live events queued and not yet sent (``switchboard_event_subscriber_backlog_events``)."""
        return len(self._queue)

    @property
    def resume_cursor(self) -> str:
        return format_cursor(self.acked if self.acked is not None else self.sent)

    def ready(self) -> bool:
        """Whether ``next_batch`` has work right now."""
        return self._replay_from is not None or bool(self._queue) or self._overflowed

    def sent_batch(self) -> bool:
        """After a batch went out (gRPC took it): whether to ask for the next one at once.

        Replay goes on at the client's pace. Live events left over (more than one
        frame holds) wait for this subscription's next turn in the fan-out, like
        events that arrive meanwhile, rather than jumping the queue."""
        if self._attached:
            fanout = self._bus.fanout
            fanout.sent(self)
            if self._replay_from is None and self._queue:
                fanout.wake_later(self)
        return self._replay_from is not None

    def idle(self) -> None:
        """Woken with nothing to send: its turn in the fan-out is over."""
        if self._attached:
            self._bus.fanout.sent(self)

    async def next_batch(self) -> list[Logged]:
        """The next events to send, oldest first; empty when there is nothing now.

        Raises (a SwitchboardError) when the subscription must end.
        """
        if self._overflowed:
            raise SubscriberTooSlow(
                "the subscriber fell behind its buffer; resume from the cursor in metadata",
                metadata={"resume_cursor": self.resume_cursor},
            )
        if self._replay_from is not None:
            # History is sent only while access holds (a change may have woken nobody's queue).
            await self._confirm()
            batch = await self._replay()
            if batch:
                return batch
        return await self._drain()

    async def _confirm(self) -> None:
        if self._hold is not None:
            await self._hold.confirm()

    async def _replay(self) -> list[Logged]:
        keys, types = self._key_set, self._types
        while self._replay_from is not None:
            page = await self._bus.read(
                self._replay_from, self._replay_upto, REPLAY_PAGE, tokens=True
            )
            if not page:
                self._replay_from = None
                break
            self._replay_from = page[-1].position
            matched = self._fill(item for item in page if matches(item, keys, types))
            if matched:
                self._replay_from = matched[-1].position
                self.sent = matched[-1].position
                return merge_deltas(matched) if self._merge else matched
        return []

    async def _drain(self) -> list[Logged]:
        queue = self._queue
        while queue and queue[0] is RECHECK:
            queue.popleft()
            await self._confirm()
        if queue:
            # Cheap unless a check is due: a credential that ran out since the
            # last batch (no event marks that instant) ends the stream first.
            await self._confirm()
        # Up to the next re-check marker: what came before a change is sent first.
        batch = self._fill(_until_recheck(queue))
        for _ in batch:
            queue.popleft()
        if batch:
            self.sent = batch[-1].position
            if self._merge:
                return merge_deltas(batch)
        return batch

    def _fill(self, candidates: Iterable[Logged]) -> list[Logged]:
        """The first candidates that fit one message: ``max_batch`` events, MAX_BATCH_BYTES."""
        batch: list[Logged] = []
        size = 0
        for item in itertools.islice(candidates, self._limits.max_batch):
            size += len(item.item)
            if batch and size > MAX_BATCH_BYTES:
                break
            batch.append(item)
        return batch

    def caught_up_position(self) -> Position:
        """Heartbeat position: with nothing queued or to replay, the subscriber has
        seen everything this process delivered."""
        if self._replay_from is None and not self._queue:
            self.sent = max(self.sent, self._bus.head)
        return self.sent

    def caught_up(self) -> str:
        return format_cursor(self.caught_up_position())

    def ack(self, position: Position) -> bool:
        """Record an acknowledgement; False if it acknowledges something never sent."""
        if position > self.sent:
            return False
        if self.acked is None or position > self.acked:
            self.acked = position
        return True


class Waker:
    """An asyncio.Event with a cheap ``__call__`` for the fan-out."""

    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def __call__(self) -> None:
        self.event.set()

    async def wait(self, timeout_s: float) -> bool:
        """Wait until woken or ``timeout_s``; True if woken."""
        if self.event.is_set():
            self.event.clear()
            return True
        try:
            async with asyncio.timeout(timeout_s):
                await self.event.wait()
        except TimeoutError:
            return False
        self.event.clear()
        return True
