"""The cache layer against a real redis-server: counters, fallback, recovery, leases.

Failures are produced for real (SIGSTOP, SIGKILL, restart on the same port)
through the ``redis_server`` fixture. Timeouts are small so the whole file stays
fast; every wait is bounded by a deadline, and ``wait_until`` is the only place
that polls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import pytest
from redis.asyncio import Redis

from switchboard.platform.cache import Cache, hash_tag, is_cluster
from tests.conftest import CALL_DEADLINE_S
from tests.infra.redis import RedisServer

pytestmark = pytest.mark.unit

TIMEOUT_S = 0.1
LEASE_S = 0.3
#: Slack for event-loop scheduling on a busy machine; never a correctness margin.
SLACK_S = 0.2

CACHE_LOGGER = "switchboard.platform.cache"

CacheFactory = Callable[..., Cache]


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:  # noqa: ASYNC109
    """Poll ``predicate`` until it holds; fail the test after ``timeout`` seconds.

    The one place that polls: ``state`` and ``fresh()`` are derived from time
    and background tasks, so there is no event to wait on.
    """
    try:
        async with asyncio.timeout(timeout):
            while not predicate():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
    except TimeoutError:
        pytest.fail(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
async def make_cache() -> AsyncIterator[CacheFactory]:
    """Build caches with the test timings; every cache built is closed afterwards."""
    caches: list[Cache] = []

    def factory(redis_url: str, **overrides: object) -> Cache:
        options: dict[str, object] = {"timeout_s": TIMEOUT_S, "lease_s": LEASE_S}
        options.update(overrides)
        cache = Cache(redis_url, **options)  # type: ignore[arg-type]
        caches.append(cache)
        return cache

    yield factory
    for cache in caches:
        await cache.close()


@pytest.fixture(params=["memory", "redis"])
def backend_url(request: pytest.FixtureRequest) -> str:
    """Empty (memory only) or the URL of a private redis-server."""
    if request.param == "memory":
        return ""
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


def state_of(cache: Cache) -> str:
    # A call, not an attribute read: mypy would otherwise narrow ``cache.state``
    # to the first value asserted and reject checking it again after a change.
    return cache.state


class Recorder:
    """Collects what a subscriber is told."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.resyncs = 0

    def on_message(self, message: str) -> None:
        self.messages.append(message)

    def on_resync(self) -> None:
        self.resyncs += 1


async def started_subscriber(
    make_cache: CacheFactory, url: str, channel: str = "invalidate"
) -> tuple[Cache, Recorder]:
    cache = make_cache(url)
    recorder = Recorder()
    cache.subscribe(channel, recorder.on_message, recorder.on_resync)
    await cache.start()
    return cache, recorder


# -- counters, shared behaviour --------------------------------------------------


async def test_window_counts_and_resets(make_cache: CacheFactory, backend_url: str) -> None:
    cache = make_cache(backend_url)
    await cache.start()

    counts = [(await cache.hit("user:1", 1))[0] for _ in range(3)]
    assert counts == [1, 2, 3]
    assert (await cache.hit("user:2", 1))[0] == 1, "keys count independently"

    count, reset_in = await cache.hit("user:1", 1)
    assert count == 4
    assert 0 < reset_in <= 1.0
    # The window is time itself: wait it out (bounded by the 1 s window).
    await asyncio.sleep(reset_in + 0.02)
    count, reset_in = await cache.hit("user:1", 1)
    assert count == 1, "a new window starts from zero"
    assert 0.9 < reset_in <= 1.0, "the new window gets a full length"


async def test_expiry_is_set_on_first_hit_only(make_cache: CacheFactory, backend_url: str) -> None:
    cache = make_cache(backend_url)
    await cache.start()
    _, first_reset = await cache.hit("k", 5)
    await asyncio.sleep(0.05)
    _, later_reset = await cache.hit("k", 5)
    assert later_reset < first_reset, "later hits must not extend the window"


