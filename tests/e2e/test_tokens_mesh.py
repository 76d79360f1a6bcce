"""A token is not an event (docs/events.md, "Tokens") on the scaled-out shape: two
`switchboard serve` replicas (every service in each) as separate processes on one
PostgreSQL and one Redis, a real Envoy in front of both (one cluster; these calls carry
no routing header unless a test steers one, so Envoy picks a replica),
the llm handler pointed at the in-test fake model (tests/fakes/openai_server.py).

The model holds its answer after a few chunks until the test lets it go, so "mid-run"
is a state, not a moment; it can also hold back its first byte (``Reply.gate``), so
tokens can be made while a client is away.

- A client follows a run through Envoy with Subscribe (its conversation) and WatchRun,
  loses both streams twice mid-run and resumes through Envoy each time (Subscribe
  ``after_cursor``, WatchRun ``after_sequence``), wherever Envoy sends it: it gets every
  token once, in order, and one result with the whole answer.
- A Subscribe opened directly on the replica that does not own the run sees the run's
  tokens live (over Redis pub/sub) while the model still holds its answer.
- The owning replica is killed mid-answer: the run ends for the client (FAILED
  ``RUN_INTERRUPTED``, recovery policy ``fail``) and the log holds its state changes
  and nothing of the half answer.

The first two share one mesh, started once for the module (each with a user, a
conversation and a scripted reply of its own); the third, which kills a replica, starts
its own.

Which replica owns a run: the one that accepted SendMessage, found by its JSON log line
``run started``; which replica served a stream: the one whose ``rpc finished`` line
names the stream's method when the client cancelled it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import grpc
import pytest
import pytest_asyncio
from grpc import aio

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2, events_pb2_grpc
from switchboard.dispatcher.runs.core.store import TERMINAL
from tests.conftest import CALL_DEADLINE_S
from tests.e2e import modulescope
from tests.e2e.affinity import keys_to, steer
from tests.e2e.envoy import EnvoyProcess
from tests.e2e.procs import ServeProcess, scaled_env
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.infra.postgres import PostgresServer
from tests.infra.redis import RedisServer
from tests.kits.authkit import PASSWORD, unique_email
from tests.kits.contextkit import Caller, context_stub, create_conversation, create_workspace
from tests.kits.dispatchkit import Stub, dispatcher_stub, reason_of, request, stored_running
from tests.kits.eventkit import delta_text, is_token, run_updates, unique

# On the module's loop: the first two tests share one mesh (and its fake model).
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(240),
    pytest.mark.asyncio(loop_scope="module"),
]

ANSWER: Final = "one two three four five six seven"
HELD_AFTER: Final = 3  # chunks the model sends before it waits for the test
HELD_TEXT: Final = "one two three"
REPLICAS: Final = ("replica-1", "replica-2")
SERVICES: Final = ("auth", "context", "dispatcher", "events", "integration")
#: Every wait's bound: generous, the machine may be busy.
WAIT_S: Final = 60.0
SUBSCRIBE: Final = "/switchboard.api.events.v1.EventService/Subscribe"
WATCH_RUN: Final = "/switchboard.api.dispatcher.v1.DispatcherService/WatchRun"
_EOF: Any = getattr(aio, "EOF")  # noqa: B009


# -- the processes -----------------------------------------------------------------------


class Logs:
    """The replicas' JSON log lines as they come (a thread per process), waited on."""

    def __init__(self, processes: dict[str, ServeProcess]) -> None:
        self.entries: list[tuple[str, dict[str, Any]]] = []
        #: Lines before this index are an earlier test's (``from_now``).
        self.start = 0
        self._changed = threading.Condition()
        self._processes = len(processes)
        #: Processes whose output has ended (shared by every ``from_now`` view).
        self._ended: set[str] = set()
        for name, process in processes.items():
            threading.Thread(target=self._pump, args=(name, process), daemon=True).start()

    def _pump(self, name: str, process: ServeProcess) -> None:
        while (entry := process.lines.get()) is not None:
            with self._changed:
                self.entries.append((name, entry))
                self._changed.notify_all()
        with self._changed:
            self._ended.add(name)
            self._changed.notify_all()

    def from_now(self) -> Logs:
        """The same lines for a test that starts now on processes an earlier test used:
        only the lines logged from here on count."""
        view = copy.copy(self)
        with self._changed:
            view.start = len(self.entries)
        return view

    def wait(
        self, match: Callable[[dict[str, Any]], bool], count: int = 1
    ) -> list[tuple[str, dict[str, Any]]]:
        """The first ``count`` lines ``match`` accepts (of any replica), once they came."""
        deadline = time.monotonic() + WAIT_S
        with self._changed:
            while True:
                found = [
                    (name, entry) for name, entry in self.entries[self.start :] if match(entry)
                ]
                if len(found) >= count:
                    return found[:count]
                remaining = deadline - time.monotonic()
                if remaining <= 0 or len(self._ended) == self._processes:
                    tail = "\n".join(f"{n}: {e}" for n, e in self.entries[-40:])
                    pytest.fail(f"{count} matching log lines never came; the last:\n{tail}")
                self._changed.wait(remaining)

    async def owner(self, run: str) -> str:
        """The replica that runs ``run`` (it logs ``run started``)."""
        [(name, _)] = await asyncio.to_thread(
            self.wait, lambda e: e.get("message") == "run started" and e.get("run") == run
        )
        return name

    async def served(self, method: str, count: int) -> list[str]:
        """The replicas that served the first ``count`` finished calls of ``method``."""
        found = await asyncio.to_thread(
            self.wait,
            lambda e: e.get("message") == "rpc finished" and e.get("method") == method,
            count,
        )
        return [name for name, _ in found]


