"""Webhook tools: a webhook that declares tools in its config, listed and called by a
signed POST (integration/kinds/webhooktools.py).

The receiver is a real HTTP server that verifies every request with the
``standardwebhooks`` library (tests/infra/webhookreceiver.py) and answers as the
test says; the model is the local Chat Completions server (tests/fakes/openai_server.py).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from grpc import aio
from starlette.responses import JSONResponse, PlainTextResponse, Response

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.integration.v1 import integration_pb2 as ipb
from switchboard.integration.connect.registry import connector_factory
from switchboard.integration.kinds.webhooktools import MAX_TOOLS, WebhookToolsConnector
from switchboard.integration.mapping import integration_name
from switchboard.integration.ports.connectors import ToolResult
from switchboard.integration.service import IntegrationHub
from switchboard.integration.store import IntegrationRecord
from switchboard.mesh import create_server
from switchboard.platform.errors import DestinationBlocked
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.security.credentials.secretbox import SecretBox
from switchboard.platform.security.egress import EgressPolicy
from switchboard.platform.values import idempotency
from switchboard.platform.values.names import now
from tests.conftest import CALL_DEADLINE_S, built, make_settings
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.infra.webhookreceiver import Endpoint, Received, WebhookReceiver, running_receiver
from tests.kits.contextkit import (
    World,
    context_stub,
    create_conversation,
    ctx_world,
    mask,
    refused,
    violations,
)
from tests.kits.dispatchkit import dispatcher_stub, watch_all
from tests.kits.integrationkit import (
    Stub,
    create,
    hub_mesh,
    integration_record,
    integration_stub,
    webhook,
    webhook_secret,
)

pytestmark = pytest.mark.service

CODE = grpc.StatusCode
SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "priority": {"type": "integer", "maximum": 5}},
    "required": ["title"],
}
TOOLS = [
    {"name": "create_ticket", "description": "Open a ticket.", "input_schema": SCHEMA},
    {
        "name": "search",
        "description": "Search tickets.",
        "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}},
        "path": "search/v1",
    },
]


def config(tools: Any, **more: Any) -> struct_pb2.Struct:
    value = struct_pb2.Struct()
    value.update({"tools": tools, **more})
    return value


@dataclass
class Hooks:
    server: SwitchboardServer
    stub: Stub
    world: World
    receiver: WebhookReceiver

    async def declare(
        self, name: str, tools: Any = TOOLS, answer: Callable[[Received], Response] | None = None
    ) -> tuple[str, Endpoint, str]:
        """A webhook ``name`` declaring ``tools``, its receiving endpoint and its secret."""
        secret = webhook_secret()
        endpoint = self.receiver.endpoint(name, [secret], answer=answer)
        made = await create(
            self.stub,
            self.world.owner,
            self.world.name,
            webhook(
                self.receiver.url(name),
                credential=secret,
                # Deliveries of no event the tests make: the endpoint hears only calls.
                event_types=["BUDGET_ALERT"],
                config=config(tools),
            ),
            integration_id=name,
        )
        return made.name, endpoint, secret

    async def invoke(self, tool: str, **arguments: Any) -> ipb.InvokeToolResponse:
        request = ipb.InvokeToolRequest(name=tool)
        request.arguments.update(arguments)
        return await self.stub.InvokeTool(
            request, metadata=self.world.editor.md, timeout=CALL_DEADLINE_S
        )


@pytest.fixture
async def hooks() -> AsyncIterator[Hooks]:
    async with (
        running_receiver() as receiver,
        hub_mesh(integration_max_result_bytes=4096) as (server, channel),
    ):
        world = await ctx_world(server, context_stub(channel))
        yield Hooks(server, integration_stub(channel), world, receiver)


def answering(status: int = 200, **body: Any) -> Callable[[Received], Response]:
    return lambda _: JSONResponse(body, status_code=status)


# -- listing and calling ------------------------------------------------------------------------


async def test_declared_tools_are_listed_and_called_with_a_signed_post(hooks: Hooks) -> None:
    def answer(received: Received) -> Response:
        if received.path:
            return PlainTextResponse(f"found 2 for {received.body['arguments']['q']}")
        return JSONResponse({"text": "opened", "result": {"id": 7, "ok": True}})

    name, endpoint, _ = await hooks.declare("desk", answer=answer)
    listed = await hooks.stub.ListTools(
        ipb.ListToolsRequest(parent=name), metadata=hooks.world.viewer.md, timeout=CALL_DEADLINE_S
    )
    assert [(t.name, t.description) for t in listed.tools] == [
        (f"{name}/tools/create_ticket", "Open a ticket."),
        (f"{name}/tools/search", "Search tickets."),
    ]
    schema = json_format.MessageToDict(listed.tools[0].input_schema)
    assert schema["required"] == ["title"]

    opened = await hooks.invoke(f"{name}/tools/create_ticket", title="Printer", priority=2)
    assert (opened.text, opened.is_error) == ("opened", False)
    assert dict(opened.result) == {"id": 7, "ok": True}
    found = await hooks.invoke(f"{name}/tools/search", q="printer")
    assert found.text == "found 2 for printer"

    # Each verified by the receiver with the secret (standardwebhooks); none without a key.
    assert endpoint.bad == []
    first, second = endpoint.accepted
    assert first.body == {"tool": "create_ticket", "arguments": {"title": "Printer", "priority": 2}}
    assert (first.path, second.path) == ("", "search/v1")
    assert second.body == {"tool": "search", "arguments": {"q": "printer"}}
    for received in (first, second):
        assert "idempotency-key" not in received.headers
        assert received.webhook_id.startswith("msg_")
        assert received.headers["content-type"] == "application/json"
    assert first.webhook_id != second.webhook_id

    # The arguments are checked against the declared schema before anything is sent.
    error = await refused(
        hooks.invoke(f"{name}/tools/create_ticket", priority=9), CODE.INVALID_ARGUMENT
    )
    assert violations(error) == ["arguments", "arguments.priority"]
    assert len(endpoint.accepted) == 2


async def test_answers_the_tool_refused_are_its_errors_and_failures_count(hooks: Hooks) -> None:
    answers = iter(
        [
            JSONResponse({"text": "no such queue"}, status_code=400),
            PlainTextResponse("forbidden here", status_code=403),
            Response("<html>gone</html>", status_code=404, media_type="text/html"),
            PlainTextResponse("down", status_code=500),
            Response(status_code=302, headers={"location": "http://127.0.0.1:1/elsewhere"}),
            JSONResponse({"text": 3}),
            Response("{}", status_code=200, media_type="application/xml"),
            Response(status_code=204),
            PlainTextResponse("slow down", status_code=429),
        ]
    )
    name, endpoint, _ = await hooks.declare("flaky", answer=lambda _: next(answers))
    tool = f"{name}/tools/create_ticket"
    hub = built(hooks.server, IntegrationHub)

    refused_400 = await hooks.invoke(tool, title="a")
    assert (refused_400.is_error, refused_400.text) == (True, "HTTP 400: no such queue")
    refused_403 = await hooks.invoke(tool, title="a")
    assert (refused_403.is_error, refused_403.text) == (True, "HTTP 403: forbidden here")
    refused_404 = await hooks.invoke(tool, title="a")  # a body in no known shape is left out
    assert (refused_404.is_error, refused_404.text) == (True, "HTTP 404")
    assert hub.breakers.state(name).failures == 0  # the tool answered each time

    error = await refused(hooks.invoke(tool, title="a"), CODE.UNAVAILABLE)
    assert "HTTP 500" in (error.details() or "")
    error = await refused(hooks.invoke(tool, title="a"), CODE.UNAVAILABLE)
    assert "redirects are not followed" in (error.details() or "")
    error = await refused(hooks.invoke(tool, title="a"), CODE.UNAVAILABLE)
    assert "malformed answer" in (error.details() or "")
    error = await refused(hooks.invoke(tool, title="a"), CODE.UNAVAILABLE)
    assert "neither application/json nor text/plain" in (error.details() or "")
    assert hub.breakers.state(name).failures == 4
    empty = await hooks.invoke(tool, title="a")
    assert (empty.text, empty.is_error, empty.HasField("result")) == ("", False, False)
    assert hub.breakers.state(name).failures == 0  # failures are counted in a row
    error = await refused(hooks.invoke(tool, title="a"), CODE.UNAVAILABLE)
    assert "HTTP 429" in (error.details() or "")  # it cannot take calls now: not the call's fault
    assert hub.breakers.state(name).failures == 1
    assert len(endpoint.accepted) == 9
    assert endpoint.bad == []


async def test_an_answer_over_the_limit_is_refused_whole(hooks: Hooks) -> None:
    sizes = iter([5000, 200_000])  # over the result limit; over what is read at all
    name, _, _ = await hooks.declare("big", answer=lambda _: PlainTextResponse("x" * next(sizes)))
    tool = f"{name}/tools/create_ticket"
    for _ in range(2):
        error = await refused(hooks.invoke(tool, title="a"), CODE.RESOURCE_EXHAUSTED)
        assert "larger than" in (error.details() or "")
    assert built(hooks.server, IntegrationHub).breakers.state(name).failures == 0


async def test_a_slow_tool_is_past_its_deadline(hooks: Hooks) -> None:
    name, endpoint, _ = await hooks.declare("slow", answer=answering(text="late"))
    endpoint.delay_s = 5.0
    request = ipb.InvokeToolRequest(name=f"{name}/tools/create_ticket")
    request.arguments.update({"title": "a"})
    request.timeout.FromMilliseconds(200)
    await refused(
        hooks.stub.InvokeTool(request, metadata=hooks.world.editor.md, timeout=CALL_DEADLINE_S),
        CODE.DEADLINE_EXCEEDED,
    )


async def test_a_schema_the_hub_cannot_apply_is_listed_and_not_called(hooks: Hooks) -> None:
    tools = [
        {
            "name": "match",
            "input_schema": {"type": "object", "properties": {"s": {"pattern": "^(a|aa)+$"}}},
        }
    ]
    name, endpoint, _ = await hooks.declare("regex", tools, answering(text="ok"))
    listed = await hooks.stub.ListTools(
        ipb.ListToolsRequest(parent=name), metadata=hooks.world.viewer.md, timeout=CALL_DEADLINE_S
    )
    assert [t.name for t in listed.tools] == [f"{name}/tools/match"]
    error = await refused(
        hooks.invoke(f"{name}/tools/match", s="a" * 64 + "b"), CODE.FAILED_PRECONDITION
    )
    assert "patterns take longer" in (error.details() or "")
    assert endpoint.accepted == []


async def test_a_webhook_without_tools_says_how_to_declare_them(hooks: Hooks) -> None:
    made = await create(
        hooks.stub, hooks.world.owner, hooks.world.name, webhook(hooks.receiver.url("plain"))
    )
    listed = await hooks.stub.ListTools(
        ipb.ListToolsRequest(parent=made.name),
        metadata=hooks.world.viewer.md,
        timeout=CALL_DEADLINE_S,
    )
    assert list(listed.tools) == []
    error = await refused(hooks.invoke(f"{made.name}/tools/anything"), CODE.FAILED_PRECONDITION)
    assert "declares no tools" in (error.details() or "")
    assert '"tools"' in (error.details() or "")


async def test_tools_declared_by_an_update_are_listed_at_once(hooks: Hooks) -> None:
    name, _, _ = await hooks.declare("later", tools=TOOLS[:1])
    updated = await hooks.stub.UpdateIntegration(
        ipb.UpdateIntegrationRequest(
            integration=ipb.Integration(name=name, config=config(TOOLS)),
            update_mask=mask("config"),
        ),
        metadata=hooks.world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    assert len(json_format.MessageToDict(updated.integration.config)["tools"]) == 2
    listed = await hooks.stub.ListTools(
        ipb.ListToolsRequest(parent=name), metadata=hooks.world.viewer.md, timeout=CALL_DEADLINE_S
    )
    assert len(listed.tools) == 2


# -- validation ---------------------------------------------------------------------------------

AT = "integration.config.tools"


@pytest.mark.parametrize(
    ("tools", "fields"),
    [
        ("create_ticket", [AT]),
        ([{"name": f"t{i}", "input_schema": {}} for i in range(MAX_TOOLS + 1)], [AT]),
        (["create_ticket"], [f"{AT}[0]"]),
        ([{"input_schema": {}}], [f"{AT}[0].name"]),
        ([{"name": "with space", "input_schema": {}}], [f"{AT}[0].name"]),
        ([{"name": "x" * 129, "input_schema": {}}], [f"{AT}[0].name"]),
        ([{"name": "~41", "input_schema": {}}], [f"{AT}[0].name"]),
        (
            [{"name": "a", "input_schema": {}}, {"name": "a", "input_schema": {}}],
            [f"{AT}[1].name"],
        ),
        ([{"name": "a", "description": "d" * 1001, "input_schema": {}}], [f"{AT}[0].description"]),
        ([{"name": "a", "description": 3, "input_schema": {}}], [f"{AT}[0].description"]),
        ([{"name": "a", "inputSchema": {}}], [f"{AT}[0].inputSchema", f"{AT}[0].input_schema"]),
        ([{"name": "a"}], [f"{AT}[0].input_schema"]),
        ([{"name": "a", "input_schema": {"type": "string"}}], [f"{AT}[0].input_schema"]),
        ([{"name": "a", "input_schema": {"type": "objekt"}}], [f"{AT}[0].input_schema"]),
        (
            [{"name": "a", "input_schema": {"$ref": "https://example.com/s.json"}}],
            [f"{AT}[0].input_schema"],
        ),
        ([{"name": "a", "input_schema": {}, "path": "/abs"}], [f"{AT}[0].path"]),
        ([{"name": "a", "input_schema": {}, "path": "a/../b"}], [f"{AT}[0].path"]),
        ([{"name": "a", "input_schema": {}, "path": "a?b=1"}], [f"{AT}[0].path"]),
        ([{"name": "a", "input_schema": {}, "path": "a//b"}], [f"{AT}[0].path"]),
        ([{"name": "a", "input_schema": {}, "path": "%zz"}], [f"{AT}[0].path"]),
        ([{"name": "a", "input_schema": {}, "path": 3}], [f"{AT}[0].path"]),
        # Every bad one at once, in order.
        (
            [{"name": "ok", "input_schema": {}}, {"name": "b c", "input_schema": 1, "path": ""}],
            [f"{AT}[1].name", f"{AT}[1].path", f"{AT}[1].input_schema"],
        ),
    ],
)
async def test_bad_tools_are_named_and_nothing_is_stored(
    hooks: Hooks, tools: Any, fields: list[str]
) -> None:
    error = await refused(
        create(
            hooks.stub,
            hooks.world.owner,
            hooks.world.name,
            webhook(hooks.receiver.url("bad"), config=config(tools)),
        ),
        CODE.INVALID_ARGUMENT,
    )
    assert violations(error) == fields
    listed = await hooks.stub.ListIntegrations(
        ipb.ListIntegrationsRequest(parent=hooks.world.name),
        metadata=hooks.world.viewer.md,
        timeout=CALL_DEADLINE_S,
    )
    assert list(listed.integrations) == []


async def test_bad_tools_in_an_update_change_nothing(hooks: Hooks) -> None:
    name, _, _ = await hooks.declare("kept")
    error = await refused(
        hooks.stub.UpdateIntegration(
            ipb.UpdateIntegrationRequest(
                integration=ipb.Integration(name=name, config=config([{"name": "a b"}])),
                update_mask=mask("config"),
            ),
            metadata=hooks.world.owner.md,
            timeout=CALL_DEADLINE_S,
        ),
        CODE.INVALID_ARGUMENT,
    )
    assert violations(error) == [f"{AT}[0].name", f"{AT}[0].input_schema"]
    listed = await hooks.stub.ListTools(
        ipb.ListToolsRequest(parent=name), metadata=hooks.world.viewer.md, timeout=CALL_DEADLINE_S
    )
    assert len(listed.tools) == 2


async def test_other_kinds_keep_their_config_as_it_is(hooks: Hooks) -> None:
    """``tools`` in the config of another kind is that integration's own business."""
    made = await create(
        hooks.stub,
        hooks.world.owner,
        hooks.world.name,
        ipb.Integration(
            kind=ipb.INTEGRATION_KIND_MCP_SERVER,
            endpoint="http://127.0.0.1:1/mcp",
            config=config("anything"),
        ),
    )
    assert made.config["tools"] == "anything"


