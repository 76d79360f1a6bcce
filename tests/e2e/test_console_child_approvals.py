"""A person decides a child run's pause on its parent's card (docs/delegation.md, "Budgets
and pauses in a tree"; docs/console.md, "Delegation: a run as a tree"): one place where a
person decides, without expanding the child.

The stack is test_console.py's (its fixtures, imported): ``switchboard serve --dev``
behind Envoy's TLS listener, the local OpenAI-protocol server's echo model (a message of
``call NAME {json}`` lines is answered with those tool calls, and after the tool results
with ``Tool NAME returned: TEXT``), an MCP test server's ``echo`` tool, Chromium driven by
tests/browser/console.mjs.

- The planner asks the clerk, whose assistant calls the kit's ``echo`` only with a
  person's approval. The clerk's call waits: the planner's card shows it in the clerk's
  row (its tool and arguments, Approve / Deny), the child not expanded, and again after a
  reload (the children listed by ListRuns). Approve there is SubmitToolApprovals on the
  child; the row then says the child is running, then succeeded, and the planner's answer
  holds the clerk's. A second question's call is denied there with a reason, which the
  clerk's model is told.
- The clerk's run budget is too small for its second model call: the child pauses for
  room in it, and the planner's card names the budget by its title with the server's
  account of the shortfall; the owner's Allow overdraft there (ResolveBudgetAction on the
  child) lets it finish.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import pytest

from switchboard.api.dispatcher.v1 import dispatcher_pb2
from switchboard.api.handler.v1 import handler_pb2
from switchboard.api.integration.v1 import integration_pb2
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
    tid,
)
from tests.infra.mcpserver import McpTestServer

pytestmark = pytest.mark.e2e

# The console's stack, browser and server stubs, as test_console.py makes them (a stack of
# this module's own: module-scoped fixtures are made once per module that uses them).
stack = console.stack
chromium = console.chromium
server = console.server

SUCCEEDED: Final = "RUN_STATE_SUCCEEDED"
WAITING: Final = "RUN_STATE_REQUIRES_ACTION"

#: Every state each child row of a card shows, in order, from now on (a MutationObserver
#: the test puts in the page: what the page rendered, however fast the states came).
RECORD_STATES_JS: Final = """(card) => {
  window.childStates = {};
  const note = () => {
    for (const row of document.querySelectorAll(`${card} [data-testid="child-run"]`)) {
      const seen = (window.childStates[row.dataset.run] ??= []);
      if (seen[seen.length - 1] !== row.dataset.state) seen.push(row.dataset.state);
    }
  };
  note();
  new MutationObserver(note).observe(document.querySelector(card), {
    subtree: true, childList: true, attributes: true, attributeFilter: ["data-state"],
  });
}"""


def _kit(server: Server, user: User, workspace: str, mcp: McpTestServer) -> str:
    made = server.integration.CreateIntegration(
        integration_pb2.CreateIntegrationRequest(
            parent=workspace,
            integration_id="kit",
            integration=integration_pb2.Integration(
                display_name="Tool kit",
                kind=integration_pb2.INTEGRATION_KIND_MCP_SERVER,
                endpoint=mcp.url,
            ),
        ),
        metadata=user.md,
        timeout=CALL_DEADLINE_S,
    )
    return str(made.integration.name)


def _assistant(
    server: Server,
    user: User,
    workspace: str,
    assistant_id: str,
    *,
    tools: Sequence[dispatcher_pb2.AssistantTools] = (),
    delegates: tuple[str, ...] = (),
    model: handler_pb2.ModelSettings | None = None,
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
                tools=list(tools),
                delegates=[
                    dispatcher_pb2.AssistantDelegate(assistant=f"{workspace}/assistants/{d}")
                    for d in delegates
                ],
                model=model,
                workspace_default=default,
            ),
        ),
        metadata=user.md,
        timeout=CALL_DEADLINE_S,
    )
    return str(made.assistant.name)


def _ask(delegate: str, message: str) -> str:
    """A planner's message whose model asks ``delegate``, whose model reads ``message``."""
    return f"call ask_{delegate} {json.dumps({'input': message})}"