@dataclass
class Mesh:
    fake: FakeOpenAI
    replicas: dict[str, ServeProcess]
    envoy: EnvoyProcess
    logs: Logs
    #: The model's requests before the test began (earlier tests' on a shared mesh).
    requests_before: int = 0

    @property
    def edge(self) -> str:
        return f"127.0.0.1:{self.envoy.port}"


def mesh_env(directory: Path, postgres_url: str, redis_url: str) -> dict[str, str]:
    return {
        # The model is the fake, on loopback (which scaled_env lets the server reach).
        **scaled_env(directory, postgres_url, redis_url),
        "SWITCHBOARD_LLM_MODEL": "m-1",
        "SWITCHBOARD_LLM_MAX_RETRIES": "0",
        "PYTHONFAULTHANDLER": "1",
    }


@pytest.fixture
def env(tmp_path: Path, migrated_postgres_url: str, redis_server: RedisServer) -> dict[str, str]:
    """A mesh of a test's own (one that kills a replica), on a database and a Redis of its
    own: its replicas' names are the shared mesh's too."""
    return mesh_env(tmp_path, migrated_postgres_url, redis_server.url)


@pytest.fixture(scope="module")
def module_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    yield from modulescope.redis(tmp_path_factory)


@pytest.fixture(scope="module")
def module_database_url(postgres_server: PostgresServer, migrated_template: str) -> Iterator[str]:
    yield from modulescope.database(postgres_server, migrated_template)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_mesh(
    tmp_path_factory: pytest.TempPathFactory, module_database_url: str, module_redis: RedisServer
) -> AsyncIterator[Mesh]:
    """One mesh for the tests that neither start nor stop its processes: each signs up a
    user of its own and scripts the model's reply to its own run."""
    directory = tmp_path_factory.mktemp("tokens")
    async with running_mesh(mesh_env(directory, module_database_url, module_redis.url)) as mesh:
        yield mesh


@pytest.fixture
def mesh(shared_mesh: Mesh) -> Mesh:
    """The module's mesh as a test that starts now sees it: the log lines and the model's
    requests from here on, and no reply an earlier (failed) test scripted and left unused."""
    shared_mesh.fake.reset()
    return replace(
        shared_mesh,
        logs=shared_mesh.logs.from_now(),
        requests_before=len(shared_mesh.fake.requests),
    )


@contextlib.asynccontextmanager
async def running_mesh(env: dict[str, str]) -> AsyncIterator[Mesh]:
    """Two replicas (started side by side) and Envoy in front of both, each process
    killed on the way out whatever happened."""
    async with FakeOpenAI() as fake:
        with contextlib.ExitStack() as stack:
            replicas = {
                name: ServeProcess(
                    env={
                        **env,
                        "SWITCHBOARD_INSTANCE_ID": name,
                        "SWITCHBOARD_LLM_BASE_URL": fake.url,
                    }
                )
                for name in REPLICAS
            }
            for process in replicas.values():
                stack.push(process)
            await asyncio.gather(*(asyncio.to_thread(p.start) for p in replicas.values()))
            logs = Logs(replicas)
            addresses = [process.address for process in replicas.values()]
            envoy = EnvoyProcess(
                services={service: addresses for service in SERVICES},
                extra_args=("--health-interval=0.5",),
            )
            stack.push(envoy)
            await asyncio.to_thread(envoy.start)
            yield Mesh(fake, replicas, envoy, logs)


