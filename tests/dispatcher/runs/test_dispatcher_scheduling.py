"""The scheduler (limits, fairness, one run per conversation), the router and
the run feed, as pure domain objects."""

from __future__ import annotations

import asyncio
import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.handlers.echo import EchoHandler
from switchboard.dispatcher.handlers.router import Registry, Router, Routes
from switchboard.dispatcher.runs.core.active.feed import Feeds
from switchboard.dispatcher.runs.core.scheduler import CapacityLimits, Scheduler, Ticket
from switchboard.platform.errors import DependencyUnavailable, InvalidArgument, QueueFull

pytestmark = pytest.mark.unit


class Recorder:
    def __init__(self) -> None:
        self.started: list[Ticket] = []

    def __call__(self, ticket: Ticket) -> None:
        self.started.append(ticket)


def ticket(rec: Recorder, run: str, ws: str, conv: str) -> Ticket:
    return Ticket(run_id=run, workspace=ws, conversation=conv, start=rec)


def limits(
    running: int = 2, per_ws: int = 2, queued: int = 100, per_ws_q: int = 100
) -> CapacityLimits:
    return CapacityLimits(running, per_ws, queued, per_ws_q)


def test_workspaces_take_turns_however_many_runs_one_queues() -> None:
    rec = Recorder()
    sched = Scheduler(limits=limits(running=1, per_ws=1))
    for i in range(50):
        sched.admit(ticket(rec, f"big{i}", "big", f"big-c{i}"))
    sched.admit(ticket(rec, "small0", "small", "small-c0"))
    sched.admit(ticket(rec, "small1", "small", "small-c1"))
    # big0 is running; each finish hands the next turn to the other workspace.
    order = []
    while rec.started:
        current = rec.started.pop(0)
        order.append(current.run_id)
        sched.finished(current)
        if len(order) == 6:
            break
    assert order == ["big0", "small0", "big1", "small1", "big2", "big3"]


def test_one_conversation_runs_one_run_at_a_time_in_order() -> None:
    rec = Recorder()
    sched = Scheduler(limits=limits(running=10, per_ws=10))
    for i in range(3):
        sched.admit(ticket(rec, f"r{i}", "w", "c"))
    sched.admit(ticket(rec, "other", "w", "d"))
    assert [t.run_id for t in rec.started] == ["r0", "other"]
    sched.finished(rec.started[0])
    assert [t.run_id for t in rec.started] == ["r0", "other", "r1"]
    assert sched.active_in("c") == ["r1", "r2"]


def test_a_conversation_s_line_and_each_change_of_it_are_told() -> None:
    """What ``waiting.py`` reads to say what a queued run waits behind (issue 79): the
    run holding the conversation, paused included, and those queued, in order; and a
    word after every transition that changed a line."""
    rec = Recorder()
    sched = Scheduler(limits=limits(running=10, per_ws=10))
    told: list[tuple[str, str]] = []
    sched.on_change = lambda ws, conv: told.append((ws, conv))
    first, second, third = (ticket(rec, f"r{i}", "w", "c") for i in range(3))
    sched.admit(first)
    assert told == [("w", "c")]
    sched.admit(second)
    sched.admit(third)
    assert sched.line("w", "c") == (first, [second, third])
    told.clear()
    sched.paused(first)  # waits for a person: it still holds the conversation
    assert told == [("w", "c")]
    assert sched.line("w", "c") == (first, [second, third])
    told.clear()
    sched.resumed(first)
    assert told == [("w", "c")]
    told.clear()
    sched.finished(first)
    assert told == [("w", "c")]  # once, though it freed the line and started the next
    assert sched.line("w", "c") == (second, [third])
    told.clear()
    assert sched.withdraw(third)
    assert told == [("w", "c")]
    assert sched.line("w", "c") == (second, [])
    sched.finished(second)
    assert sched.line("w", "c") == (None, [])
    assert sched.line("elsewhere", "c") == (None, [])


