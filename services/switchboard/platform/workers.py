"""Internal workers on the shared event log: Redis Stream consumer groups.

Subscribers (``events/``) each see every event of their scopes. An internal
worker is different: a *group* of processes shares the work, and each event
is handled by one member of the group. That is a Redis consumer group:

* ``XREADGROUP ... >`` hands each new entry to one consumer, which records it
  as pending until the consumer acknowledges it with ``XACK`` after its
  handler succeeded (at-least-once: a handler must be idempotent).
* A consumer that dies, hangs, or whose handler failed leaves entries
  pending. Every consumer periodically runs ``XAUTOCLAIM`` for entries idle
  longer than ``min_idle_s`` and takes them over, so no entry is stuck behind
  a dead process.
* A consumer whose own Redis call failed mid-batch (a timeout under load, a
  reconnect) may hold entries Redis already handed to it. Before it reads new
  ones it re-reads its own pending entries (``XREADGROUP ... 0``), so they are
  handled after its backoff, not after ``min_idle_s``.
* An entry whose handler keeps failing is retried each time it is claimed;
  after ``max_deliveries`` it is acknowledged and logged as dropped, so one
  poison event cannot block the group forever.

Every Redis command is bounded; a Redis outage makes the worker back off and
resume on its own. This module does not import grpc.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

from redis.exceptions import RedisError, ResponseError

from switchboard.platform.cache import binary_client
from switchboard.platform.eventlog import Backoff, Logged, parse_cursor

log = logging.getLogger("switchboard.workers")

Handler = Callable[[Logged], Awaitable[None]]

_REDIS_FAILURES: Final = (RedisError, OSError, TimeoutError)
_BATCH: Final = 100
_BLOCK_S: Final = 1.0


class StreamWorker:
    """One consumer of a consumer group on the event stream; ``start()`` until ``close()``."""

    def __init__(
        self,
        redis_url: str,
        *,
        key: str,
        group: str,
        consumer: str,
        handler: Handler,
        timeout_s: float,
        min_idle_s: float = 30.0,
        max_deliveries: int = 5,
        start: str = "$",
    ) -> None:
        self._key = key
        self._group = group
        self._consumer = consumer
        self._handler = handler
        self._timeout_s = timeout_s
        self._min_idle_ms = max(1, int(min_idle_s * 1000))
        self._max_deliveries = max_deliveries
        self._start = start
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._client = binary_client(
            redis_url, timeout_s=timeout_s, max_connections=2, socket_timeout_s=_BLOCK_S + timeout_s
        )
        self.handled = 0

    def start(self) -> None:
        """Run in a background task until ``close()``."""
        self._task = asyncio.create_task(self.run(), name=f"worker-{self._group}-{self._consumer}")

    async def run(self) -> None:
        backoff = Backoff()
        # Our own pending entries first: at start (a restarted consumer) and
        # after any failure (entries handed to us whose reply we lost).
        recover = True
        while not self._closed:
            try:
                await self._ensure_group()
                await self._claim_stale()
                if recover:
                    await self._recover_own()
                    recover = False
                async with asyncio.timeout(_BLOCK_S + self._timeout_s * 2):
                    reply: Any = await self._client.xreadgroup(
                        self._group,
                        self._consumer,
                        {self._key: ">"},
                        count=_BATCH,
                        block=int(_BLOCK_S * 1000),
                    )
                for _stream, entries in reply or ():
                    for entry_id, fields in entries:
                        await self._handle(entry_id, fields)
            except _REDIS_FAILURES as exc:
                log.warning(
                    "stream worker cannot reach Redis; backing off",
                    extra={"group": self._group, "error": type(exc).__name__},
                )
                recover = True
                await backoff.wait()
                continue
            backoff.reset()

    async def _recover_own(self) -> None:
        """Handle the entries pending on this consumer (``XREADGROUP`` from id 0)."""
        after = "0"
        while True:
            async with asyncio.timeout(self._timeout_s):
                reply: Any = await self._client.xreadgroup(
                    self._group, self._consumer, {self._key: after}, count=_BATCH
                )
            entries = [entry for _stream, batch in reply or () for entry in batch]
            if not entries:
                return
            for entry_id, fields in entries:
                if not fields:  # trimmed while pending
                    await self._ack(entry_id)
                else:
                    await self._handle(entry_id, fields, claimed=True)
            last = entries[-1][0]
            after = last.decode() if isinstance(last, bytes) else str(last)

    async def _ensure_group(self) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._client.xgroup_create(
                    self._key, self._group, id=self._start, mkstream=True
                )
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _claim_stale(self) -> None:
        """Take over entries other consumers (or we) left pending for too long."""
        cursor = "0-0"
        while True:
            async with asyncio.timeout(self._timeout_s):
                reply: Any = await self._client.xautoclaim(
                    self._key,
                    self._group,
                    self._consumer,
                    min_idle_time=self._min_idle_ms,
                    start_id=cursor,
                    count=_BATCH,
                )
            cursor = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
            for entry_id, fields in reply[1]:
                if fields is None:  # deleted (trimmed) while pending
                    await self._ack(entry_id)
                    continue
                await self._handle(entry_id, fields, claimed=True)
            if cursor == "0-0":
                return

    async def _handle(self, entry_id: Any, fields: Any, *, claimed: bool = False) -> None:
        text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        position = parse_cursor(text)
        if position is None:
            return
        if claimed and await self._deliveries(text) > self._max_deliveries:
            log.error(
                "dropping an event its handler failed on too many times",
                extra={"group": self._group, "entry": text},
            )
            await self._ack(entry_id)
            return
        try:
            await self._handler(Logged.parse(position, fields[b"e"]))
        except Exception:
            # Left pending: claimed again after min_idle_s, by us or another consumer.
            log.exception("stream worker handler failed", extra={"group": self._group})
            return
        await self._ack(entry_id)
        self.handled += 1

    async def _deliveries(self, entry_id: str) -> int:
        async with asyncio.timeout(self._timeout_s):
            pending: Any = await self._client.xpending_range(
                self._key, self._group, min=entry_id, max=entry_id, count=1
            )
        return int(pending[0]["times_delivered"]) if pending else 0

    async def _ack(self, entry_id: Any) -> None:
        async with asyncio.timeout(self._timeout_s):
            await self._client.xack(self._key, self._group, entry_id)

    async def close(self) -> None:
        """Stop; entries being handled stay pending and are claimed by the group later."""
        self._closed = True
        task = self._task
        # Repeated: on 3.11 redis-py's internal wait_for can swallow one cancel.
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
        with contextlib.suppress(*_REDIS_FAILURES):
            async with asyncio.timeout(self._timeout_s):
                await self._client.aclose()
