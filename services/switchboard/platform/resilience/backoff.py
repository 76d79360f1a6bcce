"""The server's one backoff: a delay that doubles from ``base_s`` up to ``max_s``.

Three uses of that one schedule:

- ``ceiling(attempt, ...)``: the capped doubling itself (the launcher waits
  this long before restarting a process that ended);
- ``full_jitter(attempt, ...)``: a uniform draw under the ceiling, never less
  than a ``Retry-After`` the other side sent (webhook deliveries);
- ``retry_after(headers)``: the wait an HTTP answer asks for, which
  ``full_jitter`` then honours (the LLM client, embeddings, speech);
- ``Backoff``: a pacer for a loop that waits out an outage, ``wait()`` after a
  failure and ``reset()`` after a success (the event log's readers and
  flusher, the webhook feeder and sender, the dispatcher's lease loop, an A2A
  stream's resume);
- ``IdlePoll``: the same doubling for a loop that looks for work left by other
  processes, after each look that found none (the webhook sender, schedule
  firing, the outbox relay, the semantic indexer's workers): an idle process's
  looks cost every process of a mesh, each on its own.

The client package keeps its own (``switchboard.client.backoff``): it imports
no server module (docs/decisions.md, 38).
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Mapping
from typing import Final

#: Doubling stops growing here (2**62 times the base is past any cap); a loop
#: that retried all night must not overflow.
_MAX_EXPONENT: Final = 62


def ceiling(attempt: int, *, base_s: float, max_s: float) -> float:
    """``base_s * 2**attempt``, capped at ``max_s`` (``attempt`` 0 is the first retry)."""
    return min(max_s, base_s * 2.0 ** min(max(attempt, 0), _MAX_EXPONENT))


def full_jitter(
    attempt: int,
    *,
    base_s: float,
    max_s: float,
    rng: random.Random,
    at_least_s: float | None = None,
) -> float:
    """A uniform draw in ``[0, ceiling(attempt)]``, never less than ``at_least_s``
    (a ``Retry-After``, itself capped at ``max_s``)."""
    delay = rng.uniform(0.0, ceiling(attempt, base_s=base_s, max_s=max_s))
    if at_least_s is not None:
        delay = max(delay, min(at_least_s, max_s))
    return delay


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds an HTTP answer asks to wait, from ``retry-after-ms`` or ``retry-after``.

    An HTTP-date ``Retry-After`` is ignored (no OpenAI-compatible server sends
    one) and the backoff schedule applies instead; so is a negative or infinite one.
    """
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            value = float(raw) * scale
        except ValueError:
            continue
        if math.isfinite(value) and value >= 0:
            return value
    return None


class Backoff:
    """Exponential retry delay for background loops that wait out an outage."""

    def __init__(self, low_s: float = 0.05, high_s: float = 1.0) -> None:
        self._low_s = low_s
        self._high_s = high_s
        self._next_s = low_s

    @property
    def next_s(self) -> float:
        """How long the next ``wait()`` sleeps."""
        return self._next_s

    async def wait(self) -> None:
        await asyncio.sleep(self._next_s)  # retry backoff, not synchronization
        self._next_s = min(self._next_s * 2, self._high_s)

    def reset(self) -> None:
        self._next_s = self._low_s


#: How many times its base period an idle poll may wait (``IdlePoll``).
IDLE_STRETCH: Final = 4.0


class IdlePoll:
    """How long a loop waits before it looks for work again: ``low_s`` after a look
    that found some, doubling after each that found none, up to ``high_s``.

    The loops that use it are woken at once by their own process's work (a delivery
    recorded here, a schedule changed here); the polls are for what other processes
    left (a crashed one's rows, work a busy one could not take), which the ceiling
    bounds. The low period still applies while there is work.
    """

    def __init__(self, low_s: float, high_s: float | None = None) -> None:
        self._low_s = low_s
        self._high_s = max(low_s, high_s if high_s is not None else low_s * IDLE_STRETCH)
        self._next_s = low_s

    def after(self, *, found: bool) -> float:
        """The wait after a look (``found``: it found work)."""
        if found:
            self._next_s = self._low_s
            return self._low_s
        wait = self._next_s
        self._next_s = min(wait * 2, self._high_s)
        return wait

    def reset(self) -> None:
        """Work came by another way (a wake): the next look comes at the low period."""
        self._next_s = self._low_s
