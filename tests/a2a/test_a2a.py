"""A Switchboard assistant as an A2A agent, driven by the official ``a2a-sdk`` client over
its gRPC transport against a real server on a free loopback port (the embedded shape).

The card comes from ``GetExtendedAgentCard``; the SDK's ``ClientFactory`` builds
its client from it (the gRPC interface and the tenant it names). Then: a
blocking send answered by the built-in echo handler, a streamed send whose
chunks add up to the answer, tasks read and listed, idempotency by message id,
a cancelled slow task, a stranger and a viewer refused as on every other RPC,
malformed names answered with field violations, a dropped stream resumed exactly
(the resume extension), and a run paused for tool approval as an input-required
task that the client's next message decides (an MCP tool, the local model server).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import grpc
import pytest
from a2a.client import ClientConfig, ClientFactory
from a2a.client.auth.credentials import CredentialService
from a2a.client.auth.interceptor import AuthInterceptor
from a2a.client.client import Client, ClientCallContext
from a2a.types import a2a_pb2 as a2a
from a2a.types import a2a_pb2_grpc
from a2a.utils.errors import (
    ContentTypeNotSupportedError,
    InvalidParamsError,
    TaskNotCancelableError,
    TaskNotFoundError,
    UnsupportedOperationError,
    VersionNotSupportedError,
)
from google.protobuf import json_format, struct_pb2
from grpc import aio

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as dpb
from switchboard.platform.rpc.server import SwitchboardServer
from tests.conftest import CALL_DEADLINE_S
from tests.fakes.openai_server import FakeOpenAI
from tests.infra.mcpserver import McpTestServer
from tests.kits.authkit import reasons
from tests.kits.contextkit import Caller, World, context_stub, ctx_world, refused
from tests.kits.contextkit import violations as fields
from tests.kits.dispatchkit import careful_assistant, dispatcher_stub, script_two_echoes
from tests.kits.filekit import png
from tests.kits.integrationkit import hub_mesh, mcp_hub

pytestmark = pytest.mark.service

CODE = grpc.StatusCode
RESUME = "https://switchboard.dev/a2a/extensions/resume/v1"
AFTER = "switchboard-after-sequence"


class _Token(CredentialService):
    """The caller's credential for the card's bearer scheme (the SDK's AuthInterceptor
    puts it in the Authorization header of each call)."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def get_credentials(self, security_scheme_name: str, context: Any) -> str | None:
        return self._token if security_scheme_name == "bearer" else None


class Agent:
    """One assistant, its card, and an SDK client per caller."""

    def __init__(self, server: SwitchboardServer, world: World, card: a2a.AgentCard) -> None:
        self.server = server
        self.world = world
        self.card = card
        self.tenant = card.supported_interfaces[0].tenant

    def client(self, caller: Caller, *, streaming: bool = True) -> Client:
        config = ClientConfig(
            streaming=streaming,
            supported_protocol_bindings=["GRPC"],
            grpc_channel_factory=aio.insecure_channel,
        )
        return ClientFactory(config).create(
            self.card, interceptors=[AuthInterceptor(_Token(caller.token))]
        )

    def stub(self, channel: aio.Channel) -> Any:
        return stub(channel)

    async def send_stored(self, sent: a2a.SendMessageRequest) -> tuple[Any, cpb.GetMessageResponse]:
        """SendMessage as the world's editor: the answer, and its run's input message as
        the conversation stores it (read by the viewer)."""
        async with aio.insecure_channel(self.server.address) as channel:
            answered = await self.stub(channel).SendMessage(
                sent, metadata=self.world.editor.md, timeout=CALL_DEADLINE_S
            )
            run = await dispatcher_stub(channel).GetRun(
                dpb.GetRunRequest(name=answered.task.metadata["run"]),
                metadata=self.world.editor.md,
                timeout=CALL_DEADLINE_S,
            )
            stored = await context_stub(channel).GetMessage(
                cpb.GetMessageRequest(name=run.run.input_message),
                metadata=self.world.viewer.md,
                timeout=CALL_DEADLINE_S,
            )
        return answered, stored


def stub(channel: aio.Channel) -> Any:
    """The generated A2A stub (the SDK's generated code is untyped)."""
    return a2a_pb2_grpc.A2AServiceStub(channel)  # type: ignore[no-untyped-call]


@pytest.fixture
async def agent() -> AsyncIterator[Agent]:
    async with running_agent() as running:
        yield running


@asynccontextmanager
async def running_agent(**settings: Any) -> AsyncIterator[Agent]:
    """A mesh with a world and its echo assistant ``echoer``, as an A2A agent."""
    async with hub_mesh(**settings) as (server, channel):
        world = await ctx_world(server, context_stub(channel))
        made = await dispatcher_stub(channel).CreateAssistant(
            dpb.CreateAssistantRequest(
                parent=world.name,
                assistant_id="echoer",
                assistant=dpb.Assistant(
                    display_name="Echoer", description="Says it back.", handler="handlers/echo"
                ),
            ),
            metadata=world.owner.md,
            timeout=CALL_DEADLINE_S,
        )
        workspace_id = world.name.removeprefix("workspaces/")
        card = await stub(channel).GetExtendedAgentCard(
            a2a.GetExtendedAgentCardRequest(tenant=f"{workspace_id}.echoer"),
            metadata=world.viewer.md,
            timeout=CALL_DEADLINE_S,
        )
        assert card.name == made.assistant.display_name
        yield Agent(server, world, card)


def message(text: str, *, context_id: str = "", message_id: str = "") -> a2a.Message:
    return a2a.Message(
        message_id=message_id or str(uuid.uuid4()),
        context_id=context_id,
        role=a2a.ROLE_USER,
        parts=[a2a.Part(text=text)],
    )


