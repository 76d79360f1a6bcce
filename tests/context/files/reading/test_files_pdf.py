"""A PDF's text is read in a child process bounded in time and memory
(context/files/reading/pdfworker.py): a hostile PDF that would hold pypdf for minutes, or
take it hundreds of megabytes, ends as a file whose text FAILED with the reason,
seen through GetFile, and the server goes on reading other PDFs meanwhile."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.context.domain import ContextDomain
from switchboard.context.files.blobs.directory import DirectoryBlobStore
from switchboard.context.files.catalog import FileLimits, Files
from switchboard.context.files.reading.pdfworker import PdfExtractor
from switchboard.context.files.store import FileStore
from switchboard.platform.rpc.server import SwitchboardServer
from tests.conftest import built
from tests.kits.contextkit import Stub, World, rpc, stub_fixture, world_fixture
from tests.kits.filekit import greedy_pdf, pdf, slow_pdf

pytestmark = pytest.mark.service

MiB = 1024 * 1024
#: The bounds the test's files domain reads PDFs within.
TIMEOUT_S = 2.0
MEMORY = 256 * MiB

stub, world = stub_fixture, world_fixture

#: pypdf on a PDF, in a plain child process of its own, with no bound at all.
_UNBOUNDED = """
import sys
from switchboard.context.files.reading.extract import pdf_text
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

    def files_within(limits: FileLimits, folder: str) -> Files:
        blobs = DirectoryBlobStore(tmp_path / folder)
        return Files(domain.files.common, FileStore(mesh.shared.database), blobs, limits=limits)

    # Each bound on a reader of its own, so that each hostile file meets the one it tests
    # however busy the machine (the greedy one, slowed enough, would otherwise run out of
    # time before it runs out of memory).
    timed = files_within(FileLimits(extract_timeout_s=TIMEOUT_S), "timed")
    capped = files_within(FileLimits(extract_timeout_s=60.0, extract_memory_bytes=MEMORY), "capped")
    try:
        started = time.monotonic()
        # All at once, with an ordinary PDF: readers run side by side.
        slow, greedy, fine = await asyncio.gather(
            store_pdf(timed, world, slow_pdf(), "slow.pdf"),
            store_pdf(capped, world, greedy_pdf(), "greedy.pdf"),
            store_pdf(timed, world, pdf(), "ok.pdf"),
        )
        took = time.monotonic() - started
        assert took < 10 * TIMEOUT_S, took
        for stored in (slow, greedy, fine):
            assert stored.kind == pb.FILE_KIND_DOCUMENT
        got = await shown(stub, world, slow, greedy, fine)
        assert got[slow.name].text_state == pb.FILE_TEXT_STATE_FAILED
        assert got[slow.name].text_error == "reading the PDF took longer than 2 s"
        assert got[greedy.name].text_state == pb.FILE_TEXT_STATE_FAILED
        assert got[greedy.name].text_error == "reading the PDF needed more than 256 MiB of memory"
        assert got[fine.name].text_state == pb.FILE_TEXT_STATE_READY
        assert got[fine.name].text == "Quarterly revenue grew by 12 percent"
        # The files are stored and readable whatever their text.
        assert await timed.read_all(slow.name, limit=1 * MiB) == slow_pdf()
        # And the readers still read the next PDF.
        for files in (timed, capped):
            again = await store_pdf(files, world, pdf("Second line of text"), "again.pdf")
            assert again.text_state == pb.FILE_TEXT_STATE_READY
    finally:
        await timed.close()
        await capped.close()


async def store_pdf(files: Files, world: World, data: bytes, name: str) -> pb.File:
    """``data`` stored through ``files`` as the world's editor's PDF ``name``."""
    return await files.store_bytes(
        world.editor.name,
        world.workspace.name,
        display_name=name,
        media_type="application/pdf",
        data=data,
    )


async def shown(stub: Stub, world: World, *stored: pb.File) -> dict[str, pb.File]:
    """Each stored file as GetFile's full view shows it to the world's viewer, by name."""
    found = {}
    for each in stored:
        request = pb.GetFileRequest(name=each.name, view=pb.FILE_VIEW_FULL)
        found[each.name] = (await rpc(stub.GetFile, request, world.viewer)).file
    return found


def _helpers() -> list[int]:
    """This process's PDF reader helpers, found as any process would be: in /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = next(line for line in status.splitlines() if line.startswith("PPid:"))
        if int(parent.split()[1]) == os.getpid() and b"pdfworker" in command:
            found.append(int(entry.name))
    return found


@pytest.mark.asyncio
async def test_a_reader_that_dies_fails_its_pdf_and_is_started_again(tmp_path: Path) -> None:
    slow, fine = tmp_path / "slow.pdf", tmp_path / "fine.pdf"
    slow.write_bytes(slow_pdf())
    fine.write_bytes(pdf())
    reader = PdfExtractor(timeout_s=60.0, memory_bytes=MEMORY, concurrency=2)
    try:
        assert (await reader.extract(fine, max_chars=1000, max_pages=5)).text
        [helper] = _helpers()
        reading = asyncio.create_task(reader.extract(slow, max_chars=1000, max_pages=5))
        # The helper has forked the slow PDF's reader once it has a child of its own.
        children = await _children_of(helper)
        os.kill(helper, signal.SIGKILL)
        failed = await asyncio.wait_for(reading, 30)
        assert failed.error == "the PDF could not be read"
        # Its child went with it (the kernel kills it when the helper dies): no orphan
        # reads on with nobody waiting.
        for child in children:
            await _gone(child)
        again = await reader.extract(fine, max_chars=1000, max_pages=5)
        assert again.text == "Quarterly revenue grew by 12 percent"
        assert _helpers() != [helper]
    finally:
        await reader.close()
    assert _helpers() == []


async def _children_of(pid: int) -> list[int]:
    """``pid``'s children, once it has any."""
    listing = Path(f"/proc/{pid}/task/{pid}/children")
    deadline = time.monotonic() + 30
    while not (found := (await asyncio.to_thread(listing.read_text)).split()):
        assert time.monotonic() < deadline, f"process {pid} never started a child"
        await asyncio.sleep(0.01)
    return [int(child) for child in found]


async def _gone(pid: int) -> None:
    """Wait until process ``pid`` has exited (a zombie counts: it runs no more)."""
    status = Path(f"/proc/{pid}/status")
    deadline = time.monotonic() + 30
    while True:
        try:
            text = await asyncio.to_thread(status.read_text)
        except FileNotFoundError:
            return
        if "State:\tZ" in text:
            return
        assert time.monotonic() < deadline, f"process {pid} is still running"
        await asyncio.sleep(0.01)
