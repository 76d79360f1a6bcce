"""Webhook deliveries with real parts: a database (SQLite, or PostgreSQL shared by two
replicas), the event log (embedded, or Redis Streams), the egress-checked HTTP client,
and a receiver that verifies every request with the ``standardwebhooks`` library."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import pytest
from google.protobuf import json_format
from google.rpc import code_pb2
from sqlalchemy import select, update
from sqlalchemy.orm import Session
from standardwebhooks.webhooks import Webhook

from switchboard.api.events.v1 import events_pb2
from switchboard.api.integration.v1 import integration_pb2
from switchboard.integration.webhooks.delivery import (
    WebhookEngine,
    WebhookLimits,
    parse_retry_after,
    payload,
    retry_delay,
    sequence_of,
    signature,
)
from switchboard.platform.errors import FailedPrecondition, InvalidArgument, NotFound
from switchboard.platform.events.bus import EventBus
from switchboard.platform.events.eventlog import LocalLog, RedisLog, parse_cursor
from switchboard.platform.resilience.breaker import Breakers
from switchboard.platform.security.credentials.secretbox import SecretBox
from switchboard.platform.security.egress import EgressPolicy
from switchboard.platform.store.db import Database, open_database
from switchboard.platform.store.models import (
    IntegrationRow,
    WebhookCursorRow,
    WebhookDeliveryRow,
    WorkspaceRow,
)
from switchboard.platform.store.pagination import PageTokens
from tests.conftest import TEST_DATABASE_TIMEOUT_S, fresh_database_url
from tests.infra.redis import RedisServer
from tests.infra.webhookreceiver import (
    DEADLINE_S,
    Endpoint,
    WebhookReceiver,
    running_receiver,
    until,
)

pytestmark = pytest.mark.service

SERVER_SECRET = "webhook-tests-server-secret-0123456789"
PENDING = integration_pb2.DELIVERY_STATE_PENDING
SUCCEEDED = integration_pb2.DELIVERY_STATE_SUCCEEDED
FAILED = integration_pb2.DELIVERY_STATE_FAILED
#: Small timings: retries and lease takeover within a second or two. An attempt's
#: timeout (and the claim, which outlives it) is generous: the receiver shares the
#: replicas' event loop, and on a machine at full load a 2 s timeout failed attempts
#: that were merely slow, until a delivery was FAILED and its event never arrived.
LIMITS = WebhookLimits(
    timeout_s=10.0,
    max_attempts=6,
    disable_after_s=3600.0,
    backoff_base_s=0.02,
    backoff_max_s=0.2,
    lease_s=1.0,
    poll_s=0.1,
    claim_s=12.0,
)

_T = TypeVar("_T")


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class Disabled:
    """The lead's ``on_disable`` as the tests see it: disables the row, remembers the call."""

    database: Database
    calls: list[tuple[str, str, str]] = field(default_factory=list)

    async def __call__(self, workspace_id: str, integration_id: str, reason: str) -> None:
        self.calls.append((workspace_id, integration_id, reason))

        def work(db: Session) -> None:
            db.execute(
                update(IntegrationRow)
                .where(
                    IntegrationRow.workspace_id == workspace_id,
                    IntegrationRow.id == integration_id,
                )
                .values(disabled=True, updated_at=now())
            )

        await self.database.run(work, write=True)


@dataclass
class Replica:
    """One process's parts: its database handle, event bus and engine."""

    database: Database
    bus: EventBus
    engine: WebhookEngine
    disabled: Disabled
    box: SecretBox
    crashed: bool = False

    async def crash(self) -> None:
        """Stop as a dead process would: no claim or lease handed back, its
        event log reader gone, its database connections closed (the server
        rolls back whatever they had open)."""
        self.crashed = True
        await self.engine.close(release=False)
        await self.bus.close()
        await self.database.close()


@contextlib.asynccontextmanager
async def two_replicas(url: str, redis_url: str) -> AsyncIterator[tuple[Replica, Replica]]:
    """Replicas a and b on one database and one Redis event log, with workspace w1."""
    async with (
        replica(url, redis_url=redis_url, instance="a") as a,
        replica(url, redis_url=redis_url, instance="b") as b,
    ):
        await add_workspace(a.database, "w1")
        yield a, b