async def test_a_private_address_is_refused_outside_dev_mode() -> None:
    async with hub_mesh(egress_allow_loopback=False) as (server, channel):
        world = await ctx_world(server, context_stub(channel))
        error = await refused(
            create(
                integration_stub(channel),
                world.owner,
                world.name,
                webhook("https://127.0.0.1:9/hook", config=config(TOOLS)),
            ),
            CODE.INVALID_ARGUMENT,
        )
        assert violations(error) == ["integration.endpoint"]


# -- the connector: the key, rotation, the egress policy ------------------------------------------

NAME = integration_name("w", "desk")
BOX = SecretBox("webhook-tools-test")


def record(endpoint: str, secret: str, **changes: Any) -> IntegrationRecord:
    """The webhook ``w/desk`` declaring ``TOOLS``, its credential sealed as stored."""
    fields: dict[str, Any] = {
        "id": "desk",
        "kind": ipb.INTEGRATION_KIND_WEBHOOK,
        "display_name": "Desk",
        "endpoint": endpoint,
        "config": config(TOOLS).SerializeToString(deterministic=True),
        "credential": BOX.seal(secret, purpose=NAME),
    }
    return integration_record(**(fields | changes))


def factory(egress: EgressPolicy) -> Any:
    return connector_factory(make_settings().integration, egress, {}, lambda _: None, secrets=BOX)