async def sign_up(channel: aio.Channel) -> Caller:
    answer = await auth_pb2_grpc.AuthServiceStub(channel).Register(
        auth_pb2.RegisterRequest(email=unique_email("tokens"), password=PASSWORD),
        timeout=CALL_DEADLINE_S,
    )
    return Caller(answer.user.name.removeprefix("users/"), answer.tokens.access_token)


async def a_conversation(channel: aio.Channel) -> tuple[Caller, str]:
    caller = await sign_up(channel)
    stub = context_stub(channel)
    workspace = await create_workspace(stub, caller, "Tokens")
    return caller, (await create_conversation(stub, caller, workspace.name)).name


async def a_followed_run(channel: aio.Channel) -> tuple[Caller, str, Follower, str]:
    """A new caller's conversation, a Subscribe following it, and a run of the llm handler
    sent to it (through ``channel``): the caller, the conversation, the follower, the run."""
    caller, conversation = await a_conversation(channel)
    follower = Follower(channel, caller, conversation)
    await follower.open()
    sent = await dispatcher_stub(channel).SendMessage(
        request(conversation, ANSWER, handler="handlers/llm"),
        metadata=caller.md,
        timeout=CALL_DEADLINE_S,
    )
    return caller, conversation, follower, sent.run.name


# -- what a client keeps ------------------------------------------------------------------


def broken(error: aio.AioRpcError) -> bool:
    """Whether a stream broke because the replica behind Envoy went away (resume it).

    Before the answer began Envoy says UNAVAILABLE; once it has begun, it can only
    reset the stream (RST_STREAM), which gRPC reports as INTERNAL.
    """
    return error.code() == grpc.StatusCode.UNAVAILABLE or (
        error.code() == grpc.StatusCode.INTERNAL and "RST_STREAM" in (error.details() or "")
    )


@dataclass
class Follower:
    """A Subscribe on one conversation: every stream it opened, each one's events, and
    the cursor to resume after (the newest frame's)."""

    channel: aio.Channel
    caller: Caller
    conversation: str
    streams: list[list[events_pb2.Event]] = field(default_factory=list)
    cursor: str = ""
    call: Any = None
    breaks: int = 0

    async def open(self, to: str = "") -> None:
        """A new stream after the cursor (routed by the key ``to`` if given); returns once
        it is registered (its heartbeat)."""
        self.call = events_pb2_grpc.EventServiceStub(self.channel).Subscribe(
            events_pb2.SubscribeRequest(
                scopes=[events_pb2.Scope(conversation=self.conversation)],
                types=[events_pb2.EVENT_TYPE_RUN_UPDATED],
                after_cursor=self.cursor,
            ),
            metadata=(*self.caller.md, *(steer(to) if to else ())),
            timeout=4 * WAIT_S,
        )
        self.streams.append([])
        first = await self._frame()
        assert first.WhichOneof("frame") == "heartbeat", first

    async def _frame(self) -> events_pb2.SubscribeResponse:
        async with asyncio.timeout(WAIT_S):
            frame: Any = await self.call.read()
        assert frame is not _EOF, "the event stream ended"
        if frame.WhichOneof("frame") == "batch":
            self.streams[-1].extend(frame.batch.events)
            self.cursor = frame.batch.cursor
        else:
            self.cursor = frame.heartbeat.cursor
        return frame  # type: ignore[no-any-return]

    @property
    def events(self) -> list[events_pb2.Event]:
        """What the client keeps: each event id once, the first copy (docs/events.md)."""
        return unique(event for stream in self.streams for event in stream)

    def updates(self, run: str) -> list[pb.RunUpdate]:
        return run_updates(self.events, run)

    async def until(self, run: str, done: Callable[[list[pb.RunUpdate]], bool]) -> None:
        """Read until ``done(the run's updates so far)``; a stream the dead replica took
        down is resumed (through Envoy) from the cursor."""
        async with asyncio.timeout(WAIT_S):  # heartbeats do not count as progress
            while not done(self.updates(run)):
                try:
                    await self._frame()
                except aio.AioRpcError as error:
                    if not broken(error):
                        raise
                    self.breaks += 1
                    assert self.breaks <= 3, f"the event stream broke {self.breaks} times"
                    await self.open()

    def drop(self) -> None:
        self.call.cancel()


