"""Event subscriptions without gRPC: what a request may ask for, whose scopes a
caller may read, replay handing over to live delivery, and the limits on what
one subscription holds and sends.

The bus is the embedded one (a migrated SQLite file, its log and outbox) and
access is the real policy over the membership table, held through the real
``AccessWatch``. Only the credential check is a stand-in (``Unexpiring``): the
auth service answers it in production, and here every credential holds.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import AsyncIterator, Sequence

import pytest

from switchboard.api.events.v1 import events_pb2
from switchboard.events.subscriptions import (
    MAX_BATCH_BYTES,
    Limits,
    Quotas,
    Spec,
    Subscription,
    Waker,
    authorize,
    parse_spec,
)
from switchboard.platform.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    SubscriberTooSlow,
)
from switchboard.platform.events.bus import EventBus
from switchboard.platform.events.eventlog import (
    LocalLog,
    Logged,
    Position,
    format_cursor,
    parse_cursor,
)
from switchboard.platform.security.accesswatch import AccessWatch
from switchboard.platform.security.membership import MembershipStore
from switchboard.platform.security.policy import (
    ALL_SCOPES,
    AuthMethod,
    Permission,
    Policy,
    Principal,
    Role,
)
from switchboard.platform.security.policy import Scope as TokenScope
from switchboard.platform.store.db import Database, open_database
from switchboard.platform.store.models import UserRow
from switchboard.platform.store.outbox import Outbox
from switchboard.platform.values.names import new_id, now
from switchboard.platform.values.resources import ConversationName, UserName, WorkspaceName
from tests.conftest import CALL_DEADLINE_S, TEST_DATABASE_TIMEOUT_S

pytestmark = pytest.mark.unit

CREATED = events_pb2.EVENT_TYPE_MESSAGE_CREATED
CHANGED = events_pb2.EVENT_TYPE_CONVERSATION_CHANGED


LIMITS = Limits(
    heartbeat_s=15.0,
    reauthorize_s=3600.0,
    buffer=100,
    max_batch=100,
    max_scopes=4,
    per_principal=2,
    per_stream=8,
)


def limits(**changes: int) -> Limits:
    return dataclasses.replace(LIMITS, **changes)


def workspace(name: str) -> events_pb2.Scope:
    return events_pb2.Scope(workspace=name)


# -- what a request may ask for ---------------------------------------------------------------


def test_every_problem_of_a_request_is_named_with_its_field() -> None:
    scopes = [
        events_pb2.Scope(),
        events_pb2.Scope(user="users/A B"),
        workspace("workspaces/w\n"),
        events_pb2.Scope(conversation="workspaces/w"),
    ]
    with pytest.raises(InvalidArgument) as refused:
        parse_spec(scopes, "not-a-cursor", [CREATED, 999], limits(), "add.")
    assert [(v.field, v.description) for v in refused.value.violations] == [
        ("add.scopes[0]", "set one of user, workspace, conversation"),
        ("add.scopes[1].user", UserName.refusal("users/A B")),
        ("add.scopes[2].workspace", WorkspaceName.refusal("workspaces/w\n")),
        ("add.scopes[3].conversation", ConversationName.refusal("workspaces/w")),
        ("add.after_cursor", "is not a cursor this server issued"),
        ("add.types[1]", "is not a known event type"),
    ]
    # Each says the form its scope's name must have.
    assert "users/{user}" in refused.value.violations[1].description
    assert "workspaces/{workspace}/conversations/{conversation}" in (
        refused.value.violations[3].description
    )


@pytest.mark.parametrize(
    ("count", "description"),
    [(0, "at least one scope is required"), (5, "at most 4 scopes per request")],
)
def test_a_request_names_one_to_max_scopes(count: int, description: str) -> None:
    scopes = [workspace(f"workspaces/w{i}") for i in range(count)]
    with pytest.raises(InvalidArgument) as refused:
        parse_spec(scopes, "", [], limits())
    assert [(v.field, v.description) for v in refused.value.violations] == [("scopes", description)]


def test_too_many_types_is_one_problem_not_one_per_type() -> None:
    many = [CREATED] * (len(events_pb2.EventType.values()) + 5)
    with pytest.raises(InvalidArgument) as refused:
        parse_spec([workspace("workspaces/w")], "", many, limits())
    assert [v.field for v in refused.value.violations] == ["types"]


def test_a_valid_request_is_deduplicated_and_names_its_fields() -> None:
    scopes = [
        workspace("workspaces/w"),
        events_pb2.Scope(conversation="workspaces/w/conversations/c"),
        workspace("workspaces/w"),
    ]
    spec = parse_spec(scopes, "12-3", [CREATED, CREATED], limits())
    assert spec == Spec(
        (("workspace", "workspaces/w"), ("conversation", "workspaces/w/conversations/c")),
        frozenset({CREATED}),
        (12, 3),
    )
    assert spec.keys == ("workspaces/w", "workspaces/w/conversations/c")
    assert spec.names("add.") == (
        ("workspaces/w", "add.scopes[0].workspace"),
        ("workspaces/w/conversations/c", "add.scopes[1].conversation"),
    )


def test_a_principal_holds_at_most_its_quota_of_live_subscriptions() -> None:
    quotas = Quotas(per_principal=2)
    alice = Principal(user_id="alice", auth_method=AuthMethod.PASSWORD, scopes=ALL_SCOPES)
    bob = Principal(user_id="bob", auth_method=AuthMethod.PASSWORD, scopes=ALL_SCOPES)
    quotas.acquire(alice)
    quotas.acquire(alice)
    with pytest.raises(QuotaExceeded) as refused:
        quotas.acquire(alice)
    assert refused.value.subject == "users/alice/eventSubscriptions"
    quotas.acquire(bob)  # a quota of its own
    quotas.release(alice)
    quotas.acquire(alice)
    quotas.release(bob)
    quotas.release(bob)  # a second release does not credit bob for later
    quotas.acquire(bob)
    quotas.acquire(bob)
    with pytest.raises(QuotaExceeded):
        quotas.acquire(bob)


# -- the embedded bus and the membership table -------------------------------------------------


class Unexpiring:
    """Every credential holds and never expires (the auth service's answer for a live one)."""

    async def verify_principal(self, principal: Principal) -> float | None:
        return None


@dataclasses.dataclass
class World:
    database: Database
    bus: EventBus
    memberships: MembershipStore
    watch: AccessWatch
    owner: Principal
    #: ``workspaces/{id}`` of a workspace ``owner`` owns.
    workspace: str

    async def user(self) -> Principal:
        principal = Principal(user_id=new_id(), auth_method=AuthMethod.PASSWORD, scopes=ALL_SCOPES)
        stamp = now()
        async with self.database.sessions.begin() as db:
            db.add(
                UserRow(
                    id=principal.user_id,
                    email=f"{principal.user_id}@example.com",
                    display_name="A user",
                    created_at=stamp,
                    updated_at=stamp,
                    version=1,
                )
            )
        return principal

    async def publish(self, kind: int = CREATED, text: str = "hi") -> events_pb2.Event:
        event = events_pb2.Event(type=kind, workspace=self.workspace)  # type: ignore[arg-type]
        if kind == CREATED:
            event.message_created.message.parts.add(text=text)
        return await self.bus.publish(event)

    async def subscribe(
        self, spec: Spec, given: Limits, waker: Waker | None = None
    ) -> Subscription:
        subscription = Subscription(self.bus, self.owner, spec, given, waker or Waker())
        grant = self.watch.open(self.owner)
        hold = await grant.hold(spec.names(), Permission.READ, subscription.recheck)
        await subscription.open(hold)
        return subscription


@pytest.fixture
async def world(tmp_path: pathlib.Path) -> AsyncIterator[World]:
    database = await open_database(
        f"sqlite+aiosqlite:///{tmp_path / 'events.db'}",
        timeout_s=TEST_DATABASE_TIMEOUT_S,
        migrate=True,
    )
    outbox = Outbox(database)
    log = LocalLog(database, retention=10_000, retention_s=3600, memory=1000, outbox=outbox)
    bus = EventBus(log, memory=1000, outbox=outbox)
    await bus.start()
    memberships = MembershipStore(database)
    watch = AccessWatch(
        bus.fanout, Unexpiring(), memberships, reauthorize_s=3600, degraded=lambda: False
    )
    made = World(
        database, bus, memberships, watch, Principal("", AuthMethod.PASSWORD, ALL_SCOPES), ""
    )
    made.owner = await made.user()
    workspace_id = new_id()
    await memberships.create_workspace(workspace_id, "Team", made.owner.user_id)
    made.workspace = f"workspaces/{workspace_id}"
    try:
        yield made
    finally:
        await watch.close()
        await bus.close()
        await database.close()


async def batches(subscription: Subscription, waker: Waker, count: int) -> list[list[Logged]]:
    """The batches ``subscription`` sends until ``count`` events have come."""
    found: list[list[Logged]] = []
    while sum(map(len, found)) < count:
        batch = await subscription.next_batch()
        if batch:
            found.append(batch)
        else:
            assert await waker.wait(CALL_DEADLINE_S), "no event came"
    return found


def ids(items: Sequence[Logged]) -> list[str]:
    return [item.event.id for item in items]


def at(event: events_pb2.Event) -> Position:
    """Where ``event`` is in the log."""
    found = parse_cursor(event.cursor)
    assert found is not None, event.cursor
    return found


# -- whose scopes a caller may read --------------------------------------------------------------


async def test_a_caller_reads_only_its_own_user_and_its_workspaces(world: World) -> None:
    policy = Policy(world.memberships)
    stranger = await world.user()
    conversation = f"{world.workspace}/conversations/c"

    async def check(caller: Principal, *scopes: events_pb2.Scope) -> None:
        await authorize(policy, caller, parse_spec(scopes, "", [], limits()))

    own = events_pb2.Scope(user=world.owner.user_name)
    await check(
        world.owner, own, workspace(world.workspace), events_pb2.Scope(conversation=conversation)
    )
    for scope in (own, workspace(world.workspace), events_pb2.Scope(conversation=conversation)):
        with pytest.raises(NotFound):  # indistinguishable from a scope that does not exist
            await check(stranger, scope)
    await world.memberships.set_member(
        world.workspace.removeprefix("workspaces/"), stranger.user_id, Role.VIEWER
    )
    await check(stranger, workspace(world.workspace))
    write_only = Principal(stranger.user_id, AuthMethod.API_KEY, frozenset({TokenScope.WRITE}))
    with pytest.raises(PermissionDenied):
        await check(write_only, workspace(world.workspace))


# -- replay, live delivery and their limits ----------------------------------------------------


async def test_replay_hands_over_to_live_delivery_without_gap_or_duplicate(world: World) -> None:
    first, *history = [await world.publish(text=f"old {i}") for i in range(3)]
    waker = Waker()
    spec = parse_spec([workspace(world.workspace)], first.cursor, [], limits())
    subscription = await world.subscribe(spec, limits(), waker)
    live = [await world.publish(text=f"new {i}") for i in range(2)]
    sent = [item for batch in await batches(subscription, waker, 4) for item in batch]
    assert ids(sent) == [event.id for event in (*history, *live)]
    assert subscription.sent == at(live[-1])
    subscription.close()


async def test_types_filter_replay_and_live_alike(world: World) -> None:
    before = [await world.publish(kind) for kind in (CREATED, CHANGED, CREATED)]
    waker = Waker()
    start = format_cursor((0, 0))
    spec = parse_spec([workspace(world.workspace)], start, [CHANGED], limits())
    subscription = await world.subscribe(spec, limits(), waker)
    after = [await world.publish(kind) for kind in (CREATED, CHANGED)]
    sent = [item for batch in await batches(subscription, waker, 2) for item in batch]
    assert ids(sent) == [before[1].id, after[1].id]
    subscription.close()


async def test_a_batch_holds_at_most_max_batch_events(world: World) -> None:
    start = format_cursor((0, 0))
    for i in range(5):
        await world.publish(text=f"{i}")
    waker = Waker()
    spec = parse_spec([workspace(world.workspace)], start, [], limits())
    subscription = await world.subscribe(spec, limits(max_batch=2), waker)
    assert [len(batch) for batch in await batches(subscription, waker, 5)] == [2, 2, 1]
    subscription.close()


async def test_a_batch_stays_under_a_mebibyte(world: World) -> None:
    waker = Waker()
    subscription = await world.subscribe(
        parse_spec([workspace(world.workspace)], "", [], limits()), limits(), waker
    )
    large = "x" * (MAX_BATCH_BYTES // 3)
    for _ in range(4):
        await world.publish(text=large)
    # Three of them would pass the limit with their framing: two per message.
    assert [len(batch) for batch in await batches(subscription, waker, 4)] == [2, 2]
    subscription.close()


async def test_nothing_queued_after_a_recheck_goes_out_in_the_batch_before_it(
    world: World,
) -> None:
    waker = Waker()
    subscription = await world.subscribe(
        parse_spec([workspace(world.workspace)], "", [], limits()), limits(), waker
    )
    before = await world.publish()
    subscription.recheck()  # what the hold does when access may have changed
    after = await world.publish()
    assert [ids(batch) for batch in await batches(subscription, waker, 2)] == [
        [before.id],
        [after.id],
    ]
    subscription.close()


async def test_a_subscriber_past_its_buffer_is_ended_with_where_to_resume(world: World) -> None:
    waker = Waker()
    subscription = await world.subscribe(
        parse_spec([workspace(world.workspace)], "", [], limits()), limits(buffer=2), waker
    )
    first = await world.publish()
    assert ids(await subscription.next_batch()) == [first.id]
    assert subscription.ack(at(first))
    for _ in range(3):  # one more than the buffer, none sent
        await world.publish()
    assert subscription.backlog == 0  # the queue is dropped, not kept growing
    with pytest.raises(SubscriberTooSlow) as ended:
        await subscription.next_batch()
    assert ended.value.metadata == {"resume_cursor": first.cursor}
    subscription.close()


async def test_an_ack_counts_only_for_what_was_sent(world: World) -> None:
    waker = Waker()
    subscription = await world.subscribe(
        parse_spec([workspace(world.workspace)], "", [], limits()), limits(), waker
    )
    first, second = await world.publish(), await world.publish()
    assert not subscription.ack(at(second))  # not yet sent
    await batches(subscription, waker, 2)
    assert subscription.ack(at(second))
    assert subscription.ack(at(first))  # late and out of order: kept at the newest
    assert subscription.resume_cursor == second.cursor
    subscription.close()


async def test_a_heartbeat_moves_to_the_head_only_when_nothing_waits(world: World) -> None:
    waker = Waker()
    subscription = await world.subscribe(
        parse_spec([workspace(world.workspace)], "", [CHANGED], limits()), limits(), waker
    )
    unseen = await world.publish(CREATED)  # of a type it does not want
    assert subscription.caught_up() == unseen.cursor
    wanted = await world.publish(CHANGED)
    assert subscription.caught_up() == unseen.cursor  # ``wanted`` is queued, not sent
    assert ids(await subscription.next_batch()) == [wanted.id]
    assert subscription.caught_up() == wanted.cursor
    subscription.close()
