"""The Node.js client (clients/node) across a server restart.

``follow.mjs`` signs in with ``Session`` (lib.mjs) and follows a conversation's events
with ``follow``: the server is stopped and started again as the same deployment
(tests/e2e/restarts.py) while it follows, messages are appended while it is away, and
every event the log holds must reach it exactly once, in order. Its refresh margin is
set above the access token's lifetime, so every (re)subscription first renews the
session: the rotated refresh token must carry it through the restart.

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

from tests.e2e.procs import ROOT, ServeProcess, tool
from tests.e2e.restarts import Caller, position, register, restart_env, restarted
from tests.service.authkit import PASSWORD, unique_email

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

FOLLOW: Final = ROOT / "clients" / "node" / "follow.mjs"
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
    server: ServeProcess, email: str, conversation: str, after: str, count: int
) -> Iterator[Follower]:
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
    env = restart_env(tmp_path, "node-client-e2e")
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
