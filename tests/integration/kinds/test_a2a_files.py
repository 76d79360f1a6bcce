"""A user's files reach an A2A agent that answers the run: the agent built with the
official SDK's server side (tests/e2e/a2aagent.py) as a real process, over gRPC and
JSON-RPC, records every file part it received.

A file the user sent inline, uploaded or named by URL is stored with the message; the
handler sends each as an A2A file part with its media type and name: the stored bytes
while they fit the bound on one message (``MAX_SENT_FILE_BYTES``), else the URL the
file was fetched from, else a line of text saying that it was not sent.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.integration.v1 import integration_pb2 as ipb
from switchboard.integration.kinds.a2a import MAX_SENT_FILE_BYTES
from switchboard.platform.rpc.server import SwitchboardServer
from tests.conftest import CALL_DEADLINE_S
from tests.context.files.test_files_runs import asking, at, inline, named, text
from tests.e2e.a2aproc import A2AAgentProcess
from tests.e2e.expertkit import istub_fixture, served_fixture, until_listed, world_fixture
from tests.infra.httprecorder import Recorder, recording
from tests.infra.httprecorder import Reply as HttpReply
from tests.kits.contextkit import Caller, World, create_conversation
from tests.kits.contextkit import Stub as CStub
from tests.kits.dispatchkit import Stub as DStub
from tests.kits.dispatchkit import send, watch_all
from tests.kits.integrationkit import Stub as IStub
from tests.kits.integrationkit import create

pytestmark = pytest.mark.e2e

TOKEN = "a2a-agent-token-0123456789"
#: A file that would fit alone but not after the small ones: sent some other way.
LARGE = MAX_SENT_FILE_BYTES - 16
CHUNK_BYTES = 1 << 20

served, istub, world = served_fixture, istub_fixture, world_fixture


@pytest.fixture
def agent() -> Iterator[A2AAgentProcess]:
    with A2AAgentProcess(token=TOKEN) as process:
        yield process


@pytest.fixture
def web() -> Iterator[Recorder]:
    with recording() as recorder:
        yield recorder


async def _handler(istub: IStub, dstub: DStub, world: World, card_url: str, name: str) -> str:
    integration = ipb.Integration(
        kind=ipb.INTEGRATION_KIND_A2A_AGENT,
        endpoint=card_url,
        display_name="A2A agent",
        credential=TOKEN,
    )
    await create(istub, world.owner, world.name, integration, integration_id=name)
    handler = f"handlers/{name}"
    await until_listed(dstub, world, handler, available=True)
    return handler


async def _upload(
    stub: CStub, caller: Caller, parent: str, data: bytes, media_type: str, display_name: str
) -> cpb.File:
    """UploadFile in chunks of the most one frame may carry."""

    async def frames() -> AsyncIterator[cpb.UploadFileRequest]:
        header = cpb.File(display_name=display_name, media_type=media_type, size_bytes=len(data))
        yield cpb.UploadFileRequest(header=cpb.UploadFileHeader(parent=parent, file=header))
        for start in range(0, len(data), CHUNK_BYTES):
            yield cpb.UploadFileRequest(chunk=data[start : start + CHUNK_BYTES])
        yield cpb.UploadFileRequest(sha256=hashlib.sha256(data).hexdigest())

    response = await stub.UploadFile(frames(), metadata=caller.md, timeout=CALL_DEADLINE_S)
    return response.file


def _received(agent: A2AAgentProcess) -> list[dict[str, Any]]:
    return [json.loads(line[len("file ") :]) for line in agent.lines() if line.startswith("file ")]


def _bytes(stored: cpb.FileReference, data: bytes) -> dict[str, Any]:
    return {
        "filename": stored.display_name,
        "media_type": stored.mime_type,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


async def test_the_users_files_reach_the_agent_as_file_parts(
    served: tuple[SwitchboardServer, CStub, DStub],
    istub: IStub,
    world: World,
    agent: A2AAgentProcess,
    web: Recorder,
) -> None:
    _, cstub, dstub = served
    conversation = (await create_conversation(cstub, world.editor, world.name)).name
    handler = await _handler(istub, dstub, world, agent.card_url, "reader")
    notes = b"Milk, eggs, flour.\n"
    figures = b"month,revenue\njan,10\nfeb,12\n"
    uploaded = await _upload(cstub, world.editor, world.name, figures, "text/csv", "figures.csv")
    big = bytes(LARGE)
    too_large = await _upload(cstub, world.editor, world.name, big, "application/zstd", "big.zst")
    web.routes["/scans/page.txt"] = HttpReply(200, {"content-type": "text/plain"}, b"p" * LARGE)
    url = web.url("/scans/page.txt")

    message = asking(
        conversation,
        text("read these"),
        inline(notes, "text/plain", "notes.txt"),
        named(uploaded.name),
        at(url),
        named(too_large.name),
    )
    message.handler = handler
    sent = await send(dstub, world.editor, message)
    seen = await watch_all(dstub, world.editor, sent.run.name)
    assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error.message

    stored = [part.file for part in sent.message.parts if part.WhichOneof("part") == "file"]
    assert [f.display_name for f in stored] == ["notes.txt", "figures.csv", "page.txt", "big.zst"]
    assert _received(agent) == [
        # The stored bytes, with the stored file's type and name.
        _bytes(stored[0], notes),
        _bytes(stored[1], figures),
        # No room left for its bytes: the URL it was fetched from.
        {"filename": "page.txt", "media_type": "text/plain", "url": url},
    ]
    # Neither fits nor has a URL: the agent reads that it was there.
    assert seen.text.startswith("you said read these\n[file big.zst (application/zstd, ")
    assert f"{LARGE:,} bytes): not sent, larger than the " in seen.text


async def test_a_file_reaches_an_agent_over_json_rpc(
    served: tuple[SwitchboardServer, CStub, DStub], istub: IStub, world: World
) -> None:
    _, cstub, dstub = served
    photo = bytes(range(256)) * 4
    with A2AAgentProcess(token=TOKEN, jsonrpc_only=True) as agent:
        conversation = (await create_conversation(cstub, world.editor, world.name)).name
        handler = await _handler(istub, dstub, world, agent.card_url, "jsonrpc-reader")
        message = asking(conversation, inline(photo, "application/octet-stream", "blob.bin"))
        message.handler = handler
        sent = await send(dstub, world.editor, message)
        seen = await watch_all(dstub, world.editor, sent.run.name)
        assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error.message
        [stored] = [part.file for part in sent.message.parts]
        # A message of a file alone: no empty text part went with it.
        assert seen.text == "you said "
        assert _received(agent) == [_bytes(stored, photo)]
