"""Handoffs in the browser console (docs/delegation.md "Handoffs", docs/console.md): the
assistant editor sets an assistant's handoff targets, a run's card and the live feed say
when its assistant handed the conversation over, and the composer says which assistant
holds the conversation.

The stack is test_console.py's (its fixture, made for this module), but its model is the
local OpenAI-protocol server run here, in a thread, scripted per assistant by the
instructions each request carries: triage hands the conversation to billing (a
``transfer_to_billing`` call, then a sentence after its result), billing answers in its
own words. Chromium is driven by tests/browser/console.mjs.

- The owner ticks billing, with when to hand over to it, and a third assistant deleted
  elsewhere before the save as triage's handoffs: the save is refused with the server's
  violation naming the handoff's field, nothing stored; unticked, it saves, the list says
  "hands over to 1", and the server has billing with the description.
- A message naming no assistant goes to triage (the default), whose model is offered
  ``transfer_to_billing`` with that description and calls it: the card says "Handed the
  conversation to Billing: <reason>", its timeline and the live feed say it too, and the
  composer says the conversation is with Billing.
- A second message, again naming no assistant, is answered by billing: its card names
  Billing, the server's run has billing and a routing reason saying it was handed over,
  and billing's model saw the conversation so far.
- After a reload, the conversation opened again says it is with Billing (from its
  history), and a message naming triage leaves it there.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Final, cast

import pytest
from google.protobuf import field_mask_pb2, struct_pb2

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
    idle,
    open_conversation,
    problems,
    raw_text,
    run_state,
    send,
    sign_in,
    tid,
)
from tests.fakes.openai_server import FakeOpenAI, Reply, _text, echo_reply

pytestmark = pytest.mark.e2e

chromium = console.chromium
server = console.server

SUCCEEDED: Final = "RUN_STATE_SUCCEEDED"
REASON: Final = "a refund question"
WHEN: Final = "Questions about invoices and refunds."
TRIAGE_SAYS: Final = "Billing takes it from here."
TRIAGE_ITSELF: Final = "Triage here."
BILLING_SAYS: Final = "Billing here: order 42 is refunded."
START_S: Final = 30.0
#: An element's data-* attributes, its text and its title.
DATA_JS: Final = (
    "(s) => { const e = document.querySelector(s);"
    " return { ...e.dataset, text: e.textContent, title: e.title }; }"
)


def _this_turns_outputs(body: dict[str, Any]) -> list[str]:
    """The tool results after the request's last user message: a later turn's request
    carries the earlier turns' results in its history."""
    messages: list[dict[str, Any]] = body["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    return [str(m["content"]) for m in messages[last:] if m["role"] == "tool"]


def _last_user_text(body: dict[str, Any]) -> str:
    users = [m for m in body["messages"] if m["role"] == "user"]
    return _text(users[-1].get("content")) if users else ""


def _answer(body: dict[str, Any]) -> Reply:
    """Each assistant's model, by the instructions the request starts with."""
    system = str(body["messages"][0].get("content", ""))
    if "You are triage." in system:
        if _this_turns_outputs(body):
            return Reply.text(TRIAGE_SAYS)
        # Money is billing's: anything else triage answers itself.
        if "refund" in _last_user_text(body):
            return Reply.tool_calls([("transfer_to_billing", {"reason": REASON}, "h-1")])
        return Reply.text(TRIAGE_ITSELF)
    if "You are billing." in system:
        return Reply.text(BILLING_SAYS)
    return echo_reply(body)


@contextmanager
def _local_model(answer: Callable[[dict[str, Any]], Reply]) -> Iterator[FakeOpenAI]:
    """The local OpenAI-protocol server on an event loop of its own (the browser steps
    block this thread), answering every request with ``answer``."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="local-model", daemon=True)
    thread.start()
    fake = FakeOpenAI(default=answer)
    try:
        asyncio.run_coroutine_threadsafe(fake.start(), loop).result(timeout=START_S)
        yield fake
    finally:
        asyncio.run_coroutine_threadsafe(fake.close(), loop).result(timeout=START_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=START_S)
        loop.close()


@pytest.fixture(scope="module")
def model() -> Iterator[FakeOpenAI]:
    with _local_model(_answer) as fake:
        yield fake


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model: FakeOpenAI) -> Iterator[Stack]:
    """test_console.py's stack, its model this module's: its fixture's own steps, with the
    model server it starts replaced while it starts (it reads it then, and only then)."""
    steps = cast(
        Callable[[pytest.TempPathFactory], Iterator[Stack]],
        console.stack.__wrapped__,  # type: ignore[attr-defined]
    )(tmp_path_factory)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(console, "_openai_server", lambda: nullcontext(model.url))
        made = next(steps)
    try:
        yield made
    finally:
        # Its cleanup: the servers, Envoy and the relays it started.
        for _ in steps:
            pass


def _assistant(
    server: Server, user: User, workspace: str, assistant_id: str, *, default: bool = False
) -> str:
    made = server.dispatcher.CreateAssistant(
        dispatcher_pb2.CreateAssistantRequest(
            parent=workspace,
            assistant_id=assistant_id,
            assistant=dispatcher_pb2.Assistant(
                display_name=assistant_id.title(),
                description=f"Knows about {assistant_id}.",
                instructions=f"You are {assistant_id}.",
                workspace_default=default,
            ),
        ),
        metadata=user.md,
        timeout=CALL_DEADLINE_S,
    )
    return str(made.assistant.name)


def _stored(server: Server, user: User, name: str) -> dispatcher_pb2.Assistant:
    answer = server.dispatcher.GetAssistant(
        dispatcher_pb2.GetAssistantRequest(name=name), metadata=user.md, timeout=CALL_DEADLINE_S
    )
    return answer.assistant


def _holder(browser: Page) -> dict[str, Any]:
    """The composer's word on who holds the conversation, once it says one."""
    found: dict[str, Any] = browser.wait(
        "(s) => { const e = document.querySelector(s);"
        " const select = document.querySelector('[data-testid=\"assistant-select\"]');"
        " return e && !e.hidden && e.dataset.assistant && { ...e.dataset, text: e.textContent,"
        " unnamed: select.options[0].textContent, chosen: select.value }; }",
        tid("conversation-holder"),
    )
    return found


def test_the_editor_sets_handoffs_and_the_conversation_shows_who_holds_it(
    stack: Stack, chromium: Chromium, server: Server, model: FakeOpenAI, tmp_path: Path
) -> None:
    shots = artifacts_dir(tmp_path) / "handoffs"
    shots.mkdir(parents=True, exist_ok=True)
    owner = server.register("handoffs")
    workspace, conversation = server.workspace(owner, f"handoffs-{os.getpid()}")
    billing = _assistant(server, owner, workspace, "billing")
    gone = _assistant(server, owner, workspace, "gone")
    triage = _assistant(server, owner, workspace, "triage", default=True)
    # Triage asks the built-in echo directly, with an input schema the editor does not
    # show (and must keep when it saves).
    schema = struct_pb2.Struct()
    schema.update({"type": "object", "properties": {"words": {"type": "string"}}})
    echo_delegate = dispatcher_pb2.AssistantDelegate(handler="handlers/echo", input_schema=schema)
    server.dispatcher.UpdateAssistant(
        dispatcher_pb2.UpdateAssistantRequest(
            assistant=dispatcher_pb2.Assistant(name=triage, delegates=[echo_delegate]),
            update_mask=field_mask_pb2.FieldMask(paths=["delegates"]),
        ),
        metadata=owner.md,
        timeout=CALL_DEADLINE_S,
    )

    with chromium.open(stack.origin + "/") as browser:
        sign_in(browser, owner.email)
        open_conversation(browser, workspace, conversation)
        browser.wait_for(tid("assistant", name=triage))
        idle(browser)
        assert not browser.visible(tid("conversation-holder"))

        # Triage's handoffs, set in its editor: billing (with when to hand over to it) and
        # gone, which is deleted elsewhere before the save.
        browser.click(f"{tid('assistant', name=triage)} {tid('edit-assistant')}")
        editor = tid("assistant-editor")
        browser.wait_visible(f"{editor} {tid('assistant-handoffs')}")
        offered = browser.eval(
            "(s) => [...document.querySelectorAll(s)].map((e) => e.dataset.assistant)",
            f"{editor} {tid('assistant-handoff')}",
        )
        # Every other assistant of the workspace, and not triage itself.
        assert sorted(offered) == sorted([billing, gone])
        for name in (billing, gone):
            browser.click(f"{tid('assistant-handoff', assistant=name)} {tid('handoff-enabled')}")
        browser.fill(
            f"{tid('assistant-handoff', assistant=billing)} {tid('handoff-description')}", WHEN
        )
        # A delegate may be a handler, asked directly (AssistantDelegate.handler): echo,
        # listed ticked, and the other built-in offered unticked beside the assistants.
        echo_row = f"{editor} {tid('assistant-delegate-handler', handler='handlers/echo')}"
        assert browser.eval(
            "(s) => document.querySelector(s).checked", f"{echo_row} {tid('delegate-enabled')}"
        )
        # What billing sees once it holds the conversation (AssistantHandoff.history).
        browser.select(
            f"{tid('assistant-handoff', assistant=billing)} {tid('handoff-history')}",
            str(dispatcher_pb2.HANDOFF_HISTORY_SINCE_HANDOFF),
        )
        chosen: list[str] = browser.eval(
            "(s) => [...document.querySelectorAll(s)]"
            ".filter((e) => e.querySelector('[data-testid=\"handoff-enabled\"]').checked)"
            ".map((e) => e.dataset.assistant)",
            f"{editor} {tid('assistant-handoff')}",
        )
        server.dispatcher.DeleteAssistant(
            dispatcher_pb2.DeleteAssistantRequest(name=gone),
            metadata=owner.md,
            timeout=CALL_DEADLINE_S,
        )
        browser.click(tid("save-assistant"))
        refused = f"{editor} {tid('error', code='INVALID_ARGUMENT')}"
        browser.wait_for(refused)
        violations = browser.eval(
            "(s) => [...document.querySelectorAll(s)].map((e) => e.dataset.field)",
            f"{refused} {tid('error-violation')}",
        )
        assert violations == [f"assistant.handoffs[{chosen.index(gone)}].assistant"]
        assert list(_stored(server, owner, triage).handoffs) == []
        browser.shots(shots / "handoff-refused.png")

        browser.click(f"{tid('assistant-handoff', assistant=gone)} {tid('handoff-enabled')}")
        browser.click(tid("save-assistant"))
        browser.wait_for(tid("assistant", name=triage, handoffs=billing))
        assert not browser.visible(refused)
        counted = browser.eval(
            "(s) => document.querySelector(s).textContent",
            f"{tid('assistant', name=triage)} {tid('assistant-handoffs-count')}",
        )
        assert counted == " · hands over to 1"
        stored = _stored(server, owner, triage)
        assert [(x.assistant, x.description, x.history) for x in stored.handoffs] == [
            (billing, WHEN, dispatcher_pb2.HANDOFF_HISTORY_SINCE_HANDOFF)
        ]
        assert stored.workspace_default
        assert list(stored.delegates) == [echo_delegate]
        browser.click(tid("close-editor"))

        # A message naming no assistant: triage answers, and hands the conversation over.
        before = len(model.requests)
        first = send(browser, "I want a refund")
        done = run_state(browser, first, SUCCEEDED)
        assert done["answer"] == TRIAGE_SAYS
        assert done["assistant"] == triage
        stored_first = server.run(owner, first)
        assert stored_first.assistant == triage
        asked = model.requests[before].body
        [tool] = [
            t["function"] for t in asked["tools"] if t["function"]["name"] == "transfer_to_billing"
        ]
        assert WHEN in tool["description"]

        handoff = tid("run-handoff", to=billing)
        card = tid("run", run=first)
        browser.wait_for(f"{card} {handoff}")
        said = browser.eval(DATA_JS, f"{card} {handoff}")
        assert said["from"] == triage
        assert said["text"] == f"Handed the conversation to Billing: {REASON}"
        entries = browser.eval(
            "(s) => [...document.querySelectorAll(s)]"
            ".map((e) => ({ ...e.dataset, text: e.textContent }))",
            f"{card} {tid('inspector')} {tid('timeline-entry', kind='handoff')}",
        )
        assert [(e["from"], e["to"]) for e in entries] == [(triage, billing)]
        assert "handed the conversation to Billing" in entries[0]["text"]
        assert REASON in entries[0]["text"]
        # The live feed says it, by the assistant's title, with the reason quoted.
        fed: str = browser.wait(
            "(to) => [...document.querySelectorAll('[data-testid=\"event-summary\"]')]"
            ".find((e) => e.querySelector("
            '`[data-testid="event-handoff-to"][data-assistant="${to}"]`))'
            "?.textContent",
            billing,
        )
        assert fed.endswith(f"handed the conversation to Billing: {REASON}"), fed
        # The composer: "the workspace default" now means billing, and says so.
        holder = _holder(browser)
        assert holder["assistant"] == billing
        assert holder["goesToHolder"] == "true"
        assert holder["chosen"] == ""
        assert (
            holder["text"]
            == "This conversation is with Billing: a message that names no assistant goes to it."
        )
        assert holder["unnamed"] == "assistant: Billing, which holds this conversation"
        browser.shots(shots / "handed-over.png")

        # The next message, naming no assistant either: billing answers it.
        before = len(model.requests)
        second = send(browser, "it was order 42")
        done = run_state(browser, second, SUCCEEDED)
        assert done["answer"] == BILLING_SAYS
        assert done["assistant"] == billing
        shown = browser.eval(DATA_JS, f"{tid('run', run=second)} {tid('run-assistant')}")
        stored_second = server.run(owner, second)
        assert stored_second.assistant == billing
        assert "which the conversation was handed over to" in stored_second.routing_reason
        assert shown["assistant"] == billing
        assert shown["text"] == " · Billing"
        assert shown["title"] == stored_second.routing_reason
        history = model.requests[before].body["messages"]
        assert "You are billing." in str(history[0]["content"])
        # Set in the editor above: billing sees only what came from the handoff on (its
        # step, whose result says why), not the person's first message to triage.
        assert not any(m.get("content") == "I want a refund" for m in history)
        assert any(m["role"] == "tool" and REASON in str(m["content"]) for m in history), history
        assert _holder(browser)["assistant"] == billing
        assert raw_text(browser) == []

        # Opened again after a reload: its history says who holds it.
        browser.reload()
        browser.wait_visible(tid("console"))
        open_conversation(browser, workspace, conversation)
        holder = _holder(browser)
        assert holder["assistant"] == billing
        assert holder["text"].startswith("This conversation is with Billing")
        # A message naming triage goes to it and leaves the conversation with billing.
        browser.select(tid("assistant-select"), triage)
        holder = _holder(browser)
        assert holder["goesToHolder"] == "false"
        assert holder["text"] == (
            "This conversation is with Billing: this message goes to Triage,"
            " and the conversation stays with Billing."
        )
        named = send(browser, "one more thing")
        done = run_state(browser, named, SUCCEEDED)
        assert done["answer"] == TRIAGE_ITSELF
        assert done["assistant"] == triage
        assert server.run(owner, named).assistant == triage
        assert _holder(browser)["assistant"] == billing
        assert raw_text(browser) == []
        browser.shots(shots / "reopened.png")
        assert problems(browser) == []
