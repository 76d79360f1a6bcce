"""A workspace's quota of calls at once (``WorkspaceQuota.max_concurrent_calls``) across
replicas: two dispatchers on one PostgreSQL recording calls for the same workspace at the
same moment, as two SIP processes (or a SIP process and a media-stream one) answering at
once would. The count is read under the workspace's row lock (``keyed._lock_workspace``),
so the last slot goes to exactly one of them, whichever replica asks; once that call
ends, the slot is free on the other.

The calls are recorded by each replica's own ``CallBook``, as its carrier records them
(``opened``, then ``update`` with ``ended``): no SIP line is needed to hold a slot.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from google.protobuf import field_mask_pb2
from grpc import aio

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.service import Dispatcher
from switchboard.dispatcher.talk.phone import book
from switchboard.dispatcher.talk.phone.book import CallBook
from switchboard.platform.errors import QuotaExceeded
from switchboard.platform.rpc.server import SwitchboardServer
from tests.conftest import CALL_DEADLINE_S, built
from tests.infra.redis import RedisServer
from tests.kits.contextkit import context_stub, ctx_world
from tests.kits.dispatchkit import dispatcher_stub, start_replicas

pytestmark = pytest.mark.service

#: Calls asked for at once, half on each replica.
CONTENDERS = 10


def _calls(server: SwitchboardServer) -> CallBook:
    return built(server, Dispatcher).calls


async def test_the_last_call_slot_goes_to_exactly_one_replica(
    tmp_path: Path, postgres_url: str, redis_server: RedisServer
) -> None:
    a, b = await start_replicas(tmp_path, postgres_url, redis_server.url)
    try:
        async with aio.insecure_channel(a.address) as channel:
            world = await ctx_world(a, context_stub(channel))
            stub = dispatcher_stub(channel)
            assistant = (
                await stub.CreateAssistant(
                    pb.CreateAssistantRequest(
                        parent=world.workspace.name,
                        assistant=pb.Assistant(display_name="Desk", instructions="Be brief."),
                    ),
                    metadata=world.owner.md,
                    timeout=CALL_DEADLINE_S,
                )
            ).assistant.name
            await stub.UpdateWorkspaceQuota(
                pb.UpdateWorkspaceQuotaRequest(
                    quota=pb.WorkspaceQuota(
                        name=f"{world.workspace.name}/quota", max_concurrent_calls=1
                    ),
                    update_mask=field_mask_pb2.FieldMask(paths=["max_concurrent_calls"]),
                ),
                metadata=world.owner.md,
                timeout=CALL_DEADLINE_S,
            )
        workspace_id = world.workspace.name.rsplit("/", 1)[-1]
        owner_id = world.owner.name.rsplit("/", 1)[-1]

        async def ring(server: SwitchboardServer, n: int) -> str | None:
            call = book.new_call(
                direction=pb.CALL_DIRECTION_INBOUND,
                state=pb.CALL_STATE_RINGING,
                trunk="carrier",
                from_number=f"+1555000{n:04d}",
                to_number="+15550100",
                assistant=assistant,
                conversation="",
                user_id=owner_id,
            )
            try:
                opened = await _calls(server).opened(
                    call, workspace_id=workspace_id, user_id=owner_id
                )
            except QuotaExceeded:
                return None
            return opened.call.name

        held = await asyncio.gather(*(ring(a if n % 2 else b, n) for n in range(CONTENDERS)))
        taken = [name for name in held if name is not None]
        assert len(taken) == 1, held
        # Both are refused while it lasts; once it has ended, the next call takes the slot,
        # on either replica.
        (name,) = taken
        assert await ring(a, 100) is None
        assert await ring(b, 101) is None
        ended = await _calls(a).update(name, book.ended(200, "the caller hung up"))
        assert ended is not None
        assert ended.state == pb.CALL_STATE_ENDED
        assert await ring(b, 102) is not None
        assert await ring(a, 103) is None
    finally:
        await a.shutdown(grace=0)
        await b.shutdown(grace=0)
