"""switchboard.client against real `switchboard serve` processes, restarts included.

Restarts are real: the server is stopped (SIGTERM; SIGKILL for a crash; SIGSTOP
for a connection that goes silent) and started again on the same port with the
same SQLite file, the same secrets and the same dispatcher instance id (not dev
mode, whose signing key is made per process), while the client follows events
and watches a run. What the client delivered is compared with what the log
itself holds (ListEvents) and with the run as the server stored it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import grpc
import pytest

from switchboard.api.auth.v1 import auth_pb2
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.client import (
    Backoff,
    Client,
    Follower,
    RunInterrupted,
    RunWatch,
    StreamPolicy,
)
from switchboard.client.events import scope as events_scope
from switchboard.client.runs import AnswerBuilder, is_terminal, run_error
from tests.client.test_clientkit import (
    PASSWORD,
    REFRESH,
    Wire,
    append,
    new_conversation,
    new_workspace,
    text_of,
    unique_email,
)
from tests.e2e.envoy import EnvoyProcess
from tests.e2e.procs import ServeProcess
from tests.e2e.restarts import restart_env
from tests.kits.eventkit import is_token

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

#: How long a run, a restart or a resume may take, on two busy cores.
SETTLE_S: Final = 90.0
#: Resume quickly in tests (an application keeps the defaults).
QUICK: Final = StreamPolicy(backoff=Backoff(initial_s=0.1, max_s=1.0), idle_timeout_s=20.0)


def _env(directory: Path, **extra: str) -> dict[str, str]:
    # A stop waits out the grace while the client's streams are open (docs/operations.md,
    # "Shutdown"): a short one keeps each restart short, and the run still outlasts it.
    return restart_env(directory, "python-client-e2e", SWITCHBOARD_SHUTDOWN_GRACE_S="0.5", **extra)


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as processes:
        yield processes


@dataclass
class Shared:
    """One server, and Envoy in front of it in plaintext and TLS, for the tests of this
    module that neither stop nor restart it: each test is a user of its own."""

    server: ServeProcess
    envoy: EnvoyProcess


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    env = _env(tmp_path_factory.mktemp("python-client-shared"))
    with ServeProcess(env=env) as server, EnvoyProcess(server.address, tls=True) as envoy:
        yield Shared(server, envoy)


async def _serve(
    stack: ExitStack, env: dict[str, str], port: int = 0, *, dev: bool = False
) -> ServeProcess:
    """A server on ``port`` (0: any free one; a restart passes the port it had)."""
    args = (*(("--dev",) if dev else ()), *(("--port", str(port)) if port else ()))
    server = ServeProcess(*args, env=env)
    stack.callback(server.__exit__, None, None, None)
    await asyncio.to_thread(server.start)
    return server


async def _stop(server: ServeProcess, how: signal.Signals) -> None:
    assert server.proc is not None
    if how == signal.SIGTERM:
        assert await asyncio.to_thread(server.terminate) == 0
    else:
        server.proc.send_signal(how)
        await asyncio.to_thread(server.proc.wait, 30)


@dataclass
class Collected:
    """What a background reader took from an async iterator, with a way to wait on it."""

    items: list[object] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    async def finished(self) -> None:
        assert self.task is not None
        await asyncio.wait_for(self.task, SETTLE_S)

    async def until(self, done: Callable[[list[object]], bool], what: str) -> None:
        async with asyncio.timeout(SETTLE_S):
            while not done(self.items):
                if self.task is not None and self.task.done():
                    self.task.result()  # raises what ended the reader
                    raise AssertionError(f"the reader ended before {what}: {self.items}")
                self.changed.clear()
                await self.changed.wait()


def _read_in_background(iterator: AsyncIterator[object]) -> Collected:
    collected = Collected()

    async def read() -> None:
        try:
            async for item in iterator:
                collected.items.append(item)
                collected.changed.set()
        finally:
            collected.changed.set()

    collected.task = asyncio.ensure_future(read())
    return collected


async def _logged(
    client: Client,
    scope: str,
    after_cursor: str,
    types: list[events_pb2.EventType.ValueType],
) -> list[events_pb2.Event]:
    """Every event of ``types`` the log retains for ``scope`` after ``after_cursor``."""
    events: list[events_pb2.Event] = []
    page_token = ""
    while True:
        page = await client.events.ListEvents(
            events_pb2.ListEventsRequest(
                scopes=[events_scope(scope)],
                after_cursor=after_cursor,
                types=types,
                page_size=500,
                page_token=page_token,
            )
        )
        events.extend(page.events)
        page_token = page.next_page_token
        if not page_token:
            return events


def _names(items: list[object], conversation: str = "") -> list[str]:
    """The messages (of ``conversation``, or all) whose MESSAGE_CREATED events are in ``items``."""
    return [
        e.message_created.message.name
        for e in items
        if isinstance(e, events_pb2.Event)
        and e.HasField("message_created")
        and e.conversation.startswith(conversation)
    ]


def _ended(run: str) -> Callable[[list[object]], bool]:
    def check(items: list[object]) -> bool:
        return any(
            isinstance(e, events_pb2.Event)
            and e.run_updated.update.run == run
            and is_terminal(e.run_updated.update)
            for e in items
        )

    return check


# -- against one process -----------------------------------------------------------------


async def test_sign_in_refresh_run_and_events_against_a_served_process(shared: Shared) -> None:
    server = shared.server
    wire = Wire()
    saved: list[auth_pb2.TokenPair | None] = []
    email = unique_email("e2e")
    async with Client(
        server.address, interceptors=wire.interceptors, on_tokens=saved.append
    ) as client:
        registered = await client.register(email, PASSWORD)
        await client.sign_out()
        signed_in = await client.sign_in(email, PASSWORD)
        assert signed_in.user.name == registered.user.name
        renewed = await client.refresh()
        assert renewed.access_token != signed_in.tokens.access_token
        assert saved == [registered.tokens, None, signed_in.tokens, renewed]
        assert wire.count(REFRESH) == 1

        workspace = await new_workspace(client)
        conversation = await new_conversation(client, workspace)
        async with client.follow([conversation], types=["MESSAGE_CREATED"]) as follower:
            start = await asyncio.wait_for(follower.ready(), SETTLE_S)
            answer = await asyncio.wait_for(
                client.ask(conversation, "hello from python", handler="echo"), SETTLE_S
            )
            assert answer.text.startswith("hello from python")
            question, reply = [await asyncio.wait_for(anext(follower), SETTLE_S) for _ in range(2)]
        assert text_of(question.message_created.message) == "hello from python"
        assert reply.message_created.message.name == answer.run.output_message
        assert text_of(reply.message_created.message) == answer.text

    # A new client, restored from the saved pair, continues the session where
    # it stood, and continues the events after the cursor it kept.
    async with Client(server.address) as restored:
        kept = saved[-1]
        assert kept is not None
        restored.use_tokens(kept)
        principal = await restored.auth.GetPrincipal(auth_pb2.GetPrincipalRequest())
        assert principal.principal.session == signed_in.session.name
        await append(restored, conversation, "one more")
        async with restored.follow(
            [conversation], after_cursor=start, types=["MESSAGE_CREATED"]
        ) as again:
            replayed = [await asyncio.wait_for(anext(again), SETTLE_S) for _ in range(3)]
        assert [e.id for e in replayed] == [question.id, reply.id, replayed[2].id]
        assert text_of(replayed[2].message_created.message) == "one more"


@pytest.mark.parametrize("tls", [False, True], ids=["h2c", "tls"])
async def test_through_envoy_in_plaintext_and_tls(shared: Shared, tls: bool) -> None:
    """The edge in front: unary calls, a run's stream and an event stream through
    Envoy's routes, and over TLS with its (self-signed, trusted here) certificate."""
    envoy = shared.envoy
    if tls:
        credentials = grpc.ssl_channel_credentials(envoy.cert_file.read_bytes())
        target = f"127.0.0.1:{envoy.tls_port}"
        options = [("grpc.ssl_target_name_override", "localhost")]  # the certificate's name
    else:
        target, options = f"127.0.0.1:{envoy.port}", []
    async with Client(target, tls=credentials if tls else False, options=options) as client:
        await client.register(unique_email("edge"), PASSWORD)
        conversation = await new_conversation(client, await new_workspace(client))
        async with client.follow([conversation], types=["MESSAGE_CREATED"]) as events:
            await asyncio.wait_for(events.ready(), SETTLE_S)
            answer = await asyncio.wait_for(
                client.ask(conversation, "through the edge", handler="echo"), SETTLE_S
            )
            got = [await asyncio.wait_for(anext(events), SETTLE_S) for _ in range(2)]
        assert answer.text.startswith("through the edge")
        assert got[-1].message_created.message.name == answer.run.output_message


