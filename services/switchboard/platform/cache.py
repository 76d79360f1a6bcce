"""The cache layer: Redis when configured, an in-memory fallback always.

Two jobs live here.

**Counters for the rate limiter** (``hit``/``clear``). Redis is an optimisation
shared by all processes; when it is slow or gone, each process counts in its own
bounded memory instead. A failure must never stall a request: every command is
bounded by ``timeout_s`` (an ``asyncio.timeout`` *and* the client's socket
timeouts, with redis-py's retries switched off), and after one failure the cache
marks itself down and serves from memory without touching Redis until a
background PING succeeds.

**Cross-process invalidation with a liveness lease** (``subscribe``/``publish``/
``fresh``). Processes cache security decisions (for example "this session is not
revoked") and drop them when another process publishes an invalidation. Redis
pub/sub is fire-and-forget, so the protocol makes silence safe:

* The subscriber owns one dedicated connection. Every ``lease_s / 4`` it sends
  ``PING <token>`` *on that connection* and remembers when it sent it. Redis
  answers a ping in order with the messages it delivers on that connection, so
  when the pong arrives every message Redis processed before the ping has been
  handed to ``on_message``. ``last_confirmed`` becomes the ping's send time.
* ``fresh()`` is True only while ``now - last_confirmed < lease_s``. A consumer
  may trust its cache only while fresh; otherwise it asks the database.
* Freshness is only ever (re)gained through ``on_resync()``: on every
  (re)connection, and whenever a pong arrives after freshness had lapsed, the
  consumers drop their caches first. Messages may have been lost in either case
  (a publish that failed while we were not listening), and a consumer that
  merely stopped trusting its cache while unfresh would otherwise trust its
  stale entries again once pongs resume (SIGSTOP then SIGCONT keeps the socket).
* A publisher whose PUBLISH fails does not raise: it retries the PUBLISH
  every ``lease_s / 4`` until Redis accepts it or until ``lease_s`` (plus a
  margin) has passed since it observed the failure. A subscriber still fresh
  by then got a pong for a ping Redis processed after that moment: Redis was
  serving again, so the subscriber either lapsed meanwhile (and resyncs before
  trusting its cache) or stayed connected while a retry could get through.
  Every other subscriber has stopped trusting its cache. So when ``publish``
  returns, no process keeps serving the invalidated entry from cache.

The guarantee assumes the outage is Redis's (every client loses it together). A
partition that cuts off only the publisher while subscribers still reach Redis
cannot be detected by the subscribers; consumers should bound their cache entry
lifetime as well.

This module never imports grpc; ``state`` feeds health and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis, RedisCluster
from redis.asyncio.connection import AbstractConnection, SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from switchboard.platform.background import FailureNotes, cancel_all

logger = logging.getLogger(__name__)

CacheState = Literal["memory", "ok", "degraded"]

_T = TypeVar("_T")

#: What a Redis failure looks like from here: a client error (a cluster's own too:
#: no node reachable, a slot not covered), a socket error, or our own
#: ``asyncio.timeout`` firing.
_REDIS_FAILURES: Final = (RedisError, RedisClusterException, OSError, TimeoutError)

#: Enough for many concurrent requests; beyond it callers wait (bounded by
#: ``timeout_s``) instead of opening unbounded sockets during a load spike.
DEFAULT_MAX_CONNECTIONS: Final = 32

#: Safety margin on the publisher's lease wait, as a fraction of the lease,
#: plus a floor. It absorbs scheduling jitter and the uncertainty of exactly
#: when Redis stopped answering relative to our failed command.
_LEASE_MARGIN_FRACTION: Final = 0.1
_LEASE_MARGIN_FLOOR_S: Final = 0.01
#: On a Redis Cluster every invalidation channel carries this hash tag: one slot,
#: so one SSUBSCRIBE on one master covers them all.
_CLUSTER_CHANNEL_TAG: Final = "{switchboard:invalidation}"


class _Failed(enum.Enum):
    """Marks a Redis operation that failed (its result may legitimately be None)."""

    FAILED = enum.auto()


@dataclass(frozen=True)
class _Subscription:
    channel: str
    on_message: Callable[[str], None]
    on_resync: Callable[[], None]


class _Window:
    __slots__ = ("count", "expires_at")

    def __init__(self, expires_at: float) -> None:
        self.count = 0
        self.expires_at = expires_at


class _MemoryCounters:
    """Fixed-window counters in a bounded dict, for one process.

    Windows are kept in creation order (a window that expires is re-created at
    the end), so the front holds the oldest window, which for the usual single
    window length per key space is also the first to expire. When full, the
    front is evicted: normally an expired window, and under a flood of distinct
    keys the oldest live one, because memory must stay bounded.
    """

    def __init__(self, max_entries: int) -> None:
        self._max_entries = max_entries
        self._windows: OrderedDict[str, _Window] = OrderedDict()

    def hit(self, key: str, window_s: int, now: float) -> tuple[int, float]:
        window = self._windows.get(key)
        if window is None or window.expires_at <= now:
            if window is not None:
                del self._windows[key]
            while len(self._windows) >= self._max_entries:
                self._windows.popitem(last=False)
            window = _Window(now + window_s)
            self._windows[key] = window
        window.count += 1
        return window.count, window.expires_at - now

    def clear(self, key: str) -> None:
        self._windows.pop(key, None)


#: A cluster client's connections per node, as a multiple of one Redis's pool bound.
_CLUSTER_CONNECTIONS_FACTOR: Final = 8

#: A client of either shape: one Redis, or a Redis Cluster (``redis+cluster://``).
AnyRedis = Redis | RedisCluster

#: URL schemes that name a Redis Cluster (any one node: the client learns the rest).
CLUSTER_SCHEMES: Final = ("redis+cluster", "rediss+cluster")


def is_cluster(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster rather than one Redis."""
    return urlsplit(url).scheme in CLUSTER_SCHEMES


