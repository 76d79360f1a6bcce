"""Revocation across real processes sharing a database and a real redis-server.

Two `switchboard serve` processes, A and B, share one database, one Redis
and one signing key. A session revoked through A must be refused by B on the
very next call, including while Redis is paused (SIGSTOP) or dead (SIGKILL),
and no call may hang meanwhile. Streams open on B end as soon as access is
lost through A: a member removed (the event reaches B through the shared log),
a session logged out (the revocation message), also while Redis is paused
(B re-checks its streams against the database).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from grpc import aio

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as dpb
from tests.conftest import CALL_DEADLINE_S
from tests.e2e import modulescope
from tests.e2e.procs import ServeProcess, shared_env
from tests.infra.postgres import PostgresServer
from tests.infra.redis import RedisServer
from tests.kits.authkit import PASSWORD, bearer, reason, register, unique_email, user_id
from tests.kits.contextkit import (
    Caller,
    add_member,
    context_stub,
    create_conversation,
    create_workspace,
)
from tests.kits.dispatchkit import dispatcher_stub, request, send

pytestmark = pytest.mark.e2e

# What "at once" means in the asserts: well above the bounded fallbacks (redis timeout
# 0.2 s, lease 0.6 s) that a revocation may wait out, far below a hang.
PROMPT_S = 5.0


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The module's Redis (the conftest's is per test): a test that pauses or kills it
    brings it back before it ends."""
    yield from modulescope.redis(tmp_path_factory)


@pytest.fixture(scope="module")
def database_url(postgres_server: PostgresServer, migrated_template: str) -> Iterator[str]:
    yield from modulescope.database(postgres_server, migrated_template)


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisServer,
    database_url: str,
) -> Iterator[tuple[ServeProcess, ServeProcess]]:
    """A and B, started once for the module: every test works with users, sessions and
    workspaces of its own, and leaves Redis running."""
    env = {
        # Processes share PostgreSQL: a SQLite file belongs to one process.
        **shared_env(tmp_path_factory.mktemp("pair"), database_url, redis_server.url),
        "SWITCHBOARD_REDIS_TIMEOUT_S": "0.2",
        "SWITCHBOARD_REDIS_LEASE_S": "0.6",
        # A stream ended within seconds was ended by the change, not by this timer.
        "SWITCHBOARD_EVENTS_REAUTHORIZE_S": "3600",
    }
    with ServeProcess(env=env) as a, ServeProcess(env=env) as b:
        yield a, b


def _stub(channel: grpc.Channel) -> auth_pb2_grpc.AuthServiceStub:
    return auth_pb2_grpc.AuthServiceStub(channel)


def _register(stub: auth_pb2_grpc.AuthServiceStub, email: str) -> auth_pb2.RegisterResponse:
    response: auth_pb2.RegisterResponse = stub.Register(
        auth_pb2.RegisterRequest(email=email, password=PASSWORD, display_name="E2E"),
        timeout=CALL_DEADLINE_S,
    )
    return response


def _login(stub: auth_pb2_grpc.AuthServiceStub, email: str) -> auth_pb2.LoginResponse:
    response: auth_pb2.LoginResponse = stub.Login(
        auth_pb2.LoginRequest(password=auth_pb2.PasswordCredential(email=email, password=PASSWORD)),
        timeout=CALL_DEADLINE_S,
    )
    return response


def _who(stub: auth_pb2_grpc.AuthServiceStub, access: str) -> grpc.StatusCode:
    try:
        stub.GetPrincipal(
            auth_pb2.GetPrincipalRequest(), metadata=bearer(access), timeout=CALL_DEADLINE_S
        )
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _revoke(stub: auth_pb2_grpc.AuthServiceStub, access: str, session: str) -> float:
    started = time.monotonic()
    stub.RevokeSession(
        auth_pb2.RevokeSessionRequest(name=session),
        metadata=bearer(access),
        timeout=CALL_DEADLINE_S,
    )
    return time.monotonic() - started


def test_revocation_through_a_reaches_b_at_once(pair: tuple[ServeProcess, ServeProcess]) -> None:
    a, b = pair
    with grpc.insecure_channel(a.address) as ca, grpc.insecure_channel(b.address) as cb:
        sa, sb = _stub(ca), _stub(cb)
        email = unique_email("e2e")
        victim = _register(sa, email)
        admin = _login(sa, email)
        # B verifies and caches the victim's token and session.
        assert _who(sb, victim.tokens.access_token) == grpc.StatusCode.OK
        assert _who(sb, victim.tokens.access_token) == grpc.StatusCode.OK
        _revoke(sa, admin.tokens.access_token, victim.session.name)
        assert _who(sb, victim.tokens.access_token) == grpc.StatusCode.UNAUTHENTICATED
        assert _who(sb, admin.tokens.access_token) == grpc.StatusCode.OK


