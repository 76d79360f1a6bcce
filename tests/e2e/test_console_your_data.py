"""A person's data in the browser console (docs/console.md "Your data"): deleting the
account, and exporting everything of theirs as one archive.

The stack is test_console.py's (its fixtures, imported); what the page shows and does is
checked against the server's own answers (Python stubs):

- Delete my account lists exactly the workspaces the person owns with no other owner (not
  one they share with another owner), each to delete or hand over to one of its members.
  With no choice made the page says which is missing and sends nothing; a wrong email is
  refused by the server on ``confirm_email`` and deletes nothing. Confirmed with the email
  (in capitals: it is compared case-insensitively), one workspace deleted and the other
  handed over: the page signs out and says the account is deleted, this tab keeps no
  session, every token of the person is refused, the member the workspace went to is its
  owner, and the deleted workspace is NOT_FOUND for the member who could read it.
- Remove and erase, on a member's row (account.ts): asked, then the member and, in the
  background, what they wrote in the workspace are gone.
- Export my data: the page asks, follows the export until it is written, shows its size and
  until when it is kept, and downloads a ZIP that holds the account (its email) and a message
  the person wrote.
"""

from __future__ import annotations

import io
import json
import os
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Final

import grpc
import pytest

from switchboard.api.auth.v1 import auth_pb2
from switchboard.api.context.v1 import context_pb2
from tests.conftest import CALL_DEADLINE_S
from tests.e2e import test_console as console
from tests.e2e.chromium import artifacts_dir
from tests.e2e.test_console import (
    Chromium,
    Page,
    Server,
    Stack,
    User,
    grpc_web_calls,
    idle,
    method,
    problems,
    raw_text,
    sign_in,
    tid,
)

pytestmark = pytest.mark.e2e

stack = console.stack
chromium = console.chromium
server = console.server

#: Exports a person may ask for in a day (ExportMyData).
DAILY_EXPORTS: Final = 5
CONFIRMATION: Final = tid("delete-account-confirmation")


def _add(
    server: Server,
    owner: User,
    workspace: str,
    member: User,
    role: context_pb2.WorkspaceRole.ValueType,
) -> None:
    server.context.AddWorkspaceMember(
        context_pb2.AddWorkspaceMemberRequest(parent=workspace, user=member.name, role=role),
        metadata=owner.md,
        timeout=CALL_DEADLINE_S,
    )


def _members(
    server: Server, user: User, workspace: str
) -> dict[str, context_pb2.WorkspaceRole.ValueType]:
    listed = server.context.ListWorkspaceMembers(
        context_pb2.ListWorkspaceMembersRequest(parent=workspace, page_size=100),
        metadata=user.md,
        timeout=CALL_DEADLINE_S,
    )
    return {m.user: m.role for m in listed.members}


def _refused(call: Callable[[], object]) -> grpc.StatusCode:
    """The code a call that must fail failed with."""
    with pytest.raises(grpc.RpcError) as refused:
        call()
    code: grpc.StatusCode = refused.value.code()
    return code


def _open_your_data(browser: Page) -> None:
    browser.click(f"{tid('your-data')} > summary")
    browser.wait_visible(tid("export-data"))


def _owned_rows(browser: Page) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = browser.eval(
        "(s) => [...document.querySelectorAll(s)].map((r) => ({ ...r.dataset,"
        " owners: [...r.querySelectorAll('option')].map((o) => o.value).join(' ') }))",
        tid("owned-workspace"),
    )
    return rows


def _row(workspace: str, testid: str, **attrs: str) -> str:
    return f"{tid('owned-workspace', workspace=workspace)} {tid(testid, **attrs)}"


def _ask_to_delete(browser: Page) -> None:
    """Delete my account, then the confirmation's own button."""
    browser.click(tid("delete-account"))
    browser.wait_visible(tid("confirm-delete-account"))
    browser.click(tid("confirm-delete-account"))


