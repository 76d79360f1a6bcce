"""Workspace quotas end to end: GetWorkspaceQuota and UpdateWorkspaceQuota (defaults,
mask, etag, roles, bad input), and SendMessage held to them: messages per minute per
workspace and per API key (RATE_LIMITED with RetryInfo), runs queued or running per
workspace and per API key (QUOTA_EXCEEDED with a QuotaFailure and RetryInfo), freed
when a run ends. On SQLite and PostgreSQL. The echo handler's ``delay_ms`` keeps a run
going until it is cancelled; every wait is on a stream update, never on a clock.
"""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc import aio

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.budgets.quotas import CACHE_TTL_S, Quotas
from switchboard.dispatcher.budgets.quotastore import QuotaStore
from switchboard.dispatcher.service import Dispatcher
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.settings import Settings
from tests.conftest import CALL_DEADLINE_S, built, make_settings
from tests.kits.authkit import detail, reason
from tests.kits.contextkit import (
    Caller,
    Stub,
    World,
    create_conversation,
    refused,
    stub_fixture,
    violations,
    world_fixture,
)
from tests.kits.dispatchkit import Stub as DStub
from tests.kits.dispatchkit import cancel, dispatcher_stub, finished, request, send, until

pytestmark = pytest.mark.service

SLOW = 60_000  # ms between echoed words: the run outlives any test unless cancelled
DEFAULT_RATE = 500
DEFAULT_ACTIVE = 40

stub, world = stub_fixture, world_fixture


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(
        database_url=database_url,
        dispatcher_max_messages_per_minute_per_workspace=DEFAULT_RATE,
        dispatcher_max_active_runs_per_workspace=DEFAULT_ACTIVE,
    )


@pytest.fixture
def dstub(channel: aio.Channel) -> DStub:
    return dispatcher_stub(channel)


def _name(world: World) -> str:
    return f"{world.name}/quota"


async def _get(dstub: DStub, caller: Caller, name: str) -> pb.WorkspaceQuota:
    response = await dstub.GetWorkspaceQuota(
        pb.GetWorkspaceQuotaRequest(name=name), metadata=caller.md, timeout=CALL_DEADLINE_S
    )
    return response.quota


async def _update(
    dstub: DStub, caller: Caller, quota: pb.WorkspaceQuota, *paths: str
) -> pb.WorkspaceQuota:
    response = await dstub.UpdateWorkspaceQuota(
        pb.UpdateWorkspaceQuotaRequest(
            quota=quota, update_mask=field_mask_pb2.FieldMask(paths=list(paths))
        ),
        metadata=caller.md,
        timeout=CALL_DEADLINE_S,
    )
    return response.quota


async def _api_key(channel: aio.Channel, owner: Caller) -> tuple[str, Caller]:
    """A new API key of ``owner`` that may send messages: its name, and a caller using it."""
    created = await auth_pb2_grpc.AuthServiceStub(channel).CreateApiKey(
        auth_pb2.CreateApiKeyRequest(display_name="bot", scopes=["read", "write"]),
        metadata=owner.md,
        timeout=CALL_DEADLINE_S,
    )
    return created.api_key.name, Caller(owner.id, created.secret)


def _quota_failure(error: aio.AioRpcError) -> list[str]:
    failure = detail(error, error_details_pb2.QuotaFailure)
    return [violation.subject for violation in failure.violations]


async def _conversations(stub: Stub, world: World, count: int) -> list[str]:
    return [(await create_conversation(stub, world.owner, world.name)).name for _ in range(count)]


# -- the RPCs -----------------------------------------------------------------------------


async def test_get_shows_the_server_defaults_until_an_owner_sets_values(
    dstub: DStub, world: World
) -> None:
    quota = await _get(dstub, world.viewer, _name(world))
    assert quota.name == _name(world)
    assert quota.messages_per_minute == DEFAULT_RATE
    assert quota.max_concurrent_runs == DEFAULT_ACTIVE
    assert list(quota.api_keys) == []
    assert quota.etag == '"0"'
    assert not quota.HasField("update_time")
    # Members read it; a stranger cannot tell the workspace exists.
    await refused(_get(dstub, world.outsider, _name(world)), grpc.StatusCode.NOT_FOUND)