def _paused_child(browser: Page, card: str) -> dict[str, Any]:
    """Waits until ``card`` lists a child waiting for a decision; that row's data-*."""
    row: dict[str, Any] = browser.wait(
        "(card) => { const row = document.querySelector("
        '`${card} [data-testid="child-run"][data-state="RUN_STATE_REQUIRES_ACTION"]`);'
        " return row && { ...row.dataset }; }",
        card,
    )
    return row


def _child(server: Server, user: User, workspace: str, parent: str) -> dispatcher_pb2.Run:
    listed = server.dispatcher.ListRuns(
        dispatcher_pb2.ListRunsRequest(parent=workspace, parent_run=parent, page_size=100),
        metadata=user.md,
        timeout=CALL_DEADLINE_S,
    )
    [child] = listed.runs
    return child


def _states_seen(browser: Page, child: str) -> list[str]:
    seen: list[str] = browser.eval("(run) => window.childStates?.[run] ?? []", child)
    return seen


def test_a_childs_tool_call_is_approved_and_denied_on_its_parents_card(
    stack: Stack, chromium: Chromium, server: Server, tmp_path: Path
) -> None:
    shots = artifacts_dir(tmp_path) / "child-approvals"
    shots.mkdir(parents=True, exist_ok=True)
    owner = server.register("childapprove")
    workspace, conversation = server.workspace(owner, f"childapprove-{os.getpid()}")
    with McpTestServer() as mcp:
        kit = _kit(server, owner, workspace, mcp)
        clerk = _assistant(
            server,
            owner,
            workspace,
            "clerk",
            tools=[
                dispatcher_pb2.AssistantTools(
                    integration=kit, tools=["echo"], approval_required_tools=["echo"]
                )
            ],
        )
        _assistant(server, owner, workspace, "planner", delegates=("clerk",), default=True)
        with chromium.open(stack.origin + "/") as browser:
            sign_in(browser, owner.email)
            open_conversation(browser, workspace, conversation)

            parent = send(browser, _ask("clerk", 'call kit__echo {"message": "stamp it"}'))
            card = tid("run", run=parent)
            row = _paused_child(browser, card)
            child = row["run"]
            # The server's word: the child waits for its call, and the parent's GetRun
            # shows it among its children with what it waits for.
            stored = _child(server, owner, workspace, parent)
            assert stored.name == child
            assert stored.assistant == clerk == row["assistant"]
            assert stored.state == dispatcher_pb2.RUN_STATE_REQUIRES_ACTION
            [waiting] = stored.required_action.tool_calls
            tree = server.dispatcher.GetRun(
                dispatcher_pb2.GetRunRequest(name=parent),
                metadata=owner.md,
                timeout=CALL_DEADLINE_S,
            ).run
            assert [(c.run, c.state) for c in tree.children] == [
                (child, dispatcher_pb2.RUN_STATE_REQUIRES_ACTION)
            ]
            assert tree.state == dispatcher_pb2.RUN_STATE_RUNNING

            # On the parent's card, in the clerk's row, not expanded: the call, its
            # arguments, Approve and Deny; the card's own approvals list nothing (the parent
            # itself waits for no decision).
            child_row = f"{card} {tid('child-run', run=child)}"
            pending = f"{child_row} {tid('child-approval', run=child)} {tid('pending-call')}"
            browser.wait_for(pending)
            assert browser.data(pending)["callId"] == waiting.call.id
            assert browser.data(pending)["tool"] == "echo"
            shown = browser.eval(
                "(s) => document.querySelector(s).querySelector('pre').textContent", pending
            )
            assert json.loads(shown) == {"message": "stamp it"}
            assert browser.data(child_row)["expanded"] == "false"
            assert browser.count(tid("child-run-stream")) == 0
            assert browser.count(tid("approval")) == 0
            said = browser.eval(
                "(s) => document.querySelector(s).textContent",
                f"{child_row} {tid('child-run-state')}",
            )
            assert said == "waiting for approval"
            browser.shots(shots / "child-waiting.png")

            # A reload: the parent is listed again as a run going, its children by ListRuns,
            # and the call still waits there.
            browser.reload()
            browser.wait_visible(tid("console"))
            open_conversation(browser, workspace, conversation)
            browser.wait_for(pending)
            assert browser.count(tid("child-run-stream")) == 0

            browser.eval(RECORD_STATES_JS, card)
            browser.click(f"{pending} {tid('approve')}")
            done = run_state(browser, parent, SUCCEEDED)
            assert done["answer"] == "Tool ask_clerk returned: Tool kit__echo returned: stamp it"
            browser.wait(
                "([row, state]) => document.querySelector(row)?.dataset.state === state",
                [child_row, SUCCEEDED],
            )
            # Decided on the child, by the owner; the row said it ran again, then ended.
            [decided] = server.run(owner, child).required_action.tool_calls
            assert decided.decision == dispatcher_pb2.TOOL_APPROVAL_DECISION_APPROVE
            assert decided.decided_by == owner.name
            assert _states_seen(browser, child) == [WAITING, "RUN_STATE_RUNNING", SUCCEEDED]
            assert browser.count(f"{card} {tid('child-approval')}") == 0
            assert raw_text(browser) == []
            browser.shots(shots / "child-approved.png")

            # Denied there, with a reason the clerk's model is told.
            parent = send(browser, _ask("clerk", 'call kit__echo {"message": "shred it"}'))
            card = tid("run", run=parent)
            child = _paused_child(browser, card)["run"]
            pending = f"{card} {tid('child-approval', run=child)} {tid('pending-call')}"
            browser.wait_for(pending)
            browser.fill(f"{pending} {tid('deny-reason')}", "not the shredder")
            browser.click(f"{pending} {tid('deny')}")
            done = run_state(browser, parent, SUCCEEDED)
            assert done["answer"].startswith("Tool ask_clerk returned: Tool kit__echo returned:")
            assert "not the shredder" in done["answer"]
            [decided] = server.run(owner, child).required_action.tool_calls
            assert decided.decision == dispatcher_pb2.TOOL_APPROVAL_DECISION_DENY
            assert decided.reason == "not the shredder"
            assert browser.count(f"{card} {tid('child-approval')}") == 0
            assert raw_text(browser) == []
            assert problems(browser) == []


