"""switchboard.client against a real in-process server: uploading and downloading
files (``upload_file``, streamed or resumable, and ``download_file``).

Connections are really dropped: the client talks to the server through a TCP relay
(tests/infra/tcprelay.py) that the test resets mid-transfer. What triggers the cut is
the transfer itself (an interceptor that sees the third chunk go out; a destination
whose first write cuts), so the break lands at a known point without any timing.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Final

import pytest
from grpc import aio

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.client import CHUNK_BYTES, Client, NotFound, TransferPolicy
from switchboard.client.backoff import Backoff
from switchboard.platform.rpc.server import SwitchboardServer
from tests.client.test_clientkit import PASSWORD, Wire, new_workspace, unique_email
from tests.infra.tcprelay import TcpRelay

pytestmark = pytest.mark.service

DEADLINE_S: Final = 60.0
APPEND: Final = "/switchboard.api.context.v1.ContextService/AppendUpload"
GET_UPLOAD: Final = "/switchboard.api.context.v1.ContextService/GetUpload"
DOWNLOAD: Final = "/switchboard.api.context.v1.ContextService/DownloadFile"
FAST: Final = TransferPolicy(backoff=Backoff(initial_s=0.05, max_s=0.2))


def _content(size: int) -> bytes:
    """Bytes that differ chunk to chunk, so a chunk sent twice or skipped shows."""
    return os.urandom(size)


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


@pytest.fixture
async def workspace(mesh: SwitchboardServer) -> AsyncIterator[tuple[Client, str]]:
    async with Client(mesh.address) as client:
        await client.register(unique_email("files"), PASSWORD)
        yield client, await new_workspace(client)


async def test_a_streamed_upload_of_a_path_bytes_or_a_file_downloads_the_same_bytes(
    workspace: tuple[Client, str], tmp_path: Path
) -> None:
    client, ws = workspace
    data = _content(2 * CHUNK_BYTES + 12345)
    source = tmp_path / "notes.bin"
    source.write_bytes(data)

    from_path = await asyncio.wait_for(client.upload_file(ws, source), DEADLINE_S)
    assert from_path.name.startswith(f"{ws}/files/")
    assert from_path.display_name == "notes.bin"
    assert from_path.size_bytes == len(data)
    assert from_path.sha256 == hashlib.sha256(data).hexdigest()
    assert from_path.media_type == "application/octet-stream"

    text = b"plain words, kept as text\n"
    from_bytes = await client.upload_file(ws, text, display_name="words.txt")
    assert from_bytes.media_type == "text/plain"
    assert from_bytes.kind == cpb.FILE_KIND_DOCUMENT
    # A file object is read from where it stands.
    handle = io.BytesIO(b"skip" + text)
    handle.seek(4)
    from_object = await client.upload_file(ws, handle, display_name="again.txt")
    assert from_object.sha256 == from_bytes.sha256

    copy = tmp_path / "copy.bin"
    got = await asyncio.wait_for(client.download_file(from_path.name, copy), DEADLINE_S)
    assert copy.read_bytes() == data
    assert got.name == from_path.name
    out = io.BytesIO()
    await client.download_file(from_object.name, out)
    assert out.getvalue() == text


async def test_upload_needs_a_name_for_bytes_and_a_seekable_file(
    workspace: tuple[Client, str],
) -> None:
    client, ws = workspace
    with pytest.raises(ValueError, match="display_name"):
        await client.upload_file(ws, b"anonymous")
    read, write = os.pipe()
    with os.fdopen(write, "wb", buffering=0) as w, os.fdopen(read, "rb") as r:
        w.write(b"x")
        with pytest.raises(ValueError, match="seekable"):
            await client.upload_file(ws, r, display_name="pipe.bin")


async def test_downloading_a_file_of_another_workspace_is_not_found(
    mesh: SwitchboardServer, workspace: tuple[Client, str], tmp_path: Path
) -> None:
    client, ws = workspace
    stored = await client.upload_file(ws, b"mine\n", display_name="mine.txt")
    async with Client(mesh.address) as stranger:
        await stranger.register(unique_email("stranger"), PASSWORD)
        with pytest.raises(NotFound):
            await stranger.download_file(stored.name, tmp_path / "theirs.txt")


class _CutOnce(aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """Refuses the network as the ``nth`` AppendUpload goes out, and gives it back when
    the client asks GetUpload where to resume."""

    def __init__(self, relay: TcpRelay, nth: int) -> None:
        self._relay = relay
        self._nth = nth
        self.appends = 0
        self.restored = False

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: aio.ClientCallDetails, request: Any
    ) -> Any:
        raw: Any = client_call_details.method
        method = raw.decode() if isinstance(raw, bytes) else str(raw)
        if method == APPEND:
            self.appends += 1
            if self.appends == self._nth:
                await asyncio.to_thread(self._relay.cut, refuse=True)
        elif method == GET_UPLOAD and not self.restored:
            self.restored = True
            await asyncio.to_thread(self._relay.restore)
        return await continuation(client_call_details, request)


async def test_a_resumable_upload_continues_from_the_committed_size_after_a_dropped_connection(
    mesh: SwitchboardServer, tmp_path: Path
) -> None:
    data = _content(4 * CHUNK_BYTES + 777)
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    wire = Wire()
    with TcpRelay(_port(mesh.address)) as relay:
        cut = _CutOnce(relay, nth=3)
        async with Client(
            f"127.0.0.1:{relay.port}", transfers=FAST, interceptors=[cut, *wire.interceptors]
        ) as client:
            await client.register(unique_email("resume"), PASSWORD)
            ws = await new_workspace(client)
            stored = await asyncio.wait_for(
                client.upload_file(ws, source, resumable=True), DEADLINE_S
            )
            assert relay.stats.cut >= 1
            assert cut.restored
            # Two chunks went through, the third was refused with the network, and the
            # upload went on from what GetUpload said the server held.
            assert cut.appends >= 6
            assert wire.count(GET_UPLOAD) >= 1
            assert stored.size_bytes == len(data)
            assert stored.sha256 == hashlib.sha256(data).hexdigest()
            out = io.BytesIO()
            await client.download_file(stored.name, out)
            assert out.getvalue() == data


class _CuttingWriter(io.BytesIO):
    """A destination whose first write resets every connection (the relay accepts
    new ones at once), as a network blip in the middle of a download."""

    def __init__(self, cut: Callable[[], int]) -> None:
        super().__init__()
        self._cut: Callable[[], int] | None = cut

    def write(self, data: Any) -> int:
        written = super().write(data)
        if self._cut is not None:
            cut, self._cut = self._cut, None
            cut()  # on the worker thread the client writes from
        return written


async def test_a_download_resumes_at_the_offset_reached_after_a_dropped_stream(
    mesh: SwitchboardServer,
) -> None:
    # Larger than what flow control lets the server send ahead, so the cut lands
    # while the stream still has bytes to send.
    data = _content(24 * CHUNK_BYTES)
    wire = Wire()
    with TcpRelay(_port(mesh.address)) as relay:
        async with Client(
            f"127.0.0.1:{relay.port}", transfers=FAST, interceptors=wire.interceptors
        ) as client:
            await client.register(unique_email("download"), PASSWORD)
            ws = await new_workspace(client)
            stored = await asyncio.wait_for(
                client.upload_file(ws, data, display_name="big.bin"), DEADLINE_S
            )
            out = _CuttingWriter(relay.cut)
            got = await asyncio.wait_for(client.download_file(stored.name, out), DEADLINE_S)
    assert relay.stats.cut >= 1
    assert out.getvalue() == data
    assert got.sha256 == hashlib.sha256(data).hexdigest()
    # Reopened, not started over: the last stream began past the first chunk.
    assert wire.count(DOWNLOAD) >= 2
