"""The bounds a PDF's text is read within are settings
(``SWITCHBOARD_CONTEXT_FILES_EXTRACT_*``): a server started from the environment reads
its PDFs within them, and a hostile PDF's text fails saying the bound it met."""

from __future__ import annotations

import pytest
from grpc import aio

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.context.domain import ContextDomain
from tests.conftest import built, make_settings, started
from tests.context.files.reading.test_files_pdf import shown, store_hostile
from tests.kits.contextkit import context_stub, ctx_world

pytestmark = [pytest.mark.service, pytest.mark.asyncio]

MiB = 1024 * 1024


async def test_the_pdf_bounds_come_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWITCHBOARD_CONTEXT_FILES_EXTRACT_TIMEOUT_S", "2")
    monkeypatch.setenv("SWITCHBOARD_CONTEXT_FILES_EXTRACT_MEMORY_BYTES", str(256 * MiB))
    monkeypatch.setenv("SWITCHBOARD_CONTEXT_FILES_EXTRACT_CONCURRENCY", "3")
    async with started(make_settings()) as server, aio.insecure_channel(server.address) as chan:
        stub = context_stub(chan)
        world = await ctx_world(server, stub)
        files = built(server, ContextDomain).files
        limits = files.file_limits
        assert (
            limits.extract_timeout_s,
            limits.extract_memory_bytes,
            limits.extract_concurrency,
        ) == (2.0, 256 * MiB, 3)

        # Three readers side by side: the fine PDF is not kept waiting behind the others.
        slow, greedy, fine = await store_hostile(files, world)
        got = await shown(stub, world, slow, greedy, fine)
        assert got[slow.name].text_error == "reading the PDF took longer than 2 s"
        assert got[greedy.name].text_error == "reading the PDF needed more than 256 MiB of memory"
        assert got[fine.name].text_state == pb.FILE_TEXT_STATE_READY