@dataclass
class Watcher:
    """A WatchRun on one run through one channel: every stream it opened and what each
    one sent, resumed after the newest sequence seen."""

    stub: Stub
    caller: Caller
    run: str
    streams: list[list[pb.RunUpdate]] = field(default_factory=list)
    call: Any = None
    breaks: int = 0

    @property
    def updates(self) -> list[pb.RunUpdate]:
        return [update for stream in self.streams for update in stream]

    def open(self, to: str = "") -> None:
        """A new stream after the newest sequence (routed by the key ``to`` if given)."""
        after = self.updates[-1].sequence if self.updates else 0
        self.call = self.stub.WatchRun(
            pb.WatchRunRequest(name=self.run, after_sequence=after),
            metadata=(*self.caller.md, *(steer(to) if to else ())),
            timeout=4 * WAIT_S,
        )
        self.streams.append([])

    async def until(self, done: Callable[[list[pb.RunUpdate]], bool]) -> None:
        """Read until ``done(every update so far)``; a broken stream is resumed."""
        async with asyncio.timeout(WAIT_S):  # heartbeats do not count as progress
            while not done(self.updates):
                try:
                    frame: Any = await self.call.read()
                except aio.AioRpcError as error:
                    if not broken(error):
                        raise
                    self.breaks += 1
                    assert self.breaks <= 3, f"the watch broke {self.breaks} times"
                    self.open()
                    continue
                assert frame is not _EOF, f"the watch ended early: {self.updates}"
                if frame.WhichOneof("frame") == "update":
                    self.streams[-1].append(frame.update)

    def drop(self) -> None:
        self.call.cancel()


def has_text(wanted: str) -> Callable[[list[pb.RunUpdate]], bool]:
    return lambda updates: delta_text(updates) == wanted


def ended(updates: list[pb.RunUpdate]) -> bool:
    return any(u.state_change.run.state in TERMINAL for u in updates)


def states(updates: Iterable[pb.RunUpdate]) -> list[int]:
    return [u.state_change.run.state for u in updates if u.WhichOneof("update") == "state_change"]


def results(updates: Iterable[pb.RunUpdate]) -> list[str]:
    return [
        "".join(part.text for part in u.result.parts)
        for u in updates
        if u.WhichOneof("update") == "result"
    ]


def contiguous(sequences: Sequence[int]) -> bool:
    return list(sequences) == list(range(sequences[0], sequences[0] + len(sequences)))


async def logged(channel: aio.Channel, caller: Caller, conversation: str) -> list[events_pb2.Event]:
    """Everything ListEvents (the log) holds for the conversation, oldest first."""
    stub = events_pb2_grpc.EventServiceStub(channel)
    events: list[events_pb2.Event] = []
    token = ""
    while True:
        page = await stub.ListEvents(
            events_pb2.ListEventsRequest(
                scopes=[events_pb2.Scope(conversation=conversation)],
                page_size=500,
                page_token=token,
            ),
            metadata=caller.md,
            timeout=CALL_DEADLINE_S,
        )
        events += page.events
        token = page.next_page_token
        if not token:
            return events


async def get_run(stub: Stub, caller: Caller, run: str) -> pb.Run:
    answer = await stub.GetRun(
        pb.GetRunRequest(name=run), metadata=caller.md, timeout=CALL_DEADLINE_S
    )
    return answer.run


# -- the tests ----------------------------------------------------------------------------


