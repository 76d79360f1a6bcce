"""API keys that pin assistants at a revision (ApiKey.assistant_pins; docs/assistants.md,
"Revisions"): a message sent with the key answers with the pinned revision of its
assistant (named or the workspace's default) unless the message pins one itself, and a
server acting for a call made with the key (a delegated ``key:`` token) keeps the pins."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.platform.rpc.outbound.peers import delegated_session
from switchboard.platform.security.policy import AuthMethod, Principal, Scope
from tests.conftest import CALL_DEADLINE_S
from tests.dispatcher.assistants.test_assistants import Desk, desk_mesh
from tests.dispatcher.assistants.test_revisions import two_revisions
from tests.kits.authkit import bearer
from tests.kits.contextkit import Caller, context_stub, create_conversation, refused, violations
from tests.kits.dispatchkit import request, send

pytestmark = pytest.mark.service

CODE = grpc.StatusCode


@pytest.fixture
async def desk() -> Any:
    async with desk_mesh() as made:
        yield made


async def new_key(
    d: Desk, caller: Caller, pins: list[tuple[str, int]]
) -> tuple[auth_pb2.ApiKey, str]:
    created = await auth_pb2_grpc.AuthServiceStub(d.channel).CreateApiKey(
        auth_pb2.CreateApiKeyRequest(
            display_name="pinned",
            scopes=["read", "write"],
            assistant_pins=[
                auth_pb2.ApiKeyAssistantPin(assistant=name, revision=revision)
                for name, revision in pins
            ],
        ),
        metadata=caller.md,
        timeout=CALL_DEADLINE_S,
    )
    return created.api_key, created.secret


async def test_a_keys_pin_holds_for_named_and_default_assistants(desk: Desk) -> None:
    d = desk
    current = await two_revisions(d, workspace_default=True)
    assert current.revision == 2
    key, secret = await new_key(d, d.world.editor, [(current.name, 1)])
    assert [(p.assistant, p.revision) for p in key.assistant_pins] == [(current.name, 1)]
    keyed = Caller(d.world.editor.id, secret)
    conversation = (await create_conversation(context_stub(d.channel), keyed, d.world.name)).name

    named = request(conversation, "named words")
    named.assistant = current.name
    sent = await send(d.stub, keyed, named)
    assert (sent.run.assistant_revision, sent.run.handler) == (1, "handlers/echo")
    assert "pinned by the API key" in sent.run.routing_reason
    # The workspace's default, named by nobody, is pinned too.
    defaulted = await send(d.stub, keyed, request(conversation, "default words"))
    assert (defaulted.run.assistant, defaulted.run.assistant_revision) == (current.name, 1)
    # What a message would use, as DescribeConversation says it for the key.
    described = await d.stub.DescribeConversation(
        pb.DescribeConversationRequest(conversation=conversation),
        metadata=keyed.md,
        timeout=CALL_DEADLINE_S,
    )
    assert described.assistant.revision == 1
    # A message's own pin wins over the key's.
    own = request(conversation, "own pin")
    own.assistant, own.assistant_revision = current.name, 2
    assert (await send(d.stub, keyed, own)).run.assistant_revision == 2
    # The same person signed in, without the key: the current revision.
    session = await send(d.stub, d.world.editor, request(conversation, "session words"))
    assert session.run.assistant_revision == 2


async def test_a_pin_the_assistant_no_longer_keeps_is_not_found(desk: Desk) -> None:
    d = desk
    current = await two_revisions(d)
    _, secret = await new_key(d, d.world.editor, [(current.name, 7)])
    keyed = Caller(d.world.editor.id, secret)
    conversation = (await create_conversation(context_stub(d.channel), keyed, d.world.name)).name
    message = request(conversation, "words")
    message.assistant = current.name
    await refused(send(d.stub, keyed, message), CODE.NOT_FOUND)


async def test_malformed_pins_are_refused_field_by_field(desk: Desk) -> None:
    d = desk
    name = f"{d.world.name}/assistants/a"
    error = await refused(
        new_key(d, d.world.editor, [("not-an-assistant", 1), (name, 0), (name, 2)]),
        CODE.INVALID_ARGUMENT,
    )
    assert violations(error) == [
        "assistant_pins[0].assistant",
        "assistant_pins[1].revision",
        "assistant_pins[2].assistant",
    ]
    error = await refused(
        new_key(d, d.world.editor, [(f"{d.world.name}/assistants/a{n}", 1) for n in range(17)]),
        CODE.INVALID_ARGUMENT,
    )
    assert violations(error) == ["assistant_pins"]


async def test_a_server_acting_for_a_keyed_call_keeps_its_pins(desk: Desk) -> None:
    d = desk
    current = await two_revisions(d)
    key, _ = await new_key(d, d.world.editor, [(current.name, 1)])
    keyed = Principal(
        d.world.editor.id,
        AuthMethod.API_KEY,
        frozenset({Scope.READ, Scope.WRITE}),
        api_key_id=key.name.rsplit("/", 1)[-1],
    )
    shared = d.server.shared
    token, _ = shared.tokens.issue(
        subject=keyed.user_id,
        session=delegated_session(keyed),
        scopes=[scope.value for scope in keyed.scopes],
    )
    acting = await shared.authenticator.authenticate(token)
    assert acting.api_key_id == keyed.api_key_id
    assert acting.assistant_pins == ((current.name, 1),)
    assert acting.pinned(current.name) == 1
    # Through the server: SendMessage with the delegated token is pinned as the key's.
    conversation = (
        await create_conversation(context_stub(d.channel), d.world.editor, d.world.name)
    ).name
    message = request(conversation, "acting words")
    message.assistant = current.name
    sent = await d.stub.SendMessage(message, metadata=bearer(token), timeout=CALL_DEADLINE_S)
    assert sent.run.assistant_revision == 1