async def test_owners_update_by_mask_and_etag(dstub: DStub, world: World) -> None:
    first = await _get(dstub, world.owner, _name(world))
    key = "users/someone/apiKeys/k1"
    changed = await _update(
        dstub,
        world.owner,
        pb.WorkspaceQuota(
            name=_name(world),
            etag=first.etag,
            messages_per_minute=120,
            max_concurrent_runs=999,  # not in the mask: unchanged
            api_keys=[pb.ApiKeyQuota(api_key=key, messages_per_minute=10)],
        ),
        "messages_per_minute",
        "api_keys",
    )
    assert changed.messages_per_minute == 120
    assert changed.max_concurrent_runs == DEFAULT_ACTIVE
    assert [
        (k.api_key, k.messages_per_minute, k.max_concurrent_runs) for k in changed.api_keys
    ] == [(key, 10, 0)]
    assert changed.etag == '"1"'
    assert changed.HasField("update_time")
    assert await _get(dstub, world.editor, _name(world)) == changed
    # The etag read before the change is stale now; nothing is written.
    stale = await refused(
        _update(
            dstub,
            world.owner,
            pb.WorkspaceQuota(name=_name(world), etag=first.etag, max_concurrent_runs=3),
            "max_concurrent_runs",
        ),
        grpc.StatusCode.ABORTED,
    )
    assert reason(stale) == "ERROR_REASON_ETAG_MISMATCH"
    # 0 in the mask goes back to the server's default; no mask changes what is set.
    reset = await _update(
        dstub, world.owner, pb.WorkspaceQuota(name=_name(world), etag=changed.etag), "*"
    )
    assert (reset.messages_per_minute, reset.max_concurrent_runs) == (DEFAULT_RATE, DEFAULT_ACTIVE)
    assert list(reset.api_keys) == []
    unmasked = await _update(
        dstub, world.owner, pb.WorkspaceQuota(name=_name(world), max_concurrent_runs=7)
    )
    assert (unmasked.messages_per_minute, unmasked.max_concurrent_runs) == (DEFAULT_RATE, 7)
    assert unmasked.etag == '"3"'


async def test_only_owners_update(dstub: DStub, world: World) -> None:
    change = pb.WorkspaceQuota(name=_name(world), messages_per_minute=1)
    for caller in (world.editor, world.viewer):
        await refused(_update(dstub, caller, change), grpc.StatusCode.PERMISSION_DENIED)
    await refused(_update(dstub, world.outsider, change), grpc.StatusCode.NOT_FOUND)
    assert (await _get(dstub, world.owner, _name(world))).etag == '"0"'


