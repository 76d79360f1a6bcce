"""A gRPC expert called as a tool: the file parts of its answer are the result's files."""

from __future__ import annotations

import base64

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.handler.v1 import handler_pb2 as hpb
from switchboard.integration import experts

PNG = b"\x89PNG\r\n\x1a\n" + bytes(32)


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
