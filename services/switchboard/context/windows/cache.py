"""The context window cache: Redis shared by every process, memory in front of it.

Entries are keyed by the versions the window was built from (the
conversation's, its workspace's memory, the caller's memory), so a write
"invalidates" by making the old key unreachable: no delete has to reach any
process, and Redis being down, slow or coming back can never make a process
serve a window older than the newest committed write. The versions are read
from the database on every request, the source of truth.

A window can also age without a write: a memory item in it expires. Each entry
carries ``valid_until`` (the earliest expiry among the memory items it
considered) and is ignored after that.

Every Redis command is bounded by ``timeout_s``; after a failure Redis is not
tried again for ``retry_s`` (memory only meanwhile), so an outage costs one
timeout, not one per request.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Awaitable
from typing import Any, Final

from redis.exceptions import RedisClusterException, RedisError

from switchboard.platform.cache import AnyRedis, binary_client, redacted_url

log = logging.getLogger("switchboard.context.cache")

_HEADER: Final = struct.Struct(">d")
_FAILURES: Final = (RedisError, RedisClusterException, OSError, TimeoutError)


class WindowCache:
    def __init__(
        self,
        redis_url: str,
        *,
        timeout_s: float,
        ttl_s: int,
        max_entries: int,
        max_bytes: int,
        retry_s: float = 1.0,
    ) -> None:
        self._client: AnyRedis | None = (
            binary_client(redis_url, timeout_s=timeout_s, max_connections=16) if redis_url else None
        )
        self._target = redacted_url(redis_url) if redis_url else "memory"
        self._timeout_s = timeout_s
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._retry_s = retry_s
        self._memory: OrderedDict[str, bytes] = OrderedDict()
        self._memory_bytes = 0
        self._down_until = 0.0
        self.hits = 0
        self.misses = 0

    async def close(self) -> None:
        if self._client is not None:
            try:
                await self._client.aclose()
            except _FAILURES:
                log.debug("closing the window cache's Redis client failed", exc_info=True)

    async def forget(self, tag: str) -> int:
        """Delete every window whose key holds ``tag`` (a conversation's hash tag), here
        and in Redis: an erasure must not leave its words in a window that merely went
        out of reach. Returns how many Redis keys went."""
        for key in [k for k in self._memory if tag in k]:
            self._memory_bytes -= len(self._memory.pop(key))
        if self._client is None:
            return 0
        gone = 0
        try:
            async with asyncio.timeout(self._timeout_s * 20):
                async for key in self._client.scan_iter(match=f"ctxwin:*{tag}*", count=500):
                    gone += int(await self._client.delete(key))
        except _FAILURES as exc:
            # The erasure part is retried as a whole: it must not end as done.
            raise ConnectionError(
                f"the window cache could not forget: {type(exc).__name__}"
            ) from None
        return gone

    @property
    def redis_up(self) -> bool:
        return self._client is not None and time.monotonic() >= self._down_until

    @property
    def shared(self) -> bool:
        """Whether windows may be cached beyond this process's memory (Redis)."""
        return self._client is not None

    def holds(self, key: str) -> bool:
        """Whether this process's memory has an entry under ``key`` (valid or not).

        Safe from another thread: one dict lookup, no change to the cache.
        """
        return key in self._memory

    async def get(self, key: str) -> bytes | None:
        """The window stored under ``key`` if it is still valid, else None."""
        entry = self._memory.get(key)
        if entry is not None:
            self._memory.move_to_end(key)
        elif self.redis_up and self._client is not None:
            entry = await self._redis(self._client.get(key))
            if entry is not None:
                self._remember(key, entry)
        payload = _valid(entry)
        if payload is None:
            self.misses += 1
        else:
            self.hits += 1
        return payload

    async def put(self, key: str, payload: bytes, valid_until: float) -> None:
        """Store a window; ``valid_until`` is a wall-clock time (``inf`` for none)."""
        entry = _HEADER.pack(valid_until) + payload
        self._remember(key, entry)
        if self.redis_up and self._client is not None:
            ttl = self._ttl_s
            if valid_until != float("inf"):
                ttl = max(1, min(ttl, int(valid_until - time.time()) + 1))
            await self._redis(self._client.set(key, entry, ex=ttl))

    def _remember(self, key: str, entry: bytes) -> None:
        if len(entry) > self._max_bytes // 4:
            return  # one huge window must not evict everything else
        old = self._memory.pop(key, None)
        if old is not None:
            self._memory_bytes -= len(old)
        self._memory[key] = entry
        self._memory_bytes += len(entry)
        while len(self._memory) > self._max_entries or self._memory_bytes > self._max_bytes:
            _, dropped = self._memory.popitem(last=False)
            self._memory_bytes -= len(dropped)

    async def _redis(self, command: Awaitable[Any]) -> bytes | None:
        try:
            async with asyncio.timeout(self._timeout_s):
                result = await command
        except _FAILURES as exc:
            if time.monotonic() >= self._down_until:
                log.warning(
                    "window cache: Redis unreachable, using memory only",
                    extra={"redis": self._target, "error": type(exc).__name__},
                )
            self._down_until = time.monotonic() + self._retry_s
            return None
        return result if isinstance(result, bytes) else None


def _valid(entry: bytes | None) -> bytes | None:
    if entry is None or len(entry) < _HEADER.size:
        return None
    (valid_until,) = _HEADER.unpack_from(entry)
    if time.time() >= valid_until:
        return None
    return entry[_HEADER.size :]
