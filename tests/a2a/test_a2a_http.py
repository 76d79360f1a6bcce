"""A2A's HTTP+JSON binding and the public Agent Card, through a real Envoy in front of a real
``switchboard serve`` (the embedded shape; the mesh's edge is in tests/e2e/test_mesh.py).

The official ``a2a-sdk`` client discovers the agent from
``/{tenant}/.well-known/agent-card.json`` and talks to it over its HTTP+JSON
transport (Envoy's gRPC-JSON transcoder): send, stream as Server-Sent Events,
get, list, cancel. ``curl`` checks what the SDK hides: the SSE framing, an error
as JSON with its HTTP status, the resume extension's headers, and that a
stranger cannot tell another workspace's task from none. Both listeners keep
serving plain gRPC.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, Final

import httpx
import pytest
from a2a.client import A2ACardResolver, ClientConfig, ClientFactory
from a2a.client.auth.credentials import CredentialService
from a2a.client.auth.interceptor import AuthInterceptor
from a2a.client.client import Client
from a2a.types import a2a_pb2 as a2a
from a2a.utils.errors import InvalidParamsError, TaskNotCancelableError, TaskNotFoundError
from google.protobuf import json_format
from grpc import aio

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from tests.a2a.test_a2a import stub as a2a_stub
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.envoy import EnvoyProcess, fronting
from tests.e2e.procs import ServeProcess
from tests.infra.webhookreceiver import running_receiver, until
from tests.kits.authkit import PASSWORD, unique_email
from tests.kits.contextkit import Caller, context_stub, create_workspace
from tests.kits.dispatchkit import dispatcher_stub
from tests.kits.integrationkit import webhook_secret

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

RESUME: Final = "https://switchboard.dev/a2a/extensions/resume/v1"


@pytest.fixture(scope="module")
def serve() -> Iterator[ServeProcess]:
    # The push receiver listens on loopback.
    with ServeProcess("--dev", env={"SWITCHBOARD_EGRESS_ALLOW_LOOPBACK": "true"}) as process:
        yield process


@pytest.fixture(scope="module")
def envoy(serve: ServeProcess) -> Iterator[EnvoyProcess]:
    yield from fronting(serve.address)


class _Token(CredentialService):
    def __init__(self, token: str) -> None:
        self._token = token

    async def get_credentials(self, security_scheme_name: str, context: Any) -> str | None:
        return self._token if security_scheme_name == "bearer" else None


@dataclass
class World:
    edge: str
    owner: Caller
    stranger: Caller
    tenant: str

    def headers(self, caller: Caller) -> dict[str, str]:
        return {"authorization": f"Bearer {caller.token}", "a2a-version": "1.0"}


async def _register(channel: aio.Channel, who: str) -> Caller:
    made = await auth_pb2_grpc.AuthServiceStub(channel).Register(
        auth_pb2.RegisterRequest(email=unique_email(who), password=PASSWORD),
        timeout=CALL_DEADLINE_S,
    )
    return Caller(made.user.name.removeprefix("users/"), made.tokens.access_token)


@pytest.fixture
async def world(envoy: EnvoyProcess) -> World:
    """A workspace with an echo assistant, its owner and a stranger, made over gRPC
    through the same edge."""
    async with aio.insecure_channel(f"127.0.0.1:{envoy.port}") as channel:
        owner = await _register(channel, "a2a-http")
        stranger = await _register(channel, "a2a-stranger")
        workspace = await create_workspace(context_stub(channel), owner, "HTTP")
        await dispatcher_stub(channel).CreateAssistant(
            pb.CreateAssistantRequest(
                parent=workspace.name,
                assistant_id="echoer",
                assistant=pb.Assistant(
                    display_name="Secret Echoer",
                    description="Says it back.",
                    handler="handlers/echo",
                ),
            ),
            metadata=owner.md,
            timeout=CALL_DEADLINE_S,
        )
    tenant = workspace.name.removeprefix("workspaces/") + ".echoer"
    return World(envoy.url, owner, stranger, tenant)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=CALL_DEADLINE_S) as client:
        yield client


async def _client(world: World, caller: Caller, *, streaming: bool = True) -> Client:
    """The SDK's client as an A2A caller makes it: the card from the agent's URL, then
    the HTTP+JSON interface it names."""
    async with httpx.AsyncClient(timeout=CALL_DEADLINE_S) as http:
        card = await A2ACardResolver(http, f"{world.edge}/{world.tenant}").get_agent_card()
    assert card.supported_interfaces[0].protocol_binding == "HTTP+JSON"
    assert card.supported_interfaces[0].url == world.edge
    config = ClientConfig(streaming=streaming, supported_protocol_bindings=["HTTP+JSON"])
    return ClientFactory(config).create(card, interceptors=[AuthInterceptor(_Token(caller.token))])


def _message(text: str, **fields: Any) -> a2a.SendMessageRequest:
    metadata = fields.pop("metadata", None)
    request = a2a.SendMessageRequest(
        message=a2a.Message(
            message_id=str(uuid.uuid4()), role=a2a.ROLE_USER, parts=[a2a.Part(text=text)], **fields
        )
    )
    if metadata:
        request.metadata.update(metadata)
    return request


def _answer(task: a2a.Task) -> str:
    return "".join(part.text for artifact in task.artifacts for part in artifact.parts)


async def test_the_public_card_is_the_same_for_every_tenant_and_needs_no_credential(
    world: World, http: httpx.AsyncClient
) -> None:
    mine = await http.get(f"{world.edge}/{world.tenant}/.well-known/agent-card.json")
    assert mine.status_code == 200, mine.text
    assert mine.headers["content-type"] == "application/json"
    card = mine.json()
    # Where and how to call, with the tenant asked for: the edge it was fetched from.
    assert [(i["protocolBinding"], i["url"], i["tenant"]) for i in card["supportedInterfaces"]] == [
        ("HTTP+JSON", world.edge, world.tenant),
        ("GRPC", world.edge.removeprefix("http://"), world.tenant),
    ]
    assert card["capabilities"]["streaming"] is True
    assert card["capabilities"]["extendedAgentCard"] is True
    assert [e["uri"] for e in card["capabilities"]["extensions"]] == [
        RESUME,
        "https://switchboard.dev/a2a/extensions/budget/v1",
    ]
    assert set(card["securitySchemes"]) == {"bearer", "apiKey"}
    # Nothing of the assistant itself: its name and description are for members.
    assert "Secret Echoer" not in mine.text
    assert "Says it back" not in mine.text

    # A tenant that does not exist gets the same card (but its own tenant): no probing.
    unknown = "nosuchworkspace.nosuchassistant"
    theirs = await http.get(f"{world.edge}/{unknown}/.well-known/agent-card.json")
    assert theirs.status_code == 200
    assert theirs.text.replace(unknown, world.tenant) == mine.text
    # No root agent named (SWITCHBOARD_A2A_ROOT_AGENT): no root card, rather than a card
    # whose interfaces would fail every call; the answer says where the cards are.
    root = await http.get(f"{world.edge}/.well-known/agent-card.json")
    assert root.status_code == 404
    assert root.json()["error"]["status"] == "NOT_FOUND"
    assert "/{workspace}.{assistant}/.well-known/agent-card.json" in root.json()["error"]["message"]
    # A malformed tenant is the caller's mistake, said in JSON with its HTTP status.
    bad = await http.get(f"{world.edge}/not-a-tenant/.well-known/agent-card.json")
    assert bad.status_code == 400
    error = bad.json()["error"]
    assert (error["code"], error["status"]) == (400, "INVALID_ARGUMENT")
    assert error["details"][-1]["fieldViolations"][0]["field"] == "tenant"


async def test_the_sdk_sends_streams_reads_lists_and_cancels_over_http_json(world: World) -> None:
    client = await _client(world, world.owner, streaming=False)
    try:
        [blocking] = [event async for event in client.send_message(_message("hello http"))]
        task = blocking.task
        assert task.status.state == a2a.TASK_STATE_COMPLETED
        assert _answer(task).startswith("hello http")
        got = await client.get_task(a2a.GetTaskRequest(id=task.id))
        assert got.id == task.id
        assert _answer(got) == _answer(task)
        listed = await client.list_tasks(a2a.ListTasksRequest(context_id=task.context_id))
        assert [t.id for t in listed.tasks] == [task.id]

        slow = _message("slow words", metadata={"delay_ms": 60_000})
        slow.configuration.return_immediately = True
        [started] = [event async for event in client.send_message(slow)]
        assert started.task.status.state != a2a.TASK_STATE_COMPLETED
        cancelled = await client.cancel_task(a2a.CancelTaskRequest(id=started.task.id))
        assert cancelled.status.state == a2a.TASK_STATE_CANCELED
        # Errors in A2A's HTTP+JSON shape: the SDK raises its typed errors from them.
        with pytest.raises(TaskNotCancelableError):
            await client.cancel_task(a2a.CancelTaskRequest(id=task.id))
        with pytest.raises(TaskNotFoundError):
            await client.get_task(a2a.GetTaskRequest(id="not-a-task-id"))
        with pytest.raises(InvalidParamsError):
            await client.get_task(a2a.GetTaskRequest(id=task.id, history_length=-1))
    finally:
        await client.close()
    stranger = await _client(world, world.stranger, streaming=False)
    try:
        with pytest.raises(TaskNotFoundError):
            await stranger.get_task(a2a.GetTaskRequest(id=task.id))
    finally:
        await stranger.close()

    client = await _client(world, world.owner)
    try:
        events = [event async for event in client.send_message(_message("one two three"))]
        kinds = [event.WhichOneof("payload") for event in events]
        assert kinds[0] == "task", kinds
        assert "artifact_update" in kinds
        assert events[-1].status_update.status.state == a2a.TASK_STATE_COMPLETED
        streamed = "".join(
            part.text
            for event in events
            if event.HasField("artifact_update")
            for part in event.artifact_update.artifact.parts
        )
        assert streamed.startswith("one two three")
    finally:
        await client.close()


def _curl(*args: str) -> subprocess.CompletedProcess[str]:
    curl = shutil.which("curl")
    assert curl is not None, "curl is needed for this test"
    return subprocess.run(
        [curl, "-sS", "--max-time", str(CALL_DEADLINE_S), *args],
        capture_output=True,
        text=True,
        timeout=CALL_DEADLINE_S + 5,
        check=False,
    )


def _sse(body: str) -> list[dict[str, Any]]:
    """The JSON of each Server-Sent Event (``data: {...}`` then a blank line)."""
    events = [block for block in body.split("\n\n") if block.strip()]
    assert events, body
    assert all(block.startswith("data: ") for block in events), body
    return [json.loads(block.removeprefix("data: ")) for block in events]


def _sequence(event: dict[str, Any]) -> str:
    """The event's resume cursor, as sent (``N``, or ``N.1`` for a final status)."""
    [update] = [event[kind] for kind in ("artifactUpdate", "statusUpdate") if kind in event]
    return str(update["metadata"]["switchboard.sequence"])


