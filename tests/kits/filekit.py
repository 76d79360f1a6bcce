"""Small real files for file tests, built here rather than stored: a PNG, a PDF
with a line of text, an ELF header, and two hostile PDFs (one that holds pypdf for
minutes, one that takes it hundreds of megabytes)."""

from __future__ import annotations

import struct
import zlib


def png(width: int = 2, height: int = 2) -> bytes:
    """A valid RGB PNG of ``width`` x ``height`` grey pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = b"".join(b"\x00" + b"\x80\x80\x80" * width for _ in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def pdf(text: str = "Quarterly revenue grew by 12 percent") -> bytes:
    """A one-page PDF showing ``text`` (ASCII, no parentheses) in Helvetica."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
        b"/Resources << /Font << /F1 4 0 R >> >> /Contents 5 0 R >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
    ]
    return _pdf_of(objects)


def elf() -> bytes:
    """The start of a 64-bit little-endian ELF executable (enough to be sniffed as one)."""
    header = b"\x7fELF\x02\x01\x01\x00" + b"\x00" * 8 + struct.pack("<HHI", 2, 0x3E, 1)
    return header + b"\x00" * 200


def slow_pdf(pages: int = 40, operators: int = 200_000) -> bytes:
    """A small PDF (a few KiB) that holds pypdf for minutes: ``pages`` pages that all
    share one compressed content stream of ``operators`` text moves with empty
    strings (no text, so no character limit stops it), each costing pypdf's text
    extraction a full parse; about 5 s a page on a 2-core machine."""
    stream = zlib.compress(b"BT /F1 12 Tf " + b"1 0 Td () Tj " * operators + b"ET", 9)
    first_page = 5
    kids = b" ".join(b"%d 0 R" % (first_page + n) for n in range(pages))
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, pages),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(stream) + stream + b"\nendstream",
    ]
    objects += [
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
        b"/Resources << /Font << /F1 3 0 R >> >> /Contents 4 0 R >>"
    ] * pages
    return _pdf_of(objects)


def _pdf_of(objects: list[bytes]) -> bytes:
    """Numbered objects (1 first, the catalog) as a PDF with a correct cross-reference table."""
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


def greedy_pdf(streams: int = 3, operators: int = 3_400_000) -> bytes:
    """A small PDF (about 100 KiB) whose one page's content, ``streams`` compressed
    streams of ``operators`` text operators each (within pypdf's own 75 MB limit on
    decompressed content), takes pypdf about 500 MB of memory to parse."""
    stream = zlib.compress(b"BT /F1 12 Tf " + b"(a) Tj " * operators + b" ET", 9)
    contents = b" ".join(b"%d 0 R" % (5 + n) for n in range(streams))
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
        b"/Resources << /Font << /F1 4 0 R >> >> /Contents [%s] >>" % contents,
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    objects += [
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(stream) + stream + b"\nendstream"
    ] * streams
    return _pdf_of(objects)
