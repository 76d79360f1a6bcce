"""A run's journal: what it has done, stored before it does the next thing.

The journal is the run's job (``RunJob``, job.proto): its tool steps with the
model output that made each (``ToolStep`` text and calls, ``StepRecord`` usage
and response id), which calls were sent, each result as it came in, and the
final answer before it is stored as a message. A run taken over after a crash
(recovery policy ``resume``) continues from it: a model call whose output is
journaled is not made again, a call with a journaled result is not sent again,
and a call sent with no result is sent again only to a retry-safe tool (else
the run asks a person: ``tools/runner.py``). docs/dispatcher.md, "Durable runs".

Writes go through ``checkpoint``: it returns once the job as it stood when it
was called is stored. Writes are made one at a time, each of the job as it is
when the write starts, so concurrent checkpoints (a step's calls finishing
together) share writes and an older state never lands after a newer one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Final

from switchboard.api.handler.v1 import handler_pb2 as hpb
from switchboard.internal.dispatcher.v1 import job_pb2
from switchboard.platform.errors import RunInterrupted

#: The journal format this release writes.
JOURNAL_VERSION: Final = 1
#: Formats it reads: 0 is a job stored before journals (its steps, nothing else).
READABLE: Final = frozenset({0, JOURNAL_VERSION})
#: Usage travels as int32 fields.
_INT32_MAX: Final = 2**31 - 1
#: Largest final answer journaled (with its files' bytes); a larger one is asked
#: for again if a crash comes between it and its message.
_MAX_ANSWER_BYTES: Final = 1024 * 1024


def unreadable(job: job_pb2.RunJob) -> str:
    """Why ``job``'s journal cannot be continued ('' when it can)."""
    if job.journal_version not in READABLE:
        return (
            f"its journal has format version {job.journal_version}, which this release "
            f"does not read (it reads {', '.join(str(v) for v in sorted(READABLE))})"
        )
    if len(job.step_records) > len(job.steps):
        return "its journal has more step records than tool steps"
    for position, step in enumerate(job.steps[:-1]):
        if len(step.results) != len(step.calls):
            return f"tool step {position + 1} of its journal lacks results but is not the last"
    return ""


def add_usage(total: hpb.Usage, more: hpb.Usage) -> None:
    """Add ``more`` into ``total`` (which keeps its model label, if it has one)."""
    total.input_tokens = min(total.input_tokens + more.input_tokens, _INT32_MAX)
    total.output_tokens = min(total.output_tokens + more.output_tokens, _INT32_MAX)
    total.cost_micros += more.cost_micros
    total.estimated_cost_usd = total.cost_micros / 1e6
    total.estimated = total.estimated or more.estimated
    total.unpriced_calls = min(total.unpriced_calls + more.unpriced_calls, _INT32_MAX)
    if more.model and not total.model:
        total.model = more.model


def cover(usage: hpb.Usage, cost_micros: int, input_tokens: int, output_tokens: int) -> hpb.Usage:
    """``usage``, raised to at least what the run's budgets were charged (each of
    cost and tokens), and returned: a run reports every charge it made, its
    earlier attempts' included, so what runs report sums to what their budgets
    used. A charge the journal does not explain is a model call charged before
    a crash and asked again after it (docs/dispatcher.md, "Durable runs")."""
    if cost_micros > usage.cost_micros:
        usage.cost_micros = cost_micros
        usage.estimated_cost_usd = cost_micros / 1e6
    usage.input_tokens = min(max(usage.input_tokens, input_tokens), _INT32_MAX)
    usage.output_tokens = min(max(usage.output_tokens, output_tokens), _INT32_MAX)
    return usage


class Journal:
    """One attempt's view of its run's journal."""

    def __init__(
        self,
        job: job_pb2.RunJob,
        write: Callable[[], Awaitable[bool]],
        *,
        resuming: bool = False,
        retry_all: bool = False,
    ) -> None:
        self.job = job
        #: Stores the job as it is when called; False when the run is no longer this
        #: instance's (taken over: it must not act for it again).
        self._write = write
        #: Continue what a crash interrupted from what the journal says (policy
        #: ``resume`` or ``requeue``, or a paused run recovered).
        self.resuming = resuming
        #: Send a call that was in flight again whatever its tool says (``requeue``).
        self.retry_all = retry_all
        self._requested = 0
        self._written = 0
        self._writing: asyncio.Future[None] | None = None
        #: The last model call the handler reported and no step or answer took yet.
        self._model_call: tuple[hpb.Usage, str] | None = None
        #: Usage journaled by earlier attempts (their steps): this attempt's
        #: handler reports only its own calls.
        self.earlier = hpb.Usage()
        for record in job.step_records:
            add_usage(self.earlier, record.usage)
        #: Model calls no price priced, earlier attempts' and this one's so far: what a
        #: run that fails before its handler's result says (``Usage.unpriced_calls``).
        self.unpriced_calls = self.earlier.unpriced_calls
        if job.journal_version == 0:
            # Written from now on in this format (older steps get empty records).
            job.journal_version = JOURNAL_VERSION

    # -- what the handler tells it ------------------------------------------------------

    def model_call(self, usage: hpb.Usage, response_id: str) -> None:
        """The handler completed a model call (``HandleCall.model_call``)."""
        self._model_call = (usage, response_id)
        self.unpriced_calls += usage.unpriced_calls

    def take_model_call(self) -> tuple[hpb.Usage | None, str]:
        """The model call that made what is journaled next (None if none was told)."""
        found, self._model_call = self._model_call, None
        if found is None:
            return None, ""
        return found

    # -- records ------------------------------------------------------------------------

    def record(self, index: int) -> job_pb2.StepRecord:
        """The record of step ``index`` (records of older steps are added empty)."""
        records = self.job.step_records
        while len(records) <= index:
            records.add()
        return records[index]

    def open_step(self, index: int) -> job_pb2.StepRecord:
        """The record of a step the handler just made, with the model call that made it."""
        record = self.record(index)
        usage, response_id = self.take_model_call()
        if usage is not None:
            record.usage.CopyFrom(usage)
        record.response_id = response_id
        return record

    async def answered(self, result: hpb.HandleResult) -> None:
        """Journal the final answer (a handler's files with their bytes only up to
        ``_MAX_ANSWER_BYTES``: beyond that a crash asks for the answer again)."""
        if result.ByteSize() > _MAX_ANSWER_BYTES:
            self.take_model_call()
            return
        _, response_id = self.take_model_call()
        self.job.answer.result.CopyFrom(result)
        self.job.answer.response_id = response_id
        await self.checkpoint()

    # -- writing ------------------------------------------------------------------------

    async def checkpoint(self) -> None:
        """Return once the job, as it is now, is stored (raises if it cannot be)."""
        self._requested += 1
        target = self._requested
        while self._written < target:
            if self._writing is None:
                self._writing = asyncio.ensure_future(self._write_once())
                # Its waiters see its failure; when every one was cancelled (a run let
                # go of after a takeover), nobody is left to, and asyncio would log the
                # expected RunInterrupted as an error "never retrieved".
                self._writing.add_done_callback(_seen)
            # Shielded: one run's cancel does not abandon a write others wait on.
            await asyncio.shield(self._writing)

    async def _write_once(self) -> None:
        upto = self._requested
        try:
            if not await self._write():
                raise RunInterrupted("another dispatcher instance took the run over")
            self._written = max(self._written, upto)
        finally:
            self._writing = None


def _seen(write: asyncio.Future[None]) -> None:
    """Mark a journal write's outcome as retrieved (its waiters raise it themselves)."""
    if not write.cancelled():
        write.exception()