async def test_first_over_stops_at_the_first_counter_past_its_limit(
    make_cache: CacheFactory, backend_url: str
) -> None:
    cache = make_cache(backend_url)
    await cache.start()
    limits = [("user:1", 2), ("workspace:1", 5)]
    assert await cache.first_over(limits, 60) is None
    assert await cache.first_over(limits, 60) is None
    over = await cache.first_over(limits, 60)
    assert over is not None
    index, reset_s = over
    assert index == 0
    assert 59 < reset_s <= 60
    # The workspace's counter was not counted when the user's passed: twice, not three times.
    assert (await cache.hit("workspace:1", 60))[0] == 3
    # The workspace's own limit: its index when the user's is fine.
    over = await cache.first_over([("user:2", 10), ("workspace:1", 3)], 60)
    assert over is not None
    assert over[0] == 1


async def test_first_over_is_one_command_on_redis(
    make_cache: CacheFactory, redis_server: RedisServer
) -> None:
    cache = make_cache(redis_server.url)
    await cache.start()
    limits = [("user:1", 10), ("workspace:1", 10), ("apikey:1", 10)]
    await cache.first_over(limits, 60)  # the script is compiled and cached by Redis now

    async def commands() -> dict[str, int]:
        stats = await admin.info("commandstats")
        return {name: int(stat["calls"]) for name, stat in stats.items()}

    admin = Redis.from_url(redis_server.url)
    try:
        before = await commands()
        await cache.first_over(limits, 60)
        after = await commands()
    finally:
        await admin.aclose()
    sent = {name: after[name] - before.get(name, 0) for name in after}
    # One EVAL from the cache (and the INFO asking); the three counters' commands run
    # inside the script, not as round trips of their own (no MULTI per counter).
    assert sent.get("cmdstat_eval") == 1
    assert sent.get("cmdstat_multi", 0) == 0
    assert sent.get("cmdstat_incr") == 3
    assert [(await cache.hit(key, 60))[0] for key, _ in limits] == [3, 3, 3]


async def test_clear_resets_the_window(make_cache: CacheFactory, backend_url: str) -> None:
    cache = make_cache(backend_url)
    await cache.start()
    await cache.hit("k", 60)
    await cache.hit("k", 60)
    await cache.clear("k")
    assert (await cache.hit("k", 60))[0] == 1
    await cache.clear("never-seen")  # clearing an absent key is fine


async def test_state_reports_the_backend(make_cache: CacheFactory, backend_url: str) -> None:
    cache = make_cache(backend_url)
    await cache.start()
    assert cache.state == ("memory" if not backend_url else "ok")


# -- memory mode -------------------------------------------------------------------


async def test_memory_fallback_is_bounded(make_cache: CacheFactory) -> None:
    cache = make_cache("", max_memory_entries=3)
    await cache.start()
    for key in ("a", "b", "c", "d"):  # "d" does not fit: the oldest ("a") goes
        await cache.hit(key, 60)
    for key in ("d", "c", "b"):
        assert (await cache.hit(key, 60))[0] == 2, f"{key} should have been kept"
    assert (await cache.hit("a", 60))[0] == 1, "the oldest window was evicted"


async def test_memory_mode_is_always_fresh_and_publishes_locally(
    make_cache: CacheFactory,
) -> None:
    cache, recorder = await started_subscriber(make_cache, "")
    assert cache.fresh()
    await cache.publish("invalidate", "session:1")
    assert recorder.messages == ["session:1"], "delivered synchronously"
    await cache.publish("other-channel", "ignored")
    assert recorder.messages == ["session:1"]
    assert cache.fresh()


# -- Redis failures ------------------------------------------------------------------


async def test_pause_falls_back_without_hanging_then_recovers(
    make_cache: CacheFactory, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=CACHE_LOGGER)
    cache = make_cache(redis_server.url)
    await cache.start()
    assert (await cache.hit("k", 60))[0] == 1
    assert state_of(cache) == "ok"

    redis_server.pause()
    # The first call pays at most one timeout; "does not hang", not a benchmark.
    async with asyncio.timeout(TIMEOUT_S * 4):
        count, _ = await cache.hit("k", 60)
    assert count == 1, "served by the in-memory fallback"
    assert cache.state == "degraded"
    # Known down: later calls do not wait on Redis at all.
    async with asyncio.timeout(TIMEOUT_S / 2):
        for expected in (2, 3):
            assert (await cache.hit("k", 60))[0] == expected

    redis_server.resume()
    await wait_until(lambda: cache.state == "ok", CALL_DEADLINE_S, "recovery after SIGCONT")
    # Back on Redis, which kept its count (memory would say 4). The hit that timed
    # out was already written to the paused server's socket and may have been
    # executed on SIGCONT: a timeout does not mean "not done".
    assert (await cache.hit("k", 60))[0] in (2, 3)

    records = [r for r in caplog.records if r.name == CACHE_LOGGER]
    assert [r.levelno for r in records] == [logging.WARNING, logging.INFO]


