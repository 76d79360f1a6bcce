"""How long to wait before trying again: capped exponential backoff with jitter."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Delays of ``initial_s * multiplier**attempt``, capped at ``max_s``, with jitter.

    ``jitter`` is the fraction of each delay that is random: a delay lies in
    ``[cap * (1 - jitter), cap]``. Some randomness spreads the clients a restart
    disconnected at once; not all of it, so no client hammers the server with
    near-zero delays.
    """

    initial_s: float = 0.2
    max_s: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.initial_s <= 0 or self.max_s < self.initial_s or self.multiplier < 1:
            raise ValueError("backoff needs 0 < initial_s <= max_s and multiplier >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter is a fraction in [0, 1]")

    def cap(self, attempt: int) -> float:
        """The largest delay before retry number ``attempt`` (0 for the first retry)."""
        # Exponent bounded: a follower that retried all night must not overflow.
        return min(self.max_s, self.initial_s * self.multiplier ** min(attempt, 64))

    def delay(
        self, attempt: int, *, at_least_s: float | None = None, rng: random.Random | None = None
    ) -> float:
        """The delay before retry ``attempt``; never shorter than the server's
        ``RetryInfo`` delay (``at_least_s``), which may exceed ``max_s``."""
        cap = self.cap(attempt)
        draw = (rng or _RNG).random()
        chosen = cap * (1 - self.jitter * draw)
        return max(chosen, at_least_s or 0.0)


# Jitter only has to decorrelate clients, not resist prediction.
_RNG = random.Random()  # noqa: S311
