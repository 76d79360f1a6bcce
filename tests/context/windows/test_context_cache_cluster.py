"""A whole server on a Redis Cluster (three masters, three replicas): every part that
uses Redis (the cache, the event log, the breakers, the window cache) starts on
``redis+cluster://``, and one conversation's cached windows are in one slot, the
slot of the conversation's id (its hash tag), so they live on one master.
"""

from __future__ import annotations

import pytest
from grpc import aio

from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.settings import Settings
from tests.conftest import make_settings
from tests.context.windows.test_context_cache import conversation_id, served_twice, texts
from tests.infra.rediscluster import Cluster
from tests.kits.contextkit import Chat, append, new_chat

# Real processes: six redis-servers and redis-cli.
pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]

#: Not about outages: no command may time out on a busy machine.
REDIS_TIMEOUT_S = 2.0


@pytest.fixture
def settings(redis_cluster: Cluster) -> Settings:
    return make_settings(redis_url=redis_cluster.url, redis_timeout_s=REDIS_TIMEOUT_S)


def _window_keys(cluster: Cluster, c: Chat) -> dict[str, int]:
    """Each cached window of ``c``'s conversation, with the port of the master holding it."""
    found: dict[str, int] = {}
    for node in cluster.live():
        if node.role() != "master":
            continue
        with node.client() as client:
            for key in client.scan_iter(match=f"ctxwin:*{conversation_id(c)}*"):
                found[str(key)] = node.port
    return found


async def test_a_conversations_windows_share_one_slot_on_the_cluster(
    mesh: SwitchboardServer, channel: aio.Channel, redis_cluster: Cluster
) -> None:
    c = await new_chat(mesh, channel)
    await append(c.stub, c.caller, c.conversation, "one")
    await served_twice(mesh, c)
    await append(c.stub, c.caller, c.conversation, "two")
    assert texts(await served_twice(mesh, c)) == ["one", "two"]
    stored = _window_keys(redis_cluster, c)
    assert len(stored) == 2, "one entry per version, both in Redis"
    tag = "{" + conversation_id(c) + "}"
    with redis_cluster.live()[0].client() as client:
        slots = {int(client.execute_command("CLUSTER", "KEYSLOT", key)) for key in stored}
        assert slots == {int(client.execute_command("CLUSTER", "KEYSLOT", tag))}
    assert set(stored.values()) == {redis_cluster.master_of(tag).port}