@contextlib.asynccontextmanager
async def replica(
    url: str,
    *,
    redis_url: str = "",
    instance: str = "one",
    limits: WebhookLimits = LIMITS,
) -> AsyncIterator[Replica]:
    database = await open_database(url, timeout_s=TEST_DATABASE_TIMEOUT_S, migrate=True)
    if redis_url:
        log = RedisLog(
            redis_url,
            key="test:webhook-events",
            timeout_s=2.0,
            retention=10_000,
            retention_s=86_400,
            memory=1000,
            outbox_limit=1000,
            dedupe_window_s=60,
        )
        bus = EventBus(log, memory=1000)
    else:
        bus = EventBus(
            LocalLog(database, retention=10_000, retention_s=86_400, memory=1000), memory=1000
        )
    await bus.start()
    box = SecretBox(SERVER_SECRET)
    disabled = Disabled(database)
    engine = WebhookEngine(
        database,
        bus,
        box,
        EgressPolicy(allow_loopback=True),
        Breakers(failures=1000, reset_s=0.1),
        limits,
        instance_id=instance,
        on_disable=disabled,
        page_tokens=PageTokens(SERVER_SECRET),
        rng=random.Random(16),  # noqa: S311 - jitter, reproducible in tests
    )
    await engine.start()
    part = Replica(database, bus, engine, disabled, box)
    try:
        yield part
    finally:
        if not part.crashed:
            await engine.close()
            await bus.close()
            await database.close()


async def add_workspace(database: Database, workspace_id: str) -> None:
    def work(db: Session) -> None:
        db.add(WorkspaceRow(id=workspace_id, created_at=now(), updated_at=now()))

    await database.run(work, write=True)


async def add_webhook(
    part: Replica,
    workspace_id: str,
    integration_id: str,
    url: str,
    secret: str,
    *,
    event_types: str = "",
    previous: str | None = None,
    previous_until: dt.datetime | None = None,
) -> None:
    """An integration row as the lead's store writes one (secrets sealed to its name)."""
    name = f"workspaces/{workspace_id}/integrations/{integration_id}"

    def work(db: Session) -> None:
        db.add(
            IntegrationRow(
                workspace_id=workspace_id,
                id=integration_id,
                kind=integration_pb2.INTEGRATION_KIND_WEBHOOK,
                endpoint=url,
                event_types=event_types,
                credential=part.box.seal(secret, purpose=name),
                previous_credential=part.box.seal(previous, purpose=name) if previous else None,
                previous_until=previous_until,
                created_at=now(),
                updated_at=now(),
            )
        )

    await part.database.run(work, write=True)


async def publish(
    bus: EventBus, workspace_id: str, kind: int = events_pb2.EVENT_TYPE_MESSAGE_CREATED
) -> events_pb2.Event:
    event = events_pb2.Event(type=kind, workspace=f"workspaces/{workspace_id}")  # type: ignore[arg-type]
    return await bus.publish(event)


async def rows(database: Database, integration_id: str) -> list[WebhookDeliveryRow]:
    def work(db: Session) -> list[WebhookDeliveryRow]:
        return list(
            db.scalars(
                select(WebhookDeliveryRow)
                .where(WebhookDeliveryRow.integration_id == integration_id)
                .order_by(WebhookDeliveryRow.seq)
            )
        )

    return await database.run(work, write=False)


async def deliveries(
    engine: WebhookEngine, workspace_id: str, integration_id: str
) -> list[integration_pb2.WebhookDelivery]:
    found, token = await engine.list_deliveries(
        workspace_id, integration_id, page_size=100, page_token=""
    )
    assert token == ""
    return found


async def eventually(check: Callable[[], Awaitable[_T | None]], what: str) -> _T:
    """``check()``'s first answer that is not None, polled until a deadline."""
    deadline = time.monotonic() + DEADLINE_S
    while (found := await check()) is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)  # polling a condition with a deadline
    return found


async def settled(
    engine: WebhookEngine, workspace_id: str, integration_id: str, count: int
) -> list[integration_pb2.WebhookDelivery]:
    """The webhook's deliveries once there are ``count`` and none is pending."""

    async def check() -> list[integration_pb2.WebhookDelivery] | None:
        found = await deliveries(engine, workspace_id, integration_id)
        done = len(found) == count and all(d.state != PENDING for d in found)
        return found if done else None

    return await eventually(check, f"{count} settled deliveries of {integration_id}")


