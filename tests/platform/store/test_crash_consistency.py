"""Crash consistency in process: every committed write has its event, a run's stored
state never contradicts its events, and a run taken over after its owner died is
numbered after everything its watchers saw.

Faults are injected at the seam they stand for: the event log refusing an event
right after the write committed (the process "died" between commit and
publish), the database refusing a run's saves, a replica that stops renewing
its lease. Everything else is real: servers, SQLite or PostgreSQL, Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from grpc import aio
from sqlalchemy import event as sql_event
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.dispatcher.runs.core.store import TERMINAL
from switchboard.dispatcher.service import SEQUENCE_BLOCK, Dispatcher
from switchboard.mesh import create_server
from switchboard.platform.errors import DependencyUnavailable
from switchboard.platform.events.eventlog import LocalLog, Logged
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.store.db import DatabaseUnavailable, Group
from switchboard.platform.store.models import EventLogRow, EventOutboxRow, RunRow, UserRow
from tests.conftest import CALL_DEADLINE_S, built, make_settings
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.infra.redis import RedisServer
from tests.kits.authkit import (
    PASSWORD,
    bearer,
    id_token,
    oidc_settings,
    register,
    unique_email,
    user_id,
)
from tests.kits.contextkit import Stub as ContextStub
from tests.kits.contextkit import (
    World,
    all_messages,
    context_stub,
    create_conversation,
    ctx_world,
)
from tests.kits.dispatchkit import (
    Renewals,
    dispatcher_stub,
    eventually,
    get_run,
    limited,
    read_until,
    request,
    send,
    start_replicas,
    watch_all,
)
from tests.kits.dispatchkit import Stub as DispatcherStub

pytestmark = pytest.mark.service


class RefusedOnce:
    """Makes the event log refuse the first batch holding an event ``matches``
    picks, as if the process died right after the write committed."""

    def __init__(self, server: SwitchboardServer, matches: Callable[[events_pb2.Event], bool]):
        backend = server.shared.bus._backend
        self.refused: list[events_pb2.Event] = []
        append_many, append = backend.append_many, backend.append

        async def refusing_many(events: Sequence[events_pb2.Event]) -> None:
            if not self.refused and any(matches(e) for e in events):
                self.refused.extend(events)
                raise DependencyUnavailable("the event log is unavailable; retry")
            await append_many(events)

        async def refusing(event: events_pb2.Event) -> events_pb2.Event:
            if not self.refused and matches(event):
                self.refused.append(event)
                raise DependencyUnavailable("the event log is unavailable; retry")
            return await append(event)

        backend.append_many = refusing_many  # type: ignore[method-assign]
        backend.append = refusing  # type: ignore[method-assign]


def inline(server: SwitchboardServer) -> bool:
    """Whether a write's events go to the log in its own transaction (the embedded
    log on a SQLite file: ``Outbox.inline``), so there is no outbox to lose them from."""
    outbox = server.shared.bus.outbox
    return outbox is not None and outbox.inline is not None


class AnswerLostOnce:
    """The first group commit that logs an event ``matches`` picks commits, and then its
    answer is lost (the loop stopped waiting for the thread, as a timeout does): nobody
    is told, its events are not delivered, and its writers see the write fail."""

    def __init__(self, server: SwitchboardServer, matches: Callable[[events_pb2.Event], bool]):
        database = server.shared.database
        real = database._commit_group
        self.lost: list[events_pb2.Event] = []

        def commit_group(works: Any, group: Group) -> Any:
            outcomes = real(works, group)
            if not self.lost:
                logged = [
                    item.event
                    for callback in group.after
                    if isinstance(callback, partial)
                    for item in (callback.args[0] if callback.args else ())
                    if isinstance(item, Logged)
                ]
                if any(matches(event) for event in logged):
                    self.lost.extend(logged)
                    raise TimeoutError("committed, but the answer did not arrive in time")
            return outcomes

        database._commit_group = commit_group  # type: ignore[method-assign]


async def _logged_ids(server: SwitchboardServer) -> list[str]:
    """The ids of every event in the log table, in log order."""
    async with server.shared.database.readers() as db:
        rows = (await db.execute(select(EventLogRow.data).order_by(EventLogRow.seq))).scalars()
        return [events_pb2.Event.FromString(data).id for data in rows]


def logged(server: SwitchboardServer, kind: int, name: str) -> list[events_pb2.Event]:
    """The events of ``kind`` about ``name`` in the process's log window."""
    found = []
    for event in server.shared.bus.recent():
        if event.type != kind:
            continue
        payload = event.WhichOneof("payload")
        if payload == "message_created" and event.message_created.message.name == name:
            found.append(event)
        if payload == "workspace_changed" and event.workspace_changed.workspace.name == name:
            found.append(event)
    return found


# -- every committed write has its event --------------------------------------------------


async def test_a_retried_append_publishes_the_event_its_first_attempt_lost() -> None:
    async with limited() as (server, stub, _):
        world = await ctx_world(server, stub)
        conversation = (await create_conversation(stub, world.editor, world.name)).name
        RefusedOnce(server, lambda e: e.type == events_pb2.EVENT_TYPE_MESSAGE_CREATED)
        append = cpb.AppendMessageRequest(
            parent=conversation,
            message=cpb.Message(role=cpb.MESSAGE_ROLE_USER, parts=[cpb.ContentPart(text="hello")]),
            request_id="append-once",
        )
        try:
            first: cpb.Message | None = (
                await stub.AppendMessage(append, metadata=world.editor.md, timeout=CALL_DEADLINE_S)
            ).message
        except aio.AioRpcError:
            first = None  # the client did not hear back: it retries
        again = (
            await stub.AppendMessage(append, metadata=world.editor.md, timeout=CALL_DEADLINE_S)
        ).message
        if first is not None:
            assert again.name == first.name
        # The retry's answer is acknowledged: its event is in the log now, once.
        events = logged(server, events_pb2.EVENT_TYPE_MESSAGE_CREATED, again.name)
        assert [e.message_created.message.name for e in events] == [again.name]


