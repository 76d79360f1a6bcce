"""A PostgreSQL outage under load on the scaled-out shape: UNAVAILABLE, never INTERNAL or a hang.

Two `switchboard serve` replicas, A and B, share a PostgreSQL cluster and a
redis-server that the test starts. Clients keep calling both replicas (auth,
context, dispatcher and event RPCs; reads and writes; unary and streaming)
while PostgreSQL is stopped with ``pg_ctl stop -m immediate`` for at least
five seconds and then started again. Every call carries a deadline well above
the database timeout, so a call that reaches its deadline is a hang.

Counted, and required to be zero: INTERNAL, UNKNOWN and deadline-exceeded
answers. UNAVAILABLE (with a retry hint) is the right answer during the outage.
Each replica's ``switchboard.database`` health entry turns NOT_SERVING during
the outage (read with grpc-health-probe on one, the Python health stub on the
other) and SERVING again by itself, while the overall entry "" stays SERVING;
afterwards writes succeed on both replicas without restarting them.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import grpc
import httpx
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.context.v1 import context_pb2_grpc
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as dpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2_grpc
from switchboard.api.events.v1 import events_pb2, events_pb2_grpc
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.procs import ServeProcess, shared_secrets, tool
from tests.infra import postgres as pg
from tests.infra.redis import RedisServer
from tests.kits.authkit import PASSWORD, bearer

pytestmark = pytest.mark.e2e

#: The replicas' database timeout: connect, statement and pool waits.
DATABASE_TIMEOUT_S: Final = 1.0
#: The outage lasts at least this long.
OUTAGE_S: Final = 5.0
#: How long health and recovery may take before the test fails.
PHASE_TIMEOUT_S: Final = 30.0
#: Concurrent clients per replica.
CLIENTS: Final = 2

DATABASE_HEALTH: Final = "switchboard.database"
SERVING: Final = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: Final = health_pb2.HealthCheckResponse.NOT_SERVING
#: Answers that are never right for an outage.
BAD: Final = frozenset(
    {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}
)

_emails = itertools.count()


def email(prefix: str) -> str:
    return f"{prefix}-{next(_emails)}-{time.monotonic_ns()}@example.com"


@pytest.fixture
def cluster() -> Iterator[pg.PostgresServer]:
    """A PostgreSQL cluster of this test's own: it is stopped and restarted."""
    with pg.running_postgres() as server:
        yield server


@pytest.fixture
def replicas(
    tmp_path: Path, cluster: pg.PostgresServer, redis_server: RedisServer
) -> Iterator[tuple[ServeProcess, ServeProcess]]:
    env = {
        **shared_secrets(tmp_path),
        "SWITCHBOARD_DATABASE_URL": cluster.url("postgres"),
        "SWITCHBOARD_DATABASE_TIMEOUT_S": str(DATABASE_TIMEOUT_S),
        "SWITCHBOARD_REDIS_URL": redis_server.url,
        "PYTHONFAULTHANDLER": "1",
    }
    with (
        ServeProcess(
            env={**env, "SWITCHBOARD_INSTANCE_ID": "replica-a", "SWITCHBOARD_METRICS_PORT": "0"}
        ) as a,
        ServeProcess(env={**env, "SWITCHBOARD_INSTANCE_ID": "replica-b"}) as b,
    ):
        yield a, b
        for server in (a, b):
            assert server.proc is not None
            assert server.proc.poll() is None, f"a replica died: {server.log[-20:]}"


@dataclass
class Stubs:
    """The stubs of one replica (typed Any: the generated stubs are typed for sync channels)."""

    auth: Any
    context: Any
    dispatcher: Any
    events: Any
    health: Any

    @classmethod
    def on(cls, channel: aio.Channel) -> Stubs:
        return cls(
            auth_pb2_grpc.AuthServiceStub(channel),
            context_pb2_grpc.ContextServiceStub(channel),
            dispatcher_pb2_grpc.DispatcherServiceStub(channel),
            events_pb2_grpc.EventServiceStub(channel),
            health_pb2_grpc.HealthStub(channel),
        )