async def settled_rows(
    database: Database, integration_id: str, count: int
) -> list[WebhookDeliveryRow]:
    """The webhook's delivery rows in log order once there are ``count`` and none is pending."""

    async def check() -> list[WebhookDeliveryRow] | None:
        found = await rows(database, integration_id)
        done = len(found) == count and all(row.state != PENDING for row in found)
        return found if done else None

    return await eventually(check, f"{count} settled delivery rows of {integration_id}")


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    async with running_receiver() as server:
        yield server


# -- pure parts ------------------------------------------------------------------------


def test_retry_delay_is_full_jitter_under_a_growing_cap_and_honours_retry_after() -> None:
    rng = random.Random(1)  # noqa: S311 - jitter, reproducible
    for failures in range(1, 20):
        ceiling = min(100.0, 2.0 * 2 ** (failures - 1))
        for _ in range(50):
            delay = retry_delay(failures, base_s=2.0, max_s=100.0, retry_after_s=None, rng=rng)
            assert 0.0 <= delay <= ceiling
    assert retry_delay(1, base_s=2.0, max_s=100.0, retry_after_s=30.0, rng=rng) >= 30.0
    # A Retry-After beyond the maximum waits the maximum only.
    assert retry_delay(1, base_s=2.0, max_s=100.0, retry_after_s=1e9, rng=rng) == 100.0
    current = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    assert parse_retry_after("120", current) == 120.0
    assert parse_retry_after("Wed, 01 Jan 2025 00:01:00 GMT", current) == 60.0
    assert parse_retry_after("soon", current) is None
    assert parse_retry_after(None, current) is None


def test_payload_and_signatures_verify_with_the_standardwebhooks_library() -> None:
    event = events_pb2.Event(
        id="e1",
        type=events_pb2.EVENT_TYPE_MESSAGE_CREATED,
        workspace="workspaces/w1",
        cursor="5-0",
    )
    event.time.FromDatetime(dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC))
    body = payload(event)
    new, old = new_secret(), new_secret()
    sent = now()
    headers = {
        "webhook-id": "e1",
        "webhook-timestamp": str(int(sent.timestamp())),
        "webhook-signature": signature([new, old], "e1", sent, body),
    }
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (new, old):
        parsed = Webhook(secret).verify(body, headers)
        assert parsed["type"] == "message.created"
        assert parsed["timestamp"] == "2025-01-02T03:04:05Z"
        assert json_format.ParseDict(parsed["data"], events_pb2.Event()) == event
    assert sequence_of((7, 0)) < sequence_of((7, 1)) < sequence_of((8, 0))


# -- one replica -----------------------------------------------------------------------


