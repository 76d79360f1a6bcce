"""Files in the context service, in one process, on SQLite and on PostgreSQL with the
directory blob store: uploads (streamed and resumable), downloads, listing, deletes,
every bad input with its status and nothing stored, events, orphan collection, and
the text of documents and audio."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from google.rpc import error_details_pb2
from grpc import aio
from sqlalchemy import update

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.context.domain import ContextDomain
from switchboard.context.files.blobs.directory import DirectoryBlobStore
from switchboard.context.files.catalog import FileLimits, Files
from switchboard.context.files.store import FileStore
from switchboard.mesh import create_server
from switchboard.platform.errors import InvalidArgument, NotFound, RequestTooLarge
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.security.credentials.accesstokens import SigningKey, private_key_pem
from switchboard.platform.store.models import UploadRow
from tests.conftest import CALL_DEADLINE_S, built, make_settings, started
from tests.kits.authkit import detail, reason
from tests.kits.contextkit import (
    Caller,
    EventTap,
    Stub,
    World,
    awaiting_event,
    context_stub,
    create_workspace,
    ctx_world,
    events_fixture,
    refused,
    rpc,
    stub_fixture,
    tap,
    violations,
)
from tests.kits.filekit import elf, pdf, png
from tests.kits.modulekit import module_channel_fixture, module_database_url_fixture

# One server per backend for the module (starting one per test was most of the module's
# time); each test stores files in a workspace of its own, with users of its own. A test
# that counts what the whole blob store holds, or runs the files' maintenance, has a
# server of its own (``own_*``).
pytestmark = [pytest.mark.service, pytest.mark.asyncio(loop_scope="module")]

MiB = 1024 * 1024
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
NOT_FOUND = grpc.StatusCode.NOT_FOUND
DENIED = grpc.StatusCode.PERMISSION_DENIED
OUT_OF_RANGE = grpc.StatusCode.OUT_OF_RANGE
FILE_CHANGED = events_pb2.EVENT_TYPE_FILE_CHANGED


module_database_url = module_database_url_fixture


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(module_database_url: str) -> AsyncIterator[SwitchboardServer]:
    async with started(make_settings(database_url=module_database_url)) as server:
        yield server


channel, stub, events = module_channel_fixture, stub_fixture, events_fixture


@pytest_asyncio.fixture(loop_scope="module")
async def world(mesh: SwitchboardServer, stub: Stub) -> World:
    """A workspace of this test's own, with users of its own in each role."""
    return await ctx_world(mesh, stub)


@pytest_asyncio.fixture(loop_scope="module")
async def own_mesh(database_url: str) -> AsyncIterator[SwitchboardServer]:
    """A server of this test's own."""
    async with started(make_settings(database_url=database_url)) as server:
        yield server


@pytest_asyncio.fixture(loop_scope="module")
async def own_stub(own_mesh: SwitchboardServer) -> AsyncIterator[Stub]:
    async with aio.insecure_channel(own_mesh.address) as chan:
        yield context_stub(chan)


@pytest_asyncio.fixture(loop_scope="module")
async def own_world(own_mesh: SwitchboardServer, own_stub: Stub) -> World:
    return await ctx_world(own_mesh, own_stub)


@pytest.fixture
def own_events(own_mesh: SwitchboardServer) -> Iterator[EventTap]:
    with tap(own_mesh) as recorder:
        yield recorder


@asynccontextmanager
async def limited_mesh(**overrides: object) -> AsyncIterator[tuple[SwitchboardServer, Stub]]:
    server, _port = await create_server(make_settings(**overrides))
    await server.start()
    try:
        async with aio.insecure_channel(server.address) as channel:
            yield server, context_stub(channel)
    finally:
        await server.shutdown(grace=0)


def content(size: int) -> bytes:
    """``size`` bytes no sniffer recognizes (a marker, then random bytes)."""
    return (b"SBTEST" + os.urandom(size))[:size]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def header(
    parent: str,
    data: bytes,
    *,
    media_type: str = "application/octet-stream",
    display_name: str = "data.bin",
    size: int | None = None,
    request_id: str = "",
) -> pb.UploadFileRequest:
    return pb.UploadFileRequest(
        header=pb.UploadFileHeader(
            parent=parent,
            file=pb.File(
                display_name=display_name,
                media_type=media_type,
                size_bytes=len(data) if size is None else size,
            ),
            request_id=request_id,
        )
    )


