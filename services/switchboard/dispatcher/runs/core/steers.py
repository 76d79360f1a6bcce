"""A replica's steers: which wait for which of its live runs, and how a run takes
them at a step boundary (the call that makes them is ``steering.py``, whose
docstring tells the whole story; docs/dispatcher.md, "Steering a live run")."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.handlers.base import Steers
from switchboard.dispatcher.runs.core.active.lifecycle import Active
from switchboard.dispatcher.runs.core.active.live import Common
from switchboard.dispatcher.runs.core.publishing import Publishing
from switchboard.dispatcher.runs.core.scheduler import Scheduler
from switchboard.dispatcher.runs.core.store import TERMINAL
from switchboard.platform.errors import RunInterrupted
from switchboard.platform.values import names

log = logging.getLogger("switchboard.dispatcher")

_ACCEPTED = pb.STEER_STATE_ACCEPTED


class SteerBook:
    """The steers waiting for this replica's live runs, and their consumption."""

    def __init__(self, *, common: Common, scheduler: Scheduler, publishing: Publishing) -> None:
        self._live = common.live
        self._feeds = common.feeds
        self._scheduler = scheduler
        self._publishing = publishing
        #: Target run name -> its steers' runs, in the order they were accepted.
        self._waiting: dict[str, list[Active]] = {}
        #: Target run name -> set when a steer is accepted for it (RESTART_STREAM waits on it).
        self._arrived: dict[str, asyncio.Event] = {}

    def waiting(self, target: str) -> int:
        """Steers waiting for ``target`` (tests, logs)."""
        return len(self._waiting.get(target, ()))

    def accepted(self, target: Active, steer: Active) -> None:
        """``steer``'s run was admitted: it waits for ``target``, whose watchers hear of it."""
        if target.run.state in TERMINAL:
            return  # ended meanwhile: the steer runs as a queued run when its turn comes
        self._waiting.setdefault(target.run.name, []).append(steer)
        self._publishing.emit(target, _update(steer, _ACCEPTED))
        arrived = self._arrived.get(target.run.name)
        if arrived is not None:
            arrived.set()

    async def arrival(self, target: Active) -> None:
        """Return once a steer waits for ``target``."""
        name = target.run.name
        while not self._waiting.get(name):
            arrived = self._arrived.setdefault(name, asyncio.Event())
            arrived.clear()
            await arrived.wait()

    def relink(self, steer: Active) -> bool:
        """A recovered steer's run: waits for its recovered target again. True when the
        target's journal already holds it (a crash came between): it is completed as
        consumed (``complete``), never run."""
        if not steer.job.steer_target or steer.run.steer.state != _ACCEPTED:
            return False
        target = self._live.runs.get(steer.job.steer_target)
        if target is None or target.run.state in TERMINAL:
            return False  # it runs as a queued run (``starting``)
        for consumed in target.job.consumed_steers:
            if consumed.run == steer.run.name:
                steer.run.steer.step = consumed.step
                return True
        self._waiting.setdefault(target.run.name, []).append(steer)
        return False

    async def complete(self, steer: Active) -> None:
        """Store a recovered steer its target's journal holds as consumed."""
        self._consumed(steer, steer.run.steer.step)
        await self._publishing.persist(steer, "consumed")
        self._close(steer)

    def source(self, target: Active) -> Steers:
        """``HandleCall.steers`` for ``target``."""
        return _RunSteers(self, target)

    def starting(self, steer: Active) -> None:
        """A steer's run starts as an ordinary run: its target never took it."""
        if not steer.job.steer_target:
            return
        waiting = self._waiting.get(steer.job.steer_target)
        if waiting is not None and steer in waiting:
            waiting.remove(steer)
            if not waiting:
                del self._waiting[steer.job.steer_target]
        if steer.run.steer.state == _ACCEPTED:
            _requeued(steer)

    def target_ended(self, target: Active) -> None:
        """``target`` ends with steers it did not take: each runs as a queued run
        when its turn comes; the target's watchers hear so before its end."""
        waiting = self._waiting.pop(target.run.name, None)
        self._arrived.pop(target.run.name, None)
        for steer in waiting or ():
            if steer.run.state != pb.RUN_STATE_QUEUED or steer.run.steer.state != _ACCEPTED:
                continue
            _requeued(steer)
            self._publishing.emit(target, _update(steer, pb.STEER_STATE_REQUEUED))
            # Its own watchers too (stored with its start).
            self._publishing.state_changed(steer)

    async def take(self, target: Active, step: int, discarded_from: int = 0) -> list[cpb.Message]:
        """The steers waiting for ``target``, in order, consumed before its model call
        ``step``; their messages. ``discarded_from``: the first sequence of a model
        call cut for them (RESTART_STREAM), told with the first one's CONSUMED."""
        name = target.run.name
        taken: list[cpb.Message] = []
        while waiting := self._waiting.get(name):
            steer = waiting.pop(0)
            if not waiting:
                del self._waiting[name]
            if (
                steer.run.state != pb.RUN_STATE_QUEUED
                or steer.ticket is None
                or not self._scheduler.withdraw(steer.ticket)
            ):
                continue  # cancelled, or started meanwhile: not the target's
            await self._consume(target, steer, step, 0 if taken else discarded_from)
            taken.append(steer.job.message)
        return taken

    async def _consume(self, target: Active, steer: Active, step: int, discarded_from: int) -> None:
        steer.ticket = None
        consumed = target.job.consumed_steers.add(run=steer.run.name, step=step)
        consumed.message.CopyFrom(steer.job.message)
        self._consumed(steer, step)
        # Under the target's lock: no journal write of the target (the whole job)
        # lands between, and the two rows are one transaction (``RunStore.save``).
        async with target.persisting:
            saved = await self._publishing.persist(
                steer, "consumed", other_job=(target.run_id, target.job.SerializeToString())
            )
        if not saved:
            del target.job.consumed_steers[-1]
            self._close(steer)
            raise RunInterrupted("the dispatcher stopped, or another one took the run over")
        self._close(steer)
        update = _update(steer, pb.STEER_STATE_CONSUMED)
        update.steer.step = step
        update.steer.discarded_from_sequence = discarded_from
        self._publishing.emit(target, update)
        log.info(
            "steer consumed", extra={"run": target.run.name, "steer": steer.run.name, "step": step}
        )

    def _consumed(self, steer: Active, step: int) -> None:
        now = names.now()
        steer.to(pb.RUN_STATE_SUCCEEDED)
        steer.run.steer.state = pb.STEER_STATE_CONSUMED
        steer.run.steer.step = step
        steer.run.steer.decide_time.FromDatetime(now)
        steer.run.end_time.FromDatetime(now)
        self._publishing.release(steer)

    def _close(self, steer: Active) -> None:
        self._feeds.close(steer.feed)
        self._live.runs.pop(steer.run.name, None)


