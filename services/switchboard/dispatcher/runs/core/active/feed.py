"""Each run's ordered updates, kept in memory for its watchers.

A run's updates are numbered from 1 without gaps; a watcher replays those
after the sequence it last saw and then waits for more. A finished run's feed
stays for ``retention_s`` (bounded by ``max_feeds``) so a watcher that
reconnects a little late still gets everything; after that, WatchRun answers
from the stored run (``queries.py``).

Appending never waits on a watcher: each watcher wakes on a shared
``asyncio.Event`` per run and reads what it has not yet seen.

A watcher that asked for merged deltas (``WatchRunRequest.merge_deltas``) gets
the text deltas that are ready for it when it reads, one after the other, as
one update (``merged_delta``): a watcher that is behind takes fewer, larger
frames, and a watcher that keeps up gets each delta as it is.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.platform.errors import CursorExpired
from switchboard.platform.events.deltas import delta_stretch, merge_into
from switchboard.platform.values.names import stamp_after


def merged_delta(updates: Sequence[pb.RunUpdate], start: int) -> tuple[pb.RunUpdate, int]:
    """The update at ``start`` and the index after what it covers: when it and the
    updates after it are text deltas that merge (``platform/events/deltas.py``), them
    joined into one (``first_sequence`` .. ``sequence``, the last one's time); otherwise
    itself. The updates are shared with other watchers: a merge is a new message."""
    end = delta_stretch(updates, start)
    first = updates[start]
    if end == start + 1:
        return first, end
    last = updates[end - 1]
    merged = pb.RunUpdate(run=first.run, sequence=last.sequence, time=last.time)
    merge_into(merged, updates[start:end])
    return merged, end


def merge_deltas(updates: Sequence[pb.RunUpdate]) -> list[pb.RunUpdate]:
    """``updates`` (one run's, in order, ready to go out together) with each stretch
    of consecutive text deltas merged (``merged_delta``)."""
    out: list[pb.RunUpdate] = []
    index = 0
    while index < len(updates):
        update, index = merged_delta(updates, index)
        out.append(update)
    return out


class Feed:
    """One run's updates."""

    __slots__ = (
        "_base",
        "_last_stamp",
        "_waiters",
        "done",
        "ended_at",
        "first",
        "max_updates",
        "run",
        "updates",
    )

    def __init__(
        self,
        run: str,
        *,
        max_updates: int,
        first: int = 1,
        not_before_ns: int = 0,
        opening: pb.RunUpdate | None = None,
    ) -> None:
        """``opening``: the run as it stood just before ``first`` (a state change), for a
        feed that does not begin with one (a run recovered while it was queued)."""
        self.run = run
        self.updates: list[pb.RunUpdate] = []
        # Sequence of updates[0]; later than 1 once old deltas were dropped.
        self.first = first
        # The last state change before updates[0] (``opening``).
        self._base = opening
        # The latest stamp given (ns since the epoch): stamps never go backwards
        # within a run, though the wall clock may step back (NTP) and a run taken
        # over continues on another host's clock (``not_before_ns``: its stored state).
        self._last_stamp = not_before_ns
        self.done = False
        self.ended_at = 0.0
        self.max_updates = max_updates
        #: One future per follower waiting for the next update (``follow``).
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def last(self) -> int:
        return self.first + len(self.updates) - 1

    def append(self, update: pb.RunUpdate) -> pb.RunUpdate:
        """Number and stamp ``update`` and keep it; returns it."""
        update.run = self.run
        update.sequence = self.last + 1
        self._last_stamp = stamp_after(update.time, self._last_stamp)
        self._keep(update)
        return update

    def append_as_logged(self, update: pb.RunUpdate) -> bool:
        """Keep ``update`` with the sequence and stamp it already has (an end logged in
        its own save's transaction: the log's copy carries both) when they follow what
        the feed holds; else number and stamp it as ``append`` does. Whether kept as is."""
        stamp_ns = update.time.seconds * 1_000_000_000 + update.time.nanos
        if update.sequence != self.last + 1 or stamp_ns < self._last_stamp:
            self.append(update)
            return False
        update.run = self.run
        self._last_stamp = stamp_ns
        self._keep(update)
        return True

    def _keep(self, update: pb.RunUpdate) -> None:
        self.updates.append(update)
        if len(self.updates) > self.max_updates:
            # Keep memory bounded on endless streams: a watcher that far behind
            # gets OUT_OF_RANGE and can re-read the run's final state.
            drop = len(self.updates) // 4
            updates = self.updates
            for index in range(drop - 1, -1, -1):
                if updates[index].HasField("state_change"):
                    self._base = updates[index]
                    break
            del updates[:drop]
            self.first += drop
        self._wake()

    def opening(self) -> pb.RunUpdate | None:
        """What a watcher behind the feed's start (after a sequence before ``first - 1``)
        gets before the updates kept: the run as it stood just before ``first``, as its
        last state change there said (numbered ``first - 1``, stamped as it was). None when
        the first update kept is itself a state change, which stands for what came before
        (a recovered run's attempt opens with one), or when nothing before it is known."""
        updates = self.updates
        base = self._base
        if base is None or (updates and updates[0].HasField("state_change")):
            return None
        opening = pb.RunUpdate(run=self.run, sequence=self.first - 1)
        opening.time.CopyFrom(base.time)
        run = opening.state_change.run
        run.CopyFrom(base.state_change.run)
        run.last_sequence = self.first - 1
        return opening

    def finish(self) -> None:
        self.done = True
        self.ended_at = time.monotonic()
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def follow(
        self, after: int, *, heartbeat_s: float, merge: bool = False
    ) -> AsyncIterator[pb.RunUpdate | None]:
        """Updates after ``after`` until the run ends; ``None`` when idle for ``heartbeat_s``.

        ``merge``: the text deltas ready when the watcher reads go out as one."""
        if after < self.first - 1:
            raise CursorExpired(
                f"updates up to {self.first - 1} of this run are no longer kept; "
                "resume from the run's current state",
                metadata={"oldest_sequence": str(self.first)},
            )
        position = after
        loop = asyncio.get_running_loop()
        # The heartbeat's timer is armed once per heartbeat period, not once per wait: a
        # streamed token wakes every follower, and a timer each time cost more than the wait.
        quiet_since = loop.time()
        timer: asyncio.TimerHandle | None = None
        waiter: asyncio.Future[None] | None = None

        def beat() -> None:
            nonlocal timer
            timer = None
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

        try:
            while True:
                while position < self.last:
                    index = position + 1 - self.first
                    if index < 0:
                        raise CursorExpired(
                            "the watcher fell too far behind this run's updates",
                            metadata={"oldest_sequence": str(self.first)},
                        )
                    update = self.updates[index]
                    if merge and update.HasField("delta"):
                        update = merged_delta(self.updates, index)[0]
                    position = update.sequence
                    yield update
                    quiet_since = loop.time()
                if self.done:
                    return
                due = quiet_since + heartbeat_s
                if loop.time() >= due:
                    yield None
                    quiet_since = loop.time()
                    continue
                if timer is None:
                    timer = loop.call_at(due, beat)
                waiter = loop.create_future()
                self._waiters.append(waiter)
                await waiter
        finally:
            if timer is not None:
                timer.cancel()
            if waiter is not None and not waiter.done():
                waiter.cancel()


class Feeds:
    """The feeds of this process's active and recently finished runs."""

    def __init__(self, *, retention_s: float, max_updates: int, max_feeds: int = 2_000) -> None:
        self._retention_s = retention_s
        self._max_updates = max_updates
        self._max_feeds = max_feeds
        self._active: dict[str, Feed] = {}
        self._finished: OrderedDict[str, Feed] = OrderedDict()

    def open(
        self,
        run: str,
        *,
        first: int = 1,
        not_before_ns: int = 0,
        opening: pb.RunUpdate | None = None,
    ) -> Feed:
        feed = Feed(
            run,
            max_updates=self._max_updates,
            first=first,
            not_before_ns=not_before_ns,
            opening=opening,
        )
        self._active[run] = feed
        return feed

    def get(self, run: str) -> Feed | None:
        self._expire()
        return self._active.get(run) or self._finished.get(run)

    def close(self, feed: Feed) -> None:
        feed.finish()
        self._active.pop(feed.run, None)
        if self._retention_s > 0:
            self._finished[feed.run] = feed
        self._expire()

    def _expire(self) -> None:
        cutoff = time.monotonic() - self._retention_s
        finished = self._finished
        while finished:
            run, feed = next(iter(finished.items()))
            if feed.ended_at >= cutoff and len(finished) <= self._max_feeds:
                break
            del finished[run]
