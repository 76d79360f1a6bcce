"""A run with tools against a budget: a cap lowered while the run waits for a person's
approval holds for the run's next model call, which pauses at the cap (the approval's
pause and the budget's follow each other), and goes on when the cap is raised again.
Runs on the reference MCP server (tests/dispatcher/tools/test_tool_runs.py's setting)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from tests.dispatcher.budgets.test_budget_runs import add_budget, daily, set_cap, window
from tests.dispatcher.tools.test_tool_runs import (
    SUM,
    _decide,
    _paused,
    _send,
    answer_with_tool_output,
    ask,
    tool_mesh,
)
from tests.fakes.openai_server import Reply
from tests.infra.mcpeverything import EverythingServer
from tests.kits.dispatchkit import finished, read_until

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def everything() -> Iterator[EverythingServer]:
    with EverythingServer() as server:
        yield server


async def test_a_cap_lowered_during_an_approval_holds_for_the_next_model_call(
    everything: EverythingServer,
) -> None:
    async with tool_mesh(everything, approval=("get-sum",), llm_max_output_tokens=100) as tools:
        tools.fake.script(
            Reply.tool_calls([(SUM, {"a": 40, "b": 2}, "c1")], usage=(10, 10)),
            answer_with_tool_output,
        )
        world = tools.world
        await add_budget(tools.server, world.name, "daily", daily(100_000))
        run = await _send(tools, ask(tools, "40 + 2?"))
        call, _ = await _paused(tools, run.name)
        call.cancel()
        # The first call settled at 10 + 20 micro-dollars; the next asks more than is left.
        await set_cap(tools.server, world.name, "daily", 100)
        await _decide(tools, run.name, "c1", pb.TOOL_APPROVAL_DECISION_APPROVE)
        watch = tools.dstub.WatchRun(
            pb.WatchRunRequest(name=run.name), metadata=world.editor.md, timeout=20
        )
        seen: list[pb.RunUpdate] = []
        await read_until(
            watch,
            seen,
            lambda updates: updates[-1].state_change.run.required_action.HasField("budget"),
        )
        watch.cancel()
        at_cap = seen[-1].state_change.run
        await set_cap(tools.server, world.name, "daily", 100_000)
        ended = await finished(tools.dstub, world.editor, run.name)
        used, held = await window(tools.server, "daily")

    assert at_cap.state == pb.RUN_STATE_REQUIRES_ACTION
    assert not at_cap.required_action.tool_calls
    assert at_cap.required_action.budget.output_tokens == 100
    assert ended.state == pb.RUN_STATE_SUCCEEDED
    assert ended.usage.cost_micros == used == 10 + 2 * 10 + 200 + 2 * 20
    assert held == 0