def test_an_account_is_deleted_after_each_workspace_owned_alone_is_deleted_or_handed_over(
    stack: Stack, chromium: Chromium, server: Server, tmp_path: Path
) -> None:
    shots = artifacts_dir(tmp_path) / "your-data"
    shots.mkdir(parents=True, exist_ok=True)
    person = server.register("leaving")
    heir = server.register("heir")
    pid = os.getpid()
    # Owned alone, the heir a viewer in it: deleted with the account.
    dropped, dropped_chat = server.workspace(person, f"dropped-{pid}")
    _add(server, person, dropped, heir, context_pb2.WORKSPACE_ROLE_VIEWER)
    # Owned alone, the heir an editor: handed over to them.
    kept, _ = server.workspace(person, f"kept-{pid}")
    _add(server, person, kept, heir, context_pb2.WORKSPACE_ROLE_EDITOR)
    # Owned with the heir: not the person's to decide, and not listed.
    shared, _ = server.workspace(person, f"shared-{pid}")
    _add(server, person, shared, heir, context_pb2.WORKSPACE_ROLE_OWNER)
    server.append(person, dropped_chat, "words of mine")

    with chromium.open(stack.origin + "/") as browser:
        sign_in(browser, person.email)
        idle(browser)
        _open_your_data(browser)
        assert not browser.visible(tid("delete-account-form"))
        browser.click(tid("delete-account-start"))
        browser.wait_visible(tid("delete-account-form"))
        browser.wait(
            "(s) => document.querySelectorAll(s).length === 2"
            " && (document.body.dataset.busy ?? '0') === '0'",
            tid("owned-workspace"),
        )
        rows = {r["workspace"]: r for r in _owned_rows(browser)}
        assert set(rows) == {dropped, kept}
        # The members each could go to: the heir, never the person.
        assert {w: (r["members"], r["owners"]) for w, r in rows.items()} == {
            dropped: ("1", heir.name),
            kept: ("1", heir.name),
        }

        # Nothing chosen yet: the page says what is missing and sends nothing.
        browser.fill(tid("delete-account-email"), person.email)
        browser.click(tid("delete-account"))
        browser.wait_for(f"{tid('delete-account-form')} {tid('error')}")
        missing = browser.eval(
            "(s) => [...document.querySelectorAll(s)].map((v) => v.dataset.field)",
            f"{tid('delete-account-form')} {tid('error-violation')}",
        )
        assert missing == ["workspaces[0].action", "workspaces[1].action"]
        assert browser.count(CONFIRMATION) == 0

        # Delete one, hand the other over.
        browser.click(_row(dropped, "owned-workspace-choice", choice="delete"))
        browser.click(_row(kept, "owned-workspace-choice", choice="hand-over"))
        browser.select(_row(kept, "owned-workspace-new-owner"), heir.name)

        # A wrong email: refused on confirm_email, shown in the confirmation, nothing deleted.
        browser.fill(tid("delete-account-email"), f"not-{person.email}")
        _ask_to_delete(browser)
        browser.wait_for(f"{CONFIRMATION} {tid('error')}")
        shown = browser.data(f"{CONFIRMATION} {tid('error')}")
        assert shown["code"] == "INVALID_ARGUMENT"
        violations = browser.eval(
            "(s) => [...document.querySelectorAll(s)].map((v) => v.dataset.field)",
            f"{CONFIRMATION} {tid('error-violation')}",
        )
        assert violations == ["confirm_email"]
        assert browser.visible(tid("console"))
        browser.shots(shots / "delete-refused.png")
        assert _members(server, person, kept) == {
            person.name: context_pb2.WORKSPACE_ROLE_OWNER,
            heir.name: context_pb2.WORKSPACE_ROLE_EDITOR,
        }
        assert server.messages(person, dropped_chat)[0].parts[0].text == "words of mine"

        # The right email, in capitals: the account goes, and the page signs out.
        browser.fill(tid("delete-account-email"), person.email.upper())
        _ask_to_delete(browser)
        browser.wait_visible(tid("auth"))
        assert not browser.visible(tid("console"))
        notice = browser.eval("(s) => document.querySelector(s).textContent", tid("notice"))
        assert notice.startswith("Your account is deleted."), notice
        # Why the feed's stream ended is not what the sign-in screen says.
        assert browser.count(tid("auth-problem")) == 0
        assert browser.storage() == {}
        assert browser.count(tid("owned-workspace")) == 0
        browser.screenshot(shots / "deleted.png")
        assert raw_text(browser) == []
        assert problems(browser) == []

    # Every credential of the person is refused: the access token and the refresh token.
    listing = server.context.ListWorkspaces
    code = _refused(
        lambda: listing(
            context_pb2.ListWorkspacesRequest(page_size=10),
            metadata=person.md,
            timeout=CALL_DEADLINE_S,
        )
    )
    assert code == grpc.StatusCode.UNAUTHENTICATED
    code = _refused(
        lambda: server.auth.RefreshToken(
            auth_pb2.RefreshTokenRequest(refresh_token=person.refresh), timeout=CALL_DEADLINE_S
        )
    )
    assert code == grpc.StatusCode.UNAUTHENTICATED
    # The handed-over workspace is the heir's; the shared one lost a co-owner.
    assert _members(server, heir, kept) == {heir.name: context_pb2.WORKSPACE_ROLE_OWNER}
    assert _members(server, heir, shared) == {heir.name: context_pb2.WORKSPACE_ROLE_OWNER}
    # The deleted one is gone for the member who could read it.
    code = _refused(
        lambda: server.context.GetWorkspace(
            context_pb2.GetWorkspaceRequest(name=dropped), metadata=heir.md, timeout=CALL_DEADLINE_S
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND
    listed = server.context.ListWorkspaces(
        context_pb2.ListWorkspacesRequest(page_size=100), metadata=heir.md, timeout=CALL_DEADLINE_S
    )
    names = {w.name for w in listed.workspaces}
    assert dropped not in names
    assert {kept, shared} <= names


def test_the_persons_data_is_exported_followed_until_written_and_downloaded_as_a_zip(
    stack: Stack, chromium: Chromium, server: Server, tmp_path: Path
) -> None:
    person = server.register("exporting")
    _, conversation = server.workspace(person, f"export-{os.getpid()}")
    phrase = f"otters hold hands {os.getpid()}"
    server.append(person, conversation, phrase)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with chromium.open(stack.origin + "/", downloads=downloads) as browser:
        sign_in(browser, person.email)
        idle(browser)
        _open_your_data(browser)
        browser.click(tid("export-data"))
        browser.wait_for(tid("data-export"))
        name = browser.data(tid("data-export"))["name"]
        assert name.startswith(f"{person.name}/exports/")
        # The page reads it again until it is written.
        browser.wait_for(tid("data-export", state="DATA_EXPORT_STATE_SUCCEEDED"))
        stored = server.context.GetDataExport(
            context_pb2.GetDataExportRequest(name=name), metadata=person.md, timeout=CALL_DEADLINE_S
        ).export
        assert stored.state == context_pb2.DATA_EXPORT_STATE_SUCCEEDED
        assert browser.data(tid("data-export"))["size"] == str(stored.size_bytes)
        assert browser.visible(tid("data-export-size"))
        expires = browser.eval(
            "(s) => document.querySelector(s).textContent", tid("data-export-expires")
        )
        assert expires.startswith("kept until ")
        assert str(stored.expire_time.ToDatetime().year) in expires
        browser.screenshot(artifacts_dir(tmp_path) / "your-data-export.png")
        browser.click(tid("download-data-export"))
        guid = browser.call("downloaded", filename="switchboard-export.zip")
        calls = [method(n) for n in grpc_web_calls(browser.network(), stack.origin)]
        assert calls.count("ExportMyData") == 1
        assert calls.count("DownloadFile") == 1
        # Asked for RUNNING, it was read again until written.
        assert calls.count("GetDataExport") >= 1
        assert raw_text(browser) == []

        # Four more today, each followed to its end; the sixth is refused, in the server's words.
        exports = [name]
        for _ in range(DAILY_EXPORTS - 1):
            browser.click(tid("export-data"))
            exports.append(
                browser.wait(
                    "([s, seen]) => { const e = document.querySelector(s);"
                    " return e && !seen.includes(e.dataset.name)"
                    " && e.dataset.state === 'DATA_EXPORT_STATE_SUCCEEDED' && e.dataset.name; }",
                    [tid("data-export"), exports],
                )
            )
        browser.click(tid("export-data"))
        limit = f"{tid('data-export-section')} {tid('error', action='export-data')}"
        browser.wait_visible(limit)
        shown = browser.data(limit)
        message = browser.eval(
            "(s) => document.querySelector(s).textContent", f"{limit} {tid('error-message')}"
        )
        with pytest.raises(grpc.RpcError) as refused:
            server.context.ExportMyData(
                context_pb2.ExportMyDataRequest(), metadata=person.md, timeout=CALL_DEADLINE_S
            )
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert shown["code"] == "RESOURCE_EXHAUSTED"
        assert message == refused.value.details()
        # The last export stays shown, ready to download.
        assert browser.data(tid("data-export"))["name"] == exports[-1]
        browser.screenshot(artifacts_dir(tmp_path) / "your-data-export-limit.png")
        assert raw_text(browser) == []
        assert problems(browser) == []
    archive = (downloads / guid).read_bytes()
    assert len(archive) == stored.size_bytes
    with zipfile.ZipFile(io.BytesIO(archive)) as zipped:
        assert zipped.testzip() is None
        files = zipped.namelist()
        account = json.loads(zipped.read("account.json"))
        assert person.email in json.dumps(account)
        written = [
            f for f in files if f.startswith("conversations/") and phrase in zipped.read(f).decode()
        ]
        assert written, files


def test_an_owner_removes_a_member_and_erases_what_they_wrote_here(
    stack: Stack, chromium: Chromium, server: Server, tmp_path: Path
) -> None:
    """Remove and erase, on a member's row: asked first, then the member is gone and, in the
    background, their words in the workspace; the owner's stay, and so does the member's
    account."""
    shots = artifacts_dir(tmp_path) / "your-data"
    shots.mkdir(parents=True, exist_ok=True)
    owner = server.register("erasing-owner")
    member = server.register("erased-member")
    pid = os.getpid()
    first, chat = server.workspace(owner, f"erase-a-{pid}")
    second, _ = server.workspace(owner, f"erase-b-{pid}")
    _add(server, owner, first, member, context_pb2.WORKSPACE_ROLE_EDITOR)
    server.append(owner, chat, "the owner's words")
    server.append(member, chat, "the member's words")

    with chromium.open(stack.origin + "/") as browser:
        sign_in(browser, owner.email)
        browser.wait_visible(tid("workspace-picker"))
        browser.click(tid("picker-workspace", name=first))
        row = tid("member", user=member.name)
        browser.wait_visible(row)
        assert browser.count(f"{tid('member', user=owner.name)} {tid('erase-member')}") == 0
        browser.click(f"{row} {tid('erase-member')}")
        browser.wait_visible(tid("erase-member-confirmation"))
        browser.shots(shots / "erase-member-asked.png")
        browser.click(tid("confirm-erase-member"))
        browser.wait("(s) => document.querySelectorAll(s).length === 0", row)
        assert problems(browser) == []
        assert raw_text(browser) == []

    assert member.name not in _members(server, owner, first)
    texts: list[str] = []
    deadline = time.monotonic() + CALL_DEADLINE_S
    while True:  # the erasure is done in the background: polled, under a deadline
        texts = [m.parts[0].text for m in server.messages(owner, chat)]
        if texts == ["the owner's words"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert texts == ["the owner's words"]
    # The member's account stays: they still list their own workspaces (none).
    listed = server.context.ListWorkspaces(
        context_pb2.ListWorkspacesRequest(page_size=10), metadata=member.md, timeout=CALL_DEADLINE_S
    )
    assert first not in {w.name for w in listed.workspaces}
    assert second
