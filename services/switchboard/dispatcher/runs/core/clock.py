"""A run's deadline, stopped while the run waits for a person."""

from __future__ import annotations

import asyncio
import time

from switchboard.dispatcher.handlers.base import HandleCall


class RunClock:
    """A run's deadline: ``timeout_s`` of its own time, stopped while it waits for
    a person. The deadline is meant for compute; a pause has its own bound (the
    approval timeout, ``RunTools``), so the run gets back what is left when it
    resumes."""

    def __init__(self, timeout_s: float) -> None:
        #: ``time.monotonic()`` by which the run must finish, while it runs.
        self.deadline = time.monotonic() + timeout_s
        self.scope: asyncio.Timeout | None = None
        #: The handler's call: its deadline moves with the run's.
        self.call: HandleCall | None = None
        self._paused_at: float | None = None

    def left(self) -> float:
        now = self._paused_at if self._paused_at is not None else time.monotonic()
        return max(0.001, self.deadline - now)

    def pause(self) -> None:
        if self._paused_at is None:
            self._paused_at = time.monotonic()
            if self.scope is not None:
                self.scope.reschedule(None)

    def resume(self) -> None:
        if self._paused_at is None:
            return
        self.deadline += time.monotonic() - self._paused_at
        self._paused_at = None
        if self.call is not None:
            self.call.deadline = self.deadline
        if self.scope is not None:
            self.scope.reschedule(asyncio.get_running_loop().time() + self.left())