async def call(connector: Any, key: str = "") -> ToolResult:
    result: ToolResult = await connector.call_tool(
        "create_ticket",
        {"title": "a"},
        timeout_s=CALL_DEADLINE_S,
        max_result_bytes=4096,
        idempotency_key=key,
    )
    return result


async def test_a_key_is_the_idempotency_header_and_the_webhook_id() -> None:
    old, new = webhook_secret(), webhook_secret()
    async with running_receiver() as receiver:
        endpoint = receiver.endpoint("desk", [new], answer=answering(text="ok"))
        connector = factory(EgressPolicy(allow_loopback=True))(
            record(receiver.url("desk"), new), new
        )
        assert isinstance(connector, WebhookToolsConnector)
        try:
            key = idempotency.call_key("workspaces/w/conversations/c/runs/r", "call_1")
            for _ in range(2):  # a retry sends the same key
                assert (await call(connector, key)).text == "ok"
            assert (await call(connector)).text == "ok"
        finally:
            await connector.close()
        assert endpoint.bad == []
        first, again, keyless = endpoint.accepted
        for received in (first, again):
            assert received.headers["idempotency-key"] == key
            assert received.webhook_id == key
        assert "idempotency-key" not in keyless.headers
        assert keyless.webhook_id not in (key, "")

        # During a rotation both secrets sign, as deliveries are signed.
        both = receiver.endpoint("desk", [old, new], answer=answering(text="ok"))
        rotating = record(
            receiver.url("desk"),
            new,
            previous_credential=BOX.seal(old, purpose=NAME),
            previous_until=now() + dt.timedelta(hours=1),
        )
        connector = factory(EgressPolicy(allow_loopback=True))(rotating, new)
        try:
            assert (await call(connector)).text == "ok"
        finally:
            await connector.close()
        assert both.bad == []
        assert len(both.accepted[0].headers["webhook-signature"].split(" ")) == 2