def test_a_child_paused_for_a_budgets_room_says_why_on_its_parents_card(
    stack: Stack, chromium: Chromium, server: Server, tmp_path: Path
) -> None:
    shots = artifacts_dir(tmp_path) / "child-approvals"
    shots.mkdir(parents=True, exist_ok=True)
    owner = server.register("childbudget")
    workspace, conversation = server.workspace(owner, f"childbudget-{os.getpid()}")
    with McpTestServer() as mcp:
        kit = _kit(server, owner, workspace, mcp)
        # The clerk's model may write 200 tokens; its runs may write 66: its first call is
        # made lowered to fit, the one after its tool has no useful answer left and pauses.
        clerk = _assistant(
            server,
            owner,
            workspace,
            "clerk",
            tools=[dispatcher_pb2.AssistantTools(integration=kit, tools=["echo"])],
            model=handler_pb2.ModelSettings(max_output_tokens=200),
        )
        _assistant(server, owner, workspace, "planner", delegates=("clerk",), default=True)
        budget = server.dispatcher.CreateBudget(
            dispatcher_pb2.CreateBudgetRequest(
                parent=workspace,
                budget_id="clerk-run",
                budget=dispatcher_pb2.Budget(
                    display_name="Clerk per run",
                    scope=clerk,
                    period=dispatcher_pb2.BUDGET_PERIOD_RUN,
                    output_token_limit=66,
                ),
            ),
            metadata=owner.md,
            timeout=CALL_DEADLINE_S,
        ).budget.name
        with chromium.open(stack.origin + "/") as browser:
            sign_in(browser, owner.email)
            open_conversation(browser, workspace, conversation)
            parent = send(browser, _ask("clerk", 'call kit__echo {"message": "over"}'))
            card = tid("run", run=parent)
            child = _paused_child(browser, card)["run"]
            stored = _child(server, owner, workspace, parent)
            assert stored.name == child
            action = stored.required_action.budget
            assert list(action.budgets) == [budget]
            child_row = f"{card} {tid('child-run', run=child)}"
            box = f"{child_row} {tid('budget-action')}"
            browser.wait_for(box)
            assert browser.data(box)["budgets"] == budget
            assert browser.data(box)["run"] == child
            # Named by its title once read (GetBudget), with the server's account of it.
            said = browser.wait(
                "(s) => { const t = document.querySelector(s)?.textContent ?? '';"
                " return t.includes('the budget Clerk per run') ? t : null; }",
                box,
            )
            assert "does not fit in the budget Clerk per run (it asks" in said, said
            assert action.description
            why = browser.eval(
                "(s) => document.querySelector(s).textContent",
                f"{box} {tid('budget-action-description')}",
            )
            assert why == f"Why: {action.description}", why
            state = browser.eval(
                "(s) => document.querySelector(s).textContent",
                f"{child_row} {tid('child-run-state')}",
            )
            assert state == "waiting for budget room"
            assert browser.data(child_row)["expanded"] == "false"
            # The parent's own card waits for nothing: no budget box, no approvals of its own.
            assert browser.count(f"{card} > {tid('budget-action')}") == 0
            assert browser.count(f"{card} > [data-part='budget'] > *") == 0
            assert browser.count(tid("approval")) == 0
            browser.shots(shots / "child-budget.png")

            browser.eval(RECORD_STATES_JS, card)
            browser.click(f"{box} {tid('allow-overdraft')}")
            done = run_state(browser, parent, SUCCEEDED)
            assert done["answer"] == "Tool ask_clerk returned: Tool kit__echo returned: over"
            browser.wait(
                "([row, state]) => document.querySelector(row)?.dataset.state === state",
                [child_row, SUCCEEDED],
            )
            decided = server.run(owner, child).required_action.budget
            assert decided.decision == dispatcher_pb2.BUDGET_DECISION_ALLOW_OVERDRAFT
            assert decided.decided_by == owner.name
            assert _states_seen(browser, child) == [WAITING, "RUN_STATE_RUNNING", SUCCEEDED]
            assert browser.count(box) == 0
            assert raw_text(browser) == []
            assert problems(browser) == []