# -- across restarts ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("how", "recovery"),
    [
        (signal.SIGTERM, "fail"),
        (signal.SIGTERM, "requeue"),
        (signal.SIGKILL, "fail"),
    ],
    ids=["sigterm-fail", "sigterm-requeue", "sigkill-fail"],
)
async def test_events_and_a_run_resume_after_the_server_restarts(
    tmp_path: Path, stack: ExitStack, how: signal.Signals, recovery: str
) -> None:
    env = _env(tmp_path, SWITCHBOARD_DISPATCHER_RECOVERY=recovery)
    first = await _serve(stack, env)
    wire = Wire()
    async with Client(
        first.address, streams=QUICK, timeout_s=SETTLE_S, interceptors=wire.interceptors
    ) as c:
        await c.register(unique_email("restart"), PASSWORD)
        token = c.tokens.current()
        workspace = await new_workspace(c)
        followed = await new_conversation(c, workspace, "followed")
        talk = await new_conversation(c, workspace, "talk")

        follower: Follower = c.follow([workspace], types=["MESSAGE_CREATED", "RUN_UPDATED"])
        start = await asyncio.wait_for(follower.ready(), SETTLE_S)
        events = _read_in_background(follower)
        before = [(await append(c, followed, f"before {i}")).name for i in range(5)]
        await events.until(lambda items: _names(items)[-1:] == before[-1:], "the first messages")

        # A run slow enough to be running when the server stops.
        words = [f"word{i}" for i in range(24)]
        run = await c.send(talk, " ".join(words), handler="echo", parameters={"delay_ms": 250})
        watch: RunWatch = c.watch(run)
        updates = _read_in_background(watch)
        await updates.until(
            lambda items: any(isinstance(u, pb.RunUpdate) and u.HasField("delta") for u in items),
            "the run's first words",
        )

        await _stop(first, how)
        # A call made while the server is away: retried (GetPrincipal has no side
        # effects) until the server is back, then answered for the same token.
        principal = asyncio.ensure_future(c.auth.GetPrincipal(auth_pb2.GetPrincipalRequest()))
        second = await _serve(stack, env, port=first.port)
        assert second.port == first.port
        after = [(await append(c, followed, f"after {i}")).name for i in range(5)]
        assert (await asyncio.wait_for(principal, SETTLE_S)).principal.user

        # The run's watch resumed and reached the end recovery gave it.
        await updates.finished()
        seen = [u for u in updates.items if isinstance(u, pb.RunUpdate)]
        sequences = [u.sequence for u in seen]
        assert sequences == sorted(set(sequences)), "sequences must strictly increase"
        assert is_terminal(seen[-1])
        assert watch.resumes >= 1
        final = seen[-1].state_change.run
        stored = (await c.dispatcher.GetRun(pb.GetRunRequest(name=run.name))).run
        assert final.state == stored.state
        builder = AnswerBuilder()
        for update in seen:
            builder.add(update)
        # A run stores RUNNING without the handler waiting for it
        # (docs/dispatcher.md): killed before that landed, it is still QUEUED in
        # the database and runs again from the start whatever the policy.
        rerun = how == signal.SIGKILL and final.state == pb.RUN_STATE_SUCCEEDED
        if recovery == "fail" and not rerun:
            assert final.state == pb.RUN_STATE_FAILED
            assert isinstance(run_error(final), RunInterrupted)
        else:
            assert final.state == pb.RUN_STATE_SUCCEEDED
            assert builder.text.startswith(" ".join(words))
            # The new attempt is numbered in the next block of sequences.
            assert seen[-1].sequence > 2**32

        # Every event the log holds after the follower's start arrived, once, in order;
        # tokens arrive too (live, never logged: docs/events.md) and at most once.
        await events.until(_ended(run.name), "the run's last event")
        await events.until(
            lambda items: _names(items, followed) == before + after, "the later messages"
        )
        types = [events_pb2.EVENT_TYPE_MESSAGE_CREATED, events_pb2.EVENT_TYPE_RUN_UPDATED]
        logged = await _logged(c, workspace, start, types)
        await events.until(lambda items: len(items) >= len(logged), "every logged event")
        delivered = [e for e in events.items if isinstance(e, events_pb2.Event)]
        assert len({e.id for e in delivered}) == len(delivered)
        assert [e.id for e in delivered if not is_token(e)] == [e.id for e in logged]
        assert follower.resumes >= 1
        assert follower.duplicates == 0
        await follower.aclose()

        # The same access token throughout: the restarted server has the same key.
        assert c.tokens.current() == token
        assert wire.count(REFRESH) == 0
        assert {s.authorization for s in wire.of("/GetPrincipal")} == {f"Bearer {token}"}


