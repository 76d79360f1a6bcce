"""The workers' loop over the jobs a leased feeder wrote (the semantic indexer's, memory
forming's): every replica claims due jobs in rounds, and waits between them.

A round that found jobs is followed by another at once; one that found none waits until
a job of this process's wakes it (``wake``), the next job falls due, or the idle poll
(which looks for other processes' jobs less often while none are found) comes round. A
round that fails (an outage, a bug) is logged and retried with a capped backoff; its
claims expire by themselves, so another worker retakes what it held.

This module does not import grpc.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Awaitable, Callable

from switchboard.platform.resilience.backoff import Backoff, IdlePoll
from switchboard.platform.store.db import log_failure
from switchboard.platform.values.names import now

#: One round: (jobs claimed, when the next job falls due if known).
Round = Callable[[], Awaitable[tuple[int, dt.datetime | None]]]


async def work_rounds(
    work_once: Round,
    wake: asyncio.Event,
    *,
    poll_s: float,
    what: str,
    log: logging.Logger,
    failed: Callable[[], None] = lambda: None,
) -> None:
    """Run ``work_once`` for ever (until cancelled); ``failed`` is called after a round
    that raised (the worker forgets the claims it held), ``what`` names it in the log."""
    backoff = Backoff(0.1, poll_s * 5)
    idle = IdlePoll(poll_s)
    while True:
        wake.clear()
        try:
            done, later = await work_once()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the claims expire; retried
            log_failure(log, f"{what} round failed", exc)
            failed()
            await backoff.wait()
            continue
        backoff.reset()
        if done:
            idle.after(found=True)
            continue
        wait_s = idle.after(found=False)
        if later is not None:
            wait_s = min(wait_s, max(0.0, (later - now()).total_seconds()))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                await wake.wait()
                idle.reset()


__all__ = ["Round", "work_rounds"]