async def test_the_egress_policy_refuses_a_loopback_address_on_every_call() -> None:
    secret = webhook_secret()
    async with running_receiver() as receiver:
        endpoint = receiver.endpoint("desk", [secret], answer=answering(text="ok"))
        connector = factory(EgressPolicy())(record(receiver.url("desk"), secret), secret)
        try:
            with pytest.raises(DestinationBlocked):
                await call(connector)
        finally:
            await connector.close()
        assert endpoint.requests == 0


def test_a_webhook_without_tools_gets_no_connector() -> None:
    made = factory(EgressPolicy(allow_loopback=True))(
        record("https://example.com/hook", "x", config=b""), "x"
    )
    assert made is None


# -- a run --------------------------------------------------------------------------------------


async def test_a_run_calls_the_webhook_tool_an_assistant_enables() -> None:
    async with running_receiver() as receiver, FakeOpenAI() as fake:
        settings = make_settings(
            llm_base_url=fake.url,
            llm_model="m-1",
            llm_max_retries=0,
            egress_allow_loopback=True,
            integration_probe_interval_s=0,
        )
        server, _ = await create_server(settings)
        await server.start()
        try:
            async with aio.insecure_channel(server.address) as channel:
                await _run(server, channel, fake, receiver)
        finally:
            await server.shutdown(grace=0)


