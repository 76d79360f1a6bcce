"""A child's answer as its parent's tool result (docs/delegation.md, "One call, one child
run"): its text, its data parts (the result's structured output, and as JSON after the
text, which is what the model reads) and its files (the result's files)."""

from __future__ import annotations

import json

import pytest
from google.protobuf import struct_pb2

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.dispatcher.runs.delegation.delegate import answered
from switchboard.dispatcher.tools.runner import BuiltinAnswer
from switchboard.platform.values import structs

pytestmark = pytest.mark.unit


def data(**fields: str | float | bool) -> cpb.ContentPart:
    found = struct_pb2.Struct()
    found.update(fields)
    return cpb.ContentPart(data=found)


def test_a_text_answer_is_its_text() -> None:
    assert answered([cpb.ContentPart(text="400 "), cpb.ContentPart(text="euros")]) == (
        True,
        "400 euros",
    )
    assert answered([]) == (True, "(an empty answer)")


def test_data_and_files_go_with_the_text() -> None:
    chart = cpb.FileReference(
        file="workspaces/w/files/f1", mime_type="image/png", size_bytes=64, display_name="c.png"
    )
    got = answered(
        [
            cpb.ContentPart(text="Here is the quote."),
            data(price=400, currency="EUR"),
            cpb.ContentPart(file=chart),
            data(valid_days=30),
        ]
    )
    assert isinstance(got, BuiltinAnswer)
    assert got.succeeded
    assert got.files == (chart,)
    assert got.result is not None
    listed = structs.plain(got.result.fields["data"])
    assert listed == [{"price": 400, "currency": "EUR"}, {"valid_days": 30}]
    text, written = got.text.split("\n\n")
    assert text == "Here is the quote."
    assert json.loads(written) == {"data": listed}


def test_data_alone_is_read_as_json() -> None:
    got = answered([data(ok=True)])
    assert isinstance(got, BuiltinAnswer)
    assert json.loads(got.text) == {"data": [{"ok": True}]}
