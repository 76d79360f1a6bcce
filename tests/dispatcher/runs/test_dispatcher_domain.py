"""The dispatcher's domain without gRPC: a run's lifecycle, paused runs in the
scheduler, routing to a workspace's own handlers, and what a feed keeps.

tests/dispatcher/runs/test_dispatcher_scheduling.py covers fairness, queue bounds and the
operator's routing rules; tests/dispatcher/runs/intake/test_dispatcher_content.py the content
policy.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import pytest

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.handlers.base import Handler
from switchboard.dispatcher.handlers.echo import EchoHandler
from switchboard.dispatcher.handlers.router import Registry, Router, Routes
from switchboard.dispatcher.runs.core.active.feed import Feeds
from switchboard.dispatcher.runs.core.active.lifecycle import Active, IllegalTransition
from switchboard.dispatcher.runs.core.scheduler import CapacityLimits, Scheduler, Ticket
from switchboard.internal.dispatcher.v1 import job_pb2
from switchboard.platform.errors import (
    CursorExpired,
    DependencyUnavailable,
    InvalidArgument,
    QueueFull,
)
from switchboard.platform.security.policy import ALL_SCOPES, AuthMethod, Principal
from tests.dispatcher.runs.test_dispatcher_scheduling import Named, Recorder, message

pytestmark = pytest.mark.unit

# -- the lifecycle ------------------------------------------------------------------------

QUEUED = pb.RUN_STATE_QUEUED
RUNNING = pb.RUN_STATE_RUNNING
PAUSED = pb.RUN_STATE_REQUIRES_ACTION
SUCCEEDED = pb.RUN_STATE_SUCCEEDED
ENDS = (pb.RUN_STATE_FAILED, pb.RUN_STATE_CANCELLED, pb.RUN_STATE_DEADLINE_EXCEEDED)
STATES = (QUEUED, RUNNING, PAUSED, SUCCEEDED, *ENDS)
#: The diagram of dispatcher/runs/core/active/lifecycle.py, written out: each state's next states.
DIAGRAM = {
    # SUCCEEDED from QUEUED: a steer's run, consumed by the run it steers.
    QUEUED: {RUNNING, SUCCEEDED, *ENDS},
    RUNNING: {SUCCEEDED, PAUSED, QUEUED, *ENDS},
    PAUSED: {RUNNING, QUEUED, *ENDS},
}


def active(state: pb.RunState.ValueType) -> Active:
    run = pb.Run(name="workspaces/w/conversations/c/runs/r", state=state)
    return Active(
        run=run,
        run_id="r",
        workspace_id="w",
        conversation_id="c",
        principal=Principal(user_id="u", auth_method=AuthMethod.PASSWORD, scopes=ALL_SCOPES),
        handler=EchoHandler(),
        job=job_pb2.RunJob(),
        feed=Feeds(retention_s=60, max_updates=10).open(run.name),
    )


@pytest.mark.parametrize(
    ("start", "to"),
    list(itertools.product(STATES, STATES)),
    ids=lambda state: pb.RunState.Name(state).removeprefix("RUN_STATE_"),
)
def test_a_run_moves_only_along_the_lifecycle(
    start: pb.RunState.ValueType, to: pb.RunState.ValueType
) -> None:
    run = active(start)
    if to in DIAGRAM.get(start, set()):
        run.to(to)
        assert run.run.state == to
        return
    with pytest.raises(IllegalTransition) as refused:
        run.to(to)
    assert run.run.state == start  # a refused move changes nothing
    names = (pb.RunState.Name(start), pb.RunState.Name(to))
    assert f"{names[0]} -> {names[1]}" in str(refused.value)


def test_a_run_that_waits_for_a_person_resumes_and_succeeds() -> None:
    run = active(QUEUED)
    for state in (RUNNING, PAUSED, RUNNING, PAUSED, QUEUED, RUNNING, SUCCEEDED):
        run.to(state)
    assert run.run.state == SUCCEEDED


# -- paused runs in the scheduler -----------------------------------------------------------


def ticket(rec: Recorder, run: str, conversation: str, workspace: str = "w") -> Ticket:
    return Ticket(run_id=run, workspace=workspace, conversation=conversation, start=rec)


def started(rec: Recorder) -> list[str]:
    return [t.run_id for t in rec.started]


def test_a_paused_run_frees_its_slot_but_keeps_its_conversation_busy() -> None:
    rec = Recorder()
    sched = Scheduler(limits=CapacityLimits(1, 1, 10, 10))
    first, same, other = ticket(rec, "1", "c"), ticket(rec, "2", "c"), ticket(rec, "3", "d")
    for each in (first, same, other):
        sched.admit(each)
    assert started(rec) == ["1"]
    sched.paused(first)
    # The slot goes to another conversation; the paused one's next message waits.
    assert started(rec) == ["1", "3"]
    assert (sched.running, sched.waiting, sched.queued) == (1, 1, 1)
    assert sched.active_in("c") == ["1", "2"]


def test_a_resumed_run_takes_its_slot_back_past_the_limits() -> None:
    rec = Recorder()
    sched = Scheduler(limits=CapacityLimits(1, 1, 10, 10))
    first, other, later = ticket(rec, "1", "c"), ticket(rec, "2", "d"), ticket(rec, "3", "e")
    for each in (first, other):
        sched.admit(each)
    sched.paused(first)
    sched.resumed(first)
    assert (sched.running, sched.waiting) == (2, 0)  # over max_running: it was under way
    sched.admit(later)
    sched.finished(first)
    assert started(rec) == ["1", "2"]  # still one over the limit after the first ends
    sched.finished(other)
    assert started(rec) == ["1", "2", "3"]


def test_a_run_that_ends_while_paused_lets_its_conversation_go_on() -> None:
    rec = Recorder()
    sched = Scheduler(limits=CapacityLimits(1, 1, 10, 10))
    first, same = ticket(rec, "1", "c"), ticket(rec, "2", "c")
    sched.admit(first)
    sched.admit(same)
    sched.paused(first)
    assert started(rec) == ["1"]  # a free slot, but the conversation is busy
    sched.finished(first)
    assert started(rec) == ["1", "2"]
    assert sched.waiting == 0


def test_a_verdict_on_a_ticket_in_no_such_state_changes_nothing() -> None:
    rec = Recorder()
    sched = Scheduler(limits=CapacityLimits(1, 1, 10, 10))
    running, queued = ticket(rec, "1", "c"), ticket(rec, "2", "d")
    sched.admit(running)
    sched.admit(queued)
    sched.resumed(running)  # never paused
    sched.paused(queued)  # not running
    sched.finished(queued)  # not started
    assert (sched.running, sched.waiting, sched.queued) == (1, 0, 1)
    assert started(rec) == ["1"]


def test_a_forced_admission_passes_the_queue_bounds() -> None:
    rec = Recorder()
    sched = Scheduler(limits=CapacityLimits(1, 1, 1, 1))
    sched.admit(ticket(rec, "1", "c"))
    sched.admit(ticket(rec, "2", "d"))
    with pytest.raises(QueueFull):
        sched.check_room("w")
    with pytest.raises(QueueFull):
        sched.admit(ticket(rec, "3", "e"))
    assert sched.queued == 1  # a refused ticket is not queued
    # A run recovered after a restart was admitted once already: it queues anyway.
    sched.admit(ticket(rec, "4", "f"), force=True)
    assert sched.queued == 2


# -- routing to a workspace's own handlers ------------------------------------------------


class Experts:
    """Each workspace's own handlers, as ``WorkspaceHandlers`` gives them."""

    def __init__(self, by_workspace: Mapping[str, Mapping[str, Handler]]) -> None:
        self._by_workspace = by_workspace

    async def of(self, workspace_id: str) -> Mapping[str, Handler]:
        return self._by_workspace.get(workspace_id, {})