async def test_streams_dropped_mid_run_resume_through_envoy_with_every_token_once(
    mesh: Mesh,
) -> None:
    """Subscribe and WatchRun through Envoy, each lost twice while the run is live:

    1. both open (WatchRun once the run is stored RUNNING and has its first frame), the
       model holding back its first byte; both are dropped, and while the client is away
       the model sends three chunks and holds the rest;
    2. resumed through Envoy, each gets those three tokens (the gap), then is dropped
       again, mid-answer;
    3. resumed through Envoy again, the model lets the rest go: each reads to the end.

    Subscribe, ids seen before dropped (as clients do): the run's updates once each, their
    sequences contiguous, the tokens in sequence order, their text the whole answer, one
    result carrying it, SUCCEEDED. WatchRun, as sent: the same, with no update twice.
    Which replica served each stream is printed. Each resume is sent to a replica chosen
    with the routing header (tests/e2e/affinity.py): the first, into the gap, to the
    replica without the run, the second to the run's own, so each kind is resumed once on
    each (asserted).
    """
    first_byte, rest = asyncio.Event(), asyncio.Event()
    async with aio.insecure_channel(mesh.edge) as channel:
        mesh.fake.script(
            Reply(content=ANSWER, gate=first_byte, hold_after_chunks=HELD_AFTER, hold=rest)
        )
        keys = await keys_to(channel, mesh.logs, REPLICAS)
        caller, conversation, follower, run = await a_followed_run(channel)
        dispatcher = dispatcher_stub(channel)
        owner = await mesh.logs.owner(run)
        [other] = set(REPLICAS) - {owner}
        await mesh.fake.wait_requests(mesh.requests_before + 1)
        await stored_running(dispatcher, caller, run)
        watcher = Watcher(dispatcher, caller, run)
        watcher.open()
        await watcher.until(bool)
        await follower.until(run, lambda updates: pb.RUN_STATE_RUNNING in states(updates))

        placed: dict[str, list[str]] = {SUBSCRIBE: [], WATCH_RUN: []}

        async def drop(stream: Follower | Watcher, method: str) -> None:
            """Lose the stream; note the replica that served it (its ``rpc finished``)."""
            stream.drop()
            placed[method] = await mesh.logs.served(method, len(placed[method]) + 1)

        # Away while the model sends its first chunks: an observer on the owner sees them.
        await drop(follower, SUBSCRIBE)
        await drop(watcher, WATCH_RUN)
        async with aio.insecure_channel(mesh.replicas[owner].address) as on_owner:
            observer = Watcher(dispatcher_stub(on_owner), caller, run)
            observer.open()
            first_byte.set()
            await observer.until(has_text(HELD_TEXT))
            await drop(observer, WATCH_RUN)

        # Back through Envoy, on the replica without the run: the tokens made meanwhile,
        # once; then lost again mid-answer.
        await follower.open(to=keys[other])
        watcher.open(to=keys[other])
        await follower.until(run, has_text(HELD_TEXT))
        await watcher.until(has_text(HELD_TEXT))
        await drop(follower, SUBSCRIBE)
        await drop(watcher, WATCH_RUN)

        # Back again, on the run's own replica; the model finishes.
        watcher.open(to=keys[owner])
        await follower.open(to=keys[owner])
        rest.set()
        await watcher.until(ended)
        await follower.until(run, ended)
        await drop(follower, SUBSCRIBE)
        placed[WATCH_RUN] = await mesh.logs.served(WATCH_RUN, len(placed[WATCH_RUN]) + 1)
        history = run_updates(await logged(channel, caller, conversation), run)

    subscribes = placed[SUBSCRIBE]
    watches = [w for i, w in enumerate(placed[WATCH_RUN]) if i != 1]  # not the observer
    print(f"owner {owner}; Subscribe streams on {subscribes}; WatchRun streams on {watches}")
    # The client's view through Subscribe.
    seen = follower.updates(run)
    assert follower.breaks == 0
    for stream in follower.streams:
        assert len({e.id for e in stream}) == len(stream), "an event twice on one stream"
    assert contiguous(sorted(u.sequence for u in seen)), [u.sequence for u in seen]
    tokens = [u.sequence for u in seen if u.WhichOneof("update") == "delta"]
    assert tokens == sorted(tokens)
    assert delta_text(seen) == ANSWER
    assert results(seen) == [ANSWER]
    assert states(seen) == [pb.RUN_STATE_QUEUED, pb.RUN_STATE_RUNNING, pb.RUN_STATE_SUCCEEDED]
    # The client's view through WatchRun: nothing twice, nothing missing, in order.
    watched = watcher.updates
    assert watcher.breaks == 0
    assert contiguous([u.sequence for u in watched]), [u.sequence for u in watched]
    assert delta_text(watched) == ANSWER
    assert results(watched) == [ANSWER]
    assert states(watched)[-1] == pb.RUN_STATE_SUCCEEDED
    # Stamps within the run never go backwards, whichever replica sent each update
    # (a snapshot from the replica without the run is stamped when its state was stored).
    for view in (sorted(seen, key=lambda u: u.sequence), watched, history):
        stamps = [u.time.ToNanoseconds() for u in view]
        assert stamps == sorted(stamps), [(u.sequence, u.time.ToJsonString()) for u in view]
    # The log: no token, the state changes and the result with the whole answer.
    assert [u.WhichOneof("update") for u in history].count("delta") == 0
    assert states(history) == [pb.RUN_STATE_QUEUED, pb.RUN_STATE_RUNNING, pb.RUN_STATE_SUCCEEDED]
    assert results(history) == [ANSWER]
    # Each kind of stream was resumed through Envoy on the other replica, then the run's.
    assert subscribes[1:] == [other, owner], (owner, subscribes)
    assert watches[1:] == [other, owner], (owner, watches)