async def test_a_server_restarted_with_a_new_signing_key_is_signed_in_to_again(
    tmp_path: Path, stack: ExitStack
) -> None:
    """A restart with a new signing key (dev mode's key file deleted: it makes a new
    one; the secret, and so the refresh tokens, stay): the access token is refused and
    the client renews the session by itself, once."""
    env = {
        "SWITCHBOARD_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/switchboard.db",
        "SWITCHBOARD_INSTANCE_ID": "python-client-dev",
    }
    first = await _serve(stack, env, dev=True)
    wire = Wire()
    async with Client(first.address, timeout_s=SETTLE_S, interceptors=wire.interceptors) as client:
        registered = await client.register(unique_email("dev"), PASSWORD)
        old = client.tokens.current()
        await _stop(first, signal.SIGTERM)
        (tmp_path / "switchboard.dev-signing-key.pem").unlink()
        await _serve(stack, env, port=first.port, dev=True)
        principal = await client.auth.GetPrincipal(auth_pb2.GetPrincipalRequest())
        assert principal.principal.session == registered.session.name
        assert [s.authorization for s in wire.of("/GetPrincipal")] == [
            f"Bearer {old}",
            f"Bearer {client.tokens.current()}",
        ]
        assert client.tokens.current() != old
        assert wire.count(REFRESH) == 1


