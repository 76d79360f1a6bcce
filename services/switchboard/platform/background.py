"""Background work whose failures are always heard.

asyncio keeps a task's exception until someone asks for it; a task nobody
awaits and whose exception nobody reads is reported only when it is garbage
collected, as "Task exception was never retrieved", without the context that
would say what it was doing, and whatever it was doing has silently stopped.
So every task started and left to run:

- is made with ``spawn``: its outcome is read when it ends, an exception is
  logged with its traceback under the task's name (cancellation is not a
  failure), and a ``keep`` set holds it until then (asyncio keeps only a weak
  reference to a running task);
- or, when it is a loop, catches what one round raises, notes it with
  ``FailureNotes`` and goes on.

``FailureNotes`` logs a failure with its traceback the first time it is seen
and at DEBUG while it repeats, so a loop that fails every second during an
outage writes one traceback per distinct cause, not one per round; a round
that succeeds forgets them, and the next failure is news again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
from collections.abc import Coroutine, Iterable
from typing import Any, Final, TypeVar

_T = TypeVar("_T")

#: Distinct failures remembered by one ``FailureNotes`` (a bound, not a policy).
_MAX_NOTES: Final = 64


def spawn(
    work: Coroutine[Any, Any, _T],
    *,
    name: str,
    logger: logging.Logger,
    keep: set[asyncio.Task[Any]] | None = None,
) -> asyncio.Task[_T]:
    """Run ``work`` as a task whose exception, if it ends with one, is logged.

    The task is added to ``keep`` (if given) until it ends. A caller that
    awaits the task still gets its exception; it is logged all the same.
    """
    task = asyncio.get_running_loop().create_task(work, name=name)
    if keep is not None:
        keep.add(task)
    task.add_done_callback(lambda done: _ended(done, logger, keep))
    return task


def _ended(
    task: asyncio.Task[Any], logger: logging.Logger, keep: set[asyncio.Task[Any]] | None
) -> None:
    if keep is not None:
        keep.discard(task)
    if task.cancelled():
        return
    error = task.exception()  # read here: never "never retrieved"
    if error is not None:
        logger.error(
            "background task failed",
            exc_info=(type(error), error, error.__traceback__),
            extra={"task": task.get_name()},
        )


class FailureNotes:
    """What one loop has already logged; see the module doc."""

    __slots__ = ("_logger", "_seen")

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._seen: set[tuple[str, str]] = set()

    def failed(self, message: str, error: BaseException, **extra: Any) -> None:
        """Log ``error`` (traceback included) unless this loop already did since its
        last success; then only at DEBUG."""
        key = _cause(error)
        if key in self._seen:
            self._logger.debug(message, extra={**extra, "error": type(error).__name__})
            return
        if len(self._seen) >= _MAX_NOTES:
            self._seen.clear()
        self._seen.add(key)
        self._logger.error(message, exc_info=(type(error), error, error.__traceback__), extra=extra)

    def succeeded(self) -> None:
        self._seen.clear()


def _cause(error: BaseException) -> tuple[str, str]:
    """A failure's identity: its type and the line that raised it (not its text,
    which may hold an id or a number that changes every time)."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return type(error).__qualname__, where


async def cancel_all(tasks: Iterable[asyncio.Task[Any]], *, every_s: float = 0.1) -> None:
    """Cancel ``tasks`` and wait until every one has ended.

    One cancel() is not always enough on Python 3.11: ``asyncio.wait_for`` (in
    redis-py's socket writes and at the end of every database call) swallows a
    cancellation that races with its inner operation finishing. So the cancel is
    repeated every ``every_s`` until each task is done.
    """
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=every_s)


async def cancel_within(
    tasks: Iterable[asyncio.Task[Any]], timeout_s: float
) -> list[asyncio.Task[Any]]:
    """``cancel_all``, bounded: the tasks still running after ``timeout_s``.

    For a shutdown: a task stuck in a call that ignores cancellation must not hold
    the process's up (what the task held, a claim or a lease, expires by itself).
    """
    tasks = list(tasks)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await cancel_all(tasks)
    return [task for task in tasks if not task.done()]
