"""Webhooks through IntegrationService: registered by an owner, fed from the event log,
signed (Standard Webhooks), listed, redelivered, rotated, and probed by their deliveries.

The receiver is a real HTTP server that verifies every request with the
``standardwebhooks`` library (tests/infra/webhookreceiver.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from sqlalchemy import event as sql_event

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.integration.v1 import integration_pb2 as ipb
from switchboard.integration.service import IntegrationHub
from switchboard.platform.rpc.server import SwitchboardServer
from tests.conftest import CALL_DEADLINE_S, built
from tests.infra.webhookreceiver import Endpoint, WebhookReceiver, running_receiver, until
from tests.kits.contextkit import Stub as CStub
from tests.kits.contextkit import (
    World,
    append,
    context_stub,
    create_conversation,
    create_workspace,
    ctx_world,
    refused,
)
from tests.kits.integrationkit import (
    Stub,
    create,
    hub_mesh,
    integration_stub,
    webhook,
    webhook_secret,
)

pytestmark = pytest.mark.service

CODE = grpc.StatusCode


@pytest.fixture
async def setup() -> AsyncIterator[tuple[SwitchboardServer, Stub, CStub, World, WebhookReceiver]]:
    async with running_receiver() as receiver, hub_mesh() as (server, channel):
        contexts = context_stub(channel)
        world = await ctx_world(server, contexts)
        yield server, integration_stub(channel), contexts, world, receiver


async def _deliveries(stub: Stub, world: World, name: str) -> list[ipb.WebhookDelivery]:
    found: list[ipb.WebhookDelivery] = []
    token = ""
    while True:
        page = await stub.ListWebhookDeliveries(
            ipb.ListWebhookDeliveriesRequest(parent=name, page_size=2, page_token=token),
            metadata=world.viewer.md,
            timeout=CALL_DEADLINE_S,
        )
        found += page.deliveries
        token = page.next_page_token
        if not token:
            return found


async def _recorded(stub: Stub, world: World, name: str, count: int) -> list[ipb.WebhookDelivery]:
    """The deliveries, once ``count`` are listed and none is still pending: the receiver
    has a request before the server has read its answer and stored the outcome."""
    deadline = asyncio.get_running_loop().time() + CALL_DEADLINE_S
    while True:
        listed = await _deliveries(stub, world, name)
        settled = all(d.state != ipb.DELIVERY_STATE_PENDING for d in listed)
        if (len(listed) >= count and settled) or asyncio.get_running_loop().time() > deadline:
            return listed
        await asyncio.sleep(0.02)  # polling the listing, with a deadline


async def test_a_registered_webhook_receives_each_subscribed_event_once_signed(
    setup: tuple[SwitchboardServer, Stub, CStub, World, WebhookReceiver],
) -> None:
    server, stub, contexts, world, receiver = setup
    secret = webhook_secret()
    endpoint = receiver.endpoint("main", [secret])
    hook = await create(
        stub,
        world.owner,
        world.name,
        webhook(receiver.url("main"), credential=secret, event_types=["MESSAGE_CREATED"]),
        integration_id="main-hook",
    )
    assert list(hook.event_types) == ["MESSAGE_CREATED"]
    conversation = await create_conversation(contexts, world.editor, world.name)
    sent = [
        (await append(contexts, world.editor, conversation.name, f"message {i}")).name
        for i in range(3)
    ]
    await until(lambda: len(endpoint.accepted) >= 3, "three deliveries")
    assert endpoint.bad == []
    bodies = [item.body for item in endpoint.accepted]
    assert [b["type"] for b in bodies] == ["message.created"] * 3
    assert len(set(endpoint.ids)) == 3
    assert all(name in str(bodies) for name in sent)
    listed = await _recorded(stub, world, hook.name, 3)
    assert len(listed) == 3
    assert {d.state for d in listed} == {ipb.DELIVERY_STATE_SUCCEEDED}
    assert {d.event_id for d in listed} == set(endpoint.ids)
    assert all(d.event_type == "MESSAGE_CREATED" for d in listed)
    # Health comes from the latest delivery.
    await built(server, IntegrationHub).probe_all()
    got = await stub.GetIntegration(
        ipb.GetIntegrationRequest(name=hook.name), metadata=world.viewer.md, timeout=CALL_DEADLINE_S
    )
    assert got.integration.status.health == ipb.HEALTH_STATE_HEALTHY

    again = await stub.RedeliverWebhook(
        ipb.RedeliverWebhookRequest(name=listed[0].name),
        metadata=world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    assert again.delivery.state == ipb.DELIVERY_STATE_PENDING
    await until(lambda: len(endpoint.accepted) >= 4, "the redelivery")
    assert endpoint.ids[-1] == listed[0].event_id
    await refused(
        stub.RedeliverWebhook(
            ipb.RedeliverWebhookRequest(name=listed[0].name),
            metadata=world.editor.md,
            timeout=CALL_DEADLINE_S,
        ),
        CODE.PERMISSION_DENIED,
    )


async def _signed_by(endpoint: Endpoint, secrets: int, conversation: cpb.Conversation) -> None:
    """The conversation's event reached ``endpoint``, verified by each of its secrets
    and signed by ``secrets`` of them."""
    await until(
        lambda: conversation.name in str([item.body for item in endpoint.accepted]),
        f"the conversation's event, signed by {secrets} secret(s)",
    )
    assert endpoint.bad == []
    assert len(endpoint.accepted[-1].headers["webhook-signature"].split(" ")) == secrets


async def test_a_rotated_secret_signs_beside_the_new_one(
    setup: tuple[SwitchboardServer, Stub, CStub, World, WebhookReceiver],
) -> None:
    _, stub, contexts, world, receiver = setup
    old, new = webhook_secret(), webhook_secret()
    before = receiver.endpoint("rotating", [old])
    # Conversation events only: the webhook's own INTEGRATION_CHANGED would be a
    # delivery that may still be on its way, signed by the old secret alone, when
    # the endpoint starts asking for both.
    hook = await create(
        stub,
        world.owner,
        world.name,
        webhook(receiver.url("rotating"), credential=old, event_types=["CONVERSATION_CHANGED"]),
    )
    await _signed_by(before, 1, await create_conversation(contexts, world.editor, world.name))
    rotated = await stub.UpdateIntegration(
        ipb.UpdateIntegrationRequest(
            integration=ipb.Integration(name=hook.name, credential=new),
            update_mask=field_mask_pb2.FieldMask(paths=["credential"]),
        ),
        metadata=world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    assert rotated.integration.credential == ""
    # Every request must verify with each secret: both sign during the overlap.
    both = receiver.endpoint("rotating", [old, new])
    await _signed_by(both, 2, await create_conversation(contexts, world.editor, world.name))


async def test_deliveries_are_only_for_webhooks_and_members(
    setup: tuple[SwitchboardServer, Stub, CStub, World, WebhookReceiver],
) -> None:
    _, stub, _, world, receiver = setup
    hook = await create(stub, world.owner, world.name, webhook(receiver.url("x")))
    await refused(
        stub.ListWebhookDeliveries(
            ipb.ListWebhookDeliveriesRequest(parent=hook.name),
            metadata=world.outsider.md,
            timeout=CALL_DEADLINE_S,
        ),
        CODE.NOT_FOUND,
    )
    await refused(
        stub.RedeliverWebhook(
            ipb.RedeliverWebhookRequest(name=f"{hook.name}/deliveries/nope"),
            metadata=world.owner.md,
            timeout=CALL_DEADLINE_S,
        ),
        CODE.NOT_FOUND,
    )
    await refused(
        stub.RedeliverWebhook(
            ipb.RedeliverWebhookRequest(name=f"{hook.name}/deliveries/Not_A_Name"),
            metadata=world.owner.md,
            timeout=CALL_DEADLINE_S,
        ),
        CODE.INVALID_ARGUMENT,
    )


async def test_events_no_webhook_wants_cost_the_feeder_no_write(
    setup: tuple[SwitchboardServer, Stub, CStub, World, WebhookReceiver],
) -> None:
    """The feeder passes over other workspaces' events in memory: a busy workspace without
    webhooks adds no transaction per event (the cursor is stored with the next delivery)."""
    server, stub, contexts, world, receiver = setup
    other = await create_workspace(contexts, world.owner, "Other")
    secret = webhook_secret()
    endpoint = receiver.endpoint("other", [secret])
    await create(
        stub,
        world.owner,
        other.name,
        webhook(receiver.url("other"), credential=secret, event_types=["MESSAGE_CREATED"]),
    )
    hooked = await create_conversation(contexts, world.owner, other.name)
    await append(contexts, world.owner, hooked.name, "first")
    await until(lambda: len(endpoint.accepted) >= 1, "the first delivery")
    writes: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        text = statement.lstrip().upper()
        if text.startswith("UPDATE") and "WEBHOOK_CURSOR" in text:
            writes.append(text)

    database = server.shared.database
    # SQLite's transactions (Database.run) run on its own synchronous engine.
    engine = getattr(database, "_sync_engine", None) or database.engine.sync_engine
    sql_event.listen(engine, "before_cursor_execute", count)
    try:
        busy = await create_conversation(contexts, world.editor, world.name)
        for i in range(20):
            await append(contexts, world.editor, busy.name, f"busy {i}")
        await append(contexts, world.owner, hooked.name, "second")
        await until(lambda: len(endpoint.accepted) >= 2, "the second delivery")
    finally:
        sql_event.remove(engine, "before_cursor_execute", count)
    assert endpoint.bad == []
    # The delivery's batch, and at most one lease renewal on a slow machine.
    assert 1 <= len(writes) <= 2
