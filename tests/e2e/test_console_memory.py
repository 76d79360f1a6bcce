"""The console's Memory page (docs/console.md#memory, docs/memory.md): what the assistants
remember about the signed-in person in the open workspace, and about the workspace, each
item with its origin, its source message (a link that opens its conversation at it), its
history, Edit and Forget.

The stack is test_console.py's (its fixtures, imported): ``switchboard serve --dev``
behind Envoy's TLS listener, Chromium driven by tests/browser/console.mjs. The memory is
seeded through the Python stubs as the people themselves would write it, and every step
on the page is checked against the server's own answers:

- The owner's page lists their item of this workspace (the one it superseded only once
  "Show" takes what is no longer true, marked retired with the server's reason; an item of
  another workspace never), and the workspace's item, each with its source link; the
  history shows both items' versions exactly as GetMemoryItem's; the source link opens
  the conversation with that message marked; an edit elsewhere shows by itself (the
  page follows MEMORY_CHANGED); Edit changes the content (the server has it, one version
  more); Forget, confirmed, removes the item and the item it replaced (NOT_FOUND both).
- Formed from a conversation: a fact typed in the composer is formed by the scripted
  model (tests/fakes/openai_server.py, answering forming's JSON-schema requests) under the
  assistant's policy, and appears on the open page by itself, formed by that assistant
  and model, with the message it came from; the feed says what was decided.
- A colleague who is an editor sees Edit and Forget on the workspace's item; demoted to
  viewer meanwhile, their Forget is refused by the server and the page says so beside the
  item, which stays; after a reload the viewer sees the workspace's item without Edit or
  Forget, and none of the owner's own items.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import grpc
import pytest
from google.protobuf import field_mask_pb2

from switchboard.api.context.v1 import context_pb2
from switchboard.api.dispatcher.v1 import dispatcher_pb2
from switchboard.platform.values.memorypolicy import CATEGORY_WORDS
from tests.conftest import CALL_DEADLINE_S
from tests.e2e import test_console as console
from tests.e2e.chromium import artifacts_dir
from tests.e2e.test_console import (
    Chromium,
    Page,
    Server,
    Stack,
    User,
    idle,
    open_conversation,
    problems,
    raw_text,
    run_state,
    send,
    sign_in,
    tid,
)
from tests.fakes.openai_server import FakeOpenAI, Reply, echo_reply

pytestmark = pytest.mark.e2e

# The console's stack, browser and server stubs, as test_console.py makes them (a stack of
# this module's own: module-scoped fixtures are made once per module that uses them).
stack = console.stack
chromium = console.chromium
server = console.server

#: The items a list of the page shows, in its order, with what each says.
ITEMS_JS: Final = """(scope) => [...document.querySelectorAll(
  `[data-testid="memory-list"][data-scope="${scope}"] > [data-testid="memory-item"]`,
)].map((row) => ({
    ...row.dataset,
    content: row.querySelector('[data-testid="memory-content"]')?.textContent ?? null,
    sources: [...row.querySelectorAll('[data-testid="memory-source"]')].map((a) => ({
      message: a.dataset.message, href: a.getAttribute('href'), text: a.textContent })),
    retiredNote: row.querySelector('[data-testid="memory-retired"]')?.textContent ?? null,
    reason: row.querySelector('[data-testid="memory-invalid-reason"]')?.textContent ?? null,
    meta: row.querySelector('[data-testid="memory-meta"]').textContent,
    written: row.querySelector('[data-testid="memory-written"]')?.textContent ?? null,
    edit: row.querySelector('[data-testid="edit-memory"]') !== null,
    forget: row.querySelector('[data-testid="forget-memory"]') !== null,
  }))"""

#: The versions an item's open history shows.
VERSIONS_JS: Final = """(name) => {
  const row = [...document.querySelectorAll('[data-testid="memory-item"]')]
    .find((r) => r.dataset.name === name);
  const list = row?.querySelector('[data-testid="memory-versions"]');
  const history = row?.querySelector('[data-testid="memory-history"]');
  if (!list || history.dataset.loaded !== 'true') return null;
  return [...list.querySelectorAll('[data-testid="memory-version"]')].map((v) => ({
    ...v.dataset,
    content: v.querySelector('[data-testid="memory-version-content"]').textContent,
  }));
}"""


def _items(browser: Page, scope: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = browser.eval(ITEMS_JS, scope)
    return found


def _listed(browser: Page, scope: str, names: list[str]) -> list[dict[str, Any]]:
    """Waits until the ``scope`` list shows exactly ``names``, in that order; its items."""
    found: list[dict[str, Any]] = browser.wait(
        f"([scope, names]) => {{ const items = ({ITEMS_JS})(scope);"
        " return JSON.stringify(items.map((i) => i.name)) === JSON.stringify(names) && items; }",
        [scope, names],
    )
    return found


def _controls(item: dict[str, Any]) -> tuple[bool, bool]:
    """Whether the item offers Edit, and Forget."""
    return bool(item["edit"]), bool(item["forget"])


def _row(name: str) -> str:
    return tid("memory-item", name=name)


def _create(
    server: Server, user: User, parent: str, item: context_pb2.MemoryItem
) -> context_pb2.MemoryItem:
    made: context_pb2.MemoryItem = server.context.CreateMemoryItem(
        context_pb2.CreateMemoryItemRequest(parent=parent, memory_item=item),
        metadata=user.md,
        timeout=CALL_DEADLINE_S,
    ).memory_item
    return made


def _get(
    server: Server, user: User, name: str, *, history: bool = False
) -> context_pb2.GetMemoryItemResponse:
    got: context_pb2.GetMemoryItemResponse = server.context.GetMemoryItem(
        context_pb2.GetMemoryItemRequest(name=name, include_history=history),
        metadata=user.md,
        timeout=CALL_DEADLINE_S,
    )
    return got


def _gone(server: Server, user: User, name: str) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        _get(server, user, name)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND, refused.value


def _open_memory(browser: Page, workspace: str) -> None:
    browser.click(tid("workspace-item", name=workspace))
    browser.wait_for(f"{tid('workspace-item', name=workspace)}.current")
    browser.click(tid("open-memory"))
    browser.wait_visible(tid("memory-page", workspace=workspace))
    assert browser.eval("() => location.hash") == f"#{workspace}/memory"


def test_the_memory_page_shows_sources_and_history_and_edits_and_forgets(
    stack: Stack, chromium: Chromium, server: Server, tmp_path: Path
) -> None:
    shots = artifacts_dir(tmp_path) / "memory"
    shots.mkdir(parents=True, exist_ok=True)
    owner = server.register("remembered")
    colleague = server.register("colleague")
    workspace, conversation = server.workspace(owner, f"memory-{os.getpid()}")
    elsewhere, _ = server.workspace(owner, f"memory-else-{os.getpid()}")
    server.context.AddWorkspaceMember(
        context_pb2.AddWorkspaceMemberRequest(
            parent=workspace, user=colleague.name, role=context_pb2.WORKSPACE_ROLE_EDITOR
        ),
        metadata=owner.md,
        timeout=CALL_DEADLINE_S,
    )
    said = server.append(owner, conversation, "I moved from Paris to Berlin last week.")
    wifi_said = server.append(owner, conversation, "The office wifi is called Harbour.")

    # The owner's own items, of this workspace: Paris, then Berlin superseding it; and one
    # of another workspace, which this workspace's page never shows.
    paris = _create(
        server,
        owner,
        owner.name,
        context_pb2.MemoryItem(
            kind=context_pb2.MEMORY_KIND_FACT,
            content="Lives in Paris",
            workspace=workspace,
            source_messages=[said],
        ),
    )
    berlin = _create(
        server,
        owner,
        owner.name,
        context_pb2.MemoryItem(
            kind=context_pb2.MEMORY_KIND_FACT,
            content="Lives in Berlin",
            workspace=workspace,
            source_messages=[said],
            supersedes=paris.name,
        ),
    )
    _create(
        server,
        owner,
        owner.name,
        context_pb2.MemoryItem(
            kind=context_pb2.MEMORY_KIND_PREFERENCE, content="Likes green tea", workspace=elsewhere
        ),
    )
    wifi = _create(
        server,
        owner,
        workspace,
        context_pb2.MemoryItem(
            kind=context_pb2.MEMORY_KIND_FACT,
            content="The office wifi is called Harbour",
            source_messages=[wifi_said],
        ),
    )
    retired_paris = _get(server, owner, paris.name).memory_item
    assert retired_paris.HasField("invalid_time")
    assert retired_paris.superseded_by == berlin.name

    with chromium.open(stack.origin + "/") as browser:
        sign_in(browser, owner.email)
        _open_memory(browser, workspace)

        # What is true now: Berlin (not Paris, not the other workspace's tea), and the wifi.
        mine = _listed(browser, "user", [berlin.name])
        shared = _listed(browser, "workspace", [wifi.name])
        assert mine[0]["content"] == "Lives in Berlin"
        assert mine[0]["retired"] == "false"
        assert mine[0]["kind"] == "FACT"
        assert mine[0]["supersedes"] == paris.name
        assert mine[0]["sources"] == [
            {"message": said, "href": f"#{said}", "text": mine[0]["sources"][0]["text"]}
        ]
        assert "Plans" in mine[0]["sources"][0]["text"]
        assert "true since" in mine[0]["meta"]
        assert "learned" in mine[0]["meta"]
        assert mine[0]["written"] == f"written by {owner.email}"
        assert _controls(mine[0]) == (True, True)
        assert shared[0]["content"] == "The office wifi is called Harbour"
        assert [s["message"] for s in shared[0]["sources"]] == [wifi_said]
        assert _controls(shared[0]) == (True, True)
        assert raw_text(browser) == []

        # Its history: Berlin's versions and those of Paris, which it replaced, as the
        # server lists them, Paris's marked retired.
        browser.click(f"{_row(berlin.name)} {tid('memory-history-toggle')}")
        versions = browser.wait(VERSIONS_JS, berlin.name)
        history = _get(server, owner, berlin.name, history=True).history
        assert [
            (v["memoryItem"], int(v["version"]), v["change"], v["content"]) for v in versions
        ] == [
            (
                h.memory_item,
                h.version,
                context_pb2.MemoryChange.Name(h.change).removeprefix("MEMORY_CHANGE_"),
                h.content,
            )
            for h in history
        ]
        assert {v["memoryItem"] for v in versions} == {paris.name, berlin.name}
        assert any(v["memoryItem"] == paris.name and v["retired"] == "true" for v in versions)
        assert all(v["earlier"] == str(v["memoryItem"] == paris.name).lower() for v in versions)
        assert all(v["retired"] == "false" for v in versions if v["memoryItem"] == berlin.name)
        browser.shots(shots / "memory-page.png")

        # What is no longer true, on asking: Paris, retired, with the server's reason.
        browser.select(tid("memory-validity"), str(context_pb2.MEMORY_VALIDITY_ALL))
        both: list[dict[str, Any]] = browser.wait(
            f"(scope) => {{ const items = ({ITEMS_JS})(scope);"
            " return items.length === 2 && items; }",
            "user",
        )
        assert {i["name"] for i in both} == {berlin.name, paris.name}
        old = next(i for i in both if i["name"] == paris.name)
        assert old["retired"] == "true"
        assert old["supersededBy"] == berlin.name
        assert old["reason"] == retired_paris.invalid_reason != ""
        assert "retired" in old["retiredNote"]
        # A retired item is not edited; it may be forgotten.
        assert _controls(old) == (False, True)
        browser.select(tid("memory-validity"), str(context_pb2.MEMORY_VALIDITY_RETIRED))
        _listed(browser, "user", [paris.name])
        _listed(browser, "workspace", [])
        browser.shots(shots / "retired.png")
        browser.select(tid("memory-validity"), str(context_pb2.MEMORY_VALIDITY_CURRENT))
        _listed(browser, "user", [berlin.name])

        # The source link opens the conversation at its message.
        browser.click(f"{_row(berlin.name)} {tid('memory-source')}")
        browser.wait_for(f"{tid('message', name=said)}[data-highlighted='true']")
        browser.wait_for(f"{tid('conversation-item', name=conversation)}.current")
        assert not browser.visible(tid("memory-page"))
        browser.click(tid("open-memory"))
        _listed(browser, "workspace", [wifi.name])

        # Changed elsewhere: the page follows (MEMORY_CHANGED), with the history still open.
        browser.click(f"{_row(wifi.name)} {tid('memory-history-toggle')}")
        browser.wait(VERSIONS_JS, wifi.name)
        elsewhere_edit = server.context.UpdateMemoryItem(
            context_pb2.UpdateMemoryItemRequest(
                memory_item=context_pb2.MemoryItem(
                    name=wifi.name, content="The office wifi is called Harbour-5G"
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["content"]),
            ),
            metadata=owner.md,
            timeout=CALL_DEADLINE_S,
        ).memory_item
        browser.wait(
            "([s, text]) => document.querySelector(s)?.textContent === text",
            [f"{_row(wifi.name)} {tid('memory-content')}", elsewhere_edit.content],
        )
        assert browser.data(_row(wifi.name))["etag"] == elsewhere_edit.etag
        browser.wait(
            "(name) => { const v = (" + VERSIONS_JS + ")(name); return v && v.length === 2; }",
            wifi.name,
        )

        # Edit: the server has the new content, one version more.
        browser.click(f"{_row(wifi.name)} {tid('edit-memory')}")
        browser.fill(
            f"{_row(wifi.name)} {tid('memory-edit-content')}",
            "The office wifi is called Lighthouse",
        )
        browser.click(f"{_row(wifi.name)} {tid('save-memory')}")
        browser.wait(
            "([s, text]) => document.querySelector(s)?.textContent === text",
            [f"{_row(wifi.name)} {tid('memory-content')}", "The office wifi is called Lighthouse"],
        )
        stored = _get(server, owner, wifi.name).memory_item
        assert stored.content == "The office wifi is called Lighthouse"
        assert stored.version == elsewhere_edit.version + 1
        assert browser.data(_row(wifi.name))["version"] == str(stored.version)

        # Forget, asked first: Berlin goes, and Paris, which it replaced, with it.
        browser.click(f"{_row(berlin.name)} {tid('forget-memory')}")
        browser.wait_visible(f"{_row(berlin.name)} {tid('delete-confirmation')}")
        browser.shots(shots / "forget.png")
        browser.click(f"{_row(berlin.name)} {tid('confirm-delete')}")
        _listed(browser, "user", [])
        browser.wait_visible(f"{tid('memory-list', scope='user')} {tid('memory-empty')}")
        _gone(server, owner, berlin.name)
        _gone(server, owner, paris.name)
        idle(browser)
        assert raw_text(browser) == []
        assert problems(browser) == []

    # A colleague, an editor when the page opened, demoted to viewer before Forget: the
    # server refuses it, the page says so beside the item, and the item stays.
    with chromium.open(stack.origin + "/") as browser:
        sign_in(browser, colleague.email)
        _open_memory(browser, workspace)
        shared = _listed(browser, "workspace", [wifi.name])
        assert _controls(shared[0]) == (True, True)
        # The owner's own items are the owner's: none of them here.
        _listed(browser, "user", [])
        server.context.UpdateWorkspaceMember(
            context_pb2.UpdateWorkspaceMemberRequest(
                member=context_pb2.WorkspaceMember(
                    name=f"{workspace}/members/{colleague.name.removeprefix('users/')}",
                    role=context_pb2.WORKSPACE_ROLE_VIEWER,
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["role"]),
            ),
            metadata=owner.md,
            timeout=CALL_DEADLINE_S,
        )
        browser.click(f"{_row(wifi.name)} {tid('forget-memory')}")
        browser.click(f"{_row(wifi.name)} {tid('confirm-delete')}")
        refused = f"{_row(wifi.name)} {tid('error', action='forget-memory')}"
        browser.wait_for(refused)
        assert browser.data(refused)["code"] == "PERMISSION_DENIED"
        assert browser.eval(
            "(s) => document.querySelector(s).textContent", f"{refused} {tid('error-message')}"
        )
        assert (
            _get(server, owner, wifi.name).memory_item.content
            == "The office wifi is called Lighthouse"
        )
        browser.shots(shots / "refused.png")

        # A viewer, from the start: the workspace's item, without Edit or Forget.
        browser.reload()
        browser.wait_visible(tid("memory-page", workspace=workspace))
        shared = _listed(browser, "workspace", [wifi.name])
        assert shared[0]["content"] == "The office wifi is called Lighthouse"
        assert _controls(shared[0]) == (False, False)
        assert browser.count(f"{tid('memory-list', scope='workspace')} {tid('edit-memory')}") == 0
        assert raw_text(browser) == []
        browser.shots(shots / "viewer.png")


def test_owners_set_an_assistants_memory_policy_and_the_workspaces_default(
    stack: Stack, chromium: Chromium, server: Server, tmp_path: Path
) -> None:
    """The assistant editor's Memory fieldset writes Assistant.memory_policy (the mode,
    when, and the categories kept with their time to live), and the Memory page's
    "default memory policy" writes the workspace's; the server has exactly what was set,
    and a save that leaves the policy alone keeps it."""
    shots = artifacts_dir(tmp_path) / "memory"
    shots.mkdir(parents=True, exist_ok=True)
    owner = server.register("policies")
    workspace, _ = server.workspace(owner, f"policies-{os.getpid()}")
    helper = server.dispatcher.CreateAssistant(
        dispatcher_pb2.CreateAssistantRequest(
            parent=workspace,
            assistant_id="helper",
            assistant=dispatcher_pb2.Assistant(display_name="Helper", instructions="Help."),
        ),
        metadata=owner.md,
        timeout=CALL_DEADLINE_S,
    ).assistant

    with chromium.open(stack.origin + "/") as browser:
        sign_in(browser, owner.email)
        browser.click(tid("workspace-item", name=workspace))
        browser.click(f"{tid('assistant', name=helper.name)} {tid('edit-assistant')}")
        fieldset = f"{tid('assistant-editor')} {tid('assistant-memory')}"
        browser.wait_visible(fieldset)
        # Nothing set: it takes the workspace's default.
        assert browser.eval(
            "(s) => document.querySelector(s).value", tid("assistant-memory-mode")
        ) == str(context_pb2.MEMORY_FORMING_MODE_UNSPECIFIED)
        browser.select(tid("assistant-memory-mode"), str(context_pb2.MEMORY_FORMING_MODE_USER))
        browser.fill(tid("assistant-memory-idle"), "5")
        browser.fill(tid("assistant-memory-max-candidates"), "3")
        preferences = tid("assistant-memory-category", category="PREFERENCES")
        plans = tid("assistant-memory-category", category="PLANS")
        browser.click(f"{preferences} {tid('memory-category-on')}")
        browser.click(f"{plans} {tid('memory-category-on')}")
        browser.fill(f"{plans} {tid('memory-category-ttl')}", "30")
        browser.shots(shots / "assistant-policy.png")
        browser.click(tid("save-assistant"))
        browser.wait(
            "([s, etag]) => { const e = document.querySelector(s)?.dataset.etag;"
            " return e && e !== etag; }",
            [tid("assistant-editor"), helper.etag],
        )
        stored = server.dispatcher.GetAssistant(
            dispatcher_pb2.GetAssistantRequest(name=helper.name),
            metadata=owner.md,
            timeout=CALL_DEADLINE_S,
        ).assistant
        policy = stored.memory_policy
        assert policy.mode == context_pb2.MEMORY_FORMING_MODE_USER
        assert policy.idle_minutes == 5
        assert policy.max_candidates == 3
        assert [(c.category, c.ttl.seconds) for c in policy.categories] == [
            (context_pb2.MEMORY_CATEGORY_PREFERENCES, 0),
            (context_pb2.MEMORY_CATEGORY_PLANS, 30 * 86_400),
        ]
        assert not policy.categories[0].HasField("ttl")
        # Saved again, the policy untouched: it stays as it is.
        first = browser.data(tid("assistant-editor"))["etag"]
        browser.click(tid("save-assistant"))
        browser.wait(
            "([s, etag]) => { const e = document.querySelector(s)?.dataset.etag;"
            " return e && e !== etag; }",
            [tid("assistant-editor"), first],
        )
        again = server.dispatcher.GetAssistant(
            dispatcher_pb2.GetAssistantRequest(name=helper.name),
            metadata=owner.md,
            timeout=CALL_DEADLINE_S,
        ).assistant
        assert again.memory_policy == policy
        browser.click(tid("close-editor"))

        # The workspace's default, on the Memory page: forming about the workspace.
        browser.click(tid("open-memory"))
        browser.wait_visible(tid("memory-page", workspace=workspace))
        browser.click(tid("workspace-memory-policy-toggle"))
        browser.wait_visible(tid("workspace-memory-mode"))
        # A workspace's "inherit" is off: the form says Off.
        assert browser.eval(
            "(s) => document.querySelector(s).value", tid("workspace-memory-mode")
        ) == str(context_pb2.MEMORY_FORMING_MODE_OFF)
        browser.select(tid("workspace-memory-mode"), str(context_pb2.MEMORY_FORMING_MODE_WORKSPACE))
        browser.click(
            f"{tid('workspace-memory-category', category='WORKSPACE_FACTS')} "
            f"{tid('memory-category-on')}"
        )
        browser.click(tid("save-workspace-policy"))
        browser.wait_for(f"{tid('workspace-memory-policy')}[data-saved]")
        default = server.context.GetWorkspace(
            context_pb2.GetWorkspaceRequest(name=workspace),
            metadata=owner.md,
            timeout=CALL_DEADLINE_S,
        ).workspace.memory_policy
        assert default.mode == context_pb2.MEMORY_FORMING_MODE_WORKSPACE
        assert [c.category for c in default.categories] == [
            context_pb2.MEMORY_CATEGORY_WORKSPACE_FACTS
        ]
        browser.shots(shots / "workspace-policy.png")
        assert raw_text(browser) == []
        assert problems(browser) == []


#: The fact the scripted model finds in the exchange.
FACT: Final = "Lives in Berlin since last week"


def _forming_answer(body: dict[str, Any]) -> Reply:
    """The scripted model: forming's structured requests answered by their schema's name
    (one fact about the person, then "add" it), anything else as the echo model."""
    response_format = body.get("response_format") or {}
    name = (response_format.get("json_schema") or {}).get("name")
    if name == "memory_candidates":
        fact = {
            "category": CATEGORY_WORDS[context_pb2.MEMORY_CATEGORY_PERSON_FACTS],
            "content": FACT,
            "confidence": 0.9,
            "valid_from": None,
        }
        return Reply.text(json.dumps({"facts": [fact]}), chunk_words=1_000)
    if name == "memory_decisions":
        decision = {"candidate": 0, "action": "add", "target": None, "reason": "new fact"}
        return Reply.text(json.dumps({"decisions": [decision]}), chunk_words=1_000)
    return echo_reply(body)


@contextmanager
def _forming_model() -> Iterator[tuple[str, FakeOpenAI]]:
    """The scripted model, served from a thread of its own: its URL, and the fake."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    fake = FakeOpenAI(default=_forming_answer)
    try:
        asyncio.run_coroutine_threadsafe(fake.start(), loop).result(CALL_DEADLINE_S)
        yield fake.url, fake
    finally:
        asyncio.run_coroutine_threadsafe(fake.close(), loop).result(CALL_DEADLINE_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(CALL_DEADLINE_S)
        loop.close()


@contextmanager
def _with_former(stack: Stack, url: str) -> Iterator[None]:
    """The server restarted with the scripted model as the provider ``former`` (a
    fallback the runs never reach: the echo model answers them), forming polled often;
    restarted as it was after."""
    before = dict(stack.env)
    stack.env["SWITCHBOARD_LLM_FALLBACKS"] = json.dumps(
        [{"name": "former", "base_url": url, "model": "former"}]
    )
    stack.env["SWITCHBOARD_MEMORY_FORMING"] = "true"
    stack.env["SWITCHBOARD_MEMORY_POLL_S"] = "0.2"
    stack.restart_server()
    try:
        yield
    finally:
        stack.env.clear()
        stack.env.update(before)
        stack.restart_server()


def test_a_fact_typed_in_the_composer_is_formed_and_shown_with_its_source(
    stack: Stack, chromium: Chromium, server: Server, tmp_path: Path
) -> None:
    shots = artifacts_dir(tmp_path) / "memory"
    shots.mkdir(parents=True, exist_ok=True)
    with _forming_model() as (url, fake), _with_former(stack, url):
        owner = server.register("formed")
        workspace, conversation = server.workspace(owner, f"formed-{os.getpid()}")
        assistant = server.dispatcher.CreateAssistant(
            dispatcher_pb2.CreateAssistantRequest(
                parent=workspace,
                assistant_id="keeper",
                assistant=dispatcher_pb2.Assistant(
                    display_name="Keeper",
                    instructions="Remember what matters.",
                    workspace_default=True,
                    memory_policy=context_pb2.MemoryPolicy(
                        mode=context_pb2.MEMORY_FORMING_MODE_USER,
                        provider="former",
                        categories=[
                            context_pb2.MemoryCategoryRule(
                                category=context_pb2.MEMORY_CATEGORY_PERSON_FACTS
                            )
                        ],
                    ),
                ),
            ),
            metadata=owner.md,
            timeout=CALL_DEADLINE_S,
        ).assistant
        with chromium.open(stack.origin + "/") as browser:
            sign_in(browser, owner.email)
            open_conversation(browser, workspace, conversation)
            run = send(browser, "I moved to Berlin last week.")
            run_state(browser, run, "RUN_STATE_SUCCEEDED")
            said = next(
                m.name
                for m in server.messages(owner, conversation)
                if m.role == context_pb2.MESSAGE_ROLE_USER
            )
            browser.click(tid("open-memory"))
            browser.wait_visible(tid("memory-page", workspace=workspace))
            # Formed after the run, and shown by itself: the page follows the feed.
            item: dict[str, Any] = browser.wait(
                f"(scope) => {{ const items = ({ITEMS_JS})(scope);"
                " return items.length === 1 && items[0]; }",
                "user",
            )
            assert item["content"] == FACT
            assert item["formed"] == "true"
            assert item["kind"] == "FACT"
            assert said in [s["message"] for s in item["sources"]]
            formation = browser.data(f"{_row(item['name'])} {tid('memory-formation')}")
            assert formation["assistant"] == assistant.name
            assert formation["model"] == "former/former"
            assert float(formation["confidence"]) == pytest.approx(0.9)
            stored = _get(server, owner, item["name"]).memory_item
            assert stored.workspace == workspace
            assert stored.formation.assistant == assistant.name
            asked = {
                ((r.body or {}).get("response_format") or {}).get("json_schema", {}).get("name")
                for r in fake.requests
            }
            assert "memory_candidates" in asked
            # The feed said what was decided, in words.
            decided = tid("event", type="EVENT_TYPE_MEMORY_DECIDED")
            browser.wait_for(decided)
            said_there = browser.eval(
                "(s) => document.querySelector(s).textContent", f"{decided} {tid('event-summary')}"
            )
            # (What the model said is quoted: <q>, whose marks are the stylesheet's.)
            assert said_there == f"remembered by Keeper: {FACT} (new fact)"
            browser.shots(shots / "formed.png")
            assert raw_text(browser) == []
            assert problems(browser) == []