def frames_of(
    parent: str, data: bytes, *, chunk: int = MiB, checksum: str | None = None, **kw: object
) -> list[pb.UploadFileRequest]:
    frames = [header(parent, data, **kw)]  # type: ignore[arg-type]
    frames += [pb.UploadFileRequest(chunk=data[i : i + chunk]) for i in range(0, len(data), chunk)]
    frames.append(pb.UploadFileRequest(sha256=sha(data) if checksum is None else checksum))
    return frames


async def send(stub: Stub, caller: Caller, frames: Iterable[pb.UploadFileRequest]) -> pb.File:
    async def stream() -> AsyncIterator[pb.UploadFileRequest]:
        for frame in frames:
            yield frame

    response = await stub.UploadFile(stream(), metadata=caller.md, timeout=CALL_DEADLINE_S)
    return response.file


async def upload(stub: Stub, caller: Caller, parent: str, data: bytes, **kw: object) -> pb.File:
    return await send(stub, caller, frames_of(parent, data, **kw))  # type: ignore[arg-type]


async def download(
    stub: Stub, caller: Caller, name: str, offset: int = 0, limit: int = 0
) -> tuple[pb.File, bytes, list[pb.DownloadFileResponse]]:
    frames = [
        frame
        async for frame in stub.DownloadFile(
            pb.DownloadFileRequest(name=name, read_offset=offset, read_limit=limit),
            metadata=caller.md,
            timeout=CALL_DEADLINE_S,
        )
    ]
    return frames[0].file, b"".join(frame.data for frame in frames), frames


async def listed(stub: Stub, caller: Caller, parent: str) -> pb.ListFilesResponse:
    return await rpc(stub.ListFiles, pb.ListFilesRequest(parent=parent, page_size=100), caller)


async def nothing_stored(stub: Stub, caller: Caller, parent: str) -> None:
    found = await listed(stub, caller, parent)
    assert list(found.files) == []
    assert found.workspace_usage_bytes == 0


def metadata(error: aio.AioRpcError) -> dict[str, str]:
    info: error_details_pb2.ErrorInfo = detail(error, error_details_pb2.ErrorInfo)
    return dict(info.metadata)


def file_events(recorder: EventTap, parent: str) -> list[tuple[int, str]]:
    """The file events about ``parent``'s files (on PostgreSQL another test's events may
    reach the module's bus late, through the outbox)."""
    return [
        (e.file_changed.change, e.file_changed.file.name)
        for e in recorder.take()
        if e.type == FILE_CHANGED and e.file_changed.file.name.startswith(parent + "/")
    ]


# -- round trips ---------------------------------------------------------------------------


async def test_a_streamed_upload_downloads_as_the_same_bytes(
    stub: Stub, world: World, events: EventTap
) -> None:
    parent = world.workspace.name
    data = content(2 * MiB + 12345)
    stored = await upload(stub, world.editor, parent, data, display_name="big.bin")
    assert stored.name.startswith(parent + "/files/")
    assert (stored.size_bytes, stored.sha256) == (len(data), sha(data))
    assert (stored.media_type, stored.kind) == ("application/octet-stream", pb.FILE_KIND_OTHER)
    assert stored.text_state == pb.FILE_TEXT_STATE_NONE
    assert stored.creator == world.editor.name
    assert file_events(events, parent) == [(events_pb2.CHANGE_KIND_CREATED, stored.name)]

    # Viewers read and download.
    first, body, frames = await download(stub, world.viewer, stored.name)
    assert first == stored
    assert body == data
    assert all(len(frame.data) <= MiB for frame in frames)
    assert [frame.offset for frame in frames[1:]] == [0, MiB, 2 * MiB]
    _, part, _ = await download(stub, world.viewer, stored.name, offset=MiB - 10, limit=100)
    assert part == data[MiB - 10 : MiB + 90]
    _, tail, _ = await download(stub, world.viewer, stored.name, offset=len(data))
    assert tail == b""
    got = await rpc(stub.GetFile, pb.GetFileRequest(name=stored.name), world.viewer)
    assert got.file == stored
    found = await listed(stub, world.viewer, parent)
    assert [f.name for f in found.files] == [stored.name]
    assert found.workspace_usage_bytes == len(data)

    # A request_id makes a retried upload return the first file.
    small = content(100)
    keyed = await upload(stub, world.editor, parent, small, request_id="up-1")
    assert await upload(stub, world.editor, parent, small, request_id="up-1") == keyed
    reused = await refused(
        upload(stub, world.editor, parent, content(101), request_id="up-1"), INVALID
    )
    assert violations(reused) == ["request_id"]
    found = await listed(stub, world.viewer, parent)
    assert [f.name for f in found.files] == [keyed.name, stored.name]
    assert file_events(events, parent) == [(events_pb2.CHANGE_KIND_CREATED, keyed.name)]


