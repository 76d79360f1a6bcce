"""Forks in the browser console (docs/console.md "Forks"): "Fork" on a message starts a new
conversation sharing the history up to it, titled in place, and opens it; the shared
messages are the source's (no Edit, Regenerate or Delete in the fork), and the fork's
header links back to where it came from.

The stack is test_console.py's (its fixtures, imported), the answers the echo handler's,
as in test_console_branches.py; what the page shows is checked against the server's own
answers (Python stubs):

- The owner's Fork form offers the conversation's title; Cancel forks nothing. Forked from
  the first answer with another title, the page opens the new conversation: the server has
  it with that title and ``forked_from`` naming the answer, its messages are the two shared
  ones under the source's names, shown with Fork and nothing that changes them, and the
  header says "Forked from Plans" with a link to the source.
- A message sent in the fork follows the shared ones, on the page and on the server, under
  the fork's own name, with Edit and Delete; the source keeps its four messages.
- The header's link opens the source.
- A viewer has no Fork (and the server refuses them one), and reads the fork's header.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Final

import grpc
import pytest

from switchboard.api.context.v1 import context_pb2
from switchboard.api.dispatcher.v1 import dispatcher_pb2
from tests.conftest import CALL_DEADLINE_S
from tests.e2e import test_console as console
from tests.e2e.chromium import artifacts_dir
from tests.e2e.test_console import (
    Chromium,
    Page,
    Server,
    Stack,
    User,
    current,
    open_conversation,
    problems,
    raw_text,
    run_state,
    send,
    sign_in,
    text_of,
    tid,
)
from tests.e2e.test_console_branches import MESSAGES_JS

pytestmark = pytest.mark.e2e

stack = console.stack
chromium = console.chromium
server = console.server

ECHO: Final = "handlers/echo"


def _shown(browser: Page, expected: list[str]) -> list[dict[str, Any]]:
    """Waits until the page shows exactly the messages ``expected`` (by name), in order,
    with no call in flight; its rows (with whether Fork is in view)."""
    rows: list[dict[str, Any]] = browser.wait(
        f"(expected) => {{ const rows = ({MESSAGES_JS})().map((r) => ({{ ...r,"
        ' fork: document.querySelector(`[data-testid="message"][data-name="${r.name}"]'
        ' [data-testid="fork-message"]`)?.checkVisibility() === true }));'
        " const busy = (document.body.dataset.busy ?? '0') !== '0';"
        " return !busy && JSON.stringify(rows.map((r) => r.name)) === JSON.stringify(expected)"
        " && rows; }",
        expected,
    )
    return rows


def _in(message: str, testid: str) -> str:
    return f"{tid('message', name=message)} {tid(testid)}"


def _finished(browser: Page, server: Server, user: User, run: str) -> dispatcher_pb2.Run:
    run_state(browser, run, "RUN_STATE_SUCCEEDED")
    stored = server.run(user, run)
    assert stored.state == dispatcher_pb2.RUN_STATE_SUCCEEDED
    return stored


def _forks(server: Server, user: User, workspace: str) -> list[context_pb2.Conversation]:
    """The workspace's conversations that are forks, as the server lists them."""
    listed = server.context.ListConversations(
        context_pb2.ListConversationsRequest(parent=workspace, page_size=100),
        metadata=user.md,
        timeout=CALL_DEADLINE_S,
    )
    return [c for c in listed.conversations if c.forked_from]


def _title(browser: Page) -> str:
    title: str = browser.eval(
        "(s) => document.querySelector(s).textContent", tid("conversation-title")
    )
    return title


