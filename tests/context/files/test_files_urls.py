"""A message's file part that names a URL the server cannot fetch is the caller's
input, not our outage: INVALID_ARGUMENT naming the part and why (``fetch_error``),
over AppendMessage, SendMessage and A2A (InvalidParams, on the A2A part's field),
with nothing stored. And a part's bytes without a media type are stored as the type
the server detects in them, as an upload declared application/octet-stream is.
(The fetcher itself, against a local server: tests/context/files/test_file_fetch.py.)"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from a2a.types import a2a_pb2 as a2a
from google.rpc import error_details_pb2
from grpc import aio

from switchboard.api.context.v1 import context_pb2 as cpb
from tests.a2a.test_a2a import Agent, request, running_agent
from tests.a2a.test_a2a import stub as a2a_stub
from tests.conftest import CALL_DEADLINE_S
from tests.context.files.test_files_runs import (
    append,
    asking,
    at,
    files_of,
    mesh,
    nothing_stored,
    text,
)
from tests.infra.httprecorder import Recorder, recording
from tests.infra.httprecorder import Reply as HttpReply
from tests.kits.authkit import error_infos
from tests.kits.contextkit import refused, rpc, violations
from tests.kits.dispatchkit import send
from tests.kits.filekit import pdf, png

pytestmark = pytest.mark.service

INVALID = grpc.StatusCode.INVALID_ARGUMENT
UNRESOLVABLE = "https://no-such-host.invalid/chart.png"


@pytest.fixture
def server() -> Iterator[Recorder]:
    with recording() as recorder:
        yield recorder


@pytest.fixture
async def agent() -> AsyncIterator[Agent]:
    async with running_agent() as running:
        yield running


def infos(error: aio.AioRpcError) -> dict[str, error_details_pb2.ErrorInfo]:
    """The status's ErrorInfo details by domain (ours, and A2A's where it has one)."""
    return {info.domain: info for info in error_infos(error)}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.asyncio
async def test_a_url_that_cannot_be_fetched_is_the_callers_input(
    database_url: str, server: Recorder
) -> None:
    server.routes["/gone.png"] = HttpReply(404)
    server.routes["/down.png"] = HttpReply(503)
    cases = [
        (UNRESOLVABLE, "no_such_host", "'no-such-host.invalid' could not be resolved"),
        (f"http://127.0.0.1:{free_port()}/a.png", "connect_failed", "connection"),
        (server.url("/gone.png"), "http_status", "answered HTTP 404"),
        (server.url("/down.png"), "http_status", "answered HTTP 503"),
    ]
    async with mesh(database_url, egress_allow_loopback=True) as (
        _,
        stub,
        dstub,
        world,
        conversation,
    ):
        for url, kind, why in cases:
            error = await refused(
                append(stub, world.editor, conversation, text("look"), at(url)), INVALID
            )
            assert violations(error) == ["message.parts[1].file.uri"], url
            assert why in (error.details() or ""), (url, error.details())
            ours = infos(error)["switchboard.dev"]
            assert ours.reason == "ERROR_REASON_INVALID_ARGUMENT"
            assert ours.metadata["fetch_error"] == kind
        # SendMessage appends through the same path: the run is never started.
        error = await refused(
            send(dstub, world.editor, asking(conversation, text("look"), at(UNRESOLVABLE))),
            INVALID,
        )
        assert violations(error) == ["message.parts[1].file.uri"]
        await nothing_stored(stub, world, conversation)


@pytest.mark.asyncio
async def test_bytes_without_a_media_type_are_stored_as_detected(database_url: str) -> None:
    async with mesh(database_url) as (_, stub, _dstub, world, conversation):
        message = await append(
            stub,
            world.editor,
            conversation,
            cpb.ContentPart(file=cpb.FileReference(inline_data=png(), display_name="dot")),
            cpb.ContentPart(file=cpb.FileReference(inline_data=pdf(), display_name="r")),
        )
        assert [p.file.mime_type for p in message.parts] == ["image/png", "application/pdf"]
        stored = await files_of(stub, world.viewer, world.workspace.name)
        assert {f.kind for f in stored} == {cpb.FILE_KIND_IMAGE, cpb.FILE_KIND_DOCUMENT}
        # An upload still declares its type; the refusal says how to have it detected.
        error = await refused(
            rpc(
                stub.StartUpload,
                cpb.StartUploadRequest(
                    parent=world.workspace.name,
                    file=cpb.File(display_name="x", size_bytes=3),
                ),
                world.editor,
            ),
            INVALID,
        )
        assert violations(error) == ["file.media_type"]
        assert "application/octet-stream" in (error.details() or "")


@pytest.mark.asyncio
async def test_an_a2a_url_part_that_cannot_be_fetched_is_invalid_params(agent: Agent) -> None:
    sent = request("what is in this chart?", agent.tenant)
    sent.message.parts.append(a2a.Part(url=UNRESOLVABLE, filename="chart.png"))
    async with aio.insecure_channel(agent.server.address) as channel:
        error = await refused(
            a2a_stub(channel).SendMessage(
                sent, metadata=agent.world.editor.md, timeout=CALL_DEADLINE_S
            ),
            INVALID,
        )
    found = infos(error)
    assert found["a2a-protocol.org"].reason == "INVALID_PARAMS"
    assert found["switchboard.dev"].metadata["fetch_error"] == "no_such_host"
    # Named as the A2A request names it: the message's second part's url.
    assert violations(error) == ["message.parts[1].url"]
    assert "'no-such-host.invalid' could not be resolved" in (error.details() or "")
    # And a raw part without a media type is taken, its type detected.
    sent = request("and this one?", agent.tenant)
    sent.message.parts.append(a2a.Part(raw=png(), filename="dot.png"))
    answered, stored = await agent.send_stored(sent)
    assert answered.task.status.state == a2a.TASK_STATE_COMPLETED
    assert stored.message.parts[1].file.mime_type == "image/png"