async def test_images_and_documents_get_their_kind_and_text(
    stub: Stub, world: World, mesh: SwitchboardServer
) -> None:
    parent = world.workspace.name
    image = await upload(stub, world.editor, parent, png(), media_type="image/png")
    assert (image.kind, image.text_state) == (pb.FILE_KIND_IMAGE, pb.FILE_TEXT_STATE_NONE)
    document = await upload(stub, world.editor, parent, pdf(), media_type="application/pdf")
    assert document.kind == pb.FILE_KIND_DOCUMENT
    assert document.text_state == pb.FILE_TEXT_STATE_READY
    assert document.text == ""  # BASIC: no text
    assert document.text_token_count > 0
    full = await rpc(
        stub.GetFile, pb.GetFileRequest(name=document.name, view=pb.FILE_VIEW_FULL), world.viewer
    )
    assert full.file.text == "Quarterly revenue grew by 12 percent"
    broken = await upload(
        stub, world.editor, parent, b"%PDF-1.7\n" + content(500), media_type="application/pdf"
    )
    assert broken.text_state == pb.FILE_TEXT_STATE_FAILED
    assert broken.text_error == "the PDF could not be read"
    notes = await upload(
        stub, world.editor, parent, b"# Notes\nship it", media_type="text/markdown"
    )
    kinds = await rpc(
        stub.ListFiles,
        pb.ListFilesRequest(parent=parent, kinds=[pb.FILE_KIND_IMAGE, pb.FILE_KIND_OTHER]),
        world.viewer,
    )
    assert [f.name for f in kinds.files] == [image.name]

    # What the rest of the mesh uses.
    files = built(mesh, ContextDomain).files
    assert await files.texts([document.name, image.name, notes.name, broken.name]) == {
        document.name: ("Quarterly revenue grew by 12 percent", document.text_token_count),
        notes.name: ("# Notes\nship it", notes.text_token_count),
    }
    assert await files.resolve(parent, image.name) == image
    assert await files.read_all(image.name, limit=10_000) == png()
    with pytest.raises(RequestTooLarge):
        await files.read_all(image.name, limit=10)
    assert b"".join([c async for c in files.read(image.name, 1, 3)]) == png()[1:4]
    inline = await files.store_bytes(
        world.editor.name,
        parent,
        display_name="inline.png",
        media_type="image/png",
        data=png(3, 3),
        source_uri="https://example.com/a.png",
    )
    assert (inline.size_bytes, inline.source_uri) == (len(png(3, 3)), "https://example.com/a.png")
    assert inline.creator == world.editor.name
    with pytest.raises(InvalidArgument) as caught:
        await files.store_bytes(
            world.editor.name, "Acme", display_name="x", media_type="text/plain", data=b"x"
        )
    # What the workspace must be, not only that it is not.
    assert str(caught.value) == (
        "workspace must be a resource name of the form workspaces/{workspace} or its id "
        "(ids: lowercase letters, digits and hyphens)"
    )
    other = await create_workspace(stub, world.owner, "Other")
    with pytest.raises(NotFound):
        await files.resolve(other.name, image.name)


