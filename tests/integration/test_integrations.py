"""IntegrationService: registration, authorization, validation, quotas, events, watching."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2, struct_pb2
from google.rpc import error_details_pb2
from grpc import aio
from sqlalchemy import select

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.events.v1 import events_pb2
from switchboard.api.integration.v1 import integration_pb2 as ipb
from switchboard.integration.service import IntegrationHub
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.store.models import IntegrationRow
from tests.conftest import CALL_DEADLINE_S, built
from tests.kits.authkit import detail, reason
from tests.kits.contextkit import (
    World,
    awaiting_event,
    context_stub,
    ctx_world,
    refused,
    tap,
    violations,
)
from tests.kits.integrationkit import (
    Stub,
    create,
    expert,
    hub_mesh,
    integration_stub,
    seconds,
    webhook,
    webhook_secret,
)

pytestmark = pytest.mark.service

CODE = grpc.StatusCode


@pytest.fixture
async def hub() -> AsyncIterator[tuple[SwitchboardServer, Stub, World]]:
    async with hub_mesh(integration_max_per_workspace=3) as (server, channel):
        world = await ctx_world(server, context_stub(channel))
        yield server, integration_stub(channel), world


# -- the probe timer --------------------------------------------------------------------------


async def test_the_timer_probes_an_integration_and_an_interval_of_zero_turns_it_off() -> None:
    async with hub_mesh(integration_probe_interval_s=0.05) as (server, channel):
        world = await ctx_world(server, context_stub(channel))
        assert built(server, IntegrationHub).prober.running
        # Port 1 refuses: the second round in a row makes it UNHEALTHY.
        async with awaiting_event(
            server,
            lambda e: (
                e.type == events_pb2.EVENT_TYPE_INTEGRATION_CHANGED
                and e.integration_changed.integration.status.health == ipb.HEALTH_STATE_UNHEALTHY
            ),
        ) as unhealthy:
            made = await create(integration_stub(channel), world.owner, world.name, expert())
            event = await asyncio.wait_for(unhealthy, CALL_DEADLINE_S)
        assert event.integration_changed.integration.name == made.name
        assert event.integration_changed.change == events_pb2.CHANGE_KIND_UPDATED
    async with hub_mesh(integration_probe_interval_s=0) as (server, channel):
        hub = built(server, IntegrationHub)
        assert not hub.prober.running
        world = await ctx_world(server, context_stub(channel))
        stub = integration_stub(channel)
        made = await create(stub, world.owner, world.name, expert())
        # Asked, a probe still runs: only the timer is off.
        await hub.probe_all()
        got = await stub.GetIntegration(
            ipb.GetIntegrationRequest(name=made.name),
            metadata=world.viewer.md,
            timeout=CALL_DEADLINE_S,
        )
        assert got.integration.status.health == ipb.HEALTH_STATE_DEGRADED


# -- the lifecycle ----------------------------------------------------------------------------


async def test_an_owner_registers_reads_lists_updates_and_deletes_an_integration(
    hub: tuple[SwitchboardServer, Stub, World],
) -> None:
    server, stub, world = hub
    with tap(server) as events:
        made = await create(
            stub,
            world.owner,
            world.name,
            expert(credential="s3cret-token", call_timeout=seconds(2.5)),
            integration_id="billing",
        )
        assert made.name == f"{world.name}/integrations/billing"
        assert made.credential == ""
        assert made.has_credential
        assert made.etag == '"1"'
        assert made.call_timeout.ToMilliseconds() == 2500
        got = await stub.GetIntegration(
            ipb.GetIntegrationRequest(name=made.name),
            metadata=world.viewer.md,
            timeout=CALL_DEADLINE_S,
        )
        assert got.integration == made
        renamed = ipb.Integration(name=made.name, display_name="Billing expert", etag=made.etag)
        updated = (
            await stub.UpdateIntegration(
                ipb.UpdateIntegrationRequest(
                    integration=renamed,
                    update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
                ),
                metadata=world.owner.md,
                timeout=CALL_DEADLINE_S,
            )
        ).integration
        assert updated.display_name == "Billing expert"
        assert updated.etag == '"2"'
        assert updated.has_credential
        stale = await refused(
            stub.UpdateIntegration(
                ipb.UpdateIntegrationRequest(
                    integration=renamed,
                    update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
                ),
                metadata=world.owner.md,
                timeout=CALL_DEADLINE_S,
            ),
            CODE.ABORTED,
        )
        assert reason(stale) == "ERROR_REASON_ETAG_MISMATCH"
        await stub.DeleteIntegration(
            ipb.DeleteIntegrationRequest(name=made.name, etag=updated.etag),
            metadata=world.owner.md,
            timeout=CALL_DEADLINE_S,
        )
        await refused(
            stub.GetIntegration(
                ipb.GetIntegrationRequest(name=made.name),
                metadata=world.owner.md,
                timeout=CALL_DEADLINE_S,
            ),
            CODE.NOT_FOUND,
        )
        changes = [
            (e.integration_changed.change, e.integration_changed.integration.display_name)
            for e in events.take()
            if e.type == events_pb2.EVENT_TYPE_INTEGRATION_CHANGED
        ]
    assert changes == [
        (events_pb2.CHANGE_KIND_CREATED, "Expert"),
        (events_pb2.CHANGE_KIND_UPDATED, "Billing expert"),
        (events_pb2.CHANGE_KIND_DELETED, "Billing expert"),
    ]


async def test_the_credential_is_sealed_at_rest_and_never_in_an_event(
    hub: tuple[SwitchboardServer, Stub, World],
) -> None:
    server, stub, world = hub
    secret = "tok-" + "x" * 40
    with tap(server) as events:
        made = await create(stub, world.owner, world.name, expert(credential=secret))
        published = [e.SerializeToString() for e in events.take()]
    assert published
    assert all(secret.encode() not in data for data in published)
    async with server.shared.database.readers() as session:
        stored = (await session.execute(select(IntegrationRow.credential))).scalars().all()
    assert len(stored) == 1
    assert stored[0] is not None
    assert secret.encode() not in stored[0]
    assert made.has_credential


async def test_list_pages_through_every_integration_once(
    hub: tuple[SwitchboardServer, Stub, World],
) -> None:
    _, stub, world = hub
    made = [
        (await create(stub, world.owner, world.name, expert(), integration_id=f"e{i}")).name
        for i in range(3)
    ]
    seen: list[str] = []
    token = ""
    while True:
        page = await stub.ListIntegrations(
            ipb.ListIntegrationsRequest(parent=world.name, page_size=2, page_token=token),
            metadata=world.viewer.md,
            timeout=CALL_DEADLINE_S,
        )
        seen += [i.name for i in page.integrations]
        token = page.next_page_token
        if not token:
            break
    assert seen == made
    bad = await refused(
        stub.ListIntegrations(
            ipb.ListIntegrationsRequest(parent=world.name, page_token="forged"),
            metadata=world.viewer.md,
            timeout=CALL_DEADLINE_S,
        ),
        CODE.INVALID_ARGUMENT,
    )
    assert violations(bad) == ["page_token"]


async def test_a_retried_create_with_the_same_request_id_creates_once(
    hub: tuple[SwitchboardServer, Stub, World],
) -> None:
    server, stub, world = hub
    with tap(server) as events:
        first = await create(stub, world.owner, world.name, expert(), request_id="make-1")
        again = await create(stub, world.owner, world.name, expert(), request_id="make-1")
        created = [
            e
            for e in events.take()
            if e.integration_changed.change == events_pb2.CHANGE_KIND_CREATED
        ]
    assert again.name == first.name
    assert len(created) == 1
    other = await refused(
        create(stub, world.owner, world.name, expert(display_name="Else"), request_id="make-1"),
        CODE.INVALID_ARGUMENT,
    )
    assert violations(other) == ["request_id"]


async def test_a_workspace_holds_at_most_its_quota_of_integrations(
    hub: tuple[SwitchboardServer, Stub, World],
) -> None:
    _, stub, world = hub
    for _ in range(3):
        await create(stub, world.owner, world.name, expert())
    full = await refused(create(stub, world.owner, world.name, expert()), CODE.RESOURCE_EXHAUSTED)
    assert reason(full) == "ERROR_REASON_QUOTA_EXCEEDED"


# -- authorization: owners manage, editors invoke, viewers read, strangers see nothing ----------


async def _calls(stub: Stub, world: World, name: str) -> dict[str, Any]:
    tool = f"{name}/tools/anything"
    return {
        "CreateIntegration": lambda md: stub.CreateIntegration(
            ipb.CreateIntegrationRequest(parent=world.name, integration=expert()),
            metadata=md,
            timeout=CALL_DEADLINE_S,
        ),
        "GetIntegration": lambda md: stub.GetIntegration(
            ipb.GetIntegrationRequest(name=name), metadata=md, timeout=CALL_DEADLINE_S
        ),
        "ListIntegrations": lambda md: stub.ListIntegrations(
            ipb.ListIntegrationsRequest(parent=world.name), metadata=md, timeout=CALL_DEADLINE_S
        ),
        "UpdateIntegration": lambda md: stub.UpdateIntegration(
            ipb.UpdateIntegrationRequest(
                integration=ipb.Integration(name=name, display_name="x"),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
            ),
            metadata=md,
            timeout=CALL_DEADLINE_S,
        ),
        "ListTools": lambda md: stub.ListTools(
            ipb.ListToolsRequest(parent=f"{world.name}/integrations/hook"),
            metadata=md,
            timeout=CALL_DEADLINE_S,
        ),
        "InvokeTool": lambda md: stub.InvokeTool(
            ipb.InvokeToolRequest(name=tool), metadata=md, timeout=CALL_DEADLINE_S
        ),
        "ListWebhookDeliveries": lambda md: stub.ListWebhookDeliveries(
            ipb.ListWebhookDeliveriesRequest(parent=f"{world.name}/integrations/hook"),
            metadata=md,
            timeout=CALL_DEADLINE_S,
        ),
        "RedeliverWebhook": lambda md: stub.RedeliverWebhook(
            ipb.RedeliverWebhookRequest(name=f"{world.name}/integrations/hook/deliveries/d1"),
            metadata=md,
            timeout=CALL_DEADLINE_S,
        ),
        "DeleteIntegration": lambda md: stub.DeleteIntegration(
            ipb.DeleteIntegrationRequest(name=name), metadata=md, timeout=CALL_DEADLINE_S
        ),
    }


#: The code each role gets when authorization is what stops it (None: allowed past it).
_DENIED = {
    "CreateIntegration": ("owner",),
    "GetIntegration": ("owner", "editor", "viewer"),
    "ListIntegrations": ("owner", "editor", "viewer"),
    "UpdateIntegration": ("owner",),
    "ListTools": ("owner", "editor", "viewer"),
    "InvokeTool": ("owner", "editor"),
    "ListWebhookDeliveries": ("owner", "editor", "viewer"),
    "RedeliverWebhook": ("owner",),
    "DeleteIntegration": ("owner",),
}


@pytest.mark.parametrize("role", ["owner", "editor", "viewer", "outsider"])
async def test_every_rpc_is_authorized_for_each_role(
    hub: tuple[SwitchboardServer, Stub, World], role: str
) -> None:
    _, stub, world = hub
    await create(stub, world.owner, world.name, webhook(), integration_id="hook")
    made = await create(stub, world.owner, world.name, expert(), integration_id="target")
    caller = getattr(world, role)
    for method, call in (await _calls(stub, world, made.name)).items():
        try:
            await call(caller.md)
            code = CODE.OK
        except aio.AioRpcError as exc:
            code = exc.code()
        allowed = role in _DENIED[method]
        if role == "outsider":
            assert code == CODE.NOT_FOUND, (method, code)
        elif not allowed:
            assert code == CODE.PERMISSION_DENIED, (method, code)
        else:
            assert code not in (CODE.PERMISSION_DENIED, CODE.UNAUTHENTICATED), (method, code)
            assert code not in (CODE.UNKNOWN, CODE.INTERNAL), (method, code)


# -- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("integration", "fields"),
    [
        (ipb.Integration(endpoint="127.0.0.1:1"), ["integration.kind"]),
        (expert(endpoint=""), ["integration.endpoint"]),
        (expert(endpoint="not an address"), ["integration.endpoint"]),
        (expert(call_timeout=seconds(10_000)), ["integration.call_timeout"]),
        (expert(event_types=["MESSAGE_CREATED"]), ["integration.event_types"]),
        (webhook(credential=""), ["integration.credential"]),
        (webhook(credential="whsec_short"), ["integration.credential"]),
        (webhook(event_types=["NOT_A_TYPE"]), ["integration.event_types[0]"]),
        (webhook(endpoint="ftp://127.0.0.1/x"), ["integration.endpoint"]),
        (
            ipb.Integration(kind=ipb.INTEGRATION_KIND_MCP_SERVER, endpoint="stdio:unknown"),
            ["integration.endpoint"],
        ),
    ],
)
async def test_a_malformed_integration_names_each_bad_field(
    hub: tuple[SwitchboardServer, Stub, World], integration: ipb.Integration, fields: list[str]
) -> None:
    _, stub, world = hub
    error = await refused(create(stub, world.owner, world.name, integration), CODE.INVALID_ARGUMENT)
    assert violations(error) == fields


async def test_an_oversized_config_is_refused(hub: tuple[SwitchboardServer, Stub, World]) -> None:
    _, stub, world = hub
    config = struct_pb2.Struct()
    config.update({"blob": "x" * 20_000})
    await refused(
        create(stub, world.owner, world.name, expert(config=config)), CODE.RESOURCE_EXHAUSTED
    )


async def test_an_expert_may_not_take_an_operator_level_handler_id(
    hub: tuple[SwitchboardServer, Stub, World],
) -> None:
    _, stub, world = hub
    error = await refused(
        create(stub, world.owner, world.name, expert(), integration_id="echo"),
        CODE.INVALID_ARGUMENT,
    )
    assert violations(error) == ["integration_id"]


async def test_a_malformed_integration_id_is_refused_with_the_rule_in_words(
    hub: tuple[SwitchboardServer, Stub, World],
) -> None:
    _, stub, world = hub
    rule = (
        "must be 2 to 63 characters: lowercase letters, digits and hyphens, starting with a letter"
    )
    for bad in ("k", "Kit", "1kit", "kit_1", "k" * 64):
        error = await refused(
            create(stub, world.owner, world.name, expert(), integration_id=bad),
            CODE.INVALID_ARGUMENT,
        )
        assert error.details() == f"integration_id {rule}", bad
        [violation] = detail(error, error_details_pb2.BadRequest).field_violations
        assert (violation.field, violation.description) == ("integration_id", rule)


@pytest.mark.parametrize(
    "endpoint",
    [
        "169.254.169.254:80",  # cloud metadata: refused even where loopback is allowed
        "10.1.2.3:50051",
        "[fd00:ec2::254]:80",
        "[::ffff:169.254.169.254]:80",
    ],
)
async def test_blocked_destinations_are_refused_at_registration(
    hub: tuple[SwitchboardServer, Stub, World], endpoint: str
) -> None:
    _, stub, world = hub
    error = await refused(
        create(stub, world.owner, world.name, expert(endpoint=endpoint)), CODE.INVALID_ARGUMENT
    )
    assert reason(error) == "ERROR_REASON_DESTINATION_BLOCKED"
    assert violations(error) == ["integration.endpoint"]


async def test_loopback_is_refused_unless_the_operator_allows_it() -> None:
    async with hub_mesh(egress_allow_loopback=False) as (server, channel):
        world = await ctx_world(server, context_stub(channel))
        stub = integration_stub(channel)
        for integration in (expert(endpoint="127.0.0.1:50051"), webhook("https://localhost/x")):
            error = await refused(
                create(stub, world.owner, world.name, integration), CODE.INVALID_ARGUMENT
            )
            assert reason(error) == "ERROR_REASON_DESTINATION_BLOCKED"
        plain = await refused(
            create(stub, world.owner, world.name, webhook("http://hooks.invalid/x")),
            CODE.INVALID_ARGUMENT,
        )
        assert violations(plain) == ["integration.endpoint"]


@pytest.mark.parametrize(
    ("endpoint", "rule", "setting"),
    [
        ("http://127.0.0.1:3001/mcp", "loopback", "SWITCHBOARD_EGRESS_ALLOW_LOOPBACK=true"),
        ("https://127.0.0.1:3001/mcp", "loopback", "SWITCHBOARD_EGRESS_ALLOW_LOOPBACK=true"),
        ("https://localhost:3001/mcp", "loopback", "SWITCHBOARD_EGRESS_ALLOW_LOOPBACK=true"),
        ("https://10.1.2.3/mcp", "private", "SWITCHBOARD_EGRESS_ALLOW_PRIVATE=true"),
        ("https://169.254.169.254/mcp", "always", "SWITCHBOARD_EGRESS_ALLOW_CIDRS"),
    ],
)
async def test_a_refused_address_names_the_rule_and_the_setting_that_allows_it(
    endpoint: str, rule: str, setting: str
) -> None:
    # The README's MCP example, on a server that does not allow loopback: the
    # answer is the policy that refused the address, not the scheme.
    async with hub_mesh(egress_allow_loopback=False) as (server, channel):
        world = await ctx_world(server, context_stub(channel))
        mcp = ipb.Integration(kind=ipb.INTEGRATION_KIND_MCP_SERVER, endpoint=endpoint)
        error = await refused(
            create(integration_stub(channel), world.owner, world.name, mcp),
            CODE.INVALID_ARGUMENT,
        )
    assert reason(error) == "ERROR_REASON_DESTINATION_BLOCKED"
    assert violations(error) == ["integration.endpoint"]
    message = error.details() or ""
    assert "egress policy" in message
    assert setting in message
    assert detail(error, error_details_pb2.ErrorInfo).metadata["policy"] == f"egress.{rule}"


async def test_plain_http_to_an_allowed_address_says_what_allows_it() -> None:
    async with hub_mesh(egress_allow_loopback=False) as (server, channel):
        world = await ctx_world(server, context_stub(channel))
        # A public address the policy allows (an IP literal: nothing is resolved or dialled).
        mcp = ipb.Integration(kind=ipb.INTEGRATION_KIND_MCP_SERVER, endpoint="http://8.8.8.8/mcp")
        error = await refused(
            create(integration_stub(channel), world.owner, world.name, mcp),
            CODE.INVALID_ARGUMENT,
        )
    assert reason(error) == "ERROR_REASON_INVALID_ARGUMENT"
    (violation,) = detail(error, error_details_pb2.BadRequest).field_violations
    assert violation.field == "integration.endpoint"
    assert violation.description.startswith("must be an https URL")
    assert "SWITCHBOARD_EGRESS_ALLOW_LOOPBACK" in violation.description


# -- watching ---------------------------------------------------------------------------------


async def _next(stream: Any) -> ipb.WatchIntegrationsResponse:
    frame: ipb.WatchIntegrationsResponse = await asyncio.wait_for(stream.read(), CALL_DEADLINE_S)
    return frame


async def test_watch_streams_the_snapshot_then_every_change(
    hub: tuple[SwitchboardServer, Stub, World],
) -> None:
    _, stub, world = hub
    first = await create(stub, world.owner, world.name, expert(), integration_id="first")
    stream = stub.WatchIntegrations(
        ipb.WatchIntegrationsRequest(parent=world.name), metadata=world.viewer.md
    )
    try:
        assert (await _next(stream)).integration.name == first.name
        assert (await _next(stream)).snapshot_complete
        second = await create(stub, world.owner, world.name, webhook(), integration_id="second")
        frame = await _next(stream)
        assert frame.integration.name == second.name
        assert not frame.integration.credential
        await stub.DeleteIntegration(
            ipb.DeleteIntegrationRequest(name=first.name),
            metadata=world.owner.md,
            timeout=CALL_DEADLINE_S,
        )
        gone = await _next(stream)
        assert gone.deleted
        assert gone.integration.name == first.name
    finally:
        stream.cancel()


async def test_watch_ends_when_the_caller_leaves_the_workspace(
    hub: tuple[SwitchboardServer, Stub, World],
) -> None:
    server, stub, world = hub
    stream = stub.WatchIntegrations(
        ipb.WatchIntegrationsRequest(parent=world.name), metadata=world.viewer.md
    )
    assert (await _next(stream)).snapshot_complete
    async with aio.insecure_channel(server.address) as channel:
        await context_stub(channel).RemoveWorkspaceMember(
            cpb.RemoveWorkspaceMemberRequest(name=f"{world.name}/members/{world.viewer.id}"),
            metadata=world.owner.md,
            timeout=CALL_DEADLINE_S,
        )
    with pytest.raises(aio.AioRpcError) as ended:
        await _next(stream)
    assert ended.value.code() == CODE.NOT_FOUND


async def test_a_webhook_secret_must_be_whsec_base64(
    hub: tuple[SwitchboardServer, Stub, World],
) -> None:
    _, stub, world = hub
    made = await create(stub, world.owner, world.name, webhook(credential=webhook_secret()))
    assert made.has_credential
    assert made.kind == ipb.INTEGRATION_KIND_WEBHOOK


async def test_tool_calls_are_rate_limited_per_workspace() -> None:
    async with hub_mesh(integration_tool_calls_per_minute=2) as (server, channel):
        world = await ctx_world(server, context_stub(channel))
        stub = integration_stub(channel)
        call = ipb.InvokeToolRequest(name=f"{world.name}/integrations/none/tools/t")
        for _ in range(2):
            await refused(
                stub.InvokeTool(call, metadata=world.editor.md, timeout=CALL_DEADLINE_S),
                CODE.NOT_FOUND,
            )
        limited = await refused(
            stub.InvokeTool(call, metadata=world.editor.md, timeout=CALL_DEADLINE_S),
            CODE.RESOURCE_EXHAUSTED,
        )
        assert reason(limited) == "ERROR_REASON_RATE_LIMITED"


async def test_the_server_disabling_a_failing_webhook_announces_it(
    hub: tuple[SwitchboardServer, Stub, World],
) -> None:
    server, stub, world = hub
    made = await create(stub, world.owner, world.name, webhook(), integration_id="failing")
    with tap(server) as events:
        integrations = built(server, IntegrationHub)
        await integrations.disable(world.id, "failing", "no success for a day")
        await integrations.disable(world.id, "failing", "again")  # already: nothing
        changed = [
            e.integration_changed for e in events.take() if e.HasField("integration_changed")
        ]
    assert len(changed) == 1
    assert changed[0].integration.disabled
    assert changed[0].integration.status.last_error.message == "no success for a day"
    assert changed[0].integration.etag != made.etag
    got = await stub.GetIntegration(
        ipb.GetIntegrationRequest(name=made.name), metadata=world.viewer.md, timeout=CALL_DEADLINE_S
    )
    assert got.integration.disabled
