"""Tokens a server mints to act for a person in another service (the mesh shape:
``rpc/outbound/peers.delegated_session``): for a call made with a session, the session;
with an API key, the key, which must still hold; for a server's own work for the person
(a schedule's tick, memory forming), no credential of theirs, each act authorized on its
resource. Through a real server, its own key ring minting the tokens.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from grpc import aio

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.context.v1 import context_pb2_grpc
from switchboard.platform.rpc.outbound.peers import delegated_session
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.security.policy import AuthMethod, Principal, Scope
from tests.conftest import CALL_DEADLINE_S, make_settings, started
from tests.kits.authkit import bearer, quick_user

pytestmark = [pytest.mark.service, pytest.mark.asyncio(loop_scope="module")]

READ_WRITE = frozenset({Scope.READ, Scope.WRITE})


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh() -> AsyncIterator[SwitchboardServer]:
    async with started(make_settings()) as server:
        yield server


@pytest_asyncio.fixture(loop_scope="module")
async def channel(mesh: SwitchboardServer) -> AsyncIterator[aio.Channel]:
    async with aio.insecure_channel(mesh.address) as chan:
        yield chan


def minted(mesh: SwitchboardServer, principal: Principal) -> str:
    token, _ = mesh.shared.tokens.issue(
        subject=principal.user_id,
        session=delegated_session(principal),
        scopes=[scope.value for scope in principal.scopes],
    )
    return token


async def own_memory(channel: aio.Channel, user_id: str, token: str) -> list[str]:
    stub = context_pb2_grpc.ContextServiceStub(channel)
    response = await stub.ListMemoryItems(
        cpb.ListMemoryItemsRequest(parent=f"users/{user_id}"),
        metadata=bearer(token),
        timeout=CALL_DEADLINE_S,
    )
    return [item.content for item in response.memory_items]


async def test_a_delegated_sid_names_the_session_else_the_key_else_the_work() -> None:
    base = Principal(user_id="u1", auth_method=AuthMethod.PASSWORD, scopes=READ_WRITE)
    assert delegated_session(Principal("u1", AuthMethod.PASSWORD, READ_WRITE, "s1")) == "s1"
    keyed = Principal("u1", AuthMethod.API_KEY, READ_WRITE, api_key_id="k1")
    assert delegated_session(keyed) == "key:k1"
    assert delegated_session(base) == "bg:u1"


async def test_a_servers_own_work_for_a_person_acts_as_them(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    user, _ = await quick_user(mesh)
    token = minted(mesh, Principal(user, AuthMethod.PASSWORD, READ_WRITE))
    assert await own_memory(channel, user, token) == []
    # As them only: another person's memory is not theirs.
    other, _ = await quick_user(mesh)
    with pytest.raises(aio.AioRpcError) as error:
        await own_memory(channel, other, token)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_call_made_with_an_api_key_holds_only_while_the_key_does(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    user, session_token = await quick_user(mesh)
    auth = auth_pb2_grpc.AuthServiceStub(channel)
    created = await auth.CreateApiKey(
        auth_pb2.CreateApiKeyRequest(display_name="ci", scopes=["read", "write"]),
        metadata=bearer(session_token),
        timeout=CALL_DEADLINE_S,
    )
    key_id = created.api_key.name.rsplit("/", 1)[-1]
    token = minted(mesh, Principal(user, AuthMethod.API_KEY, READ_WRITE, api_key_id=key_id))
    assert await own_memory(channel, user, token) == []
    await auth.RevokeApiKey(
        auth_pb2.RevokeApiKeyRequest(name=created.api_key.name),
        metadata=bearer(session_token),
        timeout=CALL_DEADLINE_S,
    )
    with pytest.raises(aio.AioRpcError) as error:
        await own_memory(channel, user, token)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_token_of_a_session_still_needs_the_session(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    user, _ = await quick_user(mesh)
    token = minted(mesh, Principal(user, AuthMethod.PASSWORD, READ_WRITE, "no-such-session"))
    with pytest.raises(aio.AioRpcError) as error:
        await own_memory(channel, user, token)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
