"""What a file's content is (sniffing against the declared type) and its text (extraction)."""

from __future__ import annotations

import io

import pytest

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.context.files.catalog import MAX_CHUNK
from switchboard.context.files.reading.extract import extract
from switchboard.context.files.reading.sniff import check, kind_of, normalize
from switchboard.platform.config import KernelSettings
from switchboard.platform.errors import InvalidArgument, MediaTypeMismatch
from tests.kits.filekit import elf, pdf, png

pytestmark = pytest.mark.unit


def stored(declared: str, content: bytes) -> tuple[str, int]:
    found = check(normalize(declared, "media_type"), content, whole=True, field="media_type")
    return found.media_type, found.kind


@pytest.mark.parametrize(
    ("declared", "content", "detected"),
    [
        ("image/png", elf(), "application/x-executable"),
        ("image/png", pdf(), "application/pdf"),
        ("image/jpeg", png(), "image/png"),
        ("application/pdf", b"just some words", "text/plain"),
        ("image/png", b"\x00\x01\x02 not an image", "application/octet-stream"),
        ("text/plain", elf(), "application/x-executable"),
        ("application/json", b"\xff\xfe\x00binary", "application/octet-stream"),
        ("text/csv", png(), "image/png"),
    ],
)
def test_content_that_contradicts_the_declared_type_is_refused(
    declared: str, content: bytes, detected: str
) -> None:
    with pytest.raises(MediaTypeMismatch) as refused:
        stored(declared, content)
    assert refused.value.metadata["detected_media_type"] == detected
    assert [v.field for v in refused.value.violations] == ["media_type"]


def test_declared_types_that_hold() -> None:
    assert stored("image/png", png()) == ("image/png", pb.FILE_KIND_IMAGE)
    assert stored("IMAGE/PNG; charset=binary", png()) == ("image/png", pb.FILE_KIND_IMAGE)
    assert stored("application/pdf", pdf()) == ("application/pdf", pb.FILE_KIND_DOCUMENT)
    # Text formats look alike: the declared one stands for UTF-8 content.
    assert stored("text/markdown", b"# Title\n") == ("text/markdown", pb.FILE_KIND_DOCUMENT)
    assert stored("text/csv", b"a,b\n1,2\n") == ("text/csv", pb.FILE_KIND_DOCUMENT)
    assert stored("application/json", '{"é": 1}'.encode()) == (
        "application/json",
        pb.FILE_KIND_DOCUMENT,
    )
    # A generic type takes what the content is.
    assert stored("application/octet-stream", png()) == ("image/png", pb.FILE_KIND_IMAGE)
    assert stored("application/octet-stream", b"\x00\x01") == (
        "application/octet-stream",
        pb.FILE_KIND_OTHER,
    )
    # Unsniffable binary formats keep their declared type.
    assert stored("application/x-custom", b"\x00\x01") == (
        "application/x-custom",
        pb.FILE_KIND_OTHER,
    )


def test_a_multibyte_character_cut_at_the_head_is_not_refused() -> None:
    head = ("a" * 10 + "é").encode()[:-1]
    found = check("text/plain", head, whole=False, field="media_type")
    assert found.media_type == "text/plain"


def test_kinds_and_malformed_types() -> None:
    assert kind_of("audio/mpeg") == pb.FILE_KIND_AUDIO
    assert kind_of("image/tiff") == pb.FILE_KIND_OTHER
    assert normalize("image/jpg", "f") == "image/jpeg"
    for bad in ("", "png", "image/", "image/png/x", "a b/c"):
        with pytest.raises(InvalidArgument):
            normalize(bad, "f")


def test_pdf_text_is_extracted_within_the_limits() -> None:
    assert extract(io.BytesIO(pdf()), "application/pdf", max_chars=1000, max_pages=5).text == (
        "Quarterly revenue grew by 12 percent"
    )
    cut = extract(io.BytesIO(pdf()), "application/pdf", max_chars=9, max_pages=5)
    assert cut.text == "Quarterly"
    assert extract(io.BytesIO(pdf()), "application/pdf", max_chars=100, max_pages=0).text == ""


def test_a_damaged_pdf_fails_with_a_short_reason() -> None:
    found = extract(
        io.BytesIO(b"%PDF-1.4\nnot really"), "application/pdf", max_chars=9, max_pages=5
    )
    assert found.text == ""
    assert found.error == "the PDF could not be read"


def test_text_is_decoded_and_cut() -> None:
    assert (
        extract(io.BytesIO("héllo".encode()), "text/plain", max_chars=3, max_pages=1).text == "hél"
    )
    bad = extract(io.BytesIO(b"ok\xff"), "text/plain", max_chars=100, max_pages=1)
    assert bad.error == "the content is not UTF-8 text"


def test_the_server_takes_a_full_chunk_with_its_framing() -> None:
    frame = pb.UploadFileRequest(chunk=b"x" * MAX_CHUNK)
    append = pb.AppendUploadRequest(
        name="workspaces/" + "w" * 63 + "/uploads/" + "u" * 63, offset=2**62, data=b"x" * MAX_CHUNK
    )
    limit = KernelSettings(dev_mode=True).max_receive_message_bytes
    assert frame.ByteSize() < limit
    assert append.ByteSize() < limit
