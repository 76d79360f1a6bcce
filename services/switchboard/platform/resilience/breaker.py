"""Circuit breakers: one state machine for the whole mesh.

A breaker keeps a remote that keeps failing from costing every caller its full
timeout: after ``failures`` failed calls in a row the circuit **opens** and
calls are refused at once; ``reset_s`` later it is **half-open** and lets one
trial call through; the trial's success **closes** it, its failure opens it
for another ``reset_s``. A call that ends without a verdict (cancelled, or
refused before it reached the remote) frees the trial for the next caller.
A failure that lands while the circuit is open (a call that started before
it opened) starts the open period over; any success closes the circuit.

Two shapes of the same rules:

- ``CircuitBreaker``: one breaker, synchronous and in-process (the llm
  handler's per-provider breakers).
- ``Breakers``: the integrations' registry, keyed by resource name, with
  ``acquire`` returning a ``Permit`` for one call and ``on_change`` for status
  events.

**Shared or per-process.** With ``redis_url`` set, ``Breakers`` keeps each
key's state in one Redis hash (``switchboard:breaker:<key>``, TTL
``STATE_TTL_S`` refreshed on every write; a closed circuit without failures
has no hash) and every transition is one Lua script, so replicas share one
circuit: a failure counted by any replica counts for all, a replica learns
another's open circuit on its next ``acquire``, and only one replica gets the
half-open trial. Times are wall-clock (``clock``, epoch seconds), so replicas'
clocks should agree to well within ``reset_s`` (NTP). Without Redis the state
is per process. On a Redis Cluster (``redis+cluster://``) each script touches
its one hash, so it runs on the master of that key's slot.

**When Redis is away** no caller waits on it or sees its error: the call that
meets the outage (bounded by ``timeout_s``) and every call for the next
``redis_retry_s`` (``REDIS_RETRY_S``) use this process's own copy of the state (the last state it
saw from Redis, carried on by the same rules), ``degraded`` is True, and the
next call after that tries Redis again. So a circuit never stays open because
Redis is down, and never fails closed.

``on_change`` fires in the process that made the change, whenever a key's
(state, retry time) changes: closed to open, a trial starting (open to
half-open), the trial's verdict, a late failure moving the retry time. The
open to half-open change by the passing of time alone is seen when a trial
starts. ``state(key)`` is the state as this process last saw it.

A trial's claim is a lease of ``trial_lease_s`` (``reset_s`` by default): if
its holder dies without a verdict, another trial goes through after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Final, Literal

from redis.commands.core import AsyncScript
from redis.exceptions import RedisClusterException, RedisError

from switchboard.platform import background
from switchboard.platform.cache import AnyRedis, pooled_client, redacted_url
from switchboard.platform.errors import CircuitOpen

logger = logging.getLogger("switchboard.breaker")

#: A Redis hash of a circuit that saw no write for this long expires.
STATE_TTL_S: Final = 86_400.0
#: After a Redis failure, how long calls use the local state before trying Redis again.
REDIS_RETRY_S: Final = 1.0
#: Prefix of the Redis keys.
KEY_PREFIX: Final = "switchboard:breaker:"
#: Redis connections per process; acquire/verdict are one short script each.
MAX_CONNECTIONS: Final = 16

_REDIS_FAILURES: Final = (RedisError, RedisClusterException, OSError, TimeoutError)


# ---------------------------------------------------------------------------
# One breaker, in-process


class CircuitBreaker:
    """Opens after ``failures`` consecutive failed attempts; after ``reset_s``
    lets one trial call through (half-open), closing on its success and
    reopening on its failure."""

    def __init__(self, *, failures: int, reset_s: float, clock: Callable[[], float]) -> None:
        self._threshold = failures
        self._reset_s = reset_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._trial = False

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        if self._trial or self._clock() - self._opened_at >= self._reset_s:
            return "half-open"
        return "open"

    def allow(self) -> bool:
        """Whether an attempt may go to the provider now; claims the trial if half-open."""
        state = self.state
        if state == "closed":
            return True
        if state == "open" or self._trial:
            return False
        self._trial = True
        return True

    def succeeded(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._trial = False

    def failed(self) -> None:
        if self._opened_at is not None:
            # A trial (or a call that started before the circuit opened) failed:
            # the provider is still unwell, so the open period starts over.
            self._opened_at = self._clock()
            self._trial = False
            return
        self._failures += 1
        if self._failures >= self._threshold:
            self._opened_at = self._clock()
            self._failures = 0

    def released(self) -> None:
        """The attempt ended without a verdict (cancelled, or the request was refused)."""
        self._trial = False


# ---------------------------------------------------------------------------
# The registry's state machine (mirrored by _SCRIPT for Redis)


@dataclass(frozen=True)
class BreakerState:
    """One circuit as seen now."""

    state: Literal["closed", "open", "half_open"]
    #: Failed calls in a row (kept while open; reset by a success).
    failures: int
    #: Wall-clock epoch seconds when the next trial may go: while open, the end
    #: of the open period; while half-open with a trial in flight, the end of
    #: its lease; otherwise None (a call may go now).
    retry_at: float | None


CLOSED: Final = BreakerState("closed", 0, None)


@dataclass(frozen=True)
class _Record:
    failures: int = 0
    #: Set while open or half-open: when the open period ends.
    opened_until: float | None = None
    #: The trial in flight ("" for none) and the end of its lease.
    trial: str = ""
    trial_until: float = 0.0

    def view(self, now: float) -> BreakerState:
        if self.opened_until is None:
            return BreakerState("closed", self.failures, None)
        if now < self.opened_until:
            return BreakerState("open", self.failures, self.opened_until)
        if self.trial and now < self.trial_until:
            return BreakerState("half_open", self.failures, self.trial_until)
        return BreakerState("half_open", self.failures, None)

    @property
    def empty(self) -> bool:
        return self == _EMPTY


_EMPTY: Final = _Record()

_Op = Literal["acquire", "failed", "succeeded", "released"]


@dataclass(frozen=True)
class _Rules:
    threshold: int
    reset_s: float
    lease_s: float


def _apply(
    record: _Record, op: _Op, now: float, rules: _Rules, trial: str
) -> tuple[_Record, Literal[0, 1, 2]]:
    """The record after ``op``, and for acquire: 0 refused, 1 granted, 2 granted as the trial."""
    if op == "acquire":
        if record.opened_until is None:
            return record, 1
        if now < record.opened_until or (record.trial and now < record.trial_until):
            return record, 0
        return replace(record, trial=trial, trial_until=now + rules.lease_s), 2
    if op == "failed":
        failures = record.failures + 1
        if record.opened_until is not None or failures >= rules.threshold:
            return _Record(failures, now + rules.reset_s), 0
        return _Record(failures), 0
    if op == "succeeded":
        return _EMPTY, 0
    if trial and record.trial == trial:
        return replace(record, trial="", trial_until=0.0), 0
    return record, 0


# KEYS[1]: the hash. ARGV: op, now, threshold, reset_s, lease_s, ttl_ms, trial.
# Fields: f failures, o opened_until ("" when closed), t trial, u trial_until.
# Returns the verdict and the record before and after, as strings (a Lua
# number would come back truncated to an integer).
_SCRIPT: Final = """
local key = KEYS[1]
local op = ARGV[1]
local now = tonumber(ARGV[2])
local threshold = tonumber(ARGV[3])
local reset = tonumber(ARGV[4])
local lease = tonumber(ARGV[5])
local ttl = tonumber(ARGV[6])
local trial = ARGV[7]
local h = redis.call('HMGET', key, 'f', 'o', 't', 'u')
local f = tonumber(h[1]) or 0
local o = tonumber(h[2])
local t = h[3] or ''
local u = tonumber(h[4]) or 0
local before = {tostring(f), h[2] or '', t, h[4] or '0'}
local verdict = 0
local dirty = true
if op == 'acquire' then
  dirty = false
  if o == nil then
    verdict = 1
  elseif now < o or (t ~= '' and now < u) then
    verdict = 0
  else
    t = trial
    u = now + lease
    verdict = 2
    dirty = true
  end