async def test_kill_and_restart_recovers_and_resyncs(
    make_cache: CacheFactory, redis_server: RedisServer
) -> None:
    cache, recorder = await started_subscriber(make_cache, redis_server.url)
    await wait_until(cache.fresh, CALL_DEADLINE_S, "first confirmation")
    assert recorder.resyncs == 1, "the first subscription resyncs too"
    await cache.hit("k", 60)

    redis_server.kill()
    # A fresh key: "k" may already have a memory count if the hit above timed
    # out on a busy machine and was served from memory.
    async with asyncio.timeout(TIMEOUT_S * 4):
        assert (await cache.hit("after-kill", 60))[0] == 1
    assert cache.state == "degraded"
    # The socket was reset: freshness is withdrawn at once, not at lease end.
    await wait_until(lambda: not cache.fresh(), LEASE_S, "freshness withdrawn")

    redis_server.restart()
    await wait_until(lambda: cache.state == "ok", CALL_DEADLINE_S, "recovery after restart")
    await wait_until(cache.fresh, CALL_DEADLINE_S, "resubscription")
    assert recorder.resyncs == 2, "reconnecting resyncs exactly once"
    assert (await cache.hit("k", 60))[0] == 1, "the restarted server starts empty"


async def test_url_options_cannot_loosen_the_bounds(
    make_cache: CacheFactory, redis_server: RedisServer
) -> None:
    url = f"{redis_server.url}?socket_timeout=30&protocol=3&decode_responses=false"
    cache, recorder = await started_subscriber(make_cache, url)
    await wait_until(cache.fresh, CALL_DEADLINE_S, "subscription despite ?protocol=3")
    await cache.publish("invalidate", "x")
    await wait_until(lambda: recorder.messages.count("x") == 2, CALL_DEADLINE_S, "local + echo")

    redis_server.pause()
    async with asyncio.timeout(TIMEOUT_S * 4):
        assert (await cache.hit("k", 60))[0] == 1
    assert state_of(cache) == "degraded"


async def test_unreachable_at_start_degrades_and_never_logs_the_password(
    make_cache: CacheFactory, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=CACHE_LOGGER)
    # The test server has no user "alice", so AUTH fails: Redis is unusable.
    cache = make_cache(f"redis://alice:hunter2@127.0.0.1:{redis_server.port}/0")
    async with asyncio.timeout(TIMEOUT_S * 4):
        await cache.start()
    assert cache.state == "degraded"
    assert (await cache.hit("k", 60))[0] == 1
    assert any(r.levelno == logging.WARNING for r in caplog.records)
    logged = caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    assert "hunter2" not in logged


# -- invalidation and leases ------------------------------------------------------------


async def test_publish_reaches_the_other_process(
    make_cache: CacheFactory, redis_server: RedisServer
) -> None:
    a, a_seen = await started_subscriber(make_cache, redis_server.url)
    b, b_seen = await started_subscriber(make_cache, redis_server.url)
    await wait_until(lambda: a.fresh() and b.fresh(), CALL_DEADLINE_S, "both subscribed")

    await a.publish("invalidate", "session:7")
    assert "session:7" in a_seen.messages, "local subscribers do not wait for the echo"
    await wait_until(lambda: "session:7" in b_seen.messages, CALL_DEADLINE_S, "delivery to B")
    assert b.fresh()


async def test_pause_lapses_the_lease_silently(
    make_cache: CacheFactory, redis_server: RedisServer
) -> None:
    cache, recorder = await started_subscriber(make_cache, redis_server.url)
    await wait_until(cache.fresh, CALL_DEADLINE_S, "first confirmation")

    redis_server.pause()
    paused_at = time.monotonic()
    await wait_until(lambda: not cache.fresh(), LEASE_S + SLACK_S, "the lease to lapse")
    assert time.monotonic() - paused_at <= LEASE_S + SLACK_S

    redis_server.resume()
    await wait_until(cache.fresh, CALL_DEADLINE_S, "freshness after SIGCONT")
    assert recorder.resyncs == 2, "regaining freshness after a lapse resyncs"


