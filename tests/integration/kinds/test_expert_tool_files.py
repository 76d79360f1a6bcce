"""Files in handlers' answers: a gRPC expert called as a tool (its file parts are the
result's files), and a run's final update (names, never bytes)."""

from __future__ import annotations

import base64

import pytest

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.handler.v1 import handler_pb2 as hpb
from switchboard.dispatcher.runs.execution.execution import _show
from switchboard.integration.kinds import experts

pytestmark = pytest.mark.unit

PNG = b"\x89PNG\r\n\x1a\n" + bytes(32)


def _as_shown(answer: hpb.HandleResult, stored: cpb.Message) -> hpb.HandleResult:
    shown = hpb.HandleResult()
    _show(shown, answer, stored)
    return shown


def test_file_parts_are_files_and_not_repeated_in_the_structured_result() -> None:
    answer = hpb.HandleResult(
        parts=[
            cpb.ContentPart(text="a chart"),
            cpb.ContentPart(
                file=cpb.FileReference(
                    inline_data=PNG, mime_type="image/png", display_name="chart.png"
                )
            ),
            cpb.ContentPart(file=cpb.FileReference(uri="https://x.example/a.pdf")),
        ],
        finish_reason="stop",
    )
    result = experts._result(answer, [], 0, 100_000)
    assert result.text == "a chart"
    assert [f.display_name or f.uri for f in result.files] == [
        "chart.png",
        "https://x.example/a.pdf",
    ]
    assert result.files[0].inline_data == PNG
    assert result.structured is not None
    shown = result.structured["parts"][1]["file"]
    assert shown == {"mime_type": "image/png", "display_name": "chart.png"}
    assert base64.b64encode(PNG).decode() not in str(result.structured)


def test_a_runs_final_update_names_the_stored_files_without_their_bytes() -> None:
    answer = hpb.HandleResult(
        parts=[
            cpb.ContentPart(text="the plot"),
            cpb.ContentPart(file=cpb.FileReference(inline_data=PNG, mime_type="image/png")),
        ]
    )
    stored = cpb.Message(
        parts=[
            cpb.ContentPart(text="the plot"),
            cpb.ContentPart(
                file=cpb.FileReference(
                    file="workspaces/w/files/f1", mime_type="image/png", size_bytes=len(PNG)
                )
            ),
        ]
    )
    shown = _as_shown(answer, stored)
    assert shown.parts[1].file == stored.parts[1].file
    assert answer.parts[1].file.inline_data == PNG  # the handler's own answer is untouched
    # Where the stored message does not name them (a context service that keeps the
    # parts as given), the update still carries no bytes: the size instead.
    kept = _as_shown(answer, cpb.Message(parts=[cpb.ContentPart(text="the plot")]))
    assert kept.parts[1].file == cpb.FileReference(mime_type="image/png", size_bytes=len(PNG))