class _StreamBreaks(logging.Handler):
    """Wakes the test when the client logs that a stream broke."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.broke = asyncio.Event()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "stream broke" in message:
            self.messages.append(message)
            self.broke.set()


@pytest.fixture
def stream_breaks() -> Iterator[_StreamBreaks]:
    handler = _StreamBreaks()
    logger = logging.getLogger("switchboard.client")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def test_a_silent_connection_is_taken_as_dead_and_the_follower_resumes(
    tmp_path: Path, stack: ExitStack, stream_breaks: _StreamBreaks
) -> None:
    """SIGSTOP: the connection stays open and nothing arrives, not even a heartbeat.
    Keepalive would notice after a minute or more; the idle timeout does sooner."""
    server = await _serve(stack, _env(tmp_path))
    policy = StreamPolicy(backoff=Backoff(initial_s=0.1, max_s=1.0), idle_timeout_s=3.0)
    async with Client(server.address, streams=policy, timeout_s=SETTLE_S) as client:
        await client.register(unique_email("silent"), PASSWORD)
        workspace = await new_workspace(client)
        conversation = await new_conversation(client, workspace)
        follower = client.follow([conversation], types=["MESSAGE_CREATED"])
        start = await asyncio.wait_for(follower.ready(), SETTLE_S)
        events = _read_in_background(follower)
        before = [(await append(client, conversation, f"before {i}")).name for i in range(3)]
        await events.until(lambda items: _names(items) == before, "the first messages")

        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)
        try:
            await asyncio.wait_for(stream_breaks.broke.wait(), SETTLE_S)
        finally:
            server.proc.send_signal(signal.SIGCONT)
        assert any("no frame" in m for m in stream_breaks.messages)
        after = [(await append(client, conversation, f"after {i}")).name for i in range(3)]
        await events.until(lambda items: _names(items) == before + after, "the later messages")
        logged = await _logged(client, conversation, start, [events_pb2.EVENT_TYPE_MESSAGE_CREATED])
        delivered = [e for e in events.items if isinstance(e, events_pb2.Event)]
        assert len({e.id for e in delivered}) == len(delivered)
        assert [e.id for e in delivered if not is_token(e)] == [e.id for e in logged]
        assert follower.resumes >= 1
        await follower.aclose()


# -- the example -------------------------------------------------------------------------

EXAMPLE: Final = Path(__file__).resolve().parents[2] / "examples" / "python_client.py"


def _example(server: ServeProcess, *args: str, password: str = "") -> list[dict[str, object]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    if password:
        env["SB_PASSWORD"] = password
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--target", server.address, *args],
        capture_output=True,
        text=True,
        timeout=SETTLE_S,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


async def test_the_example_asks_streams_follows_and_keeps_its_session(
    tmp_path: Path, shared: Shared
) -> None:
    server = shared.server
    tokens = tmp_path / "tokens.json"
    email = unique_email("example")
    first = await asyncio.to_thread(
        _example,
        server,
        "--email",
        email,
        "--register",
        "--tokens",
        str(tokens),
        "hello from the example",
        password=PASSWORD,
    )
    kinds = [line["kind"] for line in first]
    assert kinds[0] == "conversation"
    assert "delta" in kinds
    answer = next(line for line in first if line["kind"] == "answer")
    events = [line for line in first if line["kind"] == "event"]
    assert [e["type"] for e in events] == ["EVENT_TYPE_MESSAGE_CREATED"] * 2
    assert events[-1]["message"] == answer["message"]
    text = "".join(str(line["text"]) for line in first if line["kind"] == "delta")
    assert text.startswith("hello from the example")
    assert tokens.stat().st_mode & 0o077 == 0  # the session is the owner's alone

    # No password this time: the saved session continues, in the same conversation.
    second = await asyncio.to_thread(
        _example,
        server,
        "--email",
        email,
        "--tokens",
        str(tokens),
        "--conversation",
        str(first[0]["name"]),
        "again",
    )
    assert second[0]["name"] == first[0]["name"]
    assert any(line["kind"] == "answer" for line in second)
