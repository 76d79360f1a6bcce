"""A PDF's text is read in a child process bounded in time and memory
(context/files/pdfworker.py): a hostile PDF that would hold pypdf for minutes, or
take it hundreds of megabytes, ends as a file whose text FAILED with the reason,
seen through GetFile, and the server goes on reading other PDFs meanwhile."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.context.domain import ContextDomain
from switchboard.context.files.dirblobs import DirectoryBlobStore
from switchboard.context.files.files import FileLimits, Files
from switchboard.context.files.filestore import FileStore
from switchboard.platform.rpc.server import SwitchboardServer
from tests.conftest import built
from tests.service.contextkit import Stub, World, rpc, stub_fixture, world_fixture
from tests.service.filekit import greedy_pdf, pdf, slow_pdf

MiB = 1024 * 1024
#: The bounds the test's files domain reads PDFs within.
TIMEOUT_S = 2.0
MEMORY = 256 * MiB

stub, world = stub_fixture, world_fixture

#: pypdf on a PDF, in a plain child process of its own, with no bound at all.
_UNBOUNDED = """
import sys
from switchboard.context.files.extract import pdf_text
with open(sys.argv[1], "rb") as source:
    pdf_text(source, max_chars=1_000_000, max_pages=500)
"""


def test_the_slow_pdf_holds_pypdf_without_a_bound(tmp_path: Path) -> None:
    """The hostile PDF is hostile: unbounded, pypdf is still at it long after the bound."""
    source = tmp_path / "slow.pdf"
    source.write_bytes(slow_pdf())
    assert len(source.read_bytes()) < 16 * 1024
    child = subprocess.Popen([sys.executable, "-c", _UNBOUNDED, str(source)])
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(timeout=5 * TIMEOUT_S)
    finally:
        child.kill()
        child.wait()


@pytest.mark.asyncio
async def test_hostile_pdfs_fail_their_text_within_the_bounds(
    stub: Stub, world: World, mesh: SwitchboardServer, tmp_path: Path
) -> None:
    domain = built(mesh, ContextDomain)
    files = Files(
        domain.files.common,
        FileStore(mesh.shared.database),
        DirectoryBlobStore(tmp_path / "files"),
        limits=FileLimits(extract_timeout_s=TIMEOUT_S, extract_memory_bytes=MEMORY),
    )

    async def store(data: bytes, name: str) -> pb.File:
        return await files.store_bytes(
            world.editor.name,
            world.workspace.name,
            display_name=name,
            media_type="application/pdf",
            data=data,
        )

    try:
        started = time.monotonic()
        # Both at once, with an ordinary PDF: two readers run side by side.
        slow, greedy, fine = await asyncio.gather(
            store(slow_pdf(), "slow.pdf"), store(greedy_pdf(), "greedy.pdf"), store(pdf(), "ok.pdf")
        )
        took = time.monotonic() - started
        assert took < 10 * TIMEOUT_S, took
        for stored in (slow, greedy, fine):
            assert stored.kind == pb.FILE_KIND_DOCUMENT
        got = {
            name: (
                await rpc(
                    stub.GetFile, pb.GetFileRequest(name=name, view=pb.FILE_VIEW_FULL), world.viewer
                )
            ).file
            for name in (slow.name, greedy.name, fine.name)
        }
        assert got[slow.name].text_state == pb.FILE_TEXT_STATE_FAILED
        assert got[slow.name].text_error == "reading the PDF took longer than 2 s"
        assert got[greedy.name].text_state == pb.FILE_TEXT_STATE_FAILED
        assert got[greedy.name].text_error == "reading the PDF needed more than 256 MiB of memory"
        assert got[fine.name].text_state == pb.FILE_TEXT_STATE_READY
        assert got[fine.name].text == "Quarterly revenue grew by 12 percent"
        # The files are stored and readable whatever their text.
        assert await files.read_all(slow.name, limit=1 * MiB) == slow_pdf()
        # And the reader still reads the next PDF.
        again = await store(pdf("Second line of text"), "again.pdf")
        assert again.text_state == pb.FILE_TEXT_STATE_READY
    finally:
        await files.close()