async def test_curl_streams_sse_and_errors_are_json_with_their_status(world: World) -> None:
    auth = f"authorization: Bearer {world.owner.token}"
    body = json.dumps(
        {"message": {"messageId": "curl-1", "role": "ROLE_USER", "parts": [{"text": "via curl"}]}}
    )
    streamed = await asyncio.to_thread(
        _curl,
        "-N",
        "-D",
        "-",
        "-H",
        auth,
        "-H",
        "content-type: application/json",
        "-H",
        "accept: text/event-stream",
        "-d",
        body,
        f"{world.edge}/{world.tenant}/message:stream",
    )
    assert streamed.returncode == 0, streamed.stderr
    head, _, rest = streamed.stdout.partition("\n\n")
    assert head.startswith("HTTP/1.1 200"), streamed.stdout
    events = _sse(rest)
    assert "task" in events[0]
    assert events[-1]["statusUpdate"]["status"]["state"] == "TASK_STATE_COMPLETED"
    task_id = events[0]["task"]["id"]
    sequences = [_sequence(event) for event in events[1:]]

    # Resume through the transcoder: the headers arrive as the call's metadata.
    resumed = await asyncio.to_thread(
        _curl,
        "-N",
        "-D",
        "-",
        "-H",
        auth,
        "-H",
        f"a2a-extensions: {RESUME}",
        "-H",
        f"switchboard-after-sequence: {sequences[0]}",
        f"{world.edge}/{world.tenant}/tasks/{task_id}:subscribe",
    )
    head, _, rest = resumed.stdout.partition("\n\n")
    assert head.startswith("HTTP/1.1 200"), resumed.stdout
    # The server names the extension it applied back, as A2A says.
    assert f"a2a-extensions: {RESUME}" in head.split("\n")
    again = _sse(rest)
    assert "task" in again[0]
    assert [_sequence(event) for event in again[1:]] == sequences[1:]

    # A stranger asking for the task: 404 as for a task that does not exist, as JSON.
    stranger = await asyncio.to_thread(
        _curl,
        "-w",
        "\n%{http_code} %{content_type}",
        "-H",
        f"authorization: Bearer {world.stranger.token}",
        f"{world.edge}/{world.tenant}/tasks/{task_id}",
    )
    text, _, status = stranger.stdout.rpartition("\n")
    assert status == "404 application/json", stranger.stdout
    # A2A's shape: {"error": {HTTP code, status name, message, details}} (AIP-193).
    error = json.loads(text)["error"]
    assert (error["code"], error["status"]) == (404, "NOT_FOUND")
    # A2A's reason first (what A2A clients read), then Switchboard's.
    assert [(detail["domain"], detail["reason"]) for detail in error["details"]] == [
        ("a2a-protocol.org", "TASK_NOT_FOUND"),
        ("switchboard.dev", "ERROR_REASON_NOT_FOUND"),
    ]
    assert "via curl" not in text
    # No credential at all: 401, never the task.
    anonymous = await asyncio.to_thread(
        _curl, "-w", "\n%{http_code}", f"{world.edge}/{world.tenant}/tasks/{task_id}"
    )
    assert anonymous.stdout.rpartition("\n")[2] == "401"
    # The owner reads it.
    mine = await asyncio.to_thread(
        _curl, "-H", auth, f"{world.edge}/{world.tenant}/tasks/{task_id}?historyLength=0"
    )
    task = json_format.Parse(mine.stdout, a2a.Task())
    assert task.status.state == a2a.TASK_STATE_COMPLETED
    assert not task.history