async def test_a_write_whose_event_was_lost_gets_it_without_a_retry() -> None:
    async with limited() as (server, stub, _):
        world = await ctx_world(server, stub)
        name = world.name
        RefusedOnce(
            server,
            lambda e: (
                e.type == events_pb2.EVENT_TYPE_WORKSPACE_CHANGED
                and e.workspace_changed.change == events_pb2.CHANGE_KIND_UPDATED
            ),
        )
        workspace = world.workspace
        workspace.display_name = "Renamed"
        update = cpb.UpdateWorkspaceRequest(workspace=workspace)
        update.update_mask.paths.append("display_name")
        with contextlib.suppress(aio.AioRpcError):  # committed either way; nobody retries
            await stub.UpdateWorkspace(update, metadata=world.owner.md, timeout=CALL_DEADLINE_S)

        async def published() -> bool:
            events = logged(server, events_pb2.EVENT_TYPE_WORKSPACE_CHANGED, name)
            return any(e.workspace_changed.workspace.display_name == "Renamed" for e in events)

        await eventually(published, "the outbox relay to publish the update")
        renamed = [
            e
            for e in logged(server, events_pb2.EVENT_TYPE_WORKSPACE_CHANGED, name)
            if e.workspace_changed.workspace.display_name == "Renamed"
        ]
        assert len(renamed) == 1


async def test_a_retry_that_read_the_leftovers_before_they_were_logged_does_not_log_twice() -> None:
    """The race CI met: the first attempt commits; its retry (same request id)
    replays and reads the first attempt's outbox row; the first attempt logs the
    event and deletes the row; only then does the retry publish what it read."""
    async with limited() as (server, stub, _):
        world = await ctx_world(server, stub)
        conversation = (await create_conversation(stub, world.editor, world.name)).name
        bus, outbox = server.shared.bus, server.shared.bus.outbox
        assert outbox is not None
        loop = asyncio.get_running_loop()
        first_committed, retry_read, first_logged = (
            asyncio.Event(),
            asyncio.Event(),
            asyncio.Event(),
        )
        publish_staged, leftovers = bus.publish_staged, outbox.leftovers
        calls = 0

        async def ordered(events: Sequence[events_pb2.Event]) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:  # the first attempt: log only once the retry has read
                first_committed.set()
                await retry_read.wait()
                await publish_staged(events)
                first_logged.set()
            else:  # the retry: publish what it read, after the first attempt logged it
                await first_logged.wait()
                await publish_staged(events)

        def reading(db: Session, key: str) -> list[events_pb2.Event]:
            found: list[events_pb2.Event] = leftovers(db, key)
            loop.call_soon_threadsafe(retry_read.set)
            return found

        bus.publish_staged = ordered  # type: ignore[method-assign]
        outbox.leftovers = reading  # type: ignore[method-assign]
        append = cpb.AppendMessageRequest(
            parent=conversation,
            message=cpb.Message(role=cpb.MESSAGE_ROLE_USER, parts=[cpb.ContentPart(text="hi")]),
            request_id="append-raced",
        )
        first = asyncio.ensure_future(
            stub.AppendMessage(append, metadata=world.editor.md, timeout=CALL_DEADLINE_S)
        )
        await asyncio.wait_for(first_committed.wait(), CALL_DEADLINE_S)
        again = await stub.AppendMessage(append, metadata=world.editor.md, timeout=CALL_DEADLINE_S)
        assert (await first).message.name == again.message.name
        assert retry_read.is_set()
        assert calls == 2
        events = logged(server, events_pb2.EVENT_TYPE_MESSAGE_CREATED, again.message.name)
        assert [e.message_created.message.name for e in events] == [again.message.name]


# -- auth: every security event of a committed write ------------------------------------

Act = Callable[[], Awaitable[object]]


class AuthWorld:
    def __init__(self, channel: aio.Channel, idp_key: rsa.RSAPrivateKey) -> None:
        self.channel = channel
        self.stub = auth_pb2_grpc.AuthServiceStub(channel)
        self.idp_key = idp_key

    async def login(self, email: str) -> auth_pb2.LoginResponse:
        response: auth_pb2.LoginResponse = await self.stub.Login(
            auth_pb2.LoginRequest(
                password=auth_pb2.PasswordCredential(email=email, password=PASSWORD)
            ),
            timeout=CALL_DEADLINE_S,
        )
        return response


async def _register(world: AuthWorld) -> Act:
    email = unique_email("crash")
    return lambda: register(world.channel, email)


async def _login(world: AuthWorld) -> Act:
    email = (await register(world.channel)).user.email
    return lambda: world.login(email)


async def _oidc_first_login(world: AuthWorld) -> Act:
    token = id_token(world.idp_key)
    return lambda: world.stub.Login(
        auth_pb2.LoginRequest(oidc=auth_pb2.OidcCredential(id_token=token)), timeout=CALL_DEADLINE_S
    )


async def _evicting_login(world: AuthWorld) -> Act:
    email = (await register(world.channel)).user.email
    await world.login(email)  # the limit (2) is reached: the next login evicts one
    return lambda: world.login(email)


