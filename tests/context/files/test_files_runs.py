"""Files in messages and runs, through the real mesh on SQLite and PostgreSQL: a part
names a stored file, stores inline bytes or fetches a URL through the egress policy;
bad parts are refused with nothing stored; the window shows a document's text (cut
to fit with a note); the local model server reads the PDF's text, and sees an image
as an image_url part for a vision model or a note (or a refusal) for another."""

from __future__ import annotations

import base64
import hashlib
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.rpc import error_details_pb2
from grpc import aio

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.context.domain import ContextDomain
from switchboard.context.files.catalog import FileLimits, Files
from switchboard.context.files.store import FileStore
from switchboard.dispatcher.ports.context import RemoteContext
from switchboard.platform.errors import NotFound, RequestTooLarge
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.security.policy import AuthMethod, Principal, Scope
from tests.conftest import CALL_DEADLINE_S, built, make_settings, started
from tests.context.files.test_files import Scripted, settle, wav
from tests.fakes.openai_server import FakeOpenAI, Reply, images_of
from tests.infra.httprecorder import Recorder, recording
from tests.infra.httprecorder import Reply as HttpReply
from tests.kits.authkit import detail, reason
from tests.kits.contextkit import (
    Caller,
    Stub,
    World,
    all_messages,
    context_stub,
    create_conversation,
    create_workspace,
    ctx_world,
    refused,
    rpc,
    violations,
)
from tests.kits.dispatchkit import Stub as DStub
from tests.kits.dispatchkit import dispatcher_stub, limited, reason_of, send, watch_all
from tests.kits.filekit import pdf, png
from tests.kits.modulekit import module_database_url_fixture

# The tests of the default settings share one server per backend (starting one per test
# was most of their time), each in a workspace and conversation of its own; a test of
# other settings, or one that closes the server's blob store, starts its own.
pytestmark = [pytest.mark.service, pytest.mark.asyncio(loop_scope="module")]

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
REPORT = "Quarterly revenue grew by 12 percent"


@pytest.fixture
def server() -> Iterator[Recorder]:
    with recording() as recorder:
        yield recorder


#: A started server, and its context and dispatcher stubs.
Served = tuple[SwitchboardServer, Stub, DStub]

module_database_url = module_database_url_fixture


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def module_mesh(module_database_url: str) -> AsyncIterator[Served]:
    """The module's server, of the default settings."""
    async with (
        started(make_settings(database_url=module_database_url)) as server,
        aio.insecure_channel(server.address) as channel,
    ):
        yield server, context_stub(channel), dispatcher_stub(channel)


@asynccontextmanager
async def mesh(
    database_url: str, **overrides: Any
) -> AsyncIterator[tuple[SwitchboardServer, Stub, DStub, World, str]]:
    """A mesh with these settings, a workspace world and a conversation in it."""
    async with (
        limited(database_url=database_url, **overrides) as served,
        within(served) as found,
    ):
        yield found


@asynccontextmanager
async def within(
    served: Served,
) -> AsyncIterator[tuple[SwitchboardServer, Stub, DStub, World, str]]:
    """``served``, with a workspace world of its own and a conversation in it."""
    server, stub, dstub = served
    world = await ctx_world(server, stub)
    conversation = (await create_conversation(stub, world.editor, world.workspace.name)).name
    yield server, stub, dstub, world, conversation


async def upload(
    stub: Stub, caller: Caller, parent: str, data: bytes, media_type: str, display_name: str
) -> cpb.File:
    async def frames() -> AsyncIterator[cpb.UploadFileRequest]:
        yield cpb.UploadFileRequest(
            header=cpb.UploadFileHeader(
                parent=parent,
                file=cpb.File(
                    display_name=display_name, media_type=media_type, size_bytes=len(data)
                ),
            )
        )
        yield cpb.UploadFileRequest(chunk=data)
        yield cpb.UploadFileRequest(sha256=hashlib.sha256(data).hexdigest())

    response = await stub.UploadFile(frames(), metadata=caller.md, timeout=CALL_DEADLINE_S)
    return response.file


def asking(conversation: str, *parts: cpb.ContentPart) -> pb.SendMessageRequest:
    return pb.SendMessageRequest(
        conversation=conversation,
        message=cpb.Message(role=cpb.MESSAGE_ROLE_USER, parts=list(parts)),
    )


def text(value: str) -> cpb.ContentPart:
    return cpb.ContentPart(text=value)


def named(file: str) -> cpb.ContentPart:
    return cpb.ContentPart(file=cpb.FileReference(file=file))


def inline(data: bytes, mime_type: str, display_name: str) -> cpb.ContentPart:
    return cpb.ContentPart(
        file=cpb.FileReference(inline_data=data, mime_type=mime_type, display_name=display_name)
    )