def router_with_experts(routes: str = "") -> tuple[Router, Named, Named]:
    registry = Registry()
    operator_echo = Named("echo")
    registry.add(operator_echo)
    registry.add(Named("code"))
    expert = Named("billing-bot")
    experts = Experts({"w": {"billing-bot": expert, "echo": Named("echo")}})
    return Router(registry, Routes.parse(routes), "echo", experts), operator_echo, expert


async def test_an_operator_handler_wins_an_id_a_workspace_also_claims() -> None:
    route, operator_echo, expert = router_with_experts()
    assert await route.find("w", "echo") is operator_echo
    assert await route.find("w", "billing-bot") is expert
    assert await route.find("elsewhere", "billing-bot") is None
    listed = await route.listed("w")
    assert [h.capabilities.id for h in listed] == ["billing-bot", "code", "echo"]
    assert listed[2] is operator_echo


async def test_a_workspace_expert_is_chosen_by_name_or_command_in_its_workspace_only() -> None:
    route, _, expert = router_with_experts()
    local = await route.local("w")
    assert route.choose("handlers/billing-bot", "w", message("x"), local).handler is expert
    choice = route.choose("", "w", message("/billing-bot refund me"), local)
    assert (choice.handler, choice.strip_prefix) == (expert, "/billing-bot")
    with pytest.raises(InvalidArgument) as unknown:
        route.choose("handlers/billing-bot", "v", message("x"), await route.local("v"))
    assert [v.field for v in unknown.value.violations] == ["handler"]
    # A command for a handler this workspace lacks is plain text for the default.
    assert route.choose("", "v", message("/billing-bot hi")).reason == "the default handler"


