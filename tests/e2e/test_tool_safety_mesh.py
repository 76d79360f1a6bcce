"""Issue 42's guarantees in the scaled-out shape: the integration hub in one process
(on PostgreSQL and Redis), a dispatcher in another that reaches it over gRPC.

A model (the faithful local OpenAI-compatible server, tests/fakes) calls three
tools of a real MCP server: ``snake_case.Echo`` and ``with space`` (a name
outside the specification's characters, escaped as ``with~20space``) run; a
tool whose schema has a remote ``$ref`` fails FAILED_PRECONDITION, and the
address it names is never asked. An MCP endpoint that redirects is not
followed and its credential reaches nothing else.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc import aio

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.handler.v1 import handler_pb2 as hpb
from switchboard.api.integration.v1 import integration_pb2 as ipb
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.procs import ServeProcess, scaled_env
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.infra.httprecorder import Reply as HttpReply
from tests.infra.httprecorder import recording
from tests.infra.mcpserver import McpTestServer
from tests.infra.redis import RedisServer
from tests.kits.authkit import PASSWORD, unique_email
from tests.kits.contextkit import Caller, context_stub, create_conversation, create_workspace
from tests.kits.dispatchkit import dispatcher_stub, watch_all
from tests.kits.integrationkit import create, integration_stub

pytestmark = pytest.mark.e2e

CREDENTIAL = "s3cret-in-the-mesh"


@pytest.fixture
def env(tmp_path: Path, postgres_url: str, redis_server: RedisServer) -> dict[str, str]:
    return scaled_env(tmp_path, postgres_url, redis_server.url)


@pytest.fixture
def front(env: dict[str, str]) -> Iterator[ServeProcess]:
    with ServeProcess("--services", "auth,context,events,integration", env=env) as process:
        yield process


async def test_tool_names_schemas_and_redirects_across_processes(
    front: ServeProcess, env: dict[str, str]
) -> None:
    with recording() as schemas, recording() as moved:
        schema = {"type": "object", "properties": {"q": {"$ref": schemas.url("/s.json")}}}
        tools = [
            {"name": "snake_case.Echo", "input_schema": {"type": "object"}},
            {"name": "with space", "input_schema": {"type": "object"}},
            {"name": "remote_ref", "input_schema": schema},
        ]
        moved.routes["/mcp"] = HttpReply(308, {"location": moved.url("/elsewhere")})
        with McpTestServer(extra_tools=tools) as mcp:
            async with FakeOpenAI() as fake:
                llm = {"SWITCHBOARD_LLM_BASE_URL": fake.url, "SWITCHBOARD_LLM_MODEL": "m-1"}
                with ServeProcess("--services", "dispatcher", env={**env, **llm}) as dispatcher:
                    async with (
                        aio.insecure_channel(front.address) as channel,
                        aio.insecure_channel(dispatcher.address) as dispatcher_channel,
                    ):
                        registered = await auth_pb2_grpc.AuthServiceStub(channel).Register(
                            auth_pb2.RegisterRequest(
                                email=unique_email("safety"), password=PASSWORD
                            ),
                            timeout=CALL_DEADLINE_S,
                        )
                        owner = Caller(
                            registered.user.name.removeprefix("users/"),
                            registered.tokens.access_token,
                        )
                        stub = context_stub(channel)
                        workspace = (await create_workspace(stub, owner, "Safety")).name
                        conversation = (await create_conversation(stub, owner, workspace)).name
                        hub = integration_stub(channel)
                        made = await create(
                            hub,
                            owner,
                            workspace,
                            ipb.Integration(kind=ipb.INTEGRATION_KIND_MCP_SERVER, endpoint=mcp.url),
                            integration_id="mcp",
                        )
                        dispatch = dispatcher_stub(dispatcher_channel)
                        assistant = await dispatch.CreateAssistant(
                            pb.CreateAssistantRequest(
                                parent=workspace,
                                assistant=pb.Assistant(
                                    display_name="Safety",
                                    tools=[
                                        pb.AssistantTools(
                                            integration=made.name,
                                            tools=["snake_case.Echo", "with~20space", "remote_ref"],
                                        )
                                    ],
                                ),
                            ),
                            metadata=owner.md,
                            timeout=CALL_DEADLINE_S,
                        )
                        fake.script(
                            Reply.tool_calls(
                                [
                                    ("mcp__snake_case_Echo", {"q": "a"}, "c1"),
                                    ("mcp__with_20space", {"q": "b"}, "c2"),
                                    ("mcp__remote_ref", {"q": "c"}, "c3"),
                                ]
                            ),
                            Reply.text("done"),
                        )
                        sent = await dispatch.SendMessage(
                            pb.SendMessageRequest(
                                conversation=conversation,
                                message=cpb.Message(parts=[cpb.ContentPart(text="call them")]),
                                assistant=assistant.assistant.name,
                            ),
                            metadata=owner.md,
                            timeout=CALL_DEADLINE_S,
                        )
                        seen = await watch_all(dispatch, owner, sent.run.name)
                        assert seen.final.state == pb.RUN_STATE_SUCCEEDED
                        results = {
                            u.tool_result.id: u.tool_result
                            for u in seen.updates
                            if u.WhichOneof("update") == "tool_result"
                        }
                        assert results["c1"].outcome == hpb.TOOL_OUTCOME_SUCCEEDED
                        assert results["c1"].tool == f"{made.name}/tools/snake_case.Echo"
                        assert results["c2"].outcome == hpb.TOOL_OUTCOME_SUCCEEDED
                        assert results["c2"].tool == f"{made.name}/tools/with~20space"
                        assert results["c3"].outcome == hpb.TOOL_OUTCOME_FAILED
                        assert (
                            results["c3"].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
                        )
                        assert "never fetched" in results["c3"].error.message
                        assert schemas.seen == []

                        redirecting = await create(
                            hub,
                            owner,
                            workspace,
                            ipb.Integration(
                                kind=ipb.INTEGRATION_KIND_MCP_SERVER,
                                endpoint=moved.url("/mcp"),
                                credential=CREDENTIAL,
                            ),
                        )
                        with pytest.raises(aio.AioRpcError) as raised:
                            await hub.ListTools(
                                ipb.ListToolsRequest(parent=redirecting.name),
                                metadata=owner.md,
                                timeout=CALL_DEADLINE_S,
                            )
                        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
                        assert "HTTP 308" in (raised.value.details() or "")
                        assert CREDENTIAL not in (raised.value.details() or "")
                        assert {seen.path for seen in moved.seen} == {"/mcp"}