elseif op == 'failed' then
  f = f + 1
  if o ~= nil or f >= threshold then
    o = now + reset
  end
  t = ''
  u = 0
elseif op == 'succeeded' then
  f = 0
  o = nil
  t = ''
  u = 0
elseif op == 'released' then
  if trial ~= '' and t == trial then
    t = ''
    u = 0
  else
    dirty = false
  end
end
local after = {tostring(f), o and string.format('%.6f', o) or '', t, string.format('%.6f', u)}
if dirty then
  if f == 0 and o == nil and t == '' then
    redis.call('DEL', key)
  else
    redis.call('HSET', key, 'f', after[1], 'o', after[2], 't', after[3], 'u', after[4])
    redis.call('PEXPIRE', key, ttl)
  end
end
return {verdict, before[1], before[2], before[3], before[4],
        after[1], after[2], after[3], after[4]}
"""


def _record(failures: Any, opened_until: Any, trial: Any, trial_until: Any) -> _Record:
    def text(value: Any) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    opened = text(opened_until)
    return _Record(
        failures=int(text(failures)),
        opened_until=float(opened) if opened else None,
        trial=text(trial),
        trial_until=float(text(trial_until) or 0),
    )


# ---------------------------------------------------------------------------
# The registry


class Permit:
    """Leave to make one call; report its outcome exactly once.

    ``succeeded`` and ``failed`` are verdicts on the remote; ``released`` says
    the call ended without one (cancelled, refused before it left). Only the
    first of the three counts.
    """

    __slots__ = ("_breakers", "_done", "_key", "_trial")

    def __init__(self, breakers: Breakers, key: str, trial: str) -> None:
        self._breakers = breakers
        self._key = key
        self._trial = trial
        self._done = False

    @property
    def trial(self) -> bool:
        """Whether this is the half-open trial call."""
        return bool(self._trial)

    async def succeeded(self) -> None:
        if self._claim():
            await self._breakers._verdict(self._key, "succeeded", self._trial)

    async def failed(self) -> None:
        if self._claim():
            await self._breakers._verdict(self._key, "failed", self._trial)

    def released(self) -> None:
        if self._claim() and self._trial:
            self._breakers._release(self._key, self._trial)

    def _claim(self) -> bool:
        if self._done:
            return False
        self._done = True
        return True


class Breakers:
    """The integrations' circuit breakers, shared through Redis when configured.

    See the module doc. ``timeout_s`` bounds every Redis command; ``clock``
    (wall-clock epoch seconds) is injectable for tests.
    """

    def __init__(
        self,
        redis_url: str = "",
        *,
        failures: int,
        reset_s: float,
        timeout_s: float = 0.5,
        clock: Callable[[], float] = time.time,
        trial_lease_s: float | None = None,
        redis_retry_s: float = REDIS_RETRY_S,
    ) -> None:
        if failures < 1 or reset_s <= 0 or timeout_s <= 0:
            raise ValueError("failures must be >= 1, reset_s and timeout_s > 0")
        self._url = redis_url
        self._target = redacted_url(redis_url) if redis_url else "memory"
        self._rules = _Rules(failures, reset_s, reset_s if trial_lease_s is None else trial_lease_s)
        self._timeout_s = timeout_s
        self._redis_retry_s = redis_retry_s
        self._clock = clock
        # This process's copy: the whole state without Redis; with Redis, the
        # last state seen there (what serves while Redis is away).
        self._local: dict[str, _Record] = {}
        self._callbacks: list[Callable[[str, BreakerState], None]] = []
        #: Changes of state this process made, by the state entered (a metric's source).
        self.transitions: Counter[str] = Counter()
        self._client: AnyRedis | None = None
        self._script: AsyncScript | None = None
        # monotonic time until which Redis is not tried; None while it answers.
        self._down_until: float | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Connect to Redis if configured; an unreachable Redis starts degraded."""
        if not self._url or self._client is not None:
            return
        self._client = pooled_client(
            self._url,
            timeout_s=self._timeout_s,
            max_connections=MAX_CONNECTIONS,
            decode_responses=True,
        )
        self._script = self._client.register_script(_SCRIPT)
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._client.ping()
        except _REDIS_FAILURES as exc:
            self._mark_down(exc)

    async def close(self) -> None:
        """Finish pending trial releases (bounded) and close the connection."""
        if self._closed:
            return
        self._closed = True
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self._timeout_s)
        for task in list(self._tasks):
            task.cancel()
        if self._client is not None:
            with contextlib.suppress(*_REDIS_FAILURES):
                async with asyncio.timeout(self._timeout_s):
                    await self._client.aclose()

    @property
    def degraded(self) -> bool:
        """True while Redis is configured but not answering (local state serves)."""
        return self._down_until is not None

    # -- the API -------------------------------------------------------------------

    def on_change(self, callback: Callable[[str, BreakerState], None]) -> None:
        """Call ``callback(key, state)`` on every change this process makes."""
        self._callbacks.append(callback)

    def counts(self) -> dict[str, int]:
        """Circuits this process holds state for, by state (a closed one only while it
        counts failures)."""
        now = self._clock()
        found = dict.fromkeys(("closed", "open", "half_open"), 0)
        for record in self._local.values():
            found[record.view(now).state] += 1
        return found

    def state(self, key: str) -> BreakerState:
        """``key``'s circuit as this process last saw it."""
        record = self._local.get(key)
        return CLOSED if record is None else record.view(self._clock())

    async def acquire(self, key: str, *, label: str) -> Permit:
        """A permit for one call, or ``CircuitOpen`` (naming ``label``) at once."""
        trial = secrets.token_hex(8)
        now = self._clock()
        record, verdict = await self._run(key, "acquire", now, trial)
        if verdict == 0:
            view = record.view(now)
            wait_s = max(0.0, (view.retry_at or now) - now)
            raise CircuitOpen(
                f"{label}: circuit open; retry in {max(1, math.ceil(wait_s))} s",
                retry_after_s=wait_s,
            )
        return Permit(self, key, trial if verdict == 2 else "")

    async def forget(self, key: str) -> None:
        """Drop ``key``'s state (the integration was deleted)."""
        self._local.pop(key, None)
        client = self._usable_client()
        if client is None:
            return
        try:
            async with asyncio.timeout(self._timeout_s):
                await client.delete(KEY_PREFIX + key)
        except _REDIS_FAILURES as exc:
            self._mark_down(exc)
        else:
            self._mark_up()

    # -- internals -----------------------------------------------------------------

    async def _verdict(self, key: str, op: _Op, trial: str) -> None:
        # The common case, a success on a closed circuit without failures as far
        # as this process knows: nothing to write. (Another replica's failures
        # in between may stay counted; the next failure or success settles it.)
        if op == "succeeded" and not trial and key not in self._local:
            return
        await self._run(key, op, self._clock(), trial)

    def _release(self, key: str, trial: str) -> None:
        # Synchronous (it runs while a cancellation unwinds): the local copy is
        # freed now, Redis in the background; if that fails, the lease expires.
        now = self._clock()
        if self._usable_client() is None or self._closed:
            self._apply_local(key, "released", now, trial)
            return
        # Only the shared release reports the change, so listeners hear it once.
        released, _ = _apply(self._local.get(key, _EMPTY), "released", now, self._rules, trial)
        self._store(key, released)
        background.spawn(
            self._release_shared(key, trial),
            name="breaker-release",
            logger=logger,
            keep=self._tasks,
        )

    async def _release_shared(self, key: str, trial: str) -> None:
        await self._run(key, "released", self._clock(), trial)

    async def _run(
        self, key: str, op: _Op, now: float, trial: str
    ) -> tuple[_Record, Literal[0, 1, 2]]:
        client, script = self._usable_client(), self._script
        if client is not None and script is not None:
            try:
                async with asyncio.timeout(self._timeout_s):
                    reply = await script(
                        keys=[KEY_PREFIX + key],
                        args=[
                            op,
                            f"{now:.6f}",
                            self._rules.threshold,
                            f"{self._rules.reset_s:.6f}",
                            f"{self._rules.lease_s:.6f}",
                            int(STATE_TTL_S * 1000),
                            trial,
                        ],
                        client=client,
                    )
            except _REDIS_FAILURES as exc:
                self._mark_down(exc)
            else:
                self._mark_up()
                verdict = int(reply[0])
                before, after = _record(*reply[1:5]), _record(*reply[5:9])
                self._store(key, after)
                self._changed(key, before, after, now)
                return after, 0 if verdict == 0 else 2 if verdict == 2 else 1
        return self._apply_local(key, op, now, trial)

    def _apply_local(
        self, key: str, op: _Op, now: float, trial: str
    ) -> tuple[_Record, Literal[0, 1, 2]]:
        before = self._local.get(key, _EMPTY)
        after, verdict = _apply(before, op, now, self._rules, trial)
        self._store(key, after)
        self._changed(key, before, after, now)
        return after, verdict

    def _store(self, key: str, record: _Record) -> None:
        if record.empty:
            self._local.pop(key, None)
        else:
            self._local[key] = record

    def _changed(self, key: str, before: _Record, after: _Record, now: float) -> None:
        old, new = before.view(now), after.view(now)
        if (old.state, old.retry_at) == (new.state, new.retry_at):
            return
        if old.state != new.state:
            self.transitions[new.state] += 1
            # Open is news for an operator; the trial and the recovery are its follow-up.
            logger.log(
                logging.WARNING if new.state == "open" else logging.INFO,
                "circuit %s",
                new.state.replace("_", "-"),
                extra={
                    "key": key,
                    "from_state": old.state,
                    "to_state": new.state,
                    "failures": new.failures,
                    "retry_in_s": None
                    if new.retry_at is None
                    else round(max(0.0, new.retry_at - now), 3),
                },
            )
        for callback in self._callbacks:
            try:
                callback(key, new)
            except Exception:
                # A status listener's bug must not fail the call it observes.
                logger.exception("circuit breaker change callback failed", extra={"key": key})

    def _usable_client(self) -> AnyRedis | None:
        if self._client is None:
            return None
        if self._down_until is not None and time.monotonic() < self._down_until:
            return None
        return self._client

    def _mark_down(self, exc: BaseException) -> None:
        first = self._down_until is None
        self._down_until = time.monotonic() + self._redis_retry_s
        if first:
            logger.warning(
                "circuit breakers degraded: Redis unreachable, using this process's state",
                extra={"redis": self._target, "error": type(exc).__name__},
            )

    def _mark_up(self) -> None:
        if self._down_until is None:
            return
        self._down_until = None
        logger.info("circuit breakers shared through Redis again", extra={"redis": self._target})
