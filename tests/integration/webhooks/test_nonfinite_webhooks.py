"""A webhook's queue never waits forever on a delivery that cannot be sent.

A FILE_CHANGED event of a file whose metadata held NaN (accepted before such numbers
were refused, and still in the log) made the payload's shaping raise outside the
attempt's error handling: the delivery was never attempted, never failed for good,
and every later delivery to its endpoint waited behind it. Now such a number is
``null`` in the body, and a delivery whose request cannot be made at all is a failed
attempt, counted, failed for good after the attempt limit like any other; the
endpoint's later deliveries go out.

Real parts, as in test_webhooks.py: a database, the event log, the egress-checked
client and a receiver that verifies each signature.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from switchboard.api.events.v1 import events_pb2
from switchboard.api.integration.v1 import integration_pb2
from switchboard.integration.webhooks.delivery import WebhookLimits, payload
from switchboard.platform.store.models import WebhookDeliveryRow
from switchboard.platform.values import jsonbounds
from tests.conftest import fresh_database_url
from tests.infra.webhookreceiver import WebhookReceiver, running_receiver, until
from tests.integration.webhooks.test_webhooks import (
    LIMITS,
    add_webhook,
    add_workspace,
    deliveries,
    eventually,
    new_secret,
    publish,
    replica,
    settled,
)

pytestmark = pytest.mark.service

PENDING = integration_pb2.DELIVERY_STATE_PENDING
SUCCEEDED = integration_pb2.DELIVERY_STATE_SUCCEEDED
FAILED = integration_pb2.DELIVERY_STATE_FAILED


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    async with running_receiver() as server:
        yield server


def file_changed(workspace_id: str) -> events_pb2.Event:
    """A FILE_CHANGED event whose file's metadata holds NaN and both infinities."""
    event = events_pb2.Event(
        type=events_pb2.EVENT_TYPE_FILE_CHANGED, workspace=f"workspaces/{workspace_id}"
    )
    file = event.file_changed.file
    file.name = f"workspaces/{workspace_id}/files/f1"
    file.display_name = "a.txt"
    file.metadata.update({"n": math.nan, "big": math.inf, "deep": [{"small": -math.inf}], "k": 2})
    event.file_changed.change = events_pb2.CHANGE_KIND_CREATED
    return event


def test_the_payload_of_an_event_holding_nan_is_json_with_null() -> None:
    body = payload(file_changed("w1"))
    # Read strictly (Python's json alone would read NaN back).
    read = jsonbounds.loads(body, max_bytes=len(body) * 4)
    metadata = read["data"]["fileChanged"]["file"]["metadata"]
    assert metadata == {"n": None, "big": None, "deep": [{"small": None}], "k": 2.0}


async def test_a_file_changed_event_with_nan_is_delivered_and_the_next_one_follows(
    receiver: WebhookReceiver,
) -> None:
    async with replica(fresh_database_url()) as part:
        await add_workspace(part.database, "w1")
        secret = new_secret()
        hook = receiver.endpoint("hook", [secret])
        await add_webhook(part, "w1", "hook", receiver.url("hook"), secret)
        odd = await part.bus.publish(file_changed("w1"))
        after = await publish(part.bus, "w1")
        await until(lambda: hook.ids == [odd.id, after.id], "both deliveries, in order")
        data = hook.accepted[0].body["data"]
        assert data["fileChanged"]["file"]["metadata"]["n"] is None
        assert data["fileChanged"]["file"]["metadata"]["k"] == 2
        found = await settled(part.engine, "w1", "hook", 2)
        assert [(d.event_id, d.state, d.attempts) for d in found] == [
            (after.id, SUCCEEDED, 1),
            (odd.id, SUCCEEDED, 1),
        ]


async def test_a_delivery_that_cannot_be_shaped_fails_counted_and_the_queue_moves_on(
    receiver: WebhookReceiver,
) -> None:
    limits = WebhookLimits(**{**LIMITS.__dict__, "max_attempts": 3})
    async with replica(fresh_database_url(), limits=limits) as part:
        await add_workspace(part.database, "w1")
        secret = new_secret()
        # The first attempt fails and asks for two seconds: time to spoil what is stored.
        hook = receiver.endpoint("hook", [secret], fail_first=1, retry_after="2")
        await add_webhook(part, "w1", "hook", receiver.url("hook"), secret)
        spoiled = await publish(part.bus, "w1")
        kept = await publish(part.bus, "w1")

        async def first_failed() -> integration_pb2.WebhookDelivery | None:
            found = await deliveries(part.engine, "w1", "hook")
            first = [d for d in found if d.event_id == spoiled.id]
            return first[0] if first and first[0].attempts == 1 else None

        pending = await eventually(first_failed, "the first attempt recorded")
        assert pending.state == PENDING

        def spoil(db: Session) -> None:
            # Not an Event: what no code can make a request of.
            db.execute(
                update(WebhookDeliveryRow)
                .where(WebhookDeliveryRow.event_id == spoiled.id)
                .values(data=b"\xff")
            )

        await part.database.run(spoil, write=True)
        await until(lambda: hook.ids == [kept.id], "the delivery behind the spoiled one")
        found = await settled(part.engine, "w1", "hook", 2)
        assert [(d.event_id, d.state, d.attempts) for d in found] == [
            (kept.id, SUCCEEDED, 1),
            (spoiled.id, FAILED, 3),
        ]
        assert found[1].last_error == "the event could not be made into a request"
        assert hook.attempts[spoiled.id] == 1
        assert hook.bad == []
