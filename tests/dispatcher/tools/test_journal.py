"""The run journal's writes and checks (dispatcher/tools/journal.py)."""

from __future__ import annotations

import asyncio
import gc

import pytest

from switchboard.api.handler.v1 import handler_pb2 as hpb
from switchboard.dispatcher.tools.journal import JOURNAL_VERSION, Journal, add_usage, unreadable
from switchboard.internal.dispatcher.v1 import job_pb2
from switchboard.platform.errors import DatabaseUnavailable, RunInterrupted

pytestmark = pytest.mark.unit


class Store:
    """Records what each write stored; a write waits until the test lets it finish."""

    def __init__(self, job: job_pb2.RunJob) -> None:
        self.job = job
        self.stored: list[int] = []
        self.gate = asyncio.Event()
        self.owner = True
        self.fail = False
        #: Set when a write starts.
        self.started = asyncio.Event()

    async def write(self) -> bool:
        seen = len(self.job.steps)  # the job as it is when the write starts
        self.started.set()
        await self.gate.wait()
        if self.fail:
            raise DatabaseUnavailable()
        self.stored.append(seen)
        return self.owner


async def test_a_checkpoint_returns_once_the_job_as_it_was_is_stored() -> None:
    job = job_pb2.RunJob()
    store = Store(job)
    journal = Journal(job, store.write)
    job.steps.add()
    first = asyncio.ensure_future(journal.checkpoint())
    await store.started.wait()  # the first write started, with one step
    job.steps.add()
    second = asyncio.ensure_future(journal.checkpoint())
    third = asyncio.ensure_future(journal.checkpoint())
    assert not first.done()
    store.gate.set()
    await asyncio.gather(first, second, third)
    # The second and third shared one write, made after the first: never an older
    # state after a newer one.
    assert store.stored == [1, 2]


async def test_a_write_that_fails_after_its_waiter_was_cancelled_is_not_an_error() -> None:
    # A run let go of after a takeover is cancelled while its checkpoint writes; the write
    # then finds the run taken over. Nobody awaits it any more: asyncio must not log the
    # expected RunInterrupted as "Task exception was never retrieved".
    job = job_pb2.RunJob()
    store = Store(job)
    store.owner = False
    journal = Journal(job, store.write)
    unretrieved: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: unretrieved.append(context))
    try:
        waiter = asyncio.ensure_future(journal.checkpoint())
        await store.started.wait()
        writing = journal._writing
        assert writing is not None
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        store.gate.set()
        # The write goes on, shielded, and ends (``wait`` retrieves nothing).
        await asyncio.wait([writing])
        del writing, waiter, journal
        gc.collect()  # a task's unretrieved exception is reported when it is collected
    finally:
        loop.set_exception_handler(None)
    assert unretrieved == []


async def test_a_run_taken_over_may_not_go_on_and_a_failed_write_is_raised() -> None:
    job = job_pb2.RunJob()
    store = Store(job)
    store.gate.set()
    journal = Journal(job, store.write)
    store.owner = False
    with pytest.raises(RunInterrupted):
        await journal.checkpoint()
    store.owner, store.fail = True, True
    with pytest.raises(DatabaseUnavailable):
        await journal.checkpoint()
    store.fail = False
    await journal.checkpoint()  # the next write is tried anew
    assert store.stored


def test_unreadable_names_what_cannot_be_continued() -> None:
    assert unreadable(job_pb2.RunJob()) == ""
    assert unreadable(job_pb2.RunJob(journal_version=JOURNAL_VERSION)) == ""
    assert "format version 7" in unreadable(job_pb2.RunJob(journal_version=7))
    more = job_pb2.RunJob(journal_version=1, step_records=[job_pb2.StepRecord()])
    assert "more step records" in unreadable(more)
    job = job_pb2.RunJob(journal_version=1)
    job.steps.add().calls.add(id="a")
    job.steps.add()
    assert "tool step 1" in unreadable(job)


def test_earlier_usage_sums_the_steps_and_keeps_the_answer_s_model() -> None:
    job = job_pb2.RunJob()
    for tokens in (10, 20):
        job.steps.add()
        job.step_records.add(
            usage=hpb.Usage(input_tokens=tokens, output_tokens=1, cost_micros=5, model="p/m1")
        )
    journal = Journal(job, Store(job).write)
    assert job.journal_version == JOURNAL_VERSION
    assert (journal.earlier.input_tokens, journal.earlier.cost_micros) == (30, 10)
    answer = hpb.Usage(input_tokens=5, output_tokens=2, cost_micros=1, model="p/m2")
    add_usage(answer, journal.earlier)
    assert (answer.input_tokens, answer.output_tokens, answer.model) == (35, 4, "p/m2")
    assert answer.estimated_cost_usd == pytest.approx(11e-6)


def test_a_step_takes_the_model_call_that_made_it_once() -> None:
    job = job_pb2.RunJob()
    journal = Journal(job, Store(job).write)
    journal.model_call(hpb.Usage(input_tokens=3), "chatcmpl-1")
    job.steps.add()
    record = journal.open_step(0)
    assert (record.usage.input_tokens, record.response_id) == (3, "chatcmpl-1")
    assert journal.take_model_call() == (None, "")
