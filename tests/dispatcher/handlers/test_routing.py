"""Routing with and without a workspace default assistant: every rule picks the
handler docs/dispatcher.md says, and ``Run.routing_reason`` names that rule.

The default assistant answers with ``llm`` (its handler left empty, as in the
README); every rule here routes to ``echo``, so a run that wrongly falls to the
assistant shows in its handler, its assistant and its reason. The model is
never reached: only the choice made at SendMessage is checked, plus the text an
echo run answers where a command prefix is involved.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
from google.protobuf import struct_pb2

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from tests.conftest import CALL_DEADLINE_S
from tests.kits.contextkit import Caller, create_conversation, create_workspace, new_caller, struct
from tests.kits.dispatchkit import Stub, limited, request, send, watch_all

pytestmark = pytest.mark.service

ROUTED = "workspaces/routed"  # has a workspace:routed=echo route
PLAIN = "workspaces/plain"  # has no route of its own


@dataclass(frozen=True)
class Setup:
    stub: Stub
    owner: Caller
    conversations: dict[str, str]  # workspace name -> a conversation in it


@pytest.fixture(params=[False, True], ids=["no-default-assistant", "default-assistant"])
async def setup(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Setup, bool]]:
    with_default = bool(request.param)
    async with limited(
        llm_base_url="http://127.0.0.1:1/v1",  # never answers: only the choice matters
        llm_model="test-model",
        dispatcher_default_handler="echo",
        dispatcher_routes="/repeat=echo,type:application/json=echo,workspace:routed=echo",
    ) as (server, cstub, dstub):
        owner = await new_caller(server)
        conversations: dict[str, str] = {}
        for workspace in (ROUTED, PLAIN):
            await create_workspace(cstub, owner, workspace_id=workspace.split("/")[1])
            conversations[workspace] = (await create_conversation(cstub, owner, workspace)).name
            await _assistant(
                dstub, owner, workspace, "named", pb.Assistant(handler="handlers/echo")
            )
            if with_default:
                await _assistant(
                    dstub, owner, workspace, "helper", pb.Assistant(workspace_default=True)
                )
        yield Setup(dstub, owner, conversations), with_default


async def _assistant(
    stub: Stub, owner: Caller, workspace: str, assistant_id: str, assistant: pb.Assistant
) -> None:
    await stub.CreateAssistant(
        pb.CreateAssistantRequest(parent=workspace, assistant_id=assistant_id, assistant=assistant),
        metadata=owner.md,
        timeout=CALL_DEADLINE_S,
    )


def _with_metadata(conversation: str) -> pb.SendMessageRequest:
    sent = request(conversation, "routed by metadata")
    sent.message.metadata.CopyFrom(struct(handler="handlers/echo"))
    return sent


def _with_data(conversation: str) -> pb.SendMessageRequest:
    data = struct_pb2.Struct()
    data.update({"order": 42})
    return pb.SendMessageRequest(
        conversation=conversation, message=cpb.Message(parts=[cpb.ContentPart(data=data)])
    )


def _naming(conversation: str) -> pb.SendMessageRequest:
    sent = request(conversation, "hello")
    sent.assistant = conversation.split("/conversations/", maxsplit=1)[0] + "/assistants/named"
    return sent


Build = Callable[[str], pb.SendMessageRequest]
# (case, workspace, the request, its reason and handler with no default assistant)
RULES: list[tuple[str, str, Build, str, str]] = [
    (
        "handler in the request",
        ROUTED,
        lambda c: request(c, "/repeat hello", handler="handlers/echo"),
        "named in the request",
        "echo",
    ),
    (
        "assistant in the request",
        ROUTED,
        _naming,
        f"the assistant {ROUTED}/assistants/named, named in the request",
        "echo",
    ),
    ("metadata", ROUTED, _with_metadata, "named in message metadata", "echo"),
    ("content type", ROUTED, _with_data, "content type application/json", "echo"),
    (
        "command route",
        ROUTED,
        lambda c: request(c, "/repeat hello"),
        "command prefix /repeat",
        "echo",
    ),
    (
        "handler as command",
        PLAIN,
        lambda c: request(c, "/echo hello"),
        "command prefix /echo",
        "echo",
    ),
]


@pytest.mark.parametrize(
    ("case", "workspace", "build", "reason", "handler"), RULES, ids=[r[0] for r in RULES]
)
async def test_the_message_s_own_choice_wins_over_a_default_assistant(
    setup: tuple[Setup, bool], case: str, workspace: str, build: Build, reason: str, handler: str
) -> None:
    s, _ = setup
    sent = await send(s.stub, s.owner, build(s.conversations[workspace]))
    assert (sent.run.routing_reason, sent.run.handler) == (reason, f"handlers/{handler}")
    named = case == "assistant in the request"
    assert sent.run.assistant == (f"{workspace}/assistants/named" if named else "")
    seen = await watch_all(s.stub, s.owner, sent.run.name)
    assert seen.final.state == pb.RUN_STATE_SUCCEEDED
    if case.startswith(("command", "handler as command")):
        assert seen.text.startswith("hello")  # the handler never sees the command word


@pytest.mark.parametrize(
    ("workspace", "reason"),
    [(ROUTED, "the route workspace:routed"), (PLAIN, "the default handler")],
    ids=["workspace route", "process default"],
)
async def test_a_default_assistant_comes_before_the_routes_and_the_default_handler(
    setup: tuple[Setup, bool], workspace: str, reason: str
) -> None:
    s, with_default = setup
    sent = await send(s.stub, s.owner, request(s.conversations[workspace], "plain words"))
    if with_default:
        helper = f"{workspace}/assistants/helper"
        assert sent.run.routing_reason == f"the workspace's default assistant {helper}"
        assert (sent.run.handler, sent.run.assistant) == ("handlers/llm", helper)
    else:
        assert sent.run.routing_reason == reason
        assert (sent.run.handler, sent.run.assistant) == ("handlers/echo", "")