def hash_tag(name: str) -> str:
    """``name`` as a Redis Cluster hash tag: ``{name}``, unless it already holds one.

    Keys that share a tag share a slot, so one script, transaction or pipeline may
    touch them all; on one Redis the braces are only characters of the name.
    """
    # Redis's rule: the first "{" and the first "}" after it, with something between.
    start = name.find("{")
    if start >= 0 and name.find("}", start + 1) > start + 1:
        return name
    return "{" + name + "}"


def _url_options(url: str, forced: dict[str, Any]) -> dict[str, Any]:
    """Connection settings from ``url``, with ``forced`` taking precedence.

    ``from_url`` lets query parameters (``?socket_timeout=30``, ``?protocol=3``)
    override keyword arguments; the bounds and reply shapes this module relies
    on must not be negotiable from a config string, so the URL is parsed here
    (exactly as ``from_url`` does) and our settings are applied last. A cluster
    URL is read as the plain URL of its seed node.
    """
    if is_cluster(url):
        url = url.replace("+cluster", "", 1)
    options: dict[str, Any] = dict(parse_url(url))
    options.update(forced)
    return options


def bounded_options(
    url: str, *, timeout_s: float, socket_timeout_s: float | None = None, **extra: Any
) -> dict[str, Any]:
    """Connection settings from ``url`` with every command bounded, ``extra`` on top.

    ``retry=Retry(NoBackoff(), 0)``: redis-py 6+ retries 10 times with backoff
    by default, which would multiply every bound. ``socket_timeout_s`` is for
    connections that block server-side (``XREAD BLOCK``) longer than a command.
    """
    forced: dict[str, Any] = {
        "socket_timeout": timeout_s if socket_timeout_s is None else socket_timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
        **extra,
    }
    return _url_options(url, forced)