def test_a_grandchilds_tool_call_is_approved_on_the_roots_card(
    stack: Stack, chromium: Chromium, server: Server, tmp_path: Path
) -> None:
    """A tree of three runs (the planner asks the desk, which asks the clerk): the clerk's
    call waits, and the root's card shows it nested under the desk's row, neither row
    expanded, from the root's own stream (and from ListRuns after a reload); Approve
    there is decided on the grandchild, and the tree finishes."""
    shots = artifacts_dir(tmp_path) / "child-approvals"
    shots.mkdir(parents=True, exist_ok=True)
    owner = server.register("grandapprove")
    workspace, conversation = server.workspace(owner, f"grandapprove-{os.getpid()}")
    with McpTestServer() as mcp:
        kit = _kit(server, owner, workspace, mcp)
        clerk = _assistant(
            server,
            owner,
            workspace,
            "clerk",
            tools=[
                dispatcher_pb2.AssistantTools(
                    integration=kit, tools=["echo"], approval_required_tools=["echo"]
                )
            ],
        )
        desk = _assistant(server, owner, workspace, "desk", delegates=("clerk",))
        _assistant(server, owner, workspace, "planner", delegates=("desk",), default=True)
        with chromium.open(stack.origin + "/") as browser:
            sign_in(browser, owner.email)
            open_conversation(browser, workspace, conversation)

            root = send(
                browser, _ask("desk", _ask("clerk", 'call kit__echo {"message": "stamp it"}'))
            )
            card = tid("run", run=root)
            row = _paused_child(browser, card)
            middle = _child(server, owner, workspace, root)
            grandchild = _child(server, owner, workspace, middle.name)
            # The waiting row is the grandchild's, one level below the desk's, naming the
            # desk as the run that asked it.
            assert row["run"] == grandchild.name
            assert row["assistant"] == clerk == grandchild.assistant
            assert row["parent"] == middle.name
            assert row["depth"] == "2"
            assert grandchild.depth == 2
            assert row["waiting"] == "tool-calls"
            assert middle.assistant == desk
            assert middle.state == dispatcher_pb2.RUN_STATE_RUNNING
            [waiting] = grandchild.required_action.tool_calls
            middle_row = f"{card} {tid('child-run', run=middle.name)}"
            grand_row = f"{middle_row} {tid('child-run', run=grandchild.name)}"
            pending = (
                f"{grand_row} {tid('child-approval', run=grandchild.name)} {tid('pending-call')}"
            )
            browser.wait_for(pending)
            assert browser.data(pending)["callId"] == waiting.call.id
            shown = browser.eval(
                "(s) => document.querySelector(s).querySelector('pre').textContent", pending
            )
            assert json.loads(shown) == {"message": "stamp it"}
            # Nothing expanded: the root's stream alone named the grandchild.
            assert browser.data(middle_row)["expanded"] == "false"
            assert browser.data(middle_row)["depth"] == "1"
            # The desk asked, so it runs: its row does not stay at its start's "queued".
            assert browser.data(middle_row)["state"] == "RUN_STATE_RUNNING"
            assert browser.count(tid("child-run-stream")) == 0
            assert browser.count(f"{card} {tid('child-run', run=grandchild.name)}") == 1
            assert browser.count(tid("approval")) == 0
            # The root's timeline names the grandchild's pause, as one the desk asked.
            paused = browser.eval(
                "([s, run]) => [...document.querySelectorAll(s)].filter((e) =>"
                " e.dataset.callId === run && e.dataset.state === 'RUN_STATE_REQUIRES_ACTION')"
                ".map((e) => ({ ...e.dataset, text: e.querySelector('strong').textContent }))",
                [
                    f"{card} > {tid('inspector')} {tid('timeline-entry', kind='child')}",
                    grandchild.name,
                ],
            )
            assert [(p["parent"], p["text"]) for p in paused] == [
                (middle.name, "grandchild run waiting for approval")
            ], paused
            browser.shots(shots / "grandchild-waiting.png")

            # A reload: the grandchild's pause is listed again (ListRuns below the going
            # child), still on the root's card, nothing expanded.
            browser.reload()
            browser.wait_visible(tid("console"))
            open_conversation(browser, workspace, conversation)
            browser.wait_for(pending)
            assert browser.count(tid("child-run-stream")) == 0
            assert browser.count(f"{card} {tid('child-run', run=grandchild.name)}") == 1

            browser.eval(RECORD_STATES_JS, card)
            browser.click(f"{pending} {tid('approve')}")
            done = run_state(browser, root, SUCCEEDED)
            assert done["answer"] == (
                "Tool ask_desk returned: Tool ask_clerk returned: Tool kit__echo returned: stamp it"
            )
            for run in (middle.name, grandchild.name):
                browser.wait(
                    "([row, state]) => document.querySelector(row)?.dataset.state === state",
                    [f"{card} {tid('child-run', run=run)}", SUCCEEDED],
                )
            [decided] = server.run(owner, grandchild.name).required_action.tool_calls
            assert decided.decision == dispatcher_pb2.TOOL_APPROVAL_DECISION_APPROVE
            assert decided.decided_by == owner.name
            assert _states_seen(browser, grandchild.name) == [
                WAITING,
                "RUN_STATE_RUNNING",
                SUCCEEDED,
            ]
            assert browser.count(f"{card} {tid('child-approval')}") == 0
            browser.shots(shots / "grandchild-approved.png")

            # The desk expanded: its own stream lists the clerk, and the root's card shows
            # the clerk's row once (there, not also under the desk's row).
            browser.click(f"{middle_row} > .child-head > {tid('expand-child-run')}")
            stream = tid("child-run-stream", run=middle.name)
            browser.wait(
                "(s) => document.querySelector(s)?.dataset.state === 'RUN_STATE_SUCCEEDED'",
                stream,
            )
            browser.wait_for(f"{stream} {tid('child-run', run=grandchild.name)}")
            assert browser.count(f"{card} {tid('child-run', run=grandchild.name)}") == 1
            assert raw_text(browser) == []
            assert problems(browser) == []