async def test_each_event_reaches_each_subscribed_endpoint_once_in_order_after_retries(
    receiver: WebhookReceiver,
) -> None:
    async with replica(fresh_database_url()) as part:
        for workspace in ("w1", "w2"):
            await add_workspace(part.database, workspace)
        secrets = {name: new_secret() for name in ("all", "msgs", "other", "late")}
        flaky = receiver.endpoint("all", [secrets["all"]], fail_first=3)
        msgs = receiver.endpoint("msgs", [secrets["msgs"]])
        other = receiver.endpoint("other", [secrets["other"]])
        late = receiver.endpoint("late", [secrets["late"]])
        await add_webhook(part, "w1", "all", receiver.url("all"), secrets["all"])
        await add_webhook(
            part,
            "w1",
            "msgs",
            receiver.url("msgs"),
            secrets["msgs"],
            event_types="MESSAGE_CREATED MEMORY_CHANGED",
        )
        await add_webhook(part, "w2", "other", receiver.url("other"), secrets["other"])
        w1: list[events_pb2.Event] = []
        w2: list[events_pb2.Event] = []
        for number in range(12):
            kind = (
                events_pb2.EVENT_TYPE_MESSAGE_CREATED
                if number % 2
                else events_pb2.EVENT_TYPE_CONVERSATION_CHANGED
            )
            w1.append(await publish(part.bus, "w1", kind))
            if number % 3 == 0:
                w2.append(await publish(part.bus, "w2"))
        # A user event of no workspace goes nowhere.
        await part.bus.publish(
            events_pb2.Event(type=events_pb2.EVENT_TYPE_SECURITY, user="users/u1")
        )
        created = [e.id for e in w1 if e.type == events_pb2.EVENT_TYPE_MESSAGE_CREATED]
        await until(lambda: len(flaky.first_ids()) == len(w1), "every w1 event at 'all'")
        await until(lambda: len(msgs.first_ids()) == len(created), "the messages at 'msgs'")
        await until(lambda: len(other.first_ids()) == len(w2), "every w2 event at 'other'")

        # In log order, once each (the receiver never failed after accepting).
        assert flaky.ids == [e.id for e in w1]
        assert msgs.ids == created
        assert other.ids == [e.id for e in w2]
        # The first delivery was tried until the receiver took it; the rest once.
        assert flaky.attempts[w1[0].id] == 4
        assert all(flaky.attempts[e.id] == 1 for e in w1[1:])
        for endpoint in (flaky, msgs, other):
            assert endpoint.bad == []
        first = flaky.accepted[0]
        assert first.headers["webhook-id"] == w1[0].id
        assert first.headers["content-type"] == "application/json"
        assert first.body["type"] == "conversation.changed"
        data = json_format.ParseDict(first.body["data"], events_pb2.Event())
        assert data.id == w1[0].id
        assert data.workspace == "workspaces/w1"

        recorded = await settled(part.engine, "w1", "all", len(w1))
        assert [d.event_id for d in recorded] == [e.id for e in reversed(w1)]
        assert all(d.state == SUCCEEDED and d.last_http_status == 204 for d in recorded)
        assert recorded[-1].attempts == 4
        assert recorded[-1].event_type == "CONVERSATION_CHANGED"
        assert all(d.attempts == 1 for d in recorded[:-1])
        assert await part.engine.health("w1", "all") == (code_pb2.OK, "")

        # A webhook created now gets what happens from now on, not the past.
        await add_webhook(part, "w1", "late", receiver.url("late"), secrets["late"])
        later = [await publish(part.bus, "w1") for _ in range(2)]
        await until(lambda: len(late.ids) == 2, "the later events at 'late'")
        assert late.ids == [e.id for e in later]
        await until(lambda: len(flaky.ids) == len(w1) + 2, "the later events at 'all'")
        assert len(await rows(part.database, "late")) == 2


async def test_retry_after_and_the_attempt_limit(receiver: WebhookReceiver) -> None:
    # The maximum wait above the Retry-After sent, which would otherwise cap it.
    limits = WebhookLimits(**{**LIMITS.__dict__, "max_attempts": 3, "backoff_max_s": 5.0})
    async with replica(fresh_database_url(), limits=limits) as part:
        await add_workspace(part.database, "w1")
        secret = new_secret()
        waits = receiver.endpoint("waits", [secret], fail_first=1, retry_after="2")
        await add_webhook(part, "w1", "waits", receiver.url("waits"), secret)
        event = await publish(part.bus, "w1")
        await until(lambda: waits.requests == 1, "the first attempt")

        async def retry_scheduled() -> integration_pb2.WebhookDelivery | None:
            found = await deliveries(part.engine, "w1", "waits")
            return found[0] if found and found[0].attempts == 1 else None

        pending = await eventually(retry_scheduled, "the first attempt recorded")
        assert pending.state == PENDING
        assert pending.last_http_status == 503
        assert pending.last_error == "HTTP 503: try later"
        wait = pending.next_attempt_time.ToDatetime() - pending.last_attempt_time.ToDatetime()
        assert wait >= dt.timedelta(seconds=1.9)
        await until(lambda: waits.ids == [event.id], "the retry honouring Retry-After")

        # Always failing: FAILED after max_attempts, the next delivery goes out after it.
        never = receiver.endpoint("never", [secret], fail_first=3)
        await add_webhook(part, "w1", "never", receiver.url("never"), secret)
        lost, kept = await publish(part.bus, "w1"), await publish(part.bus, "w1")
        await until(lambda: never.ids == [kept.id], "the delivery after the failed one")
        assert never.attempts[lost.id] == 3
        found = await settled(part.engine, "w1", "never", 2)
        assert [(d.event_id, d.state, d.attempts) for d in found] == [
            (kept.id, SUCCEEDED, 1),
            (lost.id, FAILED, 3),
        ]
        assert not found[1].HasField("next_attempt_time")