def cluster_client(options: dict[str, Any], *, max_connections: int) -> RedisCluster:
    """A cluster client from ``bounded_options``: it learns the nodes from the seed in
    ``options``, and holds at most 8 x ``max_connections`` to each node.

    With retries off, a command to a master that died fails at once; the client
    then asks the cluster for its slots again on the next command, so a promoted
    replica is found by the caller's own retry, not behind its back.
    """
    # RESP2: replies of the shapes one Redis gives here, and no maintenance push
    # notifications (RESP3 only), which a subscriber's own connection cannot take.
    options = {**options, "protocol": 2}
    options.pop("db", None)  # a cluster has only database 0 (checked in the settings)
    if options.pop("connection_class", None) is SSLConnection:
        options["ssl"] = True  # rediss+cluster://: the cluster client's own TLS switch
    return RedisCluster(
        **options,
        # A cluster node's pool does not wait for a free connection: past its bound a
        # command fails (MaxConnectionsError), which would count as Redis failing. So
        # the bound is set where a burst does not reach it, not where callers queue.
        max_connections=max_connections * _CLUSTER_CONNECTIONS_FACTOR,
        dynamic_startup_nodes=True,
    )


def pooled_client(
    url: str, *, timeout_s: float, max_connections: int, decode_responses: bool
) -> AnyRedis:
    """A bounded client whose callers wait (up to ``timeout_s``) for a free connection."""
    options = bounded_options(url, timeout_s=timeout_s, decode_responses=decode_responses)
    if is_cluster(url):
        return cluster_client(options, max_connections=max_connections)
    pool = BlockingConnectionPool(max_connections=max_connections, timeout=timeout_s, **options)
    return Redis.from_pool(pool)


def binary_client(
    url: str, *, timeout_s: float, max_connections: int, socket_timeout_s: float | None = None
) -> AnyRedis:
    """A bounded client for binary payloads (stream entries): bytes replies over RESP2."""
    options = bounded_options(
        url,
        timeout_s=timeout_s,
        socket_timeout_s=socket_timeout_s,
        decode_responses=False,
        protocol=2,
    )
    if is_cluster(url):
        return cluster_client(options, max_connections=max_connections)
    return Redis(**options, max_connections=max_connections)