def test_a_conversation_is_forked_from_a_message_and_goes_on_alone(
    stack: Stack, chromium: Chromium, server: Server, tmp_path: Path
) -> None:
    shots = artifacts_dir(tmp_path) / "forks"
    shots.mkdir(parents=True, exist_ok=True)
    owner = server.register("forks")
    viewer = server.register("fork-reader")
    workspace, source = server.workspace(owner, f"forks-{os.getpid()}")
    server.context.AddWorkspaceMember(
        context_pb2.AddWorkspaceMemberRequest(
            parent=workspace, user=viewer.name, role=context_pb2.WORKSPACE_ROLE_VIEWER
        ),
        metadata=owner.md,
        timeout=CALL_DEADLINE_S,
    )

    with chromium.open(stack.origin + "/") as browser:
        sign_in(browser, owner.email)
        open_conversation(browser, workspace, source)
        first = _finished(browser, server, owner, send(browser, "first words", handler=ECHO))
        second = _finished(browser, server, owner, send(browser, "second words", handler=ECHO))
        u1, a1 = first.input_message, first.output_message
        u2, a2 = second.input_message, second.output_message
        rows = _shown(browser, [u1, a1, u2, a2])
        # A conversation of its own: every message can be forked, and changed as before.
        assert [(r["fork"], r["edit"], r["regenerate"], r["delete"]) for r in rows] == [
            (True, True, False, True),
            (True, False, True, True),
            (True, True, False, True),
            (True, False, True, True),
        ]
        assert not browser.visible(tid("forked-from"))

        # The form offers the conversation's title; Cancel forks nothing.
        browser.click(_in(u2, "fork-message"))
        form = tid("fork-form", name=u2)
        browser.wait_visible(form)
        title_field = f"{form} {tid('fork-title')}"
        assert browser.eval("(s) => document.querySelector(s).value", title_field) == "Plans"
        assert not browser.visible(_in(u2, "fork-message"))
        browser.click(f"{form} {tid('cancel-fork')}")
        assert browser.count(tid("fork-form")) == 0
        assert browser.visible(_in(u2, "fork-message"))
        assert _forks(server, owner, workspace) == []

        # Forked from the first answer, titled anew: the page opens the fork.
        browser.click(_in(a1, "fork-message"))
        form = tid("fork-form", name=a1)
        browser.wait_visible(form)
        browser.fill(f"{form} {tid('fork-title')}", "Plans, another way")
        browser.shots(shots / "fork-form.png")
        browser.click(f"{form} {tid('confirm-fork')}")
        fork: str = browser.wait(
            "(source) => { const c = document.querySelector("
            "'[data-testid=\"conversation-item\"].current'); return c && c.dataset.name !== source"
            " && c.dataset.name; }",
            source,
        )
        # The server: one fork, with that title, sharing the history up to the answer.
        forks = _forks(server, owner, workspace)
        assert [(c.name, c.title, c.forked_from) for c in forks] == [
            (fork, "Plans, another way", a1)
        ]
        listed = server.messages(owner, fork)
        assert [m.name for m in listed] == [u1, a1]
        # The page: the shared messages, the source's, with Fork and nothing that changes them.
        rows = _shown(browser, [u1, a1])
        assert [r["text"] for r in rows] == [text_of(m) for m in listed]
        assert [(r["fork"], r["edit"], r["regenerate"], r["delete"]) for r in rows] == [
            (True, False, False, False),
            (True, False, False, False),
        ]
        assert _title(browser) == "Plans, another way"
        assert browser.count(tid("fork-form")) == 0
        browser.wait_visible(tid("forked-from-link"))
        note = browser.data(tid("forked-from"))
        assert (note["source"], note["message"], note["readable"]) == (source, a1, "true")
        link = browser.eval(
            "(s) => { const a = document.querySelector(s);"
            " return [a.closest('[data-testid=\"forked-from\"]').textContent,"
            " a.getAttribute('href')]; }",
            tid("forked-from-link"),
        )
        assert link == ["Forked from Plans", f"#{source}"]
        # Its runs are the fork's: none of the source's cards came along.
        assert browser.count(tid("run")) == 0

        # A message of its own follows the shared ones, named under the fork.
        third = _finished(browser, server, owner, send(browser, "third words", handler=ECHO))
        u3, a3 = third.input_message, third.output_message
        assert u3.startswith(f"{fork}/messages/")
        assert a3.startswith(f"{fork}/messages/")
        listed = server.messages(owner, fork)
        assert [m.name for m in listed] == [u1, a1, u3, a3]
        rows = _shown(browser, [u1, a1, u3, a3])
        assert [r["text"] for r in rows] == [text_of(m) for m in listed]
        assert [(r["fork"], r["edit"], r["regenerate"], r["delete"]) for r in rows] == [
            (True, False, False, False),
            (True, False, False, False),
            (True, True, False, True),
            (True, False, True, True),
        ]
        # The source goes on as it was.
        assert [m.name for m in server.messages(owner, source)] == [u1, a1, u2, a2]
        assert raw_text(browser) == []
        browser.shots(shots / "fork.png")

        # The header's link opens the source.
        browser.click(tid("forked-from-link"))
        browser.wait_for(f"{tid('conversation-item', name=source)}.current")
        _shown(browser, [u1, a1, u2, a2])
        assert not browser.visible(tid("forked-from"))
        assert problems(browser) == []

    # A viewer: no Fork anywhere (nor from the server), and the fork says where it came from.
    with chromium.open(stack.origin + "/") as browser:
        sign_in(browser, viewer.email)
        open_conversation(browser, workspace, source)
        _shown(browser, [u1, a1, u2, a2])
        assert browser.count(tid("fork-message")) == 0
        with pytest.raises(grpc.RpcError) as refused:
            server.context.ForkConversation(
                context_pb2.ForkConversationRequest(
                    message=a1, conversation=context_pb2.Conversation(title="Mine")
                ),
                metadata=viewer.md,
                timeout=CALL_DEADLINE_S,
            )
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        browser.click(tid("conversation-item", name=fork))
        browser.wait_for(f"{tid('conversation-item', name=fork)}.current")
        rows = _shown(browser, [u1, a1, u3, a3])
        assert browser.count(tid("fork-message")) == 0
        for action in ("edit-message", "regenerate-message", "delete-message"):
            assert browser.count(tid(action)) == 0, action
        browser.wait_visible(tid("forked-from-link"))
        assert browser.data(tid("forked-from"))["source"] == source
        assert current(browser, "conversation-item") == fork
        browser.shots(shots / "viewer.png")
        assert raw_text(browser) == []
        assert problems(browser) == []