def test_limits_global_and_per_workspace() -> None:
    rec = Recorder()
    sched = Scheduler(limits=limits(running=3, per_ws=2, queued=4, per_ws_q=3))
    for i in range(3):
        sched.admit(ticket(rec, f"a{i}", "a", f"a{i}"))
    assert [t.run_id for t in rec.started] == ["a0", "a1"]  # per workspace: 2
    sched.admit(ticket(rec, "b0", "b", "b0"))
    assert [t.run_id for t in rec.started] == ["a0", "a1", "b0"]  # global: 3
    sched.admit(ticket(rec, "a3", "a", "a3"))
    sched.admit(ticket(rec, "a4", "a", "a4"))
    with pytest.raises(QueueFull) as caught:
        sched.admit(ticket(rec, "a5", "a", "a5"))
    assert caught.value.subject == "dispatcher_max_queued_per_workspace"
    sched.admit(ticket(rec, "b1", "b", "b1"))
    with pytest.raises(QueueFull) as caught:
        sched.admit(ticket(rec, "b2", "b", "b2"))
    assert caught.value.subject == "dispatcher_max_queued"
    assert sched.queued == 4


def test_withdraw_removes_a_queued_ticket_only() -> None:
    rec = Recorder()
    sched = Scheduler(limits=limits(running=1))
    first, second = ticket(rec, "1", "w", "c1"), ticket(rec, "2", "w", "c2")
    sched.admit(first)
    sched.admit(second)
    assert not sched.withdraw(first)  # running
    assert sched.withdraw(second)
    assert not sched.withdraw(second)
    sched.finished(first)
    assert [t.run_id for t in rec.started] == ["1"]
    assert sched.queued == 0


@settings(max_examples=200, deadline=None)
@given(
    runs=st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from("xyz")), max_size=40),
    max_running=st.integers(1, 4),
    per_ws=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_every_admitted_run_starts_once_within_limits(
    runs: list[tuple[str, str]], max_running: int, per_ws: int, seed: int
) -> None:
    rec = Recorder()
    sched = Scheduler(limits=limits(running=max_running, per_ws=per_ws, queued=1000, per_ws_q=1000))
    order: dict[str, list[str]] = {}
    for index, (ws, conv) in enumerate(runs):
        name = f"{index}"
        order.setdefault(ws + conv, []).append(name)
        sched.admit(ticket(rec, name, ws, ws + conv))
    rng = random.Random(seed)  # noqa: S311 - a test shuffle, not security
    running: list[Ticket] = []
    started: list[str] = []
    while True:
        running.extend(rec.started)
        started.extend(t.run_id for t in rec.started)
        rec.started.clear()
        assert len(running) <= max_running
        for ws in "abc":
            assert sum(1 for t in running if t.workspace == ws) <= per_ws
        conversations = [t.conversation for t in running]
        assert len(conversations) == len(set(conversations))
        if not running:
            break
        done = running.pop(rng.randrange(len(running)))
        sched.finished(done)
    assert sorted(started, key=int) == [str(i) for i in range(len(runs))]
    for names in order.values():
        assert [n for n in started if n in names] == names  # in order per conversation


# -- routing ---------------------------------------------------------------------------------


class Named(EchoHandler):
    def __init__(self, handler_id: str, *, up: bool = True) -> None:
        super().__init__()
        self._capabilities = pb.Handler().capabilities
        self._capabilities.id = handler_id
        self.up = up

    def available(self) -> bool:
        return self.up


def message(text: str = "", *, mime: str = "", handler: str = "") -> cpb.Message:
    built = cpb.Message()
    if text:
        built.parts.add(text=text)
    if mime:
        built.parts.add(file=cpb.FileReference(uri="s3://x", mime_type=mime))
    if handler:
        built.metadata.update({"handler": handler})
    return built


