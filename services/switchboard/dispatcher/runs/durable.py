"""Durable runs: the run's handler step wrapped in its journal (``tools/journal.py``).

A run whose handler acts outside the process (a model, a remote expert) keeps
its journal in its job, stored before the run does the next thing, so that a
run taken over after a crash continues from it (docs/dispatcher.md, "Durable
runs"). The execution stage calls ``Durable.around`` once, around its handler
step: the journal is opened (the handler must still be the one the first
attempt called), an answer journaled before a crash is given back instead of
being asked for again, the step gets the journal (its model calls and tool
steps are journaled as they happen), and the answer is journaled before it is
stored. A built-in handler's step runs bare: after a crash it runs again from
the start.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.handler.v1 import handler_pb2
from switchboard.dispatcher.handlers.base import Handler
from switchboard.dispatcher.runs.core.active.lifecycle import Active
from switchboard.dispatcher.runs.core.active.live import FINISH_TIMEOUT_S, Live, RunLimits
from switchboard.dispatcher.runs.core.store import RunStore
from switchboard.dispatcher.tools.journal import Journal, add_usage
from switchboard.platform.errors import Conflict, DependencyUnavailable, RunNotResumable
from switchboard.platform.resilience.backoff import Backoff

log = logging.getLogger("switchboard.dispatcher")

#: How long a journal write is retried through a database outage before the run fails.
_JOURNAL_PATIENCE_S: Final = 30.0

#: The handler step: called with the run's journal (None for a built-in handler),
#: returns the handler's result.
Step = Callable[[Journal | None], Awaitable[handler_pb2.HandleResult]]


def _fingerprint(handler: Handler) -> str:
    """What a resumed run's remote handler must still be: the same handler, speaking
    the same protocol (plain or interactive); '' for handlers in the process."""
    if handler.kind in (pb.HANDLER_KIND_BUILTIN, pb.HANDLER_KIND_LLM):
        return ""
    caps = handler.capabilities
    style = "interactive" if caps.interactive else "streaming"
    return f"{pb.HandlerKind.Name(handler.kind)}/{caps.id}/{style}"


class Durable:
    """The journal around each run's handler step, and the writes of its job."""

    def __init__(self, *, live: Live, store: RunStore, limits: RunLimits) -> None:
        self._live = live
        self._store = store
        self._limits = limits

    async def around(
        self,
        active: Active,
        step: Step,
        replayed: Callable[[handler_pb2.HandleResult], None],
    ) -> handler_pb2.HandleResult:
        """``step`` inside the run's journal; returns the answer to store.
        ``replayed``: shows an answer journaled before a crash (this attempt's
        watchers start over), which is returned without calling ``step``."""
        if active.handler.kind == pb.HANDLER_KIND_BUILTIN:
            return await step(None)
        journal = self._open(active)
        if journal.job.HasField("answer"):
            # Answered before a crash: the answer is stored now, not asked again.
            result = handler_pb2.HandleResult()
            result.CopyFrom(journal.job.answer.result)
            replayed(result)
            log.info("run answered from its journal", extra={"run": active.run.name})
            return result
        result = await step(journal)
        # What earlier attempts spent is the run's too; the answer is journaled
        # before it is stored, so a crash does not ask for it again.
        add_usage(result.usage, journal.earlier)
        await journal.answered(result)
        return result

    def unresumed(self, active: Active) -> Journal:
        """A journal for a run that is never resumed (a built-in handler's): built-in
        handlers call no tools, and one that did would be journaled too."""
        return Journal(active.job, lambda: self._write_job(active))

    def _open(self, active: Active) -> Journal:
        """The run's journal for this attempt; RUN_NOT_RESUMABLE when its handler
        is not the one its first attempt called."""
        job = active.job
        handler = active.handler
        mark = _fingerprint(handler)
        if mark and handler.available():
            if job.handler_fingerprint and job.handler_fingerprint != mark:
                raise RunNotResumable(
                    f"its handler {active.run.handler} changed since the run started "
                    f"({job.handler_fingerprint} then, {mark} now)"
                )
            job.handler_fingerprint = mark
        journal = Journal(
            job,
            lambda: self._write_job(active),
            resuming=bool(active.recovered),
            retry_all=active.recovered == "requeue",
        )
        active.journal = journal
        return journal

    async def _write_job(self, active: Active) -> bool:
        """Store the run's job as it is now (after any state change being stored);
        through a database outage of up to ``_JOURNAL_PATIENCE_S``: the run waits
        rather than act on what is not journaled, or fail for a blip."""
        backoff = Backoff(0.05, 2.0)
        began = time.monotonic()
        while True:
            if active.retired:
                return False  # another instance's now: it journals the run
            try:
                async with active.persisting, asyncio.timeout(FINISH_TIMEOUT_S):
                    return await self._store.save_job(
                        active.run_id,
                        active.job.SerializeToString(),
                        owner=self._limits.instance_id,
                    )
            except (DependencyUnavailable, Conflict, TimeoutError):
                if self._live.closing or time.monotonic() - began >= _JOURNAL_PATIENCE_S:
                    raise
                log.warning("could not journal a run; retrying", extra={"run": active.run.name})
            await backoff.wait()
