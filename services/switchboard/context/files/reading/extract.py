"""A document's text, extracted once when it is stored (blocking: run it in a thread).

PDFs are read with pypdf, page by page, up to a page limit; text formats are
decoded as UTF-8. Either way the text is cut at a character limit. A document
that cannot be read is not the client's error: its text state is FAILED with a
short reason, and the file is stored.

Decoding text is linear in the bytes kept; pypdf is not bounded at all (a small
crafted PDF can hold it for hours, or take gigabytes), so the server reads a PDF
only in a child process with limits (``pdfworker.py``), which calls ``pdf_text``.
"""

from __future__ import annotations

import codecs
import logging
from dataclasses import dataclass
from typing import IO, Final

from switchboard.context.files.reading.sniff import is_text

log = logging.getLogger("switchboard.context.files")

#: Bytes a character can take in UTF-8: reading this many per character kept is enough.
_UTF8_MAX: Final = 4


@dataclass(frozen=True)
class Extracted:
    """The text, or why there is none (``error`` non-empty)."""

    text: str = ""
    error: str = ""


def extractable(media_type: str) -> bool:
    return media_type == "application/pdf" or is_text(media_type)


def extract(source: IO[bytes], media_type: str, *, max_chars: int, max_pages: int) -> Extracted:
    """The text of the document in ``source`` (a seekable file at its start)."""
    if media_type == "application/pdf":
        return pdf_text(source, max_chars=max_chars, max_pages=max_pages)
    return _text(source, max_chars=max_chars)


def _text(source: IO[bytes], *, max_chars: int) -> Extracted:
    data = source.read(max_chars * _UTF8_MAX + 1)
    cut = len(data) > max_chars * _UTF8_MAX
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        # Not final when cut: a character split at the cut is dropped, not an error.
        text = decoder.decode(data[: max_chars * _UTF8_MAX], final=not cut)
    except UnicodeDecodeError:
        return Extracted(error="the content is not UTF-8 text")
    return Extracted(text=text[:max_chars])


def pdf_text(source: IO[bytes], *, max_chars: int, max_pages: int) -> Extracted:
    """The text of a PDF, without any bound on time or memory: run it where it is
    bounded (``pdfworker``). MemoryError is raised, for the bound to name."""
    # Imported here, in the worker that reads a PDF: the server never needs pypdf itself.
    from pypdf import PdfReader

    try:
        reader = PdfReader(source)
        if reader.is_encrypted and not reader.decrypt(""):
            return Extracted(error="the PDF is encrypted")
        pieces: list[str] = []
        total = 0
        for index, page in enumerate(reader.pages):
            if index >= max_pages or total >= max_chars:
                break
            text = page.extract_text() or ""
            pieces.append(text)
            total += len(text) + 1
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - pypdf raises many kinds for a damaged file
        log.info("PDF text extraction failed: %s", type(exc).__name__)
        return Extracted(error="the PDF could not be read")
    return Extracted(text="\n".join(pieces)[:max_chars])