async def test_a_resumable_upload_resumes_after_a_dropped_client(
    stub: Stub, world: World, mesh: SwitchboardServer
) -> None:
    parent = world.workspace.name
    data = content(MiB + 5000)
    started = await rpc(
        stub.StartUpload,
        pb.StartUploadRequest(
            parent=parent,
            file=pb.File(
                display_name="r.bin", media_type="application/octet-stream", size_bytes=len(data)
            ),
            request_id="start-1",
        ),
        world.editor,
    )
    upload_ = started.upload
    assert upload_.committed_size == 0
    assert upload_.name.startswith(parent + "/uploads/")
    again = await rpc(
        stub.StartUpload,
        pb.StartUploadRequest(
            parent=parent,
            file=pb.File(
                display_name="r.bin", media_type="application/octet-stream", size_bytes=len(data)
            ),
            request_id="start-1",
        ),
        world.editor,
    )
    assert again.upload.name == upload_.name
    await rpc(
        stub.AppendUpload,
        pb.AppendUploadRequest(name=upload_.name, offset=0, data=data[:MiB]),
        world.editor,
    )
    # The client drops; a new connection asks where to resume.
    async with aio.insecure_channel(mesh.address) as channel:
        fresh = context_stub(channel)
        where = await rpc(fresh.GetUpload, pb.GetUploadRequest(name=upload_.name), world.editor)
        assert where.upload.committed_size == MiB
        # A retried append whose answer was lost: refused, telling where the upload is.
        error = await refused(
            rpc(
                fresh.AppendUpload,
                pb.AppendUploadRequest(name=upload_.name, offset=0, data=data[:MiB]),
                world.editor,
            ),
            PRECONDITION,
        )
        assert reason(error) == "ERROR_REASON_UPLOAD_OFFSET_MISMATCH"
        assert metadata(error)["committed_size"] == str(MiB)
        # A chunk past the committed size is refused the same way.
        error = await refused(
            rpc(
                fresh.AppendUpload,
                pb.AppendUploadRequest(name=upload_.name, offset=MiB + 10, data=b"x"),
                world.editor,
            ),
            PRECONDITION,
        )
        assert metadata(error)["committed_size"] == str(MiB)
        early = await refused(
            rpc(
                fresh.FinishUpload,
                pb.FinishUploadRequest(name=upload_.name, sha256=sha(data)),
                world.editor,
            ),
            PRECONDITION,
        )
        assert metadata(early)["committed_size"] == str(MiB)
        done = await rpc(
            fresh.AppendUpload,
            pb.AppendUploadRequest(name=upload_.name, offset=MiB, data=data[MiB:]),
            world.editor,
        )
        assert done.upload.committed_size == len(data)
        wrong = await refused(
            rpc(
                fresh.FinishUpload,
                pb.FinishUploadRequest(name=upload_.name, sha256="0" * 64),
                world.editor,
            ),
            INVALID,
        )
        assert reason(wrong) == "ERROR_REASON_CHECKSUM_MISMATCH"
        assert violations(wrong) == ["sha256"]
        await nothing_stored(fresh, world.editor, parent)
        # The upload stays: the client fixes its checksum.
        finished = await rpc(
            fresh.FinishUpload,
            pb.FinishUploadRequest(name=upload_.name, sha256=sha(data)),
            world.editor,
        )
        retried = await rpc(
            fresh.FinishUpload,
            pb.FinishUploadRequest(name=upload_.name, sha256=sha(data)),
            world.editor,
        )
        assert retried.file == finished.file
        _, body, _ = await download(fresh, world.viewer, finished.file.name)
        assert body == data
        listing = await listed(fresh, world.viewer, parent)
        assert listing.workspace_usage_bytes == len(data)


# -- bad input: each its status, nothing stored ------------------------------------------


async def test_frames_out_of_order_are_invalid_naming_the_frame(stub: Stub, world: World) -> None:
    parent = world.workspace.name
    data = content(3000)
    chunk = pb.UploadFileRequest(chunk=data)
    checksum = pb.UploadFileRequest(sha256=sha(data))
    cases: list[tuple[list[pb.UploadFileRequest], str]] = [
        ([chunk, checksum], "header"),
        ([], "header"),
        ([header(parent, data), header(parent, data), chunk, checksum], "header"),
        ([header(parent, data), checksum, chunk], "sha256"),
        ([header(parent, data), chunk], "sha256"),
        ([header(parent, data), chunk, chunk, checksum], "chunk"),
        ([header(parent, data, size=4000), chunk, checksum], "header.file.size_bytes"),
        ([header(parent, data), pb.UploadFileRequest(chunk=b""), chunk, checksum], "chunk"),
        ([header(parent, data), chunk, pb.UploadFileRequest(sha256="abc")], "sha256"),
        ([header(parent, data), pb.UploadFileRequest(), chunk, checksum], "frame"),
        ([header(parent, data, media_type="image"), chunk, checksum], "header.file.media_type"),
        ([header(parent, data, display_name=""), chunk, checksum], "header.file.display_name"),
        ([header("workspaces/", data), chunk, checksum], "header.parent"),
    ]
    for frames, field in cases:
        error = await refused(send(stub, world.editor, frames), INVALID)
        assert violations(error) == [field], (field, error.details())
    big = pb.UploadFileRequest(chunk=content(MiB + 1))
    error = await refused(
        send(stub, world.editor, [header(parent, big.chunk), big, checksum]), INVALID
    )
    assert violations(error) == ["chunk"]
    await nothing_stored(stub, world.editor, parent)