def redacted_url(url: str) -> str:
    """The URL without credentials, for logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port is not None else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class Cache:
    """Redis-backed cache with an automatic in-memory fallback; see the module docstring.

    ``redis_url`` empty means memory only (one process). ``timeout_s`` bounds
    every Redis command; ``lease_s`` is the invalidation lease (and sets the
    probe and ping cadence, ``lease_s / 4``).
    """

    def __init__(
        self,
        redis_url: str,
        timeout_s: float,
        lease_s: float,
        max_memory_entries: int = 100_000,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        if timeout_s <= 0 or lease_s <= 0:
            raise ValueError("timeout_s and lease_s must be positive")
        if max_memory_entries < 1:
            raise ValueError("max_memory_entries must be at least 1")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._url = redis_url
        self._target = redacted_url(redis_url) if redis_url else "memory"
        self._timeout_s = timeout_s
        self._lease_s = lease_s
        self._interval_s = lease_s / 4
        self._lease_margin_s = max(_LEASE_MARGIN_FLOOR_S, lease_s * _LEASE_MARGIN_FRACTION)
        self._max_connections = max_connections
        self._memory = _MemoryCounters(max_memory_entries)
        self._subscriptions: dict[str, list[_Subscription]] = {}

        self._client: AnyRedis | None = None
        self._cluster = bool(redis_url) and is_cluster(redis_url)
        self._sub_pool: ConnectionPool | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._closed = False

        # Command path: None while Redis answers; else when the outage was noticed.
        self._down_since: float | None = None
        # Subscription: send time of the newest ping whose pong arrived on a
        # connection that has been resynchronised; -inf means "not fresh".
        self._last_confirmed = -math.inf
        self._subscription_lost = False
        self._ping_tokens = itertools.count()

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Connect (if configured) and start the probe and subscriber tasks.

        An unreachable Redis does not fail start-up: the cache starts degraded
        and recovers on its own.
        """
        if self._started:
            raise RuntimeError("Cache.start() called twice")
        self._started = True
        if not self._url:
            return
        options = bounded_options(self._url, timeout_s=self._timeout_s, decode_responses=True)
        self._client = pooled_client(
            self._url,
            timeout_s=self._timeout_s,
            max_connections=self._max_connections,
            decode_responses=True,
        )
        if self._subscriptions and not self._cluster:
            # Only used to turn the URL into connection settings: the subscriber
            # makes and owns its connections. RESP2 keeps pub/sub replies plain
            # arrays whatever the URL asks for.
            self._sub_pool = ConnectionPool(max_connections=1, **{**options, "protocol": 2})
        await self._probe()
        self._tasks.append(asyncio.create_task(self._probe_loop(), name="cache-probe"))
        if self._subscriptions:
            self._tasks.append(
                asyncio.create_task(self._subscriber_loop(), name="cache-subscriber")
            )

    async def close(self) -> None:
        """Stop background tasks and close connections; bounded even if Redis hangs."""
        if self._closed:
            return
        self._closed = True
        # The loops also stop on ``_closed``: a cancel may be swallowed (cancel_all).
        tasks = list(self._tasks)
        self._tasks.clear()
        await cancel_all(tasks, every_s=self._interval_s)
        self._last_confirmed = -math.inf
        if self._client is not None:
            # Closing sockets needs no answer from Redis, but bound it anyway.
            with contextlib.suppress(*_REDIS_FAILURES):
                async with asyncio.timeout(self._timeout_s):
                    await self._client.aclose()
        if self._sub_pool is not None:
            with contextlib.suppress(*_REDIS_FAILURES):
                async with asyncio.timeout(self._timeout_s):
                    await self._sub_pool.aclose()

    @property
    def state(self) -> CacheState:
        """``memory`` (no Redis configured), ``ok``, or ``degraded`` (serving from memory)."""
        if not self._url:
            return "memory"
        return "degraded" if self._down_since is not None else "ok"

    # -- counters ----------------------------------------------------------------

    async def hit(self, key: str, window_s: int) -> tuple[int, float]:
        """Count one event in the fixed window for ``key``.

        Returns the count in the current window (this hit included) and the
        seconds until the window resets. Never raises for Redis trouble.
        """
        if window_s < 1:
            raise ValueError("window_s must be at least 1")
        client = self._usable_client()
        if client is not None:
            result = await self._bounded(client, lambda c: _redis_hit(c, key, window_s))
            if result is not _Failed.FAILED:
                return result
        return self._memory.hit(key, window_s, time.monotonic())

    async def first_over(
        self, limits: Sequence[tuple[str, int]], window_s: int
    ) -> tuple[int, float] | None:
        """Count one event in the fixed window of each ``(key, limit)``, in order,
        stopping at the first whose count passes its limit: that one's index and the
        seconds until its window resets, or None when none passed.

        A counter after the one that passed is not counted, so one member over their
        own limit does not use up the workspace's. On one Redis it is one round trip
        (a script), where a hit per counter was one each; on a Redis Cluster the
        counters live in different slots, so each is its own ``hit``. Never raises for
        Redis trouble.
        """
        if window_s < 1:
            raise ValueError("window_s must be at least 1")
        client = self._usable_client()
        if client is not None and not isinstance(client, RedisCluster):
            result = await self._bounded(
                client, lambda c: _redis_first_over(c, limits, window_s * 1000)
            )
            if result is not _Failed.FAILED:
                return result
        for index, (key, limit) in enumerate(limits):
            count, reset_s = await self.hit(key, window_s)
            if count > limit:
                return index, reset_s
        return None

    async def clear(self, key: str) -> None:
        """Forget ``key``'s window, in Redis (if reachable) and in memory."""
        # Memory is cleared too: a count taken during an outage must not
        # survive an explicit reset.
        self._memory.clear(key)
        client = self._usable_client()
        if client is not None:
            await self._bounded(client, lambda c: _redis_delete(c, key))

    # -- invalidation --------------------------------------------------------------

    def subscribe(
        self,
        channel: str,
        on_message: Callable[[str], None],
        on_resync: Callable[[], None],
    ) -> None:
        """Register callbacks for ``channel``; call before ``start()``.

        ``on_message`` gets every message published on the channel (possibly
        twice for our own publishes: once directly, once echoed by Redis), so it
        must be idempotent. ``on_resync`` must drop everything the consumer
        cached: it runs whenever messages may have been missed, always before
        ``fresh()`` turns True again. Both run on the event loop and must not
        block.
        """
        if self._started:
            raise RuntimeError("subscribe() must be called before start()")
        self._subscriptions.setdefault(channel, []).append(
            _Subscription(channel, on_message, on_resync)
        )

    def fresh(self) -> bool:
        """True iff every invalidation Redis processed up to ``lease_s`` ago was delivered.

        Always True in memory mode (publishes are delivered synchronously);
        in Redis mode False until the subscription is confirmed, and False
        without subscriptions (there is nothing to be fresh about).
        """
        if not self._url:
            return True
        return time.monotonic() - self._last_confirmed < self._lease_s

    async def publish(self, channel: str, message: str) -> None:
        """Deliver ``message`` to every subscriber of ``channel`` in every process.

        Local subscribers get it synchronously first. If Redis cannot take the
        PUBLISH, this does not raise: it returns once Redis accepts a retry, or
        else once every other process's lease has lapsed (at most ``timeout_s +
        lease_s`` plus a small margin), so none of them trusts its cache any
        more. Cancelling the call forfeits that guarantee.
        """
        if self._url and (self._client is None or self._closed):
            # Delivering only locally would silently skip every other process.
            raise RuntimeError("Cache.publish() needs a started, open cache")
        self._deliver_locally(channel, message)
        client = self._client
        if client is None:
            return

        wire = self._wire(channel)

        def send(c: AnyRedis) -> Awaitable[None]:
            return _redis_publish(c, wire, message)

        # PUBLISH is attempted even when the cache is known to be down: the
        # probe may lag a recovery by up to lease_s / 4, and a subscriber whose
        # lease never lapsed would otherwise miss this message for good.
        if await self._bounded(client, send) is not _Failed.FAILED:
            return
        # Redis stopped answering at or before this moment, so a subscriber
        # that is still fresh lease_s later has had a ping answered after it:
        # Redis was serving again, and the subscriber either lapsed (and
        # resyncs before trusting its cache) or stayed connected. The retries
        # below cover that second case: a PUBLISH that never reached Redis
        # (say its connection was still being set up) is sent again once Redis
        # answers, instead of being lost for a subscriber that never lapsed.
        deadline = time.monotonic() + self._lease_s + self._lease_margin_s
        logger.warning(
            "cache publish failed; retrying until other processes' invalidation leases lapse",
            extra={
                "channel": channel,
                "wait_s": round(deadline - time.monotonic(), 3),
                "redis": self._target,
            },
        )
        while (remaining := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(self._interval_s, remaining))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # Each retry is cut to the time left, so the total stays bounded.
            retry_timeout_s = min(self._timeout_s, remaining)
            if await self._bounded(client, send, retry_timeout_s) is not _Failed.FAILED:
                logger.info(
                    "cache publish delivered on retry",
                    extra={"channel": channel, "redis": self._target},
                )
                return

    # -- internals: command path ---------------------------------------------------

    def _wire(self, channel: str) -> str:
        """The channel's name in Redis: on a cluster, every channel under one hash tag,
        so one sharded subscription on one master hears them all."""
        return f"{_CLUSTER_CHANNEL_TAG}:{channel}" if self._cluster else channel

    def _usable_client(self) -> AnyRedis | None:
        # Known down: serve from memory without waiting on Redis at all.
        if self._down_since is not None:
            return None
        return self._client

    async def _bounded(
        self,
        client: AnyRedis,
        operation: Callable[[AnyRedis], Awaitable[_T]],
        timeout_s: float | None = None,
    ) -> _T | Literal[_Failed.FAILED]:
        """Run one Redis operation under ``timeout_s``; ``FAILED`` (and marked down) if it fails."""
        try:
            async with asyncio.timeout(self._timeout_s if timeout_s is None else timeout_s):
                result = await operation(client)
        except _REDIS_FAILURES as exc:
            self._mark_down(exc)
            return _Failed.FAILED
        self._mark_up()
        return result

    def _mark_down(self, exc: BaseException) -> None:
        if self._down_since is not None:
            return
        self._down_since = time.monotonic()
        logger.warning(
            "cache degraded: Redis unreachable, serving from memory",
            extra={"redis": self._target, "error": f"{type(exc).__name__}: {exc}"},
        )

    def _mark_up(self) -> None:
        if self._down_since is None:
            return
        outage_s = time.monotonic() - self._down_since
        self._down_since = None
        logger.info(
            "cache recovered: Redis reachable again",
            extra={"redis": self._target, "outage_s": round(outage_s, 3)},
        )

    async def _probe(self) -> None:
        client = self._client
        if client is not None:
            await self._bounded(client, _redis_ping)

    async def _probe_loop(self) -> None:
        failures = FailureNotes(logger)
        while not self._closed:
            await asyncio.sleep(self._interval_s)
            if self._down_since is not None:
                # Redis's own failures mark it down in _probe; anything else must not
                # end the loop, or the cache would stay degraded for good.
                try:
                    await self._probe()
                except Exception as exc:  # noqa: BLE001 - the next round tries again
                    failures.failed("cache probe failed unexpectedly", exc)
                else:
                    failures.succeeded()

    # -- internals: subscription ---------------------------------------------------

    def _deliver_locally(self, channel: str, message: str) -> None:
        for subscription in self._subscriptions.get(channel, ()):
            try:
                subscription.on_message(message)
            except Exception:
                # The invalidation may not have been applied: make this consumer
                # drop everything instead. If that fails too, the caller must know.
                logger.exception("cache subscriber failed on a local message")
                self._last_confirmed = -math.inf
                subscription.on_resync()

    async def _subscriber_loop(self) -> None:
        while not self._closed:
            try:
                await self._subscriber_session()
            except (*_REDIS_FAILURES, _Unresponsive) as exc:
                if not self._subscription_lost and not self._closed:
                    self._subscription_lost = True
                    logger.warning(
                        "cache subscription lost; reconnecting",
                        extra={"redis": self._target, "error": f"{type(exc).__name__}: {exc}"},
                    )
            except Exception:
                # A bug must not end the subscription for good (freshness would
                # stay False forever, silently): log it and reconnect.
                self._subscription_lost = True
                logger.exception("cache subscription failed unexpectedly; reconnecting")
            # Whatever happened, this connection's confirmations are void.
            self._last_confirmed = -math.inf
            await asyncio.sleep(self._interval_s)

    async def _subscriber_connection(self) -> AbstractConnection:
        """A new connection each session, never one from a pool: it must not be shared
        or silently re-opened, and its pongs vouch only for itself.

        On a cluster it goes to the master that owns the channels' slot, asked of the
        cluster anew each time (after a failover it is the promoted replica): a pong
        there follows every SPUBLISH that master took before the ping, which is what
        the lease needs. A plain PUBLISH crosses the cluster bus to other nodes after
        it is acknowledged, so a pong on one node would vouch for nothing published
        on another.
        """
        client = self._client
        if isinstance(client, RedisCluster):
            async with asyncio.timeout(self._timeout_s):
                await client.nodes_manager.initialize()
            node = client.get_node_from_key(self._wire(next(iter(self._subscriptions))))
            if node is None:
                raise _Unresponsive("no master owns the invalidation channels' slot")
            return node.connection_class(**{**node.connection_kwargs, "protocol": 2})
        pool = self._sub_pool
        if pool is None:
            raise RuntimeError("the cache subscribes only after start()")
        return pool.connection_class(**pool.connection_kwargs)

    async def _subscriber_session(self) -> None:
        pending: deque[tuple[str, float]] = deque()
        reader: asyncio.Task[None] | None = None
        connection = await self._subscriber_connection()
        subscribe = "SSUBSCRIBE" if self._cluster else "SUBSCRIBE"
        try:
            async with asyncio.timeout(self._timeout_s):
                await connection.connect()  # type: ignore[no-untyped-call]  # unannotated upstream
                await connection.send_command(
                    subscribe, *map(self._wire, self._subscriptions), check_health=False
                )
            # No need to wait for the subscribe confirmations: the first pong
            # follows them on this connection, and only a pong confers freshness.
            reader = asyncio.create_task(self._read_loop(connection, pending))
            # Its outcome is consumed by the ping loop or deliberately dropped
            # here; never leave "exception was never retrieved" noise.
            reader.add_done_callback(_consume_outcome)
            await self._ping_loop(connection, pending, reader)
        finally:
            try:
                if reader is not None:
                    reader.cancel()
                    # asyncio.wait, not ``await reader``: the reader's own
                    # CancelledError must not be confused with (and must not
                    # swallow) a cancellation of this task.
                    await asyncio.wait([reader])
            finally:
                with contextlib.suppress(*_REDIS_FAILURES):
                    await connection.disconnect(nowait=True)

    async def _ping_loop(
        self,
        connection: AbstractConnection,
        pending: deque[tuple[str, float]],
        reader: asyncio.Task[None],
    ) -> None:
        while not reader.done() and not self._closed:
            now = time.monotonic()
            if pending and now - pending[0][1] >= self._lease_s:
                # Open socket, no answers (a paused or partitioned server). The
                # lease has already lapsed, so dropping the connection costs
                # nothing and guards against a peer that is gone for good.
                raise _Unresponsive(f"no pong for {now - pending[0][1]:.3f}s")
            if not connection.is_connected:
                # Never let send_command reconnect behind our back: a silently
                # re-opened connection would not be subscribed.
                break
            token = f"lease-{next(self._ping_tokens)}"
            # The send time is taken before the bytes leave, so it can only
            # under-state how recent the confirmation is.
            pending.append((token, now))
            async with asyncio.timeout(self._timeout_s):
                await connection.send_command("PING", token, check_health=False)
            await asyncio.wait([reader], timeout=self._interval_s)
        if self._closed:
            return
        if reader.done():
            reader.result()  # re-raise the reader's error, if any
        raise _Unresponsive("subscription connection closed")

    async def _read_loop(
        self, connection: AbstractConnection, pending: deque[tuple[str, float]]
    ) -> None:
        while True:
            # math.inf: block without the socket timeout; liveness is the
            # ping loop's job.
            response = await connection.read_response(timeout=math.inf)
            if not isinstance(response, list) or not response:
                continue
            kind = response[0]
            if kind in ("message", "smessage") and len(response) == 3:
                self._deliver_remote(self._unwire(str(response[1])), str(response[2]))
            elif kind == "pong" and len(response) == 2:
                self._confirm(str(response[1]), pending)

    def _unwire(self, wire: str) -> str:
        return wire.removeprefix(f"{_CLUSTER_CHANNEL_TAG}:") if self._cluster else wire

    def _deliver_remote(self, channel: str, message: str) -> None:
        for subscription in self._subscriptions.get(channel, ()):
            try:
                subscription.on_message(message)
            except Exception:
                # The invalidation may not have been applied. Revoke freshness;
                # the next pong then resynchronises every consumer.
                logger.exception("cache subscriber failed on a message")
                self._last_confirmed = -math.inf

    def _confirm(self, token: str, pending: deque[tuple[str, float]]) -> None:
        sent_at: float | None = None
        while pending:
            pending_token, pending_sent_at = pending.popleft()
            if pending_token == token:
                sent_at = pending_sent_at
                break
        if sent_at is None:
            return
        if time.monotonic() - self._last_confirmed >= self._lease_s:
            # Freshness had lapsed (or this connection is new): messages may
            # have been lost, so consumers drop their caches before anyone is
            # told to trust them again.
            if not self._resync_all():
                return
            if self._subscription_lost:
                self._subscription_lost = False
                logger.info("cache subscription re-established", extra={"redis": self._target})
        self._last_confirmed = max(self._last_confirmed, sent_at)

    def _resync_all(self) -> bool:
        for subscriptions in self._subscriptions.values():
            for subscription in subscriptions:
                try:
                    subscription.on_resync()
                except Exception:
                    # Stay unfresh; the next pong retries the whole resync.
                    logger.exception("cache subscriber failed to resync")
                    return False
        return True