@dataclass
class Tally:
    """Every answer, by method and code; the bad ones with their message."""

    codes: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    bad: list[str] = field(default_factory=list)

    def record(self, method: str, code: grpc.StatusCode, details: str = "") -> None:
        self.codes[(method, code.name)] += 1
        if code in BAD:
            self.bad.append(f"{method}: {code.name} {details}")

    async def unary(self, method: str, call: Awaitable[Any]) -> Any:
        try:
            result = await call
        except aio.AioRpcError as error:
            self.record(method, error.code(), error.details() or "")
            return None
        self.record(method, grpc.StatusCode.OK)
        return result

    async def stream(self, method: str, call: Any, *, first_only: bool = False) -> None:
        try:
            async for _ in call:
                if first_only:
                    break
        except aio.AioRpcError as error:
            self.record(method, error.code(), error.details() or "")
            return
        finally:
            call.cancel()
        self.record(method, grpc.StatusCode.OK)

    def count(self, code: grpc.StatusCode) -> int:
        return sum(n for (_, name), n in self.codes.items() if name == code.name)


@dataclass(frozen=True)
class Owner:
    token: str
    user: str
    workspace: str
    conversation: str
    login_email: str

    @property
    def md(self) -> tuple[tuple[str, str], ...]:
        return bearer(self.token)


async def owner_on(stubs: Stubs) -> Owner:
    """A user with a workspace and a conversation, and a second account to sign in with."""
    registered = await stubs.auth.Register(
        auth_pb2.RegisterRequest(email=email("owner"), password=PASSWORD),
        timeout=CALL_DEADLINE_S,
    )
    login_email = email("login")
    await stubs.auth.Register(
        auth_pb2.RegisterRequest(email=login_email, password=PASSWORD), timeout=CALL_DEADLINE_S
    )
    md = bearer(registered.tokens.access_token)
    workspace = (
        await stubs.context.CreateWorkspace(
            cpb.CreateWorkspaceRequest(workspace=cpb.Workspace(display_name="Outage")),
            metadata=md,
            timeout=CALL_DEADLINE_S,
        )
    ).workspace.name
    conversation = (
        await stubs.context.CreateConversation(
            cpb.CreateConversationRequest(
                parent=workspace, conversation=cpb.Conversation(title="Outage")
            ),
            metadata=md,
            timeout=CALL_DEADLINE_S,
        )
    ).conversation.name
    return Owner(
        registered.tokens.access_token,
        registered.user.name,
        workspace,
        conversation,
        login_email,
    )


