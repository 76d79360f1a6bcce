"""What the model reads of a remembered item's time: when it was learned, and since when
it is true when that was earlier (docs/memory.md, "In the context window")."""

from __future__ import annotations

import datetime as dt

import pytest

from switchboard.api.context.v1 import context_pb2
from switchboard.api.handler.v1 import handler_pb2
from switchboard.dispatcher.llm.conversation.messages import build_messages

pytestmark = pytest.mark.unit


def _item(
    content: str, learned: dt.datetime | None, since: dt.datetime | None
) -> context_pb2.ContextItem:
    memory = context_pb2.MemoryItem(kind=context_pb2.MEMORY_KIND_FACT, content=content)
    if learned is not None:
        memory.create_time.FromDatetime(learned)
    if since is not None:
        memory.valid_time.FromDatetime(since)
    return context_pb2.ContextItem(memory_item=memory)


def test_remembered_items_say_when_they_were_learned_and_since_when_they_hold() -> None:
    day = dt.datetime(2026, 11, 29, 9, tzinfo=dt.UTC)
    window = context_pb2.ContextWindow(
        included=[
            _item("Lives in Berlin.", day, day),
            _item("Has a dog.", day, day - dt.timedelta(days=400)),
            _item("Prefers tea.", None, None),
        ]
    )
    request = handler_pb2.HandleRequest(
        message=context_pb2.Message(
            role=context_pb2.MESSAGE_ROLE_USER,
            parts=[context_pb2.ContentPart(text="Hi")],
        ),
        context=window,
    )
    assert build_messages(request)[0] == {
        "role": "system",
        "content": "Remembered about this user and conversation:\n"
        "- Lives in Berlin. (learned 2026-11-29)\n"
        "- Has a dog. (learned 2026-11-29, true since 2025-10-25)\n"
        "- Prefers tea.",
    }