async def test_grpc_still_reaches_the_same_servicer_through_the_edge(
    world: World, envoy: EnvoyProcess
) -> None:
    async with aio.insecure_channel(f"127.0.0.1:{envoy.port}") as channel:
        sent = await a2a_stub(channel).SendMessage(
            a2a.SendMessageRequest(tenant=world.tenant, message=_message("over grpc").message),
            metadata=world.owner.md,
            timeout=CALL_DEADLINE_S,
        )
    assert sent.task.status.state == a2a.TASK_STATE_COMPLETED


async def test_push_configs_over_http_json(world: World, http: httpx.AsyncClient) -> None:
    """A send with a push config, the config read, listed and deleted, all as HTTP+JSON
    through the transcoder; the task's statuses reach a real receiver, signed."""
    async with running_receiver() as receiver:
        secret = webhook_secret()
        endpoint = receiver.endpoint("http-task", [secret])
        headers = world.headers(world.owner)
        body = {
            "message": {"messageId": "http-push-1", "role": "ROLE_USER", "parts": [{"text": "hi"}]},
            "configuration": {
                "taskPushNotificationConfig": {
                    "url": receiver.url("http-task"),
                    "token": "http-token",
                    "authentication": {"scheme": "StandardWebhooks", "credentials": secret},
                }
            },
        }
        sent = await http.post(
            f"{world.edge}/{world.tenant}/message:send", json=body, headers=headers
        )
        assert sent.status_code == 200, sent.text
        task = sent.json()["task"]
        assert task["status"]["state"] == "TASK_STATE_COMPLETED"

        def states() -> list[str]:
            return [item.body["statusUpdate"]["status"]["state"] for item in endpoint.accepted]

        await until(lambda: "TASK_STATE_COMPLETED" in states(), "the completed status pushed")
        assert states() == ["TASK_STATE_SUBMITTED", "TASK_STATE_WORKING", "TASK_STATE_COMPLETED"]
        assert endpoint.bad == []
        assert {item.headers["x-a2a-notification-token"] for item in endpoint.accepted} == {
            "http-token"
        }

        configs = f"{world.edge}/{world.tenant}/tasks/{task['id']}/pushNotificationConfigs"
        listed = await http.get(configs, headers=headers)
        assert listed.status_code == 200, listed.text
        [config] = listed.json()["configs"]
        assert config["id"] == "http-push-1"  # a send's config is named by its message id
        assert config["url"] == receiver.url("http-task")
        assert "token" not in config  # write-only
        got = await http.get(f"{configs}/http-push-1", headers=headers)
        assert got.status_code == 200, got.text
        assert got.json()["url"] == config["url"]
        stranger = await http.get(f"{configs}/http-push-1", headers=world.headers(world.stranger))
        assert stranger.status_code == 404
        assert stranger.json()["error"]["details"][0]["reason"] == "TASK_NOT_FOUND"
        deleted = await http.delete(f"{configs}/http-push-1", headers=headers)
        assert deleted.status_code == 200, deleted.text
        gone = await http.get(f"{configs}/http-push-1", headers=headers)
        assert gone.status_code == 404
