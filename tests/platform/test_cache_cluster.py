"""The cache layer on a real Redis Cluster (three masters, three replicas).

Counters are shared by every process, invalidations travel over sharded pub/sub
(SSUBSCRIBE on the master of the channels' slot, SPUBLISH there), and when that
master is killed the subscriber resynchronises on the promoted replica and is
fresh again. The cluster comes from the ``redis_cluster`` fixture
(tests/infra/rediscluster.py); every wait polls under a deadline.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from switchboard.platform.cache import Cache, hash_tag
from tests.conftest import CALL_DEADLINE_S
from tests.infra.rediscluster import Cluster
from tests.platform.test_cache import Recorder, wait_until

# Real processes: six redis-servers and redis-cli.
pytestmark = pytest.mark.e2e

#: Wider than test_cache.py's: not about outages, and six servers share a busy machine.
TIMEOUT_S = 1.0
LEASE_S = 2.0
#: For the counters, which are not about outages: no command may time out under CPU load
#: (as test_eventlog.py's OUTAGE_FREE_TIMEOUT_S), or a hit is counted in memory.
OUTAGE_FREE_TIMEOUT_S = 10.0
CHANNEL = "invalidate"


@pytest.fixture
async def caches() -> AsyncIterator[Callable[..., Cache]]:
    made: list[Cache] = []

    def make(url: str, timeout_s: float = TIMEOUT_S) -> Cache:
        cache = Cache(url, timeout_s=timeout_s, lease_s=LEASE_S)
        made.append(cache)
        return cache

    yield make
    for cache in made:
        await cache.close()


async def subscribed(make: Callable[..., Cache], url: str) -> tuple[Cache, Recorder]:
    cache = make(url)
    recorder = Recorder()
    cache.subscribe(CHANNEL, recorder.on_message, recorder.on_resync)
    await cache.start()
    return cache, recorder


async def test_counters_are_shared_across_processes_and_clear(
    redis_cluster: Cluster, caches: Callable[..., Cache]
) -> None:
    a = caches(redis_cluster.url, OUTAGE_FREE_TIMEOUT_S)
    b = caches(redis_cluster.url, OUTAGE_FREE_TIMEOUT_S)
    await a.start()
    await b.start()
    assert a.state == "ok"
    keys = [f"dispatch:workspace:{hash_tag(f'ws-{i}')}" for i in range(12)]
    for key in keys:
        assert (await a.hit(key, 60))[0] == 1
        count, reset_s = await b.hit(key, 60)
        assert count == 2
        assert 0 < reset_s <= 60
    # Twelve workspaces' keys spread over the masters: every one was counted in Redis.
    masters = {redis_cluster.master_of(key).port for key in keys}
    assert len(masters) > 1
    await a.clear(keys[0])
    assert (await b.hit(keys[0], 60))[0] == 1
    assert a.state == b.state == "ok"


async def test_invalidations_travel_over_sharded_pub_sub(
    redis_cluster: Cluster, caches: Callable[..., Cache]
) -> None:
    publisher, _ = await subscribed(caches, redis_cluster.url)
    subscriber, heard = await subscribed(caches, redis_cluster.url)
    await wait_until(
        lambda: publisher.fresh() and subscriber.fresh(), CALL_DEADLINE_S, "both subscriptions"
    )
    wire = "{switchboard:invalidation}:" + CHANNEL
    master = redis_cluster.master_of(wire)
    with master.client() as c:
        # Both subscribers listen on the master of the channel's slot, sharded.
        assert c.execute_command("PUBSUB", "SHARDNUMSUB", wire) == [wire, 2]
    await publisher.publish(CHANNEL, "session:1")
    await wait_until(lambda: "session:1" in heard.messages, CALL_DEADLINE_S, "the invalidation")
    assert subscriber.fresh()


async def test_a_subscriber_resyncs_on_the_promoted_replica(
    redis_cluster: Cluster, caches: Callable[..., Cache]
) -> None:
    publisher, _ = await subscribed(caches, redis_cluster.url)
    subscriber, heard = await subscribed(caches, redis_cluster.url)
    await wait_until(subscriber.fresh, CALL_DEADLINE_S, "the subscription")
    resyncs = heard.resyncs
    master = redis_cluster.master_of("{switchboard:invalidation}:" + CHANNEL)
    replica = redis_cluster.replica_of(master)
    master.server.kill()
    # The lease lapses: nobody trusts a cache while its master is gone.
    await wait_until(lambda: not subscriber.fresh(), CALL_DEADLINE_S, "the lease to lapse")
    redis_cluster.wait_promoted(replica)
    await wait_until(subscriber.fresh, CALL_DEADLINE_S, "freshness on the promoted replica")
    assert heard.resyncs > resyncs  # its cache was dropped before it was trusted again
    await publisher.publish(CHANNEL, "session:2")
    await wait_until(lambda: "session:2" in heard.messages, CALL_DEADLINE_S, "the invalidation")
    with replica.client() as c:
        assert c.execute_command("ROLE")[0] == "master"
        assert (
            int(
                c.execute_command("PUBSUB", "SHARDNUMSUB", "{switchboard:invalidation}:" + CHANNEL)[
                    1
                ]
            )
            == 2
        )


def test_the_cluster_fixture_is_three_masters_with_a_replica_each(redis_cluster: Cluster) -> None:
    roles = sorted(node.role() for node in redis_cluster.nodes)
    assert roles == ["master"] * 3 + ["slave"] * 3
    with redis_cluster.nodes[0].client() as c:
        assert "cluster_state:ok" in str(c.execute_command("CLUSTER", "INFO"))