class _RunSteers:
    """``Steers`` of one run (``handlers/base.py``)."""

    def __init__(self, book: SteerBook, target: Active) -> None:
        self._book = book
        self._target = target
        #: The feed's last sequence when the current model call began.
        self._call_start = target.feed.last
        #: The first sequence of a call cut for a steer (0: none cut).
        self._discarded_from = 0

    def journaled(self) -> Sequence[tuple[int, cpb.Message]]:
        return [(c.step, c.message) for c in self._target.job.consumed_steers]

    async def take(self, step: int) -> list[cpb.Message]:
        discarded, self._discarded_from = self._discarded_from, 0
        taken = await self._book.take(self._target, step, discarded)
        self._call_start = self._target.feed.last
        return taken

    @property
    def restart(self) -> bool:
        return self._target.job.steer_mode == pb.STEER_MODE_RESTART_STREAM

    async def arrival(self) -> None:
        await self._book.arrival(self._target)

    def cut(self) -> None:
        # Its deltas were numbered after the call began (each delta is flushed to the
        # feed before the handler's next wait, so they are all there by now).
        if self._target.feed.last > self._call_start:
            self._discarded_from = self._call_start + 1
        runner = self._target.tools
        if runner is not None:
            runner.unsay()


def _requeued(steer: Active) -> None:
    steer.run.steer.state = pb.STEER_STATE_REQUEUED
    steer.run.steer.decide_time.FromDatetime(names.now())


def _update(steer: Active, state: pb.SteerState.ValueType) -> pb.RunUpdate:
    update = pb.RunUpdate()
    update.steer.steer_run = steer.run.name
    update.steer.message = steer.run.input_message
    update.steer.state = state
    return update
