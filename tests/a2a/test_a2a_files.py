"""A2A file parts both ways: a client's message in, an answer's artifact out, and an
A2A agent's answer when we call it (docs/a2a.md, "Files")."""

from __future__ import annotations

import pytest
from a2a.types import a2a_pb2 as a2a
from google.protobuf import json_format, struct_pb2

from switchboard.a2a import errors, mapping
from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.integration.kinds import a2a as remote_a2a
from switchboard.platform.errors import InvalidArgument, NotFound

pytestmark = pytest.mark.unit

PNG = b"\x89PNG\r\n\x1a\n" + bytes(64)


def user(*parts: a2a.Part) -> a2a.Message:
    return a2a.Message(message_id="m-1", role=a2a.ROLE_USER, parts=list(parts))


def test_file_parts_in_become_references_the_context_service_stores() -> None:
    parts = mapping.parts_in(
        user(
            a2a.Part(text="what is in these?"),
            a2a.Part(raw=PNG, media_type="image/png", filename="chart.png"),
            a2a.Part(url="https://example.com/r.pdf", media_type="application/pdf"),
        )
    )
    assert [p.WhichOneof("part") for p in parts] == ["text", "file", "file"]
    assert parts[1].file == cpb.FileReference(
        inline_data=PNG, mime_type="image/png", display_name="chart.png"
    )
    assert parts[2].file == cpb.FileReference(
        uri="https://example.com/r.pdf", mime_type="application/pdf"
    )


def test_bad_file_parts_name_their_fields() -> None:
    with pytest.raises(InvalidArgument) as refused:
        mapping.parts_in(user(a2a.Part(raw=b""), a2a.Part(url="file:///etc/passwd")))
    assert [v.field for v in refused.value.violations] == [
        "message.parts[0].raw",
        "message.parts[1].url",
    ]
    assert getattr(refused.value, "foreign", None) is None  # invalid, not unsupported


def test_data_parts_are_still_not_taken() -> None:
    with pytest.raises(InvalidArgument) as refused:
        mapping.parts_in(user(a2a.Part(text="x"), a2a.Part(data=struct_pb2.Value(number_value=1))))
    assert [v.field for v in refused.value.violations] == ["message.parts[1]"]
    assert refused.value.foreign == errors.CONTENT_TYPE_NOT_SUPPORTED


def stored(name: str, size: int, kind: str = "image/png", display: str = "") -> cpb.ContentPart:
    return cpb.ContentPart(
        file=cpb.FileReference(
            file=f"workspaces/w/files/{name}", mime_type=kind, size_bytes=size, display_name=display
        )
    )


def test_an_answers_small_files_go_as_bytes_and_the_rest_by_name() -> None:
    big = mapping.MAX_INLINE_FILE_BYTES + 1
    answer = cpb.Message(
        parts=[
            cpb.ContentPart(text="Here they are."),
            stored("small", len(PNG), display="chart.png"),
            stored("big", big, "application/pdf", "report.pdf"),
            cpb.ContentPart(
                file=cpb.FileReference(uri="https://example.com/x.csv", mime_type="text/csv")
            ),
        ]
    )
    assert mapping.inlined(answer) == ["workspaces/w/files/small"]
    parts = mapping.file_parts(answer, {"workspaces/w/files/small": PNG})
    assert parts[0] == a2a.Part(raw=PNG, media_type="image/png", filename="chart.png")
    assert parts[1].WhichOneof("content") == "data"
    assert parts[1].media_type == "application/json"
    assert json_format.MessageToDict(parts[1].data) == {
        "file_reference": {
            "name": "workspaces/w/files/big",
            "media_type": "application/pdf",
            "size_bytes": big,
            "filename": "report.pdf",
        }
    }
    assert parts[2] == a2a.Part(url="https://example.com/x.csv", media_type="text/csv")
    artifact = mapping.answer("Here they are.", parts)
    assert artifact.parts[0].text == "Here they are."
    assert list(artifact.parts[1:]) == parts


def test_inlined_files_stay_within_the_total() -> None:
    each = mapping.MAX_INLINE_FILE_BYTES
    count = mapping.MAX_INLINE_FILES_BYTES // each
    answer = cpb.Message(parts=[stored(f"f{i}", each) for i in range(count + 2)])
    assert len(mapping.inlined(answer)) == count
    # A file whose bytes were not read (deleted meanwhile) is named instead.
    parts = mapping.file_parts(answer, {})
    assert {p.WhichOneof("content") for p in parts} == {"data"}


