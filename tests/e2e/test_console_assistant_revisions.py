"""An assistant's revision history in the console (docs/console.md): the revisions
(ListAssistantRevisions) in the assistant editor, two of them compared field by field with
a changed text's lines, and Roll back (RollbackAssistant with the editor's etag) for
owners; the other members read the history from the list, without Roll back.

The stack is test_console.py's (its fixtures, imported): ``switchboard serve --dev``
behind Envoy's TLS listener, Chromium driven by tests/browser/console.mjs. The assistant
is changed through the Python stubs, as a script would, and what the page shows is checked
against the server's own answers:

- An owner's assistant, created and changed twice: the editor lists revisions 3, 2 and 1
  (the newest current, each by "you", created or changed); revision 1 compared with the
  current one shows exactly the instructions' lines removed and added and the tool-step
  limit set, the unchanged fields folded; the picks compare any two. Rolled back to 1
  (asked first): revision 4, "restored revision 1", is current, the editor shows
  revision 1's instructions, and the server has them. A change made elsewhere shows in
  the open history by itself, and a rollback with the editor's etag, older now, is
  refused as such and offers the current version, which the editor then shows.
- A viewer opens the history from the list: the same revisions and diff, no Roll back.
- Revisions beyond a page come with "Load more".
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Final

import pytest
from google.protobuf import field_mask_pb2

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
    problems,
    raw_text,
    sign_in,
    tid,
)

pytestmark = pytest.mark.e2e

# The console's stack, browser and server stubs, as test_console.py makes them (a stack of
# this module's own: module-scoped fixtures are made once per module that uses them).
stack = console.stack
chromium = console.chromium
server = console.server

V1: Final = "You are Helper.\nAnswer in one sentence.\nSign as Helper."
V2: Final = "You are Helper.\nAnswer in two sentences.\nSign as Helper."
V3: Final = "You are Helper.\nAnswer in two sentences.\nSign as the Helper team.\nNever guess."

#: The revisions the open history lists, newest first, or null before it has read them.
REVISIONS_JS: Final = """() => {
  const history = document.querySelector('[data-testid="assistant-history"]');
  const list = history?.querySelector('[data-testid="assistant-revisions"]');
  if (!history?.open || list?.dataset.count === undefined) return null;
  return [...list.querySelectorAll('[data-testid="assistant-revision"]')].map((r) => ({
    ...r.dataset,
    originText: r.querySelector('[data-testid="revision-origin"]').textContent,
    restoredText: r.querySelector('[data-testid="revision-restored"]')?.textContent ?? null,
    authorText: r.querySelector('[data-testid="revision-author"]')?.textContent ?? null,
    compare: r.querySelector('[data-testid="compare-revision"]') !== null,
    rollback: r.querySelector('[data-testid="rollback-revision"]') !== null,
  }));
}"""

#: The diff shown between revisions ``from`` and ``to``, or null while another is shown.
DIFF_JS: Final = """([from, to]) => {
  const diff = document.querySelector('[data-testid="revision-diff"]');
  if (!diff || diff.dataset.from !== from || diff.dataset.to !== to) return null;
  return {
    changed: diff.dataset.changed,
    summary: diff.querySelector('[data-testid="revision-diff-summary"]').textContent,
    fields: [...diff.querySelectorAll('[data-testid="revision-field"]')].map((f) => ({
      field: f.dataset.field,
      changed: f.dataset.changed === 'true',
      lines: [...f.querySelectorAll('[data-testid="revision-line"]')]
        .map((l) => [l.dataset.op, l.textContent.slice(2)]),
    })),
  };
}"""


def _revisions(browser: Page, numbers: list[int]) -> list[dict[str, Any]]:
    """Waits until the open history lists exactly ``numbers``, in that order; its rows."""
    found: list[dict[str, Any]] = browser.wait(
        f"(numbers) => {{ const rows = ({REVISIONS_JS})();"
        " return rows && JSON.stringify(rows.map((r) => Number(r.revision)))"
        " === JSON.stringify(numbers) && rows; }",
        numbers,
    )
    return found


def _diff(browser: Page, first: int, second: int) -> dict[str, Any]:
    found: dict[str, Any] = browser.wait(DIFF_JS, [str(first), str(second)])
    return found


def _row(revision: int) -> str:
    return tid("assistant-revision", revision=str(revision))


def _create(server: Server, user: User, workspace: str, assistant_id: str) -> str:
    made: dispatcher_pb2.Assistant = server.dispatcher.CreateAssistant(
        dispatcher_pb2.CreateAssistantRequest(
            parent=workspace,
            assistant_id=assistant_id,
            assistant=dispatcher_pb2.Assistant(display_name="Helper", instructions=V1),
        ),
        metadata=user.md,
        timeout=CALL_DEADLINE_S,
    ).assistant
    assert made.revision == 1
    return made.name


def _update(
    server: Server, user: User, name: str, paths: list[str], **fields: Any
) -> dispatcher_pb2.Assistant:
    updated: dispatcher_pb2.Assistant = server.dispatcher.UpdateAssistant(
        dispatcher_pb2.UpdateAssistantRequest(
            assistant=dispatcher_pb2.Assistant(name=name, **fields),
            update_mask=field_mask_pb2.FieldMask(paths=paths),
        ),
        metadata=user.md,
        timeout=CALL_DEADLINE_S,
    ).assistant
    return updated


def _get(server: Server, user: User, name: str) -> dispatcher_pb2.Assistant:
    got: dispatcher_pb2.Assistant = server.dispatcher.GetAssistant(
        dispatcher_pb2.GetAssistantRequest(name=name),
        metadata=user.md,
        timeout=CALL_DEADLINE_S,
    ).assistant
    return got


def _value(browser: Page, testid: str) -> str:
    value: str = browser.eval(
        "(s) => document.querySelector(s).value", f"{tid('assistant-editor')} {tid(testid)}"
    )
    return value


def test_an_owner_compares_revisions_and_rolls_back_and_a_viewer_only_reads_them(
    stack: Stack, chromium: Chromium, server: Server, tmp_path: Path
) -> None:
    shots = artifacts_dir(tmp_path) / "revisions"
    shots.mkdir(parents=True, exist_ok=True)
    owner = server.register("revisions")
    viewer = server.register("reader")
    workspace, _ = server.workspace(owner, f"revisions-{os.getpid()}")
    server.context.AddWorkspaceMember(
        context_pb2.AddWorkspaceMemberRequest(
            parent=workspace, user=viewer.name, role=context_pb2.WORKSPACE_ROLE_VIEWER
        ),
        metadata=owner.md,
        timeout=CALL_DEADLINE_S,
    )
    helper = _create(server, owner, workspace, "helper")
    assert _update(server, owner, helper, ["instructions"], instructions=V2).revision == 2
    third = _update(
        server, owner, helper, ["instructions", "max_tool_steps"], instructions=V3, max_tool_steps=8
    )
    assert third.revision == 3

    with chromium.open(stack.origin + "/") as browser:
        sign_in(browser, owner.email)
        browser.click(tid("workspace-item", name=workspace))
        entry = tid("assistant", name=helper)
        browser.wait_visible(entry)
        # Owners find the history in the editor: the list offers Edit, not History.
        assert not browser.visible(f"{entry} {tid('assistant-history-open')}")
        browser.click(f"{entry} {tid('edit-assistant')}")
        editor = tid("assistant-editor")
        browser.wait_visible(f"{editor} {tid('assistant-history-toggle')}")
        assert browser.data(editor)["revision"] == "3"
        browser.click(tid("assistant-history-toggle"))
        rows = _revisions(browser, [3, 2, 1])
        assert [(r["origin"], r["originText"], r["current"]) for r in rows] == [
            ("UPDATED", "changed", "true"),
            ("UPDATED", "changed", "false"),
            ("CREATED", "created", "false"),
        ]
        assert all(r["authorText"] == " by you" and r["author"] == owner.name for r in rows), rows
        # The current one is neither compared with itself nor rolled back to.
        assert [(r["compare"], r["rollback"]) for r in rows] == [
            (False, False),
            (True, True),
            (True, True),
        ]

        # Revision 1 against the current one: the instructions' lines and the step limit.
        browser.click(f"{_row(1)} {tid('compare-revision')}")
        diff = _diff(browser, 1, 3)
        assert diff["changed"] == "instructions max_tool_steps"
        assert diff["summary"] == "Revision 1 → revision 3: 2 fields changed."
        changed = {f["field"]: f["lines"] for f in diff["fields"] if f["changed"]}
        assert changed == {
            "instructions": [
                ["same", "You are Helper."],
                ["del", "Answer in one sentence."],
                ["del", "Sign as Helper."],
                ["add", "Answer in two sentences."],
                ["add", "Sign as the Helper team."],
                ["add", "Never guess."],
            ],
            "max_tool_steps": [["add", "8"]],
        }
        unchanged = [f["field"] for f in diff["fields"] if not f["changed"]]
        assert {"display_name", "description", "model", "tools", "memory_policy"} <= set(unchanged)
        assert "workspace_default" not in unchanged
        assert "etag" not in unchanged
        assert raw_text(browser) == []
        browser.shots(shots / "diff.png")
        # Any two, picked: 2 against 3.
        browser.select(tid("revision-diff-from"), "2")
        diff = _diff(browser, 2, 3)
        assert {f["field"]: f["lines"] for f in diff["fields"] if f["changed"]} == {
            "instructions": [
                ["same", "You are Helper."],
                ["same", "Answer in two sentences."],
                ["del", "Sign as Helper."],
                ["add", "Sign as the Helper team."],
                ["add", "Never guess."],
            ],
            "max_tool_steps": [["add", "8"]],
        }

        # Rolled back to 1, asked first ("Keep it" keeps it).
        browser.click(f"{_row(1)} {tid('rollback-revision')}")
        confirm = f"{_row(1)} {tid('rollback-confirmation')}"
        browser.wait_visible(confirm)
        browser.click(f"{confirm} {tid('cancel-rollback')}")
        assert browser.count(confirm) == 0
        assert _get(server, owner, helper).revision == 3
        browser.click(f"{_row(1)} {tid('rollback-revision')}")
        browser.wait_visible(confirm)
        browser.shots(shots / "rollback-confirmation.png")
        browser.click(f"{confirm} {tid('confirm-rollback')}")
        browser.wait(
            "(s) => document.querySelector(s)?.dataset.revision === '4'", tid("assistant-editor")
        )
        rows = _revisions(browser, [4, 3, 2, 1])
        assert rows[0]["origin"] == "ROLLED_BACK"
        assert rows[0]["restored"] == "1"
        assert rows[0]["restoredText"] == ", restored revision 1"
        assert rows[0]["current"] == "true"
        # The editor shows revision 1's configuration, now current.
        assert _value(browser, "assistant-instructions") == V1
        assert _value(browser, "assistant-steps") == ""
        stored = _get(server, owner, helper)
        assert (stored.revision, stored.instructions, stored.max_tool_steps) == (4, V1, 0)
        kept = server.dispatcher.ListAssistantRevisions(
            dispatcher_pb2.ListAssistantRevisionsRequest(parent=helper),
            metadata=owner.md,
            timeout=CALL_DEADLINE_S,
        ).revisions
        assert (kept[0].revision, kept[0].origin, kept[0].restored_revision) == (
            4,
            dispatcher_pb2.ASSISTANT_REVISION_ORIGIN_ROLLED_BACK,
            1,
        )
        browser.click(f"{_row(1)} {tid('compare-revision')}")
        assert _diff(browser, 1, 4)["changed"] == ""

        # Changed elsewhere: the open history follows; a rollback with the editor's etag,
        # older now, is refused as such, and the current version is offered.
        _update(server, owner, helper, ["description"], description="Answers billing questions.")
        _revisions(browser, [5, 4, 3, 2, 1])
        browser.click(f"{_row(3)} {tid('rollback-revision')}")
        confirm = f"{_row(3)} {tid('rollback-confirmation')}"
        browser.wait_visible(confirm)
        browser.click(f"{confirm} {tid('confirm-rollback')}")
        refused = f"{confirm} {tid('error', code='ABORTED')}"
        browser.wait_visible(refused)
        assert browser.data(refused)["reason"] == "ERROR_REASON_ETAG_MISMATCH"
        assert browser.visible(f"{confirm} {tid('etag-conflict')}")
        assert _get(server, owner, helper).revision == 5
        browser.click(f"{confirm} {tid('reload-assistant')}")
        browser.wait(
            "(s) => document.querySelector(s)?.dataset.revision === '5'", tid("assistant-editor")
        )
        _revisions(browser, [5, 4, 3, 2, 1])
        assert _value(browser, "assistant-instructions") == V1
        assert raw_text(browser) == []
        assert problems(browser) == []

    # A viewer: the history from the list, the same revisions and diff, no Roll back.
    with chromium.open(stack.origin + "/") as browser:
        sign_in(browser, viewer.email)
        browser.click(tid("workspace-item", name=workspace))
        entry = tid("assistant", name=helper)
        browser.wait_visible(f"{entry} {tid('assistant-history-open')}")
        assert not browser.visible(f"{entry} {tid('edit-assistant')}")
        browser.click(f"{entry} {tid('assistant-history-open')}")
        rows = _revisions(browser, [5, 4, 3, 2, 1])
        assert not any(r["rollback"] for r in rows)
        assert rows[1]["restoredText"] == ", restored revision 1"
        # Written by someone else: named, not "you".
        assert rows[0]["authorText"] == f" by {owner.name}"
        browser.click(f"{_row(3)} {tid('compare-revision')}")
        diff = _diff(browser, 3, 5)
        assert diff["changed"] == "description instructions max_tool_steps"
        assert browser.count(tid("rollback-revision")) == 0
        # The history only: no form to save.
        assert browser.count(f"{tid('assistant-editor')} {tid('save-assistant')}") == 0
        assert raw_text(browser) == []
        browser.shots(shots / "viewer.png")
        browser.click(tid("close-editor"))
        browser.wait("(s) => !document.querySelector(s).checkVisibility()", tid("assistant-editor"))
        assert problems(browser) == []


def test_revisions_beyond_a_page_come_with_load_more(
    stack: Stack, chromium: Chromium, server: Server
) -> None:
    owner = server.register("pages")
    workspace, _ = server.workspace(owner, f"revision-pages-{os.getpid()}")
    helper = _create(server, owner, workspace, "helper")
    for step in range(2, 24):
        changed = _update(server, owner, helper, ["description"], description=f"Step {step}.")
        assert changed.revision == step
    with chromium.open(stack.origin + "/") as browser:
        sign_in(browser, owner.email)
        browser.click(tid("workspace-item", name=workspace))
        browser.click(f"{tid('assistant', name=helper)} {tid('edit-assistant')}")
        browser.click(tid("assistant-history-toggle"))
        _revisions(browser, list(range(23, 3, -1)))
        browser.wait_visible(tid("assistant-revisions-more"))
        browser.click(tid("assistant-revisions-more"))
        _revisions(browser, list(range(23, 0, -1)))
        browser.wait(
            "(s) => !document.querySelector(s).checkVisibility()", tid("assistant-revisions-more")
        )
        # The picks offer every listed revision.
        offered = browser.eval(
            "(s) => [...document.querySelector(s).options].map((o) => o.value)",
            tid("revision-diff-from"),
        )
        assert offered == [str(n) for n in range(23, 0, -1)]
        assert problems(browser) == []