@pytest.mark.parametrize("outage", ["pause", "kill"])
def test_revoked_tokens_stay_rejected_while_redis_is_down(
    pair: tuple[ServeProcess, ServeProcess], redis_server: RedisServer, outage: str
) -> None:
    a, b = pair
    with grpc.insecure_channel(a.address) as ca, grpc.insecure_channel(b.address) as cb:
        sa, sb = _stub(ca), _stub(cb)
        email = unique_email("outage")
        before = _register(sa, email)  # revoked before the outage
        during = _login(sa, email)  # revoked during the outage
        admin = _login(sa, email)
        for token in (before, during, admin):
            assert _who(sb, token.tokens.access_token) == grpc.StatusCode.OK
        _revoke(sa, admin.tokens.access_token, before.session.name)
        assert _who(sb, before.tokens.access_token) == grpc.StatusCode.UNAUTHENTICATED

        if outage == "pause":
            redis_server.pause()
        else:
            redis_server.kill()
        try:
            # A cannot publish; it waits out the lease (bounded) so B stops trusting its cache.
            took = _revoke(sa, admin.tokens.access_token, during.session.name)
            assert took < PROMPT_S
            assert _who(sb, during.tokens.access_token) == grpc.StatusCode.UNAUTHENTICATED
            assert _who(sb, before.tokens.access_token) == grpc.StatusCode.UNAUTHENTICATED
            # Still-valid sessions keep working from the database fallback, on both sides.
            assert _who(sb, admin.tokens.access_token) == grpc.StatusCode.OK
            assert _who(sa, admin.tokens.access_token) == grpc.StatusCode.OK
            # Logins still work: rate limits fall back to memory instead of hanging.
            assert _login(sb, email).tokens.access_token
        finally:
            if outage == "pause":
                redis_server.resume()
            else:
                redis_server.restart()
        assert _who(sb, during.tokens.access_token) == grpc.StatusCode.UNAUTHENTICATED
        assert _who(sb, admin.tokens.access_token) == grpc.StatusCode.OK


# -- open streams on B, access lost through A -------------------------------------------------

# What read() returns once a stream has ended (not in the type stubs).
_EOF: Any = getattr(grpc.aio, "EOF")  # noqa: B009
#: A run on B that produces deltas for longer than any test: 3,000 words, 20 ms apart.
_STEADY = " ".join(["w"] * 3000)


class _Streams:
    """An owner and a member (editor) of a workspace made through A, and the run B executes."""

    def __init__(self, a: aio.Channel, b: aio.Channel) -> None:
        self.a, self.b = a, b

    async def start(self) -> None:
        owner, member = await register(self.a), await register(self.a)
        self.owner = Caller(user_id(owner.user.name), owner.tokens.access_token)
        self.member = Caller(user_id(member.user.name), member.tokens.access_token)
        context = context_stub(self.a)
        self.workspace = (await create_workspace(context, self.owner, "Streams")).name
        await add_member(
            context, self.owner, self.workspace, self.member, cpb.WORKSPACE_ROLE_EDITOR
        )
        self.conversation = (await create_conversation(context, self.owner, self.workspace)).name

    async def steady_run(self) -> str:
        """A run sent to B by the owner: B executes it and B's feed relays it."""
        sent = await send(
            dispatcher_stub(self.b), self.owner, request(self.conversation, _STEADY, delay_ms=20)
        )
        return sent.run.name

    def watch(self, run: str) -> Any:
        return dispatcher_stub(self.b).WatchRun(
            dpb.WatchRunRequest(name=run), metadata=self.member.md, timeout=CALL_DEADLINE_S
        )


async def _outgoing(queue: asyncio.Queue[Any]) -> AsyncIterator[Any]:
    while (item := await queue.get()) is not None:
        yield item


async def _until(call: Any, wanted: Any) -> Any:
    """Read ``call`` until a frame ``wanted`` accepts, within one deadline."""
    async with asyncio.timeout(CALL_DEADLINE_S):
        while True:
            frame = await call.read()
            assert frame is not _EOF, "the stream ended"
            if wanted(frame):
                return frame


async def _ended(call: Any) -> tuple[aio.AioRpcError, float]:
    """Read ``call`` until it fails; (the failure, seconds it took)."""
    started = time.monotonic()
    try:
        await _until(call, lambda _: False)
    except aio.AioRpcError as exc:
        return exc, time.monotonic() - started
    raise AssertionError("unreachable")


def _delta(frame: Any) -> bool:
    return bool(frame.HasField("update") and frame.update.HasField("delta"))