def at(uri: str) -> cpb.ContentPart:
    return cpb.ContentPart(file=cpb.FileReference(uri=uri))


async def append(
    stub: Stub, caller: Caller, conversation: str, *parts: cpb.ContentPart
) -> cpb.Message:
    response = await rpc(
        stub.AppendMessage,
        cpb.AppendMessageRequest(
            parent=conversation,
            message=cpb.Message(role=cpb.MESSAGE_ROLE_USER, parts=list(parts)),
        ),
        caller,
    )
    return response.message


async def files_of(stub: Stub, caller: Caller, workspace: str) -> list[cpb.File]:
    response = await rpc(
        stub.ListFiles, cpb.ListFilesRequest(parent=workspace, page_size=100), caller
    )
    return list(response.files)


async def nothing_stored(stub: Stub, world: World, conversation: str) -> None:
    assert await all_messages(stub, world.viewer, conversation) == []
    assert await files_of(stub, world.viewer, world.workspace.name) == []


async def window(stub: Stub, caller: Caller, conversation: str, budget: int) -> cpb.ContextWindow:
    response = await rpc(
        stub.GetContextWindow,
        cpb.GetContextWindowRequest(conversation=conversation, token_budget=budget),
        caller,
    )
    return response.window


def error_metadata(error: aio.AioRpcError) -> dict[str, str]:
    info: error_details_pb2.ErrorInfo = detail(error, error_details_pb2.ErrorInfo)
    return dict(info.metadata)


# -- the model reads the files ---------------------------------------------------------


async def test_the_model_reads_a_stored_pdfs_text_in_the_prompt(database_url: str) -> None:
    async with FakeOpenAI() as fake:
        fake.script(Reply.text("It grew."))
        async with mesh(database_url, llm_base_url=fake.url, llm_model="m-1") as (
            _,
            stub,
            dstub,
            world,
            conversation,
        ):
            report = await upload(
                stub, world.editor, world.workspace.name, pdf(REPORT), "application/pdf", "q3.pdf"
            )
            assert report.text_state == cpb.FILE_TEXT_STATE_READY
            sent = await send(
                dstub,
                world.editor,
                asking(conversation, text("What does it say?"), named(report.name)),
            )
            seen = await watch_all(dstub, world.editor, sent.run.name)
    assert seen.final.state == pb.RUN_STATE_SUCCEEDED
    # The stored part names the file, as stored.
    part = sent.message.parts[1].file
    assert (part.file, part.mime_type, part.size_bytes, part.display_name) == (
        report.name,
        "application/pdf",
        report.size_bytes,
        "q3.pdf",
    )
    assert sent.message.token_count >= report.text_token_count
    # The model read the document's text under the file's line, in the question.
    question = fake.requests[0].body["messages"][-1]
    assert question["role"] == "user"
    head, _, rest = question["content"].partition("\n[file q3.pdf application/pdf]\n")
    assert head == "What does it say?"
    assert REPORT in rest


async def test_an_image_reaches_a_vision_model_as_its_bytes(database_url: str) -> None:
    image = png(3, 3)
    async with FakeOpenAI() as fake:
        fake.script(Reply.text("A grey square."))
        async with mesh(database_url, llm_base_url=fake.url, llm_model="v-1", llm_vision=True) as (
            _,
            stub,
            dstub,
            world,
            conversation,
        ):
            sent = await send(
                dstub,
                world.editor,
                asking(conversation, text("What is this?"), inline(image, "image/png", "dot.png")),
            )
            seen = await watch_all(dstub, world.editor, sent.run.name)
            stored = await files_of(stub, world.viewer, world.workspace.name)
    assert seen.final.state == pb.RUN_STATE_SUCCEEDED
    # The inline bytes became a file of the workspace; the message names it.
    [file] = stored
    part = sent.message.parts[1].file
    assert (part.file, part.inline_data, part.mime_type) == (file.name, b"", "image/png")
    body = fake.requests[0].body
    [(index, url)] = images_of(body)
    assert index == len(body["messages"]) - 1
    assert url == "data:image/png;base64," + base64.b64encode(image).decode()
    assert body["messages"][-1]["content"][0] == {
        "type": "text",
        "text": "What is this?\n[file dot.png image/png]",
    }


async def test_a_model_without_vision_reads_a_note(database_url: str) -> None:
    async with FakeOpenAI() as fake:
        fake.script(Reply.text("I cannot see it."))
        async with mesh(database_url, llm_base_url=fake.url, llm_model="t-1") as (
            _,
            _stub,
            dstub,
            world,
            conversation,
        ):
            sent = await send(
                dstub, world.editor, asking(conversation, inline(png(), "image/png", "dot.png"))
            )
            seen = await watch_all(dstub, world.editor, sent.run.name)
    assert seen.final.state == pb.RUN_STATE_SUCCEEDED
    body = fake.requests[0].body
    assert images_of(body) == []
    assert body["messages"][-1]["content"] == (
        "[file dot.png image/png]\n[image dot.png: this model cannot see images]"
    )