async def test_a_subscriber_on_the_replica_without_the_run_sees_its_tokens_live(
    mesh: Mesh,
) -> None:
    """A Subscribe opened directly on each replica before the run: the one on the replica
    that does not own the run sees the first three tokens while the model holds the rest
    (the run RUNNING, no result, no end), with the ids the owner stamped, and then the
    rest of the run once, in sequence order."""
    rest = asyncio.Event()
    async with aio.insecure_channel(mesh.edge) as channel:
        mesh.fake.script(Reply.text(ANSWER, hold_after_chunks=HELD_AFTER, hold=rest))
        caller, conversation = await a_conversation(channel)
        async with (
            aio.insecure_channel(mesh.replicas[REPLICAS[0]].address) as first,
            aio.insecure_channel(mesh.replicas[REPLICAS[1]].address) as second,
        ):
            direct = {
                REPLICAS[0]: Follower(first, caller, conversation),
                REPLICAS[1]: Follower(second, caller, conversation),
            }
            for follower in direct.values():
                await follower.open()
            dispatcher = dispatcher_stub(channel)
            sent = await dispatcher.SendMessage(
                request(conversation, ANSWER, handler="handlers/llm"),
                metadata=caller.md,
                timeout=CALL_DEADLINE_S,
            )
            run = sent.run.name
            owner = await mesh.logs.owner(run)
            [other] = set(REPLICAS) - {owner}
            for follower in direct.values():
                await follower.until(run, has_text(HELD_TEXT))
            # Still mid-answer: the model holds the rest.
            elsewhere = direct[other].updates(run)
            stored = await get_run(dispatcher, caller, run)
            live_then = (ended(elsewhere), results(elsewhere), stored.state)
            rest.set()
            for follower in direct.values():
                await follower.until(run, ended)
                follower.drop()
            # Their ends logged before the next test on these processes counts streams.
            await mesh.logs.served(SUBSCRIBE, len(direct))

    assert live_then == (False, [], pb.RUN_STATE_RUNNING)
    token_ids = {
        name: [e.id for e in follower.events if is_token(e)] for name, follower in direct.items()
    }
    assert token_ids[other] == token_ids[owner]
    for follower in direct.values():
        seen = follower.updates(run)
        assert [u.sequence for u in seen] == sorted({u.sequence for u in seen})
        assert contiguous([u.sequence for u in seen])
        assert delta_text(seen) == ANSWER
        assert results(seen) == [ANSWER]
        assert states(seen)[-1] == pb.RUN_STATE_SUCCEEDED


