"""Counts in messages say their noun in its number (issue 67: "1 budget(s)")."""

from __future__ import annotations

import pytest

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.handler.v1 import handler_pb2
from switchboard.dispatcher.budgets.ledger import Applicable, Caps, Full
from switchboard.dispatcher.budgets.room import refusal
from switchboard.dispatcher.llm.conversation.tools import _result_text
from switchboard.dispatcher.llm.retrieval import _arguments
from switchboard.platform.values.wording import counted, noun

pytestmark = pytest.mark.unit


def test_counted_says_one_and_many() -> None:
    assert counted(1, "budget") == "1 budget"
    assert counted(2, "budget") == "2 budgets"
    assert counted(0, "file") == "0 files"
    assert counted(1_500, "tool call") == "1,500 tool calls"
    assert noun(3, "child", "children") == "children"


def _full(budget_id: str) -> Full:
    return Full(
        Applicable("w", budget_id, "", pb.BUDGET_PERIOD_TOTAL, "", Caps(total_tokens=5)), None
    )


def test_a_refusal_counts_its_budgets_in_their_number() -> None:
    one = refusal([_full("a")], "the message was refused")
    assert str(one.message) == (
        "the message was refused: 1 budget that applies has no room left (workspaces/w/budgets/a)"
    )
    two = refusal([_full("a"), _full("b")], "the message was refused")
    assert str(two.message).startswith(
        "the message was refused: 2 budgets that apply have no room left"
    )


def test_a_tool_results_files_and_unknown_arguments_in_their_number() -> None:
    result = handler_pb2.ToolResult(
        text="done",
        files=[cpb.FileReference(display_name="a.png", mime_type="image/png", size_bytes=3)],
    )
    assert _result_text(result).endswith("[the tool returned 1 file: a.png (image/png, 3 bytes)]")
    assert _arguments({"query": "x", "page": 1, "sort": "y"})[1] == "unknown arguments: page, sort"