async def one_round(
    stubs: Stubs, owner: Owner, tally: Tally, round_no: int, *, accounts: bool = True
) -> None:
    """One of each kind of call; reads and writes of every service, unary and streaming.

    ``accounts=False`` leaves out the calls that are rate limited per address
    (Register, Login) or counted per user (CreateWorkspace).
    """
    md, t = owner.md, CALL_DEADLINE_S
    if accounts and round_no % 4 == 0:
        await tally.unary(
            "Register",
            stubs.auth.Register(
                auth_pb2.RegisterRequest(email=email("load"), password=PASSWORD), timeout=t
            ),
        )
        await tally.unary(
            "CreateWorkspace",
            stubs.context.CreateWorkspace(
                cpb.CreateWorkspaceRequest(workspace=cpb.Workspace(display_name="Load")),
                metadata=md,
                timeout=t,
            ),
        )
    if accounts:
        await tally.unary(
            "Login",
            stubs.auth.Login(
                auth_pb2.LoginRequest(
                    password=auth_pb2.PasswordCredential(email=owner.login_email, password=PASSWORD)
                ),
                timeout=t,
            ),
        )
    await tally.unary(
        "ListSessions",
        stubs.auth.ListSessions(auth_pb2.ListSessionsRequest(page_size=5), metadata=md, timeout=t),
    )
    await tally.unary(
        "GetWorkspace",
        stubs.context.GetWorkspace(
            cpb.GetWorkspaceRequest(name=owner.workspace), metadata=md, timeout=t
        ),
    )
    await tally.unary(
        "AppendMessage",
        stubs.context.AppendMessage(
            cpb.AppendMessageRequest(
                parent=owner.conversation,
                message=cpb.Message(
                    role=cpb.MESSAGE_ROLE_USER, parts=[cpb.ContentPart(text=f"round {round_no}")]
                ),
            ),
            metadata=md,
            timeout=t,
        ),
    )
    await tally.unary(
        "ListConversations",
        stubs.context.ListConversations(
            cpb.ListConversationsRequest(parent=owner.workspace), metadata=md, timeout=t
        ),
    )
    await tally.unary(
        "GetContextWindow",
        stubs.context.GetContextWindow(
            cpb.GetContextWindowRequest(conversation=owner.conversation, token_budget=2000),
            metadata=md,
            timeout=t,
        ),
    )
    sent = await tally.unary(
        "SendMessage",
        stubs.dispatcher.SendMessage(
            dpb.SendMessageRequest(
                conversation=owner.conversation,
                message=cpb.Message(parts=[cpb.ContentPart(text=f"run {round_no}")]),
            ),
            metadata=md,
            timeout=t,
        ),
    )
    if sent is not None:
        await tally.unary(
            "GetRun",
            stubs.dispatcher.GetRun(dpb.GetRunRequest(name=sent.run.name), metadata=md, timeout=t),
        )
        await tally.stream(
            "WatchRun",
            stubs.dispatcher.WatchRun(
                dpb.WatchRunRequest(name=sent.run.name), metadata=md, timeout=t
            ),
        )
    scope = events_pb2.Scope(workspace=owner.workspace)
    await tally.unary(
        "ListEvents",
        stubs.events.ListEvents(
            events_pb2.ListEventsRequest(scopes=[scope], page_size=10), metadata=md, timeout=t
        ),
    )
    await tally.stream(
        "Subscribe",
        stubs.events.Subscribe(events_pb2.SubscribeRequest(scopes=[scope]), metadata=md, timeout=t),
        first_only=True,
    )


async def load(stubs: Stubs, owner: Owner, tally: Tally, stop: asyncio.Event) -> None:
    for round_no in itertools.count():
        if stop.is_set():
            return
        await one_round(stubs, owner, tally, round_no)


async def python_health(stubs: Stubs, service: str) -> int:
    reply = await stubs.health.Check(
        health_pb2.HealthCheckRequest(service=service), timeout=CALL_DEADLINE_S
    )
    return int(reply.status)


async def database_metrics(server: ServeProcess) -> tuple[float, float]:
    """``switchboard_dependency_up`` and ``_outages_total`` of the database, scraped."""
    listening = next(e for e in server.log if e.get("message") == "switchboard listening")
    async with httpx.AsyncClient() as client:
        response = await client.get(
            f"http://127.0.0.1:{listening['metrics_port']}/metrics", timeout=CALL_DEADLINE_S
        )
    found = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.labels.get("dependency") == "database":
                found[sample.name] = sample.value
    return found["switchboard_dependency_up"], found["switchboard_dependency_outages_total"]


async def probe_health(address: str, service: str) -> int:
    """The status grpc-health-probe reports (exit 0 SERVING, 4 NOT_SERVING)."""
    done = await asyncio.to_thread(
        subprocess.run,
        [
            tool("grpc-health-probe"),
            f"-addr={address}",
            f"-service={service}",
            f"-connect-timeout={CALL_DEADLINE_S}s",
            f"-rpc-timeout={CALL_DEADLINE_S}s",
        ],
        capture_output=True,
        text=True,
        timeout=CALL_DEADLINE_S * 3,
        check=False,
    )
    if done.returncode == 0:
        return int(SERVING)
    if done.returncode == 4:
        return int(NOT_SERVING)
    pytest.fail(f"grpc-health-probe failed ({done.returncode}): {done.stdout}{done.stderr}")


async def until(
    what: str, condition: Callable[[], Awaitable[bool]], clients: list[asyncio.Task[None]]
) -> None:
    """Poll ``condition``; fail at the deadline, or at once if a client crashed."""
    deadline = time.monotonic() + PHASE_TIMEOUT_S
    while not await condition():
        for client in clients:
            if client.done():
                client.result()  # raises the client's own error
                pytest.fail("a client stopped early")
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {PHASE_TIMEOUT_S}s")
        await asyncio.sleep(0.05)