async def test_a_model_without_vision_refuses_by_setting(database_url: str) -> None:
    async with (
        FakeOpenAI() as fake,
        mesh(database_url, llm_base_url=fake.url, llm_model="t-1", llm_image_policy="refuse") as (
            _,
            _stub,
            dstub,
            world,
            conversation,
        ),
    ):
        sent = await send(
            dstub, world.editor, asking(conversation, inline(png(), "image/png", "dot.png"))
        )
        seen = await watch_all(dstub, world.editor, sent.run.name)
    run = seen.final
    assert run.state == pb.RUN_STATE_FAILED
    assert run.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert reason_of(run) == "ERROR_REASON_MODALITY_UNSUPPORTED"
    assert "cannot see images" in run.error.message
    assert fake.requests == []


# -- parts that are refused store nothing ----------------------------------------------


async def test_another_workspaces_file_is_not_found(module_mesh: Served) -> None:
    async with within(module_mesh) as (_, stub, _dstub, world, conversation):
        theirs = await create_workspace(stub, world.outsider, "Theirs")
        secret = await upload(
            stub, world.outsider, theirs.name, b"the other workspace's notes", "text/plain", "n.txt"
        )
        error = await refused(
            append(stub, world.editor, conversation, text("read this"), named(secret.name)),
            NOT_FOUND,
        )
        assert "message.parts[1].file.file" in (error.details() or "")
        await nothing_stored(stub, world, conversation)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8080/notes.txt", "http://169.254.169.254/latest/meta-data/"]
)
async def test_a_url_to_a_blocked_address_is_refused(module_mesh: Served, url: str) -> None:
    async with within(module_mesh) as (_, stub, _dstub, world, conversation):
        error = await refused(append(stub, world.editor, conversation, at(url)), INVALID)
        assert reason(error) == "ERROR_REASON_DESTINATION_BLOCKED"
        assert violations(error) == ["message.parts[0].file.uri"]
        await nothing_stored(stub, world, conversation)


async def test_files_stored_for_earlier_parts_go_when_a_later_one_fails(
    module_mesh: Served,
) -> None:
    async with within(module_mesh) as (_, stub, _dstub, world, conversation):
        error = await refused(
            append(
                stub,
                world.editor,
                conversation,
                inline(png(), "image/png", "dot.png"),
                at("http://169.254.169.254/"),
            ),
            INVALID,
        )
        assert violations(error) == ["message.parts[1].file.uri"]
        await nothing_stored(stub, world, conversation)


async def test_inline_bytes_over_the_limit_are_refused(database_url: str) -> None:
    async with mesh(database_url, context_files_max_inline_bytes=1024) as (
        _,
        stub,
        _dstub,
        world,
        conversation,
    ):
        error = await refused(
            append(stub, world.editor, conversation, inline(b"x" * 1025, "text/plain", "a.txt")),
            EXHAUSTED,
        )
        assert reason(error) == "ERROR_REASON_REQUEST_TOO_LARGE"
        await nothing_stored(stub, world, conversation)


# -- URLs fetched through the egress policy -----------------------------------------------


async def test_a_url_to_an_allowed_server_is_fetched_stored_and_named(
    database_url: str, server: Recorder
) -> None:
    server.routes["/reports/q3.pdf"] = HttpReply(
        200, {"content-type": "application/pdf"}, pdf(REPORT)
    )
    url = server.url("/reports/q3.pdf")
    async with mesh(database_url, egress_allow_loopback=True) as (
        _,
        stub,
        _dstub,
        world,
        conversation,
    ):
        message = await append(stub, world.editor, conversation, text("Summarize"), at(url))
        part = message.parts[1].file
        got = await rpc(stub.GetFile, cpb.GetFileRequest(name=part.file), world.viewer)
        shown = await window(stub, world.viewer, conversation, 2000)
    assert (part.uri, part.mime_type, part.display_name) == (url, "application/pdf", "q3.pdf")
    assert got.file.source_uri == url
    assert got.file.size_bytes == part.size_bytes == len(pdf(REPORT))
    # The window shows the fetched document's text under its line.
    [item] = shown.included
    filled = item.message.parts[1].file
    assert REPORT in filled.text
    assert item.token_count == message.token_count


