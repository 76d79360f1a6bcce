"""ExportMyData end to end (issue 83, docs/privacy.md): the archive holds the account, the
memberships, the messages the person wrote and the answers to their runs, their memory,
their usage and their uploads, and only theirs; it is theirs alone to read; the limits
(per day, size) and the expiry hold."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import zipfile
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc import aio

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as dpb
from switchboard.context.domain import ContextDomain
from switchboard.platform.rpc.server import SwitchboardServer
from tests.conftest import CALL_DEADLINE_S, built, make_settings, started
from tests.kits.contextkit import (
    Caller,
    Chat,
    add_member,
    append,
    context_stub,
    create_conversation,
    create_workspace,
    refused,
    remember,
)
from tests.kits.dispatchkit import dispatcher_stub, eventually, finished, request
from tests.kits.privacykit import person, stores_fixture, stores_settings_fixture
from tests.kits.storesearch import new_marker
from tests.privacy.test_storesearch import upload_text

pytestmark = [pytest.mark.service, pytest.mark.asyncio]

stores_settings, stores = stores_settings_fixture, stores_fixture


@pytest.fixture
async def served(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[SwitchboardServer, aio.Channel]]:
    overrides: dict[str, Any] = getattr(request, "param", {})
    async with (
        started(make_settings(**overrides)) as server,
        aio.insecure_channel(server.address) as channel,
    ):
        yield server, channel


async def exported(stub: Any, caller: Caller, request_id: str = "") -> pb.DataExport:
    response = await stub.ExportMyData(
        pb.ExportMyDataRequest(request_id=request_id), metadata=caller.md, timeout=CALL_DEADLINE_S
    )
    export: pb.DataExport = response.export
    return export


async def settled(stub: Any, caller: Caller, name: str) -> pb.DataExport:
    """The export once it is no longer running (polled: it is a stored state)."""
    async with asyncio.timeout(CALL_DEADLINE_S):
        while True:
            found = await stub.GetDataExport(
                pb.GetDataExportRequest(name=name), metadata=caller.md, timeout=CALL_DEADLINE_S
            )
            if found.export.state != pb.DATA_EXPORT_STATE_RUNNING:
                export: pb.DataExport = found.export
                return export
            await asyncio.sleep(0.05)  # polling a stored state, under a deadline


async def download(stub: Any, caller: Caller, name: str) -> tuple[pb.File, bytes]:
    frames = stub.DownloadFile(
        pb.DownloadFileRequest(name=name), metadata=caller.md, timeout=CALL_DEADLINE_S
    )
    first: pb.File | None = None
    data = bytearray()
    async for frame in frames:
        if frame.HasField("file"):
            first = frame.file
        data += frame.data
    assert first is not None
    return first, bytes(data)


async def test_an_export_holds_the_persons_data_and_only_theirs(
    stores: tuple[SwitchboardServer, aio.Channel],
) -> None:
    """On the embedded default and on the scaled-out stores (the archive in S3)."""
    server, channel = stores
    stub, dispatch = context_stub(channel), dispatcher_stub(channel)
    erin, olga = await person(server), await person(server)
    mark, other = new_marker(), new_marker()
    shared = await create_workspace(stub, olga.caller, "Shared", workspace_id=f"x-{mark[:12]}")
    await add_member(stub, olga.caller, shared.name, erin.caller, pb.WORKSPACE_ROLE_EDITOR)
    talk = await create_conversation(stub, olga.caller, shared.name, "talk")
    await append(stub, olga.caller, talk.name, f"olga says {other}")
    sent = await dispatch.SendMessage(
        request(talk.name, f"erin says {mark}", handler="handlers/echo"),
        metadata=erin.caller.md,
        timeout=CALL_DEADLINE_S,
    )
    run = await finished(dispatch, erin.caller, sent.run.name)
    assert run.state == dpb.RUN_STATE_SUCCEEDED
    await remember(stub, erin.caller, erin.caller.name, f"erin likes {mark}")
    data = f"notes {mark}\n".encode()
    uploaded = await upload_text(Chat(stub, erin.caller, shared.name, talk.name), data)

    started_export = await exported(stub, erin.caller, request_id="first")
    assert started_export.name.startswith(f"users/{erin.caller.id}/exports/")
    # A retry returns the same export.
    assert (await exported(stub, erin.caller, request_id="first")).name == started_export.name
    done = await settled(stub, erin.caller, started_export.name)
    assert done.state == pb.DATA_EXPORT_STATE_SUCCEEDED, done.error
    assert done.media_type == "application/zip"
    assert done.expire_time.ToSeconds() > done.done_time.ToSeconds()

    # Theirs alone: another person gets NOT_FOUND, for the export and its archive.
    await refused(
        stub.GetDataExport(
            pb.GetDataExportRequest(name=done.name),
            metadata=olga.caller.md,
            timeout=CALL_DEADLINE_S,
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    await refused(download(stub, olga.caller, done.name), grpc.StatusCode.NOT_FOUND)

    file, archive = await download(stub, erin.caller, done.name)
    assert (file.name, file.media_type, file.size_bytes) == (
        done.name,
        "application/zip",
        len(archive),
    )
    assert hashlib.sha256(archive).hexdigest() == done.sha256 == file.sha256
    with zipfile.ZipFile(io.BytesIO(archive)) as opened:
        names = opened.namelist()
        account = json.loads(opened.read("account.json"))
        memberships = json.loads(opened.read("memberships.json"))
        conversations = [n for n in names if n.startswith("conversations/")]
        said = "".join(opened.read(n).decode() for n in conversations)
        memory = json.loads(opened.read("memory.json"))
        usage = json.loads(opened.read("usage.json"))
        files = [n for n in names if n.startswith("files/")]
        assert "README.txt" in names
        assert [opened.read(n) for n in files] == [data]
    assert account["email"] == erin.email
    assert account["name"] == erin.caller.name
    assert [m["workspace"] for m in memberships] == [shared.name]
    assert conversations == [
        f"conversations/{talk.name.split('/')[1]}/{talk.name.split('/')[3]}.json"
    ]
    assert f"erin says {mark}" in said  # what she wrote, and the echo's answer to her run
    assert said.count(mark) == 2
    assert other not in said  # Olga's words are hers
    assert [m["content"] for m in memory] == [f"erin likes {mark}"]
    assert [u["run"] for u in usage] == [run.name]
    assert files == [f"files/{shared.name.split('/')[1]}/{uploaded.name.split('/')[-1]}-notes.txt"]

    # Downloads resume from an offset, as a file's do.
    frames = stub.DownloadFile(
        pb.DownloadFileRequest(name=done.name, read_offset=10),
        metadata=erin.caller.md,
        timeout=CALL_DEADLINE_S,
    )
    tail = b"".join([frame.data async for frame in frames])
    assert tail == archive[10:]


@pytest.mark.parametrize(
    "served", [{"context_exports_per_day": 2, "context_export_max_bytes": 4000}], indirect=True
)
async def test_exports_are_limited_per_day_and_in_size(
    served: tuple[SwitchboardServer, aio.Channel],
) -> None:
    server, channel = served
    stub = context_stub(channel)
    erin = await person(server)
    first = await settled(stub, erin.caller, (await exported(stub, erin.caller)).name)
    assert first.state == pb.DATA_EXPORT_STATE_SUCCEEDED
    workspace = await create_workspace(
        stub, erin.caller, "Big", workspace_id=f"b-{new_marker()[:12]}"
    )
    talk = await create_conversation(stub, erin.caller, workspace.name, "long")
    # Words that do not compress, past the 4000 bytes an archive may have.
    for i in range(4):
        await append(
            stub, erin.caller, talk.name, " ".join(new_marker() for _ in range(60)) + str(i)
        )
    second = await settled(stub, erin.caller, (await exported(stub, erin.caller)).name)
    assert second.state == pb.DATA_EXPORT_STATE_FAILED
    assert second.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "SWITCHBOARD_CONTEXT_EXPORT_MAX_BYTES" in second.error.message
    await refused(download(stub, erin.caller, second.name), grpc.StatusCode.FAILED_PRECONDITION)
    error = await refused(exported(stub, erin.caller), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "at most 2 data exports a day" in (error.details() or "")


@pytest.mark.parametrize("served", [{"context_export_ttl_s": 1}], indirect=True)
async def test_an_expired_export_is_gone_with_its_bytes(
    served: tuple[SwitchboardServer, aio.Channel],
) -> None:
    server, channel = served
    stub = context_stub(channel)
    erin = await person(server)
    done = await settled(stub, erin.caller, (await exported(stub, erin.caller)).name)
    assert done.state == pb.DATA_EXPORT_STATE_SUCCEEDED
    exports = built(server, ContextDomain).exports
    blobs = built(server, ContextDomain).files.blobs
    assert await blobs.exists(done.sha256)

    async def expired() -> bool:
        return await exports.expire() > 0

    await eventually(expired, "the export expired")
    assert not await blobs.exists(done.sha256)
    error = await refused(download(stub, erin.caller, done.name), grpc.StatusCode.NOT_FOUND)
    assert "expired" in (error.details() or "")
