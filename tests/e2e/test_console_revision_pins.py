"""What pins an assistant's revision, made in the console (docs/console.md): a schedule's
"Revision" beside "Answered by" (``Schedule.assistant_revision``), and a new API key's
"Pin assistants" rows (``CreateApiKeyRequest.assistant_pins``), each offering the
assistant's kept revisions (ListAssistantRevisions), the newest marked current.

The stack is test_console.py's (its fixtures, imported): ``switchboard serve --dev``
behind Envoy's TLS listener, Chromium driven by tests/browser/console.mjs. The assistant
is made and changed through the Python stubs, as a script would, and what the page made is
read back from the server:

- A schedule answered by the assistant pinned at revision 1 (of 2) says so in its summary,
  and the server holds ``assistant_revision == 1``.
- An API key pinning the assistant at revision 1 lists the pin in its row, and the server
  holds that one pin.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import pytest
from google.protobuf import field_mask_pb2

from switchboard.api.auth.v1 import auth_pb2
from switchboard.api.dispatcher.v1 import dispatcher_pb2
from tests.conftest import CALL_DEADLINE_S
from tests.e2e import test_console as console
from tests.e2e.chromium import artifacts_dir
from tests.e2e.test_console import (
    Chromium,
    Page,
    Server,
    Stack,
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

#: A revision select's options once it has listed ``assistant``'s kept revisions, as
#: [value, text] pairs, or null while it holds another assistant's or none yet.
REVISION_OPTIONS_JS: Final = """([selector, assistant]) => {
  const select = document.querySelector(selector);
  if (!select || select.dataset.assistant !== assistant || select.dataset.loaded !== 'true') {
    return null;
  }
  return [...select.options].map((o) => [o.value, o.textContent]);
}"""


def _options(browser: Page, selector: str, assistant: str) -> list[list[str]]:
    found: list[list[str]] = browser.wait(REVISION_OPTIONS_JS, [selector, assistant])
    return found


def _text(browser: Page, selector: str) -> str:
    text: str = browser.eval("(s) => document.querySelector(s).textContent", selector)
    return text


def test_a_schedule_and_an_api_key_pin_an_assistants_revision_from_the_console(
    stack: Stack, chromium: Chromium, server: Server, tmp_path: Path
) -> None:
    shots = artifacts_dir(tmp_path) / "revision-pins"
    shots.mkdir(parents=True, exist_ok=True)
    owner = server.register("pins")
    workspace, _ = server.workspace(owner, f"revision-pins-{os.getpid()}")
    helper: str = server.dispatcher.CreateAssistant(
        dispatcher_pb2.CreateAssistantRequest(
            parent=workspace,
            assistant_id="helper",
            assistant=dispatcher_pb2.Assistant(display_name="Helper", instructions="Be brief."),
        ),
        metadata=owner.md,
        timeout=CALL_DEADLINE_S,
    ).assistant.name
    changed: dispatcher_pb2.Assistant = server.dispatcher.UpdateAssistant(
        dispatcher_pb2.UpdateAssistantRequest(
            assistant=dispatcher_pb2.Assistant(name=helper, instructions="Be very brief."),
            update_mask=field_mask_pb2.FieldMask(paths=["instructions"]),
        ),
        metadata=owner.md,
        timeout=CALL_DEADLINE_S,
    ).assistant
    assert changed.revision == 2
    editor = tid("schedule-editor")

    with chromium.open(stack.origin + "/") as browser:
        sign_in(browser, owner.email)
        browser.click(tid("workspace-item", name=workspace))
        browser.click(tid("open-schedules"))
        browser.wait_visible(tid("schedules-page"))
        browser.wait_for(tid("schedules-empty"))

        # A schedule: "Revision" shows once an assistant answers, offering its kept ones.
        browser.click(tid("new-schedule"))
        browser.wait_visible(editor)
        revision = f"{editor} {tid('schedule-revision')}"
        assert not browser.visible(revision)
        browser.fill(f"{editor} {tid('schedule-id')}", "pinned")
        browser.fill(f"{editor} {tid('schedule-name')}", "Pinned")
        browser.select(f"{editor} {tid('schedule-target')}", helper)
        assert _options(browser, revision, helper) == [
            ["0", "current (follows changes)"],
            ["2", "2 (current)"],
            ["1", "1"],
        ]
        assert browser.visible(revision)
        browser.select(revision, "1")
        browser.fill(f"{editor} {tid('schedule-template')}", "Summarise the day.")
        browser.select(f"{editor} {tid('schedule-kind')}", "interval")
        browser.fill(f"{editor} {tid('schedule-interval')}", "3600")
        browser.click(tid("save-schedule"))
        name = f"{workspace}/schedules/pinned"
        entry = tid("schedule", name=name)
        browser.wait_for(f'{entry}[data-assistant-revision="1"]')
        assert not browser.visible(editor)
        summary = _text(browser, f"{entry} {tid('schedule-when')}")
        assert summary.endswith(" · assistant Helper at revision 1"), summary
        stored = server.dispatcher.GetSchedule(
            dispatcher_pb2.GetScheduleRequest(name=name), metadata=owner.md, timeout=CALL_DEADLINE_S
        ).schedule
        assert (stored.assistant, stored.assistant_revision) == (helper, 1)
        # Opened again, the editor shows the pin it holds.
        browser.click(f"{entry} {tid('edit-schedule')}")
        browser.wait_visible(editor)
        _options(browser, revision, helper)
        assert browser.eval("(s) => document.querySelector(s).value", revision) == "1"
        browser.click(tid("close-schedule-editor"))
        assert raw_text(browser) == []
        browser.shots(shots / "schedule.png")

        # An API key pinning the assistant at revision 1.
        browser.click(f"{tid('account')} > summary")
        browser.wait_for(tid("session", current="true"))
        browser.fill(tid("api-key-name"), "pinned")
        browser.click(tid("add-api-key-pin"))
        row = tid("api-key-pin-row")
        browser.wait_for(row)
        assert browser.eval("(s) => document.querySelector(s).value", tid("api-key-pin-assistant"))
        key_revision = f"{row} {tid('api-key-pin-revision')}"
        assert _options(browser, key_revision, helper) == [["2", "2 (current)"], ["1", "1"]]
        browser.select(key_revision, "1")
        browser.click(tid("create-api-key"))
        browser.wait_for(tid("api-key-secret"))
        [key] = server.auth.ListApiKeys(
            auth_pb2.ListApiKeysRequest(page_size=10),
            metadata=owner.md,
            timeout=CALL_DEADLINE_S,
        ).api_keys
        assert [(p.assistant, p.revision) for p in key.assistant_pins] == [(helper, 1)]
        pin = f"{tid('api-key', name=key.name)} {tid('api-key-pin', assistant=helper)}"
        browser.wait_for(pin)
        assert browser.data(pin)["revision"] == "1"
        shown = _text(browser, f"{tid('api-key', name=key.name)} {tid('api-key-pins')}")
        assert shown == " · pins Helper at revision 1", shown
        # The form is ready for the next key: no pins carried over.
        assert browser.count(row) == 0
        assert raw_text(browser) == []
        browser.shots(shots / "api-key.png")
        assert problems(browser) == []