def _consume_outcome(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


class _Unresponsive(Exception):
    """The subscription connection stopped answering or closed."""


async def _redis_hit(client: AnyRedis, key: str, window_s: int) -> tuple[int, float]:
    window_ms = window_s * 1000
    # One round trip, atomic: create the window with its expiry only if it does
    # not exist (so the expiry is set on the first hit and never extended),
    # count, and read the time left.
    async with client.pipeline(transaction=True) as pipe:
        pipe.set(key, 0, px=window_ms, nx=True)
        pipe.incr(key)
        pipe.pttl(key)
        _, count, ttl_ms = await pipe.execute()
    if not isinstance(ttl_ms, int) or ttl_ms < 0:
        # A key without expiry (written by something else) would never reset:
        # give it one rather than rate-limit forever.
        await client.pexpire(key, window_ms)
        ttl_ms = window_ms
    return int(count), ttl_ms / 1000


#: ``_redis_hit`` for each of KEYS in order, stopping at the first whose count passes
#: its limit (ARGV[i + 1]); ARGV[1] is the window in ms. Returns that key's index
#: (from 1), its count and its time left in ms; 0 for the index when none passed.
_FIRST_OVER_SCRIPT: Final = """
for i, key in ipairs(KEYS) do
  redis.call('SET', key, 0, 'PX', ARGV[1], 'NX')
  local count = redis.call('INCR', key)
  local ttl = redis.call('PTTL', key)
  if ttl < 0 then
    redis.call('PEXPIRE', key, ARGV[1])
    ttl = tonumber(ARGV[1])
  end
  if count > tonumber(ARGV[i + 1]) then
    return {i, count, ttl}
  end
end
return {0, 0, 0}
"""


async def _redis_first_over(
    client: AnyRedis, limits: Sequence[tuple[str, int]], window_ms: int
) -> tuple[int, float] | None:
    keys = [key for key, _ in limits]
    reply: Any = await client.eval(
        _FIRST_OVER_SCRIPT, len(keys), *keys, window_ms, *(limit for _, limit in limits)
    )
    index, _count, ttl_ms = (int(value) for value in reply)
    if index == 0:
        return None
    return index - 1, ttl_ms / 1000


async def _redis_delete(client: AnyRedis, key: str) -> None:
    await client.delete(key)


async def _redis_publish(client: AnyRedis, channel: str, message: str) -> None:
    if isinstance(client, RedisCluster):
        # Sharded: to the master of the channel's slot, where its subscribers listen.
        await client.spublish(channel, message)
    else:
        await client.publish(channel, message)


async def _redis_ping(client: AnyRedis) -> None:
    if isinstance(client, RedisCluster):
        # Every master: the cache serves keys on any of them.
        await client.ping(target_nodes=RedisCluster.PRIMARIES)
    else:
        await client.ping()