def request(text: str, tenant: str, **fields: Any) -> a2a.SendMessageRequest:
    metadata = fields.pop("metadata", None)
    found = a2a.SendMessageRequest(tenant=tenant, message=message(text, **fields))
    if metadata:
        found.metadata.update(metadata)
    return found


def _nested(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


def answer_of(task: a2a.Task) -> str:
    [artifact] = task.artifacts
    return "".join(part.text for part in artifact.parts)


async def test_the_card_names_the_grpc_interface_tenant_and_bearer_scheme(agent: Agent) -> None:
    card = agent.card
    # Asked for directly (not through the edge, no SWITCHBOARD_PUBLIC_URL): the server's
    # own gRPC address only; HTTP+JSON is the edge's (tests/a2a/test_a2a_http.py).
    [interface] = card.supported_interfaces
    assert interface.protocol_binding == "GRPC"
    assert interface.url == agent.server.address
    assert interface.tenant == agent.tenant
    assert agent.tenant == agent.world.name.removeprefix("workspaces/") + ".echoer"
    assert card.capabilities.streaming
    assert card.capabilities.extended_agent_card
    assert card.capabilities.push_notifications
    # An access token or an API key, each alone enough; both are bearer credentials.
    assert set(card.security_schemes) == {"bearer", "apiKey"}
    for scheme in card.security_schemes.values():
        assert scheme.http_auth_security_scheme.scheme == "Bearer"
    assert [list(r.schemes) for r in card.security_requirements] == [["bearer"], ["apiKey"]]
    assert card.skills[0].description == "Says it back."


async def test_a_blocking_send_returns_the_completed_task_with_its_answer(agent: Agent) -> None:
    client = agent.client(agent.world.editor, streaming=False)
    try:
        [(streamed_task)] = [event async for event in _sent(client, "hello agent", streaming=False)]
    finally:
        await client.close()
    task = streamed_task
    assert task.status.state == a2a.TASK_STATE_COMPLETED
    assert answer_of(task).startswith("hello agent")
    assert [part.text for part in task.history[0].parts] == ["hello agent"]
    assert task.history[0].role == a2a.ROLE_USER
    assert task.metadata["run"].startswith(f"{agent.world.name}/conversations/")
    # The same context again: the same conversation, a new task.
    client = agent.client(agent.world.editor, streaming=False)
    try:
        [again] = [
            event
            async for event in _sent(client, "second", streaming=False, context_id=task.context_id)
        ]
    finally:
        await client.close()
    assert again.context_id == task.context_id
    assert again.id != task.id


async def _sent(client: Client, text: str, *, streaming: bool, **fields: Any) -> AsyncIterator[Any]:
    """The tasks (blocking) or stream responses (streaming) of one send."""
    async for event in client.send_message(a2a.SendMessageRequest(message=message(text, **fields))):
        yield event.task if not streaming and event.HasField("task") else event


async def test_a_streamed_send_sends_the_task_then_chunks_then_the_end(agent: Agent) -> None:
    client = agent.client(agent.world.editor)
    try:
        events = [event async for event in _sent(client, "one two three four", streaming=True)]
    finally:
        await client.close()
    kinds = [event.WhichOneof("payload") for event in events]
    assert kinds[0] == "task"
    assert events[0].task.status.state in (a2a.TASK_STATE_SUBMITTED, a2a.TASK_STATE_WORKING)
    chunks = [event.artifact_update for event in events if event.HasField("artifact_update")]
    assert chunks, kinds
    assert not chunks[0].append
    assert all(chunk.append for chunk in chunks[1:])
    assert chunks[-1].last_chunk
    assert not any(chunk.last_chunk for chunk in chunks[:-1])
    streamed = "".join(part.text for chunk in chunks for part in chunk.artifact.parts)
    assert streamed.startswith("one two three four")
    final = events[-1].status_update
    assert final.status.state == a2a.TASK_STATE_COMPLETED
    # Every streamed event says where it is in the run (the resume extension's cursor).
    sequences = [_sequence(event) for event in events[1:]]
    assert sequences == sorted(set(sequences))
    # The task as GetTask and ListTasks read it afterwards.
    async with aio.insecure_channel(agent.server.address) as channel:
        stub = agent.stub(channel)
        got = await stub.GetTask(
            a2a.GetTaskRequest(tenant=agent.tenant, id=final.task_id),
            metadata=agent.world.viewer.md,
            timeout=CALL_DEADLINE_S,
        )
        assert got.status.state == a2a.TASK_STATE_COMPLETED
        assert answer_of(got) == streamed
        listed = await stub.ListTasks(
            a2a.ListTasksRequest(tenant=agent.tenant, context_id=final.context_id),
            metadata=agent.world.viewer.md,
            timeout=CALL_DEADLINE_S,
        )
        assert [task.id for task in listed.tasks] == [final.task_id]


async def test_send_and_list_honour_history_length_modes_and_status_time(agent: Agent) -> None:
    async with aio.insecure_channel(agent.server.address) as channel:
        a2a_stub = agent.stub(channel)
        md = agent.world.editor.md
        first = request("first", agent.tenant)
        first.configuration.history_length = 0
        first.configuration.accepted_output_modes.extend(["application/json", "text/plain"])
        sent = (await a2a_stub.SendMessage(first, metadata=md, timeout=CALL_DEADLINE_S)).task
        assert sent.status.state == a2a.TASK_STATE_COMPLETED
        assert not sent.history
        assert answer_of(sent).startswith("first")
        context = sent.context_id
        second = (
            await a2a_stub.SendMessage(
                request("second", agent.tenant, context_id=context),
                metadata=md,
                timeout=CALL_DEADLINE_S,
            )
        ).task
        assert [part.text for part in second.history[0].parts] == ["second"]
        listing = a2a.ListTasksRequest(tenant=agent.tenant, context_id=context)
        every = await a2a_stub.ListTasks(listing, metadata=md, timeout=CALL_DEADLINE_S)
        assert {task.id for task in every.tasks} == {sent.id, second.id}
        assert every.total_size == 2
        # Only tasks whose status changed at or after the given time (A2A: "greater than
        # or equal").
        listing.status_timestamp_after.CopyFrom(second.status.timestamp)
        later = await a2a_stub.ListTasks(listing, metadata=md, timeout=CALL_DEADLINE_S)
        assert [task.id for task in later.tasks] == [second.id]
        assert later.total_size == 1
        after_both = second.status.timestamp.ToNanoseconds() + 1000
        listing.status_timestamp_after.FromNanoseconds(after_both)
        none = await a2a_stub.ListTasks(listing, metadata=md, timeout=CALL_DEADLINE_S)
        assert (list(none.tasks), none.total_size) == ([], 0)


async def test_a_message_id_sent_twice_is_one_task(agent: Agent) -> None:
    # A2A says nothing of a message id's form: a UUID, or a client's own longer one.
    ids = ("m-1", f"test-history-create-message-id-{uuid.uuid4()}:{'x' * 100}")
    async with aio.insecure_channel(agent.server.address) as channel:
        stub = agent.stub(channel)
        for message_id in ids:
            once = request("only once", agent.tenant, message_id=message_id)
            first = await stub.SendMessage(
                once, metadata=agent.world.editor.md, timeout=CALL_DEADLINE_S
            )
            second = await stub.SendMessage(
                once, metadata=agent.world.editor.md, timeout=CALL_DEADLINE_S
            )
            assert first.task.id == second.task.id
            assert first.task.context_id == second.task.context_id


async def test_a_file_part_is_stored_with_the_message(agent: Agent) -> None:
    """A ``raw`` part goes to the conversation as a file of the message (docs/a2a.md,
    "Files"): its type and name as given, in order with the text."""
    image = png()
    sent = request("what is this?", agent.tenant)
    sent.message.parts.append(a2a.Part(raw=image, media_type="image/png", filename="dot.png"))
    answered, stored = await agent.send_stored(sent)
    assert answered.task.status.state == a2a.TASK_STATE_COMPLETED
    text, file = stored.message.parts
    assert text.text == "what is this?"
    assert (file.file.mime_type, file.file.display_name) == ("image/png", "dot.png")
    # Stored as the workspace's file on append: the message names it, without the bytes.
    assert file.file.file.startswith(f"{agent.world.name}/files/")
    assert file.file.size_bytes == len(image)
    assert not file.file.inline_data


async def test_a_new_context_is_a_conversation_titled_by_its_first_message(
    agent: Agent,
) -> None:
    """Two conversations an A2A client started read apart in a list: each is titled by the
    text it began with (on one line, cut at a word), or by its files when it had no text."""
    long = "Please   summarise\nthe quarterly report " + "and its appendix " * 8
    files_only = a2a.SendMessageRequest(
        tenant=agent.tenant,
        message=a2a.Message(
            message_id=str(uuid.uuid4()),
            role=a2a.ROLE_USER,
            parts=[a2a.Part(raw=png(), media_type="image/png", filename="dot.png")],
        ),
    )
    titles = []
    async with aio.insecure_channel(agent.server.address) as channel:
        for sent in (
            request("What is the weather in Oslo?", agent.tenant),
            request(long, agent.tenant),
            files_only,
        ):
            answered = await agent.stub(channel).SendMessage(
                sent, metadata=agent.world.editor.md, timeout=CALL_DEADLINE_S
            )
            conversation = answered.task.metadata["run"].rsplit("/runs/", 1)[0]
            found = await context_stub(channel).GetConversation(
                cpb.GetConversationRequest(name=conversation),
                metadata=agent.world.viewer.md,
                timeout=CALL_DEADLINE_S,
            )
            titles.append(found.conversation.title)
    cut = "Please summarise the quarterly report and its appendix and its appendix and…"
    assert titles == ["What is the weather in Oslo?", cut, "Files: dot.png"]
    assert len(cut) <= 80


async def test_a_slow_task_is_cancelled(agent: Agent) -> None:
    async with aio.insecure_channel(agent.server.address) as channel:
        stub = agent.stub(channel)
        slow = request("slow words here", agent.tenant, metadata={"delay_ms": 60_000})
        slow.configuration.return_immediately = True
        sent = await stub.SendMessage(slow, metadata=agent.world.editor.md, timeout=CALL_DEADLINE_S)
        assert sent.task.status.state in (a2a.TASK_STATE_SUBMITTED, a2a.TASK_STATE_WORKING)
        await refused(
            stub.CancelTask(
                a2a.CancelTaskRequest(tenant=agent.tenant, id=sent.task.id),
                metadata=agent.world.viewer.md,
                timeout=CALL_DEADLINE_S,
            ),
            CODE.PERMISSION_DENIED,
        )
        cancelled = await stub.CancelTask(
            a2a.CancelTaskRequest(tenant=agent.tenant, id=sent.task.id),
            metadata=agent.world.editor.md,
            timeout=CALL_DEADLINE_S,
        )
    assert cancelled.status.state == a2a.TASK_STATE_CANCELED


async def test_strangers_viewers_and_malformed_names(agent: Agent) -> None:
    world = agent.world
    async with aio.insecure_channel(agent.server.address) as channel:
        stub = agent.stub(channel)
        done = await stub.SendMessage(
            request("mine", agent.tenant), metadata=world.editor.md, timeout=CALL_DEADLINE_S
        )
        task = a2a.GetTaskRequest(tenant=agent.tenant, id=done.task.id)
        # A stranger learns nothing: the task, the agent and its card are not found.
        await refused(
            stub.GetTask(task, metadata=world.outsider.md, timeout=CALL_DEADLINE_S), CODE.NOT_FOUND
        )
        await refused(
            stub.GetExtendedAgentCard(
                a2a.GetExtendedAgentCardRequest(tenant=agent.tenant),
                metadata=world.outsider.md,
                timeout=CALL_DEADLINE_S,
            ),
            CODE.NOT_FOUND,
        )
        await refused(
            stub.SendMessage(
                request("not mine", agent.tenant, context_id=done.task.context_id),
                metadata=world.outsider.md,
                timeout=CALL_DEADLINE_S,
            ),
            CODE.NOT_FOUND,
        )
        # A viewer reads but does not send.
        await refused(
            stub.SendMessage(
                request("viewer", agent.tenant), metadata=world.viewer.md, timeout=CALL_DEADLINE_S
            ),
            CODE.PERMISSION_DENIED,
        )
        # No credential at all.
        await refused(stub.GetTask(task, timeout=CALL_DEADLINE_S), CODE.UNAUTHENTICATED)
        # Malformed names and content: precise field violations.
        cases: list[tuple[Any, Any, list[str]]] = [
            (stub.GetTask, a2a.GetTaskRequest(tenant="nope", id=done.task.id), ["tenant"]),
            (stub.GetTask, a2a.GetTaskRequest(tenant=agent.tenant, id=""), ["id"]),
            (
                stub.SendMessage,
                request("x", agent.tenant, context_id="A B"),
                ["message.context_id"],
            ),
            (
                stub.SendMessage,
                request("x", agent.tenant, message_id="has\na newline"),
                ["message.message_id"],
            ),
            (
                stub.SendMessage,
                a2a.SendMessageRequest(
                    tenant=agent.tenant,
                    message=a2a.Message(
                        message_id="m-raw",
                        role=a2a.ROLE_AGENT,
                        parts=[a2a.Part(data=struct_pb2.Value(string_value="x"))],
                    ),
                ),
                ["message.role", "message.parts[0]"],
            ),
            (stub.ListTasks, a2a.ListTasksRequest(tenant=agent.tenant, page_size=0), ["page_size"]),
            # JSON values nested past 24 levels (docs/contracts.md), refused in A2A's terms.
            (stub.SendMessage, request("x", agent.tenant, metadata=_nested(30)), ["metadata"]),
            # No tenant, and this deployment names no root agent.
            (stub.ListTasks, a2a.ListTasksRequest(), ["tenant"]),
        ]
        for method, bad, expected in cases:
            error = await refused(
                method(bad, metadata=world.editor.md, timeout=CALL_DEADLINE_S),
                CODE.INVALID_ARGUMENT,
            )
            assert fields(error) == expected, bad
        deep = await refused(
            stub.SendMessage(
                request("x", agent.tenant, metadata=_nested(30)),
                metadata=world.editor.md,
                timeout=CALL_DEADLINE_S,
            ),
            CODE.INVALID_ARGUMENT,
        )
        assert reasons(deep)[0] == ("a2a-protocol.org", "INVALID_PARAMS")
        # A push config needs its url (tests/a2a/push/test_a2a_push.py has the rest).
        error = await refused(
            stub.CreateTaskPushNotificationConfig(
                a2a.TaskPushNotificationConfig(tenant=agent.tenant, task_id=done.task.id),
                metadata=world.editor.md,
                timeout=CALL_DEADLINE_S,
            ),
            CODE.INVALID_ARGUMENT,
        )
        assert fields(error) == ["url"]


async def test_the_sdk_client_gets_a2a_typed_errors(agent: Agent) -> None:
    """Each error carries A2A's ErrorInfo (domain a2a-protocol.org) next to ours, so the
    official client raises A2A's error classes, field violations included."""
    world = agent.world
    async with aio.insecure_channel(agent.server.address) as channel:
        done = await stub(channel).SendMessage(
            request("finished", agent.tenant), metadata=world.editor.md, timeout=CALL_DEADLINE_S
        )
    ended = done.task
    assert ended.status.state == a2a.TASK_STATE_COMPLETED
    editor, stranger = agent.client(world.editor), agent.client(world.outsider)
    try:
        with pytest.raises(TaskNotFoundError):
            await stranger.get_task(a2a.GetTaskRequest(id=ended.id))
        with pytest.raises(TaskNotFoundError):
            await editor.get_task(a2a.GetTaskRequest(id=f"{ended.context_id}.nosuchrun"))
        with pytest.raises(TaskNotCancelableError):
            await editor.cancel_task(a2a.CancelTaskRequest(id=ended.id))
        with pytest.raises(UnsupportedOperationError):
            async for _ in editor.subscribe(a2a.SubscribeToTaskRequest(id=ended.id)):
                pass
        # An id that is not this agent's kind names no task: not found (A2A), not invalid.
        with pytest.raises(TaskNotFoundError):
            await editor.get_task(a2a.GetTaskRequest(id="no/slashes"))
        with pytest.raises(TaskNotFoundError):
            await editor.cancel_task(a2a.CancelTaskRequest(id="nonexistent-task-id"))
        with pytest.raises(InvalidParamsError) as invalid:
            await editor.get_task(a2a.GetTaskRequest(id=ended.id, history_length=-1))
        assert [v["field"] for v in (invalid.value.data or {})["errors"]] == ["history_length"]
        # A text message on a task that ended: A2A's UNSUPPORTED_OPERATION (not a complaint
        # about its parts, which would be read only for a task waiting for input).
        again = a2a.SendMessageRequest(message=message("more", context_id=ended.context_id))
        again.message.task_id = ended.id
        with pytest.raises(UnsupportedOperationError):
            async for _ in editor.send_message(again):
                pass
        # Text and files are taken; a data part is not.
        data = a2a.Message(
            message_id="m-data",
            role=a2a.ROLE_USER,
            parts=[a2a.Part(data=struct_pb2.Value(string_value="x"))],
        )
        with pytest.raises(ContentTypeNotSupportedError):
            async for _ in editor.send_message(a2a.SendMessageRequest(message=data)):
                pass
        old = ClientCallContext(service_parameters={"A2A-Version": "0.3"})
        with pytest.raises(VersionNotSupportedError):
            await editor.get_task(a2a.GetTaskRequest(id=ended.id), context=old)
        # A push config to an address the egress policy refuses is invalid (SSRF), and a
        # send carrying one starts nothing.
        metadata_url = "http://169.254.169.254/latest/meta-data"
        with pytest.raises(InvalidParamsError) as blocked:
            await editor.create_task_push_notification_config(
                a2a.TaskPushNotificationConfig(task_id=ended.id, url=metadata_url)
            )
        assert [v["field"] for v in (blocked.value.data or {})["errors"]] == ["url"]
        pushed = a2a.SendMessageRequest(message=message("push me"))
        pushed.configuration.task_push_notification_config.url = metadata_url
        with pytest.raises(InvalidParamsError) as blocked:
            async for _ in editor.send_message(pushed):
                pass
        assert [v["field"] for v in (blocked.value.data or {})["errors"]] == [
            "configuration.task_push_notification_config.url"
        ]
        images = a2a.SendMessageRequest(message=message("a picture, please"))
        images.configuration.accepted_output_modes.append("image/png")
        with pytest.raises(ContentTypeNotSupportedError):
            async for _ in editor.send_message(images):
                pass
        current = ClientCallContext(service_parameters={"A2A-Version": "1.0"})
        got = await editor.get_task(a2a.GetTaskRequest(id=ended.id), context=current)
        assert got.status.state == a2a.TASK_STATE_COMPLETED
    finally:
        await editor.close()
        await stranger.close()
    # Switchboard's own clients still read Switchboard's reason from the same status.
    async with aio.insecure_channel(agent.server.address) as channel:
        error = await refused(
            stub(channel).GetTask(
                a2a.GetTaskRequest(tenant=agent.tenant, id=ended.id),
                metadata=world.outsider.md,
                timeout=CALL_DEADLINE_S,
            ),
            CODE.NOT_FOUND,
        )
    assert reasons(error) == [
        ("a2a-protocol.org", "TASK_NOT_FOUND"),
        ("switchboard.dev", "ERROR_REASON_NOT_FOUND"),
    ]


def _cursor(event: a2a.StreamResponse) -> str:
    payload = getattr(event, event.WhichOneof("payload") or "task")
    return str(payload.metadata["switchboard.sequence"])


def _sequence(event: a2a.StreamResponse) -> tuple[int, int]:
    """The cursor as an ordered pair: ``N`` is (N, 0), ``N.1`` (N, 1)."""
    sequence, _, part = _cursor(event).partition(".")
    assert part in ("", "1"), _cursor(event)
    return int(sequence), int(part or 0)


def _text(events: list[a2a.StreamResponse]) -> str:
    return "".join(
        part.text
        for event in events
        if event.HasField("artifact_update")
        for part in event.artifact_update.artifact.parts
    )


async def test_a_dropped_stream_resumes_exactly_with_the_extension(agent: Agent) -> None:
    """The resume extension, with the official client: its card declares it, a client
    activates it on SubscribeToTask with the last sequence it saw, and gets the rest
    of the answer once: nothing lost, nothing repeated."""
    extensions = {e.uri: e for e in agent.card.capabilities.extensions}
    # The budget extension is declared beside it
    # (tests/dispatcher/budgets/test_service.py).
    assert set(extensions) == {RESUME, "https://switchboard.dev/a2a/extensions/budget/v1"}
    assert not extensions[RESUME].required
    client = agent.client(agent.world.editor)
    words = "alpha beta gamma delta epsilon zeta eta theta"
    first: list[a2a.StreamResponse] = []
    try:
        # The SDK's send_message is an async generator: closing it ends the call.
        stream = cast(
            "AsyncGenerator[a2a.StreamResponse, None]",
            client.send_message(request(words, agent.tenant, metadata={"delay_ms": 100})),
        )
        async for event in stream:
            first.append(event)
            if sum(e.HasField("artifact_update") for e in first) == 3:
                break
        await stream.aclose()  # the connection dropped mid-answer
        task_id = first[0].task.id
        seen = _sequence(first[-1])
        resumed = [
            event
            async for event in client.subscribe(
                a2a.SubscribeToTaskRequest(id=task_id),
                context=ClientCallContext(
                    service_parameters={"A2A-Extensions": RESUME, AFTER: _cursor(first[-1])}
                ),
            )
        ]
    finally:
        await client.close()
    assert resumed[0].HasField("task")
    rest = resumed[1:]
    sequences = [_sequence(event) for event in rest]
    assert sequences == sorted(set(sequences))
    assert all(sequence > seen for sequence in sequences)
    assert rest[-1].status_update.status.state == a2a.TASK_STATE_COMPLETED
    # The answer's last chunk and the final status come from one run update: a client
    # holding the chunk but not the status gets the status alone, once.
    last_chunk, final = rest[-2], rest[-1]
    assert last_chunk.artifact_update.last_chunk
    assert _sequence(final) == (_sequence(last_chunk)[0], 1)
    async with aio.insecure_channel(agent.server.address) as channel:
        got = await stub(channel).GetTask(
            a2a.GetTaskRequest(tenant=agent.tenant, id=task_id),
            metadata=agent.world.viewer.md,
            timeout=CALL_DEADLINE_S,
        )
        assert _text(first) + _text(rest) == answer_of(got)
        assert answer_of(got).startswith(words)
        # After the end: the extension answers with what is left (nothing), the
        # plain protocol with an error, and a malformed sequence is refused.
        ended = a2a.SubscribeToTaskRequest(tenant=agent.tenant, id=task_id)
        last = _cursor(rest[-1])
        md = agent.world.viewer.md
        between = [
            event
            async for event in stub(channel).SubscribeToTask(
                ended,
                metadata=(*md, ("a2a-extensions", RESUME), (AFTER, _cursor(last_chunk))),
                timeout=CALL_DEADLINE_S,
            )
        ]
        assert [event.WhichOneof("payload") for event in between] == ["task", "status_update"]
        assert _cursor(between[1]) == last
        after_end = [
            event
            async for event in stub(channel).SubscribeToTask(
                ended,
                metadata=(*md, ("a2a-extensions", RESUME), (AFTER, last)),
                timeout=CALL_DEADLINE_S,
            )
        ]
        assert [event.WhichOneof("payload") for event in after_end] == ["task"]
        # From the start: the task's whole history, every state as it was (the snapshot
        # says completed; the client asked for what came before).
        replayed = [
            event
            async for event in stub(channel).SubscribeToTask(
                ended,
                metadata=(*md, ("a2a-extensions", RESUME), (AFTER, "0")),
                timeout=CALL_DEADLINE_S,
            )
        ]
        assert replayed[0].task.status.state == a2a.TASK_STATE_COMPLETED
        assert [
            event.status_update.status.state
            for event in replayed
            if event.HasField("status_update")
        ] == [a2a.TASK_STATE_SUBMITTED, a2a.TASK_STATE_WORKING, a2a.TASK_STATE_COMPLETED]
        assert _text(replayed) == answer_of(got)
        await refused(
            _drain(stub(channel).SubscribeToTask(ended, metadata=md, timeout=CALL_DEADLINE_S)),
            CODE.FAILED_PRECONDITION,
        )
        error = await refused(
            _drain(
                stub(channel).SubscribeToTask(
                    ended,
                    metadata=(*md, ("a2a-extensions", RESUME), (AFTER, "-1")),
                    timeout=CALL_DEADLINE_S,
                )
            ),
            CODE.INVALID_ARGUMENT,
        )
        assert fields(error) == [AFTER]


async def _drain(call: Any) -> None:
    async for _ in call:
        pass


async def test_a_task_waiting_for_approval_is_input_required_and_continued_by_a_message() -> None:
    """A run paused for tool approval is input-required; its status message lists the
    pending calls, and the client's next message on the task carries the decisions."""
    with McpTestServer() as mcp:
        async with FakeOpenAI() as fake:
            settings: dict[str, Any] = {
                "llm_base_url": fake.url,
                "llm_model": "m-1",
                "llm_max_retries": 0,
            }
            async with mcp_hub(mcp.url, **settings) as hub:
                world, channel = hub.world, hub.channel
                await dispatcher_stub(channel).CreateAssistant(
                    dpb.CreateAssistantRequest(
                        parent=world.name,
                        assistant_id="careful",
                        assistant=careful_assistant(hub.integration, handler="handlers/llm"),
                    ),
                    metadata=world.owner.md,
                    timeout=CALL_DEADLINE_S,
                )
                script_two_echoes(fake)
                tenant = world.name.removeprefix("workspaces/") + ".careful"
                a2a_stub = stub(channel)
                editor = world.editor.md
                sent = await a2a_stub.SendMessage(
                    request("echo twice", tenant), metadata=editor, timeout=CALL_DEADLINE_S
                )
                task = sent.task
                assert task.status.state == a2a.TASK_STATE_INPUT_REQUIRED
                asked = task.status.message
                assert asked.role == a2a.ROLE_AGENT
                [data] = [part.data for part in asked.parts if part.HasField("data")]
                pending = json_format.MessageToDict(data)["pending_tool_calls"]
                assert [call["tool_call_id"] for call in pending] == ["c1", "c2"]
                assert pending[0]["tool"] == f"{hub.integration}/tools/echo"
                assert pending[0]["arguments"] == {"message": "one"}

                def decide(*decisions: dict[str, str], on: str = task.id) -> a2a.SendMessageRequest:
                    value = struct_pb2.Value()
                    value.struct_value.update({"approvals": list(decisions)})
                    return a2a.SendMessageRequest(
                        tenant=tenant,
                        message=a2a.Message(
                            message_id=str(uuid.uuid4()),
                            task_id=on,
                            context_id=task.context_id,
                            role=a2a.ROLE_USER,
                            parts=[a2a.Part(data=value)],
                        ),
                    )

                approve = {"tool_call_id": "c1", "decision": "approve"}
                deny = {"tool_call_id": "c2", "decision": "deny", "reason": "not that one"}
                # A viewer may not decide; a malformed decision names its place.
                await refused(
                    a2a_stub.SendMessage(
                        decide(approve), metadata=world.viewer.md, timeout=CALL_DEADLINE_S
                    ),
                    CODE.PERMISSION_DENIED,
                )
                error = await refused(
                    a2a_stub.SendMessage(
                        decide({"tool_call_id": "c1", "decision": "maybe"}),
                        metadata=editor,
                        timeout=CALL_DEADLINE_S,
                    ),
                    CODE.INVALID_ARGUMENT,
                )
                assert fields(error) == ["message.parts[0].data.approvals[0].decision"]
                done = await a2a_stub.SendMessage(
                    decide(approve, deny), metadata=editor, timeout=CALL_DEADLINE_S
                )
                assert done.task.id == task.id
                assert done.task.status.state == a2a.TASK_STATE_COMPLETED
                answer = answer_of(done.task)
                assert "one" in answer
                assert "not that one" in answer
                # A task that is not waiting for input takes no more messages.
                await refused(
                    a2a_stub.SendMessage(decide(approve), metadata=editor, timeout=CALL_DEADLINE_S),
                    CODE.FAILED_PRECONDITION,
                )


async def test_subscribing_after_a_dropped_stream_sends_the_task_then_only_what_is_new(
    agent: Agent,
) -> None:
    """A2A's SubscribeToTask, without the resume extension: the task as it stands (the
    answer so far in its artifact), then only what happens after it. No state goes back
    (no SUBMITTED after WORKING), no chunk already in the snapshot comes again, and the
    first new chunk appends to the snapshot's answer."""
    client = agent.client(agent.world.editor)
    words = " ".join(f"word{index}" for index in range(12))
    first: list[a2a.StreamResponse] = []
    try:
        stream = cast(
            "AsyncGenerator[a2a.StreamResponse, None]",
            client.send_message(request(words, agent.tenant, metadata={"delay_ms": 150})),
        )
        async for event in stream:
            first.append(event)
            if sum(e.HasField("artifact_update") for e in first) == 3:
                break
        await stream.aclose()  # the connection dropped after three chunks
        task_id = first[0].task.id
        again = [event async for event in client.subscribe(a2a.SubscribeToTaskRequest(id=task_id))]
    finally:
        await client.close()
    snapshot, rest = again[0], again[1:]
    assert snapshot.HasField("task")
    assert snapshot.task.status.state == a2a.TASK_STATE_WORKING
    so_far = answer_of(snapshot.task)
    assert so_far.startswith(_text(first))  # the three chunks the client had, and any since
    states = [e.status_update.status.state for e in rest if e.HasField("status_update")]
    assert a2a.TASK_STATE_SUBMITTED not in states
    assert states[-1] == a2a.TASK_STATE_COMPLETED
    assert set(states) <= {a2a.TASK_STATE_WORKING, a2a.TASK_STATE_COMPLETED}
    chunks = [e.artifact_update for e in rest if e.HasField("artifact_update")]
    assert chunks, [e.WhichOneof("payload") for e in rest]
    assert all(chunk.append for chunk in chunks)  # each adds to the snapshot's answer
    async with aio.insecure_channel(agent.server.address) as channel:
        got = await stub(channel).GetTask(
            a2a.GetTaskRequest(tenant=agent.tenant, id=task_id),
            metadata=agent.world.viewer.md,
            timeout=CALL_DEADLINE_S,
        )
    # Nothing twice, nothing missing.
    assert so_far + _text(rest) == answer_of(got)
    assert answer_of(got).startswith(words)


async def test_list_tasks_spans_contexts_counts_pages_and_keeps_to_the_agent(
    agent: Agent,
) -> None:
    """ListTasks without a context lists the agent's tasks in every context of its
    workspace (not another assistant's), newest first, paged, with the real total; with
    a context, that context's; a context no task has: none. Members read; a stranger
    and an agent that does not exist are not found."""
    world = agent.world
    async with aio.insecure_channel(agent.server.address) as channel:
        await dispatcher_stub(channel).CreateAssistant(
            dpb.CreateAssistantRequest(
                parent=world.name,
                assistant_id="other",
                assistant=dpb.Assistant(display_name="Other", handler="handlers/echo"),
            ),
            metadata=world.owner.md,
            timeout=CALL_DEADLINE_S,
        )
        a2a_stub, md = stub(channel), world.editor.md

        async def send(text: str, tenant: str = agent.tenant, **fields: Any) -> a2a.Task:
            sent = await a2a_stub.SendMessage(
                request(text, tenant, **fields), metadata=md, timeout=CALL_DEADLINE_S
            )
            task: a2a.Task = sent.task
            return task

        one = await send("one")
        two = await send("two", context_id=one.context_id)
        three = await send("three")
        await send("not this agent's", tenant=f"{world.id}.other")

        def listing(**fields: Any) -> a2a.ListTasksRequest:
            return a2a.ListTasksRequest(tenant=agent.tenant, **fields)

        page = await a2a_stub.ListTasks(
            listing(page_size=2), metadata=world.viewer.md, timeout=CALL_DEADLINE_S
        )
        assert [task.id for task in page.tasks] == [three.id, two.id]
        assert (page.total_size, page.page_size) == (3, 2)
        assert page.next_page_token
        rest = await a2a_stub.ListTasks(
            listing(page_size=2, page_token=page.next_page_token),
            metadata=md,
            timeout=CALL_DEADLINE_S,
        )
        assert [task.id for task in rest.tasks] == [one.id]
        assert (rest.total_size, rest.next_page_token) == (3, "")
        assert not rest.tasks[0].artifacts  # unless asked for
        context = await a2a_stub.ListTasks(
            listing(context_id=one.context_id, include_artifacts=True),
            metadata=md,
            timeout=CALL_DEADLINE_S,
        )
        assert [task.id for task in context.tasks] == [two.id, one.id]
        assert (context.total_size, context.page_size) == (2, 50)  # A2A's default page
        assert answer_of(context.tasks[1]).startswith("one")
        completed = await a2a_stub.ListTasks(
            listing(status=a2a.TASK_STATE_COMPLETED), metadata=md, timeout=CALL_DEADLINE_S
        )
        assert completed.total_size == 3
        for nobody in ("nosuchcontext", "Not An Id"):
            empty = await a2a_stub.ListTasks(
                listing(context_id=nobody), metadata=md, timeout=CALL_DEADLINE_S
            )
            assert (list(empty.tasks), empty.total_size, empty.next_page_token) == ([], 0, "")
        # A token is for the request it came from.
        error = await refused(
            a2a_stub.ListTasks(
                listing(page_size=2, page_token=page.next_page_token, context_id=one.context_id),
                metadata=md,
                timeout=CALL_DEADLINE_S,
            ),
            CODE.INVALID_ARGUMENT,
        )
        assert fields(error) == ["page_token"]
        for who, tenant in (
            (world.outsider.md, agent.tenant),
            (md, f"{world.id}.nosuchagent"),
        ):
            error = await refused(
                a2a_stub.ListTasks(
                    a2a.ListTasksRequest(tenant=tenant), metadata=who, timeout=CALL_DEADLINE_S
                ),
                CODE.NOT_FOUND,
            )
            # A2A's reason, so that an HTTP+JSON client does not read "no such method".
            assert reasons(error)[0] == ("a2a-protocol.org", "INVALID_PARAMS")


async def test_every_error_names_what_the_a2a_caller_sent(agent: Agent) -> None:
    """Errors raised about the requests the front door makes for an A2A caller (the
    dispatcher's SendMessage, the conversation it creates) name the caller's fields and
    A2A's ids, never Switchboard's ``request_id``, ``conversation`` or resource names."""
    world = agent.world
    async with aio.insecure_channel(agent.server.address) as channel:
        a2a_stub, md = stub(channel), world.editor.md
        first = await a2a_stub.SendMessage(
            request("the first text", agent.tenant, message_id="same-id"),
            metadata=md,
            timeout=CALL_DEADLINE_S,
        )
        reused = await refused(
            a2a_stub.SendMessage(
                request("other text", agent.tenant, message_id="same-id"),
                metadata=md,
                timeout=CALL_DEADLINE_S,
            ),
            CODE.INVALID_ARGUMENT,
        )
        assert fields(reused) == ["message.message_id"]
        assert (reused.details() or "").startswith("message.message_id ")
        missing_context = await refused(
            a2a_stub.SendMessage(
                request("hi", agent.tenant, context_id="nosuchcontext"),
                metadata=md,
                timeout=CALL_DEADLINE_S,
            ),
            CODE.NOT_FOUND,
        )
        missing_agent = await refused(
            a2a_stub.SendMessage(
                request("hi", f"{world.id}.nosuchagent"), metadata=md, timeout=CALL_DEADLINE_S
            ),
            CODE.NOT_FOUND,
        )
        missing_task = await refused(
            a2a_stub.GetTask(
                a2a.GetTaskRequest(tenant=agent.tenant, id=f"{first.task.context_id}.nosuchrun"),
                metadata=md,
                timeout=CALL_DEADLINE_S,
            ),
            CODE.NOT_FOUND,
        )
        wrong_context = a2a.SendMessageRequest(
            tenant=agent.tenant, message=message("more", context_id="someothercontext")
        )
        wrong_context.message.task_id = first.task.id
        mismatch = await refused(
            a2a_stub.SendMessage(wrong_context, metadata=md, timeout=CALL_DEADLINE_S),
            CODE.INVALID_ARGUMENT,
        )
        assert fields(mismatch) == ["message.context_id"]
    assert reasons(missing_context)[0] == ("a2a-protocol.org", "INVALID_PARAMS")
    assert reasons(missing_agent)[0] == ("a2a-protocol.org", "INVALID_PARAMS")
    assert reasons(missing_task)[0] == ("a2a-protocol.org", "TASK_NOT_FOUND")
    assert "context nosuchcontext" in (missing_context.details() or "")
    assert f"agent {world.id}.nosuchagent" in (missing_agent.details() or "")
    for error in (reused, missing_context, missing_agent, missing_task, mismatch):
        text = error.details() or ""
        for internal in ("request_id", "conversation", "workspaces/", "runs/", "assistants/"):
            assert internal not in text, text


async def test_a_run_stopped_at_its_deadline_is_a_failed_task_that_ends() -> None:
    """A run that hits its deadline ends DEADLINE_EXCEEDED: for A2A a failed task, so a
    blocking send returns it and a stream ends with it (neither waits forever)."""
    async with running_agent(dispatcher_default_timeout_s=0.5) as slow:
        client = slow.client(slow.world.editor)
        try:
            events = [
                event
                async for event in client.send_message(
                    request("too slow words", slow.tenant, metadata={"delay_ms": 5_000})
                )
            ]
        finally:
            await client.close()
        final = events[-1].status_update.status
        assert final.state == a2a.TASK_STATE_FAILED
        assert "DEADLINE_EXCEEDED" in final.message.parts[0].text
        async with aio.insecure_channel(slow.server.address) as channel:
            blocking = await stub(channel).SendMessage(
                request("too slow again", slow.tenant, metadata={"delay_ms": 5_000}),
                metadata=slow.world.editor.md,
                timeout=CALL_DEADLINE_S,
            )
        assert blocking.task.status.state == a2a.TASK_STATE_FAILED