def test_an_unknown_handler_in_metadata_names_that_field() -> None:
    route, _, _ = router_with_experts()
    with pytest.raises(InvalidArgument) as refused:
        route.choose("", "w", message("x", handler="handlers/nope"))
    assert [v.field for v in refused.value.violations] == ["message.metadata.handler"]


def test_implicit_rules_skip_an_unavailable_handler() -> None:
    route, _, _ = router_with_experts("/fix=code,type:text/*=code,workspace:w=code")
    code = route.registry.get("code")
    assert isinstance(code, Named)
    assert route.choose("", "v", message("plain")).reason == "content type text/plain"
    code.up = False
    # Only an explicit choice of a handler that is down is an error; a rule moves on.
    for text, workspace in (("plain", "v"), ("/fix it", "v"), ("plain", "w")):
        assert route.choose("", workspace, message(text)).reason == "the default handler"
    with pytest.raises(DependencyUnavailable):
        route.choose("handlers/code", "v", message("x"))


# -- what a feed keeps -------------------------------------------------------------------------


async def test_a_watcher_behind_what_a_feed_keeps_is_told_where_it_starts() -> None:
    feeds = Feeds(retention_s=60, max_updates=4)
    feed = feeds.open("runs/1")
    for _ in range(5):
        feed.append(pb.RunUpdate())
    assert feed.first == 2  # the fifth update dropped the first
    with pytest.raises(CursorExpired) as expired:
        await anext(feed.follow(0, heartbeat_s=60))
    assert expired.value.metadata == {"oldest_sequence": "2"}
    feeds.close(feed)
    assert [u.sequence async for u in feed.follow(1, heartbeat_s=60) if u] == [2, 3, 4, 5]


async def test_an_idle_feed_sends_heartbeats_until_the_next_update() -> None:
    feeds = Feeds(retention_s=60, max_updates=10)
    feed = feeds.open("runs/1")
    follower = feed.follow(0, heartbeat_s=0.01)
    assert await anext(follower) is None
    feed.append(pb.RunUpdate())
    update = await anext(follower)
    assert update is not None
    assert (update.run, update.sequence, update.HasField("time")) == ("runs/1", 1, True)
    feeds.close(feed)
    assert [u async for u in follower] == []


def test_without_retention_a_finished_feed_is_not_kept() -> None:
    feeds = Feeds(retention_s=0, max_updates=10)
    feed = feeds.open("runs/1")
    assert feeds.get("runs/1") is feed
    feeds.close(feed)
    assert feeds.get("runs/1") is None