def router(default: str = "echo", routes: str = "") -> tuple[Router, dict[str, Named]]:
    registry = Registry()
    handlers = {name: Named(name) for name in ("echo", "vision", "billing", "code")}
    for handler in handlers.values():
        registry.add(handler)
    return Router(registry, Routes.parse(routes), default), handlers


def test_routing_rules_in_order() -> None:
    route, handlers = router(routes="/bill=billing,type:image/*=vision,workspace:w2=code")
    pick = route.choose
    assert pick("handlers/billing", "w", message("/code x")).reason == "named in the request"
    assert pick("", "w", message("hi", handler="billing")).handler is handlers["billing"]
    assert pick("", "w", message("see", mime="image/png")).handler is handlers["vision"]
    choice = pick("", "w", message("/bill me now"))
    assert choice.handler is handlers["billing"]
    assert choice.strip_prefix == "/bill"
    assert pick("", "w", message("/code it")).handler is handlers["code"]  # /<handler-id>
    assert pick("", "w2", message("plain")).handler is handlers["code"]
    assert pick("", "w", message("plain")).handler is handlers["echo"]
    assert pick("", "w", message("/unknown words")).handler is handlers["echo"]


def test_an_explicit_choice_is_never_silently_replaced() -> None:
    route, handlers = router()
    with pytest.raises(InvalidArgument):
        route.choose("handlers/nope", "w", message("x"))
    handlers["billing"].up = False
    with pytest.raises(DependencyUnavailable):
        route.choose("handlers/billing", "w", message("x"))
    # The default down: any available handler answers, and says why.
    handlers["echo"].up = False
    choice = route.choose("", "w", message("x"))
    assert choice.handler.available()
    assert "unavailable" in choice.reason
    for handler in handlers.values():
        handler.up = False
    with pytest.raises(DependencyUnavailable):
        route.choose("", "w", message("x"))


@pytest.mark.parametrize(
    "text", ["nonsense", "/x=", "type:=echo", "/a b=echo", "workspace:=echo", "/ok=Bad_Id"]
)
def test_malformed_routes_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="route"):
        Routes.parse(text)


def test_two_handlers_cannot_share_an_id() -> None:
    registry = Registry()
    registry.add(Named("echo"))
    with pytest.raises(ValueError, match="two handlers"):
        registry.add(Named("echo"))


# -- the feed ------------------------------------------------------------------------------


async def test_a_feed_numbers_updates_and_wakes_every_watcher() -> None:
    feeds = Feeds(retention_s=60, max_updates=1000)
    feed = feeds.open("runs/1")

    async def watch(after: int) -> list[int]:
        return [u.sequence async for u in feed.follow(after, heartbeat_s=60) if u is not None]

    watchers = [asyncio.create_task(watch(after)) for after in (0, 0, 2)]
    await asyncio.sleep(0)  # every watcher is waiting on the feed now
    for _ in range(5):
        feed.append(pb.RunUpdate())
    feeds.close(feed)
    assert await asyncio.gather(*watchers) == [[1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [3, 4, 5]]
    assert feeds.get("runs/1") is feed  # kept for late watchers


async def test_a_long_feed_drops_its_oldest_updates() -> None:
    feeds = Feeds(retention_s=60, max_updates=10)
    feed = feeds.open("runs/2")
    for _ in range(25):
        feed.append(pb.RunUpdate())
    assert feed.last == 25
    assert feed.first > 1
    kept = [u.sequence for u in feed.updates]
    assert kept == list(range(feed.first, 26))
    feeds.close(feed)
    tail = [u.sequence async for u in feed.follow(20, heartbeat_s=60) if u is not None]
    assert tail == [21, 22, 23, 24, 25]


def test_finished_feeds_expire_by_count() -> None:
    feeds = Feeds(retention_s=3600, max_updates=10, max_feeds=3)
    for index in itertools.count():
        if index == 5:
            break
        feeds.close(feeds.open(f"runs/{index}"))
    assert [feeds.get(f"runs/{i}") is not None for i in range(5)] == [
        False,
        False,
        True,
        True,
        True,
    ]