async def test_a_database_outage_under_load_is_unavailable_never_internal_or_a_hang(
    cluster: pg.PostgresServer, replicas: tuple[ServeProcess, ServeProcess]
) -> None:
    a, b = replicas
    async with (
        aio.insecure_channel(a.address) as channel_a,
        aio.insecure_channel(b.address) as channel_b,
    ):
        on_a, on_b = Stubs.on(channel_a), Stubs.on(channel_b)
        owners = {a.address: await owner_on(on_a), b.address: await owner_on(on_b)}
        assert await python_health(on_a, DATABASE_HEALTH) == SERVING
        assert await probe_health(b.address, DATABASE_HEALTH) == SERVING

        tally = Tally()
        stop = asyncio.Event()
        clients = [
            asyncio.create_task(load(stubs, owners[server.address], tally, stop))
            for server, stubs in ((a, on_a), (b, on_b))
            for _ in range(CLIENTS)
        ]
        try:
            # Load before the outage: everything answers.
            await until("a round of calls", _rounds(tally, 1), clients)
            healthy = tally.count(grpc.StatusCode.OK)

            await asyncio.to_thread(pg.stop_postgres, cluster)
            stopped = time.monotonic()
            await until(
                "NOT_SERVING on A (Python health stub)",
                _status_is(lambda: python_health(on_a, DATABASE_HEALTH), NOT_SERVING),
                clients,
            )
            await until(
                "NOT_SERVING on B (grpc-health-probe)",
                _status_is(lambda: probe_health(b.address, DATABASE_HEALTH), NOT_SERVING),
                clients,
            )
            # The metrics say so too (docs/metrics.md).
            assert await database_metrics(a) == (0.0, 1.0)
            # The process still answers: the overall entry stays SERVING.
            assert await python_health(on_a, "") == SERVING
            assert await probe_health(b.address, "") == SERVING
            await until("the outage's duration", _elapsed(stopped, OUTAGE_S), clients)
            assert tally.count(grpc.StatusCode.UNAVAILABLE) > 0, "the outage was not felt"

            await asyncio.to_thread(pg.start_postgres, cluster)
            # Back by itself: nothing restarted the replicas.
            await until(
                "SERVING on A",
                _status_is(lambda: python_health(on_a, DATABASE_HEALTH), SERVING),
                clients,
            )
            await until(
                "SERVING on B",
                _status_is(lambda: probe_health(b.address, DATABASE_HEALTH), SERVING),
                clients,
            )
            assert await database_metrics(a) == (1.0, 1.0)
            ok_before = tally.count(grpc.StatusCode.OK)
            await until("calls succeeding again", _oks_after(tally, ok_before), clients)
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*clients), CALL_DEADLINE_S * 20)

        # Writes succeed on both replicas after the outage.
        for stubs, server in ((on_a, a), (on_b, b)):
            owner = owners[server.address]
            after = Tally()
            await one_round(stubs, owner, after, 1, accounts=False)
            failed = {key: n for key, n in after.codes.items() if key[1] != "OK"}
            assert not failed, f"after recovery on {server.address}: {failed}"

    print("answers:", dict(sorted(tally.codes.items())))
    assert healthy > 0
    assert not tally.bad, "\n".join([*tally.bad[:20], f"tally: {dict(tally.codes)}"])


def _rounds(tally: Tally, n: int) -> Callable[[], Awaitable[bool]]:
    """Whether every client finished ``n`` rounds (each ends with a Subscribe)."""

    async def check() -> bool:
        done = sum(count for (method, _), count in tally.codes.items() if method == "Subscribe")
        return done >= n * CLIENTS * 2

    return check


def _status_is(read: Callable[[], Awaitable[int]], status: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await read() == status

    return check


def _elapsed(since: float, seconds: float) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return time.monotonic() - since >= seconds

    return check


def _oks_after(tally: Tally, before: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return tally.count(grpc.StatusCode.OK) > before + 20

    return check
