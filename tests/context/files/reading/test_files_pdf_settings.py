"""The bounds a PDF's text is read within are settings
(``SWITCHBOARD_CONTEXT_FILES_EXTRACT_*``): a server started from the environment reads
its PDFs within them, and a hostile PDF's text fails saying the bound it met."""

from __future__ import annotations

import asyncio

import pytest
from grpc import aio

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.context.domain import ContextDomain
from tests.conftest import built, make_settings, started
from tests.context.files.reading.test_files_pdf import shown, store_pdf
from tests.kits.contextkit import context_stub, ctx_world
from tests.kits.filekit import greedy_pdf, pdf, slow_pdf

pytestmark = [pytest.mark.service, pytest.mark.asyncio]

MiB = 1024 * 1024


async def test_the_pdf_bounds_come_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    # Time and memory on servers of their own, so that each hostile file meets the bound it
    # tests however busy the machine (slowed enough, the greedy one runs out of time first).
    monkeypatch.setenv("SWITCHBOARD_CONTEXT_FILES_EXTRACT_TIMEOUT_S", "2")
    monkeypatch.setenv("SWITCHBOARD_CONTEXT_FILES_EXTRACT_CONCURRENCY", "3")
    async with started(make_settings()) as server, aio.insecure_channel(server.address) as chan:
        stub = context_stub(chan)
        world = await ctx_world(server, stub)
        files = built(server, ContextDomain).files
        limits = files.file_limits
        assert (limits.extract_timeout_s, limits.extract_concurrency) == (2.0, 3)

        # Readers side by side: the fine PDF is not kept waiting behind the slow one.
        slow, fine = await asyncio.gather(
            store_pdf(files, world, slow_pdf(), "slow.pdf"),
            store_pdf(files, world, pdf(), "ok.pdf"),
        )
        got = await shown(stub, world, slow, fine)
        assert got[slow.name].text_error == "reading the PDF took longer than 2 s"
        assert got[fine.name].text_state == pb.FILE_TEXT_STATE_READY

    monkeypatch.setenv("SWITCHBOARD_CONTEXT_FILES_EXTRACT_TIMEOUT_S", "60")
    monkeypatch.setenv("SWITCHBOARD_CONTEXT_FILES_EXTRACT_MEMORY_BYTES", str(256 * MiB))
    async with started(make_settings()) as server, aio.insecure_channel(server.address) as chan:
        stub = context_stub(chan)
        world = await ctx_world(server, stub)
        files = built(server, ContextDomain).files
        assert files.file_limits.extract_memory_bytes == 256 * MiB
        greedy = await store_pdf(files, world, greedy_pdf(), "greedy.pdf")
        got = await shown(stub, world, greedy)
        assert got[greedy.name].text_error == "reading the PDF needed more than 256 MiB of memory"