async def _logout(world: AuthWorld) -> Act:
    token = (await register(world.channel)).tokens.access_token
    return lambda: world.stub.Logout(
        auth_pb2.LogoutRequest(), metadata=bearer(token), timeout=CALL_DEADLINE_S
    )


async def _revoke_session(world: AuthWorld) -> Act:
    registered = await register(world.channel)
    other = (await world.login(registered.user.email)).session.name
    return lambda: world.stub.RevokeSession(
        auth_pb2.RevokeSessionRequest(name=other),
        metadata=bearer(registered.tokens.access_token),
        timeout=CALL_DEADLINE_S,
    )


async def _revoke_all_sessions(world: AuthWorld) -> Act:
    registered = await register(world.channel)
    await world.login(registered.user.email)
    return lambda: world.stub.RevokeAllSessions(
        auth_pb2.RevokeAllSessionsRequest(keep_current=True),
        metadata=bearer(registered.tokens.access_token),
        timeout=CALL_DEADLINE_S,
    )


async def _refresh_reuse(world: AuthWorld) -> Act:
    spent = (await register(world.channel)).tokens.refresh_token
    await world.stub.RefreshToken(
        auth_pb2.RefreshTokenRequest(refresh_token=spent), timeout=CALL_DEADLINE_S
    )
    return lambda: world.stub.RefreshToken(
        auth_pb2.RefreshTokenRequest(refresh_token=spent), timeout=CALL_DEADLINE_S
    )


async def _create_api_key(world: AuthWorld) -> Act:
    token = (await register(world.channel)).tokens.access_token
    return lambda: world.stub.CreateApiKey(
        auth_pb2.CreateApiKeyRequest(display_name="ci"),
        metadata=bearer(token),
        timeout=CALL_DEADLINE_S,
    )


async def _revoke_api_key(world: AuthWorld) -> Act:
    token = (await register(world.channel)).tokens.access_token
    key = await world.stub.CreateApiKey(
        auth_pb2.CreateApiKeyRequest(display_name="ci"),
        metadata=bearer(token),
        timeout=CALL_DEADLINE_S,
    )
    return lambda: world.stub.RevokeApiKey(
        auth_pb2.RevokeApiKeyRequest(name=key.api_key.name),
        metadata=bearer(token),
        timeout=CALL_DEADLINE_S,
    )


S = events_pb2
#: Every auth write with a security event: (its event, what the client is answered, setup).
AUTH_WRITES: dict[str, tuple[int, grpc.StatusCode, Callable[[AuthWorld], Awaitable[Act]]]] = {
    "register": (S.SECURITY_EVENT_KIND_LOGIN_SUCCEEDED, grpc.StatusCode.OK, _register),
    "login": (S.SECURITY_EVENT_KIND_LOGIN_SUCCEEDED, grpc.StatusCode.OK, _login),
    "oidc-first-login": (
        S.SECURITY_EVENT_KIND_LOGIN_SUCCEEDED,
        grpc.StatusCode.OK,
        _oidc_first_login,
    ),
    "login-evicting-a-session": (
        S.SECURITY_EVENT_KIND_SESSION_REVOKED,
        grpc.StatusCode.OK,
        _evicting_login,
    ),
    "logout": (S.SECURITY_EVENT_KIND_SESSION_REVOKED, grpc.StatusCode.OK, _logout),
    "revoke-session": (S.SECURITY_EVENT_KIND_SESSION_REVOKED, grpc.StatusCode.OK, _revoke_session),
    "revoke-all-sessions": (
        S.SECURITY_EVENT_KIND_SESSION_REVOKED,
        grpc.StatusCode.OK,
        _revoke_all_sessions,
    ),
    "refresh-reuse": (
        S.SECURITY_EVENT_KIND_REFRESH_REUSE_DETECTED,
        grpc.StatusCode.UNAUTHENTICATED,  # the reuse is refused, the session revoked
        _refresh_reuse,
    ),
    "create-api-key": (S.SECURITY_EVENT_KIND_API_KEY_CREATED, grpc.StatusCode.OK, _create_api_key),
    "revoke-api-key": (S.SECURITY_EVENT_KIND_API_KEY_REVOKED, grpc.StatusCode.OK, _revoke_api_key),
}


@pytest.fixture(scope="module")
def idp_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@contextlib.asynccontextmanager
async def _auth_server(
    database_url: str, tmp_path: Path, idp_key: rsa.RSAPrivateKey
) -> AsyncIterator[tuple[SwitchboardServer, AuthWorld]]:
    """A server with password and OIDC sign-in (at most 2 sessions per user)."""
    server, _ = await create_server(
        make_settings(
            database_url=database_url,
            max_sessions_per_user=2,
            **oidc_settings(tmp_path, idp_key),
        )
    )
    await server.start()
    try:
        async with aio.insecure_channel(server.address) as channel:
            yield server, AuthWorld(channel, idp_key)
    finally:
        await server.shutdown(grace=0)