async def test_signatures_verify_with_both_secrets_during_a_rotation(
    receiver: WebhookReceiver,
) -> None:
    async with replica(fresh_database_url()) as part:
        await add_workspace(part.database, "w1")
        old, new = new_secret(), new_secret()
        hook = receiver.endpoint("rotating", [new, old])
        await add_webhook(
            part,
            "w1",
            "rotating",
            receiver.url("rotating"),
            new,
            previous=old,
            previous_until=now() + dt.timedelta(hours=1),
        )
        during = [await publish(part.bus, "w1") for _ in range(3)]
        await until(lambda: len(hook.ids) == 3, "the deliveries during the overlap")
        assert hook.ids == [e.id for e in during]
        assert all(len(r.headers["webhook-signature"].split(" ")) == 2 for r in hook.accepted)

        # The overlap ends: only the new secret signs; the old one verifies nothing.
        def end_overlap(db: Session) -> None:
            db.execute(
                update(IntegrationRow)
                .where(IntegrationRow.id == "rotating")
                .values(previous_until=now() - dt.timedelta(seconds=1))
            )

        await part.database.run(end_overlap, write=True)
        hook.secrets, hook.rejected = [new], [old]
        after = [await publish(part.bus, "w1") for _ in range(3)]
        await until(lambda: len(hook.ids) == 6, "the deliveries after the overlap")
        assert hook.ids[3:] == [e.id for e in after]
        assert all(len(r.headers["webhook-signature"].split(" ")) == 1 for r in hook.accepted[3:])
        assert hook.bad == []


async def test_a_webhook_failing_for_long_is_disabled(receiver: WebhookReceiver) -> None:
    limits = WebhookLimits(**{**LIMITS.__dict__, "max_attempts": 100, "disable_after_s": 0.5})
    async with replica(fresh_database_url(), limits=limits) as part:
        await add_workspace(part.database, "w1")
        secret = new_secret()
        down = receiver.endpoint("down", [secret], always_fail=True)
        up = receiver.endpoint("up", [secret])
        await add_webhook(part, "w1", "down", receiver.url("down"), secret)
        await add_webhook(part, "w1", "up", receiver.url("up"), secret)
        published = time.monotonic()
        events = [await publish(part.bus, "w1") for _ in range(3)]
        await until(lambda: bool(part.disabled.calls), "the webhook disabled")
        # Not at its first failure: once it has failed for disable_after_s. How many
        # attempts fit in that time is the host's load's to say (one, when the first
        # attempt itself came late), so the time is what is asserted.
        assert time.monotonic() - published >= limits.disable_after_s
        ((workspace_id, integration_id, reason),) = part.disabled.calls
        assert (workspace_id, integration_id) == ("w1", "down")
        assert reason.startswith("webhook disabled: no successful delivery for ")
        assert "HTTP 503" in reason
        assert down.requests >= 1
        assert down.ids == []
        health = await part.engine.health("w1", "down")
        assert health is not None
        assert health[0] == code_pb2.UNAVAILABLE

        # Its pending deliveries are failed; nothing new is recorded for it.
        found = await settled(part.engine, "w1", "down", 3)
        assert [d.event_id for d in found] == [e.id for e in reversed(events)]
        assert all(d.state == FAILED for d in found)
        assert {d.last_error for d in found[:2]} == {"endpoint disabled"}
        assert found[2].last_error == "endpoint disabled; HTTP 503: try later"
        requests = down.requests
        marker = await publish(part.bus, "w1")
        await until(lambda: marker.id in up.ids, "the next event at the enabled webhook")
        assert len(await rows(part.database, "down")) == 3
        assert down.requests == requests
        with pytest.raises(FailedPrecondition):
            await part.engine.redeliver("w1", "down", found[0].name.rsplit("/", 1)[1])


