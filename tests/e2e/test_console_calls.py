"""The console's Calls page (docs/console.md#calls, docs/telephony.md#calls-as-a-resource):
a workspace's phone calls, the live ones first, then the ended ones, each with its
direction, numbers, state, assistant, start, duration, how it ended and its transcript;
Hang up for editors and owners; each CALL_CHANGED event applied where it is shown.

The stack is test_console.py's shape with the server in this process: the console built
into a temporary directory, ``create_server`` in dev mode on a private event loop (a
thread of its own, so the blocking browser steps never stall it) on a SQLite file, Envoy
with ``--console`` on its TLS listener in front of it, Chromium driven by
tests/browser/console.mjs. In this process the calls are written by the server's own
domain, exactly as its SIP carrier writes them (``CallBook.opened`` and ``update``: the
record and its CALL_CHANGED event in the log, with no SIP line behind it); everything
else goes through the Python stubs, and the page is checked against the server's answers:

- The owner's page lists a live (answered) call and an ended one with their facts (the
  live one over TLS with SRTP, said so; the ended one in the clear, saying nothing); the
  live call's duration moves once a second with no request; the call ending (its carrier
  writes ``ended``) moves it to the ended ones, and a new call ringing appears at the top
  of the live ones, both without ListCalls being called again (the live feed says so in
  words, its link to the Calls page); the transcript link opens the call's conversation.
- A viewer sees the live call without Hang up (and EndCall refuses them:
  PERMISSION_DENIED); the owner's Hang up ends it (no SIP carries it here, so it is ended
  on the record: ENDED, "ended by users/..."), and the viewer's page follows.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, TypeVar

import grpc
import pytest

from switchboard.api.context.v1 import context_pb2
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.service import Dispatcher
from switchboard.dispatcher.talk.phone import book
from switchboard.mesh import create_server
from switchboard.platform.rpc.server import SwitchboardServer
from tests.conftest import CALL_DEADLINE_S, built, make_settings
from tests.e2e.chromium import artifacts_dir, required
from tests.e2e.envoy import EnvoyProcess
from tests.e2e.test_console import (
    WEB,
    Chromium,
    Page,
    Server,
    User,
    grpc_web_calls,
    method,
    problems,
    raw_text,
    sign_in,
    tid,
)

pytestmark = pytest.mark.e2e

_T = TypeVar("_T")

#: The rows of a list of the Calls page, in its order, with what each says.
ROWS_JS: Final = """(list) => [...document.querySelectorAll(
  `[data-testid="${list}"] > [data-testid="call"]`,
)].map((row) => {
  const text = (id) => row.querySelector(`[data-testid="${id}"]`)?.textContent ?? null;
  return {
    ...row.dataset,
    directionText: text('call-direction'),
    from: text('call-from'),
    to: text('call-to'),
    stateText: text('call-state'),
    assistant: text('call-assistant'),
    started: row.querySelector('[data-testid="call-started"]')?.getAttribute('datetime') ?? null,
    duration: text('call-duration'),
    live: row.querySelector('[data-testid="call-duration"]')?.dataset.live ?? null,
    seconds: row.querySelector('[data-testid="call-duration"]')?.dataset.seconds ?? null,
    ended: text('call-ended'),
    security: text('call-security'),
    reason: text('call-end-reason'),
    transcript: row.querySelector('[data-testid="call-conversation"]')?.getAttribute('href')
      ?? null,
    hangUp: row.querySelector('[data-testid="hang-up-call"]') !== null,
  };
})"""


class Served:
    """The server on a private event loop in a thread; ``run`` awaits on it from here."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.server: SwitchboardServer | None = None

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(CALL_DEADLINE_S)

    def start(self) -> SwitchboardServer:
        async def start() -> SwitchboardServer:
            server, _port = await create_server(make_settings())
            await server.start()
            return server

        self.server = self.run(start())
        return self.server

    def stop(self) -> None:
        if self.server is not None:
            self.run(self.server.shutdown(grace=0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(CALL_DEADLINE_S)
        self.loop.close()


@dataclass
class CallsStack:
    served: Served
    envoy: EnvoyProcess
    chromium: Chromium
    server: Server
    dispatcher: Dispatcher

    @property
    def origin(self) -> str:
        return self.envoy.tls_url

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return self.served.run(coro)


def _build_console(outdir: Path) -> None:
    node = required("node", "scripts/install-deps.sh")
    if not (WEB / "node_modules" / "esbuild").is_dir():
        pytest.fail("clients/web has no node_modules; run `make tools` (npm ci in clients/web)")
    built_ = subprocess.run(
        [node, str(WEB / "build.mjs"), f"--outdir={outdir}"],
        cwd=WEB,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert built_.returncode == 0, built_.stderr


@pytest.fixture(scope="module")
def calls_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CallsStack]:
    console_dir = tmp_path_factory.mktemp("calls-console") / "dist"
    _build_console(console_dir)
    served = Served()
    try:
        mesh = served.start()
        with EnvoyProcess(mesh.address, tls=True, console=console_dir) as envoy:
            driver = Chromium(envoy.cert_file)
            client = Server(mesh.address)
            try:
                yield CallsStack(served, envoy, driver, client, built(mesh, Dispatcher))
            finally:
                client.close()
                driver.close()
    finally:
        served.stop()


# -- Seeding: the server's own domain, as its SIP carrier writes a call ------------------


def _id(name: str) -> str:
    return name.rsplit("/", 1)[1]


def _open_call(
    stack: CallsStack,
    *,
    owner: User,
    workspace: str,
    assistant: str,
    conversation: str,
    direction: pb.CallDirection.ValueType,
    from_number: str,
    to_number: str,
) -> str:
    """A call ringing (in) or dialing (out), recorded with its CREATED event; its name."""
    state = (
        pb.CALL_STATE_RINGING if direction == pb.CALL_DIRECTION_INBOUND else pb.CALL_STATE_DIALING
    )
    call = book.new_call(
        direction=direction,
        state=state,
        trunk="carrier",
        from_number=from_number,
        to_number=to_number,
        assistant=assistant,
        conversation=conversation,
        user_id=_id(owner.name),
    )
    opened = stack.run(
        stack.dispatcher.calls.opened(call, workspace_id=_id(workspace), user_id=_id(owner.name))
    )
    return opened.call.name


def _over_tls_with_srtp(call: pb.Call) -> None:
    """What its SIP carrier records of a call over TLS whose audio is SRTP."""
    call.tls = True
    book.secured(call)


def _update(stack: CallsStack, name: str, edit: Any) -> pb.Call:
    done = stack.run(stack.dispatcher.calls.update(name, edit))
    assert done is not None
    return done


def _world(stack: CallsStack, prefix: str) -> tuple[User, str, str, str]:
    """An owner, their workspace, a conversation in it (a call's transcript, one message
    in it) and an assistant."""
    owner = stack.server.register(prefix)
    workspace, conversation = stack.server.workspace(owner, f"{prefix}-{os.getpid()}")
    stack.server.append(owner, conversation, "Hello, I would like to book a table for two.")
    assistant: str = stack.server.dispatcher.CreateAssistant(
        pb.CreateAssistantRequest(
            parent=workspace,
            assistant_id="receptionist",
            assistant=pb.Assistant(display_name="Receptionist", instructions="Be brief."),
        ),
        metadata=owner.md,
        timeout=CALL_DEADLINE_S,
    ).assistant.name
    return owner, workspace, conversation, assistant


def _get(stack: CallsStack, user: User, name: str) -> pb.Call:
    call: pb.Call = stack.server.dispatcher.GetCall(
        pb.GetCallRequest(name=name), metadata=user.md, timeout=CALL_DEADLINE_S
    ).call
    return call


# -- The page -----------------------------------------------------------------------------


def _rows(browser: Page, listed: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = browser.eval(ROWS_JS, listed)
    return found


def _names(browser: Page, listed: str) -> list[str]:
    return [row["name"] for row in _rows(browser, listed)]


def _ended_row(name: str) -> str:
    return f"{tid('recent-calls')} {tid('call', name=name, state='CALL_STATE_ENDED')}"


def _open_calls(browser: Page, workspace: str) -> None:
    browser.click(tid("workspace-item", name=workspace))
    browser.click(tid("open-calls"))
    browser.wait_visible(tid("calls-page"))
    browser.wait("() => (document.body.dataset.busy ?? '0') === '0'")


def _list_calls(browser: Page, origin: str) -> int:
    """How many ListCalls the page has made."""
    return sum(method(c) == "ListCalls" for c in grpc_web_calls(browser.network(), origin))


def test_the_calls_page_lists_live_and_ended_calls_and_follows_their_changes(
    calls_stack: CallsStack, tmp_path: Path
) -> None:
    stack = calls_stack
    shots = artifacts_dir(tmp_path) / "calls"
    shots.mkdir(parents=True, exist_ok=True)
    owner, workspace, conversation, assistant = _world(stack, "calls")
    # Ended first (an outbound call answered, then the called party hung up), then a live
    # inbound call, answered.
    ended = _open_call(
        stack,
        owner=owner,
        workspace=workspace,
        assistant=assistant,
        conversation=conversation,
        direction=pb.CALL_DIRECTION_OUTBOUND,
        from_number="+15550000001",
        to_number="+15551230001",
    )
    _update(stack, ended, book.ringing)
    _update(stack, ended, book.answer)
    ended_call = _update(stack, ended, book.ended(200, "the called party hung up"))
    assert ended_call.state == pb.CALL_STATE_ENDED
    live = _open_call(
        stack,
        owner=owner,
        workspace=workspace,
        assistant=assistant,
        conversation=conversation,
        direction=pb.CALL_DIRECTION_INBOUND,
        from_number="+15557654321",
        to_number="+15550000001",
    )
    live_call = _update(stack, live, book.answer)
    assert live_call.state == pb.CALL_STATE_ANSWERED
    live_call = _update(stack, live, _over_tls_with_srtp)

    with stack.chromium.open(stack.origin + "/") as browser:
        sign_in(browser, owner.email)
        _open_calls(browser, workspace)
        assert browser.eval("() => location.hash") == f"#{workspace}/calls"
        browser.wait_for(f"{tid('live-calls')} {tid('call', name=live)}")
        [shown_live] = _rows(browser, "live-calls")
        assert shown_live["name"] == live
        assert shown_live["state"] == "CALL_STATE_ANSWERED"
        assert shown_live["direction"] == "CALL_DIRECTION_INBOUND"
        assert shown_live["directionText"] == "in"
        assert (shown_live["from"], shown_live["to"]) == ("+15557654321", "+15550000001")
        assert shown_live["stateText"] == "answered"
        assert shown_live["assistant"] == "assistant Receptionist"
        started = datetime.fromisoformat(shown_live["started"])
        assert abs(started - live_call.create_time.ToDatetime(UTC)) < timedelta(milliseconds=1)
        assert shown_live["live"] == "true"
        assert shown_live["duration"].startswith("on the line for 0:")
        assert shown_live["ended"] is None
        assert shown_live["security"] == " · over TLS, encrypted audio (SRTP)"
        assert shown_live["transcript"] == f"#{conversation}"
        assert shown_live["hangUp"] is True
        [shown_ended] = _rows(browser, "recent-calls")
        assert shown_ended["name"] == ended
        assert shown_ended["state"] == "CALL_STATE_ENDED"
        assert shown_ended["direction"] == "CALL_DIRECTION_OUTBOUND"
        assert shown_ended["directionText"] == "out"
        assert (shown_ended["from"], shown_ended["to"]) == ("+15550000001", "+15551230001")
        assert shown_ended["stateText"] == "ended"
        assert shown_ended["sipStatus"] == "200"
        assert shown_ended["reason"] == "the called party hung up"
        assert shown_ended["ended"].startswith("Ended: the called party hung up (SIP 200) at ")
        assert shown_ended["seconds"] == str(
            round(ended_call.duration.ToTimedelta().total_seconds())
        )
        assert shown_ended["duration"].startswith("lasted 0:")
        assert shown_ended["hangUp"] is False
        assert shown_ended["security"] is None  # a call in the clear says nothing of it
        assert browser.visible(tid("calls-role"))
        assert raw_text(browser) == []
        browser.shots(shots / "calls.png")

        # The live call's duration moves on the page, with no request for it.
        listed = _list_calls(browser, stack.origin)
        assert listed >= 1
        before = shown_live["duration"]
        browser.wait(
            "([s, before]) => document.querySelector(s)?.textContent !== before",
            [f"{tid('call', name=live)} {tid('call-duration')}", before],
        )

        # Its carrier says it ended: it moves to the ended calls, where its facts are the
        # event's; a new call ringing appears at the top of the live ones.
        _update(stack, live, book.ended(200, "the caller hung up"))
        browser.wait_for(_ended_row(live))
        browser.wait_for(tid("live-calls-empty"))
        assert _names(browser, "recent-calls") == [live, ended]
        [now_ended, _] = _rows(browser, "recent-calls")
        assert now_ended["reason"] == "the caller hung up"
        assert now_ended["sipStatus"] == "200"
        assert now_ended["duration"].startswith("lasted 0:")
        assert now_ended["hangUp"] is False
        ringing = _open_call(
            stack,
            owner=owner,
            workspace=workspace,
            assistant=assistant,
            conversation=conversation,
            direction=pb.CALL_DIRECTION_INBOUND,
            from_number="+15559990000",
            to_number="+15550000001",
        )
        browser.wait_for(f"{tid('live-calls')} {tid('call', name=ringing)}")
        [shown_ringing] = _rows(browser, "live-calls")
        assert shown_ringing["state"] == "CALL_STATE_RINGING"
        assert shown_ringing["stateText"] == "ringing"
        assert shown_ringing["duration"] == "not answered yet"
        assert _list_calls(browser, stack.origin) == listed
        # The live feed says it in words, and leads to this page.
        rang = tid("event", type="EVENT_TYPE_CALL_CHANGED", subject=ringing)
        browser.wait_for(rang)
        said = browser.eval(
            "(s) => document.querySelector(s).textContent", f"{rang} {tid('event-summary')}"
        )
        assert said == "call in +15559990000 → +15550000001: ringing"
        leads = browser.eval(
            "(s) => document.querySelector(s).getAttribute('href')", f"{rang} {tid('event-link')}"
        )
        assert leads == f"#{workspace}/calls"
        assert raw_text(browser) == []

        # The transcript link opens the call's conversation.
        browser.click(f"{tid('call', name=ended)} {tid('call-conversation')}")
        browser.wait_for(f"{tid('conversation-item', name=conversation)}.current")
        browser.wait(
            "(t) => [...document.querySelectorAll('[data-testid=\"message\"]')]"
            ".some((m) => m.textContent.includes(t))",
            "book a table for two",
        )
        assert not browser.visible(tid("calls-page"))
        assert browser.eval("() => location.hash") == f"#{conversation}"
        assert problems(browser) == []


def test_an_owner_hangs_up_a_live_call_and_a_viewer_sees_no_hang_up(
    calls_stack: CallsStack, tmp_path: Path
) -> None:
    stack = calls_stack
    shots = artifacts_dir(tmp_path) / "calls"
    shots.mkdir(parents=True, exist_ok=True)
    owner, workspace, conversation, assistant = _world(stack, "hangup")
    viewer = stack.server.register("hangup-viewer")
    stack.server.context.AddWorkspaceMember(
        context_pb2.AddWorkspaceMemberRequest(
            parent=workspace, user=viewer.name, role=context_pb2.WORKSPACE_ROLE_VIEWER
        ),
        metadata=owner.md,
        timeout=CALL_DEADLINE_S,
    )
    live = _open_call(
        stack,
        owner=owner,
        workspace=workspace,
        assistant=assistant,
        conversation=conversation,
        direction=pb.CALL_DIRECTION_INBOUND,
        from_number="+15557654321",
        to_number="+15550000001",
    )
    _update(stack, live, book.answer)
    # The server refuses the viewer's hang-up whatever a page shows.
    with pytest.raises(grpc.RpcError) as refused:
        stack.server.dispatcher.EndCall(
            pb.EndCallRequest(name=live), metadata=viewer.md, timeout=CALL_DEADLINE_S
        )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert _get(stack, owner, live).state == pb.CALL_STATE_ANSWERED
    row = tid("call", name=live)

    with (
        stack.chromium.open(stack.origin + "/") as watching,
        stack.chromium.open(stack.origin + "/") as browser,
    ):
        sign_in(watching, viewer.email)
        _open_calls(watching, workspace)
        watching.wait_for(f"{tid('live-calls')} {row}")
        [seen] = _rows(watching, "live-calls")
        assert seen["state"] == "CALL_STATE_ANSWERED"
        assert seen["hangUp"] is False
        assert watching.count(tid("hang-up-call")) == 0
        role = watching.eval("(s) => document.querySelector(s).textContent", tid("calls-role"))
        assert role.startswith("Read only"), role
        watching.shots(shots / "viewer.png")

        sign_in(browser, owner.email)
        _open_calls(browser, workspace)
        browser.wait_for(f"{tid('live-calls')} {row} {tid('hang-up-call')}")
        browser.click(f"{row} {tid('hang-up-call')}")
        browser.wait_for(_ended_row(live))
        stored = _get(stack, owner, live)
        assert stored.state == pb.CALL_STATE_ENDED
        assert stored.end_reason == f"ended by {owner.name}"
        [shown] = _rows(browser, "recent-calls")
        assert shown["reason"] == f"ended by {owner.name}"
        assert shown["hangUp"] is False
        assert browser.count(tid("error")) == 0
        browser.wait_for(tid("live-calls-empty"))
        assert raw_text(browser) == []
        # The viewer's page follows, by the event.
        watching.wait_for(_ended_row(live))
        assert problems(browser) == []
        assert problems(watching) == []