@pytest.mark.parametrize("write", list(AUTH_WRITES))
async def test_an_auth_write_whose_event_was_lost_gets_it(
    write: str, database_url: str, tmp_path: Path, idp_key: rsa.RSAPrivateKey
) -> None:
    kind, answered, prepare = AUTH_WRITES[write]
    async with _auth_server(database_url, tmp_path, idp_key) as (server, world):
        act = await prepare(world)
        outbox = server.shared.bus.outbox
        assert outbox is not None
        # The relay takes rows this old (5 s in production) sooner, to keep the test short:
        # within one process it passes over rows a writer is publishing, so none goes twice.
        outbox._grace_s = 0.1

        def matches(e: events_pb2.Event) -> bool:
            return e.type == events_pb2.EVENT_TYPE_SECURITY and e.security.kind == kind

        if inline(server):
            # Logged in the write's own transaction: what a crash right after the commit
            # can lose is the delivery, and the next write reads back what was committed.
            answer = AnswerLostOnce(server, matches)
            with contextlib.suppress(aio.AioRpcError):
                await act()
            lost = [e for e in answer.lost if e.security.kind == kind]
            assert lost, "the write logged no such event"
            ids = {e.id for e in answer.lost}
            await register(world.channel, unique_email("after"))  # a write after it
            assert await eventually_delivered(server, ids)
            async with server.shared.database.readers() as db:
                assert not (await db.execute(select(EventOutboxRow.id))).all()
            return
        refusal = RefusedOnce(server, matches)
        code = grpc.StatusCode.OK
        try:
            await act()
        except aio.AioRpcError as exc:
            code = exc.code()
        lost = [e for e in refusal.refused if e.security.kind == kind]
        assert lost, "the write published no such event"
        ids = {e.id for e in refusal.refused}

        async def published() -> bool:
            return ids <= {e.id for e in server.shared.bus.recent()}

        # The process "died" after the commit: the relay publishes the written events.
        await eventually(published, f"the outbox relay to publish {write}'s events")
        logged_ids = [e.id for e in server.shared.bus.recent() if e.id in ids]
        assert sorted(logged_ids) == sorted(ids), "an event was published twice"
        # The write was committed: the client is answered as if nothing went wrong.
        assert code == answered


async def eventually_delivered(server: SwitchboardServer, ids: set[str]) -> bool:
    """Every one of ``ids`` delivered once, and in the log table once."""

    async def delivered() -> bool:
        return ids <= {e.id for e in server.shared.bus.recent()}

    await eventually(delivered, "the lost write's events to be delivered")
    recent = [e.id for e in server.shared.bus.recent() if e.id in ids]
    assert sorted(recent) == sorted(ids), "an event was delivered twice"
    stored = [one for one in await _logged_ids(server) if one in ids]
    assert sorted(stored) == sorted(ids), "an event was logged twice"
    return True