async def test_bad_input_names_each_field_and_stores_nothing(dstub: DStub, world: World) -> None:
    name = _name(world)

    async def bad(quota: pb.WorkspaceQuota, *paths: str) -> list[str]:
        error = await refused(
            _update(dstub, world.owner, quota, *paths), grpc.StatusCode.INVALID_ARGUMENT
        )
        return violations(error)

    assert await bad(
        pb.WorkspaceQuota(name=name, messages_per_minute=-1, max_concurrent_runs=1_000_001),
        "messages_per_minute",
        "max_concurrent_runs",
    ) == ["quota.messages_per_minute", "quota.max_concurrent_runs"]
    assert await bad(
        pb.WorkspaceQuota(
            name=name,
            api_keys=[
                pb.ApiKeyQuota(api_key="users/u/apiKeys/a", messages_per_minute=5),
                pb.ApiKeyQuota(api_key="users/u/apiKeys/a", max_concurrent_runs=-2),
                pb.ApiKeyQuota(api_key="users/u/keys/b"),
                pb.ApiKeyQuota(api_key="", messages_per_minute=10_000_001),
            ],
        ),
        "api_keys",
    ) == [
        "quota.api_keys[1].api_key",
        "quota.api_keys[1].max_concurrent_runs",
        "quota.api_keys[2].api_key",
        "quota.api_keys[3].api_key",
        "quota.api_keys[3].messages_per_minute",
    ]
    many = [pb.ApiKeyQuota(api_key=f"users/u/apiKeys/k{i}") for i in range(101)]
    assert await bad(pb.WorkspaceQuota(name=name, api_keys=many), "api_keys") == ["quota.api_keys"]
    assert await bad(pb.WorkspaceQuota(name=name), "etag") == ["update_mask.paths"]
    assert await bad(pb.WorkspaceQuota(name=name, etag="nope"), "*") == ["quota.etag"]
    assert await bad(pb.WorkspaceQuota(name=f"{world.name}/quotas/x"), "*") == ["quota.name"]
    error = await refused(
        _get(dstub, world.viewer, f"{world.name}/assistants/quota"),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert violations(error) == ["name"]
    # Exactly 100 distinct keys are fine.
    fine = await _update(dstub, world.owner, pb.WorkspaceQuota(name=name, api_keys=many[:100]))
    assert len(fine.api_keys) == 100
    assert fine.etag == '"1"'


# -- enforcement ------------------------------------------------------------------------


async def test_messages_per_minute_per_workspace_and_per_api_key(
    channel: aio.Channel, stub: Stub, dstub: DStub, world: World
) -> None:
    (conversation,) = await _conversations(stub, world, 1)
    key, bot = await _api_key(channel, world.editor)
    await _update(
        dstub,
        world.owner,
        pb.WorkspaceQuota(
            name=_name(world),
            messages_per_minute=4,
            api_keys=[pb.ApiKeyQuota(api_key=key, messages_per_minute=1)],
        ),
    )
    # The key's own minute: one message, then RATE_LIMITED with RetryInfo.
    await send(dstub, bot, request(conversation, "from the bot"))
    error = await refused(
        send(dstub, bot, request(conversation, "again")), grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert reason(error) == "ERROR_REASON_RATE_LIMITED"
    assert "API key" in (error.details() or "")
    assert detail(error, error_details_pb2.RetryInfo).retry_delay.seconds >= 1
    # The workspace's minute counts every message, the refused one included: 2 of 4 so far.
    await send(dstub, world.editor, request(conversation, "three"))
    await send(dstub, world.owner, request(conversation, "four"))
    error = await refused(
        send(dstub, world.owner, request(conversation, "five")),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert reason(error) == "ERROR_REASON_RATE_LIMITED"
    assert "workspace" in (error.details() or "")
    assert 1 <= detail(error, error_details_pb2.RetryInfo).retry_delay.seconds <= 60


async def test_concurrent_runs_are_bounded_per_workspace_and_freed_when_runs_end(
    stub: Stub, dstub: DStub, world: World
) -> None:
    conversations = await _conversations(stub, world, 4)
    await _update(dstub, world.owner, pb.WorkspaceQuota(name=_name(world), max_concurrent_runs=2))
    runs = [
        (await send(dstub, world.editor, request(c, "a b", delay_ms=SLOW))).run.name
        for c in conversations[:2]
    ]
    error = await refused(
        send(dstub, world.editor, request(conversations[2], "one too many")),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert reason(error) == "ERROR_REASON_QUOTA_EXCEEDED"
    assert _quota_failure(error) == [_name(world)]
    assert detail(error, error_details_pb2.RetryInfo).retry_delay.seconds >= 1
    # A run that ends gives its place back (its end is stored before watchers see it).
    await cancel(dstub, world.editor, runs[0])
    assert (await finished(dstub, world.editor, runs[0])).state == pb.RUN_STATE_CANCELLED
    third = await send(dstub, world.editor, request(conversations[2], "now it runs", delay_ms=SLOW))
    # Both places are taken again (each run waits SLOW between its words) ...
    await refused(
        send(dstub, world.editor, request(conversations[3], "not yet")),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    # ... until raising the quota, which applies at once on the replica that made the change.
    await _update(dstub, world.owner, pb.WorkspaceQuota(name=_name(world), max_concurrent_runs=3))
    fourth = await send(
        dstub, world.editor, request(conversations[3], "and so does this", delay_ms=SLOW)
    )
    for name in (runs[1], third.run.name, fourth.run.name):
        await cancel(dstub, world.editor, name)


async def test_concurrent_runs_per_api_key(
    channel: aio.Channel, stub: Stub, dstub: DStub, world: World
) -> None:
    conversations = await _conversations(stub, world, 3)
    key, bot = await _api_key(channel, world.editor)
    await _update(
        dstub,
        world.owner,
        pb.WorkspaceQuota(
            name=_name(world), api_keys=[pb.ApiKeyQuota(api_key=key, max_concurrent_runs=1)]
        ),
    )
    first = await send(dstub, bot, request(conversations[0], "a b", delay_ms=SLOW))
    await until(dstub, bot, first.run.name, "delta")
    error = await refused(
        send(dstub, bot, request(conversations[1], "second")), grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert reason(error) == "ERROR_REASON_QUOTA_EXCEEDED"
    assert _quota_failure(error) == [key]
    assert detail(error, error_details_pb2.RetryInfo).retry_delay.seconds >= 1
    # The key's runs are the key's: the same user signed in is bounded by the workspace only.
    other = await send(dstub, world.editor, request(conversations[2], "c d", delay_ms=SLOW))
    await cancel(dstub, bot, first.run.name)
    await finished(dstub, bot, first.run.name)
    again = await send(dstub, bot, request(conversations[1], "second, later"))
    await finished(dstub, bot, again.run.name)
    await cancel(dstub, world.editor, other.run.name)


async def test_another_replica_sees_a_change_within_the_cache_time(
    mesh: SwitchboardServer, stub: Stub, dstub: DStub, world: World
) -> None:
    """A change made elsewhere reaches a replica's cache within ``CACHE_TTL_S``; the
    cache's clock is moved, not waited for."""
    quotas: Quotas = built(mesh, Dispatcher).quotas
    now = [0.0]
    quotas.clock = lambda: now[0]
    (conversation,) = await _conversations(stub, world, 1)
    await send(dstub, world.editor, request(conversation, "cached"))  # reads the defaults
    # Written behind this replica's back, as another replica would.
    await QuotaStore(mesh.shared.database).update(
        world.workspace.name.split("/")[1],
        "",
        lambda _: pb.WorkspaceQuota(max_concurrent_runs=1).SerializeToString(),
    )
    held = await send(dstub, world.editor, request(conversation, "a b", delay_ms=SLOW))
    await send(dstub, world.editor, request(conversation, "still the cached default"))
    now[0] += CACHE_TTL_S
    error = await refused(
        send(dstub, world.editor, request(conversation, "refused now")),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert reason(error) == "ERROR_REASON_QUOTA_EXCEEDED"
    await cancel(dstub, world.editor, held.run.name)