async def test_a_run_whose_replica_is_killed_mid_answer_ends_and_the_log_has_no_half_answer(
    env: dict[str, str],
) -> None:
    """The run's replica is SIGKILLed while the model holds its answer after three chunks.

    What the client had been shown: QUEUED, RUNNING and the tokens "one two three" (on
    Subscribe and WatchRun, through Envoy). Its streams on the dead replica break (Envoy
    resets them); resumed through Envoy they land on the survivor (a stream already there
    goes on). What it sees of the tokens after the crash: no new token, and never a
    result. A Subscribe resumed on the survivor from a token's cursor is sent again the
    tokens the survivor heard after the logged event before it (the same ids: the client
    drops them, so its text stays "one two three"); a WatchRun resumed there after the
    last token's sequence is sent no token (there is none after it). Once the survivor has
    taken the run over (the dead replica's lease ran out), the run ends FAILED with
    RUN_INTERRUPTED (recovery policy ``fail``, set for this test), numbered in the next
    attempt's block of sequences (a watcher's sequences keep increasing, with a gap). So
    the three words are all the client was ever shown of the answer, as tokens, never as
    a result, and the run's end says it failed.

    The log (ListEvents afterwards) agrees: QUEUED, RUNNING, FAILED, no token and no
    result; each of those events is the one the client got, with the same id and update;
    and every non-token event the client got is in the log.
    """
    env = {
        **env,
        "SWITCHBOARD_DISPATCHER_LEASE_S": "3",
        # Not the default `resume`: the half answer must end the run, not be finished.
        "SWITCHBOARD_DISPATCHER_RECOVERY": "fail",
    }
    rest = asyncio.Event()
    async with running_mesh(env) as mesh, aio.insecure_channel(mesh.edge) as channel:
        mesh.fake.script(Reply.text(ANSWER, hold_after_chunks=HELD_AFTER, hold=rest))
        caller, conversation, follower, run = await a_followed_run(channel)
        dispatcher = dispatcher_stub(channel)
        owner = await mesh.logs.owner(run)
        watcher = Watcher(dispatcher, caller, run)
        watcher.open()
        await follower.until(run, has_text(HELD_TEXT))
        await watcher.until(has_text(HELD_TEXT))
        # Only a run stored as RUNNING fails by the recovery policy.
        await stored_running(dispatcher, caller, run)
        shown = (delta_text(follower.updates(run)), delta_text(watcher.updates))
        killed = mesh.replicas[owner]
        assert killed.proc is not None
        killed.proc.kill()
        killed.proc.wait(timeout=CALL_DEADLINE_S)

        await follower.until(run, ended)
        await watcher.until(ended)
        follower.drop()
        end = await get_run(dispatcher, caller, run)
        log = await logged(channel, caller, conversation)
        history = run_updates(log, run)
        logged_ids = {e.id: e for e in log if e.run_updated.update.run == run}

    subscribed = [[u.WhichOneof("update") for u in run_updates(s, run)] for s in follower.streams]
    watches = [[(u.sequence, u.WhichOneof("update")) for u in s] for s in watcher.streams]
    print(f"owner {owner} killed; Subscribe streams {subscribed}; WatchRun streams {watches}")
    assert shown == (HELD_TEXT, HELD_TEXT)
    assert end.state == pb.RUN_STATE_FAILED
    assert reason_of(end) == "ERROR_REASON_RUN_INTERRUPTED"
    # Subscribe: the tokens it had, nothing more; no result; the end, FAILED.
    seen = follower.updates(run)
    assert delta_text(seen) == HELD_TEXT
    assert results(seen) == []
    assert states(seen) == [pb.RUN_STATE_QUEUED, pb.RUN_STATE_RUNNING, pb.RUN_STATE_FAILED]
    assert seen[-1].state_change.run.error == end.error
    # WatchRun: the same, its sequences increasing across the takeover, the end in the
    # next attempt's block.
    watched = watcher.updates
    assert [u.sequence for u in watched] == sorted({u.sequence for u in watched})
    assert watched[-1].sequence > 2**32 > watched[-2].sequence
    assert delta_text(watched) == HELD_TEXT
    assert results(watched) == []
    assert states(watched)[-1] == pb.RUN_STATE_FAILED
    assert watched[-1].state_change.run.error == end.error
    # The log: the state changes, nothing of the half answer.
    kinds = [u.WhichOneof("update") for u in history]
    assert "delta" not in kinds, kinds
    assert "result" not in kinds, kinds
    assert states(history) == [pb.RUN_STATE_QUEUED, pb.RUN_STATE_RUNNING, pb.RUN_STATE_FAILED]
    # Nothing the client was shown is contradicted by the log: what it got that is not a
    # token is exactly what the log holds, event for event.
    kept = {e.id: e for e in follower.events if e.run_updated.update.run == run}
    assert {i for i, e in kept.items() if not is_token(e)} == set(logged_ids)
    for event_id, event in logged_ids.items():
        assert kept[event_id].run_updated == event.run_updated