async def _run(
    server: SwitchboardServer, channel: aio.Channel, fake: FakeOpenAI, receiver: WebhookReceiver
) -> None:
    contexts = context_stub(channel)
    world = await ctx_world(server, contexts)
    hooks = Hooks(server, integration_stub(channel), world, receiver)
    name, endpoint, _ = await hooks.declare(
        "desk", answer=lambda r: JSONResponse({"text": f"ticket {r.body['arguments']['title']}"})
    )
    dispatcher = dispatcher_stub(channel)
    assistant = await dispatcher.CreateAssistant(
        pb.CreateAssistantRequest(
            parent=world.name,
            assistant_id="helpdesk",
            assistant=pb.Assistant(
                display_name="Helpdesk",
                instructions="You open tickets.",
                tools=[pb.AssistantTools(integration=name, tools=["create_ticket"])],
            ),
        ),
        metadata=world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    conversation = await create_conversation(contexts, world.editor, world.name)
    fake.script(
        Reply.tool_calls([("desk__create_ticket", {"title": "Printer"}, "call_1")]),
        lambda body: Reply.text(
            "Done: " + next(m["content"] for m in body["messages"] if m.get("role") == "tool")
        ),
    )
    sent = await dispatcher.SendMessage(
        pb.SendMessageRequest(
            conversation=conversation.name,
            assistant=assistant.assistant.name,
            message=cpb.Message(parts=[cpb.ContentPart(text="Open a ticket for the printer")]),
        ),
        metadata=world.editor.md,
        timeout=CALL_DEADLINE_S,
    )
    seen = await watch_all(dispatcher, world.viewer, sent.run.name)
    assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error
    assert "Done: ticket Printer" in seen.text
    tools = {t["function"]["name"] for t in fake.requests[0].body["tools"]}
    assert tools == {"desk__create_ticket"}
    (received,) = endpoint.accepted
    assert received.body == {"tool": "create_ticket", "arguments": {"title": "Printer"}}
    # The run's call carries the key of this run and call, the same on any attempt.
    assert received.headers["idempotency-key"] == idempotency.call_key(sent.run.name, "call_1")
    assert endpoint.bad == []