async def test_a_lying_media_type_or_checksum_stores_nothing(stub: Stub, world: World) -> None:
    parent = world.workspace.name
    lie = await refused(upload(stub, world.editor, parent, elf(), media_type="image/png"), INVALID)
    assert reason(lie) == "ERROR_REASON_MEDIA_TYPE_MISMATCH"
    assert metadata(lie)["detected_media_type"] == "application/x-executable"
    assert violations(lie) == ["header.file.media_type"]
    # Refused at its head, however large the rest.
    big_lie = elf() + content(3 * MiB)
    lie = await refused(
        upload(stub, world.editor, parent, big_lie, media_type="image/png"), INVALID
    )
    assert reason(lie) == "ERROR_REASON_MEDIA_TYPE_MISMATCH"
    pdf_as_png = await refused(
        upload(stub, world.editor, parent, pdf(), media_type="image/png"), INVALID
    )
    assert metadata(pdf_as_png)["detected_media_type"] == "application/pdf"
    wrong = await refused(upload(stub, world.editor, parent, png(), checksum="1" * 64), INVALID)
    assert reason(wrong) == "ERROR_REASON_CHECKSUM_MISMATCH"
    # The resumable path refuses a lie at the first append of the head.
    started = await rpc(
        stub.StartUpload,
        pb.StartUploadRequest(
            parent=parent,
            file=pb.File(display_name="x.png", media_type="image/png", size_bytes=len(elf())),
        ),
        world.editor,
    )
    lie = await refused(
        rpc(
            stub.AppendUpload,
            pb.AppendUploadRequest(name=started.upload.name, offset=0, data=elf()),
            world.editor,
        ),
        INVALID,
    )
    assert reason(lie) == "ERROR_REASON_MEDIA_TYPE_MISMATCH"
    await nothing_stored(stub, world.editor, parent)


async def test_size_quota_and_uploads_in_flight_are_limited(database_url: str) -> None:
    async with limited_mesh(
        database_url=database_url,
        context_files_max_bytes=64 * 1024,
        context_files_quota_bytes=100 * 1024,
        context_files_max_uploads=2,
    ) as (mesh, stub):
        world = await ctx_world(mesh, stub)
        parent = world.workspace.name
        over = await refused(upload(stub, world.editor, parent, content(64 * 1024 + 1)), EXHAUSTED)
        assert reason(over) == "ERROR_REASON_REQUEST_TOO_LARGE"
        files = built(mesh, ContextDomain).files
        with pytest.raises(RequestTooLarge):
            await files.store_bytes(
                world.editor.name,
                parent,
                display_name="x",
                media_type="text/plain",
                data=b"x" * (4 * MiB + 1),
            )
        first = await upload(stub, world.editor, parent, content(60 * 1024))

        def start(size: int) -> pb.StartUploadRequest:
            return pb.StartUploadRequest(
                parent=parent,
                file=pb.File(
                    display_name="u", media_type="application/octet-stream", size_bytes=size
                ),
            )

        # 60 KiB stored + 41 KiB declared is over 100 KiB.
        full = await refused(rpc(stub.StartUpload, start(41 * 1024), world.editor), EXHAUSTED)
        assert reason(full) == "ERROR_REASON_QUOTA_EXCEEDED"
        pending = await rpc(stub.StartUpload, start(30 * 1024), world.editor)
        # An upload in progress counts at its declared size.
        full = await refused(upload(stub, world.editor, parent, content(11 * 1024)), EXHAUSTED)
        assert reason(full) == "ERROR_REASON_QUOTA_EXCEEDED"
        await rpc(stub.StartUpload, start(1), world.editor)
        many = await refused(rpc(stub.StartUpload, start(1), world.editor), EXHAUSTED)
        assert reason(many) == "ERROR_REASON_QUOTA_EXCEEDED"
        await rpc(stub.CancelUpload, pb.CancelUploadRequest(name=pending.upload.name), world.editor)
        await refused(
            rpc(stub.GetUpload, pb.GetUploadRequest(name=pending.upload.name), world.editor),
            NOT_FOUND,
        )
        found = await listed(stub, world.editor, parent)
        assert [f.name for f in found.files] == [first.name]
        assert found.workspace_usage_bytes == 60 * 1024