def test_an_agents_file_parts_come_back_with_the_answer() -> None:
    relay = remote_a2a._Relay()
    artifact = a2a.Artifact(
        artifact_id="a",
        parts=[
            a2a.Part(text="Done."),
            a2a.Part(raw=PNG, media_type="image/png", filename="plot.png"),
            a2a.Part(url="https://agent.example/out.pdf", media_type="application/pdf"),
            a2a.Part(raw=bytes(remote_a2a.MAX_INLINE_BYTES + 1), media_type="video/mp4"),
        ],
    )
    relay.take(
        a2a.StreamResponse(
            task=a2a.Task(
                id="t",
                context_id="c",
                artifacts=[artifact],
                status=a2a.TaskStatus(state=a2a.TASK_STATE_COMPLETED),
            )
        )
    )
    result = relay.result("agent")
    files = [p.file for p in result.parts if p.WhichOneof("part") == "file"]
    assert files[0] == cpb.FileReference(
        inline_data=PNG, mime_type="image/png", size_bytes=len(PNG), display_name="plot.png"
    )
    assert files[1] == cpb.FileReference(
        uri="https://agent.example/out.pdf", mime_type="application/pdf"
    )
    # Too large to keep: its name, type and size only.
    assert not files[2].inline_data
    assert files[2].size_bytes == remote_a2a.MAX_INLINE_BYTES + 1
    # As a tool's result (the agent called as a tool), the files are its files.
    tool = remote_a2a._tool_result(result)
    assert [f.mime_type for f in tool.files] == ["image/png", "application/pdf"]


def test_an_answers_files_are_bounded_all_together() -> None:
    size = remote_a2a.MAX_INLINE_BYTES
    parts = [
        cpb.ContentPart(file=cpb.FileReference(inline_data=bytes(size), mime_type="image/png"))
        for _ in range(remote_a2a.MAX_ANSWER_FILE_BYTES // size + 1)
    ]
    remote_a2a._within_bound(parts)
    kept = [bool(p.file.inline_data) for p in parts]
    assert kept == [True] * (len(parts) - 1) + [False]


# -- a user's files sent to an agent ---------------------------------------------------------


def _stored(name: str, size: int, *, uri: str = "") -> cpb.ContentPart:
    return cpb.ContentPart(
        file=cpb.FileReference(
            file=f"workspaces/w/files/{name}",
            display_name=f"{name}.bin",
            mime_type="application/octet-stream",
            size_bytes=size,
            uri=uri,
        )
    )


async def test_files_that_cannot_be_read_go_by_url_or_as_a_line_saying_so() -> None:
    contents = {"workspaces/w/files/kept": b"kept bytes"}
    asked: list[tuple[str, int]] = []

    async def read(name: str, limit: int) -> bytes:
        asked.append((name, limit))
        if name not in contents:
            raise NotFound("the file is gone")
        return contents[name]

    message = cpb.Message(
        parts=[
            cpb.ContentPart(text="look"),
            _stored("kept", 10),
            _stored("gone", 5, uri="https://example.com/gone.bin"),
            _stored("lost", 7),
        ]
    )
    parts = await remote_a2a.message_files(message, read)
    assert [part.WhichOneof("content") for part in parts] == ["raw", "url", "text"]
    assert (parts[0].raw, parts[0].filename, parts[0].media_type) == (
        b"kept bytes",
        "kept.bin",
        "application/octet-stream",
    )
    assert (parts[1].url, parts[1].filename) == ("https://example.com/gone.bin", "gone.bin")
    assert parts[2].text == (
        "[file lost.bin (application/octet-stream, 7 bytes): not sent, could not be read "
        "(NotFound)]"
    )
    # Each read is bounded by what is left to send.
    budget = remote_a2a.MAX_SENT_FILE_BYTES
    assert asked[:2] == [
        ("workspaces/w/files/kept", budget),
        ("workspaces/w/files/gone", budget - 10),
    ]

    # Where files cannot be read at all, each is named.
    [alone] = await remote_a2a.message_files(cpb.Message(parts=[_stored("kept", 10)]), None)
    assert alone.text.endswith("not sent, files cannot be read here]")


def test_a_message_of_files_alone_has_no_empty_text_part() -> None:
    file = a2a.Part(raw=b"x", media_type="text/plain", filename="x.txt")
    alone = remote_a2a._request("", "m-1", None, None, [file])
    assert [part.WhichOneof("content") for part in alone.message.parts] == ["raw"]
    both = remote_a2a._request("hi", "m-1", None, None, [file])
    assert [part.WhichOneof("content") for part in both.message.parts] == ["text", "raw"]
    assert remote_a2a._request("", "m-1", None, None).message.parts[0].text == ""