async def test_removal_and_logout_through_a_end_streams_on_b(
    pair: tuple[ServeProcess, ServeProcess],
) -> None:
    a, b = pair
    async with aio.insecure_channel(a.address) as ca, aio.insecure_channel(b.address) as cb:
        world = _Streams(ca, cb)
        await world.start()
        run = await world.steady_run()
        watch = world.watch(run)
        commands: asyncio.Queue[Any] = asyncio.Queue()
        converse: Any = dispatcher_stub(cb).Converse(
            _outgoing(commands), metadata=world.member.md, timeout=CALL_DEADLINE_S
        )
        try:
            commands.put_nowait(
                dpb.ConverseRequest(client_request_id="w", watch_run=dpb.WatchRunRequest(name=run))
            )
            await _until(watch, _delta)
            await _until(converse, _delta)

            # Removed through A: the event reaches B through the shared log.
            await context_stub(ca).RemoveWorkspaceMember(
                cpb.RemoveWorkspaceMemberRequest(
                    name=f"{world.workspace}/members/{world.member.id}"
                ),
                metadata=world.owner.md,
                timeout=CALL_DEADLINE_S,
            )
            error, took = await _ended(watch)
            assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
            assert took < PROMPT_S
            frame = await _until(converse, lambda f: f.HasField("error"))
            assert frame.error.code == grpc.StatusCode.NOT_FOUND.value[0]
            assert run in frame.error.message

            # Logged out through A: the revocation message reaches B; the stream ends.
            await auth_pb2_grpc.AuthServiceStub(ca).Logout(
                auth_pb2.LogoutRequest(), metadata=world.member.md, timeout=CALL_DEADLINE_S
            )
            error, took = await _ended(converse)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.details()
            assert reason(error) == "ERROR_REASON_SESSION_REVOKED"
            assert took < PROMPT_S
        finally:
            watch.cancel()
            converse.cancel()
            await dispatcher_stub(cb).CancelRun(
                dpb.CancelRunRequest(name=run), metadata=world.owner.md, timeout=CALL_DEADLINE_S
            )


async def test_a_role_changed_through_a_holds_on_bs_very_next_call(
    pair: tuple[ServeProcess, ServeProcess],
) -> None:
    """B answers workspace calls' access checks from its membership cache: a change made
    through A drops it (the change's message) before the caller can reach B."""
    a, b = pair
    async with aio.insecure_channel(a.address) as ca, aio.insecure_channel(b.address) as cb:
        world = _Streams(ca, cb)
        await world.start()
        on_b = context_stub(cb)

        async def create_on_b() -> grpc.StatusCode:
            try:
                await create_conversation(on_b, world.member, world.workspace)
            except aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        # B checks (and caches) the editor's role, twice.
        assert await create_on_b() == grpc.StatusCode.OK
        assert await create_on_b() == grpc.StatusCode.OK
        member_name = f"{world.workspace}/members/{world.member.id}"
        await context_stub(ca).UpdateWorkspaceMember(
            cpb.UpdateWorkspaceMemberRequest(
                member=cpb.WorkspaceMember(name=member_name, role=cpb.WORKSPACE_ROLE_VIEWER),
                update_mask=field_mask_pb2.FieldMask(paths=["role"]),
            ),
            metadata=world.owner.md,
            timeout=CALL_DEADLINE_S,
        )
        assert await create_on_b() == grpc.StatusCode.PERMISSION_DENIED
        await context_stub(ca).RemoveWorkspaceMember(
            cpb.RemoveWorkspaceMemberRequest(name=member_name),
            metadata=world.owner.md,
            timeout=CALL_DEADLINE_S,
        )
        assert await create_on_b() == grpc.StatusCode.NOT_FOUND


async def test_logout_through_a_ends_a_stream_on_b_while_redis_is_paused(
    pair: tuple[ServeProcess, ServeProcess], redis_server: RedisServer
) -> None:
    a, b = pair
    async with aio.insecure_channel(a.address) as ca, aio.insecure_channel(b.address) as cb:
        world = _Streams(ca, cb)
        await world.start()
        run = await world.steady_run()
        watch = world.watch(run)
        try:
            await _until(watch, _delta)
            redis_server.pause()
            try:
                # A cannot publish the revocation; it waits out the lease, and B,
                # no longer fresh, re-checks its streams against the database.
                await auth_pb2_grpc.AuthServiceStub(ca).Logout(
                    auth_pb2.LogoutRequest(), metadata=world.member.md, timeout=CALL_DEADLINE_S
                )
                error, took = await _ended(watch)
            finally:
                redis_server.resume()
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.details()
            assert reason(error) == "ERROR_REASON_SESSION_REVOKED"
            assert took < PROMPT_S
        finally:
            watch.cancel()
            await dispatcher_stub(cb).CancelRun(
                dpb.CancelRunRequest(name=run), metadata=world.owner.md, timeout=CALL_DEADLINE_S
            )
