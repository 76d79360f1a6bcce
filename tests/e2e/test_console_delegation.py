"""Delegation in the browser console (docs/delegation.md, docs/console.md): the
assistant editor sets an assistant's delegates, and a run's card lists the runs its
assistant asked, each expandable to follow its own stream.

The stack is test_console.py's (its fixtures, imported): ``switchboard serve --dev``
behind Envoy's TLS listener, the local OpenAI-protocol server's echo model (a message of
``call NAME {json}`` lines is answered with those tool calls, and after the tool results
with ``Tool NAME returned: TEXT``), Chromium driven by tests/browser/console.mjs.

- The owner ticks two delegates in the planner's editor, one of them with a description,
  and a third that is deleted elsewhere before the save: the save is refused with the
  server's violation naming the delegate's field, nothing stored; unticked, it saves, and
  the server has the two.
- A message makes the planner's model call both delegates at once; the stock assistant in
  turn asks a counter (a tree of four runs, depth 2). The parent's card lists both
  children with their assistants' titles, SUCCEEDED, tokens, cost and time equal to the
  server's; expanding one shows its own answer, and expanding the stock child shows its
  own child (depth 2) the same way, whose stream shows its answer.
- The same run inspected later ("Earlier runs", after a reload): its children listed
  from ListRuns ``parent_run``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Final

import pytest

from switchboard.api.dispatcher.v1 import dispatcher_pb2
from tests.conftest import CALL_DEADLINE_S
from tests.e2e import test_console as console
from tests.e2e.chromium import artifacts_dir, js_fixed
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

pytestmark = pytest.mark.e2e

# The console's stack, browser and server stubs, as test_console.py makes them (a stack of
# this module's own: module-scoped fixtures are made once per module that uses them).
stack = console.stack
chromium = console.chromium
server = console.server

SUCCEEDED: Final = "RUN_STATE_SUCCEEDED"

#: The rows of the children a run's card (or a child's stream) lists directly.
CHILD_ROWS_JS: Final = """(run) => [...document.querySelectorAll(
  `[data-testid="child-runs"][data-run="${CSS.escape(run)}"] > [data-testid="child-run"]`,
)].map((row) => ({
    ...row.dataset,
    title: row.querySelector('[data-testid="child-run-assistant"]').textContent,
    stateText: row.querySelector('[data-testid="child-run-state"]').textContent,
    tokens: row.querySelector('[data-testid="child-run-tokens"]').textContent,
    cost: row.querySelector('[data-testid="child-run-cost"]').textContent,
    time: row.querySelector('[data-testid="child-run-time"]').textContent,
  }))"""


def _assistant(
    server: Server,
    user: User,
    workspace: str,
    assistant_id: str,
    *,
    delegates: tuple[str, ...] = (),
    default: bool = False,
) -> str:
    made = server.dispatcher.CreateAssistant(
        dispatcher_pb2.CreateAssistantRequest(
            parent=workspace,
            assistant_id=assistant_id,
            assistant=dispatcher_pb2.Assistant(
                display_name=assistant_id.title(),
                description=f"Knows about {assistant_id}.",
                instructions=f"You are {assistant_id}.",
                delegates=[
                    dispatcher_pb2.AssistantDelegate(assistant=f"{workspace}/assistants/{d}")
                    for d in delegates
                ],
                workspace_default=default,
            ),
        ),
        metadata=user.md,
        timeout=CALL_DEADLINE_S,
    )
    return str(made.assistant.name)


def _children(server: Server, user: User, workspace: str, run: str) -> list[dispatcher_pb2.Run]:
    listed = server.dispatcher.ListRuns(
        dispatcher_pb2.ListRunsRequest(parent=workspace, parent_run=run, page_size=100),
        metadata=user.md,
        timeout=CALL_DEADLINE_S,
    )
    return sorted(listed.runs, key=lambda r: r.parent_tool_call)


def _rows(browser: Page, run: str, count: int) -> list[dict[str, Any]]:
    """Waits until ``run`` lists ``count`` children, every one ended with its usage."""
    rows: list[dict[str, Any]] = browser.wait(
        f"(run) => {{ const rows = ({CHILD_ROWS_JS})(run); return rows.length === {count}"
        " && rows.every((r) => r.state === 'RUN_STATE_SUCCEEDED' && r.outputTokens && r.ms)"
        " && rows; }",
        run,
    )
    return sorted(rows, key=lambda r: str(r["callId"]))


def _same_as_server(rows: list[dict[str, Any]], children: list[dispatcher_pb2.Run]) -> None:
    assert [r["run"] for r in rows] == [c.name for c in children]
    for row, child in zip(rows, children, strict=True):
        assert row["assistant"] == child.assistant
        assert row["callId"] == child.parent_tool_call
        assert row["state"] == SUCCEEDED == dispatcher_pb2.RunState.Name(child.state)
        assert row["stateText"] == "succeeded"
        assert row["title"] == child.assistant.rsplit("/", 1)[1].title()
        assert int(row["inputTokens"]) == child.usage.input_tokens > 0
        assert int(row["outputTokens"]) == child.usage.output_tokens > 0
        total = child.usage.input_tokens + child.usage.output_tokens
        assert row["tokens"] == f" · {total:,} tokens"
        assert float(row["costUsd"]) == pytest.approx(child.usage.estimated_cost_usd)
        assert child.usage.estimated_cost_usd > 0
        assert row["cost"] == f" · ${js_fixed(child.usage.estimated_cost_usd, 4)}"
        # Its time: from its start to its end, never longer than the server's whole run.
        ms = int(row["ms"])
        lasted = child.end_time.ToMilliseconds() - child.create_time.ToMilliseconds()
        assert 0 < ms <= lasted + 1_000, (ms, lasted)
        assert row["time"] == f" · {js_fixed(ms / 1000, 2)} s"


def _expand(browser: Page, child: str) -> str:
    """Expands ``child``'s row; its stream's selector, once its run ended there."""
    browser.click(f"{tid('child-run', run=child)} > .child-head > {tid('expand-child-run')}")
    stream = tid("child-run-stream", run=child)
    browser.wait(
        "(s) => document.querySelector(s)?.dataset.state === 'RUN_STATE_SUCCEEDED'", stream
    )
    return stream


def _answer(browser: Page, stream: str) -> str:
    text: str = browser.eval(
        "(s) => document.querySelector(s).textContent", f"{stream} > {tid('child-run-answer')}"
    )
    return text


def test_the_editor_sets_delegates_and_the_inspector_shows_the_tree_of_runs(
    stack: Stack, chromium: Chromium, server: Server, tmp_path: Path
) -> None:
    shots = artifacts_dir(tmp_path) / "delegation"
    shots.mkdir(parents=True, exist_ok=True)
    owner = server.register("delegation")
    workspace, conversation = server.workspace(owner, f"delegation-{os.getpid()}")
    pricing = _assistant(server, owner, workspace, "pricing")
    counter = _assistant(server, owner, workspace, "counter")
    stock = _assistant(server, owner, workspace, "stock", delegates=("counter",))
    gone = _assistant(server, owner, workspace, "gone")
    planner = _assistant(server, owner, workspace, "planner", default=True)

    with chromium.open(stack.origin + "/") as browser:
        sign_in(browser, owner.email)
        open_conversation(browser, workspace, conversation)
        browser.wait_for(tid("assistant", name=gone))
        idle(browser)

        # The planner's delegates, set in its editor: pricing, stock (with what to ask it
        # for) and gone, which is deleted elsewhere before the save.
        browser.click(f"{tid('assistant', name=planner)} {tid('edit-assistant')}")
        editor = tid("assistant-editor")
        browser.wait_visible(f"{editor} {tid('assistant-delegates')}")
        offered = browser.eval(
            "(s) => [...document.querySelectorAll(s)].map((e) => e.dataset.assistant)",
            f"{editor} {tid('assistant-delegate')}",
        )
        # Every other assistant of the workspace, and not the planner itself.
        assert sorted(offered) == sorted([pricing, counter, stock, gone])
        for name in (pricing, stock, gone):
            browser.click(f"{tid('assistant-delegate', assistant=name)} {tid('delegate-enabled')}")
        browser.fill(
            f"{tid('assistant-delegate', assistant=stock)} {tid('delegate-description')}",
            "Counts what is in stock.",
        )
        chosen: list[str] = browser.eval(
            "(s) => [...document.querySelectorAll(s)]"
            ".filter((e) => e.querySelector('[data-testid=\"delegate-enabled\"]').checked)"
            ".map((e) => e.dataset.assistant)",
            f"{editor} {tid('assistant-delegate')}",
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
        assert violations == [f"assistant.delegates[{chosen.index(gone)}].assistant"]
        stored = server.dispatcher.GetAssistant(
            dispatcher_pb2.GetAssistantRequest(name=planner),
            metadata=owner.md,
            timeout=CALL_DEADLINE_S,
        ).assistant
        assert list(stored.delegates) == []
        browser.shots(shots / "delegate-refused.png")

        browser.click(f"{tid('assistant-delegate', assistant=gone)} {tid('delegate-enabled')}")
        browser.click(tid("save-assistant"))
        browser.wait_for(tid("assistant", name=planner, delegates=f"{pricing} {stock}"))
        assert not browser.visible(refused)
        stored = server.dispatcher.GetAssistant(
            dispatcher_pb2.GetAssistantRequest(name=planner),
            metadata=owner.md,
            timeout=CALL_DEADLINE_S,
        ).assistant
        assert [(d.assistant, d.description) for d in stored.delegates] == [
            (pricing, ""),
            (stock, "Counts what is in stock."),
        ]
        assert stored.workspace_default
        browser.click(tid("close-editor"))

        # The planner asks both at once; stock asks the counter in turn.
        ask_counter = 'call ask_counter {"input": "count the kayaks"}'
        question = "\n".join(
            [
                'call ask_pricing {"input": "price of a kayak"}',
                f"call ask_stock {json.dumps({'input': ask_counter})}",
            ]
        )
        parent = send(browser, question)
        done = run_state(browser, parent, SUCCEEDED)
        stored_parent = server.run(owner, parent)
        assert stored_parent.state == dispatcher_pb2.RUN_STATE_SUCCEEDED
        children = _children(server, owner, workspace, parent)
        assert [c.assistant for c in children] == [pricing, stock]
        assert all(c.parent == parent and c.depth == 1 for c in children)
        by_assistant = {c.assistant: c for c in children}

        rows = _rows(browser, parent, 2)
        _same_as_server(rows, children)
        assert all(r["depth"] == "1" and r["expanded"] == "false" for r in rows)
        # The answer: both children's, as the tool results the planner's model was given.
        assert done["answer"] == (
            "Tool ask_pricing returned: price of a kayak\n"
            "Tool ask_stock returned: Tool ask_counter returned: count the kayaks"
        )
        # The parent's timeline names each child when it started and when it ended.
        entries: list[list[str]] = browser.eval(
            "(s) => [...document.querySelectorAll(s)]"
            ".map((e) => [e.dataset.callId, e.dataset.state])",
            f"{tid('run', run=parent)} > {tid('inspector')} {tid('timeline-entry', kind='child')}",
        )
        for child in children:
            states = [state for run, state in entries if run == child.name]
            assert len(states) == 2, entries
            assert states[0] in ("RUN_STATE_QUEUED", "RUN_STATE_RUNNING"), entries
            assert states[1] == SUCCEEDED, entries

        # The root's own stream names the grandchild too: nested under stock's row (its
        # parent the stock run, depth 2), nothing expanded, and on the root's timeline.
        stock_run = by_assistant[stock].name
        [counter_run] = _children(server, owner, workspace, stock_run)
        nested_rows = f"{tid('child-run', run=stock_run)} > {tid('child-runs', run=stock_run)}"
        nested_row = f"{nested_rows} > {tid('child-run', run=counter_run.name)}"
        browser.wait(
            "(s) => document.querySelector(s)?.dataset.state === 'RUN_STATE_SUCCEEDED'", nested_row
        )
        shown = browser.data(nested_row)
        assert shown["parent"] == stock_run
        assert shown["assistant"] == counter
        assert shown["depth"] == "2"
        assert shown["expanded"] == "false"
        assert browser.count(tid("child-run-stream")) == 0
        below: list[list[str]] = browser.eval(
            "(s) => [...document.querySelectorAll(s)].map((e) =>"
            " [e.dataset.callId, e.dataset.parent, e.querySelector('strong').textContent])",
            f"{tid('run', run=parent)} > {tid('inspector')} {tid('timeline-entry', kind='child')}",
        )
        said = [(p, text) for run, p, text in below if run == counter_run.name]
        assert said[0] == (stock_run, "grandchild run started"), below
        assert said[-1] == (stock_run, "grandchild run succeeded"), below

        # Expanded, a child follows its own stream: pricing's answer.
        pricing_stream = _expand(browser, by_assistant[pricing].name)
        assert _answer(browser, pricing_stream) == "price of a kayak"
        # Stock asked the counter: its stream lists that child (depth 2) the same way, and
        # the root's card shows it there only (not also under stock's row).
        stock_stream = _expand(browser, stock_run)
        assert _answer(browser, stock_stream) == "Tool ask_counter returned: count the kayaks"
        grandchildren = _children(server, owner, workspace, stock_run)
        assert [g.assistant for g in grandchildren] == [counter]
        assert grandchildren[0].depth == 2
        nested = _rows(browser, stock_run, 1)
        _same_as_server(nested, grandchildren)
        assert nested[0]["depth"] == "2"
        assert browser.count(f"{stock_stream} {tid('child-run', run=grandchildren[0].name)}") == 1
        assert browser.count(tid("child-run", run=grandchildren[0].name)) == 1
        assert browser.count(nested_rows) == 0
        counter_stream = _expand(browser, grandchildren[0].name)
        assert _answer(browser, counter_stream) == "count the kayaks"
        assert browser.count(f"{stock_stream} {counter_stream}") == 1
        assert raw_text(browser) == []
        browser.shots(shots / "tree.png")

        # Folded: its stream goes (and stops following).
        browser.click(
            f"{tid('child-run', run=by_assistant[pricing].name)} > .child-head"
            f" > {tid('expand-child-run')}"
        )
        browser.wait("(s) => document.querySelector(s) === null", pricing_stream)

        # Opened later: after a reload the finished run is inspected from "Earlier runs",
        # its children listed by ListRuns parent_run.
        browser.reload()
        browser.wait_visible(tid("console"))
        open_conversation(browser, workspace, conversation)
        # The delegates' conversations are the tree's: listed apart, on asking.
        listing = "(s) => [...document.querySelectorAll(s)].map((e) => e.dataset.name)"
        delegated = {c.name.rsplit("/runs/", 1)[0] for c in [*children, *grandchildren]}
        listed = browser.eval(listing, tid("conversation-item"))
        assert conversation in listed
        assert not delegated & set(listed), listed
        toggle = tid("show-delegated")
        assert browser.eval("(s) => document.querySelector(s).dataset.count", toggle) == "3"
        browser.click(toggle)
        assert delegated <= set(browser.eval(listing, tid("conversation-item")))
        browser.click(toggle)
        assert not delegated & set(browser.eval(listing, tid("conversation-item")))
        browser.click(tid("inspect-run", run=parent))
        run_state(browser, parent, SUCCEEDED)
        _same_as_server(_rows(browser, parent, 2), children)
        # Its stream, replayed from the start, names the grandchild under stock's row.
        browser.wait(
            "(s) => document.querySelector(s)?.dataset.state === 'RUN_STATE_SUCCEEDED'", nested_row
        )
        stock_again = _expand(browser, stock_run)
        assert _answer(browser, stock_again) == "Tool ask_counter returned: count the kayaks"
        _same_as_server(_rows(browser, stock_run, 1), grandchildren)
        assert raw_text(browser) == []
        browser.shots(shots / "inspected-later.png")
        assert problems(browser) == []