async def test_an_expired_upload_is_refused_and_discarded(
    stub: Stub, world: World, mesh: SwitchboardServer
) -> None:
    parent = world.workspace.name
    started = await rpc(
        stub.StartUpload,
        pb.StartUploadRequest(
            parent=parent,
            file=pb.File(display_name="e", media_type="application/octet-stream", size_bytes=10),
        ),
        world.editor,
    )
    name = started.upload.name
    await rpc(
        stub.AppendUpload, pb.AppendUploadRequest(name=name, offset=0, data=b"12345"), world.editor
    )
    upload_id = name.rsplit("/", 1)[1]
    blobs = built(mesh, ContextDomain).files.blobs
    assert isinstance(blobs, DirectoryBlobStore)
    assert (blobs.root / "staging" / upload_id).exists()
    # Let it expire: move its expiry into the past directly in the database.
    async with mesh.shared.database.sessions() as db, db.begin():
        await db.execute(
            update(UploadRow)
            .where(UploadRow.id == upload_id)
            .values(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
        )
    for call in (
        rpc(
            stub.AppendUpload,
            pb.AppendUploadRequest(name=name, offset=5, data=b"67890"),
            world.editor,
        ),
        rpc(stub.GetUpload, pb.GetUploadRequest(name=name), world.editor),
        rpc(
            stub.FinishUpload,
            pb.FinishUploadRequest(name=name, sha256=sha(b"1234567890")),
            world.editor,
        ),
    ):
        error = await refused(call, PRECONDITION)
        assert reason(error) == "ERROR_REASON_UPLOAD_EXPIRED"
    assert not (blobs.root / "staging" / upload_id).exists()
    await nothing_stored(stub, world.editor, parent)


# -- access ----------------------------------------------------------------------------------


async def test_files_follow_the_workspace_roles(stub: Stub, world: World) -> None:
    parent = world.workspace.name
    stored = await upload(stub, world.editor, parent, png(), media_type="image/png")
    denied = await refused(upload(stub, world.viewer, parent, png()), DENIED)
    assert reason(denied) == "ERROR_REASON_PERMISSION_DENIED"
    await refused(
        rpc(
            stub.StartUpload,
            pb.StartUploadRequest(
                parent=parent,
                file=pb.File(display_name="x", media_type="image/png", size_bytes=10),
            ),
            world.viewer,
        ),
        DENIED,
    )
    await refused(
        rpc(stub.DeleteFile, pb.DeleteFileRequest(name=stored.name), world.viewer), DENIED
    )
    # Someone else's workspace: as if it did not exist.
    await refused(upload(stub, world.outsider, parent, png()), NOT_FOUND)
    await refused(rpc(stub.GetFile, pb.GetFileRequest(name=stored.name), world.outsider), NOT_FOUND)
    await refused(download(stub, world.outsider, stored.name), NOT_FOUND)
    # A file name moved under another workspace is NOT_FOUND there.
    mine = await create_workspace(stub, world.outsider, "Mine")
    moved = f"{mine.name}/files/{stored.name.rsplit('/', 1)[1]}"
    await refused(rpc(stub.GetFile, pb.GetFileRequest(name=moved), world.outsider), NOT_FOUND)
    await refused(download(stub, world.outsider, moved), NOT_FOUND)
    bad = await refused(download(stub, world.viewer, stored.name, offset=-1), INVALID)
    assert violations(bad) == ["read_offset"]
    past = await refused(download(stub, world.viewer, stored.name, offset=10**6), OUT_OF_RANGE)
    assert violations(past) == ["read_offset"]


async def test_a_read_offset_past_the_end_is_out_of_range(stub: Stub, world: World) -> None:
    """AIP-193: reading from beyond the end is OUT_OF_RANGE (the request is well formed;
    the file is shorter), with its own reason so that clients tell it from a bad
    argument. At exactly the end it reads nothing: a download resumed after its last
    byte arrived, but not the stream's end, finishes with the metadata alone."""
    data = content(3000)
    stored = await upload(stub, world.editor, world.workspace.name, data)
    first, body, frames = await download(stub, world.viewer, stored.name, offset=len(data))
    assert (first, body, [frame.data for frame in frames]) == (stored, b"", [b""])
    for offset in (len(data) + 1, 10**12):
        past = download(stub, world.viewer, stored.name, offset=offset)
        error = await refused(past, OUT_OF_RANGE)
        assert reason(error) == "ERROR_REASON_OUT_OF_RANGE"
        assert violations(error) == ["read_offset"]
        info = detail(error, error_details_pb2.ErrorInfo)
        assert info.metadata["size_bytes"] == "3000"
        assert "3000" in (error.details() or "")
    # With a limit too: where it starts decides.
    await refused(download(stub, world.viewer, stored.name, offset=3001, limit=1), OUT_OF_RANGE)


async def test_a_deleted_file_is_gone_and_its_blob_collected(
    own_stub: Stub, own_world: World, own_mesh: SwitchboardServer, own_events: EventTap
) -> None:
    # Its maintenance counts what it collects in the whole blob store.
    stub, world, mesh, events = own_stub, own_world, own_mesh, own_events
    parent = world.workspace.name
    kept = await upload(stub, world.editor, parent, png(), media_type="image/png")
    twin = await upload(stub, world.editor, parent, png(), media_type="image/png")
    doomed = await upload(stub, world.editor, parent, content(5000))
    events.take()
    await rpc(stub.DeleteFile, pb.DeleteFileRequest(name=doomed.name), world.editor)
    assert file_events(events, parent) == [(events_pb2.CHANGE_KIND_DELETED, doomed.name)]
    await refused(rpc(stub.GetFile, pb.GetFileRequest(name=doomed.name), world.viewer), NOT_FOUND)
    await refused(download(stub, world.viewer, doomed.name), NOT_FOUND)
    await refused(
        rpc(stub.DeleteFile, pb.DeleteFileRequest(name=doomed.name), world.editor), NOT_FOUND
    )
    await rpc(stub.DeleteFile, pb.DeleteFileRequest(name=twin.name), world.editor)
    found = await listed(stub, world.viewer, parent)
    assert [f.name for f in found.files] == [kept.name]
    assert found.workspace_usage_bytes == kept.size_bytes

    files = built(mesh, ContextDomain).files
    blobs = files.blobs
    assert isinstance(blobs, DirectoryBlobStore)
    # A crash between publishing a blob and storing its row leaves an orphan.
    writer = blobs.open_writer()
    await writer.write(b"orphaned by a crash")
    crashed = await writer.publish(sha(b"orphaned by a crash"))
    old = time.time() - 2 * files.file_limits.orphan_grace_s
    for digest in (kept.sha256, doomed.sha256, crashed.sha256):
        os.utime(blobs.path(digest), (old, old))
    assert await files.maintain_once() == 2
    assert blobs.path(kept.sha256).exists()  # the twin's delete left the live file's blob
    assert not blobs.path(doomed.sha256).exists()
    assert not blobs.path(crashed.sha256).exists()
    _, body, _ = await download(stub, world.viewer, kept.name)
    assert body == png()


# -- audio -------------------------------------------------------------------------------------


def wav(samples: int = 800) -> bytes:
    """A mono 8 kHz 16-bit PCM WAV of silence."""
    data = b"\x00\x00" * samples
    fmt = struct.pack("<HHIIHH", 1, 1, 8000, 16000, 2, 16)
    return (
        b"RIFF"
        + struct.pack("<I", 36 + len(data))
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data"
        + struct.pack("<I", len(data))
        + data
    )


class Scripted:
    """A transcriber that answers what it is told to (a test double for the port)."""

    def __init__(self, answer: str = "", *, fail: str = "", hold: bool = False) -> None:
        self.answer = answer
        self.fail = fail
        self.release = asyncio.Event()
        if not hold:
            self.release.set()
        self.heard: list[tuple[int, str, str]] = []

    async def transcribe(self, data: bytes, *, media_type: str, filename: str) -> str:
        self.heard.append((len(data), media_type, filename))
        await self.release.wait()
        if self.fail:
            raise RuntimeError(self.fail)
        return self.answer


def text_settled(name: str) -> Callable[[events_pb2.Event], bool]:
    def wanted(event: events_pb2.Event) -> bool:
        return (
            event.type == FILE_CHANGED
            and event.file_changed.change == events_pb2.CHANGE_KIND_UPDATED
            and event.file_changed.file.name == name
        )

    return wanted


async def settle(mesh: SwitchboardServer, name: str, transcriber: Scripted) -> pb.File:
    """Let ``transcriber`` answer; the file as its UPDATED event shows it."""
    async with awaiting_event(mesh, text_settled(name)) as settled:
        transcriber.release.set()
        event = await asyncio.wait_for(settled, CALL_DEADLINE_S)
    assert event.actor.name == "system"
    return event.file_changed.file


async def test_audio_is_transcribed_in_the_background(
    own_world: World, own_mesh: SwitchboardServer, tmp_path: Path
) -> None:
    # Its files' maintenance runs over the whole database.
    world, mesh = own_world, own_mesh
    domain = built(mesh, ContextDomain)
    parent = world.workspace.name

    def files_with(transcriber: Scripted, directory: str) -> Files:
        return Files(
            domain.files.common,
            FileStore(mesh.shared.database),
            DirectoryBlobStore(tmp_path / directory),
            limits=FileLimits(max_transcribe_bytes=100_000),
            transcriber=transcriber,
        )

    async def store(files: Files, data: bytes = b"") -> pb.File:
        return await files.store_bytes(
            world.editor.name,
            parent,
            display_name="memo.wav",
            media_type="audio/wav",
            data=data or wav(),
        )

    speech = Scripted("hello from the recording", hold=True)
    files = files_with(speech, "a")
    try:
        stored = await store(files)
        assert (stored.kind, stored.media_type) == (pb.FILE_KIND_AUDIO, "audio/x-wav")
        assert stored.text_state == pb.FILE_TEXT_STATE_PENDING
        assert await files.texts([stored.name]) == {}
        ready = await settle(mesh, stored.name, speech)
        assert ready.text_state == pb.FILE_TEXT_STATE_READY
        assert speech.heard == [(len(wav()), "audio/x-wav", "memo.wav")]
        assert await files.texts([stored.name]) == {
            stored.name: ("hello from the recording", ready.text_token_count)
        }
        too_long = Scripted("never", hold=True)
        long_files = files_with(too_long, "a")
        stored = await store(long_files, wav(60_000))
        failed = await settle(mesh, stored.name, too_long)
        assert failed.text_state == pb.FILE_TEXT_STATE_FAILED
        assert failed.text_error == "the audio is larger than 100000 bytes to transcribe"
        assert too_long.heard == []
    finally:
        await files.close()

    broken = Scripted(fail="endpoint said 503", hold=True)
    files = files_with(broken, "b")
    try:
        stored = await store(files)
        failed = await settle(mesh, stored.name, broken)
        assert failed.text_state == pb.FILE_TEXT_STATE_FAILED
        assert failed.text_error == "transcription failed: endpoint said 503"
    finally:
        await files.close()

    # A crash mid-transcription: the file stays PENDING, and is picked up at start.
    stuck = Scripted("lost", hold=True)
    files = files_with(stuck, "c")
    stored = await store(files)
    await files.close()
    later = Scripted("picked up after a restart", hold=True)
    files = files_with(later, "c")
    try:
        await files.start(maintain=True)
        ready = await settle(mesh, stored.name, later)
        assert ready.text_state == pb.FILE_TEXT_STATE_READY
        assert (await files.texts([stored.name]))[stored.name][0] == "picked up after a restart"
    finally:
        await files.close()


async def test_an_upload_started_on_a_replica_that_dies_finishes_on_another(
    database_url: str, tmp_path: Path
) -> None:
    """Two replicas share the database and the files directory: the committed size is
    the database's, the staged bytes the directory's, so the second continues the first's
    upload, and no half-written blob is ever served."""
    key_file = tmp_path / "k1.pem"
    key_file.write_bytes(private_key_pem(SigningKey.generate("k1")))
    common = {
        "database_url": database_url,
        "context_files_dir": str(tmp_path / "shared-files"),
        # Both replicas accept the same tokens.
        "signing_keys": (str(key_file),),
    }
    data = content(2 * MiB + 77)
    first, _ = await create_server(make_settings(**common))
    await first.start()
    try:
        async with aio.insecure_channel(first.address) as channel:
            stub_a = context_stub(channel)
            world = await ctx_world(first, stub_a)
            started = await rpc(
                stub_a.StartUpload,
                pb.StartUploadRequest(
                    parent=world.workspace.name,
                    file=pb.File(
                        display_name="r.bin",
                        media_type="application/octet-stream",
                        size_bytes=len(data),
                    ),
                ),
                world.editor,
            )
            name = started.upload.name
            await rpc(
                stub_a.AppendUpload,
                pb.AppendUploadRequest(name=name, offset=0, data=data[:MiB]),
                world.editor,
            )
    finally:
        await first.shutdown(grace=0)
    async with limited_mesh(**common) as (_second, stub_b):
        where = await rpc(stub_b.GetUpload, pb.GetUploadRequest(name=name), world.editor)
        assert where.upload.committed_size == MiB
        for offset in range(MiB, len(data), MiB):
            await rpc(
                stub_b.AppendUpload,
                pb.AppendUploadRequest(name=name, offset=offset, data=data[offset : offset + MiB]),
                world.editor,
            )
        await nothing_stored(stub_b, world.editor, world.workspace.name)
        finished = await rpc(
            stub_b.FinishUpload, pb.FinishUploadRequest(name=name, sha256=sha(data)), world.editor
        )
        _, body, _ = await download(stub_b, world.viewer, finished.file.name)
        assert body == data
