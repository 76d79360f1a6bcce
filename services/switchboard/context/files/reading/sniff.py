"""A file's media type, checked against its content, and its kind.

The content's type is sniffed from its first bytes with the ``filetype``
library (magic numbers). The declared type stands unless the content
contradicts it:

- a binary format's signature that is not the declared type (an ELF or PE
  executable, or a PDF, declared ``image/png``) is MEDIA_TYPE_MISMATCH, with
  what the content is in metadata ``detected_media_type``;
- a declared format that always has a signature (PNG, JPEG, GIF, WebP, PDF)
  without it is refused the same way;
- text formats that sniffing cannot tell apart (``text/plain``,
  ``text/markdown``, ``text/csv``, ``application/json``...) keep their declared
  type when the content is UTF-8 text, and are refused when it is not;
- a generic declared type (``application/octet-stream``) is replaced by the
  sniffed one, when there is one.

Some leeway where formats share containers: audio and video in one container
family (an ``.m4a`` sniffed as ``video/mp4``), and zip-based formats (office
documents, EPUB) that the library names only ``application/zip``.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from typing import Final

import filetype  # type: ignore[import-untyped]

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.platform.errors import FieldViolation, InvalidArgument, MediaTypeMismatch

#: Bytes of the content's head that sniffing and the UTF-8 check look at.
HEAD_BYTES: Final = 8192
GENERIC: Final = "application/octet-stream"
_MEDIA_TYPE: Final = re.compile(
    r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}"
)

#: Common spellings of one type, as the canonical one.
ALIASES: Final = {
    "image/jpg": "image/jpeg",
    "image/pjpeg": "image/jpeg",
    "image/x-png": "image/png",
    "text/x-markdown": "text/markdown",
    "text/json": "application/json",
    "application/x-pdf": "application/pdf",
    "audio/mp3": "audio/mpeg",
    "audio/x-mp3": "audio/mpeg",
    "audio/wav": "audio/x-wav",
    "audio/wave": "audio/x-wav",
    "audio/vnd.wave": "audio/x-wav",
    "audio/flac": "audio/x-flac",
    "audio/x-m4a": "audio/mp4",
    "audio/m4a": "audio/mp4",
    "audio/aiff": "audio/x-aiff",
    "application/x-gzip": "application/gzip",
    "image/apng": "image/png",
}
#: Text formats: no signature to sniff, so the declared type stands if the content is UTF-8.
TEXT_TYPES: Final = frozenset(
    {
        "application/json",
        "application/x-ndjson",
        "application/xml",
        "application/yaml",
        "application/x-yaml",
        "application/toml",
        "application/javascript",
        "application/sql",
    }
)
#: Formats that always start with their signature.
SIGNED: Final = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp", "application/pdf"})
IMAGES: Final = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
DOCUMENTS: Final = frozenset(
    {"application/pdf", "text/plain", "text/markdown", "text/csv", "application/json"}
)
_EXECUTABLES: Final = frozenset(
    {"application/x-executable", "application/x-msdownload", "application/wasm"}
)
_CONTAINERS: Final = frozenset({"application/zip"})


@dataclass(frozen=True)
class Sniffed:
    """The media type to store and the kind it makes."""

    media_type: str
    kind: pb.FileKind.ValueType


def normalize(declared: str, field: str) -> str:
    """``declared`` lower-cased, without parameters, canonical; INVALID_ARGUMENT if malformed."""
    value = declared.split(";", 1)[0].strip().lower()
    if not value:
        description = (
            f"is required: the content's media type, such as image/png, or {GENERIC} to "
            "have the server detect it from the content"
        )
        raise InvalidArgument(f"{field} {description}", [FieldViolation(field, description)])
    if not _MEDIA_TYPE.fullmatch(value):
        raise InvalidArgument(
            f"{field} is not a media type",
            [FieldViolation(field, "must be a media type such as image/png")],
        )
    return ALIASES.get(value, value)


def is_text(media_type: str) -> bool:
    return media_type.startswith("text/") or media_type in TEXT_TYPES


def kind_of(media_type: str) -> pb.FileKind.ValueType:
    if media_type in IMAGES:
        return pb.FILE_KIND_IMAGE
    if media_type in DOCUMENTS:
        return pb.FILE_KIND_DOCUMENT
    if media_type.startswith("audio/"):
        return pb.FILE_KIND_AUDIO
    return pb.FILE_KIND_OTHER


def sniff(head: bytes) -> str | None:
    """The media type the content's first bytes show, if they show one."""
    found = filetype.guess_mime(head) if head else None
    if not isinstance(found, str) or found == GENERIC:
        return None
    return ALIASES.get(found, found)


def utf8_head(head: bytes, *, whole: bool) -> bool:
    """Whether ``head`` is UTF-8 (``whole``: the entire content; else a multi-byte
    character may be cut at its end)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        decoder.decode(head, final=whole)
    except UnicodeDecodeError:
        return False
    return b"\x00" not in head


def check(declared: str, head: bytes, *, whole: bool, field: str) -> Sniffed:
    """The type to store for content starting with ``head`` (``whole``: that is
    all of it) declared as ``declared`` (already normalized); MediaTypeMismatch
    on ``field`` when the content contradicts it."""
    found = sniff(head)
    if declared == GENERIC:
        stored = found or GENERIC
        return Sniffed(stored, kind_of(stored))
    if is_text(declared):
        if found is None and utf8_head(head, whole=whole):
            return Sniffed(declared, kind_of(declared))
        raise _mismatch(declared, found or GENERIC, field)
    if found is None:
        if declared in SIGNED:
            detected = "text/plain" if head and utf8_head(head, whole=whole) else GENERIC
            raise _mismatch(declared, detected, field)
        return Sniffed(declared, kind_of(declared))
    if _compatible(declared, found):
        return Sniffed(declared, kind_of(declared))
    raise _mismatch(declared, found, field)


def _compatible(declared: str, found: str) -> bool:
    if declared == found:
        return True
    if found in _EXECUTABLES:
        return False
    major, found_major = declared.split("/", maxsplit=1)[0], found.split("/", maxsplit=1)[0]
    if major in ("audio", "video") and found_major in ("audio", "video"):
        return not declared.startswith("image/")
    return major == "application" and found in _CONTAINERS and declared not in SIGNED


def _mismatch(declared: str, detected: str, field: str) -> MediaTypeMismatch:
    return MediaTypeMismatch(
        f"{field} is {declared}, but the content is {detected}",
        [FieldViolation(field, f"does not match the content ({detected})")],
        metadata={"detected_media_type": detected},
    )
