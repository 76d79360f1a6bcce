"""Event delivery across real processes and real faults.

Two `switchboard serve` processes, A and B, share one PostgreSQL database and one
redis-server with the append-only file on (``appendfsync always``), so the
event log is one Redis Stream. Events are published the way clients cause
them: every CreateApiKey publishes a security event (API_KEY_CREATED, naming
the key) to its user's scope. Subscribers follow that scope with Subscribe and,
on any stream error, resume from the last cursor they received (a batch's or a
heartbeat's), with a bounded backoff.

The faults, each while publishing goes on: Redis SIGKILLed then restarted on
the same port from its AOF; Redis SIGSTOPped then continued (a publish in
flight at the stop has an uncertain outcome and is retried: the dedupe key must
make it land once); a server process SIGKILLed under its subscriber, which then
resumes against the other process. Afterwards every subscriber must hold
exactly the events the log holds for the user after its start, in log order,
each once; and the log must hold exactly one event per CreateApiKey that
returned OK. And a client cancelling its Subscribe stream, as every resume
does, must never take the server down.

Every call carries a deadline; waiting is on what the subscribers and
publishers report (an ``asyncio.Condition``), never on a sleep.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import queue
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.asyncio import Redis

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.api.events.v1 import events_pb2, events_pb2_grpc
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.procs import ServeProcess, shared_secrets
from tests.infra.redis import RedisServer
from tests.kits.authkit import bearer, register

# A hang guard above the streams' budget.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

#: The log's stream (the product's default ``SWITCHBOARD_EVENTS_STREAM_KEY``).
LOG_STREAM: Final = "switchboard:events"
#: Deadline of every stream (Subscribe, Health.Watch) in one test.
STREAM_BUDGET_S: Final = 200.0
#: How long one phase of a scenario may take before the test fails (a hang guard): beside
#: the suite's load on two cores, 150 CreateApiKey calls through each process while Redis
#: was paused took past 15 s.
PHASE_TIMEOUT_S: Final = 60.0
#: Events each publisher must get through in each phase (before, during, after a fault).
PER_PHASE: Final = 10
#: Events each publisher must get through while Redis is away (a flush sends 100 per trip).
OUTBOX_EVENTS: Final = 150
#: Events published through B after A was killed under its subscriber.
KILLED_EVENTS: Final = 50
#: Subscribe streams a client opens and cancels in a row.
HANG_UPS: Final = 300
#: Reconnect backoff of a subscriber whose stream failed.
BACKOFF_MIN_S: Final = 0.02
BACKOFF_MAX_S: Final = 0.5

SERVING: Final = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: Final = health_pb2.HealthCheckResponse.NOT_SERVING
REDIS_HEALTH: Final = "switchboard.redis"
KEY_CREATED: Final = events_pb2.SECURITY_EVENT_KIND_API_KEY_CREATED


@pytest.fixture
def pair(
    tmp_path: Path, durable_redis_server: RedisServer, postgres_url: str
) -> Iterator[tuple[ServeProcess, ServeProcess]]:
    env = {
        **shared_secrets(tmp_path),
        # Processes share PostgreSQL: a SQLite file belongs to one process.
        "SWITCHBOARD_DATABASE_URL": postgres_url,
        "SWITCHBOARD_REDIS_URL": durable_redis_server.url,
        "SWITCHBOARD_REDIS_TIMEOUT_S": "0.2",
        "SWITCHBOARD_REDIS_LEASE_S": "0.6",
        # Frequent heartbeats, so resume cursors come from heartbeats too.
        "SWITCHBOARD_EVENTS_HEARTBEAT_S": "0.3",
        # A small in-memory window: ListEvents and most resumes read the log from
        # Redis, so what Redis kept (not what a process remembers) is checked.
        "SWITCHBOARD_EVENTS_MEMORY": "10",
        "SWITCHBOARD_MAX_API_KEYS_PER_USER": "10000",
        # A crash prints its Python stack to the log _assert_survived shows.
        "PYTHONFAULTHANDLER": "1",
    }
    with ServeProcess(env=env) as a, ServeProcess(env=env) as b:
        yield a, b
        _assert_survived(a, b)


def _assert_survived(*servers: ServeProcess) -> None:
    """Fail if a server died other than by the SIGKILL a test sent it."""
    for server in servers:
        assert server.proc is not None
        code = server.proc.poll()
        if code is None or code == -signal.SIGKILL:
            continue
        stack: list[str] = []
        with contextlib.suppress(queue.Empty):
            while (entry := server.lines.get(timeout=CALL_DEADLINE_S)) is not None:
                if entry.get("raw"):
                    stack.append(str(entry["message"]))
        pytest.fail(f"server {server.address} died with exit code {code}:\n" + "\n".join(stack))


def _position(cursor: str) -> tuple[int, int]:
    major, _, minor = cursor.partition("-")
    return int(major), int(minor)


class Scenario:
    """Progress reports from every task in a test, and waiting on them with a deadline."""

    def __init__(self) -> None:
        self.progress = asyncio.Condition()
        self.failures: list[BaseException] = []
        self.deadline = asyncio.get_running_loop().time() + STREAM_BUDGET_S

    async def changed(self) -> None:
        async with self.progress:
            self.progress.notify_all()

    async def until(
        self, predicate: Callable[[], bool], what: str, timeout_s: float = PHASE_TIMEOUT_S
    ) -> None:
        try:
            async with asyncio.timeout(timeout_s), self.progress:
                await self.progress.wait_for(lambda: bool(self.failures) or predicate())
        except TimeoutError:
            raise AssertionError(f"not within {timeout_s}s: {what}") from None
        if self.failures:
            raise self.failures[0]

    def remaining(self) -> float:
        return max(0.001, self.deadline - asyncio.get_running_loop().time())


class Follower:
    """One Subscribe client that resumes from its last cursor after any stream error."""

    def __init__(
        self, scenario: Scenario, label: str, channel: aio.Channel, user: str, token: str
    ) -> None:
        self._scenario = scenario
        self.label = label
        #: Where the next (re)subscription goes; a test may move it to another process.
        self.channel = channel
        self._user = user
        self._token = token
        self.start = ""  # the first heartbeat's cursor: delivery starts after it
        self.cursor = ""  # the newest batch or heartbeat cursor received
        self.events: list[events_pb2.Event] = []
        self.subscriptions = 0
        self.errors: list[str] = []
        self.anomalies: list[str] = []
        self._hop_to: aio.Channel | None = None

    def hop(self, channel: aio.Channel) -> None:
        """Close the stream at the next frame, then resume through ``channel``."""
        self._hop_to = channel

    @property
    def live(self) -> bool:
        return bool(self.start)

    def keys(self) -> list[str]:
        return [e.security.api_key for e in self.events if e.security.kind == KEY_CREATED]

    async def run(self) -> None:
        try:
            await self._follow()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._scenario.failures.append(exc)
            await self._scenario.changed()
            raise

    async def _follow(self) -> None:
        backoff = BACKOFF_MIN_S
        while True:
            stub = events_pb2_grpc.EventServiceStub(self.channel)
            request = events_pb2.SubscribeRequest(
                scopes=[events_pb2.Scope(user=self._user)], after_cursor=self.cursor
            )
            self.subscriptions += 1
            call = stub.Subscribe(
                request, metadata=bearer(self._token), timeout=self._scenario.remaining()
            )
            try:
                async for frame in call:
                    await self._take(frame)
                    backoff = BACKOFF_MIN_S
                    if self._hop_to is not None:
                        self.channel, self._hop_to = self._hop_to, None
                        break
                else:
                    self.errors.append("stream ended with OK")
            except aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    return  # the test's budget is spent; it fails on its own waits
                self.errors.append(f"{exc.code().name}: {exc.details()}")
            finally:
                call.cancel()
            await asyncio.sleep(backoff)  # reconnect backoff, not synchronization
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _take(self, frame: events_pb2.SubscribeResponse) -> None:
        if frame.WhichOneof("frame") == "heartbeat":
            cursor = frame.heartbeat.cursor
            if not self.start:
                self.start = cursor
        else:
            last = _position(self.cursor or self.start)
            for event in frame.batch.events:
                if _position(event.cursor) <= last:
                    self.anomalies.append(f"event {event.cursor} not after {last}")
                last = _position(event.cursor)
            self.events.extend(frame.batch.events)
            cursor = frame.batch.cursor
            if _position(cursor) < last:
                self.anomalies.append(f"batch cursor {cursor} before its last event {last}")
        if self.cursor and _position(cursor) < _position(self.cursor):
            self.anomalies.append(f"cursor went back from {self.cursor} to {cursor}")
        self.cursor = cursor
        await self._scenario.changed()


class Publisher:
    """CreateApiKey in a loop through one process; remembers every key that returned OK."""

    def __init__(self, scenario: Scenario, label: str, channel: aio.Channel, token: str) -> None:
        self._scenario = scenario
        self.label = label
        self._stub = auth_pb2_grpc.AuthServiceStub(channel)
        self._token = token
        self.keys: list[str] = []
        self.failures: list[str] = []

    async def create(self) -> None:
        try:
            response = await self._stub.CreateApiKey(
                auth_pb2.CreateApiKeyRequest(display_name=f"{self.label} {len(self.keys)}"),
                metadata=bearer(self._token),
                timeout=CALL_DEADLINE_S,
            )
        except aio.AioRpcError as exc:
            failure = f"{exc.code().name}: {exc.details()}"
            self.failures.append(failure)
            self._scenario.failures.append(
                AssertionError(f"{self.label}: CreateApiKey failed: {failure}")
            )
        else:
            self.keys.append(response.api_key.name)
        await self._scenario.changed()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.create()
            if self.failures:
                return  # reported by the test; do not spin on a broken server


class HealthWatch:
    """Health.Watch of one entry on one process, every status it reports in order."""

    def __init__(self, scenario: Scenario, label: str, channel: aio.Channel, service: str) -> None:
        self._scenario = scenario
        self.label = label
        self._channel = channel
        self._service = service
        self.statuses: list[int] = []

    @property
    def status(self) -> int | None:
        return self.statuses[-1] if self.statuses else None

    async def run(self) -> None:
        stub = health_pb2_grpc.HealthStub(self._channel)
        call = stub.Watch(
            health_pb2.HealthCheckRequest(service=self._service),
            timeout=self._scenario.remaining(),
        )
        try:
            async for reply in call:
                self.statuses.append(reply.status)
                await self._scenario.changed()
        except aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                self._scenario.failures.append(exc)
                await self._scenario.changed()
        finally:
            call.cancel()


async def _check_health(channel: aio.Channel, service: str) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=CALL_DEADLINE_S
    )
    return int(reply.status)


async def _list_events(channel: aio.Channel, user: str, token: str) -> list[events_pb2.Event]:
    """Everything the log retains for ``user``, oldest first, through ListEvents."""
    stub = events_pb2_grpc.EventServiceStub(channel)
    events: list[events_pb2.Event] = []
    page_token = ""
    while True:
        page = await stub.ListEvents(
            events_pb2.ListEventsRequest(
                scopes=[events_pb2.Scope(user=user)], page_size=500, page_token=page_token
            ),
            metadata=bearer(token),
            timeout=CALL_DEADLINE_S,
        )
        events.extend(page.events)
        page_token = page.next_page_token
        if not page_token:
            return events


def _sample(items: Sequence[str] | set[str], limit: int = 5) -> list[str]:
    return sorted(items)[:limit]


def _assert_exact(
    followers: Sequence[Follower],
    publishers: Sequence[Publisher],
    logs: Sequence[list[events_pb2.Event]],
) -> None:
    """Each follower holds exactly the log after its start; the log, what was published."""
    for publisher in publishers:
        assert not publisher.failures, (
            f"{publisher.label}: CreateApiKey failed: {publisher.failures}"
        )
    published = [key for publisher in publishers for key in publisher.keys]
    assert len(published) == len(set(published))
    expected = set(published)

    reference = logs[0]
    for other in logs[1:]:
        # The same log, in the same order, through either process.
        assert [e.id for e in other] == [e.id for e in reference]
    ids = [e.id for e in reference]
    duplicated = [i for i, n in collections.Counter(ids).items() if n > 1]
    assert not duplicated, f"the log holds event ids more than once: {duplicated[:5]}"
    logged = [e.security.api_key for e in reference if e.security.kind == KEY_CREATED]
    twice = [k for k, n in collections.Counter(logged).items() if n > 1]
    assert not twice, f"the log holds {len(twice)} keys' events more than once: {twice[:5]}"
    assert set(logged) == expected, (
        f"log vs OK calls: missing {len(expected - set(logged))} "
        f"{_sample(expected - set(logged))}, unexpected {_sample(set(logged) - expected)}"
    )

    for follower in followers:
        label = follower.label
        assert not follower.anomalies, f"{label}: {follower.anomalies[:5]}"
        got = [e.id for e in follower.events]
        repeats = [i for i, n in collections.Counter(got).items() if n > 1]
        assert not repeats, f"{label} received {len(repeats)} events more than once"
        keys = follower.keys()
        assert set(keys) == expected, (
            f"{label}: missing {len(expected - set(keys))} {_sample(expected - set(keys))}, "
            f"unexpected {_sample(set(keys) - expected)}"
        )
        start = _position(follower.start)
        after_start = [e.id for e in reference if _position(e.cursor) > start]
        assert got == after_start, (
            f"{label} did not receive the log after {follower.start} in order"
        )
        for publisher in publishers:
            mine = set(publisher.keys)
            seen = [k for k in keys if k in mine]
            assert seen == publisher.keys, f"{label} saw {publisher.label}'s events reordered"


class Mesh:
    """A signed-in user, channels to A and B, and the scenario's background tasks."""

    def __init__(self, scenario: Scenario, a: aio.Channel, b: aio.Channel) -> None:
        self.scenario = scenario
        self.a = a
        self.b = b
        self.user = ""
        self.token = ""
        self._tasks: list[asyncio.Task[None]] = []

    def spawn(self, job: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(job)
        self._tasks.append(task)
        return task

    async def follow(self, placement: Sequence[tuple[str, aio.Channel]]) -> list[Follower]:
        """Start one follower per (label, channel); return once every one is live."""
        followers = [
            Follower(self.scenario, label, channel, self.user, self.token)
            for label, channel in placement
        ]
        for follower in followers:
            self.spawn(follower.run())
        await self.scenario.until(lambda: all(f.live for f in followers), "every subscription live")
        return followers

    async def start_publishing(
        self, publishers: Sequence[Publisher]
    ) -> Callable[[], Awaitable[None]]:
        """Start publishing in a loop through each; returns the stop (which waits for them)."""
        stop = asyncio.Event()
        tasks = [self.spawn(publisher.run(stop)) for publisher in publishers]

        async def stopped() -> None:
            stop.set()
            async with asyncio.timeout(CALL_DEADLINE_S * 2):
                await asyncio.gather(*tasks)

        return stopped

    async def logs(self, *channels: aio.Channel) -> list[list[events_pb2.Event]]:
        return [await _list_events(channel, self.user, self.token) for channel in channels]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def _mesh(pair: tuple[ServeProcess, ServeProcess]) -> AsyncIterator[Mesh]:
    a, b = pair
    async with aio.insecure_channel(a.address) as ca, aio.insecure_channel(b.address) as cb:
        mesh = Mesh(Scenario(), ca, cb)
        try:
            response = await register(ca)
            mesh.user = response.user.name
            mesh.token = response.tokens.access_token
            yield mesh
        finally:
            await mesh.close()


def _received_all(
    followers: Sequence[Follower], publishers: Sequence[Publisher]
) -> Callable[[], bool]:
    def check() -> bool:
        expected = {key for publisher in publishers for key in publisher.keys}
        return all(expected <= set(f.keys()) for f in followers)

    return check


async def _deduplicated_appends(redis: RedisServer) -> int:
    """Appends the dedupe key turned away since Redis started: the append script ran
    without adding an entry to the log's stream. Only the event log runs scripts on this
    server (these calls start no run, so no token is sent), and nothing restarted it: the
    stream's entries added are those of this server's run."""
    client = Redis.from_url(
        redis.url, socket_timeout=CALL_DEADLINE_S, socket_connect_timeout=CALL_DEADLINE_S
    )
    try:
        stats: dict[str, dict[str, int]] = await client.info("commandstats")
        stream: dict[str, Any] = await client.xinfo_stream(LOG_STREAM)
    finally:
        await client.aclose()
    script = stats.get("cmdstat_evalsha", {})
    ran = script.get("calls", 0) - script.get("failed_calls", 0)
    return ran - int(stream["entries-added"])


async def test_an_event_published_through_a_reaches_subscribers_on_b(
    pair: tuple[ServeProcess, ServeProcess],
) -> None:
    async with _mesh(pair) as mesh:
        scenario = mesh.scenario
        followers = await mesh.follow([("A1", mesh.a), ("B1", mesh.b), ("B2", mesh.b)])
        through_a = Publisher(scenario, "via-a", mesh.a, mesh.token)
        through_b = Publisher(scenario, "via-b", mesh.b, mesh.token)
        # One event through A first: it reaches the subscribers on B.
        await through_a.create()
        await scenario.until(_received_all(followers, [through_a]), "the first event everywhere")
        for _ in range(PER_PHASE):
            await asyncio.gather(through_a.create(), through_b.create())
        publishers = [through_a, through_b]
        await scenario.until(_received_all(followers, publishers), "every event everywhere")

        _assert_exact(followers, publishers, await mesh.logs(mesh.a, mesh.b))
        # Each follower's delivery starts at its own first heartbeat: an event of the
        # user's sign-up can land between two followers' starts. Compared from the last start.
        latest = max(_position(f.start) for f in followers)
        orders = [[e.id for e in f.events if _position(e.cursor) > latest] for f in followers]
        assert orders[0] == orders[1] == orders[2], "A and B delivered different orders"
        assert all(f.subscriptions == 1 for f in followers), [f.errors for f in followers]


@pytest.mark.parametrize("outage", ["kill", "pause"])
async def test_every_subscriber_gets_every_event_once_across_a_redis_outage(
    pair: tuple[ServeProcess, ServeProcess], durable_redis_server: RedisServer, outage: str
) -> None:
    redis = durable_redis_server
    async with _mesh(pair) as mesh:
        scenario = mesh.scenario
        a, b = mesh.a, mesh.b
        redis_health = [HealthWatch(scenario, n, c, REDIS_HEALTH) for n, c in (("A", a), ("B", b))]
        overall = [HealthWatch(scenario, n, c, "") for n, c in (("A", a), ("B", b))]
        for watch in (*redis_health, *overall):
            mesh.spawn(watch.run())
        await scenario.until(
            lambda: all(w.status == SERVING for w in (*redis_health, *overall)),
            "every health entry SERVING before the outage",
        )
        followers = await mesh.follow([("A1", a), ("A2", a), ("A3", a), ("B1", b), ("B2", b)])
        publishers = [
            Publisher(scenario, "via-a", a, mesh.token),
            Publisher(scenario, "via-b", b, mesh.token),
        ]
        stop_publishing = await mesh.start_publishing(publishers)
        await scenario.until(
            lambda: all(len(f.keys()) >= PER_PHASE for f in followers), "events before the outage"
        )

        if outage == "kill":
            redis.kill()
        else:
            redis.pause()
        try:
            await scenario.until(
                lambda: all(w.status == NOT_SERVING for w in redis_health),
                f"{REDIS_HEALTH} NOT_SERVING on both processes while Redis is down",
            )
            for channel in (a, b):
                assert await _check_health(channel, "") == SERVING
            # Resubscribing works during the outage: A3 moves to B, B2 comes back to B.
            # (A cursor B has not reached yet answers UNAVAILABLE until Redis is back.)
            hoppers = [followers[2], followers[4]]
            for follower in hoppers:
                follower.hop(b)
            # Publishing goes on: these wait in each process's outbox (more than one
            # flush round trip's worth).
            degraded = [len(p.keys) for p in publishers]
            await scenario.until(
                lambda: (
                    all(
                        len(p.keys) >= n + OUTBOX_EVENTS
                        for p, n in zip(publishers, degraded, strict=True)
                    )
                    and all(f.subscriptions >= 2 for f in hoppers)
                ),
                "CreateApiKey answering OK while Redis is down; subscribers resubscribed",
            )
            # No subscriber sees them before they are in the stream.
            held = {k for p, n in zip(publishers, degraded, strict=True) for k in p.keys[n:]}
            for follower in followers:
                assert not held & set(follower.keys()), f"{follower.label} saw outbox events"
        finally:
            if outage == "kill":
                redis.restart()
            else:
                redis.resume()

        await scenario.until(
            lambda: all(w.status == SERVING for w in redis_health),
            f"{REDIS_HEALTH} SERVING again on both processes",
        )
        restored = [len(p.keys) for p in publishers]
        await scenario.until(
            lambda: all(
                len(p.keys) >= n + PER_PHASE for p, n in zip(publishers, restored, strict=True)
            ),
            "publishing after the outage",
        )
        await stop_publishing()
        # One last event through each process: whatever its outbox held, and any
        # retried append, is before it in the log, so nothing can arrive later.
        for publisher in publishers:
            await publisher.create()
        await scenario.until(_received_all(followers, publishers), "every event everywhere")

        _assert_exact(followers, publishers, await mesh.logs(a, b))
        # The process as a whole stayed SERVING throughout.
        assert all(set(w.statuses) == {SERVING} for w in overall), [w.statuses for w in overall]
        for channel in (a, b):
            assert await _check_health(channel, REDIS_HEALTH) == SERVING
        if outage == "pause":
            # The publishes in flight at SIGSTOP had an uncertain outcome: Redis ran
            # them on SIGCONT, and their retries from the outbox were turned away.
            assert await _deduplicated_appends(redis) >= 1


async def test_a_subscriber_resumes_on_b_after_its_server_is_killed(
    pair: tuple[ServeProcess, ServeProcess],
) -> None:
    server_a, _ = pair
    async with _mesh(pair) as mesh:
        scenario = mesh.scenario
        victim, bystander = await mesh.follow([("on-A", mesh.a), ("on-B", mesh.b)])
        publisher = Publisher(scenario, "via-b", mesh.b, mesh.token)
        stop_publishing = await mesh.start_publishing([publisher])
        await scenario.until(lambda: len(victim.keys()) >= PER_PHASE, "events on A before the kill")

        assert server_a.proc is not None
        server_a.proc.kill()
        server_a.proc.wait(timeout=CALL_DEADLINE_S)
        victim.channel = mesh.b  # it resumes from its last cursor, on B
        before = len(publisher.keys)
        await scenario.until(
            lambda: len(publisher.keys) >= before + KILLED_EVENTS and victim.subscriptions >= 2,
            "publishing on after the kill, and the subscriber resubscribed",
        )
        await stop_publishing()
        await publisher.create()
        await scenario.until(_received_all([victim, bystander], [publisher]), "every event")

        _assert_exact([victim, bystander], [publisher], await mesh.logs(mesh.b))
        assert victim.errors, "the subscriber on A never saw its stream fail"
        assert victim.errors[0].startswith("UNAVAILABLE"), victim.errors
        assert bystander.subscriptions == 1, bystander.errors


async def test_subscribers_hanging_up_do_not_take_the_server_down() -> None:
    """Clients cancel Subscribe streams all the time (a resume, a closed tab): each
    cancellation ends that call only, and the process keeps serving."""
    with ServeProcess("--dev", env={"PYTHONFAULTHANDLER": "1"}) as server:
        async with aio.insecure_channel(server.address) as channel:
            response = await register(channel)
            stub = events_pb2_grpc.EventServiceStub(channel)
            request = events_pb2.SubscribeRequest(
                scopes=[events_pb2.Scope(user=response.user.name)]
            )
            metadata = bearer(response.tokens.access_token)
            try:
                for _ in range(HANG_UPS):
                    call = stub.Subscribe(request, metadata=metadata, timeout=CALL_DEADLINE_S)
                    first = await call.read()
                    assert isinstance(first, events_pb2.SubscribeResponse)
                    assert first.WhichOneof("frame") == "heartbeat"
                    call.cancel()
                    # Still serving, on the same connection.
                    assert await _check_health(channel, "") == SERVING
            finally:
                _assert_survived(server)