async def test_deliveries_list_in_pages_and_redeliver(receiver: WebhookReceiver) -> None:
    async with replica(fresh_database_url()) as part:
        await add_workspace(part.database, "w1")
        secret = new_secret()
        hook = receiver.endpoint("hook", [secret])
        await add_webhook(part, "w1", "hook", receiver.url("hook"), secret)
        await add_webhook(part, "w1", "quiet", receiver.url("quiet"), secret, event_types="X")
        assert await part.engine.health("w1", "quiet") is None
        events = [await publish(part.bus, "w1") for _ in range(7)]
        await until(lambda: len(hook.ids) == 7, "every delivery")

        pages: list[list[integration_pb2.WebhookDelivery]] = []
        token = ""
        while True:
            page, token = await part.engine.list_deliveries(
                "w1", "hook", page_size=3, page_token=token
            )
            pages.append(page)
            if not token:
                break
        assert [len(page) for page in pages] == [3, 3, 1]
        listed = [d for page in pages for d in page]
        assert [d.event_id for d in listed] == [e.id for e in reversed(events)]
        assert all(d.name.startswith("workspaces/w1/integrations/hook/deliveries/") for d in listed)
        _, second = await part.engine.list_deliveries("w1", "hook", page_size=3, page_token="")
        with pytest.raises(InvalidArgument):
            await part.engine.list_deliveries("w1", "quiet", page_size=3, page_token=second)
        with pytest.raises(InvalidArgument):
            await part.engine.list_deliveries("w1", "hook", page_size=3, page_token="garbage")

        oldest = listed[-1]
        delivery_id = oldest.name.rsplit("/", 1)[1]
        again = await part.engine.redeliver("w1", "hook", delivery_id)
        assert again.state == PENDING
        assert again.attempts == 0
        assert again.event_id == events[0].id
        await until(lambda: hook.ids.count(events[0].id) == 2, "the redelivery")
        (redelivered,) = [
            d for d in await settled(part.engine, "w1", "hook", 7) if d.name == oldest.name
        ]
        assert redelivered.state == SUCCEEDED
        assert redelivered.attempts == 1
        with pytest.raises(NotFound):
            await part.engine.redeliver("w1", "hook", "0" * 32)
        with pytest.raises(NotFound):
            await part.engine.redeliver("w1", "nowhere", delivery_id)
        assert hook.bad == []


# -- replicas --------------------------------------------------------------------------


def log_order(events: list[events_pb2.Event]) -> list[str]:
    def position(event: events_pb2.Event) -> tuple[int, ...]:
        found = parse_cursor(event.cursor)
        assert found is not None, "published without a cursor"
        return found

    return [event.id for event in sorted(events, key=position)]


async def holder(database: Database) -> str:
    def work(db: Session) -> str:
        row = db.get(WebhookCursorRow, 1)
        return row.holder if row is not None else ""

    return await database.run(work, write=False)


async def test_two_replicas_deliver_each_event_once(
    receiver: WebhookReceiver, postgres_url: str, redis_server: RedisServer
) -> None:
    async with two_replicas(postgres_url, redis_server.url) as (a, b):
        secrets = [new_secret(), new_secret()]
        hooks = [
            receiver.endpoint("one", [secrets[0]], fail_first=2),
            receiver.endpoint("two", [secrets[1]]),
        ]
        await add_webhook(a, "w1", "one", receiver.url("one"), secrets[0])
        await add_webhook(b, "w1", "two", receiver.url("two"), secrets[1])
        events = [await publish((a, b)[n % 2].bus, "w1") for n in range(40)]
        order = log_order(events)
        for hook in hooks:
            await until(lambda hook=hook: len(hook.ids) == 40, f"every event at {hook.name}")  # type: ignore[misc]
            assert hook.ids == order
            assert hook.bad == []
        for integration_id in ("one", "two"):
            stored = await settled_rows(a.database, integration_id, 40)
            assert [row.event_id for row in stored] == order
            assert all(row.state == SUCCEEDED for row in stored)


async def test_a_replica_killed_mid_stream_leaves_nothing_undelivered(
    receiver: WebhookReceiver, postgres_url: str, redis_server: RedisServer
) -> None:
    async with two_replicas(postgres_url, redis_server.url) as (a, b):
        secret = new_secret()
        # Slow answers: the killed replica has attempts in flight.
        hook: Endpoint = receiver.endpoint("hook", [secret], delay_s=0.05)
        await add_webhook(a, "w1", "hook", receiver.url("hook"), secret)
        events = [await publish((a, b)[n % 2].bus, "w1") for n in range(30)]
        await until(lambda: len(hook.ids) >= 5, "the first deliveries")
        # The replica holding the feeder's lease dies.
        victim, survivor = (a, b) if await holder(a.database) == "a" else (b, a)
        await victim.crash()
        events += [await publish(survivor.bus, "w1") for _ in range(20)]
        order = log_order(events)
        await until(lambda: set(hook.ids) == set(order), "every event after the takeover")
        assert await holder(survivor.database) == ("a" if survivor is a else "b")
        # At least once, in order of first arrival; one SUCCEEDED row per event.
        assert hook.first_ids() == order
        stored = await settled_rows(survivor.database, "hook", len(order))
        assert [row.event_id for row in stored] == order
        assert all(row.state == SUCCEEDED for row in stored)
        assert hook.bad == []