async def test_failed_publish_returns_only_after_other_leases_lapsed(
    make_cache: CacheFactory, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=CACHE_LOGGER)
    a, a_seen = await started_subscriber(make_cache, redis_server.url)
    b, _ = await started_subscriber(make_cache, redis_server.url)
    await wait_until(lambda: a.fresh() and b.fresh(), CALL_DEADLINE_S, "both subscribed")

    redis_server.pause()
    # Right after the pause B is typically still fresh; publish must not return
    # before that has changed. Bounded by timeout + lease (+ margin and slack).
    async with asyncio.timeout(TIMEOUT_S + LEASE_S + SLACK_S + 0.1):
        await a.publish("invalidate", "session:9")
    assert not b.fresh(), "B must have stopped trusting its cache before publish returns"
    assert a_seen.messages == ["session:9"]
    assert any("publish failed" in r.getMessage() for r in caplog.records)


async def test_publish_while_known_down_still_waits_for_leases(
    make_cache: CacheFactory, redis_server: RedisServer
) -> None:
    a, _ = await started_subscriber(make_cache, redis_server.url)
    b, _ = await started_subscriber(make_cache, redis_server.url)
    await wait_until(lambda: a.fresh() and b.fresh(), CALL_DEADLINE_S, "both subscribed")

    redis_server.pause()
    await a.hit("k", 60)
    assert a.state == "degraded"
    async with asyncio.timeout(TIMEOUT_S + LEASE_S + SLACK_S + 0.1):
        await a.publish("invalidate", "session:10")
    assert not b.fresh()


async def test_publish_lost_during_a_short_stall_is_retried(
    make_cache: CacheFactory, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=CACHE_LOGGER)
    a, _ = await started_subscriber(make_cache, redis_server.url)
    b, b_seen = await started_subscriber(make_cache, redis_server.url)
    await wait_until(lambda: a.fresh() and b.fresh(), CALL_DEADLINE_S, "both subscribed")

    redis_server.pause()
    # The failed hit drops A's pooled connection, so the PUBLISH needs a new one,
    # whose handshake stalls: the PUBLISH itself never reaches Redis.
    await a.hit("k", 60)
    publishing = asyncio.create_task(a.publish("invalidate", "session:11"))
    await wait_until(
        lambda: any("publish failed" in r.getMessage() for r in caplog.records),
        CALL_DEADLINE_S,
        "the first PUBLISH to fail",
    )
    # Resume before B's lease can lapse: B never resyncs, so only a retry helps.
    redis_server.resume()
    async with asyncio.timeout(TIMEOUT_S + LEASE_S + SLACK_S + 0.1):
        await publishing
    await wait_until(
        lambda: "session:11" in b_seen.messages, CALL_DEADLINE_S, "the retried PUBLISH"
    )


async def test_publish_requires_a_started_cache(
    make_cache: CacheFactory, redis_server: RedisServer
) -> None:
    cache = make_cache(redis_server.url)
    with pytest.raises(RuntimeError):
        await cache.publish("invalidate", "x")


async def test_subscribe_after_start_is_refused(make_cache: CacheFactory) -> None:
    cache = make_cache("")
    await cache.start()
    with pytest.raises(RuntimeError):
        cache.subscribe("invalidate", lambda _message: None, lambda: None)


# -- Redis Cluster names ---------------------------------------------------------------


def test_hash_tags_follow_redis_clusters_rule() -> None:
    assert hash_tag("switchboard:events") == "{switchboard:events}"
    assert hash_tag("{app}:events") == "{app}:events", "a name with a tag keeps it"
    # "{}" is no tag (Redis hashes the whole key): the name is wrapped.
    assert hash_tag("a{}b") == "{a{}b}"
    assert is_cluster("redis+cluster://node:6379")
    assert is_cluster("rediss+cluster://node:6380")
    assert not is_cluster("redis://node:6379/0")
