"""Conversation branches in the browser console (docs/console.md "Branches"): a message
edited (a new version on a new branch), an answer regenerated, the "< 2 / 3 >" switcher
between the versions, a message deleted with the answers below it; the other members read
every version and change what their role lets them.

The stack is test_console.py's (its fixtures, imported): ``switchboard serve --dev``
behind Envoy's TLS listener, Chromium driven by tests/browser/console.mjs. Answers come
from the built-in echo handler, chosen in the composer, so each is known; what the page
shows is checked against the server's own answers (Python stubs):

- An owner sends a message, edits it: the new version answers on branch 2, the page shows
  it with "2 / 2" and its answer, the server lists branch 2 with the old version as its
  sibling; "<" shows the first version and its answer (branch 1 active on the server),
  ">" the second again. An empty edit is refused on the page before anything is sent.
- The answer regenerated: a new run on branch 3 answers the same message, the new answer
  a sibling of the old one, with "2 / 2" on it; switched back and forth, the server's
  active branch follows.
- A message sent on branch 1, deleted with "Also delete the answers below it" (asked
  first; "Keep it" keeps it): the server has neither it nor its answer any more, and the
  branch lists what came before.
- Run cards keep to their branch: after each switch the page shows the cards of the runs
  whose ``Run.branch`` is the branch shown and no other (another branch's answer is not
  the one the messages above lead to), and the earlier runs offered for inspection are the
  branch's too.
- An editor sees Edit only on their own messages and no Delete on the owner's; a viewer
  sees the switchers, no Edit, Regenerate or Delete, and reads the other versions without
  moving the conversation's active branch.
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
    open_conversation,
    problems,
    raw_text,
    run_state,
    send,
    sign_in,
    text_of,
    tid,
)

pytestmark = pytest.mark.e2e

# The console's stack, browser and server stubs, as test_console.py makes them (a stack of
# this module's own: module-scoped fixtures are made once per module that uses them).
stack = console.stack
chromium = console.chromium
server = console.server

ECHO: Final = "handlers/echo"

#: The messages shown, in order: each one's name, role, text, switcher and actions.
MESSAGES_JS: Final = """() => [...document.querySelectorAll('[data-testid="messages"] > *')]
  .map((m) => {
    const part = (id) => m.querySelector(`[data-testid="${id}"]`);
    const shown = (id) => part(id)?.checkVisibility() === true;
    const switcher = part('branch-switcher');
    const back = part('branch-previous');
    const on = part('branch-next');
    return {
      name: m.dataset.name,
      role: m.dataset.role,
      text: part('message-text').textContent,
      switcher: switcher ? part('branch-position').textContent : null,
      position: switcher?.dataset.position ?? null,
      count: switcher?.dataset.count ?? null,
      previous: back ? !back.disabled : null,
      next: on ? !on.disabled : null,
      previousLabel: back?.getAttribute('aria-label') ?? null,
      nextLabel: on?.getAttribute('aria-label') ?? null,
      edit: shown('edit-message'),
      regenerate: shown('regenerate-message'),
      delete: shown('delete-message'),
    };
  })"""


#: The run cards in view, in order: each one's run.
CARDS_JS: Final = """() => [...document.querySelectorAll('[data-testid="run"]')]
  .filter((c) => c.checkVisibility()).map((c) => c.dataset.run)"""

#: The earlier runs offered for inspection, in view: each one's run.
EARLIER_JS: Final = """() => [...document.querySelectorAll('[data-testid="inspect-run"]')]
  .filter((b) => b.checkVisibility()).map((b) => b.dataset.run)"""


def _cards(browser: Page) -> list[str]:
    """The runs whose cards are in view (read once the list is, with no call in flight)."""
    cards: list[str] = browser.eval(CARDS_JS)
    return cards


def _shown(browser: Page, expected: list[tuple[str, str | None]]) -> list[dict[str, Any]]:
    """Waits until the page shows exactly ``expected`` (each message's name and its
    switcher's text, None for none), in order, with no call in flight; its rows."""
    rows: list[dict[str, Any]] = browser.wait(
        f"(expected) => {{ const rows = ({MESSAGES_JS})();"
        " const busy = (document.body.dataset.busy ?? '0') !== '0';"
        " return !busy && JSON.stringify(rows.map((r) => [r.name, r.switcher]))"
        " === JSON.stringify(expected) && rows; }",
        [list(pair) for pair in expected],
    )
    return rows


def _started(browser: Page, before: int) -> str:
    """The run the page started following after it had ``before`` run cards: its name."""
    run: str = browser.wait(
        "(n) => { const r = document.querySelectorAll('[data-testid=\"run\"]');"
        " return r.length > n && r[r.length - 1].dataset.run; }",
        before,
    )
    return run


def _in(message: str, testid: str) -> str:
    return f"{tid('message', name=message)} {tid(testid)}"


def _listed(server: Server, user: User, conversation: str) -> context_pb2.ListMessagesResponse:
    """The conversation's active branch, as the server reads it."""
    listed: context_pb2.ListMessagesResponse = server.context.ListMessages(
        context_pb2.ListMessagesRequest(parent=conversation, page_size=100),
        metadata=user.md,
        timeout=CALL_DEADLINE_S,
    )
    return listed


def _active(server: Server, user: User, conversation: str) -> int:
    got = server.context.GetConversation(
        context_pb2.GetConversationRequest(name=conversation),
        metadata=user.md,
        timeout=CALL_DEADLINE_S,
    ).conversation
    return int(got.active_branch)


def _gone(server: Server, user: User, message: str) -> grpc.StatusCode:
    """The code GetMessage answers for ``message`` (OK if it is still there)."""
    try:
        server.context.GetMessage(
            context_pb2.GetMessageRequest(name=message), metadata=user.md, timeout=CALL_DEADLINE_S
        )
    except grpc.RpcError as error:
        code: grpc.StatusCode = error.code()
        return code
    return grpc.StatusCode.OK


def _finished(browser: Page, server: Server, user: User, run: str) -> dispatcher_pb2.Run:
    run_state(browser, run, "RUN_STATE_SUCCEEDED")
    stored = server.run(user, run)
    assert stored.state == dispatcher_pb2.RUN_STATE_SUCCEEDED
    return stored


def _member(
    server: Server,
    owner: User,
    workspace: str,
    user: User,
    role: context_pb2.WorkspaceRole.ValueType,
) -> None:
    server.context.AddWorkspaceMember(
        context_pb2.AddWorkspaceMemberRequest(parent=workspace, user=user.name, role=role),
        metadata=owner.md,
        timeout=CALL_DEADLINE_S,
    )


def test_a_message_is_edited_an_answer_regenerated_versions_switched_and_deleted(
    stack: Stack, chromium: Chromium, server: Server, tmp_path: Path
) -> None:
    shots = artifacts_dir(tmp_path) / "branches"
    shots.mkdir(parents=True, exist_ok=True)
    owner = server.register("branches")
    editor = server.register("branch-editor")
    viewer = server.register("branch-reader")
    workspace, conversation = server.workspace(owner, f"branches-{os.getpid()}")
    _member(server, owner, workspace, editor, context_pb2.WORKSPACE_ROLE_EDITOR)
    _member(server, owner, workspace, viewer, context_pb2.WORKSPACE_ROLE_VIEWER)

    with chromium.open(stack.origin + "/") as browser:
        sign_in(browser, owner.email)
        open_conversation(browser, workspace, conversation)
        first = _finished(browser, server, owner, send(browser, "first words", handler=ECHO))
        u1, a1 = first.input_message, first.output_message
        rows = _shown(browser, [(u1, None), (a1, None)])
        # One branch: no switcher; the owner's own message is edited, the answer regenerated.
        assert [(r["role"], r["edit"], r["regenerate"], r["delete"]) for r in rows] == [
            ("user", True, False, True),
            ("assistant", False, True, True),
        ]
        assert _listed(server, owner, conversation).branch == 1

        # Edited: the editor holds the text; empty, it is refused before anything is sent.
        browser.click(_in(u1, "edit-message"))
        field = f"{tid('message-editor', name=u1)} {tid('message-edit-input')}"
        browser.wait_visible(field)
        assert browser.eval("(s) => document.querySelector(s).value", field) == "first words"
        assert not browser.visible(_in(u1, "edit-message"))
        browser.fill(field, "   ")
        browser.click(tid("save-message-edit"))
        refused = f"{tid('message-editor')} {tid('error', code='INVALID_ARGUMENT')}"
        browser.wait_visible(refused)
        assert browser.data(f"{refused} {tid('error-violation')}")["field"] == "message.parts"
        browser.fill(field, "second words")
        before = browser.count(tid("run"))
        browser.click(tid("save-message-edit"))
        second = _finished(browser, server, owner, _started(browser, before))
        u2, a2 = second.input_message, second.output_message
        # The server: a new version on branch 2, answered there with the composer's handler.
        assert (second.branch, second.handler) == (2, ECHO)
        listed = _listed(server, owner, conversation)
        assert listed.branch == 2
        assert [m.name for m in listed.messages] == [u2, a2]
        assert text_of(listed.messages[0]) == "second words"
        assert list(listed.messages[0].siblings) == [u1, u2]
        assert listed.messages[0].sibling_position == 2
        assert not listed.messages[1].siblings  # no other version yet
        # The page: the new version with "2 / 2", and its answer, as the server has them.
        rows = _shown(browser, [(u2, "2 / 2"), (a2, None)])
        assert [r["text"] for r in rows] == [text_of(m) for m in listed.messages]
        assert (rows[0]["previousLabel"], rows[0]["nextLabel"]) == (
            "Previous version",
            "Next version",
        )
        assert (rows[0]["previous"], rows[0]["next"]) == (True, False)
        assert browser.count(tid("message-editor")) == 0
        # Branch 2's run only: branch 1's card (its answer a1) is out of view.
        assert _cards(browser) == [second.name]

        # "<": the first version and its answer; the server's active branch is 1.
        browser.click(_in(u2, "branch-previous"))
        rows = _shown(browser, [(u1, "1 / 2"), (a1, None)])
        assert rows[0]["text"] == "first words"
        assert (rows[0]["previous"], rows[0]["next"]) == (False, True)
        assert _active(server, owner, conversation) == 1
        assert _cards(browser) == [first.name]
        # ">": the second again.
        browser.click(_in(u1, "branch-next"))
        _shown(browser, [(u2, "2 / 2"), (a2, None)])
        assert _active(server, owner, conversation) == 2
        assert _cards(browser) == [second.name]

        # The answer regenerated: a new run answers the same message on branch 3.
        before = browser.count(tid("run"))
        browser.click(_in(a2, "regenerate-message"))
        third = _finished(browser, server, owner, _started(browser, before))
        a3 = third.output_message
        assert (third.branch, third.input_message) == (3, u2)
        listed = _listed(server, owner, conversation)
        assert listed.branch == 3
        assert [m.name for m in listed.messages] == [u2, a3]
        assert list(listed.messages[1].siblings) == [a2, a3]
        rows = _shown(browser, [(u2, "2 / 2"), (a3, "2 / 2")])
        assert rows[1]["text"] == text_of(listed.messages[1])
        assert _cards(browser) == [third.name]
        assert raw_text(browser) == []
        browser.shots(shots / "branches.png")

        # Switched back and forth on the answer: the server's active branch follows.
        browser.click(_in(a3, "branch-previous"))
        _shown(browser, [(u2, "2 / 2"), (a2, "1 / 2")])
        assert _active(server, owner, conversation) == 2
        assert _cards(browser) == [second.name]
        browser.click(_in(a2, "branch-next"))
        _shown(browser, [(u2, "2 / 2"), (a3, "2 / 2")])
        assert _active(server, owner, conversation) == 3
        assert _cards(browser) == [third.name]

        # Back on branch 1, a message sent there and deleted with its answer.
        browser.click(_in(u2, "branch-previous"))
        _shown(browser, [(u1, "1 / 2"), (a1, None)])
        fourth = _finished(browser, server, owner, send(browser, "third words", handler=ECHO))
        u4, a4 = fourth.input_message, fourth.output_message
        assert fourth.branch == 1
        _shown(browser, [(u1, "1 / 2"), (a1, None), (u4, None), (a4, None)])
        assert _cards(browser) == [first.name, fourth.name]
        # Asked first: "Keep it" keeps it.
        browser.click(_in(u4, "delete-message"))
        confirm = f"{tid('message', name=u4)} {tid('delete-message-confirmation')}"
        browser.wait_visible(confirm)
        browser.click(f"{confirm} {tid('cancel-delete-message')}")
        assert browser.count(confirm) == 0
        assert _gone(server, owner, u4) == grpc.StatusCode.OK
        browser.click(_in(u4, "delete-message"))
        browser.wait_visible(confirm)
        label = browser.eval(
            "(s) => document.querySelector(s).closest('label').textContent.trim()",
            f"{confirm} {tid('delete-with-later')}",
        )
        assert label == "Also delete the answers below it"
        browser.click(f"{confirm} {tid('delete-with-later')}")
        browser.shots(shots / "delete.png")
        browser.click(f"{confirm} {tid('confirm-delete-message')}")
        _shown(browser, [(u1, "1 / 2"), (a1, None)])
        assert browser.count(tid("delete-message-confirmation")) == 0
        # The server: both gone, the branch holds what came before.
        assert _gone(server, owner, u4) == grpc.StatusCode.NOT_FOUND
        assert _gone(server, owner, a4) == grpc.StatusCode.NOT_FOUND
        listed = _listed(server, owner, conversation)
        assert (listed.branch, [m.name for m in listed.messages]) == (1, [u1, a1])
        assert raw_text(browser) == []
        assert problems(browser) == []

    # An editor: Edit on no one else's message, no Delete of the owner's; the answers are
    # theirs to regenerate and delete.
    with chromium.open(stack.origin + "/") as browser:
        sign_in(browser, editor.email)
        open_conversation(browser, workspace, conversation)
        rows = _shown(browser, [(u1, "1 / 2"), (a1, None)])
        assert [(r["edit"], r["regenerate"], r["delete"]) for r in rows] == [
            (False, False, False),
            (False, True, True),
        ]
        assert problems(browser) == []

    # A viewer reads the versions: the switcher, and nothing that changes them.
    with chromium.open(stack.origin + "/") as browser:
        sign_in(browser, viewer.email)
        open_conversation(browser, workspace, conversation)
        rows = _shown(browser, [(u1, "1 / 2"), (a1, None)])
        assert rows[0]["next"] is True
        # The finished runs, offered for inspection: branch 1's (the fourth's answer is
        # gone, its run stays).
        assert browser.eval(EARLIER_JS) == [first.name, fourth.name]
        # The other versions, read where they were written: the conversation's active
        # branch, everyone's, stays where the owner left it.
        browser.click(_in(u1, "branch-next"))
        _shown(browser, [(u2, "2 / 2"), (a2, "1 / 2")])
        browser.click(_in(a2, "branch-next"))
        rows = _shown(browser, [(u2, "2 / 2"), (a3, "2 / 2")])
        assert _active(server, owner, conversation) == 1
        assert browser.eval(EARLIER_JS) == [third.name]
        # Inspected, its card comes into view, the only one.
        browser.click(tid("inspect-run", run=third.name))
        run_state(browser, third.name, "RUN_STATE_SUCCEEDED")
        assert _cards(browser) == [third.name]
        for action in ("edit-message", "regenerate-message", "delete-message"):
            assert browser.count(tid(action)) == 0, action
        browser.shots(shots / "viewer.png")
        assert raw_text(browser) == []
        assert problems(browser) == []