async def test_a_url_body_over_the_limit_is_refused_while_it_streams(
    database_url: str, server: Recorder
) -> None:
    end = threading.Event()
    server.routes["/huge.txt"] = HttpReply(
        200, {"content-type": "text/plain"}, b"y" * 65536, chunk_bytes=4096, hold_end=end
    )
    try:
        async with mesh(
            database_url, egress_allow_loopback=True, context_files_max_inline_bytes=8192
        ) as (_, stub, _dstub, world, conversation):
            error = await refused(
                append(stub, world.editor, conversation, at(server.url("/huge.txt"))), EXHAUSTED
            )
            # Refused before the server finished the body: counted as it streamed.
            assert not end.is_set()
            assert reason(error) == "ERROR_REASON_REQUEST_TOO_LARGE"
            await nothing_stored(stub, world, conversation)
    finally:
        end.set()


# -- the window -----------------------------------------------------------------------


async def test_the_window_cuts_a_big_document_with_a_note_within_budget(
    module_mesh: Served,
) -> None:
    words = " ".join(f"finding{n} holds" for n in range(3000))
    async with within(module_mesh) as (_, stub, _dstub, world, conversation):
        document = await upload(
            stub, world.editor, world.workspace.name, words.encode(), "text/plain", "notes.txt"
        )
        await append(stub, world.editor, conversation, text("an older message"))
        message = await append(
            stub, world.editor, conversation, text("Read it"), named(document.name)
        )
        shown = await window(stub, world.viewer, conversation, 400)
    assert message.token_count > 400
    assert shown.total_tokens <= 400
    [item] = shown.included
    assert item.message.name == message.name
    assert item.token_count == shown.total_tokens
    cut = item.message.parts[1].file.text
    kept, _, note = cut.rpartition("\n")
    assert words.startswith(kept)
    assert note.startswith("[... document truncated: ")
    assert note.endswith(f"of {document.text_token_count:,} tokens shown]")
    # The older message did not fit after it (its stored count was not even needed).
    assert shown.omitted_messages + len(shown.excluded) == 1


async def test_a_transcript_ready_later_shows_in_the_window_which_waited_for_it(
    database_url: str,
) -> None:
    """A window naming a recording whose transcript is pending is served but not
    cached; once the transcript is ready the next window shows it."""
    async with mesh(database_url) as (server, stub, _dstub, world, conversation):
        domain = built(server, ContextDomain)
        speech = Scripted("the meeting moved to Thursday", hold=True)
        # The same database and blobs as the mesh's, with a transcriber.
        files = Files(
            domain.files.common,
            FileStore(server.shared.database),
            domain.files.blobs,
            limits=FileLimits(),
            transcriber=speech,
        )
        try:
            memo = await files.store_bytes(
                world.editor.name,
                world.workspace.name,
                display_name="memo.wav",
                media_type="audio/wav",
                data=wav(),
            )
            assert memo.text_state == cpb.FILE_TEXT_STATE_PENDING
            message = await append(stub, world.editor, conversation, named(memo.name))
            cache = domain.windows.cache
            before = await window(stub, world.viewer, conversation, 2000)
            hits = cache.hits
            again = await window(stub, world.viewer, conversation, 2000)
            assert cache.hits == hits  # not cached while the transcript may come
            assert before == again
            assert before.included[0].message.parts[0].file.text == ""
            await settle(server, memo.name, speech)
            after = await window(stub, world.viewer, conversation, 2000)
        finally:
            await files.close()
    [item] = after.included
    assert item.message.name == message.name
    assert item.message.parts[0].file.text == "the meeting moved to Thursday"
    assert item.token_count > before.included[0].token_count


async def test_the_dispatcher_reads_a_file_from_a_context_service_elsewhere(
    module_mesh: Served,
) -> None:
    """The remote shape of the context port: DownloadFile as the run's user."""
    image = png(4, 4)
    async with within(module_mesh) as (server, stub, _dstub, world, _conversation):
        stored = await upload(stub, world.editor, world.workspace.name, image, "image/png", "a.png")
        remote = RemoteContext(server.address, _OwnersToken(world.owner.token))
        owner = Principal(
            user_id=world.owner.id,
            auth_method=AuthMethod.PASSWORD,
            scopes=frozenset({Scope.READ, Scope.WRITE}),
        )
        try:
            read = await remote.download(
                owner, stored.name, limit=len(image), timeout_s=CALL_DEADLINE_S
            )
            with pytest.raises(RequestTooLarge):
                await remote.download(
                    owner, stored.name, limit=len(image) - 1, timeout_s=CALL_DEADLINE_S
                )
            await rpc(stub.DeleteFile, cpb.DeleteFileRequest(name=stored.name), world.editor)
            with pytest.raises(NotFound):
                await remote.download(
                    owner, stored.name, limit=len(image), timeout_s=CALL_DEADLINE_S
                )
        finally:
            await remote.close()
    assert read == image


class _OwnersToken:
    """Issues the signed-in owner's own access token (its session is real)."""

    def __init__(self, token: str) -> None:
        self._token = token

    def issue(self, **_claims: object) -> tuple[str, int]:
        return self._token, 0