class FailsOnce:
    """The database goes away at the first statement that starts with ``prefix``
    (as if the connection dropped there): everything before it in the same
    transaction must be undone, nothing may stay half-written."""

    def __init__(self, server: SwitchboardServer, prefix: str) -> None:
        self.failed = False
        self._prefix = prefix
        database = server.shared.database
        # Both engines: async sessions, and the writer thread of ``Database.run``
        # (SQLite), through which auth's writes go.
        self._engines = [
            engine
            for engine in (database.engine.sync_engine, getattr(database, "_sync_engine", None))
            if engine is not None
        ]
        for engine in self._engines:
            sql_event.listen(engine, "before_cursor_execute", self._before)

    def _before(self, _conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if not self.failed and statement.lstrip().upper().startswith(self._prefix):
            self.failed = True
            raise DatabaseUnavailable()

    def remove(self) -> None:
        for engine in self._engines:
            sql_event.remove(engine, "before_cursor_execute", self._before)


class LogFailsOnce:
    """The database goes away as the embedded log inserts a write's events in the
    write's own transaction (``LocalLog.log_in``; its insert runs on the driver)."""

    def __init__(self, server: SwitchboardServer) -> None:
        self.failed = False
        outbox = server.shared.bus.outbox
        assert outbox is not None
        log = outbox.inline
        assert isinstance(log, LocalLog)
        self._log = log
        real = log.log_in

        def log_in(session: Session, events: Sequence[events_pb2.Event]) -> bool:
            if not self.failed:
                self.failed = True
                raise DatabaseUnavailable()
            return real(session, events)

        log.log_in = log_in  # type: ignore[method-assign]

    def remove(self) -> None:
        del self._log.log_in


async def _users_with(server: SwitchboardServer, email: str) -> list[str]:
    async with server.shared.database.readers() as db:
        return list((await db.execute(select(UserRow.id).where(UserRow.email == email))).scalars())


#: Each step of a first sign-in that comes after the user's own insert.
_AFTER_THE_USER = {
    "session": "INSERT INTO SESSIONS",
    "refresh-token": "INSERT INTO REFRESH_TOKENS",
    "event": "INSERT INTO EVENT_OUTBOX",
}


@pytest.mark.parametrize("step", list(_AFTER_THE_USER))
@pytest.mark.parametrize("how", ["register", "oidc-first-login"])
async def test_a_first_sign_in_that_fails_midway_leaves_no_account_and_its_retry_works(
    how: str, step: str, database_url: str, tmp_path: Path, idp_key: rsa.RSAPrivateKey
) -> None:
    async with _auth_server(database_url, tmp_path, idp_key) as (server, world):
        email = unique_email("midway")
        token = id_token(idp_key)

        async def sign_in() -> tuple[auth_pb2.User, auth_pb2.Session]:
            if how == "register":
                registered = await register(world.channel, email)
                return registered.user, registered.session
            response = await world.stub.Login(
                auth_pb2.LoginRequest(oidc=auth_pb2.OidcCredential(id_token=token)),
                timeout=CALL_DEADLINE_S,
            )
            return response.user, response.session

        if how == "oidc-first-login":
            email = "federated@example.com"
        fault: FailsOnce | LogFailsOnce = FailsOnce(server, _AFTER_THE_USER[step])
        if step == "event" and inline(server):
            fault.remove()
            fault = LogFailsOnce(server)  # the event's row, in the sign-in's transaction
        try:
            with pytest.raises(aio.AioRpcError) as failed:
                await sign_in()
        finally:
            fault.remove()
        assert fault.failed
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert await _users_with(server, email) == [], "a user without its session was kept"
        # The client retries: a new account, with its session.
        user, session = await sign_in()
        assert await _users_with(server, email) == [user_id(user.name)]
        assert session.name.startswith(f"{user.name}/sessions/")


# -- a revocation reaches every process's cached credentials, whatever crashes -------------


RevocationSetup = Callable[[aio.Channel], Awaitable[tuple[Act, str, int]]]


async def _logout_on(channel: aio.Channel) -> tuple[Act, str, int]:
    stub = auth_pb2_grpc.AuthServiceStub(channel)
    token = (await register(channel)).tokens.access_token

    def act() -> Awaitable[object]:
        return stub.Logout(
            auth_pb2.LogoutRequest(), metadata=bearer(token), timeout=CALL_DEADLINE_S
        )

    return act, token, S.SECURITY_EVENT_KIND_SESSION_REVOKED


async def _revoke_all_on(channel: aio.Channel) -> tuple[Act, str, int]:
    stub = auth_pb2_grpc.AuthServiceStub(channel)
    registered = await register(channel)
    other = await stub.Login(
        auth_pb2.LoginRequest(
            password=auth_pb2.PasswordCredential(email=registered.user.email, password=PASSWORD)
        ),
        timeout=CALL_DEADLINE_S,
    )

    def act() -> Awaitable[object]:
        return stub.RevokeAllSessions(
            auth_pb2.RevokeAllSessionsRequest(keep_current=True),
            metadata=bearer(registered.tokens.access_token),
            timeout=CALL_DEADLINE_S,
        )

    return act, other.tokens.access_token, S.SECURITY_EVENT_KIND_SESSION_REVOKED


async def _revoke_key_on(channel: aio.Channel) -> tuple[Act, str, int]:
    stub = auth_pb2_grpc.AuthServiceStub(channel)
    token = (await register(channel)).tokens.access_token
    key = await stub.CreateApiKey(
        auth_pb2.CreateApiKeyRequest(display_name="ci"),
        metadata=bearer(token),
        timeout=CALL_DEADLINE_S,
    )

    def act() -> Awaitable[object]:
        return stub.RevokeApiKey(
            auth_pb2.RevokeApiKeyRequest(name=key.api_key.name),
            metadata=bearer(token),
            timeout=CALL_DEADLINE_S,
        )

    return act, key.secret, S.SECURITY_EVENT_KIND_API_KEY_REVOKED


#: Each revocation: (what revokes through A, the credential B has cached, its event).
REVOCATIONS: dict[str, RevocationSetup] = {
    "logout": _logout_on,
    "revoke-all-sessions": _revoke_all_on,
    "revoke-api-key": _revoke_key_on,
}


@pytest.mark.parametrize("revocation", list(REVOCATIONS))
async def test_a_revocation_whose_message_died_with_its_process_reaches_cached_credentials(
    revocation: str, tmp_path: Path, postgres_url: str, redis_server: RedisServer
) -> None:
    a, b = await _replicas(tmp_path, postgres_url, redis_server.url, "fail")
    try:
        async with (
            aio.insecure_channel(a.address) as on_a,
            aio.insecure_channel(b.address) as on_b,
        ):
            revoke, credential, kind = await REVOCATIONS[revocation](on_a)
            on_b_stub = auth_pb2_grpc.AuthServiceStub(on_b)

            async def principal_on_b() -> grpc.StatusCode:
                try:
                    await on_b_stub.GetPrincipal(
                        auth_pb2.GetPrincipalRequest(),
                        metadata=bearer(credential),
                        timeout=CALL_DEADLINE_S,
                    )
                except aio.AioRpcError as exc:
                    return exc.code()
                return grpc.StatusCode.OK

            # B has checked the credential and trusts its cached state while Redis is fresh.
            assert await principal_on_b() == grpc.StatusCode.OK
            assert await principal_on_b() == grpc.StatusCode.OK
            for server in (a, b):
                outbox = server.shared.bus.outbox
                assert outbox is not None
                outbox._grace_s = 0.1  # the relay's 5 s, shorter to keep the test short

            # A "dies" right after the commit: no revocation message, no event published
            # by A itself. Only the outbox (relayed by any process) still knows.
            async def silent(kind: str, ident: str) -> None:
                return None

            a.shared.authenticator.announce = silent  # type: ignore[method-assign]
            refusal = RefusedOnce(
                a, lambda e: e.type == events_pb2.EVENT_TYPE_SECURITY and e.security.kind == kind
            )
            await revoke()
            assert refusal.refused, "the revocation's event was published by A"

            async def refused_on_b() -> bool:
                return await principal_on_b() == grpc.StatusCode.UNAUTHENTICATED

            await eventually(refused_on_b, f"B to refuse the credential after {revocation}")
    finally:
        for server in (a, b):
            await server.shutdown(grace=0)


# -- a run's stored state never contradicts its events -----------------------------------


async def _first_run(
    server: SwitchboardServer, stub: ContextStub, dstub: DispatcherStub, text: str
) -> tuple[World, str, str]:
    """A new workspace and conversation, and the run its editor's ``text`` started:
    the world, the conversation's name and the run's."""
    world = await ctx_world(server, stub)
    conversation = (await create_conversation(stub, world.editor, world.name)).name
    sent = await send(dstub, world.editor, request(conversation, text))
    return world, conversation, sent.run.name


@contextlib.asynccontextmanager
async def _model_mesh(
    calls: list[str],
) -> AsyncIterator[tuple[SwitchboardServer, ContextStub, DispatcherStub]]:
    """A mesh whose default handler is the llm one, on a local OpenAI-protocol
    server that answers "Hello there." and notes each request in ``calls``."""
    async with FakeOpenAI(on_request=lambda _: calls.append("model called")) as fake:
        fake.script(Reply.text("Hello there."))
        async with limited(llm_base_url=fake.url, llm_model="m-1", llm_max_retries=0) as mesh:
            yield mesh


async def test_a_model_is_called_only_once_the_runs_start_is_stored() -> None:
    """A run whose handler acts outside the process (here the llm handler) calls
    it only once the store says RUNNING; a start the database refused is stored
    again first. Otherwise a crash right after the call would leave the run
    QUEUED, and even the ``fail`` policy would call the model a second time."""
    order: list[str] = []
    async with _model_mesh(order) as (server, stub, dstub):
        store = built(server, Dispatcher)._store
        save = store.save

        async def refusing_two_starts(run_id: str, run: pb.Run, **kwargs: Any) -> bool:
            starting = run.state == pb.RUN_STATE_RUNNING
            if starting and order.count("start refused") < 2:
                order.append("start refused")
                raise DatabaseUnavailable()
            stored = bool(await save(run_id, run, **kwargs))
            if starting:
                order.append("start stored")
            return stored

        store.save = refusing_two_starts  # type: ignore[method-assign]
        world, _, name = await _first_run(server, stub, dstub, "Hi")
        seen = await watch_all(dstub, world.editor, name)

    assert seen.final.handler == "handlers/llm"
    assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error
    assert seen.text == "Hello there."
    assert order == ["start refused", "start refused", "start stored", "model called"]


async def test_a_message_whose_run_is_not_stored_is_not_stored_either(database_url: str) -> None:
    """The user's message and its run commit in one transaction: the database refusing
    the run (after its row was written) leaves neither, and the retry stores both once."""
    async with limited(database_url=database_url) as (server, stub, dstub):
        store = built(server, Dispatcher)._store
        creating = store.creating
        refused: list[str] = []

        def refusing(new: Any) -> Callable[[Session], Any]:
            work = creating(new)

            def refused_after_writing(db: Session) -> Any:
                work(db)
                assert db.get(RunRow, new.run_id) is not None  # written, then refused
                refused.append(new.run_id)
                raise DatabaseUnavailable()

            return refused_after_writing if not refused else work

        store.creating = refusing  # type: ignore[method-assign]
        world = await ctx_world(server, stub)
        conversation = (await create_conversation(stub, world.editor, world.name)).name
        sent = request(conversation, "stored together", request_id="together-1")
        with pytest.raises(aio.AioRpcError) as failed:
            await send(dstub, world.editor, sent)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert refused
        assert await all_messages(stub, world.editor, conversation) == []

        def runs(db: Session) -> int:
            return len(db.execute(select(RunRow.id).where(RunRow.id == refused[0])).all())

        assert await server.shared.database.run(runs, write=False) == 0
        # The same request again: both stored, once.
        again = await send(dstub, world.editor, sent)
        seen = await watch_all(dstub, world.editor, again.run.name)
        assert seen.final.state == pb.RUN_STATE_SUCCEEDED
        messages = await all_messages(stub, world.editor, conversation)
        assert [m.role for m in messages] == [cpb.MESSAGE_ROLE_USER, cpb.MESSAGE_ROLE_ASSISTANT]
        assert messages[0].name == again.message.name
        assert messages[0].parts[0].text == "stored together"


async def test_a_run_whose_answer_is_refused_fails_and_stores_neither(database_url: str) -> None:
    """A run's answer is stored in its end's transaction: the context service refusing
    it (here its size) fails the run saying why, with no answer and no SUCCEEDED stored."""
    async with limited(database_url=database_url, context_max_message_bytes=1024) as (
        server,
        stub,
        dstub,
    ):
        world = await ctx_world(server, stub)
        conversation = (await create_conversation(stub, world.editor, world.name)).name
        # Within the limit; the echo's answer (the words and a note after them) is not.
        sent = await send(dstub, world.editor, request(conversation, "word " * 180))
        seen = await watch_all(dstub, world.editor, sent.run.name)
        assert seen.final.state == pb.RUN_STATE_FAILED
        assert seen.final.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert "1024" in seen.final.error.message
        assert seen.final.output_message == ""
        stored = await get_run(dstub, world.editor, sent.run.name)
        assert stored.state == pb.RUN_STATE_FAILED
        assert stored.output_message == ""
        messages = await all_messages(stub, world.editor, conversation)
        assert [m.name for m in messages] == [sent.message.name]


async def test_a_run_taken_over_while_its_start_was_stored_is_left_to_its_new_owner() -> None:
    """Another instance took the run over (this one's lease had lapsed) before
    its start landed: the save finds the run no longer this instance's, so it
    calls no model and announces no end; what is stored stays the new owner's
    to run or fail under the recovery policy."""
    calls: list[str] = []
    async with _model_mesh(calls) as (server, stub, dstub):
        dispatcher = built(server, Dispatcher)
        store = dispatcher._store
        save = store.save
        taken: list[str] = []

        async def taken_over_first(run_id: str, run: pb.Run, **kwargs: Any) -> bool:
            if run.state == pb.RUN_STATE_RUNNING and not taken:
                taken.append(run_id)

                def move(db: Session) -> None:
                    db.execute(update(RunRow).where(RunRow.id == run_id).values(worker="another"))

                await store._run(move, write=True)
            return bool(await save(run_id, run, **kwargs))

        store.save = taken_over_first  # type: ignore[method-assign]
        _, _, name = await _first_run(server, stub, dstub, "Hi")

        async def given_up() -> bool:
            return not dispatcher.holds(name)

        await eventually(given_up, "the run to be given up")
        found = name.split("/")
        stored, owner = await store.get_with_owner(found[1], found[3], found[5])
        ends = [
            e
            for e in _run_events(server, name)
            if e.run_updated.update.state_change.run.state in TERMINAL
        ]

    assert taken, "the run never reached its start"
    assert owner.instance == "another"
    assert stored.run.state == pb.RUN_STATE_QUEUED
    assert ends == [], "this instance announced an end for a run it no longer owns"
    assert calls == []


async def test_a_run_whose_final_save_fails_is_announced_only_once_stored() -> None:
    async with limited() as (server, stub, dstub):
        dispatcher = built(server, Dispatcher)
        store = dispatcher._store
        save = store.save
        outage = asyncio.Event()
        outage.set()
        refused: list[int] = []

        async def failing_save(run_id: str, run: pb.Run, **kwargs: Any) -> bool:
            if outage.is_set() and run.state in TERMINAL:
                refused.append(run.state)
                raise DatabaseUnavailable()
            return bool(await save(run_id, run, **kwargs))

        store.save = failing_save  # type: ignore[method-assign]
        world, conversation, name = await _first_run(server, stub, dstub, "quick answer")
        found = name.split("/")

        async def refused_twice() -> bool:
            return len(refused) >= 2  # retried, not given up after one failure

        await eventually(refused_twice, "the final save to be retried")
        stored = await store.get(found[1], found[3], found[5])
        assert stored.run.state not in TERMINAL
        # Its answer goes in its end's transaction: not stored either, meanwhile.
        messages = await all_messages(stub, world.editor, conversation)
        assert [m.role for m in messages] == [cpb.MESSAGE_ROLE_USER]
        ends = [
            e
            for e in server.shared.bus.recent()
            if e.type == events_pb2.EVENT_TYPE_RUN_UPDATED
            and e.run_updated.update.run == name
            and e.run_updated.update.state_change.run.state in TERMINAL
        ]
        assert ends == [], "an end was announced that the store does not have"
        results = [
            e
            for e in _run_events(server, name)
            if e.run_updated.update.WhichOneof("update") == "result"
        ]
        assert results == [], "the result's event went out before the end it belongs to"

        outage.clear()

        async def stored_end() -> bool:
            return (await store.get(found[1], found[3], found[5])).run.state in TERMINAL

        await eventually(stored_end, "the run's end to be stored once the database is back")
        final = (await store.get(found[1], found[3], found[5])).run
        assert final.state == pb.RUN_STATE_SUCCEEDED
        answer = (await all_messages(stub, world.editor, conversation))[-1]
        assert answer.role == cpb.MESSAGE_ROLE_ASSISTANT
        assert final.output_message == answer.name
        assert (await get_run(dstub, world.editor, name)).state == final.state

        async def announced() -> bool:
            return any(
                e.type == events_pb2.EVENT_TYPE_RUN_UPDATED
                and e.run_updated.update.run == name
                and e.run_updated.update.state_change.run.state == final.state
                for e in server.shared.bus.recent()
            )

        await eventually(announced, "the stored end to be published")
        # The conversation is free again for a REJECT-policy message.
        again = await send(
            dstub,
            world.editor,
            request(conversation, "next", policy=pb.CONCURRENCY_POLICY_REJECT),
        )
        assert again.run.name


def _run_events(server: SwitchboardServer, name: str) -> list[events_pb2.Event]:
    """The RunUpdated events of run ``name`` in the process's log window, in log order."""
    return [
        e
        for e in server.shared.bus.recent()
        if e.type == events_pb2.EVENT_TYPE_RUN_UPDATED and e.run_updated.update.run == name
    ]


def _kinds(events: Sequence[events_pb2.Event]) -> list[str]:
    return [str(e.run_updated.update.WhichOneof("update")) for e in events]


async def test_a_runs_result_and_its_end_reach_the_log_in_one_batch() -> None:
    async with limited() as (server, stub, dstub):
        backend = server.shared.bus._backend
        append_many = backend.append_many
        batches: list[list[events_pb2.Event]] = []

        async def recording(events: Sequence[events_pb2.Event]) -> None:
            batches.append(list(events))
            await append_many(events)

        backend.append_many = recording  # type: ignore[method-assign]
        world, _, name = await _first_run(server, stub, dstub, "quick answer")

        async def ended() -> bool:
            return (await get_run(dstub, world.editor, name)).state in TERMINAL

        await eventually(ended, "the run to end")

        async def announced() -> bool:
            return "result" in _kinds(_run_events(server, name))[-2:]

        await eventually(announced, "the run's end to be published")
        if inline(server):
            # Logged in the end's own transaction: adjacent in the log, no batch of their own.
            assert not any("result" in _kinds(batch) for batch in batches)
            ended_events = _run_events(server, name)[-2:]
            assert _kinds(ended_events) == ["result", "state_change"]
            seqs = [int(e.cursor.split("-")[0]) for e in ended_events]
            assert seqs[1] == seqs[0] + 1
            updates = [e.run_updated.update for e in ended_events]
            assert updates[1].sequence == updates[0].sequence + 1
            assert updates[1].state_change.run.state == pb.RUN_STATE_SUCCEEDED
            return
        run_batches = [
            [e for e in batch if e.run_updated.update.run == name]
            for batch in batches
            if any(e.run_updated.update.run == name for e in batch)
        ]
        with_result = [b for b in run_batches if "result" in _kinds(b)]
        assert len(with_result) == 1
        assert _kinds(with_result[0])[-2:] == ["result", "state_change"]
        end = with_result[0][-1].run_updated.update
        assert end.state_change.run.state == pb.RUN_STATE_SUCCEEDED
        # In the log as on the stream: the result's sequence just before the end's.
        result = with_result[0][-2].run_updated.update
        assert end.sequence == result.sequence + 1
        assert _kinds(_run_events(server, name))[-2:] == ["result", "state_change"]


async def test_a_runs_result_is_written_with_its_end_so_a_lost_publish_loses_neither() -> None:
    """The batch holding the result is refused, as if the process died right after
    the end was stored: the relay publishes the result and the end, once each, in order."""
    async with limited() as (server, stub, dstub):
        outbox = server.shared.bus.outbox
        assert outbox is not None
        outbox._grace_s = 0.1  # the relay's 5 s, shorter to keep the test short

        def matches(e: events_pb2.Event) -> bool:
            return e.type == events_pb2.EVENT_TYPE_RUN_UPDATED and e.run_updated.update.HasField(
                "result"
            )

        if inline(server):
            # Logged with the end: the end's commit whose answer is lost is stored again
            # (the save is retried), and its events, read back, are delivered once each.
            answer = AnswerLostOnce(server, matches)
            world, _, name = await _first_run(server, stub, dstub, "quick answer")

            async def answer_lost() -> bool:
                return bool(answer.lost)

            await eventually(answer_lost, "the end's commit to lose its answer")
            ended = [e for e in answer.lost if e.run_updated.update.run == name]
            assert _kinds(ended)[-2:] == ["result", "state_change"]
            ids = [e.id for e in ended[-2:]]
            assert await eventually_delivered(server, set(ids))
            assert [e.id for e in server.shared.bus.recent() if e.id in ids] == ids
            assert (await get_run(dstub, world.editor, name)).state == pb.RUN_STATE_SUCCEEDED
            return
        refusal = RefusedOnce(server, matches)
        world, _, name = await _first_run(server, stub, dstub, "quick answer")

        async def refused() -> bool:
            return bool(refusal.refused)

        await eventually(refused, "the batch holding the result to be refused")
        lost = [e for e in refusal.refused if e.run_updated.update.run == name]
        assert _kinds(lost)[-2:] == ["result", "state_change"]
        ids = [e.id for e in lost[-2:]]

        async def relayed() -> bool:
            return set(ids) <= {e.id for e in server.shared.bus.recent()}

        await eventually(relayed, "the outbox relay to publish the result and the end")
        assert [e.id for e in server.shared.bus.recent() if e.id in ids] == ids
        assert (await get_run(dstub, world.editor, name)).state == pb.RUN_STATE_SUCCEEDED


# -- a dead replica's runs: taken over, numbered after everything seen ----------------------


async def _replicas(
    tmp_path: Path, database_url: str, redis_url: str, recovery: str
) -> tuple[SwitchboardServer, SwitchboardServer]:
    return await start_replicas(
        tmp_path, database_url, redis_url, dispatcher_recovery=recovery, dispatcher_lease_s=1.0
    )


@pytest.mark.parametrize("recovery", ["fail", "requeue"])
async def test_a_dead_replicas_run_is_taken_over_and_numbered_after_all_it_showed(
    recovery: str, tmp_path: Path, postgres_url: str, redis_server: RedisServer
) -> None:
    a, b = await _replicas(tmp_path, postgres_url, redis_server.url, recovery)
    try:
        async with (
            aio.insecure_channel(a.address) as on_a,
            aio.insecure_channel(b.address) as on_b,
        ):
            stub, dstub_a, dstub_b = (
                context_stub(on_a),
                dispatcher_stub(on_a),
                dispatcher_stub(on_b),
            )
            world = await ctx_world(a, stub)
            conversation = (await create_conversation(stub, world.editor, world.name)).name
            words = " ".join(f"w{i}" for i in range(40))  # outlives the takeover
            sent = await send(dstub_a, world.editor, request(conversation, words, delay_ms=150))
            name = sent.run.name
            # The watcher is on the replica that survives; the run is on the other.
            call = dstub_b.WatchRun(
                pb.WatchRunRequest(name=name), metadata=world.editor.md, timeout=CALL_DEADLINE_S
            )
            seen: list[pb.RunUpdate] = []
            await read_until(
                call, seen, lambda seen: len([u for u in seen if u.HasField("delta")]) >= 3
            )
            # Replica a "dies": it stops renewing its lease (its runs keep going), and b
            # takes its run.
            Renewals(a).paused = True
            await read_until(call, seen, lambda seen: seen[-1].state_change.run.state in TERMINAL)
            sequences = [u.sequence for u in seen]
            assert sequences == sorted(set(sequences)), "a sequence was reused or went back"
            end = seen[-1].state_change.run
            assert end.state in TERMINAL, "the watcher never saw the end"
            assert seen[-1].sequence > SEQUENCE_BLOCK  # the new attempt's block
            stored = await get_run(dstub_b, world.editor, name)
            assert stored.state == end.state
            if recovery == "fail":
                assert stored.state == pb.RUN_STATE_FAILED
            else:
                assert stored.state == pb.RUN_STATE_SUCCEEDED
                # Text since the run last started over is exactly the answer: no splice.
                restart = max(
                    i for i, u in enumerate(seen) if u.state_change.run.state == pb.RUN_STATE_QUEUED
                )
                text = "".join(u.delta.text for u in seen[restart:] if u.HasField("delta"))
                result = [u.result for u in seen[restart:] if u.HasField("result")]
                assert result
                assert text == "".join(p.text for p in result[0].parts)
    finally:
        await a.shutdown(grace=0)
        await b.shutdown(grace=0)
