"""The Node.js client (clients/node) across a server restart.

``follow.mjs`` signs in with ``Session`` (lib.mjs) and follows a conversation's events
with ``follow``: the server is stopped and started again as the same deployment
(tests/e2e/restarts.py) while it follows, messages are appended while it is away, and
every event the log holds must reach it exactly once, in order. Its refresh margin is
set above the access token's lifetime, so every (re)subscription first renews the
session: the rotated refresh token must carry it through the restart.

Both of the Node client's streams ask for merged deltas: a follower that replays a run's
events gets its deltas as fewer RUN_UPDATED events, each covering ``firstSequence`` ..
``sequence`` (``follow``), and a watcher that replays an ended run gets them as one update
(``watchRun``, in ``runs.mjs``); the text is whole and no sequence is missing.

The Node client's other examples (smoke, events, runs) run in test_tools.py.
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Final

import pytest
from google.protobuf import struct_pb2

from switchboard.api.context.v1 import context_pb2
from switchboard.api.dispatcher.v1 import dispatcher_pb2
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.procs import ROOT, ServeProcess, tool
from tests.e2e.restarts import (
    Caller,
    position,
    register,
    restart_env,
    restarted,
)
from tests.kits.authkit import PASSWORD, unique_email

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

FOLLOW: Final = ROOT / "clients" / "node" / "follow.mjs"
RUNS: Final = ROOT / "clients" / "node" / "runs.mjs"
#: How long a resume may take, on two busy cores.
SETTLE_S: Final = 60.0

Line = dict[str, Any]


class Follower:
    """``node follow.mjs`` running: its stdout lines (one JSON object each) in order."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [tool("node"), str(FOLLOW), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[Line] = []
        self._incoming: queue.Queue[Line | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self._incoming.put(json.loads(raw))
        self._incoming.put(None)

    def wait_for(self, accept: Callable[[Line], bool], what: str) -> Line:
        """The first line, already read or to come, that ``accept`` takes."""
        for line in self.lines:
            if accept(line):
                return line
        while True:
            try:
                incoming = self._incoming.get(timeout=SETTLE_S)
            except queue.Empty:
                pytest.fail(f"follow.mjs printed no {what} within {SETTLE_S}s: {self.lines}")
            if incoming is None:
                assert self.proc.stderr is not None
                pytest.fail(f"follow.mjs ended before {what}: {self.proc.stderr.read()}")
            self.lines.append(incoming)
            if accept(incoming):
                return incoming

    def events(self) -> list[Line]:
        return [line["event"] for line in self.lines if "event" in line]


@contextmanager
def following(
    server: ServeProcess, email: str, conversation: str, after: str, count: int = 0
) -> Iterator[Follower]:
    """``follow.mjs`` until ``count`` events (0: until the block ends)."""
    follower = Follower(
        [
            server.address,
            "--after",
            after,
            "--email",
            email,
            "--password",
            PASSWORD,
            "--conversation",
            conversation,
            "--count",
            str(count),
            # Above any access token's lifetime: every subscription renews the session.
            "--refresh-margin-ms",
            str(48 * 3600 * 1000),
        ]
    )
    try:
        yield follower
    finally:
        if follower.proc.poll() is None:
            follower.proc.kill()
        follower.proc.wait(timeout=30)


def test_follow_resumes_across_a_server_restart_with_every_event_once(tmp_path: Path) -> None:
    # A stop waits out the grace while the follower's stream is open (docs/operations.md,
    # "Shutdown"): a short one keeps the restart short.
    env = restart_env(tmp_path, "node-client-e2e", SWITCHBOARD_SHUTDOWN_GRACE_S="0.5")
    email = unique_email("node-follow")
    with ExitStack() as stack:
        first = stack.enter_context(ServeProcess(env=env))
        register(first, email)
        python = stack.enter_context(Caller(first, email))
        conversation = python.conversation()
        # From the conversation's creation on: what the log holds after it is what counts.
        start = python.logged(conversation, "")[-1].cursor
        follower = stack.enter_context(following(first, email, conversation, start, count=6))
        live = follower.wait_for(lambda line: line.get("state") == "live", "a live stream")
        before = [python.append(conversation, f"before {i}") for i in range(3)]
        follower.wait_for(lambda line: len(follower.events()) == 3, "the first 3 events")

        assert first.terminate() == 0
        follower.wait_for(lambda line: line.get("state") == "reconnecting", "a reconnect")
        second = restarted(stack, first, env)
        python = stack.enter_context(Caller(second, email))
        after = [python.append(conversation, f"after {i}") for i in range(3)]
        resumed = follower.wait_for(
            lambda line: line.get("state") == "live" and line is not live, "a resumed stream"
        )
        assert follower.proc.wait(timeout=SETTLE_S) == 0
        follower.wait_for(lambda line: len(follower.events()) == 6, "all 6 events")
        logged = python.logged(conversation, start)
        stored = [python.text_of(name) for name in before + after]

    assert live["cursor"] == start
    delivered = follower.events()
    assert [e["id"] for e in delivered] == [e.id for e in logged]
    assert [e["text"] for e in delivered] == stored
    assert stored == [f"before {i}" for i in range(3)] + [f"after {i}" for i in range(3)]
    positions = [position(e["cursor"]) for e in delivered]
    assert positions == sorted(set(positions))
    # It resumed after the last position it had, not from the live tail.
    assert resumed["cursor"] != ""
    assert position(resumed["cursor"]) >= position(delivered[2]["cursor"])
    # One renewal per subscription: the rotated refresh token outlived the restart.
    assert sum("refreshed" in line for line in follower.lines) == 2


def _covered(updates: list[Line]) -> list[int]:
    """Every sequence the updates cover, in order (a merged one all of its own)."""
    return [n for u in updates for n in range(u["firstSequence"], u["sequence"] + 1)]


def _answered(caller: Caller, conversation: str, text: str) -> list[dispatcher_pb2.RunUpdate]:
    """Send ``text`` to the echo handler (a pause between words: a delta each) and watch
    the run to its end one update at a time; its updates."""
    sent = caller.dispatcher.SendMessage(
        dispatcher_pb2.SendMessageRequest(
            conversation=conversation,
            message=context_pb2.Message(parts=[context_pb2.ContentPart(text=text)]),
            handler="handlers/echo",
            parameters=struct_pb2.Struct(fields={"delay_ms": struct_pb2.Value(number_value=20)}),
        ),
        metadata=caller.md,
        timeout=CALL_DEADLINE_S,
    )
    watch = caller.dispatcher.WatchRun(
        dispatcher_pb2.WatchRunRequest(name=sent.run.name), metadata=caller.md, timeout=SETTLE_S
    )
    updates = [frame.update for frame in watch if frame.WhichOneof("frame") == "update"]
    assert updates[-1].state_change.run.state == dispatcher_pb2.RUN_STATE_SUCCEEDED
    return updates


@pytest.fixture(scope="module")
def server() -> Iterator[ServeProcess]:
    """One dev-mode server for the tests that neither stop nor restart theirs: each
    test's runs are a user's of its own."""
    with ServeProcess("--dev") as served:
        yield served


def test_a_follower_replaying_a_run_gets_its_deltas_merged(server: ServeProcess) -> None:
    """A follower that starts before a run it missed gets the run's updates from the
    process's ring (its deltas too, which the log does not keep), its deltas merged."""
    email = unique_email("node-merged")
    register(server, email)
    with Caller(server, email) as python:
        conversation = python.conversation()
        start = python.logged(conversation, "")[-1].cursor
        one_by_one = _answered(python, conversation, "one two three four five six seven")
        run = one_by_one[0].run
        with following(server, email, conversation, start) as follower:
            follower.wait_for(
                lambda line: (
                    line.get("event", {}).get("update", {}).get("state") == "RUN_STATE_SUCCEEDED"
                ),
                "the run's last update",
            )
    updates = [e["update"] for e in follower.events() if e.get("update", {}).get("run") == run]
    deltas = [u for u in one_by_one if u.WhichOneof("update") == "delta"]
    merged = [u for u in updates if u["kind"] == "delta"]
    # The replay came in batches: the run's deltas in fewer events, one covering several.
    assert len(deltas) > 1
    assert len(merged) < len(deltas), updates
    assert any(u["firstSequence"] < u["sequence"] for u in merged)
    # Nothing lost, nothing twice: every sequence of the run, in order, and the text whole.
    assert _covered(updates) == [u.sequence for u in one_by_one]
    assert "".join(u["delta"] for u in merged) == "".join(u.delta.text for u in deltas)


def test_watch_run_replays_a_runs_deltas_merged(server: ServeProcess) -> None:
    """``runs.mjs`` watches the run it conversed with again from its start (``watchRun``):
    the deltas it got one by one on the Converse stream come as one update."""
    done = subprocess.run(
        [tool("node"), str(RUNS), server.address],
        capture_output=True,
        text=True,
        timeout=SETTLE_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    first, replay = result["first"], result["replay"]
    assert replay["answer"] == first["answer"]
    # Sent one by one on Converse, which relays the runs it started unmerged.
    assert len(first["sequences"]) > 3
    deltas = [u for u in replay["updates"] if u["kind"] == "delta"]
    assert len(deltas) == 1
    assert deltas[0]["firstSequence"] < deltas[0]["sequence"]
    assert _covered(replay["updates"]) == first["sequences"]
    assert replay["updates"][-1]["kind"] == "stateChange"
